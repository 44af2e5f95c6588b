//! What a tree holds: [`Entry`] and [`Manifest`].
//!
//! A manifest is the list of everything beneath a content root except the root itself
//! and the reserved `.cdsync` directory. Regular files carry a BLAKE3 content hash;
//! hard links are expressed as `hardlink_to` pointing at the first path (in tree
//! order) of the same inode, so a manifest never depends on inode numbers.

use std::collections::BTreeMap;

use crate::path::RelPath;

/// Name of the reserved directory at the top of every content root. It holds the
/// staging area and is never scanned, synced or deleted by a sync.
pub const RESERVED_DIR: &[u8] = b".cdsync";

/// A 32-byte BLAKE3 digest of a file's content.
pub type Hash = [u8; 32];

/// Permission bits and ownership. `mode` holds only the low 12 bits
/// (`rwxrwxrwx` plus setuid, setgid, sticky); the file type lives in [`EntryKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Nanoseconds part of the modification time, `< 1_000_000_000`.
    pub mtime_nsec: u32,
}

/// The kind of a tree entry and what its content is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A regular file. `hardlink_to` names an earlier path (tree order) that is the
    /// same inode; such an entry has the same size and hash as its target.
    File {
        size: u64,
        hash: Hash,
        hardlink_to: Option<RelPath>,
    },
    Dir,
    /// A symbolic link; the target is opaque bytes and is never followed.
    Symlink {
        target: Vec<u8>,
    },
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
    pub meta: Meta,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }

    /// The content hash of a regular file.
    pub fn hash(&self) -> Option<&Hash> {
        match &self.kind {
            EntryKind::File { hash, .. } => Some(hash),
            _ => None,
        }
    }
}

/// Why a list of entries is not a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("duplicate path {0}")]
    Duplicate(RelPath),
    #[error("{0} has no parent directory in the manifest")]
    Orphan(RelPath),
    #[error("{0} lies inside the reserved .cdsync directory")]
    Reserved(RelPath),
    #[error(
        "{path} is a hard link to {target}, which is not an earlier regular file with the same content"
    )]
    BadHardlink { path: RelPath, target: RelPath },
}

/// A validated set of entries keyed by path: every parent is present and is a
/// directory, no entry lies under `.cdsync`, and every `hardlink_to` points at a
/// regular file with the same size and hash that itself is not a hard link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: BTreeMap<RelPath, Entry>,
}

impl Manifest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds and validates a manifest from entries in any order.
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Result<Self, ManifestError> {
        let mut map = BTreeMap::new();
        for e in entries {
            if e.path.components().next() == Some(RESERVED_DIR) {
                return Err(ManifestError::Reserved(e.path));
            }
            let p = e.path.clone();
            if map.insert(p.clone(), e).is_some() {
                return Err(ManifestError::Duplicate(p));
            }
        }
        for e in map.values() {
            if let Some(parent) = e.path.parent() {
                match map.get(&parent) {
                    Some(pe) if pe.is_dir() => {}
                    _ => return Err(ManifestError::Orphan(e.path.clone())),
                }
            }
            if let EntryKind::File {
                size,
                hash,
                hardlink_to: Some(t),
            } = &e.kind
            {
                let ok = matches!(map.get(t), Some(Entry {
                    kind: EntryKind::File { size: s2, hash: h2, hardlink_to: None }, ..
                }) if s2 == size && h2 == hash)
                    && t != &e.path;
                if !ok {
                    return Err(ManifestError::BadHardlink {
                        path: e.path.clone(),
                        target: t.clone(),
                    });
                }
            }
        }
        Ok(Self { entries: map })
    }

    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in bytewise path order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Entries in tree order (a directory directly before its contents).
    pub fn iter_tree(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.entries.values().collect();
        v.sort_by(|a, b| a.path.cmp_tree(&b.path));
        v
    }

    /// Total bytes of regular-file content, counting each hard-linked inode once.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                EntryKind::File {
                    size,
                    hardlink_to: None,
                    ..
                } => *size,
                _ => 0,
            })
            .sum()
    }

    pub fn into_entries(self) -> impl Iterator<Item = Entry> {
        self.entries.into_values()
    }
}
