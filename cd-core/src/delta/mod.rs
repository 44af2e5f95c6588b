//! The delta engine: rsync's rolling-checksum algorithm, sans-IO, so that a small change
//! to a large file costs bytes proportional to the change, not to the file.
//!
//! # Pieces
//!
//! 1. [`Signature`] of a *base* (the version a replica holds): the file cut into blocks
//!    of [`block_len_for`] bytes (about `sqrt(len)`), each described by a 32-bit rolling
//!    checksum ([`rolling`]) and a 16-byte strong hash (BLAKE3, truncated), plus the
//!    base's identity [`BaseId`] (length, block length, BLAKE3-256 of the whole base:
//!    the same hash the manifests carry). Built from streamed chunks by
//!    [`SignatureBuilder`].
//! 2. [`Generator`] (the delta search): fed the *target* (the new version) in chunks of
//!    any size, it slides a window over it byte by byte, updating the rolling checksum
//!    in O(1), and looks every window up in an index of the signature's blocks. Output
//!    is a stream of [`Op`]s — `Copy { block, count }` (runs of consecutive base blocks)
//!    and `Literal(bytes)` — and at the end the target's length and BLAKE3-256.
//!    [`diff`] does it for a target held in memory.
//! 3. [`Patch`]: the ops plus the identity of the base they apply to and of the target
//!    they produce. [`apply`] rebuilds the target from the base (or [`Patch::steps`]
//!    drives a caller that copies ranges itself), checking every op against the base
//!    and the target's hash at the end.
//! 4. [`decide`]: whether a delta pays at all, before (no base, tiny files) and after
//!    generation (too many literal bytes): otherwise send the file whole.
//!
//! # Intended use: broadcast delta
//!
//! The sender keeps the [`Signature`] of the version it last distributed (its
//! signature cache). When the file changes it runs one [`Generator`] over the new
//! version (streamed from its snapshot; the target never needs to be in memory at once)
//! and broadcasts the one resulting patch to every replica. A replica checks
//! [`Patch::base`]: if its current file's length and content hash (from its manifest)
//! equal the patch's [`BaseId`], it applies the patch into a staged file and renames it
//! into place once the target hash verified; otherwise (it missed a version, or its
//! copy diverged) it asks for its own exchange: it sends the signature of what it has
//! (or asks for the whole file) and gets a patch made for it. The sender then replaces
//! its cached signature with the target's (build it with a [`SignatureBuilder`] fed
//! the same chunks as the generator, at no extra read). Signatures and patches travel
//! in the versioned encodings of [`Signature::encode`] and [`Patch::encode`]; both
//! decoders treat their input as hostile.
//!
//! Nothing here reads files, clocks or sockets: bytes come in as slices, results go out
//! as values.
//!
//! # Cost and adversarial input
//!
//! Per target byte the search does one rolling update and one test of a bit filter
//! over the indexed weak sums (64 bits per block: 256 KiB for a 1 GiB base); only where
//! the filter says yes does it probe the bucketed index. Strong hashes (BLAKE3 over
//! one block) are computed only where the weak checksum hits, at most once per window
//! position, and compared against at most [`MAX_CANDIDATES`] blocks. rsync's known
//! hang — walking a long chain of blocks with one weak checksum at every byte of a VM
//! image full of identical or colliding blocks — cannot happen here:
//!
//! - identical blocks (same weak and strong sum) are merged when the index is built,
//!   and at most [`MAX_CANDIDATES`] distinct blocks are kept per weak checksum;
//! - the block right after the previous match is tried first, straight from the
//!   signature, so runs of identical blocks still come out as one `Copy` run;
//! - strong hashes that find nothing (false alarms) are budgeted: the bytes they hash
//!   never exceed the target bytes scanned so far. Past the budget, weak hits are
//!   skipped until the scan catches up (this can only lose matches on adversarial
//!   input; the output stays correct).
//!
//! So the strong-hash work is at most `matched bytes + target length + one block`
//! (≤ 2× the target), and comparisons at most `MAX_CANDIDATES + 1` per strong hash;
//! [`DeltaStats`] counts both, and the tests assert those bounds on colliding input.

mod dump;
mod generate;
mod index;
mod patch;
pub mod rolling;
mod signature;
mod wire;

pub use dump::{Decision, DumpPolicy, WholeReason, decide};
pub use generate::{DeltaStats, Diff, Finished, Generator, MAX_CANDIDATES, MAX_LITERAL_OP, diff};
pub use patch::{ApplyError, InvalidPatch, Op, Patch, Step, apply, write_end, write_header};
pub use signature::{
    AUTO_BLOCK_LEN_MAX, AUTO_BLOCK_LEN_MIN, BLOCK_LEN_MAX, BLOCK_LEN_MIN, BlockSum, Signature,
    SignatureBuilder, SignatureError, block_len_for,
};

/// Bytes of a block's strong hash (BLAKE3, truncated).
pub const STRONG_LEN: usize = 16;

/// A block's strong hash.
pub type Strong = [u8; STRONG_LEN];

/// Which base a signature describes and a patch applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseId {
    /// Length of the base in bytes.
    pub len: u64,
    /// Block length of the signature (and of the patch's `Copy` ops).
    pub block_len: u32,
    /// BLAKE3-256 of the whole base.
    pub hash: [u8; 32],
}

impl BaseId {
    /// How many blocks the base has (the last may be short).
    pub fn block_count(&self) -> u64 {
        self.len.div_ceil(u64::from(self.block_len.max(1)))
    }
}

/// Low-level reasons untrusted bytes cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("input ends early at offset {offset}")]
    Truncated { offset: usize },
    #[error("malformed varint at offset {offset}")]
    BadVarint { offset: usize },
}

/// Why an encoded [`Signature`] or [`Patch`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a {what}: bad magic")]
    BadMagic { what: &'static str },
    #[error("{what} version {version} is too old (this build reads {supported})")]
    TooOld {
        what: &'static str,
        version: u8,
        supported: u8,
    },
    #[error("{what} version {version} is unknown (newer than {supported})")]
    TooNew {
        what: &'static str,
        version: u8,
        supported: u8,
    },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("strong hash length {len} is not supported")]
    StrongLen { len: u8 },
    #[error("block length {block_len} is outside {BLOCK_LEN_MIN}..={BLOCK_LEN_MAX}")]
    BlockLen { block_len: u32 },
    #[error("a base of {len} bytes has more than 2^32-1 blocks of {block_len} bytes")]
    TooManyBlocks { len: u64, block_len: u32 },
    #[error("signature of {blocks} blocks does not fit the {bytes} bytes that follow its header")]
    SignatureSize { blocks: u32, bytes: usize },
    #[error("unknown op tag {tag:#04x} at offset {offset}")]
    OpTag { tag: u8, offset: usize },
    #[error("{extra} bytes after the end of the patch")]
    Trailing { extra: usize },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Invalid(#[from] InvalidPatch),
}

fn check_version(what: &'static str, version: u8, supported: u8) -> Result<(), DecodeError> {
    use std::cmp::Ordering;
    match version.cmp(&supported) {
        Ordering::Equal => Ok(()),
        Ordering::Less => Err(DecodeError::TooOld {
            what,
            version,
            supported,
        }),
        Ordering::Greater => Err(DecodeError::TooNew {
            what,
            version,
            supported,
        }),
    }
}
