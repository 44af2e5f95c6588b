//! [`Shipped`]: a real-time source's record of the tree its change sets describe, so a
//! restarted source resumes from its sequence number instead of reconciling the
//! whole tree with every replica.
//!
//! The record is the tree as of change set `seq`: set from the manifest of a full
//! reconcile, then moved along by every incremental change set the source ships
//! (`Upsert`, `Remove`, `Rename`, in order, as the replica applies them). It is kept
//! in memory and written to `state_dir/shipped-<set>.bin` when the daemon stops
//! (and, while running, at most every [`SAVE_EVERY`] after a change), together
//! with `seq`.
//!
//! On start, a record whose `seq` is the set's current sequence number says exactly
//! what every replica at that number holds. Real-time capture starts at once, and a
//! consistency check scans the tree in the background (hashing only files whose
//! `stat` changed, thanks to the hash index) and turns every difference from the
//! record into an event for the coalescer: `Attrib` (re-stat and ship) for a changed
//! or new non-directory, `Lost` (reconcile that subtree) for a new directory or a
//! path that is gone. Those resolve against the disk when they ship, like any other
//! event, so a change racing the check is never rolled back. A replica that is not
//! at `seq` answers `need_full` to the first change set and gets the whole tree.
//! Without a usable record (first start, a crash after the last save) the source
//! starts with a full reconcile, as before.
//!
//! On disk (little-endian): magic `CDSYNCSH`, version `u32` (1), `seq u64`, entry
//! count `u64`, then per entry `len u32` and a protobuf `cdsync.v1.Entry`, then a
//! BLAKE3 hash of all preceding bytes. Anything else loads as no record.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cd_core::changeset::Change;
use cd_core::event::{EventKind, FsEvent};
use cd_core::manifest::{Entry, EntryKind, Manifest};
use cd_core::path::RelPath;
use cd_proto::pb;
use prost::Message;

const MAGIC: &[u8; 8] = b"CDSYNCSH";
const VERSION: u32 = 1;
/// While running, the record is saved at most this often (and on shutdown).
pub const SAVE_EVERY: Duration = Duration::from_secs(30);

/// The tree as of change set `seq`. See the module docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shipped {
    pub seq: u64,
    entries: BTreeMap<RelPath, Entry>,
}

impl Shipped {
    /// The record of a full reconcile that shipped `m` as change set `seq`.
    pub fn from_manifest(seq: u64, m: &Manifest) -> Shipped {
        Shipped {
            seq,
            entries: m.iter().map(|e| (e.path.clone(), e.clone())).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Moves the record along by incremental change set `seq`. Returns the targets
    /// of renames whose source the record does not hold (the replicas will move
    /// nothing there).
    pub fn apply(&mut self, seq: u64, changes: &[Change]) -> Vec<RelPath> {
        self.seq = seq;
        let mut unsourced = Vec::new();
        for c in changes {
            match c {
                Change::Upsert(e) => {
                    self.entries.insert(e.path.clone(), e.clone());
                }
                Change::Remove(p) => {
                    self.take_subtree(p);
                }
                Change::Rename { from, to } => {
                    let moved = self.take_subtree(from);
                    if moved.is_empty() {
                        // The replica keeps what it has at `to` (see
                        // `cd_core::changeset`): the caller ships `to` itself.
                        unsourced.push(to.clone());
                        continue;
                    }
                    self.take_subtree(to);
                    for (p, mut e) in moved {
                        if let Some(np) = p.rebase(from, to) {
                            e.path = np.clone();
                            self.entries.insert(np, e);
                        }
                    }
                }
            }
        }
        unsourced
    }

    /// Removes and returns `p` and everything beneath it.
    fn take_subtree(&mut self, p: &RelPath) -> Vec<(RelPath, Entry)> {
        // Bytewise order: the subtree follows `p`, interleaved only with siblings
        // whose names extend `p`'s last component (`a-b` sorts between `a` and
        // `a/x`), so scan while the bytes share the prefix.
        let keys: Vec<RelPath> = self
            .entries
            .range(p.clone()..)
            .take_while(|(k, _)| k.as_bytes().starts_with(p.as_bytes()))
            .filter(|(k, _)| k.starts_with(p))
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.entries.remove_entry(&k))
            .collect()
    }

    /// Events that bring a replica holding this record to `now` (see module docs),
    /// fewest first: nothing beneath a path that is rescanned anyway.
    pub fn differences(&self, now: &Manifest) -> Vec<FsEvent> {
        let ev = |kind, path: &RelPath, is_dir| FsEvent {
            kind,
            path: Some(path.clone()),
            path2: None,
            is_dir,
            pid: 0,
        };
        let mut out = Vec::new();
        let mut lost: Vec<RelPath> = Vec::new();
        let covered = |lost: &[RelPath], p: &RelPath| lost.last().is_some_and(|l| p.starts_with(l));
        // Gone: in the record, not on disk (tree order, so parents come first).
        let mut gone: Vec<&RelPath> = self
            .entries
            .keys()
            .filter(|p| now.get(p).is_none())
            .collect();
        gone.sort_by(|a, b| a.cmp_tree(b));
        for p in gone {
            if !covered(&lost, p) {
                lost.push(p.clone());
                out.push(ev(EventKind::Lost, p, true));
            }
        }
        let mut lost_new: Vec<RelPath> = Vec::new();
        for e in now.iter_tree() {
            if covered(&lost_new, &e.path) {
                continue;
            }
            match self.entries.get(&e.path) {
                Some(old) if old == e => {}
                None if matches!(e.kind, EntryKind::Dir) => {
                    lost_new.push(e.path.clone());
                    out.push(ev(EventKind::Lost, &e.path, true));
                }
                Some(old)
                    if matches!(old.kind, EntryKind::Dir) != matches!(e.kind, EntryKind::Dir) =>
                {
                    lost_new.push(e.path.clone());
                    out.push(ev(EventKind::Lost, &e.path, true));
                }
                _ => out.push(ev(
                    EventKind::Attrib,
                    &e.path,
                    matches!(e.kind, EntryKind::Dir),
                )),
            }
        }
        out
    }

    /// Loads the record at `path`; `None` when missing or not intact.
    pub fn load(path: &Path) -> Option<Shipped> {
        let data = std::fs::read(path).ok()?;
        if data.len() < 8 + 4 + 8 + 8 + 32 {
            return None;
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if blake3::hash(body).as_bytes() != sum || &body[..8] != MAGIC {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
        if u32::from_le_bytes(body[8..12].try_into().unwrap()) != VERSION {
            return None;
        }
        let seq = u64_at(12);
        let count = u64_at(20);
        let mut at = 28;
        let mut entries = BTreeMap::new();
        for _ in 0..count {
            let len = u32::from_le_bytes(body.get(at..at + 4)?.try_into().unwrap()) as usize;
            at += 4;
            let e = pb::Entry::decode(body.get(at..at + len)?).ok()?;
            at += len;
            let e = Entry::try_from(e).ok()?;
            entries.insert(e.path.clone(), e);
        }
        (at == body.len()).then_some(Shipped { seq, entries })
    }

    /// Writes the record to `path` (via a fsynced temporary file and a rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        // The periodic save and the one at shutdown take turns on the temporary file.
        static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = SAVING.lock().unwrap_or_else(|e| e.into_inner());
        // Never backwards: a slow periodic save must not replace the newer record
        // written at shutdown.
        if peek_seq(path).is_some_and(|old| old > self.seq) {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(64 + self.entries.len() * 96);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&self.seq.to_le_bytes());
        buf.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in self.entries.values() {
            let m = pb::Entry::from(e);
            buf.extend_from_slice(&(m.encoded_len() as u32).to_le_bytes());
            m.encode(&mut buf).map_err(std::io::Error::other)?;
        }
        let sum = blake3::hash(&buf);
        buf.extend_from_slice(sum.as_bytes());
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Forgets the record on disk (it no longer matches the sequence number).
    pub fn discard(path: &Path) {
        let _ = std::fs::remove_file(path);
    }
}

/// The `seq` in the header of the record at `path` (the rest is not checked).
fn peek_seq(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    (&head[..8] == MAGIC && head[8..12] == VERSION.to_le_bytes())
        .then(|| u64::from_le_bytes(head[12..20].try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use cd_core::manifest::Meta;

    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    const META: Meta = Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: 1,
        mtime_nsec: 0,
    };

    fn dir(path: &str) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::Dir,
            meta: META,
        }
    }

    fn file(path: &str, h: u8) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::File {
                size: 1,
                hash: [h; 32],
                hardlink_to: None,
            },
            meta: META,
        }
    }

    fn shown(evs: &[FsEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| format!("{:?} {}", e.kind, e.path.as_ref().unwrap().display()))
            .collect()
    }

    /// The record follows change sets as a replica applies them.
    #[test]
    fn follows_change_sets() {
        let m =
            Manifest::from_entries([dir("a"), file("a/x", 1), file("a-b", 2), dir("c")]).unwrap();
        let mut s = Shipped::from_manifest(3, &m);
        s.apply(
            4,
            &[
                Change::Rename {
                    from: p("a"),
                    to: p("c"),
                },
                Change::Upsert(file("c/y", 3)),
                Change::Remove(p("a-b")),
            ],
        );
        assert_eq!(s.seq, 4);

        let paths: Vec<String> = s.entries.keys().map(RelPath::display).collect();
        assert_eq!(paths, ["c", "c/x", "c/y"]);
        assert_eq!(s.entries[&p("c/x")].path, p("c/x"));
        let want = cd_core::changeset::ChangeSet {
            origin: "o".into(),
            seq: 4,
            body: cd_core::changeset::ChangeBody::Incremental(vec![
                Change::Rename {
                    from: p("a"),
                    to: p("c"),
                },
                Change::Upsert(file("c/y", 3)),
                Change::Remove(p("a-b")),
            ]),
        }
        .desired(&m)
        .unwrap();
        assert_eq!(s, Shipped::from_manifest(4, &want));
        // A rename the replicas cannot perform: its target is reported, kept.
        let unsourced = s.apply(
            5,
            &[Change::Rename {
                from: p("never-shipped"),
                to: p("c/x"),
            }],
        );
        assert_eq!(unsourced, [p("c/x")]);
        assert!(s.entries.contains_key(&p("c/x")));
    }

    /// Differences become the fewest events that cover them.
    #[test]
    fn differences_cover_every_change() {
        let before = Manifest::from_entries([
            dir("gone"),
            file("gone/x", 1),
            file("same", 2),
            file("edited", 3),
            dir("d"),
        ])
        .unwrap();
        let now = Manifest::from_entries([
            file("same", 2),
            file("edited", 4),
            dir("d"),
            file("d/new", 5),
            dir("newdir"),
            file("newdir/y", 6),
        ])
        .unwrap();
        let s = Shipped::from_manifest(7, &before);
        assert_eq!(
            shown(&s.differences(&now)),
            ["Lost gone", "Attrib d/new", "Attrib edited", "Lost newdir"]
        );
        assert!(Shipped::from_manifest(7, &now).differences(&now).is_empty());
    }

    #[test]
    fn saves_and_loads_intact_records_only() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("shipped.bin");
        assert_eq!(Shipped::load(&path), None);
        let m = Manifest::from_entries([dir("a"), file("a/x", 1)]).unwrap();
        let s = Shipped::from_manifest(42, &m);
        s.save(&path).unwrap();
        assert_eq!(Shipped::load(&path), Some(s));
        // Saves never go backwards.
        Shipped::from_manifest(41, &m).save(&path).unwrap();
        assert_eq!(Shipped::load(&path).map(|r| r.seq), Some(42));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Shipped::load(&path), None);
        Shipped::discard(&path);
        assert!(!path.exists());
    }
}
