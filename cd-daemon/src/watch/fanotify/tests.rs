//! Privileged tests of the fanotify backend against the real kernel. Each test
//! mounts its own tmpfs (isolation: the mark is per filesystem), watches a `root`
//! directory on it and uses a sibling `outside` directory on the same filesystem to
//! check that user-space filtering drops what is not under the root.
//!
//! They need root; run as anyone else they fail, loudly, rather than pass.

use super::*;

use std::fs::{self, File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use sys::test_ops;

const ROOT: u32 = 7;
const TIMEOUT: Duration = Duration::from_secs(300);

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the fanotify tests need root (CAP_SYS_ADMIN for fanotify filesystem marks and \
         for mounting tmpfs); run `cargo test` as root (CI does)"
    );
}

/// A tmpfs mounted on a fresh temporary directory, lazily unmounted on drop.
struct Tmpfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new() -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("m");
        fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=1g,nr_inodes=0",
                "cdsync-fanotify-test",
            ])
            .arg(&mnt)
            .status()
            .expect("run mount(8)");
        assert!(st.success(), "mount -t tmpfs on {} failed", mnt.display());
        Self { mnt, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// A comparable summary of one event: (root, kind, path, path2, is_dir).
type Ev = (u32, EventKind, String, Option<String>, bool);

fn summary(evs: &[(u32, FsEvent)]) -> Vec<Ev> {
    evs.iter()
        .map(|(id, e)| {
            (
                *id,
                e.kind,
                e.path.as_ref().map(RelPath::display).unwrap_or_default(),
                e.path2.as_ref().map(RelPath::display),
                e.is_dir,
            )
        })
        .collect()
}

/// Polls until `done` holds, or panics after [`TIMEOUT`].
fn collect_until(
    w: &mut FanotifyWatcher,
    what: &str,
    done: impl Fn(&[(u32, FsEvent)]) -> bool,
) -> Vec<(u32, FsEvent)> {
    let deadline = Instant::now() + TIMEOUT;
    let mut evs = Vec::new();
    loop {
        let n = w.poll(&mut evs, 4096).unwrap();
        if done(&evs) {
            return evs;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; got {:?}",
            summary(&evs)
        );
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A watcher on `<tmpfs>/root` with `<tmpfs>/outside` beside it.
struct Fx {
    tmp: Tmpfs,
    root: PathBuf,
    outside: PathBuf,
    w: FanotifyWatcher,
    seq: u32,
}

impl Fx {
    fn with(w: FanotifyWatcher, before_watch: impl FnOnce(&Path, &Path)) -> Self {
        let tmp = Tmpfs::new();
        let root = tmp.mnt.join("root");
        let outside = tmp.mnt.join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        before_watch(&root, &outside);
        let mut w = w;
        w.watch_root(ROOT, &root).unwrap();
        Self {
            tmp,
            root,
            outside,
            w,
            seq: 0,
        }
    }

    fn new() -> Self {
        require_root();
        Self::with(FanotifyWatcher::new().unwrap(), |_, _| {})
    }

    /// Everything reported up to a sentinel `mkdir` in the root (exclusive): since
    /// events are queued synchronously and in order, whatever an earlier operation
    /// produced has been read by then.
    fn settle(&mut self) -> Vec<(u32, FsEvent)> {
        self.seq += 1;
        let name = format!(".sentinel-{}", self.seq);
        fs::create_dir(self.root.join(&name)).unwrap();
        let evs = collect_until(&mut self.w, &name, |evs| {
            evs.iter().any(|(id, e)| {
                *id == ROOT
                    && e.kind == EventKind::Mkdir
                    && e.path
                        .as_ref()
                        .is_some_and(|p| p.as_bytes() == name.as_bytes())
            })
        });
        evs.into_iter()
            .filter(|(_, e)| {
                !e.path
                    .as_ref()
                    .is_some_and(|p| p.as_bytes().starts_with(b".sentinel-"))
            })
            .collect()
    }
}

fn ev(kind: EventKind, path: &str) -> Ev {
    (ROOT, kind, path.to_owned(), None, false)
}
fn dir_ev(kind: EventKind, path: &str) -> Ev {
    (ROOT, kind, path.to_owned(), None, true)
}
fn rename_ev(from: &str, to: &str, is_dir: bool) -> Ev {
    (
        ROOT,
        EventKind::Rename,
        from.to_owned(),
        Some(to.to_owned()),
        is_dir,
    )
}

fn touch(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// One row of the fidelity matrix. `setup` and `op` get (`dir` in the tree under
/// test, `other` in the other tree); paths in `expect` are relative to the root.
struct Case {
    name: &'static str,
    setup: fn(&Path, &Path),
    op: fn(&Path, &Path),
    expect: fn(&str) -> Vec<Ev>,
    /// Also run with `dir` outside the root and expect nothing.
    outside_too: bool,
}

fn no_setup(_: &Path, _: &Path) {}

fn mod_close(c: &str) -> Vec<Ev> {
    let f = format!("{c}/f");
    vec![ev(EventKind::Modify, &f), ev(EventKind::CloseWrite, &f)]
}

fn setup_f(d: &Path, _: &Path) {
    touch(&d.join("f"), b"0123456789");
}

fn setup_src_f(d: &Path, _: &Path) {
    touch(&d.join("src"), b"source data");
    touch(&d.join("f"), b"");
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "create",
            setup: no_setup,
            op: |d, _| drop(File::create(d.join("f")).unwrap()),
            expect: |c| {
                let f = format!("{c}/f");
                vec![
                    ev(EventKind::Create, &f),
                    ev(EventKind::OpenWrite, &f),
                    ev(EventKind::CloseWrite, &f),
                ]
            },
            outside_too: true,
        },
        Case {
            name: "write",
            setup: setup_f,
            op: |d, _| open_rw(&d.join("f")).write_all(b"hello").unwrap(),
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "pwrite",
            setup: setup_f,
            op: |d, _| {
                open_rw(&d.join("f")).write_at(b"x", 100).unwrap();
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "writev",
            setup: setup_f,
            op: |d, _| {
                let f = open_rw(&d.join("f"));
                rustix::io::writev(&f, &[IoSlice::new(b"ab"), IoSlice::new(b"cd")]).unwrap();
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "splice",
            setup: setup_f,
            op: |d, _| {
                let (r, mut w) = io::pipe().unwrap();
                w.write_all(b"piped").unwrap();
                let f = open_rw(&d.join("f"));
                assert_eq!(test_ops::splice(r.as_fd(), f.as_fd(), 5).unwrap(), 5);
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "copy_file_range",
            setup: setup_src_f,
            op: |d, _| {
                let src = File::open(d.join("src")).unwrap();
                let dst = open_rw(&d.join("f"));
                let n = rustix::fs::copy_file_range(&src, None, &dst, None, 6).unwrap();
                assert_eq!(n, 6);
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "sendfile",
            setup: setup_src_f,
            op: |d, _| {
                let src = File::open(d.join("src")).unwrap();
                let dst = open_rw(&d.join("f"));
                assert_eq!(rustix::fs::sendfile(&dst, &src, None, 6).unwrap(), 6);
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "fallocate",
            setup: setup_f,
            op: |d, _| {
                let f = open_rw(&d.join("f"));
                rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 65536).unwrap();
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "io_uring_write",
            setup: setup_f,
            op: |d, _| {
                let f = open_rw(&d.join("f"));
                assert_eq!(test_ops::io_uring_write(f.as_fd(), b"uring").unwrap(), 5);
            },
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "mmap_msync_munmap",
            setup: |d, _| File::create(d.join("f")).unwrap().set_len(4096).unwrap(),
            op: |d, _| {
                let f = open_rw(&d.join("f"));
                let mut m = test_ops::mmap_shared(f.as_fd(), 4096).unwrap();
                m.write(b"mapped");
                m.msync().unwrap();
                drop(m);
                drop(f);
                assert_eq!(&fs::read(d.join("f")).unwrap()[..6], b"mapped");
            },
            // No FAN_MODIFY for stores through a mapping, nor for msync/munmap: only
            // the close of the writable file.
            expect: |c| vec![ev(EventKind::CloseWrite, &format!("{c}/f"))],
            outside_too: true,
        },
        Case {
            name: "truncate",
            setup: setup_f,
            op: |d, _| test_ops::truncate(&d.join("f"), 3).unwrap(),
            expect: |c| vec![ev(EventKind::Modify, &format!("{c}/f"))],
            outside_too: true,
        },
        Case {
            name: "ftruncate",
            setup: setup_f,
            op: |d, _| open_rw(&d.join("f")).set_len(2).unwrap(),
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "open_o_trunc",
            setup: setup_f,
            op: |d, _| drop(File::create(d.join("f")).unwrap()),
            expect: mod_close,
            outside_too: true,
        },
        Case {
            name: "mknod_fifo",
            setup: no_setup,
            op: |d, _| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    d.join("p"),
                    FileType::Fifo,
                    Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
            },
            expect: |c| vec![ev(EventKind::Create, &format!("{c}/p"))],
            outside_too: true,
        },
        Case {
            name: "rename",
            setup: |d, _| touch(&d.join("a"), b"a"),
            op: |d, _| fs::rename(d.join("a"), d.join("b")).unwrap(),
            expect: |c| vec![rename_ev(&format!("{c}/a"), &format!("{c}/b"), false)],
            outside_too: true,
        },
        Case {
            name: "rename_over_existing",
            setup: |d, _| {
                touch(&d.join("a"), b"a");
                touch(&d.join("b"), b"b");
            },
            op: |d, _| fs::rename(d.join("a"), d.join("b")).unwrap(),
            expect: |c| vec![rename_ev(&format!("{c}/a"), &format!("{c}/b"), false)],
            outside_too: true,
        },
        Case {
            name: "rename_into_root",
            setup: |_, o| touch(&o.join("x"), b"x"),
            op: |d, o| fs::rename(o.join("x"), d.join("x")).unwrap(),
            expect: |c| vec![ev(EventKind::Create, &format!("{c}/x"))],
            outside_too: false,
        },
        Case {
            name: "rename_dir_into_root",
            setup: |_, o| {
                fs::create_dir(o.join("sub")).unwrap();
                touch(&o.join("sub/f"), b"f");
            },
            op: |d, o| {
                fs::rename(o.join("sub"), d.join("sub")).unwrap();
                open_rw(&d.join("sub/f")).write_all(b"in").unwrap();
            },
            expect: |c| {
                let f = format!("{c}/sub/f");
                vec![
                    dir_ev(EventKind::Mkdir, &format!("{c}/sub")),
                    ev(EventKind::Modify, &f),
                    ev(EventKind::CloseWrite, &f),
                ]
            },
            outside_too: false,
        },
        Case {
            name: "rename_out_of_root",
            setup: |d, _| touch(&d.join("x"), b"x"),
            op: |d, o| fs::rename(d.join("x"), o.join("x")).unwrap(),
            expect: |c| vec![ev(EventKind::Unlink, &format!("{c}/x"))],
            outside_too: false,
        },
        Case {
            name: "rename_dir_out_of_root",
            setup: |d, _| {
                fs::create_dir(d.join("sub")).unwrap();
                touch(&d.join("sub/f"), b"f");
            },
            op: |d, o| {
                fs::rename(d.join("sub"), o.join("sub")).unwrap();
                // Now outside: must not be reported.
                open_rw(&o.join("sub/f")).write_all(b"out").unwrap();
            },
            expect: |c| vec![dir_ev(EventKind::Rmdir, &format!("{c}/sub"))],
            outside_too: false,
        },
        Case {
            name: "directory_rename",
            setup: |d, _| {
                fs::create_dir_all(d.join("a/deep")).unwrap();
                touch(&d.join("a/deep/f"), b"f");
            },
            op: |d, _| {
                fs::rename(d.join("a"), d.join("b")).unwrap();
                open_rw(&d.join("b/deep/f")).write_all(b"moved").unwrap();
            },
            expect: |c| {
                let f = format!("{c}/b/deep/f");
                vec![
                    rename_ev(&format!("{c}/a"), &format!("{c}/b"), true),
                    ev(EventKind::Modify, &f),
                    ev(EventKind::CloseWrite, &f),
                ]
            },
            outside_too: true,
        },
        Case {
            name: "link",
            setup: setup_f,
            op: |d, _| fs::hard_link(d.join("f"), d.join("g")).unwrap(),
            expect: |c| vec![ev(EventKind::Link, &format!("{c}/g"))],
            outside_too: true,
        },
        Case {
            name: "symlink",
            setup: no_setup,
            op: |d, _| std::os::unix::fs::symlink("target", d.join("s")).unwrap(),
            expect: |c| vec![ev(EventKind::Symlink, &format!("{c}/s"))],
            outside_too: true,
        },
        Case {
            name: "mkdir",
            setup: no_setup,
            op: |d, _| fs::create_dir(d.join("sub")).unwrap(),
            expect: |c| vec![dir_ev(EventKind::Mkdir, &format!("{c}/sub"))],
            outside_too: true,
        },
        Case {
            name: "rmdir",
            setup: |d, _| fs::create_dir(d.join("sub")).unwrap(),
            op: |d, _| fs::remove_dir(d.join("sub")).unwrap(),
            expect: |c| vec![dir_ev(EventKind::Rmdir, &format!("{c}/sub"))],
            outside_too: true,
        },
        Case {
            name: "unlink",
            setup: setup_f,
            op: |d, _| fs::remove_file(d.join("f")).unwrap(),
            expect: |c| vec![ev(EventKind::Unlink, &format!("{c}/f"))],
            outside_too: true,
        },
        Case {
            name: "chmod",
            setup: setup_f,
            op: |d, _| fs::set_permissions(d.join("f"), fs::Permissions::from_mode(0o600)).unwrap(),
            expect: |c| vec![ev(EventKind::Attrib, &format!("{c}/f"))],
            outside_too: true,
        },
        Case {
            name: "chmod_dir",
            setup: |d, _| fs::create_dir(d.join("sub")).unwrap(),
            op: |d, _| {
                fs::set_permissions(d.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
            },
            expect: |c| vec![dir_ev(EventKind::Attrib, &format!("{c}/sub"))],
            outside_too: true,
        },
        Case {
            name: "chown",
            setup: setup_f,
            op: |d, _| std::os::unix::fs::chown(d.join("f"), Some(1), Some(1)).unwrap(),
            expect: |c| vec![ev(EventKind::Attrib, &format!("{c}/f"))],
            outside_too: true,
        },
        Case {
            name: "utimensat",
            setup: setup_f,
            op: |d, _| {
                let t = rustix::fs::Timespec {
                    tv_sec: 1_000_000,
                    tv_nsec: 0,
                };
                let ts = rustix::fs::Timestamps {
                    last_access: t,
                    last_modification: t,
                };
                rustix::fs::utimensat(rustix::fs::CWD, d.join("f"), &ts, AtFlags::empty()).unwrap();
            },
            expect: |c| vec![ev(EventKind::Attrib, &format!("{c}/f"))],
            outside_too: true,
        },
        Case {
            name: "write_deep",
            setup: |d, _| {
                fs::create_dir_all(d.join("x/y/z")).unwrap();
                touch(&d.join("x/y/z/f"), b"deep");
            },
            op: |d, _| open_rw(&d.join("x/y/z/f")).write_all(b"D").unwrap(),
            expect: |c| {
                let f = format!("{c}/x/y/z/f");
                vec![ev(EventKind::Modify, &f), ev(EventKind::CloseWrite, &f)]
            },
            outside_too: true,
        },
    ]
}

#[test]
fn fidelity_matrix() {
    require_root();
    run_matrix(FanotifyWatcher::new().unwrap());
}

/// The same matrix in the pre-5.17 mode: renames come from MOVED_FROM/MOVED_TO
/// pairs, created objects are classified by name instead of by handle.
#[test]
fn fidelity_matrix_without_target_fid() {
    require_root();
    run_matrix(FanotifyWatcher::without_target_fid_for_test().unwrap());
}

fn run_matrix(w: FanotifyWatcher) {
    let mut fx = Fx::with(w, |_, _| {});
    let pid = std::process::id();
    let mut failures = Vec::new();
    let mut table = format!(
        "\nfanotify fidelity matrix, {:?} mode (op -> events in root | outside)\n",
        fx.w.mode
    );
    for case in cases() {
        let dir = fx.root.join(case.name);
        let other = fx.outside.join(case.name);
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&other).unwrap();
        (case.setup)(&dir, &other);
        fx.settle();
        (case.op)(&dir, &other);
        let got_raw = fx.settle();
        let got = summary(&got_raw);
        let want = (case.expect)(case.name);
        let shown: Vec<String> = got
            .iter()
            .map(|(_, k, p, p2, d)| {
                let p = p.strip_prefix(&format!("{}/", case.name)).unwrap_or(p);
                let d = if *d { "/" } else { "" };
                match p2 {
                    Some(p2) => {
                        let p2 = p2.strip_prefix(&format!("{}/", case.name)).unwrap_or(p2);
                        format!("{k:?}({p}{d}->{p2}{d})")
                    }
                    None => format!("{k:?}({p}{d})"),
                }
            })
            .collect();
        if got != want {
            failures.push(format!("{}: want {want:?}\n    got {got:?}", case.name));
        }
        if let Some((_, e)) = got_raw.iter().find(|(_, e)| e.pid != pid) {
            failures.push(format!("{}: pid {} != {pid}", case.name, e.pid));
        }
        let mut outside = "-".to_owned();
        if case.outside_too {
            let odir = fx.outside.join(format!("{}-o", case.name));
            let oother = fx.root.join(format!("{}-o", case.name));
            fs::create_dir(&odir).unwrap();
            fs::create_dir(&oother).unwrap();
            (case.setup)(&odir, &oother);
            fx.settle();
            (case.op)(&odir, &oother);
            let got = summary(&fx.settle());
            outside = if got.is_empty() {
                "nothing".to_owned()
            } else {
                failures.push(format!("{} outside the root: got {got:?}", case.name));
                format!("{got:?}")
            };
        }
        table.push_str(&format!(
            "  {:<22} {} | {outside}\n",
            case.name,
            shown.join(" ")
        ));
    }
    println!("{table}");
    assert!(
        failures.is_empty(),
        "{table}\nfailures:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn pre_existing_tree_resolves_by_handle() {
    require_root();
    let mut fx = Fx::with(FanotifyWatcher::new().unwrap(), |root, outside| {
        fs::create_dir_all(root.join("x/y/z")).unwrap();
        touch(&root.join("x/y/z/f"), b"f");
        fs::create_dir_all(outside.join("q")).unwrap();
        touch(&outside.join("q/f"), b"f");
    });
    open_rw(&fx.root.join("x/y/z/f")).write_all(b"1").unwrap();
    open_rw(&fx.outside.join("q/f")).write_all(b"1").unwrap();
    assert_eq!(
        summary(&fx.settle()),
        vec![
            ev(EventKind::Modify, "x/y/z/f"),
            ev(EventKind::CloseWrite, "x/y/z/f")
        ]
    );
}

/// A tree that was never looked at is written to and removed before the events are
/// read: the directories' handles no longer open, but the batch's own `rmdir`
/// records place them, so every path is exact and nothing is lost.
#[test]
fn removed_tree_resolves_from_batch_tombstones() {
    require_root();
    let mut fx = Fx::with(FanotifyWatcher::new().unwrap(), |root, _| {
        fs::create_dir_all(root.join("old/sub")).unwrap();
        touch(&root.join("old/sub/f1"), b"1");
        touch(&root.join("old/sub/f2"), b"2");
    });
    open_rw(&fx.root.join("old/sub/f1"))
        .write_all(b"x")
        .unwrap();
    fs::remove_dir_all(fx.root.join("old")).unwrap();
    let mut got = summary(&fx.settle());
    assert_eq!(
        got[..2],
        [
            ev(EventKind::Modify, "old/sub/f1"),
            ev(EventKind::CloseWrite, "old/sub/f1")
        ]
    );
    got.sort_by_key(|e| format!("{e:?}"));
    let mut want = vec![
        ev(EventKind::Modify, "old/sub/f1"),
        ev(EventKind::CloseWrite, "old/sub/f1"),
        ev(EventKind::Unlink, "old/sub/f1"),
        ev(EventKind::Unlink, "old/sub/f2"),
        dir_ev(EventKind::Rmdir, "old/sub"),
        dir_ev(EventKind::Rmdir, "old"),
    ];
    want.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(got, want);
}

/// An event whose directory handle resolves neither from the cache, nor the
/// filesystem, nor the batch must not vanish: it becomes `Lost` for the root.
#[test]
fn unresolvable_directory_becomes_lost() {
    require_root();
    let tmp = Tmpfs::new();
    let root = tmp.mnt.join("root");
    fs::create_dir_all(root.join("gone")).unwrap();
    let gone = File::open(root.join("gone")).unwrap();
    let (kind, handle, _) = sys::name_to_handle_fd(gone.as_fd()).unwrap();
    drop(gone);
    fs::remove_dir(root.join("gone")).unwrap();
    let fsid = rustix::fs::statvfs(&root).unwrap().f_fsid;

    let mut w = FanotifyWatcher::new().unwrap();
    w.watch_root(ROOT, &root).unwrap();

    // One FAN_MODIFY event with a DFID_NAME record (dir = the removed "gone",
    // name "f"), exactly as the kernel lays it out.
    let mut rec = Vec::new();
    rec.extend_from_slice(&[libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0, 0]);
    rec.extend_from_slice(&u32::try_from(fsid & 0xffff_ffff).unwrap().to_ne_bytes());
    rec.extend_from_slice(&u32::try_from(fsid >> 32).unwrap().to_ne_bytes());
    rec.extend_from_slice(&u32::try_from(handle.len()).unwrap().to_ne_bytes());
    rec.extend_from_slice(&kind.to_ne_bytes());
    rec.extend_from_slice(&handle);
    rec.extend_from_slice(b"f\0");
    while rec.len() % 4 != 0 {
        rec.push(0);
    }
    let rec_len = u16::try_from(rec.len()).unwrap();
    rec[2..4].copy_from_slice(&rec_len.to_ne_bytes());
    let mut buf = Vec::new();
    let event_len = u32::try_from(META_LEN + rec.len()).unwrap();
    buf.extend_from_slice(&event_len.to_ne_bytes());
    buf.push(libc::FANOTIFY_METADATA_VERSION);
    buf.push(0);
    buf.extend_from_slice(&u16::try_from(META_LEN).unwrap().to_ne_bytes());
    buf.extend_from_slice(&libc::FAN_MODIFY.to_ne_bytes());
    buf.extend_from_slice(&libc::FAN_NOFD.to_ne_bytes());
    buf.extend_from_slice(&1i32.to_ne_bytes());
    buf.extend_from_slice(&rec);

    w.process_batch(decode_buffer(&buf).unwrap());
    let mut out = Vec::new();
    w.poll(&mut out, 100).unwrap();
    assert_eq!(
        summary(&out),
        vec![(ROOT, EventKind::Lost, String::new(), None, true)]
    );
    assert_eq!(out[0].1.path, None);
}

#[test]
fn removing_the_root_reports_lost() {
    require_root();
    let tmp = Tmpfs::new();
    let parent = tmp.mnt.join("p");
    let root = parent.join("root");
    fs::create_dir_all(&root).unwrap();
    touch(&root.join("f"), b"f");
    let mut w = FanotifyWatcher::new().unwrap();
    w.watch_root(ROOT, &root).unwrap();
    fs::remove_dir_all(&root).unwrap();
    let evs = collect_until(&mut w, "Lost after root removal", |evs| {
        evs.iter().any(|(_, e)| e.kind == EventKind::Lost)
    });
    let s = summary(&evs);
    assert!(s.contains(&ev(EventKind::Unlink, "f")), "{s:?}");
    assert!(s.contains(&(ROOT, EventKind::Lost, String::new(), None, true)));
}

#[test]
fn overflow_without_unlimited_queue_reports_lost() {
    require_root();
    let mut fx = Fx::with(
        FanotifyWatcher::with_queue_limit_for_test().unwrap(),
        |_, _| {},
    );
    // The watcher is stalled (not polled) while more events than the default
    // max_queued_events (16384) are queued.
    let queue_max: usize = fs::read_to_string("/proc/sys/fs/fanotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let n = 20_000.max(queue_max + 1000);
    for i in 0..n {
        drop(File::create(fx.root.join(format!("f{i}"))).unwrap());
    }
    let evs = collect_until(&mut fx.w, "overflow Lost", |evs| {
        evs.iter().any(|(_, e)| e.kind == EventKind::Lost)
    });
    assert!(fx.w.overflows() > 0);
    let lost: Vec<_> = evs
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Lost)
        .collect();
    assert_eq!(lost.len(), 1, "one overflow, one Lost per root");
    assert_eq!(lost[0].0, ROOT);
    assert_eq!(lost[0].1.path, None);
    let creates = evs
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Create)
        .count();
    assert!(
        creates > 0 && creates < n,
        "{creates} of {n} creates before the overflow"
    );
    let _ = &fx.tmp;
}

#[test]
fn burst_of_200k_creates_arrives_complete() {
    require_root();
    const DIRS: usize = 100;
    const PER_DIR: usize = 2_000;
    let mut fx = Fx::new();
    for d in 0..DIRS {
        let dir = fx.root.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for i in 0..PER_DIR {
            drop(File::create(dir.join(format!("f{i}"))).unwrap());
        }
    }
    let total = DIRS * PER_DIR;
    let mut seen: HashSet<Vec<u8>> = HashSet::with_capacity(total);
    let mut lost = 0;
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = Vec::new();
    while seen.len() < total {
        buf.clear();
        let n = fx.w.poll(&mut buf, 8192).unwrap();
        for (_, e) in &buf {
            match e.kind {
                EventKind::Create => {
                    seen.insert(e.path.as_ref().unwrap().as_bytes().to_vec());
                }
                EventKind::Lost => lost += 1,
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {total} creates",
            seen.len()
        );
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(lost, 0);
    assert_eq!(fx.w.overflows(), 0);
    assert!(seen.contains(&b"d99/f1999"[..]));
}

#[test]
fn nested_roots_and_unwatch() {
    require_root();
    let mut fx = Fx::new();
    let sub = fx.root.join("sub");
    fs::create_dir(&sub).unwrap();
    fx.w.watch_root(9, &sub).unwrap();
    fx.settle();
    touch(&sub.join("f"), b"");
    let mut got = summary(&fx.settle());
    got.sort_by_key(|e| format!("{e:?}"));
    let mut want = vec![
        ev(EventKind::Create, "sub/f"),
        ev(EventKind::OpenWrite, "sub/f"),
        ev(EventKind::CloseWrite, "sub/f"),
        (9, EventKind::Create, "f".into(), None, false),
        (9, EventKind::OpenWrite, "f".into(), None, false),
        (9, EventKind::CloseWrite, "f".into(), None, false),
    ];
    want.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(got, want);

    fx.w.unwatch_root(9);
    touch(&sub.join("g"), b"");
    assert_eq!(
        summary(&fx.settle()),
        vec![
            ev(EventKind::Create, "sub/g"),
            ev(EventKind::OpenWrite, "sub/g"),
            ev(EventKind::CloseWrite, "sub/g")
        ]
    );
    assert!(matches!(
        fx.w.watch_root(ROOT, &sub),
        Err(FanotifyError::RootInUse(ROOT))
    ));
}

#[test]
fn errors_name_the_syscall_and_path() {
    require_root();
    let mut w = FanotifyWatcher::new().unwrap();
    let err = w
        .watch_root(1, Path::new("/nonexistent/cdsync-root"))
        .unwrap_err();
    assert!(
        matches!(err, FanotifyError::Syscall { call: "open", .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("open failed on /nonexistent/cdsync-root"),
        "{msg}"
    );
}

/// The pre-5.17 mode (forced here): MOVED_FROM/MOVED_TO pairing.
#[test]
fn without_target_fid_pairs_moves() {
    require_root();
    let mut fx = Fx::with(
        FanotifyWatcher::without_target_fid_for_test().unwrap(),
        |_, _| {},
    );
    assert_eq!(fx.w.mode, ApiMode::NoTarget);
    touch(&fx.root.join("a"), b"a");
    touch(&fx.outside.join("o"), b"o");
    fs::create_dir_all(fx.root.join("d/e")).unwrap();
    fx.settle();

    let step = |fx: &mut Fx, op: &dyn Fn(&Path, &Path)| {
        op(&fx.root, &fx.outside);
        summary(&fx.settle())
    };
    let mv = |a: &str, b: &str| {
        let (a, b) = (a.to_owned(), b.to_owned());
        move |r: &Path, o: &Path| {
            let p = |s: &str| match s.strip_prefix("out:") {
                Some(s) => o.join(s),
                None => r.join(s),
            };
            fs::rename(p(&a), p(&b)).unwrap();
        }
    };
    assert_eq!(
        step(&mut fx, &mv("a", "b")),
        vec![rename_ev("a", "b", false)]
    );
    assert_eq!(
        step(&mut fx, &mv("out:o", "o")),
        vec![ev(EventKind::Create, "o")]
    );
    assert_eq!(
        step(&mut fx, &mv("b", "out:b")),
        vec![ev(EventKind::Unlink, "b")]
    );
    assert_eq!(
        step(&mut fx, &mv("d", "D")),
        vec![rename_ev("d", "D", true)]
    );
    let got = step(&mut fx, &|r, _| touch(&r.join("D/e/f"), b""));
    assert_eq!(
        got,
        vec![
            ev(EventKind::Create, "D/e/f"),
            ev(EventKind::OpenWrite, "D/e/f"),
            ev(EventKind::CloseWrite, "D/e/f")
        ]
    );

    // Unread, the kernel folds `MOVED_FROM b` of the second rename into the queued
    // `MOVED_TO b` of the first (same pid, directory and name): the result is still
    // a consistent story for the coalescer to verify.
    let got = step(&mut fx, &|r, o| {
        fs::rename(r.join("o"), r.join("b")).unwrap();
        fs::rename(r.join("b"), o.join("b")).unwrap();
    });
    assert_eq!(
        got,
        vec![rename_ev("o", "b", false), ev(EventKind::Unlink, "b")]
    );
}

/// The root is recognised by its handle, so renaming it keeps its events flowing,
/// but the daemon is told (its configured path is stale).
#[test]
fn renaming_the_root_reports_lost_and_keeps_reporting() {
    require_root();
    for w in [
        FanotifyWatcher::new().unwrap(),
        FanotifyWatcher::without_target_fid_for_test().unwrap(),
    ] {
        let tmp = Tmpfs::new();
        let root = tmp.mnt.join("p/root");
        fs::create_dir_all(&root).unwrap();
        let mut w = w;
        w.watch_root(ROOT, &root).unwrap();
        fs::rename(&root, tmp.mnt.join("p/moved")).unwrap();
        touch(&tmp.mnt.join("p/moved/f"), b"");
        let evs = collect_until(&mut w, "events after root rename", |evs| {
            evs.iter().any(|(_, e)| e.kind == EventKind::CloseWrite)
        });
        assert_eq!(
            summary(&evs),
            vec![
                (ROOT, EventKind::Lost, String::new(), None, true),
                ev(EventKind::Create, "f"),
                ev(EventKind::OpenWrite, "f"),
                ev(EventKind::CloseWrite, "f"),
            ],
            "mode {:?}",
            w.mode
        );
    }
}

/// `max` bounds each call; nothing is lost or reordered across calls.
#[test]
fn poll_hands_out_at_most_max() {
    require_root();
    let mut fx = Fx::new();
    for i in 0..50 {
        touch(&fx.root.join(format!("f{i}")), b"");
    }
    let mut one_by_one = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while one_by_one.len() < 150 {
        let before = one_by_one.len();
        let n = fx.w.poll(&mut one_by_one, 1).unwrap();
        assert!(n <= 1 && one_by_one.len() == before + n);
        assert!(Instant::now() < deadline, "timed out");
    }
    let want: Vec<Ev> = (0..50)
        .flat_map(|i| {
            let f = format!("f{i}");
            [
                ev(EventKind::Create, &f),
                ev(EventKind::OpenWrite, &f),
                ev(EventKind::CloseWrite, &f),
            ]
        })
        .collect();
    assert_eq!(summary(&one_by_one), want);
    assert_eq!(fx.w.poll(&mut one_by_one, 0).unwrap(), 0);
}

/// Without CAP_SYS_ADMIN the error says so. Runs this same test binary again as
/// `nobody` (the child half is selected by an environment variable).
#[test]
fn unprivileged_caller_is_told_it_needs_cap_sys_admin() {
    const CHILD: &str = "CDSYNC_FANOTIFY_UNPRIVILEGED_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let err = FanotifyWatcher::new().unwrap_err();
        assert!(
            matches!(
                err,
                FanotifyError::NeedsCapSysAdmin {
                    call: "fanotify_init",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("needs CAP_SYS_ADMIN"), "{err}");
        return;
    }
    require_root();
    use std::os::unix::process::CommandExt;
    // The test's name as libtest knows it: module path without the crate name.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::unprivileged_caller_is_told_it_needs_cap_sys_admin");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--test-threads=1"])
        .env(CHILD, "1")
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "unprivileged child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
