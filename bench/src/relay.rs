//! `bench relay`: what relay routes save the source, on a farm of 1 → 8.
//!
//! The farm of `vm-tests/tests/farm.rs`, in network namespaces
//! ([`cd_testkit::netns`]): the master on its own host, the source `node1` (region
//! east, a group of its own) and eight targets, two regions (east, west) × two groups
//! × two servers, one head per group by capacity weight. Every link is limited to
//! `--rate` (default 200 Mbit/s) each way with `tc tbf`, so the source's uplink is
//! the bottleneck it is in a real farm.
//!
//! One full initial sync of a seeded tree (`--files` files, `--mib` MiB in total,
//! incompressible, `zstd_level = 0` so that compression neither helps nor costs CPU)
//! to empty targets, with the content set's `routing = "direct"` (every target
//! straight from the source) and `routing = "relay"` (the source sends one copy per
//! group of its region and one per other region; heads forward). Each run is a fresh
//! cluster and fresh targets; runs alternate between the two modes. Measured, per run:
//!
//! - **source bytes**: what the source host sent during the sync, from the kernel's
//!   counter of its hub-side veth (frames with headers; control traffic included);
//! - **all bytes**: the same summed over every host;
//! - **wall**: from `cdctl sync` until it returns (every target has reported).
//!
//! After each run every target is compared with the source (`cd_testkit::compare`);
//! a difference fails the bench. Printed: medians (min–max) and the ratio
//! direct / relay; the same as JSON in `--json`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cd_testkit::cluster::{Cluster, ClusterSpec, MASTER};
use cd_testkit::compare::compare;
use cd_testkit::human_bytes;
use cd_testkit::netns::Net;
use cd_testkit::tree::noise;
use serde_json::json;

use crate::args::{Options, at_least};
use crate::table::Table;

const USAGE: &str = "\
usage: bench relay [--runs N] [--rate RATE] [--files N] [--mib N] [--dir DIR]
                   [--prefix P] [--json FILE] [--debug-daemon]
  one initial sync, 1 -> 8 (2 regions x 2 groups x 2 servers, network namespaces,
  every link limited to RATE, default 200mbit), routing = \"direct\" vs \"relay\":
  bytes leaving the source and wall time, median of N runs (default 3)
  --files N, --mib N  the tree: N files (default 500), N MiB in total (default 64)
  --dir DIR           work in DIR (default target/bench/relay; removed first, kept after)
  --prefix P          network namespaces are named P-<host> (default cdrel)
  --json FILE         default target/bench/relay.json
  --debug-daemon      use the dev-profile cdd (faster to build, slower to run)";

/// The servers: name, region, group, capacity weight (as in `vm-tests/tests/farm.rs`).
const SERVERS: [(&str, &str, &str, u32); 9] = [
    ("node1", "east", "east-src", 1),
    ("node2", "east", "east-a", 4),
    ("node3", "east", "east-a", 2),
    ("node4", "east", "east-b", 4),
    ("node5", "east", "east-b", 2),
    ("node6", "west", "west-a", 8),
    ("node7", "west", "west-a", 2),
    ("node8", "west", "west-b", 4),
    ("node9", "west", "west-b", 2),
];

const MODES: [&str; 2] = ["direct", "relay"];

/// Options of `bench relay`.
#[derive(Debug, Clone)]
pub struct Args {
    runs: usize,
    rate: String,
    files: usize,
    mib: usize,
    dir: PathBuf,
    prefix: String,
    json: PathBuf,
    debug_daemon: bool,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Self> {
        let target = cd_testkit::build::workspace_root().join("target");
        let mut out = Self {
            runs: 3,
            rate: "200mbit".to_owned(),
            files: 500,
            mib: 64,
            dir: target.join("bench/relay"),
            prefix: "cdrel".to_owned(),
            json: target.join("bench/relay.json"),
            debug_daemon: false,
        };
        let mut o = Options::new(args, USAGE);
        while let Some(name) = o.next_name() {
            match name {
                "--runs" => out.runs = at_least(name, o.value(name)?, 1)?,
                "--rate" => out.rate = o.value(name)?,
                "--files" => out.files = at_least(name, o.value(name)?, 1)?,
                "--mib" => out.mib = at_least(name, o.value(name)?, 1)?,
                "--dir" => out.dir = o.value(name)?,
                "--prefix" => out.prefix = o.value(name)?,
                "--json" => out.json = o.value(name)?,
                "--debug-daemon" => out.debug_daemon = true,
                other => return Err(o.unknown(other)),
            }
        }
        Ok(out)
    }
}

/// One sync.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    source_bytes: u64,
    all_bytes: u64,
}

/// `files` files of `total` bytes in all, sizes spread over two orders of magnitude,
/// in 20 directories two levels deep. Returns the bytes written.
fn generate(root: &Path, files: usize, total: u64) -> Result<u64> {
    // Weights 1..=100, cycling with a stride so that neighbours differ.
    let weight = |i: usize| 1 + (i * 37) % 100;
    let sum: usize = (0..files).map(weight).sum();
    let mut written = 0;
    for i in 0..files {
        let dir = root.join(format!("d{:02}/s{}", i % 10, i % 2));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let len = usize::try_from(total)? * weight(i) / sum;
        fs::write(dir.join(format!("f{i:04}.bin")), noise(i as u64 + 1, len))?;
        written += len as u64;
    }
    Ok(written)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One run: a fresh cluster with `routing`, one sync, verified.
fn run_once(
    net: &Net,
    args: &Args,
    (cdd, cdctl): (&Path, &Path),
    routing: &str,
    src: &Path,
    run: usize,
) -> Result<Sample> {
    let work = args.dir.join(format!("{routing}-{run}"));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let mut spec = ClusterSpec::new(SERVERS.len(), &work, cdd, cdctl);
    spec.startup_timeout = Duration::from_secs(120);
    spec.sync_timeout = Duration::from_secs(1800);
    spec.zstd_level = Some(0);
    spec.mode = Some("manual");
    spec.roots.insert("node1".to_owned(), src.to_path_buf());
    for h in net.hosts() {
        spec.placements.insert(h.name.clone(), h.placement());
    }
    for (name, region, group, weight) in SERVERS {
        spec.server(name, region, group, weight);
    }
    spec.set_lines.push(format!("routing = \"{routing}\""));
    let c = Cluster::start(spec).context("starting the farm")?;
    let source = net.host("node1")?;
    let (s0, a0) = (net.tx_bytes(source)?, net.total_tx_bytes()?);
    let t = Instant::now();
    c.sync()?;
    let wall = t.elapsed();
    let (s1, a1) = (net.tx_bytes(source)?, net.total_tx_bytes()?);
    for t in c.targets() {
        let d = compare(src, &c.root(&t)?)?;
        ensure!(
            d.is_empty(),
            "{routing} run {run}: {t} differs from the source in {} place(s), first: {:?}",
            d.len(),
            &d[..d.len().min(5)]
        );
    }
    drop(c);
    Ok(Sample {
        wall,
        source_bytes: s1 - s0,
        all_bytes: a1 - a0,
    })
}

#[expect(clippy::cast_precision_loss, reason = "figures for humans")]
pub fn run(args: &Args) -> Result<()> {
    ensure!(
        cd_testkit::is_root(),
        "bench relay needs root (network namespaces)"
    );
    cd_testkit::netns::check_available()?;
    let (cdd, cdctl) = if args.debug_daemon {
        cd_testkit::build::debug_daemon()?
    } else {
        cd_testkit::build::release_daemon()?
    };
    if args.dir.exists() {
        fs::remove_dir_all(&args.dir)
            .with_context(|| format!("removing {}", args.dir.display()))?;
    }
    let src = args.dir.join("src");
    let total = generate(&src, args.files, (args.mib as u64) << 20)?;
    let mut names = vec![MASTER];
    names.extend(SERVERS.iter().map(|s| s.0));
    let net = Net::create(&args.prefix, &names)?;
    net.shape(Some(&args.rate))?;
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "relay: 1 -> 8 (2 regions x 2 groups x 2), every link {} each way, {} files, {}, \
         zstd off, {} run(s) per mode; load average {}",
        args.rate,
        args.files,
        human_bytes(total),
        args.runs,
        load.join(" ")
    );
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=args.runs {
        for (m, routing) in MODES.iter().enumerate() {
            let s = run_once(&net, args, (&cdd, &cdctl), routing, &src, run)
                .with_context(|| format!("{routing} run {run}"))?;
            eprintln!(
                "  {routing} run {run}: {:.2} s, source sent {}, all hosts {}",
                s.wall.as_secs_f64(),
                human_bytes(s.source_bytes),
                human_bytes(s.all_bytes)
            );
            samples[m].push(s);
        }
    }

    let mut t = Table::new(vec![
        "routing".into(),
        "wall med (min-max)".into(),
        "source sent med".into(),
        "source / data".into(),
        "all hosts sent med".into(),
    ]);
    let mut json_modes = serde_json::Map::new();
    let mut med = [(0.0, 0.0); 2];
    for (m, routing) in MODES.iter().enumerate() {
        let s = &samples[m];
        let mut wall: Vec<f64> = s.iter().map(|x| x.wall.as_secs_f64()).collect();
        let mut src_b: Vec<f64> = s.iter().map(|x| x.source_bytes as f64).collect();
        let mut all_b: Vec<f64> = s.iter().map(|x| x.all_bytes as f64).collect();
        let (lo, hi) = (
            wall.iter().copied().fold(f64::INFINITY, f64::min),
            wall.iter().copied().fold(0.0, f64::max),
        );
        let (w, sb, ab) = (median(&mut wall), median(&mut src_b), median(&mut all_b));
        med[m] = (w, sb);
        t.row(
            routing,
            vec![
                format!("{w:.2} s ({lo:.2}-{hi:.2})"),
                human_bytes(sb as u64),
                format!("{:.2}x", sb / total as f64),
                human_bytes(ab as u64),
            ],
        );
        json_modes.insert(
            (*routing).to_owned(),
            json!({
                "wall_seconds": s.iter().map(|x| x.wall.as_secs_f64()).collect::<Vec<_>>(),
                "source_bytes": s.iter().map(|x| x.source_bytes).collect::<Vec<_>>(),
                "all_bytes": s.iter().map(|x| x.all_bytes).collect::<Vec<_>>(),
                "wall_seconds_median": w,
                "source_bytes_median": sb,
                "all_bytes_median": ab,
            }),
        );
    }
    let (direct, relay) = (med[0], med[1]);
    if relay.0 <= 0.0 || relay.1 <= 0.0 {
        bail!("relay medians are zero: {relay:?}");
    }
    let ratio_bytes = direct.1 / relay.1;
    let ratio_wall = direct.0 / relay.0;
    t.row(
        "direct / relay",
        vec![
            format!("{ratio_wall:.2}"),
            format!("{ratio_bytes:.2}"),
            "-".to_owned(),
            "-".to_owned(),
        ],
    );
    let mut text = String::new();
    let _ = writeln!(
        text,
        "relay routes, 1 -> 8 (2 regions x 2 groups x 2 servers), every link {} each way\n\
         tree: {} files, {} (incompressible, zstd off); median of {} run(s) per mode\n\
         source sent: frames leaving the source host (its hub-side veth counter)\n",
        args.rate,
        args.files,
        human_bytes(total),
        args.runs
    );
    text.push_str(&t.render());
    println!("\n{text}");
    let report = json!({
        "bench": "relay",
        "rate": args.rate,
        "files": args.files,
        "data_bytes": total,
        "runs": args.runs,
        "load_average": load,
        "modes": json_modes,
        "ratio_direct_over_relay": { "source_bytes": ratio_bytes, "wall": ratio_wall },
    });
    if let Some(p) = args.json.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(&args.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    fs::write(args.json.with_extension("txt"), &text)?;
    eprintln!(
        "relay: wrote {} and {}",
        args.json.display(),
        args.json.with_extension("txt").display()
    );
    Ok(())
}
