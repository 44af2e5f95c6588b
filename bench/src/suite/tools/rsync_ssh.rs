//! rsync over ssh: the same push as [`super::rsyncd`], but each replica is reached
//! through its sshd, the way most operators run rsync (no daemon to configure, the
//! transport encrypted and authenticated by ssh).
//!
//! [`Tool::start`] makes keys and an sshd per replica host, all private to the run:
//!
//! - an ed25519 host key and an ed25519 client key in the work directory
//!   (`ssh-keygen -q -t ed25519 -N '' -f …`), the client's public key as the only
//!   line of `<work>/authorized_keys`;
//! - `<work>/sshd-rN.conf` (see [`sshd_config`]), and `/usr/sbin/sshd -D -e -f
//!   <work>/sshd-rN.conf` in the replica's namespace: `-D` keeps it in the
//!   foreground as our child (stoppable, and in the run's cgroup, with every session
//!   it forks), `-e` sends its log to stderr, which goes to `<work>/sshd-rN.log`.
//!   sshd wants its privilege-separation directory `/run/sshd`; it is made if absent;
//! - one `ssh … root@<ip> true` per replica, before anything is timed, so that a
//!   broken login fails the start rather than the first sync. That probe runs with
//!   `-v` and its log names the cipher the peers chose; with OpenSSH 9.2 on both ends
//!   and no cipher configured, that is `chacha20-poly1305@openssh.com` (printed).
//!
//! A sync is, on the source host, for every replica at once (an operator's cron job
//! fans out in parallel; see [`super::rsyncd`]):
//!
//! ```text
//! rsync -a --delete -e "ssh -i <work>/client_key -o StrictHostKeyChecking=no \
//!     -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR" \
//!     <source_root>/ root@<ip>:<replica root>/
//! ```
//!
//! `-a --delete` and no `-z` for the reasons given in [`super::rsyncd`]; ssh's own
//! compression is off by default and stays off. The ssh options only make a
//! throw-away host key acceptable without a prompt (`StrictHostKeyChecking`,
//! `UserKnownHostsFile`), make a failed login fail instead of asking for a password
//! (`BatchMode`) and keep the "Permanently added" notice out of the logs
//! (`LogLevel`); none changes the transfer. The cipher is ssh's default.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result};

use super::rsyncd::{run_all_logged, source_arg};
use super::{Env, Style, Tool, terminate, write_file};
use crate::suite::net::Host;

/// sshd's port (each replica has a namespace of its own).
const SSH_PORT: u16 = 22;

/// The sshd configuration for `host`: only what the bench needs, everything else at
/// sshd's defaults.
///
/// - `ListenAddress <ip>:22`: the bench network only;
/// - `HostKey`: the run's own key;
/// - `AuthorizedKeysFile`: the run's own file, so that root's real
///   `~/.ssh/authorized_keys` is neither used nor touched;
/// - `PermitRootLogin prohibit-password`: root (to write owners and every mode bit),
///   by key only; `PasswordAuthentication no`, `KbdInteractiveAuthentication no`;
/// - `UsePAM no`: no PAM session setup (nothing in the namespace needs it);
/// - `StrictModes no`: the work directory's modes are whatever the bench's are;
/// - `PidFile`: in the work directory, so that several sshds (and the machine's own)
///   do not fight over `/run/sshd.pid`.
fn sshd_config(env: &Env, host: &Host) -> String {
    let w = |name: &str| env.work.join(name).display().to_string();
    let mut s = String::new();
    let _ = writeln!(s, "Port {SSH_PORT}");
    let _ = writeln!(s, "ListenAddress {}:{SSH_PORT}", host.ip);
    let _ = writeln!(s, "HostKey {}", w("ssh_host_ed25519_key"));
    let _ = writeln!(s, "AuthorizedKeysFile {}", w("authorized_keys"));
    let _ = writeln!(s, "PermitRootLogin prohibit-password");
    let _ = writeln!(s, "PasswordAuthentication no");
    let _ = writeln!(s, "KbdInteractiveAuthentication no");
    let _ = writeln!(s, "UsePAM no");
    let _ = writeln!(s, "StrictModes no");
    let _ = writeln!(s, "PidFile {}", w(&format!("sshd-{}.pid", host.name)));
    s
}

/// The `ssh` command line rsync is given with `-e` (and the probe runs).
fn ssh_args(key: &Path) -> Vec<String> {
    vec![
        "-i".to_owned(),
        key.display().to_string(),
        "-o".to_owned(),
        "StrictHostKeyChecking=no".to_owned(),
        "-o".to_owned(),
        "UserKnownHostsFile=/dev/null".to_owned(),
        "-o".to_owned(),
        "BatchMode=yes".to_owned(),
        "-o".to_owned(),
        "LogLevel=ERROR".to_owned(),
    ]
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct RsyncSsh {
    sshds: Vec<Child>,
    key: PathBuf,
}

impl RsyncSsh {
    pub fn new() -> Self {
        Self::default()
    }

    /// `ssh-keygen` an ed25519 key pair at `path` (on the source host: it is only
    /// set-up, but every process of a tool goes through [`Env::command`]).
    fn keygen(env: &Env, path: &Path, log: &str) -> Result<()> {
        let mut c = env.command(env.source, "ssh-keygen");
        c.args(["-q", "-t", "ed25519", "-N", "", "-C", "cdsync-bench", "-f"])
            .arg(path);
        env.run_logged(c, log)
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
        let host_key = env.work.join("ssh_host_ed25519_key");
        self.key = env.work.join("client_key");
        Self::keygen(env, &host_key, "keygen")?;
        Self::keygen(env, &self.key, "keygen")?;
        let pubkey = env.work.join("client_key.pub");
        fs::copy(&pubkey, env.work.join("authorized_keys"))
            .with_context(|| format!("copying {}", pubkey.display()))?;

        let privsep = Path::new("/run/sshd");
        if !privsep.is_dir() {
            fs::create_dir_all(privsep).context("creating /run/sshd")?;
            fs::set_permissions(privsep, fs::Permissions::from_mode(0o755))?;
        }

        for (host, _) in &env.replicas {
            let name = format!("sshd-{}", host.name);
            let conf = env.work.join(format!("{name}.conf"));
            write_file(&conf, &sshd_config(env, host))?;
            let mut c = env.command(host, "/usr/sbin/sshd");
            c.arg("-D").arg("-e").arg("-f").arg(&conf);
            self.sshds.push(env.spawn_logged(c, &name)?);
        }
        for (host, _) in &env.replicas {
            env.wait_listening(host, SSH_PORT, Duration::from_secs(10))
                .with_context(|| {
                    format!(
                        "sshd on {}:\n{}",
                        host.name,
                        env.log_tail(&format!("sshd-{}", host.name), 20)
                    )
                })?;
        }

        // Log in once to every replica before anything is timed.
        let mut cipher = None;
        for (host, _) in &env.replicas {
            let name = format!("ssh-probe-{}", host.name);
            let mut c = env.command(env.source, "ssh");
            c.args(ssh_args(&self.key))
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
            .chain(ssh_args(&self.key))
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
        for c in &mut self.sshds {
            terminate(c, Duration::from_secs(5))?;
        }
        self.sshds.clear();
        Ok(())
    }
}
