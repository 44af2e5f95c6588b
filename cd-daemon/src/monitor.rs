//! The server monitor (SM): what a node measures of itself, and how the master judges
//! a series of measurements.
//!
//! - **Node side.** [`Sampler`] reads `stat`, `meminfo`, `loadavg`, `net/tcp` and
//!   `net/tcp6` under the node's `monitor_proc_root` (default `/proc`) and
//!   `statvfs(2)` of each content root, and turns them into one
//!   [`pb::MonitorSample`], sent in the node's heartbeat every `interval` the master
//!   assigned. The parsers are pure functions of the files' text. A value that cannot
//!   be read is left out and named in `unavailable` (the sample still goes out).
//! - **Master side.** [`Hysteresis`] is the per-threshold state machine: it fires when
//!   a value is above `above` for `for_samples` consecutive samples and clears only
//!   when it falls below `clear_below`. [`metric_value`] picks a [`Metric`] out of a
//!   sample.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cd_proto::pb;

use crate::config::Metric;

/// CPU time counters from the first (`cpu`) line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Everything but idle and iowait.
    pub busy: u64,
    pub total: u64,
}

/// The all-CPU counters of `/proc/stat`.
pub fn parse_stat(text: &str) -> Result<CpuTimes, String> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or("no `cpu` line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>().map_err(|_| format!("bad counter `{f}`")))
        .collect::<Result<_, _>>()?;
    if v.len() < 4 {
        return Err(format!(
            "{} counters on the `cpu` line, want at least 4",
            v.len()
        ));
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// The busy share of all CPUs between two readings; `None` when no time passed (or
/// the counters went backwards: another boot, another proc).
pub fn cpu_busy_ratio(prev: CpuTimes, now: CpuTimes) -> Option<f64> {
    let total = now.total.checked_sub(prev.total)?;
    let busy = now.busy.checked_sub(prev.busy)?;
    (total > 0).then(|| (busy as f64 / total as f64).clamp(0.0, 1.0))
}

/// `1 - MemAvailable / MemTotal` from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Result<f64, String> {
    let field = |name: &str| -> Result<u64, String> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .ok_or_else(|| format!("no `{name}`"))?;
        let v = line[name.len() + 1..]
            .split_whitespace()
            .next()
            .unwrap_or("");
        v.parse().map_err(|_| format!("bad `{name}` value `{v}`"))
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?;
    if total == 0 {
        return Err("MemTotal is 0".into());
    }
    Ok((1.0 - available as f64 / total as f64).clamp(0.0, 1.0))
}

/// The 1, 5 and 15 minute load averages of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Result<[f64; 3], String> {
    let mut it = text.split_whitespace();
    let mut out = [0.0; 3];
    for (i, slot) in out.iter_mut().enumerate() {
        let f = it.next().ok_or_else(|| format!("{i} fields, want 3"))?;
        let v: f64 = f.parse().map_err(|_| format!("bad load `{f}`"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("bad load `{f}`"));
        }
        *slot = v;
    }
    Ok(out)
}

/// TCP state ESTABLISHED in `/proc/net/tcp{,6}`.
const TCP_ESTABLISHED: u8 = 0x01;

/// Established connections in a `/proc/net/tcp` or `/proc/net/tcp6` table whose local
/// port is one of `ports`.
pub fn count_established(text: &str, ports: &BTreeSet<u16>) -> Result<u64, String> {
    let mut lines = text.lines();
    let header = lines.next().ok_or("empty table")?;
    if !header.contains("local_address") {
        return Err("no header line".into());
    }
    let mut n = 0;
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(st)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(format!("short line `{}`", line.trim()));
        };
        let port = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("bad local address `{local}`"))?;
        let st = u8::from_str_radix(st, 16).map_err(|_| format!("bad state `{st}`"))?;
        if st == TCP_ESTABLISHED && ports.contains(&port) {
            n += 1;
        }
    }
    Ok(n)
}

/// Reads one node's sample; keeps the previous CPU counters for the busy ratio.
#[derive(Debug)]
pub struct Sampler {
    proc_root: PathBuf,
    /// Content set → root.
    roots: Vec<(String, PathBuf)>,
    prev_cpu: Option<CpuTimes>,
}

impl Sampler {
    pub fn new(proc_root: PathBuf, roots: Vec<(String, PathBuf)>) -> Self {
        Sampler {
            proc_root,
            roots,
            prev_cpu: None,
        }
    }

    fn read(&self, rel: &str) -> Result<String, String> {
        std::fs::read_to_string(self.proc_root.join(rel))
            .map_err(|e| format!("{}: {e}", self.proc_root.join(rel).display()))
    }

    /// Measures now. `service_ports`: whose established connections are sessions.
    pub fn sample(&mut self, service_ports: &BTreeSet<u16>) -> pb::MonitorSample {
        let mut s = pb::MonitorSample::default();
        let mut unavailable = Vec::new();
        match self.read("stat").and_then(|t| parse_stat(&t)) {
            Ok(now) => {
                match self.prev_cpu.map(|p| cpu_busy_ratio(p, now)) {
                    Some(Some(r)) => s.cpu_busy_ratio = r,
                    Some(None) => unavailable.push(unavailable_entry(
                        "cpu_busy_ratio",
                        "the CPU counters did not advance since the last reading".into(),
                    )),
                    None => unavailable.push(unavailable_entry(
                        "cpu_busy_ratio",
                        "no earlier reading to compare with yet".into(),
                    )),
                }
                self.prev_cpu = Some(now);
            }
            Err(e) => unavailable.push(unavailable_entry("cpu_busy_ratio", e)),
        }
        match self.read("meminfo").and_then(|t| parse_meminfo(&t)) {
            Ok(r) => s.memory_used_ratio = r,
            Err(e) => unavailable.push(unavailable_entry("memory_used_ratio", e)),
        }
        match self.read("loadavg").and_then(|t| parse_loadavg(&t)) {
            Ok([a, b, c]) => (s.load1, s.load5, s.load15) = (a, b, c),
            Err(e) => {
                for m in ["load1", "load5", "load15"] {
                    unavailable.push(unavailable_entry(m, e.clone()));
                }
            }
        }
        if !service_ports.is_empty() {
            // IPv4 and IPv6 tables; a kernel without IPv6 has no tcp6.
            let v4 = self
                .read("net/tcp")
                .and_then(|t| count_established(&t, service_ports));
            let v6 = match self.read("net/tcp6") {
                Ok(t) => count_established(&t, service_ports),
                Err(_) if self.proc_root.join("net/tcp").exists() => Ok(0),
                Err(e) => Err(e),
            };
            match (v4, v6) {
                (Ok(a), Ok(b)) => s.sessions = a + b,
                (Err(e), _) | (_, Err(e)) => unavailable.push(unavailable_entry("sessions", e)),
            }
        }
        for (set, root) in &self.roots {
            match rustix::fs::statvfs(root) {
                Ok(v) if v.f_blocks > 0 => s.disks.push(pb::DiskSample {
                    content_set: set.clone(),
                    used_ratio: (1.0 - v.f_bavail as f64 / v.f_blocks as f64).clamp(0.0, 1.0),
                    available_bytes: v.f_bavail.saturating_mul(v.f_frsize),
                }),
                Ok(_) => unavailable.push(unavailable_entry(
                    "disk_used_ratio",
                    format!("{}: a file system without blocks", root.display()),
                )),
                Err(e) => unavailable.push(unavailable_entry(
                    "disk_used_ratio",
                    format!("{}: {e}", root.display()),
                )),
            }
        }
        s.unavailable = unavailable;
        s
    }
}

fn unavailable_entry(metric: &str, why: String) -> String {
    format!("{metric}: {why}")
}

/// Whether `sample` lacks `metric` (see [`pb::MonitorSample::unavailable`]).
fn is_unavailable(sample: &pb::MonitorSample, metric: Metric) -> bool {
    let prefix = format!("{}:", metric.as_str());
    sample.unavailable.iter().any(|u| u.starts_with(&prefix))
}

/// The value of `metric` in `sample`, if it was measured. Disk: the fullest root.
pub fn metric_value(sample: &pb::MonitorSample, metric: Metric) -> Option<f64> {
    if is_unavailable(sample, metric) {
        return None;
    }
    match metric {
        Metric::Load1 => Some(sample.load1),
        Metric::Load5 => Some(sample.load5),
        Metric::Load15 => Some(sample.load15),
        Metric::CpuBusyRatio => Some(sample.cpu_busy_ratio),
        Metric::MemoryUsedRatio => Some(sample.memory_used_ratio),
        Metric::DiskUsedRatio => sample
            .disks
            .iter()
            .map(|d| d.used_ratio)
            .max_by(f64::total_cmp),
        Metric::Sessions => Some(sample.sessions as f64),
    }
}

/// What one observation did to a [`Hysteresis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// Now firing (was clear).
    Fired,
    /// Now clear (was firing).
    Cleared,
}

/// A threshold with hysteresis: fires after `for_samples` consecutive values above
/// `above`, clears at the first value below `clear_below`; values in between keep the
/// state (and break a run towards firing).
#[derive(Debug, Clone, PartialEq)]
pub struct Hysteresis {
    above: f64,
    clear_below: f64,
    for_samples: u32,
    run: u32,
    firing: bool,
}

impl Hysteresis {
    /// `clear_below < above` (the config checks it).
    pub fn new(above: f64, clear_below: f64, for_samples: u32) -> Self {
        Hysteresis {
            above,
            clear_below,
            for_samples: for_samples.max(1),
            run: 0,
            firing: false,
        }
    }

    pub fn is_firing(&self) -> bool {
        self.firing
    }

    /// Feeds one value; says if the state changed.
    pub fn observe(&mut self, v: f64) -> Option<Crossing> {
        if v > self.above {
            self.run = self.run.saturating_add(1);
            if !self.firing && self.run >= self.for_samples {
                self.firing = true;
                return Some(Crossing::Fired);
            }
        } else {
            self.run = 0;
            if self.firing && v < self.clear_below {
                self.firing = false;
                return Some(Crossing::Cleared);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str =
        "cpu  100 10 50 800 40 0 0 0 0 0\ncpu0 50 5 25 400 20 0 0 0 0 0\nintr 1 2 3\n";

    #[test]
    fn stat_counts_busy_and_total_ticks() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                busy: 160,
                total: 1000
            }
        );
        let later = parse_stat("cpu  150 10 100 850 40 0 0 0 0 0\n").unwrap();
        // 100 more busy ticks of 150.
        let r = cpu_busy_ratio(t, later).unwrap();
        assert!((r - 100.0 / 150.0).abs() < 1e-9, "{r}");
        assert_eq!(cpu_busy_ratio(t, t), None);
        assert_eq!(cpu_busy_ratio(later, t), None);
        assert!(
            parse_stat("cpu0 1 2 3 4\n")
                .unwrap_err()
                .contains("no `cpu` line")
        );
        assert!(
            parse_stat("cpu 1 2 x 4\n")
                .unwrap_err()
                .contains("bad counter")
        );
        assert!(parse_stat("cpu 1 2\n").is_err());
    }

    #[test]
    fn meminfo_used_ratio() {
        let t = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n";
        assert!((parse_meminfo(t).unwrap() - 0.75).abs() < 1e-9);
        assert!(
            parse_meminfo("MemTotal: 1000 kB\n")
                .unwrap_err()
                .contains("MemAvailable")
        );
        assert!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n").is_err());
        // A field whose name is a prefix of another is not mistaken for it.
        assert!(parse_meminfo("MemTotalX: 5 kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn loadavg_fields() {
        assert_eq!(
            parse_loadavg("12.50 3.90 0.05 7/156 20932\n").unwrap(),
            [12.5, 3.9, 0.05]
        );
        assert!(parse_loadavg("1.0 2.0").is_err());
        assert!(parse_loadavg("1.0 x 3.0").is_err());
        assert!(parse_loadavg("-1 2 3").is_err());
    }

    #[test]
    fn sessions_are_established_connections_on_service_ports() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 0100007F:0050 0100007F:AF8E 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100007F:0050 0100007F:AF8F 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n\
   3: 0100007F:01BB 0100007F:AF90 06 00000000:00000000 00:00000000 00000000     0        0 4 1\n\
   4: 0100007F:AF8E 0100007F:0050 01 00000000:00000000 00:00000000 00000000     0        0 5 1\n";
        let ports: BTreeSet<u16> = [80, 443].into();
        // Two established on :80; the listener, a TIME_WAIT on :443 and the client
        // side of a connection to :80 do not count.
        assert_eq!(count_established(tcp, &ports).unwrap(), 2);
        assert_eq!(count_established(tcp, &[8080].into()).unwrap(), 0);
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:01BB 00000000000000000000000001000000:D3A4 01 0\n";
        assert_eq!(count_established(tcp6, &ports).unwrap(), 1);
        assert!(count_established("", &ports).is_err());
        assert!(count_established("sl local_address\n 0: zz 1 01\n", &ports).is_err());
    }

    #[test]
    fn sampler_reads_its_proc_root_and_names_what_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        std::fs::create_dir_all(proc.join("net")).unwrap();
        std::fs::write(proc.join("stat"), STAT).unwrap();
        std::fs::write(proc.join("loadavg"), "9.25 4.00 1.00 1/1 1\n").unwrap();
        std::fs::write(
            proc.join("net/tcp"),
            "sl local_address rem_address st\n 0: 0100007F:0050 0100007F:1234 01 0\n",
        )
        .unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir(&root).unwrap();
        let mut s = Sampler::new(proc.clone(), vec![("www".into(), root)]);
        let a = s.sample(&[80].into());
        assert_eq!((a.load1, a.load5, a.load15), (9.25, 4.0, 1.0));
        assert_eq!(a.sessions, 1);
        assert_eq!(a.disks.len(), 1);
        assert_eq!(a.disks[0].content_set, "www");
        assert!((0.0..=1.0).contains(&a.disks[0].used_ratio));
        assert!(a.disks[0].available_bytes > 0);
        // No meminfo; no earlier CPU reading.
        assert!(
            a.unavailable
                .iter()
                .any(|u| u.starts_with("memory_used_ratio:")),
            "{a:?}"
        );
        assert!(
            a.unavailable
                .iter()
                .any(|u| u.starts_with("cpu_busy_ratio:")),
            "{a:?}"
        );
        assert_eq!(metric_value(&a, Metric::MemoryUsedRatio), None);
        assert_eq!(metric_value(&a, Metric::Load1), Some(9.25));
        assert_eq!(metric_value(&a, Metric::Sessions), Some(1.0));

        std::fs::write(proc.join("stat"), "cpu  200 10 50 850 40 0 0 0 0 0\n").unwrap();
        std::fs::write(proc.join("loadavg"), "0.50 4.00 1.00 1/1 1\n").unwrap();
        let b = s.sample(&[80].into());
        assert_eq!(b.load1, 0.5);
        // 100 busy ticks of 150.
        assert!((b.cpu_busy_ratio - 100.0 / 150.0).abs() < 1e-9, "{b:?}");
        assert!(
            !b.unavailable
                .iter()
                .any(|u| u.starts_with("cpu_busy_ratio:"))
        );
    }

    #[test]
    fn hysteresis_fires_above_and_clears_only_below_clear() {
        let mut h = Hysteresis::new(8.0, 6.0, 1);
        assert_eq!(h.observe(7.9), None);
        assert_eq!(h.observe(8.0), None, "at the threshold is not above it");
        assert_eq!(h.observe(8.1), Some(Crossing::Fired));
        assert_eq!(h.observe(9.0), None, "fires once");
        assert_eq!(h.observe(7.0), None, "between the two: still firing");
        assert_eq!(h.observe(6.0), None, "at clear_below is not below it");
        assert!(h.is_firing());
        assert_eq!(h.observe(5.9), Some(Crossing::Cleared));
        assert_eq!(h.observe(7.0), None);
        assert!(!h.is_firing());
    }

    #[test]
    fn hysteresis_needs_consecutive_samples_to_fire() {
        let mut h = Hysteresis::new(0.9, 0.8, 3);
        assert_eq!(h.observe(0.95), None);
        assert_eq!(h.observe(0.95), None);
        assert_eq!(h.observe(0.85), None, "a value not above breaks the run");
        assert_eq!(h.observe(0.95), None);
        assert_eq!(h.observe(0.95), None);
        assert_eq!(h.observe(0.95), Some(Crossing::Fired));
        assert_eq!(h.observe(0.1), Some(Crossing::Cleared));
    }
}
