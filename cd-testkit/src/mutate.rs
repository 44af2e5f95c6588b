//! One scripted, seeded round of edits of a content tree.
//!
//! [`mutate`] performs every kind of change a replica must follow: content rewritten
//! at the same size and at a different size, appends, truncations, renames of files and
//! of whole directories, deletes of files and of (empty and non-empty) directories,
//! chmod, chown, symlink retargets, a file replaced by a directory and a directory by a
//! file, new files, directories and hard links, and mtime-only touches. It returns how
//! many of each it did. The top-level `.cdsync/` directory is never touched.
//!
//! The edits are applied in phases; each phase rescans the tree (sorted) and picks its
//! victims with the seeded RNG, so the same tree and seed give the same result.

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::sys;
use crate::tree::{past_time, random_content, set_attrs, text_content};

/// How much to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutateSpec {
    /// Seed of every choice.
    pub seed: u64,
    /// How many entries each kind of edit touches (at most; fewer if the tree is small).
    pub per_kind: usize,
    /// Whether chown may pick other uids (needs root).
    pub chown: bool,
    /// Whether to add hard links to existing files.
    pub hardlinks: bool,
}

impl MutateSpec {
    /// `per_kind` edits of every kind; chown when running as root.
    #[must_use]
    pub fn new(seed: u64, per_kind: usize) -> Self {
        Self {
            seed,
            per_kind,
            chown: sys::is_root(),
            hardlinks: true,
        }
    }
}

/// How many edits of each kind [`mutate`] made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MutationCounts {
    /// Content rewritten in place, size unchanged.
    pub modified_same_size: usize,
    /// Content rewritten with a different size.
    pub modified_resized: usize,
    /// Bytes appended.
    pub appended: usize,
    /// Cut to half their size.
    pub truncated: usize,
    /// Files renamed (same or other directory).
    pub renamed_files: usize,
    /// Directories renamed with their content.
    pub renamed_dirs: usize,
    /// Files (or symlinks) deleted.
    pub deleted_files: usize,
    /// Directories deleted (empty and non-empty).
    pub deleted_dirs: usize,
    /// Mode changed.
    pub chmod: usize,
    /// Owner changed.
    pub chown: usize,
    /// Symlinks pointed elsewhere.
    pub symlinks_retargeted: usize,
    /// Files replaced by a directory of the same name.
    pub file_to_dir: usize,
    /// Directories replaced by a file of the same name.
    pub dir_to_file: usize,
    /// New files.
    pub added_files: usize,
    /// New directories.
    pub added_dirs: usize,
    /// New names for existing files.
    pub added_hardlinks: usize,
    /// Only the mtime changed.
    pub touched: usize,
}

impl MutationCounts {
    /// Sum of all kinds.
    #[must_use]
    pub fn total(&self) -> usize {
        self.kinds().iter().map(|(_, n)| n).sum()
    }

    /// `(kind, count)` pairs, in a fixed order.
    #[must_use]
    pub fn kinds(&self) -> [(&'static str, usize); 17] {
        [
            ("modified", self.modified_same_size),
            ("resized", self.modified_resized),
            ("appended", self.appended),
            ("truncated", self.truncated),
            ("renamed files", self.renamed_files),
            ("renamed dirs", self.renamed_dirs),
            ("deleted files", self.deleted_files),
            ("deleted dirs", self.deleted_dirs),
            ("chmod", self.chmod),
            ("chown", self.chown),
            ("retargeted", self.symlinks_retargeted),
            ("file->dir", self.file_to_dir),
            ("dir->file", self.dir_to_file),
            ("new files", self.added_files),
            ("new dirs", self.added_dirs),
            ("new hardlinks", self.added_hardlinks),
            ("touched", self.touched),
        ]
    }
}

impl fmt::Display for MutationCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .kinds()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Relative paths of a tree, sorted, without the top-level `.cdsync`.
#[derive(Debug, Default)]
struct Listing {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    symlinks: Vec<PathBuf>,
}

fn scan(root: &Path) -> Result<Listing> {
    fn walk(root: &Path, rel: &Path, out: &mut Listing) -> Result<()> {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            if rel.as_os_str().is_empty() && name == ".cdsync" {
                continue;
            }
            let r = rel.join(&name);
            let md = fs::symlink_metadata(root.join(&r))?;
            if md.is_dir() {
                out.dirs.push(r.clone());
                walk(root, &r, out)?;
            } else if md.is_symlink() {
                out.symlinks.push(r);
            } else if md.is_file() {
                out.files.push(r);
            }
        }
        Ok(())
    }
    let mut out = Listing::default();
    walk(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn pick<T: Clone>(rng: &mut StdRng, items: &[T], n: usize) -> Vec<T> {
    let mut v = items.to_vec();
    v.shuffle(rng);
    v.truncate(n);
    v
}

/// Number of entries below `dir` in `l`.
fn weight(l: &Listing, dir: &Path) -> usize {
    l.files
        .iter()
        .chain(&l.dirs)
        .chain(&l.symlinks)
        .filter(|p| p.starts_with(dir) && p.as_path() != dir)
        .count()
}

/// Applies one round of edits to the tree at `root`.
pub fn mutate(root: &Path, spec: &MutateSpec) -> Result<MutationCounts> {
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x6d75_7461_7465);
    let n = spec.per_kind;
    let mut c = MutationCounts::default();
    let abs = |rel: &Path| root.join(rel);

    // Content edits.
    let l = scan(root)?;
    let mut nonempty = Vec::new();
    for f in &l.files {
        if fs::metadata(abs(f))?.len() >= 2 {
            nonempty.push(f.clone());
        }
    }
    let chosen = pick(&mut rng, &nonempty, 4 * n);
    let mut groups = chosen.chunks(n.max(1));
    for f in groups.next().unwrap_or_default() {
        let old = fs::read(abs(f))?;
        let new: Vec<u8> = old.iter().map(|b| b ^ (rng.random::<u8>() | 1)).collect();
        let mut file = fs::OpenOptions::new().write(true).open(abs(f))?;
        file.write_all(&new)?;
        c.modified_same_size += 1;
    }
    for f in groups.next().unwrap_or_default() {
        let old = fs::metadata(abs(f))?.len();
        let new_len = usize::try_from(old)? + rng.random_range(17..5000);
        fs::write(abs(f), text_content(&mut rng, new_len))?;
        c.modified_resized += 1;
    }
    for f in groups.next().unwrap_or_default() {
        let mut file = fs::OpenOptions::new().append(true).open(abs(f))?;
        file.write_all(b"\n<!-- appended by cd-testkit mutate -->\n")?;
        c.appended += 1;
    }
    for f in groups.next().unwrap_or_default() {
        let file = fs::OpenOptions::new().write(true).open(abs(f))?;
        let len = file.metadata()?.len();
        file.set_len(len / 2)?;
        c.truncated += 1;
    }

    // Attribute edits.
    let l = scan(root)?;
    for f in pick(&mut rng, &l.files, n) {
        let mode = fs::metadata(abs(&f))?.mode() & 0o7777;
        let new = if mode == 0o600 { 0o644 } else { 0o600 };
        fs::set_permissions(abs(&f), fs::Permissions::from_mode(new))?;
        c.chmod += 1;
    }
    if let Some(d) = pick(&mut rng, &l.dirs, 1).first() {
        let mode = fs::metadata(abs(d))?.mode() & 0o7777;
        let new = if mode == 0o750 { 0o755 } else { 0o750 };
        fs::set_permissions(abs(d), fs::Permissions::from_mode(new))?;
        c.chmod += 1;
    }
    if spec.chown {
        for p in pick(&mut rng, &[l.files.clone(), l.symlinks.clone()].concat(), n) {
            let md = fs::symlink_metadata(abs(&p))?;
            let (uid, gid) = if md.uid() == 1001 {
                (0, 0)
            } else {
                (1001, 1002)
            };
            let mode = md.mode() & 0o7777;
            lchown(abs(&p), Some(uid), Some(gid))?;
            if !md.is_symlink() {
                // chown clears setuid/setgid on files; keep the mode we meant.
                fs::set_permissions(abs(&p), fs::Permissions::from_mode(mode))?;
            }
            c.chown += 1;
        }
    }
    for f in pick(&mut rng, &l.files, n) {
        let (sec, nsec) = past_time(&mut rng);
        sys::set_mtime_nofollow(&abs(&f), sec, nsec)?;
        c.touched += 1;
    }
    for (k, s) in pick(&mut rng, &l.symlinks, n).into_iter().enumerate() {
        let old = fs::read_link(abs(&s))?;
        let tmp = s.with_file_name(format!(".retarget-{k}.tmp"));
        let target = PathBuf::from(format!("retargeted-{k}/")).join(&old);
        symlink(&target, abs(&tmp))?;
        fs::rename(abs(&tmp), abs(&s))?;
        c.symlinks_retargeted += 1;
    }

    // Additions.
    let l = scan(root)?;
    let links = if spec.hardlinks { n } else { 0 };
    for (k, f) in pick(&mut rng, &l.files, links).into_iter().enumerate() {
        let dir = pick(&mut rng, &l.dirs, 1).pop().unwrap_or_default();
        let mut name = std::ffi::OsString::from(format!("newlink-{k}-"));
        name.push(f.file_name().unwrap_or_default());
        fs::hard_link(abs(&f), abs(&dir.join(name)))?;
        c.added_hardlinks += 1;
    }
    for k in 0..n {
        let dir = pick(&mut rng, &l.dirs, 1).pop().unwrap_or_default();
        let size = if k == 0 {
            300_000
        } else {
            rng.random_range(0..20_000)
        };
        let content = if k % 2 == 0 {
            random_content(&mut rng, size)
        } else {
            text_content(&mut rng, size)
        };
        fs::write(abs(&dir.join(format!("added-{k}.html"))), content)?;
        c.added_files += 1;
    }
    if n > 0 {
        let parent = pick(&mut rng, &l.dirs, 1).pop().unwrap_or_default();
        let top = parent.join("added-dir");
        fs::create_dir_all(abs(&top.join("nested")))?;
        fs::create_dir(abs(&top.join("empty")))?;
        fs::write(
            abs(&top.join("nested/added.css")),
            text_content(&mut rng, 999),
        )?;
        let (sec, nsec) = past_time(&mut rng);
        set_attrs(&abs(&top.join("empty")), None, Some(0o711), (sec, nsec))?;
        c.added_dirs += 3;
        c.added_files += 1;
    }

    // Renames.
    let l = scan(root)?;
    for (k, f) in pick(&mut rng, &l.files, n).into_iter().enumerate() {
        let dir = if k % 2 == 0 {
            f.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            pick(&mut rng, &l.dirs, 1).pop().unwrap_or_default()
        };
        let mut name = std::ffi::OsString::from(format!("renamed-{k}-"));
        name.push(f.file_name().unwrap_or_default());
        fs::rename(abs(&f), abs(&dir.join(name)))?;
        c.renamed_files += 1;
    }
    let l = scan(root)?;
    let small_dirs: Vec<PathBuf> = l
        .dirs
        .iter()
        .filter(|d| (1..=30).contains(&weight(&l, d)))
        .cloned()
        .collect();
    for (k, d) in pick(&mut rng, &small_dirs, n.div_ceil(2))
        .into_iter()
        .enumerate()
    {
        // Move to a parent that is not inside the directory itself.
        let parents: Vec<PathBuf> = std::iter::once(PathBuf::new())
            .chain(l.dirs.iter().filter(|p| !p.starts_with(&d)).cloned())
            .collect();
        let parent = pick(&mut rng, &parents, 1).pop().unwrap_or_default();
        let mut name = std::ffi::OsString::from(format!("moved-{k}-"));
        name.push(d.file_name().unwrap_or_default());
        // Both were listed before the earlier moves of this loop: either may have moved.
        let parent_there = parent.as_os_str().is_empty()
            || fs::symlink_metadata(abs(&parent)).is_ok_and(|m| m.is_dir());
        if fs::symlink_metadata(abs(&d)).is_ok() && parent_there {
            fs::rename(abs(&d), abs(&parent.join(name)))
                .with_context(|| format!("renaming directory {}", d.display()))?;
            c.renamed_dirs += 1;
        }
    }

    // Type changes and deletes.
    let l = scan(root)?;
    let single: Vec<PathBuf> = l
        .files
        .iter()
        .filter(|f| fs::metadata(abs(f)).is_ok_and(|m| m.nlink() == 1))
        .cloned()
        .collect();
    let victims = pick(&mut rng, &single, n + 1);
    if let Some(f) = victims.first() {
        fs::remove_file(abs(f))?;
        fs::create_dir(abs(f))?;
        fs::write(abs(&f.join("inner.txt")), b"was a file\n")?;
        c.file_to_dir += 1;
        c.added_files += 1;
    }
    for f in victims.iter().skip(1) {
        fs::remove_file(abs(f))?;
        c.deleted_files += 1;
    }
    if let Some(s) = l.symlinks.first() {
        fs::remove_file(abs(s))?;
        c.deleted_files += 1;
    }
    let l = scan(root)?;
    let empty: Vec<PathBuf> = l
        .dirs
        .iter()
        .filter(|d| weight(&l, d) == 0)
        .cloned()
        .collect();
    let loaded: Vec<PathBuf> = l
        .dirs
        .iter()
        .filter(|d| (2..=30).contains(&weight(&l, d)))
        .cloned()
        .collect();
    let e = pick(&mut rng, &empty, 1);
    let mut full = pick(&mut rng, &loaded, 2);
    full.retain(|d| !e.iter().any(|x| x.starts_with(d) || d.starts_with(x)));
    if full.len() == 2 && (full[0].starts_with(&full[1]) || full[1].starts_with(&full[0])) {
        full.truncate(1);
    }
    if let Some(d) = e.first() {
        fs::remove_dir(abs(d))?;
        c.deleted_dirs += 1;
    }
    if let Some(d) = full.first() {
        fs::remove_dir_all(abs(d))?;
        c.deleted_dirs += 1;
    }
    if let Some(d) = full.get(1) {
        fs::remove_dir_all(abs(d))?;
        fs::write(abs(d), b"was a directory\n")?;
        c.dir_to_file += 1;
    }
    // A small in-place patch in the middle of one file: same size, a delta's best case.
    if let Some(f) = pick(&mut rng, &scan(root)?.files, 1).first() {
        let mut file = fs::OpenOptions::new().read(true).write(true).open(abs(f))?;
        let len = file.metadata()?.len();
        if len >= 8 {
            let mut patch = [0u8; 4];
            file.seek(SeekFrom::Start(len / 2))?;
            file.read_exact(&mut patch)?;
            for b in &mut patch {
                *b ^= rng.random::<u8>() | 1;
            }
            file.seek(SeekFrom::Start(len / 2))?;
            file.write_all(&patch)?;
            c.modified_same_size += 1;
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::compare;
    use crate::tree::{TreeSpec, generate};

    #[test]
    fn every_kind_of_edit_happens_and_shows() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, pristine) = (tmp.path().join("a"), tmp.path().join("p"));
        let spec = TreeSpec::new(400, 3);
        generate(&a, &spec).unwrap();
        generate(&pristine, &spec).unwrap();
        fs::create_dir_all(a.join(".cdsync/stage")).unwrap();
        let c = mutate(&a, &MutateSpec::new(9, 3)).unwrap();
        for (kind, n) in c.kinds() {
            if kind != "chown" || sys::is_root() {
                assert!(n > 0, "no {kind} edit: {c}");
            }
        }
        assert!(a.join(".cdsync/stage").is_dir(), "reserved dir touched");
        let d = compare(&pristine, &a).unwrap();
        for needle in [
            "only in A",
            "only in B",
            "type differs",
            "content differs",
            "size differs",
            "mode differs",
            "symlink target differs",
            "mtime differs",
            "hard links differ",
        ] {
            assert!(
                d.iter().any(|d| d.contains(needle)),
                "{needle} missing: {d:#?}"
            );
        }
    }

    #[test]
    fn same_seed_same_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let spec = TreeSpec::new(300, 5);
        generate(&a, &spec).unwrap();
        generate(&b, &spec).unwrap();
        let ca = mutate(&a, &MutateSpec::new(1, 2)).unwrap();
        let cb = mutate(&b, &MutateSpec::new(1, 2)).unwrap();
        assert_eq!(ca, cb);
        // Edited entries carry "now" as mtime, which differs between the two runs;
        // everything else must match.
        let d = compare(&a, &b).unwrap();
        let other: Vec<_> = d.iter().filter(|d| !d.contains("mtime differs")).collect();
        assert!(other.is_empty(), "{other:#?}");
    }
}
