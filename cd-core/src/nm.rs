//! Applying N:M change sets last-writer-wins: which incoming changes a replica takes.
//!
//! In an N:M content set every change carries the [`Version`] of its write (see
//! [`crate::lww`]). A replica holds, per path, the version of what it has there (or of
//! the delete that removed it: a tombstone). Both kinds of body reduce to the same
//! per-path question, [`lww::resolve`]:
//!
//! - [`filter_changes`]: an incremental body keeps the changes that win against what
//!   is held (earlier changes of the same body count as held for later ones) and drops
//!   the others.
//! - [`merge_full`]: a full manifest from one member is not "the tree to hold" as it is
//!   in a 1:N set: the replica keeps every path whose version wins against the sender's
//!   (or that the sender knows nothing of) and takes the sender's entry (or its
//!   absence, under a tombstone) where the sender's version wins. So a reconcile
//!   converges and never clobbers a newer write.
//!
//! Both return the versions to record once the result is applied and the conflicts
//! found (concurrent writes, for the job log).

use std::collections::{BTreeMap, BTreeSet};

use crate::changeset::Change;
use crate::lww::{self, Conflict, Version};
use crate::manifest::{Entry, EntryKind, Manifest, ManifestError};
use crate::path::RelPath;

/// What a replica holds of one path: the version of the write that put it there, or of
/// the delete that removed it (`deleted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub version: Version,
    pub deleted: bool,
}

/// What to take of a body, and what taking it means.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome<T> {
    /// The changes to apply (incremental), or the tree to hold (full).
    pub take: T,
    /// Per path, what the replica holds once `take` is applied.
    pub record: BTreeMap<RelPath, Held>,
    /// Concurrent writes resolved, one per path and pair.
    pub conflicts: Vec<Conflict>,
    /// Incoming writes that lost (not applied).
    pub skipped: usize,
}

/// The changes of an incremental body that win, each change with its version, against
/// what `held` says the replica holds. A rename is one write at both of its paths
/// (its `from` deleted, its `to` written) and is taken only where it wins at both.
///
/// A removal of a directory that wins is a removal of everything beneath it in
/// `local` too, except what is newer there than the removal (a concurrent write into
/// the directory): then only what loses goes, and the directories above what stays
/// stay (the replica's tree before the body, `local`, says what is beneath).
pub fn filter_changes(
    changes: Vec<(Change, Version)>,
    local: &Manifest,
    held: impl Fn(&RelPath) -> Option<Held>,
) -> Outcome<Vec<Change>> {
    let mut out = Outcome::<Vec<Change>>::default();
    let current =
        |out: &Outcome<Vec<Change>>, p: &RelPath| out.record.get(p).cloned().or_else(|| held(p));
    for (change, v) in changes {
        let writes: Vec<(RelPath, bool)> = match &change {
            Change::Upsert(e) => vec![(e.path.clone(), false)],
            Change::Remove(p) => vec![(p.clone(), true)],
            Change::Rename { from, to } => vec![(from.clone(), true), (to.clone(), false)],
        };
        let mut wins = true;
        for (p, _) in &writes {
            let cur = current(&out, p);
            let r = lww::resolve(p, cur.as_ref().map(|h| &h.version), &v);
            if let Some(c) = r.conflict
                && !out.conflicts.contains(&c)
            {
                out.conflicts.push(c);
            }
            wins &= r.take;
        }
        if wins && let Change::Remove(p) = &change {
            remove_subtree(&mut out, local, p, &v, &current);
            continue;
        }
        if wins {
            for (p, deleted) in writes {
                out.record.insert(
                    p,
                    Held {
                        version: v.clone(),
                        deleted,
                    },
                );
            }
            out.take.push(change);
        } else {
            out.skipped += 1;
        }
    }
    out
}

/// A winning removal of `p` by `v`: the whole subtree, or (where something beneath is
/// newer) the losing paths one by one.
fn remove_subtree(
    out: &mut Outcome<Vec<Change>>,
    local: &Manifest,
    p: &RelPath,
    v: &Version,
    current: &impl Fn(&Outcome<Vec<Change>>, &RelPath) -> Option<Held>,
) {
    let mut prefix = p.as_bytes().to_vec();
    prefix.push(b'/');
    let below: Vec<RelPath> = local
        .iter()
        .map(|e| &e.path)
        .filter(|q| q.as_bytes().starts_with(&prefix))
        .cloned()
        .collect();
    let mut survivors = Vec::new();
    for q in &below {
        let cur = current(out, q);
        let r = lww::resolve(q, cur.as_ref().map(|h| &h.version), v);
        if !r.take && cur.is_some_and(|h| !h.deleted) {
            if let Some(c) = r.conflict
                && !out.conflicts.contains(&c)
            {
                out.conflicts.push(c);
            }
            survivors.push(q.clone());
        }
    }
    let holds_survivor = |d: &RelPath| {
        let mut pre = d.as_bytes().to_vec();
        pre.push(b'/');
        survivors.iter().any(|s| s.as_bytes().starts_with(&pre))
    };
    let tomb = |out: &mut Outcome<Vec<Change>>, q: &RelPath| {
        out.record.insert(
            q.clone(),
            Held {
                version: v.clone(),
                deleted: true,
            },
        );
    };
    if survivors.is_empty() {
        tomb(out, p);
        for q in &below {
            tomb(out, q);
        }
        out.take.push(Change::Remove(p.clone()));
        return;
    }
    for q in below {
        if survivors.contains(&q) || holds_survivor(&q) {
            continue;
        }
        tomb(out, &q);
        out.take.push(Change::Remove(q));
    }
}

/// The tree a replica holding `local` should hold after a full manifest `received`
/// whose paths carry `versions` (the sender's version of each entry, and its
/// tombstones with `deleted`), per path last-writer-wins against `held`.
///
/// A path the sender has no version for keeps what the replica has, except a local
/// path the replica has no version for either (content that never travelled): it is
/// removed as in a 1:N reconcile unless `keep_unversioned` (a source member, whose
/// unversioned paths are its own writes not yet captured). A write that wins keeps its
/// parent directories (from the replica, else from the sender); an entry left without
/// a parent directory is dropped, and a hard link whose target did not stay the same
/// content becomes a plain file.
pub fn merge_full(
    received: &Manifest,
    versions: &BTreeMap<RelPath, Held>,
    local: &Manifest,
    held: impl Fn(&RelPath) -> Option<Held>,
    keep_unversioned: bool,
) -> Result<Outcome<Manifest>, ManifestError> {
    let mut out = Outcome::<Manifest>::default();
    let paths: BTreeSet<&RelPath> = received
        .iter()
        .map(|e| &e.path)
        .chain(local.iter().map(|e| &e.path))
        .chain(versions.keys())
        .collect();
    let mut tree: BTreeMap<RelPath, Entry> = BTreeMap::new();
    for p in paths {
        let h = held(p);
        let theirs = received.get(p);
        let take = match versions.get(p) {
            Some(inc) => {
                let r = lww::resolve(p, h.as_ref().map(|h| &h.version), &inc.version);
                if let Some(c) = r.conflict {
                    out.conflicts.push(c);
                }
                // Re-delivery of what is held heals a copy that differs from it.
                let same = h.as_ref().is_some_and(|h| h.version == inc.version);
                if r.take || same {
                    out.record.insert(
                        p.clone(),
                        Held {
                            version: inc.version.clone(),
                            deleted: theirs.is_none(),
                        },
                    );
                    true
                } else {
                    out.skipped += 1;
                    false
                }
            }
            // The sender knows nothing of it: keep what is here, unless nobody does.
            None => h.is_none() && !keep_unversioned && theirs.is_none(),
        };
        let chosen = if take { theirs } else { local.get(p) };
        if let Some(e) = chosen {
            tree.insert(p.clone(), e.clone());
        }
    }
    // Parents: kept from the replica or the sender; else the entry goes.
    let paths: Vec<RelPath> = tree.keys().cloned().collect();
    for p in paths {
        let mut ok = true;
        let mut missing = Vec::new();
        let mut cur = p.parent();
        while let Some(d) = cur {
            match tree.get(&d) {
                Some(e) if e.is_dir() => break,
                Some(_) => {
                    ok = false;
                    break;
                }
                None => {
                    match local
                        .get(&d)
                        .filter(|e| e.is_dir())
                        .or_else(|| received.get(&d).filter(|e| e.is_dir()))
                    {
                        Some(e) => missing.push(e.clone()),
                        None => {
                            ok = false;
                            break;
                        }
                    }
                }
            }
            cur = d.parent();
        }
        if ok {
            for e in missing {
                tree.insert(e.path.clone(), e);
            }
        } else {
            tree.remove(&p);
        }
    }
    // Hard links whose target did not stay the same content: plain files.
    let snapshot: BTreeMap<RelPath, Option<[u8; 32]>> = tree
        .iter()
        .map(|(p, e)| (p.clone(), e.hash().copied()))
        .collect();
    for e in tree.values_mut() {
        if let EntryKind::File {
            hash, hardlink_to, ..
        } = &mut e.kind
            && let Some(t) = hardlink_to
            && snapshot.get(t).copied().flatten() != Some(*hash)
        {
            *hardlink_to = None;
        }
    }
    out.take = Manifest::from_entries(tree.into_values())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{dir, file, p, version as v};

    fn held(map: &BTreeMap<RelPath, Held>) -> impl Fn(&RelPath) -> Option<Held> + '_ {
        |p| map.get(p).cloned()
    }

    fn h(version: Version, deleted: bool) -> Held {
        Held { version, deleted }
    }

    fn paths(m: &Manifest) -> Vec<String> {
        m.iter().map(|e| e.path.to_string()).collect()
    }

    #[test]
    fn incremental_takes_winners_only_and_reports_concurrent_losers() {
        let mut store = BTreeMap::new();
        store.insert(p("a"), h(v("ed2", 20, 1, &[]), false));
        store.insert(p("b"), h(v("ed1", 5, 1, &[]), false));
        let changes = vec![
            // Older and concurrent with ed2's write of `a`: loses, a conflict.
            (Change::Upsert(file("a", 1)), v("ed1", 10, 2, &[])),
            // ed1's own later write of `b`: an ordinary update.
            (Change::Upsert(file("b", 2)), v("ed1", 11, 2, &[])),
            // A new path.
            (Change::Upsert(file("c", 3)), v("ed1", 12, 2, &[])),
            // Removed within the same body after its write: the write counts as held.
            (Change::Remove(p("c")), v("ed1", 13, 2, &[])),
        ];
        let out = filter_changes(changes, &Manifest::new(), held(&store));
        assert_eq!(
            out.take,
            vec![
                Change::Upsert(file("b", 2)),
                Change::Upsert(file("c", 3)),
                Change::Remove(p("c")),
            ]
        );
        assert_eq!(out.skipped, 1);
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(out.conflicts[0].winner.origin, "ed2");
        assert_eq!(out.conflicts[0].loser.origin, "ed1");
        assert!(out.record[&p("c")].deleted);
        assert!(!out.record[&p("b")].deleted);
        assert!(!out.record.contains_key(&p("a")));
    }

    #[test]
    fn a_delete_loses_to_a_later_concurrent_write_and_wins_over_an_earlier_one() {
        let mut store = BTreeMap::new();
        store.insert(p("x"), h(v("ed2", 30, 4, &[]), false));
        let out = filter_changes(
            vec![(Change::Remove(p("x")), v("ed1", 25, 3, &[]))],
            &Manifest::new(),
            held(&store),
        );
        assert!(out.take.is_empty());
        assert_eq!(out.conflicts.len(), 1);
        let out = filter_changes(
            vec![(Change::Remove(p("x")), v("ed1", 35, 3, &[]))],
            &Manifest::new(),
            held(&store),
        );
        assert_eq!(out.take, vec![Change::Remove(p("x"))]);
        assert_eq!(out.conflicts[0].winner.origin, "ed1");
        // A delete made after seeing ed2's write: no conflict.
        let out = filter_changes(
            vec![(Change::Remove(p("x")), v("ed1", 35, 3, &[("ed2", 4)]))],
            &Manifest::new(),
            held(&store),
        );
        assert_eq!(out.take.len(), 1);
        assert!(out.conflicts.is_empty());
    }

    #[test]
    fn a_directory_removal_spares_newer_writes_beneath_it() {
        let local = Manifest::from_entries([
            dir("d"),
            dir("d/e"),
            file("d/e/new", 1),
            file("d/old", 2),
            dir("d/z"),
            file("d/z/old", 3),
        ])
        .unwrap();
        let mut store = BTreeMap::new();
        for (path, wall) in [
            ("d", 10),
            ("d/e", 10),
            ("d/old", 10),
            ("d/z", 10),
            ("d/z/old", 10),
        ] {
            store.insert(p(path), h(v("ed1", wall, 1, &[]), false));
        }
        // ed2 wrote `d/e/new` after ed1's removal of `d`, concurrently.
        store.insert(p("d/e/new"), h(v("ed2", 90, 7, &[]), false));
        let rm = v("ed1", 50, 2, &[]);
        let out = filter_changes(
            vec![(Change::Remove(p("d")), rm.clone())],
            &local,
            held(&store),
        );
        assert_eq!(
            out.take,
            vec![
                Change::Remove(p("d/old")),
                Change::Remove(p("d/z")),
                Change::Remove(p("d/z/old")),
            ]
        );
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(out.conflicts[0].path, p("d/e/new"));
        assert!(
            !out.record.contains_key(&p("d")),
            "d stays, holding the newer write"
        );
        let tree = crate::changeset::ChangeSet {
            origin: "ed1".into(),
            seq: 2,
            body: crate::changeset::ChangeBody::Incremental(out.take),
        }
        .desired(&local)
        .unwrap();
        assert_eq!(paths(&tree), ["d", "d/e", "d/e/new"]);
        // Nothing newer beneath: one removal, tombstones for all.
        store.insert(p("d/e/new"), h(v("ed2", 20, 7, &[]), false));
        let out = filter_changes(vec![(Change::Remove(p("d")), rm)], &local, held(&store));
        assert_eq!(out.take, vec![Change::Remove(p("d"))]);
        assert_eq!(out.record.len(), 6);
        assert!(out.record.values().all(|h| h.deleted));
    }

    #[test]
    fn a_rename_must_win_at_both_paths() {
        let mut store = BTreeMap::new();
        store.insert(p("to"), h(v("ed2", 50, 1, &[]), false));
        let out = filter_changes(
            vec![(
                Change::Rename {
                    from: p("from"),
                    to: p("to"),
                },
                v("ed1", 40, 1, &[]),
            )],
            &Manifest::new(),
            held(&store),
        );
        assert!(out.take.is_empty());
        assert!(out.record.is_empty());
    }

    #[test]
    fn full_merge_keeps_newer_paths_and_takes_winning_ones() {
        // The replica (a plain target) holds `a` from ed2 (newer than the sender's),
        // `b` as the sender has it, `old` from nobody, and `d/x` from ed2 which the
        // sender has never seen.
        let local = Manifest::from_entries([
            file("a", 9),
            file("b", 2),
            dir("d"),
            file("d/x", 4),
            file("old", 7),
        ])
        .unwrap();
        let mut store = BTreeMap::new();
        store.insert(p("a"), h(v("ed2", 100, 3, &[]), false));
        store.insert(p("b"), h(v("ed1", 10, 1, &[]), false));
        store.insert(p("d"), h(v("ed2", 90, 2, &[]), false));
        store.insert(p("d/x"), h(v("ed2", 91, 2, &[]), false));
        // ed1's tree: an older `a`, `b` rewritten, a new `c`, and a tombstone for `gone`.
        let received = Manifest::from_entries([file("a", 1), file("b", 5), file("c", 6)]).unwrap();
        let mut versions = BTreeMap::new();
        versions.insert(p("a"), h(v("ed1", 50, 2, &[]), false));
        versions.insert(p("b"), h(v("ed1", 60, 3, &[]), false));
        versions.insert(p("c"), h(v("ed1", 61, 3, &[]), false));
        let out = merge_full(&received, &versions, &local, held(&store), false).unwrap();
        let got = &out.take;
        assert_eq!(paths(got), ["a", "b", "c", "d", "d/x"]);
        assert_eq!(got.get(&p("a")), Some(&file("a", 9)), "newer write kept");
        assert_eq!(got.get(&p("b")), Some(&file("b", 5)), "winning write taken");
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(out.conflicts[0].path, p("a"));
        assert_eq!(out.skipped, 1);
        assert_eq!(
            out.record.keys().map(|p| p.to_string()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        // A source member keeps its unversioned `old` (its own write, not yet captured).
        let out = merge_full(&received, &versions, &local, held(&store), true).unwrap();
        assert!(out.take.get(&p("old")).is_some());
    }

    #[test]
    fn full_merge_tombstones_remove_only_what_they_beat_and_keep_needed_parents() {
        let local = Manifest::from_entries([dir("d"), file("d/new", 3), file("d/old", 1)]).unwrap();
        let mut store = BTreeMap::new();
        store.insert(p("d"), h(v("ed1", 10, 1, &[]), false));
        store.insert(p("d/old"), h(v("ed1", 10, 1, &[]), false));
        // ed2 wrote `d/new` after ed1 deleted `d` (concurrently).
        store.insert(p("d/new"), h(v("ed2", 80, 5, &[]), false));
        let received = Manifest::new();
        let mut versions = BTreeMap::new();
        versions.insert(p("d"), h(v("ed1", 70, 2, &[]), true));
        versions.insert(p("d/old"), h(v("ed1", 70, 2, &[]), true));
        let out = merge_full(&received, &versions, &local, held(&store), false).unwrap();
        // `d/old` goes; `d/new` stays, and with it its directory.
        assert_eq!(paths(&out.take), ["d", "d/new"]);
        assert!(out.record[&p("d/old")].deleted);
    }

    #[test]
    fn full_merge_is_order_independent_between_two_replicas() {
        // Two replicas that exchange full manifests end with the same tree.
        let a_tree = Manifest::from_entries([file("f", 1), file("g", 2)]).unwrap();
        let b_tree = Manifest::from_entries([file("f", 3), file("h", 4)]).unwrap();
        let mut a_store = BTreeMap::new();
        a_store.insert(p("f"), h(v("a", 10, 1, &[]), false));
        a_store.insert(p("g"), h(v("a", 11, 1, &[]), false));
        let mut b_store = BTreeMap::new();
        b_store.insert(p("f"), h(v("b", 12, 1, &[]), false));
        b_store.insert(p("h"), h(v("b", 13, 1, &[]), false));
        let a_after = merge_full(&b_tree, &b_store, &a_tree, held(&a_store), true).unwrap();
        let b_after = merge_full(&a_tree, &a_store, &b_tree, held(&b_store), true).unwrap();
        assert_eq!(a_after.take, b_after.take);
        assert_eq!(a_after.take.get(&p("f")), Some(&file("f", 3)));
        assert_eq!(a_after.conflicts, b_after.conflicts);
    }
}
