//! Syncthing (live; Debian bookworm's `syncthing` 1.19), set up the way an operator
//! sets up a one-way mirror of one directory to N machines.
//!
//! One instance per host (the source and every replica), each with its own home in
//! the work directory (`st-<host>`: keys, `config.xml`, index database). [`Tool::start`]:
//!
//! 1. `syncthing generate --home=<home> --no-default-folder` makes each instance's
//!    ECDSA key and certificate (a few milliseconds; it is part of the timed start,
//!    like everything an operator does before the first sync), and
//!    `syncthing serve --home=<home> --device-id` reads its device ID;
//! 2. the generated `config.xml` is replaced by one written here ([`config_xml`]):
//!    every device knows every other at its explicit address `tcp://<ip>:22000`
//!    (no discovery needed), and one folder `bench` at the host's root is shared with
//!    all of them — a full mesh, which is how Syncthing is meant to run: replicas
//!    serve each other the blocks they already have;
//! 3. the instances are started one after the other — the source first, then each
//!    replica once the previous instance listens on its sync port — as
//!    `syncthing serve --home=<home> --no-browser --no-restart --logflags=6` with
//!    `STNODEFAULTFOLDER=1 STNOUPGRADE=1 STMONITORED=1 STHASHING=minio HOME=<home>`;
//!    `start` returns when the last one listens (the bench then polls the replicas;
//!    Syncthing is never asked whether it is done).
//!
//! Why one after the other: every instance dials every peer as soon as it is up, and
//! a dial that finds no listener is retried only on Syncthing's reconnect schedule
//! (seen here: 20 s later). Started all at once (3 replicas), two replicas found the
//! source not listening yet and got it only 20 s later, so W1 measured that wait, and
//! which peers served which blocks changed from run to run. Started in order, each
//! new instance reaches every earlier one at once, so the full mesh exists from
//! the start, every run. The cost is Syncthing's own start-up (~0.6 s, most of it a
//! fixed-length hashing benchmark) once per instance instead of overlapped; the
//! source starts first, so its initial scan overlaps the replicas' start-ups.
//!
//! Folder settings (and why):
//!
//! - `type="sendonly"` on the source, `receiveonly` on the replicas: the one-way
//!   setup Syncthing offers. A replica refuses to push local changes back (it flags
//!   them instead), so the source stays the authority, as with every other tool here.
//! - `fsWatcherEnabled="true" fsWatcherDelayS="1"`: changes are picked up by the
//!   inotify watcher; 1 s is the smallest aggregation delay 1.19 accepts (the value is
//!   an integer there; `0.5` fails to load with `strconv.ParseInt`). The default is
//!   10 s, which would only make Syncthing look slower.
//! - `rescanIntervalS="3600"`: the default full rescan; the watcher does the work, and
//!   a periodic rescan in the middle of a measurement would only add noise.
//! - `ignorePerms="false"`: permission bits are carried (the bench compares them).
//!   Syncthing carries only the `0o777` bits; setuid/setgid/sticky are not part of its
//!   protocol — the bench's workloads use none of them.
//! - `markerName` stays the default `.stfolder`, which Syncthing creates in every
//!   folder root: [`Tool::ignore`] leaves it out of the comparison, and [`Tool::stop`]
//!   removes it from the source root (which later tools share).
//!
//! Options (and why): listen on `tcp://<ip>:22000` only; global and local discovery,
//! relays, NAT traversal, usage reporting (`urAccepted=-1`), crash reporting and
//! auto-upgrades all off — nothing may leave the bench network or wait on the
//! internet; `startBrowser=false`; `setLowPriority=false`: by default Syncthing
//! renices itself (nice 9, idle I/O class), which on the bench's shared cores would
//! make it lose CPU to nothing in particular and look slower than it is; every other
//! tool runs at normal priority, so Syncthing does too. The GUI/REST API listens on
//! `127.0.0.1:8384` inside each namespace (each has its own loopback) with an API key,
//! for inspecting a run by hand (`ip netns exec <ns> curl -H 'X-API-Key: …'`).
//!
//! Process model: `STMONITORED=1` runs the syncing process directly. Without it, 1.19
//! always forks a monitor process that relays the child's output and signals
//! (`--no-restart` only stops it from restarting the child); with it, the process the
//! bench SIGTERMs is the one that syncs, and `stop` knows it is gone when it has
//! exited. Syncthing's own startup (database open, a 0.5 s hashing benchmark) is part
//! of W1's time, as it is for an operator.
//!
//! `STHASHING=minio` names the SHA-256 implementation instead of letting each instance
//! pick one by racing both for a second at startup: with every instance starting at
//! once on the bench's two cores the race is decided by contention, not by the CPU,
//! and may pick Go 1.19's slower `crypto/sha256` (4–5× slower here uncontended). The
//! minio one is what the race picks on this hardware when run alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{Env, Style, Tool, terminate, write_file};
use cd_testkit::netns::Host;

/// Syncthing's sync (BEP) port, the same in every namespace.
const SYNC_PORT: u16 = 22000;
/// The GUI/REST port, on each namespace's own loopback.
const GUI_PORT: u16 = 8384;
/// The folder ID shared by every instance.
const FOLDER: &str = "bench";
/// The folder marker Syncthing creates in every folder root.
const MARKER: &str = ".stfolder";

/// See the module docs.
#[derive(Debug, Default)]
pub struct Syncthing {
    children: Vec<(String, Child)>,
}

impl Syncthing {
    pub fn new() -> Self {
        Self::default()
    }
}

/// One instance: where it runs, its folder root and home, and its device ID.
#[derive(Debug)]
struct Instance<'a> {
    host: &'a Host,
    root: PathBuf,
    home: PathBuf,
    id: String,
    source: bool,
}

/// Escapes `s` for an XML attribute or text node.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The complete `config.xml` of instance `me` of `all` (see the module docs for
/// every setting). Anything left out takes Syncthing's default.
fn config_xml(me: &Instance, all: &[Instance]) -> String {
    let kind = if me.source { "sendonly" } else { "receiveonly" };
    let mut s = String::from("<configuration version=\"36\">\n");
    s += &format!(
        "    <folder id=\"{FOLDER}\" label=\"{FOLDER}\" path=\"{}\" type=\"{kind}\" \
         rescanIntervalS=\"3600\" fsWatcherEnabled=\"true\" fsWatcherDelayS=\"1\" \
         ignorePerms=\"false\" autoNormalize=\"true\">\n",
        xml(&me.root.to_string_lossy())
    );
    s += "        <filesystemType>basic</filesystemType>\n";
    for d in all {
        s += &format!(
            "        <device id=\"{}\" introducedBy=\"\"></device>\n",
            d.id
        );
    }
    s += &format!("        <markerName>{MARKER}</markerName>\n");
    s += "    </folder>\n";
    for d in all {
        let address = if d.id == me.id {
            "dynamic".to_owned()
        } else {
            format!("tcp://{}:{SYNC_PORT}", d.host.ip)
        };
        s += &format!(
            "    <device id=\"{}\" name=\"{}\" compression=\"metadata\" introducer=\"false\">\n\
             \x20       <address>{address}</address>\n\
             \x20       <autoAcceptFolders>false</autoAcceptFolders>\n\
             \x20   </device>\n",
            d.id,
            xml(&d.host.name)
        );
    }
    s += &format!(
        "    <gui enabled=\"true\" tls=\"false\" debugging=\"false\">\n\
         \x20       <address>127.0.0.1:{GUI_PORT}</address>\n\
         \x20       <apikey>cdsync-bench-{}</apikey>\n\
         \x20   </gui>\n",
        xml(&me.host.name)
    );
    s += &format!(
        "    <options>\n\
         \x20       <listenAddress>tcp://{}:{SYNC_PORT}</listenAddress>\n\
         \x20       <globalAnnounceEnabled>false</globalAnnounceEnabled>\n\
         \x20       <localAnnounceEnabled>false</localAnnounceEnabled>\n\
         \x20       <relaysEnabled>false</relaysEnabled>\n\
         \x20       <natEnabled>false</natEnabled>\n\
         \x20       <urAccepted>-1</urAccepted>\n\
         \x20       <autoUpgradeIntervalH>0</autoUpgradeIntervalH>\n\
         \x20       <crashReportingEnabled>false</crashReportingEnabled>\n\
         \x20       <startBrowser>false</startBrowser>\n\
         \x20       <setLowPriority>false</setLowPriority>\n\
         \x20   </options>\n",
        me.host.ip
    );
    s += "</configuration>\n";
    s
}

impl Syncthing {
    /// `syncthing <args>` on `host` with the environment every invocation gets.
    fn command(env: &Env, host: &Host, home: &Path) -> std::process::Command {
        let mut c = env.command(host, "syncthing");
        c.env("STNODEFAULTFOLDER", "1")
            .env("STNOUPGRADE", "1")
            .env("STMONITORED", "1")
            .env("STHASHING", "minio")
            .env("HOME", home);
        c
    }

    /// Makes `home`'s key and certificate and returns the device ID.
    fn generate(env: &Env, host: &Host, home: &Path) -> Result<String> {
        let log = format!("syncthing-{}", host.name);
        let mut c = Self::command(env, host, home);
        c.arg("generate")
            .arg(format!("--home={}", home.display()))
            .arg("--no-default-folder");
        env.run_logged(c, &log)?;
        let mut c = Self::command(env, host, home);
        c.arg("serve")
            .arg(format!("--home={}", home.display()))
            .arg("--device-id");
        let out = c
            .output()
            .with_context(|| format!("reading the device ID of {}", home.display()))?;
        ensure!(
            out.status.success(),
            "syncthing --device-id failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            id.len() == 63 && id.split('-').count() == 8,
            "unexpected device ID `{id}` for {}",
            home.display()
        );
        Ok(id)
    }
}

/// Removes what Syncthing leaves in a folder root: the marker, a versions directory,
/// and temporary files (`.syncthing.*.tmp`, `~syncthing~*.tmp`) anywhere below.
fn clean_root(root: &Path) -> Result<()> {
    for name in [MARKER, ".stversions"] {
        let p = root.join(name);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && (name.starts_with(".syncthing.") || name.starts_with("~syncthing~"))
                && name.ends_with(".tmp")
            {
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
    }
    Ok(())
}

impl Tool for Syncthing {
    fn name(&self) -> &'static str {
        "syncthing"
    }

    fn style(&self) -> Style {
        Style::Live
    }

    fn packages(&self) -> &'static [&'static str] {
        &["syncthing"]
    }

    fn ignore(&self) -> &'static [&'static str] {
        &[MARKER]
    }

    fn start(&mut self, env: &Env) -> Result<()> {
        let hosts = std::iter::once((env.source, env.source_root.clone(), true))
            .chain(env.replicas.iter().map(|(h, r)| (*h, r.clone(), false)));
        let mut all = Vec::new();
        for (host, root, source) in hosts {
            let home = env.work.join(format!("st-{}", host.name));
            let id = Self::generate(env, host, &home)?;
            all.push(Instance {
                host,
                root,
                home,
                id,
                source,
            });
        }
        for me in &all {
            write_file(&me.home.join("config.xml"), &config_xml(me, &all))?;
        }
        // One after the other, each once the previous one listens: see the module docs.
        for me in &all {
            let mut c = Self::command(env, me.host, &me.home);
            c.arg("serve")
                .arg(format!("--home={}", me.home.display()))
                .args(["--no-browser", "--no-restart", "--logflags=6"]);
            let name = format!("syncthing-{}", me.host.name);
            let child = env.spawn_logged(c, &name)?;
            self.children.push((name.clone(), child));
            env.wait_listening(me.host, SYNC_PORT, Duration::from_secs(60))
                .with_context(|| {
                    format!(
                        "syncthing on {} did not come up:\n{}",
                        me.host.name,
                        env.log_tail(&name, 20)
                    )
                })?;
        }
        Ok(())
    }

    fn sync(&mut self, _env: &Env) -> Result<()> {
        anyhow::bail!("syncthing is a live tool; it has no sync command")
    }

    fn stop(&mut self, env: &Env) -> Result<()> {
        let mut first_err = None;
        for (name, child) in &mut self.children {
            if let Err(e) = terminate(child, Duration::from_secs(10)) {
                first_err.get_or_insert(e.context(format!("stopping {name}")));
            }
        }
        self.children.clear();
        // Only now that no instance can write there any more.
        clean_root(&env.source_root)?;
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_root_removes_only_syncthing_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join(".stfolder")).unwrap();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/.syncthing.x.html.tmp"), "t").unwrap();
        fs::write(r.join("a/.syncthing.keep"), "k").unwrap();
        fs::write(r.join("a/b/f.html"), "f").unwrap();
        clean_root(r).unwrap();
        assert!(!r.join(".stfolder").exists());
        assert!(!r.join("a/b/.syncthing.x.html.tmp").exists());
        assert!(r.join("a/.syncthing.keep").exists());
        assert!(r.join("a/b/f.html").exists());
    }
}
