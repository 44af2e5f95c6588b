//! cdsync itself: a master on the aux host, `node1` on the source, one node per
//! replica, started exactly as an operator would (`cd_testkit::cluster`), each daemon
//! in its host's namespace and the run's cgroup.
//!
//! - [`CdSync::manual`] (one-shot): the content set has `mode = "manual"`; a sync is
//!   `cdctl sync`, which returns when every target has reported.
//! - [`CdSync::realtime`] (live, `cdsync-live` in the tables): `mode = "realtime"` with
//!   the default capture (eBPF where the kernel allows it); starting the cluster starts
//!   the initial reconcile.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cd_testkit::cluster::{Cluster, ClusterSpec, MASTER, Placement};

use super::{Env, Style, Tool};
use cd_testkit::netns::Host;

/// See the module docs.
#[derive(Debug)]
pub struct CdSync {
    cdd: PathBuf,
    cdctl: PathBuf,
    live: bool,
    cluster: Option<Cluster>,
}

impl CdSync {
    /// Manual mode: driven by `cdctl sync`.
    pub fn manual(cdd: PathBuf, cdctl: PathBuf) -> Self {
        Self {
            cdd,
            cdctl,
            live: false,
            cluster: None,
        }
    }

    /// Real-time mode.
    pub fn realtime(cdd: PathBuf, cdctl: PathBuf) -> Self {
        Self {
            live: true,
            ..Self::manual(cdd, cdctl)
        }
    }
}

fn placement(env: &Env, host: &Host) -> Placement {
    let probe = env.command(host, "true");
    let mut launcher = vec![probe.get_program().to_owned()];
    // Everything but the trailing program (`true`): the cgroup-and-namespace prefix.
    let args: Vec<_> = probe.get_args().map(ToOwned::to_owned).collect();
    launcher.extend(args[..args.len() - 1].iter().cloned());
    Placement {
        ip: host.ip.into(),
        launcher,
    }
}

impl Tool for CdSync {
    fn name(&self) -> &'static str {
        if self.live { "cdsync-live" } else { "cdsync" }
    }

    fn style(&self) -> Style {
        if self.live {
            Style::Live
        } else {
            Style::OneShot
        }
    }

    fn packages(&self) -> &'static [&'static str] {
        &[]
    }

    fn start(&mut self, env: &Env) -> Result<()> {
        let mut spec = ClusterSpec::new(1 + env.replicas.len(), &env.work, &self.cdd, &self.cdctl);
        spec.mode = Some(if self.live { "realtime" } else { "manual" });
        spec.sync_timeout = Duration::from_secs(3600);
        spec.startup_timeout = Duration::from_secs(60);
        spec.placements
            .insert(MASTER.to_owned(), placement(env, env.aux));
        spec.placements
            .insert("node1".to_owned(), placement(env, env.source));
        spec.roots
            .insert("node1".to_owned(), env.source_root.clone());
        for (i, (host, root)) in env.replicas.iter().enumerate() {
            let name = format!("node{}", i + 2);
            spec.placements.insert(name.clone(), placement(env, host));
            spec.roots.insert(name, root.clone());
        }
        self.cluster = Some(Cluster::start(spec).context("starting the cdsync cluster")?);
        Ok(())
    }

    fn sync(&mut self, _env: &Env) -> Result<()> {
        let c = self.cluster.as_ref().context("cdsync is not started")?;
        let out = c.try_sync()?;
        ensure!(
            out.exit_code == 0,
            "cdctl sync failed (exit {}): {}\n{}",
            out.exit_code,
            out.stderr,
            c.diagnostics()
        );
        Ok(())
    }

    fn stop(&mut self, _env: &Env) -> Result<()> {
        // Dropping the cluster stops every daemon (SIGTERM, then SIGKILL).
        self.cluster = None;
        Ok(())
    }
}
