//! Kernel change capture for cdsync (eBPF programs in C with CO-RE, loaded by aya).
//!
//! Skeleton: the kernel side arrives with real-time capture. Until then the daemon
//! finds changes by scanning (manual mode).

#![forbid(unsafe_code)]
