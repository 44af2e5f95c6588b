//! Model-based tests of the planner and of incremental change sets.
//!
//! Random trees are built over a small universe of paths (names chosen so that byte
//! order and tree order differ), with contents from a small pool of hashes so content
//! is reused, plus symlinks, hard links and a few attribute variants. A plan is then
//! *executed* on [`Fs`], an in-memory model of a Linux directory tree with inodes, a
//! stage, and directory mtimes that move whenever an entry is added to or removed from
//! a directory. Every step checks its preconditions (a `Remove` of a non-empty
//! directory, a `MakeDir` over an existing path, a `PlaceFile` of unstaged content,
//! etc. fail), and the final tree must equal the desired manifest exactly: kinds,
//! content, attributes and which paths share an inode.

use std::collections::{BTreeMap, HashMap, HashSet};

use cd_core::changeset::{Change, ChangeBody, ChangeSet};
use cd_core::manifest::{Entry, EntryKind, Hash, Manifest, Meta};
use cd_core::path::RelPath;
use cd_core::plan::{Plan, PlanOptions, PlanStats, StageMode, Step, plan};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------
// Model filesystem
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    File { hash: Hash, size: u64 },
    Dir,
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Inode {
    kind: Kind,
    meta: Meta,
}

/// A directory tree with inodes. The root directory is implicit and not tracked.
#[derive(Debug, Clone)]
struct Fs {
    paths: BTreeMap<RelPath, usize>,
    inodes: Vec<Inode>,
    /// Staged content by hash (an inode not reachable by any path).
    stage: HashMap<Hash, usize>,
    /// Next mtime given to a directory whose entries change: negative, so it never
    /// equals a generated one.
    clock: i64,
    /// Whether the executor can chown (`PlanOptions::owner`).
    owner: bool,
}

/// Attributes of new inodes before anything sets them (also what a non-root executor
/// gives as owner).
const FRESH: Meta = Meta {
    mode: 0o700,
    uid: 0,
    gid: 0,
    mtime_sec: 0,
    mtime_nsec: 0,
};

type Res = Result<(), String>;

impl Fs {
    fn from_manifest(m: &Manifest, owner: bool) -> Fs {
        let mut fs = Fs {
            paths: BTreeMap::new(),
            inodes: Vec::new(),
            stage: HashMap::new(),
            clock: -1,
            owner,
        };
        for e in m.iter() {
            let kind = match &e.kind {
                EntryKind::File {
                    hardlink_to: Some(_),
                    ..
                } => continue,
                EntryKind::File {
                    size,
                    hash,
                    hardlink_to: None,
                } => Kind::File {
                    hash: *hash,
                    size: *size,
                },
                EntryKind::Dir => Kind::Dir,
                EntryKind::Symlink { target } => Kind::Symlink(target.clone()),
            };
            let id = fs.new_inode(kind, e.meta);
            fs.paths.insert(e.path.clone(), id);
        }
        for e in m.iter() {
            if let EntryKind::File {
                hardlink_to: Some(t),
                ..
            } = &e.kind
            {
                let id = fs.paths[t];
                fs.paths.insert(e.path.clone(), id);
            }
        }
        fs
    }

    /// The manifest a scan would produce: `hardlink_to` names the first path of each
    /// inode in tree order, and every path shows its inode's attributes.
    fn to_manifest(&self) -> Manifest {
        let mut first: HashMap<usize, &RelPath> = HashMap::new();
        for (p, &id) in &self.paths {
            if matches!(self.inodes[id].kind, Kind::File { .. }) {
                let f = first.entry(id).or_insert(p);
                if p.cmp_tree(f).is_lt() {
                    *f = p;
                }
            }
        }
        Manifest::from_entries(self.paths.iter().map(|(p, &id)| {
            let ino = &self.inodes[id];
            let kind = match &ino.kind {
                Kind::File { hash, size } => EntryKind::File {
                    size: *size,
                    hash: *hash,
                    hardlink_to: Some(first[&id]).filter(|f| *f != p).cloned(),
                },
                Kind::Dir => EntryKind::Dir,
                Kind::Symlink(t) => EntryKind::Symlink { target: t.clone() },
            };
            Entry {
                path: p.clone(),
                kind,
                meta: ino.meta,
            }
        }))
        .expect("the model only holds valid trees")
    }

    fn new_inode(&mut self, kind: Kind, meta: Meta) -> usize {
        self.inodes.push(Inode { kind, meta });
        self.inodes.len() - 1
    }

    fn get(&self, p: &RelPath) -> Option<&Inode> {
        self.paths.get(p).map(|&id| &self.inodes[id])
    }

    fn is_dir(&self, p: &RelPath) -> bool {
        matches!(
            self.get(p),
            Some(Inode {
                kind: Kind::Dir,
                ..
            })
        )
    }

    fn has_children(&self, p: &RelPath) -> bool {
        self.paths.keys().any(|k| k.parent().as_ref() == Some(p))
    }

    fn parent_ok(&self, p: &RelPath) -> Res {
        match p.parent() {
            None => Ok(()),
            Some(d) if self.is_dir(&d) => Ok(()),
            Some(d) => Err(format!("{p}: parent {d} is not a directory")),
        }
    }

    /// An entry of `p`'s parent was added, removed or replaced: its mtime moves.
    fn bump(&mut self, p: &RelPath) {
        if let Some(d) = p.parent() {
            let id = self.paths[&d];
            self.inodes[id].meta.mtime_sec = self.clock;
            self.inodes[id].meta.mtime_nsec = 0;
            self.clock -= 1;
        }
    }

    /// Applies the attributes an executor can set: all but uid/gid unless `owner`,
    /// never a symlink's mode.
    fn set_meta(&mut self, id: usize, m: &Meta) {
        let symlink = matches!(self.inodes[id].kind, Kind::Symlink(_));
        let cur = &mut self.inodes[id].meta;
        if !symlink {
            cur.mode = m.mode;
        }
        cur.mtime_sec = m.mtime_sec;
        cur.mtime_nsec = m.mtime_nsec;
        if self.owner {
            cur.uid = m.uid;
            cur.gid = m.gid;
        }
    }

    fn would_change(&self, id: usize, m: &Meta) -> bool {
        let mut probe = self.clone();
        probe.set_meta(id, m);
        probe.inodes[id].meta != self.inodes[id].meta
    }

    /// Puts inode `id` at `p`, replacing a file or symlink there.
    fn put(&mut self, p: &RelPath, id: usize) -> Res {
        self.parent_ok(p)?;
        if self.is_dir(p) {
            return Err(format!("{p}: cannot replace a directory"));
        }
        self.paths.insert(p.clone(), id);
        self.bump(p);
        Ok(())
    }

    fn fetch(&mut self, hash: Hash, size: u64) -> Res {
        if self.stage.contains_key(&hash) {
            return Err(format!("{hash:?} staged twice"));
        }
        let id = self.new_inode(Kind::File { hash, size }, FRESH);
        self.stage.insert(hash, id);
        Ok(())
    }

    fn apply(&mut self, step: &Step) -> Res {
        match step {
            Step::StageLocal { from, hash, mode } => {
                let Some(&id) = self.paths.get(from) else {
                    return Err(format!("stage from missing {from}"));
                };
                let Kind::File { hash: h, size } = self.inodes[id].kind.clone() else {
                    return Err(format!("stage from non-file {from}"));
                };
                if &h != hash {
                    return Err(format!("stage from {from}: other content"));
                }
                if self.stage.contains_key(hash) {
                    return Err(format!("{from}: hash staged twice"));
                }
                let staged = match mode {
                    StageMode::Move => {
                        self.paths.remove(from);
                        self.bump(from);
                        id
                    }
                    StageMode::Copy => self.new_inode(Kind::File { hash: h, size }, FRESH),
                };
                self.stage.insert(*hash, staged);
            }
            Step::Remove { path, dir } => {
                let Some(ino) = self.get(path) else {
                    return Err(format!("remove missing {path}"));
                };
                if (ino.kind == Kind::Dir) != *dir {
                    return Err(format!("remove {path}: dir flag {dir} is wrong"));
                }
                if *dir && self.has_children(path) {
                    return Err(format!("remove non-empty {path}"));
                }
                self.paths.remove(path);
                self.bump(path);
            }
            Step::MakeDir { path } => {
                self.parent_ok(path)?;
                if self.paths.contains_key(path) {
                    return Err(format!("mkdir over existing {path}"));
                }
                let id = self.new_inode(Kind::Dir, FRESH);
                self.paths.insert(path.clone(), id);
                self.bump(path);
            }
            Step::PlaceFile {
                path,
                hash,
                meta,
                last_use,
            } => {
                let Some(&staged) = self.stage.get(hash) else {
                    return Err(format!("place {path}: content not staged (or used up)"));
                };
                let id = if *last_use {
                    self.stage.remove(hash);
                    staged
                } else {
                    let kind = self.inodes[staged].kind.clone();
                    self.new_inode(kind, FRESH)
                };
                self.set_meta(id, meta);
                self.put(path, id)?;
            }
            Step::Symlink { path, target, meta } => {
                let id = self.new_inode(Kind::Symlink(target.clone()), FRESH);
                self.inodes[id].meta.mode = 0o777;
                self.set_meta(id, meta);
                self.put(path, id)?;
            }
            Step::HardLink { path, target } => {
                if path == target {
                    return Err(format!("{path}: link to itself"));
                }
                let Some(&id) = self.paths.get(target) else {
                    return Err(format!("link {path} to missing {target}"));
                };
                if !matches!(self.inodes[id].kind, Kind::File { .. }) {
                    return Err(format!("link {path} to non-file {target}"));
                }
                self.put(path, id)?;
            }
            Step::SetMeta {
                path,
                meta,
                symlink,
            } => {
                let Some(&id) = self.paths.get(path) else {
                    return Err(format!("set meta of missing {path}"));
                };
                match (&self.inodes[id].kind, symlink) {
                    (Kind::File { .. }, false) | (Kind::Symlink(_), true) => {}
                    (k, _) => return Err(format!("set meta {path}: symlink={symlink} on {k:?}")),
                }
                if !self.would_change(id, meta) {
                    return Err(format!("SetMeta {path} changes nothing"));
                }
                self.set_meta(id, meta);
            }
            Step::SetDirMeta { path, meta } => {
                let Some(&id) = self.paths.get(path) else {
                    return Err(format!("set dir meta of missing {path}"));
                };
                if self.inodes[id].kind != Kind::Dir {
                    return Err(format!("SetDirMeta on non-directory {path}"));
                }
                if !self.would_change(id, meta) {
                    return Err(format!("SetDirMeta {path} changes nothing"));
                }
                self.set_meta(id, meta);
            }
        }
        Ok(())
    }
}

/// `m` with owners cleared when they are not compared.
fn normalise(m: &Manifest, owner: bool) -> Manifest {
    Manifest::from_entries(m.iter().cloned().map(|mut e| {
        if !owner {
            e.meta.uid = 0;
            e.meta.gid = 0;
        }
        e
    }))
    .unwrap()
}

/// `m` in scanner form: every `hardlink_to` names the first path of its group in tree
/// order, and links show their target's attributes.
fn canonical(m: &Manifest) -> Manifest {
    Fs::from_manifest(m, true).to_manifest()
}

fn phase(s: &Step) -> u8 {
    match s {
        Step::StageLocal { .. } => 1,
        Step::Remove { .. } => 2,
        Step::MakeDir { .. } => 3,
        Step::PlaceFile { .. } | Step::Symlink { .. } | Step::HardLink { .. } => 4,
        Step::SetMeta { .. } => 5,
        Step::SetDirMeta { .. } => 6,
    }
}

fn step_path(s: &Step) -> &RelPath {
    match s {
        Step::StageLocal { from: path, .. }
        | Step::Remove { path, .. }
        | Step::MakeDir { path }
        | Step::PlaceFile { path, .. }
        | Step::Symlink { path, .. }
        | Step::HardLink { path, .. }
        | Step::SetMeta { path, .. }
        | Step::SetDirMeta { path, .. } => path,
    }
}

/// Checks the shape of `plan` and executes it on a model of `local`; the result must be
/// `desired`. Returns the executed model.
fn execute_and_check(
    desired: &Manifest,
    local: &Manifest,
    opts: PlanOptions,
) -> Result<Fs, String> {
    let plan = plan(desired, local, opts);
    check_shape(&plan, desired, local)?;
    let mut fs = Fs::from_manifest(local, opts.owner);
    for f in &plan.fetch {
        fs.fetch(f.hash, f.size)?;
    }
    for (i, s) in plan.steps.iter().enumerate() {
        fs.apply(s)
            .map_err(|e| format!("step {i} {s:?}: {e}\nplan: {plan:#?}"))?;
    }
    if !fs.stage.is_empty() {
        return Err(format!(
            "staged content left over: {:?}",
            fs.stage.keys().collect::<Vec<_>>()
        ));
    }
    let got = normalise(&fs.to_manifest(), opts.owner);
    let want = normalise(&canonical(desired), opts.owner);
    if got != want {
        return Err(format!(
            "result differs\n got: {got:#?}\nwant: {want:#?}\nplan: {plan:#?}"
        ));
    }
    // Planning again (from the scanner form of `desired`, as a source scan gives it)
    // against the result finds nothing to do.
    let again = cd_core::plan::plan(&canonical(desired), &fs.to_manifest(), opts);
    if !again.is_empty() {
        return Err(format!("not idempotent: {again:#?}"));
    }
    Ok(fs)
}

fn check_shape(plan: &Plan, desired: &Manifest, local: &Manifest) -> Res {
    let local_hashes: HashSet<&Hash> = local.iter().filter_map(Entry::hash).collect();
    let mut fetched = HashSet::new();
    for f in &plan.fetch {
        if local_hashes.contains(&f.hash) {
            return Err(format!("fetch of content held locally: {f:?}"));
        }
        if !fetched.insert(f.hash) {
            return Err(format!("fetched twice: {f:?}"));
        }
        match desired.get(&f.path).map(|e| &e.kind) {
            Some(EntryKind::File { hash, size, .. }) if *hash == f.hash && *size == f.size => {}
            _ => return Err(format!("fetch names no such desired file: {f:?}")),
        }
    }
    let first_need = plan.steps.iter().find_map(|s| match s {
        Step::PlaceFile { path, hash, .. } if fetched.contains(hash) => Some((hash, path)),
        _ => None,
    });
    if let Some((hash, path)) = first_need {
        let f = plan.fetch.iter().find(|f| &f.hash == hash).unwrap();
        if &f.path != path {
            return Err(format!(
                "fetch {f:?} is not named after its first use {path}"
            ));
        }
    }
    let mut prev: Option<&Step> = None;
    for s in &plan.steps {
        if let Some(p) = prev {
            if phase(s) < phase(p) {
                return Err(format!("{s:?} after {p:?}"));
            }
            let deeper = step_path(s).depth() > step_path(p).depth();
            if phase(s) == phase(p)
                && matches!(s, Step::Remove { .. } | Step::SetDirMeta { .. })
                && deeper
            {
                return Err(format!("{s:?} is deeper than the earlier {p:?}"));
            }
            if phase(s) == phase(p)
                && matches!(
                    s,
                    Step::MakeDir { .. } | Step::SetMeta { .. } | Step::StageLocal { .. }
                )
                && step_path(s).cmp_tree(step_path(p)).is_lt()
            {
                return Err(format!("{s:?} before {p:?} in tree order"));
            }
        }
        prev = Some(s);
        if step_path(s).components().next() == Some(b".cdsync") {
            return Err(format!("touches the reserved dir: {s:?}"));
        }
    }
    let count = |f: fn(&Step) -> bool| plan.steps.iter().filter(|s| f(s)).count() as u64;
    let want = PlanStats {
        fetch_files: plan.fetch.len() as u64,
        fetch_bytes: plan.fetch.iter().map(|f| f.size).sum(),
        reused_local: count(|s| matches!(s, Step::StageLocal { .. })),
        removed: count(|s| matches!(s, Step::Remove { .. })),
        created_dirs: count(|s| matches!(s, Step::MakeDir { .. })),
        placed_files: count(|s| matches!(s, Step::PlaceFile { .. })),
        symlinks: count(|s| matches!(s, Step::Symlink { .. })),
        hardlinks: count(|s| matches!(s, Step::HardLink { .. })),
        meta_only: count(|s| matches!(s, Step::SetMeta { .. })),
    };
    if plan.stats != want {
        return Err(format!("stats {:?}, counted {want:?}", plan.stats));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Random trees
// ---------------------------------------------------------------------------------

/// `a.b` sorts before `a/x` bytewise but after it in tree order.
const NAMES: [&str; 3] = ["a", "a.b", "b"];
const MAX_DEPTH: usize = 3;

/// Every path of up to `MAX_DEPTH` components over `NAMES`, parents first.
fn universe() -> Vec<RelPath> {
    let mut out = Vec::new();
    let mut level: Vec<String> = vec![String::new()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for prefix in &level {
            for n in NAMES {
                let p = if prefix.is_empty() {
                    n.to_owned()
                } else {
                    format!("{prefix}/{n}")
                };
                out.push(RelPath::new(p.as_str()).unwrap());
                next.push(p);
            }
        }
        level = next;
    }
    out.sort_by(|a, b| a.cmp_tree(b));
    out
}

/// What one path holds, as drawn by proptest; `kind` decides, the rest picks variants.
#[derive(Debug, Clone, Copy)]
struct Spec {
    kind: u8,
    content: u8,
    meta: u8,
    pick: u8,
}

fn spec() -> impl Strategy<Value = Spec> {
    (0u8..10, 0u8..4, 0u8..4, any::<u8>()).prop_map(|(kind, content, meta, pick)| Spec {
        kind,
        content,
        meta,
        pick,
    })
}

fn content(n: u8) -> (Hash, u64) {
    ([n + 1; 32], u64::from(n) * 100 + 7)
}

fn meta(n: u8, base_mode: u32) -> Meta {
    let mut m = Meta {
        mode: base_mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_000,
        mtime_nsec: 0,
    };
    match n {
        0 => {}
        1 => m.mode &= 0o700,
        2 => (m.uid, m.gid) = (33, 33),
        _ => m.mtime_nsec = 500,
    }
    m
}

/// A regular file's entry.
fn file(path: &RelPath, s: Spec) -> Entry {
    let (hash, size) = content(s.content);
    Entry {
        path: path.clone(),
        kind: EntryKind::File {
            size,
            hash,
            hardlink_to: None,
        },
        meta: meta(s.meta, 0o644),
    }
}

/// Builds an entry at `path` from `s`; `files` are the earlier plain files (link targets).
fn entry(path: &RelPath, s: Spec, files: &[&Entry]) -> Option<Entry> {
    Some(match s.kind {
        0 | 1 => return None,
        2..=4 => Entry {
            path: path.clone(),
            kind: EntryKind::Dir,
            meta: meta(s.meta, 0o755),
        },
        5 | 6 => file(path, s),
        7 => {
            let target = ["x", "../a", "a/b"][usize::from(s.pick) % 3]
                .as_bytes()
                .to_vec();
            let mut m = meta(s.meta, 0o777);
            m.mode = 0o777;
            Entry {
                path: path.clone(),
                kind: EntryKind::Symlink { target },
                meta: m,
            }
        }
        _ if files.is_empty() => file(path, s),
        _ => {
            let t = files[usize::from(s.pick) % files.len()];
            let mut e = t.clone();
            e.path = path.clone();
            if let EntryKind::File { hardlink_to, .. } = &mut e.kind {
                *hardlink_to = Some(t.path.clone());
            }
            e
        }
    })
}

/// A tree over the universe. Where `keep` holds a `Some`, that entry of `base` is
/// reused when there is one, so trees overlap a lot: `Some(0)` keeps it as is,
/// `Some(1)` with other attributes, `Some(2)` with other content (file) or target
/// (symlink). A kept hard link follows its target's content and attributes, or becomes
/// a plain file if the target is not a plain file here.
fn tree(specs: &[(Option<u8>, Spec)], base: Option<&Manifest>) -> Manifest {
    let mut out: BTreeMap<RelPath, Entry> = BTreeMap::new();
    for (path, (keep, s)) in universe().iter().zip(specs) {
        if let Some(parent) = path.parent()
            && !out.get(&parent).is_some_and(Entry::is_dir)
        {
            continue;
        }
        let files: Vec<&Entry> = out
            .values()
            .filter(|e| {
                matches!(
                    e.kind,
                    EntryKind::File {
                        hardlink_to: None,
                        ..
                    }
                )
            })
            .collect();
        let kept = keep.zip(base.and_then(|b| b.get(path))).map(|(how, e)| {
            let mut e = e.clone();
            match (how, &mut e.kind) {
                (1, EntryKind::Dir) | (2, EntryKind::Dir) => e.meta = meta(s.meta, 0o755),
                (1, EntryKind::File { .. }) => e.meta = meta(s.meta, 0o644),
                (1, EntryKind::Symlink { .. }) => {
                    e.meta = Meta {
                        mode: 0o777,
                        ..meta(s.meta, 0o777)
                    }
                }
                (2, EntryKind::File { size, hash, .. }) => (*hash, *size) = content(s.content),
                (2, EntryKind::Symlink { target }) => target.push(b'2'),
                _ => {}
            }
            if let EntryKind::File {
                hardlink_to,
                hash,
                size,
            } = &mut e.kind
                && let Some(t) = hardlink_to.clone()
            {
                match out.get(&t) {
                    Some(
                        te @ Entry {
                            kind:
                                EntryKind::File {
                                    hash: h,
                                    size: z,
                                    hardlink_to: None,
                                },
                            ..
                        },
                    ) => {
                        (*hash, *size) = (*h, *z);
                        e.meta = te.meta;
                    }
                    _ => *hardlink_to = None,
                }
            }
            e
        });
        if let Some(e) = kept.or_else(|| entry(path, *s, &files)) {
            out.insert(path.clone(), e);
        }
    }
    Manifest::from_entries(out.into_values()).unwrap()
}

fn specs() -> impl Strategy<Value = Vec<(Option<u8>, Spec)>> {
    let keep =
        prop_oneof![3 => Just(None), 4 => Just(Some(0)), 1 => Just(Some(1)), 1 => Just(Some(2))];
    proptest::collection::vec((keep, spec()), universe().len())
}

/// `m` with every hard-link group re-rooted on its last path in tree order: still a
/// valid manifest, though not the scanner's form (links then precede their target).
fn reroot(m: &Manifest) -> Manifest {
    let mut last: HashMap<RelPath, RelPath> = HashMap::new();
    for e in m.iter_tree() {
        if let EntryKind::File {
            hardlink_to: Some(t),
            ..
        } = &e.kind
        {
            last.insert(t.clone(), e.path.clone());
        }
    }
    Manifest::from_entries(m.iter().cloned().map(|mut e| {
        if let EntryKind::File { hardlink_to, .. } = &mut e.kind {
            let root = hardlink_to.clone().unwrap_or_else(|| e.path.clone());
            if let Some(new_root) = last.get(&root) {
                *hardlink_to = Some(new_root.clone()).filter(|r| r != &e.path);
            }
        }
        e
    }))
    .unwrap()
}

/// (local, desired, owner): desired reuses local's entry wherever `keep` is drawn.
fn local_and_desired() -> impl Strategy<Value = (Manifest, Manifest, bool)> {
    (
        specs(),
        specs(),
        proptest::bool::weighted(0.8),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(l, d, owner, rerooted)| {
            let local = tree(&l, None);
            let desired = tree(&d, Some(&local));
            (
                local,
                if rerooted { reroot(&desired) } else { desired },
                owner,
            )
        })
}

// ---------------------------------------------------------------------------------
// Incremental changes, drawn against the model so that each one is meaningful
// ---------------------------------------------------------------------------------

/// Applies `c` to the model the way `Change` documents it.
fn apply_change(fs: &mut Fs, c: &Change) {
    let subtree = |fs: &Fs, p: &RelPath| -> Vec<RelPath> {
        fs.paths
            .keys()
            .filter(|k| k.starts_with(p))
            .cloned()
            .collect()
    };
    match c {
        Change::Remove(p) => {
            for k in subtree(fs, p) {
                fs.paths.remove(&k);
            }
        }
        Change::Rename { from, to } => {
            let moved: Vec<(RelPath, usize)> = subtree(fs, from)
                .into_iter()
                .map(|k| (k.clone(), fs.paths.remove(&k).unwrap()))
                .collect();
            for k in subtree(fs, to) {
                fs.paths.remove(&k);
            }
            for (k, id) in moved {
                let suffix = &k.as_bytes()[from.as_bytes().len()..];
                let mut p = to.as_bytes().to_vec();
                p.extend_from_slice(suffix);
                fs.paths.insert(RelPath::new(p).unwrap(), id);
            }
        }
        Change::Upsert(e) => {
            let cur = fs.paths.get(&e.path).copied();
            let replace = |fs: &mut Fs, id: usize| {
                for k in subtree(fs, &e.path) {
                    fs.paths.remove(&k);
                }
                fs.paths.insert(e.path.clone(), id);
            };
            match &e.kind {
                EntryKind::Dir => match cur {
                    Some(id) if fs.inodes[id].kind == Kind::Dir => fs.inodes[id].meta = e.meta,
                    _ => {
                        let id = fs.new_inode(Kind::Dir, e.meta);
                        replace(fs, id);
                    }
                },
                EntryKind::Symlink { target } => {
                    let id = fs.new_inode(Kind::Symlink(target.clone()), e.meta);
                    replace(fs, id);
                }
                EntryKind::File {
                    size,
                    hash,
                    hardlink_to,
                } => {
                    let kind = Kind::File {
                        hash: *hash,
                        size: *size,
                    };
                    let join = hardlink_to.as_ref().map(|t| fs.paths[t]);
                    let same_inode = match (cur, join) {
                        (Some(c), Some(j)) => c == j,
                        (Some(c), None) => fs.inodes[c].kind == kind,
                        (None, _) => false,
                    };
                    let id = match (same_inode, join) {
                        (true, _) => cur.unwrap(),
                        (false, Some(j)) => j,
                        (false, None) => fs.new_inode(kind, e.meta),
                    };
                    fs.inodes[id].meta = e.meta;
                    if !same_inode {
                        replace(fs, id);
                    }
                }
            }
        }
    }
}

/// Turns a drawn `(op, a, b, spec)` into a change that is valid against `fs`, if any.
fn make_change(fs: &Fs, all: &[RelPath], (op, a, b, s): (u8, u16, u16, Spec)) -> Option<Change> {
    let pick = |v: &[RelPath], i: u16| (!v.is_empty()).then(|| v[usize::from(i) % v.len()].clone());
    let present: Vec<RelPath> = fs.paths.keys().cloned().collect();
    let placeable: Vec<RelPath> = all
        .iter()
        .filter(|p| p.parent().is_none_or(|d| fs.is_dir(&d)))
        .cloned()
        .collect();
    match op % 4 {
        0 | 1 => {
            let path = pick(&placeable, a)?;
            // Hard links go to an existing regular file outside what this replaces.
            let files: Vec<Entry> = present
                .iter()
                .filter(|p| !p.starts_with(&path))
                .filter_map(|p| match &fs.get(p)?.kind {
                    Kind::File { hash, size } => Some(Entry {
                        path: p.clone(),
                        kind: EntryKind::File {
                            size: *size,
                            hash: *hash,
                            hardlink_to: None,
                        },
                        meta: fs.get(p)?.meta,
                    }),
                    _ => None,
                })
                .collect();
            let refs: Vec<&Entry> = files.iter().collect();
            let mut e = entry(
                &path,
                Spec {
                    kind: 2 + s.kind % 8,
                    ..s
                },
                &refs,
            )?;
            if let EntryKind::File {
                hardlink_to: Some(_),
                ..
            } = e.kind
            {
                e.meta = meta(s.meta, 0o644);
            }
            Some(Change::Upsert(e))
        }
        2 => Some(Change::Remove(pick(&present, a).or_else(|| pick(all, a))?)),
        _ => {
            let from = pick(&present, a)?;
            let to: Vec<RelPath> = placeable
                .into_iter()
                .filter(|t| !t.starts_with(&from) && !from.starts_with(t))
                .filter(|t| t.parent().is_none_or(|d| !d.starts_with(&from)))
                .collect();
            Some(Change::Rename {
                from,
                to: pick(&to, b)?,
            })
        }
    }
}

fn changes() -> impl Strategy<Value = Vec<(u8, u16, u16, Spec)>> {
    proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u16>(), spec()), 0..12)
}

// ---------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Executing the plan on a model of `local` yields exactly `desired`, every step's
    /// preconditions hold, and nothing held locally is fetched.
    #[test]
    fn executed_plan_reaches_desired((local, desired, owner) in local_and_desired()) {
        let opts = PlanOptions { owner };
        if let Err(e) = execute_and_check(&desired, &local, opts) {
            return Err(TestCaseError::fail(format!("{e}\nlocal: {local:#?}\ndesired: {desired:#?}")));
        }
        prop_assert!(plan(&local, &local, opts).is_empty());
    }

    /// Incremental change sets: `ChangeSet::desired` agrees with applying each change
    /// to an inode model of the tree, and the plan to get there executes correctly.
    #[test]
    fn incremental_changes_match_the_model(specs in specs(), drawn in changes(), owner in any::<bool>()) {
        let local = tree(&specs, None);
        let all = universe();
        let mut fs = Fs::from_manifest(&local, true);
        let mut list = Vec::new();
        for d in drawn {
            if let Some(c) = make_change(&fs, &all, d) {
                apply_change(&mut fs, &c);
                list.push(c);
            }
        }
        let cs = ChangeSet { origin: "n1".into(), seq: 7, body: ChangeBody::Incremental(list.clone()) };
        let desired = cs.desired(&local).map_err(|e| TestCaseError::fail(format!("{e}: {list:#?}")))?;
        prop_assert_eq!(&desired, &fs.to_manifest(), "changes: {:#?}", list);
        if let Err(e) = execute_and_check(&desired, &local, PlanOptions { owner }) {
            return Err(TestCaseError::fail(format!("{e}\nchanges: {list:#?}")));
        }
    }
}

/// The model itself must catch wrong plans, or the properties above prove little.
#[test]
fn model_rejects_broken_plans() {
    let p = |s: &str| RelPath::new(s).unwrap();
    let s = Spec {
        kind: 5,
        content: 0,
        meta: 0,
        pick: 0,
    };
    let d = |path: &str| Entry {
        path: p(path),
        kind: EntryKind::Dir,
        meta: meta(0, 0o755),
    };
    let local = Manifest::from_entries([d("a"), file(&p("a/x"), s), d("b")]).unwrap();
    let desired = Manifest::from_entries([d("a"), d("b"), file(&p("b/y"), s)]).unwrap();
    let opts = PlanOptions::default();
    let good = plan(&desired, &local, opts);
    let reaches = |steps: &[Step]| -> bool {
        let mut fs = Fs::from_manifest(&local, true);
        steps.iter().all(|st| fs.apply(st).is_ok()) && fs.to_manifest() == desired
    };
    assert!(reaches(&good.steps));
    // Without the final SetDirMeta steps, the directories keep the mtime the moves gave.
    assert!(!reaches(&good.steps[..good.steps.len() - 2]));
    // SetDirMeta before the placement is overtaken by it.
    let mut early = good.steps.clone();
    let last = early.pop().unwrap();
    early.insert(1, last);
    assert!(!reaches(&early));
    // A Remove of the moved source fails; a second PlaceFile after last_use fails.
    let mut extra = good.steps.clone();
    extra.insert(
        1,
        Step::Remove {
            path: p("a/x"),
            dir: false,
        },
    );
    assert!(!reaches(&extra));
    let mut twice = good.steps.clone();
    twice.insert(2, twice[1].clone());
    assert!(!reaches(&twice));
    // Removing a non-empty directory fails.
    assert!(!reaches(&[Step::Remove {
        path: p("a"),
        dir: true
    }]));
}

/// The generators reach every kind of step and every interesting situation, so the
/// properties above exercise them (a guard against a generator that drifts into
/// producing only trivial cases).
#[test]
fn generators_cover_every_case() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    let strategy = local_and_desired();
    for _ in 0..512 {
        let (local, desired, owner) = strategy.new_tree(&mut runner).unwrap().current();
        let plan = plan(&desired, &local, PlanOptions { owner });
        let mut note = |k: &'static str, yes: bool| *seen.entry(k).or_default() += u32::from(yes);
        note("empty plan", plan.is_empty());
        note("fetch", !plan.fetch.is_empty());
        note("no owner", !owner);
        note(
            "desired hard link",
            desired.iter().any(|e| {
                matches!(
                    e.kind,
                    EntryKind::File {
                        hardlink_to: Some(_),
                        ..
                    }
                )
            }),
        );
        for s in &plan.steps {
            let k = match s {
                Step::StageLocal {
                    mode: StageMode::Move,
                    ..
                } => "move",
                Step::StageLocal {
                    mode: StageMode::Copy,
                    ..
                } => "copy",
                Step::Remove { dir: true, .. } => "remove dir",
                Step::Remove { dir: false, .. } => "remove file",
                Step::MakeDir { .. } => "mkdir",
                Step::PlaceFile {
                    last_use: false, ..
                } => "place (not last)",
                Step::PlaceFile { last_use: true, .. } => "place (last)",
                Step::Symlink { .. } => "symlink",
                Step::HardLink { .. } => "hardlink",
                Step::SetMeta { symlink: false, .. } => "set meta",
                Step::SetMeta { symlink: true, .. } => "set symlink meta",
                Step::SetDirMeta { .. } => "set dir meta",
            };
            note(k, true);
            // A hard link redone because its target got new content.
            if let Step::HardLink { path, target } = s
                && matches!(local.get(path).map(|e| &e.kind), Some(EntryKind::File { hardlink_to: Some(t), .. }) if t == target)
            {
                note("relink after target changed", true);
            }
            if let Step::PlaceFile { path, .. } = s {
                let was = local.get(path);
                note("file replaces dir", was.is_some_and(Entry::is_dir));
                note(
                    "file replaces symlink",
                    matches!(was.map(|e| &e.kind), Some(EntryKind::Symlink { .. })),
                );
                note(
                    "linked file becomes independent",
                    matches!(
                        was.map(|e| &e.kind),
                        Some(EntryKind::File {
                            hardlink_to: Some(_),
                            ..
                        })
                    ) && was.and_then(Entry::hash) == desired.get(path).and_then(Entry::hash),
                );
            }
            if let Step::HardLink { path, target } = s {
                note(
                    "link before its target in tree order",
                    target.cmp_tree(path).is_gt(),
                );
            }
            if let Step::MakeDir { path } = s {
                note("dir replaces non-dir", local.get(path).is_some());
            }
        }
    }
    // Incremental changes.
    let strategy = (specs(), changes());
    for _ in 0..512 {
        let (specs, drawn) = strategy.new_tree(&mut runner).unwrap().current();
        let local = tree(&specs, None);
        let mut fs = Fs::from_manifest(&local, true);
        let all = universe();
        let mut note = |k: &'static str, yes: bool| *seen.entry(k).or_default() += u32::from(yes);
        for d in drawn {
            let Some(c) = make_change(&fs, &all, d) else {
                continue;
            };
            let shared = |fs: &Fs, p: &RelPath| {
                fs.paths
                    .get(p)
                    .is_some_and(|id| fs.paths.values().filter(|&i| i == id).count() > 1)
            };
            match &c {
                Change::Upsert(e) => {
                    let cur = fs.get(&e.path).map(|i| i.kind.clone());
                    note("upsert dir over dir", e.is_dir() && cur == Some(Kind::Dir));
                    note("upsert replaces dir", !e.is_dir() && cur == Some(Kind::Dir));
                    note(
                        "upsert new link",
                        matches!(
                            e.kind,
                            EntryKind::File {
                                hardlink_to: Some(_),
                                ..
                            }
                        ),
                    );
                    note("upsert over a linked file", shared(&fs, &e.path));
                }
                Change::Remove(p) => {
                    note("remove dir", fs.is_dir(p));
                    note("remove a linked file", shared(&fs, p));
                }
                Change::Rename { from, to } => {
                    note("rename dir", fs.is_dir(from));
                    note("rename over existing", fs.paths.contains_key(to));
                    note(
                        "rename a linked file",
                        fs.paths
                            .keys()
                            .any(|k| k.starts_with(from) && shared(&fs, k)),
                    );
                }
            }
            apply_change(&mut fs, &c);
        }
    }
    eprintln!("{seen:#?}");
    for (k, n) in &seen {
        assert!(*n >= 5, "{k} seen only {n} times in 512 cases: {seen:#?}");
    }
    let required = [
        "copy",
        "desired hard link",
        "dir replaces non-dir",
        "empty plan",
        "fetch",
        "file replaces dir",
        "file replaces symlink",
        "hardlink",
        "linked file becomes independent",
        "mkdir",
        "move",
        "no owner",
        "place (last)",
        "place (not last)",
        "relink after target changed",
        "remove dir",
        "remove file",
        "set dir meta",
        "set meta",
        "set symlink meta",
        "symlink",
        "link before its target in tree order",
        "upsert dir over dir",
        "upsert replaces dir",
        "upsert new link",
        "upsert over a linked file",
        "remove dir",
        "remove a linked file",
        "rename dir",
        "rename over existing",
        "rename a linked file",
    ];
    for k in required {
        assert!(seen.contains_key(k), "{k} never seen");
    }
}
