//! Test support for cdsync, shared by `xtask`, the integration tests of `cd-daemon`,
//! `vm-tests` and `bench`.
//!
//! Nothing here uses cdsync code: the point of this crate is to judge the daemon from
//! the outside, with plain `std::fs`, real processes and its documented CLI.
//!
//! - [`tree`]: a seeded generator of a realistic web content tree (nested and empty
//!   directories, small and large files, symlinks, hard links, odd names, modes,
//!   foreign owners, past mtimes with nanoseconds). Same seed, same tree.
//! - [`mutate`]: one scripted, seeded round of edits of such a tree (content, size,
//!   renames, deletes, attributes, type changes, additions), with counts per kind.
//! - [`fileops`]: the file-operation fidelity matrix, as real syscalls.
//! - [`compare`]: an independent comparator of two trees: paths, types, bytes, mode,
//!   owner, mtime, symlink targets and hard-link structure.
//! - [`cluster`]: launches a master and nodes as real `cdd` processes on loopback
//!   (or one per network namespace), drives them with `cdctl`, and tears them down on
//!   drop.
//! - [`netns`]: a network of namespaces joined by a bridge, with per-host rate limits,
//!   delay, cuttable links and kernel byte counters (root only).
//! - [`build`]: builds the release daemon for the tools that launch clusters.
//! - [`realtime`]: change→replica latency and burst replication of a real-time
//!   cluster, measured from the outside (the demo and the benchmarks share it).

pub mod build;
pub mod cluster;
pub mod compare;
#[expect(
    unsafe_code,
    reason = "raw syscalls under test: mmap, splice, sendfile, copy_file_range, renameat2, io_uring"
)]
pub mod fileops;
pub mod mutate;
pub mod netns;
pub mod realtime;
pub mod tree;

#[expect(
    unsafe_code,
    reason = "libc calls std lacks: utimensat(AT_SYMLINK_NOFOLLOW), kill, geteuid, sigwait, setns"
)]
mod sys;

pub use sys::{is_root, kill, wait_for_termination_signal};

/// Signal numbers accepted by [`cluster::Cluster::kill`].
pub mod signal {
    /// Hard kill, cannot be caught.
    pub const SIGKILL: i32 = libc::SIGKILL;
    /// Graceful stop.
    pub const SIGTERM: i32 = libc::SIGTERM;
    /// Graceful stop (Ctrl-C).
    pub const SIGINT: i32 = libc::SIGINT;
    /// Freeze the process.
    pub const SIGSTOP: i32 = libc::SIGSTOP;
    /// Thaw a frozen process.
    pub const SIGCONT: i32 = libc::SIGCONT;
}

/// Shows a path for humans: plain when it is UTF-8, escaped (`Debug`) otherwise, so a
/// non-UTF-8 name stays distinguishable in a report. The empty path shows as `.`.
#[must_use]
pub fn show_path(p: &std::path::Path) -> String {
    if p.as_os_str().is_empty() {
        return ".".to_owned();
    }
    match p.to_str() {
        Some(s) => s.to_owned(),
        None => format!("{p:?}"),
    }
}

/// A byte count for humans: `12 B`, `1.5 KiB`, `3.0 MiB`, `2.0 GiB`.
#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
