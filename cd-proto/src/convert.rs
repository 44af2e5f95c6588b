//! Conversions between wire entries ([`pb::Entry`]) and domain entries
//! ([`cd_core::manifest::Entry`]), wire and domain changes, and wire and domain
//! content-set filters ([`pb::Filter`], [`cd_core::filter::Filter`]).
//!
//! Wire entries come from the network and are untrusted, so the conversion from the
//! wire validates everything the domain type takes for granted. It is also strict: a
//! field that means nothing for the entry's kind (a hash on a directory, a size on a
//! symlink) must be zero or empty, so that every accepted wire entry has exactly one
//! domain meaning and converting back yields the same wire entry.

use cd_core::filter::{CommandMask, Filter, FilterError, Pattern};
use cd_core::manifest::{Entry, EntryKind, Hash, Meta};
use cd_core::path::{PathError, RelPath};

use crate::pb;

/// Why a wire entry is not a valid domain entry. Every variant names the entry's path
/// (once it is known to be valid) and the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("entry field `path` {path:?} is invalid: {reason}")]
    Path {
        /// The path as received, lossily decoded and truncated for display.
        path: String,
        reason: PathError,
    },
    #[error("entry {path:?}: field `kind` has unknown or unspecified value {kind}")]
    UnknownKind { path: RelPath, kind: i32 },
    #[error("entry {path:?}: field `hash` is {len} bytes, a regular file needs 32")]
    FileHashLen { path: RelPath, len: usize },
    #[error("entry {path:?}: field `{field}` must be empty or zero for a {kind}")]
    UnexpectedField {
        path: RelPath,
        field: &'static str,
        kind: &'static str,
    },
    #[error("entry {path:?}: field `mode` is {mode:#o}, beyond the permission bits 0o7777")]
    Mode { path: RelPath, mode: u32 },
    #[error("entry {path:?}: field `mtime_nsec` is {nsec}, not below 1000000000")]
    MtimeNsec { path: RelPath, nsec: u32 },
    #[error("entry {path:?}: field `hardlink_to` {target:?} is invalid: {reason}")]
    HardlinkTo {
        path: RelPath,
        /// The target as received, lossily decoded and truncated for display.
        target: String,
        reason: PathError,
    },
    #[error("entry {path:?}: field `symlink_target` is empty")]
    EmptySymlinkTarget { path: RelPath },
    #[error("entry {path:?}: field `symlink_target` contains a NUL byte")]
    SymlinkNul { path: RelPath },
    #[error("hash is {len} bytes, expected 32")]
    HashLen { len: usize },
    #[error("change has no operation")]
    EmptyChange,
    #[error("change field `{field}` {path:?} is invalid: {reason}")]
    ChangePath {
        field: &'static str,
        /// The path as received, lossily decoded and truncated for display.
        path: String,
        reason: PathError,
    },
}

/// A BLAKE3 hash from its wire form, which must be exactly 32 bytes.
pub fn hash_from_bytes(b: &[u8]) -> Result<Hash, ConvertError> {
    Hash::try_from(b).map_err(|_| ConvertError::HashLen { len: b.len() })
}

/// Bytes for an error message: lossy UTF-8, at most a few hundred bytes.
fn lossy(b: &[u8]) -> String {
    const MAX: usize = 256;
    let mut s = String::from_utf8_lossy(&b[..b.len().min(MAX)]).into_owned();
    if b.len() > MAX {
        s.push('…');
    }
    s
}

/// Fails with [`ConvertError::UnexpectedField`] unless `empty`.
fn require_empty(
    empty: bool,
    path: &RelPath,
    field: &'static str,
    kind: &'static str,
) -> Result<(), ConvertError> {
    if empty {
        Ok(())
    } else {
        Err(ConvertError::UnexpectedField {
            path: path.clone(),
            field,
            kind,
        })
    }
}

impl TryFrom<pb::Entry> for Entry {
    type Error = ConvertError;

    fn try_from(e: pb::Entry) -> Result<Self, Self::Error> {
        // Exhaustive on purpose: a field added to the proto must be considered here.
        let pb::Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            size,
            hash,
            symlink_target,
            hardlink_to,
        } = e;

        let path = RelPath::new(path.as_slice()).map_err(|reason| ConvertError::Path {
            path: lossy(&path),
            reason,
        })?;
        let kind = match pb::EntryKind::try_from(kind) {
            Ok(pb::EntryKind::File) => {
                const K: &str = "regular file";
                require_empty(symlink_target.is_empty(), &path, "symlink_target", K)?;
                let hash = hash_from_bytes(&hash).map_err(|_| ConvertError::FileHashLen {
                    path: path.clone(),
                    len: hash.len(),
                })?;
                let hardlink_to = if hardlink_to.is_empty() {
                    None
                } else {
                    Some(RelPath::new(hardlink_to.as_slice()).map_err(|reason| {
                        ConvertError::HardlinkTo {
                            path: path.clone(),
                            target: lossy(&hardlink_to),
                            reason,
                        }
                    })?)
                };
                EntryKind::File {
                    size,
                    hash,
                    hardlink_to,
                }
            }
            Ok(pb::EntryKind::Dir) => {
                const K: &str = "directory";
                require_empty(size == 0, &path, "size", K)?;
                require_empty(hash.is_empty(), &path, "hash", K)?;
                require_empty(symlink_target.is_empty(), &path, "symlink_target", K)?;
                require_empty(hardlink_to.is_empty(), &path, "hardlink_to", K)?;
                EntryKind::Dir
            }
            Ok(pb::EntryKind::Symlink) => {
                const K: &str = "symlink";
                require_empty(size == 0, &path, "size", K)?;
                require_empty(hash.is_empty(), &path, "hash", K)?;
                require_empty(hardlink_to.is_empty(), &path, "hardlink_to", K)?;
                if symlink_target.is_empty() {
                    return Err(ConvertError::EmptySymlinkTarget { path });
                }
                if symlink_target.contains(&0) {
                    return Err(ConvertError::SymlinkNul { path });
                }
                EntryKind::Symlink {
                    target: symlink_target,
                }
            }
            Ok(pb::EntryKind::Unspecified) | Err(_) => {
                return Err(ConvertError::UnknownKind { path, kind });
            }
        };
        if mode > 0o7777 {
            return Err(ConvertError::Mode { path, mode });
        }
        if mtime_nsec >= 1_000_000_000 {
            return Err(ConvertError::MtimeNsec {
                path,
                nsec: mtime_nsec,
            });
        }
        Ok(Entry {
            path,
            kind,
            meta: Meta {
                mode,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
            },
        })
    }
}

impl From<&Entry> for pb::Entry {
    fn from(e: &Entry) -> Self {
        let Meta {
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
        } = e.meta;
        let mut out = pb::Entry {
            path: e.path.as_bytes().to_vec(),
            kind: 0,
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            ..Default::default()
        };
        match &e.kind {
            EntryKind::File {
                size,
                hash,
                hardlink_to,
            } => {
                out.set_kind(pb::EntryKind::File);
                out.size = *size;
                out.hash = hash.to_vec();
                out.hardlink_to = hardlink_to
                    .as_ref()
                    .map(|p| p.as_bytes().to_vec())
                    .unwrap_or_default();
            }
            EntryKind::Dir => out.set_kind(pb::EntryKind::Dir),
            EntryKind::Symlink { target } => {
                out.set_kind(pb::EntryKind::Symlink);
                out.symlink_target = target.clone();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 1000,
            gid: 33,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 999_999_999,
        }
    }

    fn samples() -> Vec<Entry> {
        vec![
            Entry {
                path: rp("d"),
                kind: EntryKind::Dir,
                meta: Meta {
                    mode: 0o2775,
                    ..meta()
                },
            },
            Entry {
                path: rp("d/f"),
                kind: EntryKind::File {
                    size: 5,
                    hash: [7; 32],
                    hardlink_to: None,
                },
                meta: meta(),
            },
            Entry {
                path: rp("d/g"),
                kind: EntryKind::File {
                    size: 5,
                    hash: [7; 32],
                    hardlink_to: Some(rp("d/f")),
                },
                meta: meta(),
            },
            Entry {
                path: RelPath::new(vec![b'l', 0xff]).unwrap(),
                kind: EntryKind::Symlink {
                    target: b"../etc/x".to_vec(),
                },
                meta: Meta {
                    mode: 0o777,
                    mtime_sec: -5,
                    ..meta()
                },
            },
        ]
    }

    fn wire(e: &Entry) -> pb::Entry {
        pb::Entry::from(e)
    }

    #[test]
    fn round_trip_each_kind() {
        for e in samples() {
            let w = wire(&e);
            assert_eq!(Entry::try_from(w.clone()).as_ref(), Ok(&e));
            assert_eq!(pb::Entry::from(&Entry::try_from(w.clone()).unwrap()), w);
        }
        let w = wire(&samples()[2]);
        assert_eq!(w.kind(), pb::EntryKind::File);
        assert_eq!(w.hardlink_to, b"d/f");
        assert_eq!(w.hash, [7; 32]);
    }

    #[test]
    fn hash_from_bytes_checks_length() {
        assert_eq!(hash_from_bytes(&[1; 32]), Ok([1; 32]));
        assert_eq!(
            hash_from_bytes(&[1; 31]),
            Err(ConvertError::HashLen { len: 31 })
        );
        assert_eq!(hash_from_bytes(&[]), Err(ConvertError::HashLen { len: 0 }));
        assert_eq!(
            hash_from_bytes(&[1; 33]),
            Err(ConvertError::HashLen { len: 33 })
        );
    }

    /// Applies `f` to the wire form of sample `i` and returns the conversion error.
    fn err(i: usize, f: impl FnOnce(&mut pb::Entry)) -> ConvertError {
        let mut w = wire(&samples()[i]);
        f(&mut w);
        Entry::try_from(w).unwrap_err()
    }

    #[test]
    fn each_error_is_reachable() {
        use ConvertError as E;
        let (dir, file, link, symlink) = (0, 1, 2, 3);

        let e = err(file, |w| w.path = b"../etc/passwd".to_vec());
        assert_eq!(
            e,
            E::Path {
                path: "../etc/passwd".into(),
                reason: PathError::DotDot
            }
        );
        assert_eq!(
            e.to_string(),
            "entry field `path` \"../etc/passwd\" is invalid: path has a `..` component"
        );
        let e = err(file, |w| w.path = vec![b'x'; 5000]);
        assert!(
            matches!(&e, E::Path { path, reason: PathError::TooLong { len: 5000 } } if path.len() < 300)
        );

        for k in [0, 4, -1] {
            assert_eq!(
                err(file, |w| w.kind = k),
                E::UnknownKind {
                    path: rp("d/f"),
                    kind: k
                }
            );
        }

        assert_eq!(
            err(file, |w| w.hash.truncate(31)),
            E::FileHashLen {
                path: rp("d/f"),
                len: 31
            }
        );
        assert_eq!(
            err(file, |w| w.hash.clear()),
            E::FileHashLen {
                path: rp("d/f"),
                len: 0
            }
        );

        let unexpected = |path: &str, field, kind| E::UnexpectedField {
            path: rp(path),
            field,
            kind,
        };
        assert_eq!(
            err(file, |w| w.symlink_target = b"x".to_vec()),
            unexpected("d/f", "symlink_target", "regular file")
        );
        assert_eq!(
            err(dir, |w| w.size = 1),
            unexpected("d", "size", "directory")
        );
        assert_eq!(
            err(dir, |w| w.hash = vec![0; 32]),
            unexpected("d", "hash", "directory")
        );
        assert_eq!(
            err(dir, |w| w.symlink_target = b"x".to_vec()),
            unexpected("d", "symlink_target", "directory")
        );
        assert_eq!(
            err(dir, |w| w.hardlink_to = b"x".to_vec()),
            unexpected("d", "hardlink_to", "directory")
        );
        let l = "l\u{fffd}"; // the symlink's non-UTF-8 name, as displayed
        let e = err(symlink, |w| w.size = 8);
        assert!(
            matches!(
                &e,
                E::UnexpectedField {
                    field: "size",
                    kind: "symlink",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("entry {l:?}: field `size` must be empty or zero for a symlink")
        );
        let e = err(symlink, |w| w.hash = vec![0; 32]);
        assert!(
            matches!(
                e,
                E::UnexpectedField {
                    field: "hash",
                    kind: "symlink",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = err(symlink, |w| w.hardlink_to = b"d/f".to_vec());
        assert!(
            matches!(
                e,
                E::UnexpectedField {
                    field: "hardlink_to",
                    ..
                }
            ),
            "{e:?}"
        );

        assert_eq!(
            err(dir, |w| w.mode = 0o10000),
            E::Mode {
                path: rp("d"),
                mode: 0o10000
            }
        );
        assert_eq!(
            err(dir, |w| w.mode = 0o100644).to_string(),
            "entry \"d\": field `mode` is 0o100644, beyond the permission bits 0o7777"
        );
        assert_eq!(
            err(file, |w| w.mtime_nsec = 1_000_000_000),
            E::MtimeNsec {
                path: rp("d/f"),
                nsec: 1_000_000_000
            }
        );

        assert_eq!(
            err(link, |w| w.hardlink_to = b"/d/f".to_vec()),
            E::HardlinkTo {
                path: rp("d/g"),
                target: "/d/f".into(),
                reason: PathError::Absolute
            }
        );

        let e = err(symlink, |w| w.symlink_target.clear());
        assert!(matches!(e, E::EmptySymlinkTarget { .. }), "{e:?}");
        let e = err(symlink, |w| w.symlink_target = b"a\0b".to_vec());
        assert!(matches!(e, E::SymlinkNul { .. }), "{e:?}");
    }

    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(vec![b'a', b'b', b'/', b'.', 0, 0xff]),
            0..8,
        )
    }

    fn arb_wire() -> impl Strategy<Value = pb::Entry> {
        (
            arb_bytes(),
            -1..5i32,
            prop_oneof![0..0o20000u32, any::<u32>()],
            (any::<u32>(), any::<u32>(), any::<i64>()),
            prop_oneof![0..1_000_000_000u32, 999_999_990..=u32::MAX],
            prop_oneof![Just(0u64), any::<u64>()],
            prop_oneof![
                Just(vec![]),
                Just(vec![9; 32]),
                prop::collection::vec(any::<u8>(), 0..40)
            ],
            arb_bytes(),
            arb_bytes(),
        )
            .prop_map(
                |(
                    path,
                    kind,
                    mode,
                    (uid, gid, mtime_sec),
                    mtime_nsec,
                    size,
                    hash,
                    symlink_target,
                    hardlink_to,
                )| {
                    pb::Entry {
                        path,
                        kind,
                        mode,
                        uid,
                        gid,
                        mtime_sec,
                        mtime_nsec,
                        size,
                        hash,
                        symlink_target,
                        hardlink_to,
                    }
                },
            )
    }

    fn arb_relpath() -> impl Strategy<Value = RelPath> {
        prop::collection::vec(
            prop::collection::vec(prop::sample::select(vec![b'a', b'.', b' ', 0xff]), 1..4),
            1..4,
        )
        .prop_filter_map("`.` or `..` component", |cs| {
            RelPath::new(cs.join(&b'/')).ok()
        })
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let kind = prop_oneof![
            (
                any::<u64>(),
                any::<[u8; 32]>(),
                prop::option::of(arb_relpath())
            )
                .prop_map(|(size, hash, hardlink_to)| EntryKind::File {
                    size,
                    hash,
                    hardlink_to
                }),
            Just(EntryKind::Dir),
            prop::collection::vec(1..=255u8, 1..16)
                .prop_map(|target| EntryKind::Symlink { target }),
        ];
        let meta = (
            0..=0o7777u32,
            any::<u32>(),
            any::<u32>(),
            any::<i64>(),
            0..1_000_000_000u32,
        )
            .prop_map(|(mode, uid, gid, mtime_sec, mtime_nsec)| Meta {
                mode,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
            });
        (arb_relpath(), kind, meta).prop_map(|(path, kind, meta)| Entry { path, kind, meta })
    }

    proptest! {
        /// Every domain entry survives the wire.
        #[test]
        fn domain_entries_round_trip(e in arb_entry()) {
            prop_assert_eq!(Entry::try_from(pb::Entry::from(&e)), Ok(e));
        }


        /// Any wire entry either converts or yields a typed error, and an accepted one
        /// converts back to exactly the same wire entry (the mapping is one to one).
        #[test]
        fn wire_entries_convert_or_fail_cleanly(w in arb_wire()) {
            if let Ok(e) = Entry::try_from(w.clone()) {
                prop_assert_eq!(pb::Entry::from(&e), w);
            }
        }
    }
}

fn change_path(field: &'static str, b: Vec<u8>) -> Result<RelPath, ConvertError> {
    let shown = lossy(&b);
    RelPath::new(b).map_err(|reason| ConvertError::ChangePath {
        field,
        path: shown,
        reason,
    })
}

impl TryFrom<pb::Change> for cd_core::changeset::Change {
    type Error = ConvertError;

    fn try_from(c: pb::Change) -> Result<Self, Self::Error> {
        use cd_core::changeset::Change;
        match c.op.ok_or(ConvertError::EmptyChange)? {
            pb::change::Op::Upsert(e) => Ok(Change::Upsert(Entry::try_from(e)?)),
            pb::change::Op::Remove(p) => Ok(Change::Remove(change_path("remove", p)?)),
            pb::change::Op::Rename(r) => Ok(Change::Rename {
                from: change_path("rename.from", r.from)?,
                to: change_path("rename.to", r.to)?,
            }),
        }
    }
}

impl From<&cd_core::changeset::Change> for pb::Change {
    fn from(c: &cd_core::changeset::Change) -> Self {
        use cd_core::changeset::Change;
        let op = match c {
            Change::Upsert(e) => pb::change::Op::Upsert(pb::Entry::from(e)),
            Change::Remove(p) => pb::change::Op::Remove(p.as_bytes().to_vec()),
            Change::Rename { from, to } => pb::change::Op::Rename(pb::Rename {
                from: from.as_bytes().to_vec(),
                to: to.as_bytes().to_vec(),
            }),
        };
        pb::Change {
            op: Some(op),
            version: None,
        }
    }
}

#[cfg(test)]
mod change_tests {
    use cd_core::changeset::Change;

    use super::*;

    #[test]
    fn changes_round_trip_and_refuse_hostile_paths() {
        let p = |s: &str| RelPath::new(s).unwrap();
        for c in [
            Change::Remove(p("a/b")),
            Change::Rename {
                from: p("x"),
                to: p("y/z"),
            },
        ] {
            assert_eq!(Change::try_from(pb::Change::from(&c)).unwrap(), c);
        }
        let evil = pb::Change {
            op: Some(pb::change::Op::Rename(pb::Rename {
                from: b"a".to_vec(),
                to: b"../etc".to_vec(),
            })),
            version: None,
        };
        assert!(matches!(
            Change::try_from(evil),
            Err(ConvertError::ChangePath {
                field: "rename.to",
                reason: PathError::DotDot,
                ..
            })
        ));
        assert_eq!(
            Change::try_from(pb::Change {
                op: None,
                version: None
            }),
            Err(ConvertError::EmptyChange)
        );
        let abs = pb::Change {
            op: Some(pb::change::Op::Remove(b"/etc/passwd".to_vec())),
            version: None,
        };
        assert!(matches!(
            Change::try_from(abs),
            Err(ConvertError::ChangePath {
                reason: PathError::Absolute,
                ..
            })
        ));
    }
}

/// Why a wire [`pb::Filter`] is not a valid [`Filter`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterConvertError {
    #[error("filter {list} pattern {index} ({pattern:?}) has unknown or unspecified kind {kind}")]
    PatternKind {
        list: &'static str,
        index: usize,
        pattern: String,
        kind: i32,
    },
    #[error("filter {list} pattern {index}: {source}")]
    Pattern {
        list: &'static str,
        index: usize,
        #[source]
        source: FilterError,
    },
}

fn patterns_from_wire(
    list: &'static str,
    pats: &[pb::Pattern],
) -> Result<Vec<Pattern>, FilterConvertError> {
    pats.iter()
        .enumerate()
        .map(|(index, p)| {
            let compiled = match pb::PatternKind::try_from(p.kind) {
                Ok(pb::PatternKind::Glob) => Pattern::glob(&p.pattern),
                Ok(pb::PatternKind::Regex) => Pattern::regex(&p.pattern),
                Ok(pb::PatternKind::Unspecified) | Err(_) => {
                    return Err(FilterConvertError::PatternKind {
                        list,
                        index,
                        pattern: p.pattern.clone(),
                        kind: p.kind,
                    });
                }
            };
            compiled.map_err(|source| FilterConvertError::Pattern {
                list,
                index,
                source,
            })
        })
        .collect()
}

/// Compiles a content set's filter as the master sent it. A pattern of unknown kind or
/// one that does not compile is refused (regexes use the `regex` crate: linear-time
/// matching, bounded compiled size).
impl TryFrom<&pb::Filter> for Filter {
    type Error = FilterConvertError;

    fn try_from(f: &pb::Filter) -> Result<Self, Self::Error> {
        Ok(Filter::new(
            patterns_from_wire("include", &f.include)?,
            patterns_from_wire("exclude", &f.exclude)?,
            CommandMask {
                create: !f.deny_create,
                update: !f.deny_update,
                delete: !f.deny_delete,
                r#move: !f.deny_move,
                erase: !f.deny_erase,
            },
        ))
    }
}

impl From<&Filter> for pb::Filter {
    fn from(f: &Filter) -> Self {
        let wire = |pats: &[Pattern]| {
            pats.iter()
                .map(|p| pb::Pattern {
                    kind: match p {
                        Pattern::Glob(_) => pb::PatternKind::Glob,
                        Pattern::Regex(_) => pb::PatternKind::Regex,
                    } as i32,
                    pattern: p.as_str().to_owned(),
                })
                .collect()
        };
        let m = f.commands();
        pb::Filter {
            include: wire(f.include()),
            exclude: wire(f.exclude()),
            deny_create: !m.create,
            deny_update: !m.update,
            deny_delete: !m.delete,
            deny_move: !m.r#move,
            deny_erase: !m.erase,
        }
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    fn glob(s: &str) -> pb::Pattern {
        pb::Pattern {
            kind: pb::PatternKind::Glob as i32,
            pattern: s.into(),
        }
    }

    #[test]
    fn filters_round_trip() {
        let f = Filter::new(
            vec![
                Pattern::glob("*.html").unwrap(),
                Pattern::regex("^static/").unwrap(),
            ],
            vec![Pattern::glob("cache/").unwrap()],
            CommandMask {
                delete: false,
                erase: false,
                ..CommandMask::ALL
            },
        );
        let w = pb::Filter::from(&f);
        assert!(w.deny_delete && w.deny_erase && !w.deny_create && !w.deny_move);
        assert_eq!(w.include[1].kind, pb::PatternKind::Regex as i32);
        assert_eq!(Filter::try_from(&w).unwrap(), f);
    }

    #[test]
    fn an_empty_wire_filter_is_everything() {
        let f = Filter::try_from(&pb::Filter::default()).unwrap();
        assert!(f.is_noop(), "{f:?}");
    }

    #[test]
    fn bad_wire_filters_are_refused() {
        let unspecified = pb::Filter {
            exclude: vec![
                glob("ok"),
                pb::Pattern {
                    kind: 0,
                    pattern: "x".into(),
                },
            ],
            ..Default::default()
        };
        assert!(matches!(
            Filter::try_from(&unspecified),
            Err(FilterConvertError::PatternKind {
                list: "exclude",
                index: 1,
                ..
            })
        ));
        let unknown = pb::Filter {
            include: vec![pb::Pattern {
                kind: 9,
                pattern: "x".into(),
            }],
            ..Default::default()
        };
        assert!(Filter::try_from(&unknown).is_err());
        let bad_glob = pb::Filter {
            include: vec![glob("[z-a]")],
            ..Default::default()
        };
        assert!(matches!(
            Filter::try_from(&bad_glob),
            Err(FilterConvertError::Pattern {
                list: "include",
                index: 0,
                source: FilterError::Glob { .. }
            })
        ));
        let bad_regex = pb::Filter {
            exclude: vec![pb::Pattern {
                kind: pb::PatternKind::Regex as i32,
                pattern: "(".into(),
            }],
            ..Default::default()
        };
        assert!(matches!(
            Filter::try_from(&bad_regex),
            Err(FilterConvertError::Pattern {
                source: FilterError::Regex { .. },
                ..
            })
        ));
    }
}
