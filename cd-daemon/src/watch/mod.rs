//! Kernel change capture backends.
//!
//! Each backend decodes what the kernel reports into [`cd_core::event::FsEvent`]s
//! relative to a watched content root, tagged with that root's id, so one coalescer
//! serves them all. Loss is reported as [`EventKind::Lost`](cd_core::event::EventKind),
//! never dropped silently.
//!
//! - [`fanotify`]: a filesystem mark with directory file handles and names
//!   (`FAN_REPORT_DFID_NAME_TARGET`, `FAN_RENAME`, unlimited queue). Needs
//!   CAP_SYS_ADMIN; no kernel programs.
//! - eBPF (crate `cd-ebpf`): BTF tracepoints on the file syscalls and io_uring,
//!   filtered to the watched subtrees in the kernel.

pub mod fanotify;
