//! End-to-end tests of the filesystem layer with the real planner: scan a source and a
//! replica, plan, carry every fetched file from the source's [`SendFile`] into the
//! replica's [`Stage`], apply, rescan the replica and require its manifest to equal the
//! source's, round after round of mutations. Also shared test helpers.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cd_core::manifest::{EntryKind, Manifest};
use cd_core::plan::{Fetch, Plan, PlanOptions, Step, plan};
use rustix::fs::AtFlags;

use super::*;

/// Sets the mtime of `path` (not following a symlink), leaving atime alone.
pub(crate) fn set_mtime(path: &Path, sec: i64, nsec: u32) {
    let t = sys::mtime_only(sec, nsec);
    rustix::fs::utimensat(rustix::fs::CWD, path, &t, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

pub(crate) fn chown(path: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(
        rustix::fs::CWD,
        path,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub(crate) fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sends every fetch from `src` into `stage` the way the transport does. A file that
/// changes while it is sent is aborted; its error is returned.
pub(crate) fn transfer(src: &Root, stage: &mut Stage, fetch: &[Fetch]) -> Vec<FsError> {
    let mut errors = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (i, f) in fetch.iter().enumerate() {
        let id = u32::try_from(i).unwrap();
        stage.begin(id, f.hash).unwrap();
        let mut sf = SendFile::open(src, &f.path).unwrap();
        loop {
            let n = sf.read_chunk(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            stage.write(id, &buf[..n]).unwrap();
        }
        match sf.finish() {
            Ok(sent) => stage.finish(id, sent.hash, sent.size).unwrap(),
            Err(e) => {
                stage.abort_file(id);
                errors.push(e);
            }
        }
    }
    errors
}

/// Panics with a readable list of differences if the manifests differ.
#[track_caller]
pub(crate) fn assert_same(want: &Manifest, got: &Manifest, what: &str) {
    if want == got {
        return;
    }
    let mut diffs = Vec::new();
    for e in want.iter() {
        match got.get(&e.path) {
            None => diffs.push(format!("missing {}: {:?}", e.path, e.kind)),
            Some(g) if g != e => {
                diffs.push(format!("differs {}:\n  want {e:?}\n  got  {g:?}", e.path))
            }
            _ => {}
        }
    }
    for g in got.iter() {
        if want.get(&g.path).is_none() {
            diffs.push(format!("extra {}: {:?}", g.path, g.kind));
        }
    }
    panic!("{what}: replica differs from source:\n{}", diffs.join("\n"));
}

/// A source and a replica, each with its persistent index.
struct Pair {
    _a_dir: tempfile::TempDir,
    _b_dir: tempfile::TempDir,
    a: Root,
    b: Root,
    a_idx: HashIndex,
    b_idx: HashIndex,
    opts: ApplyOptions,
}

impl Pair {
    fn new() -> Pair {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let a = Root::open(a_dir.path()).unwrap();
        let b = Root::open(b_dir.path()).unwrap();
        Pair {
            _a_dir: a_dir,
            _b_dir: b_dir,
            a,
            b,
            a_idx: HashIndex::new(),
            b_idx: HashIndex::new(),
            opts: ApplyOptions {
                owner: is_root(),
                fsync: true,
            },
        }
    }

    fn a(&self, rel: &str) -> PathBuf {
        self.a.path().join(rel)
    }

    fn b(&self, rel: &str) -> PathBuf {
        self.b.path().join(rel)
    }

    fn plan(&mut self) -> (Manifest, Plan) {
        let (want, _) = scan(&self.a, &mut self.a_idx).unwrap();
        let (have, _) = scan(&self.b, &mut self.b_idx).unwrap();
        let p = plan(
            &want,
            &have,
            PlanOptions {
                owner: self.opts.owner,
            },
        );
        (want, p)
    }

    /// One full sync; the replica must end up equal to the source and a second plan
    /// must be empty. Returns the plan and the report.
    #[track_caller]
    fn sync(&mut self, what: &str) -> (Plan, ApplyReport) {
        let (want, p) = self.plan();
        let mut stage = Stage::new(&self.b).unwrap();
        stage.set_fsync(false);
        let errors = transfer(&self.a, &mut stage, &p.fetch);
        assert!(errors.is_empty(), "{what}: {errors:?}");
        let report = apply(&self.b, &mut stage, &p, &self.opts).unwrap();
        assert!(
            report.is_complete(),
            "{what}: {report:#?}\nplan: {:#?}",
            p.steps
        );
        assert_eq!(report.placed_files, p.stats.placed_files, "{what}");
        assert_eq!(report.reused_local, p.stats.reused_local, "{what}");
        assert_eq!(report.created_dirs, p.stats.created_dirs, "{what}");
        assert_eq!(report.symlinks, p.stats.symlinks, "{what}");
        assert_eq!(report.hardlinks, p.stats.hardlinks, "{what}");
        assert_eq!(report.meta_only, p.stats.meta_only, "{what}");
        drop(stage);
        let (got, _) = scan(&self.b, &mut self.b_idx).unwrap();
        let what = format!("{what}\nplan: {:#?}\nreport: {report:#?}", p.steps);
        if self.opts.owner {
            assert_same(&want, &got, &what);
        } else {
            assert_same(&without_owner(&want), &without_owner(&got), &what);
        }
        let what = what.lines().next().unwrap_or_default();
        let again = plan(
            &want,
            &got,
            PlanOptions {
                owner: self.opts.owner,
            },
        );
        assert!(
            again.is_empty(),
            "{what}: second plan not empty: {:#?}",
            again.steps
        );
        self.assert_clean(what);
        (p, report)
    }

    /// No stage directory and no `.cdsync-tmp-` entry is left in the replica.
    #[track_caller]
    fn assert_clean(&self, what: &str) {
        let stages = std::fs::read_dir(self.b(".cdsync/stage")).unwrap().count();
        assert_eq!(stages, 0, "{what}: stage directories left behind");
        let (m, _) = scan(&self.b, &mut HashIndex::new()).unwrap();
        for e in m.iter() {
            assert!(
                !e.path.file_name().starts_with(TMP_PREFIX.as_bytes()),
                "{what}: temporary entry left: {}",
                e.path
            );
        }
    }
}

/// `m` with every uid and gid set to 0, to compare trees synced without `owner`.
fn without_owner(m: &Manifest) -> Manifest {
    Manifest::from_entries(m.iter().cloned().map(|mut e| {
        e.meta.uid = 0;
        e.meta.gid = 0;
        e
    }))
    .unwrap()
}

fn write(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap();
}

fn big(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The initial source tree: every kind of entry and attribute the scanner records.
fn populate(t: &Pair) {
    let a = |s: &str| t.a(s);
    std::fs::create_dir_all(a("site/css")).unwrap();
    std::fs::create_dir_all(a("site/img/icons")).unwrap();
    std::fs::create_dir_all(a("empty/nested-empty")).unwrap();
    std::fs::create_dir(a("sticky")).unwrap();
    std::fs::create_dir(a("shared")).unwrap();
    std::fs::create_dir(a("dir with space")).unwrap();
    write(&a("site/index.html"), b"<html>hello</html>");
    write(&a("site/css/main.css"), b"body { color: red }");
    write(&a("site/img/logo.bin"), &big(1, 700_000));
    write(&a("site/img/icons/a.ico"), &big(2, 3000));
    write(&a("site/img/icons/b.ico"), &big(2, 3000)); // same content, separate inode
    write(&a("zero"), b"");
    write(&a("dir with space/file with space.txt"), b"spaces");
    write(&a("readonly.txt"), b"ro");
    write(&a("setuid-tool"), b"#!/bin/sh\n");
    write(&a("private"), b"secret");
    let odd = std::ffi::OsStr::from_bytes(b"odd-\xff\xfe-name");
    write(&a("site").join(odd), b"not utf-8");
    // Hard links: one group within a directory, one across directories.
    write(&a("site/linked-1"), b"linked content");
    std::fs::hard_link(a("site/linked-1"), a("site/linked-2")).unwrap();
    std::fs::hard_link(a("site/linked-1"), a("shared/linked-3")).unwrap();
    write(&a("site/img/pair"), b"pair");
    std::fs::hard_link(a("site/img/pair"), a("pair-top")).unwrap();
    // Symlinks: relative, absolute, dangling, to a directory.
    std::os::unix::fs::symlink("css/main.css", a("site/style-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", a("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", a("dangling")).unwrap();
    std::os::unix::fs::symlink("site/img", a("img-dir-link")).unwrap();
    // Modes.
    chmod(&a("readonly.txt"), 0o444);
    chmod(&a("setuid-tool"), 0o4755);
    chmod(&a("private"), 0o600);
    chmod(&a("sticky"), 0o1777);
    chmod(&a("shared"), 0o2775);
    chmod(&a("empty/nested-empty"), 0o700);
    if is_root() {
        chown(&a("private"), 1000, 1000);
        chown(&a("shared"), 0, 50);
        chown(&a("site/style-link"), 33, 33);
        chown(&a("site/linked-1"), 1001, 1002);
    }
    // mtimes with nanoseconds, directories last (creating children bumps them).
    set_mtime(&a("site/index.html"), 1_600_000_000, 123_456_789);
    set_mtime(&a("site/style-link"), 1_500_000_000, 999_999_999);
    set_mtime(&a("zero"), 0, 1);
    set_mtime(&a("site/img"), 1_400_000_000, 5);
    set_mtime(&a("empty"), 1_300_000_000, 0);
}

#[test]
fn handles_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Root>();
    send_sync::<HashIndex>();
    send_sync::<FsError>();
    send::<Stage>();
    send::<SendFile>();
}

#[test]
fn read_only_open_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("f"), b"x");
    let root = Root::open_read_only(dir.path()).unwrap();
    let (m, _) = scan(&root, &mut HashIndex::new()).unwrap();
    assert_eq!(m.len(), 1);
    assert!(!dir.path().join(".cdsync").exists());
    assert!(Stage::new(&root).is_err());
    let e = Root::open(&dir.path().join("missing")).unwrap_err();
    assert!(e.to_string().starts_with("open root "), "{e}");
    assert!(e.is_not_found());
}

#[test]
fn end_to_end_rounds_of_mutations() {
    let mut t = Pair::new();
    populate(&t);
    let (p, _) = t.sync("initial sync");
    assert!(p.stats.fetch_files > 0);
    // Identical content under two paths travels once.
    let logo_like = p.fetch.iter().filter(|f| f.size == 3000).count();
    assert_eq!(logo_like, 1, "a.ico and b.ico share one fetch");

    // Nothing changed: nothing to do.
    let (p, _) = t.sync("no-op");
    assert!(p.is_empty());

    // Round 1: edits, renames, deletes.
    write(&t.a("site/index.html"), b"<html>HELLO</html>"); // same size
    set_mtime(&t.a("site/index.html"), 1_600_000_000, 123_456_789); // and same mtime
    write(
        &t.a("site/css/main.css"),
        b"body { color: blue; margin: 0 }",
    );
    std::fs::rename(t.a("site/img/logo.bin"), t.a("site/logo-renamed.bin")).unwrap();
    std::fs::rename(t.a("dir with space"), t.a("renamed dir")).unwrap();
    std::fs::remove_file(t.a("zero")).unwrap();
    std::fs::remove_dir_all(t.a("empty")).unwrap();
    let (p, r) = t.sync("round 1: edits, renames, deletes");
    assert!(
        p.fetch.iter().all(|f| f.size != 700_000),
        "a renamed file is not re-sent"
    );
    assert!(r.reused_local >= 2, "{r:?}");

    // Round 2: type changes and attribute-only changes.
    std::fs::remove_file(t.a("readonly.txt")).unwrap();
    std::fs::create_dir(t.a("readonly.txt")).unwrap(); // file -> dir
    write(&t.a("readonly.txt/inside"), b"now a directory");
    std::fs::remove_dir_all(t.a("sticky")).unwrap();
    write(&t.a("sticky"), b"dir -> file"); // dir -> file
    std::fs::remove_file(t.a("private")).unwrap();
    std::os::unix::fs::symlink("site/index.html", t.a("private")).unwrap(); // file -> symlink
    std::fs::remove_file(t.a("dangling")).unwrap();
    write(&t.a("dangling"), b"symlink -> file"); // symlink -> file
    std::fs::remove_file(t.a("img-dir-link")).unwrap();
    std::fs::create_dir(t.a("img-dir-link")).unwrap(); // symlink -> dir
    std::fs::remove_file(t.a("abs-link")).unwrap();
    std::os::unix::fs::symlink("/etc/os-release", t.a("abs-link")).unwrap(); // retarget
    chmod(&t.a("setuid-tool"), 0o2750);
    chmod(&t.a("renamed dir"), 0o750);
    set_mtime(&t.a("site/css/main.css"), 1_234_567_890, 1);
    if is_root() {
        chown(&t.a("setuid-tool"), 1000, 1000);
        chown(&t.a("site/style-link"), 0, 0);
        chown(&t.a("renamed dir"), 1000, 33);
    }
    let (_, r) = t.sync("round 2: type changes and attributes");
    assert!(r.meta_only >= 2, "{r:?}");

    // Round 3: hard link changes.
    std::fs::remove_file(t.a("site/linked-2")).unwrap();
    write(&t.a("site/linked-2"), b"linked content"); // break a link, same content
    std::fs::remove_file(t.a("pair-top")).unwrap(); // canonical of a group goes away
    std::fs::hard_link(t.a("site/index.html"), t.a("shared/index-link")).unwrap(); // new link
    std::fs::hard_link(t.a("site/img/pair"), t.a("site/img/pair-2")).unwrap();
    write(
        &t.a("site/linked-1"),
        b"linked content, edited through one link",
    );
    t.sync("round 3: hard links");

    // Round 4: swaps, duplicates, symlink retargets, a big edit.
    std::fs::rename(t.a("site/img/icons/a.ico"), t.a("tmp-swap")).unwrap();
    write(&t.a("site/img/icons/a.ico"), b"new a");
    std::fs::rename(t.a("site/css"), t.a("site/styles")).unwrap();
    std::fs::remove_file(t.a("site/style-link")).unwrap();
    std::os::unix::fs::symlink("styles/main.css", t.a("site/style-link")).unwrap();
    std::fs::copy(t.a("site/logo-renamed.bin"), t.a("site/logo-copy.bin")).unwrap();
    let mut logo = std::fs::read(t.a("site/logo-renamed.bin")).unwrap();
    logo[350_000] ^= 1;
    write(&t.a("site/logo-renamed.bin"), &logo);
    let (p, _) = t.sync("round 4: swaps, duplicates, retargets");
    assert_eq!(
        p.fetch.iter().filter(|f| f.size == 700_000).count(),
        1,
        "only the edited logo"
    );

    // Round 5: the replica was changed locally; the sync puts it back.
    write(&t.b("site/index.html"), b"defaced");
    chmod(&t.b("setuid-tool"), 0o777);
    write(&t.b("extra-file"), b"not on the source");
    std::fs::create_dir_all(t.b("extra-dir/deeper")).unwrap();
    write(&t.b("extra-dir/deeper/f"), b"x");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        t.b("extra-dir/fifo"),
        Mode::from_raw_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("/", t.b("site/root-link")).unwrap();
    t.sync("round 5: repair local damage");
    assert!(!t.b("extra-dir").exists());

    // Round 6: the source is emptied.
    for e in std::fs::read_dir(t.a.path()).unwrap() {
        let e = e.unwrap();
        if e.file_name() == ".cdsync" {
            continue;
        }
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            std::fs::remove_dir_all(e.path()).unwrap();
        } else {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    t.sync("round 6: everything deleted");
    let left: Vec<_> = std::fs::read_dir(t.b.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [".cdsync"]);
}

#[test]
fn end_to_end_without_fsync_or_owner() {
    let mut t = Pair::new();
    t.opts = ApplyOptions {
        owner: false,
        fsync: false,
    };
    populate(&t);
    t.sync("initial sync, no owner, no fsync");
    write(&t.a("site/index.html"), b"changed");
    std::fs::rename(t.a("site"), t.a("site2")).unwrap();
    t.sync("rename of a directory tree");
}

#[test]
fn a_file_changing_during_transfer_is_skipped_then_synced_next_time() {
    let mut t = Pair::new();
    write(&t.a("stable"), b"stable");
    write(&t.a("busy"), b"version 1");
    t.sync("initial");
    write(&t.a("busy"), b"version 2, longer");
    write(&t.a("stable"), b"stable 2");
    let (want, p) = t.plan();
    let mut stage = Stage::new(&t.b).unwrap();
    // The sender reads `busy`, which changes while it is being read.
    let mut sent_ok = Vec::new();
    for (i, f) in p.fetch.iter().enumerate() {
        let id = i as u32;
        stage.begin(id, f.hash).unwrap();
        let mut sf = SendFile::open(&t.a, &f.path).unwrap();
        let mut buf = vec![0u8; 4];
        let n = sf.read_chunk(&mut buf).unwrap();
        stage.write(id, &buf[..n]).unwrap();
        if f.path.as_bytes() == b"busy" {
            set_mtime(&t.a("busy"), 1, 0);
        }
        loop {
            let n = sf.read_chunk(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            stage.write(id, &buf[..n]).unwrap();
        }
        match sf.finish() {
            Ok(s) => {
                stage.finish(id, s.hash, s.size).unwrap();
                sent_ok.push(f.path.clone());
            }
            Err(e) => {
                assert!(matches!(e, FsError::Changed { .. }), "{e}");
                stage.abort_file(id);
            }
        }
    }
    assert_eq!(sent_ok.len(), 1);
    let r = apply(&t.b, &mut stage, &p, &t.opts).unwrap();
    assert_eq!(r.skipped, 1, "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        std::fs::read(t.b("busy")).unwrap(),
        b"version 1",
        "old file left in place"
    );
    assert_eq!(std::fs::read(t.b("stable")).unwrap(), b"stable 2");
    drop(stage);
    let _ = want;
    t.sync("the next sync completes");
}

#[test]
fn plans_from_the_planner_never_touch_the_stage_parent_or_root_meta() {
    // A source that contains a directory named like the stage: only the top-level
    // `.cdsync` is reserved.
    let mut t = Pair::new();
    std::fs::create_dir_all(t.a("sub/.cdsync/stage")).unwrap();
    write(&t.a("sub/.cdsync/stage/file"), b"ordinary content");
    let (p, _) = t.sync("nested .cdsync is ordinary content");
    assert!(p.steps.iter().all(|s| !matches!(s, Step::Remove { .. })));
    assert!(t.b("sub/.cdsync/stage/file").exists());
    let m = scan(&t.b, &mut HashIndex::new()).unwrap().0;
    assert!(m.iter().any(|e| matches!(e.kind, EntryKind::File { .. })));
}

/// Regression: the fsync of a directory that a move emptied, and that a later step
/// replaced with a file, failed with ENOTDIR and marked a correct sync as failed.
#[test]
fn directory_replaced_by_file_after_its_content_moved_out() {
    let mut t = Pair::new();
    t.opts.fsync = true;
    std::fs::create_dir_all(t.a("d")).unwrap();
    write(&t.a("d/x"), &big(1, 10_000));
    t.sync("initial");
    std::fs::rename(t.a("d/x"), t.a("x")).unwrap();
    std::fs::remove_dir(t.a("d")).unwrap();
    write(&t.a("d"), b"now a file");
    let (p, _) = t.sync("directory replaced by a file after its content moved out");
    assert_eq!(
        p.stats.reused_local, 1,
        "the moved file is reused, not re-sent"
    );
}
