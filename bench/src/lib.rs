//! Side-by-side benchmarks of cdsync against rsync, lsyncd and Syncthing.
//!
//! Empty until the benchmarks issue: `cargo xtask bench` will drive the harness here.
