//! CPU accounting of "all of a tool's processes": a cgroup v2 per tool run.
//!
//! Every process a tool starts is launched through [`Cgroup::command`], which moves the
//! launching shell into the cgroup before it `exec`s `ip netns exec <ns> <program>`, so
//! the program, everything it forks (rsync's receiver, sshd's session, lsyncd's
//! rsyncs, Syncthing's monitor and worker), and processes that exit before anyone can
//! look at them are all counted: the kernel's `cpu.stat` `usage_usec` covers user and
//! system time of every task that ever ran in the group.
//!
//! The unified hierarchy is found from `/proc/self/mounts` (pure v2 at
//! `/sys/fs/cgroup`, or the hybrid layout's `/sys/fs/cgroup/unified`). On drop every
//! process left in the group is killed (`cgroup.kill`) and the group removed.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use cd_testkit::netns::Host;

/// One cgroup under `<unified>/cdsync-bench/`.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// The mount point of the cgroup v2 hierarchy.
fn unified_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            return Ok(PathBuf::from(f[1]));
        }
    }
    bail!("no cgroup2 file system is mounted; the bench counts CPU time per tool with one")
}

impl Cgroup {
    /// Creates (or empties and reuses) the cgroup `name`.
    pub fn create(name: &str) -> Result<Self> {
        let parent = unified_root()?.join("cdsync-bench");
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(name);
        if path.exists() {
            kill_and_remove(&path)?;
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// `program` to be run in `host`'s network namespace, inside this cgroup. Add its
    /// arguments, environment and stdio to the returned command as usual.
    pub fn command(&self, host: &Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"echo $$ > "$0" || exit 125; ns=$1; shift; exec ip netns exec "$ns" "$@""#)
            .arg(self.path.join("cgroup.procs"))
            .arg(&host.ns)
            .arg(program);
        c
    }

    /// CPU time (user + system) of every task that ran in the group so far.
    pub fn usage(&self) -> Result<Duration> {
        let stat = fs::read_to_string(self.path.join("cpu.stat"))
            .with_context(|| format!("reading {}/cpu.stat", self.path.display()))?;
        let usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("cpu.stat has no usage_usec")?
            .trim()
            .parse::<u64>()
            .context("parsing usage_usec")?;
        Ok(Duration::from_micros(usec))
    }

    /// Kills every process in the group and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        kill(&self.path)
    }
}

fn kill(path: &Path) -> Result<()> {
    fs::write(path.join("cgroup.kill"), "1")
        .with_context(|| format!("writing {}/cgroup.kill", path.display()))?;
    let until = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(path.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()) {
        if Instant::now() > until {
            bail!("processes of {} did not die", path.display());
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn kill_and_remove(path: &Path) -> Result<()> {
    kill(path)?;
    // Removal can race the last exit's bookkeeping for a moment.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > until => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = kill_and_remove(&self.path) {
            eprintln!("bench: {e:#}");
        }
    }
}
