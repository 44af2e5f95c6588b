//! Turning kernel records into [`FsEvent`]s relative to their watched root.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cd_core::event::{EventKind, FsEvent};
use cd_core::path::RelPath;

use crate::DecodedEvent;
use crate::abi::{self, Record};

/// What the decoder needs to know about a watched root.
#[derive(Debug, Clone)]
pub(crate) struct RootInfo {
    /// Canonical absolute path.
    pub path: PathBuf,
    /// Kernel `s_dev` of the root's file system.
    pub kdev: u32,
    pub ino: u64,
    /// The root's path relative to each registered ancestor (`anc_prefix` entries),
    /// used to re-check the kernel's hash match.
    pub rems: HashSet<Vec<u8>>,
    /// `anc_prefix` and `ancestors` keys registered for this root.
    pub anc_keys: Vec<([u8; 16], [u8; 24])>,
}

/// Result of normalising one part of a record.
#[derive(Debug, PartialEq, Eq)]
enum Part {
    /// The root itself.
    Root,
    /// A path below the root.
    Path(RelPath),
    /// Normalisation left the root (`..` above it) or the prefix did not check out.
    Outside,
    /// The bytes do not form a valid [`RelPath`]: rescan this (valid) ancestor, or
    /// the whole root when `None`.
    Invalid(Option<RelPath>),
}

/// Joins `reverse(walk)` with the user string minus `skip` bytes and normalises
/// `.`, `..` and empty components.
fn normalise(walk: &[u8], s: &[u8], skip: usize, rems: Option<&HashSet<Vec<u8>>>) -> Part {
    let s = s.strip_suffix(b"\0").unwrap_or(s);
    if skip > 0 {
        // Kernel matched an ancestor prefix by hash: confirm it.
        let Some(rems) = rems else {
            return Part::Outside;
        };
        if skip > s.len() + 1 {
            return Part::Outside;
        }
        let lead = usize::from(s.first() == Some(&b'/'));
        let end = skip.saturating_sub(1);
        if end <= lead || !rems.contains(&s[lead..end]) {
            return Part::Outside;
        }
    }
    let rest = s.get(skip..).unwrap_or_default();
    let mut comps: Vec<&[u8]> = walk
        .split(|&b| b == 0)
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>();
    comps.reverse();
    for c in rest.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if comps.pop().is_none() {
                    return Part::Outside;
                }
            }
            c => comps.push(c),
        }
    }
    if comps.is_empty() {
        return Part::Root;
    }
    let joined = comps.join(&b'/');
    match RelPath::new(joined) {
        Ok(p) => Part::Path(p),
        Err(e) => {
            tracing::warn!(error = %e, path = %String::from_utf8_lossy(&comps.join(&b'/')),
                "kernel path is not a valid RelPath; reporting Lost for its parent");
            // Longest valid ancestor.
            let mut n = comps.len() - 1;
            while n > 0 {
                if let Ok(p) = RelPath::new(comps[..n].join(&b'/')) {
                    return Part::Invalid(Some(p));
                }
                n -= 1;
            }
            Part::Invalid(None)
        }
    }
}

fn lstat_is_dir(p: &Path) -> Option<bool> {
    std::fs::symlink_metadata(p).ok().map(|m| m.is_dir())
}

fn abs(root: &RootInfo, rel: &RelPath) -> PathBuf {
    root.path.join(OsStr::from_bytes(rel.as_bytes()))
}

/// Best effort: is the (raw, process-relative) rename target a directory? Looks it
/// up through `/proc/<pid>/{root,cwd,fd/N}`.
fn proc_is_dir(pid: u32, dfd: i32, s: &[u8]) -> Option<bool> {
    let s = s.strip_suffix(b"\0").unwrap_or(s);
    let base = if s.first() == Some(&b'/') {
        format!("/proc/{pid}/root")
    } else if dfd == abi::AT_FDCWD {
        format!("/proc/{pid}/cwd")
    } else {
        format!("/proc/{pid}/fd/{dfd}")
    };
    let mut p = PathBuf::from(base).into_os_string().into_vec();
    if s.first() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(s);
    lstat_is_dir(Path::new(OsStr::from_bytes(&p)))
}

use std::os::unix::ffi::OsStringExt;

/// Decodes one record into zero or more events, appended to `out`.
pub(crate) fn decode(
    rec: &Record<'_>,
    roots: &BTreeMap<u32, RootInfo>,
    out: &mut Vec<DecodedEvent>,
) {
    let before = out.len();
    decode_into(rec, roots, out);
    if out.len() == before {
        tracing::trace!(
            kind = rec.hdr.kind,
            seq = rec.hdr.seq,
            "kernel record yielded no event"
        );
    }
}

fn decode_into(rec: &Record<'_>, roots: &BTreeMap<u32, RootInfo>, out: &mut Vec<DecodedEvent>) {
    let h = &rec.hdr;
    let pid = h.pid;
    let seq = h.seq;
    let push = |out: &mut Vec<DecodedEvent>, root_id: u32, kind, path, path2, is_dir| {
        out.push(DecodedEvent {
            root_id,
            seq,
            event: FsEvent {
                kind,
                path,
                path2,
                is_dir,
                pid,
            },
        });
    };

    if h.kind == abi::K_OVERFLOW {
        for (&id, r) in roots {
            if r.kdev == h.dev {
                push(out, id, EventKind::Lost, None, None, true);
            }
        }
        return;
    }

    let part = |i: usize| -> (u32, Option<&RootInfo>, Part) {
        let id = h.root[i];
        let Some(info) = roots.get(&id) else {
            return (id, None, Part::Outside);
        };
        let p = normalise(
            rec.walk[i],
            rec.str[i],
            usize::from(h.skip[i]),
            Some(&info.rems),
        );
        (id, Some(info), p)
    };
    let dir_known = h.flags & abi::F_DIR_KNOWN != 0;
    let flag_dir = h.flags & abi::F_DIR != 0;

    let (id0, info0, p0) = part(0);
    if h.kind != abi::K_RENAME {
        let Some(info0) = info0 else { return };
        let path = match p0 {
            Part::Path(p) => p,
            Part::Root | Part::Outside => return,
            Part::Invalid(parent) => {
                push(out, id0, EventKind::Lost, parent, None, true);
                return;
            }
        };
        let is_dir = if dir_known {
            flag_dir
        } else {
            lstat_is_dir(&abs(info0, &path)).unwrap_or(false)
        };
        let kind = match h.kind {
            abi::K_OPEN_WRITE => {
                if h.flags & abi::F_CREATED != 0 {
                    push(out, id0, EventKind::Create, Some(path.clone()), None, false);
                }
                EventKind::OpenWrite
            }
            abi::K_MODIFY => EventKind::Modify,
            abi::K_MMAP_WRITE => EventKind::MmapWrite,
            abi::K_CLOSE_WRITE => EventKind::CloseWrite,
            abi::K_CREATE => EventKind::Create,
            abi::K_MKDIR => EventKind::Mkdir,
            abi::K_SYMLINK => EventKind::Symlink,
            abi::K_LINK => EventKind::Link,
            abi::K_ATTRIB => EventKind::Attrib,
            abi::K_UNLINK => EventKind::Unlink,
            abi::K_RMDIR => EventKind::Rmdir,
            other => {
                tracing::warn!(kind = other, "unknown kernel event kind");
                push(out, id0, EventKind::Lost, None, None, true);
                return;
            }
        };
        push(out, id0, kind, Some(path), None, is_dir);
        return;
    }

    // Rename: each side may be inside a (different) root or outside every root.
    let (id1, info1, p1) = part(1);
    let lost = |out: &mut Vec<DecodedEvent>, id: u32, p: Option<RelPath>| {
        push(out, id, EventKind::Lost, p, None, true);
    };
    if h.flags & abi::F_EXCHANGE != 0 {
        // Both names still exist with swapped content: rescan both.
        for (id, p) in [(id0, p0), (id1, p1)] {
            match p {
                Part::Path(p) => lost(out, id, Some(p)),
                Part::Invalid(p) => lost(out, id, p),
                Part::Root | Part::Outside => {}
            }
        }
        return;
    }
    // Type of the moved object: look at its new location.
    let new_is_dir = match (&p1, info1) {
        (Part::Path(p), Some(i)) => lstat_is_dir(&abs(i, p)),
        _ => proc_is_dir(pid, h.dfd[1], rec.str[1]),
    }
    .unwrap_or(false);
    match (p0, p1) {
        (Part::Path(a), Part::Path(b)) if id0 == id1 => {
            push(out, id0, EventKind::Rename, Some(a), Some(b), new_is_dir);
        }
        (a, b) => {
            match a {
                Part::Path(a) => {
                    let k = if new_is_dir {
                        EventKind::Rmdir
                    } else {
                        EventKind::Unlink
                    };
                    push(out, id0, k, Some(a), None, new_is_dir);
                }
                Part::Invalid(p) => lost(out, id0, p),
                Part::Root | Part::Outside => {}
            }
            match b {
                Part::Path(b) => {
                    let k = if new_is_dir {
                        EventKind::Mkdir
                    } else {
                        EventKind::Create
                    };
                    push(out, id1, k, Some(b), None, new_is_dir);
                }
                Part::Invalid(p) => lost(out, id1, p),
                Part::Root | Part::Outside => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn walk_and_string_are_joined_and_normalised() {
        assert_eq!(normalise(b"c\0b\0", b"", 0, None), Part::Path(rp("b/c")));
        assert_eq!(normalise(b"", b"x//./y\0", 0, None), Part::Path(rp("x/y")));
        assert_eq!(normalise(b"d\0", b"../e\0", 0, None), Part::Path(rp("e")));
        assert_eq!(normalise(b"", b"../e\0", 0, None), Part::Outside);
        assert_eq!(normalise(b"", b".\0", 0, None), Part::Root);
        assert_eq!(normalise(b"", b"\0", 0, None), Part::Root);
    }

    #[test]
    fn ancestor_skip_is_checked() {
        let rems: HashSet<Vec<u8>> = [b"srv/www".to_vec()].into();
        assert_eq!(
            normalise(b"", b"/srv/www/a\0", 9, Some(&rems)),
            Part::Path(rp("a"))
        );
        assert_eq!(
            normalise(b"", b"srv/www/a/b\0", 8, Some(&rems)),
            Part::Path(rp("a/b"))
        );
        assert_eq!(
            normalise(b"", b"/srv/wwx/a\0", 9, Some(&rems)),
            Part::Outside
        );
    }
}
