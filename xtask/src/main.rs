//! `cargo xtask`: the developer and CI tasks of the cdsync workspace.
//!
//! - `cargo xtask demo [--keep DIR] [--hold] [--nodes N] [--files N]`: build the
//!   daemon (release), start a master, a source and N target nodes on loopback, seed a
//!   few thousand files, sync, mutate, sync again, and verify every replica with the
//!   independent comparator of `cd-testkit`.
//! - `cargo xtask test [PHASE...]`: the single test command of CI (`.ci/run`): format
//!   check, clippy, the workspace tests, privileged kernel tests, the eBPF object
//!   rebuilt from source, and the kernel tests in a qemu guest on Debian's 6.1 kernel;
//!   each phase timed, first failure stops the run. Each phase installs what it needs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cd_testkit::build::{self, cargo, workspace_root};
use cd_testkit::cluster::{Cluster, ClusterSpec, SyncOutcome, counter};
use cd_testkit::compare::compare;
use cd_testkit::human_bytes;
use cd_testkit::mutate::{MutateSpec, mutate};
use cd_testkit::realtime;
use cd_testkit::tree::{TreeSpec, generate};
use serde_json::Value;

mod vm;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  demo [--keep DIR] [--hold] [--nodes N] [--files N]
        build cdd/cdctl (release), start a master, a source node and N target nodes
        (default 3) on 127.0.0.1, seed about N files (default 3000) on the source, sync,
        mutate, sync again and verify every replica; exits non-zero on any difference.
        --keep DIR  keep the content roots at DIR/<node>/ (daemon state in DIR/.state/)
        --hold      after verifying, keep the cluster running until Ctrl-C / SIGTERM
  bench [--quick] [--runs N] [--tools a,b] [--workloads w1,w2,w3,w4,idle] [--dir DIR]
        cdsync side by side with rsync (daemon and ssh), lsyncd, Syncthing and Unison on
        the same seeded workloads, each host in its own network namespace; installs the
        peers from Debian packages, prints a table with ratios to the best peer and
        writes target/bench/latest.json (`bench suite`, see bench/README.md)
  test [PHASE...]
        run the CI phases in order (default all):
        fmt, clippy, test, privileged, ebpf-object, guest";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(&DemoArgs::parse(&args[1..])?),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{USAGE}"),
        None => bail!("no task given\n\n{USAGE}"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------
// test

/// One step of `cargo xtask test`.
#[derive(Debug)]
struct Phase {
    name: &'static str,
    what: &'static str,
    run: PhaseRun,
}

#[derive(Debug)]
enum PhaseRun {
    /// `cargo <args>`.
    Cargo(&'static [&'static str]),
    /// A task of this program.
    Task(fn() -> Result<()>),
}

/// The tiers, in order: static checks, unprivileged tests, privileged tests on this
/// kernel, the committed eBPF object rebuilt from source, and the privileged kernel
/// tests again inside a qemu guest booting Debian 12's own kernel.
const PHASES: &[Phase] = &[
    Phase {
        name: "fmt",
        what: "cargo fmt --all -- --check",
        run: PhaseRun::Cargo(&["fmt", "--all", "--", "--check"]),
    },
    Phase {
        name: "clippy",
        what: "cargo clippy --workspace --all-targets -- -D warnings",
        run: PhaseRun::Cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "-j2",
            "--",
            "-D",
            "warnings",
        ]),
    },
    Phase {
        name: "test",
        what: "cargo test --workspace (unit, property, golden, multi-process cluster)",
        // --no-fail-fast: one failing test binary must not hide the others' results.
        run: PhaseRun::Cargo(&["test", "--workspace", "-j2", "--no-fail-fast"]),
    },
    Phase {
        name: "privileged",
        what: "vm-tests on this kernel (root): kernel hooks, loss detection",
        run: PhaseRun::Task(privileged),
    },
    Phase {
        name: "ebpf-object",
        what: "rebuild the committed eBPF object from C and compare bytes",
        run: PhaseRun::Task(ebpf_object),
    },
    Phase {
        name: "guest",
        what: "vm-tests inside a qemu (TCG) guest running Debian 12's 6.1 kernel",
        run: PhaseRun::Task(guest),
    },
];

fn require_root(what: &str) -> Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "0",
        "{what} needs root (CI runs as root): run `sudo cargo xtask test`"
    );
    Ok(())
}

fn run_status(mut c: Command, what: &str) -> Result<()> {
    let status = c.status().with_context(|| format!("starting {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// Debian packages the privileged tests use: `prometheus` (the server and
/// `promtool`) for `vm-tests/tests/prometheus.rs`.
const PRIVILEGED_PACKAGES: &[&str] = &[
    "prometheus",
    // vm-tests/tests/alerts.rs: a real Alertmanager and a real SMTP server (STARTTLS).
    "prometheus-alertmanager",
    "python3-aiosmtpd",
];

/// Privileged tests on the running kernel. They are `#[ignore]`d so that a plain
/// `cargo test` (no root) does not run them; here they run, one at a time. The tests
/// that start daemons (`ktls`) get them from `CD_CDD` / `CD_CDCTL`; on a kernel without
/// TLS they check the rustls fallback (the guest phase checks kernel TLS itself).
fn privileged() -> Result<()> {
    require_root("the privileged tier")?;
    vm::ensure_packages(PRIVILEGED_PACKAGES)?;
    let (cdd, cdctl) = build::debug_daemon()?;
    let mut c = cargo();
    c.env("CD_CDD", &cdd).env("CD_CDCTL", &cdctl);
    c.args([
        "test",
        "-p",
        "vm-tests",
        "-j2",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    run_status(c, "privileged vm-tests")
}

/// The eBPF object is committed (so `cargo build` needs no clang); this proves it is
/// what the C source compiles to.
fn ebpf_object() -> Result<()> {
    require_root("installing clang")?;
    let mut c = Command::new("bash");
    c.arg(workspace_root().join("cd-ebpf/bpf/build.sh"))
        .arg("--check");
    run_status(c, "cd-ebpf/bpf/build.sh --check")
}

/// Files in the guest's burst test.
const GUEST_BURST_FILES: usize = 20_000;

/// A test binary of `vm-tests` that also runs inside the guest.
#[derive(Debug)]
struct GuestTest {
    name: &'static str,
    /// Kernel modules loaded before it runs.
    modules: &'static [&'static str],
    /// It starts `cdd` processes: ship `cdd` and `cdctl` (to `/bin`, named in `CD_CDD`
    /// and `CD_CDCTL`).
    daemons: bool,
    /// Extra environment of the test binary.
    env: &'static str,
}

/// Test binaries of `vm-tests` that also run inside the guest.
const GUEST_TESTS: &[GuestTest] = &[
    GuestTest {
        name: "ebpf",
        modules: &[],
        daemons: false,
        env: "",
    },
    // Kernel TLS: `tls` and the AEAD templates the kernel would otherwise ask modprobe
    // for (there is none in the guest): gcm(aes) = gcm + ctr + ghash, and
    // rfc7539(chacha20,poly1305). `CD_EXPECT_KTLS=1`: a fallback to rustls fails.
    GuestTest {
        name: "ktls",
        modules: &[
            "tls",
            "gcm",
            "ctr",
            "ghash_generic",
            "chacha20poly1305",
            "chacha_generic",
            "poly1305_generic",
        ],
        daemons: true,
        env: "CD_EXPECT_KTLS=1 CD_CDD=/bin/cdd CD_CDCTL=/bin/cdctl",
    },
];

/// Builds the vm-tests test binaries and runs the kernel-facing ones in a guest
/// booting Debian's own kernel, so the programs are proven on the kernels web
/// farms run, not only on this one.
fn guest() -> Result<()> {
    require_root("the guest tier (apt-get, qemu)")?;
    vm::ensure_tools()?;
    let out = cargo()
        .args([
            "test",
            "-p",
            "vm-tests",
            "-j2",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building vm-tests")?;
    ensure!(out.status.success(), "building vm-tests failed");
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let name = v["target"]["name"].as_str().unwrap_or_default();
        if let (Some(t), Some(exe)) = (
            GUEST_TESTS.iter().find(|t| t.name == name),
            v["executable"].as_str(),
        ) {
            exes.push((t, PathBuf::from(exe)));
        }
    }
    ensure!(
        exes.len() == GUEST_TESTS.len(),
        "expected test binaries {:?}, found {:?}",
        GUEST_TESTS.iter().map(|t| t.name).collect::<Vec<_>>(),
        exes.iter().map(|e| e.0.name).collect::<Vec<_>>()
    );
    let daemons = if GUEST_TESTS.iter().any(|t| t.daemons) {
        Some(build::debug_daemon()?)
    } else {
        None
    };
    let work = workspace_root().join("target/vm");
    // `CD_GUEST_ONLY=ktls`: boot only for the named test binaries (comma-separated).
    let only = std::env::var("CD_GUEST_ONLY").ok();
    for (test, exe) in &exes {
        let name = test.name;
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|n| n == name))
        {
            eprintln!(
                "guest: skipping `{name}` (CD_GUEST_ONLY={})",
                only.as_deref().unwrap_or("")
            );
            continue;
        }
        let guest_path = format!("/bin/{name}");
        // The guest's tmpfs lives in its RAM and its CPU is emulated: a 20,000-file
        // burst there (the 200,000-file one runs on the host, in `privileged`).
        let script = format!(
            "CD_BURST_FILES={GUEST_BURST_FILES} {} exec {guest_path} --ignored --test-threads=1",
            test.env
        );
        let mut binaries = vec![(exe.as_path(), guest_path.as_str())];
        if let (true, Some((cdd, cdctl))) = (test.daemons, &daemons) {
            binaries.push((cdd.as_path(), "/bin/cdd"));
            binaries.push((cdctl.as_path(), "/bin/cdctl"));
        }
        let spec = vm::GuestSpec {
            kernel: vm::KernelChoice::DebianBookworm,
            binaries: &binaries,
            command: &["/bin/sh", "-c", script.as_str()],
            modules: test.modules,
            memory_mb: 2048,
            cpus: 2,
            timeout: Duration::from_secs(900),
            strip: true,
        };
        let o = vm::run_in_guest(&spec, &work)?;
        eprintln!(
            "guest {} ({}): `{name}` exit {} (initramfs {} KiB, boot {:.1}s, total {:.1}s)",
            o.kernel_release,
            o.kernel_package_version,
            o.exit_code,
            o.initramfs_bytes / 1024,
            o.boot_secs,
            o.total_secs
        );
        if o.exit_code != 0 {
            let tail: Vec<&str> = o.console.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let kept = o
                .kept_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            bail!(
                "`{name}` failed in the guest (exit {}; files kept in {kept}):\n{}",
                o.exit_code,
                tail.join("\n")
            );
        }
        // The guest's console must show the test harness's own summary.
        ensure!(
            o.console.contains("test result: ok."),
            "`{name}` in the guest printed no passing test summary"
        );
    }
    Ok(())
}

/// Installs what the cargo phases need. The task phases install their own tools
/// (clang for the eBPF object, qemu and Debian's kernel for the guest).
fn prepare() -> Result<()> {
    Ok(())
}

/// `cargo xtask bench`: `bench suite` in release mode.
fn bench(args: &[String]) -> Result<()> {
    let status = cargo()
        .args(["run", "-j2", "--release", "-p", "bench", "--", "suite"])
        .args(args)
        .status()
        .context("starting cargo run -p bench")?;
    ensure!(status.success(), "bench suite failed ({status})");
    Ok(())
}

fn test(selected: &[String]) -> Result<()> {
    for s in selected {
        ensure!(
            PHASES.iter().any(|p| p.name == s),
            "unknown phase `{s}` (phases: {})",
            PHASES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        );
    }
    let phases: Vec<&Phase> = PHASES
        .iter()
        .filter(|p| selected.is_empty() || selected.iter().any(|s| s == p.name))
        .collect();
    prepare()?;
    let start = Instant::now();
    let mut done = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        eprintln!(
            "==> xtask test [{}/{}] {}: {}",
            i + 1,
            phases.len(),
            phase.name,
            phase.what
        );
        let t = Instant::now();
        let r = match &phase.run {
            PhaseRun::Cargo(args) => {
                let status = cargo()
                    .args(*args)
                    .status()
                    .with_context(|| format!("starting cargo for phase {}", phase.name))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "{status}; reproduce with: cargo {}",
                        args.join(" ")
                    ))
                }
            }
            PhaseRun::Task(f) => f(),
        };
        let took = t.elapsed();
        if let Err(e) = r {
            bail!(
                "phase `{}` failed after {}: {e:#}\nreproduce with: cargo xtask test {}",
                phase.name,
                secs(took),
                phase.name
            );
        }
        eprintln!("<== {} ok in {}", phase.name, secs(took));
        done.push(format!("{} {}", phase.name, secs(took)));
    }
    eprintln!(
        "xtask test: all {} phases ok in {} ({})",
        phases.len(),
        secs(start.elapsed()),
        done.join(", ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// demo

#[derive(Debug)]
struct DemoArgs {
    keep: Option<PathBuf>,
    hold: bool,
    targets: usize,
    files: usize,
}

impl DemoArgs {
    fn parse(args: &[String]) -> Result<Self> {
        let mut out = Self {
            keep: None,
            hold: false,
            targets: 3,
            files: 3000,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--keep" => out.keep = Some(PathBuf::from(value("--keep")?)),
                "--hold" => out.hold = true,
                "--nodes" => {
                    let v = value("--nodes")?;
                    out.targets = v.parse().with_context(|| format!("--nodes {v}"))?;
                    ensure!(out.targets >= 1, "--nodes must be at least 1");
                }
                "--files" => {
                    let v = value("--files")?;
                    out.files = v.parse().with_context(|| format!("--files {v}"))?;
                    ensure!(out.files >= 10, "--files must be at least 10");
                }
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown demo option `{other}`\n\n{USAGE}"),
            }
        }
        Ok(out)
    }
}

/// One line of the demo's table.
#[derive(Debug)]
struct Row {
    step: String,
    took: Duration,
    detail: String,
}

/// Summary of a job report for the table.
fn job_detail(out: &SyncOutcome) -> String {
    let r = &out.report;
    let mut files = 0;
    let mut bytes = 0;
    let mut wire = 0;
    let mut reused = 0;
    let mut removed = 0;
    let mut failed = Vec::new();
    for t in r["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        files += counter(t, "files_sent").unwrap_or(0);
        bytes += counter(t, "bytes_sent").unwrap_or(0);
        wire += counter(t, "wire_bytes").unwrap_or(0);
        reused += counter(t, "reused_local").unwrap_or(0);
        removed += counter(t, "removed").unwrap_or(0);
        if t["ok"] != true {
            failed.push(format!(
                "{}: {}",
                t["target"].as_str().unwrap_or("?"),
                t["error"].as_str().unwrap_or("?")
            ));
        }
    }
    let mut s = format!(
        "job {} ({} source entries): to all targets {files} files, {} content, {} on the \
         wire, {reused} reused, {removed} removed",
        r["job_id"],
        r["source_entries"],
        human_bytes(bytes),
        human_bytes(wire)
    );
    if !failed.is_empty() {
        s.push_str(&format!("; FAILED {}", failed.join("; ")));
    }
    s
}

/// Starts a real-time cluster, measures change→replica latency of 4 KiB writes (until
/// the new bytes are readable on every replica, polled from outside the daemons) and
/// replicates a burst of files written while it runs. Returns whether all went well.
fn realtime_stage(
    args: &DemoArgs,
    dir: &Path,
    cdd: &Path,
    cdctl: &Path,
    rows: &mut Vec<Row>,
) -> Result<bool> {
    let t = Instant::now();
    let mut spec = ClusterSpec::new(args.targets + 1, dir, cdd, cdctl);
    spec.mode = Some("realtime");
    let c = Cluster::start(spec)?;
    let capture = realtime::wait_capture(&c, Duration::from_secs(20))?;
    rows.push(Row {
        step: "start realtime".into(),
        took: t.elapsed(),
        detail: format!(
            "second cluster, mode = realtime; capture {} ({})",
            capture["backend"].as_str().unwrap_or("?"),
            capture["reason"].as_str().unwrap_or("?")
        ),
    });
    realtime::replicated_dir(&c, "latency", Duration::from_secs(30))?;

    const SAMPLES: usize = 50;
    let t = Instant::now();
    let lat = realtime::measure_latency(&c, "latency", SAMPLES, 4096, Duration::from_secs(30))?;
    let st = realtime::LatencyStats::new(&lat).context("no latency samples")?;
    rows.push(Row {
        step: "realtime 4 KiB".into(),
        took: t.elapsed(),
        detail: format!(
            "{SAMPLES} writes, change -> readable on all {} replicas: p50 {:.1} ms, p99 {:.1} ms",
            args.targets,
            st.p50.as_secs_f64() * 1e3,
            st.p99.as_secs_f64() * 1e3
        ),
    });

    // The source's own view of the same path (its hdrhistogram, `cdctl status`):
    // from the batch being cut to each replica's apply result.
    let own = &c.status(c.source())?["latency"];
    rows.push(Row {
        step: "source view".into(),
        took: Duration::ZERO,
        detail: format!(
            "cdctl status latency (cut -> replica applied): p50 {} ms, p99 {} ms, max {} ms over {} applies",
            own["p50_ms"], own["p99_ms"], own["max_ms"], own["count"]
        ),
    });

    let files = (args.files / 2).max(100);
    let b = realtime::burst(&c, "burst", files, 7, Duration::from_secs(120))?;
    rows.push(Row {
        step: "realtime burst".into(),
        took: b.took,
        detail: if b.diffs.is_empty() {
            format!(
                "{} files, {} written while running, no sync command: all replicas identical",
                b.summary.files,
                human_bytes(b.summary.bytes)
            )
        } else {
            format!(
                "DIFFERENT after 120 s: {} differences, first: {}",
                b.diffs.len(),
                b.diffs[0]
            )
        },
    });
    Ok(b.diffs.is_empty())
}

fn demo(args: &DemoArgs) -> Result<()> {
    let mut rows = Vec::new();
    let t = Instant::now();
    let (cdd, cdctl) = build::release_daemon()?;
    rows.push(Row {
        step: "build".into(),
        took: t.elapsed(),
        detail: format!("{}", cdd.display()),
    });

    // Where everything lives.
    let tmp;
    let (state_dir, roots_dir) = if let Some(keep) = &args.keep {
        if keep.exists() {
            let mut entries = std::fs::read_dir(keep)
                .with_context(|| format!("reading --keep dir {}", keep.display()))?;
            ensure!(
                entries.next().is_none(),
                "--keep {} exists and is not empty; give a new or empty directory",
                keep.display()
            );
        }
        std::fs::create_dir_all(keep).with_context(|| format!("creating {}", keep.display()))?;
        let keep = keep
            .canonicalize()
            .with_context(|| format!("resolving {}", keep.display()))?;
        (keep.join(".state"), keep)
    } else {
        tmp = tempfile::Builder::new()
            .prefix("cdsync-demo-")
            .tempdir()
            .context("creating a temporary directory")?;
        (tmp.path().to_path_buf(), tmp.path().join("roots"))
    };

    let t = Instant::now();
    let mut spec = ClusterSpec::new(args.targets + 1, &state_dir, &cdd, &cdctl);
    spec.roots_dir = Some(roots_dir);
    spec.zstd_level = Some(3);
    let cluster = Cluster::start(spec)?;
    rows.push(Row {
        step: "start cluster".into(),
        took: t.elapsed(),
        detail: format!(
            "master on {} + source node1 + {} targets",
            cluster.master_addr(),
            args.targets
        ),
    });

    let source = cluster.root(cluster.source())?;
    let t = Instant::now();
    let s = generate(&source, &TreeSpec::new(args.files, 2024))?;
    rows.push(Row {
        step: "seed source".into(),
        took: t.elapsed(),
        detail: format!(
            "{} files, {} dirs ({} empty), {} symlinks, {} hard links, {}",
            s.files,
            s.dirs,
            s.empty_dirs,
            s.symlinks,
            s.hardlinks,
            human_bytes(s.bytes)
        ),
    });

    let mut differences = Vec::new();
    let mut failed_syncs = 0;
    for round in 1..=2 {
        if round == 2 {
            let t = Instant::now();
            let c = mutate(&source, &MutateSpec::new(7, 10))?;
            rows.push(Row {
                step: "mutate source".into(),
                took: t.elapsed(),
                detail: format!("{} edits: {c}", c.total()),
            });
        }
        let t = Instant::now();
        let out = cluster.try_sync()?;
        if out.exit_code != 0 {
            failed_syncs += 1;
        }
        rows.push(Row {
            step: format!("sync #{round}"),
            took: t.elapsed(),
            detail: job_detail(&out),
        });
        let t = Instant::now();
        let mut bad = Vec::new();
        for target in cluster.targets() {
            let d = compare(&source, &cluster.root(&target)?)?;
            if !d.is_empty() {
                bad.push(format!("{target}: {} differences", d.len()));
                differences.push((round, target, d));
            }
        }
        rows.push(Row {
            step: format!("verify #{round}"),
            took: t.elapsed(),
            detail: if bad.is_empty() {
                format!(
                    "{} replicas identical to the source",
                    cluster.targets().len()
                )
            } else {
                format!("DIFFERENT: {}", bad.join(", "))
            },
        });
    }

    // The real-time path: a second cluster whose content set is `mode = "realtime"`.
    // Nothing calls `cdctl sync` here: changes are caught in the kernel and shipped.
    let realtime_ok = realtime_stage(args, &state_dir.join("realtime"), &cdd, &cdctl, &mut rows)?;

    println!();
    println!("{:<14} | {:>8} | detail", "step", "duration");
    println!("{:-<14}-+-{:->8}-+-{:-<60}", "", "", "");
    for r in &rows {
        println!("{:<14} | {:>8} | {}", r.step, secs(r.took), r.detail);
    }
    println!();
    for (round, target, d) in &differences {
        println!("after sync #{round}, {target} differs from the source (first 20):");
        for line in d.iter().take(20) {
            println!("  {line}");
        }
    }
    if !differences.is_empty() || failed_syncs > 0 || !realtime_ok {
        println!("logs: {}", state_dir.join("logs").display());
        if args.keep.is_none() && !args.hold {
            println!("(rerun with --keep DIR to inspect the roots and logs)");
        }
    }

    if args.hold {
        println!("cluster is running; Ctrl-C or SIGTERM stops it.");
        println!(
            "  master  socket {}  metrics http://{}/metrics",
            cluster.socket(cd_testkit::cluster::MASTER)?.display(),
            cluster.metrics_addr(cd_testkit::cluster::MASTER)?
        );
        for n in cluster.nodes() {
            println!(
                "  {n:<7} root {}  socket {}  metrics http://{}/metrics",
                cluster.root(&n)?.display(),
                cluster.socket(&n)?.display(),
                cluster.metrics_addr(&n)?
            );
        }
        println!(
            "try: {} --socket {} status",
            cdctl.display(),
            cluster.socket(cd_testkit::cluster::MASTER)?.display()
        );
        let sig = cd_testkit::wait_for_termination_signal().context("waiting for a signal")?;
        println!("signal {sig}: stopping the cluster");
    }
    drop(cluster);
    if let Some(keep) = &args.keep {
        println!(
            "roots kept at {}/<node>/, daemon state and logs at {}",
            keep.display(),
            state_dir.display()
        );
    }
    ensure!(
        failed_syncs == 0,
        "{failed_syncs} sync job(s) reported failed targets"
    );
    ensure!(
        differences.is_empty(),
        "{} replica check(s) found differences",
        differences.len()
    );
    ensure!(
        realtime_ok,
        "the real-time stage left replicas different from the source"
    );
    println!("demo ok: every replica is identical to the source");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn demo_args_parse() {
        let a = DemoArgs::parse(&args(&["--keep", "/x", "--hold", "--nodes", "5"])).unwrap();
        assert_eq!(a.keep.as_deref(), Some(Path::new("/x")));
        assert!(a.hold);
        assert_eq!((a.targets, a.files), (5, 3000));
        assert!(DemoArgs::parse(&args(&["--nodes"])).is_err());
        assert!(DemoArgs::parse(&args(&["--nodes", "0"])).is_err());
        assert!(DemoArgs::parse(&args(&["--files", "x"])).is_err());
        assert!(DemoArgs::parse(&args(&["--frobnicate"])).is_err());
    }

    #[test]
    fn unknown_test_phase_is_refused() {
        let err = test(&args(&["lint"])).unwrap_err();
        assert!(format!("{err}").contains("unknown phase `lint`"), "{err}");
    }
}
