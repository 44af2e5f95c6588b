//! Records per (tool, workload, replicas), the ratios to the best peer, the table and
//! `latest.json`.
//!
//! A record's main figure is its median wall time, except W3-latency (p50) and idle
//! (CPU seconds). For every figure the best peer is the non-cdsync tool of the same
//! workload and replica count with the smallest value among those whose replicas came
//! out identical; each record's ratio is its value over that one's (< 1: better than
//! the best peer). A tool that failed or left a replica different gets no ratio and
//! is never anyone's best peer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::measure::Sample;
use super::tools::Tool;

/// The samples of a latency workload.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub samples: Vec<Duration>,
    pub missing: usize,
}

/// One (tool, workload, replicas).
#[derive(Debug, Clone)]
pub struct Record {
    pub tool: String,
    pub workload: String,
    pub replicas: usize,
    /// Payload created or changed by the workload.
    pub data_bytes: u64,
    pub samples: Vec<Sample>,
    pub latency: Option<Latency>,
    pub errors: Vec<String>,
}

fn median<T: Copy + Ord>(v: &[T]) -> Option<T> {
    let mut s = v.to_vec();
    s.sort_unstable();
    // The lower median for an even count: a value that was really measured.
    s.get(s.len().saturating_sub(1) / 2).copied()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Record {
    pub fn new(tool: &str, workload: &str, replicas: usize, data_bytes: u64) -> Self {
        Self {
            tool: tool.to_owned(),
            workload: workload.to_owned(),
            replicas,
            data_bytes,
            samples: Vec::new(),
            latency: None,
            errors: Vec::new(),
        }
    }

    pub fn push(&mut self, s: Sample) {
        self.samples.push(s);
    }

    pub fn fail(&mut self, e: &anyhow::Error) {
        self.errors.push(format!("{e:#}"));
    }

    fn walls(&self) -> Vec<Duration> {
        self.samples.iter().map(|s| s.wall).collect()
    }

    pub fn wall_median(&self) -> Option<Duration> {
        median(&self.walls())
    }

    fn wire(&self) -> Option<u64> {
        median(
            &self
                .samples
                .iter()
                .map(|s| s.wire_bytes)
                .collect::<Vec<_>>(),
        )
    }

    fn uplink(&self) -> Option<u64> {
        median(
            &self
                .samples
                .iter()
                .map(|s| s.uplink_bytes)
                .collect::<Vec<_>>(),
        )
    }

    fn cpu(&self) -> Option<Duration> {
        median(&self.samples.iter().map(|s| s.cpu).collect::<Vec<_>>())
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        let l = self.latency.as_ref()?;
        let mut s = l.samples.clone();
        s.sort_unstable();
        (!s.is_empty()).then(|| cd_testkit::realtime::percentile(&s, p))
    }

    pub fn missing(&self) -> usize {
        self.samples.iter().map(|s| s.missing).max().unwrap_or(0)
            + self.latency.as_ref().map_or(0, |l| l.missing)
    }

    pub fn identical(&self) -> bool {
        self.errors.is_empty()
            && self.samples.iter().all(|s| s.identical)
            && self.missing() == 0
            && (!self.samples.is_empty()
                || self.latency.as_ref().is_some_and(|l| !l.samples.is_empty()))
    }

    fn is_peer(&self) -> bool {
        !self.tool.starts_with("cdsync")
    }

    /// The figures ratios are computed for, by name.
    fn figures(&self) -> BTreeMap<&'static str, f64> {
        let mut f = BTreeMap::new();
        if let Some(w) = self.wall_median() {
            f.insert("wall_s_median", secs(w));
        }
        if let Some(w) = self.wire() {
            #[expect(clippy::cast_precision_loss, reason = "a ratio")]
            f.insert("wire_bytes", w as f64);
        }
        if let Some(c) = self.cpu() {
            f.insert("cpu_s", secs(c));
        }
        if let Some(p) = self.percentile(0.5) {
            f.insert("p50_ms", ms(p));
        }
        f
    }

    fn main_figure(&self) -> &'static str {
        match self.workload.as_str() {
            "W3-latency" => "p50_ms",
            "idle" => "cpu_s",
            _ => "wall_s_median",
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Everything of one run.
#[derive(Debug)]
pub struct Report {
    scale: String,
    records: Vec<Record>,
    versions: BTreeMap<String, String>,
    took: Duration,
    /// This machine's physical limits, measured before the workloads.
    limits: Option<crate::limits::Limits>,
}

/// First line of `program args` (stdout, else stderr), or why not.
fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(e) => format!("({program}: {e})"),
    }
}

fn tool_version(name: &str) -> String {
    match name {
        "cdsync" | "cdsync-live" => format!("cdsync {}", env!("CARGO_PKG_VERSION")),
        "rsyncd" | "rsync-ssh" => version_of("rsync", &["--version"]),
        "lsyncd" => version_of("lsyncd", &["--version"]),
        "syncthing" => version_of("syncthing", &["--version"]),
        "unison" => version_of("unison", &["-version"]),
        _ => String::new(),
    }
}

impl Report {
    pub fn new(scale: &str, tools: &[Box<dyn Tool>]) -> Self {
        Self {
            scale: scale.to_owned(),
            records: Vec::new(),
            versions: tools
                .iter()
                .map(|t| (t.name().to_owned(), tool_version(t.name())))
                .collect(),
            took: Duration::ZERO,
            limits: None,
        }
    }

    pub fn set_limits(&mut self, l: crate::limits::Limits) {
        self.limits = Some(l);
    }

    /// Throughput of an identical W1 record (data bytes per median second) and its
    /// fraction of the machine's bound for a sync to one replica.
    fn against_limits(&self, r: &Record) -> Option<(f64, f64)> {
        let l = self.limits.as_ref()?;
        if r.workload != "W1" || !r.identical() {
            return None;
        }
        let t = r.data_bytes as f64 * r.replicas as f64 / secs(r.wall_median()?).max(1e-9);
        Some((t, t / l.bound().1))
    }

    pub fn add(&mut self, r: Record) {
        self.records.push(r);
    }

    pub fn finish(&mut self, took: Duration) {
        self.took = took;
    }

    /// Ratios of record `r` to the best identical peer, per figure; and that peer for
    /// the main figure.
    fn ratios(&self, r: &Record) -> (BTreeMap<&'static str, f64>, Option<String>) {
        let mut out = BTreeMap::new();
        let mut best_main = None;
        if !r.identical() {
            return (out, None);
        }
        let peers: Vec<&Record> = self
            .records
            .iter()
            .filter(|p| {
                p.is_peer() && p.identical() && p.workload == r.workload && p.replicas == r.replicas
            })
            .collect();
        for (name, v) in r.figures() {
            let best = peers
                .iter()
                .filter_map(|p| p.figures().get(name).map(|b| (*b, &p.tool)))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((b, who)) = best {
                if b > 0.0 {
                    out.insert(name, v / b);
                }
                if name == r.main_figure() {
                    best_main = Some(who.clone());
                }
            }
        }
        (out, best_main)
    }

    /// `latest.json`.
    pub fn json(&self) -> Value {
        let recs: Vec<Value> = self
            .records
            .iter()
            .map(|r| {
                let (ratios, best) = self.ratios(r);
                let walls = r.walls();
                json!({
                    "tool": r.tool,
                    "workload": r.workload,
                    "replicas": r.replicas,
                    "runs": r.samples.len(),
                    "wall_s_median": r.wall_median().map(secs),
                    "wall_s_min": walls.iter().min().copied().map(secs),
                    "wall_s_max": walls.iter().max().copied().map(secs),
                    "data_bytes": r.data_bytes,
                    "wire_bytes": r.wire(),
                    "source_uplink_bytes": r.uplink(),
                    "cpu_s": r.cpu().map(secs),
                    "p50_ms": r.percentile(0.5).map(ms),
                    "p99_ms": r.percentile(0.99).map(ms),
                    "latency_samples": r.latency.as_ref().map(|l| l.samples.len()),
                    "missing": r.missing(),
                    "identical": r.identical(),
                    "main_figure": r.main_figure(),
                    "best_peer": best,
                    "ratio_to_best_peer": ratios.get(r.main_figure()),
                    "ratios_to_best_peer": ratios,
                    "w1_mib_s": self.against_limits(r).map(|(t, _)| t / MIB),
                    "w1_fraction_of_bound": self.against_limits(r).map(|(_, f)| f),
                    "errors": r.errors,
                    "differences": r.samples.iter().flat_map(|s| s.diffs.iter().take(5)).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "scale": self.scale,
            "took_s": secs(self.took),
            "machine": machine(),
            "versions": self.versions,
            "limits": self.limits.as_ref().map(crate::limits::Limits::json),
            "records": recs,
        })
    }

    /// The human table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let m = machine();
        let _ = writeln!(
            out,
            "cdsync side by side ({} scale, {:.0} s) on {} ({} CPUs, kernel {})",
            self.scale,
            secs(self.took),
            m["cpu"].as_str().unwrap_or("?"),
            m["cpus"],
            m["kernel"].as_str().unwrap_or("?")
        );
        for (t, v) in &self.versions {
            let _ = writeln!(out, "  {t}: {v}");
        }
        let mut groups: Vec<(String, usize)> = Vec::new();
        for r in &self.records {
            if !groups.contains(&(r.workload.clone(), r.replicas)) {
                groups.push((r.workload.clone(), r.replicas));
            }
        }
        let head = [
            "tool",
            "wall med",
            "min-max",
            "wire",
            "src uplink",
            "cpu s",
            "p50 ms",
            "p99 ms",
            "missing",
            "identical",
            "x best peer",
        ];
        for (w, n) in groups {
            let recs: Vec<&Record> = self
                .records
                .iter()
                .filter(|r| r.workload == w && r.replicas == n)
                .collect();
            let data = recs.first().map_or(0, |r| r.data_bytes);
            let _ = writeln!(
                out,
                "\n{} -> {n} replica{} (data {})",
                describe(&w),
                if n == 1 { "" } else { "s" },
                cd_testkit::human_bytes(data)
            );
            let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| (*h).to_owned()).collect()];
            for r in recs {
                let (ratios, best) = self.ratios(r);
                let walls = r.walls();
                let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
                rows.push(vec![
                    r.tool.clone(),
                    opt(r.wall_median().map(|w| format!("{:.2}s", secs(w)))),
                    opt(walls
                        .iter()
                        .min()
                        .zip(walls.iter().max())
                        .map(|(a, b)| format!("{:.2}-{:.2}", secs(*a), secs(*b)))),
                    opt(r.wire().map(cd_testkit::human_bytes)),
                    opt(r.uplink().map(cd_testkit::human_bytes)),
                    opt(r.cpu().map(|c| format!("{:.2}", secs(c)))),
                    opt(r.percentile(0.5).map(|p| format!("{:.1}", ms(p)))),
                    opt(r.percentile(0.99).map(|p| format!("{:.1}", ms(p)))),
                    r.missing().to_string(),
                    if r.identical() {
                        "yes".to_owned()
                    } else if r.errors.is_empty() {
                        "NO".to_owned()
                    } else {
                        "FAILED".to_owned()
                    },
                    match (ratios.get(r.main_figure()), best) {
                        (Some(_), Some(b)) if r.is_peer() && b == r.tool => "best".to_owned(),
                        (Some(x), Some(b)) => format!("{x:.2} ({b})"),
                        _ => "-".to_owned(),
                    },
                ]);
            }
            let widths: Vec<usize> = (0..head.len())
                .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
                .collect();
            for row in rows {
                let mut line = String::new();
                for (c, cell) in row.iter().enumerate() {
                    if c == 0 {
                        let _ = write!(line, "  {cell:<w$}", w = widths[c]);
                    } else {
                        let _ = write!(line, "  {cell:>w$}", w = widths[c]);
                    }
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
            for r in self
                .records
                .iter()
                .filter(|r| r.workload == w && r.replicas == n)
            {
                for e in &r.errors {
                    let _ = writeln!(out, "  ! {}: {}", r.tool, e.lines().next().unwrap_or(""));
                }
                for s in &r.samples {
                    if let Some(d) = s.diffs.first() {
                        let _ = writeln!(out, "  ! {}: {} ({} missing)", r.tool, d, s.missing);
                    }
                }
            }
        }
        if let Some(l) = &self.limits {
            let (name, bound) = l.bound();
            let _ = writeln!(
                out,
                "\nW1 against this machine's limits (measured alone, {} each; a sync to \
                 one replica here cannot beat {name}: {:.0} MiB/s; to N replicas, N times \
                 the bytes share it)",
                cd_testkit::human_bytes(l.bytes),
                bound / MIB
            );
            for line in l.render().lines() {
                let _ = writeln!(out, "  {line}");
            }
            for r in &self.records {
                if let Some((t, f)) = self.against_limits(r) {
                    let _ = writeln!(
                        out,
                        "  {:<12} W1 -> {}: {:>6.0} MiB/s written to replicas, {:>5.1} % of the bound",
                        r.tool,
                        r.replicas,
                        t / MIB,
                        f * 100.0
                    );
                }
            }
        }
        out
    }
}

fn describe(workload: &str) -> &'static str {
    match workload {
        "W1" => "W1 initial sync",
        "W2" => "W2 incremental (1% rewritten, 50 renamed, 50 deleted, 1 MiB in a big file)",
        "W3-latency" => "W3 latency of a 4 KiB write",
        "W3-burst" => "W3 burst of small files",
        "W4" => "W4 fan-out over rate-limited links",
        "idle" => "idle, nothing changing",
        _ => "?",
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": cpus,
        "kernel": kernel.trim(),
        "loadavg": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}
