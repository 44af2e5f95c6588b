//! Fixtures shared by the unit tests of this crate: short constructors for paths,
//! entries and manifests.

use crate::lww::{Hlc, Stamp, Version, VersionVector};
use crate::manifest::{Entry, EntryKind, Manifest, Meta};
use crate::path::RelPath;

pub(crate) fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// The metadata every fixture entry carries.
pub(crate) const M: Meta = Meta {
    mode: 0o644,
    uid: 0,
    gid: 0,
    mtime_sec: 1,
    mtime_nsec: 0,
};

pub(crate) fn dir(path: &str) -> Entry {
    Entry {
        path: p(path),
        kind: EntryKind::Dir,
        meta: M,
    }
}

/// A regular file of `n` bytes whose hash is `[n; 32]`.
pub(crate) fn file(path: &str, n: u8) -> Entry {
    Entry {
        path: p(path),
        kind: EntryKind::File {
            size: n.into(),
            hash: [n; 32],
            hardlink_to: None,
        },
        meta: M,
    }
}

/// A hard link at `path` to `target`, which is `file(target, n)`.
pub(crate) fn link(path: &str, target: &str, n: u8) -> Entry {
    Entry {
        path: p(path),
        kind: EntryKind::File {
            size: n.into(),
            hash: [n; 32],
            hardlink_to: Some(p(target)),
        },
        meta: M,
    }
}

pub(crate) fn m(entries: impl IntoIterator<Item = Entry>) -> Manifest {
    Manifest::from_entries(entries).unwrap()
}

/// An N:M version of `origin`'s write number `seq` at `wall` ms (logical 0), having
/// seen `seen` (origin, seq) of the others.
pub(crate) fn version(origin: &str, wall: u64, seq: u64, seen: &[(&str, u64)]) -> Version {
    let mut vv = VersionVector::new();
    for (o, s) in seen {
        vv.observe(o, *s);
    }
    Version::new(
        Stamp {
            hlc: Hlc {
                wall_ms: wall,
                logical: 0,
            },
            origin: origin.into(),
        },
        seq,
        vv,
    )
}
