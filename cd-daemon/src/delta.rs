//! Delta transfers on the daemon side, around the sans-IO engine in
//! [`cd_core::delta`]: the source's signature cache and patch memo (the broadcast
//! delta), and the file work on both ends.
//!
//! # Broadcast delta
//!
//! A replica names in its `Need` the version it holds at the path (its base: BLAKE3
//! and size). The source looks the base up in its [`DeltaCache`]:
//!
//! - **Signature cached** (the source distributed that version itself, or another
//!   replica already sent its signature): no round trip. The patch from that base to
//!   the new version is generated **once** ([`DeltaCache::patch`] memoises it by
//!   base and target, and concurrent transfers wait for the one generation) and the
//!   same bytes go to every replica that holds the base.
//! - **Not cached**: the replica sends the signature of its base (one exchange per
//!   transfer, for all such files together), which is then cached for the others.
//!
//! While it generates a patch, the source also builds the signature of the new version
//! from the same bytes, so the next change to the file is a broadcast again. Whole-file
//! sends do not build signatures (the first change after one costs an exchange): an
//! initial sync runs at the speed of the disk and the link, not of the signature code.
//!
//! # Safety of the result
//!
//! The replica applies a patch only to the base its `Need` named, and the bytes it
//! builds go through the stage, which refuses anything whose BLAKE3 is not the one the
//! source announced. A base that changed after its signature was made, a corrupt or
//! hostile patch, or a source file that changed while the patch was generated can cost
//! the file (it is skipped and the next round sends it), never install a wrong one.
//! Patch and signature decoding treat the peer's bytes as hostile and are bounded
//! ([`MAX_PATCH_BYTES`], [`MAX_SIGNATURE_BYTES`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cd_core::delta::{
    self, BaseId, Decision, DeltaStats, DumpPolicy, Generator, Patch, Signature, SignatureBuilder,
    Step,
};
use cd_core::manifest::Hash;
use cd_core::path::RelPath;
use tokio::sync::OnceCell;

use crate::fs::{BaseFile, FsError, Root, SendFile, SentFile, Stage};

/// Largest patch the source sends and the replica accepts; a bigger delta goes whole.
pub const MAX_PATCH_BYTES: u64 = 64 << 20;
/// Largest encoded signature accepted from a replica (a 64 GiB base at 128 KiB
/// blocks needs 10 MiB).
pub const MAX_SIGNATURE_BYTES: usize = 32 << 20;
/// Bytes of a `SignaturePart`.
pub const SIGNATURE_PART_BYTES: usize = 1 << 20;
/// Encoded signatures the source keeps (least recently used go first). 64 MiB covers
/// the last versions of about 50 GiB of large files.
pub const SIGNATURE_CACHE_BYTES: usize = 64 << 20;
/// Patches the source keeps for replicas that come later in the same round.
pub const PATCH_MEMO_BYTES: usize = 256 << 20;
/// Entries the signature cache and the patch memo keep at most, whatever their size.
const MAX_ENTRIES: usize = 4096;
/// Read size while applying.
const IO_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("patch: {0}")]
    Decode(#[from] delta::DecodeError),
    #[error(
        "patch is for a base of {got_len} bytes / {got_hash}, the replica offered {want_len} bytes / {want_hash}"
    )]
    WrongBase {
        got_len: u64,
        got_hash: String,
        want_len: u64,
        want_hash: String,
    },
    #[error("patch produces {patch} but the file ends with {announced}")]
    WrongTarget { patch: String, announced: String },
}

/// A patch ready to send to every replica that holds its base.
#[derive(Debug)]
pub struct Generated {
    /// The encoded patch ([`Patch::encode`] format).
    pub patch: Vec<u8>,
    /// The new version as read while generating (hash, size, attributes).
    pub sent: SentFile,
    pub stats: DeltaStats,
}

/// What one generation found.
#[derive(Debug)]
pub enum Outcome {
    /// A patch that pays.
    Patch(Arc<Generated>),
    /// The file goes whole (the patch would be too large).
    Whole,
    /// The file's content is no longer `want`: it changed after the scan.
    Changed,
}

type PatchKey = (Hash, u32, Hash);

/// The version of a file a replica holds: what a delta is made against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub hash: Hash,
    pub size: u64,
}

/// The source's memory of what it distributed: see the module docs.
#[derive(Debug, Default)]
pub struct DeltaCache {
    sigs: Mutex<Lru<Hash, Arc<Signature>>>,
    patches: Mutex<Lru<PatchKey, Arc<OnceCell<Outcome>>>>,
    /// Patches generated, and patches sent again from the memo (the broadcast).
    generated: AtomicU64,
    reused: AtomicU64,
}

impl DeltaCache {
    pub fn new() -> Self {
        Self {
            sigs: Mutex::new(Lru::new(SIGNATURE_CACHE_BYTES)),
            patches: Mutex::new(Lru::new(PATCH_MEMO_BYTES)),
            ..Self::default()
        }
    }

    /// For `cdctl status`.
    pub fn status(&self) -> serde_json::Value {
        let sigs = self.sigs.lock().unwrap();
        serde_json::json!({
            "signatures_cached": sigs.map.len(),
            "signature_cache_bytes": sigs.cost,
            "patches_generated": self.generated.load(Ordering::Relaxed),
            "patches_reused": self.reused.load(Ordering::Relaxed),
        })
    }

    /// The signature of the version with content hash `hash`, if cached.
    pub fn signature(&self, hash: &Hash, len: u64) -> Option<Arc<Signature>> {
        let mut sigs = self.sigs.lock().unwrap();
        sigs.get(hash).filter(|s| s.base().len == len)
    }

    /// Remembers `sig` under the hash of its base.
    pub fn remember(&self, sig: Arc<Signature>) {
        let cost = sig.encoded_len();
        let key = sig.base().hash;
        self.sigs.lock().unwrap().insert(key, sig, cost);
    }

    /// The patch from `sig`'s base to the file at `path`, which should have content
    /// `want`: generated once per (base, target) however many replicas ask, by the
    /// first to ask, while the others wait. Runs the file work in `block_in_place`.
    pub async fn patch(
        &self,
        root: &Root,
        path: &RelPath,
        sig: &Signature,
        want: &Hash,
        policy: &DumpPolicy,
    ) -> Result<Outcome, FsError> {
        self.patch_from(|| SendFile::open(root, path), sig, want, policy)
            .await
    }

    /// [`patch`](Self::patch), reading the new version from whatever `open` opens
    /// (a relay's staged content): the memo is by content, so a patch made from the
    /// stage serves the root's readers too, and the other way round.
    pub async fn patch_from(
        &self,
        open: impl FnOnce() -> Result<SendFile, FsError>,
        sig: &Signature,
        want: &Hash,
        policy: &DumpPolicy,
    ) -> Result<Outcome, FsError> {
        let key = (sig.base().hash, sig.block_len(), *want);
        let cell = {
            let mut memo = self.patches.lock().unwrap();
            match memo.get(&key) {
                Some(c) => c,
                None => {
                    let c = Arc::new(OnceCell::new());
                    // Accounted once filled (below); an empty cell costs nothing.
                    memo.insert(key, c.clone(), 0);
                    c
                }
            }
        };
        let mut made = false;
        let out = cell
            .get_or_try_init(|| async {
                made = true;
                let (outcome, target_sig) =
                    tokio::task::block_in_place(|| generate(open()?, sig, want, policy))?;
                if let Some(s) = target_sig {
                    self.remember(Arc::new(s));
                }
                Ok::<_, FsError>(outcome)
            })
            .await;
        match out {
            Ok(o) => {
                let r = match o {
                    Outcome::Patch(g) => {
                        let counter = if made { &self.generated } else { &self.reused };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let cost = g.patch.len();
                        self.patches.lock().unwrap().set_cost(&key, cost);
                        Outcome::Patch(g.clone())
                    }
                    Outcome::Whole => Outcome::Whole,
                    // Not kept: the next round has another `want`, and a retry within
                    // this one must read again.
                    Outcome::Changed => {
                        self.patches.lock().unwrap().remove(&key);
                        Outcome::Changed
                    }
                };
                Ok(r)
            }
            Err(e) => {
                self.patches.lock().unwrap().remove(&key);
                Err(e)
            }
        }
    }
}

/// Reads the file `f` once: generates the patch from `sig`'s base and, from the
/// same bytes, the signature of this version (for the next change).
fn generate(
    mut f: SendFile,
    sig: &Signature,
    want: &Hash,
    policy: &DumpPolicy,
) -> Result<(Outcome, Option<Signature>), FsError> {
    let size = f.size();
    if delta::decide(policy, Some(sig.base().len), size, None) != Decision::Delta {
        return Ok((Outcome::Whole, None));
    }
    let limit = (u128::from(size) * u128::from(policy.max_patch_permille) / 1000)
        .min(u128::from(MAX_PATCH_BYTES)) as usize;
    let mut next_sig = SignatureBuilder::new(size).ok();
    let mut g = Generator::new(sig);
    let mut patch = Vec::new();
    delta::write_header(sig.base(), &mut patch);
    loop {
        let chunk = f.next_chunk()?;
        if chunk.is_empty() {
            break;
        }
        g.handle_data(chunk);
        if let Some(b) = next_sig.as_mut() {
            b.handle_data(chunk);
        }
        while let Some(op) = g.poll_op() {
            op.write_to(&mut patch);
        }
        if patch.len() > limit {
            return Ok((Outcome::Whole, None));
        }
    }
    let sent = match f.finish() {
        Ok(s) => s,
        Err(FsError::Changed { .. } | FsError::SizeMismatch { .. }) => {
            return Ok((Outcome::Changed, None));
        }
        Err(e) => return Err(e),
    };
    let fin = g.finish();
    for op in &fin.ops {
        op.write_to(&mut patch);
    }
    delta::write_end(fin.target_len, &fin.target_hash, &mut patch);
    if sent.hash != *want || fin.target_hash != *want {
        return Ok((Outcome::Changed, None));
    }
    let mut stats = fin.stats;
    stats.patch_bytes = patch.len() as u64;
    if patch.len() > limit
        || delta::decide(policy, Some(sig.base().len), size, Some(&stats)) != Decision::Delta
    {
        return Ok((Outcome::Whole, None));
    }
    let next_sig = next_sig.and_then(|b| b.finish().ok());
    Ok((
        Outcome::Patch(Arc::new(Generated { patch, sent, stats })),
        next_sig,
    ))
}

/// The replica side of an exchange: the signature of the file at `path`, if it is
/// still the version `base_hash` / `base_size` the replica named in its `Need`.
pub fn base_signature(
    root: &Root,
    path: &RelPath,
    base: Base,
) -> Result<Option<Signature>, FsError> {
    let Base {
        hash: base_hash,
        size: base_size,
    } = base;
    let mut f = match SendFile::open(root, path) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    if f.size() != base_size {
        return Ok(None);
    }
    let Ok(mut b) = SignatureBuilder::new(base_size) else {
        return Ok(None);
    };
    loop {
        let chunk = f.next_chunk()?;
        if chunk.is_empty() {
            break;
        }
        b.handle_data(chunk);
    }
    match f.finish() {
        Ok(sent) if sent.hash == base_hash => Ok(b.finish().ok()),
        Ok(_) | Err(FsError::Changed { .. } | FsError::SizeMismatch { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Applies an encoded patch (from the network: hostile) to the replica's file at
/// `path`, which must be `base`, writing the result into
/// `stage` as file `file_id` (already begun). The caller finishes the staged file,
/// which checks size and hash; `target_hash` (from `FileEnd`) must be the patch's.
pub fn apply_patch(
    root: &Root,
    path: &RelPath,
    encoded: &[u8],
    base: Base,
    target_hash: &Hash,
    stage: &mut Stage,
    file_id: u32,
) -> Result<(), DeltaError> {
    let patch = Patch::decode(encoded)?;
    check_base(patch.base(), &base)?;
    if patch.target_hash() != target_hash {
        return Err(DeltaError::WrongTarget {
            patch: crate::fs::hex(patch.target_hash()),
            announced: crate::fs::hex(target_hash),
        });
    }
    let file = BaseFile::open(root, path)?;
    if file.size() != base.size {
        return Err(FsError::Changed {
            path: path.display(),
            what: "its size changed since the replica named it as the delta base",
        }
        .into());
    }
    let mut buf = vec![0u8; IO_CHUNK];
    for step in patch.steps() {
        match step {
            Step::Copy { mut offset, len } => {
                let end = offset + len;
                while offset < end {
                    let n = (end - offset).min(IO_CHUNK as u64) as usize;
                    file.read_exact_at(&mut buf[..n], offset)?;
                    stage.write(file_id, &buf[..n])?;
                    offset += n as u64;
                }
            }
            Step::Literal(b) => stage.write(file_id, b)?,
        }
    }
    Ok(())
}

fn check_base(id: &BaseId, base: &Base) -> Result<(), DeltaError> {
    if id.hash != base.hash || id.len != base.size {
        return Err(DeltaError::WrongBase {
            got_len: id.len,
            got_hash: crate::fs::hex(&id.hash),
            want_len: base.size,
            want_hash: crate::fs::hex(&base.hash),
        });
    }
    Ok(())
}

/// A small least-recently-used map bounded by a cost (bytes). Lookups and inserts
/// are O(n) in the entries for eviction, which stay in the thousands at most.
#[derive(Debug)]
struct Lru<K, V> {
    map: HashMap<K, (V, usize, u64)>,
    cost: usize,
    max_cost: usize,
    /// Entries kept at most, whatever their cost (some cost nothing).
    max_len: usize,
    tick: u64,
}

impl<K, V> Default for Lru<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            cost: 0,
            max_cost: 0,
            max_len: MAX_ENTRIES,
            tick: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Lru<K, V> {
    fn new(max_cost: usize) -> Self {
        Self {
            max_cost,
            ..Self::default()
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(k).map(|e| {
            e.2 = tick;
            e.0.clone()
        })
    }

    fn insert(&mut self, k: K, v: V, cost: usize) {
        self.remove(&k);
        self.tick += 1;
        self.map.insert(k.clone(), (v, cost, self.tick));
        self.cost += cost;
        self.evict(&k);
    }

    fn set_cost(&mut self, k: &K, cost: usize) {
        if let Some(e) = self.map.get_mut(k) {
            self.cost = self.cost - e.1 + cost;
            e.1 = cost;
        }
        self.evict(k);
    }

    fn remove(&mut self, k: &K) {
        if let Some((_, c, _)) = self.map.remove(k) {
            self.cost -= c;
        }
    }

    /// Drops the least recently used entries (never `keep`) until under the bounds.
    fn evict(&mut self, keep: &K) {
        while self.cost > self.max_cost || self.map.len() > self.max_len {
            let Some(oldest) = self
                .map
                .iter()
                .filter(|(k, _)| *k != keep)
                .min_by_key(|(_, e)| e.2)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            self.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// Deterministic bytes that do not repeat at any block length.
    fn bytes(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn hash(b: &[u8]) -> Hash {
        *blake3::hash(b).as_bytes()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: Root,
    }

    fn fixture(files: &[(&str, &[u8])]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let root = Root::open(dir.path()).unwrap();
        Fixture { _dir: dir, root }
    }

    /// Source and replica in one: the source holds `new` at `f`, the replica's
    /// base is `old` at `b`. Returns the encoded patch made from the replica's
    /// signature.
    fn patch_for(old: &[u8], new: &[u8]) -> (Fixture, Vec<u8>) {
        let fx = fixture(&[("f", new), ("b", old)]);
        let base = Base {
            hash: hash(old),
            size: old.len() as u64,
        };
        let sig = base_signature(&fx.root, &p("b"), base).unwrap().unwrap();
        let (outcome, next) = generate(
            SendFile::open(&fx.root, &p("f")).unwrap(),
            &sig,
            &hash(new),
            &DumpPolicy::default(),
        )
        .unwrap();
        let Outcome::Patch(g) = outcome else {
            panic!("expected a patch, got {outcome:?}")
        };
        assert_eq!(next.unwrap().base().hash, hash(new));
        assert_eq!(g.sent.hash, hash(new));
        (fx, g.patch.clone())
    }

    fn apply_into_stage(
        fx: &Fixture,
        encoded: &[u8],
        old: &[u8],
        new: &[u8],
    ) -> Result<(), String> {
        let mut stage = Stage::new(&fx.root).unwrap();
        stage.begin(7, hash(new)).unwrap();
        let base = Base {
            hash: hash(old),
            size: old.len() as u64,
        };
        let r = apply_patch(&fx.root, &p("b"), encoded, base, &hash(new), &mut stage, 7)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                stage
                    .finish(7, hash(new), new.len() as u64)
                    .map_err(|e| e.to_string())
            });
        if r.is_ok() {
            assert!(stage.has(&hash(new)));
        } else {
            stage.abort_file(7);
        }
        r
    }

    #[test]
    fn patch_round_trips_through_files() {
        let old = bytes(1, 3 << 20);
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 5000].copy_from_slice(&bytes(2, 5000));
        new.extend_from_slice(b"appended");
        let (fx, encoded) = patch_for(&old, &new);
        assert!(encoded.len() < 64 << 10, "patch of {} bytes", encoded.len());
        apply_into_stage(&fx, &encoded, &old, &new).unwrap();
    }

    #[test]
    fn unrelated_content_goes_whole_and_a_changed_file_is_reported() {
        let old = bytes(3, 1 << 20);
        let new = bytes(4, 1 << 20);
        let fx = fixture(&[("f", &new), ("b", &old)]);
        let sig = Signature::compute(&old).unwrap();
        let policy = DumpPolicy::default();
        let (o, _) = generate(
            SendFile::open(&fx.root, &p("f")).unwrap(),
            &sig,
            &hash(&new),
            &policy,
        )
        .unwrap();
        assert!(matches!(o, Outcome::Whole), "{o:?}");
        // The manifest promised other content: the file changed after the scan.
        let mut similar = old.clone();
        similar[10] ^= 1;
        let fx = fixture(&[("f", &similar)]);
        let (o, _) = generate(
            SendFile::open(&fx.root, &p("f")).unwrap(),
            &sig,
            &hash(&new),
            &policy,
        )
        .unwrap();
        assert!(matches!(o, Outcome::Changed), "{o:?}");
    }

    #[test]
    fn a_patch_is_never_applied_to_another_base() {
        let old = bytes(5, 1 << 20);
        let mut new = old.clone();
        new[500] ^= 0xff;
        let (fx, encoded) = patch_for(&old, &new);
        // The replica's base changed after it was named (same size, other bytes):
        // the result does not hash to the target and is refused.
        let mut drifted = old.clone();
        drifted[700_000] ^= 1;
        std::fs::write(fx.root.path().join("b"), &drifted).unwrap();
        let e = apply_into_stage(&fx, &encoded, &old, &new).unwrap_err();
        assert!(e.contains("hash mismatch"), "{e}");
        // A patch for another base than the one offered is refused before any read.
        let other = Base {
            hash: hash(&drifted),
            size: old.len() as u64,
        };
        let mut stage = Stage::new(&fx.root).unwrap();
        stage.begin(1, hash(&new)).unwrap();
        let e = apply_patch(
            &fx.root,
            &p("b"),
            &encoded,
            other,
            &hash(&new),
            &mut stage,
            1,
        )
        .unwrap_err();
        assert!(matches!(e, DeltaError::WrongBase { .. }), "{e}");
        // And one whose result is not what FileEnd announces.
        let base = Base {
            hash: hash(&old),
            size: old.len() as u64,
        };
        let e = apply_patch(
            &fx.root,
            &p("b"),
            &encoded,
            base,
            &hash(&old),
            &mut stage,
            1,
        )
        .unwrap_err();
        assert!(matches!(e, DeltaError::WrongTarget { .. }), "{e}");
        // Garbage is refused by the decoder.
        let e = apply_patch(
            &fx.root,
            &p("b"),
            b"CDPT\x01garbage",
            base,
            &hash(&new),
            &mut stage,
            1,
        )
        .unwrap_err();
        assert!(matches!(e, DeltaError::Decode(_)), "{e}");
    }

    #[test]
    fn base_signature_refuses_a_base_that_is_not_the_named_version() {
        let old = bytes(6, 100_000);
        let fx = fixture(&[("b", &old)]);
        let named = |h: &[u8], size: usize| Base {
            hash: hash(h),
            size: size as u64,
        };
        assert!(
            base_signature(&fx.root, &p("b"), named(&old, old.len()))
                .unwrap()
                .is_some()
        );
        assert!(
            base_signature(&fx.root, &p("b"), named(b"x", old.len()))
                .unwrap()
                .is_none()
        );
        assert!(
            base_signature(&fx.root, &p("b"), named(&old, 5))
                .unwrap()
                .is_none()
        );
        assert!(
            base_signature(&fx.root, &p("gone"), named(&old, old.len()))
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_asks_generate_one_patch() {
        let old = bytes(7, 2 << 20);
        let mut new = old.clone();
        new[4096] ^= 1;
        let fx = fixture(&[("f", &new)]);
        let cache = Arc::new(DeltaCache::new());
        let sig = Arc::new(Signature::compute(&old).unwrap());
        cache.remember(sig.clone());
        let root = Arc::new(fx.root);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (cache, root, sig, want) = (cache.clone(), root.clone(), sig.clone(), hash(&new));
            tasks.spawn(async move {
                match cache
                    .patch(&root, &p("f"), &sig, &want, &DumpPolicy::default())
                    .await
                    .unwrap()
                {
                    Outcome::Patch(g) => g,
                    o => panic!("{o:?}"),
                }
            });
        }
        let all: Vec<Arc<Generated>> = tasks.join_all().await;
        assert!(
            all.iter().all(|g| Arc::ptr_eq(g, &all[0])),
            "one generation, shared"
        );
        // The new version's signature is cached for the next change.
        assert!(cache.signature(&hash(&new), new.len() as u64).is_some());
    }

    #[test]
    fn lru_keeps_within_its_bound() {
        let mut l: Lru<u32, u32> = Lru::new(10);
        l.insert(1, 1, 4);
        l.insert(2, 2, 4);
        assert_eq!(l.get(&1), Some(1)); // 2 is now the least recently used
        l.insert(3, 3, 4);
        assert_eq!(l.get(&2), None);
        assert_eq!((l.get(&1), l.get(&3)), (Some(1), Some(3)));
        l.set_cost(&3, 9);
        assert_eq!(l.get(&1), None, "growing 3 evicts the rest");
        assert_eq!(l.cost, 9);
        // An entry larger than the bound is kept alone rather than dropped at once.
        l.insert(4, 4, 50);
        assert_eq!((l.get(&3), l.get(&4), l.cost), (None, Some(4), 50));
        // Entries that cost nothing are bounded in number.
        let mut l: Lru<u32, u32> = Lru::new(10);
        l.max_len = 3;
        for i in 0..10 {
            l.insert(i, i, 0);
        }
        assert_eq!(l.map.len(), 3);
        assert_eq!((l.get(&9), l.get(&6)), (Some(9), None));
    }
}
