//! A private OpenSSH server on bench hosts, for the tools that reach a replica over
//! ssh (`rsync-ssh`, Unison). Self-contained: every key and config lives in a directory of
//! the tool's work directory, nothing of the system's ssh setup is read or changed
//! (except that `/run/sshd`, sshd's privilege-separation directory, must exist).
//!
//! - keys: one ed25519 host key shared by every host of the run, one ed25519 client
//!   key whose public half is the only authorized key (`ssh-keygen -t ed25519 -N ""`);
//! - `sshd_config` per host: `Port 22`, `ListenAddress <host ip>`, the host key,
//!   `AuthorizedKeysFile <dir>/authorized_keys`, `PermitRootLogin prohibit-password`,
//!   `PasswordAuthentication no`, `KbdInteractiveAuthentication no`, `UsePAM no`,
//!   `StrictModes no` (the work directory's modes are not sshd's business),
//!   `PidFile <dir>/sshd-<host>.pid`; started as `/usr/sbin/sshd -D -e -f <cfg>` (in the
//!   foreground, logging to stderr, which goes to the work directory's log) in the
//!   host's namespace and the run's cgroup, so every session sshd forks is counted;
//! - the client side: [`Sshd::ssh_args`] — `-F /dev/null` (no user or system config),
//!   the client key, a `known_hosts` of the bench hosts with `StrictHostKeyChecking
//!   yes`, `BatchMode yes`. Cipher, MACs and compression are OpenSSH's defaults (no
//!   compression), as an operator's would be.

use std::fs;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Env, terminate, write_file};
use cd_testkit::netns::Host;

/// The port sshd listens on in every namespace.
pub const SSH_PORT: u16 = 22;

/// Running sshds and the client's files; see the module docs.
#[derive(Debug)]
pub struct Sshd {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Sshd {
    /// Makes keys and configs in `<work>/ssh` and starts an sshd on each of `hosts`,
    /// returning when all of them accept connections.
    pub fn start(env: &Env, hosts: &[&Host]) -> Result<Self> {
        let dir = env.work.join("ssh");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // sshd refuses to start without its privilege-separation directory.
        fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        for key in ["host_ed25519", "client_ed25519"] {
            let mut c = env.command(env.source, "ssh-keygen");
            c.args(["-q", "-t", "ed25519", "-N", "", "-C", "cdsync-bench", "-f"])
                .arg(dir.join(key));
            env.run_logged(c, "ssh-keygen")?;
        }
        let client_pub = fs::read_to_string(dir.join("client_ed25519.pub"))?;
        write_file(&dir.join("authorized_keys"), &client_pub)?;
        let host_pub = fs::read_to_string(dir.join("host_ed25519.pub"))?;
        let host_pub = host_pub.split_whitespace().take(2).collect::<Vec<_>>();
        let known: String = hosts
            .iter()
            .map(|h| format!("{} {}\n", h.ip, host_pub.join(" ")))
            .collect();
        write_file(&dir.join("known_hosts"), &known)?;

        let mut me = Self {
            dir: dir.clone(),
            children: Vec::new(),
        };
        for h in hosts {
            let cfg = dir.join(format!("sshd_config-{}", h.name));
            write_file(
                &cfg,
                &format!(
                    "Port {SSH_PORT}\n\
                     ListenAddress {ip}\n\
                     HostKey {dir}/host_ed25519\n\
                     AuthorizedKeysFile {dir}/authorized_keys\n\
                     PermitRootLogin prohibit-password\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     UseDNS no\n\
                     PrintMotd no\n\
                     PidFile {dir}/sshd-{name}.pid\n",
                    ip = h.ip,
                    dir = dir.display(),
                    name = h.name,
                ),
            )?;
            let mut c = env.command(h, "/usr/sbin/sshd");
            c.args(["-D", "-e", "-f"]).arg(&cfg);
            let name = format!("sshd-{}", h.name);
            let child = env.spawn_logged(c, &name)?;
            me.children.push((name, child));
        }
        for h in hosts {
            env.wait_listening(h, SSH_PORT, Duration::from_secs(30))
                .with_context(|| {
                    format!(
                        "sshd on {} did not come up:\n{}",
                        h.name,
                        env.log_tail(&format!("sshd-{}", h.name), 20)
                    )
                })?;
        }
        Ok(me)
    }

    /// The ssh client options that reach these servers as root (for `ssh`, or a
    /// tool's `-e`/`-sshargs`); no word contains white space.
    pub fn ssh_args(&self) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.dir.join("client_ed25519").display().to_string(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
        ]
    }

    /// Stops every sshd (and with it their sessions).
    pub fn stop(&mut self) -> Result<()> {
        let mut first_err = None;
        for (name, child) in &mut self.children {
            if let Err(e) = terminate(child, Duration::from_secs(5)) {
                first_err.get_or_insert(e.context(format!("stopping {name}")));
            }
        }
        self.children.clear();
        first_err.map_or(Ok(()), Err)
    }
}
