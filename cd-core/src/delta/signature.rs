//! Block signatures of a base file: the block length, one [`BlockSum`] per block, and
//! the identity of the base ([`BaseId`]).
//!
//! # Block length
//!
//! [`block_len_for`] follows rsync: about `sqrt(len)`, which balances the signature
//! (20 bytes per block) against the bytes a change costs (up to two blocks around an
//! edit). It is rounded up to a multiple of 1 KiB, BLAKE3's chunk size, so every full
//! block hashes as whole chunks (BLAKE3 hashes the chunks of one input in parallel SIMD
//! lanes, a partial chunk costs as much as a whole one), and clamped to
//! [`AUTO_BLOCK_LEN_MIN`] (1 KiB: below that the weak sum's `s1` half carries too few
//! bits and false alarms multiply) and [`AUTO_BLOCK_LEN_MAX`] (128 KiB, rsync's
//! maximum: a single changed byte never costs more). Examples: 1 MiB → 1 KiB,
//! 4 MiB → 2 KiB, 100 MB → 10 KiB, 1 GiB → 32 KiB, 16 GiB and above → 128 KiB.
//! Explicit lengths ([`SignatureBuilder::with_block_len`]) may be anything in
//! [`BLOCK_LEN_MIN`]`..=`[`BLOCK_LEN_MAX`]; decoding accepts the same range.
//!
//! The last block is short when the length is not a multiple of the block length. It
//! can only match the end of a target (as in rsync).
//!
//! # Encoding (version 1)
//!
//! ```text
//! magic      4   "CDSG"
//! version    1   1
//! strong_len 1   16
//! reserved   2   0
//! block_len  4   u32 LE, BLOCK_LEN_MIN..=BLOCK_LEN_MAX
//! base_len   8   u64 LE
//! base_hash  32  BLAKE3-256 of the whole base
//! blocks     n × (weak u32 LE, strong [16])   n = ceil(base_len / block_len) ≤ u32::MAX
//! ```
//!
//! The block count is not stored: it follows from the lengths, and decoding checks
//! that the input holds exactly that many entries *before* allocating, so a forged
//! `base_len` cannot make it allocate more than the input's own size.

use super::rolling::Weak;
use super::wire::Reader;
use super::{BaseId, DecodeError, STRONG_LEN, Strong};

/// Smallest block length accepted by [`SignatureBuilder::with_block_len`] and decoding.
pub const BLOCK_LEN_MIN: u32 = 8;
/// Largest block length accepted by [`SignatureBuilder::with_block_len`] and decoding.
pub const BLOCK_LEN_MAX: u32 = 1 << 20;
/// Smallest block length [`block_len_for`] picks.
pub const AUTO_BLOCK_LEN_MIN: u32 = 1 << 10;
/// Largest block length [`block_len_for`] picks.
pub const AUTO_BLOCK_LEN_MAX: u32 = 128 << 10;

const MAGIC: [u8; 4] = *b"CDSG";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 1 + 2 + 4 + 8 + 32;
const ENTRY_LEN: usize = 4 + STRONG_LEN;

/// The block length for a base of `len` bytes: `sqrt(len)` rounded up to a multiple of
/// 1 KiB, clamped to `[AUTO_BLOCK_LEN_MIN, AUTO_BLOCK_LEN_MAX]`.
pub fn block_len_for(len: u64) -> u32 {
    let root = len.isqrt();
    let rounded = root.div_ceil(1024).saturating_mul(1024);
    let clamped = rounded.clamp(u64::from(AUTO_BLOCK_LEN_MIN), u64::from(AUTO_BLOCK_LEN_MAX));
    // Clamped to at most AUTO_BLOCK_LEN_MAX, so it fits.
    u32::try_from(clamped).unwrap_or(AUTO_BLOCK_LEN_MAX)
}

/// The strong hash of a block: BLAKE3 truncated to 16 bytes.
pub(super) fn strong_of(block: &[u8]) -> Strong {
    let mut s = [0u8; STRONG_LEN];
    s.copy_from_slice(&blake3::hash(block).as_bytes()[..STRONG_LEN]);
    s
}

/// Why a signature cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("block length {block_len} is outside {BLOCK_LEN_MIN}..={BLOCK_LEN_MAX}")]
    BlockLen { block_len: u32 },
    #[error("a base of {base_len} bytes has more than 2^32-1 blocks of {block_len} bytes")]
    TooManyBlocks { base_len: u64, block_len: u32 },
    #[error("the base was declared as {declared} bytes but {fed} were fed")]
    LengthMismatch { declared: u64, fed: u64 },
}

/// The checksums of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSum {
    /// The rolling checksum ([`Weak::digest`](super::rolling::Weak::digest)).
    pub weak: u32,
    /// BLAKE3 of the block, truncated to 16 bytes.
    pub strong: Strong,
}

/// The signature of a base: what a generator needs to express a new version as a
/// patch against it. Holding one means its block count matches its lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    base: BaseId,
    blocks: Vec<BlockSum>,
}

/// The number of blocks of `block_len` in `len` bytes, if it fits a u32.
fn block_count(len: u64, block_len: u32) -> Option<u32> {
    u32::try_from(len.div_ceil(u64::from(block_len))).ok()
}

fn check_block_len(base_len: u64, block_len: u32) -> Result<u32, SignatureError> {
    if !(BLOCK_LEN_MIN..=BLOCK_LEN_MAX).contains(&block_len) {
        return Err(SignatureError::BlockLen { block_len });
    }
    block_count(base_len, block_len).ok_or(SignatureError::TooManyBlocks {
        base_len,
        block_len,
    })
}

impl Signature {
    /// The signature of `base` with the block length [`block_len_for`] picks.
    /// Fails only for a base beyond 512 TiB.
    pub fn compute(base: &[u8]) -> Result<Self, SignatureError> {
        Self::compute_with_block_len(base, block_len_for(base.len() as u64))
    }

    /// The signature of `base` with blocks of `block_len` bytes.
    pub fn compute_with_block_len(base: &[u8], block_len: u32) -> Result<Self, SignatureError> {
        let mut b = SignatureBuilder::with_block_len(base.len() as u64, block_len)?;
        b.handle_data(base);
        b.finish()
    }

    /// Which base this describes.
    pub fn base(&self) -> &BaseId {
        &self.base
    }

    /// The block length.
    pub fn block_len(&self) -> u32 {
        self.base.block_len
    }

    /// One entry per block, in order; the last may cover a short block.
    pub fn blocks(&self) -> &[BlockSum] {
        &self.blocks
    }

    /// The length of block `i` (the last one may be short), 0 if there is none.
    pub fn block_size(&self, i: u32) -> u32 {
        let start = u64::from(i) * u64::from(self.base.block_len);
        let len = self
            .base
            .len
            .saturating_sub(start)
            .min(u64::from(self.base.block_len));
        // At most block_len, a u32.
        len as u32
    }

    /// The size of [`Signature::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.blocks.len() * ENTRY_LEN
    }

    /// The version-1 encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        // STRONG_LEN is 16.
        out.push(STRONG_LEN as u8);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.base.block_len.to_le_bytes());
        out.extend_from_slice(&self.base.len.to_le_bytes());
        out.extend_from_slice(&self.base.hash);
        for b in &self.blocks {
            out.extend_from_slice(&b.weak.to_le_bytes());
            out.extend_from_slice(&b.strong);
        }
        out
    }

    /// Decodes and validates an encoding from an untrusted peer.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "signature";
        let mut r = Reader::new(buf);
        if r.array::<4>()? != MAGIC {
            return Err(DecodeError::BadMagic { what: WHAT });
        }
        super::check_version(WHAT, r.u8()?, VERSION)?;
        let strong_len = r.u8()?;
        if usize::from(strong_len) != STRONG_LEN {
            return Err(DecodeError::StrongLen { len: strong_len });
        }
        if r.array::<2>()? != [0, 0] {
            return Err(DecodeError::Reserved);
        }
        let block_len = r.u32()?;
        let len = r.u64()?;
        let hash = r.array::<32>()?;
        let n = check_block_len(len, block_len).map_err(|e| match e {
            SignatureError::BlockLen { block_len } => DecodeError::BlockLen { block_len },
            _ => DecodeError::TooManyBlocks { len, block_len },
        })?;
        // Check the size before allocating anything from the untrusted count.
        let want = (n as usize).checked_mul(ENTRY_LEN);
        if want != Some(r.remaining()) {
            return Err(DecodeError::SignatureSize {
                blocks: n,
                bytes: r.remaining(),
            });
        }
        let mut blocks = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let weak = r.u32()?;
            let strong = r.array()?;
            blocks.push(BlockSum { weak, strong });
        }
        Ok(Self {
            base: BaseId {
                len,
                block_len,
                hash,
            },
            blocks,
        })
    }
}

/// Builds a [`Signature`] from a base streamed in chunks of any size, so the base never
/// needs to be in memory at once. Cost: one pass of the vectorised weak sum, one BLAKE3
/// of each block and one BLAKE3 of the whole base.
#[derive(Debug)]
pub struct SignatureBuilder {
    declared: u64,
    fed: u64,
    block_len: u32,
    /// Bytes of a block not yet complete; fewer than `block_len`.
    partial: Vec<u8>,
    blocks: Vec<BlockSum>,
    whole: blake3::Hasher,
}

impl SignatureBuilder {
    /// A builder for a base of exactly `base_len` bytes, with the block length
    /// [`block_len_for`] picks. Fails only for a base beyond 512 TiB (2^32 blocks of
    /// 128 KiB).
    pub fn new(base_len: u64) -> Result<Self, SignatureError> {
        Self::with_block_len(base_len, block_len_for(base_len))
    }

    /// A builder with an explicit block length.
    pub fn with_block_len(base_len: u64, block_len: u32) -> Result<Self, SignatureError> {
        let n = check_block_len(base_len, block_len)?;
        Ok(Self {
            declared: base_len,
            fed: 0,
            block_len,
            partial: Vec::with_capacity(block_len as usize),
            // Bounded: the caller declares the length of its own file.
            blocks: Vec::with_capacity(n.min(1 << 20) as usize),
            whole: blake3::Hasher::new(),
        })
    }

    /// The block length in use.
    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    fn push_block(&mut self, block: &[u8]) {
        self.blocks.push(BlockSum {
            weak: Weak::of(block).digest(),
            strong: strong_of(block),
        });
    }

    /// Feeds the next bytes of the base.
    pub fn handle_data(&mut self, mut data: &[u8]) {
        self.fed = self.fed.saturating_add(data.len() as u64);
        self.whole.update(data);
        let bl = self.block_len as usize;
        if !self.partial.is_empty() {
            let take = (bl - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < bl {
                return;
            }
            let block = std::mem::take(&mut self.partial);
            self.push_block(&block);
            self.partial = block;
            self.partial.clear();
        }
        let mut blocks = data.chunks_exact(bl);
        for block in &mut blocks {
            self.push_block(block);
        }
        self.partial.extend_from_slice(blocks.remainder());
    }

    /// The signature, once exactly the declared length was fed.
    pub fn finish(mut self) -> Result<Signature, SignatureError> {
        if self.fed != self.declared {
            return Err(SignatureError::LengthMismatch {
                declared: self.declared,
                fed: self.fed,
            });
        }
        check_block_len(self.declared, self.block_len)?;
        if !self.partial.is_empty() {
            let block = std::mem::take(&mut self.partial);
            self.push_block(&block);
        }
        Ok(Signature {
            base: BaseId {
                len: self.declared,
                block_len: self.block_len,
                hash: *self.whole.finalize().as_bytes(),
            },
            blocks: self.blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_len_choice() {
        assert_eq!(block_len_for(0), AUTO_BLOCK_LEN_MIN);
        assert_eq!(block_len_for(1 << 20), 1024);
        assert_eq!(block_len_for(4 << 20), 2048);
        assert_eq!(block_len_for(100_000_000), 10 * 1024);
        assert_eq!(block_len_for(1 << 30), 32 << 10);
        assert_eq!(block_len_for(16 << 30), 128 << 10);
        assert_eq!(block_len_for(u64::MAX), AUTO_BLOCK_LEN_MAX);
    }

    #[test]
    fn blocks_and_tail() {
        let base: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        let sig = Signature::compute_with_block_len(&base, 1000).unwrap();
        assert_eq!(sig.blocks().len(), 3);
        assert_eq!(sig.block_size(2), 500);
        assert_eq!(sig.block_size(3), 0);
        assert_eq!(sig.blocks()[2].weak, Weak::of(&base[2000..]).digest());
        assert_eq!(sig.blocks()[1].strong, strong_of(&base[1000..2000]));
        assert_eq!(&sig.base().hash, blake3::hash(&base).as_bytes());
        let empty = Signature::compute(b"").unwrap();
        assert!(empty.blocks().is_empty());
        assert_eq!(Signature::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn builder_refuses_bad_input() {
        assert_eq!(
            SignatureBuilder::with_block_len(10, 7).err(),
            Some(SignatureError::BlockLen { block_len: 7 })
        );
        assert!(matches!(
            SignatureBuilder::with_block_len(u64::MAX, 8).err(),
            Some(SignatureError::TooManyBlocks { .. })
        ));
        let mut b = SignatureBuilder::new(10).unwrap();
        b.handle_data(b"123");
        assert_eq!(
            b.finish().err(),
            Some(SignatureError::LengthMismatch {
                declared: 10,
                fed: 3
            })
        );
    }

    #[test]
    fn decode_refuses_forged_counts() {
        let sig = Signature::compute_with_block_len(&[1u8; 100], 16).unwrap();
        let mut enc = sig.encode();
        // base_len claims 2^34 bytes: 2^30 blocks would follow; refused, no allocation.
        enc[12..20].copy_from_slice(&(1u64 << 34).to_le_bytes());
        assert!(matches!(
            Signature::decode(&enc),
            Err(DecodeError::SignatureSize { .. })
        ));
        // u64::MAX bytes in 8-byte blocks: more than 2^32 blocks.
        enc[8..12].copy_from_slice(&8u32.to_le_bytes());
        enc[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Signature::decode(&enc),
            Err(DecodeError::TooManyBlocks { .. })
        ));
        let mut v2 = sig.encode();
        v2[4] = 2;
        assert!(matches!(
            Signature::decode(&v2),
            Err(DecodeError::TooNew { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn chunking_does_not_matter(
            base in proptest::collection::vec(any::<u8>(), 0..3000),
            bl in 8u32..300,
            cuts in proptest::collection::vec(0usize..3000, 0..6),
        ) {
            let whole = Signature::compute_with_block_len(&base, bl).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(base.len())).collect();
            cuts.sort_unstable();
            let mut b = SignatureBuilder::with_block_len(base.len() as u64, bl).unwrap();
            let mut at = 0;
            for c in cuts.into_iter().chain([base.len()]) {
                b.handle_data(&base[at..c]);
                at = c;
            }
            prop_assert_eq!(b.finish().unwrap(), whole.clone());
            prop_assert_eq!(Signature::decode(&whole.encode()).unwrap(), whole);
        }

        #[test]
        fn decode_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Signature::decode(&buf);
        }

        #[test]
        fn decode_bit_flips(
            base in proptest::collection::vec(any::<u8>(), 0..500),
            flip in any::<usize>(),
            bit in 0u8..8,
        ) {
            let enc = Signature::compute_with_block_len(&base, 32).unwrap().encode();
            let mut bad = enc.clone();
            let i = flip % bad.len();
            bad[i] ^= 1 << bit;
            // Either refused, or a well-formed signature that re-encodes to its input.
            if let Ok(sig) = Signature::decode(&bad) {
                prop_assert_eq!(sig.encode(), bad);
            }
        }
    }
}
