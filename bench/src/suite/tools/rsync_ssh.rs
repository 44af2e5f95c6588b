//! rsync over ssh: the same push as [`super::rsyncd`], but each replica is reached
//! through its sshd, the way most operators run rsync (no daemon to configure, the
//! transport encrypted and authenticated by ssh).
//!
//! [`Tool::start`] starts a private sshd per replica host ([`super::sshd`], shared
//! with Unison: keys, configs and `known_hosts` of the run's own), then runs
//! one `ssh … root@<ip> true` per replica, before anything is timed, so that a
//!   broken login fails the start rather than the first sync. That probe runs with
//!   `-v` and its log names the cipher the peers chose; with OpenSSH 9.2 on both ends
//!   and no cipher configured, that is `chacha20-poly1305@openssh.com` (printed).
//!
//! A sync is, on the source host, for every replica at once (an operator's cron job
//! fans out in parallel; see [`super::rsyncd`]):
//!
//! ```text
//! rsync -a --delete -e "ssh -F /dev/null -i <work>/ssh/client_ed25519 \
//!     -o UserKnownHostsFile=<work>/ssh/known_hosts -o StrictHostKeyChecking=yes \
//!     -o BatchMode=yes" <source_root>/ root@<ip>:<replica root>/
//! ```
//!
//! `-a --delete` and no `-z` for the reasons given in [`super::rsyncd`]; ssh's own
//! compression is off by default and stays off. The ssh options only pin the run's
//! own keys and make a failed login fail instead of asking for a password; none
//! changes the transfer. The cipher is ssh's default.

use std::fs;
use std::process::Command;

use anyhow::Result;

use super::rsyncd::{run_all_logged, source_arg};
use super::sshd::Sshd;
use super::{Env, Style, Tool};

/// See the module docs.
#[derive(Debug, Default)]
pub struct RsyncSsh {
    sshd: Option<Sshd>,
}

impl RsyncSsh {
    pub fn new() -> Self {
        Self::default()
    }

    fn ssh_args(&self) -> Vec<String> {
        self.sshd.as_ref().map(Sshd::ssh_args).unwrap_or_default()
    }
}

impl Tool for RsyncSsh {
    fn name(&self) -> &'static str {
        "rsync-ssh"
    }

    fn style(&self) -> Style {
        Style::OneShot
    }

    fn packages(&self) -> &'static [&'static str] {
        &["rsync", "openssh-server", "openssh-client"]
    }

    fn start(&mut self, env: &Env) -> Result<()> {
        let hosts: Vec<_> = env.replicas.iter().map(|(h, _)| *h).collect();
        self.sshd = Some(Sshd::start(env, &hosts)?);
        // Log in once to every replica before anything is timed.
        let mut cipher = None;
        for (host, _) in &env.replicas {
            let name = format!("ssh-probe-{}", host.name);
            let mut c = env.command(env.source, "ssh");
            c.args(self.ssh_args())
                .arg("-v")
                .arg(format!("root@{}", host.ip))
                .arg("true");
            env.run_logged(c, &name)?;
            let log = fs::read_to_string(env.work.join(format!("{name}.log")))?;
            cipher = log.lines().find_map(|l| {
                l.split_once("kex: server->client cipher: ")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .map(str::to_owned)
            });
        }
        if let Some(c) = cipher {
            eprintln!("bench: rsync-ssh: ssh negotiated cipher {c}");
        }
        Ok(())
    }

    fn sync(&mut self, env: &Env) -> Result<()> {
        let rsh = std::iter::once("ssh".to_owned())
            .chain(self.ssh_args())
            .collect::<Vec<_>>()
            .join(" ");
        let cmds: Vec<(Command, String)> = env
            .replicas
            .iter()
            .map(|(host, root)| {
                let mut c = env.command(env.source, "rsync");
                c.arg("-a")
                    .arg("--delete")
                    .arg("-e")
                    .arg(&rsh)
                    .arg(source_arg(env))
                    .arg(format!("root@{}:{}/", host.ip, root.display()));
                (c, format!("rsync-{}", host.name))
            })
            .collect();
        run_all_logged(env, cmds)
    }

    fn stop(&mut self, _env: &Env) -> Result<()> {
        if let Some(mut s) = self.sshd.take() {
            s.stop()?;
        }
        Ok(())
    }
}
