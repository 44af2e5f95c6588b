//! Thin system-call helpers shared by the filesystem layer.
//!
//! Everything here works on file descriptors and single path components; none of it
//! resolves a multi-component path (that is [`super::Root`]'s job, through `openat2`
//! with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`). The one `unsafe` block of the
//! filesystem layer lives here: `fchmodat2(2)` with `AT_SYMLINK_NOFOLLOW`, which rustix
//! does not wrap. Every helper retries `EINTR`.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Dir, Mode, OFlags, Stat, Timestamps};
use rustix::io::Errno;

use cd_core::manifest::Meta;

/// Retries `f` while it fails with `EINTR`.
pub(crate) fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// `read(2)` into `buf`, retrying `EINTR`. Returns 0 at end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> rustix::io::Result<usize> {
    retry(|| rustix::io::read(fd, &mut *buf))
}

/// Writes all of `data`, retrying short writes and `EINTR`.
pub(crate) fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> rustix::io::Result<()> {
    while !data.is_empty() {
        let n = retry(|| rustix::io::write(fd, data))?;
        if n == 0 {
            return Err(Errno::IO);
        }
        data = &data[n..];
    }
    Ok(())
}

/// Size of the buffer used to hash and copy file content.
pub(crate) const BUF_SIZE: usize = 256 * 1024;

/// Reads `src` from its current offset to the end, feeding every byte to `hasher` and,
/// if `dst` is given, writing it there. Returns the number of bytes read.
pub(crate) fn copy_hash(
    src: BorrowedFd<'_>,
    dst: Option<BorrowedFd<'_>>,
    hasher: &mut blake3::Hasher,
) -> rustix::io::Result<u64> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let n = read(src, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        if let Some(d) = dst {
            write_all(d, &buf[..n])?;
        }
        total += n as u64;
    }
}

/// `fstat(2)` as a [`StatInfo`].
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> rustix::io::Result<StatInfo> {
    retry(|| rustix::fs::fstat(fd)).map(|s| StatInfo::from_stat(&s))
}

/// `fstatat(2)` with `AT_SYMLINK_NOFOLLOW` (an `lstat` relative to `dir`).
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<StatInfo> {
    retry(|| rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW))
        .map(|s| StatInfo::from_stat(&s))
}

/// The kind of a filesystem object, from `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Other => "a special file",
        }
    }
}

/// The fields of `struct stat` the filesystem layer uses, in fixed-width types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatInfo {
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Full `st_mode`, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
}

impl StatInfo {
    #[expect(
        clippy::useless_conversion,
        reason = "field widths of `struct stat` differ between architectures; the \
                  conversions that are no-ops here are needed elsewhere"
    )]
    fn from_stat(s: &Stat) -> StatInfo {
        StatInfo {
            dev: u64::try_from(s.st_dev).unwrap_or(0),
            ino: u64::try_from(s.st_ino).unwrap_or(0),
            nlink: u64::try_from(s.st_nlink).unwrap_or(0),
            mode: u32::try_from(s.st_mode).unwrap_or(0),
            uid: s.st_uid,
            gid: s.st_gid,
            size: u64::try_from(s.st_size).unwrap_or(0),
            mtime_sec: i64::try_from(s.st_mtime).unwrap_or(0),
            mtime_nsec: u32::try_from(s.st_mtime_nsec).unwrap_or(0),
            ctime_sec: i64::try_from(s.st_ctime).unwrap_or(0),
            ctime_nsec: u32::try_from(s.st_ctime_nsec).unwrap_or(0),
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        match self.mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }

    /// Permission bits, owner and mtime as a manifest [`Meta`].
    pub(crate) fn meta(&self) -> Meta {
        Meta {
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime_sec: self.mtime_sec,
            mtime_nsec: self.mtime_nsec,
        }
    }

    pub(crate) fn ctime_ns(&self) -> i128 {
        i128::from(self.ctime_sec) * 1_000_000_000 + i128::from(self.ctime_nsec)
    }

    /// Same inode, same size, same mtime and ctime: the content has not changed as far
    /// as the kernel can tell.
    pub(crate) fn same_version(&self, o: &StatInfo) -> bool {
        self.dev == o.dev
            && self.ino == o.ino
            && self.size == o.size
            && self.mtime_sec == o.mtime_sec
            && self.mtime_nsec == o.mtime_nsec
            && self.ctime_sec == o.ctime_sec
            && self.ctime_nsec == o.ctime_nsec
    }
}

/// Timestamps for `utimensat`/`futimens`: mtime `sec.nsec`, atime left alone.
///
/// rustix names its `Timespec` only with its `time` feature, which the daemon does not
/// enable; the fields are reachable through `Timestamps` all the same.
pub(crate) fn mtime_only(sec: i64, nsec: u32) -> Timestamps {
    let mut t = Timestamps {
        last_access: Default::default(),
        last_modification: Default::default(),
    };
    t.last_access.tv_nsec = rustix::fs::UTIME_OMIT;
    t.last_modification.tv_sec = sec;
    t.last_modification.tv_nsec = nsec.into();
    t
}

/// `fchmodat(dir, name, mode)` that never follows a symlink in `name`.
///
/// Uses `fchmodat2(2)` with `AT_SYMLINK_NOFOLLOW` (Linux 6.6+). On older kernels
/// (`ENOSYS`) it opens `name` with `O_PATH | O_NOFOLLOW`, refuses a symlink, and
/// changes the mode through `/proc/self/fd/N`, which names that exact inode.
pub(crate) fn chmod_at_nofollow(
    dir: BorrowedFd<'_>,
    name: &[u8],
    mode: u32,
) -> rustix::io::Result<()> {
    let cname = std::ffi::CString::new(name).map_err(|_| Errno::INVAL)?;
    match retry(|| fchmodat2_nofollow(dir, &cname, mode)) {
        Err(Errno::NOSYS) => {}
        r => return r,
    }
    let fd = retry(|| {
        rustix::fs::openat(
            dir,
            cname.as_c_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    })?;
    if fstat(fd.as_fd())?.kind() == Kind::Symlink {
        return Err(Errno::OPNOTSUPP);
    }
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    retry(|| {
        rustix::fs::chmodat(
            rustix::fs::CWD,
            proc_path.as_str(),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
    })
}

#[expect(unsafe_code, reason = "rustix has no wrapper for fchmodat2(2)")]
fn fchmodat2_nofollow(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> rustix::io::Result<()> {
    // SAFETY: `dir` is a live descriptor borrowed for the duration of the call, `name`
    // is a NUL-terminated string that outlives the call, and the remaining arguments
    // are plain integers. fchmodat2 does not retain any pointer after it returns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            libc::c_long::from(dir.as_raw_fd()),
            name.as_ptr(),
            libc::c_long::from(mode),
            libc::c_long::from(libc::AT_SYMLINK_NOFOLLOW),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    }
}

/// Removes `name` in `dir`: a file or symlink is unlinked, a directory is removed with
/// everything beneath it. Never follows a symlink. A missing `name` is success.
pub(crate) fn remove_tree_at(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<()> {
    match retry(|| rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR) => {
            return match retry(|| rustix::fs::unlinkat(dir, name, AtFlags::empty())) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e),
            };
        }
        Err(Errno::NOTEMPTY | Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let fd = match open_dir_nofollow(dir, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    for child in read_names(fd.as_fd())? {
        match retry(|| rustix::fs::unlinkat(&fd, child.as_slice(), AtFlags::empty())) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) => remove_tree_at(fd.as_fd(), &child)?,
            Err(e) => return Err(e),
        }
    }
    match retry(|| rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens the directory `name` in `dir` for reading, refusing a symlink.
pub(crate) fn open_dir_nofollow(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    retry(|| {
        rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    })
}

/// All names in the directory `fd` except `.` and `..`, in no particular order.
pub(crate) fn read_names(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<Vec<u8>>> {
    let mut dir = Dir::read_from(fd)?;
    let mut names = Vec::new();
    while let Some(ent) = dir.read() {
        let ent = match ent {
            Ok(e) => e,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        };
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn chmod_nofollow_never_touches_a_symlink_target() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        let inner = t.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        std::os::unix::fs::symlink(&outside, inner.join("link")).unwrap();
        std::fs::write(inner.join("file"), b"y").unwrap();
        let dir =
            rustix::fs::open(&inner, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        assert!(chmod_at_nofollow(dir.as_fd(), b"link", 0o600).is_err());
        let m = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o7777;
        assert_eq!(m, 0o644, "the symlink's target must keep its mode");
        chmod_at_nofollow(dir.as_fd(), b"file", 0o4751).unwrap();
        let m = std::fs::metadata(inner.join("file"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(m, 0o4751);
    }

    #[test]
    fn remove_tree_does_not_follow_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let keep = t.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        std::fs::write(keep.join("precious"), b"p").unwrap();
        let d = t.path().join("d");
        std::fs::create_dir_all(d.join("a/b/c")).unwrap();
        std::fs::write(d.join("a/b/c/f"), b"f").unwrap();
        std::os::unix::fs::symlink(&keep, d.join("a/link")).unwrap();
        let top =
            rustix::fs::open(t.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        remove_tree_at(top.as_fd(), b"d").unwrap();
        assert!(!d.exists());
        assert!(keep.join("precious").exists());
        remove_tree_at(top.as_fd(), b"d").unwrap();
    }
}
