//! The reconcile planner: what must travel, and the ordered steps that turn a
//! replica's tree into the source's.
//!
//! Input: the tree the replica should hold (`desired`, usually the source's manifest)
//! and the tree it holds now (`local`, from the replica's own scan). Output: a [`Plan`]:
//!
//! - [`Plan::fetch`]: one [`Fetch`] per distinct content hash the replica does not
//!   already hold anywhere (content present locally under another path is reused, so a
//!   rename on the source is a rename on the replica, never a re-send);
//! - [`Plan::steps`]: an order that is safe to execute one by one:
//!   1. `StageLocal` — claim local content that is reused elsewhere (move it into the
//!      stage if its old path is going away, else copy) before anything is removed;
//!   2. `Remove` — extras and type changes, deepest first;
//!   3. `MakeDir` — parents before children;
//!   4. `PlaceFile` / `Symlink` / `HardLink` in tree order (a hard link after its target);
//!   5. `SetMeta` — attribute-only changes;
//!   6. `SetDirMeta` — directories whose attributes differ or whose contents changed,
//!      deepest first, so a directory's mtime is set after its last child changed.
//!
//! The planner never looks at the disk; the executor (cd-daemon) stages fetched
//! content by hash before running the steps, so a reader never sees a half-written file.
//!
//! # What counts as a difference
//!
//! Attributes are compared on mode and mtime (seconds and nanoseconds), plus uid/gid
//! when [`PlanOptions::owner`] is set; a symlink's mode is never compared (Linux cannot
//! change it).
//!
//! - A **regular file** is right when the local path is a regular file with the same
//!   hash and size and the same `hardlink_to` relation; then only differing attributes
//!   give a `SetMeta`. Otherwise it gets a `PlaceFile` (a new inode).
//! - A **hard link** (`hardlink_to: Some(t)`) is right when the local path is already a
//!   hard link to `t` and `t` keeps its inode (gets no `PlaceFile`); otherwise it gets a
//!   `HardLink`. Its own `meta` is not compared: it is its target's inode, whose
//!   attributes are planned through `t`. A path that is a hard link locally but an
//!   independent file in `desired` gets a `PlaceFile` of its own, even with the same
//!   content. Relations are compared as written, so both manifests are expected in the
//!   scanner's form (`hardlink_to` names the inode's first path in tree order); the
//!   same groups written with other targets are still planned correctly, only with
//!   redundant re-linking.
//! - A **symlink** with the same target gets at most a `SetMeta { symlink: true }`
//!   (owner, mtime); another target gives a `Symlink` step, which replaces atomically.
//! - A **directory** that exists locally is kept (never removed and re-created).
//! - **Type changes**: a file, hard link or symlink replaces another file or symlink
//!   atomically, without a `Remove`. Only a change to or from a directory removes the
//!   old entry first (a directory's contents, which `desired` cannot hold any more,
//!   are removed before it).
//!
//! # Content
//!
//! Every hash a `PlaceFile` needs is staged exactly once: by one `StageLocal` if any
//! local regular file holds it, else by one [`Fetch`] (whose `path` is the first path
//! in step order that needs it). `StageLocal` moves when the source path is vacated
//! (removed, or getting other content or another type) and no other local path
//! sharing its inode survives the `Remove` phase; it copies otherwise. A moved source
//! gets no `Remove`. `PlaceFile::last_use` is set on the last `PlaceFile` of each hash.
//!
//! # Directory attributes
//!
//! `SetDirMeta` is emitted for every desired directory that is created, whose
//! attributes differ, or one of whose direct children is added, removed, replaced,
//! linked, or moved into the stage by a step (those bump its mtime). `SetMeta` and
//! `StageLocal { mode: Copy }` do not change a directory.
//!
//! The reserved `.cdsync` directory never appears: a [`Manifest`] cannot hold it.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use crate::manifest::{Entry, EntryKind, Hash, Manifest, Meta};
use crate::path::RelPath;

/// Content the replica must receive: the source path to read it from and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub path: RelPath,
    pub hash: Hash,
    pub size: u64,
}

/// How local content is claimed into the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageMode {
    /// The old path is going away: rename it into the stage (no copy, no re-send).
    Move,
    /// The old path stays: copy its content into the stage.
    Copy,
}

/// One step of a plan. Paths are relative to the replica's content root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Claim the content at `from` (a regular file whose hash is `hash`) into the stage.
    StageLocal {
        from: RelPath,
        hash: Hash,
        mode: StageMode,
    },
    /// Remove a file, symlink or (by then empty) directory.
    Remove { path: RelPath, dir: bool },
    /// Create a directory (its parent exists by now). Attributes are set by `SetDirMeta`.
    MakeDir { path: RelPath },
    /// Put staged content `hash` at `path` with `meta`. `last_use` says no later step
    /// needs this staged content, so it may be renamed rather than copied.
    PlaceFile {
        path: RelPath,
        hash: Hash,
        meta: Meta,
        last_use: bool,
    },
    /// Create (or atomically replace) a symlink; `meta` carries owner and mtime.
    Symlink {
        path: RelPath,
        target: Vec<u8>,
        meta: Meta,
    },
    /// Make `path` a hard link to `target` (already placed), replacing what is there.
    HardLink { path: RelPath, target: RelPath },
    /// Attributes only, for a file or symlink whose content is already right.
    SetMeta {
        path: RelPath,
        meta: Meta,
        symlink: bool,
    },
    /// Directory attributes, after everything beneath it is done.
    SetDirMeta { path: RelPath, meta: Meta },
}

/// Counters describing a plan, for logs and job results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Files whose content comes over the network (distinct hashes): `fetch.len()`.
    pub fetch_files: u64,
    /// Sum of the sizes of `fetch`.
    pub fetch_bytes: u64,
    /// Paths whose content is reused from local files (moves and copies): the number
    /// of `StageLocal` steps, one per reused hash.
    pub reused_local: u64,
    /// `Remove` steps.
    pub removed: u64,
    /// `MakeDir` steps.
    pub created_dirs: u64,
    /// `PlaceFile` steps.
    pub placed_files: u64,
    /// `Symlink` steps.
    pub symlinks: u64,
    /// `HardLink` steps.
    pub hardlinks: u64,
    /// `SetMeta` steps (files and symlinks whose content is already right).
    pub meta_only: u64,
}

/// The outcome of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub fetch: Vec<Fetch>,
    pub steps: Vec<Step>,
    pub stats: PlanStats,
}

impl Plan {
    /// True when the replica already matches.
    pub fn is_empty(&self) -> bool {
        self.fetch.is_empty() && self.steps.is_empty()
    }
}

/// Options that change what counts as a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Compare and set uid/gid (off when the replica cannot chown, i.e. not root).
    pub owner: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self { owner: true }
    }
}

/// Plans the steps that turn `local` into `desired`. See the module docs.
///
/// Pure and deterministic: the same inputs give the same plan. Runs in
/// O(n log n) for n entries in both trees together.
pub fn plan(desired: &Manifest, local: &Manifest, opts: PlanOptions) -> Plan {
    let diff = Diff::compute(desired, local, opts);
    let needs = content_needs(&diff);
    build(desired, diff, needs)
}

/// Something phase 4 creates at a desired path.
#[derive(Debug, Clone, Copy)]
enum Create<'a> {
    /// A regular file (not a hard link) whose content comes from the stage.
    File {
        entry: &'a Entry,
        hash: &'a Hash,
        size: u64,
    },
    /// A hard link to `target`.
    Link {
        entry: &'a Entry,
        target: &'a RelPath,
    },
    Symlink {
        entry: &'a Entry,
        target: &'a [u8],
    },
}

impl<'a> Create<'a> {
    fn path(&self) -> &'a RelPath {
        match self {
            Create::File { entry, .. }
            | Create::Link { entry, .. }
            | Create::Symlink { entry, .. } => &entry.path,
        }
    }
}

/// Per-path comparison of the two trees, before local content is assigned to the stage.
#[derive(Debug, Default)]
struct Diff<'a> {
    /// Local entries that must be gone before anything is created (extras, and the old
    /// side of a change to or from a directory). Move sources are taken out later.
    removes: Vec<&'a Entry>,
    /// Desired directories missing locally (or where a non-directory is now).
    make_dirs: Vec<&'a Entry>,
    /// Desired files, hard links and symlinks that must be (re)created.
    creates: Vec<Create<'a>>,
    /// Hard-link targets that get a `PlaceFile` (a new inode).
    placed_targets: HashSet<&'a RelPath>,
    /// Desired files and symlinks whose content is right but whose attributes are not.
    set_meta: Vec<&'a Entry>,
    /// Desired directories that exist locally with other attributes.
    dir_meta: Vec<&'a Entry>,
    /// Every local regular file, with what `desired` holds at its path.
    local_files: Vec<LocalFile<'a>>,
}

/// A local regular file: a possible source of content for the stage.
#[derive(Debug, Clone, Copy)]
struct LocalFile<'a> {
    entry: &'a Entry,
    hash: &'a Hash,
    /// The first path of its inode (`hardlink_to`, or its own path).
    inode: &'a RelPath,
    /// Not kept with the same content (removed, or replaced by other content or type).
    vacated: bool,
    /// Gets a `Remove` step (gone, or replaced by a directory).
    removed: bool,
}

impl<'a> Diff<'a> {
    fn compute(desired: &'a Manifest, local: &'a Manifest, opts: PlanOptions) -> Self {
        let mut d = Diff::default();
        let mut links = Vec::new();
        for (want, have) in merge(desired, local) {
            if let Some(
                h @ Entry {
                    kind:
                        EntryKind::File {
                            hash, hardlink_to, ..
                        },
                    ..
                },
            ) = have
            {
                let same_content = matches!(
                    want.map(|w| &w.kind),
                    Some(EntryKind::File { hash: x, .. }) if x == hash
                );
                d.local_files.push(LocalFile {
                    entry: h,
                    hash,
                    inode: hardlink_to.as_ref().unwrap_or(&h.path),
                    vacated: !same_content,
                    removed: want.is_none_or(Entry::is_dir),
                });
            }
            let Some(want) = want else {
                if let Some(h) = have {
                    d.removes.push(h);
                }
                continue;
            };
            let have_kind = have.map(|h| &h.kind);
            match &want.kind {
                EntryKind::Dir => match have {
                    Some(h) if h.is_dir() => {
                        if !same_meta(&want.meta, &h.meta, opts, true) {
                            d.dir_meta.push(want);
                        }
                    }
                    Some(h) => {
                        d.removes.push(h);
                        d.make_dirs.push(want);
                    }
                    None => d.make_dirs.push(want),
                },
                EntryKind::Symlink { target } => {
                    if let (Some(h), Some(EntryKind::Symlink { target: t })) = (have, have_kind)
                        && t == target
                    {
                        if !same_meta(&want.meta, &h.meta, opts, false) {
                            d.set_meta.push(want);
                        }
                    } else {
                        d.replace(have);
                        d.creates.push(Create::Symlink {
                            entry: want,
                            target,
                        });
                    }
                }
                EntryKind::File {
                    hardlink_to: Some(target),
                    ..
                } => {
                    links.push((want, have, target));
                }
                EntryKind::File {
                    size,
                    hash,
                    hardlink_to: None,
                } => {
                    if let (
                        Some(h),
                        Some(EntryKind::File {
                            size: s,
                            hash: x,
                            hardlink_to: None,
                        }),
                    ) = (have, have_kind)
                        && s == size
                        && x == hash
                    {
                        if !same_meta(&want.meta, &h.meta, opts, true) {
                            d.set_meta.push(want);
                        }
                    } else {
                        d.replace(have);
                        d.creates.push(Create::File {
                            entry: want,
                            hash,
                            size: *size,
                        });
                    }
                }
            }
        }
        if links.is_empty() {
            return d;
        }
        let targets: HashSet<&RelPath> = links.iter().map(|l| l.2).collect();
        d.placed_targets = d
            .creates
            .iter()
            .filter_map(|c| match c {
                Create::File { entry, .. } => targets.get(&entry.path).copied(),
                _ => None,
            })
            .collect();
        // A hard link is already right only if it links to the same target locally and
        // that target keeps its inode. Its own attributes are its target's.
        for (want, have, target) in links {
            let linked = matches!(
                have.map(|h| &h.kind),
                Some(EntryKind::File { hardlink_to: Some(t), .. }) if t == target
            ) && !d.placed_targets.contains(target);
            if !linked {
                d.replace(have);
                d.creates.push(Create::Link {
                    entry: want,
                    target,
                });
            }
        }
        d
    }

    /// Something new goes where `have` is: only a directory has to be removed first;
    /// files and symlinks are replaced atomically by the creating step.
    fn replace(&mut self, have: Option<&'a Entry>) {
        if let Some(h) = have
            && h.is_dir()
        {
            self.removes.push(h);
        }
    }
}

/// Both manifests side by side in path order: `(desired, local)` at each path either holds.
fn merge<'a>(
    desired: &'a Manifest,
    local: &'a Manifest,
) -> impl Iterator<Item = (Option<&'a Entry>, Option<&'a Entry>)> {
    let mut d = desired.iter().peekable();
    let mut l = local.iter().peekable();
    std::iter::from_fn(move || match (d.peek(), l.peek()) {
        (None, None) => None,
        (Some(_), None) => Some((d.next(), None)),
        (None, Some(_)) => Some((None, l.next())),
        (Some(a), Some(b)) => match a.path.cmp(&b.path) {
            Ordering::Less => Some((d.next(), None)),
            Ordering::Greater => Some((None, l.next())),
            Ordering::Equal => Some((d.next(), l.next())),
        },
    })
}

/// Attribute equality: mtime always, mode unless `mode` is false (symlinks, whose mode
/// Linux cannot change), uid/gid only when `opts.owner`.
fn same_meta(a: &Meta, b: &Meta, opts: PlanOptions, mode: bool) -> bool {
    (!mode || a.mode == b.mode)
        && a.mtime_sec == b.mtime_sec
        && a.mtime_nsec == b.mtime_nsec
        && (!opts.owner || (a.uid == b.uid && a.gid == b.gid))
}

/// How one hash that `PlaceFile`s need gets into the stage.
#[derive(Debug)]
struct Need<'a> {
    /// `PlaceFile`s of this hash not emitted yet; the one that brings it to 0 is the last use.
    uses: usize,
    /// The local file to claim it from; without one it is fetched.
    source: Option<(&'a RelPath, StageMode)>,
    /// Whether its `Fetch` has been emitted.
    fetched: bool,
}

/// For every hash some `PlaceFile` needs: how often, and the local file to stage it
/// from, if any.
///
/// A source is moved rather than copied when its path is vacated (removed, or replaced
/// by other content or another type) and no other local path that survives the
/// `Remove` phase shares its inode: moving a shared inode into the stage would let the
/// later `PlaceFile` chmod (or rename over) a path that must not change.
fn content_needs<'a>(diff: &Diff<'a>) -> HashMap<&'a Hash, Need<'a>> {
    let mut needs: HashMap<&'a Hash, Need<'a>> = HashMap::new();
    for c in &diff.creates {
        if let Create::File { hash, .. } = c {
            needs
                .entry(hash)
                .or_insert(Need {
                    uses: 0,
                    source: None,
                    fetched: false,
                })
                .uses += 1;
        }
    }
    let candidates: Vec<&LocalFile<'a>> = diff
        .local_files
        .iter()
        .filter(|f| needs.contains_key(f.hash))
        .collect();
    // Per local inode, how many of its paths are not removed.
    let mut alive: HashMap<&RelPath, usize> = HashMap::new();
    for f in &candidates {
        *alive.entry(f.inode).or_default() += usize::from(!f.removed);
    }
    for f in candidates {
        let others_alive = alive[f.inode] - usize::from(!f.removed);
        let mode = if f.vacated && others_alive == 0 {
            StageMode::Move
        } else {
            StageMode::Copy
        };
        if let Some(need) = needs.get_mut(f.hash) {
            match need.source {
                Some((_, StageMode::Move)) => {}
                Some((_, StageMode::Copy)) if mode == StageMode::Copy => {}
                _ => need.source = Some((&f.entry.path, mode)),
            }
        }
    }
    needs
}

/// Orders the diff into steps and fills in fetches and stats.
fn build<'a>(
    desired: &Manifest,
    mut diff: Diff<'a>,
    mut needs: HashMap<&'a Hash, Need<'a>>,
) -> Plan {
    let mut out = Plan::default();
    // Directories whose direct children the steps add, remove or replace.
    let mut touched: HashSet<&'a [u8]> = HashSet::new();
    let mut last: &[u8] = &[];
    let mut touch = |p: &'a RelPath| {
        if let Some(i) = p.as_bytes().iter().rposition(|&b| b == b'/') {
            let parent = &p.as_bytes()[..i];
            // Steps come mostly sorted, so siblings are usually adjacent.
            if parent != last {
                touched.insert(parent);
                last = parent;
            }
        }
    };

    // 1. StageLocal.
    let mut stage: Vec<(&RelPath, &Hash, StageMode)> = needs
        .iter()
        .filter_map(|(h, n)| n.source.map(|(p, m)| (p, *h, m)))
        .collect();
    stage.sort_by(|a, b| a.0.cmp_tree(b.0));
    let mut moved: HashSet<&RelPath> = HashSet::new();
    for (from, hash, mode) in stage {
        if mode == StageMode::Move {
            moved.insert(from);
            touch(from);
        }
        out.steps.push(Step::StageLocal {
            from: from.clone(),
            hash: *hash,
            mode,
        });
    }
    out.stats.reused_local = out.steps.len() as u64;

    // 2. Remove, deepest first; a moved source is already gone.
    let mut removes: Vec<(usize, &Entry)> = diff
        .removes
        .iter()
        .filter(|e| !moved.contains(&e.path))
        .map(|e| (e.path.depth(), *e))
        .collect();
    removes.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.path.cmp(&b.1.path)));
    for (_, e) in removes {
        touch(&e.path);
        out.steps.push(Step::Remove {
            path: e.path.clone(),
            dir: e.is_dir(),
        });
        out.stats.removed += 1;
    }

    // 3. MakeDir, parents first.
    diff.make_dirs.sort_by(|a, b| a.path.cmp_tree(&b.path));
    for e in &diff.make_dirs {
        touch(&e.path);
        out.steps.push(Step::MakeDir {
            path: e.path.clone(),
        });
        out.stats.created_dirs += 1;
    }

    // 4. PlaceFile / Symlink / HardLink in tree order, a hard link after its target.
    diff.creates.sort_by(|a, b| a.path().cmp_tree(b.path()));
    let mut waiting: HashMap<&RelPath, Vec<&Entry>> = HashMap::new();
    let link = |out: &mut Plan, entry: &Entry, target: &RelPath| {
        out.steps.push(Step::HardLink {
            path: entry.path.clone(),
            target: target.clone(),
        });
        out.stats.hardlinks += 1;
    };
    for c in &diff.creates {
        touch(c.path());
        match *c {
            Create::File { entry, hash, size } => {
                let mut last_use = true;
                if let Some(need) = needs.get_mut(hash) {
                    need.uses -= 1;
                    last_use = need.uses == 0;
                    if need.source.is_none() && !need.fetched {
                        need.fetched = true;
                        out.fetch.push(Fetch {
                            path: entry.path.clone(),
                            hash: *hash,
                            size,
                        });
                        out.stats.fetch_files += 1;
                        out.stats.fetch_bytes += size;
                    }
                }
                out.steps.push(Step::PlaceFile {
                    path: entry.path.clone(),
                    hash: *hash,
                    meta: entry.meta,
                    last_use,
                });
                out.stats.placed_files += 1;
                if !waiting.is_empty() {
                    for l in waiting.remove(&entry.path).unwrap_or_default() {
                        link(&mut out, l, &entry.path);
                    }
                }
            }
            Create::Link { entry, target } => {
                // A target later in tree order (legal, if unusual) is placed later.
                if diff.placed_targets.contains(target) && target.cmp_tree(&entry.path).is_gt() {
                    waiting.entry(target).or_default().push(entry);
                } else {
                    link(&mut out, entry, target);
                }
            }
            Create::Symlink { entry, target } => {
                out.steps.push(Step::Symlink {
                    path: entry.path.clone(),
                    target: target.to_vec(),
                    meta: entry.meta,
                });
                out.stats.symlinks += 1;
            }
        }
    }
    debug_assert!(waiting.is_empty(), "every placed target was visited");

    // 5. SetMeta.
    diff.set_meta.sort_by(|a, b| a.path.cmp_tree(&b.path));
    for e in &diff.set_meta {
        out.steps.push(Step::SetMeta {
            path: e.path.clone(),
            meta: e.meta,
            symlink: matches!(e.kind, EntryKind::Symlink { .. }),
        });
        out.stats.meta_only += 1;
    }

    // 6. SetDirMeta, deepest first: new directories, other attributes, changed children.
    let mut dirs: HashMap<&RelPath, &Entry> = HashMap::new();
    for e in diff.dir_meta.iter().chain(&diff.make_dirs) {
        dirs.insert(&e.path, e);
    }
    for p in touched {
        if let Some(e) = RelPath::new(p).ok().and_then(|p| desired.get(&p))
            && e.is_dir()
        {
            dirs.insert(&e.path, e);
        }
    }
    let mut dirs: Vec<(usize, &Entry)> = dirs.into_values().map(|e| (e.path.depth(), e)).collect();
    dirs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.path.cmp(&b.1.path)));
    for (_, e) in dirs {
        out.steps.push(Step::SetDirMeta {
            path: e.path.clone(),
            meta: e.meta,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::p;
    fn h(n: u8) -> Hash {
        [n; 32]
    }
    fn meta(mode: u32, mtime: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime_sec: mtime,
            mtime_nsec: 0,
        }
    }
    const FM: Meta = Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_sec: 100,
        mtime_nsec: 0,
    };
    const DM: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec: 100,
        mtime_nsec: 0,
    };
    const SM: Meta = Meta {
        mode: 0o777,
        uid: 0,
        gid: 0,
        mtime_sec: 100,
        mtime_nsec: 0,
    };

    fn dir(path: &str) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::Dir,
            meta: DM,
        }
    }
    fn file(path: &str, n: u8) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::File {
                size: u64::from(n) * 10,
                hash: h(n),
                hardlink_to: None,
            },
            meta: FM,
        }
    }
    fn link(path: &str, target: &str, n: u8) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::File {
                size: u64::from(n) * 10,
                hash: h(n),
                hardlink_to: Some(p(target)),
            },
            meta: FM,
        }
    }
    fn sym(path: &str, target: &str) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
            meta: SM,
        }
    }
    fn with_meta(mut e: Entry, m: Meta) -> Entry {
        e.meta = m;
        e
    }
    fn m(entries: impl IntoIterator<Item = Entry>) -> Manifest {
        Manifest::from_entries(entries).unwrap()
    }
    fn run(desired: &Manifest, local: &Manifest) -> Plan {
        plan(desired, local, PlanOptions::default())
    }
    fn stage(from: &str, n: u8, mode: StageMode) -> Step {
        Step::StageLocal {
            from: p(from),
            hash: h(n),
            mode,
        }
    }
    fn place(path: &str, n: u8, last_use: bool) -> Step {
        Step::PlaceFile {
            path: p(path),
            hash: h(n),
            meta: FM,
            last_use,
        }
    }
    fn remove(path: &str, dir: bool) -> Step {
        Step::Remove { path: p(path), dir }
    }
    fn mkdir(path: &str) -> Step {
        Step::MakeDir { path: p(path) }
    }
    fn hardlink(path: &str, target: &str) -> Step {
        Step::HardLink {
            path: p(path),
            target: p(target),
        }
    }
    fn dirmeta(path: &str) -> Step {
        Step::SetDirMeta {
            path: p(path),
            meta: DM,
        }
    }
    fn fetch(path: &str, n: u8) -> Fetch {
        Fetch {
            path: p(path),
            hash: h(n),
            size: u64::from(n) * 10,
        }
    }

    fn sample_tree() -> Vec<Entry> {
        vec![
            dir("d"),
            file("d/a", 1),
            link("d/b", "d/a", 1),
            dir("d/e"),
            file("d/e/x", 2),
            sym("d/s", "../t"),
            file("t", 3),
            link("u", "d/a", 1),
            dir("empty"),
        ]
    }

    #[test]
    fn identical_trees_give_an_empty_plan() {
        let t = m(sample_tree());
        let plan = run(&t, &t);
        assert!(plan.is_empty(), "{plan:#?}");
        assert_eq!(plan.stats, PlanStats::default());
        assert!(run(&Manifest::new(), &Manifest::new()).is_empty());
    }

    #[test]
    fn everything_new_is_fetched_once_per_hash() {
        let desired = m([
            dir("d"),
            file("d/a", 1),
            file("d/b", 2),
            file("d/c", 1),
            file("e", 2),
        ]);
        let plan = run(&desired, &Manifest::new());
        assert_eq!(plan.fetch, [fetch("d/a", 1), fetch("d/b", 2)]);
        assert_eq!(
            plan.steps,
            [
                mkdir("d"),
                place("d/a", 1, false),
                place("d/b", 2, false),
                place("d/c", 1, true),
                place("e", 2, true),
                dirmeta("d"),
            ]
        );
        assert_eq!(
            plan.stats,
            PlanStats {
                fetch_files: 2,
                fetch_bytes: 30,
                created_dirs: 1,
                placed_files: 4,
                ..PlanStats::default()
            }
        );
    }

    #[test]
    fn rename_is_a_local_move_not_a_fetch() {
        let local = m([dir("a"), file("a/x", 1), dir("b")]);
        let desired = m([dir("a"), dir("b"), file("b/y", 1)]);
        let plan = run(&desired, &local);
        assert!(plan.fetch.is_empty());
        assert_eq!(
            plan.steps,
            [
                stage("a/x", 1, StageMode::Move),
                place("b/y", 1, true),
                dirmeta("a"),
                dirmeta("b")
            ]
        );
        assert_eq!(plan.stats.reused_local, 1);
        assert_eq!(plan.stats.removed, 0, "a moved source needs no Remove");
    }

    #[test]
    fn copy_when_the_source_stays() {
        let local = m([file("x", 1)]);
        let desired = m([file("x", 1), file("y", 1), file("z", 1)]);
        let plan = run(&desired, &local);
        assert!(plan.fetch.is_empty());
        assert_eq!(
            plan.steps,
            [
                stage("x", 1, StageMode::Copy),
                place("y", 1, false),
                place("z", 1, true)
            ]
        );
    }

    #[test]
    fn swapped_contents_are_two_moves() {
        let local = m([file("a", 1), file("b", 2)]);
        let desired = m([file("a", 2), file("b", 1)]);
        let plan = run(&desired, &local);
        assert!(plan.fetch.is_empty());
        assert_eq!(
            plan.steps,
            [
                stage("a", 1, StageMode::Move),
                stage("b", 2, StageMode::Move),
                place("a", 2, true),
                place("b", 1, true),
            ]
        );
    }

    #[test]
    fn several_vacated_sources_of_one_hash_move_one_and_remove_the_rest() {
        let local = m([file("a", 1), file("b", 1)]);
        let desired = m([file("c", 1), file("d", 1)]);
        let plan = run(&desired, &local);
        assert!(plan.fetch.is_empty());
        assert_eq!(
            plan.steps,
            [
                stage("a", 1, StageMode::Move),
                remove("b", false),
                place("c", 1, false),
                place("d", 1, true),
            ]
        );
    }

    #[test]
    fn file_becomes_directory_with_nested_contents() {
        // The old file's content is reused inside the new directory: moved, not removed.
        let local = m([file("x", 1), file("y", 5)]);
        let desired = m([
            dir("x"),
            file("x/a", 1),
            dir("x/z"),
            file("x/z/w", 2),
            dir("y"),
            sym("y/s", "t"),
        ]);
        let plan = run(&desired, &local);
        assert_eq!(plan.fetch, [fetch("x/z/w", 2)]);
        assert_eq!(
            plan.steps,
            [
                stage("x", 1, StageMode::Move),
                remove("y", false),
                mkdir("x"),
                mkdir("x/z"),
                mkdir("y"),
                place("x/a", 1, true),
                place("x/z/w", 2, true),
                Step::Symlink {
                    path: p("y/s"),
                    target: b"t".to_vec(),
                    meta: SM
                },
                dirmeta("x/z"),
                dirmeta("x"),
                dirmeta("y"),
            ]
        );
        assert_eq!(plan.stats.removed, 1);
        assert_eq!(plan.stats.created_dirs, 3);
    }

    #[test]
    fn directory_becomes_file_or_symlink_after_its_contents_are_removed() {
        let local = m([
            dir("d"),
            file("d/a", 1),
            dir("d/e"),
            file("d/e/f", 2),
            sym("d/s", "x"),
            dir("k"),
            dir("k/l"),
        ]);
        let desired = m([file("d", 2), sym("k", "d")]);
        let plan = run(&desired, &local);
        assert!(plan.fetch.is_empty());
        assert_eq!(
            plan.steps,
            [
                stage("d/e/f", 2, StageMode::Move),
                remove("d/a", false),
                remove("d/e", true),
                remove("d/s", false),
                remove("k/l", true),
                remove("d", true),
                remove("k", true),
                place("d", 2, true),
                Step::Symlink {
                    path: p("k"),
                    target: b"d".to_vec(),
                    meta: SM
                },
            ]
        );
    }

    #[test]
    fn file_and_symlink_replace_each_other_without_remove() {
        let local = m([file("a", 1), sym("b", "x")]);
        let desired = m([sym("a", "y"), file("b", 1)]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [
                stage("a", 1, StageMode::Move),
                Step::Symlink {
                    path: p("a"),
                    target: b"y".to_vec(),
                    meta: SM
                },
                place("b", 1, true),
            ]
        );
    }

    #[test]
    fn new_hardlink_group_places_target_then_links() {
        let desired = m([
            dir("d"),
            file("d/a", 1),
            link("d/b", "d/a", 1),
            link("e", "d/a", 1),
        ]);
        let plan = run(&desired, &Manifest::new());
        assert_eq!(plan.fetch, [fetch("d/a", 1)]);
        assert_eq!(
            plan.steps,
            [
                mkdir("d"),
                place("d/a", 1, true),
                hardlink("d/b", "d/a"),
                hardlink("e", "d/a"),
                dirmeta("d"),
            ]
        );
        assert_eq!(plan.stats.hardlinks, 2);
    }

    #[test]
    fn hardlink_waits_for_a_target_later_in_tree_order() {
        // Not the scanner's convention, but a valid manifest.
        let desired = m([link("a", "z", 1), file("z", 1)]);
        let plan = run(&desired, &Manifest::new());
        assert_eq!(plan.steps, [place("z", 1, true), hardlink("a", "z")]);
    }

    #[test]
    fn hardlinks_are_redone_when_the_target_gets_new_content() {
        let local = m([file("a", 1), link("b", "a", 1), link("c", "a", 1)]);
        let desired = m([file("a", 2), link("b", "a", 2), link("c", "a", 2)]);
        let plan = run(&desired, &local);
        assert_eq!(plan.fetch, [fetch("a", 2)]);
        assert_eq!(
            plan.steps,
            [place("a", 2, true), hardlink("b", "a"), hardlink("c", "a")]
        );
    }

    #[test]
    fn unchanged_hardlinks_follow_their_target_attributes() {
        let m2 = meta(0o600, 200);
        let local = m([file("a", 1), link("b", "a", 1)]);
        let desired = m([
            with_meta(file("a", 1), m2),
            with_meta(link("b", "a", 1), m2),
        ]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [Step::SetMeta {
                path: p("a"),
                meta: m2,
                symlink: false
            }]
        );
        assert_eq!(plan.stats.meta_only, 1);
    }

    #[test]
    fn independent_files_become_linked() {
        let local = m([file("a", 1), file("b", 1)]);
        let desired = m([file("a", 1), link("b", "a", 1)]);
        assert_eq!(run(&desired, &local).steps, [hardlink("b", "a")]);
    }

    #[test]
    fn hardlink_that_becomes_independent_gets_its_own_inode() {
        let local = m([file("a", 1), link("b", "a", 1)]);
        let desired = m([file("a", 1), file("b", 1)]);
        let plan = run(&desired, &local);
        assert!(plan.fetch.is_empty());
        assert_eq!(
            plan.steps,
            [stage("a", 1, StageMode::Copy), place("b", 1, true)]
        );
    }

    #[test]
    fn a_shared_inode_is_copied_not_moved_while_another_link_survives() {
        // `p` is vacated, but moving it would move `t`'s inode too.
        let local = m([file("t", 1), link("p", "t", 1)]);
        let desired = m([file("r", 1), file("t", 1)]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [
                stage("p", 1, StageMode::Copy),
                remove("p", false),
                place("r", 1, true)
            ]
        );
        // When every path of the inode goes away, it can be moved.
        let desired = m([file("r", 1)]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [
                stage("p", 1, StageMode::Move),
                remove("t", false),
                place("r", 1, true)
            ]
        );
    }

    #[test]
    fn symlink_retarget_and_symlink_attributes() {
        let local = m([sym("s", "x"), sym("t", "x"), sym("u", "x")]);
        let later = Meta {
            mtime_sec: 300,
            ..SM
        };
        let other_mode = Meta { mode: 0o755, ..SM };
        let desired = m([
            sym("s", "y"),
            with_meta(sym("t", "x"), later),
            with_meta(sym("u", "x"), other_mode),
        ]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [
                Step::Symlink {
                    path: p("s"),
                    target: b"y".to_vec(),
                    meta: SM
                },
                Step::SetMeta {
                    path: p("t"),
                    meta: later,
                    symlink: true
                },
            ],
            "a symlink's mode is not compared"
        );
        assert_eq!(plan.stats.symlinks, 1);
    }

    #[test]
    fn attribute_only_changes() {
        let local = m([dir("d"), file("d/f", 1), file("g", 2)]);
        let chown = Meta {
            uid: 33,
            gid: 33,
            ..FM
        };
        let nsec = Meta {
            mtime_nsec: 5,
            ..DM
        };
        let desired = m([
            with_meta(dir("d"), nsec),
            with_meta(file("d/f", 1), chown),
            file("g", 2),
        ]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [
                Step::SetMeta {
                    path: p("d/f"),
                    meta: chown,
                    symlink: false
                },
                Step::SetDirMeta {
                    path: p("d"),
                    meta: nsec
                },
            ]
        );
        // Without owner handling, uid/gid differences are not differences.
        let plan = plan_no_owner(&desired, &local);
        assert_eq!(
            plan.steps,
            [Step::SetDirMeta {
                path: p("d"),
                meta: nsec
            }]
        );
    }

    fn plan_no_owner(desired: &Manifest, local: &Manifest) -> Plan {
        plan(desired, local, PlanOptions { owner: false })
    }

    #[test]
    fn dir_meta_only_for_dirs_whose_direct_children_changed() {
        let local = m([
            dir("d"),
            dir("d/e"),
            file("d/e/f", 1),
            dir("k"),
            file("k/x", 3),
        ]);
        let desired = m([
            dir("d"),
            dir("d/e"),
            file("d/e/f", 2),
            dir("k"),
            file("k/x", 3),
        ]);
        let plan = run(&desired, &local);
        assert_eq!(plan.steps, [place("d/e/f", 2, true), dirmeta("d/e")]);
    }

    #[test]
    fn last_use_is_on_the_last_place_of_each_hash_in_step_order() {
        // Tree order (`a`, `a/x`, `a.b`) differs from byte order (`a`, `a.b`, `a/x`).
        let desired = m([
            dir("a"),
            file("a/x", 1),
            file("a.b", 1),
            file("c", 2),
            file("b", 1),
        ]);
        let plan = run(&desired, &Manifest::new());
        let places: Vec<(String, bool)> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::PlaceFile { path, last_use, .. } => Some((path.display(), *last_use)),
                _ => None,
            })
            .collect();
        let want = [("a/x", false), ("a.b", false), ("b", true), ("c", true)];
        assert_eq!(places, want.map(|(s, b)| (s.to_owned(), b)));
        assert_eq!(plan.fetch, [fetch("a/x", 1), fetch("c", 2)]);
    }

    #[test]
    fn removes_run_deepest_first_and_moved_sources_are_not_removed() {
        let local = m([
            dir("a"),
            dir("a/b"),
            file("a/b/c", 1),
            file("a/z", 2),
            file("q", 3),
        ]);
        let desired = m([file("n", 1)]);
        let plan = run(&desired, &local);
        assert_eq!(
            plan.steps,
            [
                stage("a/b/c", 1, StageMode::Move),
                remove("a/b", true),
                remove("a/z", false),
                remove("a", true),
                remove("q", false),
                place("n", 1, true),
            ]
        );
        assert_eq!(plan.stats.removed, 4);
    }

    /// A large tree plans correctly: renames become local reuse, rewrites fetches.
    /// (Planner throughput is measured in `bench/`, not asserted here.)
    #[test]
    fn plans_a_large_tree() {
        let hash = |i: u32| -> Hash {
            let mut x = [0; 32];
            x[..4].copy_from_slice(&i.to_le_bytes());
            x
        };
        let tree = |shift: u32| {
            let mut v = Vec::with_capacity(101_000);
            for d in 0..100u32 {
                v.push(dir(&format!("dir{d}")));
                for f in 0..1000u32 {
                    let i = d * 1000 + f;
                    // `shift` renames a tenth of the files and rewrites another tenth.
                    let (name, content) = match i % 10 {
                        0 => (format!("file{i}.{shift}"), i),
                        1 => (format!("file{i}"), i + shift * 10_000_000),
                        _ => (format!("file{i}"), i),
                    };
                    v.push(Entry {
                        path: p(&format!("dir{d}/{name}.html")),
                        kind: EntryKind::File {
                            size: 1000,
                            hash: hash(content),
                            hardlink_to: None,
                        },
                        meta: FM,
                    });
                }
            }
            Manifest::from_entries(v).unwrap()
        };
        let (local, desired) = (tree(0), tree(5));
        let plan = run(&desired, &local);
        assert_eq!(plan.stats.placed_files, 20_000);
        assert_eq!(plan.stats.fetch_files, 10_000);
        assert_eq!(plan.stats.reused_local, 10_000);
        // Everything new: every file placed, once.
        let plan = run(&desired, &Manifest::new());
        assert_eq!(plan.stats.placed_files, 100_000);
    }
}
