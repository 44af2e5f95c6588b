//! [`Stage`]: where content is received and verified before it is placed.
//!
//! A stage is a private directory `<root>/.cdsync/stage/<pid>-<seq>-<time>/` (mode 0700)
//! on the same filesystem as the root, so staged content reaches its final path with a
//! single `rename`. Incoming files are written to fresh `O_EXCL` 0600 files there and
//! hashed while they are written; [`Stage::finish`] keeps a file only if its BLAKE3 hash
//! equals both the hash the sender reports and the hash the plan expects, and then
//! holds it as staged content keyed by that hash. Nothing in a stage is visible in the
//! content tree.
//!
//! Lifetime: the stage holds an exclusive `flock` on its directory and removes the
//! directory when dropped. A stage whose process died loses its lock with the process;
//! [`Root::open`] then removes it. Stage creation and stale
//! cleanup serialise on a lock on `.cdsync/stage` itself, so cleanup never races a stage
//! that is being created.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use cd_core::manifest::Hash;
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::sys::{self, Kind};
use super::{FsError, Root};

/// A per-transfer staging directory. See the module docs.
#[derive(Debug)]
pub struct Stage {
    /// The stage directory (`O_RDONLY`, holding our `flock`).
    dir: OwnedFd,
    /// `.cdsync/stage`, to remove the stage directory on drop.
    parent: OwnedFd,
    name: Vec<u8>,
    path: PathBuf,
    root_id: (u64, u64),
    fsync: bool,
    seq: u64,
    partial: HashMap<u32, Partial>,
    staged: HashMap<Hash, Staged>,
    /// Stage files whose content is known to be on disk (see [`Stage::sync_staged`]).
    durable: std::collections::HashSet<Vec<u8>>,
}

/// A file being received.
#[derive(Debug)]
struct Partial {
    fd: OwnedFd,
    name: Vec<u8>,
    hasher: blake3::Hasher,
    written: u64,
    expected: Hash,
}

/// Verified content held in the stage under `name`.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    pub name: Vec<u8>,
    pub size: u64,
}

impl Stage {
    /// Creates a new, empty stage for `root`.
    pub fn new(root: &Root) -> Result<Stage, FsError> {
        const OP: &str = "create stage";
        let parent = root.open_stage_parent()?;
        let shown_parent = ".cdsync/stage";
        sys::retry(|| rustix::fs::flock(&parent, FlockOperation::LockExclusive))
            .map_err(|e| FsError::io(OP, shown_parent, e))?;
        let name = super::unique_suffix().into_bytes();
        let shown = format!("{shown_parent}/{}", String::from_utf8_lossy(&name));
        let made = (|| {
            sys::retry(|| {
                rustix::fs::mkdirat(&parent, name.as_slice(), Mode::from_raw_mode(0o700))
            })?;
            let dir = sys::open_dir_nofollow(parent.as_fd(), &name)?;
            rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive)?;
            Ok(dir)
        })();
        let _ = rustix::fs::flock(&parent, FlockOperation::Unlock);
        let dir = made.map_err(|e| FsError::io(OP, &shown, e))?;
        let path = root
            .path()
            .join(".cdsync")
            .join("stage")
            .join(String::from_utf8_lossy(&name).as_ref());
        tracing::debug!(stage = %path.display(), "stage created");
        Ok(Stage {
            dir,
            parent,
            name,
            path,
            root_id: root.id(),
            fsync: true,
            seq: 0,
            partial: HashMap::new(),
            staged: HashMap::new(),
            durable: Default::default(),
        })
    }

    /// Whether [`finish`](Self::finish) fsyncs each received file (default true). A
    /// caller that applies with `fsync: true` may turn this off: placement fsyncs each
    /// file before renaming it into place anyway.
    pub fn set_fsync(&mut self, fsync: bool) {
        self.fsync = fsync;
    }

    /// The stage directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts receiving file `file_id`, whose content should hash to `expected_hash`.
    pub fn begin(&mut self, file_id: u32, expected_hash: Hash) -> Result<(), FsError> {
        if self.partial.contains_key(&file_id) {
            return Err(FsError::DuplicateFile { file_id });
        }
        let (fd, name) = self.create_temp("in-")?;
        let p = Partial {
            fd,
            name,
            hasher: blake3::Hasher::new(),
            written: 0,
            expected: expected_hash,
        };
        self.partial.insert(file_id, p);
        Ok(())
    }

    /// Appends `data` to file `file_id`. On a write error the partial file is discarded.
    pub fn write(&mut self, file_id: u32, data: &[u8]) -> Result<(), FsError> {
        let p = self.partial.get_mut(&file_id).ok_or(FsError::UnknownFile {
            op: "write",
            file_id,
        })?;
        if let Err(e) = sys::write_all(p.fd.as_fd(), data) {
            self.abort_file(file_id);
            return Err(FsError::io("write", format!("stage file #{file_id}"), e));
        }
        p.hasher.update(data);
        p.written += data.len() as u64;
        Ok(())
    }

    /// Discards file `file_id` (the sender aborted it). Unknown ids are ignored.
    pub fn abort_file(&mut self, file_id: u32) {
        if let Some(p) = self.partial.remove(&file_id) {
            drop(p.fd);
            self.discard(&p.name);
        }
    }

    /// Completes file `file_id`: the bytes written must number `size` and hash to
    /// `hash`, which must be the hash given to [`begin`](Self::begin). On success the
    /// content is fsynced (unless turned off) and staged under its hash; on failure it
    /// is discarded.
    pub fn finish(&mut self, file_id: u32, hash: Hash, size: u64) -> Result<(), FsError> {
        let p = self.partial.remove(&file_id).ok_or(FsError::UnknownFile {
            op: "finish",
            file_id,
        })?;
        let shown = format!("stage file #{file_id}");
        let got = *p.hasher.finalize().as_bytes();
        let err = if p.written != size {
            Some(FsError::SizeMismatch {
                path: shown.clone(),
                expected: size,
                got: p.written,
            })
        } else if got != hash {
            Some(FsError::HashMismatch {
                path: shown.clone(),
                expected: hash,
                got,
            })
        } else if got != p.expected {
            Some(FsError::HashMismatch {
                path: shown.clone(),
                expected: p.expected,
                got,
            })
        } else if self.fsync {
            sys::retry(|| rustix::fs::fsync(&p.fd))
                .err()
                .map(|e| FsError::io("fsync", &shown, e))
        } else {
            None
        };
        drop(p.fd);
        if let Some(e) = err {
            self.discard(&p.name);
            return Err(e);
        }
        self.insert(got, p.name, size);
        Ok(())
    }

    /// Where content `hash` is staged, if it is (until apply takes it).
    pub fn staged_path(&self, hash: &Hash) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let s = self.staged.get(hash)?;
        Some(self.path.join(std::ffi::OsStr::from_bytes(&s.name)))
    }

    /// True if content with this hash is staged.
    pub fn has(&self, hash: &Hash) -> bool {
        self.staged.contains_key(hash)
    }

    /// Makes every staged content durable with one `syncfs` of the stage's filesystem
    /// instead of an `fsync` per file (a file's data must be on disk before the rename
    /// that exposes it is). Returns how many files it covered; on failure nothing is
    /// marked and placement falls back to fsyncing each file.
    pub fn sync_staged(&mut self) -> Result<usize, FsError> {
        let pending: Vec<Vec<u8>> = self
            .staged
            .values()
            .filter(|s| !self.durable.contains(&s.name))
            .map(|s| s.name.clone())
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        sys::retry(|| rustix::fs::syncfs(&self.dir))
            .map_err(|e| FsError::io("syncfs", self.path.display(), e))?;
        let n = pending.len();
        self.durable.extend(pending);
        Ok(n)
    }

    /// Whether stage file `name` is known to be on disk.
    pub(crate) fn is_durable(&self, name: &[u8]) -> bool {
        self.durable.contains(name)
    }

    /// Number of distinct contents staged.
    pub fn staged_count(&self) -> usize {
        self.staged.len()
    }

    /// Total size of the staged contents (not counting files still being received).
    pub fn staged_bytes(&self) -> u64 {
        self.staged.values().map(|s| s.size).sum()
    }

    pub(crate) fn root_id(&self) -> (u64, u64) {
        self.root_id
    }

    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// A name not yet used in this stage.
    pub(crate) fn temp_name(&mut self, prefix: &str) -> Vec<u8> {
        self.seq += 1;
        format!("{prefix}{}", self.seq).into_bytes()
    }

    /// Creates a new empty file (`O_RDWR | O_EXCL`, 0600) in the stage.
    pub(crate) fn create_temp(&mut self, prefix: &str) -> Result<(OwnedFd, Vec<u8>), FsError> {
        let name = self.temp_name(prefix);
        let fd = sys::retry(|| {
            rustix::fs::openat(
                &self.dir,
                name.as_slice(),
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })
        .map_err(|e| FsError::io("create", self.shown(&name), e))?;
        Ok((fd, name))
    }

    /// Records verified content `name` as staged `hash`. If that content is already
    /// staged the new copy is discarded.
    pub(crate) fn insert(&mut self, hash: Hash, name: Vec<u8>, size: u64) {
        match self.staged.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => self.discard(&name),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Staged { name, size });
            }
        }
    }

    pub(crate) fn get(&self, hash: &Hash) -> Option<&Staged> {
        self.staged.get(hash)
    }

    /// Removes `hash` from the staged set; the caller now owns the file.
    pub(crate) fn take(&mut self, hash: &Hash) -> Option<Staged> {
        self.staged.remove(hash)
    }

    /// Removes `name` from the stage directory, best effort.
    pub(crate) fn discard(&self, name: &[u8]) {
        if let Err(e) = sys::remove_tree_at(self.dir.as_fd(), name) {
            tracing::warn!(stage = %self.path.display(), name = %String::from_utf8_lossy(name), error = %e, "cannot remove a staged file");
        }
    }

    /// `<stage path>/<name>` for messages.
    pub(crate) fn shown(&self, name: &[u8]) -> String {
        format!("{}/{}", self.path.display(), String::from_utf8_lossy(name))
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.partial.clear();
        if let Err(e) = sys::remove_tree_at(self.parent.as_fd(), &self.name) {
            tracing::warn!(stage = %self.path.display(), error = %e, "cannot remove stage directory");
        }
    }
}

/// Removes every stage directory in `parent` (`.cdsync/stage`) whose `flock` can be
/// taken, i.e. whose owner has exited; stray non-directories are removed too. Returns
/// how many entries were removed.
pub(crate) fn remove_stale(parent: BorrowedFd<'_>) -> rustix::io::Result<u64> {
    sys::retry(|| rustix::fs::flock(parent, FlockOperation::LockExclusive))?;
    let r = (|| {
        let mut removed = 0;
        for name in sys::read_names(parent)? {
            let st = match sys::lstat_at(parent, &name) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
            };
            if st.kind() == Kind::Dir {
                let fd = match sys::open_dir_nofollow(parent, &name) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e),
                };
                match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => {}
                    // A live stage, in this process or another.
                    Err(Errno::WOULDBLOCK) => continue,
                    Err(e) => return Err(e),
                }
            }
            sys::remove_tree_at(parent, &name)?;
            removed += 1;
        }
        Ok(removed)
    })();
    let _ = rustix::fs::flock(parent, FlockOperation::Unlock);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(data: &[u8]) -> Hash {
        *blake3::hash(data).as_bytes()
    }

    fn stage_entries(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join(".cdsync/stage"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn one_syncfs_covers_what_is_staged_then() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let mut st = Stage::new(&root).unwrap();
        st.set_fsync(false);
        for (i, data) in [&b"a"[..], b"b", b"c"].iter().enumerate() {
            st.begin(i as u32, h(data)).unwrap();
            st.write(i as u32, data).unwrap();
            st.finish(i as u32, h(data), 1).unwrap();
        }
        assert_eq!(st.sync_staged().unwrap(), 3);
        assert_eq!(st.sync_staged().unwrap(), 0, "nothing new to sync");
        st.begin(9, h(b"late")).unwrap();
        st.write(9, b"late").unwrap();
        st.finish(9, h(b"late"), 4).unwrap();
        let late = st.get(&h(b"late")).unwrap().name.clone();
        let early = st.get(&h(b"a")).unwrap().name.clone();
        assert!(st.is_durable(&early) && !st.is_durable(&late));
        assert_eq!(st.sync_staged().unwrap(), 1);
        assert!(st.is_durable(&late));
    }

    #[test]
    fn receives_verifies_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let mut st = Stage::new(&root).unwrap();
        assert!(st.path().starts_with(dir.path().join(".cdsync/stage")));
        let mode = std::fs::metadata(st.path()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );

        // Good file in two chunks, and two interleaved transfers.
        st.begin(1, h(b"hello world")).unwrap();
        st.begin(2, h(b"second")).unwrap();
        st.write(1, b"hello ").unwrap();
        st.write(2, b"second").unwrap();
        st.write(1, b"world").unwrap();
        st.finish(1, h(b"hello world"), 11).unwrap();
        st.finish(2, h(b"second"), 6).unwrap();
        assert!(st.has(&h(b"hello world")) && st.has(&h(b"second")));

        // Corrupt data: the bytes do not hash to what the plan expects.
        st.begin(3, h(b"expected")).unwrap();
        st.write(3, b"expectee").unwrap();
        let e = st.finish(3, h(b"expected"), 8).unwrap_err();
        assert!(matches!(e, FsError::HashMismatch { .. }), "{e}");
        assert!(e.to_string().contains("stage file #3"), "{e}");
        assert!(!st.has(&h(b"expected")) && !st.has(&h(b"expectee")));

        // The sender's trailer agrees with the bytes, but not with the plan.
        st.begin(4, h(b"planned")).unwrap();
        st.write(4, b"other").unwrap();
        assert!(matches!(
            st.finish(4, h(b"other"), 5),
            Err(FsError::HashMismatch { .. })
        ));
        assert!(!st.has(&h(b"other")));

        // Wrong size.
        st.begin(5, h(b"abc")).unwrap();
        st.write(5, b"abc").unwrap();
        assert!(matches!(
            st.finish(5, h(b"abc"), 4),
            Err(FsError::SizeMismatch {
                expected: 4,
                got: 3,
                ..
            })
        ));

        // Aborted, duplicate and unknown ids.
        st.begin(6, h(b"x")).unwrap();
        assert!(matches!(
            st.begin(6, h(b"x")),
            Err(FsError::DuplicateFile { file_id: 6 })
        ));
        st.write(6, b"partial").unwrap();
        st.abort_file(6);
        assert!(matches!(
            st.write(6, b"x"),
            Err(FsError::UnknownFile {
                op: "write",
                file_id: 6
            })
        ));
        assert!(matches!(
            st.finish(9, h(b""), 0),
            Err(FsError::UnknownFile { op: "finish", .. })
        ));

        // A second copy of already-staged content does not pile up.
        st.begin(7, h(b"second")).unwrap();
        st.write(7, b"second").unwrap();
        st.finish(7, h(b"second"), 6).unwrap();

        // Only the two verified files remain in the stage directory; nothing ever
        // appeared in the content tree.
        assert_eq!(std::fs::read_dir(st.path()).unwrap().count(), 2);
        assert_eq!(st.staged_count(), 2);
        assert_eq!(st.staged_bytes(), 11 + 6);
        let top: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, [".cdsync"]);
        let path = st.path().to_path_buf();
        drop(st);
        assert!(!path.exists(), "dropping a stage removes its directory");
        assert!(stage_entries(dir.path()).is_empty());
    }

    #[test]
    fn root_open_removes_stale_stages_but_not_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let live = Stage::new(&root).unwrap();
        let live_name = live
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // Leftovers of a dead process: a stage directory with content (no lock held) and
        // a stray file.
        let stale = dir.path().join(".cdsync/stage/4242-0-0");
        std::fs::create_dir_all(stale.join("sub")).unwrap();
        std::fs::write(stale.join("in-1"), b"partial").unwrap();
        std::fs::write(stale.join("sub/x"), b"x").unwrap();
        std::fs::write(dir.path().join(".cdsync/stage/stray"), b"?").unwrap();
        let again = Root::open(dir.path()).unwrap();
        assert_eq!(stage_entries(dir.path()), [live_name]);
        // The live stage still works.
        let mut live = live;
        live.begin(1, h(b"ok")).unwrap();
        live.write(1, b"ok").unwrap();
        live.finish(1, h(b"ok"), 2).unwrap();
        drop(live);
        drop(again);
        assert!(stage_entries(dir.path()).is_empty());
    }

    /// Helper run in a child process by `stage_of_killed_process_is_removed`: creates a
    /// stage under `CDSYNC_TEST_STAGE_ROOT`, writes a partial file, reports the stage
    /// path on stdout and waits to be killed.
    #[test]
    #[ignore = "helper, run as a child process by stage_of_killed_process_is_removed"]
    fn child_holding_a_stage() {
        let Some(r) = std::env::var_os("CDSYNC_TEST_STAGE_ROOT") else {
            return;
        };
        let root = Root::open(Path::new(&r)).unwrap();
        let mut st = Stage::new(&root).unwrap();
        st.begin(1, h(b"never finished")).unwrap();
        st.write(1, b"never").unwrap();
        println!("STAGE={}", st.path().display());
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(60));
    }

    #[test]
    fn stage_of_killed_process_is_removed() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        // The test's name without the crate name, wherever this module is mounted.
        let module = module_path!().split_once("::").unwrap().1;
        let name = format!("{module}::child_holding_a_stage");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name.as_str(), "--ignored", "--nocapture"])
            .env("CDSYNC_TEST_STAGE_ROOT", dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let stage = out
            .lines()
            .map(|l| l.unwrap())
            .find_map(|l| l.strip_prefix("STAGE=").map(PathBuf::from))
            .expect("child reports its stage");
        assert!(stage.join("in-1").exists());
        // While the child lives, its stage survives a Root::open here.
        drop(Root::open(dir.path()).unwrap());
        assert!(
            stage.exists(),
            "a live stage of another process must not be removed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(stage.exists(), "a killed process leaves its stage behind");
        drop(Root::open(dir.path()).unwrap());
        assert!(
            !stage.exists(),
            "Root::open removes the stage of a dead process"
        );
    }

    #[test]
    fn refuses_a_symlinked_reserved_dir() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(".cdsync")).unwrap();
        let e = Root::open(dir.path()).unwrap_err();
        assert!(matches!(e, FsError::Escape { .. }), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
