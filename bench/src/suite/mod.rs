//! `bench suite`: cdsync side by side with the tools an operator would otherwise use,
//! on the same seeded workloads, in one run (see `bench/README.md`).
//!
//! - [`cd_testkit::netns`]: a network namespace per host, bridged, with interface byte
//!   counters and optional rate limits; [`cgroup`]: CPU time of all of a tool's
//!   processes.
//! - [`workload`]: the seeded W1 tree, the W2 mutation (and its exact undo), bursts.
//! - [`verify`]: replicas judged identical from outside every tool.
//! - [`tools`]: the tools, behind [`tools::Tool`].
//! - [`measure`]: one timed phase of one tool → a [`measure::Sample`].

pub mod cgroup;
pub mod install;
pub mod measure;
pub mod report;
pub mod run;
pub mod tools;
pub mod verify;
pub mod workload;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use self::cgroup::Cgroup;
use self::tools::{Env, Tool};
use self::workload::Tree;
use crate::args::Options;
use cd_testkit::netns::Net;

/// Every tool, in table order. `cdd`/`cdctl` are built only if cdsync is among them.
pub fn registry(names: Option<&[String]>, debug_daemon: bool) -> Result<Vec<Box<dyn Tool>>> {
    let wanted = |n: &str| names.is_none_or(|ns| ns.iter().any(|x| x == n));
    let mut v: Vec<Box<dyn Tool>> = Vec::new();
    if wanted("cdsync") || wanted("cdsync-live") {
        let (cdd, cdctl) = if debug_daemon {
            cd_testkit::build::debug_daemon()?
        } else {
            cd_testkit::build::release_daemon()?
        };
        v.push(Box::new(tools::cdsync::CdSync::manual(
            cdd.clone(),
            cdctl.clone(),
        )));
        v.push(Box::new(tools::cdsync::CdSync::realtime(cdd, cdctl)));
    }
    if wanted("rsyncd") {
        v.push(Box::new(tools::rsyncd::Rsyncd::new()));
    }
    if wanted("rsync-ssh") {
        v.push(Box::new(tools::rsync_ssh::RsyncSsh::new()));
    }
    if wanted("lsyncd") {
        v.push(Box::new(tools::lsyncd::Lsyncd::new()));
    }
    if wanted("syncthing") {
        v.push(Box::new(tools::syncthing::Syncthing::new()));
    }
    if wanted("unison") {
        v.push(Box::new(tools::unison::Unison::new()));
    }
    v.retain(|t| wanted(t.name()));
    if let Some(ns) = names {
        for n in ns {
            if !v.iter().any(|t| t.name() == n) {
                bail!("unknown tool `{n}`");
            }
        }
    }
    Ok(v)
}

const TRIAL_USAGE: &str = "\
usage: bench trial --tool NAME [--replicas N] [--files N] [--dir DIR] [--prefix P]
  one W1 + W2 run of one tool on a small tree, verified; for developing a tool adapter
  --prefix P: network namespaces are named P-<host> (default cdt), so that trials
              run side by side do not remove each other's";

/// `bench trial`: one W1 + W2 run of one tool, printed.
pub fn trial(args: &[String]) -> Result<()> {
    let mut o = Options::new(args, TRIAL_USAGE);
    let (mut tool, mut replicas, mut files, mut dir, mut prefix) = (
        None,
        2usize,
        500usize,
        PathBuf::from("/tmp/cdbench-trial"),
        "cdt".to_owned(),
    );
    while let Some(n) = o.next_name() {
        match n {
            "--tool" => tool = Some(o.value::<String>(n)?),
            "--replicas" => replicas = o.value(n)?,
            "--files" => files = o.value(n)?,
            "--dir" => dir = o.value(n)?,
            "--prefix" => prefix = o.value(n)?,
            _ => return Err(o.unknown(n)),
        }
    }
    let tool = tool.context("--tool is required")?;
    let tools = registry(Some(std::slice::from_ref(&tool)), false)?;
    for t in &tools {
        install::ensure_packages(t.packages())?;
    }
    let names: Vec<String> = (1..=replicas).map(|i| format!("r{i}")).collect();
    let mut hosts: Vec<&str> = vec!["src", "aux"];
    hosts.extend(names.iter().map(String::as_str));
    let net = Net::create(&prefix, &hosts)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let sc = run::Scale {
        w1: Tree {
            seed: 1,
            files,
            dirs: (files / 50).max(2),
            big: 1,
            big_size: 8 << 20,
            symlinks: 5,
        },
        limit: Duration::from_secs(300),
        limit_incremental: Duration::from_secs(300),
        ..run::Scale::smoke()
    };
    let src = dir.join("src");
    sc.w1.generate(&src)?;
    for mut t in tools {
        let (w1, w2, _) = run::initial_and_incremental(&net, &mut *t, &dir, &src, replicas, &sc)?;
        println!("{} {:?} W1: {w1}", t.name(), t.style());
        println!("{} {:?} W2: {w2}", t.name(), t.style());
        if !(w1.identical && w2.identical) {
            bail!(
                "{} left a replica different; see {}",
                t.name(),
                dir.join("work").join(t.name()).display()
            );
        }
    }
    Ok(())
}

/// Empty replica roots `dir/r1..rN` (removed and made again).
pub fn fresh_replicas(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    (1..=n)
        .map(|i| {
            let r = dir.join(format!("r{i}"));
            if r.exists() {
                fs::remove_dir_all(&r).with_context(|| format!("removing {}", r.display()))?;
            }
            fs::create_dir_all(&r)?;
            Ok(r)
        })
        .collect()
}

/// The environment of one tool run: hosts `src`, `aux`, `r1..`, the roots, and a
/// fresh work directory `work/<tool>`.
pub fn env<'a>(
    net: &'a Net,
    source_root: &Path,
    replica_roots: &[PathBuf],
    work: &Path,
    tool: &str,
    cgroup: &'a Cgroup,
) -> Result<Env<'a>> {
    let work = work.join(tool);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let replicas = replica_roots
        .iter()
        .enumerate()
        .map(|(i, r)| Ok((net.host(&format!("r{}", i + 1))?, r.clone())))
        .collect::<Result<Vec<_>>>()?;
    Ok(Env {
        net,
        source: net.host("src")?,
        source_root: source_root.to_path_buf(),
        replicas,
        aux: net.host("aux")?,
        work,
        cgroup,
    })
}
