//! Whole file ("dump copy") or delta ("different patch"): [`decide`].
//!
//! Asked twice per file. Before any work (`stats == None`): without a base of the
//! right identity, or when either side is too small for a signature to matter, the
//! file goes whole. After generation (`stats == Some`): when the patch would carry
//! more than [`DumpPolicy::max_patch_permille`] of the target's size, the file goes
//! whole — the receiver then writes a plain file instead of copying base ranges, and
//! there is no risk of a base mismatch. Both paths are compressed by the link the same
//! way, so bytes before compression are what is compared.

use super::DeltaStats;

/// Thresholds of [`decide`]. Option names carry their units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpPolicy {
    /// A base smaller than this is not worth a signature.
    pub min_base_bytes: u64,
    /// A target smaller than this goes whole (a patch header alone is 93 bytes).
    pub min_target_bytes: u64,
    /// Send whole when `patch_bytes > target_len · permille / 1000`.
    pub max_patch_permille: u16,
}

impl Default for DumpPolicy {
    fn default() -> Self {
        Self {
            min_base_bytes: 4096,
            min_target_bytes: 4096,
            max_patch_permille: 900,
        }
    }
}

/// Why a file goes whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeReason {
    /// The receiver has no base (new file, or its copy differs from the signature's).
    NoBase,
    /// The base is smaller than `min_base_bytes`.
    BaseTooSmall,
    /// The target is smaller than `min_target_bytes`.
    TargetTooSmall,
    /// The patch would be more than `max_patch_permille` of the target.
    PatchTooLarge,
}

/// The verdict of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Delta,
    Whole(WholeReason),
}

/// Whether to send a delta: `base_len` is the length of the base the receiver holds
/// (`None`: none usable), `stats` what generation found if it already ran.
pub fn decide(
    policy: &DumpPolicy,
    base_len: Option<u64>,
    target_len: u64,
    stats: Option<&DeltaStats>,
) -> Decision {
    let Some(base_len) = base_len else {
        return Decision::Whole(WholeReason::NoBase);
    };
    if base_len < policy.min_base_bytes {
        return Decision::Whole(WholeReason::BaseTooSmall);
    }
    if target_len < policy.min_target_bytes {
        return Decision::Whole(WholeReason::TargetTooSmall);
    }
    if let Some(s) = stats {
        let limit = u128::from(s.target_len) * u128::from(policy.max_patch_permille) / 1000;
        if u128::from(s.patch_bytes) > limit {
            return Decision::Whole(WholeReason::PatchTooLarge);
        }
    }
    Decision::Delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Signature, diff};

    #[test]
    fn verdicts() {
        let p = DumpPolicy::default();
        assert_eq!(
            decide(&p, None, 1 << 20, None),
            Decision::Whole(WholeReason::NoBase)
        );
        assert_eq!(
            decide(&p, Some(100), 1 << 20, None),
            Decision::Whole(WholeReason::BaseTooSmall)
        );
        assert_eq!(
            decide(&p, Some(1 << 20), 10, None),
            Decision::Whole(WholeReason::TargetTooSmall)
        );
        assert_eq!(decide(&p, Some(1 << 20), 1 << 20, None), Decision::Delta);

        let base: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let sig = Signature::compute(&base).unwrap();
        let mut small_change = base.clone();
        small_change[5000] ^= 1;
        let d = diff(&sig, &small_change);
        assert_eq!(
            decide(&p, Some(100_000), 100_000, Some(&d.stats)),
            Decision::Delta
        );
        let unrelated: Vec<u8> = base.iter().rev().copied().collect();
        let d = diff(&sig, &unrelated);
        assert_eq!(
            decide(&p, Some(100_000), 100_000, Some(&d.stats)),
            Decision::Whole(WholeReason::PatchTooLarge)
        );
    }
}
