//! [`ChangeSet`]: a numbered batch of changes from one origin node.
//!
//! Manual and scheduled sync send a [`ChangeBody::Full`] manifest (the replica deletes
//! what is not listed: a reconcile). Real-time capture sends [`ChangeBody::Incremental`]
//! operations. Both reduce to one thing the replica can plan against: the tree it
//! should hold afterwards ([`ChangeSet::desired`]).
//!
//! Re-delivery of a `Full` body is idempotent: the desired tree does not depend on
//! what the replica held. An `Incremental` body is not (re-applying
//! `[Rename a→b, Upsert a]` moves the new `a` over `b`), so a replica must apply each
//! `(origin, seq)` at most once and fall back to a `Full` reconcile on a gap.

use std::collections::BTreeMap;

use crate::manifest::{Entry, EntryKind, Manifest, ManifestError, Meta};
use crate::path::RelPath;

/// A batch of changes from `origin`, numbered by `seq` (strictly increasing per origin
/// and content set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSet {
    pub origin: String,
    pub seq: u64,
    pub body: ChangeBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeBody {
    /// The whole tree: anything the replica holds that is not listed is removed.
    Full(Manifest),
    /// Individual operations, applied in order onto the replica's current tree.
    Incremental(Vec<Change>),
}

/// One incremental operation.
///
/// Hard links are followed as inodes: renaming or removing one path of a hard-linked
/// file leaves the other paths linked to each other, and the `hardlink_to` of the
/// resulting tree always names the first path (tree order) of each inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create or replace an entry (its parent must exist after the preceding changes).
    ///
    /// - A directory over a directory changes its attributes only; its contents stay.
    /// - Anything else over a directory replaces the directory and everything beneath it.
    /// - A regular file over a regular file with the same hash and size is the same
    ///   inode with new attributes (every hard link of it gets them) when `hardlink_to`
    ///   is `None` or names a path of that same inode. Otherwise it is a new inode: a
    ///   plain file, or, with `hardlink_to: Some(t)`, another link to the inode at `t`
    ///   (which must then be a regular file with the same hash and size; if `t` does not
    ///   exist the entry becomes a plain file). The entry's `meta` becomes the inode's.
    Upsert(Entry),
    /// Remove an entry and, for a directory, everything beneath it. Nothing if absent.
    Remove(RelPath),
    /// Move an entry (and, for a directory, everything beneath it), replacing whatever
    /// is at `to` and beneath it. Nothing if `from` is absent or equals `to`. Moved
    /// paths that would exceed [`MAX_PATH_LEN`](crate::path::MAX_PATH_LEN) are dropped.
    Rename { from: RelPath, to: RelPath },
}

impl ChangeSet {
    /// The tree the replica should hold after applying this change set on top of `local`.
    ///
    /// For [`ChangeBody::Incremental`] the changes are applied in order (see [`Change`]).
    /// Errors when the result is not a valid manifest (an entry without its parent
    /// directory) or a hard link names a path with other content.
    pub fn desired(&self, local: &Manifest) -> Result<Manifest, ManifestError> {
        match &self.body {
            ChangeBody::Full(m) => Ok(m.clone()),
            ChangeBody::Incremental(changes) => apply_changes(local, changes),
        }
    }
}

fn apply_changes(local: &Manifest, changes: &[Change]) -> Result<Manifest, ManifestError> {
    let mut tree = Tree::new(local);
    for c in changes {
        match c {
            Change::Upsert(e) => tree.upsert(e)?,
            Change::Remove(p) => tree.remove_subtree(p),
            Change::Rename { from, to } => tree.rename(from, to),
        }
    }
    tree.into_manifest()
}

/// A tree while changes are applied. Hard links are kept as shared inode numbers, not
/// as `hardlink_to` paths, so a rename or removal of one path of an inode never leaves
/// the others pointing at a stale path; `hardlink_to` is derived again at the end.
#[derive(Debug)]
struct Tree {
    /// Path to inode number (an index into `inodes`).
    paths: BTreeMap<RelPath, usize>,
    /// Kind (`hardlink_to` always `None`) and attributes of each inode. Inodes no path
    /// refers to any more are left in place.
    inodes: Vec<(EntryKind, Meta)>,
}

impl Tree {
    fn new(m: &Manifest) -> Self {
        let mut t = Tree {
            paths: BTreeMap::new(),
            inodes: Vec::with_capacity(m.len()),
        };
        let mut links = Vec::new();
        for e in m.iter() {
            match &e.kind {
                EntryKind::File {
                    hardlink_to: Some(target),
                    ..
                } => links.push((e, target)),
                kind => {
                    let id = t.new_inode(kind.clone(), e.meta);
                    t.paths.insert(e.path.clone(), id);
                }
            }
        }
        // A valid manifest's link targets are files that are not links themselves.
        for (e, target) in links {
            let id = match t.paths.get(target) {
                Some(&id) => id,
                None => t.new_inode(unlinked(&e.kind), e.meta),
            };
            t.paths.insert(e.path.clone(), id);
        }
        t
    }

    fn new_inode(&mut self, kind: EntryKind, meta: Meta) -> usize {
        self.inodes.push((kind, meta));
        self.inodes.len() - 1
    }

    /// `p` and everything beneath it that is present, in path order.
    fn subtree(&self, p: &RelPath) -> Vec<RelPath> {
        let mut out: Vec<RelPath> = self
            .paths
            .get_key_value(p)
            .map(|(k, _)| k.clone())
            .into_iter()
            .collect();
        let mut prefix = p.as_bytes().to_vec();
        prefix.push(b'/');
        let mut lowest = prefix.clone();
        lowest.push(1); // the smallest byte a name may start with
        // Too long to be valid means too long for anything to lie beneath `p`.
        if let Ok(lowest) = RelPath::new(lowest) {
            out.extend(
                self.paths
                    .range(lowest..)
                    .map(|(k, _)| k)
                    .take_while(|k| k.as_bytes().starts_with(&prefix))
                    .cloned(),
            );
        }
        out
    }

    fn remove_subtree(&mut self, p: &RelPath) {
        for k in self.subtree(p) {
            self.paths.remove(&k);
        }
    }

    fn upsert(&mut self, e: &Entry) -> Result<(), ManifestError> {
        let current = self.paths.get(&e.path).copied();
        let current_kind = current.map(|id| &self.inodes[id].0);
        match &e.kind {
            EntryKind::Dir if matches!(current_kind, Some(EntryKind::Dir)) => {
                // Attributes only: the contents stay.
                if let Some(id) = current {
                    self.inodes[id].1 = e.meta;
                }
            }
            EntryKind::File {
                size,
                hash,
                hardlink_to,
            } => {
                let bad = || ManifestError::BadHardlink {
                    path: e.path.clone(),
                    target: hardlink_to.clone().unwrap_or_else(|| e.path.clone()),
                };
                // The inode a hard link joins; a link to a missing path is a plain file.
                let join = match hardlink_to {
                    Some(t) if t == &e.path => return Err(bad()),
                    Some(t) => match self.paths.get(t) {
                        Some(&id) => match &self.inodes[id].0 {
                            EntryKind::File {
                                size: s, hash: h, ..
                            } if s == size && h == hash => Some(id),
                            _ => return Err(bad()),
                        },
                        None => None,
                    },
                    None => None,
                };
                let in_place = match (join, current, current_kind) {
                    (Some(id), Some(cur), _) => id == cur,
                    (
                        None,
                        Some(_),
                        Some(EntryKind::File {
                            size: s, hash: h, ..
                        }),
                    ) => hardlink_to.is_none() && s == size && h == hash,
                    _ => false,
                };
                let id = match (in_place, current, join) {
                    (true, Some(cur), _) => cur,
                    (_, _, Some(id)) => {
                        self.remove_subtree(&e.path);
                        id
                    }
                    _ => {
                        self.remove_subtree(&e.path);
                        self.new_inode(unlinked(&e.kind), e.meta)
                    }
                };
                // The entry is the inode's latest state: every path of it sees the meta.
                self.inodes[id].1 = e.meta;
                self.paths.insert(e.path.clone(), id);
            }
            kind => {
                self.remove_subtree(&e.path);
                let id = self.new_inode(kind.clone(), e.meta);
                self.paths.insert(e.path.clone(), id);
            }
        }
        Ok(())
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) {
        if from == to {
            return;
        }
        let moved: Vec<(RelPath, usize)> = self
            .subtree(from)
            .into_iter()
            .filter_map(|k| self.paths.remove_entry(&k))
            .collect();
        if moved.is_empty() {
            return;
        }
        self.remove_subtree(to);
        for (path, id) in moved {
            // A path that would exceed PATH_MAX cannot be represented (nor scanned on
            // the source): it is left out, as is everything beneath it.
            if let Some(p) = path.rebase(from, to) {
                self.paths.insert(p, id);
            }
        }
    }

    fn into_manifest(self) -> Result<Manifest, ManifestError> {
        // Each inode's first path in tree order is the one the others link to.
        let mut first: Vec<Option<&RelPath>> = vec![None; self.inodes.len()];
        for (p, &id) in &self.paths {
            if matches!(self.inodes[id].0, EntryKind::File { .. })
                && first[id].is_none_or(|f| p.cmp_tree(f).is_lt())
            {
                first[id] = Some(p);
            }
        }
        let entries: Vec<Entry> = self
            .paths
            .iter()
            .map(|(p, &id)| {
                let (kind, meta) = &self.inodes[id];
                let kind = match kind {
                    EntryKind::File { size, hash, .. } => EntryKind::File {
                        size: *size,
                        hash: *hash,
                        hardlink_to: first[id].filter(|f| *f != p).cloned(),
                    },
                    other => other.clone(),
                };
                Entry {
                    path: p.clone(),
                    kind,
                    meta: *meta,
                }
            })
            .collect();
        Manifest::from_entries(entries)
    }
}

/// `kind` with `hardlink_to` cleared.
fn unlinked(kind: &EntryKind) -> EntryKind {
    match kind {
        EntryKind::File { size, hash, .. } => EntryKind::File {
            size: *size,
            hash: *hash,
            hardlink_to: None,
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::{M, dir, file, link, m, p};
    fn apply(local: &Manifest, changes: Vec<Change>) -> Result<Manifest, ManifestError> {
        ChangeSet {
            origin: "o".into(),
            seq: 1,
            body: ChangeBody::Incremental(changes),
        }
        .desired(local)
    }
    fn rename(from: &str, to: &str) -> Change {
        Change::Rename {
            from: p(from),
            to: p(to),
        }
    }

    #[test]
    fn full_body_is_the_manifest() {
        let full = m([dir("x"), file("x/y", 1)]);
        let cs = ChangeSet {
            origin: "o".into(),
            seq: 1,
            body: ChangeBody::Full(full.clone()),
        };
        assert_eq!(cs.desired(&m([file("z", 2)])).unwrap(), full);
    }

    #[test]
    fn upserting_a_directory_over_a_directory_keeps_its_contents() {
        let local = m([dir("d"), file("d/f", 1), dir("d/e"), file("d/e/g", 2)]);
        let chmod = Entry {
            meta: Meta { mode: 0o700, ..M },
            ..dir("d")
        };
        let got = apply(&local, vec![Change::Upsert(chmod.clone())]).unwrap();
        assert_eq!(
            got,
            m([chmod, file("d/f", 1), dir("d/e"), file("d/e/g", 2)])
        );
    }

    #[test]
    fn upserts_replace_across_types() {
        let local = m([dir("d"), file("d/f", 1), file("g", 2)]);
        let got = apply(
            &local,
            vec![Change::Upsert(file("d", 3)), Change::Upsert(dir("g"))],
        )
        .unwrap();
        assert_eq!(got, m([file("d", 3), dir("g")]));
    }

    #[test]
    fn removes_take_the_subtree_and_ignore_absent_paths() {
        let local = m([dir("d"), file("d/f", 1), file("d.x", 2), file("d-y", 3)]);
        let got = apply(
            &local,
            vec![Change::Remove(p("d")), Change::Remove(p("nope"))],
        )
        .unwrap();
        assert_eq!(
            got,
            m([file("d.x", 2), file("d-y", 3)]),
            "siblings sharing a prefix stay"
        );
    }

    #[test]
    fn renaming_a_directory_moves_its_subtree_over_the_destination() {
        let local = m([
            dir("a"),
            dir("a/b"),
            file("a/b/c", 1),
            file("a.txt", 2),
            dir("z"),
            file("z/old", 3),
        ]);
        let got = apply(&local, vec![rename("a", "z"), rename("missing", "q")]).unwrap();
        assert_eq!(
            got,
            m([dir("z"), dir("z/b"), file("z/b/c", 1), file("a.txt", 2)])
        );
    }

    #[test]
    fn replacing_a_link_target_keeps_the_other_links_together() {
        let local = m([file("a", 1), link("b", "a", 1), link("c", "a", 1)]);
        let got = apply(&local, vec![Change::Upsert(file("a", 9))]).unwrap();
        assert_eq!(got, m([file("a", 9), file("b", 1), link("c", "b", 1)]));
    }

    #[test]
    fn removing_or_renaming_a_link_target_keeps_the_links() {
        let local = m([file("a", 1), link("b", "a", 1), link("c", "a", 1)]);
        let got = apply(&local, vec![Change::Remove(p("a"))]).unwrap();
        assert_eq!(got, m([file("b", 1), link("c", "b", 1)]));
        let got = apply(&local, vec![rename("a", "z")]).unwrap();
        assert_eq!(got, m([file("b", 1), link("c", "b", 1), link("z", "b", 1)]));
    }

    #[test]
    fn renaming_a_directory_of_links_keeps_them_linked() {
        let local = m([
            dir("d"),
            file("d/a", 1),
            link("d/b", "d/a", 1),
            link("e", "d/a", 1),
        ]);
        let got = apply(&local, vec![rename("d", "x")]).unwrap();
        // `e` is now the inode's first path in tree order.
        assert_eq!(
            got,
            m([
                file("e", 1),
                dir("x"),
                link("x/a", "e", 1),
                link("x/b", "e", 1)
            ])
        );
    }

    #[test]
    fn same_content_upsert_is_an_attribute_change_of_the_whole_inode() {
        let local = m([file("a", 1), link("b", "a", 1)]);
        let m2 = Meta { mode: 0o600, ..M };
        let got = apply(
            &local,
            vec![Change::Upsert(Entry {
                meta: m2,
                ..link("b", "a", 1)
            })],
        );
        let want = m([
            Entry {
                meta: m2,
                ..file("a", 1)
            },
            Entry {
                meta: m2,
                ..link("b", "a", 1)
            },
        ]);
        assert_eq!(got.unwrap(), want);
    }

    #[test]
    fn new_links_join_the_inode_of_any_of_its_paths() {
        let local = m([file("a", 1), link("b", "a", 1), file("c", 2)]);
        // `b` is itself a link: the new path joins the inode.
        let got = apply(&local, vec![Change::Upsert(link("n", "b", 1))]).unwrap();
        assert_eq!(
            got,
            m([
                file("a", 1),
                link("b", "a", 1),
                file("c", 2),
                link("n", "a", 1)
            ])
        );
        // A link to other content is refused; a link to nothing is a plain file.
        assert!(matches!(
            apply(&local, vec![Change::Upsert(link("n", "c", 1))]),
            Err(ManifestError::BadHardlink { .. })
        ));
        let got = apply(&local, vec![Change::Upsert(link("n", "gone", 1))]).unwrap();
        assert_eq!(got.get(&p("n")), Some(&file("n", 1)));
    }

    #[test]
    fn an_orphan_result_is_an_error() {
        let local = m([dir("a"), file("a/f", 1)]);
        assert!(matches!(
            apply(&local, vec![rename("a", "a/x")]),
            Err(ManifestError::Orphan(_))
        ));
        assert!(matches!(
            apply(&local, vec![Change::Upsert(file("nope/f", 1))]),
            Err(ManifestError::Orphan(_))
        ));
    }

    #[test]
    fn a_rename_past_path_max_drops_what_cannot_be_named_instead_of_panicking() {
        let long = "x".repeat(255);
        let mut chain = vec![dir(&long)];
        for _ in 1..15 {
            let last = chain.last().unwrap().path.display();
            chain.push(dir(&format!("{last}/{long}")));
        }
        let deep = chain.last().unwrap().path.display();
        let to = format!("{deep}/{long}");
        assert_eq!(to.len(), 4095);
        let local = m(chain.into_iter().chain([dir("a"), file("a/f", 1)]));
        let got = apply(&local, vec![rename("a", &to)]).unwrap();
        assert_eq!(got.get(&p(&to)), Some(&dir(&to)));
        assert_eq!(
            got.len(),
            local.len() - 1,
            "`a/f` would be 4097 bytes long: dropped"
        );
    }
}
