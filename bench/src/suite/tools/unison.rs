//! Unison (one-shot; Debian bookworm's `unison` 2.52), where it fits: a two-way
//! synchroniser an operator might run from cron to keep N machines in line with one.
//! Unison pairs exactly two roots, so a sync is one Unison run per replica, all at
//! once, each from the source host over ssh to the replica.
//!
//! [`Tool::start`] starts a private sshd on every replica host ([`super::sshd`]) and
//! makes each pair's archive directories. [`Tool::sync`] runs, for every replica `rN`
//! in parallel, on the source host:
//!
//! ```text
//! UNISON=<work>/unison-home-rN unison <source root> ssh://root@<ip>/<replica root>
//!     -batch -auto -ui text -log=false -times -perms 0o7777 -links true
//!     -prefer <source root> -confirmbigdel=false
//!     -sshargs "<Sshd::ssh_args>" -servercmd "env UNISON=<work>/unison-remote-rN unison"
//! ```
//!
//! and returns when every run has exited with status 0 (anything else fails the sync,
//! quoting the run's log).
//!
//! Why each setting:
//!
//! - `UNISON=…`, `-servercmd "env UNISON=… unison"`: Unison keeps an archive (its
//!   memory of the last synchronised state) per pair of roots on both sides, in
//!   `$UNISON` (default `~/.unison`). Both ends run on the same machine here, with the
//!   same host name, so they would compute the same archive file name: each end, and
//!   each replica's pair, gets a directory of its own in the work directory, and
//!   nothing is written to the root's home.
//! - `-batch -auto -ui text`: no questions (cron); `-log=false`: the run's output goes
//!   to the work directory's log anyway.
//! - `-times`: carry modification times (so the next run's fast check, which trusts
//!   size + mtime + inode, stays valid on the replica; the bench does not compare
//!   mtimes). `-perms 0o7777`: carry every permission bit; Unison's default `0o1777`
//!   leaves out setuid/setgid. `-links true`: symlinks as symlinks.
//! - `-prefer <source root>`: should a replica ever differ in a way Unison calls a
//!   conflict, the source wins — the one-way intent. `-confirmbigdel=false`: a
//!   replica that loses most of its files is not a question to ask in batch mode.
//! - ssh, not Unison's unauthenticated `-socket` mode: that is what an operator uses
//!   across machines. Deltas use Unison's built-in rsync-like transfer (on by
//!   default); ssh compression is off (OpenSSH's default); renamed files are copied
//!   on the replica from an identical file already there (`xferbycopying`, default).

use std::fs;
use std::path::PathBuf;
use std::thread;

use anyhow::{Context, Result, anyhow};

use super::sshd::Sshd;
use super::{Env, Style, Tool};

/// See the module docs.
#[derive(Debug, Default)]
pub struct Unison {
    sshd: Option<Sshd>,
}

impl Unison {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The local (source-side) and remote (replica-side) archive directories of the
/// pair with replica `i` (from 0).
fn archives(env: &Env, i: usize) -> (PathBuf, PathBuf) {
    (
        env.work.join(format!("unison-home-r{}", i + 1)),
        env.work.join(format!("unison-remote-r{}", i + 1)),
    )
}

impl Tool for Unison {
    fn name(&self) -> &'static str {
        "unison"
    }

    fn style(&self) -> Style {
        Style::OneShot
    }

    fn packages(&self) -> &'static [&'static str] {
        &["unison", "openssh-server", "openssh-client"]
    }

    fn start(&mut self, env: &Env) -> Result<()> {
        for i in 0..env.replicas.len() {
            let (local, remote) = archives(env, i);
            for d in [local, remote] {
                fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        let hosts: Vec<_> = env.replicas.iter().map(|(h, _)| *h).collect();
        self.sshd = Some(Sshd::start(env, &hosts)?);
        Ok(())
    }

    fn sync(&mut self, env: &Env) -> Result<()> {
        let sshd = self.sshd.as_ref().context("unison is not started")?;
        let sshargs = sshd.ssh_args().join(" ");
        let src = env.source_root.display().to_string();
        thread::scope(|s| {
            let runs: Vec<_> = env
                .replicas
                .iter()
                .enumerate()
                .map(|(i, (host, root))| {
                    let (local, remote) = archives(env, i);
                    let mut c = env.command(env.source, "unison");
                    c.env("UNISON", &local)
                        .arg(&src)
                        .arg(format!("ssh://root@{}/{}", host.ip, root.display()))
                        .args(["-batch", "-auto", "-ui", "text", "-log=false"])
                        .args(["-times", "-perms", "0o7777", "-links", "true"])
                        .args(["-prefer", &src, "-confirmbigdel=false"])
                        .args(["-sshargs", &sshargs])
                        .arg("-servercmd")
                        .arg(format!("env UNISON={} unison", remote.display()));
                    let name = format!("unison-{}", host.name);
                    s.spawn(move || env.run_logged(c, &name))
                })
                .collect();
            let mut first_err = None;
            for r in runs {
                let r = r
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a unison thread panicked")));
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }

    fn stop(&mut self, _env: &Env) -> Result<()> {
        match self.sshd.take() {
            Some(mut s) => s.stop(),
            None => Ok(()),
        }
    }
}
