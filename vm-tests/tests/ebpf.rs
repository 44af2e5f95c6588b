//! Privileged tests of the eBPF capture backend (`cd-ebpf`): run as root by
//! `cargo xtask test` (`cargo test -p vm-tests -- --ignored --test-threads=1`).
//!
//! No wall-clock assertions: every wait polls with a generous bounded timeout and
//! only fails when the expected events never arrive.

#![expect(
    unsafe_code,
    reason = "raw syscalls under test: mmap, splice, sendfile, io_uring"
)]

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cd_core::event::EventKind;
use cd_ebpf::{Capture, CaptureOptions, DecodedEvent};
use cd_testkit::fileops;

const ROOT: u32 = 7;
const TIMEOUT: Duration = Duration::from_secs(60);

struct Harness {
    cap: Capture,
    seen: Vec<DecodedEvent>,
    root: tempfile::TempDir,
    outside: tempfile::TempDir,
    markers: u32,
}

impl Harness {
    fn new(ring_bytes: u32) -> Harness {
        let mut cap = Capture::load(CaptureOptions { ring_bytes }).expect("load capture");
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        cap.watch_root(ROOT, root.path()).expect("watch root");
        Harness {
            cap,
            seen: Vec::new(),
            root,
            outside,
            markers: 0,
        }
    }

    fn root(&self) -> PathBuf {
        fs::canonicalize(self.root.path()).unwrap()
    }

    fn outside(&self) -> PathBuf {
        fs::canonicalize(self.outside.path()).unwrap()
    }

    /// Reads everything queued so far and forgets it.
    fn drain(&mut self) {
        let mut v = Vec::new();
        while self.cap.poll(&mut v, 4096) > 0 {}
        self.seen.clear();
    }

    /// Polls until `pred` holds for the events seen since the last drain.
    fn wait(&mut self, what: &str, pred: impl Fn(&[DecodedEvent]) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let n = self.cap.poll(&mut self.seen, 4096);
            if pred(&self.seen) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; events seen: {:#?}",
                    self.seen
                );
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Creates a marker file in the root and waits for its CloseWrite: every record
    /// from before it is then in `seen`.
    fn sync(&mut self) {
        self.markers += 1;
        let name = format!("marker-{}", self.markers);
        fs::write(self.root().join(&name), b"m").unwrap();
        self.wait(&format!("marker {name}"), |ev| {
            ev.iter().any(|e| {
                e.event.kind == EventKind::CloseWrite
                    && path_of(e).as_deref() == Some(name.as_str())
            })
        });
    }
}

fn path_of(e: &DecodedEvent) -> Option<String> {
    e.event.path.as_ref().map(|p| p.display())
}
fn path2_of(e: &DecodedEvent) -> Option<String> {
    e.event.path2.as_ref().map(|p| p.display())
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// An expected event: kind, path and (for renames) new path, relative to the root.
#[derive(Debug, Clone)]
struct Exp {
    kind: EventKind,
    path: String,
    path2: Option<String>,
    is_dir: Option<bool>,
}

fn exp(kind: EventKind, path: &str) -> Exp {
    Exp {
        kind,
        path: path.into(),
        path2: None,
        is_dir: None,
    }
}

impl Exp {
    fn to(mut self, p: &str) -> Exp {
        self.path2 = Some(p.into());
        self
    }
    fn dir(mut self, d: bool) -> Exp {
        self.is_dir = Some(d);
        self
    }
    fn matches(&self, e: &DecodedEvent) -> bool {
        e.root_id == ROOT
            && e.event.kind == self.kind
            && path_of(e).as_deref() == Some(self.path.as_str())
            && path2_of(e) == self.path2
            && self.is_dir.is_none_or(|d| d == e.event.is_dir)
    }
}

type Op = fn(&Path, &Path);

/// One row of the fidelity matrix. `setup` and `op` get (case dir, scratch dir
/// elsewhere); `expect` is relative to the watched root, with `{d}` standing for
/// the case dir's name. `outside`: whether running the same thing with the case dir
/// outside the root must produce no event at all.
struct Case {
    name: &'static str,
    setup: Op,
    op: Op,
    expect: fn(&str) -> Vec<Exp>,
    outside: bool,
}

fn touch(p: &Path) {
    fs::write(p, b"0123456789").unwrap();
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// Runs one io_uring request to completion and returns its raw result.
///
/// # Safety
/// Every buffer `sqe` points to must stay valid until this returns.
unsafe fn uring_run(sqe: io_uring::squeue::Entry) -> i32 {
    // SAFETY: passed on to the caller.
    unsafe { fileops::uring_run(sqe) }.expect("io_uring")
}

/// io_uring unlinkat relative to an open directory fd.
fn uring_unlinkat(dir: &Path, name: &str, flags: i32) -> i32 {
    let d = File::open(dir).unwrap();
    let n = CString::new(name).unwrap();
    let sqe = io_uring::opcode::UnlinkAt::new(io_uring::types::Fd(d.as_raw_fd()), n.as_ptr())
        .flags(flags)
        .build();
    // SAFETY: `d` and `n` outlive the call.
    unsafe { uring_run(sqe) }
}

fn uring_mkdirat(dir: &Path, name: &str) {
    let d = File::open(dir).unwrap();
    let n = CString::new(name).unwrap();
    let sqe = io_uring::opcode::MkDirAt::new(io_uring::types::Fd(d.as_raw_fd()), n.as_ptr())
        .mode(0o755)
        .build();
    // SAFETY: `d` and `n` outlive the call.
    let r = unsafe { uring_run(sqe) };
    assert_eq!(
        r,
        0,
        "io_uring mkdirat: {}",
        std::io::Error::from_raw_os_error(-r)
    );
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "write",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                OpenOptions::new()
                    .write(true)
                    .open(d.join("f"))
                    .unwrap()
                    .write_all(b"x")
                    .unwrap()
            },
            expect: |d| {
                vec![
                    exp(EventKind::OpenWrite, &format!("{d}/f")),
                    exp(EventKind::Modify, &format!("{d}/f")).dir(false),
                    exp(EventKind::CloseWrite, &format!("{d}/f")),
                ]
            },
            outside: true,
        },
        Case {
            name: "pwrite",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                open_rw(&d.join("f")).write_at(b"abc", 3).unwrap();
            },
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "writev",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                let mut f = open_rw(&d.join("f"));
                let n = f
                    .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
                    .unwrap();
                assert_eq!(n, 4);
            },
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "splice",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                let f = open_rw(&d.join("f"));
                let mut fds = [0; 2];
                // SAFETY: plain syscalls on fds we own.
                unsafe {
                    check(libc::pipe(fds.as_mut_ptr()), "pipe");
                    check(
                        libc::write(fds[1], b"spliced".as_ptr().cast(), 7) as i32,
                        "write pipe",
                    );
                    let n = libc::splice(
                        fds[0],
                        std::ptr::null_mut(),
                        f.as_raw_fd(),
                        std::ptr::null_mut(),
                        7,
                        0,
                    );
                    check(n as i32, "splice");
                    libc::close(fds[0]);
                    libc::close(fds[1]);
                }
            },
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "copy_file_range",
            setup: |d, o| {
                touch(&d.join("f"));
                touch(&o.join("src"));
            },
            op: |d, o| {
                let src = File::open(o.join("src")).unwrap();
                let dst = open_rw(&d.join("f"));
                // SAFETY: plain syscall on fds we own.
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        std::ptr::null_mut(),
                        dst.as_raw_fd(),
                        std::ptr::null_mut(),
                        10,
                        0,
                    )
                };
                check(n as i32, "copy_file_range");
            },
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "sendfile",
            setup: |d, o| {
                touch(&d.join("f"));
                touch(&o.join("src"));
            },
            op: |d, o| {
                let src = File::open(o.join("src")).unwrap();
                let dst = open_rw(&d.join("f"));
                // SAFETY: plain syscall on fds we own.
                let n = unsafe {
                    libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), std::ptr::null_mut(), 10)
                };
                check(n as i32, "sendfile");
            },
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "io_uring_write",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| fileops::uring_write(&d.join("f"), b"written by io_uring").unwrap(),
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "io_uring_openat",
            setup: |_, _| {},
            op: |d, _| fileops::uring_create(&d.join("u"), b"").unwrap(),
            expect: |d| {
                vec![
                    exp(EventKind::Create, &format!("{d}/u")),
                    exp(EventKind::OpenWrite, &format!("{d}/u")),
                    exp(EventKind::CloseWrite, &format!("{d}/u")),
                ]
            },
            outside: true,
        },
        Case {
            name: "io_uring_renameat",
            setup: |d, _| touch(&d.join("a")),
            op: |d, _| fileops::uring_rename(&d.join("a"), &d.join("b"), 0).unwrap(),
            expect: |d| {
                vec![
                    exp(EventKind::Rename, &format!("{d}/a"))
                        .to(&format!("{d}/b"))
                        .dir(false),
                ]
            },
            outside: true,
        },
        Case {
            name: "io_uring_renameat_exchange",
            setup: |d, _| {
                touch(&d.join("a"));
                fs::create_dir(d.join("b")).unwrap();
            },
            op: |d, _| {
                fileops::uring_rename(&d.join("a"), &d.join("b"), libc::RENAME_EXCHANGE).unwrap()
            },
            // Both names still exist with swapped content: both are rescanned.
            expect: |d| {
                vec![
                    exp(EventKind::Lost, &format!("{d}/a")),
                    exp(EventKind::Lost, &format!("{d}/b")),
                ]
            },
            outside: true,
        },
        Case {
            name: "io_uring_renameat_out_of_root",
            setup: |d, _| touch(&d.join("out")),
            op: |d, o| fileops::uring_rename(&d.join("out"), &o.join("out"), 0).unwrap(),
            expect: |d| vec![exp(EventKind::Unlink, &format!("{d}/out")).dir(false)],
            outside: false,
        },
        Case {
            name: "io_uring_unlinkat",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| assert_eq!(uring_unlinkat(d, "f", 0), 0, "io_uring unlinkat"),
            expect: |d| vec![exp(EventKind::Unlink, &format!("{d}/f")).dir(false)],
            outside: true,
        },
        Case {
            name: "io_uring_unlinkat_removedir",
            setup: |d, _| fs::create_dir(d.join("m")).unwrap(),
            op: |d, _| {
                let r = uring_unlinkat(d, "m", libc::AT_REMOVEDIR);
                assert_eq!(r, 0, "io_uring unlinkat(AT_REMOVEDIR)");
            },
            expect: |d| vec![exp(EventKind::Rmdir, &format!("{d}/m")).dir(true)],
            outside: true,
        },
        Case {
            name: "io_uring_mkdirat",
            setup: |_, _| {},
            op: |d, _| uring_mkdirat(d, "m"),
            expect: |d| vec![exp(EventKind::Mkdir, &format!("{d}/m")).dir(true)],
            outside: true,
        },
        Case {
            name: "io_uring_symlinkat",
            setup: |_, _| {},
            op: |d, _| fileops::uring_symlink("target", &d.join("s")).unwrap(),
            expect: |d| vec![exp(EventKind::Symlink, &format!("{d}/s")).dir(false)],
            outside: true,
        },
        Case {
            name: "io_uring_linkat",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| fileops::uring_link(&d.join("f"), &d.join("g")).unwrap(),
            expect: |d| vec![exp(EventKind::Link, &format!("{d}/g")).dir(false)],
            outside: true,
        },
        Case {
            name: "mmap_write",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                let f = open_rw(&d.join("f"));
                // SAFETY: a fresh shared mapping of a 10-byte file, written and unmapped here.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        f.as_raw_fd(),
                        0,
                    );
                    assert_ne!(
                        p,
                        libc::MAP_FAILED,
                        "mmap: {}",
                        std::io::Error::last_os_error()
                    );
                    *(p as *mut u8) = b'M';
                    libc::munmap(p, 4096);
                }
            },
            expect: |d| vec![exp(EventKind::MmapWrite, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "truncate",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                // SAFETY: plain syscall with a valid C string.
                check(
                    unsafe { libc::truncate(cstr(&d.join("f")).as_ptr(), 2) },
                    "truncate",
                );
            },
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "ftruncate",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| open_rw(&d.join("f")).set_len(3).unwrap(),
            expect: |d| vec![exp(EventKind::Modify, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "rename_within",
            setup: |d, _| touch(&d.join("a")),
            op: |d, _| fs::rename(d.join("a"), d.join("b")).unwrap(),
            expect: |d| {
                vec![
                    exp(EventKind::Rename, &format!("{d}/a"))
                        .to(&format!("{d}/b"))
                        .dir(false),
                ]
            },
            outside: true,
        },
        Case {
            name: "rename_into_root",
            setup: |_, o| touch(&o.join("in")),
            op: |d, o| fs::rename(o.join("in"), d.join("in")).unwrap(),
            expect: |d| vec![exp(EventKind::Create, &format!("{d}/in"))],
            outside: false,
        },
        Case {
            name: "rename_out_of_root",
            setup: |d, _| touch(&d.join("out")),
            op: |d, o| fs::rename(d.join("out"), o.join("out")).unwrap(),
            expect: |d| vec![exp(EventKind::Unlink, &format!("{d}/out"))],
            outside: false,
        },
        Case {
            name: "rename_dir_out_of_root",
            setup: |d, _| fs::create_dir(d.join("sub")).unwrap(),
            op: |d, o| fs::rename(d.join("sub"), o.join("sub")).unwrap(),
            expect: |d| vec![exp(EventKind::Rmdir, &format!("{d}/sub")).dir(true)],
            outside: false,
        },
        Case {
            name: "rename_dir",
            setup: |d, _| {
                fs::create_dir(d.join("x")).unwrap();
                touch(&d.join("x/inner"));
            },
            op: |d, _| fs::rename(d.join("x"), d.join("y")).unwrap(),
            expect: |d| {
                vec![
                    exp(EventKind::Rename, &format!("{d}/x"))
                        .to(&format!("{d}/y"))
                        .dir(true),
                ]
            },
            outside: true,
        },
        Case {
            name: "link",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| fs::hard_link(d.join("f"), d.join("g")).unwrap(),
            expect: |d| vec![exp(EventKind::Link, &format!("{d}/g"))],
            outside: true,
        },
        Case {
            name: "symlink",
            setup: |_, _| {},
            op: |d, _| std::os::unix::fs::symlink("target", d.join("s")).unwrap(),
            expect: |d| vec![exp(EventKind::Symlink, &format!("{d}/s"))],
            outside: true,
        },
        Case {
            name: "mkdir",
            setup: |_, _| {},
            op: |d, _| fs::create_dir(d.join("m")).unwrap(),
            expect: |d| vec![exp(EventKind::Mkdir, &format!("{d}/m")).dir(true)],
            outside: true,
        },
        Case {
            name: "rmdir",
            setup: |d, _| fs::create_dir(d.join("m")).unwrap(),
            op: |d, _| fs::remove_dir(d.join("m")).unwrap(),
            expect: |d| vec![exp(EventKind::Rmdir, &format!("{d}/m")).dir(true)],
            outside: true,
        },
        Case {
            name: "unlink",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| fs::remove_file(d.join("f")).unwrap(),
            expect: |d| vec![exp(EventKind::Unlink, &format!("{d}/f")).dir(false)],
            outside: true,
        },
        Case {
            name: "chmod",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| fs::set_permissions(d.join("f"), fs::Permissions::from_mode(0o600)).unwrap(),
            expect: |d| vec![exp(EventKind::Attrib, &format!("{d}/f")).dir(false)],
            outside: true,
        },
        Case {
            name: "chown",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| std::os::unix::fs::chown(d.join("f"), Some(1), Some(1)).unwrap(),
            expect: |d| vec![exp(EventKind::Attrib, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "utimensat",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                // SAFETY: NULL times = now; valid C string.
                check(
                    unsafe {
                        libc::utimensat(
                            libc::AT_FDCWD,
                            cstr(&d.join("f")).as_ptr(),
                            std::ptr::null(),
                            0,
                        )
                    },
                    "utimensat",
                );
            },
            expect: |d| vec![exp(EventKind::Attrib, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "unlinkat_dirfd",
            setup: |d, _| touch(&d.join("f")),
            op: |d, _| {
                let dir = File::open(d).unwrap();
                // SAFETY: plain syscall on an fd we own, valid C string.
                check(
                    unsafe { libc::unlinkat(dir.as_raw_fd(), c"f".as_ptr(), 0) },
                    "unlinkat",
                );
            },
            expect: |d| vec![exp(EventKind::Unlink, &format!("{d}/f"))],
            outside: true,
        },
        Case {
            name: "mkdir_relative_to_cwd_above_root",
            setup: |_, _| {},
            op: |d, _| {
                // cwd = the root's parent; path "rootname/case/rel" (ancestor match).
                let root = d.parent().unwrap();
                let up = root.parent().unwrap();
                let rel = d.strip_prefix(up).unwrap().join("rel");
                let old = std::env::current_dir().unwrap();
                std::env::set_current_dir(up).unwrap();
                let r = fs::create_dir(&rel);
                std::env::set_current_dir(old).unwrap();
                r.unwrap();
            },
            expect: |d| vec![exp(EventKind::Mkdir, &format!("{d}/rel"))],
            outside: true,
        },
        Case {
            name: "unlink_dotdot_relative_to_cwd_inside_root",
            setup: |d, _| {
                touch(&d.join("f"));
                fs::create_dir(d.join("sub")).unwrap();
            },
            op: |d, _| {
                let old = std::env::current_dir().unwrap();
                std::env::set_current_dir(d.join("sub")).unwrap();
                let r = fs::remove_file("../f");
                std::env::set_current_dir(old).unwrap();
                r.unwrap();
            },
            expect: |d| vec![exp(EventKind::Unlink, &format!("{d}/f"))],
            outside: true,
        },
    ]
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn fidelity_matrix() {
    let mut h = Harness::new(cd_ebpf::DEFAULT_RING_BYTES);
    let root = h.root();
    let outside = h.outside();
    let mut failures = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        // Inside the root.
        let name = format!("{i:02}-{}", c.name);
        let d = root.join(&name);
        let o = outside.join(format!("{name}-scratch"));
        fs::create_dir(&d).unwrap();
        fs::create_dir(&o).unwrap();
        (c.setup)(&d, &o);
        h.drain();
        (c.op)(&d, &o);
        let want = (c.expect)(&name);
        let deadline = Instant::now() + TIMEOUT;
        let ok = loop {
            let n = h.cap.poll(&mut h.seen, 4096);
            if want.iter().all(|w| h.seen.iter().any(|e| w.matches(e))) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        if std::env::var_os("CD_TEST_VERBOSE").is_some() {
            eprintln!(
                "{}: {:?}",
                c.name,
                h.seen
                    .iter()
                    .map(|e| (e.event.kind, path_of(e), path2_of(e), e.event.is_dir))
                    .collect::<Vec<_>>()
            );
        }
        if !ok {
            failures.push(format!("{}: want {want:?}\n  got {:#?}", c.name, h.seen));
        }
        // Outside the root: nothing at all may arrive.
        if c.outside {
            let d = outside.join(&name);
            let o = outside.join(format!("{name}-scratch2"));
            fs::create_dir(&d).unwrap();
            fs::create_dir(&o).unwrap();
            (c.setup)(&d, &o);
            h.drain();
            let before = h.cap.stats();
            (c.op)(&d, &o);
            h.sync();
            let after = h.cap.stats();
            let stray: Vec<_> = h
                .seen
                .iter()
                .filter(|e| !path_of(e).is_some_and(|p| p.starts_with("marker-")))
                .collect();
            if !stray.is_empty() || after.discarded != before.discarded {
                failures.push(format!(
                    "{} outside the root produced events: {stray:#?} (discarded {} -> {})",
                    c.name, before.discarded, after.discarded
                ));
            }
        }
    }
    assert_eq!(h.cap.drops(), 0);
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn io_uring_failed_unlinkat_emits_nothing() {
    let mut h = Harness::new(1 << 20);
    let root = h.root();
    h.drain();
    let r = uring_unlinkat(&root, "does-not-exist", 0);
    assert_eq!(r, -libc::ENOENT, "io_uring unlinkat of a missing file");
    let r = uring_unlinkat(&root, "does-not-exist", libc::AT_REMOVEDIR);
    assert_eq!(r, -libc::ENOENT, "io_uring rmdir of a missing directory");
    h.sync();
    let stray: Vec<_> = h
        .seen
        .iter()
        .filter(|e| !path_of(e).is_some_and(|p| p.starts_with("marker-")))
        .collect();
    assert!(
        stray.is_empty(),
        "a failed unlinkat produced events: {stray:#?}"
    );
    assert_eq!(h.cap.drops(), 0);
}

/// More completions than the CQ ring holds: on newer kernels the overflowing ones
/// fire `io_uring_cqe_overflow` instead of `io_uring_complete`.
#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn io_uring_path_ops_overflowing_the_cq_ring() {
    const N: usize = 6;
    let mut h = Harness::new(1 << 20);
    let root = h.root();
    h.drain();
    let dir = File::open(&root).unwrap();
    let names: Vec<CString> = (0..N)
        .map(|i| CString::new(format!("ovf{i}")).unwrap())
        .collect();
    let mut ring: io_uring::IoUring = io_uring::IoUring::builder()
        .setup_cqsize(2)
        .build(1)
        .unwrap();
    for (i, n) in names.iter().enumerate() {
        let sqe = io_uring::opcode::MkDirAt::new(io_uring::types::Fd(dir.as_raw_fd()), n.as_ptr())
            .mode(0o755)
            .build()
            .user_data(i as u64);
        // SAFETY: `dir` and `names` outlive the ring; we wait for every completion.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit().unwrap();
    }
    // Let every operation finish (they run in io-wq) before reaping anything.
    let deadline = Instant::now() + TIMEOUT;
    while !(0..N).all(|i| root.join(format!("ovf{i}")).is_dir()) {
        assert!(Instant::now() < deadline, "io_uring mkdirat never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut done = 0;
    let mut overflowed = false;
    while done < N {
        overflowed |= ring.submission().cq_overflow();
        ring.submit_and_wait(1).unwrap();
        for cqe in ring.completion() {
            assert_eq!(cqe.result(), 0, "io_uring mkdirat");
            done += 1;
        }
        assert!(
            Instant::now() < deadline,
            "completions missing: {done} of {N}"
        );
    }
    eprintln!("CQ ring overflowed: {overflowed}");
    h.wait("a Mkdir per request", |ev| {
        (0..N).all(|i| {
            let p = format!("ovf{i}");
            ev.iter().any(|e| {
                e.event.kind == EventKind::Mkdir && path_of(e).as_deref() == Some(p.as_str())
            })
        })
    });
    assert_eq!(h.cap.drops(), 0);
}

/// `IOSQE_CQE_SKIP_SUCCESS`: no completion will report the operation, so it is
/// reported lost right away rather than silently missed.
#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn io_uring_cqe_skip_success_is_reported_lost() {
    let mut h = Harness::new(1 << 20);
    let root = h.root();
    h.drain();
    let dir = File::open(&root).unwrap();
    let n = c"skipped";
    let mut ring = io_uring::IoUring::new(8).unwrap();
    if !ring.params().is_feature_skip_cqe_on_success() {
        eprintln!("kernel lacks IORING_FEAT_CQE_SKIP; skipping");
        return;
    }
    let sqe = io_uring::opcode::MkDirAt::new(io_uring::types::Fd(dir.as_raw_fd()), n.as_ptr())
        .mode(0o755)
        .build()
        .flags(io_uring::squeue::Flags::SKIP_SUCCESS);
    // SAFETY: `dir` and `n` outlive the ring.
    unsafe { ring.submission().push(&sqe).unwrap() };
    ring.submit().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !root.join("skipped").is_dir() {
        assert!(Instant::now() < deadline, "io_uring mkdirat never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    h.wait("Lost for the root", |ev| {
        ev.iter()
            .any(|e| e.root_id == ROOT && e.event.kind == EventKind::Lost && e.event.path.is_none())
    });
    assert!(h.cap.drops() > 0);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn attaches_and_probes() {
    let h = Harness::new(1 << 16);
    let att = h.cap.attached();
    assert!(att.iter().any(|a| a == "tp_btf/sys_enter"), "{att:?}");
    assert!(att.iter().any(|a| a == "tp_btf/sys_exit"), "{att:?}");
    assert!(
        att.iter().any(|a| a == "tp_btf/io_uring_complete"),
        "{att:?}"
    );
    let p = cd_ebpf::probe();
    assert!(p.capture_supported(), "{p:?}");
    eprintln!("probe: {p:#?}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn burst_200k_files() {
    const DIRS: usize = 4;
    // 200,000 by default; `cargo xtask test guest` uses fewer, because an emulated
    // (TCG) guest with its tmpfs in RAM is slow and small. The full burst runs on the
    // host in the privileged tier.
    let files: usize = std::env::var("CD_BURST_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut h = Harness::new(cd_ebpf::DEFAULT_RING_BYTES);
    let root = h.root();
    for d in 0..DIRS {
        fs::create_dir(root.join(format!("d{d}"))).unwrap();
    }
    h.drain();
    let wrote_all = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let root = root.clone();
        let wrote_all = wrote_all.clone();
        std::thread::spawn(move || {
            for i in 0..files {
                fs::write(root.join(format!("d{}/f{i}", i % DIRS)), b"x").unwrap();
            }
            wrote_all.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut closed: HashSet<String> = HashSet::new();
    let mut lost = false;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        buf.clear();
        let n = h.cap.poll(&mut buf, 65536);
        for e in &buf {
            match e.event.kind {
                EventKind::CloseWrite => {
                    closed.insert(path_of(e).unwrap());
                }
                EventKind::Lost => lost = true,
                _ => {}
            }
        }
        assert!(
            !writer.is_finished() || wrote_all.load(std::sync::atomic::Ordering::SeqCst),
            "the writer thread failed (see its panic above)"
        );
        if writer.is_finished() && n == 0 && closed.len() >= files {
            break;
        }
        if writer.is_finished() && n == 0 && lost {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {files} closes seen",
            closed.len()
        );
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    writer.join().unwrap();
    // One more drain after the writer is done.
    buf.clear();
    while h.cap.poll(&mut buf, 65536) > 0 {}
    for e in &buf {
        if e.event.kind == EventKind::CloseWrite {
            closed.insert(path_of(e).unwrap());
        }
    }
    let drops = h.cap.drops();
    let missing: Vec<String> = (0..files)
        .map(|i| format!("d{}/f{i}", i % DIRS))
        .filter(|p| !closed.contains(p))
        .take(5)
        .collect();
    eprintln!(
        "burst: {} closes seen, drops {drops}, stats {:?}",
        closed.len(),
        h.cap.stats()
    );
    assert!(
        missing.is_empty() || drops > 0,
        "paths missing without any drop, e.g. {missing:?}"
    );
    assert_eq!(
        drops, 0,
        "the default ring should keep up with a polling consumer"
    );
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn stalled_consumer_loss_is_detected() {
    let mut h = Harness::new(64 << 10);
    let root = h.root();
    for i in 0..20_000 {
        fs::write(root.join(format!("f{i}")), b"x").unwrap();
    }
    let drops = h.cap.drops();
    assert!(drops > 0, "a 64 KiB ring cannot hold 20,000 files' events");
    h.wait("Lost for the root", |ev| {
        ev.iter()
            .any(|e| e.root_id == ROOT && e.event.kind == EventKind::Lost && e.event.path.is_none())
    });
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn unwatch_stops_events() {
    let mut h = Harness::new(1 << 20);
    let root = h.root();
    let other = h.outside();
    h.cap.watch_root(ROOT + 1, &other).unwrap();
    h.cap.unwatch_root(ROOT).unwrap();
    h.drain();
    fs::write(root.join("after-unwatch"), b"x").unwrap();
    fs::write(other.join("marker"), b"x").unwrap();
    h.wait("marker in the second root", |ev| {
        ev.iter()
            .any(|e| e.root_id == ROOT + 1 && e.event.kind == EventKind::CloseWrite)
    });
    let stray: Vec<_> = h.seen.iter().filter(|e| e.root_id == ROOT).collect();
    assert!(stray.is_empty(), "{stray:?}");
}
