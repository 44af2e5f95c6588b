//! What `/proc` says about a process: CPU time, and the BPF programs it holds with
//! their kernel run-time counters.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

/// User and system CPU time of a process, all its threads (dead ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// `utime`.
    pub user: Duration,
    /// `stime`.
    pub sys: Duration,
}

impl CpuTime {
    /// User + system.
    #[must_use]
    pub fn total(self) -> Duration {
        self.user + self.sys
    }

    /// `self - earlier`, per field (saturating).
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
        }
    }
}

/// `(utime, stime)` in clock ticks from the text of `/proc/<pid>/stat`. The command
/// name (field 2) is in parentheses and may itself hold spaces and parentheses, so
/// fields are counted from the last `)`: utime and stime are fields 14 and 15.
pub fn parse_stat_ticks(stat: &str) -> Result<(u64, u64)> {
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| anyhow!("no `)` after the command name in {stat:?}"))?;
    // Field 3 (state) is the first one after the name.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .ok_or_else(|| anyhow!("stat has no field {n}: {stat:?}"))?
            .parse()
            .with_context(|| format!("field {n} of {stat:?}"))
    };
    Ok((field(14)?, field(15)?))
}

fn ticks(n: u64, hz: u64) -> Duration {
    Duration::from_secs(n / hz) + Duration::from_nanos((n % hz) * 1_000_000_000 / hz)
}

/// CPU time of process `pid` so far (resolution: one clock tick, usually 10 ms).
pub fn cpu_time(pid: u32) -> Result<CpuTime> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (u, s) = parse_stat_ticks(&text)?;
    let hz = crate::sys::clock_ticks_per_sec().context("sysconf(_SC_CLK_TCK)")?;
    Ok(CpuTime {
        user: ticks(u, hz),
        sys: ticks(s, hz),
    })
}

/// Kernel counters of the BPF programs a process holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfRun {
    /// Distinct programs.
    pub programs: usize,
    /// Time spent running them, summed (counted while run-time stats are enabled).
    pub run_time_ns: u64,
    /// Times they ran, summed.
    pub run_cnt: u64,
}

impl BpfRun {
    /// `self - earlier` for the counters (the program count is `self`'s).
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            programs: self.programs,
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
        }
    }
}

/// `(prog_id, run_time_ns, run_cnt)` from the text of `/proc/<pid>/fdinfo/<fd>` of a
/// BPF program descriptor; `None` when a field is missing (the counters since Linux
/// 5.1).
pub fn parse_prog_fdinfo(text: &str) -> Option<(u64, u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse().ok())?
        })
    };
    Some((field("prog_id")?, field("run_time_ns")?, field("run_cnt")?))
}

/// Sums the run-time counters of the BPF programs process `pid` holds descriptors of
/// (each program once, however many descriptors refer to it). Reading the holder's
/// own descriptors, rather than every program on the machine, keeps programs of other
/// processes out. `Err` says why there is nothing to report.
pub fn bpf_programs(pid: u32) -> Result<BpfRun, String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
    let mut seen = Vec::new();
    let mut out = BpfRun::default();
    for e in entries.flatten() {
        let is_prog = fs::read_link(e.path())
            .is_ok_and(|t| t.as_os_str().as_encoded_bytes() == b"anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
        // A descriptor closed since the listing is simply not counted.
        let Ok(text) = fs::read_to_string(&info) else {
            continue;
        };
        let (id, ns, cnt) = parse_prog_fdinfo(&text)
            .ok_or_else(|| format!("{info} has no prog_id/run_time_ns/run_cnt"))?;
        if !seen.contains(&id) {
            seen.push(id);
            out.programs += 1;
            out.run_time_ns += ns;
            out.run_cnt += cnt;
        }
    }
    if out.programs == 0 {
        return Err(format!("process {pid} holds no BPF program"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (cdd) S 1 4242 4242 0 -1 4194560 1234 0 0 0 157 42 0 0 20 0 9 0 \
                    8123 1234567 890 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(parse_stat_ticks(stat).unwrap(), (157, 42));
        // A command name with spaces and parentheses does not shift the fields.
        let odd = "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_ticks(odd).unwrap(), (3, 4));
        assert!(parse_stat_ticks("7 (cdd) S 1 2").is_err());
        assert!(parse_stat_ticks("no name").is_err());
    }

    #[test]
    fn ticks_become_durations() {
        assert_eq!(ticks(157, 100), Duration::from_millis(1570));
        assert_eq!(ticks(3, 1000), Duration::from_millis(3));
        let a = CpuTime {
            user: Duration::from_millis(30),
            sys: Duration::from_millis(20),
        };
        assert_eq!(a.total(), Duration::from_millis(50));
        assert_eq!(a.since(a), CpuTime::default());
    }

    #[test]
    fn this_process_has_cpu_time() {
        let t = cpu_time(std::process::id()).unwrap();
        assert!(t.total() < Duration::from_secs(3600));
    }

    #[test]
    fn prog_fdinfo_is_parsed() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2069\nprog_type:\t26\n\
                    prog_jited:\t1\nprog_tag:\t0123456789abcdef\nmemlock:\t4096\n\
                    prog_id:\t57\nrun_time_ns:\t123456\nrun_cnt:\t789\n\
                    recursion_misses:\t0\nverified_insns:\t812\n";
        assert_eq!(parse_prog_fdinfo(text), Some((57, 123_456, 789)));
        assert_eq!(parse_prog_fdinfo("prog_id:\t57\n"), None);
    }
}
