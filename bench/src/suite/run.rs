//! `bench suite`: every workload for every tool, in one run; see `bench/README.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::cgroup::Cgroup;
use super::measure::{self, Sample};
use super::report::{Latency, Record, Report};
use super::tools::{Style, Tool};
use super::workload::{Tree, write_burst};
use super::{env, fresh_replicas, install, registry};
use crate::args::Options;
use cd_testkit::netns::Net;

pub const USAGE: &str = "\
usage: bench suite [--quick | --smoke] [--runs N] [--tools a,b,..] [--workloads w1,w2,w3,w4,idle]
                   [--dir DIR] [--json FILE]
  cdsync side by side with rsync (daemon, ssh), lsyncd, Syncthing and Unison on the
  same seeded workloads, each host in its own network namespace; prints a table with
  ratios to the best peer and writes FILE (default target/bench/latest.json).
  --quick  a small scale (about 5 minutes); --smoke a tiny one (the harness's own test)";

/// The sizes of one run.
#[derive(Debug, Clone)]
pub struct Scale {
    pub name: &'static str,
    pub w1: Tree,
    pub w4: Tree,
    pub runs: usize,
    pub replicas: Vec<usize>,
    pub fanout: usize,
    pub fanout_rate: &'static str,
    pub samples: usize,
    pub sample_size: usize,
    pub burst: usize,
    pub idle: Duration,
    /// How long a live tool may take to make the replicas identical (W1, W3, W4).
    pub limit: Duration,
    /// The same for W2's small change.
    pub limit_incremental: Duration,
    /// Bytes per figure of the physical limits measured first ([`crate::limits`]).
    pub limits_bytes: u64,
}

impl Scale {
    pub fn full() -> Self {
        Self {
            name: "full",
            w1: Tree {
                seed: 1,
                files: 10_000,
                dirs: 200,
                big: 2,
                big_size: 256 << 20,
                symlinks: 40,
            },
            w4: Tree {
                seed: 4,
                files: 2_500,
                dirs: 50,
                big: 1,
                big_size: 64 << 20,
                symlinks: 10,
            },
            runs: 3,
            replicas: vec![1, 3],
            fanout: 8,
            fanout_rate: "1gbit",
            samples: 50,
            sample_size: 4096,
            burst: 20_000,
            idle: Duration::from_secs(10),
            limit: Duration::from_secs(300),
            limit_incremental: Duration::from_secs(120),
            limits_bytes: 1 << 30,
        }
    }

    pub fn quick() -> Self {
        Self {
            name: "quick",
            w1: Tree {
                seed: 1,
                files: 1_000,
                dirs: 20,
                big: 2,
                big_size: 16 << 20,
                symlinks: 10,
            },
            w4: Tree {
                seed: 4,
                files: 300,
                dirs: 10,
                big: 1,
                big_size: 8 << 20,
                symlinks: 5,
            },
            runs: 1,
            replicas: vec![1, 3],
            fanout: 8,
            fanout_rate: "1gbit",
            samples: 10,
            sample_size: 4096,
            burst: 2_000,
            idle: Duration::from_secs(10),
            limit: Duration::from_secs(120),
            limit_incremental: Duration::from_secs(60),
            limits_bytes: 256 << 20,
        }
    }

    /// Just enough to run every code path of the harness.
    pub fn smoke() -> Self {
        Self {
            name: "smoke",
            w1: Tree {
                seed: 1,
                files: 200,
                dirs: 8,
                big: 1,
                big_size: 2 << 20,
                symlinks: 4,
            },
            w4: Tree {
                seed: 4,
                files: 50,
                dirs: 4,
                big: 0,
                big_size: 0,
                symlinks: 2,
            },
            runs: 1,
            replicas: vec![2],
            fanout: 3,
            fanout_rate: "100mbit",
            samples: 3,
            sample_size: 4096,
            burst: 200,
            idle: Duration::from_secs(1),
            limit: Duration::from_secs(120),
            limit_incremental: Duration::from_secs(60),
            limits_bytes: 4 << 20,
        }
    }
}

/// Parsed options.
#[derive(Debug)]
pub struct Args {
    pub scale: Scale,
    pub tools: Option<Vec<String>>,
    pub workloads: Vec<String>,
    pub dir: PathBuf,
    pub json: PathBuf,
    /// Build `cdd` in the dev profile (the smoke test, which `cargo test` built).
    pub debug_daemon: bool,
    /// Prefix of the network namespaces (stale ones with it are removed first).
    pub prefix: &'static str,
}

const WORKLOADS: [&str; 5] = ["w1", "w2", "w3", "w4", "idle"];

impl Args {
    pub fn parse(args: &[String]) -> Result<Self> {
        let target = cd_testkit::build::workspace_root().join("target/bench");
        let mut a = Self {
            scale: Scale::full(),
            tools: None,
            workloads: WORKLOADS.iter().map(|w| (*w).to_owned()).collect(),
            dir: target.join("work"),
            json: target.join("latest.json"),
            debug_daemon: false,
            prefix: "cdb",
        };
        let mut runs = None;
        let mut o = Options::new(args, USAGE);
        while let Some(n) = o.next_name() {
            match n {
                "--quick" => a.scale = Scale::quick(),
                "--smoke" => a.scale = Scale::smoke(),
                "--runs" => runs = Some(crate::args::at_least(n, o.value(n)?, 1)?),
                "--tools" => {
                    a.tools = Some(
                        o.value::<String>(n)?
                            .split(',')
                            .map(str::to_owned)
                            .collect(),
                    );
                }
                "--workloads" => {
                    let w: Vec<String> = o
                        .value::<String>(n)?
                        .split(',')
                        .map(str::to_owned)
                        .collect();
                    for x in &w {
                        ensure!(WORKLOADS.contains(&x.as_str()), "unknown workload `{x}`");
                    }
                    a.workloads = w;
                }
                "--dir" => a.dir = o.value(n)?,
                "--json" => a.json = o.value(n)?,
                _ => return Err(o.unknown(n)),
            }
        }
        if let Some(r) = runs {
            a.scale.runs = r;
        }
        Ok(a)
    }

    fn wants(&self, w: &str) -> bool {
        self.workloads.iter().any(|x| x == w)
    }
}

/// Runs the suite; returns the report (also printed and written to `args.json`).
pub fn run(args: &Args) -> Result<Report> {
    ensure!(
        cd_testkit::is_root(),
        "the side-by-side bench needs root (namespaces, cgroups)"
    );
    cd_testkit::netns::check_available()?;
    run_tools(args, registry(args.tools.as_deref(), args.debug_daemon)?)
}

/// [`run`] with these tools.
pub fn run_tools(args: &Args, mut tools: Vec<Box<dyn Tool>>) -> Result<Report> {
    let mut packages: Vec<&str> = vec!["iproute2"];
    for t in &tools {
        packages.extend(t.packages());
    }
    install::ensure_packages(&packages)?;
    let sc = &args.scale;
    let dir = &args.dir;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let most = sc
        .replicas
        .iter()
        .copied()
        .chain([sc.fanout])
        .max()
        .unwrap_or(1);
    let mut hosts = vec!["src".to_owned(), "aux".to_owned()];
    hosts.extend((1..=most).map(|i| format!("r{i}")));
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let net = Net::create(args.prefix, &host_refs)?;
    let mut report = Report::new(sc.name, &tools);
    eprintln!("bench: measuring this machine's physical limits");
    report.set_limits(crate::limits::measure(
        &dir.join("limits"),
        sc.limits_bytes,
    )?);
    let started = Instant::now();

    if args.wants("w1") || args.wants("w2") {
        let src = dir.join("src");
        eprintln!(
            "bench: generating W1 ({} files, {} big) in {}",
            sc.w1.files,
            sc.w1.big,
            src.display()
        );
        let w1_bytes = sc.w1.generate(&src)?;
        for &replicas in &sc.replicas {
            for t in &mut tools {
                if t.max_replicas().is_some_and(|m| replicas > m) {
                    continue;
                }
                let mut w1 = Record::new(t.name(), "W1", replicas, w1_bytes);
                let mut w2 = Record::new(t.name(), "W2", replicas, 0);
                for run in 0..sc.runs {
                    eprintln!("bench: W1+W2 {} → {replicas}, run {}", t.name(), run + 1);
                    match initial_and_incremental(&net, &mut **t, dir, &src, replicas, sc) {
                        Ok((a, b, bytes)) => {
                            eprintln!("  W1 {a}\n  W2 {b}");
                            w1.push(a);
                            w2.data_bytes = bytes;
                            w2.push(b);
                        }
                        Err(e) => {
                            eprintln!("  failed: {e:#}");
                            w1.fail(&e);
                            w2.fail(&e);
                        }
                    }
                }
                report.add(w1);
                if args.wants("w2") {
                    report.add(w2);
                }
            }
        }
        fs::remove_dir_all(&src)?;
    }

    if args.wants("w3") || args.wants("idle") {
        let replicas = sc.replicas.iter().copied().max().unwrap_or(1);
        for t in tools.iter_mut().filter(|t| t.style() == Style::Live) {
            eprintln!("bench: W3 {} → {replicas}", t.name());
            if let Err(e) = live_workloads(&net, &mut **t, dir, sc, replicas, &mut report, args) {
                eprintln!("  failed: {e:#}");
                let mut r = Record::new(t.name(), "W3-latency", replicas, 0);
                r.fail(&e);
                report.add(r);
            }
        }
    }

    if args.wants("w4") {
        let src = dir.join("src4");
        let bytes = sc.w4.generate(&src)?;
        net.shape(Some(sc.fanout_rate))?;
        for t in &mut tools {
            if t.max_replicas().is_some_and(|m| sc.fanout > m) {
                continue;
            }
            let mut rec = Record::new(t.name(), "W4", sc.fanout, bytes);
            for run in 0..sc.runs {
                eprintln!(
                    "bench: W4 {} → {} at {}, run {}",
                    t.name(),
                    sc.fanout,
                    sc.fanout_rate,
                    run + 1
                );
                match fan_out(&net, &mut **t, dir, &src, sc) {
                    Ok(s) => {
                        eprintln!("  {s}");
                        rec.push(s);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e:#}");
                        rec.fail(&e);
                    }
                }
            }
            report.add(rec);
        }
        net.shape(None)?;
        fs::remove_dir_all(&src)?;
    }

    report.finish(started.elapsed());
    println!("{}", report.render());
    if let Some(p) = args.json.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(&args.json, serde_json::to_string_pretty(&report.json())?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("bench: wrote {}", args.json.display());
    Ok(report)
}

/// Flushes dirty pages so that one tool's run does not pay for the last one's writes.
fn settle() {
    let _ = Command::new("sync").status();
}

/// W1 then W2 (the tree `sc.w1`, at `src`) for one tool with `replicas` empty
/// replicas under `dir`; the source is put back. Also `bench trial`'s whole work.
pub fn initial_and_incremental(
    net: &Net,
    t: &mut dyn Tool,
    dir: &Path,
    src: &Path,
    replicas: usize,
    sc: &Scale,
) -> Result<(Sample, Sample, u64)> {
    let tree = &sc.w1;
    let roots = fresh_replicas(dir, replicas)?;
    settle();
    let cg = Cgroup::create(&format!("{}-{}", net.prefix(), t.name()))?;
    let env = env(net, src, &roots, &dir.join("work"), t.name(), &cg)?;
    let result = (|| {
        let a = measure::initial(t, &env, sc.limit)?;
        let b = measure::incremental(t, &env, tree, sc.limit_incremental)?;
        Ok::<_, anyhow::Error>((a, b))
    })();
    let stopped = t.stop(&env);
    cg.kill_all()?;
    let (a, b) = result?;
    stopped?;
    tree.restore(src, &b.mutation)?;
    Ok((a, b.sample, b.mutation.bytes))
}

/// W4: the first sync of the W4 tree to `fanout` replicas over rate-limited links.
fn fan_out(net: &Net, t: &mut dyn Tool, dir: &Path, src: &Path, sc: &Scale) -> Result<Sample> {
    let roots = fresh_replicas(dir, sc.fanout)?;
    settle();
    let cg = Cgroup::create(&format!("{}-{}", net.prefix(), t.name()))?;
    let env = env(net, src, &roots, &dir.join("work"), t.name(), &cg)?;
    let result = measure::initial(t, &env, sc.limit);
    let stopped = t.stop(&env);
    cg.kill_all()?;
    let s = result?;
    stopped?;
    Ok(s)
}

/// W3 (latency, bursts) and idle for a live tool, on a fresh, empty source.
fn live_workloads(
    net: &Net,
    t: &mut dyn Tool,
    dir: &Path,
    sc: &Scale,
    replicas: usize,
    report: &mut Report,
    args: &Args,
) -> Result<()> {
    let src = dir.join("src3");
    if src.exists() {
        fs::remove_dir_all(&src)?;
    }
    fs::create_dir_all(&src)?;
    let roots = fresh_replicas(dir, replicas)?;
    let cg = Cgroup::create(&format!("{}-{}", net.prefix(), t.name()))?;
    let env = env(net, &src, &roots, &dir.join("work"), t.name(), &cg)?;
    let result = (|| {
        fs::create_dir(src.join("lat"))?;
        let ready = measure::initial(t, &env, sc.limit)?;
        ensure!(
            ready.identical,
            "{} did not mirror an empty tree: {ready}",
            t.name()
        );
        if args.wants("w3") {
            report.add(latency(t.name(), &src, &roots, sc)?);
            let mut rec = Record::new(t.name(), "W3-burst", replicas, 0);
            for run in 0..sc.runs {
                let s = measure::live_change(&env, t, sc.limit, |root| {
                    write_burst(
                        &root.join(format!("burst{run}")),
                        sc.burst,
                        100 + run as u64,
                    )
                })?;
                eprintln!("  burst {}: {}", run + 1, s.0);
                rec.data_bytes = s.1;
                rec.push(s.0);
            }
            report.add(rec);
        }
        if args.wants("idle") {
            let s = measure::live_change(&env, t, sc.limit, |_| {
                thread::sleep(sc.idle);
                Ok(0)
            })?;
            let mut rec = Record::new(t.name(), "idle", replicas, 0);
            // The whole window, not the time to "converge" (nothing changed).
            rec.push(Sample {
                wall: sc.idle,
                ..s.0
            });
            report.add(rec);
        }
        Ok(())
    })();
    let stopped = t.stop(&env);
    cg.kill_all()?;
    result?;
    stopped?;
    fs::remove_dir_all(&src)?;
    Ok(())
}

/// 4 KiB files written one at a time; each timed until it is complete on every replica.
fn latency(tool: &str, src: &Path, roots: &[PathBuf], sc: &Scale) -> Result<Record> {
    let mut lat = Vec::new();
    let mut missing = 0;
    let per_sample = Duration::from_secs(60).min(sc.limit);
    for i in 0..sc.samples {
        let data = cd_testkit::realtime::sample_bytes(i, sc.sample_size);
        let rel = format!("lat/s{i:03}.bin");
        let start = Instant::now();
        fs::write(src.join(&rel), &data)?;
        loop {
            if roots
                .iter()
                .all(|r| fs::read(r.join(&rel)).is_ok_and(|d| d == data))
            {
                lat.push(start.elapsed());
                break;
            }
            if start.elapsed() > per_sample {
                missing += 1;
                break;
            }
            thread::sleep(Duration::from_micros(200));
        }
    }
    let mut rec = Record::new(
        tool,
        "W3-latency",
        roots.len(),
        (sc.samples * sc.sample_size) as u64,
    );
    rec.latency = Some(Latency {
        samples: lat,
        missing,
    });
    Ok(rec)
}

#[cfg(test)]
mod smoke {
    use super::*;
    use crate::suite::tools::saboteur::Saboteur;

    /// The harness itself, end to end at the smoke scale: real namespaces, cgroups,
    /// real daemons (cdsync in both modes), every workload, the table and the JSON;
    /// and a saboteur whose damaged replicas the verification must catch.
    /// Needs root, like every privileged test of the workspace; CI runs as root.
    #[test]
    fn harness_runs_and_verifies() {
        assert!(
            cd_testkit::is_root(),
            "the bench harness test needs root (network namespaces, cgroups)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let args = Args {
            scale: Scale::smoke(),
            tools: None,
            workloads: WORKLOADS.iter().map(|w| (*w).to_owned()).collect(),
            dir: tmp.path().join("work"),
            json: tmp.path().join("latest.json"),
            debug_daemon: true,
            prefix: "cdk",
        };
        let mut tools =
            registry(Some(&["cdsync".to_owned(), "cdsync-live".to_owned()]), true).unwrap();
        tools.push(Box::new(Saboteur));
        let report = run_tools(&args, tools).unwrap();

        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&args.json).unwrap()).unwrap();
        let recs = json["records"].as_array().unwrap();
        let find = |tool: &str, w: &str| {
            recs.iter()
                .find(|r| r["tool"] == tool && r["workload"] == w)
                .unwrap_or_else(|| panic!("no record {tool}/{w} in {json:#}"))
        };
        for w in ["W1", "W2", "W4"] {
            for tool in ["cdsync", "cdsync-live"] {
                let r = find(tool, w);
                assert_eq!(r["identical"], true, "{r:#}");
                assert!(r["wire_bytes"].as_u64().unwrap() > 0, "{r:#}");
                assert!(r["cpu_s"].as_f64().unwrap() > 0.0, "{r:#}");
                for k in [
                    "wall_s_median",
                    "wall_s_min",
                    "wall_s_max",
                    "source_uplink_bytes",
                    "data_bytes",
                ] {
                    assert!(!r[k].is_null(), "{k} missing in {r:#}");
                }
            }
            // The saboteur is a peer; its broken replicas must disqualify it.
            let s = find("saboteur", w);
            assert_eq!(s["identical"], false, "{s:#}");
            assert!(s["missing"].as_u64().unwrap() >= 1, "{s:#}");
            assert!(s["best_peer"].is_null(), "{s:#}");
        }
        for w in ["W3-latency", "W3-burst", "idle"] {
            let r = find("cdsync-live", w);
            assert_eq!(r["identical"], true, "{r:#}");
        }
        let lat = find("cdsync-live", "W3-latency");
        assert_eq!(lat["latency_samples"], 3);
        assert!(lat["p99_ms"].as_f64().unwrap() >= lat["p50_ms"].as_f64().unwrap());
        // W1 is read against the limits measured on this machine, except where the
        // replicas are not identical.
        assert!(
            json["limits"]["bound_mib_s"].as_f64().unwrap() > 0.0,
            "{json:#}"
        );
        assert!(
            find("cdsync", "W1")["w1_fraction_of_bound"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        assert!(find("saboteur", "W1")["w1_fraction_of_bound"].is_null());
        let table = report.render();
        assert!(table.contains("W4 fan-out"), "{table}");
        assert!(table.contains("% of the bound"), "{table}");
        assert!(
            table.contains("NO"),
            "the saboteur must show as not identical:\n{table}"
        );
    }
}
