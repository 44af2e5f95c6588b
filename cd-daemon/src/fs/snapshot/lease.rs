//! File leases (`fcntl(F_SETLEASE)`, `fcntl(F_GETLEASE)`), which rustix does not wrap.
//!
//! One system call per function; every `unsafe` block says why it is sound.
#![expect(
    unsafe_code,
    reason = "rustix has no wrapper for F_SETLEASE / F_GETLEASE"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The lease kinds of `fcntl(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lease {
    Read,
    Unlock,
}

/// `fcntl(fd, F_SETLEASE, F_RDLCK | F_UNLCK)`. A read lease is granted only while no
/// one has the file open for writing (`EAGAIN` otherwise); later opens for writing
/// (and truncates) then block until the lease is released or the kernel's
/// `lease-break-time` runs out, and the holder gets `SIGIO`.
pub(super) fn set_lease(fd: BorrowedFd<'_>, lease: Lease) -> io::Result<()> {
    let arg = match lease {
        Lease::Read => libc::F_RDLCK,
        Lease::Unlock => libc::F_UNLCK,
    };
    // SAFETY: `fd` is live for the call; F_SETLEASE takes an integer argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fcntl(fd, F_GETLEASE)`: true while the read lease is held and nobody is waiting for
/// it to break (a pending break reports the type it breaks to, `F_UNLCK`).
pub(super) fn read_lease_intact(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: `fd` is live for the call; F_GETLEASE takes no argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc == libc::F_RDLCK)
}
