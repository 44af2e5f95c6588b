//! The tools under test, behind one small trait, and what they share.
//!
//! A tool is driven in one of two styles ([`Style`]):
//!
//! - **one-shot** (rsync, rsync over ssh, Unison, cdsync in manual mode): [`Tool::start`]
//!   brings up what must already run before a sync (rsync daemons, sshd, a cdsync
//!   cluster); the bench then times [`Tool::sync`], which returns when the tool says
//!   every replica is done, and verifies the replicas afterwards;
//! - **live** (lsyncd, Syncthing, cdsync in real-time mode): [`Tool::start`] starts the
//!   mirroring itself, and the bench times from then (or from a change on the source)
//!   until it finds every replica identical to the source; the tool is never asked.
//!
//! Every process a tool starts runs inside the run's cgroup (CPU accounting) and in
//! its host's network namespace (wire bytes): use [`Env::command`], never
//! `Command::new`. [`Tool::stop`] ends them; the bench kills whatever is left in the
//! cgroup afterwards.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cgroup::Cgroup;
use cd_testkit::netns::{Host, Net};

pub mod cdsync;
pub mod lsyncd;
pub mod rsync_ssh;
pub mod rsyncd;
#[cfg(test)]
pub mod saboteur;
pub mod sshd;
pub mod syncthing;
pub mod unison;

/// How the bench drives a tool; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Runs when told to; [`Tool::sync`] is timed.
    OneShot,
    /// Mirrors continuously after [`Tool::start`].
    Live,
}

/// Where a tool runs: hosts, content roots, a private work directory, the cgroup.
#[derive(Debug)]
pub struct Env<'a> {
    /// The bench network.
    pub net: &'a Net,
    /// The source host.
    pub source: &'a Host,
    /// The source's content root (the same directory for every tool of a run).
    pub source_root: PathBuf,
    /// The replica hosts with their (initially empty) content roots.
    pub replicas: Vec<(&'a Host, PathBuf)>,
    /// A host for coordinators (cdsync's master); nothing else runs there.
    pub aux: &'a Host,
    /// The tool's own scratch directory (configs, homes, keys, logs); empty at
    /// [`Tool::start`], kept after the run for inspection.
    pub work: PathBuf,
    /// The run's cgroup.
    pub cgroup: &'a Cgroup,
}

impl Env<'_> {
    /// `program` to be run on `host`, inside the run's cgroup.
    pub fn command(&self, host: &Host, program: impl AsRef<OsStr>) -> Command {
        self.cgroup.command(host, program)
    }

    /// A log file in the work directory (appended to).
    pub fn log(&self, name: &str) -> Result<File> {
        let p = self.work.join(format!("{name}.log"));
        File::options()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    /// The last `lines` lines of the work directory's log `name`.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        cd_testkit::cluster::tail(&self.work.join(format!("{name}.log")), lines)
    }

    /// Spawns `cmd` with stdin closed and stdout/stderr appended to log `name`.
    pub fn spawn_logged(&self, mut cmd: Command, name: &str) -> Result<Child> {
        let log = self.log(name)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))
    }

    /// Runs `cmd` to completion (output to log `name`); fails on a non-zero exit,
    /// quoting the log's tail.
    pub fn run_logged(&self, cmd: Command, name: &str) -> Result<()> {
        let status = self.spawn_logged(cmd, name)?.wait()?;
        if !status.success() {
            bail!("{name} failed ({status}):\n{}", self.log_tail(name, 20));
        }
        Ok(())
    }

    /// Waits until something listens on TCP `port` in `host`'s namespace.
    pub fn wait_listening(&self, host: &Host, port: u16, limit: Duration) -> Result<()> {
        wait_for(limit, &format!("port {port} on {}", host.name), || {
            self.net.listening(host, port)
        })
    }
}

/// Polls `ready` every 20 ms until it says yes, for at most `limit`.
pub fn wait_for(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `child`, waits up to `grace`, then SIGKILLs it.
pub fn terminate(child: &mut Child, grace: Duration) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    // Gone already is fine: try_wait reaps it below.
    let _ = cd_testkit::kill(child.id(), libc::SIGTERM);
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().ok();
    child.wait()?;
    Ok(())
}

/// Writes `text` to `path`, creating parent directories.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// One tool under test.
pub trait Tool {
    /// Its name in the table and the JSON (`cdsync`, `rsyncd`, `rsync-ssh`, `lsyncd`,
    /// `syncthing`, `unison`).
    fn name(&self) -> &'static str;

    /// How the bench drives it.
    fn style(&self) -> Style;

    /// Debian packages it needs (installed by the bench before anything runs).
    fn packages(&self) -> &'static [&'static str];

    /// Names at the top of a root that are the tool's own bookkeeping, left out of
    /// the comparison (Syncthing's `.stfolder`).
    fn ignore(&self) -> &'static [&'static str] {
        &[]
    }

    /// The most replicas it is run with; `None` = any number.
    fn max_replicas(&self) -> Option<usize> {
        None
    }

    /// Brings the tool up for `env`. One-shot: daemons a sync needs, returning once
    /// they accept connections. Live: starts mirroring `env.source_root` to every
    /// replica (the bench times from the call until the replicas are identical).
    fn start(&mut self, env: &Env) -> Result<()>;

    /// One-shot tools: one complete sync of the source to every replica; returns when
    /// the tool reports it done (it is timed). Live tools: never called.
    fn sync(&mut self, env: &Env) -> Result<()>;

    /// Stops everything the tool started.
    fn stop(&mut self, env: &Env) -> Result<()>;
}
