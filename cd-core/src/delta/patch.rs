//! [`Patch`]: the ops that turn a base into a target, their encoding, and [`apply`].
//!
//! # Encoding (version 1)
//!
//! Streamable: the header goes out before the first op, the target's identity after
//! the last (the sender learns it only at the end), so a sender can forward ops as the
//! [`Generator`](super::Generator) settles them ([`write_header`], [`Op::write_to`],
//! [`write_end`]).
//!
//! ```text
//! header   magic "CDPT" (4), version 1 (1), reserved 0 (3),
//!          base block_len u32 LE, base_len u64 LE, base_hash [32]       52 bytes
//! ops      0x01 Copy     block varint, count varint   (count ≥ 1, block + count ≤ blocks)
//!          0x02 Literal  len varint, len bytes        (len ≥ 1)
//! end      0x00          target_len u64 LE, target_hash [32]            41 bytes
//! ```
//!
//! Varints are unsigned LEB128, minimal, at most 10 bytes. A `Copy` of blocks
//! `block..block + count` stands for base bytes `block · block_len` up to
//! `min((block + count) · block_len, base_len)`. Decoding checks every op against the
//! header's base, that the ops produce exactly `target_len` bytes, and that nothing
//! follows the end; every length is checked against the input left before anything is
//! allocated. Decoding cannot check the target hash (it has no target): [`apply`] does.

use super::wire::{Reader, put_varint, varint_len};
use super::{BLOCK_LEN_MAX, BLOCK_LEN_MIN, BaseId, DecodeError, WireError};

const MAGIC: [u8; 4] = *b"CDPT";
const VERSION: u8 = 1;
pub(super) const HEADER_LEN: usize = 4 + 1 + 3 + 4 + 8 + 32;
pub(super) const END_LEN: usize = 1 + 8 + 32;
const TAG_END: u8 = 0x00;
const TAG_COPY: u8 = 0x01;
const TAG_LITERAL: u8 = 0x02;

/// One step of a patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Base blocks `block..block + count` (the last block of the base may be short).
    Copy { block: u32, count: u32 },
    /// Bytes that are not in the base (never empty).
    Literal(Vec<u8>),
}

impl Op {
    /// The size of [`Op::write_to`]'s output.
    pub fn encoded_len(&self) -> usize {
        match self {
            Op::Copy { block, count } => {
                1 + varint_len(u64::from(*block)) + varint_len(u64::from(*count))
            }
            Op::Literal(b) => 1 + varint_len(b.len() as u64) + b.len(),
        }
    }

    /// Appends the op's encoding.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Op::Copy { block, count } => {
                out.push(TAG_COPY);
                put_varint(out, u64::from(*block));
                put_varint(out, u64::from(*count));
            }
            Op::Literal(b) => {
                out.push(TAG_LITERAL);
                put_varint(out, b.len() as u64);
                out.extend_from_slice(b);
            }
        }
    }
}

/// Appends a patch header for `base`.
pub fn write_header(base: &BaseId, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&base.block_len.to_le_bytes());
    out.extend_from_slice(&base.len.to_le_bytes());
    out.extend_from_slice(&base.hash);
}

/// Appends the end of a patch: the target's length and BLAKE3-256.
pub fn write_end(target_len: u64, target_hash: &[u8; 32], out: &mut Vec<u8>) {
    out.push(TAG_END);
    out.extend_from_slice(&target_len.to_le_bytes());
    out.extend_from_slice(target_hash);
}

/// Why ops do not form a patch of a base (decoding, [`Patch::new`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPatch {
    #[error("block length {block_len} is outside {BLOCK_LEN_MIN}..={BLOCK_LEN_MAX}")]
    BlockLen { block_len: u32 },
    #[error("copy of blocks {block}+{count} is outside the base's {blocks} blocks")]
    CopyRange { block: u32, count: u32, blocks: u64 },
    #[error("empty op (a copy of no block or an empty literal)")]
    EmptyOp,
    #[error("the ops produce {produced} bytes but the patch declares {declared}")]
    TargetLen { produced: u64, declared: u64 },
}

/// Why [`apply`] refused to produce a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("the patch is for a base of {expected} bytes, this one has {actual}")]
    BaseLen { expected: u64, actual: u64 },
    #[error("copy of base bytes {offset}+{len} is outside the base")]
    CopyRange { offset: u64, len: u64 },
    #[error("the result does not have the target's hash (wrong base, or a corrupt patch)")]
    HashMismatch,
}

/// One step of applying a patch, in target order ([`Patch::steps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// Copy `len` bytes of the base from `offset`.
    Copy { offset: u64, len: u64 },
    /// Write these bytes.
    Literal(&'a [u8]),
}

/// The ops that turn one base into one target. Holding one means every op lies
/// within the base and the ops produce exactly `target_len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    base: BaseId,
    ops: Vec<Op>,
    target_len: u64,
    target_hash: [u8; 32],
}

/// The number of base bytes a copy covers, if it lies within the base.
fn copy_len(base: &BaseId, block: u32, count: u32) -> Result<u64, InvalidPatch> {
    if count == 0 {
        return Err(InvalidPatch::EmptyOp);
    }
    let blocks = base.block_count();
    let end_block = u64::from(block) + u64::from(count);
    if end_block > blocks {
        return Err(InvalidPatch::CopyRange {
            block,
            count,
            blocks,
        });
    }
    let bl = u64::from(base.block_len);
    // end_block ≤ blocks = ceil(len / bl), so neither product overflows past len + bl.
    let start = u64::from(block) * bl;
    let end = (end_block * bl).min(base.len);
    Ok(end - start)
}

fn op_len(base: &BaseId, op: &Op) -> Result<u64, InvalidPatch> {
    match op {
        Op::Copy { block, count } => copy_len(base, *block, *count),
        Op::Literal(b) if b.is_empty() => Err(InvalidPatch::EmptyOp),
        Op::Literal(b) => Ok(b.len() as u64),
    }
}

fn check_block_len(base: &BaseId) -> Result<(), InvalidPatch> {
    if (BLOCK_LEN_MIN..=BLOCK_LEN_MAX).contains(&base.block_len) {
        Ok(())
    } else {
        Err(InvalidPatch::BlockLen {
            block_len: base.block_len,
        })
    }
}

impl Patch {
    /// A patch from parts, validated.
    pub fn new(
        base: BaseId,
        ops: Vec<Op>,
        target_len: u64,
        target_hash: [u8; 32],
    ) -> Result<Self, InvalidPatch> {
        check_block_len(&base)?;
        let mut produced = 0u64;
        for op in &ops {
            produced = produced.saturating_add(op_len(&base, op)?);
        }
        if produced != target_len {
            return Err(InvalidPatch::TargetLen {
                produced,
                declared: target_len,
            });
        }
        Ok(Self {
            base,
            ops,
            target_len,
            target_hash,
        })
    }

    /// A patch the generator made (valid by construction).
    pub(super) fn from_generator(
        base: BaseId,
        ops: Vec<Op>,
        target_len: u64,
        target_hash: [u8; 32],
    ) -> Self {
        debug_assert!(Self::new(base, ops.clone(), target_len, target_hash).is_ok());
        Self {
            base,
            ops,
            target_len,
            target_hash,
        }
    }

    /// The base this patch applies to: a replica whose file differs (length or
    /// content hash) must not apply it.
    pub fn base(&self) -> &BaseId {
        &self.base
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn target_len(&self) -> u64 {
        self.target_len
    }

    /// BLAKE3-256 of the target.
    pub fn target_hash(&self) -> &[u8; 32] {
        &self.target_hash
    }

    /// Literal bytes the patch carries.
    pub fn literal_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Literal(b) => b.len() as u64,
                Op::Copy { .. } => 0,
            })
            .sum()
    }

    /// The size of [`Patch::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.ops.iter().map(Op::encoded_len).sum::<usize>() + END_LEN
    }

    /// The version-1 encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        write_header(&self.base, &mut out);
        for op in &self.ops {
            op.write_to(&mut out);
        }
        write_end(self.target_len, &self.target_hash, &mut out);
        out
    }

    /// Decodes and validates an encoding from an untrusted peer.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "patch";
        let mut r = Reader::new(buf);
        if r.array::<4>()? != MAGIC {
            return Err(DecodeError::BadMagic { what: WHAT });
        }
        super::check_version(WHAT, r.u8()?, VERSION)?;
        if r.array::<3>()? != [0; 3] {
            return Err(DecodeError::Reserved);
        }
        let block_len = r.u32()?;
        let len = r.u64()?;
        let hash = r.array::<32>()?;
        let base = BaseId {
            len,
            block_len,
            hash,
        };
        check_block_len(&base)?;
        let mut ops = Vec::new();
        let mut produced = 0u64;
        loop {
            let at = r.offset();
            match r.u8()? {
                TAG_END => break,
                TAG_COPY => {
                    let block = r.varint()?;
                    let count = r.varint()?;
                    let (Ok(block), Ok(count)) = (u32::try_from(block), u32::try_from(count))
                    else {
                        return Err(WireError::BadVarint { offset: at + 1 }.into());
                    };
                    produced = produced.saturating_add(copy_len(&base, block, count)?);
                    ops.push(Op::Copy { block, count });
                }
                TAG_LITERAL => {
                    let n = r.varint()?;
                    // Checked against the input before it sizes anything.
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|&n| n <= r.remaining())
                        .ok_or(WireError::Truncated { offset: r.offset() })?;
                    if n == 0 {
                        return Err(InvalidPatch::EmptyOp.into());
                    }
                    produced = produced.saturating_add(n as u64);
                    ops.push(Op::Literal(r.bytes(n)?.to_vec()));
                }
                tag => return Err(DecodeError::OpTag { tag, offset: at }),
            }
        }
        let target_len = r.u64()?;
        let target_hash = r.array::<32>()?;
        if r.remaining() != 0 {
            return Err(DecodeError::Trailing {
                extra: r.remaining(),
            });
        }
        if produced != target_len {
            return Err(InvalidPatch::TargetLen {
                produced,
                declared: target_len,
            }
            .into());
        }
        Ok(Self {
            base,
            ops,
            target_len,
            target_hash,
        })
    }

    /// The ops as byte ranges, for a caller that copies from its own base file
    /// (`copy_file_range`, registered buffers) instead of calling [`apply`]. It must
    /// hash what it writes with BLAKE3 and compare with [`Patch::target_hash`] before
    /// exposing the result.
    pub fn steps(&self) -> impl Iterator<Item = Step<'_>> {
        let bl = u64::from(self.base.block_len);
        let len = self.base.len;
        self.ops.iter().map(move |op| match op {
            Op::Copy { block, count } => {
                let offset = u64::from(*block).saturating_mul(bl);
                let end = (u64::from(*block) + u64::from(*count))
                    .saturating_mul(bl)
                    .min(len);
                Step::Copy {
                    offset,
                    len: end.saturating_sub(offset),
                }
            }
            Op::Literal(b) => Step::Literal(b),
        })
    }
}

/// Rebuilds the target from `base`; checks the base's length, every range, and the
/// target's hash. (Comparing the base's content hash with [`Patch::base`] beforehand
/// is the caller's business: it usually knows it from its manifest.)
pub fn apply(base: &[u8], patch: &Patch) -> Result<Vec<u8>, ApplyError> {
    let actual = base.len() as u64;
    if actual != patch.base.len {
        return Err(ApplyError::BaseLen {
            expected: patch.base.len,
            actual,
        });
    }
    // The declared length is checked against the ops, but copies can legitimately
    // repeat the base many times: reserve no more than a bounded amount up front.
    let reserve = patch.target_len.min(64 << 20);
    let mut out = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
    for step in patch.steps() {
        match step {
            Step::Copy { offset, len } => {
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(len).ok())
                    .and_then(|(o, l)| base.get(o..o.checked_add(l)?))
                    .ok_or(ApplyError::CopyRange { offset, len })?;
                out.extend_from_slice(range);
            }
            Step::Literal(b) => out.extend_from_slice(b),
        }
    }
    if blake3::hash(&out).as_bytes() != &patch.target_hash {
        return Err(ApplyError::HashMismatch);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Signature, diff};
    use proptest::prelude::*;

    fn sample() -> (Vec<u8>, Vec<u8>, Patch) {
        let base: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut target = base.clone();
        target[500..520].fill(9);
        target.extend_from_slice(b"tail");
        let sig = Signature::compute_with_block_len(&base, 64).unwrap();
        let patch = diff(&sig, &target).patch;
        (base, target, patch)
    }

    #[test]
    fn golden_encoding() {
        let base = BaseId {
            len: 100,
            block_len: 64,
            hash: [0xaa; 32],
        };
        let p = Patch::new(
            base,
            vec![Op::Copy { block: 1, count: 1 }, Op::Literal(b"hi".to_vec())],
            38,
            [0xbb; 32],
        )
        .unwrap();
        let mut want = b"CDPT\x01\x00\x00\x00\x40\x00\x00\x00\x64\0\0\0\0\0\0\0".to_vec();
        want.extend_from_slice(&[0xaa; 32]);
        want.extend_from_slice(&[
            0x01, 1, 1, 0x02, 2, b'h', b'i', 0x00, 38, 0, 0, 0, 0, 0, 0, 0,
        ]);
        want.extend_from_slice(&[0xbb; 32]);
        assert_eq!(p.encode(), want);
        assert_eq!(p.encoded_len(), want.len());
        assert_eq!(Patch::decode(&want), Ok(p));
    }

    #[test]
    fn new_validates() {
        let base = BaseId {
            len: 100,
            block_len: 64,
            hash: [0; 32],
        };
        let bad = |ops, len| Patch::new(base, ops, len, [0; 32]).err();
        assert_eq!(
            bad(vec![Op::Copy { block: 1, count: 2 }], 100),
            Some(InvalidPatch::CopyRange {
                block: 1,
                count: 2,
                blocks: 2
            })
        );
        assert_eq!(
            bad(vec![Op::Copy { block: 0, count: 0 }], 0),
            Some(InvalidPatch::EmptyOp)
        );
        assert_eq!(
            bad(vec![Op::Literal(Vec::new())], 0),
            Some(InvalidPatch::EmptyOp)
        );
        assert_eq!(
            bad(vec![Op::Copy { block: 0, count: 2 }], 99),
            Some(InvalidPatch::TargetLen {
                produced: 100,
                declared: 99
            })
        );
        assert!(bad(vec![Op::Copy { block: 0, count: 2 }], 100).is_none());
    }

    #[test]
    fn apply_refuses_wrong_base() {
        let (base, target, patch) = sample();
        assert_eq!(apply(&base, &patch).unwrap(), target);
        assert_eq!(
            apply(&base[1..], &patch),
            Err(ApplyError::BaseLen {
                expected: 1000,
                actual: 999
            })
        );
        let mut other = base.clone();
        other[10] ^= 1;
        assert_eq!(apply(&other, &patch), Err(ApplyError::HashMismatch));
    }

    #[test]
    fn decode_refusals() {
        let (_, _, patch) = sample();
        let enc = patch.encode();
        let mut trailing = enc.clone();
        trailing.push(0);
        assert_eq!(
            Patch::decode(&trailing),
            Err(DecodeError::Trailing { extra: 1 })
        );
        assert!(matches!(
            Patch::decode(&enc[..enc.len() - 1]),
            Err(DecodeError::Wire(WireError::Truncated { .. }))
        ));
        let mut v0 = enc.clone();
        v0[4] = 0;
        assert!(matches!(
            Patch::decode(&v0),
            Err(DecodeError::TooOld { .. })
        ));
        // A literal claiming 2^60 bytes is refused without allocating.
        let mut huge = enc[..HEADER_LEN].to_vec();
        huge.push(TAG_LITERAL);
        put_varint(&mut huge, 1 << 60);
        assert!(matches!(
            Patch::decode(&huge),
            Err(DecodeError::Wire(WireError::Truncated { .. }))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn decode_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Patch::decode(&buf);
            // With a valid header in front, so that the op parser is reached.
            let (_, _, patch) = sample();
            let mut b = patch.encode()[..HEADER_LEN].to_vec();
            b.extend_from_slice(&buf);
            let _ = Patch::decode(&b);
        }

        #[test]
        fn bit_flips_never_yield_a_wrong_target(flip in any::<usize>(), bit in 0u8..8) {
            let (base, target, patch) = sample();
            let mut bad = patch.encode();
            let i = flip % bad.len();
            bad[i] ^= 1 << bit;
            if let Ok(p) = Patch::decode(&bad) {
                // Either refused at apply time, or it really is the target.
                if let Ok(out) = apply(&base, &p) {
                    prop_assert_eq!(out, target);
                }
            }
        }
    }
}
