//! The weak checksum: rsync's rolling sum (`get_checksum1` with `CHAR_OFFSET` 0, over
//! unsigned bytes).
//!
//! For a window `b[0..n]`:
//!
//! ```text
//! s1 = Σ b[i]                  (mod 2^32)
//! s2 = Σ (n - i) · b[i]        (mod 2^32)
//! sum = (s1 & 0xffff) | (s2 << 16)
//! ```
//!
//! Equivalently `s1 += b; s2 += s1` for each byte in order, which is the scalar
//! definition [`Weak::of_scalar`] implements and the property tests compare against.
//! Sliding the window by one byte (`out` leaves at the front, `in` enters at the back)
//! is `s1 += in - out; s2 += s1 - n · out`, all wrapping, which is what makes the
//! search O(1) per byte.
//!
//! [`Weak::of`] computes the same value for a whole block (the signature and the first
//! window after every match) in a form LLVM vectorises: 32-byte chunks with one u32
//! accumulator per lane. Lane `j` keeps `a[j]`, the sum of byte `j` of every chunk so
//! far, and `p[j]`, the sum of `a[j]` before each chunk. After `m` chunks
//! (`n = 32m`) the sums are `s1 = Σ a[j]` and `s2 = 32 · Σ p[j] + Σ (32 - j) · a[j]`.
//! Everything is arithmetic mod 2^32, so lanes may wrap freely: no periodic flush, no
//! `unsafe`, no target-feature dispatch. It runs at several GB/s on SSE2 (faster than
//! the BLAKE3 hash each block also needs), so a hand-written `std::arch` version would
//! not pay.

/// Bytes per chunk of the vectorised block sum.
const LANES: usize = 32;

/// The two running sums of the weak checksum over a window. Both are kept in full
/// (mod 2^32) so that rolling stays exact; [`Weak::digest`] folds them to the 32-bit
/// value the signature stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Weak {
    s1: u32,
    s2: u32,
}

impl Weak {
    /// The sums of `block`, vectorisable.
    pub fn of(block: &[u8]) -> Self {
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        let mut a = [0u32; LANES];
        let mut p = [0u32; LANES];
        for chunk in chunks {
            for j in 0..LANES {
                p[j] = p[j].wrapping_add(a[j]);
                a[j] = a[j].wrapping_add(u32::from(chunk[j]));
            }
        }
        let mut s1 = 0u32;
        let mut s2 = 0u32;
        for j in 0..LANES {
            s1 = s1.wrapping_add(a[j]);
            // `LANES - j` fits in u32 trivially.
            let w = (LANES - j) as u32;
            s2 = s2
                .wrapping_add(p[j].wrapping_mul(LANES as u32))
                .wrapping_add(a[j].wrapping_mul(w));
        }
        let mut w = Self { s1, s2 };
        w.extend(rest);
        w
    }

    /// The sums of `block` by the definition, one byte at a time.
    pub fn of_scalar(block: &[u8]) -> Self {
        let mut w = Self::default();
        w.extend(block);
        w
    }

    /// Appends `bytes` to the window (it grows by `bytes.len()`).
    fn extend(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.s1 = self.s1.wrapping_add(u32::from(b));
            self.s2 = self.s2.wrapping_add(self.s1);
        }
    }

    /// Slides a window of `len` bytes by one: `out` leaves at the front, `inb` enters at
    /// the back.
    #[inline]
    pub fn roll(&mut self, len: u32, out: u8, inb: u8) {
        let out = u32::from(out);
        self.s1 = self.s1.wrapping_add(u32::from(inb)).wrapping_sub(out);
        self.s2 = self
            .s2
            .wrapping_add(self.s1)
            .wrapping_sub(len.wrapping_mul(out));
    }

    /// The 32-bit checksum: `(s1 & 0xffff) | (s2 << 16)`.
    #[inline]
    pub fn digest(self) -> u32 {
        (self.s1 & 0xffff) | (self.s2 << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The closed form, independent of both implementations.
    fn closed_form(b: &[u8]) -> u32 {
        let n = b.len() as u64;
        let s1: u64 = b.iter().map(|&x| u64::from(x)).sum();
        let s2: u64 = b
            .iter()
            .enumerate()
            .map(|(i, &x)| (n - i as u64) * u64::from(x))
            .sum();
        ((s1 & 0xffff) | ((s2 & 0xffff) << 16)) as u32
    }

    #[test]
    fn known_values() {
        assert_eq!(Weak::of(b"").digest(), 0);
        // s1 = 97+98+99 = 294, s2 = 3*97 + 2*98 + 99 = 586.
        assert_eq!(Weak::of(b"abc").digest(), 294 | (586 << 16));
        // Lanes wrap: 64 KiB of 0xff overflows every 16-bit half many times.
        let big = vec![0xffu8; 1 << 16];
        assert_eq!(Weak::of(&big).digest(), closed_form(&big));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn fast_equals_scalar(b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert_eq!(Weak::of(&b), Weak::of_scalar(&b));
            prop_assert_eq!(Weak::of(&b).digest(), closed_form(&b));
        }

        #[test]
        fn rolling_equals_recompute(
            b in proptest::collection::vec(any::<u8>(), 1..2000),
            len in 1usize..300,
        ) {
            let len = len.min(b.len());
            let mut w = Weak::of(&b[..len]);
            for i in 0..b.len() - len {
                w.roll(len as u32, b[i], b[i + len]);
                prop_assert_eq!(w, Weak::of_scalar(&b[i + 1..i + 1 + len]));
            }
        }
    }
}
