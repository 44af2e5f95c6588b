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

#![forbid(unsafe_code)]

pub mod catchup;
pub mod changeset;
pub mod coalesce;
pub mod delta;
pub mod event;
pub mod filter;
pub mod lww;
pub mod manifest;
pub mod path;
pub mod plan;
pub mod route;
#[cfg(test)]
mod testutil;
pub mod topology;
