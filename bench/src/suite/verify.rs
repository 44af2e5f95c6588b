//! Is every replica identical to the source? Asked from outside every tool.
//!
//! "Identical" in the side-by-side bench means what every tool under test promises to
//! keep: the same paths, types, file bytes, permission bits (`mode & 0o7777`) and
//! symlink targets ([`checks`]). Owners, mtimes and hard links are not compared,
//! because not every peer carries them (Syncthing keeps neither owners nor hard
//! links; the W1 tree has no hard links and is owned by root anyway). A tool's own
//! bookkeeping at the top of a root (Syncthing's `.stfolder`) is left out; nothing
//! else is.
//!
//! [`wait_identical`] polls a cheap stat-level fingerprint (paths, types, modes, sizes,
//! symlink targets) of every replica until it matches the source's, then confirms with
//! the full byte comparison of `cd_testkit::compare`; the time of the poll that was
//! confirmed is when the replica became identical. A rewrite that keeps the size
//! passes the fingerprint before it has arrived; the byte comparison then fails and
//! the polling goes on. Between polls it rests three times as long as the fingerprints
//! took (50 ms to 1 s), so that watching costs the tools under test about a quarter
//! of a core at most; the resolution is correspondingly coarser for big trees.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cd_testkit::compare::{Checks, RESERVED, compare_with};

/// What the bench compares; see the module docs.
pub fn checks(ignore: &'static [&'static str]) -> Checks {
    Checks {
        owners: false,
        mtimes: false,
        hardlinks: false,
        ignore,
    }
}

/// The attributes of one path the fingerprint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    kind: u32,
    mode: u32,
    size: u64,
    target: Option<PathBuf>,
}

/// Path → attributes of everything under `root` (not following symlinks), without
/// `ignore`d top-level names and the reserved `.cdsync`.
fn fingerprint(root: &Path, ignore: &[&str]) -> Result<BTreeMap<PathBuf, Stat>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            // Removed while we looked: the next poll sees the new state.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for e in rd {
            let Ok(e) = e else { continue };
            let name = e.file_name();
            if rel.as_os_str().is_empty()
                && (name == RESERVED || ignore.iter().any(|i| name == **i))
            {
                continue;
            }
            let p = rel.join(&name);
            let Ok(md) = fs::symlink_metadata(root.join(&p)) else {
                continue;
            };
            let ft = md.file_type();
            let target = if ft.is_symlink() {
                fs::read_link(root.join(&p)).ok()
            } else {
                None
            };
            if ft.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p,
                Stat {
                    kind: md.mode() & 0o170_000,
                    mode: md.mode() & 0o7777,
                    size: if ft.is_file() { md.size() } else { 0 },
                    target,
                },
            );
        }
    }
    Ok(out)
}

/// Outcome of waiting for replicas.
#[derive(Debug, Clone)]
pub struct Converged {
    /// Per replica: when it was found identical (from the start instant), if it was.
    pub at: Vec<Option<Duration>>,
    /// Differences left at the limit (replica root, difference), first 20 per replica.
    pub diffs: Vec<String>,
    /// Source paths missing or different on at least one replica at the limit.
    pub missing: usize,
}

impl Converged {
    /// Every replica identical.
    pub fn identical(&self) -> bool {
        self.at.iter().all(Option::is_some)
    }

    /// When the last replica became identical.
    pub fn last(&self) -> Option<Duration> {
        self.at
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }
}

/// Whether byte range `(path, offset, len)` is the same in both roots.
fn same_region(a: &Path, b: &Path, (p, off, len): &(PathBuf, u64, u64)) -> bool {
    let read = |root: &Path| -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(root.join(p))?;
        f.seek(SeekFrom::Start(*off))?;
        let mut v = Vec::new();
        f.take(*len).read_to_end(&mut v)?;
        Ok(v)
    };
    matches!((read(a), read(b)), (Ok(x), Ok(y)) if x == y)
}

/// Waits until every replica is identical to `source` (which must not change
/// meanwhile), for at most `limit` after `start`. `hot` names byte ranges known to
/// have been rewritten in place (same size): they are compared before the full
/// comparison is tried, which keeps a poll cheap while such a rewrite is in flight.
pub fn wait_identical(
    start: Instant,
    source: &Path,
    replicas: &[PathBuf],
    ignore: &'static [&'static str],
    hot: &[(PathBuf, u64, u64)],
    limit: Duration,
) -> Result<Converged> {
    let want = fingerprint(source, ignore)?;
    let mut at = vec![None; replicas.len()];
    loop {
        // Fingerprints of every pending replica first, back to back, and only then the
        // full comparisons of those that matched: the (slow) comparison of one replica
        // must not delay the moment another is seen at.
        let seen = start.elapsed();
        let t = Instant::now();
        let mut candidates = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if at[i].is_none()
                && fingerprint(r, ignore)? == want
                && hot.iter().all(|h| same_region(source, r, h))
            {
                candidates.push(i);
            }
        }
        let cheap = t.elapsed();
        for i in candidates {
            if compare_with(source, &replicas[i], checks(ignore))?.is_empty() {
                at[i] = Some(seen);
            }
        }
        if at.iter().all(Option::is_some) || start.elapsed() > limit {
            break;
        }
        // The bench shares the CPUs with the tool it watches: rest three times as long
        // as the fingerprints took (50 ms to 1 s), which keeps the watcher under a
        // quarter of one core. (A full comparison runs only when the fingerprints
        // match, and is not counted.)
        thread::sleep((cheap * 3).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    }
    let mut diffs = Vec::new();
    let mut missing = std::collections::BTreeSet::new();
    for (i, r) in replicas.iter().enumerate() {
        if at[i].is_some() {
            continue;
        }
        let have = fingerprint(r, ignore)?;
        for (p, s) in &want {
            if have.get(p) != Some(s) {
                missing.insert(p.clone());
            }
        }
        let d = compare_with(source, r, checks(ignore))?;
        diffs.extend(
            d.into_iter()
                .take(20)
                .map(|d| format!("{}: {d}", r.display())),
        );
    }
    Ok(Converged {
        at,
        diffs,
        missing: missing.len(),
    })
}

/// Compares once (one-shot tools, after their sync).
pub fn check_now(
    source: &Path,
    replicas: &[PathBuf],
    ignore: &'static [&'static str],
) -> Result<Converged> {
    wait_identical(
        Instant::now(),
        source,
        replicas,
        ignore,
        &[],
        Duration::ZERO,
    )
}
