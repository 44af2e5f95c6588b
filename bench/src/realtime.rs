//! `bench realtime`: the real-time path of a local cluster, per capture backend.
//!
//! For each backend a fresh cluster (master, source `node1`, `--replicas` targets, one
//! content set with `mode = "realtime"` and `capture = <backend>` on every node) is
//! started from the release binaries, then:
//!
//! 1. **latency**: `--samples` new files of `--size` bytes are written on the source,
//!    one at a time; each is timed from the start of the write until the new bytes are
//!    readable on every replica, polled from outside the daemons
//!    ([`cd_testkit::realtime::measure_latency`], the measurement of `cargo xtask demo`);
//! 2. **burst**: a seeded tree of `--burst` files ([`cd_testkit::tree`]) is written into
//!    the running source and timed from the first write until every replica is
//!    identical per [`cd_testkit::compare::compare`];
//! 3. around both, the **CPU time** of the source's `cdd` (user + sys from
//!    `/proc/<pid>/stat`, all threads), of the replicas' `cdd`s, the capture events the
//!    source counted (`cdctl status`), and the kernel run time of the eBPF programs the
//!    source holds (per-program `run_time_ns` / `run_cnt`, counted while this process
//!    holds a `BPF_ENABLE_STATS` descriptor, read from `/proc/<pid>/fdinfo`).
//!
//! The backends are printed side by side in one table.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cd_testkit::cluster::{Cluster, ClusterSpec};
use cd_testkit::human_bytes;
use cd_testkit::realtime::{self as rt, Burst, LatencyStats};

use crate::USAGE;
use crate::args::{Options, at_least};
use crate::procfs::{self, BpfRun, CpuTime};
use crate::table::Table;

/// Options of `bench realtime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Latency samples.
    pub samples: usize,
    /// Files in the burst.
    pub burst: usize,
    /// Target nodes.
    pub replicas: usize,
    /// Bytes per latency sample.
    pub size: usize,
    /// Capture backends, in order.
    pub backends: Vec<&'static str>,
    /// Working directory (kept); `None`: a temporary one.
    pub dir: Option<PathBuf>,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut out = Self {
            samples: 200,
            burst: 20_000,
            replicas: 3,
            size: 4096,
            backends: vec!["ebpf", "fanotify"],
            dir: None,
        };
        let mut o = Options::new(args, USAGE);
        while let Some(name) = o.next_name() {
            match name {
                "--samples" => out.samples = at_least(name, o.value(name)?, 1)?,
                "--burst" => out.burst = at_least(name, o.value(name)?, 100)?,
                "--replicas" => out.replicas = at_least(name, o.value(name)?, 1)?,
                "--size" => out.size = at_least(name, o.value(name)?, 1)?,
                "--dir" => out.dir = Some(o.value(name)?),
                "--backend" => {
                    out.backends = match o.value::<String>(name)?.as_str() {
                        "ebpf" => vec!["ebpf"],
                        "fanotify" => vec!["fanotify"],
                        "both" => vec!["ebpf", "fanotify"],
                        other => bail!("--backend {other}: expected ebpf, fanotify or both"),
                    }
                }
                other => return Err(o.unknown(other)),
            }
        }
        Ok(out)
    }
}

/// Seed of the burst's tree.
const BURST_SEED: u64 = 7;
/// The quiet phase before the latency run: what the cluster costs doing nothing.
const IDLE: Duration = Duration::from_secs(3);
/// Longest wait for one latency sample.
const SAMPLE_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait for the replicas after the burst's last write.
const BURST_LIMIT: Duration = Duration::from_secs(600);

/// What the counters say at one moment.
#[derive(Debug)]
struct Snapshot {
    source: CpuTime,
    replicas: CpuTime,
    events: u64,
    lost: u64,
    bpf: Result<BpfRun, String>,
}

/// Counters consumed by one phase (difference of two snapshots).
#[derive(Debug)]
struct Phase {
    source: CpuTime,
    replicas: CpuTime,
    events: u64,
    lost: u64,
    bpf: Result<BpfRun, String>,
}

impl Snapshot {
    /// CPU and BPF counters first, then `cdctl status` (so that the status call of the
    /// later snapshot is not charged to the phase).
    fn take(c: &Cluster, backend: &str, stats: &Result<OwnedFd, String>) -> Result<Self> {
        let pid =
            |n: &str| -> Result<u32> { c.pid(n)?.with_context(|| format!("{n} is not running")) };
        let src = pid(c.source())?;
        let source = procfs::cpu_time(src)?;
        let mut replicas = CpuTime::default();
        for t in c.targets() {
            let ct = procfs::cpu_time(pid(&t)?)?;
            replicas.user += ct.user;
            replicas.sys += ct.sys;
        }
        let bpf = match stats {
            _ if backend != "ebpf" => Err(format!("{backend} loads no BPF program")),
            Ok(_) => procfs::bpf_programs(src),
            Err(e) => Err(e.clone()),
        };
        let capture = c.status(c.source())?["node"]["capture"].clone();
        Ok(Self {
            source,
            replicas,
            events: capture["events_total"].as_u64().unwrap_or(0),
            lost: capture["lost_total"].as_u64().unwrap_or(0),
            bpf,
        })
    }

    fn until(&self, later: &Self) -> Phase {
        Phase {
            source: later.source.since(self.source),
            replicas: later.replicas.since(self.replicas),
            events: later.events.saturating_sub(self.events),
            lost: later.lost.saturating_sub(self.lost),
            bpf: match (&self.bpf, &later.bpf) {
                (Ok(a), Ok(b)) => Ok(b.since(*a)),
                (Err(e), _) | (_, Err(e)) => Err(e.clone()),
            },
        }
    }
}

/// Results of one backend.
#[derive(Debug)]
struct Outcome {
    backend: String,
    reason: String,
    idle: Phase,
    latency: LatencyStats,
    lat: Phase,
    burst: Burst,
    bur: Phase,
}

/// One backend: start its cluster, measure, stop it.
fn run_backend(
    a: &Args,
    backend: &'static str,
    dir: &Path,
    bins: &(PathBuf, PathBuf),
    stats: &Result<OwnedFd, String>,
) -> Result<Outcome> {
    eprintln!(
        "bench realtime: {backend}: starting the cluster in {}",
        dir.display()
    );
    let mut spec = ClusterSpec::new(a.replicas + 1, dir, &bins.0, &bins.1);
    spec.mode = Some("realtime");
    spec.capture = Some(backend);
    let c = Cluster::start(spec)?;
    let capture = rt::wait_capture(&c, Duration::from_secs(30))?;
    let got = capture["backend"].as_str().unwrap_or("?").to_owned();
    ensure!(
        got == backend,
        "asked for capture {backend}, the source runs {got}"
    );
    rt::replicated_dir(&c, "latency", Duration::from_secs(60))?;

    eprintln!("bench realtime: {backend}: idle for {IDLE:?}");
    let before = Snapshot::take(&c, backend, stats)?;
    std::thread::sleep(IDLE);
    let idle = before.until(&Snapshot::take(&c, backend, stats)?);

    eprintln!("bench realtime: {backend}: {} latency samples", a.samples);
    let before = Snapshot::take(&c, backend, stats)?;
    let samples = rt::measure_latency(&c, "latency", a.samples, a.size, SAMPLE_LIMIT)?;
    let after = Snapshot::take(&c, backend, stats)?;
    let lat = before.until(&after);

    eprintln!("bench realtime: {backend}: burst of {} files", a.burst);
    let before = Snapshot::take(&c, backend, stats)?;
    let burst = rt::burst(&c, "burst", a.burst, BURST_SEED, BURST_LIMIT)?;
    let after = Snapshot::take(&c, backend, stats)?;
    let bur = before.until(&after);
    if !burst.diffs.is_empty() {
        eprintln!(
            "bench realtime: {backend}: replicas still differ (logs in {}):\n  {}",
            dir.join("logs").display(),
            burst
                .diffs
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    Ok(Outcome {
        backend: got,
        reason: capture["reason"].as_str().unwrap_or("?").to_owned(),
        idle,
        latency: LatencyStats::new(&samples).context("no latency samples")?,
        lat,
        burst,
        bur,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// `x` per 1000 of `n`, in milliseconds.
fn ms_per_1000(x: Duration, n: u64) -> String {
    if n == 0 {
        return "n/a (none)".into();
    }
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let v = x.as_secs_f64() * 1e3 * 1000.0 / n as f64;
    format!("{v:.1}")
}

fn cpu(t: CpuTime) -> String {
    format!("{} ({} + {})", ms(t.total()), ms(t.user), ms(t.sys))
}

/// Picks a phase of an outcome and what to divide its cost by.
type Pick = fn(&Outcome) -> (&Phase, u64);

/// The BPF cells of one phase: `(runs and time, ns per run, ms per 1000 of n)`.
fn bpf_cells((p, n): (&Phase, u64)) -> [String; 3] {
    match &p.bpf {
        Ok(b) => {
            let t = Duration::from_nanos(b.run_time_ns);
            [
                format!("{} runs, {} ms", b.run_cnt, ms(t)),
                b.run_time_ns
                    .checked_div(b.run_cnt)
                    .map_or_else(|| "n/a (no runs)".into(), |v| v.to_string()),
                ms_per_1000(t, n),
            ]
        }
        Err(e) => {
            let s = format!("n/a: {e}");
            [s.clone(), s.clone(), s]
        }
    }
}

/// Adds the rows of all outcomes (`Err`: the backend failed) to a table.
fn table(a: &Args, runs: &[(&str, Result<Outcome, String>)]) -> Table {
    let mut head = vec!["metric".to_owned()];
    head.extend(runs.iter().map(|(b, _)| (*b).to_owned()));
    let mut t = Table::new(head);
    let n = u64::try_from(a.samples).unwrap_or(u64::MAX);
    let row = |t: &mut Table, label: &str, f: &dyn Fn(&Outcome) -> String| {
        let v = runs
            .iter()
            .map(|(_, r)| match r {
                Ok(o) => f(o),
                Err(_) => "failed".to_owned(),
            })
            .collect();
        t.row(label, v);
    };
    row(&mut t, "capture", &|o| {
        format!("{} ({})", o.backend, o.reason)
    });

    t.section(&format!(
        "change -> replica latency: {} writes of {} B, until readable on all {} replicas",
        a.samples, a.size, a.replicas
    ));
    row(&mut t, "  min (ms)", &|o| ms(o.latency.min));
    row(&mut t, "  p50 (ms)", &|o| ms(o.latency.p50));
    row(&mut t, "  p99 (ms)", &|o| ms(o.latency.p99));
    row(&mut t, "  max (ms)", &|o| ms(o.latency.max));
    row(&mut t, "  mean (ms)", &|o| ms(o.latency.mean));
    row(&mut t, "  capture events (lost)", &|o| {
        format!("{} ({})", o.lat.events, o.lat.lost)
    });

    t.section(&format!(
        "burst: about {} files written into the running source (tree seed {BURST_SEED})",
        a.burst
    ));
    row(&mut t, "  written", &|o| {
        let s = &o.burst.summary;
        format!(
            "{} files, {} dirs, {} symlinks, {} hard links, {}",
            s.files,
            s.dirs,
            s.symlinks,
            s.hardlinks,
            human_bytes(s.bytes)
        )
    });
    row(&mut t, "  writing on the source (s)", &|o| {
        secs(o.burst.written)
    });
    row(&mut t, "  first write -> all identical (s)", &|o| {
        if o.burst.diffs.is_empty() {
            secs(o.burst.took)
        } else {
            format!(
                "NOT identical after {}: {} differences",
                secs(o.burst.took),
                o.burst.diffs.len()
            )
        }
    });
    row(&mut t, "  files/s", &|o| {
        #[expect(clippy::cast_precision_loss, reason = "display only")]
        let v = o.burst.summary.files as f64 / o.burst.took.as_secs_f64();
        format!("{v:.0}")
    });
    row(&mut t, "  last write -> all identical (s)", &|o| {
        secs(o.burst.took.saturating_sub(o.burst.written))
    });
    row(&mut t, "  capture events (lost)", &|o| {
        format!("{} ({})", o.bur.events, o.bur.lost)
    });

    let files = |o: &Outcome| o.burst.summary.files as u64;
    t.section("CPU of the source cdd, ms: user+sys (user + sys); capture, coalescing, sending");
    row(&mut t, &format!("  idle {} s", IDLE.as_secs()), &|o| {
        cpu(o.idle.source)
    });
    row(&mut t, "  latency run", &|o| cpu(o.lat.source));
    row(&mut t, "    per 1000 writes", &|o| {
        ms_per_1000(o.lat.source.total(), n)
    });
    row(&mut t, "    per 1000 capture events", &|o| {
        ms_per_1000(o.lat.source.total(), o.lat.events)
    });
    row(&mut t, "  burst", &|o| cpu(o.bur.source));
    row(&mut t, "    per 1000 files", &|o| {
        ms_per_1000(o.bur.source.total(), files(o))
    });
    row(&mut t, "    per 1000 capture events", &|o| {
        ms_per_1000(o.bur.source.total(), o.bur.events)
    });
    t.section(&format!(
        "CPU of the {} replica cdds, summed, ms: user+sys (user + sys); receiving, applying",
        a.replicas
    ));
    row(&mut t, &format!("  idle {} s", IDLE.as_secs()), &|o| {
        cpu(o.idle.replicas)
    });
    row(&mut t, "  latency run", &|o| cpu(o.lat.replicas));
    row(&mut t, "  burst", &|o| cpu(o.bur.replicas));

    t.section("kernel: eBPF programs of the source cdd (sum of run_time_ns, run_cnt)");
    row(&mut t, "  programs", &|o| match &o.bur.bpf {
        Ok(b) => b.programs.to_string(),
        Err(e) => format!("n/a: {e}"),
    });
    let bpf_rows = |t: &mut Table, label: &str, per: Option<&str>, pick: Pick| {
        row(t, label, &|o| bpf_cells(pick(o))[0].clone());
        row(t, "    ns per run", &|o| bpf_cells(pick(o))[1].clone());
        if let Some(per) = per {
            row(t, per, &|o| bpf_cells(pick(o))[2].clone());
        }
    };
    let idle = format!("  idle {} s", IDLE.as_secs());
    bpf_rows(&mut t, &idle, None, |o| (&o.idle, 0));
    bpf_rows(
        &mut t,
        "  latency run",
        Some("    ms per 1000 writes"),
        |o| (&o.lat, o.latency.samples as u64),
    );
    bpf_rows(&mut t, "  burst", Some("    ms per 1000 files"), |o| {
        (&o.bur, o.burst.summary.files as u64)
    });
    for (b, r) in runs {
        if let Err(e) = r {
            t.row(&format!("error ({b})"), vec![e.clone()]);
        }
    }
    t
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("? ({e})"))
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Runs the benchmark and prints its table; fails if a backend failed or left the
/// replicas different.
pub fn run(a: &Args) -> Result<()> {
    ensure!(
        cd_testkit::is_root(),
        "bench realtime needs root (kernel capture, replicating owners)"
    );
    let bins = cd_testkit::build::release_daemon()?;
    let tmp;
    let dir = if let Some(d) = &a.dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        d.canonicalize()?
    } else {
        tmp = tempfile::Builder::new()
            .prefix("cdsync-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        tmp.path().to_path_buf()
    };
    for b in &a.backends {
        ensure!(
            !dir.join(b).exists(),
            "{} exists; give a new --dir",
            dir.join(b).display()
        );
    }
    let stats = crate::sys::bpf_enable_run_time_stats()
        .map_err(|e| format!("enabling BPF run-time stats (BPF_ENABLE_STATS) failed: {e}"));
    let load_start = loadavg();
    let started = Instant::now();
    let mut runs = Vec::new();
    for &b in &a.backends {
        let r = run_backend(a, b, &dir.join(b), &bins, &stats).map_err(|e| format!("{e:#}"));
        if let Err(e) = &r {
            eprintln!("bench realtime: {b} failed: {e}");
        }
        runs.push((b, r));
    }
    drop(stats);

    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!();
    println!(
        "cdsync real-time benchmark: master + source + {} replicas on 127.0.0.1, release \
         build, kernel {}, {cpus} CPUs",
        a.replicas,
        kernel()
    );
    println!(
        "load average {load_start} at start, {} at end; {} s in all",
        loadavg(),
        secs(started.elapsed())
    );
    println!();
    print!("{}", table(a, &runs).render());
    println!();
    println!(
        "CPU: /proc/<pid>/stat utime+stime (every thread; one tick = {} ms). Events: the \
         source's capture counter (cdctl status).",
        crate::sys::clock_ticks_per_sec().map_or(0, |hz| 1000 / hz)
    );
    println!(
        "eBPF: the kernel's per-program counters while this run held BPF_ENABLE_STATS, read \
         from /proc/<pid>/fdinfo of the source cdd. The programs hook sys_enter/sys_exit of \
         every process: they count every syscall on the machine during a phase (replicas, \
         this benchmark's polling, anything else running), not only the writers'."
    );
    println!(
        "fanotify: a filesystem mark, so the source also reads (and drops) the replicas' \
         writes when they share its filesystem, as here."
    );
    if let Some(d) = &a.dir {
        println!("clusters, roots and logs kept in {}", d.display());
    }
    let failed: Vec<&str> = runs
        .iter()
        .filter(|(_, r)| r.as_ref().map_or(true, |o| !o.burst.diffs.is_empty()))
        .map(|(b, _)| *b)
        .collect();
    ensure!(
        failed.is_empty(),
        "backend(s) {} failed or left replicas different",
        failed.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_parse() {
        let a = Args::parse(&[]).unwrap();
        assert_eq!(
            (a.samples, a.burst, a.replicas, a.size),
            (200, 20_000, 3, 4096)
        );
        assert_eq!(a.backends, ["ebpf", "fanotify"]);
        let a = Args::parse(&args(&[
            "--samples",
            "10",
            "--backend",
            "fanotify",
            "--burst",
            "500",
        ]))
        .unwrap();
        assert_eq!((a.samples, a.burst), (10, 500));
        assert_eq!(a.backends, ["fanotify"]);
        assert!(Args::parse(&args(&["--backend", "inotify"])).is_err());
        assert!(Args::parse(&args(&["--samples"])).is_err());
        assert!(Args::parse(&args(&["--samples", "0"])).is_err());
        assert!(Args::parse(&args(&["--replicas", "x"])).is_err());
        assert!(Args::parse(&args(&["--frobnicate"])).is_err());
    }

    #[test]
    fn rates_per_thousand() {
        assert_eq!(ms_per_1000(Duration::from_millis(50), 200), "250.0");
        assert_eq!(ms_per_1000(Duration::from_millis(50), 0), "n/a (none)");
    }
}
