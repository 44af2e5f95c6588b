//! [`SendFile`]: the sender side of a file transfer.
//!
//! The file is opened once beneath the root (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW | O_NONBLOCK`), must be a regular file, and is read
//! sequentially while BLAKE3 hashes every byte handed out. [`SendFile::finish`]
//! `fstat`s again: if size, mtime or ctime moved, or fewer bytes than the size were
//! read, the transfer is refused with [`FsError::Changed`] / [`FsError::SizeMismatch`]
//! and the receiver must discard what it got. The hash returned is of the bytes
//! actually sent, so a receiver that verifies it never keeps a torn copy.
//!
//! Paths inside `.cdsync` are refused: a peer can never read the stage or the index.
//!
//! Content is read through the process's [`FileIo`] ([`file_io::current`], or the one
//! given to [`SendFile::open_with`]): with io_uring, a [`UringReader`] keeps several
//! chunks in flight in registered buffers (and, if configured, reads `O_DIRECT`);
//! otherwise `read(2)`. Either way the bytes handed out, their hash and the checks of
//! [`SendFile::finish`] are the same. [`SendFile::next_chunk`] hands out a chunk
//! without copying it (with io_uring, straight from the registered buffer);
//! [`SendFile::read_chunk`] copies into the caller's buffer. They may be mixed.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use cd_core::manifest::Hash;
use cd_core::path::RelPath;
use rustix::fs::OFlags;

use super::file_io::{self, FileIo};
use super::sys::{self, StatInfo};
use super::uring::{self, UringReader};
use super::{FsError, Root};

/// A regular file opened for sending. See the module docs.
#[derive(Debug)]
pub struct SendFile {
    fd: Arc<OwnedFd>,
    path: RelPath,
    st: StatInfo,
    hasher: blake3::Hasher,
    read: u64,
    source: Source,
}

/// Where the bytes come from.
#[derive(Debug)]
enum Source {
    /// `read(2)`; the buffer is for [`SendFile::next_chunk`], allocated on first use.
    Sync(Vec<u8>),
    Uring(UringReader),
}

/// What was sent: size and hash of the bytes read, and the attributes of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentFile {
    pub size: u64,
    pub hash: Hash,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl SendFile {
    /// Opens `path` for sending. Fails with [`FsError::Escape`] if any component is a
    /// symlink, [`FsError::WrongType`] if it is not a regular file.
    pub fn open(root: &Root, path: &RelPath) -> Result<SendFile, FsError> {
        SendFile::open_with(root, path, file_io::current())
    }

    /// As [`open`](Self::open), reading through `io` rather than the process's
    /// installed read path.
    pub fn open_with(root: &Root, path: &RelPath, io: &FileIo) -> Result<SendFile, FsError> {
        let (fd, st) = root.open_file("open for sending", path)?;
        SendFile::opened(fd, st, path, io)
    }

    /// Opens verified content a relay holds in its stage, at `staged` (an absolute
    /// path inside a [`Stage`](super::Stage) directory, opened `O_NOFOLLOW`), for
    /// sending as the file at `path`. Same checks and reads as [`open`](Self::open);
    /// [`FsError::Io`] with `ENOENT` once the relay's apply moved it into place.
    pub fn open_staged(staged: &std::path::Path, path: &RelPath) -> Result<SendFile, FsError> {
        const OP: &str = "open staged content for sending";
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = sys::retry(|| rustix::fs::open(staged, flags, rustix::fs::Mode::empty()))
            .map_err(|e| FsError::io(OP, path, e))?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| FsError::io("stat", path, e))?;
        if st.kind() != sys::Kind::File {
            return Err(FsError::WrongType {
                op: OP,
                path: path.display(),
                expected: sys::Kind::File.name(),
                found: st.kind().name(),
            });
        }
        SendFile::opened(fd, st, path, file_io::current())
    }

    fn opened(fd: OwnedFd, st: StatInfo, path: &RelPath, io: &FileIo) -> Result<SendFile, FsError> {
        let fd = Arc::new(fd);
        let source = match io.uring() {
            Some(svc) => match svc.reader(fd.clone(), st.size) {
                Some(mut r) => {
                    // O_NONBLOCK was for the open (a FIFO in the file's place); io_uring
                    // would turn it into -EAGAIN on filesystems without async reads.
                    uring::set_flags(fd.as_fd(), OFlags::empty(), OFlags::NONBLOCK)
                        .map_err(|e| FsError::io("fcntl", path, e))?;
                    if let Some(policy) = io.direct()
                        && policy.enable(fd.as_fd(), st.dev, path)
                    {
                        r.set_direct(policy.clone(), st.dev);
                    }
                    Source::Uring(r)
                }
                None => {
                    io.note_sync_file();
                    Source::Sync(Vec::new())
                }
            },
            None => Source::Sync(Vec::new()),
        };
        Ok(SendFile {
            fd,
            path: path.clone(),
            st,
            hasher: blake3::Hasher::new(),
            read: 0,
            source,
        })
    }

    /// The path this file was opened at.
    pub fn path(&self) -> &RelPath {
        &self.path
    }

    /// Size at open time: the number of bytes [`read_chunk`](Self::read_chunk) should deliver.
    pub fn size(&self) -> u64 {
        self.st.size
    }

    /// True when content comes through io_uring (false: `read(2)`).
    pub fn via_io_uring(&self) -> bool {
        matches!(self.source, Source::Uring(_))
    }

    /// True when the descriptor is open `O_DIRECT`.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        rustix::fs::fcntl_getfl(&self.fd)
            .unwrap()
            .contains(OFlags::DIRECT)
    }

    /// Reads the next bytes into `buf`; 0 means end of file.
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, FsError> {
        let n = match &mut self.source {
            Source::Sync(_) => {
                sys::read(self.fd.as_fd(), buf).map_err(|e| FsError::io("read", &self.path, e))?
            }
            Source::Uring(r) => {
                if buf.is_empty()
                    || !r
                        .fill(&self.path)
                        .map_err(|e| FsError::io("read", &self.path, e))?
                {
                    return Ok(0);
                }
                let b = r.take(buf.len());
                buf[..b.len()].copy_from_slice(b);
                b.len()
            }
        };
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }

    /// Reads the next chunk (at most [`uring::CHUNK`] bytes) and lends it; empty
    /// means end of file. With io_uring the slice is the registered buffer the kernel
    /// read into, so nothing is copied; it is valid until the next call. Hashed and
    /// counted like [`read_chunk`](Self::read_chunk).
    pub fn next_chunk(&mut self) -> Result<&[u8], FsError> {
        let chunk: &[u8] = match &mut self.source {
            Source::Sync(buf) => {
                if buf.is_empty() {
                    buf.resize(uring::CHUNK, 0);
                }
                let n = sys::read(self.fd.as_fd(), buf)
                    .map_err(|e| FsError::io("read", &self.path, e))?;
                &buf[..n]
            }
            Source::Uring(r) => {
                if !r
                    .fill(&self.path)
                    .map_err(|e| FsError::io("read", &self.path, e))?
                {
                    return Ok(&[]);
                }
                r.take(usize::MAX)
            }
        };
        self.hasher.update(chunk);
        self.read += chunk.len() as u64;
        Ok(chunk)
    }

    /// Checks the file did not change while it was read and returns what was sent.
    pub fn finish(self) -> Result<SentFile, FsError> {
        let now = sys::fstat(self.fd.as_fd()).map_err(|e| FsError::io("stat", &self.path, e))?;
        if !self.st.same_version(&now) {
            return Err(FsError::Changed {
                path: self.path.display(),
                what: "size, mtime or ctime changed since it was opened",
            });
        }
        if self.read != self.st.size {
            return Err(FsError::SizeMismatch {
                path: self.path.display(),
                expected: self.st.size,
                got: self.read,
            });
        }
        let meta = self.st.meta();
        Ok(SentFile {
            size: self.read,
            hash: *self.hasher.finalize().as_bytes(),
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime_sec: meta.mtime_sec,
            mtime_nsec: meta.mtime_nsec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::set_mtime;
    use super::*;
    use std::io::Write;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn read_all(f: &mut SendFile, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = f.read_chunk(&mut buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn sends_content_hash_and_attributes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("d/f"), &data).unwrap();
        set_mtime(&dir.path().join("d/f"), 1_234_567_890, 42);
        let root = Root::open(dir.path()).unwrap();
        let mut f = SendFile::open(&root, &p("d/f")).unwrap();
        assert_eq!(f.size(), data.len() as u64);
        assert_eq!(read_all(&mut f, 7777), data);
        let sent = f.finish().unwrap();
        assert_eq!(sent.size, data.len() as u64);
        assert_eq!(&sent.hash, blake3::hash(&data).as_bytes());
        assert_eq!((sent.mtime_sec, sent.mtime_nsec), (1_234_567_890, 42));
        assert_eq!(sent.mode, 0o644 & !umask());
    }

    fn umask() -> u32 {
        let m = rustix::process::umask(rustix::fs::Mode::empty());
        rustix::process::umask(m);
        m.bits()
    }

    #[test]
    fn detects_modification_during_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 100_000]).unwrap();
        // An old mtime, so the write below changes it even with coarse timestamps.
        set_mtime(&dir.path().join("f"), 1_000_000_000, 0);
        let root = Root::open(dir.path()).unwrap();
        let mut f = SendFile::open(&root, &p("f")).unwrap();
        let mut buf = vec![0u8; 1000];
        f.read_chunk(&mut buf).unwrap();
        // Same size, different byte: only mtime/ctime reveal it.
        let mut h = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("f"))
            .unwrap();
        h.write_all(b"\x02").unwrap();
        drop(h);
        read_all(&mut f, 1000);
        assert!(matches!(f.finish(), Err(FsError::Changed { .. })));

        // Growing the file while it is read is caught too.
        set_mtime(&dir.path().join("f"), 1_000_000_000, 0);
        let mut f = SendFile::open(&root, &p("f")).unwrap();
        let mut h = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("f"))
            .unwrap();
        h.write_all(b"more").unwrap();
        drop(h);
        read_all(&mut f, 4096);
        let e = f.finish().unwrap_err();
        assert!(matches!(e, FsError::Changed { .. }), "{e}");
        assert!(e.to_string().starts_with("f changed"), "{e}");
    }

    #[test]
    fn stopping_early_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 10_000]).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let mut f = SendFile::open(&root, &p("f")).unwrap();
        f.read_chunk(&mut [0u8; 100]).unwrap();
        assert!(matches!(
            f.finish(),
            Err(FsError::SizeMismatch {
                expected: 10_000,
                got: 100,
                ..
            })
        ));
    }

    #[test]
    fn refuses_symlinks_specials_and_reserved_paths() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::os::unix::fs::symlink(outside.path(), r.join("door")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), r.join("link")).unwrap();
        std::fs::create_dir(r.join("d")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            r.join("fifo"),
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        let root = Root::open(r).unwrap();
        std::fs::write(r.join(".cdsync/index"), b"private").unwrap();
        for (path, want) in [
            ("door/secret", "escape"),
            ("link", "escape"),
            ("d", "type"),
            ("fifo", "type"),
            (".cdsync/index", "reserved"),
            ("missing", "io"),
        ] {
            let e = SendFile::open(&root, &p(path)).unwrap_err();
            let ok = match want {
                "escape" => matches!(e, FsError::Escape { .. }),
                "type" => matches!(e, FsError::WrongType { .. }),
                "reserved" => matches!(e, FsError::Reserved { .. }),
                _ => e.is_not_found(),
            };
            assert!(ok, "{path}: {e:?}");
            assert!(e.to_string().contains(path), "error names the path: {e}");
        }
    }
}
