//! lsyncd 2.2.3: a live mirror, inotify on the source driving rsync to each replica.
//!
//! [`Tool::start`] does, in order:
//!
//! 1. raises the kernel's inotify limits where they are below what ~10,000 watched
//!    directories and the bursts need ([`raise_inotify_limits`]; what it changes it
//!    prints);
//! 2. starts an rsync daemon on every replica host, exactly as the `rsyncd` adapter
//!    does ([`RsyncDaemons`]), as lsyncd's rsync targets;
//! 3. writes `<work>/lsyncd.lua` ([`config`]) and starts, on the **source** host
//!    (lsyncd watches the source and runs the rsyncs from there),
//!
//!    ```text
//!    lsyncd -nodaemon <work>/lsyncd.lua
//!    ```
//!
//! lsyncd begins with a full `rsync -r --delete …` to every target (its "startup
//! sync"), then mirrors every change it sees. The bench times W1 from `start` until
//! every replica is identical, so that initial transfer is part of W1.
//!
//! The configuration is lsyncd's stock `default.rsync` layer, one `sync` per replica,
//! with the smallest delay lsyncd accepts:
//!
//! ```lua
//! settings {
//!     logfile = "<work>/lsyncd-events.log",
//!     statusFile = "<work>/lsyncd.status",
//!     nodaemon = true,
//!     maxProcesses = <replicas>,    -- one rsync per replica at a time, all at once
//! }
//! sync {
//!     default.rsync,
//!     source = "<source root>",
//!     target = "rsync://<replica ip>/bench/",
//!     delay = 0,
//!     rsync = { archive = true },
//! }
//! ```
//!
//! - `delay = 0`: lsyncd 2.2.3 accepts any number ≥ 0 (its check is
//!   `type(delay) == 'number' and delay >= 0`); the default is 15 s, which would only
//!   measure the setting. With 0 a change is shipped as soon as lsyncd has read its
//!   event; whatever happens while that rsync runs is collected and shipped by the
//!   next one (`maxProcesses` per sync is 1). `maxDelays` stays at its default: it only
//!   matters for a nonzero delay.
//! - `rsync = { archive = true }`: `-a`'s flags (`-rlptgoD`), as the `rsyncd` adapter
//!   uses; lsyncd merges the table with its own defaults (`links`, `times`,
//!   `protect_args`), so the rsyncs run with `-slptgoD -r`. No `compress`, as in
//!   `rsyncd` (lsyncd 2.2.3 does not compress by default either). `delete` is lsyncd's
//!   default (`true`: `--delete` at startup and for changes).
//! - no `insist`: if a target cannot be reached at startup, lsyncd fails at once and
//!   says why, rather than retrying quietly while the bench waits.
//! - `default.rsync` treats a rename as a delete and a create (only `rsyncssh` turns
//!   moves into `mv` on the target); that is lsyncd's stock behavior and is measured
//!   as such.
//!
//! [`Tool::stop`] ends lsyncd (SIGTERM, then SIGKILL), then the daemons.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result};

use super::rsyncd::{RsyncDaemons, module_url};
use super::{Env, Style, Tool, terminate, write_file};

/// The inotify limits lsyncd needs at least, with room for the other watchers on the
/// machine (the limits are per user, and everything here runs as root):
///
/// - `max_user_watches`: lsyncd adds one watch per source directory; the full-size
///   tree has ~10,000, Syncthing (if it ran before on this machine) may hold more;
/// - `max_user_instances`: lsyncd needs one, but the machine's other root processes
///   count too, and the default 128 is easily taken;
/// - `max_queued_events`: a burst of many small files queues several events per file
///   (create, close-write, attrib) faster than lsyncd's Lua event loop reads them; on
///   an overflow lsyncd throws away its state and starts over with a full sync, which
///   would measure the limit rather than lsyncd. The default 16,384 is less than a
///   10,000-file burst can queue.
pub const INOTIFY_MINIMUMS: &[(&str, u64)] = &[
    ("max_user_watches", 524_288),
    ("max_user_instances", 1_024),
    ("max_queued_events", 1_048_576),
];

/// Raises every `/proc/sys/fs/inotify/<name>` below its [`INOTIFY_MINIMUMS`] value to
/// that value (never lowers one), printing each change. The limits are the machine's
/// (not per namespace); they are left raised after the run.
pub fn raise_inotify_limits() -> Result<()> {
    for (name, min) in INOTIFY_MINIMUMS {
        let p = Path::new("/proc/sys/fs/inotify").join(name);
        let now: u64 = fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {}", p.display()))?;
        if now < *min {
            fs::write(&p, min.to_string())
                .with_context(|| format!("raising {} to {min}", p.display()))?;
            eprintln!("bench: lsyncd: sysctl fs.inotify.{name}: {now} -> {min}");
        }
    }
    Ok(())
}

/// `s` as a Lua string literal.
fn lua_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// lsyncd's configuration for `env`; see the module docs.
pub fn config(env: &Env) -> String {
    let w = |name: &str| lua_str(&env.work.join(name).display().to_string());
    let mut s = String::new();
    let _ = writeln!(s, "settings {{");
    let _ = writeln!(s, "    logfile = {},", w("lsyncd-events.log"));
    let _ = writeln!(s, "    statusFile = {},", w("lsyncd.status"));
    let _ = writeln!(s, "    nodaemon = true,");
    let _ = writeln!(s, "    maxProcesses = {},", env.replicas.len());
    let _ = writeln!(s, "}}");
    for (host, _) in &env.replicas {
        let _ = writeln!(s, "sync {{");
        let _ = writeln!(s, "    default.rsync,");
        let _ = writeln!(
            s,
            "    source = {},",
            lua_str(&env.source_root.display().to_string())
        );
        let _ = writeln!(s, "    target = {},", lua_str(&module_url(host)));
        let _ = writeln!(s, "    delay = 0,");
        let _ = writeln!(s, "    rsync = {{ archive = true }},");
        let _ = writeln!(s, "}}");
    }
    s
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Lsyncd {
    daemons: Option<RsyncDaemons>,
    lsyncd: Option<Child>,
}

impl Lsyncd {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Tool for Lsyncd {
    fn name(&self) -> &'static str {
        "lsyncd"
    }

    fn style(&self) -> Style {
        Style::Live
    }

    fn packages(&self) -> &'static [&'static str] {
        &["lsyncd", "rsync"]
    }

    fn start(&mut self, env: &Env) -> Result<()> {
        raise_inotify_limits()?;
        self.daemons = Some(RsyncDaemons::start(env)?);
        let cfg = env.work.join("lsyncd.lua");
        write_file(&cfg, &config(env))?;
        let mut c = env.command(env.source, "lsyncd");
        c.arg("-nodaemon").arg(&cfg);
        self.lsyncd = Some(env.spawn_logged(c, "lsyncd")?);
        Ok(())
    }

    fn sync(&mut self, _env: &Env) -> Result<()> {
        anyhow::bail!("lsyncd is a live tool; the bench never asks it to sync")
    }

    fn stop(&mut self, _env: &Env) -> Result<()> {
        if let Some(mut c) = self.lsyncd.take() {
            terminate(&mut c, Duration::from_secs(5))?;
        }
        if let Some(mut d) = self.daemons.take() {
            d.stop()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_strings_are_quoted() {
        assert_eq!(lua_str("/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(lua_str(r#"x"y\z"#), r#""x\"y\\z""#);
    }
}
