//! Seeded generator of a realistic web content tree.
//!
//! [`generate`] fills a directory with what a web farm serves and what trips up sync
//! tools: nested directories (depth up to about 6), empty directories, files of varied
//! sizes (mostly small text, a few 100 KB to a few MB binaries, some empty), symlinks
//! (relative to files and directories, dangling relative, absolute dangling), hard-link
//! groups, odd names (spaces, UTF-8, a leading dash, `#`/`%`, a non-UTF-8 byte name),
//! modes (0644, 0600, 0755, a setgid and a sticky directory), entries owned by other
//! uids/gids (when running as root), and mtimes in the past with nanoseconds (directory
//! mtimes are set last, so they stick).
//!
//! The same [`TreeSpec`] (including the seed) always yields the same tree, byte for
//! byte and attribute for attribute (except the mode, owner and mtime of the root
//! itself, which are left alone).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::sys;

/// Maximum directory depth below the root.
pub const MAX_DEPTH: usize = 6;

/// What to generate. Build one with [`TreeSpec::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSpec {
    /// Regular files with distinct inodes (hard links come on top).
    pub files: usize,
    /// Directories that may hold files (empty directories come on top).
    pub dirs: usize,
    /// Directories that stay empty.
    pub empty_dirs: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// How many of the files are large (100 KB – 3 MB), within `max_total_bytes`.
    pub large_files: usize,
    /// Upper bound of the total bytes of file content.
    pub max_total_bytes: u64,
    /// Symlinks (mixed kinds, see the module docs).
    pub symlinks: usize,
    /// Groups of 2–4 names for one inode.
    pub hardlink_groups: usize,
    /// Include names with spaces, UTF-8, a leading dash, `#`/`%`, and a non-UTF-8 byte.
    pub odd_names: bool,
    /// Give some entries other uids/gids (33, 1000, 65534). Needs root.
    pub foreign_owners: bool,
}

impl TreeSpec {
    /// A tree of about `files` files with proportionate directories, links and large
    /// files, at most 64 MiB of content; odd names on; foreign owners when root.
    #[must_use]
    pub fn new(files: usize, seed: u64) -> Self {
        Self {
            files,
            dirs: (files / 12).max(8),
            empty_dirs: (files / 300).max(3),
            seed,
            large_files: (files / 150).max(1),
            max_total_bytes: 64 << 20,
            symlinks: (files / 50).max(6),
            hardlink_groups: (files / 200).max(3),
            odd_names: true,
            foreign_owners: sys::is_root(),
        }
    }
}

/// What [`generate`] made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Regular files (distinct inodes).
    pub files: usize,
    /// Directories below the root, empty ones included.
    pub dirs: usize,
    /// Directories left empty.
    pub empty_dirs: usize,
    /// Symlinks.
    pub symlinks: usize,
    /// Extra names created with `link(2)`.
    pub hardlinks: usize,
    /// Bytes of file content (each inode counted once).
    pub bytes: u64,
    /// Largest file.
    pub largest: u64,
    /// Entries with an odd name.
    pub odd_names: usize,
    /// Entries owned by a uid or gid other than 0.
    pub foreign_owned: usize,
}

#[derive(Debug, Clone)]
struct DirInfo {
    rel: PathBuf,
    depth: usize,
    /// Never receives entries (an empty directory).
    keep_empty: bool,
}

struct Gen<'a> {
    root: &'a Path,
    spec: &'a TreeSpec,
    rng: StdRng,
    dirs: Vec<DirInfo>,
    files: Vec<PathBuf>,
    summary: Summary,
    bytes_left: u64,
}

const DIR_NAMES: &[&str] = &[
    "assets", "css", "js", "img", "images", "blog", "news", "products", "docs", "static", "media",
    "fonts", "vendor", "lib", "2023", "2024", "en", "de", "ko", "archive",
];
const STEMS: &[&str] = &[
    "index", "page", "article", "post", "about", "style", "app", "logo", "photo", "data", "main",
    "banner", "thumb", "feed", "sitemap",
];
const WORDS: &[&str] = &[
    "the",
    "content",
    "server",
    "farm",
    "sync",
    "replica",
    "node",
    "master",
    "file",
    "<div>",
    "</div>",
    "<p>",
    "</p>",
    "class=\"row\"",
    "function",
    "return",
    "{",
    "}",
    "color:",
    "#fff;",
    "margin:",
    "0",
    "auto;",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "\n",
    "\n",
    "\t",
];

/// Odd file names (bytes, since one of them is not UTF-8).
const ODD_FILE_NAMES: &[&[u8]] = &[
    b"with space.html",
    b"-leading-dash.txt",
    b"hash#and%20percent.html",
    "\u{fc}n\u{ef}c\u{f6}d\u{e9}.txt".as_bytes(),
    "\u{65e5}\u{672c}\u{8a9e}.html".as_bytes(),
    b"caf\xe9-latin1.html",
    b"quote'single.txt",
    b"semi;colon&amp.txt",
];
const ODD_DIR_NAMES: &[&[u8]] = &[
    "\u{fc}n\u{ef}c\u{f6}d\u{e9}".as_bytes(),
    "\u{65e5}\u{672c}\u{8a9e}".as_bytes(),
    b"dir with space",
    b"-dash-dir",
];
const FOREIGN: &[(u32, u32)] = &[(33, 33), (1000, 1000), (65534, 65534), (1000, 33)];

/// Generates the tree described by `spec` inside `root` (created if missing; it should
/// be empty). Deterministic per spec.
pub fn generate(root: &Path, spec: &TreeSpec) -> Result<Summary> {
    if spec.foreign_owners && !sys::is_root() {
        bail!("TreeSpec::foreign_owners needs root (chown to other uids)");
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let mut g = Gen {
        root,
        spec,
        rng: StdRng::seed_from_u64(spec.seed),
        dirs: vec![DirInfo {
            rel: PathBuf::new(),
            depth: 0,
            keep_empty: false,
        }],
        files: Vec::new(),
        summary: Summary::default(),
        bytes_left: spec.max_total_bytes,
    };
    g.make_dirs()?;
    g.make_files()?;
    g.make_hardlinks()?;
    g.make_symlinks()?;
    g.finish_dirs()?;
    Ok(g.summary)
}

/// A past time: seconds between 2017 and 2023, nanoseconds random (sometimes zero).
pub(crate) fn past_time(rng: &mut StdRng) -> (i64, i64) {
    let sec = rng.random_range(1_500_000_000..1_700_000_000);
    let nsec = if rng.random_bool(0.1) {
        0
    } else {
        rng.random_range(0..1_000_000_000)
    };
    (sec, nsec)
}

/// Pseudo-text content (compressible, like HTML/CSS/JS) of exactly `size` bytes.
pub(crate) fn text_content(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 16);
    while out.len() < size {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        out.extend_from_slice(w.as_bytes());
        out.push(b' ');
    }
    out.truncate(size);
    out
}

/// Random (incompressible) content of exactly `size` bytes.
pub(crate) fn random_content(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    rng.fill_bytes(&mut out);
    out
}

/// Sets owner (if given), mode (if given) and mtime of `path`, in the order that keeps
/// all three (chown may clear setgid; neither chown nor chmod touch the mtime).
pub(crate) fn set_attrs(
    path: &Path,
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    mtime: (i64, i64),
) -> Result<()> {
    if let Some((uid, gid)) = owner {
        lchown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", path.display()))?;
    }
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    }
    sys::set_mtime_nofollow(path, mtime.0, mtime.1)
        .with_context(|| format!("setting mtime of {}", path.display()))
}

impl Gen<'_> {
    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn pick_dir(&mut self, max_depth: usize) -> usize {
        loop {
            let i = self.rng.random_range(0..self.dirs.len());
            let d = &self.dirs[i];
            if !d.keep_empty && d.depth <= max_depth {
                return i;
            }
        }
    }

    fn add_dir(&mut self, parent: usize, name: &OsStr, keep_empty: bool) -> Result<()> {
        let rel = self.dirs[parent].rel.join(name);
        let depth = self.dirs[parent].depth + 1;
        fs::create_dir(self.abs(&rel))
            .with_context(|| format!("mkdir {}", self.abs(&rel).display()))?;
        self.dirs.push(DirInfo {
            rel,
            depth,
            keep_empty,
        });
        self.summary.dirs += 1;
        if keep_empty {
            self.summary.empty_dirs += 1;
        }
        Ok(())
    }

    fn make_dirs(&mut self) -> Result<()> {
        // A guaranteed deep chain first, so depth MAX_DEPTH is always exercised.
        let chain = ["assets", "vendor", "lib", "dist", "esm", "chunks"];
        for (i, name) in chain.iter().take(self.spec.dirs.min(MAX_DEPTH)).enumerate() {
            self.add_dir(i, OsStr::new(name), false)?;
        }
        let mut odd = 0;
        for i in self.dirs.len() - 1..self.spec.dirs {
            let parent = self.pick_dir(MAX_DEPTH - 1);
            let name = if self.spec.odd_names && odd < ODD_DIR_NAMES.len() && i % 7 == 3 {
                odd += 1;
                self.summary.odd_names += 1;
                OsStr::from_bytes(ODD_DIR_NAMES[odd - 1]).to_owned()
            } else {
                let base = DIR_NAMES[self.rng.random_range(0..DIR_NAMES.len())];
                OsString::from(format!("{base}-{i}"))
            };
            self.add_dir(parent, &name, false)?;
        }
        for i in 0..self.spec.empty_dirs {
            let parent = self.pick_dir(MAX_DEPTH - 1);
            let name = ["cache", "tmp", "empty", "drafts"][i % 4];
            self.add_dir(parent, OsStr::new(&format!("{name}-{i}")), true)?;
        }
        Ok(())
    }

    fn file_size(&mut self, large: bool) -> u64 {
        let want: u64 = if large {
            self.rng.random_range(100_000..3_000_000)
        } else {
            match self.rng.random_range(0..100) {
                0..2 => 0,
                2..62 => self.rng.random_range(1..4096),
                62..92 => self.rng.random_range(4096..65_536),
                _ => self.rng.random_range(65_536..100_000),
            }
        };
        let size = want.min(self.bytes_left);
        self.bytes_left -= size;
        size
    }

    fn make_files(&mut self) -> Result<()> {
        let large_every = self
            .spec
            .files
            .checked_div(self.spec.large_files)
            .map_or(usize::MAX, |n| n.max(1));
        let mut odd = 0;
        for i in 0..self.spec.files {
            let di = self.pick_dir(MAX_DEPTH);
            let large = i % large_every == large_every / 2;
            let size = usize::try_from(self.file_size(large))?;
            let binary = large || self.rng.random_bool(0.2);
            let name: OsString = if self.spec.odd_names && odd < ODD_FILE_NAMES.len() && i % 11 == 5
            {
                odd += 1;
                self.summary.odd_names += 1;
                OsStr::from_bytes(ODD_FILE_NAMES[odd - 1]).to_owned()
            } else {
                let stem = STEMS[self.rng.random_range(0..STEMS.len())];
                let ext = if large {
                    ["mp4", "zip", "pdf", "jpg"][i % 4]
                } else if binary {
                    ["png", "jpg", "gif", "woff2", "ico"][i % 5]
                } else {
                    ["html", "html", "html", "css", "js", "json", "txt", "xml"][i % 8]
                };
                format!("{stem}-{i}.{ext}").into()
            };
            let rel = self.dirs[di].rel.join(name);
            let content = if binary {
                random_content(&mut self.rng, size)
            } else {
                text_content(&mut self.rng, size)
            };
            let path = self.abs(&rel);
            fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
            let mode = match self.rng.random_range(0..100) {
                0..80 => 0o644,
                80..88 => 0o600,
                88..93 => 0o664,
                93..98 => 0o755,
                _ => 0o444,
            };
            let owner = self.foreign_owner(0.05);
            let mtime = past_time(&mut self.rng);
            set_attrs(&path, owner, Some(mode), mtime)?;
            self.summary.files += 1;
            self.summary.bytes += size as u64;
            self.summary.largest = self.summary.largest.max(size as u64);
            self.files.push(rel);
        }
        Ok(())
    }

    fn foreign_owner(&mut self, p: f64) -> Option<(u32, u32)> {
        if self.spec.foreign_owners && self.rng.random_bool(p) {
            self.summary.foreign_owned += 1;
            Some(FOREIGN[self.rng.random_range(0..FOREIGN.len())])
        } else {
            None
        }
    }

    fn make_hardlinks(&mut self) -> Result<()> {
        if self.files.is_empty() {
            return Ok(());
        }
        for g in 0..self.spec.hardlink_groups {
            let original = self.files[self.rng.random_range(0..self.files.len())].clone();
            let extra = self.rng.random_range(1..=3);
            for j in 0..extra {
                let di = self.pick_dir(MAX_DEPTH);
                let mut name = OsString::from(format!("hl-{g}-{j}-"));
                name.push(original.file_name().unwrap_or_default());
                let rel = self.dirs[di].rel.join(name);
                fs::hard_link(self.abs(&original), self.abs(&rel))
                    .with_context(|| format!("link {}", self.abs(&rel).display()))?;
                self.summary.hardlinks += 1;
            }
        }
        Ok(())
    }

    /// `../` repeated to climb from directory `from` to the root.
    fn up(depth: usize) -> PathBuf {
        let mut p = PathBuf::new();
        for _ in 0..depth {
            p.push("..");
        }
        p
    }

    fn make_symlinks(&mut self) -> Result<()> {
        for k in 0..self.spec.symlinks {
            let di = self.pick_dir(MAX_DEPTH);
            let (dir_rel, depth) = (self.dirs[di].rel.clone(), self.dirs[di].depth);
            let target: PathBuf = match k % 6 {
                // Relative, to a file elsewhere in the tree.
                0 | 5 if !self.files.is_empty() => {
                    let f = &self.files[self.rng.random_range(0..self.files.len())];
                    Self::up(depth).join(f)
                }
                // Relative, to a directory.
                1 => {
                    let t = self.rng.random_range(0..self.dirs.len());
                    let d = Self::up(depth).join(&self.dirs[t].rel);
                    if d.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        d
                    }
                }
                // Absolute, dangling.
                2 => PathBuf::from(format!("/nonexistent/cdsync-testkit/{k}/index.html")),
                // Relative, dangling.
                3 => PathBuf::from(format!("missing-{k}.html")),
                // Odd bytes in the target itself.
                _ => PathBuf::from(OsStr::from_bytes(b"../caf\xe9 target#%")),
            };
            let name = ["latest", "current", "link", "shortcut", "alias", "prev"][k % 6];
            let rel = dir_rel.join(format!("{name}-{k}"));
            let path = self.abs(&rel);
            symlink(&target, &path).with_context(|| format!("symlink {}", path.display()))?;
            let owner = self.foreign_owner(0.15);
            let mtime = past_time(&mut self.rng);
            set_attrs(&path, owner, None, mtime)?;
            self.summary.symlinks += 1;
        }
        Ok(())
    }

    /// Owner, mode and mtime of every directory, deepest first, after all content.
    fn finish_dirs(&mut self) -> Result<()> {
        let mut order: Vec<usize> = (1..self.dirs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.dirs[i].depth));
        // Decide attributes in creation order (deterministic), apply deepest first.
        let mut attrs = vec![None; self.dirs.len()];
        let mut special = 0;
        for (i, attr) in attrs.iter_mut().enumerate().skip(1) {
            let (mode, owner) = if special < 2 && i % 9 == 4 {
                special += 1;
                if special == 1 {
                    // A shared upload area: setgid, group-writable, group www-data.
                    (0o2775, self.spec.foreign_owners.then_some((0, 33)))
                } else {
                    (0o1777, None) // sticky, world-writable (like /tmp)
                }
            } else {
                let mode = match self.rng.random_range(0..20) {
                    0 => 0o700,
                    1 | 2 => 0o750,
                    _ => 0o755,
                };
                (mode, self.foreign_owner(0.05))
            };
            if owner.is_some() && special > 0 && mode == 0o2775 {
                self.summary.foreign_owned += 1;
            }
            *attr = Some((mode, owner, past_time(&mut self.rng)));
        }
        for i in order {
            let (mode, owner, mtime) = attrs[i].expect("set above");
            set_attrs(&self.abs(&self.dirs[i].rel), owner, Some(mode), mtime)?;
        }
        Ok(())
    }
}

/// Deterministic, incompressible bytes (xorshift64 of `seed`): the same `seed` and
/// `len` give the same bytes in every test and bench.
#[must_use]
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Regular files anywhere under `dir` with their sizes (symlinks not followed; empty
/// if `dir` does not exist).
#[must_use]
pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            out.extend(files_under(&p));
        } else if md.is_file() {
            out.push((p, md.len()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::unix::fs::MetadataExt;

    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, fs::Metadata)>) {
        for e in fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let md = fs::symlink_metadata(root.join(&r)).unwrap();
            let is_dir = md.is_dir();
            out.push((r.clone(), md));
            if is_dir {
                walk(root, &r, out);
            }
        }
    }

    #[test]
    fn generates_the_promised_variety() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = TreeSpec::new(600, 7);
        let s = generate(tmp.path(), &spec).unwrap();
        assert_eq!(s.files, 600);
        assert!(
            s.symlinks >= 6 && s.hardlinks >= 3 && s.empty_dirs >= 3,
            "{s:?}"
        );
        assert!(s.largest >= 100_000, "{s:?}");
        let mut all = Vec::new();
        walk(tmp.path(), Path::new(""), &mut all);
        let depth = all
            .iter()
            .map(|(p, _)| p.components().count())
            .max()
            .unwrap();
        assert!(depth > MAX_DEPTH, "depth {depth}");
        let modes: BTreeSet<u32> = all.iter().map(|(_, m)| m.mode() & 0o7777).collect();
        for m in [0o644, 0o600, 0o755, 0o2775, 0o1777] {
            assert!(modes.contains(&m), "mode {m:o} missing from {modes:?}");
        }
        assert!(
            all.iter().any(|(p, _)| p.to_str().is_none()),
            "no non-UTF-8 name"
        );
        assert!(all.iter().any(|(_, m)| m.is_file() && m.nlink() > 1));
        assert!(all.iter().any(|(_, m)| m.is_file() && m.len() == 0));
        assert!(all.iter().any(|(_, m)| m.mtime_nsec() != 0));
        assert!(all.iter().all(|(_, m)| m.mtime() < 1_700_000_000));
        let empty = all
            .iter()
            .filter(|(p, m)| m.is_dir() && fs::read_dir(tmp.path().join(p)).unwrap().count() == 0)
            .count();
        assert!(empty >= 3);
        if spec.foreign_owners {
            assert!(all.iter().any(|(_, m)| m.uid() != 0));
            assert!(all.iter().any(|(_, m)| m.gid() != 0));
        }
        let dangling = all
            .iter()
            .filter(|(p, m)| m.is_symlink() && fs::metadata(tmp.path().join(p)).is_err())
            .count();
        let resolving = all
            .iter()
            .filter(|(p, m)| m.is_symlink() && fs::metadata(tmp.path().join(p)).is_ok())
            .count();
        assert!(dangling >= 2 && resolving >= 2, "{dangling} {resolving}");
    }

    #[test]
    fn respects_the_byte_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = TreeSpec::new(200, 1);
        spec.max_total_bytes = 100_000;
        let s = generate(tmp.path(), &spec).unwrap();
        assert!(s.bytes <= 100_000, "{s:?}");
        assert_eq!(s.files, 200);
    }
}
