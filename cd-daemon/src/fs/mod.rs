//! The daemon's filesystem layer: scan a content root, read files for sending, stage
//! received content, and apply a [`Plan`](cd_core::plan::Plan) to a replica.
//!
//! - [`Root`]: an opened content root ([`Root::open`] for a replica, which prepares
//!   `.cdsync/stage`; [`Root::open_read_only`] for a source on a read-only mount). Every
//!   path below it is a validated [`RelPath`]; nothing in this module accepts an
//!   arbitrary `Path` below a root.
//! - [`scan()`]: the tree as a [`Manifest`](cd_core::manifest::Manifest), with
//!   a persistent [`HashIndex`] so unchanged files are not re-hashed.
//! - [`SendFile`]: the sender side, a file read once and hashed while
//!   it is read, which fails if the file changed underneath.
//! - [`Snapshot`]: the sender side for `sendfile`, a file pinned (reflink clone or
//!   read lease) so that it cannot change while the kernel sends it.
//! - [`FileIo`]: how `SendFile` reads, chosen once per process: io_uring worker
//!   threads with registered buffers and read-ahead ([`uring`]), optionally
//!   `O_DIRECT`, or `read(2)` where io_uring is unavailable or not wanted.
//! - [`Stage`]: the receiver side, a private per-transfer directory where
//!   received content is written and verified by hash.
//! - [`apply()`]: runs a plan's steps against the root.
//!
//! # Confinement
//!
//! Paths come from the network and the tree can be changed by local users while we
//! work, so no path is ever resolved with ordinary path lookup. A multi-component path
//! is resolved with `openat2(root, parent, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, which
//! fails (reported as [`FsError::Escape`]) if any component is a symlink or the walk
//! would leave the root; the last component is then acted on with the `*at` system
//! call that does not follow symlinks (`renameat`, `unlinkat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`, `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`, `fchmodat2`
//! with `AT_SYMLINK_NOFOLLOW`, `openat` with `O_NOFOLLOW`). A symlink planted on a
//! replica (`dir -> /etc`) therefore can never redirect a read or a write outside the
//! root. The scanner opens each directory relative to its parent's descriptor with
//! `O_NOFOLLOW | O_DIRECTORY`, so a directory swapped for a symlink mid-scan is not
//! followed either. The reserved top-level directory `.cdsync` is never scanned, and
//! every path-taking entry point refuses paths inside it ([`FsError::Reserved`]).
//!
//! # Staging
//!
//! No half-written file is ever visible at its final path. Received content and local
//! content claimed for reuse are written into the stage (`<root>/.cdsync/stage/<id>/`,
//! mode 0700, same filesystem as the root), verified by BLAKE3 hash, given their final
//! mode, owner and mtime, fsynced (unless [`ApplyOptions::fsync`](apply::ApplyOptions)
//! is off), and only then renamed into place, atomically replacing what was there. Symlinks and hard links are created under a temporary name
//! (`.cdsync-tmp-…`) in the target's own directory and renamed over the target. If the
//! target directory is on another filesystem (a mount point inside the root), content is
//! copied to such a temporary name beside the target first and renamed from there
//! (so only there can a partial file be seen, and only under its temporary name).
//!
//! # Use
//!
//! Every call blocks on the filesystem; async callers run them on a blocking thread.
//! [`Root`], [`HashIndex`] are `Send + Sync`; [`Stage`] and
//! [`SendFile`] are `Send`.
//!
//! ```text
//! // Source: list the tree, then serve each Fetch of the replica's plan.
//! let src = Root::open(source_dir)?;
//! let mut index = HashIndex::load(&src.index_path());
//! let (manifest, _stats) = scan(&src, &mut index)?;
//! index.save(&src.index_path())?;
//! let mut f = SendFile::open(&src, &fetch.path)?;      // then read_chunk() to EOF
//! let sent = f.finish()?;                              // Err(Changed): tell the receiver to abort
//!
//! // Replica: plan against its own scan, receive, apply.
//! let dst = Root::open(replica_dir)?;
//! let plan = cd_core::plan::plan(&manifest, &local, PlanOptions { owner });
//! let mut stage = Stage::new(&dst)?;
//! stage.begin(id, fetch.hash)?; stage.write(id, chunk)?; stage.finish(id, sent.hash, sent.size)?;
//! let report = apply(&dst, &mut stage, &plan, &ApplyOptions::default())?;
//! drop(stage);                                         // removes the stage directory
//! ```
//!
//! # Crash safety
//!
//! Each [`Stage`] holds an exclusive `flock` on its directory for its
//! lifetime. [`Root::open`] takes the lock on `.cdsync/stage` and deletes every stage
//! directory whose lock it can take: its owner is gone (the kernel drops `flock`s when a
//! process dies), so stale stages of a killed daemon are cleaned up while stages in use
//! by this or another live process are left alone, with no reliance on PIDs. A crash
//! between creating and renaming a `.cdsync-tmp-…` entry leaves that entry in the tree,
//! where the next scan reports it and the next reconcile removes it.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cd_core::manifest::{Hash, ManifestError, RESERVED_DIR};
use cd_core::path::RelPath;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

pub mod apply;
pub mod base;
pub mod file_io;
pub mod index;
pub mod read;
pub mod scan;
pub mod snapshot;
pub mod stage;
mod sys;
pub mod uring;

#[cfg(test)]
mod tests;

pub use apply::{ApplyOptions, ApplyReport, apply};
pub use base::BaseFile;
pub use file_io::{FileIo, FileIoChoice};
pub use index::HashIndex;
pub use read::{SendFile, SentFile};
pub use scan::{ScanStats, SubtreeScan, scan, scan_subtree};
pub use snapshot::Snapshot;
pub use stage::Stage;

/// Name of the stage parent directory inside [`RESERVED_DIR`].
pub const STAGE_DIR: &[u8] = b"stage";
/// Prefix of the temporary names created beside a target (symlinks, hard links, and
/// content placed across a mount point) just before they are renamed over it.
pub const TMP_PREFIX: &str = ".cdsync-tmp-";

/// Errors of the filesystem layer. Each names the operation and the path (relative to
/// the content root, or the stage file) it was working on.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Resolving the path met a symlink or would have left the content root.
    #[error("{op} {path}: refusing to follow a symlink or to leave the content root")]
    Escape { op: &'static str, path: String },
    /// The path lies inside the reserved `.cdsync` directory.
    #[error("{op} {path}: the path lies inside the reserved .cdsync directory")]
    Reserved { op: &'static str, path: String },
    /// The object at the path is not of the kind the operation needs.
    #[error("{op} {path}: expected {expected}, found {found}")]
    WrongType {
        op: &'static str,
        path: String,
        expected: &'static str,
        found: &'static str,
    },
    /// A file changed while it was being read for sending.
    #[error("{path} changed while it was being read ({what})")]
    Changed { path: String, what: &'static str },
    /// Content does not have the hash it should have.
    #[error("{path}: content hash mismatch: expected {}, got {}", hex(.expected), hex(.got))]
    HashMismatch {
        path: String,
        expected: Hash,
        got: Hash,
    },
    /// Content does not have the size it should have.
    #[error("{path}: size mismatch: expected {expected} bytes, got {got}")]
    SizeMismatch {
        path: String,
        expected: u64,
        got: u64,
    },
    /// The tree did not end up as the step intended: something changed it concurrently,
    /// or the plan's order is wrong.
    #[error("{op} {path}: {what}")]
    Inconsistent {
        op: &'static str,
        path: String,
        what: &'static str,
    },
    /// `write`/`finish` for a file id that has no transfer in progress.
    #[error("{op}: no file #{file_id} is in progress in this stage")]
    UnknownFile { op: &'static str, file_id: u32 },
    /// `begin` for a file id that already has a transfer in progress.
    #[error("begin: file #{file_id} is already in progress in this stage")]
    DuplicateFile { file_id: u32 },
    /// `apply` was given a stage created for another content root.
    #[error("the stage {stage} does not belong to the content root {root}")]
    StageMismatch { stage: String, root: String },
    /// The scanned entries did not form a valid manifest (a bug in the scanner).
    #[error("scan {root}: {source}")]
    Manifest {
        root: String,
        #[source]
        source: ManifestError,
    },
}

impl FsError {
    pub(crate) fn io(op: &'static str, path: impl fmt::Display, e: Errno) -> FsError {
        FsError::Io {
            op,
            path: path.to_string(),
            source: e.into(),
        }
    }

    pub(crate) fn std_io(op: &'static str, path: impl fmt::Display, e: std::io::Error) -> FsError {
        FsError::Io {
            op,
            path: path.to_string(),
            source: e,
        }
    }

    /// The `errno` behind an [`FsError::Io`], if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            FsError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True for an [`FsError::Io`] caused by `ENOENT`.
    pub fn is_not_found(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOENT)
    }
}

/// Lower-case hex of a hash, for messages.
pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// An opened content root. See the module docs for the confinement rules.
#[derive(Debug)]
pub struct Root {
    /// `O_RDONLY | O_DIRECTORY` descriptor of the root directory.
    fd: OwnedFd,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Root {
    /// Opens the content root at `path` (which must be a directory; symlinks in the
    /// configured path itself are followed), creates `.cdsync/stage` (mode 0700) if
    /// missing, and removes stale stage directories left by a process that died.
    pub fn open(path: &Path) -> Result<Root, FsError> {
        let root = Root::open_read_only(path)?;
        let reserved = mkdir_private(root.fd(), RESERVED_DIR, ".cdsync")?;
        let stage_parent = mkdir_private(reserved.as_fd(), STAGE_DIR, ".cdsync/stage")?;
        let removed = stage::remove_stale(stage_parent.as_fd())
            .map_err(|e| FsError::io("clean stale stages", ".cdsync/stage", e))?;
        if removed > 0 {
            tracing::info!(root = %path.display(), removed, "removed stale stage directories");
        }
        Ok(root)
    }

    /// Opens the content root at `path` for reading only (scanning, sending): nothing is
    /// created or cleaned, so this works on a read-only filesystem. A [`Stage`] cannot be
    /// created for a root opened this way unless `.cdsync/stage` already exists.
    pub fn open_read_only(path: &Path) -> Result<Root, FsError> {
        let shown = path.display();
        let fd = sys::retry(|| {
            rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        })
        .map_err(|e| FsError::io("open root", &shown, e))?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| FsError::io("stat root", &shown, e))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
            dev: st.dev,
            ino: st.ino,
        })
    }

    /// The path the root was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the daemon keeps this root's [`HashIndex`]: `<root>/.cdsync/index`.
    pub fn index_path(&self) -> PathBuf {
        self.path.join(".cdsync").join("index")
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// (st_dev, st_ino) of the root directory.
    pub(crate) fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Opens `.cdsync/stage`, refusing symlinks.
    pub(crate) fn open_stage_parent(&self) -> Result<OwnedFd, FsError> {
        let reserved = sys::open_dir_nofollow(self.fd(), RESERVED_DIR)
            .map_err(|e| resolve_err("open", ".cdsync", e))?;
        sys::open_dir_nofollow(reserved.as_fd(), STAGE_DIR)
            .map_err(|e| resolve_err("open", ".cdsync/stage", e))
    }

    /// Opens `path` beneath the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`.
    /// `None` is the root itself. Paths inside `.cdsync` are refused.
    pub(crate) fn open_beneath(
        &self,
        op: &'static str,
        path: Option<&RelPath>,
        flags: OFlags,
    ) -> Result<OwnedFd, FsError> {
        let (bytes, shown): (&[u8], String) = match path {
            Some(p) => {
                check_not_reserved(op, p)?;
                (p.as_bytes(), p.display())
            }
            None => (b".", ".".to_owned()),
        };
        let mut tries = 0;
        loop {
            let r = sys::retry(|| {
                rustix::fs::openat2(
                    self.fd(),
                    bytes,
                    flags | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                )
            });
            match r {
                // openat2 asks for a retry when a rename raced with the lookup.
                Err(Errno::AGAIN) if tries < 16 => tries += 1,
                Ok(fd) => return Ok(fd),
                Err(e) => return Err(resolve_err(op, &shown, e)),
            }
        }
    }

    /// Opens the regular file at `path` for reading (beneath the root, no symlinks,
    /// `O_NONBLOCK` so a FIFO swapped in cannot block; `O_NOATIME` where the kernel
    /// allows it) and `fstat`s it. Anything but a regular file is
    /// [`FsError::WrongType`]. Shared by the sender, the delta base and the snapshot.
    pub(crate) fn open_file(
        &self,
        op: &'static str,
        path: &RelPath,
    ) -> Result<(OwnedFd, sys::StatInfo), FsError> {
        let base = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
        let fd = match self.open_beneath(op, Some(path), base | OFlags::NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                self.open_beneath(op, Some(path), base)?
            }
            r => r?,
        };
        let st = sys::fstat(fd.as_fd()).map_err(|e| FsError::io("stat", path, e))?;
        if st.kind() != sys::Kind::File {
            return Err(FsError::WrongType {
                op,
                path: path.display(),
                expected: sys::Kind::File.name(),
                found: st.kind().name(),
            });
        }
        Ok((fd, st))
    }

    /// Opens the directory a path lives in (`O_PATH`), for use with the `*at` calls on
    /// [`RelPath::file_name`].
    pub(crate) fn open_parent(&self, op: &'static str, path: &RelPath) -> Result<OwnedFd, FsError> {
        check_not_reserved(op, path)?;
        self.open_beneath(op, path.parent().as_ref(), OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| match e {
                // Name the path the caller asked about, not only its parent.
                FsError::Escape { op, .. } => FsError::Escape {
                    op,
                    path: path.display(),
                },
                FsError::Io { op, source, .. } => FsError::Io {
                    op,
                    path: format!("{} (parent directory)", path),
                    source,
                },
                e => e,
            })
    }
}

/// Refuses a path inside the reserved `.cdsync` directory.
pub(crate) fn check_not_reserved(op: &'static str, path: &RelPath) -> Result<(), FsError> {
    if path.components().next() == Some(RESERVED_DIR) {
        return Err(FsError::Reserved {
            op,
            path: path.display(),
        });
    }
    Ok(())
}

/// Maps an error of a confined lookup: `ELOOP` (a symlink with `RESOLVE_NO_SYMLINKS` or
/// `O_NOFOLLOW`) and `EXDEV` (`RESOLVE_BENEATH` refused to leave the root) mean the
/// path tried to escape.
pub(crate) fn resolve_err(op: &'static str, path: impl fmt::Display, e: Errno) -> FsError {
    match e {
        Errno::LOOP | Errno::XDEV => FsError::Escape {
            op,
            path: path.to_string(),
        },
        e => FsError::io(op, path, e),
    }
}

/// Creates directory `name` in `dir` with mode 0700 if it is missing and opens it,
/// refusing a symlink or a non-directory in its place.
fn mkdir_private(dir: BorrowedFd<'_>, name: &[u8], shown: &str) -> Result<OwnedFd, FsError> {
    match sys::retry(|| rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(FsError::io("create", shown, e)),
    }
    match sys::open_dir_nofollow(dir, name) {
        Ok(fd) => Ok(fd),
        // O_DIRECTORY | O_NOFOLLOW on a symlink gives ENOTDIR: say which it was.
        Err(Errno::NOTDIR) => match sys::lstat_at(dir, name).map(|st| st.kind()) {
            Ok(sys::Kind::Symlink) => Err(FsError::Escape {
                op: "open",
                path: shown.to_owned(),
            }),
            Ok(found) => Err(FsError::WrongType {
                op: "open",
                path: shown.to_owned(),
                expected: sys::Kind::Dir.name(),
                found: found.name(),
            }),
            Err(e) => Err(FsError::io("open", shown, e)),
        },
        Err(e) => Err(resolve_err("open", shown, e)),
    }
}

/// A name no other call in this or another process produces: pid, a process-wide
/// counter and the clock.
pub(crate) fn unique_suffix() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{}-{:x}", std::process::id(), seq, nanos)
}

/// A fresh `.cdsync-tmp-…` name for a temporary entry beside a target.
pub(crate) fn tmp_name() -> Vec<u8> {
    format!("{TMP_PREFIX}{}", unique_suffix()).into_bytes()
}

/// Opens a file for reading (hashing, sending, copying) without following a symlink,
/// blocking on a FIFO or touching its atime.
pub(crate) fn open_read(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    with_noatime(|extra| {
        sys::retry(|| {
            rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY
                    | OFlags::NOFOLLOW
                    | OFlags::NONBLOCK
                    | OFlags::NOCTTY
                    | OFlags::CLOEXEC
                    | extra,
                Mode::empty(),
            )
        })
    })
}

/// Calls `f` with `O_NOATIME`, and again without it if the kernel refuses (`EPERM`:
/// we neither own the file nor have `CAP_FOWNER`). Reading for hashing or sending
/// should not disturb atimes.
pub(crate) fn with_noatime<T>(
    mut f: impl FnMut(OFlags) -> rustix::io::Result<T>,
) -> rustix::io::Result<T> {
    match f(OFlags::NOATIME) {
        Err(Errno::PERM) => f(OFlags::empty()),
        r => r,
    }
}
