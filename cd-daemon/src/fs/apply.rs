//! [`apply`]: carries out a [`Plan`]'s steps against a content root.
//!
//! Steps run in plan order. Each step resolves its paths' parent directories beneath
//! the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and acts on the last
//! component with a `*at` call that does not follow symlinks, so no step can read or
//! write outside the root, whatever symlinks the replica holds (see the
//! [module docs](super)). Paths inside `.cdsync` are refused.
//!
//! - `StageLocal`: `Move` renames the local file into the stage, `Copy` copies it there;
//!   either way the content is re-hashed and kept only if it matches.
//! - `PlaceFile`: the staged content (renamed if `last_use`, else copied to a new stage
//!   file) gets owner, mode and mtime on its descriptor, is fsynced, then renamed over
//!   the target. (With several received files, one `syncfs` of the stage before the
//!   first step replaces their fsyncs: their data is on disk before any is renamed.) No partially written file is ever visible at a final path. A staged
//!   inode that still has other links (a moved local file whose other paths are, against
//!   the plan's expectation, still there) is copied rather than used, so placing it
//!   cannot change another path's attributes.
//! - `Symlink` / `HardLink`: created as `.cdsync-tmp-…` in the target's directory
//!   (owner and mtime set on the new symlink) and renamed over the target.
//! - `Remove`: `unlinkat`; a directory that still holds entries the plan did not list
//!   (special files, late arrivals) is removed with everything beneath it.
//! - `MakeDir`: `mkdirat` 0700; the final attributes come from `SetDirMeta`.
//! - `SetMeta` / `SetDirMeta`: chown (when [`ApplyOptions::owner`]), then chmod (chown
//!   clears set-id bits), then mtime, all without following symlinks; the object must
//!   still be of the expected kind.
//!
//! Failures: a step that fails is recorded in [`ApplyReport::errors`] and the rest of
//! the plan still runs (the next reconcile repairs what is left). A `PlaceFile` whose
//! content is not staged (its fetch was aborted, or local content failed verification)
//! is skipped, counted in [`ApplyReport::skipped`], and leaves the old file in place; a
//! `HardLink` to such a path, or to one whose `PlaceFile` failed, is skipped too. `apply` itself fails only when the stage
//! belongs to another root. With [`ApplyOptions::fsync`], every directory whose entries
//! changed is fsynced at the end (on journaling filesystems this also commits the
//! attribute changes made before it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use cd_core::manifest::{Hash, Meta};
use cd_core::path::RelPath;
use cd_core::plan::{Plan, StageMode, Step};
use rustix::fs::{AtFlags, Gid, Mode, OFlags, Timestamps, Uid};
use rustix::io::Errno;

use super::stage::Stage;
use super::sys::{self, Kind};
use super::{FsError, Root};

/// Staged contents from which [`apply`] syncs the stage's filesystem once instead of
/// each file.
const BATCH_SYNC_MIN: usize = 4;

/// How to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Set uid/gid (needs root; plan with `PlanOptions { owner }` to match).
    pub owner: bool,
    /// fsync placed files before renaming them and touched directories at the end.
    pub fsync: bool,
}

impl Default for ApplyOptions {
    /// `owner` when running as root, `fsync` on.
    fn default() -> Self {
        ApplyOptions {
            owner: rustix::process::geteuid().is_root(),
            fsync: true,
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Files put in place from staged content.
    pub placed_files: u64,
    /// Local files claimed into the stage (`StageLocal`).
    pub reused_local: u64,
    pub removed: u64,
    /// `SetMeta` steps done.
    pub meta_only: u64,
    /// `SetDirMeta` steps done.
    pub dir_meta: u64,
    pub created_dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Steps skipped because their content was not staged.
    pub skipped: u64,
    /// One message per failed step (operation, path, cause).
    pub errors: Vec<String>,
}

impl ApplyReport {
    /// True if every step was carried out.
    pub fn is_complete(&self) -> bool {
        self.errors.is_empty() && self.skipped == 0
    }
}

/// Runs `plan.steps` against `root`, taking fetched content from `stage`. See the
/// module docs.
pub fn apply(
    root: &Root,
    stage: &mut Stage,
    plan: &Plan,
    opts: &ApplyOptions,
) -> Result<ApplyReport, FsError> {
    if stage.root_id() != root.id() {
        return Err(FsError::StageMismatch {
            stage: stage.path().display().to_string(),
            root: root.path().display().to_string(),
        });
    }
    // Received content is made durable in one go: one `syncfs` instead of an fsync
    // (a journal commit, a millisecond or more) per file.
    if opts.fsync
        && stage.staged_count() >= BATCH_SYNC_MIN
        && let Err(e) = stage.sync_staged()
    {
        tracing::warn!(error = %e, "apply: syncfs of the stage failed; fsyncing each file");
    }
    let mut pending_place: HashMap<&RelPath, usize> = HashMap::new();
    for s in &plan.steps {
        if let Step::PlaceFile { path, .. } = s {
            *pending_place.entry(path).or_default() += 1;
        }
    }
    let mut ex = Exec {
        root,
        stage,
        opts,
        report: ApplyReport::default(),
        touched: BTreeSet::new(),
        not_placed: HashSet::new(),
        pending_place,
    };
    for step in &plan.steps {
        if let Step::PlaceFile { path, .. } = step
            && let Some(n) = ex.pending_place.get_mut(path)
        {
            *n -= 1;
        }
        if let Err(e) = ex.step(step) {
            tracing::warn!(error = %e, "apply step failed");
            ex.report.errors.push(e.to_string());
        }
    }
    if opts.fsync {
        ex.sync_dirs();
    }
    Ok(ex.report)
}

struct Exec<'a> {
    root: &'a Root,
    /// How many `PlaceFile`s of each path are still to come (including the current
    /// step): a hard link to such a path would link to the content being replaced.
    stage: &'a mut Stage,
    opts: &'a ApplyOptions,
    report: ApplyReport,
    /// Directories (`None`: the root) whose entries changed, to fsync at the end.
    touched: BTreeSet<Option<RelPath>>,
    /// Paths whose `PlaceFile` was skipped or failed: hard links to them must not be
    /// made (they would link to the old content).
    not_placed: HashSet<RelPath>,
    pending_place: HashMap<&'a RelPath, usize>,
}

impl Exec<'_> {
    fn step(&mut self, step: &Step) -> Result<(), FsError> {
        match step {
            Step::StageLocal { from, hash, mode } => self.stage_local(from, hash, *mode),
            Step::Remove { path, dir } => self.remove(path, *dir),
            Step::MakeDir { path } => self.make_dir(path),
            Step::PlaceFile {
                path,
                hash,
                meta,
                last_use,
            } => {
                let r = self.place_file(path, hash, meta, *last_use);
                if r.is_err() {
                    // The old file is still there: nothing may be hard-linked to it.
                    self.not_placed.insert(path.clone());
                }
                r
            }
            Step::Symlink { path, target, meta } => self.symlink(path, target, meta),
            Step::HardLink { path, target } => self.hard_link(path, target),
            Step::SetMeta {
                path,
                meta,
                symlink,
            } => {
                let kind = if *symlink { Kind::Symlink } else { Kind::File };
                self.set_meta(path, meta, kind)?;
                self.report.meta_only += 1;
                Ok(())
            }
            Step::SetDirMeta { path, meta } => {
                self.set_meta(path, meta, Kind::Dir)?;
                self.report.dir_meta += 1;
                Ok(())
            }
        }
    }

    fn stage_local(&mut self, from: &RelPath, hash: &Hash, mode: StageMode) -> Result<(), FsError> {
        const OP: &str = "stage local content";
        let parent = self.root.open_parent(OP, from)?;
        let name = from.file_name();
        expect_kind(OP, from, parent.as_fd(), name, Kind::File)?;
        let (staged, size, got) = match mode {
            StageMode::Copy => {
                let src =
                    super::open_read(parent.as_fd(), name).map_err(|e| FsError::io(OP, from, e))?;
                self.copy_into_stage(OP, from, src.as_fd())?
            }
            StageMode::Move => {
                let tmp = self.stage.temp_name("local-");
                sys::retry(|| {
                    rustix::fs::renameat(&parent, name, self.stage.dir(), tmp.as_slice())
                })
                .map_err(|e| FsError::io(OP, from, e))?;
                self.touched.insert(from.parent());
                let r = self.verify_moved(OP, from, &tmp);
                if r.is_err() {
                    self.stage.discard(&tmp);
                }
                r?
            }
        };
        if got != *hash {
            self.stage.discard(&staged);
            return Err(FsError::HashMismatch {
                path: from.display(),
                expected: *hash,
                got,
            });
        }
        self.stage.insert(got, staged, size);
        self.report.reused_local += 1;
        Ok(())
    }

    /// Hashes a file just renamed into the stage as `tmp`.
    fn verify_moved(
        &mut self,
        op: &'static str,
        from: &RelPath,
        tmp: &[u8],
    ) -> Result<(Vec<u8>, u64, Hash), FsError> {
        let fd = super::open_read(self.stage.dir(), tmp).map_err(|e| FsError::io(op, from, e))?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| FsError::io(op, from, e))?;
        if st.kind() != Kind::File {
            return Err(wrong_type(op, from, Kind::File, st.kind()));
        }
        let mut hasher = blake3::Hasher::new();
        let n =
            sys::copy_hash(fd.as_fd(), None, &mut hasher).map_err(|e| FsError::io(op, from, e))?;
        Ok((tmp.to_vec(), n, *hasher.finalize().as_bytes()))
    }

    /// Copies `src` (from its current offset) into a new stage file, hashing on the way.
    fn copy_into_stage(
        &mut self,
        op: &'static str,
        from: &RelPath,
        src: BorrowedFd<'_>,
    ) -> Result<(Vec<u8>, u64, Hash), FsError> {
        let (dst, name) = self.stage.create_temp("local-")?;
        let mut hasher = blake3::Hasher::new();
        match sys::copy_hash(src, Some(dst.as_fd()), &mut hasher) {
            Ok(n) => Ok((name, n, *hasher.finalize().as_bytes())),
            Err(e) => {
                self.stage.discard(&name);
                Err(FsError::io(op, from, e))
            }
        }
    }

    fn place_file(
        &mut self,
        path: &RelPath,
        hash: &Hash,
        meta: &Meta,
        last_use: bool,
    ) -> Result<(), FsError> {
        const OP: &str = "place file";
        let Some(s) = self.stage.get(hash).cloned() else {
            tracing::info!(path = %path, hash = %super::hex(hash), "content not staged; file left as it was");
            self.report.skipped += 1;
            self.not_placed.insert(path.clone());
            return Ok(());
        };
        let parent = self.root.open_parent(OP, path)?;
        // The staged inode is used as is only if this is its last use and no other path
        // shares it (a moved local file whose other links are, unexpectedly, still
        // there): setting attributes on it must not change any other path.
        let shared = |fd: &OwnedFd| {
            sys::fstat(fd.as_fd())
                .map(|st| st.nlink > 1)
                .unwrap_or(true)
        };
        let (fd, tmp) = match last_use.then(|| open_rw(self.stage.dir(), &s.name)) {
            Some(Ok(fd)) if !shared(&fd) => {
                self.stage.take(hash);
                (fd, s.name)
            }
            Some(Err(e)) => {
                self.stage.take(hash);
                self.stage.discard(&s.name);
                return Err(FsError::io(OP, self.stage.shown(&s.name), e));
            }
            _ => {
                let src = super::open_read(self.stage.dir(), &s.name)
                    .map_err(|e| FsError::io(OP, self.stage.shown(&s.name), e))?;
                let (dst, tmp) = self.stage.create_temp("copy-")?;
                if let Err(e) = copy_contents(src.as_fd(), dst.as_fd()) {
                    self.stage.discard(&tmp);
                    return Err(FsError::io(OP, self.stage.shown(&tmp), e));
                }
                if last_use {
                    self.stage.take(hash);
                    self.stage.discard(&s.name);
                }
                (dst, tmp)
            }
        };
        let r = self.install(OP, fd.as_fd(), &tmp, parent.as_fd(), path, meta);
        if r.is_err() {
            self.stage.discard(&tmp);
        }
        r?;
        self.report.placed_files += 1;
        self.touched.insert(path.parent());
        Ok(())
    }

    /// Gives the stage file `tmp` (open as `fd`) its attributes, syncs it and renames it
    /// over `path`. Across a mount point, copies it beside the target first.
    fn install(
        &mut self,
        op: &'static str,
        fd: BorrowedFd<'_>,
        tmp: &[u8],
        parent: BorrowedFd<'_>,
        path: &RelPath,
        meta: &Meta,
    ) -> Result<(), FsError> {
        self.set_meta_fd(op, fd, path, meta)?;
        if self.opts.fsync && !self.stage.is_durable(tmp) {
            sys::retry(|| rustix::fs::fsync(fd)).map_err(|e| FsError::io("fsync", path, e))?;
        }
        match sys::retry(|| rustix::fs::renameat(self.stage.dir(), tmp, parent, path.file_name())) {
            Ok(()) => Ok(()),
            Err(Errno::XDEV) => {
                tracing::debug!(path = %path, "target is on another filesystem; copying beside it");
                self.install_across(op, fd, parent, path, meta)?;
                self.stage.discard(tmp);
                Ok(())
            }
            Err(e) => Err(FsError::io(op, path, e)),
        }
    }

    /// Copies `src` to a temporary name in the target directory, sets attributes,
    /// syncs, and renames over the target.
    fn install_across(
        &mut self,
        op: &'static str,
        src: BorrowedFd<'_>,
        parent: BorrowedFd<'_>,
        path: &RelPath,
        meta: &Meta,
    ) -> Result<(), FsError> {
        let tmp = super::tmp_name();
        let dst = sys::retry(|| {
            rustix::fs::openat(
                parent,
                tmp.as_slice(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })
        .map_err(|e| FsError::io(op, path, e))?;
        let r = (|| {
            copy_contents(src, dst.as_fd()).map_err(|e| FsError::io(op, path, e))?;
            self.set_meta_fd(op, dst.as_fd(), path, meta)?;
            if self.opts.fsync {
                sys::retry(|| rustix::fs::fsync(&dst))
                    .map_err(|e| FsError::io("fsync", path, e))?;
            }
            sys::retry(|| rustix::fs::renameat(parent, tmp.as_slice(), parent, path.file_name()))
                .map_err(|e| FsError::io(op, path, e))
        })();
        if r.is_err() {
            let _ = rustix::fs::unlinkat(parent, tmp.as_slice(), AtFlags::empty());
        }
        r
    }

    fn symlink(&mut self, path: &RelPath, target: &[u8], meta: &Meta) -> Result<(), FsError> {
        const OP: &str = "create symlink";
        let parent = self.root.open_parent(OP, path)?;
        let tmp = create_unique(|tmp| rustix::fs::symlinkat(target, &parent, tmp))
            .map_err(|e| FsError::io(OP, path, e))?;
        let r = (|| {
            self.set_meta_at(OP, parent.as_fd(), &tmp, path, meta, Kind::Symlink)?;
            sys::retry(|| rustix::fs::renameat(&parent, tmp.as_slice(), &parent, path.file_name()))
                .map_err(|e| FsError::io(OP, path, e))
        })();
        if r.is_err() {
            let _ = rustix::fs::unlinkat(&parent, tmp.as_slice(), AtFlags::empty());
        }
        r?;
        self.report.symlinks += 1;
        self.touched.insert(path.parent());
        Ok(())
    }

    fn hard_link(&mut self, path: &RelPath, target: &RelPath) -> Result<(), FsError> {
        const OP: &str = "create hard link";
        if self.not_placed.contains(target) {
            tracing::info!(path = %path, target = %target, "hard link target was not placed; link skipped");
            self.report.skipped += 1;
            self.not_placed.insert(path.clone());
            return Ok(());
        }
        if self.pending_place.get(target).is_some_and(|n| *n > 0) {
            return Err(FsError::Inconsistent {
                op: OP,
                path: path.display(),
                what: "the plan places the link's target only after the link",
            });
        }
        let tparent = self.root.open_parent(OP, target)?;
        let parent = self.root.open_parent(OP, path)?;
        expect_kind(OP, target, tparent.as_fd(), target.file_name(), Kind::File)?;
        let tmp = create_unique(|tmp| {
            rustix::fs::linkat(&tparent, target.file_name(), &parent, tmp, AtFlags::empty())
        })
        .map_err(|e| FsError::io(OP, path, e))?;
        let r =
            sys::retry(|| rustix::fs::renameat(&parent, tmp.as_slice(), &parent, path.file_name()))
                .map_err(|e| FsError::io(OP, path, e));
        // Renaming one link of an inode over another link of the same inode succeeds
        // without doing anything, leaving `tmp`: remove it in every case.
        match rustix::fs::unlinkat(&parent, tmp.as_slice(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => tracing::warn!(path = %path, error = %e, "cannot remove temporary hard link"),
        }
        r?;
        let same = |dir: &OwnedFd, name: &[u8]| sys::lstat_at(dir.as_fd(), name).ok();
        match (
            same(&parent, path.file_name()),
            same(&tparent, target.file_name()),
        ) {
            (Some(a), Some(b)) if (a.dev, a.ino) == (b.dev, b.ino) => {}
            _ => {
                return Err(FsError::Inconsistent {
                    op: OP,
                    path: path.display(),
                    what: "not linked to its target after the rename (changed concurrently)",
                });
            }
        }
        self.report.hardlinks += 1;
        self.touched.insert(path.parent());
        Ok(())
    }

    fn remove(&mut self, path: &RelPath, dir: bool) -> Result<(), FsError> {
        const OP: &str = "remove";
        let parent = self.root.open_parent(OP, path)?;
        let name = path.file_name();
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match sys::retry(|| rustix::fs::unlinkat(&parent, name, flags)) {
            Ok(()) => self.report.removed += 1,
            Err(Errno::NOENT) => {
                tracing::debug!(path = %path, "already gone");
                return Ok(());
            }
            Err(Errno::NOTEMPTY | Errno::EXIST) if dir => {
                tracing::warn!(path = %path, "directory holds entries the plan did not list; removing them too");
                sys::remove_tree_at(parent.as_fd(), name).map_err(|e| FsError::io(OP, path, e))?;
                self.report.removed += 1;
            }
            Err(e) => return Err(FsError::io(OP, path, e)),
        }
        self.touched.insert(path.parent());
        Ok(())
    }

    fn make_dir(&mut self, path: &RelPath) -> Result<(), FsError> {
        const OP: &str = "create directory";
        let parent = self.root.open_parent(OP, path)?;
        let name = path.file_name();
        match sys::retry(|| rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))) {
            Ok(()) => {
                self.report.created_dirs += 1;
                self.touched.insert(path.parent());
                Ok(())
            }
            Err(Errno::EXIST) => expect_kind(OP, path, parent.as_fd(), name, Kind::Dir),
            Err(e) => Err(FsError::io(OP, path, e)),
        }
    }

    fn set_meta(&mut self, path: &RelPath, meta: &Meta, kind: Kind) -> Result<(), FsError> {
        const OP: &str = "set attributes";
        let parent = self.root.open_parent(OP, path)?;
        let name = path.file_name();
        expect_kind(OP, path, parent.as_fd(), name, kind)?;
        self.set_meta_at(OP, parent.as_fd(), name, path, meta, kind)
    }

    /// Owner (if enabled), mode and mtime of an open file.
    fn set_meta_fd(
        &self,
        op: &'static str,
        fd: BorrowedFd<'_>,
        path: &RelPath,
        meta: &Meta,
    ) -> Result<(), FsError> {
        if self.opts.owner {
            let (u, g) = ids(meta);
            sys::retry(|| rustix::fs::fchown(fd, Some(u), Some(g)))
                .map_err(|e| FsError::io(op, path, e))?;
        }
        sys::retry(|| rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)))
            .map_err(|e| FsError::io(op, path, e))?;
        sys::retry(|| rustix::fs::futimens(fd, &times(meta))).map_err(|e| FsError::io(op, path, e))
    }

    /// Owner (if enabled), mode (not for symlinks) and mtime of `name` in `dir`,
    /// never following a symlink.
    fn set_meta_at(
        &self,
        op: &'static str,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &RelPath,
        meta: &Meta,
        kind: Kind,
    ) -> Result<(), FsError> {
        if self.opts.owner {
            let (u, g) = ids(meta);
            sys::retry(|| {
                rustix::fs::chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
            })
            .map_err(|e| FsError::io(op, path, e))?;
        }
        if kind != Kind::Symlink {
            sys::chmod_at_nofollow(dir, name, meta.mode).map_err(|e| FsError::io(op, path, e))?;
        }
        sys::retry(|| rustix::fs::utimensat(dir, name, &times(meta), AtFlags::SYMLINK_NOFOLLOW))
            .map_err(|e| FsError::io(op, path, e))
    }

    fn sync_dirs(&mut self) {
        for d in std::mem::take(&mut self.touched) {
            let shown = d
                .as_ref()
                .map(RelPath::display)
                .unwrap_or_else(|| ".".to_owned());
            let r = self
                .root
                .open_beneath(
                    "fsync directory",
                    d.as_ref(),
                    OFlags::RDONLY | OFlags::DIRECTORY,
                )
                .and_then(|fd| {
                    sys::retry(|| rustix::fs::fsync(&fd))
                        .map_err(|e| FsError::io("fsync directory", &shown, e))
                });
            match r {
                Ok(()) => {}
                // Removed by a later step (ENOENT), or removed and replaced by a
                // non-directory (ENOTDIR): either way the removal itself is made
                // durable by the fsync of its parent, which is touched too.
                Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "apply: directory fsync failed");
                    self.report.errors.push(e.to_string());
                }
            }
        }
    }
}

fn ids(meta: &Meta) -> (Uid, Gid) {
    (Uid::from_raw(meta.uid), Gid::from_raw(meta.gid))
}

/// mtime from `meta`; atime left alone.
fn times(meta: &Meta) -> Timestamps {
    sys::mtime_only(meta.mtime_sec, meta.mtime_nsec)
}

fn wrong_type(op: &'static str, path: &RelPath, want: Kind, found: Kind) -> FsError {
    FsError::WrongType {
        op,
        path: path.display(),
        expected: want.name(),
        found: found.name(),
    }
}

/// Checks that `name` in `dir` is of kind `want` (not following symlinks).
fn expect_kind(
    op: &'static str,
    path: &RelPath,
    dir: BorrowedFd<'_>,
    name: &[u8],
    want: Kind,
) -> Result<(), FsError> {
    let st = sys::lstat_at(dir, name).map_err(|e| FsError::io(op, path, e))?;
    if st.kind() != want {
        return Err(wrong_type(op, path, want, st.kind()));
    }
    Ok(())
}

fn open_rw(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    sys::retry(|| {
        rustix::fs::openat(
            dir,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    })
}

/// Runs `make(name)` with fresh `.cdsync-tmp-…` names until one does not exist yet.
fn create_unique(
    mut make: impl FnMut(&[u8]) -> rustix::io::Result<()>,
) -> rustix::io::Result<Vec<u8>> {
    let mut tries = 0;
    loop {
        let tmp = super::tmp_name();
        match sys::retry(|| make(&tmp)) {
            Ok(()) => return Ok(tmp),
            Err(Errno::EXIST) if tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Copies all of `src` (from offset 0) to `dst` (at its current offset), with
/// `copy_file_range` (which shares extents where the filesystem can) or, where that is
/// not possible, plain reads and writes.
fn copy_contents(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let mut off = 0u64;
    loop {
        match sys::retry(|| rustix::fs::copy_file_range(src, Some(&mut off), dst, None, 1 << 30)) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => break,
            Err(e) => return Err(e),
        }
    }
    let mut buf = vec![0u8; sys::BUF_SIZE];
    loop {
        let n = sys::retry(|| rustix::io::pread(src, &mut buf, off))?;
        if n == 0 {
            return Ok(());
        }
        sys::write_all(dst, &buf[..n])?;
        off += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::chmod;
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn h(data: &[u8]) -> Hash {
        *blake3::hash(data).as_bytes()
    }

    fn meta(mode: u32, uid: u32, mtime: i64) -> Meta {
        Meta {
            mode,
            uid,
            gid: uid,
            mtime_sec: mtime,
            mtime_nsec: 42,
        }
    }

    fn plan(steps: Vec<Step>) -> Plan {
        Plan {
            steps,
            ..Plan::default()
        }
    }

    fn put(stage: &mut Stage, id: u32, data: &[u8]) {
        stage.begin(id, h(data)).unwrap();
        stage.write(id, data).unwrap();
        stage.finish(id, h(data), data.len() as u64).unwrap();
    }

    fn opts() -> ApplyOptions {
        ApplyOptions {
            owner: rustix::process::geteuid().is_root(),
            fsync: true,
        }
    }

    /// Every file under `dir` with its content and mode, not following symlinks.
    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                let content = if md.is_file() {
                    std::fs::read(e.path()).unwrap()
                } else if md.is_symlink() {
                    std::fs::read_link(e.path())
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes()
                } else {
                    todo.push(e.path());
                    Vec::new()
                };
                out.push((e.path().display().to_string(), content, md.mode()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn symlinks_on_the_replica_never_redirect_a_step_outside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let o = outside.path();
        std::fs::write(o.join("victim"), b"precious").unwrap();
        chmod(&o.join("victim"), 0o640);
        std::fs::create_dir(o.join("sub")).unwrap();
        let before = snapshot(o);

        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::os::unix::fs::symlink(o, r.join("evil")).unwrap();
        std::os::unix::fs::symlink(o.join("victim"), r.join("evil-file")).unwrap();
        std::fs::create_dir(r.join("real")).unwrap();
        std::fs::write(r.join("real/f"), b"inside").unwrap();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        put(&mut stage, 1, b"payload");
        let m = meta(0o777, 0, 1_000);
        let x = h(b"payload");
        let escapes = vec![
            Step::PlaceFile {
                path: p("evil/x"),
                hash: x,
                meta: m,
                last_use: false,
            },
            Step::PlaceFile {
                path: p("evil/victim"),
                hash: x,
                meta: m,
                last_use: false,
            },
            Step::MakeDir {
                path: p("evil/newdir"),
            },
            Step::Symlink {
                path: p("evil/l"),
                target: b"/etc/passwd".to_vec(),
                meta: m,
            },
            Step::HardLink {
                path: p("evil/h"),
                target: p("real/f"),
            },
            Step::HardLink {
                path: p("real/h2"),
                target: p("evil/other"),
            },
            Step::Remove {
                path: p("evil/victim"),
                dir: false,
            },
            Step::Remove {
                path: p("evil/sub"),
                dir: true,
            },
            Step::SetMeta {
                path: p("evil/victim"),
                meta: m,
                symlink: false,
            },
            Step::SetDirMeta {
                path: p("evil/sub"),
                meta: m,
            },
            Step::StageLocal {
                from: p("evil/victim"),
                hash: h(b"precious"),
                mode: StageMode::Copy,
            },
            Step::StageLocal {
                from: p("evil/victim"),
                hash: h(b"precious"),
                mode: StageMode::Move,
            },
        ];
        let n_escapes = escapes.len();
        let mut steps = escapes;
        steps.extend([
            // The final component being a symlink: acted on itself, never followed.
            Step::SetMeta {
                path: p("evil-file"),
                meta: m,
                symlink: false,
            },
            Step::SetDirMeta {
                path: p("evil"),
                meta: m,
            },
            Step::StageLocal {
                from: p("evil-file"),
                hash: h(b"precious"),
                mode: StageMode::Move,
            },
            // The reserved directory is off limits.
            Step::PlaceFile {
                path: p(".cdsync/stage/x"),
                hash: x,
                meta: m,
                last_use: false,
            },
            Step::Remove {
                path: p(".cdsync"),
                dir: true,
            },
            // Legitimate replacements of the symlinks themselves.
            Step::PlaceFile {
                path: p("evil-file"),
                hash: x,
                meta: meta(0o600, 0, 5),
                last_use: true,
            },
            Step::Remove {
                path: p("evil"),
                dir: false,
            },
        ]);
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();

        assert_eq!(snapshot(o), before, "nothing outside the root changed");
        assert_eq!(report.errors.len(), n_escapes + 5, "{:#?}", report.errors);
        for e in &report.errors[..n_escapes] {
            assert!(e.contains("refusing to follow a symlink"), "{e}");
            assert!(e.contains("evil/"), "the error names the path: {e}");
        }
        let rest = &report.errors[n_escapes..];
        assert!(
            rest[0].contains("evil-file: expected a regular file, found a symlink"),
            "{}",
            rest[0]
        );
        assert!(
            rest[1].contains("evil: expected a directory, found a symlink"),
            "{}",
            rest[1]
        );
        assert!(
            rest[2].contains("evil-file: expected a regular file, found a symlink"),
            "{}",
            rest[2]
        );
        assert!(
            rest[3].contains(".cdsync/stage/x: the path lies inside the reserved"),
            "{}",
            rest[3]
        );
        assert!(rest[4].contains("reserved"), "{}", rest[4]);
        assert_eq!(std::fs::read(r.join("evil-file")).unwrap(), b"payload");
        assert!(
            std::fs::symlink_metadata(r.join("evil-file"))
                .unwrap()
                .is_file()
        );
        assert!(
            std::fs::symlink_metadata(r.join("evil")).is_err(),
            "the symlink itself was removed"
        );
        assert!(root.path().join(".cdsync/stage").is_dir());
        assert_eq!(report.placed_files, 1);
        assert_eq!(report.removed, 1);
    }

    #[test]
    fn hand_built_plan_runs_every_kind_of_step() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/old"), b"old content").unwrap();
        std::fs::write(r.join("keep"), b"keep").unwrap();
        std::fs::write(r.join("moved-away"), b"reused").unwrap();
        std::fs::write(r.join("copied"), b"copied").unwrap();
        std::fs::create_dir_all(r.join("gone/sub")).unwrap();
        std::os::unix::fs::symlink("x", r.join("link")).unwrap();
        let moved_ino = std::fs::metadata(r.join("moved-away")).unwrap().ino();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        put(&mut stage, 7, b"fetched");
        // Without `owner` (not root) everything keeps the creator's uid.
        let me = rustix::process::geteuid().as_raw();
        let uid = if opts().owner { 1000 } else { me };
        let fm = meta(0o4750, uid, 1_111);
        let steps = vec![
            Step::StageLocal {
                from: p("moved-away"),
                hash: h(b"reused"),
                mode: StageMode::Move,
            },
            Step::StageLocal {
                from: p("copied"),
                hash: h(b"copied"),
                mode: StageMode::Copy,
            },
            Step::Remove {
                path: p("gone/sub"),
                dir: true,
            },
            Step::Remove {
                path: p("gone"),
                dir: true,
            },
            Step::Remove {
                path: p("already-gone"),
                dir: false,
            },
            Step::MakeDir { path: p("new") },
            Step::MakeDir {
                path: p("new/deeper"),
            },
            Step::PlaceFile {
                path: p("d/old"),
                hash: h(b"fetched"),
                meta: fm,
                last_use: false,
            },
            Step::PlaceFile {
                path: p("new/deeper/f1"),
                hash: h(b"fetched"),
                meta: fm,
                last_use: false,
            },
            Step::PlaceFile {
                path: p("new/f2"),
                hash: h(b"fetched"),
                meta: fm,
                last_use: true,
            },
            Step::PlaceFile {
                path: p("new/reused"),
                hash: h(b"reused"),
                meta: fm,
                last_use: true,
            },
            Step::PlaceFile {
                path: p("new/copy"),
                hash: h(b"copied"),
                meta: fm,
                last_use: true,
            },
            Step::HardLink {
                path: p("new/deeper/hl"),
                target: p("new/f2"),
            },
            Step::HardLink {
                path: p("keep"),
                target: p("new/f2"),
            },
            Step::HardLink {
                path: p("keep"),
                target: p("new/f2"),
            }, // already that inode
            Step::Symlink {
                path: p("link"),
                target: b"new/f2".to_vec(),
                meta: meta(0o777, uid, 2_222),
            },
            Step::Symlink {
                path: p("new/sl"),
                target: vec![0xff, b'/', 0xfe],
                meta: meta(0o777, uid, 3_333),
            },
            Step::SetMeta {
                path: p("copied"),
                meta: meta(0o600, uid, 4_444),
                symlink: false,
            },
            Step::SetMeta {
                path: p("new/sl"),
                meta: meta(0o777, 0, 5_555),
                symlink: true,
            },
            Step::SetDirMeta {
                path: p("new/deeper"),
                meta: meta(0o2755, uid, 6_666),
            },
            Step::SetDirMeta {
                path: p("new"),
                meta: meta(0o1777, uid, 7_777),
            },
        ];
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();
        assert!(report.is_complete(), "{report:#?}");
        assert_eq!(
            (
                report.reused_local,
                report.removed,
                report.created_dirs,
                report.placed_files
            ),
            (2, 2, 2, 5)
        );
        assert_eq!(
            (
                report.hardlinks,
                report.symlinks,
                report.meta_only,
                report.dir_meta
            ),
            (3, 2, 2, 2)
        );
        assert_eq!(
            stage.staged_count(),
            0,
            "every last use consumed its content"
        );

        let md = |s: &str| std::fs::symlink_metadata(r.join(s)).unwrap();
        assert_eq!(std::fs::read(r.join("d/old")).unwrap(), b"fetched");
        assert_eq!(std::fs::read(r.join("new/reused")).unwrap(), b"reused");
        assert_eq!(
            md("new/reused").ino(),
            moved_ino,
            "a move is a rename, not a copy"
        );
        assert!(!r.join("moved-away").exists());
        assert_eq!(
            std::fs::read(r.join("copied")).unwrap(),
            b"copied",
            "a copy leaves the source"
        );
        assert!(!r.join("gone").exists());
        for f in ["d/old", "new/deeper/f1", "new/f2"] {
            let m = md(f);
            assert_eq!(m.mode() & 0o7777, 0o4750, "{f}");
            assert_eq!((m.mtime(), m.mtime_nsec()), (1_111, 42), "{f}");
            assert_eq!(m.uid(), uid, "{f}");
        }
        let inos: HashSet<u64> = ["d/old", "new/deeper/f1", "new/f2"]
            .iter()
            .map(|f| md(f).ino())
            .collect();
        assert_eq!(inos.len(), 3, "each placed path is its own inode");
        assert_eq!(md("new/deeper/hl").ino(), md("new/f2").ino());
        assert_eq!(md("keep").ino(), md("new/f2").ino());
        assert_eq!(md("new/f2").nlink(), 3);
        assert_eq!(
            std::fs::read_link(r.join("link")).unwrap(),
            Path::new("new/f2")
        );
        assert_eq!(md("link").mtime(), 2_222);
        assert_eq!(md("new/sl").mtime(), 5_555);
        assert_eq!(md("new/sl").uid(), if opts().owner { 0 } else { me });
        assert_eq!(md("copied").mode() & 0o7777, 0o600);
        assert_eq!(md("copied").mtime(), 4_444);
        assert_eq!(md("new/deeper").mode() & 0o7777, 0o2755);
        assert_eq!(md("new").mode() & 0o7777, 0o1777);
        assert_eq!((md("new").mtime(), md("new").mtime_nsec()), (7_777, 42));
        assert_eq!(md("new").uid(), uid);
        // No temporary names were left in any directory.
        for d in [".", "new", "new/deeper", "d"] {
            for e in std::fs::read_dir(r.join(d)).unwrap() {
                let n = e.unwrap().file_name();
                assert!(
                    !n.to_string_lossy().starts_with(super::super::TMP_PREFIX),
                    "{d}/{n:?}"
                );
            }
        }
    }

    #[test]
    fn unverifiable_local_content_skips_its_dependents() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::write(r.join("src"), b"changed since the scan").unwrap();
        std::fs::write(r.join("dst"), b"old dst").unwrap();
        std::fs::write(r.join("moved"), b"also changed").unwrap();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        let fm = meta(0o644, 0, 1);
        let steps = vec![
            Step::StageLocal {
                from: p("src"),
                hash: h(b"what the scan saw"),
                mode: StageMode::Copy,
            },
            Step::StageLocal {
                from: p("moved"),
                hash: h(b"moved content"),
                mode: StageMode::Move,
            },
            Step::PlaceFile {
                path: p("dst"),
                hash: h(b"what the scan saw"),
                meta: fm,
                last_use: true,
            },
            Step::HardLink {
                path: p("dst-link"),
                target: p("dst"),
            },
            Step::PlaceFile {
                path: p("elsewhere"),
                hash: h(b"moved content"),
                meta: fm,
                last_use: true,
            },
        ];
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();
        assert_eq!(report.errors.len(), 2, "{report:#?}");
        assert!(
            report
                .errors
                .iter()
                .all(|e| e.contains("content hash mismatch")),
            "{report:#?}"
        );
        assert_eq!(report.skipped, 3);
        assert_eq!(report.reused_local, 0);
        assert_eq!(
            std::fs::read(r.join("dst")).unwrap(),
            b"old dst",
            "old file left in place"
        );
        assert_eq!(
            std::fs::read(r.join("src")).unwrap(),
            b"changed since the scan"
        );
        assert!(!r.join("dst-link").exists());
        assert!(!r.join("elsewhere").exists());
        // A Move always vacates its path, as the planner expects, even when the content
        // turns out to be wrong.
        assert!(!r.join("moved").exists());
        assert_eq!(std::fs::read_dir(stage.path()).unwrap().count(), 0);
    }

    #[test]
    fn moved_inode_with_surviving_links_is_copied_not_shared() {
        // The planner never moves an inode another path keeps; if the replica grew a
        // link since the scan, placing must still not change that other path.
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::write(r.join("a"), b"content").unwrap();
        chmod(&r.join("a"), 0o644);
        std::fs::hard_link(r.join("a"), r.join("other-link")).unwrap();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        let steps = vec![
            Step::StageLocal {
                from: p("a"),
                hash: h(b"content"),
                mode: StageMode::Move,
            },
            Step::PlaceFile {
                path: p("b"),
                hash: h(b"content"),
                meta: meta(0o600, 0, 9),
                last_use: true,
            },
        ];
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();
        assert!(report.is_complete(), "{report:#?}");
        let other = std::fs::metadata(r.join("other-link")).unwrap();
        let b = std::fs::metadata(r.join("b")).unwrap();
        assert_ne!(other.ino(), b.ino());
        assert_eq!(other.mode() & 0o7777, 0o644);
        assert_eq!(other.nlink(), 1);
        assert_eq!(b.mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(r.join("b")).unwrap(), b"content");
    }

    #[test]
    fn removing_a_directory_with_unlisted_entries_removes_them_too() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("d/inner")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            r.join("d/inner/fifo"),
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("/", r.join("d/root")).unwrap();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        let report = apply(
            &root,
            &mut stage,
            &plan(vec![Step::Remove {
                path: p("d"),
                dir: true,
            }]),
            &opts(),
        )
        .unwrap();
        assert!(report.is_complete(), "{report:#?}");
        assert!(!r.join("d").exists());
        // A non-directory where a directory was expected is an error, not a removal.
        std::fs::write(r.join("f"), b"f").unwrap();
        let report = apply(
            &root,
            &mut stage,
            &plan(vec![Step::Remove {
                path: p("f"),
                dir: true,
            }]),
            &opts(),
        )
        .unwrap();
        assert_eq!(report.errors.len(), 1, "{report:#?}");
        assert!(
            report.errors[0].starts_with("remove f: "),
            "{}",
            report.errors[0]
        );
        assert!(r.join("f").exists());
    }

    #[test]
    fn a_link_ordered_before_its_target_is_refused() {
        // Linking to a path whose new content is placed later would silently link to
        // the old inode (and renaming a link over another link of the same inode is a
        // no-op): apply must refuse rather than produce that tree.
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::write(r.join("target"), b"old").unwrap();
        std::fs::hard_link(r.join("target"), r.join("link")).unwrap();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        put(&mut stage, 0, b"new");
        let steps = vec![
            Step::HardLink {
                path: p("link"),
                target: p("target"),
            },
            Step::PlaceFile {
                path: p("target"),
                hash: h(b"new"),
                meta: meta(0o644, 0, 1),
                last_use: true,
            },
        ];
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();
        assert_eq!(report.errors.len(), 1, "{report:#?}");
        assert!(
            report.errors[0].contains("places the link's target only after"),
            "{report:#?}"
        );
        assert_eq!(std::fs::read(r.join("target")).unwrap(), b"new");
    }

    #[test]
    fn errors_name_the_operation_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        put(&mut stage, 1, b"x");
        let steps = vec![
            Step::PlaceFile {
                path: p("no/such/dir/f"),
                hash: h(b"x"),
                meta: meta(0o644, 0, 1),
                last_use: false,
            },
            Step::MakeDir {
                path: p("missing-parent/d"),
            },
            Step::SetMeta {
                path: p("nothing-here"),
                meta: meta(0o644, 0, 1),
                symlink: false,
            },
            Step::HardLink {
                path: p("l"),
                target: p("no-target"),
            },
            Step::HardLink {
                path: p("l2"),
                target: p("no/such/dir/f"),
            },
        ];
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();
        assert_eq!(
            report.skipped, 1,
            "the link to a file that could not be placed"
        );
        let want = [
            "place file no/such/dir/f (parent directory): No such file or directory",
            "create directory missing-parent/d (parent directory): No such file or directory",
            "set attributes nothing-here: No such file or directory",
            "create hard link no-target: No such file or directory",
        ];
        assert_eq!(report.errors.len(), want.len(), "{report:#?}");
        for (got, want) in report.errors.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn a_stage_of_another_root_is_refused() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let r1 = Root::open(d1.path()).unwrap();
        let r2 = Root::open(d2.path()).unwrap();
        let mut stage = Stage::new(&r1).unwrap();
        let e = apply(&r2, &mut stage, &Plan::default(), &opts()).unwrap_err();
        assert!(matches!(e, FsError::StageMismatch { .. }), "{e}");
    }

    #[test]
    fn readers_see_the_old_or_the_new_file_never_a_mix() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().to_path_buf();
        let old: Vec<u8> = vec![b'o'; 2 << 20];
        let new: Vec<u8> = vec![b'n'; 2 << 20];
        std::fs::write(r.join("f"), &old).unwrap();
        let root = Root::open(&r).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (f, stop, old, new) = (r.join("f"), stop.clone(), old.clone(), new.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = std::fs::read(&f).unwrap();
                    assert!(got == old || got == new, "torn read of {} bytes", got.len());
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..20 {
            let content = if i % 2 == 0 { &new } else { &old };
            let mut stage = Stage::new(&root).unwrap();
            put(&mut stage, 0, content);
            let step = Step::PlaceFile {
                path: p("f"),
                hash: h(content),
                meta: meta(0o644, 0, i),
                last_use: true,
            };
            let report = apply(&root, &mut stage, &plan(vec![step]), &opts()).unwrap();
            assert!(report.is_complete(), "{report:#?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    /// A tmpfs mounted inside the root (unmounted on drop), or `None` where mounting is
    /// not possible.
    struct Mount(std::path::PathBuf);

    impl Mount {
        fn tmpfs(at: &Path) -> Option<Mount> {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
                .arg(at)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Mount(at.to_path_buf()))
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn placing_across_a_mount_point_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("mnt")).unwrap();
        let Some(_mount) = Mount::tmpfs(&r.join("mnt")) else {
            eprintln!("skipped: cannot mount a tmpfs here (needs root and mount(8))");
            return;
        };
        std::fs::write(r.join("mnt/f"), b"old").unwrap();
        let root = Root::open(r).unwrap();
        let mut stage = Stage::new(&root).unwrap();
        put(&mut stage, 0, b"new content");
        let m = meta(0o640, 0, 77);
        let steps = vec![
            Step::PlaceFile {
                path: p("mnt/f"),
                hash: h(b"new content"),
                meta: m,
                last_use: false,
            },
            Step::PlaceFile {
                path: p("mnt/g"),
                hash: h(b"new content"),
                meta: m,
                last_use: true,
            },
        ];
        let report = apply(&root, &mut stage, &plan(steps), &opts()).unwrap();
        assert!(report.is_complete(), "{report:#?}");
        for f in ["mnt/f", "mnt/g"] {
            assert_eq!(std::fs::read(r.join(f)).unwrap(), b"new content");
            let md = std::fs::metadata(r.join(f)).unwrap();
            assert_eq!((md.mode() & 0o7777, md.mtime()), (0o640, 77));
        }
        let names: Vec<_> = std::fs::read_dir(r.join("mnt"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        assert_eq!(std::fs::read_dir(stage.path()).unwrap().count(), 0);
    }
}
