//! Real-time distribution: kernel events → coalescer → incremental change sets.
//!
//! [`CaptureService`] owns one kernel capture backend per node: eBPF where the kernel
//! loads the programs, else fanotify; which one runs and why is kept for `cdctl
//! status`. A reader task waits on the backend's file descriptor (epoll through
//! tokio's `AsyncFd`, no polling timer) and hands each watched root's events to that
//! content set's task.
//!
//! The per-set task feeds a [`Coalescer`]: a path still open for writing is held back,
//! create+delete cancels, renames stay renames. Each ready batch is resolved against
//! the disk (a changed path is re-examined with [`fs::scan_subtree`], so what ships is
//! what the file holds now, hashed) into an incremental change set numbered `seq`
//! with `base_seq = seq - 1`. A replica that did not apply `seq - 1` (it was down, it
//! restarted, a transfer failed) answers `need_full` and gets the whole tree as change
//! set `seq` instead, so no change is ever skipped silently. Where events were lost
//! beneath a directory (`Rescan` of a subtree) the batch replaces that subtree on the
//! replica with the source's current one; where they were lost for the whole root, or
//! a file with several hard links is touched, or a filtered set loses events, the
//! batch is a full reconcile.
//!
//! The content set's [`Filter`] applies twice: the set task passes every event through
//! [`Filter::filter_event`] before the coalescer, and [`resolve`] passes every change,
//! once its kind is known from the disk, through [`Filter::allows`]. The command mask
//! needs to know whether the replicas hold a path: a [`KnownTree`] answers that (the
//! filtered tree of the last full round, kept up to date with what was shipped since).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::collections::BTreeMap;

use cd_core::changeset::Change;
use cd_core::coalesce::{Batch, Coalescer, CoalescerConfig, PathChange};
use cd_core::event::{EventKind, FsEvent};
use cd_core::filter::{ChangeFacts, Filter};
use cd_core::manifest::{Entry, Manifest};
use cd_core::path::RelPath;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::config::CaptureChoice;
use crate::watch::fanotify::FanotifyWatcher;

/// Events read per backend poll.
const POLL_MAX: usize = 4096;
/// Event batches queued per content set before the set is marked as having lost events.
const SET_QUEUE: usize = 1024;

enum Backend {
    Ebpf(Box<cd_ebpf::Capture>),
    Fanotify(Box<FanotifyWatcher>),
}

impl Backend {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Backend::Ebpf(c) => c.as_fd(),
            Backend::Fanotify(f) => f.as_fd(),
        }
    }

    fn watch(&mut self, root_id: u32, path: &Path) -> anyhow::Result<()> {
        match self {
            Backend::Ebpf(c) => c.watch_root(root_id, path)?,
            Backend::Fanotify(f) => f.watch_root(root_id, path)?,
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(u32, FsEvent)>) -> anyhow::Result<usize> {
        match self {
            Backend::Ebpf(c) => {
                let mut evs = Vec::new();
                let n = c.poll(&mut evs, POLL_MAX);
                out.extend(evs.into_iter().map(|e| (e.root_id, e.event)));
                Ok(n)
            }
            Backend::Fanotify(f) => Ok(f.poll(out, POLL_MAX)?),
        }
    }

    fn lost_count(&self) -> u64 {
        match self {
            Backend::Ebpf(c) => c.drops(),
            Backend::Fanotify(f) => f.overflows(),
        }
    }
}

/// fanotify reports no "opened for writing" event, only `CLOSE_WRITE` for every
/// descriptor that was. The watcher reports `OpenWrite` after the `Create` of a
/// regular file (its creator holds it open). For an existing file, the first `Modify`
/// since its last close is checked against `/proc/<pid>/fd`: if the writing process
/// holds the file open for writing, it has a writer until its `CloseWrite`; if not
/// (`truncate(2)` by path, or the writer already closed it and its `CloseWrite` is
/// queued behind), the change is ready as it is. Without this a file being written
/// would ship half-written, and one changed without an open descriptor would wait
/// for a close that never comes.
#[derive(Debug)]
struct WriterInference {
    open: std::collections::HashSet<(u32, RelPath)>,
    roots: HashMap<u32, std::path::PathBuf>,
    /// Whether process `pid` holds `path` open for writing.
    holds_for_writing: fn(u32, &Path) -> bool,
}

impl Default for WriterInference {
    fn default() -> Self {
        WriterInference {
            open: Default::default(),
            roots: HashMap::new(),
            holds_for_writing: proc_holds_for_writing,
        }
    }
}

/// Whether process `pid` has a descriptor open for writing on the file at `path`
/// (matched by device and inode through `/proc/<pid>/fd` and `fdinfo`). False when
/// the process or the file is gone.
fn proc_holds_for_writing(pid: u32, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if pid == 0 {
        return false;
    }
    let Ok(target) = std::fs::symlink_metadata(path) else {
        return false;
    };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    for fd in fds.flatten() {
        let Ok(m) = std::fs::metadata(fd.path()) else {
            continue;
        };
        if m.dev() != target.dev() || m.ino() != target.ino() {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
        if flags.is_some_and(|f| f & (libc::O_WRONLY | libc::O_RDWR) as u32 != 0) {
            return true;
        }
    }
    false
}

impl WriterInference {
    fn apply(&mut self, root: u32, ev: FsEvent, out: &mut Vec<(u32, FsEvent)>) {
        match (ev.kind, &ev.path) {
            (EventKind::OpenWrite, Some(p)) => {
                self.open.insert((root, p.clone()));
            }
            (EventKind::Modify, Some(p))
                if !ev.is_dir && !self.open.contains(&(root, p.clone())) =>
            {
                let held = self.roots.get(&root).is_some_and(|r| {
                    (self.holds_for_writing)(
                        ev.pid,
                        &r.join(std::ffi::OsStr::from_bytes(p.as_bytes())),
                    )
                });
                if held {
                    self.open.insert((root, p.clone()));
                    out.push((
                        root,
                        FsEvent {
                            kind: EventKind::OpenWrite,
                            path: Some(p.clone()),
                            path2: None,
                            is_dir: false,
                            pid: ev.pid,
                        },
                    ));
                }
            }
            (EventKind::CloseWrite | EventKind::Unlink, Some(p)) => {
                self.open.remove(&(root, p.clone()));
            }
            (EventKind::Rename, Some(from)) => {
                if let Some(to) = &ev.path2 {
                    let moved: Vec<_> = self
                        .open
                        .iter()
                        .filter(|(r, p)| *r == root && p.starts_with(from))
                        .cloned()
                        .collect();
                    for (r, p) in moved {
                        self.open.remove(&(r, p.clone()));
                        if let Some(np) = p.rebase(from, to) {
                            self.open.insert((r, np));
                        }
                    }
                }
            }
            (EventKind::Rmdir, Some(p)) | (EventKind::Lost, Some(p)) => {
                self.open.retain(|(r, q)| !(*r == root && q.starts_with(p)));
            }
            (EventKind::Lost, None) => self.open.retain(|(r, _)| *r != root),
            _ => {}
        }
        out.push((root, ev));
    }
}

struct Subscriber {
    tx: mpsc::Sender<Vec<FsEvent>>,
    /// Set when a batch could not be queued: the set task turns it into a rescan.
    overflowed: Arc<AtomicBool>,
}

/// The node's kernel capture, shared by all its real-time content sets.
pub struct CaptureService {
    backend: Mutex<Backend>,
    /// `"ebpf"` or `"fanotify"`.
    pub kind: &'static str,
    /// Why this backend runs (e.g. the eBPF load error that made us fall back).
    pub reason: String,
    subscribers: Mutex<HashMap<u32, Subscriber>>,
    events: AtomicU64,
    /// Only for fanotify (see [`WriterInference`]).
    writers: Option<Mutex<WriterInference>>,
}

impl std::fmt::Debug for CaptureService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureService")
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// An owned duplicate of the backend's descriptor, for epoll registration.
struct EpollFd(OwnedFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers the descriptor with tokio's reactor (epoll).
#[expect(
    unsafe_code,
    reason = "tokio's AsyncFd registration is an unsafe fn: the caller vouches the descriptor stays valid"
)]
fn register(fd: EpollFd) -> std::io::Result<AsyncFd<EpollFd>> {
    // SAFETY: `EpollFd` owns the `OwnedFd` whose number `as_raw_fd` returns, always the
    // same one, and nothing else closes it: the descriptor stays open and refers to the
    // same file description for the whole life of the `AsyncFd`, which owns `EpollFd`.
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
}

impl CaptureService {
    /// Loads a backend per `choice` and starts its reader task.
    pub fn start(choice: CaptureChoice, ring_buffer_mib: u32) -> anyhow::Result<Arc<Self>> {
        let ebpf = || {
            cd_ebpf::Capture::load(cd_ebpf::CaptureOptions {
                ring_bytes: ring_buffer_mib << 20,
            })
            .map(|c| Backend::Ebpf(Box::new(c)))
        };
        let (backend, kind, reason) = match choice {
            CaptureChoice::Ebpf => (ebpf()?, "ebpf", "configured: capture = \"ebpf\"".to_owned()),
            CaptureChoice::Fanotify => (
                Backend::Fanotify(Box::new(FanotifyWatcher::new()?)),
                "fanotify",
                "configured: capture = \"fanotify\"".to_owned(),
            ),
            CaptureChoice::Auto => match ebpf() {
                Ok(b) => (
                    b,
                    "ebpf",
                    "auto: the kernel loaded the eBPF programs".to_owned(),
                ),
                Err(e) => {
                    let why = format!("auto: eBPF unavailable ({e}); using fanotify");
                    tracing::warn!(reason = %why, "capture backend");
                    (
                        Backend::Fanotify(Box::new(FanotifyWatcher::new()?)),
                        "fanotify",
                        why,
                    )
                }
            },
        };
        tracing::info!(backend = kind, reason = %reason, "kernel change capture started");
        let fd = EpollFd(backend.fd().try_clone_to_owned()?);
        let svc = Arc::new(CaptureService {
            backend: Mutex::new(backend),
            kind,
            reason,
            subscribers: Mutex::new(HashMap::new()),
            events: AtomicU64::new(0),
            writers: (kind == "fanotify").then(|| Mutex::new(WriterInference::default())),
        });
        let afd = register(fd)?;
        crate::metrics::get().watch_capture(&svc);
        tokio::spawn(svc.clone().reader(afd));
        Ok(svc)
    }

    /// Watches `root` for the set task listening on the returned receiver.
    pub fn watch(
        &self,
        root_id: u32,
        root: &Path,
    ) -> anyhow::Result<(mpsc::Receiver<Vec<FsEvent>>, Arc<AtomicBool>)> {
        let (tx, rx) = mpsc::channel(SET_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        self.subscribers.lock().unwrap().insert(
            root_id,
            Subscriber {
                tx,
                overflowed: overflowed.clone(),
            },
        );
        self.backend.lock().unwrap().watch(root_id, root)?;
        if let Some(w) = &self.writers {
            w.lock().unwrap().roots.insert(root_id, root.to_path_buf());
        }
        Ok((rx, overflowed))
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.kind,
            "reason": self.reason,
            "events_total": self.events.load(Ordering::Relaxed),
            "lost_total": self.lost_count(),
        })
    }

    /// Events the backend lost so far (the kernel buffer's or queue's own counter).
    pub fn lost_count(&self) -> u64 {
        self.backend.lock().unwrap().lost_count()
    }

    /// Event batches queued for the content sets' tasks, all sets together.
    pub fn queue_depth(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap()
            .values()
            .map(|s| s.tx.max_capacity() - s.tx.capacity())
            .sum()
    }

    async fn reader(self: Arc<Self>, afd: AsyncFd<EpollFd>) {
        let mut buf: Vec<(u32, FsEvent)> = Vec::new();
        loop {
            let mut guard = match afd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "capture: waiting for events failed; capture stopped");
                    return;
                }
            };
            // Drain everything available; readiness is cleared only after an empty
            // read, and tokio keeps any readiness that arrived meanwhile.
            loop {
                buf.clear();
                let n = match self.backend.lock().unwrap().poll(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "capture: reading events failed");
                        0
                    }
                };
                if buf.is_empty() && n == 0 {
                    guard.clear_ready();
                    break;
                }
                self.events.fetch_add(buf.len() as u64, Ordering::Relaxed);
                crate::metrics::get()
                    .capture_events
                    .get_or_create(&[("backend", self.kind)])
                    .inc_by(buf.len() as u64);
                self.dispatch(&mut buf);
            }
        }
    }

    fn dispatch(&self, buf: &mut Vec<(u32, FsEvent)>) {
        if let Some(w) = &self.writers {
            let mut w = w.lock().unwrap();
            let mut out = Vec::with_capacity(buf.len() + 8);
            for (root, ev) in buf.drain(..) {
                w.apply(root, ev, &mut out);
            }
            *buf = out;
        }
        let mut per_root: HashMap<u32, Vec<FsEvent>> = HashMap::new();
        for (root, ev) in buf.drain(..) {
            per_root.entry(root).or_default().push(ev);
        }
        let subs = self.subscribers.lock().unwrap();
        for (root, evs) in per_root {
            let Some(s) = subs.get(&root) else { continue };
            let n = evs.len() as u64;
            if s.tx.try_send(evs).is_err() {
                // The set task is behind: never drop silently, rescan instead.
                s.overflowed.store(true, Ordering::Relaxed);
                crate::metrics::get()
                    .capture_dropped
                    .get_or_create(&[("backend", self.kind)])
                    .inc_by(n);
            }
        }
    }
}

/// What one batch turned into.
#[derive(Debug, Default)]
pub struct Resolved {
    pub changes: Vec<Change>,
    /// Ship the whole tree instead (events lost for the whole root, or for a filtered
    /// set; hard links involved; or nothing known about the replicas to judge the
    /// filter's command mask by).
    pub full: bool,
    /// Subtrees reconciled in full because events beneath them were lost.
    pub rescanned: u64,
}

/// What the replicas hold, as far as a real-time source knows: path → is a directory.
///
/// Set from the filtered tree of each full round and kept up to date with every change
/// shipped since ([`resolve`] records them as it goes, so later changes of the same
/// batch see earlier ones). It is what [`ChangeFacts::existed`] and, for a removal,
/// [`ChangeFacts::is_dir`] are read from. A replica that kept more (a file the mask
/// did not let it delete) may hold paths this does not list; the replica applies the
/// filter itself and has the last word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownTree {
    /// Keyed by the path's bytes: a subtree is a contiguous range.
    paths: BTreeMap<Vec<u8>, bool>,
}

impl KnownTree {
    pub fn from_manifest(m: &Manifest) -> Self {
        Self {
            paths: m
                .iter()
                .map(|e| (e.path.as_bytes().to_vec(), e.is_dir()))
                .collect(),
        }
    }

    /// `Some(is_dir)` when the replicas hold `p`.
    pub fn get(&self, p: &RelPath) -> Option<bool> {
        self.paths.get(p.as_bytes()).copied()
    }

    /// Keys of `p` and everything beneath it.
    fn subtree(&self, p: &RelPath) -> Vec<Vec<u8>> {
        let mut prefix = p.as_bytes().to_vec();
        prefix.push(b'/');
        let mut out: Vec<Vec<u8>> = self
            .paths
            .get_key_value(p.as_bytes())
            .map(|(k, _)| k.clone())
            .into_iter()
            .collect();
        out.extend(
            self.paths
                .range(prefix.clone()..)
                .map(|(k, _)| k)
                .take_while(|k| k.starts_with(&prefix))
                .cloned(),
        );
        out
    }

    /// Records a change as the replicas will apply it (see [`Change`]).
    pub fn record(&mut self, c: &Change) {
        match c {
            Change::Upsert(e) => {
                let is_dir = e.is_dir();
                // Anything but a directory over a directory replaces its contents.
                if !(is_dir && self.get(&e.path) == Some(true)) {
                    self.remove(&e.path);
                }
                self.paths.insert(e.path.as_bytes().to_vec(), is_dir);
            }
            Change::Remove(p) => self.remove(p),
            Change::Rename { from, to } => {
                if from == to || to.starts_with(from) || self.get(from).is_none() {
                    return;
                }
                let moved: Vec<(Vec<u8>, bool)> = self
                    .subtree(from)
                    .into_iter()
                    .filter_map(|k| self.paths.remove(&k).map(|d| (k, d)))
                    .collect();
                self.remove(to);
                let cut = from.as_bytes().len();
                for (k, d) in moved {
                    let mut nk = to.as_bytes().to_vec();
                    nk.extend_from_slice(&k[cut..]);
                    self.paths.insert(nk, d);
                }
            }
        }
    }

    fn remove(&mut self, p: &RelPath) {
        for k in self.subtree(p) {
            self.paths.remove(&k);
        }
    }
}

/// Resolves a coalesced batch against the disk, under the content set's `filter`.
///
/// Each change is stat'ed (an `Upsert` is re-examined with [`fs::scan_subtree`], so what
/// ships is what the path holds now) and then, unless the filter is a no-op, passed
/// through [`Filter::allows`] with the facts from that stat and from `known`; what the
/// filter drops does not ship, and `known` records what does. A filter that is not a
/// no-op with nothing `known` yields a full reconcile, which sets `known` afresh.
///
/// [`fs::scan_subtree`]: crate::fs::scan_subtree
pub fn resolve(
    root: &crate::fs::Root,
    index: &mut crate::fs::HashIndex,
    batch: &Batch,
    filter: &Filter,
    known: Option<&mut KnownTree>,
) -> Result<Resolved, crate::fs::FsError> {
    let mut r = Resolved::default();
    let mut known = match known {
        _ if filter.is_noop() => None,
        Some(k) => Some(k),
        None => {
            r.full = true;
            return Ok(r);
        }
    };
    for ch in &batch.changes {
        let Some(k) = known.as_deref_mut() else {
            // No filter: every change ships as the coalescer made it.
            match ch {
                PathChange::Upsert { path } => upsert(root, index, path, None, &mut r)?,
                PathChange::Remove { path } => r.changes.push(Change::Remove(path.clone())),
                PathChange::Rename { from, to } => r.changes.push(Change::Rename {
                    from: from.clone(),
                    to: to.clone(),
                }),
                PathChange::Rescan { path: Some(path) } => rescan(root, index, path, &mut r)?,
                PathChange::Rescan { path: None } => r.full = true,
            }
            continue;
        };
        let judged = match ch {
            // Its facts come from the scan: judged entry by entry there.
            PathChange::Upsert { path } => {
                upsert(root, index, path, Some((filter, &mut *k)), &mut r)?;
                continue;
            }
            PathChange::Remove { path } => {
                let was = k.get(path);
                let facts = ChangeFacts {
                    is_dir: was == Some(true),
                    exists: false,
                    existed: was.is_some(),
                };
                filter.allows(ch, facts)
            }
            PathChange::Rename { from, to } => {
                let is_dir = match k.get(from) {
                    Some(d) => d,
                    None => dir_entry(root, to)?.is_some(),
                };
                let facts = ChangeFacts {
                    is_dir,
                    exists: true,
                    existed: k.get(to).is_some(),
                };
                filter.allows(ch, facts)
            }
            PathChange::Rescan { path } => {
                let is_dir = path.as_ref().is_none_or(|p| k.get(p) != Some(false));
                let facts = ChangeFacts {
                    is_dir,
                    exists: true,
                    existed: true,
                };
                filter.allows(ch, facts)
            }
        };
        for c in judged {
            match c {
                // Already judged with these facts; the scan's entries beneath a
                // directory are judged one by one.
                PathChange::Upsert { path } => {
                    upsert(root, index, &path, Some((filter, &mut *k)), &mut r)?
                }
                PathChange::Remove { path } => {
                    let c = Change::Remove(path);
                    k.record(&c);
                    r.changes.push(c);
                }
                PathChange::Rename { from, to } => {
                    let c = Change::Rename { from, to };
                    k.record(&c);
                    r.changes.push(c);
                }
                PathChange::Rescan { .. } => r.full = true,
            }
        }
    }
    if r.full {
        return Ok(r);
    }
    // A change inside a directory moves that directory's mtime on the source, and
    // no event says so: ship the attributes of every parent touched (not its subtree).
    // Every change of the batch counts, shipped or not: the source's directory moved
    // either way, and a full reconcile would ship its attributes too.
    let mut parents = std::collections::BTreeSet::new();
    for ch in &batch.changes {
        match ch {
            PathChange::Upsert { path } | PathChange::Remove { path } => {
                parents.extend(path.parent());
            }
            PathChange::Rename { from, to } => {
                parents.extend(from.parent());
                parents.extend(to.parent());
            }
            PathChange::Rescan { path: Some(p) } => parents.extend(p.parent()),
            PathChange::Rescan { path: None } => {}
        }
    }
    for dir in parents {
        let Some(e) = dir_entry(root, &dir)? else {
            continue;
        };
        if let Some(k) = known.as_deref_mut() {
            let facts = ChangeFacts {
                is_dir: true,
                exists: true,
                existed: k.get(&dir).is_some(),
            };
            if filter
                .allows(&PathChange::Upsert { path: dir.clone() }, facts)
                .is_empty()
            {
                continue;
            }
            let c = Change::Upsert(e);
            k.record(&c);
            r.changes.push(c);
        } else {
            r.changes.push(Change::Upsert(e));
        }
    }
    Ok(r)
}

/// Events were lost beneath `path`: the replica's copy of that subtree is replaced by
/// the source's as it is now. In an incremental change set that is `Remove` then
/// `Upsert`s of everything found; the replica's planner diffs the result against its
/// disk, so unchanged files are kept, not re-sent.
fn rescan(
    root: &crate::fs::Root,
    index: &mut crate::fs::HashIndex,
    path: &RelPath,
    r: &mut Resolved,
) -> Result<(), crate::fs::FsError> {
    match crate::fs::scan_subtree(root, path, index)? {
        None => r.changes.push(Change::Remove(path.clone())),
        Some(s) if s.multi_link => r.full = true,
        Some(s) => {
            r.rescanned += 1;
            r.changes.push(Change::Remove(path.clone()));
            r.changes.extend(s.entries.into_iter().map(Change::Upsert));
        }
    }
    Ok(())
}

/// Resolves an `Upsert` of `path`: what the path holds now (for a directory, with
/// everything beneath it), or its removal if it is gone. With a filter, every entry is
/// judged on its own facts and only what it allows ships (and is recorded as known).
fn upsert(
    root: &crate::fs::Root,
    index: &mut crate::fs::HashIndex,
    path: &RelPath,
    mut filter: Option<(&Filter, &mut KnownTree)>,
    r: &mut Resolved,
) -> Result<(), crate::fs::FsError> {
    let found = crate::fs::scan_subtree(root, path, index)?;
    let Some((f, k)) = filter.as_mut() else {
        match found {
            None => r.changes.push(Change::Remove(path.clone())),
            Some(s) if s.multi_link => r.full = true,
            Some(s) => r.changes.extend(s.entries.into_iter().map(Change::Upsert)),
        }
        return Ok(());
    };
    let entries: Vec<Entry> = match found {
        Some(s) if s.multi_link => {
            r.full = true;
            return Ok(());
        }
        Some(s) => s.entries,
        None => {
            // Gone from the source: a removal, if the replicas hold it and may lose it.
            let was = k.get(path);
            let facts = ChangeFacts {
                is_dir: was == Some(true),
                exists: false,
                existed: was.is_some(),
            };
            let up = PathChange::Upsert { path: path.clone() };
            if !f.allows(&up, facts).is_empty() {
                let c = Change::Remove(path.clone());
                k.record(&c);
                r.changes.push(c);
            }
            return Ok(());
        }
    };
    for e in entries {
        let facts = ChangeFacts {
            is_dir: e.is_dir(),
            exists: true,
            existed: k.get(&e.path).is_some(),
        };
        let up = PathChange::Upsert {
            path: e.path.clone(),
        };
        if f.allows(&up, facts).is_empty() {
            continue;
        }
        let c = Change::Upsert(e);
        k.record(&c);
        r.changes.push(c);
    }
    Ok(())
}

/// The entry of directory `dir` alone (its attributes), or `None` if it is gone or
/// is no longer a directory (another change in the batch accounts for that).
fn dir_entry(root: &crate::fs::Root, dir: &RelPath) -> Result<Option<Entry>, crate::fs::FsError> {
    use rustix::fs::OFlags;
    let fd = match root.open_beneath(
        "stat directory",
        Some(dir),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
    ) {
        Ok(fd) => fd,
        Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
        Err(e) => return Err(e),
    };
    let st = rustix::fs::fstat(&fd)
        .map_err(|e| crate::fs::FsError::io("stat directory", dir.display(), e))?;
    Ok(Some(Entry {
        path: dir.clone(),
        kind: cd_core::manifest::EntryKind::Dir,
        meta: cd_core::manifest::Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
        },
    }))
}

/// A fresh coalescer for a content set.
pub fn coalescer(debounce_ms: u64) -> Coalescer {
    Coalescer::new(CoalescerConfig {
        debounce_ms,
        ..CoalescerConfig::default()
    })
}

/// The event that stands for "events were lost for this whole root".
pub fn lost_root() -> FsEvent {
    FsEvent {
        kind: EventKind::Lost,
        path: None,
        path2: None,
        is_dir: true,
        pid: 0,
    }
}

#[cfg(test)]
mod tests {
    use cd_core::event::{EventKind, FsEvent};
    use cd_core::path::RelPath;

    use super::WriterInference;

    fn ev(kind: EventKind, p: &str) -> FsEvent {
        FsEvent {
            kind,
            path: Some(RelPath::new(p).unwrap()),
            path2: None,
            is_dir: false,
            pid: 1,
        }
    }

    fn kinds(out: &[(u32, FsEvent)]) -> Vec<(EventKind, String)> {
        out.iter()
            .map(|(_, e)| (e.kind, e.path.as_ref().unwrap().display()))
            .collect()
    }

    mod filtered {
        use std::fs;

        use cd_core::changeset::Change;
        use cd_core::coalesce::{Batch, PathChange};
        use cd_core::filter::{CommandMask, Filter, Pattern};
        use cd_core::path::RelPath;

        use super::super::{KnownTree, resolve};
        use crate::fs::{HashIndex, Root, scan};

        fn p(s: &str) -> RelPath {
            RelPath::new(s).unwrap()
        }

        /// A root holding `a.txt`, `d/x.txt`, `gone.txt`, scanned: what the replicas
        /// hold. Then `gone.txt` is removed, `d/x.txt` renamed to `d/y.txt`, and
        /// `new.txt`, `b.tmp` created on the source.
        fn setup() -> (tempfile::TempDir, Root, HashIndex, KnownTree) {
            let tmp = tempfile::tempdir().unwrap();
            let r = tmp.path();
            fs::write(r.join("a.txt"), "a").unwrap();
            fs::create_dir(r.join("d")).unwrap();
            fs::write(r.join("d/x.txt"), "x").unwrap();
            fs::write(r.join("gone.txt"), "g").unwrap();
            let root = Root::open(r).unwrap();
            let mut index = HashIndex::new();
            let (m, _) = scan(&root, &mut index).unwrap();
            fs::remove_file(r.join("gone.txt")).unwrap();
            fs::rename(r.join("d/x.txt"), r.join("d/y.txt")).unwrap();
            fs::write(r.join("new.txt"), "n").unwrap();
            fs::write(r.join("b.tmp"), "b").unwrap();
            (tmp, root, index, KnownTree::from_manifest(&m))
        }

        fn batch() -> Batch {
            Batch {
                changes: vec![
                    PathChange::Remove {
                        path: p("gone.txt"),
                    },
                    PathChange::Rename {
                        from: p("d/x.txt"),
                        to: p("d/y.txt"),
                    },
                    PathChange::Upsert { path: p("new.txt") },
                    PathChange::Upsert { path: p("b.tmp") },
                ],
            }
        }

        fn shape(changes: &[Change]) -> Vec<String> {
            changes
                .iter()
                .map(|c| match c {
                    Change::Upsert(e) => format!("upsert {}", e.path),
                    Change::Remove(p) => format!("remove {p}"),
                    Change::Rename { from, to } => format!("rename {from} {to}"),
                })
                .collect()
        }

        fn filter(commands: CommandMask) -> Filter {
            Filter::new(vec![], vec![Pattern::glob("*.tmp").unwrap()], commands)
        }

        #[test]
        fn excluded_paths_and_forbidden_commands_do_not_ship() {
            let (_tmp, root, mut index, mut known) = setup();
            let no_delete = filter(CommandMask {
                delete: false,
                ..CommandMask::ALL
            });
            let r = resolve(&root, &mut index, &batch(), &no_delete, Some(&mut known)).unwrap();
            assert!(!r.full);
            assert_eq!(
                shape(&r.changes),
                ["rename d/x.txt d/y.txt", "upsert new.txt", "upsert d"],
                "no removal (delete off), no b.tmp (excluded)"
            );
            assert_eq!(
                known.get(&p("gone.txt")),
                Some(false),
                "still on the replicas"
            );
            assert_eq!(known.get(&p("d/x.txt")), None);
            assert_eq!(known.get(&p("d/y.txt")), Some(false));
            assert_eq!(known.get(&p("new.txt")), Some(false));
            assert_eq!(known.get(&p("b.tmp")), None);

            // The same without a filter: everything ships, as the coalescer made it.
            let (_tmp, root, mut index, _) = setup();
            let r = resolve(&root, &mut index, &batch(), &Filter::default(), None).unwrap();
            assert_eq!(
                shape(&r.changes),
                [
                    "remove gone.txt",
                    "rename d/x.txt d/y.txt",
                    "upsert new.txt",
                    "upsert b.tmp",
                    "upsert d"
                ]
            );
        }

        #[test]
        fn a_forbidden_move_ships_as_its_allowed_parts() {
            let (_tmp, root, mut index, mut known) = setup();
            let no_move = filter(CommandMask {
                r#move: false,
                create: false,
                ..CommandMask::ALL
            });
            let r = resolve(&root, &mut index, &batch(), &no_move, Some(&mut known)).unwrap();
            // create off: neither d/y.txt (the move's create part) nor new.txt.
            assert_eq!(
                shape(&r.changes),
                ["remove gone.txt", "remove d/x.txt", "upsert d"]
            );
            let (_tmp, root, mut index, mut known) = setup();
            let no_move = filter(CommandMask {
                r#move: false,
                ..CommandMask::ALL
            });
            let r = resolve(&root, &mut index, &batch(), &no_move, Some(&mut known)).unwrap();
            assert_eq!(
                shape(&r.changes),
                [
                    "remove gone.txt",
                    "upsert d/y.txt",
                    "remove d/x.txt",
                    "upsert new.txt",
                    "upsert d"
                ]
            );
        }

        #[test]
        fn update_off_keeps_what_the_replicas_have() {
            let (tmp, root, mut index, mut known) = setup();
            fs::write(tmp.path().join("a.txt"), "changed").unwrap();
            let no_update = filter(CommandMask {
                update: false,
                ..CommandMask::ALL
            });
            let b = Batch {
                changes: vec![
                    PathChange::Upsert { path: p("a.txt") },
                    PathChange::Upsert { path: p("new.txt") },
                ],
            };
            let r = resolve(&root, &mut index, &b, &no_update, Some(&mut known)).unwrap();
            assert_eq!(shape(&r.changes), ["upsert new.txt"]);
        }

        #[test]
        fn nothing_known_means_a_full_reconcile() {
            let (_tmp, root, mut index, _) = setup();
            let r = resolve(&root, &mut index, &batch(), &filter(CommandMask::ALL), None).unwrap();
            assert!(r.full && r.changes.is_empty(), "{r:?}");
        }

        #[test]
        fn the_known_tree_follows_changes() {
            let m = |v: &[(&str, bool)]| KnownTree {
                paths: v.iter().map(|(s, d)| (s.as_bytes().to_vec(), *d)).collect(),
            };
            let mut k = m(&[("a", true), ("a/x", false), ("a/y", true), ("a.b", false)]);
            k.record(&Change::Rename {
                from: p("a"),
                to: p("c"),
            });
            assert_eq!(
                k,
                m(&[("a.b", false), ("c", true), ("c/x", false), ("c/y", true)])
            );
            k.record(&Change::Remove(p("c")));
            assert_eq!(k, m(&[("a.b", false)]));
            k.record(&Change::Rename {
                from: p("nothing"),
                to: p("a.b"),
            });
            assert_eq!(k, m(&[("a.b", false)]), "a move of nothing changes nothing");
        }
    }

    #[test]
    fn fanotify_writers_are_inferred_until_close() {
        use EventKind::*;
        let mut w = WriterInference {
            holds_for_writing: |_, _| true,
            ..Default::default()
        };
        w.roots.insert(1, "/nonexistent".into());
        let mut out = Vec::new();
        for e in [
            ev(Create, "a"),
            ev(OpenWrite, "a"),
            ev(Modify, "a"),
            ev(CloseWrite, "a"),
            ev(Modify, "a"),
            ev(Modify, "a"),
            ev(CloseWrite, "a"),
        ] {
            w.apply(1, e, &mut out);
        }
        let s = |k, p: &str| (k, p.to_owned());
        assert_eq!(
            kinds(&out),
            [
                s(Create, "a"),
                s(OpenWrite, "a"),
                s(Modify, "a"),
                s(CloseWrite, "a"),
                s(OpenWrite, "a"),
                s(Modify, "a"),
                s(Modify, "a"),
                s(CloseWrite, "a"),
            ]
        );
        // A rename carries the open writer along: its close arrives under the new name.
        out.clear();
        w.apply(1, ev(Modify, "d/f"), &mut out);
        let mut r = ev(Rename, "d");
        r.path2 = Some(RelPath::new("e").unwrap());
        r.is_dir = true;
        w.apply(1, r, &mut out);
        w.apply(1, ev(Modify, "e/f"), &mut out);
        assert!(w.open.contains(&(1, RelPath::new("e/f").unwrap())));
        assert!(!w.open.contains(&(1, RelPath::new("d/f").unwrap())));
        assert_eq!(
            out.iter().filter(|(_, e)| e.kind == OpenWrite).count(),
            1,
            "{out:?}"
        );
        // No process holds it (truncate(2) by path): the change is ready as it is.
        let mut w = WriterInference {
            holds_for_writing: |_, _| false,
            ..Default::default()
        };
        w.roots.insert(1, "/nonexistent".into());
        out.clear();
        w.apply(1, ev(Modify, "t"), &mut out);
        assert_eq!(kinds(&out), [s(Modify, "t")]);
    }
}

#[cfg(test)]
mod writer_tests {
    use std::io::Write;

    use super::proc_holds_for_writing;

    /// The /proc check sees this process's own descriptors, by mode.
    #[test]
    fn proc_check_tells_writers_from_readers() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let me = std::process::id();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"x").unwrap();
        assert!(proc_holds_for_writing(me, &path));
        drop(f);
        let r = std::fs::File::open(&path).unwrap();
        assert!(!proc_holds_for_writing(me, &path));
        drop(r);
        assert!(!proc_holds_for_writing(me, &tmp.path().join("missing")));
        assert!(!proc_holds_for_writing(0, &path));
    }
}

#[cfg(test)]
mod resolve_tests {
    use cd_core::changeset::{Change, ChangeBody, ChangeSet};
    use cd_core::coalesce::{Batch, PathChange};
    use cd_core::filter::Filter;
    use cd_core::manifest::{Entry, EntryKind, Manifest, Meta};
    use cd_core::path::RelPath;

    use super::resolve;
    use crate::fs::{HashIndex, Root};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// A subtree whose events were lost is replaced on the replica by what the source
    /// holds now: entries only the replica has beneath it go, entries outside stay.
    #[test]
    fn lost_subtree_replaces_that_subtree_only() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/x"), b"x").unwrap();
        std::fs::write(tmp.path().join("a/b/y"), b"y").unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let mut index = HashIndex::new();
        let batch = Batch {
            changes: vec![PathChange::Rescan { path: Some(p("a")) }],
        };
        let r = resolve(&root, &mut index, &batch, &Filter::default(), None).unwrap();
        assert!(!r.full);
        assert_eq!(r.rescanned, 1);
        assert_eq!(r.changes[0], Change::Remove(p("a")));
        let upserts: Vec<String> = r.changes[1..]
            .iter()
            .filter_map(|c| match c {
                Change::Upsert(e) => Some(e.path.display()),
                _ => None,
            })
            .collect();
        assert_eq!(upserts, ["a", "a/b", "a/b/y", "a/x"]);

        // The replica had a stale file beneath `a` and an unrelated file beside it.
        let meta = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
        };
        let dir = |path: &str| Entry {
            path: p(path),
            kind: EntryKind::Dir,
            meta,
        };
        let file = |path: &str| Entry {
            path: p(path),
            kind: EntryKind::File {
                size: 1,
                hash: [7; 32],
                hardlink_to: None,
            },
            meta,
        };
        let local = Manifest::from_entries([dir("a"), file("a/stale"), file("keep")]).unwrap();
        let cs = ChangeSet {
            origin: "src".into(),
            seq: 2,
            body: ChangeBody::Incremental(r.changes),
        };
        let want = cs.desired(&local).unwrap();
        let got: Vec<String> = want.iter_tree().iter().map(|e| e.path.display()).collect();
        assert_eq!(got, ["a", "a/b", "a/b/y", "a/x", "keep"]);

        // A lost subtree that no longer exists on the source is removed.
        std::fs::remove_dir_all(tmp.path().join("a")).unwrap();
        let r = resolve(&root, &mut index, &batch, &Filter::default(), None).unwrap();
        assert_eq!(r.changes, [Change::Remove(p("a"))]);
    }
}
