//! [`Snapshot`]: a file pinned so that it can be handed to `sendfile` without being read
//! in user space.
//!
//! `sendfile` copies from the page cache at the moment it runs, and the sender no longer
//! sees (or hashes) the bytes, so a file that changes while it is sent would go out torn.
//! The receiver's BLAKE3 check would catch that and never install it, but the round
//! would be wasted; so a file is only zero-copied when it **cannot change** while it is
//! sent:
//!
//! 1. **Reflink**: `FICLONE` the file into an `O_TMPFILE` in `<root>/.cdsync` (same
//!    filesystem as the content, on btrfs and XFS). The clone shares the extents, costs
//!    no copy, and nobody else can open it. `fstat` before and after the clone must
//!    agree, so the clone is the version the first `fstat` describes.
//! 2. **Read lease**: `F_SETLEASE F_RDLCK` on our descriptor. The kernel grants it only
//!    while nobody has the file open for writing, and while it is held every new
//!    `open` for writing (and every truncate) blocks until we release it or the kernel's
//!    `lease-break-time` (45 s by default) runs out. A breaker makes the kernel send
//!    this process `SIGIO`; [`init_lease_signal`] installs a handler for it first
//!    (the default action would end the daemon), and leases are not used before it
//!    succeeded. The sender polls [`Snapshot::intact`] between chunks and gives up
//!    on the file (the next attempt reads it the ordinary way) as soon as a writer
//!    waits, so a writer waits for about one chunk. `fstat` before and after the send
//!    must agree as well: if the break timed out and a writer got in, that shows.
//! 3. **Neither** (another filesystem for the clone, a file open for writing, no
//!    permission to lease): [`Snapshot::take`] returns `None`, and the caller uses the
//!    ordinary read path ([`super::SendFile`]), which hashes what it sends.
//!
//! A file open for writing is therefore never sent with `sendfile` (a reflink clone is
//! not the file: it is a copy whose content was fixed at one instant).

mod lease;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use cd_core::manifest::{Meta, RESERVED_DIR};
use cd_core::path::RelPath;
use rustix::fs::{Mode, OFlags};

use super::sys::{self, StatInfo};
use super::{FsError, Root};

/// Set once a `SIGIO` handler is installed: leases are used only then.
static LEASE_SIGNAL: AtomicBool = AtomicBool::new(false);

/// Installs a handler for `SIGIO`, the signal a lease holder gets when a writer wants
/// the file, and drains it in a task (logging at debug). Must run inside the tokio
/// runtime. Without it, [`Snapshot::take`] never takes a lease.
pub fn init_lease_signal() -> bool {
    if LEASE_SIGNAL.load(Ordering::Acquire) {
        return true;
    }
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io()) {
        Ok(mut sig) => {
            // tokio's handler stays installed for the life of the process.
            tokio::spawn(async move {
                while sig.recv().await.is_some() {
                    tracing::debug!("SIGIO: a writer waits for a file this node is sending");
                }
            });
            LEASE_SIGNAL.store(true, Ordering::Release);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGIO; files are not sent with sendfile under a lease");
            false
        }
    }
}

/// How a [`Snapshot`] keeps its content fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pin {
    /// A reflink clone in an unnamed temporary file.
    Reflink,
    /// A read lease on the file itself.
    Lease,
}

/// A file whose content cannot change while it is sent. See the module docs.
#[derive(Debug)]
pub struct Snapshot {
    /// The file as opened beneath the root.
    source: OwnedFd,
    /// The reflink clone, if that is how it is pinned.
    clone: Option<OwnedFd>,
    pin: Pin,
    st: StatInfo,
    path: RelPath,
}

impl Snapshot {
    /// Opens `path` beneath `root` and pins it, or returns `None` when it cannot be
    /// pinned (the caller then reads it the ordinary way). Errors are those of opening:
    /// a missing file, a symlink, not a regular file.
    pub fn take(root: &Root, path: &RelPath) -> Result<Option<Snapshot>, FsError> {
        Self::take_with(root, path, true)
    }

    /// [`take`](Self::take), trying a reflink clone first only if `try_reflink` (the
    /// tests pin with a lease on any filesystem with `false`).
    fn take_with(
        root: &Root,
        path: &RelPath,
        try_reflink: bool,
    ) -> Result<Option<Snapshot>, FsError> {
        let (source, st) = root.open_file("open for sending", path)?;
        let stat = |fd: BorrowedFd<'_>| sys::fstat(fd).map_err(|e| FsError::io("stat", path, e));
        if let Some(clone) = try_reflink.then(|| reflink(root, source.as_fd())).flatten() {
            // The clone is the version `st` describes only if nothing moved meanwhile.
            if stat(source.as_fd())?.same_version(&st) {
                return Ok(Some(Snapshot {
                    source,
                    clone: Some(clone),
                    pin: Pin::Reflink,
                    st,
                    path: path.clone(),
                }));
            }
            return Ok(None);
        }
        if !LEASE_SIGNAL.load(Ordering::Acquire) {
            return Ok(None);
        }
        match lease::set_lease(source.as_fd(), lease::Lease::Read) {
            Ok(()) => {}
            Err(e) => {
                // EAGAIN: open for writing somewhere. EACCES: not our file and no
                // CAP_LEASE. EINVAL: the filesystem has no leases.
                tracing::trace!(path = %path, error = %e, "no read lease; reading the file instead");
                return Ok(None);
            }
        }
        // The version under the lease: nothing can change it until the lease breaks.
        let st = stat(source.as_fd())?;
        Ok(Some(Snapshot {
            source,
            clone: None,
            pin: Pin::Lease,
            st,
            path: path.clone(),
        }))
    }

    /// The descriptor to `sendfile` from.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.clone.as_ref().unwrap_or(&self.source).as_fd()
    }

    pub fn pin(&self) -> Pin {
        self.pin
    }

    pub fn path(&self) -> &RelPath {
        &self.path
    }

    /// Size of the pinned content.
    pub fn size(&self) -> u64 {
        self.st.size
    }

    /// Permission bits, owner and mtime of the pinned version.
    pub fn meta(&self) -> Meta {
        self.st.meta()
    }

    /// False once a writer waits for the lease (or it is gone): stop sending and let
    /// go. A reflink clone is always intact.
    pub fn intact(&self) -> bool {
        match self.pin {
            Pin::Reflink => true,
            Pin::Lease => lease::read_lease_intact(self.source.as_fd()).unwrap_or(false),
        }
    }

    /// Checks, after the content went out, that what was sent is the version pinned:
    /// for a lease, that `fstat` did not move (a lease broken by timeout lets a writer
    /// in). Releases the lease.
    pub fn finish(self) -> Result<Meta, FsError> {
        if self.pin == Pin::Lease {
            let now =
                sys::fstat(self.source.as_fd()).map_err(|e| FsError::io("stat", &self.path, e))?;
            let _ = lease::set_lease(self.source.as_fd(), lease::Lease::Unlock);
            if !self.st.same_version(&now) {
                return Err(FsError::Changed {
                    path: self.path.display(),
                    what: "size, mtime or ctime changed while it was sent",
                });
            }
        }
        Ok(self.st.meta())
    }
}

/// A reflink clone of `source` in an unnamed temporary file in `<root>/.cdsync`, or
/// `None` where the filesystem cannot clone (or `.cdsync` is not writable).
fn reflink(root: &Root, source: BorrowedFd<'_>) -> Option<OwnedFd> {
    let dir = sys::open_dir_nofollow(root.fd(), RESERVED_DIR).ok()?;
    let tmp = sys::retry(|| {
        rustix::fs::openat(
            &dir,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    })
    .ok()?;
    rustix::fs::ioctl_ficlone(&tmp, source).ok()?;
    Some(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// A snapshot pinned by a lease, never a reflink clone, whatever the filesystem.
    fn lease_only(root: &Root, path: &str) -> Option<Snapshot> {
        Snapshot::take_with(root, &p(path), false).unwrap()
    }

    /// The lease decision (reflinks not tried, so it runs on any filesystem): a file open for writing is
    /// never pinned; one that is not gets a lease, which a writer's open breaks.
    #[tokio::test(flavor = "multi_thread")]
    async fn lease_only_when_nobody_writes() {
        assert!(init_lease_signal());
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let data = vec![5u8; 100_000];
        std::fs::write(dir.path().join("f"), &data).unwrap();

        // Open for writing: no snapshot, so no sendfile.
        let writer = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("f"))
            .unwrap();
        assert!(lease_only(&root, "f").is_none());
        drop(writer);

        // Nobody writes: a lease, and the content is the file's.
        let snap = lease_only(&root, "f").expect("a lease");
        assert_eq!(snap.pin(), Pin::Lease);
        assert_eq!(snap.size(), data.len() as u64);
        assert!(snap.intact());
        let mut buf = vec![0u8; data.len()];
        let n = rustix::io::pread(snap.fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..n], &data[..]);

        // A writer arrives: its open blocks, the lease reports the break, and the
        // writer gets in once we let go.
        let path = dir.path().join("f");
        let w = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            f.write_all(b"more").unwrap();
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while snap.intact() {
            assert!(
                std::time::Instant::now() < deadline,
                "the lease never reported the waiting writer"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            !w.is_finished(),
            "the writer got in while the lease was held"
        );
        // What was sent is still the pinned version: nothing was written yet.
        let meta = snap.finish().unwrap();
        assert_eq!(meta.mode & 0o777, 0o644 & !umask());
        w.join().unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("f")).unwrap().len(),
            data.len() as u64 + 4
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_change_under_a_broken_lease_is_caught() {
        assert!(init_lease_signal());
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 1000]).unwrap();
        super::super::tests::set_mtime(&dir.path().join("f"), 1_000_000_000, 0);
        let snap = lease_only(&root, "f").expect("a lease");
        // As if the break had timed out: release it behind the snapshot's back, then
        // write.
        lease::set_lease(snap.source.as_fd(), lease::Lease::Unlock).unwrap();
        assert!(!snap.intact());
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("f"))
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(matches!(snap.finish(), Err(FsError::Changed { .. })));
    }

    #[test]
    fn refuses_what_send_file_refuses() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert!(matches!(
            Snapshot::take(&root, &p("link")),
            Err(FsError::Escape { .. })
        ));
        assert!(matches!(
            Snapshot::take(&root, &p("d")),
            Err(FsError::WrongType { .. })
        ));
        assert!(
            Snapshot::take(&root, &p("missing"))
                .unwrap_err()
                .is_not_found()
        );
    }

    fn umask() -> u32 {
        let m = rustix::process::umask(Mode::empty());
        rustix::process::umask(m);
        m.bits()
    }
}
