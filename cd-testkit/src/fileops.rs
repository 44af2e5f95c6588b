//! The file-operation fidelity matrix: every way a program changes a tree that the
//! capture backends must see, as real syscalls (plain and vectored writes, splice,
//! copy_file_range, sendfile, io_uring, mmap, truncate, renames within, into and out
//! of the tree, links, attributes).
//!
//! Each [`FileOp`] works in its own case directory `d` inside the watched tree, and
//! may use `o`, a directory outside the tree on the same filesystem (renames across
//! the boundary). `setup` prepares the state the replica is expected to reach first;
//! `act` is the operation under test.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

type Step = fn(&Path, &Path) -> io::Result<()>;

/// One operation of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct FileOp {
    pub name: &'static str,
    pub setup: Step,
    pub act: Step,
    /// No event describes the result (a directory with contents moved in from
    /// outside, an exchange of two names), so the backend reports the paths as lost
    /// and the daemon rescans them: a rescan is expected, not a sign of a missed
    /// event.
    pub rescans: bool,
}

/// Content that differs per `seed`, `len` bytes.
pub fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn ok() -> io::Result<()> {
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn cvt(ret: libc::c_long, what: &str) -> io::Result<libc::c_long> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret)
}

fn file_in(d: &Path, name: &str, seed: u8, len: usize) -> io::Result<()> {
    fs::write(d.join(name), content(seed, len))
}

fn open_rw(p: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(p)
}

/// Submits one io_uring request on a fresh ring, waits for its completion and
/// returns its raw result (a negative errno on failure).
///
/// # Safety
/// Every buffer and path `sqe` points to must outlive this call.
pub unsafe fn uring_run(sqe: io_uring::squeue::Entry) -> io::Result<i32> {
    let mut ring = io_uring::IoUring::new(4)?;
    // SAFETY: the caller keeps what the entry points to alive until we return, and
    // we wait for the completion before returning.
    unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    ring.submit_and_wait(1)?;
    ring.completion()
        .next()
        .map(|cqe| cqe.result())
        .ok_or_else(|| io::Error::other("io_uring: no completion"))
}

/// [`uring_run`], with a failed request as an error that says `what` failed.
///
/// # Safety
/// As for [`uring_run`].
unsafe fn uring_one(sqe: io_uring::squeue::Entry, what: &str) -> io::Result<i32> {
    // SAFETY: passed on to the caller.
    let r = unsafe { uring_run(sqe) }?;
    if r < 0 {
        let e = io::Error::from_raw_os_error(-r);
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

/// Writes `data` at offset 0 of `path` with an io_uring WRITE.
pub fn uring_write(path: &Path, data: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let sqe = io_uring::opcode::Write::new(
        io_uring::types::Fd(f.as_raw_fd()),
        data.as_ptr(),
        data.len() as u32,
    )
    .offset(0)
    .build();
    // SAFETY: `data` and `f` outlive the call.
    let n = unsafe { uring_one(sqe, "io_uring write") }?;
    if n as usize != data.len() {
        return Err(io::Error::other(format!("io_uring write: short write {n}")));
    }
    Ok(())
}

/// Creates `path` with an io_uring OPENAT, writes `data` and closes it with an
/// io_uring CLOSE.
pub fn uring_create(path: &Path, data: &[u8]) -> io::Result<()> {
    let c = cstr(path)?;
    let sqe = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), c.as_ptr())
        .flags(libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC)
        .mode(0o644)
        .build();
    // SAFETY: `c` outlives the call.
    let fd = unsafe { uring_one(sqe, "io_uring openat") }?;
    let sqe =
        io_uring::opcode::Write::new(io_uring::types::Fd(fd), data.as_ptr(), data.len() as u32)
            .offset(0)
            .build();
    // SAFETY: `data` outlives the call; `fd` is open until the close below.
    let written = unsafe { uring_one(sqe, "io_uring write") };
    let sqe = io_uring::opcode::Close::new(io_uring::types::Fd(fd)).build();
    // SAFETY: a plain close of the descriptor the openat returned.
    unsafe { uring_one(sqe, "io_uring close") }?;
    written.map(drop)
}

/// io_uring RENAMEAT (flags as renameat2).
pub fn uring_rename(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(from)?, cstr(to)?);
    let fd = io_uring::types::Fd(libc::AT_FDCWD);
    let sqe = io_uring::opcode::RenameAt::new(fd, a.as_ptr(), fd, b.as_ptr())
        .flags(flags)
        .build();
    // SAFETY: `a` and `b` outlive the call.
    unsafe { uring_one(sqe, "io_uring renameat") }.map(drop)
}

/// io_uring UNLINKAT (`AT_REMOVEDIR` in `flags` removes a directory).
pub fn uring_unlink(path: &Path, flags: i32) -> io::Result<()> {
    let c = cstr(path)?;
    let sqe = io_uring::opcode::UnlinkAt::new(io_uring::types::Fd(libc::AT_FDCWD), c.as_ptr())
        .flags(flags)
        .build();
    // SAFETY: `c` outlives the call.
    unsafe { uring_one(sqe, "io_uring unlinkat") }.map(drop)
}

/// io_uring MKDIRAT.
pub fn uring_mkdir(path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    let sqe = io_uring::opcode::MkDirAt::new(io_uring::types::Fd(libc::AT_FDCWD), c.as_ptr())
        .mode(0o755)
        .build();
    // SAFETY: `c` outlives the call.
    unsafe { uring_one(sqe, "io_uring mkdirat") }.map(drop)
}

/// io_uring SYMLINKAT: `link` pointing at `target`.
pub fn uring_symlink(target: &str, link: &Path) -> io::Result<()> {
    let (t, l) = (CString::new(target).map_err(io::Error::other)?, cstr(link)?);
    let sqe = io_uring::opcode::SymlinkAt::new(
        io_uring::types::Fd(libc::AT_FDCWD),
        t.as_ptr(),
        l.as_ptr(),
    )
    .build();
    // SAFETY: `t` and `l` outlive the call.
    unsafe { uring_one(sqe, "io_uring symlinkat") }.map(drop)
}

/// io_uring LINKAT: hard link `new` to `old`.
pub fn uring_link(old: &Path, new: &Path) -> io::Result<()> {
    let (a, b) = (cstr(old)?, cstr(new)?);
    let fd = io_uring::types::Fd(libc::AT_FDCWD);
    let sqe = io_uring::opcode::LinkAt::new(fd, a.as_ptr(), fd, b.as_ptr()).build();
    // SAFETY: `a` and `b` outlive the call.
    unsafe { uring_one(sqe, "io_uring linkat") }.map(drop)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
    cvt(unsafe { libc::pipe(fds.as_mut_ptr()) }.into(), "pipe")?;
    // SAFETY: both descriptors were just returned to us and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn mmap_write(path: &Path, offset: usize, data: &[u8]) -> io::Result<()> {
    let f = open_rw(path)?;
    let len = f.metadata()?.len() as usize;
    if offset + data.len() > len {
        return Err(io::Error::other("mmap write past the end of the file"));
    }
    // SAFETY: a fresh shared mapping of the whole file; every access below stays in
    // bounds (checked above), and it is unmapped before the file is closed.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(offset), data.len());
        libc::munmap(p, len);
    }
    Ok(())
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cstr(from)?, cstr(to)?);
    // SAFETY: plain syscall with valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    cvt(r.into(), "renameat2").map(drop)
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) -> io::Result<()> {
    let c = cstr(path)?;
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [t, t];
    // SAFETY: valid C string and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    cvt(r.into(), "utimensat").map(drop)
}

/// A small nested tree under `dir` (created): 2 subdirectories, 5 files.
fn small_tree(dir: &Path, seed: u8) -> io::Result<()> {
    fs::create_dir_all(dir.join("x/y"))?;
    for (i, rel) in ["f1", "f2", "x/f3", "x/y/f4", "x/y/f5"].iter().enumerate() {
        fs::write(
            dir.join(rel),
            content(seed.wrapping_add(i as u8), 100 + i * 1000),
        )?;
    }
    Ok(())
}

fn op(name: &'static str, setup: Step, act: Step) -> FileOp {
    FileOp {
        name,
        setup,
        act,
        rescans: false,
    }
}

/// The matrix, in a fixed order.
pub fn matrix() -> Vec<FileOp> {
    vec![
        op("create_write", |_, _| ok(), |d, _| file_in(d, "f", 1, 5000)),
        op(
            "overwrite_truncating",
            |d, _| file_in(d, "f", 1, 9000),
            |d, _| file_in(d, "f", 2, 3000),
        ),
        op(
            "append",
            |d, _| file_in(d, "f", 1, 3000),
            |d, _| {
                OpenOptions::new()
                    .append(true)
                    .open(d.join("f"))?
                    .write_all(&content(3, 2000))
            },
        ),
        op(
            "pwrite",
            |d, _| file_in(d, "f", 1, 8192),
            |d, _| open_rw(&d.join("f"))?.write_all_at(&content(4, 100), 4000),
        ),
        op(
            "writev",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| {
                let mut f = open_rw(&d.join("f"))?;
                let (a, b) = (content(5, 700), content(6, 900));
                let n = f.write_vectored(&[IoSlice::new(&a), IoSlice::new(&b)])?;
                if n != 1600 {
                    return Err(io::Error::other(format!("writev: short write {n}")));
                }
                Ok(())
            },
        ),
        op(
            "splice",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| {
                let f = open_rw(&d.join("f"))?;
                let (r, w) = pipe()?;
                let data = content(7, 3000);
                // SAFETY: plain syscalls on descriptors we own; `data` outlives them.
                unsafe {
                    cvt(
                        libc::write(w.as_raw_fd(), data.as_ptr().cast(), data.len()) as _,
                        "write pipe",
                    )?;
                    let mut off: libc::loff_t = 50;
                    cvt(
                        libc::splice(
                            r.as_raw_fd(),
                            std::ptr::null_mut(),
                            f.as_raw_fd(),
                            &mut off,
                            data.len(),
                            0,
                        ) as _,
                        "splice",
                    )?;
                }
                Ok(())
            },
        ),
        op(
            "copy_file_range",
            |d, o| {
                file_in(d, "f", 1, 100)?;
                file_in(o, "copy-src", 8, 20000)
            },
            |d, o| {
                let src = File::open(o.join("copy-src"))?;
                let dst = open_rw(&d.join("f"))?;
                // SAFETY: plain syscall on descriptors we own.
                cvt(
                    unsafe {
                        libc::copy_file_range(
                            src.as_raw_fd(),
                            std::ptr::null_mut(),
                            dst.as_raw_fd(),
                            std::ptr::null_mut(),
                            20000,
                            0,
                        )
                    } as _,
                    "copy_file_range",
                )
                .map(drop)
            },
        ),
        op(
            "sendfile",
            |d, o| {
                file_in(d, "f", 1, 100)?;
                file_in(o, "send-src", 9, 7000)
            },
            |d, o| {
                let src = File::open(o.join("send-src"))?;
                let dst = open_rw(&d.join("f"))?;
                // SAFETY: plain syscall on descriptors we own.
                cvt(
                    unsafe {
                        libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), std::ptr::null_mut(), 7000)
                    } as _,
                    "sendfile",
                )
                .map(drop)
            },
        ),
        op(
            "io_uring_write",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| uring_write(&d.join("f"), &content(10, 4096)),
        ),
        op(
            "io_uring_openat_create",
            |_, _| ok(),
            |d, _| uring_create(&d.join("u"), &content(11, 1234)),
        ),
        op(
            "mmap_shared_write",
            |d, _| file_in(d, "f", 1, 10000),
            |d, _| mmap_write(&d.join("f"), 5000, &content(12, 300)),
        ),
        op(
            "truncate_path",
            |d, _| file_in(d, "f", 1, 10000),
            |d, _| {
                let c = cstr(&d.join("f"))?;
                // SAFETY: plain syscall with a valid C string.
                cvt(
                    unsafe { libc::truncate(c.as_ptr(), 1000) }.into(),
                    "truncate",
                )
                .map(drop)
            },
        ),
        op(
            "ftruncate_grow",
            |d, _| file_in(d, "f", 1, 1000),
            |d, _| open_rw(&d.join("f"))?.set_len(100_000),
        ),
        op(
            "fallocate",
            |d, _| file_in(d, "f", 1, 1000),
            |d, _| {
                let f = open_rw(&d.join("f"))?;
                // SAFETY: plain syscall on a descriptor we own.
                cvt(
                    unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 65536) }.into(),
                    "fallocate",
                )
                .map(drop)
            },
        ),
        op(
            "rename_within",
            |d, _| file_in(d, "a", 1, 3000),
            |d, _| fs::rename(d.join("a"), d.join("b")),
        ),
        op(
            "rename_over_existing",
            |d, _| {
                file_in(d, "a", 1, 3000)?;
                file_in(d, "b", 2, 5000)
            },
            |d, _| fs::rename(d.join("a"), d.join("b")),
        ),
        // Both names stay, with each other's object: the backends report both as
        // lost, so the daemon rescans them.
        FileOp {
            name: "rename_exchange",
            setup: |d, _| {
                file_in(d, "a", 1, 3000)?;
                fs::create_dir(d.join("b"))?;
                file_in(&d.join("b"), "inner", 2, 500)
            },
            act: |d, _| renameat2(&d.join("a"), &d.join("b"), libc::RENAME_EXCHANGE),
            rescans: true,
        },
        op(
            "rename_chain",
            |d, _| file_in(d, "a", 1, 3000),
            |d, _| {
                fs::rename(d.join("a"), d.join("b"))?;
                fs::rename(d.join("b"), d.join("c"))?;
                file_in(d, "a", 2, 10)
            },
        ),
        op(
            "editor_save",
            |d, _| file_in(d, "page.html", 1, 4000),
            |d, _| {
                let tmp = d.join(".page.html.swp");
                let mut f = File::create(&tmp)?;
                f.write_all(&content(2, 4100))?;
                f.sync_all()?;
                drop(f);
                fs::rename(&tmp, d.join("page.html"))
            },
        ),
        op(
            "rename_into_tree",
            |_, o| file_in(o, "incoming", 13, 2500),
            |d, o| fs::rename(o.join("incoming"), d.join("incoming")),
        ),
        FileOp {
            name: "rename_dir_into_tree",
            setup: |_, o| small_tree(&o.join("incoming-dir"), 14),
            act: |d, o| fs::rename(o.join("incoming-dir"), d.join("incoming-dir")),
            rescans: true,
        },
        op(
            "rename_out_of_tree",
            |d, _| file_in(d, "leaving", 15, 2500),
            |d, o| fs::rename(d.join("leaving"), o.join("leaving")),
        ),
        op(
            "rename_dir_out_of_tree",
            |d, _| small_tree(&d.join("leaving-dir"), 16),
            |d, o| fs::rename(d.join("leaving-dir"), o.join("leaving-dir")),
        ),
        op(
            "rename_dir_within",
            |d, _| small_tree(&d.join("x1"), 17),
            |d, _| fs::rename(d.join("x1"), d.join("x2")),
        ),
        op(
            "hard_link",
            |d, _| file_in(d, "f", 1, 3000),
            |d, _| fs::hard_link(d.join("f"), d.join("g")),
        ),
        op(
            "symlink",
            |_, _| ok(),
            |d, _| std::os::unix::fs::symlink("../elsewhere/target", d.join("s")),
        ),
        op("mkdir", |_, _| ok(), |d, _| fs::create_dir(d.join("m"))),
        op(
            "mkdir_tree",
            |_, _| ok(),
            |d, _| small_tree(&d.join("t"), 18),
        ),
        op(
            "rmdir",
            |d, _| fs::create_dir(d.join("m")),
            |d, _| fs::remove_dir(d.join("m")),
        ),
        op(
            "unlink",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| fs::remove_file(d.join("f")),
        ),
        op(
            "remove_tree",
            |d, _| small_tree(&d.join("t"), 19),
            |d, _| fs::remove_dir_all(d.join("t")),
        ),
        op(
            "chmod",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| fs::set_permissions(d.join("f"), fs::Permissions::from_mode(0o640)),
        ),
        op(
            "chmod_dir",
            |d, _| fs::create_dir(d.join("m")),
            |d, _| fs::set_permissions(d.join("m"), fs::Permissions::from_mode(0o700)),
        ),
        op(
            "chown",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| std::os::unix::fs::chown(d.join("f"), Some(1), Some(1)),
        ),
        op(
            "utimensat",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| set_mtime(&d.join("f"), 1_000_000_000, 123_456_789),
        ),
        op(
            "create_exclusive_mode",
            |_, _| ok(),
            |d, _| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(d.join("excl"))?
                    .write_all(&content(20, 777))
            },
        ),
        op(
            "io_uring_renameat",
            |d, _| file_in(d, "a", 1, 3000),
            |d, _| uring_rename(&d.join("a"), &d.join("b"), 0),
        ),
        op(
            "io_uring_unlinkat",
            |d, _| {
                file_in(d, "f", 1, 100)?;
                fs::create_dir(d.join("m"))
            },
            |d, _| {
                uring_unlink(&d.join("f"), 0)?;
                uring_unlink(&d.join("m"), libc::AT_REMOVEDIR)
            },
        ),
        op(
            "io_uring_mkdirat",
            |_, _| ok(),
            |d, _| uring_mkdir(&d.join("m")),
        ),
        op(
            "io_uring_symlinkat",
            |_, _| ok(),
            |d, _| uring_symlink("target", &d.join("s")),
        ),
        op(
            "io_uring_linkat",
            |d, _| file_in(d, "f", 1, 100),
            |d, _| uring_link(&d.join("f"), &d.join("g")),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation runs and changes the tree (on a plain directory, no daemon).
    #[test]
    fn every_op_runs_and_changes_something() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut names = std::collections::HashSet::new();
        for op in matrix() {
            assert!(names.insert(op.name), "duplicate name {}", op.name);
            let d = tmp.path().join("tree").join(op.name);
            fs::create_dir_all(&d).unwrap();
            (op.setup)(&d, &outside).unwrap_or_else(|e| panic!("{} setup: {e}", op.name));
            let before = tmp.path().join("before").join(op.name);
            fs::create_dir_all(before.parent().unwrap()).unwrap();
            let cp = std::process::Command::new("cp")
                .arg("-a")
                .arg(&d)
                .arg(&before)
                .status()
                .unwrap();
            assert!(cp.success());
            (op.act)(&d, &outside).unwrap_or_else(|e| panic!("{}: {e}", op.name));
            let diffs = crate::compare::compare(&before, &d).unwrap();
            assert!(!diffs.is_empty(), "{} changed nothing", op.name);
        }
    }
}
