//! Privileged tests (kernel hooks, namespace clusters, qemu guests) live here and are
//! run by `cargo xtask test`.
