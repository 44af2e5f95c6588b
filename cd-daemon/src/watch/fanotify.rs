//! The fanotify capture backend: used where the eBPF programs cannot load.
//!
//! One fanotify group (`FAN_CLASS_NOTIF`, `FAN_UNLIMITED_QUEUE`, non-blocking) with
//! `FAN_REPORT_DFID_NAME_TARGET` (= `FAN_REPORT_FID | FAN_REPORT_DFID_NAME |
//! FAN_REPORT_TARGET_FID`, Linux ≥ 5.17) holds one **filesystem mark** per filesystem
//! that carries a content root. The kernel therefore reports every change on those
//! filesystems, identified by *file handles*, not paths; [`FanotifyWatcher::poll`]
//! turns them into `(root_id, FsEvent)` relative to each watched root and drops what
//! lies outside every root.
//!
//! # What the kernel gives, and how it is decoded
//!
//! | record | meaning |
//! | --- | --- |
//! | `DFID_NAME` | parent directory handle + entry name (`"."` = the directory itself) |
//! | `OLD_DFID_NAME` / `NEW_DFID_NAME` | both sides of a `FAN_RENAME` |
//! | `FID` | the child itself (`TARGET_FID`: also for create/delete/rename) |
//! | `DFID` | a directory handle without name (treated like `"."`) |
//!
//! | kernel event | [`EventKind`] |
//! | --- | --- |
//! | `FAN_CREATE` | `Mkdir` (with `FAN_ONDIR`), `Symlink`, `Link` (regular file whose link count is > 1 when read), else `Create` (and `OpenWrite` for a regular file) |
//! | `FAN_DELETE` | `Rmdir` / `Unlink` |
//! | `FAN_RENAME` | `Rename` (both sides in the root), `Create`/`Mkdir` (moved in from outside), `Unlink`/`Rmdir` (moved out) |
//! | `FAN_MODIFY` | `Modify`: write, pwrite, writev, splice, copy_file_range, sendfile, io_uring write, fallocate, truncate, ftruncate, `O_TRUNC` of a non-empty file |
//! | `FAN_CLOSE_WRITE` | `CloseWrite` |
//! | `FAN_ATTRIB` | `Attrib` (chmod, chown, utimensat; `is_dir` for directories) |
//! | `FAN_Q_OVERFLOW` | `Lost { path: None }` for **every** root; [`FanotifyWatcher::overflows`] counts them |
//!
//! A directory handle is turned into a path through a **directory tree cache**: a
//! map from handle to (parent handle, name). Entries are learnt from the events
//! themselves (`mkdir`, `rename`, `rmdir` carry the child's handle with
//! `TARGET_FID`) and, for directories that existed before, by
//! `open_by_handle_at(root fd, handle, O_PATH)` + `readlink("/proc/self/fd/N")` (the
//! name) + `name_to_handle_at("..")` (the parent), walking up until a cached
//! ancestor. Roots are recognised by their handle, so an event belongs to a root iff
//! walking up from its directory meets the root's handle; the relative path is the
//! names met on the way. Renaming a directory is one cache update (its children
//! refer to it by handle); `rmdir` keeps the entry as a tombstone so that events
//! still queued for the removed directory's contents resolve to their old paths.
//! Before a batch is processed, the `rmdir`/`rename`/`mkdir` records of the whole
//! batch seed the cache for directories it does not know yet, so `rm -rf` of a tree
//! that was never looked at still yields exact `Unlink`/`Rmdir` paths.
//!
//! # What it cannot catch (limitations)
//!
//! - **No open-for-write signal.** fanotify has no "opened for writing" event;
//!   `FAN_OPEN` fires for every open including the web server's reads, so it is not
//!   subscribed. [`EventKind::OpenWrite`] is produced only right after the `Create`
//!   of a regular file (open(O_CREAT) created it, so its creator holds it open for
//!   writing until `CloseWrite`); for an existing file the daemon infers the writer
//!   from the first `Modify` (see `realtime::WriterInference`). A writer that opens a
//!   file and holds it without writing is invisible until it closes (`CloseWrite`
//!   without `Modify`: "maybe changed").
//! - **mmap writes are invisible.** Stores into a `MAP_SHARED` mapping, `msync` and
//!   `munmap` produce no event; the only signal is `CloseWrite` when the last
//!   reference to the open file goes away (the later of `close(fd)` and `munmap`).
//!   [`EventKind::MmapWrite`] is never produced.
//! - **Paths are resolved when read, not when the event happened.** A directory that
//!   was not cached is resolved to where it is *now*; if it was renamed after the
//!   event but before `poll`, the event is reported under the new name (the
//!   `Rename` that follows is still reported). The coalescer must treat events as
//!   "look at these paths" and stat them, never as a replayable log.
//! - **The kernel merges events.** An event identical to one still queued (same pid,
//!   same directory, name and child) is folded into it (masks OR-ed, up to 128
//!   events back), so a sequence such as `mv a b; mv b a; mv a b` by one process can
//!   read as `a→b, b→a`. Within one merged event the bits are reported in the order
//!   create, modify, attrib, close-write, delete (create/delete of the same name
//!   are ordered by whether the object still exists).
//! - **pid**: the metadata's tgid of the changing process (0 if it lives in a pid
//!   namespace the daemon cannot see); no command name.
//! - **Unresolvable directories become `Lost`.** If a directory handle can be
//!   neither found in the cache nor opened (removed before it was read, and its
//!   `rmdir` is not in the queue yet), the event is retried until the queue is
//!   drained, then reported as `Lost { path: None }` for every root on that
//!   filesystem: the unknown directory's position in the tree is unknown, so the
//!   whole root is rescanned. Never dropped silently.
//! - The root directory itself has no [`RelPath`]: `chmod` of the root is not
//!   reported; removing or renaming the root yields `Lost { path: None }` for it.
//! - The hard-link count change that `link`/`unlink` causes on the *other* names of
//!   an inode (an inode-only `FAN_ATTRIB` without parent) is not reported.
//! - A filesystem mark sees the **whole filesystem**: on a busy root filesystem all
//!   other activity is read and discarded in user space (cost, not correctness).
//!   Filesystems without file-handle support or with a zero `f_fsid` are refused
//!   ([`FanotifyError::UnsupportedFilesystem`]).
//! - Unmounting a watched filesystem is not reported, and a filesystem mounted
//!   *inside* a root is not watched unless it carries a root of its own.
//! - Needs CAP_SYS_ADMIN (filesystem marks, unlimited queue) and
//!   CAP_DAC_READ_SEARCH (`open_by_handle_at`), and `/proc` mounted.
//!
//! # Older kernels (5.9 – 5.16)
//!
//! Without `FAN_REPORT_TARGET_FID` (EINVAL from `fanotify_init`), the group is made
//! with `FAN_REPORT_FID | FAN_REPORT_DFID_NAME` and `FAN_MOVED_FROM`/`FAN_MOVED_TO`
//! replace `FAN_RENAME`: a `MOVED_FROM` immediately followed (in the read stream,
//! same pid, same directory flag) by a `MOVED_TO` is reported as one `Rename`; an
//! unpaired one as `Unlink`/`Rmdir` or `Create`/`Mkdir`. Created objects are
//! classified by their name as it is when read (no child handle), and directories
//! removed before their events are read cannot be seeded from the batch (their
//! events become `Lost`). Both matrices are tested on this kernel by forcing the
//! mode.
//!
//! # Invariants
//!
//! - Every path emitted is a valid [`RelPath`] under the root it is reported for.
//! - Every event read either yields `FsEvent`s for the roots it concerns, or is
//!   outside all roots, or yields `Lost` for the roots it may concern.
//! - Events are appended in the order they were read, except that an event whose
//!   directory could not be resolved yet is appended later (after the batch that
//!   made it resolvable).
//! - Unsafe code lives only in [`sys`], one syscall per function.

mod sys;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use cd_core::event::{EventKind, FsEvent};
use cd_core::path::RelPath;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};

/// Events the filesystem mark asks for with `FAN_REPORT_TARGET_FID` (≥ 5.17).
///
/// `FAN_MOVED_FROM`/`FAN_MOVED_TO` are left out because `FAN_RENAME` carries both
/// sides in one event (they would only be duplicates), and `FAN_DELETE_SELF` /
/// `FAN_MOVE_SELF` because they duplicate `FAN_DELETE`/`FAN_RENAME` with less
/// information (only the object's own handle, no parent and name).
const MASK_FULL: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_RENAME
    | libc::FAN_MODIFY
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

/// Events asked for on kernels without `FAN_RENAME`.
const MASK_NO_TARGET: u64 =
    (MASK_FULL & !libc::FAN_RENAME) | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;

/// `fanotify_init` flags shared by every mode.
const INIT_BASE: u32 = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;

/// Flags for the files the kernel would open for events (never, in FID mode).
const EVENT_F_FLAGS: i32 = libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC;

/// Size of `struct fanotify_event_metadata`.
const META_LEN: usize = 24;

/// Read buffer: a few thousand events per `read`.
const READ_BUF: usize = 128 * 1024;

/// Directory-cache size at which it is dropped and rebuilt on demand.
const MAX_DIR_NODES: usize = 1 << 18;

/// Deepest walk up the directory cache before it is declared inconsistent.
const MAX_DEPTH: usize = 4096;

/// Why the fanotify backend could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    /// The caller lacks CAP_SYS_ADMIN (fanotify filesystem marks and the unlimited
    /// queue need it).
    #[error(
        "fanotify needs CAP_SYS_ADMIN (run cdd as root or grant the capability): \
         {call} failed: {source}"
    )]
    NeedsCapSysAdmin {
        call: &'static str,
        source: io::Error,
    },
    /// The kernel lacks a feature this backend needs.
    #[error("fanotify backend unsupported on this kernel: {reason}")]
    Unsupported {
        reason: &'static str,
        source: Option<io::Error>,
    },
    /// The filesystem holding a root cannot be watched with file handles.
    #[error("cannot watch {} with fanotify: {reason} ({call}: {source})", path.display())]
    UnsupportedFilesystem {
        call: &'static str,
        path: PathBuf,
        reason: &'static str,
        source: io::Error,
    },
    /// A root id is already in use.
    #[error("content root id {0} is already watched")]
    RootInUse(u32),
    /// The kernel speaks another event format.
    #[error("fanotify event metadata version {0} is not the supported version 3")]
    MetadataVersion(u8),
    /// Any other failed system call.
    #[error("{call} failed{}: {source}", fmt_path(.path.as_deref()))]
    Syscall {
        call: &'static str,
        path: Option<PathBuf>,
        source: io::Error,
    },
}

fn fmt_path(p: Option<&Path>) -> String {
    p.map(|p| format!(" on {}", p.display()))
        .unwrap_or_default()
}

/// Filesystem id as fanotify reports it (`f_fsid` of `statfs`, both words).
type Fsid = u64;

/// An opaque file handle: `handle_type` and its bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Handle {
    kind: i32,
    bytes: Box<[u8]>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.kind)?;
        self.bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Which generation of the fanotify API the group was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiMode {
    /// `FAN_REPORT_DFID_NAME_TARGET` + `FAN_RENAME` (Linux ≥ 5.17).
    Target,
    /// `FAN_REPORT_FID | FAN_REPORT_DFID_NAME`, `FAN_MOVED_FROM`/`FAN_MOVED_TO`.
    NoTarget,
}

impl ApiMode {
    fn init_flags(self) -> u32 {
        match self {
            ApiMode::Target => libc::FAN_REPORT_DFID_NAME_TARGET,
            ApiMode::NoTarget => libc::FAN_REPORT_FID | libc::FAN_REPORT_DFID_NAME,
        }
    }

    fn mask(self) -> u64 {
        match self {
            ApiMode::Target => MASK_FULL,
            ApiMode::NoTarget => MASK_NO_TARGET,
        }
    }
}

// ---------------------------------------------------------------------------------
// Directory tree cache
// ---------------------------------------------------------------------------------

/// Where a cached directory sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not known yet: resolve with `open_by_handle_at`.
    Unknown,
    /// The top of what can be seen (filesystem root or mount root).
    Top,
    /// Entry `name` in directory node `parent`.
    Parent(u32),
}

#[derive(Debug)]
struct Node {
    handle: Handle,
    link: Link,
    name: Box<[u8]>,
    /// Batch generation in which resolving this node last failed: it is not asked
    /// of the filesystem again until the next batch (deferred events are retried
    /// once per batch, and one removed directory may hold thousands of them).
    failed_gen: u64,
}

/// Handle → (parent, name) for directories, in a slab so that walking up allocates
/// nothing and renaming a directory is one update.
#[derive(Debug, Default)]
struct DirTree {
    index: HashMap<Handle, u32>,
    nodes: Vec<Node>,
}

impl DirTree {
    fn intern(&mut self, h: &Handle) -> u32 {
        if let Some(&i) = self.index.get(h) {
            return i;
        }
        let i = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        self.nodes.push(Node {
            handle: h.clone(),
            link: Link::Unknown,
            name: Box::default(),
            failed_gen: 0,
        });
        self.index.insert(h.clone(), i);
        i
    }

    fn set(&mut self, node: u32, link: Link, name: &[u8]) {
        let n = &mut self.nodes[node as usize];
        n.link = link;
        n.name = name.into();
    }

    /// Finds the directory cached as entry `name` of `parent` (used only where the
    /// kernel gives no child handle).
    fn find_child(&self, parent: u32, name: &[u8]) -> Option<u32> {
        self.nodes
            .iter()
            .position(|n| n.link == Link::Parent(parent) && *n.name == *name)
            .and_then(|i| u32::try_from(i).ok())
    }

    fn clear(&mut self) {
        self.index.clear();
        self.nodes.clear();
    }
}

/// One watched content root.
#[derive(Debug)]
struct RootEntry {
    id: u32,
    handle: Handle,
    /// Node of `handle` in the filesystem's tree.
    node: u32,
    /// The root directory, opened `O_RDONLY|O_DIRECTORY`: the mark's object and the
    /// mount fd for `open_by_handle_at`.
    fd: OwnedFd,
    path: PathBuf,
}

/// A directory could not be placed in the tree (see module docs).
#[derive(Debug)]
struct Unresolved;

/// Everything known about one marked filesystem.
#[derive(Debug)]
struct FsState {
    tree: DirTree,
    roots: Vec<RootEntry>,
    /// Some root lies inside another: walks must go on past the first root found.
    nested: bool,
    /// Current batch generation (see [`Node::failed_gen`]).
    batch_gen: u64,
    /// The previous event of a process, when it was a `FAN_RENAME` with a target
    /// handle: (pid, old, new, moved object). `renameat2(RENAME_EXCHANGE)` arrives as
    /// two renames of one process, adjacent among its events (other processes' events
    /// may come between), with swapped sides and different objects.
    last_rename: Option<(u32, DirName, DirName, Handle)>,
}

impl FsState {
    /// Forgets the directory cache, keeping only the roots (whose own place is
    /// looked up again, best effort, to recognise their removal or renaming).
    fn reseed(&mut self) {
        self.tree.clear();
        for r in &mut self.roots {
            r.node = self.tree.intern(&r.handle);
        }
        let nodes: Vec<u32> = self.roots.iter().map(|r| r.node).collect();
        for n in nodes {
            // The root may be a mount's top, or unreachable: then it is just not
            // recognised as an entry of its parent.
            let _ = self.resolve(n);
        }
    }

    /// Roots that are entry `name` of directory `dir` (where the cache last saw
    /// them), or whose handle is `child`.
    fn roots_at(&self, at: &DirName, child: Option<&Handle>) -> Vec<u32> {
        let dir = self.tree.index.get(&at.dir).copied();
        self.roots
            .iter()
            .filter(|r| {
                let n = &self.tree.nodes[r.node as usize];
                child == Some(&r.handle)
                    || (dir.is_some_and(|d| n.link == Link::Parent(d)) && *n.name == *at.name)
            })
            .map(|r| r.id)
            .collect()
    }

    fn update_nested(&mut self) {
        self.nested = self.roots.iter().any(|a| {
            self.roots
                .iter()
                .any(|b| a.id != b.id && a.path.starts_with(&b.path))
        });
    }

    fn root_ids(&self) -> Vec<u32> {
        self.roots.iter().map(|r| r.id).collect()
    }

    /// For every root containing directory `dir`: (root id, path of `dir` relative
    /// to it; empty for the root itself).
    fn locate(&mut self, dir: &Handle) -> Result<Vec<(u32, Vec<u8>)>, Unresolved> {
        if self.tree.nodes.len() >= MAX_DIR_NODES {
            tracing::debug!("fanotify directory cache full; rebuilding on demand");
            self.reseed();
        }
        let start = self.tree.intern(dir);
        match self.walk(start) {
            Ok(hits) => Ok(hits),
            Err(Walk::Unresolved) => Err(Unresolved),
            Err(Walk::TooDeep) => {
                // Only a cycle left by out-of-order updates gets here: start over
                // from what the filesystem says now.
                tracing::debug!("fanotify directory cache inconsistent; rebuilding");
                self.reseed();
                let start = self.tree.intern(dir);
                self.walk(start).map_err(|_| Unresolved)
            }
        }
    }

    fn walk(&mut self, start: u32) -> Result<Vec<(u32, Vec<u8>)>, Walk> {
        let mut hits = Vec::new();
        let mut chain: Vec<u32> = Vec::new();
        let mut cur = start;
        for _ in 0..MAX_DEPTH {
            for r in &self.roots {
                if r.node == cur {
                    hits.push((r.id, self.join_chain(&chain)));
                }
            }
            if !hits.is_empty() && !self.nested {
                return Ok(hits);
            }
            if self.tree.nodes[cur as usize].link == Link::Unknown {
                if self.tree.nodes[cur as usize].failed_gen == self.batch_gen {
                    return Err(Walk::Unresolved);
                }
                if self.resolve(cur).is_err() {
                    self.tree.nodes[cur as usize].failed_gen = self.batch_gen;
                    return Err(Walk::Unresolved);
                }
            }
            match self.tree.nodes[cur as usize].link {
                Link::Top => return Ok(hits),
                Link::Parent(p) => {
                    chain.push(cur);
                    cur = p;
                }
                Link::Unknown => return Err(Walk::Unresolved),
            }
        }
        Err(Walk::TooDeep)
    }

    fn join_chain(&self, chain: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &n in chain.iter().rev() {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(&self.tree.nodes[n as usize].name);
        }
        out
    }

    /// Asks the filesystem where directory `node` is now, walking up (and caching)
    /// until an ancestor that is already known.
    fn resolve(&mut self, mut node: u32) -> Result<(), Unresolved> {
        let handle = self.tree.nodes[node as usize].handle.clone();
        let mut fd = self.open_handle(&handle, OFlags::PATH | OFlags::DIRECTORY)?;
        let mut cur_handle = handle;
        loop {
            let st = rustix::fs::statx(
                &fd,
                "",
                AtFlags::EMPTY_PATH,
                StatxFlags::NLINK | StatxFlags::MNT_ID,
            )
            .map_err(|_| Unresolved)?;
            if st.stx_nlink == 0 {
                // Removed, but still open somewhere: its old place is unknown.
                return Err(Unresolved);
            }
            let link = rustix::fs::readlinkat(
                rustix::fs::CWD,
                format!("/proc/self/fd/{}", fd.as_raw_fd()),
                Vec::new(),
            )
            .map_err(|_| Unresolved)?;
            let link = link.as_bytes();
            let name = link.rsplit(|&b| b == b'/').next().unwrap_or_default();
            let parent = rustix::fs::openat(
                &fd,
                "..",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|_| Unresolved)?;
            let (kind, bytes, mnt) =
                sys::name_to_handle_fd(parent.as_fd()).map_err(|_| Unresolved)?;
            let ph = Handle {
                kind,
                bytes: bytes.into(),
            };
            let same_mount = u64::try_from(mnt).ok() == Some(st.stx_mnt_id);
            if !same_mount || ph == cur_handle || name.is_empty() {
                self.tree.set(node, Link::Top, name);
                return Ok(());
            }
            let p = self.tree.intern(&ph);
            self.tree.set(node, Link::Parent(p), name);
            if self.tree.nodes[p as usize].link != Link::Unknown {
                return Ok(());
            }
            node = p;
            fd = parent;
            cur_handle = ph;
        }
    }

    /// `open_by_handle_at` through the first root whose mount can reach the object.
    fn open_handle(&self, h: &Handle, flags: OFlags) -> Result<OwnedFd, Unresolved> {
        let flags = (flags | OFlags::CLOEXEC).bits();
        let flags = i32::try_from(flags).map_err(|_| Unresolved)?;
        self.roots
            .iter()
            .find_map(|r| sys::open_by_handle_at(r.fd.as_fd(), h.kind, &h.bytes, flags).ok())
            .ok_or(Unresolved)
    }
}

#[derive(Debug)]
enum Walk {
    Unresolved,
    TooDeep,
}

// ---------------------------------------------------------------------------------
// Raw events
// ---------------------------------------------------------------------------------

/// A directory handle and an entry name in it (`"."`: the directory itself).
#[derive(Debug, Clone, PartialEq)]
struct DirName {
    dir: Handle,
    name: Box<[u8]>,
}

/// One fanotify event with its info records decoded but nothing resolved.
#[derive(Debug, Clone)]
struct RawEvent {
    mask: u64,
    pid: u32,
    fsid: Fsid,
    /// `DFID_NAME` or `DFID` (name empty).
    dir: Option<DirName>,
    /// `OLD_DFID_NAME` (also the `MOVED_FROM` side of a paired move).
    old: Option<DirName>,
    /// `NEW_DFID_NAME` (also the `MOVED_TO` side of a paired move).
    new: Option<DirName>,
    /// `FID`: the object itself.
    child: Option<Handle>,
}

impl RawEvent {
    fn is_dir(&self) -> bool {
        self.mask & libc::FAN_ONDIR != 0
    }
}

/// Little-endian-agnostic field readers over the kernel's native-endian structs.
fn rd_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn rd_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn rd_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes one `fanotify_event_info_fid` body (after the 4-byte header):
/// fsid, `struct file_handle`, optional NUL-terminated name.
fn parse_fid(body: &[u8]) -> Option<(Fsid, Handle, Box<[u8]>)> {
    let lo = rd_u32(body, 0)?;
    let hi = rd_u32(body, 4)?;
    let fsid = u64::from(lo) | (u64::from(hi) << 32);
    let hlen = usize::try_from(rd_u32(body, 8)?).ok()?;
    let kind = rd_i32(body, 12)?;
    let bytes = body.get(16..16usize.checked_add(hlen)?)?;
    let rest = &body[16 + hlen..];
    let name = rest.split(|&b| b == 0).next().unwrap_or_default();
    Some((
        fsid,
        Handle {
            kind,
            bytes: bytes.into(),
        },
        name.into(),
    ))
}

/// What one metadata block decoded to.
#[derive(Debug)]
enum Decoded {
    Event(RawEvent),
    Overflow,
    /// Info records the decoder does not understand: treat as loss.
    Malformed,
    /// Nothing this backend reports (e.g. an inode-only event without records).
    Skip,
}

/// Splits the bytes of one `read` into events.
fn decode_buffer(buf: &[u8]) -> Result<Vec<Decoded>, FanotifyError> {
    let mut out = Vec::new();
    let mut off = 0;
    while buf.len() - off >= META_LEN {
        let b = &buf[off..];
        let (Some(event_len), Some(metadata_len), Some(mask), Some(fd), Some(pid)) = (
            rd_u32(b, 0).and_then(|v| usize::try_from(v).ok()),
            rd_u16(b, 6).map(usize::from),
            rd_u64(b, 8),
            rd_i32(b, 16),
            rd_i32(b, 20),
        ) else {
            break;
        };
        let vers = b[4];
        if vers != libc::FANOTIFY_METADATA_VERSION {
            return Err(FanotifyError::MetadataVersion(vers));
        }
        drop(sys::adopt_event_fd(fd));
        if event_len < META_LEN || event_len > b.len() || metadata_len > event_len {
            out.push(Decoded::Malformed);
            break;
        }
        off += event_len;
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            out.push(Decoded::Overflow);
            continue;
        }
        out.push(decode_records(&b[metadata_len..event_len], mask, pid));
    }
    Ok(out)
}

fn decode_records(mut rec: &[u8], mask: u64, pid: i32) -> Decoded {
    let mut ev = RawEvent {
        mask,
        pid: u32::try_from(pid).unwrap_or(0),
        fsid: 0,
        dir: None,
        old: None,
        new: None,
        child: None,
    };
    let mut any = false;
    while rec.len() >= 4 {
        let ty = rec[0];
        let Some(len) = rd_u16(rec, 2).map(usize::from) else {
            return Decoded::Malformed;
        };
        if len < 4 || len > rec.len() {
            return Decoded::Malformed;
        }
        let body = &rec[4..len];
        rec = &rec[len..];
        let slot = match ty {
            libc::FAN_EVENT_INFO_TYPE_FID => None,
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME | libc::FAN_EVENT_INFO_TYPE_DFID => {
                Some(&mut ev.dir)
            }
            libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => Some(&mut ev.old),
            libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => Some(&mut ev.new),
            _ => continue, // pidfd, error records: not ours
        };
        let Some((fsid, handle, name)) = parse_fid(body) else {
            return Decoded::Malformed;
        };
        ev.fsid = fsid;
        any = true;
        match slot {
            None => ev.child = Some(handle),
            Some(s) => *s = Some(DirName { dir: handle, name }),
        }
    }
    if any {
        Decoded::Event(ev)
    } else {
        Decoded::Skip
    }
}

// ---------------------------------------------------------------------------------
// The watcher
// ---------------------------------------------------------------------------------

/// The fanotify capture backend. See the module docs.
pub struct FanotifyWatcher {
    fd: OwnedFd,
    mode: ApiMode,
    mask: u64,
    /// root id → filesystem it lives on.
    root_fs: BTreeMap<u32, Fsid>,
    fss: HashMap<Fsid, FsState>,
    /// Decoded events not yet handed out (one kernel event may yield several).
    ready: VecDeque<(u32, FsEvent)>,
    /// Events whose directory could not be resolved yet.
    deferred: Vec<RawEvent>,
    /// A `MOVED_FROM` waiting for its `MOVED_TO` ([`ApiMode::NoTarget`] only).
    pending_from: Option<RawEvent>,
    buf: Vec<u8>,
    overflows: u64,
    /// Filesystems events arrived for that no root is on: unwatched ones (late
    /// events, expected) and ones already warned about (an fsid mismatch).
    foreign_fsids: HashSet<Fsid>,
}

impl fmt::Debug for FanotifyWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanotifyWatcher")
            .field("fd", &self.fd)
            .field("mode", &self.mode)
            .field("roots", &self.root_fs.keys().collect::<Vec<_>>())
            .field("ready", &self.ready.len())
            .field("deferred", &self.deferred.len())
            .field("overflows", &self.overflows)
            .finish_non_exhaustive()
    }
}

impl AsFd for FanotifyWatcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl FanotifyWatcher {
    /// `fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK |
    /// FAN_UNLIMITED_QUEUE | FAN_REPORT_DFID_NAME_TARGET, O_RDONLY | O_LARGEFILE |
    /// O_CLOEXEC)`, falling back to `FAN_REPORT_FID | FAN_REPORT_DFID_NAME` on
    /// kernels older than 5.17 (see the module docs).
    pub fn new() -> Result<Self, FanotifyError> {
        Self::init(true, None)
    }

    /// Like [`new`](Self::new) but without `FAN_UNLIMITED_QUEUE`, so the kernel's
    /// `max_queued_events` (16384 by default) applies and overflow can be provoked.
    #[doc(hidden)]
    pub fn with_queue_limit_for_test() -> Result<Self, FanotifyError> {
        Self::init(false, None)
    }

    /// Like [`new`](Self::new) but forced into the pre-5.17 mode (no
    /// `FAN_REPORT_TARGET_FID`, `MOVED_FROM`/`MOVED_TO` pairing).
    #[doc(hidden)]
    pub fn without_target_fid_for_test() -> Result<Self, FanotifyError> {
        Self::init(true, Some(ApiMode::NoTarget))
    }

    fn init(unlimited: bool, force: Option<ApiMode>) -> Result<Self, FanotifyError> {
        if !Path::new("/proc/self/fd").is_dir() {
            return Err(FanotifyError::Unsupported {
                reason: "/proc is not mounted (directory handles are resolved through \
                         /proc/self/fd)",
                source: None,
            });
        }
        let base = INIT_BASE
            | if unlimited {
                libc::FAN_UNLIMITED_QUEUE
            } else {
                0
            };
        let ev_flags = u32::try_from(EVENT_F_FLAGS).unwrap_or(0);
        let modes: &[ApiMode] = match force {
            Some(m) => &[m][..],
            None => &[ApiMode::Target, ApiMode::NoTarget],
        };
        let mut last = None;
        for &mode in modes {
            match sys::fanotify_init(base | mode.init_flags(), ev_flags) {
                Ok(fd) => {
                    if mode != ApiMode::Target {
                        tracing::info!(
                            "fanotify: FAN_REPORT_TARGET_FID unavailable (kernel < 5.17); \
                             using MOVED_FROM/MOVED_TO pairing"
                        );
                    }
                    return Ok(Self {
                        fd,
                        mode,
                        mask: mode.mask(),
                        root_fs: BTreeMap::new(),
                        fss: HashMap::new(),
                        ready: VecDeque::new(),
                        deferred: Vec::new(),
                        pending_from: None,
                        buf: vec![0; READ_BUF],
                        overflows: 0,
                        foreign_fsids: HashSet::new(),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(FanotifyError::NeedsCapSysAdmin {
                        call: "fanotify_init",
                        source: e,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    return Err(FanotifyError::Unsupported {
                        reason: "kernel built without CONFIG_FANOTIFY",
                        source: Some(e),
                    });
                }
                Err(e) => {
                    return Err(FanotifyError::Syscall {
                        call: "fanotify_init",
                        path: None,
                        source: e,
                    });
                }
            }
        }
        Err(FanotifyError::Unsupported {
            reason: "fanotify_init refused FAN_REPORT_DFID_NAME (needs Linux >= 5.9)",
            source: last,
        })
    }

    /// Adds a filesystem mark (`FAN_MARK_ADD | FAN_MARK_FILESYSTEM`) on the
    /// filesystem holding `root` and remembers the root (fsid + file handle) so that
    /// events are filtered to its subtree. Several roots may share a filesystem (one
    /// mark) and may nest (events are reported to each root containing them).
    pub fn watch_root(&mut self, root_id: u32, root: &Path) -> Result<(), FanotifyError> {
        if self.root_fs.contains_key(&root_id) {
            return Err(FanotifyError::RootInUse(root_id));
        }
        let sys_err = |call: &'static str| {
            let path = root.to_path_buf();
            move |e: io::Error| FanotifyError::Syscall {
                call,
                path: Some(path),
                source: e,
            }
        };
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .map_err(sys_err("open"))?;
        let path = std::fs::canonicalize(root).map_err(sys_err("realpath"))?;
        let fsid = rustix::fs::fstatvfs(&fd)
            .map_err(io::Error::from)
            .map_err(sys_err("fstatfs"))?
            .f_fsid;
        let (kind, bytes, _mnt) =
            sys::name_to_handle_fd(fd.as_fd()).map_err(|e| match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => FanotifyError::UnsupportedFilesystem {
                    call: "name_to_handle_at",
                    path: root.to_path_buf(),
                    reason: "the filesystem does not support file handles",
                    source: e,
                },
                _ => sys_err("name_to_handle_at")(e),
            })?;
        let handle = Handle {
            kind,
            bytes: bytes.into(),
        };
        if !self.fss.contains_key(&fsid) {
            let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM;
            sys::fanotify_mark(self.fd.as_fd(), flags, self.mask, fd.as_fd()).map_err(
                |e| match e.raw_os_error() {
                    Some(libc::EPERM) => FanotifyError::NeedsCapSysAdmin {
                        call: "fanotify_mark",
                        source: e,
                    },
                    Some(libc::EXDEV | libc::ENODEV | libc::EOPNOTSUPP) => {
                        FanotifyError::UnsupportedFilesystem {
                            call: "fanotify_mark",
                            path: root.to_path_buf(),
                            reason: "filesystem has no usable fsid or file handles, \
                                     or is a sub-volume with its own fsid",
                            source: e,
                        }
                    }
                    _ => sys_err("fanotify_mark")(e),
                },
            )?;
        }
        self.foreign_fsids.remove(&fsid);
        let fs = self.fss.entry(fsid).or_insert_with(|| FsState {
            tree: DirTree::default(),
            roots: Vec::new(),
            nested: false,
            batch_gen: 1,
            last_rename: None,
        });
        let node = fs.tree.intern(&handle);
        fs.roots.push(RootEntry {
            id: root_id,
            handle,
            node,
            fd,
            path,
        });
        fs.update_nested();
        // Where the root itself is, to recognise its removal or renaming; a root
        // at the top of a mount simply has no parent.
        let _ = fs.resolve(node);
        self.root_fs.insert(root_id, fsid);
        tracing::debug!(
            root_id,
            root = %root.display(),
            fsid,
            mode = ?self.mode,
            "fanotify watching"
        );
        Ok(())
    }

    /// Stops reporting for `root_id`; removes the filesystem mark when it was the
    /// last root on that filesystem. Undelivered events for the root are dropped.
    pub fn unwatch_root(&mut self, root_id: u32) {
        let Some(fsid) = self.root_fs.remove(&root_id) else {
            return;
        };
        self.ready.retain(|(id, _)| *id != root_id);
        let Some(fs) = self.fss.get_mut(&fsid) else {
            return;
        };
        let Some(pos) = fs.roots.iter().position(|r| r.id == root_id) else {
            return;
        };
        let entry = fs.roots.remove(pos);
        fs.update_nested();
        if fs.roots.is_empty() {
            self.fss.remove(&fsid);
            self.foreign_fsids.insert(fsid);
            self.deferred.retain(|e| e.fsid != fsid);
            let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_FILESYSTEM;
            if let Err(e) = sys::fanotify_mark(self.fd.as_fd(), flags, self.mask, entry.fd.as_fd())
            {
                tracing::warn!(root_id, error = %e, "fanotify_mark(FAN_MARK_REMOVE) failed");
            }
        }
    }

    /// Count of queue-overflow notifications seen (loss signal for metrics).
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Non-blocking drain: reads what the kernel has queued, decodes it and appends
    /// at most `max` `(root_id, event)` pairs to `out`. Returns how many were
    /// appended. Call again while it returns `max` (more may be buffered); when it
    /// returns less, the kernel queue was empty.
    pub fn poll(
        &mut self,
        out: &mut Vec<(u32, FsEvent)>,
        max: usize,
    ) -> Result<usize, FanotifyError> {
        let start = out.len();
        loop {
            while out.len() - start < max {
                match self.ready.pop_front() {
                    Some(e) => out.push(e),
                    None => break,
                }
            }
            if out.len() - start >= max {
                return Ok(out.len() - start);
            }
            match rustix::io::read(&self.fd, &mut self.buf[..]) {
                Ok(0) => {
                    self.finish_drain();
                    if self.ready.is_empty() {
                        return Ok(out.len() - start);
                    }
                }
                Ok(n) => {
                    let decoded = decode_buffer(&self.buf[..n])?;
                    self.process_batch(decoded);
                }
                Err(rustix::io::Errno::AGAIN) => {
                    self.finish_drain();
                    if self.ready.is_empty() {
                        return Ok(out.len() - start);
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(FanotifyError::Syscall {
                        call: "read",
                        path: None,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// The queue is empty: flush a lone `MOVED_FROM` and give up on directories
    /// that still cannot be resolved (→ `Lost`).
    fn finish_drain(&mut self) {
        if let Some(from) = self.pending_from.take() {
            self.run(&unpaired_from(from));
        }
        let deferred = std::mem::take(&mut self.deferred);
        let mut lost: HashSet<Fsid> = HashSet::new();
        for ev in deferred {
            if lost.contains(&ev.fsid) {
                continue;
            }
            if self.process(&ev).is_err() {
                lost.insert(ev.fsid);
                if let Some(fs) = self.fss.get(&ev.fsid) {
                    tracing::warn!(
                        fsid = ev.fsid,
                        mask = ev.mask,
                        "fanotify: directory of an event could not be resolved; \
                         reporting loss for every root on that filesystem"
                    );
                    for id in fs.root_ids() {
                        self.ready.push_back((id, lost_event(None)));
                    }
                }
            }
        }
    }

    fn process_batch(&mut self, batch: Vec<Decoded>) {
        for fs in self.fss.values_mut() {
            fs.batch_gen += 1;
        }
        if self.mode == ApiMode::Target {
            self.seed_from_batch(&batch);
        }
        // Events deferred by earlier batches may resolve now that this batch has
        // seeded the cache; keep them ahead of this batch's events.
        let deferred = std::mem::take(&mut self.deferred);
        for ev in deferred {
            self.run(&ev);
        }
        for d in batch {
            match d {
                Decoded::Event(ev) if self.mode == ApiMode::NoTarget => self.run_no_target(ev),
                Decoded::Event(ev) => self.run(&ev),
                Decoded::Overflow => self.overflow(),
                Decoded::Malformed => {
                    tracing::warn!("fanotify: malformed event record; reporting loss");
                    let ids: Vec<u32> = self.root_fs.keys().copied().collect();
                    for id in ids {
                        self.ready.push_back((id, lost_event(None)));
                    }
                }
                Decoded::Skip => {}
            }
        }
    }

    /// Learns, from the directory-entry records of a whole batch, where directories
    /// that are not cached yet were (see module docs).
    fn seed_from_batch(&mut self, batch: &[Decoded]) {
        for d in batch {
            let Decoded::Event(ev) = d else { continue };
            if !ev.is_dir() {
                continue;
            }
            let Some(child) = &ev.child else { continue };
            let Some(fs) = self.fss.get_mut(&ev.fsid) else {
                continue;
            };
            let at = if ev.mask & libc::FAN_RENAME != 0 {
                ev.old.as_ref()
            } else if ev.mask & (libc::FAN_DELETE | libc::FAN_CREATE) != 0 {
                ev.dir.as_ref()
            } else {
                None
            };
            let Some(at) = at else { continue };
            let c = fs.tree.intern(child);
            if fs.tree.nodes[c as usize].link == Link::Unknown {
                let p = fs.tree.intern(&at.dir);
                if p != c {
                    fs.tree.set(c, Link::Parent(p), &at.name);
                }
            }
        }
    }

    /// Pre-5.17 mode: pairs `MOVED_FROM` with an immediately following `MOVED_TO`.
    fn run_no_target(&mut self, ev: RawEvent) {
        let moves = ev.mask & (libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO);
        if moves == 0 {
            if let Some(from) = self.pending_from.take() {
                self.run(&unpaired_from(from));
            }
            self.run(&ev);
            return;
        }
        // Bits merged into the same event (e.g. an earlier create of the same
        // name) come first.
        let rest = RawEvent {
            mask: ev.mask & !moves,
            ..ev.clone()
        };
        if rest.mask & !libc::FAN_ONDIR != 0 {
            self.run(&rest);
        }
        // A merged MOVED_TO|MOVED_FROM of one name is ambiguous; take the MOVED_TO
        // first so that it can complete a pending MOVED_FROM.
        if moves & libc::FAN_MOVED_TO != 0 {
            let rename = |old: Option<DirName>| RawEvent {
                mask: libc::FAN_RENAME | (ev.mask & libc::FAN_ONDIR),
                pid: ev.pid,
                fsid: ev.fsid,
                dir: None,
                old,
                new: ev.dir.clone(),
                child: None,
            };
            match self.pending_from.take() {
                Some(f) if f.pid == ev.pid && f.is_dir() == ev.is_dir() && f.fsid == ev.fsid => {
                    self.run(&rename(f.dir));
                }
                other => {
                    if let Some(f) = other {
                        self.run(&unpaired_from(f));
                    }
                    self.run(&rename(None));
                }
            }
        }
        if moves & libc::FAN_MOVED_FROM != 0 {
            if let Some(from) = self.pending_from.take() {
                self.run(&unpaired_from(from));
            }
            self.pending_from = Some(ev);
        }
    }

    /// Processes one event, deferring it when a directory cannot be resolved yet.
    fn run(&mut self, ev: &RawEvent) {
        if self.process(ev).is_err() {
            self.deferred.push(ev.clone());
        }
    }

    fn overflow(&mut self) {
        self.overflows += 1;
        tracing::warn!(
            overflows = self.overflows,
            "fanotify queue overflow: events lost, every root must be rescanned"
        );
        // Whatever was waiting is covered by the whole-root loss.
        self.deferred.clear();
        self.pending_from = None;
        for fs in self.fss.values_mut() {
            // Renames may have been missed: the cache cannot be trusted.
            fs.reseed();
        }
        let ids: Vec<u32> = self.root_fs.keys().copied().collect();
        for id in ids {
            self.ready.push_back((id, lost_event(None)));
        }
    }

    /// Decodes one event into `ready`. All-or-nothing: on `Unresolved` nothing was
    /// emitted (the cache may have learnt something).
    fn process(&mut self, ev: &RawEvent) -> Result<(), Unresolved> {
        let Some(fs) = self.fss.get_mut(&ev.fsid) else {
            // Late events of an unwatched filesystem are expected; anything else
            // means the kernel's fsid differs from statfs's (it should not).
            if self.foreign_fsids.insert(ev.fsid) {
                tracing::warn!(
                    fsid = ev.fsid,
                    "fanotify: events for a filesystem no root is on (fsid mismatch?)"
                );
            }
            return Ok(());
        };
        let is_dir = ev.is_dir();
        let pid = ev.pid;
        if ev.mask & libc::FAN_RENAME != 0 {
            return process_rename(fs, &mut self.ready, ev);
        }
        if fs.last_rename.as_ref().is_some_and(|l| l.0 == pid) {
            fs.last_rename = None;
        }
        let Some(at) = &ev.dir else {
            // Inode-only event on a non-directory (e.g. the link-count FAN_ATTRIB
            // of `link`): no parent, no name, nothing to report.
            tracing::trace!(mask = ev.mask, "fanotify: event without directory record");
            return Ok(());
        };
        let self_event = at.name.is_empty() || &*at.name == b".";
        let hits = fs.locate(&at.dir)?;
        // The root itself being removed: everything under it is gone.
        if is_dir && ev.mask & libc::FAN_DELETE != 0 && !self_event {
            for id in fs.roots_at(at, ev.child.as_ref()) {
                tracing::warn!(root_id = id, "fanotify: content root was removed");
                self.ready.push_back((id, lost_event(None)));
            }
        }
        let mut targets: Vec<(u32, RelPath)> = Vec::with_capacity(hits.len());
        for (id, rel) in hits {
            let path = if self_event {
                if rel.is_empty() {
                    continue; // the root directory itself has no RelPath
                }
                RelPath::new(rel)
            } else if rel.is_empty() {
                RelPath::from_name(&at.name)
            } else {
                RelPath::new(rel).and_then(|p| p.join(&at.name))
            };
            match path {
                Ok(p) => targets.push((id, p)),
                Err(e) => {
                    tracing::warn!(root_id = id, error = %e, "fanotify: unrepresentable path");
                    self.ready.push_back((id, lost_event(None)));
                }
            }
        }

        let mut kinds: Vec<EventKind> = Vec::with_capacity(4);
        let created = ev.mask & libc::FAN_CREATE != 0;
        let deleted = ev.mask & libc::FAN_DELETE != 0;
        let create_kind = || {
            if is_dir {
                (EventKind::Mkdir, false)
            } else {
                classify_created(fs, ev.child.as_ref(), at)
            }
        };
        // A merged create+delete of one name: if the object is still there it was
        // deleted first and created again.
        let delete_first =
            created && deleted && !is_dir && !targets.is_empty() && exists(fs, ev.child.as_ref());
        let del_kind = if is_dir {
            EventKind::Rmdir
        } else {
            EventKind::Unlink
        };
        if delete_first {
            kinds.push(del_kind);
        }
        if created && !targets.is_empty() {
            let (kind, regular) = create_kind();
            kinds.push(kind);
            // fanotify has no "opened for writing" event. A regular file is created
            // by open(O_CREAT): its creator holds it open for writing until the
            // FAN_CLOSE_WRITE (merged into this event if it already happened).
            if regular {
                kinds.push(EventKind::OpenWrite);
            }
        }
        if ev.mask & libc::FAN_MODIFY != 0 {
            kinds.push(EventKind::Modify);
        }
        if ev.mask & libc::FAN_ATTRIB != 0 {
            kinds.push(EventKind::Attrib);
        }
        if ev.mask & libc::FAN_CLOSE_WRITE != 0 {
            kinds.push(EventKind::CloseWrite);
        }
        if deleted && !delete_first {
            kinds.push(del_kind);
        }
        for (id, path) in targets {
            for &kind in &kinds {
                self.ready.push_back((
                    id,
                    FsEvent {
                        kind,
                        path: Some(path.clone()),
                        path2: None,
                        is_dir,
                        pid,
                    },
                ));
            }
        }

        // Keep the directory cache in step with the event.
        if is_dir
            && !self_event
            && (created || deleted)
            && let Some(child) = &ev.child
        {
            let c = fs.tree.intern(child);
            let p = fs.tree.intern(&at.dir);
            if c != p {
                // After rmdir the entry stays as a tombstone (see module docs).
                fs.tree.set(c, Link::Parent(p), &at.name);
            }
        }
        Ok(())
    }
}

/// `FAN_RENAME` (or a paired/unpaired `MOVED_FROM`/`MOVED_TO`).
fn process_rename(
    fs: &mut FsState,
    ready: &mut VecDeque<(u32, FsEvent)>,
    ev: &RawEvent,
) -> Result<(), Unresolved> {
    let is_dir = ev.is_dir();
    let side = |fs: &mut FsState, s: &Option<DirName>| -> Result<Vec<(u32, RelPath)>, Unresolved> {
        let Some(s) = s else { return Ok(Vec::new()) };
        let hits = fs.locate(&s.dir)?;
        Ok(hits
            .into_iter()
            .filter_map(|(id, rel)| {
                let p = if rel.is_empty() {
                    RelPath::from_name(&s.name)
                } else {
                    RelPath::new(rel).and_then(|p| p.join(&s.name))
                };
                p.ok().map(|p| (id, p))
            })
            .collect())
    };
    let olds = side(fs, &ev.old)?;
    let news = side(fs, &ev.new)?;
    let this = match (&ev.old, &ev.new, &ev.child) {
        (Some(o), Some(n), Some(c)) => Some((ev.pid, o.clone(), n.clone(), c.clone())),
        _ => None,
    };
    let exchange = matches!(
        (&fs.last_rename, &this),
        (Some((pp, po, pn, pc)), Some((p, o, n, c))) if pp == p && po == n && pn == o && pc != c
    );
    if exchange {
        fs.last_rename = None;
    } else if this.is_some() || fs.last_rename.as_ref().is_some_and(|l| l.0 == ev.pid) {
        fs.last_rename = this;
    }
    if exchange {
        // The second half of `RENAME_EXCHANGE`: the first was reported as a rename;
        // both names now hold each other's object, which no rename describes.
        // Rescan both.
        for (id, p) in olds.iter().chain(news.iter()) {
            ready.push_back((*id, lost_event(Some(p.clone()))));
        }
        return Ok(());
    }
    let mut ids: Vec<u32> = olds.iter().chain(news.iter()).map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mk = |kind, path: &RelPath, path2: Option<&RelPath>| FsEvent {
        kind,
        path: Some(path.clone()),
        path2: path2.cloned(),
        is_dir,
        pid: ev.pid,
    };
    for id in ids {
        let o = olds.iter().find(|(i, _)| *i == id).map(|(_, p)| p);
        let n = news.iter().find(|(i, _)| *i == id).map(|(_, p)| p);
        let e = match (o, n) {
            (Some(o), Some(n)) => mk(EventKind::Rename, o, Some(n)),
            (Some(o), None) => mk(
                if is_dir {
                    EventKind::Rmdir
                } else {
                    EventKind::Unlink
                },
                o,
                None,
            ),
            (None, Some(n)) => mk(
                if is_dir {
                    EventKind::Mkdir
                } else {
                    EventKind::Create
                },
                n,
                None,
            ),
            (None, None) => continue,
        };
        ready.push_back((id, e));
    }
    if is_dir {
        // The root itself moved: its events still resolve (by handle), but the
        // daemon's idea of where it is does not.
        let moved_roots = match &ev.old {
            Some(o) => fs.roots_at(o, ev.child.as_ref()),
            None => Vec::new(),
        };
        for id in moved_roots {
            tracing::warn!(root_id = id, "fanotify: content root was renamed");
            ready.push_back((id, lost_event(None)));
        }
        let node = match (&ev.child, &ev.old) {
            (Some(c), _) => Some(fs.tree.intern(c)),
            (None, Some(o)) => fs
                .tree
                .index
                .get(&o.dir)
                .copied()
                .and_then(|p| fs.tree.find_child(p, &o.name)),
            (None, None) => None,
        };
        if let Some(c) = node {
            match &ev.new {
                Some(n) => {
                    let p = fs.tree.intern(&n.dir);
                    if p != c {
                        fs.tree.set(c, Link::Parent(p), &n.name);
                    }
                }
                None => fs.tree.set(c, Link::Unknown, b""),
            }
        }
    }
    Ok(())
}

fn unpaired_from(from: RawEvent) -> RawEvent {
    RawEvent {
        mask: libc::FAN_RENAME | (from.mask & libc::FAN_ONDIR),
        old: from.dir.clone(),
        new: None,
        dir: None,
        child: None,
        ..from
    }
}

fn lost_event(path: Option<RelPath>) -> FsEvent {
    FsEvent {
        kind: EventKind::Lost,
        path,
        path2: None,
        is_dir: true,
        pid: 0,
    }
}

/// `Symlink`, `Link` (a regular file with more than one name) or `Create`, from
/// the created object's own handle, or (without one) from entry `at` as it is now,
/// and whether it is a regular file just created (not a link to an existing one).
/// Unknown (already gone) → `Create` of a regular file (the common case, and the
/// safe one: it waits for its close).
fn classify_created(fs: &FsState, child: Option<&Handle>, at: &DirName) -> (EventKind, bool) {
    let st = match child {
        Some(h) => fs
            .open_handle(h, OFlags::PATH)
            .ok()
            .and_then(|fd| rustix::fs::fstat(&fd).ok()),
        None => fs
            .open_handle(&at.dir, OFlags::PATH | OFlags::DIRECTORY)
            .ok()
            .and_then(|d| rustix::fs::statat(&d, &*at.name, AtFlags::SYMLINK_NOFOLLOW).ok()),
    };
    match st {
        Some(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => (EventKind::Symlink, false),
            FileType::RegularFile if st.st_nlink > 1 => (EventKind::Link, false),
            FileType::RegularFile => (EventKind::Create, true),
            _ => (EventKind::Create, false),
        },
        None => (EventKind::Create, true),
    }
}

/// Whether the object a handle names still has a name somewhere.
fn exists(fs: &FsState, child: Option<&Handle>) -> bool {
    child
        .and_then(|h| fs.open_handle(h, OFlags::PATH).ok())
        .and_then(|fd| rustix::fs::fstat(&fd).ok())
        .is_some_and(|st| st.st_nlink > 0)
}

#[cfg(test)]
mod tests;
