//! The kernel ↔ user-space record format, mirrored from `bpf/cdsync.h`.
//!
//! A ring-buffer record is a 64-byte [`RawEvent`] header followed by exactly
//! `walk_len[0] + str_len[0] + walk_len[1] + str_len[1]` bytes of path data (see
//! `cdsync.h` for the layout). Records are parsed field by field from bytes, so no
//! `unsafe` transmutes are needed and a short or inconsistent record is rejected.

/// ABI version of `cdsync.h` this loader understands.
pub const ABI_VERSION: u32 = 1;

pub const K_OPEN_WRITE: u32 = 1;
pub const K_MODIFY: u32 = 2;
pub const K_MMAP_WRITE: u32 = 3;
pub const K_CLOSE_WRITE: u32 = 4;
pub const K_CREATE: u32 = 5;
pub const K_MKDIR: u32 = 6;
pub const K_SYMLINK: u32 = 7;
pub const K_LINK: u32 = 8;
pub const K_ATTRIB: u32 = 9;
pub const K_UNLINK: u32 = 10;
pub const K_RMDIR: u32 = 11;
pub const K_RENAME: u32 = 12;
pub const K_OVERFLOW: u32 = 13;

pub const F_DIR: u32 = 0x1;
pub const F_DIR_KNOWN: u32 = 0x2;
pub const F_CREATED: u32 = 0x4;
pub const F_TRUNC: u32 = 0x8;
pub const F_EXCHANGE: u32 = 0x10;
pub const F_IO_URING: u32 = 0x20;

/// Longest root path below an ancestor directory that the kernel can prefix-match.
pub const ANC_REM_MAX: usize = 256;
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `AT_FDCWD` as the kernel stores it in `dfd`.
pub const AT_FDCWD: i32 = -100;

/// `struct cd_event` (C layout, native endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawEvent {
    pub kind: u32,
    pub flags: u32,
    /// Watched root id per part (0 = outside every root).
    pub root: [u32; 2],
    pub pid: u32,
    pub tid: u32,
    pub seq: u64,
    pub ts_ns: u64,
    pub walk_len: [u16; 2],
    pub str_len: [u16; 2],
    pub skip: [u16; 2],
    pub dev: u32,
    pub dfd: [i32; 2],
}

/// Header size in bytes; `_Static_assert`ed to the same value in `cdsync.h`.
pub const RAW_EVENT_SIZE: usize = 64;
const _: () = assert!(size_of::<RawEvent>() == RAW_EVENT_SIZE);

/// Key of the `roots` and `ancestors` maps (`struct cd_ino_key`).
pub fn ino_key(dev: u32, ino: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..4].copy_from_slice(&dev.to_ne_bytes());
    k[8..16].copy_from_slice(&ino.to_ne_bytes());
    k
}

/// Key of the `anc_prefix` map (`struct cd_anc_key`).
pub fn anc_key(dev: u32, ino: u64, rem: &[u8]) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[0..4].copy_from_slice(&dev.to_ne_bytes());
    k[4..8].copy_from_slice(&(rem.len() as u32).to_ne_bytes());
    k[8..16].copy_from_slice(&ino.to_ne_bytes());
    k[16..24].copy_from_slice(&fnv1a(rem).to_ne_bytes());
    k
}

/// FNV-1a 64, as `match_ancestor()` computes it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// One parsed record: header plus its four data parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub hdr: RawEvent,
    /// Leaf-first, NUL-terminated dentry names per part.
    pub walk: [&'a [u8]; 2],
    /// NUL-terminated user path string per part (empty slice when absent).
    pub str: [&'a [u8]; 2],
}

/// Why a record could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {0} bytes is shorter than the {RAW_EVENT_SIZE}-byte header")]
    Short(usize),
    #[error("record declares {declared} data bytes but carries {actual}")]
    Length { declared: usize, actual: usize },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_ne_bytes(a)
}

/// Parses one ring-buffer record.
pub fn parse(b: &[u8]) -> Result<Record<'_>, RecordError> {
    if b.len() < RAW_EVENT_SIZE {
        return Err(RecordError::Short(b.len()));
    }
    let hdr = RawEvent {
        kind: u32_at(b, 0),
        flags: u32_at(b, 4),
        root: [u32_at(b, 8), u32_at(b, 12)],
        pid: u32_at(b, 16),
        tid: u32_at(b, 20),
        seq: u64_at(b, 24),
        ts_ns: u64_at(b, 32),
        walk_len: [u16_at(b, 40), u16_at(b, 42)],
        str_len: [u16_at(b, 44), u16_at(b, 46)],
        skip: [u16_at(b, 48), u16_at(b, 50)],
        dev: u32_at(b, 52),
        dfd: [u32_at(b, 56) as i32, u32_at(b, 60) as i32],
    };
    let lens = [
        usize::from(hdr.walk_len[0]),
        usize::from(hdr.str_len[0]),
        usize::from(hdr.walk_len[1]),
        usize::from(hdr.str_len[1]),
    ];
    let declared: usize = lens.iter().sum();
    let data = &b[RAW_EVENT_SIZE..];
    // The ring buffer rounds records up to 8 bytes; extra tail bytes are padding.
    if data.len() < declared {
        return Err(RecordError::Length {
            declared,
            actual: data.len(),
        });
    }
    let mut o = 0;
    let mut take = |n: usize| {
        let s = &data[o..o + n];
        o += n;
        s
    };
    let w0 = take(lens[0]);
    let s0 = take(lens[1]);
    let w1 = take(lens[2]);
    let s1 = take(lens[3]);
    Ok(Record {
        hdr,
        walk: [w0, w1],
        str: [s0, s1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_roundtrip() {
        let mut b = vec![0u8; RAW_EVENT_SIZE];
        b[0..4].copy_from_slice(&K_RENAME.to_ne_bytes());
        b[8..12].copy_from_slice(&7u32.to_ne_bytes());
        b[24..32].copy_from_slice(&42u64.to_ne_bytes());
        b[40..42].copy_from_slice(&4u16.to_ne_bytes());
        b[44..46].copy_from_slice(&3u16.to_ne_bytes());
        b[56..60].copy_from_slice(&(-100i32).to_ne_bytes());
        b.extend_from_slice(b"abc\0xy\0");
        b.push(0); // ring-buffer padding
        let r = parse(&b).unwrap();
        assert_eq!(r.hdr.kind, K_RENAME);
        assert_eq!(r.hdr.root, [7, 0]);
        assert_eq!(r.hdr.seq, 42);
        assert_eq!(r.hdr.dfd[0], AT_FDCWD);
        assert_eq!(r.walk[0], b"abc\0");
        assert_eq!(r.str[0], b"xy\0");
        assert!(r.walk[1].is_empty() && r.str[1].is_empty());
        assert!(matches!(parse(&b[..70]), Err(RecordError::Length { .. })));
        assert!(matches!(parse(&b[..10]), Err(RecordError::Short(10))));
    }

    #[test]
    fn fnv_matches_reference() {
        assert_eq!(fnv1a(b""), FNV_OFFSET);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
