//! The search index over a signature's full-length blocks, keyed by weak checksum.
//!
//! A flat bucketed table (compressed-row layout): `starts[b]..starts[b + 1]` is the slice
//! of `entries` whose weak checksum hashes to bucket `b`, sorted by weak checksum. With
//! at least twice as many buckets as blocks the slice is almost always empty or one
//! entry long, so the per-byte probe is one multiply and two adjacent loads. A bucket
//! that adversarial data fills with many different weak values is binary-searched, so a
//! probe never costs more than `O(log blocks)`.
//!
//! Built once per generation:
//!
//! - blocks with the same weak *and* strong sum are merged into the lowest-numbered
//!   one (a base of a million zero blocks has one entry);
//! - at most [`MAX_CANDIDATES`] distinct blocks are kept per weak checksum (the others
//!   are still found as the continuation of a previous match).
//!
//! The short last block is not indexed: it can only match at the end of the target,
//! which the generator checks directly.

use super::generate::MAX_CANDIDATES;
use super::signature::Signature;

/// Multiplier of the filter's hash (another odd constant than the buckets', so that
/// a bucket collision is not also a filter collision).
const FILTER_MUL: u32 = 0x85EB_CA77;

/// One indexed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub weak: u32,
    pub block: u32,
}

#[derive(Debug)]
pub(super) struct Index {
    shift: u32,
    starts: Vec<u32>,
    entries: Vec<Entry>,
    /// One bit per filter slot, set where some indexed weak sum hashes: 64 slots per
    /// block (false positives under 2 %), so the per-byte test reads a table half the
    /// size of `starts` (256 KiB for the 32768 blocks of a 1 GiB base) and nearly
    /// always says no.
    filter: Vec<u64>,
    filter_shift: u32,
}

impl Index {
    pub(super) fn build(sig: &Signature) -> Self {
        let bl = sig.block_len();
        let full: Vec<u32> = (0..sig.blocks().len())
            .filter_map(|i| u32::try_from(i).ok())
            .filter(|&i| sig.block_size(i) == bl)
            .collect();
        let bits = (full.len().saturating_mul(2))
            .next_power_of_two()
            .trailing_zeros()
            .clamp(4, 30);
        let shift = 32 - bits;
        let bucket = |weak: u32| (weak.wrapping_mul(0x9E37_79B1) >> shift) as usize;
        let blocks = sig.blocks();
        let mut order = full;
        order.sort_unstable_by(|&a, &b| {
            let (x, y) = (&blocks[a as usize], &blocks[b as usize]);
            (bucket(x.weak), x.weak, x.strong, a).cmp(&(bucket(y.weak), y.weak, y.strong, b))
        });
        let mut entries: Vec<Entry> = Vec::with_capacity(order.len());
        let mut run_weak = None;
        let mut run_len = 0usize;
        let mut last: Option<u32> = None;
        for i in order {
            let b = &blocks[i as usize];
            if let Some(l) = last {
                let lb = &blocks[l as usize];
                if lb.weak == b.weak && lb.strong == b.strong {
                    // Same content as a lower-numbered block already indexed.
                    continue;
                }
            }
            last = Some(i);
            if run_weak == Some(b.weak) {
                run_len += 1;
            } else {
                run_weak = Some(b.weak);
                run_len = 1;
            }
            if run_len <= MAX_CANDIDATES {
                entries.push(Entry {
                    weak: b.weak,
                    block: i,
                });
            }
        }
        let nb = 1usize << bits;
        let mut starts = vec![0u32; nb + 1];
        for e in &entries {
            starts[bucket(e.weak) + 1] += 1;
        }
        for b in 0..nb {
            starts[b + 1] += starts[b];
        }
        let fbits = bits + 5;
        let filter_shift = 32 - fbits;
        let mut filter = vec![0u64; (1usize << fbits) / 64];
        for e in &entries {
            let h = (e.weak.wrapping_mul(FILTER_MUL) >> filter_shift) as usize;
            filter[h / 64] |= 1 << (h % 64);
        }
        Self {
            shift,
            starts,
            entries,
            filter,
            filter_shift,
        }
    }

    /// False if no indexed block has weak sum `weak` (true may be a false positive).
    #[inline]
    pub(super) fn may_contain(&self, weak: u32) -> bool {
        let h = (weak.wrapping_mul(FILTER_MUL) >> self.filter_shift) as usize;
        self.filter
            .get(h / 64)
            .is_some_and(|w| (w >> (h % 64)) & 1 == 1)
    }

    /// The indexed blocks whose weak checksum is `weak` (at most `MAX_CANDIDATES`).
    #[inline]
    pub(super) fn lookup(&self, weak: u32) -> &[Entry] {
        let b = (weak.wrapping_mul(0x9E37_79B1) >> self.shift) as usize;
        let (Some(&lo), Some(&hi)) = (self.starts.get(b), self.starts.get(b + 1)) else {
            return &[];
        };
        let Some(slot) = self.entries.get(lo as usize..hi as usize) else {
            return &[];
        };
        match slot {
            [] => &[],
            [e] if e.weak == weak => slot,
            [_] => &[],
            _ => {
                let from = slot.partition_point(|e| e.weak < weak);
                let to = slot.partition_point(|e| e.weak <= weak);
                &slot[from..to]
            }
        }
    }

    /// How many blocks are indexed.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::rolling::Weak;

    #[test]
    fn identical_blocks_are_merged() {
        let base = vec![0u8; 64 * 1000 + 10];
        let sig = Signature::compute_with_block_len(&base, 64).unwrap();
        let idx = Index::build(&sig);
        assert_eq!(idx.len(), 1);
        let w = Weak::of(&[0u8; 64]).digest();
        assert_eq!(idx.lookup(w), &[Entry { weak: w, block: 0 }]);
        assert!(idx.lookup(w ^ 1).is_empty());
        assert!(idx.may_contain(w));
    }

    #[test]
    fn every_full_block_is_found() {
        let base: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sig = Signature::compute_with_block_len(&base, 100).unwrap();
        let idx = Index::build(&sig);
        assert_eq!(idx.len(), 1000);
        for (i, b) in sig.blocks().iter().enumerate() {
            assert!(
                idx.lookup(b.weak).iter().any(|e| e.block as usize == i),
                "{i}"
            );
        }
    }

    #[test]
    fn colliding_weak_sums_are_capped() {
        let base: Vec<u8> = (0..50)
            .flat_map(super::super::generate::colliding_block)
            .collect();
        let sig = Signature::compute_with_block_len(&base, 16).unwrap();
        assert!(sig.blocks().iter().all(|b| b.weak == sig.blocks()[0].weak));
        let idx = Index::build(&sig);
        assert_eq!(idx.len(), MAX_CANDIDATES);
        assert_eq!(idx.lookup(sig.blocks()[0].weak).len(), MAX_CANDIDATES);
    }
}
