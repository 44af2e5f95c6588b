//! rsync in daemon mode: the classic "push the farm's content with a cron job" setup.
//!
//! [`Tool::start`] runs one rsync daemon per replica host (see [`RsyncDaemons`]), each
//! serving a writable module `bench` whose path is that replica's root. A sync is, on
//! the source host, one client per replica, **all at once**:
//!
//! ```text
//! rsync -a --delete <source_root>/ rsync://<replica ip>/bench/
//! ```
//!
//! The fan-out is parallel because that is what an operator's cron job pushing to a
//! farm does (`for h in …; do rsync … & done; wait`): pushing to the replicas one
//! after the other would make the time grow with their number for no reason but the
//! script. The sync is done when every client has exited; a non-zero exit fails it
//! with the client's log tail.
//!
//! The flags are an operator's sensible default and nothing more:
//!
//! - `-a` (`-rlptgoD`): recursion, symlinks as symlinks, permissions, mtimes (which
//!   rsync's quick check needs to skip unchanged files on the next run), owners,
//!   groups, devices and specials;
//! - `--delete`: a mirror, so what is gone from the source goes from the replicas;
//! - no `-z`: on a LAN an operator does not compress, and measuring agrees. With
//!   `bench trial` (3 replicas, 3,000 files = 100 MB, half of them text; unshaped
//!   links, 2 cores) W1 took 3.1–3.2 s, 302 MiB on the wire, 5.2–5.4 s CPU without
//!   `-z`, and 4.8–9.8 s, 197 MiB, 6.5–8.2 s CPU with it (zstd, as rsync 3.2+
//!   negotiates): a third fewer bytes, bought with more CPU than the link time it
//!   saves, since the source compresses once per replica. W2 (mostly random data
//!   and deltas) did not change. Compression only pays on a link slower than the
//!   compressor (a WAN), which is not what this bench models;
//! - no `-H`, `-A`, `-X`: the W1 tree has no hard links, ACLs or extended attributes,
//!   and an operator's default would not pay for them;
//! - no `--inplace`, `--whole-file` or checksum tuning: rsync's defaults (delta
//!   transfer over the network, temp file + rename) are what an operator gets.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{Env, Style, Tool, terminate, write_file};
use cd_testkit::netns::Host;

/// The TCP port of the rsync daemons (rsync's well-known port; every replica has a
/// namespace of its own, so nothing else there wants it).
pub const RSYNCD_PORT: u16 = 873;

/// The module every daemon serves.
pub const MODULE: &str = "bench";

/// The daemon URL of `host`'s module, with the trailing slash that makes rsync write
/// into the module's root rather than into a subdirectory of it.
pub fn module_url(host: &Host) -> String {
    format!("rsync://{}/{MODULE}/", host.ip)
}

/// One rsync daemon per replica host, each serving that replica's root as the
/// writable module [`MODULE`]. Shared by [`Rsyncd`] and the lsyncd adapter.
///
/// Each daemon is
///
/// ```text
/// rsync --daemon --no-detach --config=<work>/rsyncd-rN.conf --address=<ip> --port=873
/// ```
///
/// in the replica's namespace: `--no-detach` keeps it our child (so it can be
/// stopped and its CPU is in the run's cgroup like everything else), `--address`
/// binds it to the bench network only. The configuration is:
///
/// ```text
/// use chroot = no          # the daemon runs as root; a chroot would only change how
///                          # owner names are mapped, and nothing here needs confining
/// munge symlinks = no      # (defaults to yes without a chroot) symlinks are carried
///                          # verbatim, as the source has them
/// reverse lookup = no      # the bench network has no DNS; skip the lookup of every
///                          # client address rather than wait for it to fail
/// log file = <work>/rsyncd-rN.log
/// [bench]
///     path = <replica root>
///     read only = false    # a push target
///     uid = root           # so that -a can set owners, groups and every mode bit
///     gid = root
/// ```
#[derive(Debug, Default)]
pub struct RsyncDaemons {
    children: Vec<(String, Child)>,
}

impl RsyncDaemons {
    /// Starts one daemon per replica of `env` and waits until each listens.
    pub fn start(env: &Env) -> Result<Self> {
        let mut d = Self::default();
        for (host, root) in &env.replicas {
            let name = format!("rsyncd-{}", host.name);
            let conf = env.work.join(format!("{name}.conf"));
            let log = env.work.join(format!("{name}.log"));
            write_file(
                &conf,
                &format!(
                    "use chroot = no\n\
                     munge symlinks = no\n\
                     reverse lookup = no\n\
                     log file = {}\n\
                     \n\
                     [{MODULE}]\n\
                     \tpath = {}\n\
                     \tread only = false\n\
                     \tuid = root\n\
                     \tgid = root\n",
                    log.display(),
                    root.display()
                ),
            )?;
            let mut cmd = env.command(host, "rsync");
            cmd.arg("--daemon")
                .arg("--no-detach")
                .arg(format!("--config={}", conf.display()))
                .arg(format!("--address={}", host.ip))
                .arg(format!("--port={RSYNCD_PORT}"));
            // The daemon's own log file and its stdio are the same file: both append.
            let child = env.spawn_logged(cmd, &name)?;
            d.children.push((name, child));
        }
        for (host, _) in &env.replicas {
            env.wait_listening(host, RSYNCD_PORT, Duration::from_secs(10))
                .with_context(|| {
                    format!(
                        "rsync daemon on {}:\n{}",
                        host.name,
                        env.log_tail(&format!("rsyncd-{}", host.name), 20)
                    )
                })?;
        }
        Ok(d)
    }

    /// Stops every daemon (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self) -> Result<()> {
        for (_, c) in &mut self.children {
            terminate(c, Duration::from_secs(5))?;
        }
        self.children.clear();
        Ok(())
    }
}

/// Runs every `(command, log name)` at once and waits for all of them; fails if any
/// exited non-zero, quoting the tail of each failed one's log.
pub fn run_all_logged(env: &Env, cmds: Vec<(Command, String)>) -> Result<()> {
    let mut running = Vec::new();
    for (cmd, name) in cmds {
        running.push((env.spawn_logged(cmd, &name)?, name));
    }
    let mut failed = Vec::new();
    for (mut child, name) in running {
        let status = child
            .wait()
            .with_context(|| format!("waiting for {name}"))?;
        if !status.success() {
            failed.push(format!(
                "{name} failed ({status}):\n{}",
                env.log_tail(&name, 20)
            ));
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

/// The source root as rsync's source argument: with a trailing slash, so that its
/// contents (not the directory itself) go to the target.
pub fn source_arg(env: &Env) -> String {
    format!("{}/", env.source_root.display())
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Rsyncd {
    daemons: Option<RsyncDaemons>,
}

impl Rsyncd {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Tool for Rsyncd {
    fn name(&self) -> &'static str {
        "rsyncd"
    }

    fn style(&self) -> Style {
        Style::OneShot
    }

    fn packages(&self) -> &'static [&'static str] {
        &["rsync"]
    }

    fn start(&mut self, env: &Env) -> Result<()> {
        self.daemons = Some(RsyncDaemons::start(env)?);
        Ok(())
    }

    fn sync(&mut self, env: &Env) -> Result<()> {
        let cmds = env
            .replicas
            .iter()
            .map(|(host, _)| {
                let mut c = env.command(env.source, "rsync");
                c.arg("-a")
                    .arg("--delete")
                    .arg(source_arg(env))
                    .arg(module_url(host));
                (c, format!("rsync-{}", host.name))
            })
            .collect();
        run_all_logged(env, cmds)
    }

    fn stop(&mut self, _env: &Env) -> Result<()> {
        if let Some(mut d) = self.daemons.take() {
            d.stop()?;
        }
        Ok(())
    }
}
