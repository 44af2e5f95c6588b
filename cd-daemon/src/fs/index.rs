//! [`HashIndex`]: the persistent path → (inode, size, mtime, ctime, hash) cache that
//! lets [`scan`](super::scan::scan) skip re-hashing files that have not changed.
//!
//! A cached hash is reused only when device, inode, size, mtime and ctime all match
//! what `lstat` reports now. ctime cannot be set from user space, so a file rewritten
//! with the same size and its mtime put back is still caught.
//!
//! Timestamps have a granularity: a file changed twice within one tick keeps its
//! ctime. To avoid trusting such a "racy" entry, the scanner does not record a hash for
//! a file whose ctime is less than [`HashIndex::racy_window`] before the scan started
//! (default one second, which covers coarse-grained and 1-second timestamps); such files
//! are hashed again by the next scan.
//!
//! On disk (little-endian): magic `CDSYNCIX`, version `u32` (1), entry count `u64`,
//! then per entry `path_len u16, path, dev u64, ino u64, size u64, mtime_sec i64,
//! mtime_nsec u32, ctime_sec i64, ctime_nsec u32, hash [32]`, then a BLAKE3 hash of all
//! preceding bytes. A missing, truncated, corrupt or other-version file loads as an
//! empty index (the cost is one full re-hash, never wrong data). Saving writes
//! `<path>.tmp`, fsyncs it, renames it over `<path>` and fsyncs the directory; there
//! should be one writer per index file at a time (two concurrent writers can only
//! produce a file that fails its checksum and loads empty).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cd_core::manifest::Hash;
use cd_core::path::RelPath;

use super::FsError;
use super::sys::StatInfo;

const MAGIC: &[u8; 8] = b"CDSYNCIX";
const VERSION: u32 = 1;
/// Fixed-size part of an entry after its path.
const FIXED: usize = 8 + 8 + 8 + 8 + 4 + 8 + 4 + 32;

/// What the index remembers about one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub hash: Hash,
}

impl IndexEntry {
    pub(crate) fn new(st: &StatInfo, hash: Hash) -> IndexEntry {
        IndexEntry {
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime_sec: st.mtime_sec,
            mtime_nsec: st.mtime_nsec,
            ctime_sec: st.ctime_sec,
            ctime_nsec: st.ctime_nsec,
            hash,
        }
    }

    /// True if `st` describes the same, unchanged file.
    pub(crate) fn matches(&self, st: &StatInfo) -> bool {
        self.dev == st.dev
            && self.ino == st.ino
            && self.size == st.size
            && self.mtime_sec == st.mtime_sec
            && self.mtime_nsec == st.mtime_nsec
            && self.ctime_sec == st.ctime_sec
            && self.ctime_nsec == st.ctime_nsec
    }
}

/// Persistent cache of content hashes, keyed by path. See the module docs.
#[derive(Debug, Clone)]
pub struct HashIndex {
    entries: BTreeMap<RelPath, IndexEntry>,
    racy_window: Duration,
}

impl Default for HashIndex {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            racy_window: Duration::from_secs(1),
        }
    }
}

impl HashIndex {
    /// An empty index.
    pub fn new() -> HashIndex {
        HashIndex::default()
    }

    /// Loads the index at `path`. Never fails: a missing file gives an empty index, a
    /// corrupt one an empty index and a warning.
    pub fn load(path: &Path) -> HashIndex {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no hash index yet");
                return HashIndex::new();
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read hash index; starting empty");
                return HashIndex::new();
            }
        };
        match decode(&bytes) {
            Ok(entries) => HashIndex {
                entries,
                ..HashIndex::default()
            },
            Err(why) => {
                tracing::warn!(path = %path.display(), why, "corrupt hash index; starting empty");
                HashIndex::new()
            }
        }
    }

    /// Writes the index to `path` atomically (temporary file, fsync, rename, fsync of
    /// the directory).
    pub fn save(&self, path: &Path) -> Result<(), FsError> {
        // A job and the real-time loop of one content set may both save its index;
        // saves take turns, so they never share the temporary file.
        static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = SAVING.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self.encode();
        let shown = path.display();
        // A fixed temporary name: a save interrupted by a crash leaves at most one
        // stale temporary file, which the next save overwrites.
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::std_io("write index", tmp.display(), e));
        }
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::std_io("rename index", &shown, e));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| FsError::std_io("fsync index directory", dir.display(), e))
    }

    /// Number of paths with a remembered hash.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How recent a change must be for its hash not to be remembered. See the module docs.
    pub fn racy_window(&self) -> Duration {
        self.racy_window
    }

    /// Sets the racy window. Zero trusts timestamps fully, which is right where the
    /// kernel guarantees a fresh ctime after every observed change (multigrain
    /// timestamps, Linux 6.13+ on ext4, xfs, btrfs, tmpfs).
    pub fn set_racy_window(&mut self, window: Duration) {
        self.racy_window = window;
    }

    pub(crate) fn get(&self, path: &RelPath) -> Option<&IndexEntry> {
        self.entries.get(path)
    }

    /// Replaces the entries (the scanner builds a fresh map so vanished paths drop out).
    pub(crate) fn replace(&mut self, entries: BTreeMap<RelPath, IndexEntry>) {
        self.entries = entries;
    }

    /// Replaces the entries at `under` and beneath it with `entries` (what a subtree
    /// scan found there), keeping every other path's.
    pub(crate) fn replace_under(
        &mut self,
        under: &RelPath,
        entries: BTreeMap<RelPath, IndexEntry>,
    ) {
        // In byte order, `under/…` lies between `under` and `under0` ('0' follows '/');
        // names like `under.txt` in between are skipped by the prefix test.
        let mut end = under.as_bytes().to_vec();
        end.push(b'0');
        let stale: Vec<RelPath> = self
            .entries
            .range(under.clone()..)
            .map(|(p, _)| p)
            .take_while(|p| p.as_bytes() < end.as_slice())
            .filter(|p| p.starts_with(under))
            .cloned()
            .collect();
        for p in stale {
            self.entries.remove(&p);
        }
        self.entries.extend(entries);
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            20 + self
                .entries
                .keys()
                .map(|p| 2 + p.as_bytes().len() + FIXED)
                .sum::<usize>()
                + 32,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (p, e) in &self.entries {
            let b = p.as_bytes();
            // A RelPath is at most MAX_PATH_LEN (4096) bytes.
            out.extend_from_slice(&u16::try_from(b.len()).unwrap_or(u16::MAX).to_le_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(&e.dev.to_le_bytes());
            out.extend_from_slice(&e.ino.to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&e.mtime_sec.to_le_bytes());
            out.extend_from_slice(&e.mtime_nsec.to_le_bytes());
            out.extend_from_slice(&e.ctime_sec.to_le_bytes());
            out.extend_from_slice(&e.ctime_nsec.to_le_bytes());
            out.extend_from_slice(&e.hash);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }
}

/// A little-endian reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

fn decode(bytes: &[u8]) -> Result<BTreeMap<RelPath, IndexEntry>, &'static str> {
    if bytes.len() < MAGIC.len() + 4 + 8 + 32 {
        return Err("truncated");
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch");
    }
    let mut r = Reader(body);
    if r.take(MAGIC.len())? != MAGIC {
        return Err("bad magic");
    }
    if u32::from_le_bytes(r.arr()?) != VERSION {
        return Err("unsupported version");
    }
    let count = u64::from_le_bytes(r.arr()?);
    let mut entries = BTreeMap::new();
    for _ in 0..count {
        let len = usize::from(u16::from_le_bytes(r.arr()?));
        let path = RelPath::new(r.take(len)?.to_vec()).map_err(|_| "invalid path")?;
        let e = IndexEntry {
            dev: u64::from_le_bytes(r.arr()?),
            ino: u64::from_le_bytes(r.arr()?),
            size: u64::from_le_bytes(r.arr()?),
            mtime_sec: i64::from_le_bytes(r.arr()?),
            mtime_nsec: u32::from_le_bytes(r.arr()?),
            ctime_sec: i64::from_le_bytes(r.arr()?),
            ctime_nsec: u32::from_le_bytes(r.arr()?),
            hash: r.arr()?,
        };
        if entries.insert(path, e).is_some() {
            return Err("duplicate path");
        }
    }
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HashIndex {
        let mut m = BTreeMap::new();
        for (i, p) in ["a", "dir/b", "dir/ünï", "x y/z"].iter().enumerate() {
            let i = i as u64;
            m.insert(
                RelPath::new(*p).unwrap(),
                IndexEntry {
                    dev: 1,
                    ino: 100 + i,
                    size: 10 * i,
                    mtime_sec: 1_700_000_000 + i as i64,
                    mtime_nsec: 123_456_789,
                    ctime_sec: -5,
                    ctime_nsec: 999_999_999,
                    hash: [i as u8; 32],
                },
            );
        }
        m.insert(
            RelPath::new(vec![0xff, b'/', 0xfe]).unwrap(),
            IndexEntry {
                dev: u64::MAX,
                ino: 0,
                size: u64::MAX,
                mtime_sec: i64::MIN,
                mtime_nsec: 0,
                ctime_sec: i64::MAX,
                ctime_nsec: 1,
                hash: [0xab; 32],
            },
        );
        let mut idx = HashIndex::new();
        idx.replace(m);
        idx
    }

    #[test]
    fn save_load_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("index");
        let idx = sample();
        idx.save(&p).unwrap();
        let back = HashIndex::load(&p);
        assert_eq!(back.len(), 5);
        assert_eq!(back.entries, idx.entries);
        // Saving again replaces atomically and leaves no temporary files behind.
        back.save(&p).unwrap();
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["index"]);
    }

    #[test]
    fn missing_or_corrupt_loads_empty() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("index");
        assert!(HashIndex::load(&p).is_empty(), "missing file");
        sample().save(&p).unwrap();
        let good = std::fs::read(&p).unwrap();
        // Every single-byte corruption and every truncation is detected.
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            assert!(HashIndex::load(&p).is_empty(), "flipped byte {i}");
        }
        for n in [0, 5, 20, good.len() - 1] {
            std::fs::write(&p, &good[..n]).unwrap();
            assert!(HashIndex::load(&p).is_empty(), "truncated to {n}");
        }
        std::fs::write(&p, &good).unwrap();
        assert_eq!(HashIndex::load(&p).len(), 5);
        // A directory where the file should be: still not an error.
        let d = t.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        assert!(HashIndex::load(&d).is_empty());
    }

    #[test]
    fn save_reports_the_failing_path() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("no-such-dir").join("index");
        let e = sample().save(&p).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("write index "), "{msg}");
        assert!(msg.contains("no-such-dir"), "{msg}");
    }
}
