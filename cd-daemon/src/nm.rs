//! N:M content sets on a node: per-path versions, the hybrid clock, echo suppression.
//!
//! A member of an N:M set (one with several sources, see `cd_core::lww`) keeps one
//! SQLite database per content set, `<state_dir>/versions-<set>.sqlite` (WAL, every
//! update one transaction, so a crash leaves the state before or after it):
//!
//! - `paths`: per path, the [`Version`] of what this node holds there, the entry it
//!   wrote or received (encoded `pb::Entry`), or a tombstone (`deleted`) for a path
//!   removed by a versioned delete. Tombstones are bounded ([`MAX_TOMBSTONES`], the
//!   oldest by clock go first); a path whose tombstone was pruned is simply unknown,
//!   which a reconcile treats as "the sender knows nothing of it".
//! - `origins`: per origin, the last change set of it applied here (the version
//!   vector this node's own writes carry as `seen`, and the base an incremental
//!   change set from that origin must build on).
//! - `clock`: the hybrid clock's last timestamp, so a restart never issues a stamp
//!   below one it issued or observed before ([`NmSet::open`] seeds it).
//!
//! **Echo suppression.** When this node applies a remote write, its own capture sees
//! it. A captured change is an echo, and is not shipped, when what it finds on disk is
//! what this node holds a version of ([`NmSet::is_echo`]): the same entry (kind, content
//! hash and size or link target, mode, mtime; owner too where this node sets owners)
//! for an upsert, a tombstone for a removal. That holds however late the capture
//! resolves the event, and a real local edit (new content, a chmod, a touch) differs
//! and is stamped as a new write. Captures resolve under the same lock as applies
//! ([`NmSet::apply_lock`]), so a capture never judges a write whose version is not
//! recorded yet.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use cd_core::changeset::{Change, ChangeBody, ChangeSet};
use cd_core::lww::{Conflict, Hlc, HlcClock, Stamp, Version, VersionVector};
use cd_core::manifest::{Entry, EntryKind, Manifest};
use cd_core::nm::Held;
use cd_core::path::RelPath;
use cd_proto::pb;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use crate::transfer::TransferError;

/// Tombstones kept per content set; beyond this the oldest are forgotten.
pub const MAX_TOMBSTONES: usize = 100_000;

/// The N:M state of one content set on this node.
#[derive(Debug)]
pub struct NmSet {
    node: String,
    /// Whether applies set owners (then owners count in echo detection).
    owner: bool,
    db: Mutex<Connection>,
    clock: Mutex<HlcClock>,
    /// Held while a transfer is applied and its versions recorded, and while the
    /// capture resolves and stamps a batch or a full round scans and stamps.
    pub apply_lock: tokio::sync::Mutex<()>,
}

/// Physical time for the hybrid clock.
fn physical_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn seen_to_text(v: &VersionVector) -> String {
    v.iter()
        .map(|(o, s)| format!("{o}={s}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn seen_from_text(t: &str) -> VersionVector {
    let mut v = VersionVector::new();
    for part in t.split(',').filter(|p| !p.is_empty()) {
        if let Some((o, s)) = part.rsplit_once('=')
            && let Ok(s) = s.parse()
        {
            v.observe(o, s);
        }
    }
    v
}

/// The wire form of a version.
pub fn version_pb(v: &Version) -> pb::LwwVersion {
    pb::LwwVersion {
        origin: v.origin().to_owned(),
        wall_ms: v.stamp().hlc.wall_ms,
        logical: v.stamp().hlc.logical,
        seq: v.seq(),
        seen: v
            .seen()
            .iter()
            .map(|(o, s)| pb::SeenSeq {
                origin: o.to_owned(),
                seq: s,
            })
            .collect(),
    }
}

/// A version from the wire (`None` when it names no origin or no change set).
pub fn version_from_pb(v: &pb::LwwVersion) -> Option<Version> {
    if v.origin.is_empty() || v.seq == 0 {
        return None;
    }
    let mut seen = VersionVector::new();
    for s in &v.seen {
        seen.observe(&s.origin, s.seq);
    }
    Some(Version::new(
        Stamp {
            hlc: Hlc {
                wall_ms: v.wall_ms,
                logical: v.logical,
            },
            origin: v.origin.clone(),
        },
        v.seq,
        seen,
    ))
}

/// A conflict as the job report carries it.
pub fn conflict_pb(c: &Conflict, node: &str) -> pb::ConflictRecord {
    pb::ConflictRecord {
        path: c.path.as_bytes().to_vec(),
        winner: c.winner.to_string(),
        loser: c.loser.to_string(),
        node: node.to_owned(),
    }
}

/// Two entries are the same write for echo detection: same kind and content, mode
/// and mtime (and owner when `owner`); a hard link's target does not count. A
/// directory's mtime counts too: a source ships it with every change inside, and
/// the applier leaves it as shipped.
fn same_write(a: &Entry, b: &Entry, owner: bool) -> bool {
    let kind = |e: &Entry| match &e.kind {
        EntryKind::File { size, hash, .. } => EntryKind::File {
            size: *size,
            hash: *hash,
            hardlink_to: None,
        },
        k => k.clone(),
    };
    if kind(a) != kind(b) || a.meta.mode != b.meta.mode {
        return false;
    }
    if owner && (a.meta.uid, a.meta.gid) != (b.meta.uid, b.meta.gid) {
        return false;
    }
    (a.meta.mtime_sec, a.meta.mtime_nsec) == (b.meta.mtime_sec, b.meta.mtime_nsec)
}

impl NmSet {
    /// Opens (creating) the version store at `path` and seeds the clock from it.
    pub fn open(node: &str, owner: bool, path: &Path) -> anyhow::Result<NmSet> {
        let db = Connection::open(path)
            .with_context(|| format!("open version store {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS paths (
                 path BLOB PRIMARY KEY, origin TEXT NOT NULL, wall INTEGER NOT NULL,
                 logical INTEGER NOT NULL, seq INTEGER NOT NULL, seen TEXT NOT NULL,
                 deleted INTEGER NOT NULL, entry BLOB);
             CREATE INDEX IF NOT EXISTS tombstones ON paths (deleted, wall, logical);
             CREATE TABLE IF NOT EXISTS origins (origin TEXT PRIMARY KEY, seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS clock (id INTEGER PRIMARY KEY CHECK (id = 0),
                 wall INTEGER NOT NULL, logical INTEGER NOT NULL);",
        )?;
        // The greatest timestamp issued or observed: the clock row, and every stored
        // version (a clock row lost with an older database cannot go backwards).
        let seed: (i64, i64) = db.query_row(
            "SELECT wall, logical FROM (
                 SELECT wall, logical FROM clock
                 UNION ALL SELECT wall, logical FROM paths
                 UNION ALL SELECT 0, 0)
             ORDER BY wall DESC, logical DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut clock = HlcClock::new();
        clock.observe(
            Hlc {
                wall_ms: seed.0 as u64,
                logical: seed.1 as u32,
            },
            0,
        );
        Ok(NmSet {
            node: node.to_owned(),
            owner,
            db: Mutex::new(db),
            clock: Mutex::new(clock),
            apply_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The clock's last timestamp.
    pub fn clock(&self) -> Hlc {
        self.clock.lock().unwrap().last()
    }

    /// What this node holds of `path`, with the entry it recorded (`None` for a
    /// tombstone).
    pub fn get(&self, path: &RelPath) -> Option<(Held, Option<Entry>)> {
        let db = self.db.lock().unwrap();
        get(&db, path).ok().flatten()
    }

    /// Just the held version of `path`.
    pub fn held(&self, path: &RelPath) -> Option<Held> {
        self.get(path).map(|(h, _)| h)
    }

    /// Per origin, the last change set applied here (this node's own: its newest).
    pub fn seen(&self) -> VersionVector {
        let db = self.db.lock().unwrap();
        let mut v = VersionVector::new();
        if let Ok(mut st) = db.prepare("SELECT origin, seq FROM origins") {
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)));
            for (o, s) in rows.into_iter().flatten().flatten() {
                v.observe(&o, s as u64);
            }
        }
        v
    }

    /// The last change set of `origin` applied here (0: none).
    pub fn last_seq(&self, origin: &str) -> u64 {
        self.seen().get(origin)
    }

    /// Every held version, tombstones included, in path order.
    pub fn all(&self) -> anyhow::Result<BTreeMap<RelPath, Held>> {
        let db = self.db.lock().unwrap();
        let mut st = db.prepare(
            "SELECT path, origin, wall, logical, seq, seen, deleted FROM paths ORDER BY path",
        )?;
        let mut out = BTreeMap::new();
        let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, held_from_row(r, 1)?)))?;
        for row in rows {
            let (p, h) = row?;
            if let Ok(p) = RelPath::new(p) {
                out.insert(p, h);
            }
        }
        Ok(out)
    }

    /// What is on disk at `path` (per `local`, a fresh scan) is not what this node
    /// holds a version of: a local write its capture has not stamped yet. A
    /// directory's attributes are left to last-writer-wins (a file written into it
    /// moves its mtime; that is no content to lose).
    pub fn pending_local(&self, path: &RelPath, local: &Manifest) -> bool {
        let held = self.get(path);
        if local.get(path).is_some_and(Entry::is_dir)
            && held
                .as_ref()
                .is_none_or(|(h, e)| h.deleted || e.as_ref().is_some_and(Entry::is_dir))
        {
            return false;
        }
        match (held, local.get(path)) {
            (None, None) => false,
            (None, Some(_)) => true,
            (Some((h, _)), None) => !h.deleted,
            (Some((h, held)), Some(disk)) => {
                h.deleted || held.is_none_or(|held| !same_write(&held, disk, self.owner))
            }
        }
    }

    /// The clock takes in a remote timestamp.
    pub fn observe(&self, remote: Hlc) {
        self.clock.lock().unwrap().observe(remote, physical_ms());
    }

    /// A captured change is this node's own application of a remote write (or a
    /// no-op over what it holds): see the module docs.
    pub fn is_echo(&self, change: &Change) -> bool {
        match change {
            Change::Upsert(e) => matches!(
                self.get(&e.path),
                Some((h, Some(held))) if !h.deleted && same_write(&held, e, self.owner)
            ),
            Change::Remove(p) => matches!(self.get(p), Some((h, _)) if h.deleted),
            Change::Rename { .. } => false,
        }
    }

    /// A new version of this node's, of change set `seq`, stamped now by `clock`.
    fn fresh(&self, clock: &mut HlcClock, seq: u64, seen: &VersionVector) -> Version {
        Version::new(
            Stamp {
                hlc: clock.now(physical_ms()),
                origin: self.node.clone(),
            },
            seq,
            seen.clone(),
        )
    }

    /// Stamps this node's own writes of change set `seq` (in order, one timestamp
    /// each) and records them. The caller holds [`apply_lock`](Self::apply_lock).
    pub fn stamp_local(&self, seq: u64, changes: &[Change]) -> anyhow::Result<Vec<Version>> {
        let seen = self.seen();
        let mut versions = Vec::with_capacity(changes.len());
        let mut record = Vec::new();
        {
            let mut clock = self.clock.lock().unwrap();
            for c in changes {
                let v = self.fresh(&mut clock, seq, &seen);
                match c {
                    Change::Upsert(e) => record.push((e.path.clone(), v.clone(), Some(e.clone()))),
                    Change::Remove(p) => record.push((p.clone(), v.clone(), None)),
                    Change::Rename { from, to } => anyhow::bail!(
                        "rename {from} -> {to} reached stamping; N:M sets ship renames as remove + upsert"
                    ),
                }
                versions.push(v);
            }
        }
        self.commit(record, Some((&self.node.clone(), seq)))?;
        Ok(versions)
    }

    /// The versions a full manifest of this node's tree carries: each entry's held
    /// version where what is on disk is what it holds, else a fresh local write of
    /// change set `seq` (stamped and, with `record`, recorded now; a dry run records
    /// nothing); then every tombstone for a path the tree lacks. The caller holds
    /// [`apply_lock`](Self::apply_lock) across the scan that made `manifest` and this
    /// call.
    pub fn versions_for_full(
        &self,
        manifest: &Manifest,
        seq: u64,
        record: bool,
    ) -> anyhow::Result<Vec<pb::PathVersion>> {
        let held = self.all()?;
        let entries = self.entries()?;
        let seen = self.seen();
        let mut out = Vec::with_capacity(held.len());
        let mut fresh = Vec::new();
        let mut clock = self.clock.lock().unwrap();
        for e in manifest.iter() {
            let v = match (held.get(&e.path), entries.get(&e.path)) {
                (Some(h), Some(mine)) if !h.deleted && same_write(mine, e, self.owner) => {
                    h.version.clone()
                }
                _ => {
                    let v = self.fresh(&mut clock, seq, &seen);
                    fresh.push((e.path.clone(), v.clone(), Some(e.clone())));
                    v
                }
            };
            out.push(pb::PathVersion {
                path: e.path.as_bytes().to_vec(),
                version: Some(version_pb(&v)),
                deleted: false,
            });
        }
        drop(clock);
        for (p, h) in &held {
            if h.deleted && manifest.get(p).is_none() {
                out.push(pb::PathVersion {
                    path: p.as_bytes().to_vec(),
                    version: Some(version_pb(&h.version)),
                    deleted: true,
                });
            }
        }
        if record && !fresh.is_empty() {
            tracing::info!(
                paths = fresh.len(),
                seq,
                "stamped local paths without a version for a full reconcile"
            );
            self.commit(fresh, Some((&self.node.clone(), seq)))?;
        }
        Ok(out)
    }

    fn entries(&self) -> anyhow::Result<BTreeMap<RelPath, Entry>> {
        let db = self.db.lock().unwrap();
        let mut st = db.prepare("SELECT path, entry FROM paths WHERE deleted = 0")?;
        let mut out = BTreeMap::new();
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
        })?;
        for row in rows {
            let (p, e) = row?;
            if let (Ok(p), Some(e)) = (RelPath::new(p), e.and_then(|e| decode_entry(&e))) {
                out.insert(p, e);
            }
        }
        Ok(out)
    }

    /// Records what a transfer applied: per path its version and the entry it now
    /// holds (from `tree`, the tree the replica holds afterwards; absent = deleted),
    /// that change set `seq` of `origin` was applied, and the clock having observed
    /// every version. One transaction.
    pub fn record_applied(
        &self,
        record: &BTreeMap<RelPath, Held>,
        tree: &Manifest,
        origin: &str,
        seq: u64,
    ) -> anyhow::Result<()> {
        {
            let mut clock = self.clock.lock().unwrap();
            for h in record.values() {
                clock.observe(h.version.stamp().hlc, physical_ms());
            }
        }
        let rows = record
            .iter()
            .map(|(p, h)| {
                let entry = if h.deleted {
                    None
                } else {
                    tree.get(p).cloned()
                };
                (p.clone(), h.version.clone(), entry)
            })
            .collect();
        self.commit(rows, Some((origin, seq)))
    }

    fn commit(
        &self,
        rows: Vec<(RelPath, Version, Option<Entry>)>,
        applied: Option<(&str, u64)>,
    ) -> anyhow::Result<()> {
        let clock = self.clock();
        let mut db = self.db.lock().unwrap();
        let tx = db.transaction()?;
        {
            let mut put = tx.prepare(
                "INSERT OR REPLACE INTO paths (path, origin, wall, logical, seq, seen, deleted, entry)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (p, v, e) in &rows {
                put.execute(params![
                    p.as_bytes(),
                    v.origin(),
                    v.stamp().hlc.wall_ms as i64,
                    v.stamp().hlc.logical as i64,
                    v.seq() as i64,
                    seen_to_text(v.seen()),
                    e.is_none() as i64,
                    e.as_ref().map(|e| pb::Entry::from(e).encode_to_vec()),
                ])?;
            }
        }
        if let Some((o, s)) = applied {
            tx.execute(
                "INSERT INTO origins (origin, seq) VALUES (?1, ?2)
                 ON CONFLICT(origin) DO UPDATE SET seq = max(seq, excluded.seq)",
                params![o, s as i64],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO clock (id, wall, logical) VALUES (0, ?1, ?2)",
            params![clock.wall_ms as i64, clock.logical as i64],
        )?;
        tx.execute(
            "DELETE FROM paths WHERE rowid IN (
                 SELECT rowid FROM paths WHERE deleted = 1
                 ORDER BY wall DESC, logical DESC LIMIT -1 OFFSET ?1)",
            params![MAX_TOMBSTONES as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The tombstones held (tests).
    #[cfg(test)]
    fn tombstones(&self) -> usize {
        let db = self.db.lock().unwrap();
        db.query_row("SELECT count(*) FROM paths WHERE deleted = 1", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as usize
    }
}

/// What an N:M transfer's body asks of this replica (see `cd_core::nm`): the tree
/// to plan towards, and what taking it means.
#[expect(clippy::too_many_arguments, reason = "the parts of one received body")]
pub(crate) fn received(
    nm: &NmSet,
    local: &Manifest,
    begin: &pb::TransferBegin,
    entries: Vec<Entry>,
    changes: Vec<Change>,
    versions: Vec<Option<pb::LwwVersion>>,
    full_versions: Vec<pb::PathVersion>,
    keep_unversioned: bool,
) -> Result<(Manifest, Outcome), TransferError> {
    let bad = |m: String| TransferError::BadManifest(m);
    let outcome = if begin.full {
        let received = Manifest::from_entries(entries).map_err(|e| bad(e.to_string()))?;
        let mut theirs = BTreeMap::new();
        for pv in full_versions {
            let path = RelPath::new(pv.path).map_err(|e| bad(format!("version path: {e}")))?;
            let version = pv
                .version
                .as_ref()
                .and_then(version_from_pb)
                .ok_or_else(|| bad(format!("{path}: no valid version")))?;
            if pv.deleted == received.get(&path).is_some() {
                return Err(bad(format!(
                    "{path}: a tombstone for a listed entry, or a version for none"
                )));
            }
            theirs.insert(
                path,
                Held {
                    version,
                    deleted: pv.deleted,
                },
            );
        }
        cd_core::nm::merge_full(&received, &theirs, local, |p| nm.held(p), keep_unversioned)
            .map_err(|e| bad(e.to_string()))?
    } else {
        let mut with = Vec::with_capacity(changes.len());
        for (c, v) in changes.into_iter().zip(versions) {
            let v = v
                .as_ref()
                .and_then(version_from_pb)
                .ok_or_else(|| bad("a change without a valid version".into()))?;
            if v.origin() != begin.origin {
                return Err(bad(format!(
                    "a change of `{}` in a change set of `{}`",
                    v.origin(),
                    begin.origin
                )));
            }
            with.push((c, v));
        }
        // A source's own write that its capture has not stamped yet is on disk but
        // not in the store: an incoming write of that path does not overwrite it
        // (that would lose it without a trace). It is skipped as a conflict the
        // pending write wins; the clock observes the incoming stamp, so the pending
        // write, when shipped, is later and (having seen this change set) replaces
        // the incoming one everywhere.
        let mut pending_conflicts = Vec::new();
        if keep_unversioned {
            with.retain(|(c, v)| {
                let paths: Vec<&RelPath> = match c {
                    Change::Upsert(e) => vec![&e.path],
                    Change::Remove(p) => vec![p],
                    Change::Rename { from, to } => vec![from, to],
                };
                let Some(p) = paths.into_iter().find(|p| nm.pending_local(p, local)) else {
                    return true;
                };
                nm.observe(v.stamp().hlc);
                pending_conflicts.push(Conflict {
                    path: p.clone(),
                    winner: Stamp {
                        hlc: nm.clock(),
                        origin: nm.node.clone(),
                    },
                    loser: v.stamp().clone(),
                });
                false
            });
        }
        let mut o = cd_core::nm::filter_changes(with, local, |p| nm.held(p));
        o.conflicts.extend(pending_conflicts);
        let tree = ChangeSet {
            origin: begin.origin.clone(),
            seq: begin.seq,
            body: ChangeBody::Incremental(o.take),
        }
        .desired(local)
        .map_err(|e| bad(e.to_string()))?;
        cd_core::nm::Outcome {
            take: tree,
            record: o.record,
            conflicts: o.conflicts,
            skipped: o.skipped,
        }
    };
    for c in &outcome.conflicts {
        tracing::warn!(content_set = %begin.content_set, path = %c.path, winner = %c.winner, loser = %c.loser, from = %begin.origin, "conflict: concurrent writes, last writer wins");
    }
    if outcome.skipped > 0 {
        tracing::info!(content_set = %begin.content_set, from = %begin.origin, seq = begin.seq, skipped = outcome.skipped, "writes older than what this node holds were not applied");
    }
    let cd_core::nm::Outcome {
        take,
        record,
        conflicts,
        ..
    } = outcome;
    Ok((take, Outcome { record, conflicts }))
}

/// What applying an N:M body means once it is applied.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    record: BTreeMap<RelPath, Held>,
    conflicts: Vec<Conflict>,
}

/// After an N:M body was applied: records its versions (only when everything was
/// applied; otherwise the next full reconcile brings them) and answers its conflicts.
pub(crate) fn applied(
    nm: &NmSet,
    begin: &pb::TransferBegin,
    tree: &Manifest,
    outcome: Outcome,
    answer: &mut pb::ApplyResult,
) {
    answer.conflicts = outcome
        .conflicts
        .iter()
        .map(|c| conflict_pb(c, nm.node()))
        .collect();
    if !answer.ok || answer.skipped > 0 {
        return;
    }
    if let Err(e) = nm.record_applied(&outcome.record, tree, &begin.origin, begin.seq) {
        tracing::error!(content_set = %begin.content_set, error = %format!("{e:#}"), "could not record applied versions");
        answer.ok = false;
        answer.error = format!("recording versions: {e:#}");
    }
}

fn decode_entry(b: &[u8]) -> Option<Entry> {
    Entry::try_from(pb::Entry::decode(b).ok()?).ok()
}

fn held_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Held> {
    let origin: String = r.get(at)?;
    let wall: i64 = r.get(at + 1)?;
    let logical: i64 = r.get(at + 2)?;
    let seq: i64 = r.get(at + 3)?;
    let seen: String = r.get(at + 4)?;
    let deleted: i64 = r.get(at + 5)?;
    Ok(Held {
        version: Version::new(
            Stamp {
                hlc: Hlc {
                    wall_ms: wall as u64,
                    logical: logical as u32,
                },
                origin,
            },
            seq as u64,
            seen_from_text(&seen),
        ),
        deleted: deleted != 0,
    })
}

fn get(db: &Connection, path: &RelPath) -> rusqlite::Result<Option<(Held, Option<Entry>)>> {
    db.query_row(
        "SELECT origin, wall, logical, seq, seen, deleted, entry FROM paths WHERE path = ?1",
        params![path.as_bytes()],
        |r| {
            let h = held_from_row(r, 0)?;
            let e: Option<Vec<u8>> = r.get(6)?;
            Ok((h, e.and_then(|e| decode_entry(&e))))
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cd_core::manifest::Meta;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(path: &str, n: u8, mtime: i64) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::File {
                size: n.into(),
                hash: [n; 32],
                hardlink_to: None,
            },
            meta: Meta {
                mode: 0o644,
                uid: 1,
                gid: 1,
                mtime_sec: mtime,
                mtime_nsec: 5,
            },
        }
    }

    fn remote(origin: &str, wall: u64, seq: u64) -> Version {
        Version::new(
            Stamp {
                hlc: Hlc {
                    wall_ms: wall,
                    logical: 0,
                },
                origin: origin.into(),
            },
            seq,
            VersionVector::new(),
        )
    }

    #[test]
    fn applied_versions_persist_and_reseed_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("versions-www.sqlite");
        let far = u64::MAX / 4;
        {
            let s = NmSet::open("ed1", false, &path).unwrap();
            let tree = Manifest::from_entries([file("a", 1, 10)]).unwrap();
            let mut rec = BTreeMap::new();
            rec.insert(
                p("a"),
                Held {
                    version: remote("ed2", far, 7),
                    deleted: false,
                },
            );
            rec.insert(
                p("gone"),
                Held {
                    version: remote("ed2", 5, 7),
                    deleted: true,
                },
            );
            s.record_applied(&rec, &tree, "ed2", 7).unwrap();
            // Observing a far-future remote stamp moves the clock past it.
            assert!(s.clock().wall_ms >= far);
        }
        let s = NmSet::open("ed1", false, &path).unwrap();
        assert!(s.clock().wall_ms >= far, "clock seeded from the store");
        assert_eq!(s.last_seq("ed2"), 7);
        assert_eq!(s.last_seq("ed1"), 0);
        let (h, e) = s.get(&p("a")).unwrap();
        assert_eq!(h.version, remote("ed2", far, 7));
        assert_eq!(e, Some(file("a", 1, 10)));
        assert!(s.held(&p("gone")).unwrap().deleted);
        // A local write now is stamped after everything observed, and sees ed2's 7.
        let v = s
            .stamp_local(1, &[Change::Upsert(file("b", 2, 11))])
            .unwrap();
        assert!(v[0].stamp().hlc.wall_ms >= far);
        assert_eq!(v[0].origin(), "ed1");
        assert!(v[0].seen().covers("ed2", 7));
        assert_eq!(s.last_seq("ed1"), 1);
        assert_eq!(s.all().unwrap().len(), 3);
    }

    #[test]
    fn echo_filter_drops_what_was_applied_and_keeps_real_edits() {
        let dir = tempfile::tempdir().unwrap();
        let s = NmSet::open("ed1", false, &dir.path().join("v.sqlite")).unwrap();
        let tree = Manifest::from_entries([file("a", 1, 10)]).unwrap();
        let mut rec = BTreeMap::new();
        rec.insert(
            p("a"),
            Held {
                version: remote("ed2", 100, 1),
                deleted: false,
            },
        );
        rec.insert(
            p("x"),
            Held {
                version: remote("ed2", 100, 1),
                deleted: true,
            },
        );
        s.record_applied(&rec, &tree, "ed2", 1).unwrap();
        // The capture sees the applied file (a hard link target does not matter)…
        assert!(s.is_echo(&Change::Upsert(file("a", 1, 10))));
        let mut linked = file("a", 1, 10);
        if let EntryKind::File { hardlink_to, .. } = &mut linked.kind {
            *hardlink_to = Some(p("b"));
        }
        assert!(s.is_echo(&Change::Upsert(linked)));
        // … and the applied delete.
        assert!(s.is_echo(&Change::Remove(p("x"))));
        // Real edits: new content, a touch, a chmod, a delete of a held file, a new path.
        assert!(!s.is_echo(&Change::Upsert(file("a", 2, 10))));
        assert!(!s.is_echo(&Change::Upsert(file("a", 1, 11))));
        let mut chmod = file("a", 1, 10);
        chmod.meta.mode = 0o600;
        assert!(!s.is_echo(&Change::Upsert(chmod)));
        assert!(!s.is_echo(&Change::Remove(p("a"))));
        assert!(!s.is_echo(&Change::Upsert(file("new", 1, 10))));
        // A directory's mtime counts: a child written here moves it, and that is news.
        let d = |mtime| Entry {
            path: p("d"),
            kind: EntryKind::Dir,
            meta: Meta {
                mode: 0o755,
                uid: 1,
                gid: 1,
                mtime_sec: mtime,
                mtime_nsec: 0,
            },
        };
        s.stamp_local(2, &[Change::Upsert(d(20))]).unwrap();
        assert!(s.is_echo(&Change::Upsert(d(20))));
        assert!(!s.is_echo(&Change::Upsert(d(21))));
        // Owners count only where this node sets them.
        let mut other_owner = file("a", 1, 10);
        other_owner.meta.uid = 2;
        assert!(s.is_echo(&Change::Upsert(other_owner.clone())));
        let owner = NmSet::open("ed1", true, &dir.path().join("v.sqlite")).unwrap();
        assert!(!owner.is_echo(&Change::Upsert(other_owner)));
        // Once the node writes the path itself, its own later capture is an echo too
        // (the write is recorded), and the earlier remote content is not.
        s.stamp_local(1, &[Change::Upsert(file("a", 3, 12))])
            .unwrap();
        assert!(s.is_echo(&Change::Upsert(file("a", 3, 12))));
        assert!(!s.is_echo(&Change::Upsert(file("a", 1, 10))));
    }

    #[test]
    fn pending_local_writes_are_what_disk_has_beyond_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = NmSet::open("ed1", false, &dir.path().join("v.sqlite")).unwrap();
        let mut rec = BTreeMap::new();
        for (path, deleted) in [("a", false), ("gone", true), ("kept", false)] {
            rec.insert(
                p(path),
                Held {
                    version: remote("ed2", 100, 1),
                    deleted,
                },
            );
        }
        let tree = Manifest::from_entries([file("a", 1, 10), file("kept", 2, 10)]).unwrap();
        s.record_applied(&rec, &tree, "ed2", 1).unwrap();
        let d = |path: &str| Entry {
            path: p(path),
            kind: EntryKind::Dir,
            meta: file("x", 0, 1).meta,
        };
        // On disk: `a` rewritten, `gone` recreated, `kept` deleted, `new` never
        // stamped, `fresh` a new directory; `same` absent everywhere.
        let disk = Manifest::from_entries([
            file("a", 9, 11),
            d("fresh"),
            file("gone", 3, 10),
            file("new", 4, 10),
        ])
        .unwrap();
        for path in ["a", "gone", "kept", "new"] {
            assert!(s.pending_local(&p(path), &disk), "{path}");
        }
        assert!(
            !s.pending_local(&p("fresh"), &disk),
            "directories: LWW decides"
        );
        assert!(!s.pending_local(&p("same"), &disk));
        assert!(
            !s.pending_local(&p("a"), &tree),
            "what was applied is not pending"
        );
        // Observing a remote stamp moves the clock past it.
        s.observe(Hlc {
            wall_ms: u64::MAX / 8,
            logical: 3,
        });
        assert!(s.clock().wall_ms >= u64::MAX / 8);
    }

    #[test]
    fn full_manifests_carry_held_versions_fresh_stamps_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let s = NmSet::open("ed1", false, &dir.path().join("v.sqlite")).unwrap();
        let tree = Manifest::from_entries([file("a", 1, 10)]).unwrap();
        let mut rec = BTreeMap::new();
        let va = remote("ed2", 100, 3);
        rec.insert(
            p("a"),
            Held {
                version: va.clone(),
                deleted: false,
            },
        );
        rec.insert(
            p("x"),
            Held {
                version: remote("ed2", 100, 3),
                deleted: true,
            },
        );
        s.record_applied(&rec, &tree, "ed2", 3).unwrap();
        // On disk: `a` as received, `b` never stamped (pre-existing content).
        let disk = Manifest::from_entries([file("a", 1, 10), file("b", 2, 10)]).unwrap();
        let pv = s.versions_for_full(&disk, 4, true).unwrap();
        let by: BTreeMap<String, (Version, bool)> = pv
            .iter()
            .map(|x| {
                (
                    String::from_utf8(x.path.clone()).unwrap(),
                    (
                        version_from_pb(x.version.as_ref().unwrap()).unwrap(),
                        x.deleted,
                    ),
                )
            })
            .collect();
        assert_eq!(by["a"], (va, false));
        assert_eq!(by["b"].0.origin(), "ed1");
        assert!(by["b"].0.seen().covers("ed2", 3));
        assert!(by["x"].1);
        assert_eq!(by.len(), 3);
        // `b` is recorded now: asked again, the same version.
        let again = s.versions_for_full(&disk, 5, true).unwrap();
        assert_eq!(again, pv);
    }

    #[test]
    fn tombstones_are_bounded_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = NmSet::open("ed1", false, &dir.path().join("v.sqlite")).unwrap();
        let rows: Vec<_> = (0..(MAX_TOMBSTONES + 3) as u64)
            .map(|i| (p(&format!("d{i}")), remote("ed2", 10 + i, 1), None))
            .collect();
        s.commit(rows, None).unwrap();
        assert_eq!(s.tombstones(), MAX_TOMBSTONES);
        assert!(s.held(&p("d0")).is_none(), "oldest forgotten");
        assert!(s.held(&p(&format!("d{}", MAX_TOMBSTONES + 2))).is_some());
    }

    #[test]
    fn wire_versions_round_trip() {
        let mut seen = VersionVector::new();
        seen.observe("ed2", 4);
        let v = Version::new(
            Stamp {
                hlc: Hlc {
                    wall_ms: 9,
                    logical: 2,
                },
                origin: "ed1".into(),
            },
            3,
            seen,
        );
        assert_eq!(version_from_pb(&version_pb(&v)), Some(v));
        assert_eq!(version_from_pb(&pb::LwwVersion::default()), None);
    }
}
