//! The delta search: [`Generator`] turns a target streamed in chunks into [`Op`]s
//! against a [`Signature`].
//!
//! # State between chunks
//!
//! The generator keeps the target bytes from the start of the current window onward
//! that the last chunk could not settle (at most one block), the pending literal bytes
//! (at most [`MAX_LITERAL_OP`]) and the last `Copy` run (it may still grow). Each call
//! copies at most `block_len + 1` bytes of the new chunk to join it with that carry;
//! the rest of the chunk is searched in place. So a caller streaming a file from disk
//! needs one chunk buffer plus O(block) here, whatever the file size; ops are ready to
//! [`Generator::poll_op`] as soon as they are settled and should be drained after
//! every chunk.
//!
//! # Search
//!
//! At a window position (after a match, or at the start, the window's weak sum is
//! computed afresh; otherwise it is rolled by one byte, in a tight loop that only
//! tests a one-bit-per-slot filter of the index and leaves it on a possible hit):
//!
//! 1. if the window directly follows a match, the next base block after that match is
//!    tried first (straight from the signature), so a long run of identical blocks
//!    stays one `Copy` run instead of jumping to the lowest-numbered duplicate;
//! 2. otherwise, or if that fails, the index yields at most [`MAX_CANDIDATES`] blocks
//!    with that weak sum;
//! 3. if there is any candidate and the false-alarm budget allows (see the
//!    [module docs](super)), the window's strong hash is computed once and compared
//!    with each candidate's;
//! 4. on a match a `Copy` is emitted (merged with the previous one when consecutive)
//!    and the window jumps one block; otherwise it rolls one byte, and the byte it
//!    leaves becomes literal.
//!
//! At the end, the last `len % block_len` bytes of the target are compared with the
//! base's short last block, the only place it can match.

use std::collections::VecDeque;

use super::index::Index;
use super::patch::{END_LEN, HEADER_LEN, Op, Patch};
use super::rolling::Weak;
use super::signature::{Signature, strong_of};

/// Most blocks whose strong hash is compared at one window position (besides the
/// continuation of the previous match).
pub const MAX_CANDIDATES: usize = 8;

/// Largest literal op the generator emits; longer literal runs are split.
pub const MAX_LITERAL_OP: usize = 64 << 10;

/// What a generation found and what it cost. The cost counters are what the
/// worst-case bounds of the [module docs](super) are stated in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeltaStats {
    /// Target bytes fed.
    pub target_len: u64,
    /// Target bytes expressed as copies of the base.
    pub matched_bytes: u64,
    /// Target bytes carried as literals.
    pub literal_bytes: u64,
    /// `Copy` ops emitted (each a run of consecutive blocks).
    pub copy_ops: u64,
    /// `Literal` ops emitted.
    pub literal_ops: u64,
    /// Size of the encoded patch ([`Patch::encode`]).
    pub patch_bytes: u64,
    /// Window positions where the weak checksum hit at least one block.
    pub weak_hits: u64,
    /// Strong hashes computed over a window.
    pub strong_hashes: u64,
    /// Bytes those strong hashes covered.
    pub strong_hash_bytes: u64,
    /// Strong hashes compared with a block's.
    pub strong_compares: u64,
    /// Strong hashes that matched nothing.
    pub false_alarms: u64,
    /// Weak hits not checked because the false-alarm budget was spent.
    pub budget_skips: u64,
}

/// The rest of a generation: the ops not yet polled and the target's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Ops still to send, after every op [`Generator::poll_op`] returned.
    pub ops: Vec<Op>,
    /// Length of the target.
    pub target_len: u64,
    /// BLAKE3-256 of the target.
    pub target_hash: [u8; 32],
    /// The whole generation's statistics.
    pub stats: DeltaStats,
}

/// A patch made in memory, and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub patch: Patch,
    pub stats: DeltaStats,
}

/// The patch that turns `sig`'s base into `target`.
pub fn diff(sig: &Signature, target: &[u8]) -> Diff {
    let mut g = Generator::new(sig);
    g.handle_data(target);
    let mut ops: Vec<Op> = std::iter::from_fn(|| g.poll_op()).collect();
    let f = g.finish();
    ops.extend(f.ops);
    Diff {
        patch: Patch::from_generator(*sig.base(), ops, f.target_len, f.target_hash),
        stats: f.stats,
    }
}

/// The incremental delta search over one target (see the module docs).
#[derive(Debug)]
pub struct Generator<'s> {
    sig: &'s Signature,
    index: Index,
    bl: usize,
    /// Target bytes from the current window start on, not yet settled (≤ `bl`).
    carry: Vec<u8>,
    /// Stream offset of the current window start (`carry[0]`).
    offset: u64,
    /// Weak sums of the window at the current position, if computed.
    weak: Option<Weak>,
    /// Whether the window at the current position was looked up already.
    checked: bool,
    /// The block a window right after the last match should be, if any.
    expected: Option<u32>,
    lit: Vec<u8>,
    run: Option<(u32, u32)>,
    out: VecDeque<Op>,
    whole: blake3::Hasher,
    /// Bytes hashed by strong hashes that matched nothing.
    wasted: u64,
    stats: DeltaStats,
}

impl<'s> Generator<'s> {
    /// A generator against `sig`; builds its index (O(blocks · log blocks)).
    pub fn new(sig: &'s Signature) -> Self {
        let bl = sig.block_len() as usize;
        Self {
            sig,
            index: Index::build(sig),
            bl,
            carry: Vec::with_capacity(2 * bl + 1),
            offset: 0,
            weak: None,
            checked: false,
            expected: None,
            lit: Vec::new(),
            run: None,
            out: VecDeque::new(),
            whole: blake3::Hasher::new(),
            wasted: 0,
            stats: DeltaStats {
                patch_bytes: (HEADER_LEN + END_LEN) as u64,
                ..DeltaStats::default()
            },
        }
    }

    /// The statistics so far.
    pub fn stats(&self) -> &DeltaStats {
        &self.stats
    }

    /// Feeds the next bytes of the target.
    pub fn handle_data(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.stats.target_len += data.len() as u64;
        if !self.carry.is_empty() {
            let mut carry = std::mem::take(&mut self.carry);
            let orig = carry.len();
            let take = (self.bl + 1).min(data.len());
            carry.extend_from_slice(&data[..take]);
            let stop = self.search(&carry, 0, self.offset);
            if stop < orig {
                // The chunk was too short to move the window past the carry.
                carry.drain(..stop);
                self.offset += stop as u64;
                self.carry = carry;
                return;
            }
            // The window now starts inside `data`; continue there in place.
            self.offset += stop as u64;
            data = &data[stop - orig..];
            carry.clear();
            self.carry = carry;
        }
        let stop = self.search(data, 0, self.offset);
        self.offset += stop as u64;
        self.carry.extend_from_slice(&data[stop..]);
    }

    /// The next settled op, if any.
    pub fn poll_op(&mut self) -> Option<Op> {
        self.out.pop_front()
    }

    /// Ends the target: settles the carry (and the short last block), and returns the
    /// remaining ops and the target's identity.
    pub fn finish(mut self) -> Finished {
        let carry = std::mem::take(&mut self.carry);
        let mut lit_end = carry.len();
        let mut tail_match = None;
        if let Some(last) = u32::try_from(self.sig.blocks().len())
            .ok()
            .and_then(|n| n.checked_sub(1))
        {
            let t = self.sig.block_size(last) as usize;
            if t < self.bl && t > 0 && t <= carry.len() {
                let at = carry.len() - t;
                let window = &carry[at..];
                let want = self.sig.blocks()[last as usize];
                if Weak::of(window).digest() == want.weak {
                    self.stats.weak_hits += 1;
                    self.stats.strong_hashes += 1;
                    self.stats.strong_hash_bytes += t as u64;
                    self.stats.strong_compares += 1;
                    if strong_of(window) == want.strong {
                        lit_end = at;
                        tail_match = Some((last, t));
                    } else {
                        self.stats.false_alarms += 1;
                    }
                }
            }
        }
        self.lit.extend_from_slice(&carry[..lit_end]);
        self.emit_literal();
        if let Some((last, t)) = tail_match {
            self.push_copy(last, t);
        }
        self.flush_run();
        Finished {
            ops: self.out.into_iter().collect(),
            target_len: self.stats.target_len,
            target_hash: *self.whole.finalize().as_bytes(),
            stats: self.stats,
        }
    }

    /// Searches `data` (whose first byte is at stream offset `off`) from `pos`; returns
    /// where the window stopped: from there on, `data` is not settled (`≤ bl` bytes).
    fn search(&mut self, data: &[u8], mut pos: usize, off: u64) -> usize {
        let bl = self.bl;
        // `bl` ≤ BLOCK_LEN_MAX, a u32.
        let bl32 = bl as u32;
        let mut lit_from = pos;
        loop {
            // Make `self.weak` describe an unchecked window at `pos`, or stop.
            match &mut self.weak {
                None => {
                    let Some(win) = data.get(pos..pos + bl) else {
                        break;
                    };
                    self.weak = Some(Weak::of(win));
                }
                Some(w) if self.checked => {
                    // Roll without leaving this loop until the filter says a block
                    // may match, the literal op is full, or the data ends.
                    let room = MAX_LITERAL_OP - self.lit.len() - (pos - lit_from);
                    let n = data.len().saturating_sub(pos + bl).min(room);
                    if n == 0 {
                        break;
                    }
                    let outs = &data[pos..pos + n];
                    let ins = &data[pos + bl..pos + bl + n];
                    let mut rolled = n;
                    let mut hit = false;
                    // A local copy stays in registers.
                    let mut wl = *w;
                    for (i, (&out, &inb)) in outs.iter().zip(ins).enumerate() {
                        wl.roll(bl32, out, inb);
                        if self.index.may_contain(wl.digest()) {
                            rolled = i + 1;
                            hit = true;
                            break;
                        }
                    }
                    *w = wl;
                    pos += rolled;
                    self.expected = None;
                    if self.lit.len() + (pos - lit_from) >= MAX_LITERAL_OP {
                        self.lit.extend_from_slice(&data[lit_from..pos]);
                        lit_from = pos;
                        self.emit_literal();
                    }
                    if !hit {
                        // Checked: the filter has no false negatives, and no block is
                        // expected after a roll.
                        continue;
                    }
                }
                Some(_) => {}
            }
            self.checked = true;
            let Some(digest) = self.weak.map(Weak::digest) else {
                break;
            };
            let cands = self.index.lookup(digest);
            let expected = self.expected.filter(|&e| {
                self.sig
                    .blocks()
                    .get(e as usize)
                    .is_some_and(|b| b.weak == digest)
            });
            if cands.is_empty() && expected.is_none() {
                continue;
            }
            let Some(window) = data.get(pos..pos + bl) else {
                break;
            };
            let end = off + (pos + bl) as u64;
            if let Some(block) = self.check(digest, window, expected, end) {
                self.lit.extend_from_slice(&data[lit_from..pos]);
                self.emit_literal();
                self.push_copy(block, bl);
                pos += bl;
                lit_from = pos;
                self.weak = None;
                self.checked = false;
                self.expected = block
                    .checked_add(1)
                    .filter(|&n| self.sig.block_size(n) as usize == bl);
            }
        }
        self.lit.extend_from_slice(&data[lit_from..pos]);
        pos
    }

    /// The strong-hash check of a window whose weak sum hit; `end` is the stream offset
    /// just past the window (the budget: wasted hashing never exceeds it).
    fn check(
        &mut self,
        digest: u32,
        window: &[u8],
        expected: Option<u32>,
        end: u64,
    ) -> Option<u32> {
        self.stats.weak_hits += 1;
        let bl = window.len() as u64;
        if self.wasted + bl > end {
            self.stats.budget_skips += 1;
            return None;
        }
        let strong = strong_of(window);
        self.stats.strong_hashes += 1;
        self.stats.strong_hash_bytes += bl;
        let blocks = self.sig.blocks();
        let cands = self.index.lookup(digest);
        let order = expected.into_iter().chain(
            cands
                .iter()
                .map(|e| e.block)
                .filter(|&b| Some(b) != expected),
        );
        for b in order {
            self.stats.strong_compares += 1;
            if blocks.get(b as usize).is_some_and(|s| s.strong == strong) {
                return Some(b);
            }
        }
        self.stats.false_alarms += 1;
        self.wasted += bl;
        None
    }

    fn emit_literal(&mut self) {
        if self.lit.is_empty() {
            return;
        }
        self.flush_run();
        let lit = std::mem::take(&mut self.lit);
        self.stats.literal_bytes += lit.len() as u64;
        if lit.len() <= MAX_LITERAL_OP {
            self.push_op(Op::Literal(lit));
        } else {
            for c in lit.chunks(MAX_LITERAL_OP) {
                self.push_op(Op::Literal(c.to_vec()));
            }
        }
    }

    fn push_copy(&mut self, block: u32, len: usize) {
        self.stats.matched_bytes += len as u64;
        match &mut self.run {
            Some((b, c)) if b.checked_add(*c) == Some(block) => *c += 1,
            _ => {
                self.flush_run();
                self.run = Some((block, 1));
            }
        }
    }

    fn flush_run(&mut self) {
        if let Some((block, count)) = self.run.take() {
            self.push_op(Op::Copy { block, count });
        }
    }

    fn push_op(&mut self, op: Op) {
        match op {
            Op::Copy { .. } => self.stats.copy_ops += 1,
            Op::Literal(_) => self.stats.literal_ops += 1,
        }
        self.stats.patch_bytes += op.encoded_len() as u64;
        self.out.push_back(op);
    }
}

/// A 16-byte block whose weak checksum is the same for every `k < 50` while its
/// content differs: `+k` at bytes 0 and 3, `-k` at 1 and 2 keeps `s1`, and
/// `s2` changes by `(16 - 15 - 14 + 13)·k = 0`.
#[cfg(test)]
pub(super) fn colliding_block(k: u8) -> [u8; 16] {
    let mut b = [100u8; 16];
    b[0] += k;
    b[3] += k;
    b[1] -= k;
    b[2] -= k;
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::apply;
    use proptest::prelude::*;

    /// Deterministic pseudo-random bytes (xorshift).
    pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Diffs in memory and in small chunks, checks both agree and that the patch
    /// rebuilds the target, survives its encoding, and that the stats add up.
    fn roundtrip(base: &[u8], target: &[u8], bl: u32) -> DeltaStats {
        let sig = Signature::compute_with_block_len(base, bl).unwrap();
        let d = diff(&sig, target);
        assert_eq!(apply(base, &d.patch).unwrap(), target);
        let enc = d.patch.encode();
        assert_eq!(enc.len() as u64, d.stats.patch_bytes);
        assert_eq!(Patch::decode(&enc).unwrap(), d.patch);
        let s = d.stats;
        assert_eq!(s.matched_bytes + s.literal_bytes, target.len() as u64);
        assert!(s.strong_hash_bytes <= s.matched_bytes + target.len() as u64 + u64::from(bl));
        assert!(s.strong_compares <= s.strong_hashes * (MAX_CANDIDATES as u64 + 1));
        for chunk in [1, 7, bl as usize - 1, bl as usize + 1, 3 * bl as usize] {
            let mut g = Generator::new(&sig);
            let mut ops = Vec::new();
            for c in target.chunks(chunk.max(1)) {
                g.handle_data(c);
                ops.extend(std::iter::from_fn(|| g.poll_op()));
            }
            let f = g.finish();
            ops.extend(f.ops);
            assert!(ops == d.patch.ops(), "ops differ with chunks of {chunk}");
            assert_eq!(f.stats, d.stats, "chunk {chunk}");
        }
        s
    }

    #[test]
    fn identical_is_one_copy() {
        let base = noise(1, 10_000);
        let sig = Signature::compute_with_block_len(&base, 64).unwrap();
        let d = diff(&sig, &base);
        assert_eq!(
            d.patch.ops(),
            &[Op::Copy {
                block: 0,
                count: 157
            }]
        );
        assert_eq!(d.stats.literal_bytes, 0);
        roundtrip(&base, &base, 64);
        // A base shorter than one block matches as its (short) last block.
        let short = noise(2, 40);
        let sig = Signature::compute_with_block_len(&short, 64).unwrap();
        assert_eq!(
            diff(&sig, &short).patch.ops(),
            &[Op::Copy { block: 0, count: 1 }]
        );
    }

    #[test]
    fn edge_shapes() {
        let base = noise(3, 5000);
        roundtrip(&[], &base, 64);
        roundtrip(&base, &[], 64);
        roundtrip(&[], &[], 64);
        // Append, truncate, prepend.
        roundtrip(&base, &[&base[..], &noise(4, 300)].concat(), 64);
        roundtrip(&base, &base[..3333], 64);
        roundtrip(&base, &[&noise(5, 17)[..], &base[..]].concat(), 64);
        // Target is the base repeated: every copy after the first comes from the index.
        let s = roundtrip(&base, &base.repeat(3), 64);
        assert!(s.literal_bytes < 2 * 64, "{s:?}");
    }

    #[test]
    fn repetitive_data() {
        // 1 MiB of a repeated 4 KiB pattern: 4 distinct blocks of 1 KiB.
        let pattern = noise(6, 4096);
        let base = pattern.repeat(256);
        let mut target = base.clone();
        target.splice(100_000..100_000, noise(7, 10).iter().copied());
        target.truncate(900_000);
        let s = roundtrip(&base, &target, 1024);
        assert!(s.literal_bytes < 3 * 1024, "{s:?}");
        // All zeros: the continuation keeps one run.
        let zeros = vec![0u8; 1 << 20];
        let sig = Signature::compute_with_block_len(&zeros, 1024).unwrap();
        let d = diff(&sig, &zeros);
        assert_eq!(
            d.patch.ops(),
            &[Op::Copy {
                block: 0,
                count: 1024
            }]
        );
        assert_eq!(d.stats.strong_hashes, 1024);
        roundtrip(&zeros, &zeros[..600_001], 1024);
    }

    #[test]
    fn small_edit_of_big_file_costs_the_edit() {
        let base = noise(8, 4 << 20);
        let mut target = base.clone();
        target[2_000_000..2_001_024].copy_from_slice(&noise(9, 1024));
        let sig = Signature::compute(&base).unwrap();
        let bl = u64::from(sig.block_len());
        assert_eq!(bl, 2048);
        let d = diff(&sig, &target);
        assert_eq!(apply(&base, &d.patch).unwrap(), target);
        assert!(d.stats.patch_bytes < 3 * bl + 1024 + 200, "{:?}", d.stats);
        // And an insertion costs the same.
        let mut ins = base.clone();
        ins.splice(3_000_000..3_000_000, noise(10, 1024));
        let d = diff(&sig, &ins);
        assert_eq!(apply(&base, &d.patch).unwrap(), ins);
        assert!(d.stats.patch_bytes < 3 * bl + 1024 + 200, "{:?}", d.stats);
    }

    #[test]
    fn colliding_blocks_stay_linear() {
        // 50 distinct blocks with one weak sum (index keeps 8); the target is every
        // block at every alignment, so nearly every position hits the weak sum.
        let base: Vec<u8> = (0..50).flat_map(colliding_block).collect();
        let target: Vec<u8> = (0..2000u32)
            .flat_map(|i| colliding_block((i * 7 % 50) as u8)[..(i % 16 + 1) as usize].to_vec())
            .collect();
        let s = roundtrip(&base, &target, 16);
        let n = target.len() as u64;
        assert!(s.strong_hash_bytes <= s.matched_bytes + n + 16, "{s:?}");
        assert!(s.strong_compares <= 9 * s.strong_hashes, "{s:?}");
        // Without a budget this input would hash about 16 bytes per byte.
        assert!(s.strong_hash_bytes <= 2 * n + 16, "{s:?}");
        assert!(s.weak_hits > n / 4, "{s:?}");
        assert!(s.budget_skips > 0, "{s:?}");
        eprintln!("colliding input of {n} bytes: {s:?}");
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Overwrite(usize, Vec<u8>),
        Insert(usize, Vec<u8>),
        Delete(usize, usize),
        Move(usize, usize, usize),
        Append(Vec<u8>),
        Truncate(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let bytes = || proptest::collection::vec(any::<u8>(), 1..200);
        prop_oneof![
            (any::<usize>(), bytes()).prop_map(|(a, b)| Edit::Overwrite(a, b)),
            (any::<usize>(), bytes()).prop_map(|(a, b)| Edit::Insert(a, b)),
            (any::<usize>(), 0usize..500).prop_map(|(a, n)| Edit::Delete(a, n)),
            (any::<usize>(), 0usize..500, any::<usize>())
                .prop_map(|(a, n, to)| Edit::Move(a, n, to)),
            bytes().prop_map(Edit::Append),
            any::<usize>().prop_map(Edit::Truncate),
        ]
    }

    fn apply_edit(t: &mut Vec<u8>, e: &Edit) {
        let at = |a: usize, t: &Vec<u8>| if t.is_empty() { 0 } else { a % (t.len() + 1) };
        match e {
            Edit::Overwrite(a, b) => {
                let a = at(*a, t);
                for (i, &x) in b.iter().enumerate() {
                    if let Some(y) = t.get_mut(a + i) {
                        *y = x;
                    }
                }
            }
            Edit::Insert(a, b) => {
                let a = at(*a, t);
                t.splice(a..a, b.iter().copied());
            }
            Edit::Delete(a, n) => {
                let a = at(*a, t);
                let end = (a + n).min(t.len());
                t.drain(a..end);
            }
            Edit::Move(a, n, to) => {
                let a = at(*a, t);
                let end = (a + n).min(t.len());
                let moved: Vec<u8> = t.drain(a..end).collect();
                let to = at(*to, t);
                t.splice(to..to, moved);
            }
            Edit::Append(b) => t.extend_from_slice(b),
            Edit::Truncate(n) => {
                let n = at(*n, t);
                t.truncate(n);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn edits_roundtrip(
            seed in any::<u64>(),
            len in 0usize..6000,
            bl in 8u32..200,
            edits in proptest::collection::vec(edit(), 0..5),
        ) {
            let base = noise(seed, len);
            let mut target = base.clone();
            for e in &edits {
                apply_edit(&mut target, e);
            }
            roundtrip(&base, &target, bl);
        }

        #[test]
        fn low_entropy_roundtrip(
            base in proptest::collection::vec(0u8..3, 0..3000),
            target in proptest::collection::vec(0u8..3, 0..3000),
            bl in 8u32..64,
        ) {
            roundtrip(&base, &target, bl);
        }
    }
}
