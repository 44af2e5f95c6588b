//! The sans-IO engine of cdsync.
//!
//! Everything here is pure computation over values: it never reads a clock, touches a
//! file or opens a socket. The daemon (`cd-daemon`) scans trees and talks to peers, then
//! hands what it saw to this crate and carries out what comes back.
//!
//! - [`path`]: [`RelPath`](path::RelPath), the only path type that crosses the network.
//!   It is relative, normalised, free of `..`, `.`, empty and NUL components; every
//!   constructor validates, so holding one is proof of those invariants.
//! - [`manifest`]: what a tree holds ([`Entry`](manifest::Entry), [`Manifest`](manifest::Manifest)),
//!   the unit both the scanner and (later) the kernel watcher produce.
//! - [`plan`]: the reconcile planner. Given what the source has and what a replica has,
//!   it says which file contents must travel and the ordered steps that turn the replica
//!   into the source without exposing half-applied state (stage everything, then
//!   rename in dependency order; content the replica already holds is moved or copied
//!   locally instead of re-sent).
//! - [`event`]: one file-system change as a capture backend decodes it.
//! - [`coalesce`]: the per-path state machine that turns events into ready, safely
//!   ordered batches of path changes (close-after-write, debounce, rename pairing).
//! - [`filter`]: per content set include/exclude patterns and the command mask
//!   (create/update/delete/move/erase), for incremental changes and full reconciles.
//! - [`delta`]: the rsync-style delta engine: block signatures with a rolling and a
//!   strong checksum, the delta search, patches and their application, and the
//!   whole-file-or-delta decision.
//! - [`changeset`]: a numbered batch of changes from one origin; the carrier that both
//!   manual sync (a full manifest) and real-time capture (incremental operations) feed.
//! - [`topology`]: the Region → Group → Server tree with capacity weights, validated
//!   from config; the [`LinkClass`](topology::LinkClass) of a link (same group, same
//!   region, international) and what "nearest" means.
//! - [`route`]: the distribution tree of a (content set, source) from topology, health
//!   and manual routes: one copy per group of the source's region and one per other
//!   region, heads forward within their group under a fan-out bound, degraded and down
//!   nodes never relay, failover by recomputation. The master pushes each node its
//!   children.
//! - [`catchup`]: when a recovered node catches up (at once, at a scheduled time, on
//!   command), and that it does not relay until then.
//! - [`lww`]: N:M content sets: hybrid logical clocks, version vectors, and
//!   last-writer-wins per path with conflict records for the job log.
//! - [`nm`]: which changes of an N:M change set a replica takes (incremental bodies)
//!   and the tree it holds after a full one, per path last-writer-wins.
//! - [`schedule`]: when a scheduled content set runs: 5-field cron expressions (Vixie
//!   cron's day-of-month/day-of-week rule) and fixed intervals, matched against
//!   wall-clock fields that the caller's time zone converts (no clock read here).

#![forbid(unsafe_code)]

pub mod catchup;
pub mod changeset;
pub mod coalesce;
pub mod delta;
pub mod event;
pub mod filter;
pub mod lww;
pub mod manifest;
pub mod nm;
pub mod path;
pub mod plan;
pub mod route;
pub mod schedule;
#[cfg(test)]
mod testutil;
pub mod topology;
