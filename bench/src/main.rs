//! cdsync benchmarks. One subcommand per benchmark:
//!
//! - `realtime`: the real-time path of a local cluster: change→replica latency of small
//!   writes, replication of a burst of files, and what the source daemon and its
//!   kernel capture cost in CPU, per capture backend (see [`realtime`]).
//! - `suite` (`cargo xtask bench`): cdsync side by side with rsync, lsyncd, Syncthing and
//!   Unison on the same seeded workloads, in network namespaces (see [`suite`]);
//!   `trial` runs one tool through W1 and W2, for developing a tool's adapter.
//! - `limits`: the machine's physical limits (file read, write+fsync, loopback TCP,
//!   AES-GCM, BLAKE3, zstd), each alone (see [`limits`]).
//! - `relay`: relay routes against direct routes on a farm of 1 → 8 in network
//!   namespaces, bytes leaving the source and wall time (see [`relay`]).
//! - `delta`: the delta engine of `cd_core::delta` on a large file (signature, search,
//!   apply) beside rsync's delta transfer on the same files (see [`delta`]).
//!
//! Run as root from the workspace: `cargo run -p bench --release -j2 -- realtime`.
//! See `bench/README.md`.

use std::process::ExitCode;

use anyhow::{Result, bail};

mod args;
mod delta;
mod limits;
mod procfs;
mod realtime;
mod relay;
mod suite;
#[expect(
    unsafe_code,
    reason = "libc calls std lacks: sysconf(_SC_CLK_TCK), bpf(BPF_ENABLE_STATS)"
)]
mod sys;
mod table;

const USAGE: &str = "\
usage: bench <benchmark> [options]      (as root; from the workspace:
       cargo run -p bench --release -j2 -- <benchmark> [options])

benchmarks:
  realtime [--samples N] [--burst N] [--replicas N] [--backend ebpf|fanotify|both]
           [--size BYTES] [--dir DIR]
        start a master, a source and N replicas (default 3) on 127.0.0.1 with a
        real-time content set, per capture backend (default both), and measure:
        change->replica latency of N writes (default 200) of BYTES (default 4096),
        the replication of a burst of N files (default 20000) written while it runs,
        and the CPU time of the source daemon and of its eBPF programs.
        --dir DIR  work in DIR (kept, with the daemons' logs) instead of a temporary
                   directory; the content roots live there too
  delta [--size BYTES] [--seed N] [--dir DIR] [--no-rsync]
        on a seeded base of BYTES (default 1 GiB) and three targets (unchanged, 1 MiB
        changed in the middle, different), single-threaded: weak checksum and
        signature throughput, search and apply throughput, patch sizes; then
        rsync -a -I --no-whole-file --stats on the same files (installs rsync with
        apt-get if missing), its wall time and literal/matched bytes, and the ratios.
        --dir DIR  work in DIR (kept) instead of a temporary directory (needs about
                   4x BYTES of space)
        --no-rsync skip the rsync runs
  limits [--size BYTES] [--dir DIR]
        what this machine can do at most, each resource alone: warm file read,
        write+fsync, loopback TCP (one stream), AES-128/256-GCM, BLAKE3 and zstd -3
        per core; BYTES (default 1 GiB) per figure. The suite measures these too and
        reads W1 against them.
  relay [--runs N] [--rate RATE] [--files N] [--mib N] [--dir DIR] [--prefix P]
        [--json FILE] [--debug-daemon]
        one initial sync to a farm of 1 -> 8 (2 regions x 2 groups x 2 servers) in
        network namespaces, every link limited to RATE (default 200mbit), with
        routing = \"direct\" and = \"relay\": bytes leaving the source and wall time,
        median of N runs (default 3), ratio direct/relay (see bench/README.md)
  suite [--quick] [--runs N] [--tools a,b] [--workloads w1,w2,w3,w4,idle] [--dir DIR]
        [--json FILE]
        cdsync side by side with rsync (daemon, ssh), lsyncd, Syncthing and Unison
        (what `cargo xtask bench` runs; see bench/README.md)
  trial --tool NAME [--replicas N] [--files N] [--dir DIR]
        one tool through W1 and W2 on a small tree, verified";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("realtime") => realtime::run(&realtime::Args::parse(&args[1..])?),
        Some("trial") => suite::trial(&args[1..]),
        Some("suite") => suite::run::run(&suite::run::Args::parse(&args[1..])?).map(drop),
        Some("relay") => relay::run(&relay::Args::parse(&args[1..])?),
        Some("delta") => delta::run(&delta::Args::parse(&args[1..])?),
        Some("limits") => limits::run(&limits::Args::parse(&args[1..])?),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown benchmark `{other}`\n\n{USAGE}"),
        None => bail!("no benchmark given\n\n{USAGE}"),
    }
}
