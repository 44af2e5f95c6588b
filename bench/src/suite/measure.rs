//! One timed phase of one tool, measured from outside it.
//!
//! - wall time: one-shot tools from the sync command until it returns; live tools from
//!   the start (W1) or the first change (W2) until every replica is found identical
//!   ([`verify::wait_identical`]).
//! - bytes: what every host's interface sent during the phase (`wire_bytes`) and what
//!   the source's sent (`source_uplink_bytes`), from the kernel's counters.
//! - CPU: the run's cgroup's `usage_usec` over the phase.
//! - identical/missing: [`verify`] after the phase.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::tools::{Env, Style, Tool};
use super::verify::{self, Converged};
use super::workload::{Mutation, Tree};

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct Sample {
    pub wall: Duration,
    pub wire_bytes: u64,
    pub uplink_bytes: u64,
    pub cpu: Duration,
    pub identical: bool,
    pub missing: usize,
    /// The first differences, when not identical.
    pub diffs: Vec<String>,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} s, wire {} (source {}), cpu {:.2} s, {}",
            self.wall.as_secs_f64(),
            cd_testkit::human_bytes(self.wire_bytes),
            cd_testkit::human_bytes(self.uplink_bytes),
            self.cpu.as_secs_f64(),
            if self.identical {
                "identical".to_owned()
            } else {
                format!(
                    "NOT identical ({} missing; {})",
                    self.missing,
                    self.diffs.first().map_or("", String::as_str)
                )
            }
        )
    }
}

/// Counters at one instant.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    wire: u64,
    uplink: u64,
    cpu: Duration,
}

fn mark(env: &Env) -> Result<Mark> {
    Ok(Mark {
        wire: env.net.total_tx_bytes()?,
        uplink: env.net.tx_bytes(env.source)?,
        cpu: env.cgroup.usage()?,
        at: Instant::now(),
    })
}

fn sample(env: &Env, from: Mark, wall: Duration, c: &Converged) -> Result<Sample> {
    let to = mark(env)?;
    Ok(Sample {
        wall,
        wire_bytes: to.wire - from.wire,
        uplink_bytes: to.uplink - from.uplink,
        cpu: to.cpu.saturating_sub(from.cpu),
        identical: c.identical(),
        missing: c.missing,
        diffs: c.diffs.clone(),
    })
}

fn replica_roots(env: &Env) -> Vec<PathBuf> {
    env.replicas.iter().map(|(_, r)| r.clone()).collect()
}

/// Waits for a live tool and turns the wait into a sample.
fn live_wait(
    env: &Env,
    tool: &dyn Tool,
    from: Mark,
    hot: &[(PathBuf, u64, u64)],
    limit: Duration,
) -> Result<Sample> {
    let c = verify::wait_identical(
        from.at,
        &env.source_root,
        &replica_roots(env),
        tool.ignore(),
        hot,
        limit,
    )?;
    let wall = c.last().unwrap_or_else(|| from.at.elapsed());
    sample(env, from, wall, &c)
}

/// Times a one-shot sync and verifies it.
fn one_shot(env: &Env, tool: &mut dyn Tool) -> Result<Sample> {
    let from = mark(env)?;
    tool.sync(env)?;
    let wall = from.at.elapsed();
    let c = verify::check_now(&env.source_root, &replica_roots(env), tool.ignore())?;
    sample(env, from, wall, &c)
}

/// W1 (or W4): the first sync to empty replicas. Leaves the tool running.
pub fn initial(tool: &mut dyn Tool, env: &Env, limit: Duration) -> Result<Sample> {
    match tool.style() {
        Style::OneShot => {
            tool.start(env)?;
            one_shot(env, tool)
        }
        Style::Live => {
            let from = mark(env)?;
            tool.start(env)?;
            live_wait(env, tool, from, &[], limit)
        }
    }
}

/// W2's outcome: the sample and what was changed (for the undo).
#[derive(Debug)]
pub struct Incremental {
    pub sample: Sample,
    pub mutation: Mutation,
}

/// W2: mutate the source of a tool that has done W1, and sync (one-shot) or wait.
pub fn incremental(
    tool: &mut dyn Tool,
    env: &Env,
    tree: &Tree,
    limit: Duration,
) -> Result<Incremental> {
    match tool.style() {
        Style::OneShot => {
            let mutation = tree.mutate(&env.source_root)?;
            Ok(Incremental {
                sample: one_shot(env, tool)?,
                mutation,
            })
        }
        Style::Live => {
            let from = mark(env)?;
            let mutation = tree.mutate(&env.source_root)?;
            Ok(Incremental {
                sample: live_wait(env, tool, from, &mutation.regions, limit)?,
                mutation,
            })
        }
    }
}

/// A change made by `change` on the source of a running live tool, timed until every
/// replica is identical again; returns the sample and what `change` returned (bytes).
pub fn live_change(
    env: &Env,
    tool: &dyn Tool,
    limit: Duration,
    change: impl FnOnce(&std::path::Path) -> Result<u64>,
) -> Result<(Sample, u64)> {
    let from = mark(env)?;
    let bytes = change(&env.source_root)?;
    Ok((live_wait(env, tool, from, &[], limit)?, bytes))
}
