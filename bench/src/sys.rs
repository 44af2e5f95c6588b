//! The two system calls the measurements need that std does not offer.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Clock ticks per second (`USER_HZ`), the unit of the times in `/proc/<pid>/stat`.
pub fn clock_ticks_per_sec() -> io::Result<u64> {
    // SAFETY: sysconf(3) has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(io::Error::last_os_error)
}

/// `bpf(BPF_ENABLE_STATS, { .enable_stats.type = BPF_STATS_RUN_TIME })` (Linux 5.8+,
/// CAP_SYS_ADMIN): the kernel counts `run_time_ns` / `run_cnt` of every BPF program
/// while the returned descriptor is open. Unlike the `kernel.bpf_stats_enabled`
/// sysctl it is reference-counted (it does not undo someone else's setting) and the
/// kernel drops it when this process exits, however it exits.
pub fn bpf_enable_run_time_stats() -> io::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    const BPF_STATS_RUN_TIME: u32 = 0;
    // union bpf_attr, member enable_stats: one u32 (the kernel zero-fills the rest).
    let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
    // SAFETY: `attr` is a valid, initialised buffer of the size passed, alive for the
    // duration of the call; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("bpf() returned no descriptor"))?;
    // SAFETY: on success BPF_ENABLE_STATS returns a new descriptor that nothing else
    // owns; `OwnedFd` closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
