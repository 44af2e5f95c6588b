//! [`scan`]: a content root as a [`Manifest`].
//!
//! The walk never follows a symlink. Each directory is opened relative to its parent's
//! descriptor with `O_NOFOLLOW | O_DIRECTORY` and every name is examined with `lstat`
//! relative to that descriptor, so a directory swapped for a symlink mid-scan is
//! skipped, not followed. Files are opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO
//! swapped in cannot block the scan) and `fstat`ed to check they are still regular
//! files before hashing.
//!
//! What is recorded: directories, regular files and symlinks, with `mode & 0o7777`,
//! uid, gid and mtime (a directory's attributes come from the descriptor that was read,
//! so they describe the directory whose entries were listed). FIFOs, sockets and device
//! nodes are skipped with a warning. The top-level `.cdsync` directory is skipped.
//! Names need not be UTF-8. Names that cannot form a valid
//! [`RelPath`] (longer than `PATH_MAX` in total) are skipped with a warning.
//!
//! Hard links: among the paths of one inode (`nlink > 1`, same device and inode), the
//! first in [`RelPath::cmp_tree`] order is canonical and carries the hash; the others
//! get `hardlink_to` = canonical and are not read again. The walk visits each
//! directory's names in byte order, which is exactly tree order.
//!
//! Hashing: BLAKE3 over the content. The [`HashIndex`] supplies the hash when device,
//! inode, size, mtime and ctime are unchanged. A file whose size, mtime or ctime differ
//! between before and after hashing is hashed again, up to three times, then taken as
//! read (with a warning); the entry's size is then the number of bytes hashed, so the
//! manifest stays self-consistent.
//!
//! Errors: an entry that vanishes between listing and examination is skipped. Any other
//! failure (permission denied, I/O error) fails the whole scan: an incomplete manifest
//! would make replicas delete what was not listed.
//!
//! [`scan_subtree`] re-examines one path (and, for a directory, everything beneath it)
//! with the same rules, for the real-time path: its parent is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and the path itself is `lstat`ed
//! relative to the parent's descriptor, then walked like the root.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::SystemTime;

use cd_core::manifest::{Entry, EntryKind, Hash, Manifest, Meta, RESERVED_DIR};
use cd_core::path::RelPath;
use rustix::io::Errno;

use super::index::{HashIndex, IndexEntry};
use super::sys::{self, Kind, StatInfo};
use super::{FsError, Root};

/// How many times a file that changes while it is hashed is hashed again.
const REHASH_ATTEMPTS: u32 = 3;

/// Counters of one scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Entries in the manifest.
    pub entries: u64,
    /// Files read and hashed (a re-hash of a changing file counts once).
    pub hashed_files: u64,
    /// Bytes read for hashing, re-hashes included.
    pub hashed_bytes: u64,
    /// Files whose hash came from the index.
    pub cached_files: u64,
    /// Names skipped: special files, names vanished or replaced mid-scan, overlong paths.
    pub skipped: u64,
}

/// Scans `root` into a manifest, using and refreshing `index`. See the module docs.
pub fn scan(root: &Root, index: &mut HashIndex) -> Result<(Manifest, ScanStats), FsError> {
    let mut w = Walker::new(index);
    let fd = sys::open_dir_nofollow(root.fd(), b".")
        .map_err(|e| FsError::io("open", root.path().display(), e))?;
    let names = list(fd.as_fd()).map_err(|e| FsError::io("list", ".", e))?;
    w.walk(Frame {
        fd,
        path: None,
        names,
    })?;
    let Walker {
        fresh,
        entries,
        mut stats,
        ..
    } = w;
    index.replace(fresh);
    stats.entries = entries.len() as u64;
    let manifest = Manifest::from_entries(entries).map_err(|source| FsError::Manifest {
        root: root.path().display().to_string(),
        source,
    })?;
    Ok((manifest, stats))
}

/// What one path holds now: the result of [`scan_subtree`].
#[derive(Debug)]
pub struct SubtreeScan {
    /// `path` itself and, for a directory, everything beneath it, in tree order; same
    /// recording rules as [`scan`] (no symlink followed, `.cdsync` never included,
    /// FIFOs etc. skipped). Hard links inside the subtree: canonical = first in tree order
    /// within the subtree, others get `hardlink_to`.
    ///
    /// Empty when `path` is a special file (FIFO, socket, device): it exists, but a scan
    /// does not record it (`stats.skipped` counts it).
    pub entries: Vec<Entry>,
    /// True when some regular file in the subtree has nlink > 1 (its other names may lie
    /// outside the subtree, so the caller reconciles the whole root instead).
    pub multi_link: bool,
    pub stats: ScanStats,
}

/// Re-examines one path of `root` without walking the whole root: `path` itself and,
/// for a directory, everything beneath it, recorded as [`scan`] would (see
/// [`SubtreeScan`]). Cached hashes in `index` are used as by [`scan`].
///
/// `Ok(None)` when `path` does not exist now (or a component of its parent is not a
/// directory / is a symlink: it cannot be a path in the tree), and for any path inside
/// the reserved `.cdsync` directory.
///
/// `index` is refreshed for `path` and beneath it only (hashes for what was found,
/// nothing for what is gone); other paths' entries are kept.
///
/// The parent is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and the
/// last component is `lstat`ed relative to it, so nothing outside the root is read.
pub fn scan_subtree(
    root: &Root,
    path: &RelPath,
    index: &mut HashIndex,
) -> Result<Option<SubtreeScan>, FsError> {
    if path.components().next() == Some(RESERVED_DIR) {
        return Ok(None);
    }
    let (found, fresh) = walk_subtree(root, path, index)?;
    index.replace_under(path, fresh);
    Ok(found)
}

/// [`scan_subtree`] without the index update: what it found and the refreshed index
/// entries for `path` and beneath it.
fn walk_subtree(
    root: &Root,
    path: &RelPath,
    index: &HashIndex,
) -> Result<(Option<SubtreeScan>, BTreeMap<RelPath, IndexEntry>), FsError> {
    const OP: &str = "scan";
    let gone = || Ok((None, BTreeMap::new()));
    let parent = match root.open_parent(OP, path) {
        Ok(fd) => fd,
        // A symlink among the parent's components: not a path in the tree.
        Err(FsError::Escape { .. }) => return gone(),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return gone();
        }
        Err(e) => return Err(e),
    };
    let name = path.file_name();
    let st = match sys::lstat_at(parent.as_fd(), name) {
        Ok(st) => st,
        Err(Errno::NOENT) => return gone(),
        Err(e) => return Err(FsError::io("lstat", path, e)),
    };
    let mut w = Walker::new(index);
    if let Some(frame) = w.visit_stat(parent.as_fd(), name, path.clone(), &st)? {
        w.walk(frame)?;
    }
    if w.entries.is_empty() && st.kind() != Kind::Other {
        // It vanished or changed type between the lstat and reading it.
        return gone();
    }
    let Walker {
        fresh,
        entries,
        mut stats,
        multi_link,
        ..
    } = w;
    stats.entries = entries.len() as u64;
    let found = SubtreeScan {
        entries,
        multi_link,
        stats,
    };
    Ok((Some(found), fresh))
}

/// One directory being listed: its descriptor, its path (`None` for the root) and the
/// names still to visit, sorted descending so `pop` yields byte order.
struct Frame {
    fd: OwnedFd,
    path: Option<RelPath>,
    names: Vec<Vec<u8>>,
}

/// The canonical path of a hard-linked inode and what its entry recorded.
struct Canonical {
    path: RelPath,
    size: u64,
    hash: Hash,
    meta: Meta,
}

struct Walker<'a> {
    index: &'a HashIndex,
    /// The refreshed index: only paths seen by this scan.
    fresh: BTreeMap<RelPath, IndexEntry>,
    /// (dev, ino) → canonical path of inodes with `nlink > 1`.
    links: HashMap<(u64, u64), Canonical>,
    entries: Vec<Entry>,
    stats: ScanStats,
    /// Changes with a ctime at or after this (ns since the epoch) are too recent to cache.
    racy_before: i128,
    /// Some regular file seen had `nlink > 1`.
    multi_link: bool,
}

impl<'a> Walker<'a> {
    fn new(index: &'a HashIndex) -> Walker<'a> {
        let start = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Walker {
            index,
            fresh: BTreeMap::new(),
            links: HashMap::new(),
            entries: Vec::new(),
            stats: ScanStats::default(),
            racy_before: start - index.racy_window().as_nanos() as i128,
            multi_link: false,
        }
    }

    /// Walks the directory of `start` (already recorded, or the root) and everything
    /// beneath it.
    fn walk(&mut self, start: Frame) -> Result<(), FsError> {
        let mut stack = vec![start];
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.pop() else {
                stack.pop();
                continue;
            };
            if top.path.is_none() && name == RESERVED_DIR {
                continue;
            }
            let joined = match &top.path {
                Some(p) => p.join(&name),
                None => RelPath::from_name(&name),
            };
            let path = match joined {
                Ok(p) => p,
                Err(e) => {
                    let parent = top.path.as_ref().map(RelPath::display).unwrap_or_default();
                    let name = String::from_utf8_lossy(&name);
                    tracing::warn!(parent, name = %name, error = %e, "skipping a name that is not a valid path");
                    self.stats.skipped += 1;
                    continue;
                }
            };
            if let Some(frame) = self.visit(top.fd.as_fd(), &name, path)? {
                stack.push(frame);
            }
        }
        Ok(())
    }

    /// Records one name. Returns the frame to descend into for a directory.
    fn visit(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: RelPath,
    ) -> Result<Option<Frame>, FsError> {
        let st = match sys::lstat_at(dir, name) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(self.vanished(&path)),
            Err(e) => return Err(FsError::io("lstat", &path, e)),
        };
        self.visit_stat(dir, name, path, &st)
    }

    /// [`Walker::visit`] for a name already `lstat`ed as `st`.
    fn visit_stat(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: RelPath,
        st: &StatInfo,
    ) -> Result<Option<Frame>, FsError> {
        match st.kind() {
            Kind::Dir => {
                let fd = match sys::open_dir_nofollow(dir, name) {
                    Ok(fd) => fd,
                    // Gone, or replaced by a symlink or a non-directory since the lstat.
                    Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => {
                        return Ok(self.vanished(&path));
                    }
                    Err(e) => return Err(FsError::io("open directory", &path, e)),
                };
                let st = sys::fstat(fd.as_fd()).map_err(|e| FsError::io("stat", &path, e))?;
                let names = list(fd.as_fd()).map_err(|e| FsError::io("list", &path, e))?;
                self.entries.push(Entry {
                    path: path.clone(),
                    kind: EntryKind::Dir,
                    meta: st.meta(),
                });
                Ok(Some(Frame {
                    fd,
                    path: Some(path),
                    names,
                }))
            }
            Kind::Symlink => {
                let target = match sys::retry(|| rustix::fs::readlinkat(dir, name, Vec::new())) {
                    Ok(t) => t.into_bytes(),
                    // Gone, or no longer a symlink.
                    Err(Errno::NOENT | Errno::INVAL) => return Ok(self.vanished(&path)),
                    Err(e) => return Err(FsError::io("readlink", &path, e)),
                };
                let kind = EntryKind::Symlink { target };
                self.entries.push(Entry {
                    path,
                    kind,
                    meta: st.meta(),
                });
                Ok(None)
            }
            Kind::File => {
                self.file(dir, name, path, st)?;
                Ok(None)
            }
            Kind::Other => {
                tracing::warn!(path = %path, mode = format_args!("{:o}", st.mode), "skipping a special file (fifo, socket or device)");
                self.stats.skipped += 1;
                Ok(None)
            }
        }
    }

    fn vanished(&mut self, path: &RelPath) -> Option<Frame> {
        tracing::debug!(path = %path, "entry vanished or changed type during the scan; skipped");
        self.stats.skipped += 1;
        None
    }

    fn file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: RelPath,
        lst: &StatInfo,
    ) -> Result<(), FsError> {
        self.multi_link |= lst.nlink > 1;
        if lst.nlink > 1
            && let Some(c) = self.links.get(&(lst.dev, lst.ino))
        {
            let kind = EntryKind::File {
                size: c.size,
                hash: c.hash,
                hardlink_to: Some(c.path.clone()),
            };
            self.entries.push(Entry {
                path,
                kind,
                meta: c.meta,
            });
            return Ok(());
        }
        let (size, hash, st, stable) = match self.index.get(&path) {
            Some(ie) if ie.matches(lst) => {
                self.stats.cached_files += 1;
                (lst.size, ie.hash, *lst, true)
            }
            _ => match self.hash_file(dir, name, &path)? {
                Some(r) => r,
                None => {
                    self.vanished(&path);
                    return Ok(());
                }
            },
        };
        // Remember only hashes that match a stable, not-too-recent version of the file.
        if stable && st.ctime_ns() < self.racy_before {
            self.fresh.insert(path.clone(), IndexEntry::new(&st, hash));
        }
        if st.nlink > 1 {
            self.multi_link = true;
            let c = Canonical {
                path: path.clone(),
                size,
                hash,
                meta: st.meta(),
            };
            self.links.insert((st.dev, st.ino), c);
        }
        let kind = EntryKind::File {
            size,
            hash,
            hardlink_to: None,
        };
        self.entries.push(Entry {
            path,
            kind,
            meta: st.meta(),
        });
        Ok(())
    }

    /// Opens and hashes a file. `None` if it vanished or stopped being a regular file.
    /// Returns (bytes hashed, hash, stat after hashing, whether the file held still).
    fn hash_file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &RelPath,
    ) -> Result<Option<(u64, Hash, StatInfo, bool)>, FsError> {
        let opened = super::open_read(dir, name);
        let fd = match opened {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP) => return Ok(None),
            Err(e) => return Err(FsError::io("open for hashing", path, e)),
        };
        let stat = |fd: BorrowedFd<'_>| sys::fstat(fd).map_err(|e| FsError::io("stat", path, e));
        let mut before = stat(fd.as_fd())?;
        if before.kind() != Kind::File {
            return Ok(None);
        }
        let mut attempt = 0;
        loop {
            let mut hasher = blake3::Hasher::new();
            sys::retry(|| rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)))
                .map_err(|e| FsError::io("seek", path, e))?;
            let n = sys::copy_hash(fd.as_fd(), None, &mut hasher)
                .map_err(|e| FsError::io("read for hashing", path, e))?;
            self.stats.hashed_bytes += n;
            #[cfg(test)]
            AFTER_PASS.with(|h| {
                if let Some(f) = h.borrow_mut().as_mut() {
                    f(path, attempt);
                }
            });
            let after = stat(fd.as_fd())?;
            let stable = before.same_version(&after) && n == after.size;
            if stable || attempt >= REHASH_ATTEMPTS {
                if !stable {
                    tracing::warn!(path = %path, attempts = attempt + 1, "file kept changing while hashed; recording it as last read");
                }
                self.stats.hashed_files += 1;
                return Ok(Some((n, *hasher.finalize().as_bytes(), after, stable)));
            }
            tracing::debug!(path = %path, attempt, "file changed while hashed; hashing again");
            attempt += 1;
            before = after;
        }
    }
}

/// Test seam: called after each hashing pass with the path and the pass number, so a
/// test can change a file exactly while it is being hashed.
#[cfg(test)]
type PassHook = Box<dyn FnMut(&RelPath, u32)>;
#[cfg(test)]
thread_local! {
    static AFTER_PASS: std::cell::RefCell<Option<PassHook>> = const { std::cell::RefCell::new(None) };
}

/// The names of a directory, sorted descending (so popping yields byte order).
fn list(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<Vec<u8>>> {
    let mut names = sys::read_names(fd)?;
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::super::tests::set_mtime;
    use rustix::fs::{Mode, OFlags};

    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn quiet_index() -> HashIndex {
        let mut idx = HashIndex::new();
        idx.set_racy_window(Duration::ZERO);
        idx
    }

    #[test]
    fn records_every_kind_and_attribute() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("a/b/c")).unwrap();
        std::fs::create_dir(r.join("empty")).unwrap();
        std::fs::write(r.join("a/b/c/deep.txt"), b"deep").unwrap();
        std::fs::write(r.join("a/file"), b"hello").unwrap();
        std::fs::write(r.join("with space.txt"), b"").unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9 \xff");
        std::fs::write(r.join(odd), b"latin1").unwrap();
        std::os::unix::fs::symlink("a/file", r.join("rel-link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("nowhere/at/all", r.join("dangling")).unwrap();
        std::os::unix::fs::symlink("/", r.join("a/root-link")).unwrap();
        std::fs::create_dir(r.join("shared")).unwrap();
        std::fs::set_permissions(r.join("shared"), std::fs::Permissions::from_mode(0o3775))
            .unwrap();
        // chown clears set-id bits: chown first.
        if rustix::process::geteuid().is_root() {
            super::super::tests::chown(&r.join("a/file"), 1234, 5678);
        }
        let (uid, gid) = {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(r.join("a/file")).unwrap();
            (md.uid(), md.gid())
        };
        std::fs::set_permissions(r.join("a/file"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        set_mtime(&r.join("a/file"), 1_600_000_000, 123_456_789);
        set_mtime(&r.join("a"), 1_500_000_000, 1);
        rustix::fs::mkfifoat(rustix::fs::CWD, r.join("fifo"), Mode::from_raw_mode(0o644)).unwrap();

        let root = Root::open(r).unwrap();
        let (m, stats) = scan(&root, &mut quiet_index()).unwrap();
        let paths: Vec<String> = m.iter_tree().iter().map(|e| e.path.display()).collect();
        assert_eq!(
            paths,
            [
                "a",
                "a/b",
                "a/b/c",
                "a/b/c/deep.txt",
                "a/file",
                "a/root-link",
                "abs-link",
                "caf\u{fffd} \u{fffd}",
                "dangling",
                "empty",
                "rel-link",
                "shared",
                "with space.txt",
            ]
        );
        assert!(m.get(&p(".cdsync")).is_none());
        assert_eq!(stats.skipped, 1, "the fifo");
        assert_eq!(stats.entries, 13);
        assert_eq!(stats.hashed_files, 4);
        assert_eq!(stats.hashed_bytes, 4 + 5 + 6);
        let f = m.get(&p("a/file")).unwrap();
        assert_eq!(
            f.kind,
            EntryKind::File {
                size: 5,
                hash: *blake3::hash(b"hello").as_bytes(),
                hardlink_to: None
            }
        );
        assert_eq!(
            f.meta,
            Meta {
                mode: 0o4755,
                uid,
                gid,
                mtime_sec: 1_600_000_000,
                mtime_nsec: 123_456_789
            }
        );
        let a = m.get(&p("a")).unwrap();
        assert_eq!(a.kind, EntryKind::Dir);
        assert_eq!((a.meta.mtime_sec, a.meta.mtime_nsec), (1_500_000_000, 1));
        assert_eq!(m.get(&p("shared")).unwrap().meta.mode, 0o3775);
        assert_eq!(m.get(&p("empty")).unwrap().kind, EntryKind::Dir);
        let odd_entry = m
            .get(&RelPath::new(b"caf\xe9 \xff".to_vec()).unwrap())
            .unwrap();
        assert_eq!(odd_entry.hash(), Some(blake3::hash(b"latin1").as_bytes()));
        for (l, t) in [
            ("rel-link", "a/file"),
            ("abs-link", "/etc/passwd"),
            ("dangling", "nowhere/at/all"),
            ("a/root-link", "/"),
        ] {
            assert_eq!(
                m.get(&p(l)).unwrap().kind,
                EntryKind::Symlink { target: t.into() },
                "{l}"
            );
        }
        // The symlink to / was not followed: nothing beneath it was listed.
        assert!(
            m.iter()
                .all(|e| !e.path.starts_with(&p("a/root-link")) || e.path == p("a/root-link"))
        );
    }

    #[test]
    fn hard_links_point_at_the_first_path_in_tree_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("b/sub")).unwrap();
        std::fs::write(r.join("b/sub/orig"), b"shared content").unwrap();
        // Tree order: "a-link" < "b" < "b/sub/orig" < "b.link" < "z".
        std::fs::hard_link(r.join("b/sub/orig"), r.join("z")).unwrap();
        std::fs::hard_link(r.join("b/sub/orig"), r.join("b.link")).unwrap();
        std::fs::hard_link(r.join("b/sub/orig"), r.join("a-link")).unwrap();
        std::fs::write(r.join("solo"), b"x").unwrap();
        std::fs::hard_link(r.join("solo"), r.join(".cdsync-not-reserved")).unwrap();
        let root = Root::open(r).unwrap();
        let mut idx = quiet_index();
        let (m, stats) = scan(&root, &mut idx).unwrap();
        let link_of = |s: &str| match &m.get(&p(s)).unwrap().kind {
            EntryKind::File { hardlink_to, .. } => hardlink_to.as_ref().map(RelPath::display),
            k => panic!("{s} is {k:?}"),
        };
        assert_eq!(link_of("a-link"), None, "canonical");
        assert_eq!(link_of("b/sub/orig").as_deref(), Some("a-link"));
        assert_eq!(link_of("b.link").as_deref(), Some("a-link"));
        assert_eq!(link_of("z").as_deref(), Some("a-link"));
        assert_eq!(link_of(".cdsync-not-reserved"), None);
        assert_eq!(link_of("solo").as_deref(), Some(".cdsync-not-reserved"));
        assert_eq!(stats.hashed_files, 2, "each inode is read once");
        assert_eq!(m.content_bytes(), 14 + 1);

        // When the canonical path goes away the next one in tree order takes over. (The
        // unlink changed the inode's ctime, so it is read once more; `solo` is cached.)
        std::fs::remove_file(r.join("a-link")).unwrap();
        let (m, stats) = scan(&root, &mut idx).unwrap();
        assert_eq!((stats.hashed_files, stats.cached_files), (1, 1));
        assert_eq!(link_of_in(&m, "b.link").as_deref(), Some("b/sub/orig"));
        assert_eq!(link_of_in(&m, "z").as_deref(), Some("b/sub/orig"));
    }

    fn link_of_in(m: &Manifest, s: &str) -> Option<String> {
        match &m.get(&p(s)).unwrap().kind {
            EntryKind::File { hardlink_to, .. } => hardlink_to.as_ref().map(RelPath::display),
            k => panic!("{s} is {k:?}"),
        }
    }

    #[test]
    fn index_reuses_hashes_and_catches_same_size_same_mtime_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("d")).unwrap();
        for i in 0..5 {
            std::fs::write(r.join(format!("d/f{i}")), format!("content {i}")).unwrap();
        }
        let root = Root::open(r).unwrap();
        let idx_path = root.index_path();
        let mut idx = HashIndex::load(&idx_path);
        // With the default racy window, just-written files are hashed but not cached...
        let (m1, s1) = scan(&root, &mut idx).unwrap();
        assert_eq!((s1.hashed_files, s1.cached_files), (5, 0));
        assert_eq!(
            idx.len(),
            0,
            "entries younger than the racy window are not remembered"
        );
        let (_, s) = scan(&root, &mut idx).unwrap();
        assert_eq!((s.hashed_files, s.cached_files), (5, 0));
        // ...until they are older than the window.
        std::thread::sleep(idx.racy_window() + Duration::from_millis(50));
        let (m2, s2) = scan(&root, &mut idx).unwrap();
        assert_eq!((s2.hashed_files, s2.cached_files), (5, 0));
        assert_eq!(idx.len(), 5);
        assert_eq!(m1, m2);
        idx.save(&idx_path).unwrap();

        // A fresh process: the saved index makes the rescan hash nothing.
        let mut idx = HashIndex::load(&idx_path);
        assert_eq!(idx.len(), 5);
        let (m3, s3) = scan(&root, &mut idx).unwrap();
        assert_eq!(
            (s3.hashed_files, s3.hashed_bytes, s3.cached_files),
            (0, 0, 5)
        );
        assert_eq!(m3, m1);

        // Same size, same mtime, different content: only ctime tells.
        let f = r.join("d/f3");
        let before = std::fs::symlink_metadata(&f).unwrap();
        std::fs::write(&f, b"CONTENT 3").unwrap();
        set_mtime(&f, before_mtime(&before).0, before_mtime(&before).1);
        let after = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(before_mtime(&before), before_mtime(&after));
        assert_eq!(before.len(), after.len());
        let (m4, s4) = scan(&root, &mut idx).unwrap();
        assert_eq!((s4.hashed_files, s4.cached_files), (1, 4));
        assert_eq!(
            m4.get(&p("d/f3")).unwrap().hash(),
            Some(blake3::hash(b"CONTENT 3").as_bytes())
        );
        // Deleted paths drop out of the index.
        std::fs::remove_file(r.join("d/f0")).unwrap();
        scan(&root, &mut idx).unwrap();
        assert!(idx.get(&p("d/f0")).is_none());
    }

    fn before_mtime(m: &std::fs::Metadata) -> (i64, u32) {
        use std::os::unix::fs::MetadataExt;
        (m.mtime(), m.mtime_nsec() as u32)
    }

    #[test]
    fn a_symlinked_root_subdir_is_never_entered() {
        // The scanned tree contains a symlink to a directory full of files: only the
        // link is recorded.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("door")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let (m, s) = scan(&root, &mut quiet_index()).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(s.hashed_files, 0);
    }

    #[test]
    fn directory_swapped_for_symlink_mid_scan_is_not_followed() {
        // Race a scanner against a thread that keeps swapping `d` between a real
        // directory and a symlink to a directory outside the root. Whatever the
        // interleaving, no scan may list anything from outside.
        let outside = tempfile::tempdir().unwrap();
        for i in 0..20 {
            std::fs::write(outside.path().join(format!("outside{i}")), b"o").unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().to_path_buf();
        let root = Root::open(&r).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (r, o, stop) = (r.clone(), outside.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || swap_loop(&r, &o, &stop))
        };
        let mut idx = quiet_index();
        for _ in 0..300 {
            let (m, _) = scan(&root, &mut idx).unwrap();
            for e in m.iter() {
                assert!(
                    !e.path.display().contains("outside"),
                    "followed a symlink: {}",
                    e.path
                );
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
    }

    fn swap_loop(r: &Path, outside: &Path, stop: &std::sync::atomic::AtomicBool) {
        let real = r.join("real");
        let d = r.join("d");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("inside"), b"i").unwrap();
        let link = r.join("link");
        std::os::unix::fs::symlink(outside, &link).unwrap();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // d := real dir, then d := symlink, each by an atomic rename.
            let _ = std::fs::rename(&real, &d);
            let _ = std::fs::rename(&d, &real);
            let _ = std::fs::rename(&link, &d);
            let _ = std::fs::rename(&d, &link);
        }
    }

    #[test]
    fn vanishing_entries_are_skipped_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().to_path_buf();
        let root = Root::open(&r).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let d = r.join(format!("d{}", i % 4));
                    let _ = std::fs::create_dir(&d);
                    let _ = std::fs::write(d.join("f"), i.to_le_bytes());
                    let _ = std::fs::write(r.join(format!("f{}", i % 7)), b"x");
                    let _ = std::fs::remove_file(r.join(format!("f{}", (i + 3) % 7)));
                    let _ = std::fs::remove_file(d.join("f"));
                    let _ = std::fs::remove_dir(&d);
                    i += 1;
                }
            })
        };
        let mut idx = quiet_index();
        for _ in 0..300 {
            scan(&root, &mut idx).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
    }

    /// Runs a scan with `mutate(pass)` called after each hashing pass of `busy`.
    fn scan_with_hook(root: &Root, mutate: impl FnMut(u32) + 'static) -> (Manifest, ScanStats) {
        let mut mutate = mutate;
        AFTER_PASS.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |p: &RelPath, pass| {
                if p.as_bytes() == b"busy" {
                    mutate(pass);
                }
            }))
        });
        let r = scan(root, &mut quiet_index());
        AFTER_PASS.with(|h| *h.borrow_mut() = None);
        r.unwrap()
    }

    #[test]
    fn file_changing_while_hashed_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let busy = dir.path().join("busy");
        std::fs::write(&busy, b"v0").unwrap();
        std::fs::write(dir.path().join("calm"), b"calm").unwrap();
        let root = Root::open(dir.path()).unwrap();

        // Changed during the first pass only: the second pass is stable and recorded.
        let f = busy.clone();
        let (m, s) = scan_with_hook(&root, move |pass| {
            if pass == 0 {
                std::fs::write(&f, b"v1-longer").unwrap();
            }
        });
        assert_eq!(s.hashed_files, 2);
        assert_eq!(s.hashed_bytes, 2 + 9 + 4, "busy read twice");
        let e = m.get(&p("busy")).unwrap();
        assert_eq!(
            e.kind,
            EntryKind::File {
                size: 9,
                hash: *blake3::hash(b"v1-longer").as_bytes(),
                hardlink_to: None
            }
        );

        // Changed after every pass: 1 + 3 passes, then recorded as last read, with the
        // size of what was hashed so the entry is self-consistent.
        let f = busy.clone();
        let mut idx = quiet_index();
        let (m, s) = {
            let mut n = 0u8;
            AFTER_PASS.with(|h| {
                *h.borrow_mut() = Some(Box::new(move |p: &RelPath, _| {
                    if p.as_bytes() == b"busy" {
                        n += 1;
                        std::fs::write(&f, vec![n; usize::from(n)]).unwrap();
                    }
                }))
            });
            let r = scan(&root, &mut idx).unwrap();
            AFTER_PASS.with(|h| *h.borrow_mut() = None);
            r
        };
        // Passes read 9, 1, 2, 3 bytes (each pass reads what the previous hook wrote).
        assert_eq!(s.hashed_bytes, 9 + 1 + 2 + 3 + 4);
        let e = m.get(&p("busy")).unwrap();
        assert_eq!(
            e.kind,
            EntryKind::File {
                size: 3,
                hash: *blake3::hash(&[3u8; 3]).as_bytes(),
                hardlink_to: None
            }
        );
        // A hash that never matched a stable file is not remembered.
        assert!(idx.get(&p("busy")).is_none());
        assert!(idx.get(&p("calm")).is_some());
    }

    /// The entries of a full scan at `path` and beneath it, in tree order.
    fn slice_of(m: &Manifest, path: &str) -> Vec<Entry> {
        m.iter_tree()
            .into_iter()
            .filter(|e| e.path.starts_with(&p(path)))
            .cloned()
            .collect()
    }

    fn subtree(root: &Root, path: &str, idx: &mut HashIndex) -> Option<SubtreeScan> {
        scan_subtree(root, &p(path), idx).unwrap()
    }

    #[test]
    fn subtree_of_a_file_is_that_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"content").unwrap();
        std::fs::write(dir.path().join("other"), b"not read").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let (m, _) = scan(&root, &mut quiet_index()).unwrap();
        let s = subtree(&root, "d/f", &mut quiet_index()).unwrap();
        assert_eq!(s.entries, slice_of(&m, "d/f"));
        assert_eq!(
            s.entries[0].hash(),
            Some(blake3::hash(b"content").as_bytes())
        );
        assert!(!s.multi_link);
        assert_eq!(
            s.stats,
            ScanStats {
                entries: 1,
                hashed_files: 1,
                hashed_bytes: 7,
                cached_files: 0,
                skipped: 0
            }
        );
    }

    #[test]
    fn subtree_of_a_symlink_is_the_link_never_its_target() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("door")).unwrap();
        std::os::unix::fs::symlink("d", r.join("inner-door")).unwrap();
        std::os::unix::fs::symlink("d/f", r.join("file-link")).unwrap();
        let root = Root::open(r).unwrap();
        let (m, _) = scan(&root, &mut quiet_index()).unwrap();
        for (l, t) in [
            ("door", outside.path().as_os_str().as_bytes()),
            ("inner-door", b"d"),
            ("file-link", b"d/f"),
        ] {
            let s = subtree(&root, l, &mut quiet_index()).unwrap();
            assert_eq!(s.entries, slice_of(&m, l), "{l}");
            assert_eq!(s.entries.len(), 1, "{l}");
            assert_eq!(
                s.entries[0].kind,
                EntryKind::Symlink { target: t.to_vec() },
                "{l}"
            );
            assert_eq!((s.stats.hashed_files, s.stats.entries), (0, 1), "{l}");
        }
    }

    #[test]
    fn subtree_of_a_dir_is_the_matching_slice_of_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("a/b/c")).unwrap();
        std::fs::create_dir(r.join("a/empty")).unwrap();
        std::fs::write(r.join("a/b/c/deep.txt"), b"deep").unwrap();
        std::fs::write(r.join("a/file"), b"hello").unwrap();
        std::fs::write(r.join("a/b.txt"), b"sorts after a/b/...").unwrap();
        std::fs::write(r.join(std::ffi::OsStr::from_bytes(b"a/\xff odd")), b"odd").unwrap();
        std::os::unix::fs::symlink("/", r.join("a/b/root-link")).unwrap();
        std::fs::hard_link(r.join("a/file"), r.join("a/b/c/same")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            r.join("a/fifo"),
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        std::fs::set_permissions(r.join("a/b"), std::fs::Permissions::from_mode(0o2751)).unwrap();
        set_mtime(&r.join("a/file"), 1_600_000_000, 5);
        // Outside the subtree, sorting before and after it.
        std::fs::write(r.join("a-sibling"), b"x").unwrap();
        std::fs::create_dir(r.join("Z")).unwrap();
        std::fs::write(r.join("Z/f"), b"z").unwrap();
        set_mtime(&r.join("a"), 1_500_000_000, 7);
        let root = Root::open(r).unwrap();
        let (m, _) = scan(&root, &mut quiet_index()).unwrap();
        let s = subtree(&root, "a", &mut quiet_index()).unwrap();
        let want = slice_of(&m, "a");
        assert_eq!(want.len(), 10);
        assert_eq!(
            s.entries, want,
            "same paths, order, kinds, hashes and metas"
        );
        assert_eq!(s.entries[0].path, p("a"));
        assert_eq!(
            (s.entries[0].meta.mtime_sec, s.entries[0].meta.mtime_nsec),
            (1_500_000_000, 7)
        );
        assert!(s.multi_link, "a/file and a/b/c/same are one inode");
        assert_eq!(s.stats.entries, 10);
        assert_eq!(s.stats.skipped, 1, "the fifo");
        assert_eq!(s.stats.hashed_files, 4, "deep.txt, a/b.txt, odd, file once");
        // A nested directory, too.
        let s = subtree(&root, "a/b", &mut quiet_index()).unwrap();
        let inner: Vec<String> = s.entries.iter().map(|e| e.path.display()).collect();
        assert_eq!(
            inner,
            [
                "a/b",
                "a/b/c",
                "a/b/c/deep.txt",
                "a/b/c/same",
                "a/b/root-link"
            ]
        );
        assert_eq!(s.entries[0].meta.mode, 0o2751);
        // Within this subtree `a/b/c/same` is the first name of its inode.
        assert_eq!(
            s.entries[3].kind,
            EntryKind::File {
                size: 5,
                hash: *blake3::hash(b"hello").as_bytes(),
                hardlink_to: None
            }
        );
        assert!(s.multi_link);
        // A special file exists but is not recorded.
        let s = subtree(&root, "a/fifo", &mut quiet_index()).unwrap();
        assert!(s.entries.is_empty());
        assert_eq!(s.stats.skipped, 1);
    }

    #[test]
    fn subtree_of_a_missing_path_is_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("f"), b"f").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let mut idx = quiet_index();
        for missing in ["nope", "d/nope", "nope/deeper/still", "f/under-a-file"] {
            assert!(subtree(&root, missing, &mut idx).is_none(), "{missing}");
        }
        std::fs::remove_dir(dir.path().join("d")).unwrap();
        assert!(subtree(&root, "d", &mut idx).is_none());
    }

    #[test]
    fn subtree_below_a_symlink_is_none_and_reads_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("sub")).unwrap();
        std::fs::write(outside.path().join("sub/secret"), b"s").unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("door")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("d/door")).unwrap();
        std::os::unix::fs::symlink(r.join("d"), r.join("loop-in")).unwrap();
        let root = Root::open(r).unwrap();
        let mut idx = quiet_index();
        // Each of these names something that exists if the symlink were followed.
        for p in [
            "door/secret",
            "door/sub",
            "door/sub/secret",
            "d/door/secret",
            "d/door/sub",
            "loop-in/door",
        ] {
            assert!(subtree(&root, p, &mut idx).is_none(), "{p}");
        }
        assert!(idx.is_empty());
    }

    #[test]
    fn subtree_with_a_hard_link_reports_multi_link() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/x"), b"linked").unwrap();
        std::fs::hard_link(r.join("d/x"), r.join("d/y")).unwrap();
        std::fs::hard_link(r.join("d/x"), r.join("elsewhere")).unwrap();
        std::fs::write(r.join("d/z"), b"single").unwrap();
        let root = Root::open(r).unwrap();
        let mut idx = quiet_index();
        let s = subtree(&root, "d/y", &mut idx).unwrap();
        assert!(s.multi_link);
        assert_eq!(s.entries.len(), 1);
        assert!(matches!(
            &s.entries[0].kind,
            EntryKind::File {
                hardlink_to: None,
                ..
            }
        ));
        let s = subtree(&root, "d", &mut idx).unwrap();
        assert!(s.multi_link);
        assert_eq!(s.stats.hashed_files, 2, "the linked inode is read once");
        let to = |i: usize| match &s.entries[i].kind {
            EntryKind::File { hardlink_to, .. } => hardlink_to.clone(),
            k => panic!("{k:?}"),
        };
        assert_eq!((to(1), to(2), to(3)), (None, Some(p("d/x")), None));
        assert!(!subtree(&root, "d/z", &mut idx).unwrap().multi_link);
    }

    #[test]
    fn subtree_inside_the_reserved_dir_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(".cdsync/x"), b"x").unwrap();
        let mut idx = quiet_index();
        for p in [".cdsync/x", ".cdsync", ".cdsync/stage"] {
            assert!(subtree(&root, p, &mut idx).is_none(), "{p}");
        }
        // A top-level directory listed by a subtree scan still never holds `.cdsync`
        // entries, but a nested `.cdsync` is an ordinary name.
        std::fs::create_dir_all(dir.path().join("d/.cdsync")).unwrap();
        let s = subtree(&root, "d", &mut idx).unwrap();
        assert_eq!(s.entries.len(), 2);
    }

    #[test]
    fn subtree_reuses_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("d/e")).unwrap();
        for i in 0..3 {
            std::fs::write(r.join(format!("d/e/f{i}")), format!("content {i}")).unwrap();
        }
        std::fs::write(r.join("d/g"), b"g").unwrap();
        let root = Root::open(r).unwrap();
        let (m, _) = scan(&root, &mut quiet_index()).unwrap();
        let mut idx = quiet_index();
        let first = subtree(&root, "d", &mut idx).unwrap();
        assert_eq!((first.stats.hashed_files, idx.len()), (4, 4));
        assert_eq!(first.entries, slice_of(&m, "d"));
        let second = subtree(&root, "d", &mut idx).unwrap();
        let s = &second;
        {
            assert_eq!(
                (
                    s.stats.hashed_files,
                    s.stats.hashed_bytes,
                    s.stats.cached_files
                ),
                (0, 0, 4)
            );
            assert_eq!(s.entries, slice_of(&m, "d"));
        }
        assert_eq!(
            subtree(&root, "d/e/f1", &mut idx)
                .unwrap()
                .stats
                .hashed_files,
            0
        );
        // A changed file is hashed again; the others still come from the index.
        std::fs::write(r.join("d/e/f1"), b"changed").unwrap();
        let s = subtree(&root, "d", &mut idx).unwrap();
        assert_eq!((s.stats.hashed_files, s.stats.cached_files), (1, 3));
        assert_eq!(
            s.entries[3].hash(),
            Some(blake3::hash(b"changed").as_bytes())
        );
        assert_eq!(idx.len(), 4);
        let s = subtree(&root, "d/e", &mut idx).unwrap();
        assert_eq!((s.stats.hashed_files, s.stats.cached_files), (0, 3));
        // Only the subtree's entries are replaced: a vanished path drops out, other
        // paths (even ones sharing a name prefix) are kept.
        std::fs::write(r.join("d/e.txt"), b"e").unwrap();
        assert_eq!(
            subtree(&root, "d/e.txt", &mut idx)
                .unwrap()
                .stats
                .hashed_files,
            1
        );
        assert_eq!(idx.len(), 5);
        std::fs::remove_file(r.join("d/e/f0")).unwrap();
        subtree(&root, "d/e", &mut idx).unwrap();
        assert!(idx.get(&p("d/e/f0")).is_none());
        assert!(idx.get(&p("d/e.txt")).is_some() && idx.get(&p("d/g")).is_some());
        std::fs::remove_dir_all(r.join("d/e")).unwrap();
        assert!(subtree(&root, "d/e", &mut idx).is_none());
        assert_eq!(idx.len(), 2, "d/e.txt and d/g");
    }

    #[test]
    fn deep_paths_beyond_path_max_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        // Build a chain of directories whose relative path exceeds 4096 bytes.
        let name = "n".repeat(200);
        let mut fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        for _ in 0..22 {
            rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(
                &fd,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
        }
        let (m, s) = scan(&root, &mut quiet_index()).unwrap();
        assert_eq!(m.len(), 20, "20 * 201 - 1 <= 4096 < 21 * 201 - 1");
        assert_eq!(s.skipped, 1);
    }
}
