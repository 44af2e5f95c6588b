//! Independent comparator of two directory trees.
//!
//! It uses nothing but `std::fs` and `std::os::unix` (`symlink_metadata` only, so no
//! symlink is ever followed) and no cdsync code, so that it can judge the daemon.
//!
//! Two trees are identical when they have the same set of relative paths (the
//! top-level `.cdsync/` directory, reserved for the daemon's staging, is left out) and
//! for every path: the same type; for files the same bytes; the same `mode & 0o7777`,
//! uid, gid and mtime (seconds and nanoseconds, directories included); for symlinks
//! the same target bytes; and the same hard-link structure (the partition of the
//! non-directory paths into inodes).
//!
//! The roots themselves are compared on type, mode and owner but not on mtime: the
//! daemon legitimately creates and removes its reserved `.cdsync/` inside each root,
//! which moves the root's mtime on either side.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::show_path;

/// Name of the daemon's reserved directory at the top of every content root.
pub const RESERVED: &str = ".cdsync";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    BlockDev,
    CharDev,
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    inode: (u64, u64),
    target: Option<PathBuf>,
}

fn kind_of(ft: fs::FileType) -> Kind {
    if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else {
        Kind::CharDev
    }
}

fn entry(path: &Path) -> Result<Entry> {
    let md = fs::symlink_metadata(path).with_context(|| format!("lstat {}", path.display()))?;
    let kind = kind_of(md.file_type());
    let target = if kind == Kind::Symlink {
        Some(fs::read_link(path).with_context(|| format!("readlink {}", path.display()))?)
    } else {
        None
    };
    Ok(Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        size: md.len(),
        inode: (md.dev(), md.ino()),
        target,
    })
}

/// Every entry of the tree at `root`, by relative path (the root itself is `""`).
fn scan(root: &Path) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    out.insert(PathBuf::new(), entry(root)?);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            if rel.as_os_str().is_empty() && e.file_name() == RESERVED {
                continue;
            }
            let r = rel.join(e.file_name());
            let en = entry(&root.join(&r))?;
            if en.kind == Kind::Dir {
                stack.push(r.clone());
            }
            out.insert(r, en);
        }
    }
    Ok(out)
}

/// First offset at which the two files differ, if any.
fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "directory",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::BlockDev => "block device",
        Kind::CharDev => "char device",
    }
}

/// Hard-link groups: for every non-directory path, the sorted paths sharing its inode.
fn link_groups(t: &BTreeMap<PathBuf, Entry>) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (p, e) in t {
        if e.kind != Kind::Dir {
            by_inode.entry(e.inode).or_default().push(p.clone());
        }
    }
    let mut out = BTreeMap::new();
    for group in by_inode.into_values() {
        for p in &group {
            out.insert(p.clone(), group.clone());
        }
    }
    out
}

fn show_group(g: &[PathBuf]) -> String {
    let v: Vec<String> = g.iter().map(|p| show_path(p)).collect();
    format!("{{{}}}", v.join(", "))
}

/// Which attributes [`compare_with`] checks besides paths, types, file bytes, modes
/// and symlink targets (always checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// uid and gid.
    pub owners: bool,
    /// mtimes (seconds and nanoseconds) of everything but the roots.
    pub mtimes: bool,
    /// The hard-link structure.
    pub hardlinks: bool,
    /// Paths to leave out of both trees, relative to the roots (besides [`RESERVED`]),
    /// e.g. a peer tool's own marker directory.
    pub ignore: &'static [&'static str],
}

impl Checks {
    /// Everything: the module docs' "identical".
    pub const ALL: Self = Self {
        owners: true,
        mtimes: true,
        hardlinks: true,
        ignore: &[],
    };
}

/// Compares the trees at `a` and `b`; returns human-readable differences, empty when
/// they are identical (see the module docs for what "identical" means). Errors only
/// when a tree cannot be read.
pub fn compare(a: &Path, b: &Path) -> Result<Vec<String>> {
    compare_with(a, b, Checks::ALL)
}

/// [`compare`], checking only what `checks` asks for beyond the always-checked
/// paths, types, bytes, modes and symlink targets.
pub fn compare_with(a: &Path, b: &Path, checks: Checks) -> Result<Vec<String>> {
    let mut ta = scan(a)?;
    let mut tb = scan(b)?;
    for t in [&mut ta, &mut tb] {
        t.retain(|p, _| !checks.ignore.iter().any(|i| p.starts_with(i)));
    }
    let mut diffs = Vec::new();
    for (p, ea) in &ta {
        let Some(eb) = tb.get(p) else {
            diffs.push(format!(
                "{}: only in A ({})",
                show_path(p),
                kind_name(ea.kind)
            ));
            continue;
        };
        let ps = show_path(p);
        if ea.kind != eb.kind {
            diffs.push(format!(
                "{ps}: type differs: A={} B={}",
                kind_name(ea.kind),
                kind_name(eb.kind)
            ));
            continue;
        }
        if ea.mode != eb.mode {
            diffs.push(format!(
                "{ps}: mode differs: A={:04o} B={:04o}",
                ea.mode, eb.mode
            ));
        }
        if checks.owners && ea.uid != eb.uid {
            diffs.push(format!("{ps}: uid differs: A={} B={}", ea.uid, eb.uid));
        }
        if checks.owners && ea.gid != eb.gid {
            diffs.push(format!("{ps}: gid differs: A={} B={}", ea.gid, eb.gid));
        }
        let is_root = p.as_os_str().is_empty();
        if checks.mtimes && !is_root && ea.mtime != eb.mtime {
            diffs.push(format!(
                "{ps}: mtime differs ({}): A={}.{:09} B={}.{:09}",
                kind_name(ea.kind),
                ea.mtime.0,
                ea.mtime.1,
                eb.mtime.0,
                eb.mtime.1
            ));
        }
        match ea.kind {
            Kind::File if ea.size != eb.size => {
                diffs.push(format!("{ps}: size differs: A={} B={}", ea.size, eb.size));
            }
            Kind::File => {
                let d = first_difference(&a.join(p), &b.join(p))
                    .with_context(|| format!("comparing content of {ps}"))?;
                if let Some(off) = d {
                    diffs.push(format!("{ps}: content differs from byte {off}"));
                }
            }
            Kind::Symlink if ea.target != eb.target => diffs.push(format!(
                "{ps}: symlink target differs: A={} B={}",
                ea.target.as_deref().map(show_path).unwrap_or_default(),
                eb.target.as_deref().map(show_path).unwrap_or_default()
            )),
            _ => {}
        }
    }
    for (p, eb) in &tb {
        if !ta.contains_key(p) {
            diffs.push(format!(
                "{}: only in B ({})",
                show_path(p),
                kind_name(eb.kind)
            ));
        }
    }
    if !checks.hardlinks {
        return Ok(diffs);
    }
    let (ga, gb) = (link_groups(&ta), link_groups(&tb));
    let mut reported = std::collections::BTreeSet::new();
    for (p, group_a) in &ga {
        let Some(group_b) = gb.get(p) else { continue };
        if group_a != group_b && reported.insert(group_a.clone()) {
            diffs.push(format!(
                "{}: hard links differ: A={} B={}",
                show_path(p),
                show_group(group_a),
                show_group(group_b)
            ));
        }
    }
    Ok(diffs)
}

/// Panics (listing the first 20 differences) unless the trees at `a` and `b` are
/// identical.
#[track_caller]
pub fn assert_identical(a: &Path, b: &Path) {
    let diffs = match compare(a, b) {
        Ok(d) => d,
        Err(e) => panic!("comparing {} with {}: {e:#}", a.display(), b.display()),
    };
    if !diffs.is_empty() {
        let shown: Vec<&str> = diffs.iter().take(20).map(String::as_str).collect();
        panic!(
            "trees differ (A={}, B={}): {} difference(s); first {}:\n  {}",
            a.display(),
            b.display(),
            diffs.len(),
            shown.len(),
            shown.join("\n  ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;
    use crate::tree::{TreeSpec, generate};
    use std::os::unix::fs::{PermissionsExt, lchown, symlink};
    use tempfile::TempDir;

    /// Two identical generated trees, A and B.
    fn pair() -> (TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let spec = TreeSpec::new(120, 42);
        generate(&a, &spec).unwrap();
        generate(&b, &spec).unwrap();
        (tmp, a, b)
    }

    /// Applies `edit` to B (keeping the parent directory's mtime), expects exactly one
    /// difference mentioning every needle.
    fn expect_diff(rel: &str, edit: impl FnOnce(&Path), needles: &[&str]) {
        let (_tmp, a, b) = pair();
        let target = b.join(rel);
        let parent = target.parent().unwrap().to_path_buf();
        let pmd = fs::symlink_metadata(&parent).unwrap();
        edit(&target);
        sys::set_mtime_nofollow(&parent, pmd.mtime(), pmd.mtime_nsec()).unwrap();
        let diffs = compare(&a, &b).unwrap();
        assert!(!diffs.is_empty(), "no difference detected for {needles:?}");
        for n in needles {
            assert!(
                diffs.iter().any(|d| d.contains(n)),
                "{n:?} not in {diffs:#?}"
            );
        }
    }

    fn some_file(root: &Path) -> String {
        // A stable, non-empty, single-link file of the generated tree.
        let mut best = None;
        let t = scan(root).unwrap();
        for (p, e) in &t {
            if e.kind == Kind::File && e.size > 10 && link_groups(&t)[p].len() == 1 {
                best = Some(p.to_str().unwrap().to_owned());
                if p.components().count() > 1 && p.to_str().is_some() {
                    break;
                }
            }
        }
        best.unwrap()
    }

    fn keep_mtime(path: &Path, f: impl FnOnce(&Path)) {
        let md = fs::symlink_metadata(path).unwrap();
        f(path);
        sys::set_mtime_nofollow(path, md.mtime(), md.mtime_nsec()).unwrap();
    }

    #[test]
    fn identical_trees_have_no_differences() {
        let (_tmp, a, b) = pair();
        assert_eq!(compare(&a, &b).unwrap(), Vec::<String>::new());
        assert_identical(&a, &b);
    }

    #[test]
    fn reserved_dir_is_ignored_only_at_top() {
        let (_tmp, a, b) = pair();
        fs::create_dir_all(b.join(".cdsync/stage")).unwrap();
        fs::write(b.join(".cdsync/stage/partial"), b"x").unwrap();
        assert_eq!(compare(&a, &b).unwrap(), Vec::<String>::new());
        fs::create_dir(b.join("assets/.cdsync")).unwrap();
        let d = compare(&a, &b).unwrap();
        assert!(
            d.iter().any(|d| d.contains("assets/.cdsync: only in B")),
            "{d:?}"
        );
    }

    #[test]
    fn detects_missing_and_extra_paths() {
        let (_tmp, a, b) = pair();
        let f = some_file(&a);
        fs::remove_file(b.join(&f)).unwrap();
        fs::write(a.join("assets/extra.txt"), b"x").unwrap();
        let d = compare(&a, &b).unwrap();
        assert!(
            d.iter().any(|d| d == &format!("{f}: only in A (file)")),
            "{d:?}"
        );
        assert!(
            d.iter().any(|d| d == "assets/extra.txt: only in A (file)"),
            "{d:?}"
        );
        let d = compare(&b, &a).unwrap();
        assert!(
            d.iter().any(|d| d == &format!("{f}: only in B (file)")),
            "{d:?}"
        );
    }

    #[test]
    fn detects_empty_dir_missing() {
        let (_tmp, a, b) = pair();
        fs::create_dir(a.join("assets/new-empty")).unwrap();
        let d = compare(&a, &b).unwrap();
        assert!(
            d.iter()
                .any(|d| d.contains("assets/new-empty: only in A (directory)"))
        );
    }

    #[test]
    fn detects_type_change() {
        let (_tmp, a, b) = pair();
        let f = some_file(&a);
        fs::remove_file(b.join(&f)).unwrap();
        fs::create_dir(b.join(&f)).unwrap();
        let d = compare(&a, &b).unwrap();
        assert!(
            d.iter()
                .any(|d| d.contains("type differs: A=file B=directory")),
            "{d:?}"
        );
        fs::remove_dir(b.join(&f)).unwrap();
        symlink(&f, b.join(&f)).unwrap();
        let d = compare(&a, &b).unwrap();
        assert!(
            d.iter()
                .any(|d| d.contains("type differs: A=file B=symlink")),
            "{d:?}"
        );
    }

    #[test]
    fn detects_same_size_content_change() {
        let (_tmp, a, _) = pair();
        let f = some_file(&a);
        expect_diff(
            &f,
            |p| {
                keep_mtime(p, |p| {
                    let mut c = fs::read(p).unwrap();
                    let last = c.len() - 1;
                    c[last] ^= 1;
                    fs::OpenOptions::new()
                        .write(true)
                        .open(p)
                        .and_then(|mut fh| io::Write::write_all(&mut fh, &c))
                        .unwrap();
                })
            },
            &["content differs from byte"],
        );
    }

    #[test]
    fn detects_size_change() {
        let (_tmp, a, _) = pair();
        let f = some_file(&a);
        expect_diff(
            &f,
            |p| {
                keep_mtime(p, |p| {
                    File::options()
                        .write(true)
                        .open(p)
                        .unwrap()
                        .set_len(3)
                        .unwrap()
                })
            },
            &["size differs"],
        );
    }

    #[test]
    fn detects_mode_change() {
        let (_tmp, a, _) = pair();
        let f = some_file(&a);
        expect_diff(
            &f,
            |p| {
                let m = fs::metadata(p).unwrap().mode() & 0o7777;
                fs::set_permissions(p, fs::Permissions::from_mode(m ^ 0o4000)).unwrap();
            },
            &["mode differs"],
        );
        expect_diff(
            "assets",
            |p| {
                let m = fs::metadata(p).unwrap().mode() & 0o7777;
                fs::set_permissions(p, fs::Permissions::from_mode(m ^ 0o1000)).unwrap();
            },
            &["assets: mode differs"],
        );
    }

    #[test]
    fn detects_owner_change() {
        assert!(
            sys::is_root(),
            "this test needs root (chown to another uid)"
        );
        let (_tmp, a, _) = pair();
        let f = some_file(&a);
        expect_diff(
            &f,
            |p| lchown(p, Some(4242), None).unwrap(),
            &["uid differs"],
        );
        expect_diff(
            &f,
            |p| lchown(p, None, Some(4243)).unwrap(),
            &["gid differs"],
        );
    }

    #[test]
    fn detects_mtime_change_down_to_the_nanosecond() {
        let (_tmp, a, _) = pair();
        let f = some_file(&a);
        expect_diff(
            &f,
            |p| {
                let md = fs::metadata(p).unwrap();
                let nsec = (md.mtime_nsec() + 1) % 1_000_000_000;
                sys::set_mtime_nofollow(p, md.mtime(), nsec).unwrap();
            },
            &["mtime differs (file)"],
        );
        expect_diff(
            "assets/vendor",
            |p| {
                let md = fs::metadata(p).unwrap();
                sys::set_mtime_nofollow(p, md.mtime() - 1, md.mtime_nsec()).unwrap();
            },
            &["assets/vendor: mtime differs (directory)"],
        );
    }

    #[test]
    fn detects_symlink_retarget_and_symlink_mtime() {
        let (_tmp, a, b) = pair();
        let t = scan(&a).unwrap();
        let (link, _) = t.iter().find(|(_, e)| e.kind == Kind::Symlink).unwrap();
        let link = link.to_str().unwrap().to_owned();
        expect_diff(
            &link,
            |p| {
                let md = fs::symlink_metadata(p).unwrap();
                fs::remove_file(p).unwrap();
                symlink("elsewhere", p).unwrap();
                lchown(p, Some(md.uid()), Some(md.gid())).unwrap();
                sys::set_mtime_nofollow(p, md.mtime(), md.mtime_nsec()).unwrap();
            },
            &["symlink target differs", "elsewhere"],
        );
        keep_mtime(b.join(&link).parent().unwrap(), |_| {
            let md = fs::symlink_metadata(b.join(&link)).unwrap();
            sys::set_mtime_nofollow(&b.join(&link), md.mtime() + 5, 0).unwrap();
        });
        let d = compare(&a, &b).unwrap();
        assert!(
            d.iter().any(|d| d.contains("mtime differs (symlink)")),
            "{d:?}"
        );
    }

    #[test]
    fn detects_broken_and_added_hard_links() {
        let (_tmp, a, b) = pair();
        let t = scan(&a).unwrap();
        let groups = link_groups(&t);
        let (p, _) = groups.iter().find(|(_, g)| g.len() > 1).unwrap();
        // Break the link in B: same bytes, same attributes, separate inode.
        let bp = b.join(p);
        let md = fs::metadata(&bp).unwrap();
        keep_mtime(bp.parent().unwrap(), |_| {
            let data = fs::read(&bp).unwrap();
            fs::remove_file(&bp).unwrap();
            fs::write(&bp, data).unwrap();
            lchown(&bp, Some(md.uid()), Some(md.gid())).unwrap();
            fs::set_permissions(&bp, fs::Permissions::from_mode(md.mode() & 0o7777)).unwrap();
            sys::set_mtime_nofollow(&bp, md.mtime(), md.mtime_nsec()).unwrap();
        });
        let d = compare(&a, &b).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("hard links differ"), "{d:?}");

        // Join two unrelated identical files in B into one inode.
        let (_tmp2, a, b) = pair();
        fs::write(a.join("x1"), b"same").unwrap();
        fs::write(a.join("x2"), b"same").unwrap();
        fs::write(b.join("x1"), b"same").unwrap();
        fs::hard_link(b.join("x1"), b.join("x2")).unwrap();
        for r in [&a, &b] {
            for n in ["x1", "x2"] {
                sys::set_mtime_nofollow(&r.join(n), 1_600_000_000, 5).unwrap();
            }
        }
        let d = compare(&a, &b).unwrap();
        assert!(d.iter().any(|d| d.contains("hard links differ")), "{d:?}");
    }

    #[test]
    fn detects_non_utf8_name_difference() {
        let (_tmp, a, b) = pair();
        let t = scan(&a).unwrap();
        let (p, _) = t
            .keys()
            .zip(0..)
            .find(|(p, _)| p.to_str().is_none())
            .unwrap();
        let mut renamed = p.as_os_str().to_owned();
        renamed.push("x");
        keep_mtime(b.join(p).parent().unwrap(), |_| {
            fs::rename(b.join(p), b.join(&renamed)).unwrap()
        });
        let d = compare(&a, &b).unwrap();
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d.iter()
                .any(|d| d.contains("\\xE9") && d.contains("only in A")),
            "{d:?}"
        );
    }

    #[test]
    fn root_mode_counts_but_root_mtime_does_not() {
        let (_tmp, a, b) = pair();
        sys::set_mtime_nofollow(&b, 1_000_000_000, 1).unwrap();
        assert_eq!(compare(&a, &b).unwrap(), Vec::<String>::new());
        fs::set_permissions(&b, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&a, fs::Permissions::from_mode(0o755)).unwrap();
        let d = compare(&a, &b).unwrap();
        assert_eq!(d, vec![".: mode differs: A=0755 B=0700".to_owned()]);
    }

    #[test]
    #[should_panic(expected = "trees differ")]
    fn assert_identical_panics_on_difference() {
        let (_tmp, a, b) = pair();
        fs::write(b.join("stray"), b"").unwrap();
        assert_identical(&a, &b);
    }
}
