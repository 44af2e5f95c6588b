//! The seeded workloads of the side-by-side bench.
//!
//! Every byte is a pure function of `(seed, file index, position)`, so a tree can be
//! made again, and a file the incremental workload touched can be put back exactly,
//! without keeping a pristine copy of a gigabyte around:
//!
//! - [`Tree`] (W1): `files` files in `dirs` directories (nested up to three deep), sizes
//!   log-normal (median 16 KiB, σ = 1.2, clamped to 1 KiB – 1 MiB), half of them text
//!   (compressible, like HTML/CSS/JS) and half random (like images), modes 0644, 0755
//!   or 0600, plus `big` files of `big_size` bytes of random data and a few symlinks.
//!   Names are plain ASCII so that every peer can carry them.
//! - [`Tree::mutate`] (W2): rewrites 4 KiB in place (size kept) in 1 % of the files,
//!   renames 50 files into other directories, deletes 50, and rewrites 1 MiB in the
//!   middle of the first big file; [`Tree::restore`] undoes exactly that.
//! - [`write_burst`] (W3): many small files into a new directory, as fast as possible.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for item `index` of stream `stream` of `seed`.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = Self(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.0 ^= r
            .next()
            .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    #[expect(clippy::cast_precision_loss, reason = "53 random bits")]
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

const WORDS: &[&str] = &[
    "<div", "class=\"", "content", "</div>", "<p>", "</p>", "the", "farm", "server", "sync",
    "replica", "href=\"/", "img", "src=\"", ".jpg\"", "function", "return", "var", "{", "}",
    "color:", "#fff;", "margin:", "0", "auto;", "news", "article", "2026", "cache", "edge",
    "static", "index", "page", "title", "<a", "</a>", "\n", "  ", "width", "height",
];

/// Stream numbers of [`Rng::derive`].
const S_SIZE: u64 = 1;
const S_DATA: u64 = 2;
const S_DIR: u64 = 3;
const S_MUT: u64 = 4;
const S_BIG: u64 = 5;
const S_BURST: u64 = 6;

/// Chunk of a big file that is generated as one unit (so a region can be rewritten).
const BIG_CHUNK: u64 = 1 << 20;

/// W1: the initial tree. See the module docs.
#[derive(Debug, Clone)]
pub struct Tree {
    pub seed: u64,
    pub files: usize,
    pub dirs: usize,
    pub big: usize,
    pub big_size: u64,
    pub symlinks: usize,
}

/// What [`Tree::mutate`] did, so that [`Tree::restore`] can undo it.
#[derive(Debug, Clone, Default)]
pub struct Mutation {
    /// Files rewritten in place (indices).
    pub rewritten: Vec<usize>,
    /// Files renamed (index, new relative path).
    pub renamed: Vec<(usize, PathBuf)>,
    /// Files deleted (indices).
    pub deleted: Vec<usize>,
    /// Bytes of content written (the payload that changed).
    pub bytes: u64,
    /// The byte ranges rewritten in place: (relative path, offset, length).
    pub regions: Vec<(PathBuf, u64, u64)>,
}

impl Tree {
    /// The relative directory of directory `d` (0 is the first below the root).
    fn dir_path(&self, d: usize) -> PathBuf {
        let mut parts = Vec::new();
        let mut cur = d;
        // Each directory's parent is an earlier one or the root: at most 3 deep.
        for _ in 0..3 {
            parts.push(format!("d{cur:03}"));
            let mut r = Rng::derive(self.seed, S_DIR, cur as u64);
            if cur == 0 || r.below(3) == 0 {
                break;
            }
            cur = usize::try_from(r.below(cur as u64)).unwrap_or(0);
        }
        parts.reverse();
        parts.iter().collect()
    }

    fn file_dir(&self, i: usize) -> usize {
        usize::try_from(Rng::derive(self.seed, S_DIR, 1_000_000 + i as u64).below(self.dirs as u64))
            .unwrap_or(0)
    }

    /// Relative path of file `i`.
    pub fn file_path(&self, i: usize) -> PathBuf {
        let ext = ["html", "css", "js", "json", "jpg", "png", "woff2", "txt"][i % 8];
        self.dir_path(self.file_dir(i))
            .join(format!("f{i:05}.{ext}"))
    }

    fn file_size(&self, i: usize) -> u64 {
        let mut r = Rng::derive(self.seed, S_SIZE, i as u64);
        let mu = (16.0f64 * 1024.0).ln();
        let s = (mu + 1.2 * r.normal()).exp();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped"
        )]
        let s = s.clamp(1024.0, 1_048_576.0) as u64;
        s
    }

    fn file_mode(i: usize) -> u32 {
        match i % 10 {
            0 => 0o755,
            1 => 0o600,
            _ => 0o644,
        }
    }

    /// Content of file `i`: text for even `i / 8`, random bytes otherwise.
    pub fn file_content(&self, i: usize) -> Vec<u8> {
        let size = usize::try_from(self.file_size(i)).unwrap_or(1024);
        let mut r = Rng::derive(self.seed, S_DATA, i as u64);
        let mut v = Vec::with_capacity(size + 16);
        if (i / 8).is_multiple_of(2) {
            while v.len() < size {
                let w = WORDS[usize::try_from(r.below(WORDS.len() as u64)).unwrap_or(0)];
                v.extend_from_slice(w.as_bytes());
                v.push(b' ');
            }
            v.truncate(size);
        } else {
            v.resize(size, 0);
            r.fill(&mut v);
        }
        v
    }

    /// Relative path of big file `b`.
    pub fn big_path(b: usize) -> PathBuf {
        PathBuf::from(format!("big/image-{b}.img"))
    }

    fn big_chunk(&self, b: usize, chunk: u64, out: &mut [u8]) {
        Rng::derive(self.seed, S_BIG, ((b as u64) << 32) | chunk).fill(out);
    }

    /// Writes file `i` at its own path with its own mode (replacing what is there).
    fn write_file(&self, root: &Path, i: usize) -> Result<u64> {
        let p = root.join(self.file_path(i));
        let data = self.file_content(i);
        fs::write(&p, &data).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(Self::file_mode(i)))?;
        Ok(data.len() as u64)
    }

    /// Makes the tree under `root` (which must be empty or absent); returns the bytes
    /// of file content written.
    pub fn generate(&self, root: &Path) -> Result<u64> {
        fs::create_dir_all(root.join("big"))
            .with_context(|| format!("creating {}", root.display()))?;
        for d in 0..self.dirs {
            fs::create_dir_all(root.join(self.dir_path(d)))?;
        }
        let mut total = 0;
        for i in 0..self.files {
            total += self.write_file(root, i)?;
        }
        let mut buf = vec![0u8; usize::try_from(BIG_CHUNK)?];
        for b in 0..self.big {
            let p = root.join(Self::big_path(b));
            let mut f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
            let mut left = self.big_size;
            let mut chunk = 0;
            while left > 0 {
                let n = left.min(BIG_CHUNK);
                let part = &mut buf[..usize::try_from(n)?];
                self.big_chunk(b, chunk, part);
                f.write_all(part)?;
                left -= n;
                chunk += 1;
            }
            total += self.big_size;
        }
        for s in 0..self.symlinks.min(self.files) {
            let target_file = (s * 37) % self.files;
            let dir = self.dir_path(s % self.dirs);
            let depth = dir.components().count();
            let target = Path::new(&"../".repeat(depth)).join(self.file_path(target_file));
            symlink(&target, root.join(dir).join(format!("link{s:03}")))?;
        }
        Ok(total)
    }

    /// Files chosen for the mutation, disjoint per kind.
    fn pick(&self, kind: u64, count: usize, taken: &mut Vec<usize>) -> Vec<usize> {
        let mut r = Rng::derive(self.seed, S_MUT, kind);
        let mut out = Vec::new();
        let linked: Vec<usize> = (0..self.symlinks.min(self.files))
            .map(|s| (s * 37) % self.files)
            .collect();
        let mut guard = 0;
        while out.len() < count.min(self.files / 4) && guard < self.files * 10 {
            guard += 1;
            let i = usize::try_from(r.below(self.files as u64)).unwrap_or(0);
            // Symlink targets stay put, so no link dangles on one side only.
            if !taken.contains(&i) && !linked.contains(&i) {
                taken.push(i);
                out.push(i);
            }
        }
        out
    }

    /// W2 on `root`; see the module docs.
    pub fn mutate(&self, root: &Path) -> Result<Mutation> {
        let mut taken = Vec::new();
        let mut m = Mutation::default();
        let rewrite = (self.files / 100).max(1);
        for i in self.pick(1, rewrite, &mut taken) {
            let p = root.join(self.file_path(i));
            let size = self.file_size(i);
            let n = size.min(4096);
            let mut r = Rng::derive(self.seed, S_MUT, 100 + i as u64);
            let off = r.below(size - n + 1);
            let mut buf = vec![0u8; usize::try_from(n)?];
            r.fill(&mut buf);
            let mut f = File::options()
                .write(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))?;
            f.seek(SeekFrom::Start(off))?;
            f.write_all(&buf)?;
            m.regions.push((self.file_path(i), off, n));
            m.rewritten.push(i);
            m.bytes += n;
        }
        for i in self.pick(2, 50, &mut taken) {
            let to_dir = self.dir_path((self.file_dir(i) + 1) % self.dirs);
            let name = self.file_path(i);
            let to = to_dir.join(format!(
                "moved-{}",
                name.file_name().and_then(|n| n.to_str()).unwrap_or("x")
            ));
            fs::rename(root.join(&name), root.join(&to))
                .with_context(|| format!("renaming {}", name.display()))?;
            m.renamed.push((i, to));
        }
        for i in self.pick(3, 50, &mut taken) {
            let p = root.join(self.file_path(i));
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            m.deleted.push(i);
        }
        if self.big > 0 {
            let p = root.join(Self::big_path(0));
            let mut f = File::options().write(true).open(&p)?;
            let off = (self.big_size / 2 / BIG_CHUNK) * BIG_CHUNK;
            let n = BIG_CHUNK.min(self.big_size - off);
            let mut buf = vec![0u8; usize::try_from(n)?];
            Rng::derive(self.seed, S_MUT, 7).fill(&mut buf);
            f.seek(SeekFrom::Start(off))?;
            f.write_all(&buf)?;
            m.regions.push((Self::big_path(0), off, n));
            m.bytes += n;
        }
        Ok(m)
    }

    /// Undoes `m` on `root`: the tree's content is W1's again (mtimes are new).
    pub fn restore(&self, root: &Path, m: &Mutation) -> Result<()> {
        for (_, to) in &m.renamed {
            fs::remove_file(root.join(to)).with_context(|| format!("removing {}", to.display()))?;
        }
        for &i in m
            .rewritten
            .iter()
            .chain(&m.deleted)
            .chain(m.renamed.iter().map(|(i, _)| i))
        {
            self.write_file(root, i)?;
        }
        if self.big > 0 {
            let p = root.join(Self::big_path(0));
            let mut f = File::options().write(true).open(&p)?;
            let chunk = self.big_size / 2 / BIG_CHUNK;
            let n = BIG_CHUNK.min(self.big_size - chunk * BIG_CHUNK);
            let mut buf = vec![0u8; usize::try_from(n)?];
            self.big_chunk(0, chunk, &mut buf);
            f.seek(SeekFrom::Start(chunk * BIG_CHUNK))?;
            f.write_all(&buf)?;
        }
        Ok(())
    }
}

/// Writes `files` small files (1–4 KiB) into the new directory `dir`, spread over
/// 100 subdirectories; returns the bytes written.
pub fn write_burst(dir: &Path, files: usize, seed: u64) -> Result<u64> {
    fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let subdirs = 100.min(files.max(1));
    for d in 0..subdirs {
        fs::create_dir(dir.join(format!("s{d:02}")))?;
    }
    let mut total = 0;
    let mut buf = vec![0u8; 4096];
    for i in 0..files {
        let mut r = Rng::derive(seed, S_BURST, i as u64);
        let n = usize::try_from(1024 + r.below(3073))?;
        r.fill(&mut buf[..n]);
        let p = dir.join(format!("s{:02}/b{i:05}.txt", i % subdirs));
        fs::write(&p, &buf[..n]).with_context(|| format!("writing {}", p.display()))?;
        total += n as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cd_testkit::compare::{Checks, compare_with};

    fn small() -> Tree {
        Tree {
            seed: 7,
            files: 400,
            dirs: 20,
            big: 1,
            big_size: 3 << 20,
            symlinks: 5,
        }
    }

    const CONTENT: Checks = Checks {
        owners: true,
        mtimes: false,
        hardlinks: true,
        ignore: &[],
    };

    #[test]
    fn generation_is_reproducible_and_restore_undoes_mutation() {
        let t = small();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let bytes = t.generate(a.path()).unwrap();
        assert_eq!(t.generate(b.path()).unwrap(), bytes);
        assert!(
            compare_with(a.path(), b.path(), CONTENT)
                .unwrap()
                .is_empty()
        );

        let m = t.mutate(a.path()).unwrap();
        assert_eq!(m.rewritten.len(), 4);
        assert_eq!(m.renamed.len(), 50);
        assert_eq!(m.deleted.len(), 50);
        assert!(m.bytes > 1 << 20);
        let d = compare_with(a.path(), b.path(), CONTENT).unwrap();
        assert!(d.len() >= 1 + 4 + 100, "{d:?}");

        t.restore(a.path(), &m).unwrap();
        let d = compare_with(a.path(), b.path(), CONTENT).unwrap();
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn sizes_are_log_normal_within_bounds() {
        let t = Tree {
            files: 5000,
            ..small()
        };
        let mut sizes: Vec<u64> = (0..t.files).map(|i| t.file_size(i)).collect();
        sizes.sort_unstable();
        assert!(sizes[0] >= 1024 && sizes[sizes.len() - 1] <= 1 << 20);
        let median = sizes[sizes.len() / 2];
        assert!((12 << 10..=20 << 10).contains(&median), "median {median}");
    }
}
