//! [`Coalescer`]: turns a stream of [`FsEvent`]s into ready, ordered [`Batch`]es of
//! [`PathChange`]s.
//!
//! Sans-IO: time is passed in (`now_ms`), nothing is read from disk. The daemon feeds
//! every decoded event to [`Coalescer::handle_event`], calls [`Coalescer::poll_batch`]
//! until it returns `None`, and sleeps until [`Coalescer::poll_timeout`] (or the next
//! event). For each change it then stats/hashes the source and ships a
//! [`Change`](crate::changeset::Change):
//!
//! - [`PathChange::Upsert`]: copy the source's *current* state of that path (kind,
//!   content, attributes; for a directory only the directory itself, never its
//!   contents), or remove it on the replica if the source no longer has it;
//! - [`PathChange::Remove`]: remove the path and everything beneath it;
//! - [`PathChange::Rename`]: rename on the replica (nothing is re-sent); replaces what
//!   is at `to`;
//! - [`PathChange::Rescan`]: reconcile that subtree (or the whole root) in full.
//!
//! # Model
//!
//! Pending work has two parts:
//!
//! - an ordered **log** of structural operations the replica must replay in order
//!   (renames and removals of objects the replica holds, and the `mkdir` of a new
//!   directory something is renamed into, shipped as an `Upsert`), compacted as events
//!   arrive;
//! - **marks** in the current namespace: paths whose content/attributes must be
//!   re-copied (`Upsert`) and subtrees that must be reconciled (`Rescan`).
//!
//! A batch is a prefix of the log, then (only once the whole log has shipped) marks in
//! tree order. The invariant behind it: after the replica replays the log, every path
//! that carries no mark (itself, or a `Rescan` above it) already equals the source.
//! Each event updates the log and marks so that this stays true; each rule below is a
//! local equivalence under it.
//!
//! # Rules
//!
//! - **Close-after-write.** A path with an `OpenWrite` not yet matched by a `CloseWrite`
//!   is held back, never shipped half-written. Opens are counted (two writers need two
//!   closes). `MmapWrite` holds the same way until a later `CloseWrite` or `Modify`. A
//!   held path ships anyway once it has been held *and* changed for
//!   `open_write_max_ms` (a log file that is never closed); after such a forced ship
//!   its later changes wait another `open_write_max_ms` (or its close). `Modify`,
//!   `Attrib` or `CloseWrite` without a preceding `OpenWrite` (a pre-opened fd,
//!   io_uring on a registered fd, `truncate(2)` by path) make the path ready after the
//!   debounce. `OpenWrite` itself marks the path changed (`O_TRUNC`).
//! - **Debounce.** A path is ready `debounce_ms` after its last event (0 = at once).
//!   To keep a path that changes without pause from starving, nothing not held by a
//!   writer waits longer than `open_write_max_ms` after its first unshipped change.
//!   There is no timer: the daemon wakes at [`Coalescer::poll_timeout`]. Log entries
//!   are ready `debounce_ms` after the event that made them.
//! - **Created in the window.** For each tracked path the coalescer knows whether the
//!   replica (once the log is replayed) holds nothing there, an object of the same
//!   kind, or either. `Create`/`Mkdir`/`Symlink`/`Link` of a path it knows nothing
//!   about means the replica holds nothing there (the source did not have it, so
//!   neither does the replica). So create-then-unlink cancels out (nothing is
//!   shipped), while an unlink of anything else ships as `Remove` (when in doubt too:
//!   removing what is absent is harmless). `Unlink` of a file followed by a re-create
//!   of the same path ships a single `Upsert` (the replica replaces in one step,
//!   readers never see it missing); after `Rmdir` the `Remove` stays (an `Upsert` of a
//!   directory over a directory would keep its contents).
//! - **Renames.** The object moves; its pending state (marks, open writers, held state,
//!   and for a directory everything beneath it) moves with it.
//!   - Of an object the replica does not hold (created in the window): nothing is
//!     logged; it ships as `Upsert` of the new name (and of everything beneath it).
//!   - Of an object the replica may or may not hold (a new object renamed over a path
//!     the coalescer knew nothing about, then renamed again): `Remove b` then `Rename
//!     a→b`, so nothing stale survives at `b` if the replica has nothing to move.
//!   - Of an object the replica holds: logged as `Rename`. If its content is also
//!     pending the batch carries `Rename a→b` then `Upsert b`: the replica moves the
//!     old content (the base for a delta) and then receives the new one — never
//!     cheaper as `Upsert b` + `Remove a`, which re-sends everything. A rename whose
//!     content did not change stays a bare `Rename`: nothing is re-sent.
//!   - Chains collapse: `a→b` then `b→c` is `Rename a→c`, followed by `Remove b` unless
//!     the coalescer knows the replica held nothing at `b` (the first rename replaced
//!     whatever `b` was). `a→b→a` leaves at most that `Remove b`. `a→b` then
//!     `Unlink b` is `Remove a` (plus `Remove b` under the same condition), and no
//!     `Remove a` either if a new file already took `a`'s place: an editor's
//!     `mv f f~; create f; rm f~` ships `Remove f~`, `Upsert f`.
//!   - Over an existing target: fine, a `Rename` replaces the target; pending state of
//!     the old target is dropped.
//!   - Into a directory the replica does not have yet (`mkdir d; mv a d/`): the log
//!     carries `Upsert d` before `Rename a→d/a` (the directory is *pinned*). If the
//!     pinned directory is itself renamed or removed before shipping while something
//!     logged still depends on it, the dependent tail of the log is replaced by a
//!     `Rescan` of the smallest subtree holding every path it named (rare; correct,
//!     not cheapest). Removing a pinned directory nothing depends on any more just
//!     drops the pin.
//! - **Removal.** `Unlink`/`Rmdir` drops all pending state at and beneath the path and
//!   ships `Remove` (unless the replica never had it).
//! - **Attributes.** `Attrib` alone ships as `Upsert` (the daemon re-stats; cheap).
//! - **Loss.** `Lost{p}` marks a `Rescan{p}`: pending marks beneath it are dropped (the
//!   rescan covers them) and open-writer counts beneath it are reset (the events that
//!   would balance them may be what was lost). Later events beneath a pending rescan
//!   only keep writer counts; a rename out of it marks the target (`Upsert`, or
//!   `Rescan` for a directory); a rename into it ships as `Remove` of the source.
//!   `Lost` of the whole root collapses everything into one `Rescan{None}`. A rescan is
//!   ready `debounce_ms` after the loss (later events beneath it do not delay it) and is
//!   not held by open writers beneath it; a writer's `CloseWrite` after the rescan
//!   shipped makes the file ship again.
//! - **Memory bound.** When more than `max_pending` paths are tracked, everything
//!   pending collapses into `Rescan`s of the common ancestor of each top-level group of
//!   paths (or one `Rescan{None}` if there would be too many).
//! - Events under the reserved `.cdsync` directory are ignored; a rename out of it
//!   counts as a creation, into it as a removal.
//!
//! # Order within a batch
//!
//! 1. The log, in event order: renames and removals exactly as they happened on the
//!    source (so a directory's `Remove` comes after the renames out of it), each
//!    preceded by the `Upsert` (mkdir) of any new directory it moves something into.
//! 2. Then `Upsert`s and `Rescan`s in tree order ([`RelPath::cmp_tree`]): parents
//!    before children, after every rename (so a rename `a→b` precedes the `Upsert` of
//!    `b`'s new child). Marks ship only once the whole log has shipped; a mark that
//!    ships takes the pending marks of its ancestors along even if they are not ready.
//!
//! Batches hold at most `max_batch` changes; what does not fit stays ready for the
//! next poll, in the same order.
//!
//! # Limits
//!
//! - `Mkdir` means an empty directory. A backend that sees a directory moved into the
//!   root from outside must report `Mkdir` and then `Lost` of it: its contents were
//!   never seen as events.
//! - The daemon should stat an `Upsert` promptly after [`Coalescer::poll_batch`]; an
//!   event that happens in between is handled by a later batch. If an `Upsert`'s path
//!   has vanished by the time it is stat'ed (a rename raced the stat), the replica never
//!   got that content, so a later `Rename` from that path finds nothing: a replica that
//!   sees a `Rename` whose source is missing must re-fetch `to`.
//! - Hard links are the daemon's business: a write through one name is reported for
//!   that name only.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use crate::event::{EventKind, FsEvent};
use crate::manifest::RESERVED_DIR;
use crate::path::RelPath;

/// Tuning of a [`Coalescer`]. Option names carry their units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescerConfig {
    /// A path is ready this long after its last event; 0 ships as soon as ready.
    pub debounce_ms: u64,
    /// Most changes in one [`Batch`] (0 is treated as 1).
    pub max_batch: usize,
    /// A file held open for writing (or mapped writable) and changed for this long is
    /// shipped anyway; its later changes ship again after the same delay or its close.
    /// Also the longest any changed path waits for its debounce to expire.
    pub open_write_max_ms: u64,
    /// Most paths tracked before everything pending collapses into rescans.
    pub max_pending: usize,
}

impl Default for CoalescerConfig {
    fn default() -> Self {
        Self {
            debounce_ms: 0,
            max_batch: 4096,
            open_write_max_ms: 30_000,
            max_pending: 1_000_000,
        }
    }
}

/// One change to ship. Paths are relative to the content root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathChange {
    /// Copy the source's current state of `path` (the entry only, not a directory's
    /// contents), or remove it from the replica if the source no longer has it.
    Upsert { path: RelPath },
    /// Remove `path` and everything beneath it.
    Remove { path: RelPath },
    /// Rename on the replica, replacing what is at `to`; nothing is re-sent.
    Rename { from: RelPath, to: RelPath },
    /// Reconcile the subtree at `path` (`None` = the whole root) in full.
    Rescan { path: Option<RelPath> },
}

/// Changes in an order that is safe to apply one by one on the replica (see the
/// module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub changes: Vec<PathChange>,
}

/// Above this many top-level groups, a memory-bound collapse rescans the whole root.
const MAX_COLLAPSE_ROOTS: usize = 64;

/// What the replica holds at a path once the log is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replica {
    /// Nothing, at or beneath the path: the object was created or moved in during
    /// the window.
    Absent,
    /// An object of the same kind (directory or not) as the source's; if the source
    /// has nothing there, whatever it is goes with the next `Upsert`.
    Same,
    /// Either nothing or an object of the same kind.
    Unknown,
}

/// Pending state of one path in the current (source) namespace.
#[derive(Debug, Clone)]
struct Node {
    /// Needs an `Upsert`.
    dirty: bool,
    replica: Replica,
    /// The object is a directory (as far as events said).
    is_dir: bool,
    /// Open writers (OpenWrite minus CloseWrite).
    writers: u32,
    /// A writable mapping with no CloseWrite/Modify since.
    mmap: bool,
    /// When the current hold (writers or mapping) began, or the last forced ship.
    hold_since: u64,
    /// When `dirty` last became true.
    dirty_since: u64,
    last_event: u64,
    /// The key of this node in `by_time`, if dirty.
    key: Option<u64>,
}

impl Node {
    fn new(replica: Replica) -> Self {
        Self {
            dirty: false,
            replica,
            is_dir: false,
            writers: 0,
            mmap: false,
            hold_since: 0,
            dirty_since: 0,
            last_event: 0,
            key: None,
        }
    }

    fn held(&self) -> bool {
        self.writers > 0 || self.mmap
    }

    fn set_dirty(&mut self, now: u64) {
        if !self.dirty {
            self.dirty = true;
            self.dirty_since = now;
        }
        self.last_event = now;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LogOp {
    Rename {
        from: RelPath,
        to: RelPath,
        /// The replica held nothing at `to` before this rename.
        to_vacant: bool,
        is_dir: bool,
    },
    Remove {
        path: RelPath,
        is_dir: bool,
    },
    /// `mkdir` of a new directory something is renamed into; ships as `Upsert`.
    Pin {
        path: RelPath,
    },
}

impl LogOp {
    fn paths(&self) -> impl Iterator<Item = &RelPath> {
        let (a, b) = match self {
            LogOp::Rename { from, to, .. } => (from, Some(to)),
            LogOp::Remove { path, .. } | LogOp::Pin { path } => (path, None),
        };
        std::iter::once(a).chain(b)
    }
}

#[derive(Debug, Clone)]
struct LogEntry {
    seq: u64,
    ready_at: u64,
    op: LogOp,
}

/// How [`Coalescer::move_subtree`] treats what it moves.
#[derive(Debug, Clone, Copy)]
enum MoveMode {
    /// A logged rename: targets were cleared; state moves as is.
    Logged,
    /// The destination lies under a pending rescan: marks are dropped, writers kept.
    Absorb,
    /// An object the replica does not hold: it must be upserted at its new name;
    /// `b_vacant` says whether the replica holds nothing at the destination.
    NewObject { b_vacant: bool, is_dir: bool },
}

/// The per-path state machine. See the module docs.
#[derive(Debug)]
pub struct Coalescer {
    cfg: CoalescerConfig,
    nodes: BTreeMap<RelPath, Node>,
    /// Pending subtree rescans and when each is ready.
    rescans: BTreeMap<RelPath, u64>,
    /// A pending rescan of the whole root and when it is ready.
    root_rescan: Option<u64>,
    /// Dirty nodes and rescans by ready time.
    by_time: BTreeSet<(u64, RelPath)>,
    log: VecDeque<LogEntry>,
    next_seq: u64,
    /// Pinned directories: the `seq` of their `Pin` entry, and whether the replica
    /// was known to lack the directory before it was pinned.
    pins: BTreeMap<RelPath, (u64, bool)>,
    /// Paths (and everything beneath) the replica is known to lack once the log is
    /// replayed. Cleared whenever the log empties.
    vacant: BTreeSet<RelPath>,
}

impl Coalescer {
    pub fn new(cfg: CoalescerConfig) -> Self {
        Self {
            cfg,
            nodes: BTreeMap::new(),
            rescans: BTreeMap::new(),
            root_rescan: None,
            by_time: BTreeSet::new(),
            log: VecDeque::new(),
            next_seq: 0,
            pins: BTreeMap::new(),
            vacant: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &CoalescerConfig {
        &self.cfg
    }

    /// Feeds one decoded event that happened at `now_ms`.
    pub fn handle_event(&mut self, ev: FsEvent, now_ms: u64) {
        let now = now_ms;
        match ev.kind {
            EventKind::Lost => match ev.path {
                None => self.lost_root(now),
                Some(p) if is_reserved(&p) => {}
                Some(p) => self.lost(p, now),
            },
            EventKind::Rename => match (ev.path, ev.path2) {
                (Some(a), Some(b)) => match (is_reserved(&a), is_reserved(&b)) {
                    (true, true) => {}
                    (true, false) => {
                        self.create(b.clone(), ev.is_dir, now);
                        if ev.is_dir {
                            self.lost(b, now);
                        }
                    }
                    (false, true) => self.remove(a, ev.is_dir, now),
                    (false, false) => self.rename(a, b, ev.is_dir, now),
                },
                // A rename with one side unknown: the other side is all we can act on.
                (Some(a), None) => self.lost(a, now),
                (None, Some(b)) => self.lost(b, now),
                (None, None) => {}
            },
            kind => {
                let Some(p) = ev.path else { return };
                if is_reserved(&p) {
                    return;
                }
                match kind {
                    EventKind::Create | EventKind::Symlink | EventKind::Link => {
                        self.create(p, false, now)
                    }
                    EventKind::Mkdir => self.create(p, true, now),
                    EventKind::Unlink => self.remove(p, false, now),
                    EventKind::Rmdir => self.remove(p, true, now),
                    _ => self.content(p, kind, ev.is_dir, now),
                }
            }
        }
        if self.tracked() > self.cfg.max_pending {
            self.collapse_all(now);
        }
    }

    /// Drains what is ready at `now_ms`, at most `max_batch` changes, in a safe order.
    /// `None` if nothing is ready.
    pub fn poll_batch(&mut self, now_ms: u64) -> Option<Batch> {
        let now = now_ms;
        let max = self.cfg.max_batch.max(1);
        if let Some(t) = self.root_rescan {
            if t > now {
                return None;
            }
            self.root_rescan = None;
            self.vacant.clear();
            for n in self.nodes.values_mut() {
                n.replica = Replica::Same;
            }
            return Some(Batch {
                changes: vec![PathChange::Rescan { path: None }],
            });
        }
        let mut changes = Vec::new();
        while changes.len() < max && self.log.front().is_some_and(|e| e.ready_at <= now) {
            let Some(e) = self.log.pop_front() else { break };
            changes.push(match e.op {
                LogOp::Rename { from, to, .. } => PathChange::Rename { from, to },
                LogOp::Remove { path, .. } => PathChange::Remove { path },
                LogOp::Pin { path } => {
                    if self.pins.get(&path).is_some_and(|(s, _)| *s == e.seq) {
                        self.pins.remove(&path);
                    }
                    PathChange::Upsert { path }
                }
            });
        }
        if !self.log.is_empty() {
            return (!changes.is_empty()).then_some(Batch { changes });
        }
        self.vacant.clear();

        // Marks: ready ones in time order, each with its pending ancestors.
        let room = max - changes.len();
        let mut chosen: Vec<RelPath> = Vec::new();
        let mut chosen_set: HashSet<RelPath> = HashSet::new();
        'outer: for (t, p) in &self.by_time {
            if *t > now || chosen.len() >= room {
                break;
            }
            if chosen_set.contains(p) {
                continue;
            }
            let mut chain: Vec<RelPath> = p
                .ancestors()
                .into_iter()
                .filter(|a| self.is_mark(a) && !chosen_set.contains(a))
                .collect();
            chain.push(p.clone());
            for q in chain {
                if chosen.len() >= room {
                    break 'outer;
                }
                chosen_set.insert(q.clone());
                chosen.push(q);
            }
        }
        chosen.sort_by(|a, b| a.cmp_tree(b));
        for q in chosen {
            if let Some(ready) = self.rescans.remove(&q) {
                self.by_time.remove(&(ready, q.clone()));
                for k in keys_at_or_below(&self.nodes, &q) {
                    if let Some(n) = self.nodes.get_mut(&k) {
                        n.replica = Replica::Same;
                    }
                }
                changes.push(PathChange::Rescan { path: Some(q) });
            } else if let Some(mut n) = self.take_node(&q) {
                n.dirty = false;
                n.replica = Replica::Same;
                if n.held() {
                    n.hold_since = now;
                }
                self.put_node(q.clone(), n);
                changes.push(PathChange::Upsert { path: q });
            }
        }
        (!changes.is_empty()).then_some(Batch { changes })
    }

    /// The earliest `now_ms` at which [`poll_batch`](Self::poll_batch) returns something
    /// without further events (possibly already past); `None` if nothing is pending.
    pub fn poll_timeout(&self) -> Option<u64> {
        if let Some(t) = self.root_rescan {
            return Some(t);
        }
        if let Some(e) = self.log.front() {
            // Marks wait for the whole log, whose entries are ready in order.
            return Some(e.ready_at);
        }
        self.by_time.first().map(|(t, _)| *t)
    }

    /// Changes held back: log entries, paths to upsert, subtrees to rescan.
    pub fn pending(&self) -> usize {
        self.log.len() + self.by_time.len() + usize::from(self.root_rescan.is_some())
    }

    /// Everything tracked, for the memory bound (includes files merely held open).
    fn tracked(&self) -> usize {
        self.nodes.len() + self.rescans.len() + self.log.len() + self.vacant.len()
    }

    // ----- events -------------------------------------------------------------------

    fn content(&mut self, p: RelPath, kind: EventKind, is_dir: bool, now: u64) {
        let covered = self.covered(&p);
        let mut n = self
            .take_node(&p)
            .unwrap_or_else(|| Node::new(Replica::Same));
        let was_held = n.held();
        match kind {
            EventKind::OpenWrite => n.writers = n.writers.saturating_add(1),
            EventKind::CloseWrite => {
                n.writers = n.writers.saturating_sub(1);
                n.mmap = false;
            }
            EventKind::Modify => n.mmap = false,
            EventKind::MmapWrite => n.mmap = true,
            EventKind::Attrib => n.is_dir = is_dir,
            _ => {}
        }
        if !was_held && n.held() {
            n.hold_since = now;
        }
        n.last_event = now;
        if !covered {
            n.set_dirty(now);
        }
        self.put_node(p, n);
    }

    fn create(&mut self, p: RelPath, is_dir: bool, now: u64) {
        // Whatever was tracked at `p` belonged to an object that is gone.
        let old = self.take_node(&p);
        if self.covered(&p) {
            return;
        }
        let new_dir = is_dir;
        let replica = if let Some(LogEntry {
            op: LogOp::Remove { path, is_dir },
            ..
        }) = self.log.back()
            && *path == p
            && !*is_dir
            && !new_dir
        {
            // Unlink then re-create a file: one `Upsert` replaces it in a single step.
            self.log.pop_back();
            self.vacant.remove(&p);
            Replica::Same
        } else if self.known_vacant(&p) {
            Replica::Absent
        } else {
            match old {
                Some(o) if o.replica == Replica::Absent => Replica::Absent,
                // The replica may still hold the old object, of another kind.
                Some(_) => Replica::Unknown,
                None if self.pins.contains_key(&p) => Replica::Same,
                None => Replica::Absent,
            }
        };
        let mut n = Node::new(replica);
        n.is_dir = new_dir;
        n.set_dirty(now);
        self.put_node(p, n);
    }

    fn remove(&mut self, p: RelPath, is_dir: bool, now: u64) {
        if self.root_rescan.is_some() || self.covered_strict(&p) {
            self.drop_nodes_at_or_below(&p);
            return;
        }
        let mut unpinned = false;
        if let Some(k) = self.min_pin_seq(|q| q.starts_with(&p)) {
            if let Some(was_absent) = self.try_unpin(&p) {
                // Back to what the replica held before the pin.
                unpinned = was_absent;
            } else {
                self.collapse_from(k, &[&p], now);
                self.drop_nodes_at_or_below(&p);
                return;
            }
        }
        let vacant = unpinned || self.known_vacant(&p);
        self.drop_nodes_at_or_below(&p);
        self.drop_rescans_at_or_below(&p);
        for q in set_at_or_below(&self.vacant, &p) {
            self.vacant.remove(&q);
        }
        if vacant {
            self.vacant.insert(p);
        } else {
            self.log_remove(p, is_dir, now);
        }
    }

    fn rename(&mut self, a: RelPath, b: RelPath, is_dir: bool, now: u64) {
        if a == b {
            return;
        }
        if related(&a, &b) {
            // Not a valid rename on Linux; do not guess.
            match common_ancestor(&a, &b) {
                Some(r) => self.lost(r, now),
                None => self.lost_root(now),
            }
            return;
        }
        if self.root_rescan.is_none()
            && let Some(k) =
                self.min_pin_seq(|q| q.starts_with(&a) || (q.starts_with(&b) && *q != b))
        {
            self.collapse_from(k, &[&a, &b], now);
        }
        if self.root_rescan.is_some() {
            self.move_subtree(&a, &b, MoveMode::Absorb, now);
            return;
        }
        let a_cov = self.covered_strict(&a);
        let b_cov = self.covered_strict(&b);
        match (a_cov, b_cov) {
            (true, true) => self.move_subtree(&a, &b, MoveMode::Absorb, now),
            (true, false) => {
                // Out of a subtree whose state is unknown: move whatever the replica
                // has (a good base), then re-copy the target.
                let to_vacant = self.known_vacant(&b);
                self.clear_target(&b);
                self.log_rename(a.clone(), b.clone(), to_vacant, is_dir, now);
                self.move_subtree(&a, &b, MoveMode::Absorb, now);
                if is_dir {
                    self.add_rescan(b, now);
                } else {
                    let mut n = self
                        .take_node(&b)
                        .unwrap_or_else(|| Node::new(Replica::Unknown));
                    n.replica = Replica::Unknown;
                    n.is_dir = false;
                    n.set_dirty(now);
                    self.put_node(b, n);
                }
            }
            (false, true) => {
                // Into a subtree that will be rescanned: the source path just goes away.
                let new_obj = self.known_vacant(&a);
                self.move_subtree(&a, &b, MoveMode::Absorb, now);
                if new_obj {
                    self.vacant.insert(a);
                } else {
                    self.log_remove(a, is_dir, now);
                }
            }
            (false, false) => {
                let b_vacant = self.known_vacant(&b);
                if self.known_vacant(&a) {
                    self.move_subtree(&a, &b, MoveMode::NewObject { b_vacant, is_dir }, now);
                } else {
                    self.clear_target(&b);
                    let mut to_vacant = b_vacant;
                    if !b_vacant && !self.known_present(&a) {
                        // The replica may lack `a`, making the rename a no-op there:
                        // clear `b` first so that nothing stale survives beneath it.
                        self.log_remove(b.clone(), is_dir, now);
                        to_vacant = true;
                    }
                    self.log_rename(a.clone(), b.clone(), to_vacant, is_dir, now);
                    self.move_subtree(&a, &b, MoveMode::Logged, now);
                }
            }
        }
    }

    fn lost(&mut self, r: RelPath, now: u64) {
        if self.root_rescan.is_some() {
            return;
        }
        for q in keys_at_or_below(&self.nodes, &r) {
            if let Some(mut n) = self.take_node(&q) {
                n.writers = 0;
                n.mmap = false;
                self.put_node(q, n);
            }
        }
        self.add_rescan(r, now);
    }

    fn lost_root(&mut self, now: u64) {
        for n in self.nodes.values_mut() {
            n.writers = 0;
            n.mmap = false;
        }
        self.collapse_root(now);
    }

    // ----- log ----------------------------------------------------------------------

    fn push_log(&mut self, op: LogOp, now: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.log.push_back(LogEntry {
            seq,
            ready_at: now.saturating_add(self.cfg.debounce_ms),
            op,
        });
        seq
    }

    fn push_pin(&mut self, d: RelPath, now: u64) {
        let was_absent = self.known_vacant(&d);
        let seq = self.push_log(LogOp::Pin { path: d.clone() }, now);
        self.pins.insert(d.clone(), (seq, was_absent));
        if let Some(mut n) = self.take_node(&d) {
            // The pin's `Upsert` carries the directory; no separate mark needed.
            n.replica = Replica::Same;
            n.dirty = false;
            self.put_node(d.clone(), n);
        }
        for q in ancestors_and_self(&d) {
            self.vacant.remove(&q);
        }
    }

    /// Logs `Rename a→b` of an object the replica holds: pins new directories above
    /// `b`, collapses a chain with the previous rename, updates what is known vacant.
    fn log_rename(&mut self, a: RelPath, b: RelPath, to_vacant: bool, is_dir: bool, now: u64) {
        let pins: Vec<RelPath> = b
            .ancestors()
            .into_iter()
            .filter(|d| {
                self.nodes
                    .get(d)
                    .is_some_and(|n| n.replica != Replica::Same)
            })
            .collect();
        let chain = match self.log.back() {
            Some(LogEntry {
                op: LogOp::Rename { from, to, .. },
                ..
            }) => *to == a && (*from == b || !related(from, &b)),
            _ => false,
        };
        if chain {
            let Some(LogEntry {
                op:
                    LogOp::Rename {
                        from: x,
                        to_vacant: a_was_vacant,
                        ..
                    },
                ..
            }) = self.log.pop_back()
            else {
                unreachable!("checked above")
            };
            for d in pins {
                self.push_pin(d, now);
            }
            if x != b {
                self.push_log(
                    LogOp::Rename {
                        from: x,
                        to: b.clone(),
                        to_vacant,
                        is_dir,
                    },
                    now,
                );
            }
            if !a_was_vacant {
                // The first rename replaced whatever `a` was; the source has nothing there.
                self.push_log(
                    LogOp::Remove {
                        path: a.clone(),
                        is_dir,
                    },
                    now,
                );
            }
        } else {
            for d in pins {
                self.push_pin(d, now);
            }
            self.push_log(
                LogOp::Rename {
                    from: a.clone(),
                    to: b.clone(),
                    to_vacant,
                    is_dir,
                },
                now,
            );
        }
        for q in ancestors_and_self(&b)
            .into_iter()
            .chain(set_at_or_below(&self.vacant, &b))
            .chain(set_at_or_below(&self.vacant, &a))
        {
            self.vacant.remove(&q);
        }
        self.vacant.insert(a);
    }

    /// Logs `Remove p`; `Rename x→p` then `Remove p` becomes `Remove x` (+ `Remove p`
    /// unless the replica held nothing at `p` before).
    fn log_remove(&mut self, p: RelPath, is_dir: bool, now: u64) {
        let chain = matches!(self.log.back(), Some(LogEntry { op: LogOp::Rename { to, .. }, .. }) if *to == p);
        if chain {
            let Some(LogEntry {
                op: LogOp::Rename {
                    from: x, to_vacant, ..
                },
                ..
            }) = self.log.pop_back()
            else {
                unreachable!("checked above")
            };
            let recreated = !is_dir && self.nodes.get(&x).is_some_and(|n| n.dirty && !n.is_dir);
            if recreated {
                // `mv f f~; create f; rm f~`: the pending `Upsert f` replaces the old
                // `f` on the replica in one step; no `Remove f` in between.
                if let Some(mut n) = self.take_node(&x) {
                    n.replica = Replica::Same;
                    self.put_node(x.clone(), n);
                }
                self.vacant.remove(&x);
            } else {
                self.push_log(LogOp::Remove { path: x, is_dir }, now);
            }
            if !to_vacant {
                self.push_log(
                    LogOp::Remove {
                        path: p.clone(),
                        is_dir,
                    },
                    now,
                );
            }
        } else {
            self.push_log(
                LogOp::Remove {
                    path: p.clone(),
                    is_dir,
                },
                now,
            );
        }
        self.vacant.insert(p);
    }

    fn min_pin_seq(&self, f: impl Fn(&RelPath) -> bool) -> Option<u64> {
        self.pins
            .iter()
            .filter(|(p, _)| f(p))
            .map(|(_, (s, _))| *s)
            .min()
    }

    /// Drops the pin of `p` if nothing logged after it refers to `p` or beneath;
    /// returns whether the replica was known to lack `p` before the pin.
    fn try_unpin(&mut self, p: &RelPath) -> Option<bool> {
        let &(seq, was_absent) = self.pins.get(p)?;
        if self.pins.keys().any(|q| q != p && q.starts_with(p)) {
            return None;
        }
        let depends = self
            .log
            .iter()
            .filter(|e| e.seq > seq)
            .any(|e| e.op.paths().any(|q| q.starts_with(p)));
        if depends {
            return None;
        }
        self.log.retain(|e| e.seq != seq);
        self.pins.remove(p);
        Some(was_absent)
    }

    /// Replaces log entries from `seq` on by a rescan of the smallest subtree holding
    /// every path they name and `extra`.
    fn collapse_from(&mut self, seq: u64, extra: &[&RelPath], now: u64) {
        let mut root: Option<Option<RelPath>> = None;
        for p in extra.iter().copied().chain(
            self.log
                .iter()
                .filter(|e| e.seq >= seq)
                .flat_map(|e| e.op.paths()),
        ) {
            root = Some(match root {
                None => Some(p.clone()),
                Some(None) => None,
                Some(Some(r)) => common_ancestor(&r, p),
            });
        }
        while self.log.back().is_some_and(|e| e.seq >= seq) {
            self.log.pop_back();
        }
        self.pins.retain(|_, (s, _)| *s < seq);
        match root.flatten() {
            Some(r) => self.add_rescan(r, now),
            None => self.collapse_root(now),
        }
    }

    // ----- marks --------------------------------------------------------------------

    fn ready_at(&self, n: &Node) -> u64 {
        let max = self.cfg.open_write_max_ms;
        if n.held() {
            n.hold_since.max(n.dirty_since).saturating_add(max)
        } else {
            n.last_event
                .saturating_add(self.cfg.debounce_ms)
                .min(n.dirty_since.saturating_add(max))
        }
    }

    fn take_node(&mut self, p: &RelPath) -> Option<Node> {
        let n = self.nodes.remove(p)?;
        if let Some(k) = n.key {
            self.by_time.remove(&(k, p.clone()));
        }
        Some(n)
    }

    /// Stores `n` at `p` (replacing any node there), indexed; idle nodes are dropped.
    fn put_node(&mut self, p: RelPath, mut n: Node) {
        self.take_node(&p);
        n.key = None;
        if !n.dirty && !n.held() {
            return;
        }
        if n.dirty {
            let k = self.ready_at(&n);
            n.key = Some(k);
            self.by_time.insert((k, p.clone()));
        }
        self.nodes.insert(p, n);
    }

    fn drop_nodes_at_or_below(&mut self, p: &RelPath) {
        for q in keys_at_or_below(&self.nodes, p) {
            self.take_node(&q);
        }
    }

    fn drop_rescans_at_or_below(&mut self, p: &RelPath) {
        for q in keys_at_or_below(&self.rescans, p) {
            if let Some(t) = self.rescans.remove(&q) {
                self.by_time.remove(&(t, q));
            }
        }
    }

    /// Drops the pending state of what a rename is about to replace at `b`.
    fn clear_target(&mut self, b: &RelPath) {
        self.drop_nodes_at_or_below(b);
        self.drop_rescans_at_or_below(b);
    }

    fn is_mark(&self, p: &RelPath) -> bool {
        self.rescans.contains_key(p) || self.nodes.get(p).is_some_and(|n| n.dirty)
    }

    /// Moves the pending state at and beneath `a` to beneath `b`.
    fn move_subtree(&mut self, a: &RelPath, b: &RelPath, mode: MoveMode, now: u64) {
        let moved: Vec<(RelPath, Node)> = keys_at_or_below(&self.nodes, a)
            .into_iter()
            .filter_map(|q| {
                let n = self.take_node(&q)?;
                Some((q.rebase(a, b)?, n))
            })
            .collect();
        let rescans: Vec<(RelPath, u64)> = keys_at_or_below(&self.rescans, a)
            .into_iter()
            .filter_map(|q| self.rescans.remove(&q).map(|t| (q, t)))
            .collect();
        // Rescans first, so that nothing pending lands beneath one un-absorbed.
        for (q, t) in rescans {
            self.by_time.remove(&(t, q.clone()));
            if matches!(mode, MoveMode::Absorb) {
                continue;
            }
            if let Some(q) = q.rebase(a, b)
                && !self.covered(&q)
            {
                self.insert_rescan(q, t);
            }
        }
        let mut root_seen = false;
        for (q, mut n) in moved {
            match mode {
                MoveMode::Logged => {}
                MoveMode::Absorb => {
                    n.dirty = false;
                    n.replica = Replica::Unknown;
                }
                MoveMode::NewObject { b_vacant, .. } => {
                    if q == *b {
                        root_seen = true;
                        n.replica = if b_vacant {
                            Replica::Absent
                        } else {
                            Replica::Unknown
                        };
                        n.set_dirty(now);
                    } else if let Some(old) = self.take_node(&q)
                        && old.replica != Replica::Absent
                    {
                        n.replica = Replica::Unknown;
                        n.set_dirty(now);
                    }
                }
            }
            if q == *b && n.dirty {
                n.last_event = now;
            }
            if self.covered(&q) {
                n.dirty = false;
                n.replica = Replica::Unknown;
            }
            self.put_node(q, n);
        }
        if let MoveMode::NewObject { b_vacant, is_dir } = mode
            && !root_seen
            && !self.covered(b)
        {
            let replica = if b_vacant {
                Replica::Absent
            } else {
                Replica::Unknown
            };
            let mut n = self.take_node(b).unwrap_or_else(|| Node::new(replica));
            n.replica = replica;
            n.is_dir = is_dir;
            n.set_dirty(now);
            self.put_node(b.clone(), n);
        }
    }

    /// Inserts the rescan root `r` (not covered), absorbing what is beneath it.
    fn insert_rescan(&mut self, r: RelPath, ready: u64) {
        let mut ready = ready;
        for q in keys_at_or_below(&self.rescans, &r) {
            if let Some(t) = self.rescans.remove(&q) {
                self.by_time.remove(&(t, q));
                ready = ready.min(t);
            }
        }
        for q in keys_at_or_below(&self.nodes, &r) {
            if let Some(mut n) = self.take_node(&q) {
                n.dirty = false;
                n.replica = Replica::Unknown;
                self.put_node(q, n);
            }
        }
        for q in set_at_or_below(&self.vacant, &r) {
            self.vacant.remove(&q);
        }
        self.rescans.insert(r.clone(), ready);
        self.by_time.insert((ready, r));
    }

    /// Marks a rescan of `r`, absorbing everything pending beneath it.
    fn add_rescan(&mut self, r: RelPath, now: u64) {
        let mut r = r;
        // A pinned directory beneath `r` can no longer be vouched for: the log tail
        // that depends on it folds into the rescan.
        while self.root_rescan.is_none()
            && let Some(seq) = self.min_pin_seq(|q| q.starts_with(&r))
        {
            let mut root = Some(r.clone());
            for p in self
                .log
                .iter()
                .filter(|e| e.seq >= seq)
                .flat_map(|e| e.op.paths())
            {
                root = root.and_then(|x| common_ancestor(&x, p));
            }
            while self.log.back().is_some_and(|e| e.seq >= seq) {
                self.log.pop_back();
            }
            self.pins.retain(|_, (s, _)| *s < seq);
            match root {
                Some(x) => r = x,
                None => {
                    self.collapse_root(now);
                    return;
                }
            }
        }
        if self.covered(&r) {
            return;
        }
        self.insert_rescan(r, now.saturating_add(self.cfg.debounce_ms));
    }

    /// Everything pending becomes one rescan of the root; open-writer counts stay.
    fn collapse_root(&mut self, now: u64) {
        let ready = now.saturating_add(self.cfg.debounce_ms);
        self.root_rescan = Some(self.root_rescan.map_or(ready, |t| t.min(ready)));
        self.log.clear();
        self.pins.clear();
        self.vacant.clear();
        self.rescans.clear();
        self.by_time.clear();
        let nodes = std::mem::take(&mut self.nodes);
        for (p, mut n) in nodes {
            n.dirty = false;
            n.replica = Replica::Unknown;
            n.key = None;
            if n.held() {
                self.nodes.insert(p, n);
            }
        }
    }

    /// The memory bound: rescans of the common ancestor of each top-level group.
    fn collapse_all(&mut self, now: u64) {
        let mut groups: BTreeMap<Vec<u8>, RelPath> = BTreeMap::new();
        let paths = self
            .nodes
            .iter()
            .filter(|(_, n)| n.dirty)
            .map(|(p, _)| p)
            .chain(self.rescans.keys())
            .chain(self.log.iter().flat_map(|e| e.op.paths()));
        for p in paths {
            let first = p.components().next().unwrap_or_default().to_vec();
            match groups.get_mut(&first) {
                Some(r) => {
                    if let Some(c) = common_ancestor(r, p) {
                        *r = c;
                    }
                }
                None => {
                    groups.insert(first, p.clone());
                }
            }
        }
        let cap = MAX_COLLAPSE_ROOTS.min((self.cfg.max_pending / 2).max(1));
        if groups.len() > cap {
            self.collapse_root(now);
            return;
        }
        self.log.clear();
        self.pins.clear();
        self.vacant.clear();
        for r in groups.into_values() {
            self.add_rescan(r, now);
        }
    }

    // ----- queries ------------------------------------------------------------------

    /// Internal consistency, for tests.
    #[cfg(test)]
    fn check(&self) {
        let dirty = self.nodes.values().filter(|n| n.dirty).count();
        assert_eq!(
            self.by_time.len(),
            dirty + self.rescans.len(),
            "index out of step"
        );
        for (p, n) in &self.nodes {
            assert!(n.dirty || n.held(), "idle node {p:?}");
            assert_eq!(n.key.is_some(), n.dirty, "{p:?}");
            if let Some(k) = n.key {
                assert!(self.by_time.contains(&(k, p.clone())), "{p:?} not indexed");
                assert!(!self.covered(p), "dirty {p:?} under a rescan");
            }
        }
        for (r, t) in &self.rescans {
            assert!(self.by_time.contains(&(*t, r.clone())));
            assert!(!self.covered_strict(r), "nested rescan {r:?}");
        }
        if self.root_rescan.is_some() {
            assert!(self.log.is_empty() && self.rescans.is_empty() && self.pins.is_empty());
        }
        for (p, (seq, _)) in &self.pins {
            // Events beneath a rescan skip pin checks: no pin may lie there. (A pin at
            // a rescan root is fine: events on the root itself are checked.)
            assert!(!self.covered_strict(p), "pin {p:?} under a rescan");
            assert!(
                self.log
                    .iter()
                    .any(|e| e.seq == *seq && e.op == LogOp::Pin { path: p.clone() }),
                "pin {p:?} not in the log"
            );
        }
        for w in self.log.iter().collect::<Vec<_>>().windows(2) {
            assert!(w[0].seq < w[1].seq && w[0].ready_at <= w[1].ready_at);
        }
    }

    /// `p` lies at or beneath a pending rescan.
    fn covered(&self, p: &RelPath) -> bool {
        self.root_rescan.is_some() || self.rescans.contains_key(p) || self.covered_strict(p)
    }

    /// `p` lies strictly beneath a pending rescan.
    fn covered_strict(&self, p: &RelPath) -> bool {
        self.root_rescan.is_some()
            || (!self.rescans.is_empty()
                && p.ancestors().iter().any(|a| self.rescans.contains_key(a)))
    }

    /// The replica is known to hold the source's object at `p` (its kind, at least)
    /// once the log is replayed: nothing tracked at or above `p` says otherwise.
    fn known_present(&self, p: &RelPath) -> bool {
        ancestors_and_self(p)
            .iter()
            .all(|q| self.nodes.get(q).is_none_or(|n| n.replica == Replica::Same))
    }

    /// The replica is known to hold nothing at `p` once the log is replayed.
    fn known_vacant(&self, p: &RelPath) -> bool {
        ancestors_and_self(p).iter().any(|q| {
            self.vacant.contains(q)
                || self
                    .nodes
                    .get(q)
                    .is_some_and(|n| n.replica == Replica::Absent)
        })
    }
}

fn is_reserved(p: &RelPath) -> bool {
    p.components().next() == Some(RESERVED_DIR)
}

/// One is `a` or beneath the other.
fn related(a: &RelPath, b: &RelPath) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn ancestors_and_self(p: &RelPath) -> Vec<RelPath> {
    let mut v = p.ancestors();
    v.push(p.clone());
    v
}

/// The deepest path that both are at or beneath; `None` if only the root is.
fn common_ancestor(a: &RelPath, b: &RelPath) -> Option<RelPath> {
    let mut len = 0;
    for (x, y) in a.components().zip(b.components()) {
        if x != y {
            break;
        }
        len += if len == 0 { x.len() } else { x.len() + 1 };
    }
    if len == 0 {
        return None;
    }
    RelPath::new(a.as_bytes()[..len].to_vec()).ok()
}

/// The smallest valid path sorting after `p` and before everything beneath it.
fn below_start(p: &RelPath) -> Option<RelPath> {
    let mut v = p.as_bytes().to_vec();
    v.extend_from_slice(b"/\x01");
    RelPath::new(v).ok()
}

/// Keys of `map` at or beneath `p`.
fn keys_at_or_below<V>(map: &BTreeMap<RelPath, V>, p: &RelPath) -> Vec<RelPath> {
    let mut out: Vec<RelPath> = map
        .get_key_value(p)
        .map(|(k, _)| k.clone())
        .into_iter()
        .collect();
    if let Some(lo) = below_start(p) {
        out.extend(
            map.range(lo..)
                .map(|(k, _)| k)
                .take_while(|k| k.starts_with(p))
                .cloned(),
        );
    }
    out
}

/// Members of `set` at or beneath `p`.
fn set_at_or_below(set: &BTreeSet<RelPath>, p: &RelPath) -> Vec<RelPath> {
    let mut out: Vec<RelPath> = set.get(p).cloned().into_iter().collect();
    if let Some(lo) = below_start(p) {
        out.extend(set.range(lo..).take_while(|k| k.starts_with(p)).cloned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use EventKind::*;

    use crate::testutil::p;
    fn up(s: &str) -> PathChange {
        PathChange::Upsert { path: p(s) }
    }
    fn rm(s: &str) -> PathChange {
        PathChange::Remove { path: p(s) }
    }
    fn mv(a: &str, b: &str) -> PathChange {
        PathChange::Rename {
            from: p(a),
            to: p(b),
        }
    }
    fn rescan(s: &str) -> PathChange {
        PathChange::Rescan { path: Some(p(s)) }
    }

    /// A coalescer with a clock.
    struct H {
        c: Coalescer,
        now: u64,
    }

    impl H {
        fn new(debounce_ms: u64, open_write_max_ms: u64) -> Self {
            Self::with(CoalescerConfig {
                debounce_ms,
                open_write_max_ms,
                ..CoalescerConfig::default()
            })
        }
        fn with(cfg: CoalescerConfig) -> Self {
            H {
                c: Coalescer::new(cfg),
                now: 0,
            }
        }
        fn ev(&mut self, kind: EventKind, path: &str) -> &mut Self {
            let is_dir = matches!(kind, Mkdir | Rmdir);
            self.c.handle_event(
                FsEvent {
                    kind,
                    path: Some(p(path)),
                    path2: None,
                    is_dir,
                    pid: 0,
                },
                self.now,
            );
            self
        }
        fn dir_ev(&mut self, kind: EventKind, path: &str) -> &mut Self {
            self.c.handle_event(
                FsEvent {
                    kind,
                    path: Some(p(path)),
                    path2: None,
                    is_dir: true,
                    pid: 0,
                },
                self.now,
            );
            self
        }
        fn mv(&mut self, a: &str, b: &str) -> &mut Self {
            self.rename(a, b, false)
        }
        fn mvdir(&mut self, a: &str, b: &str) -> &mut Self {
            self.rename(a, b, true)
        }
        fn rename(&mut self, a: &str, b: &str, is_dir: bool) -> &mut Self {
            self.c.handle_event(
                FsEvent {
                    kind: Rename,
                    path: Some(p(a)),
                    path2: Some(p(b)),
                    is_dir,
                    pid: 0,
                },
                self.now,
            );
            self
        }
        fn lost_root(&mut self) -> &mut Self {
            self.c.handle_event(
                FsEvent {
                    kind: Lost,
                    path: None,
                    path2: None,
                    is_dir: true,
                    pid: 0,
                },
                self.now,
            );
            self
        }
        fn at(&mut self, t: u64) -> &mut Self {
            self.now = t;
            self
        }
        /// Everything ready now, batches concatenated.
        fn drain(&mut self) -> Vec<PathChange> {
            let mut out = Vec::new();
            while let Some(b) = self.c.poll_batch(self.now) {
                assert!(!b.changes.is_empty());
                out.extend(b.changes);
            }
            out
        }
        /// Everything, advancing time as far as needed.
        fn drain_all(&mut self) -> Vec<PathChange> {
            let mut out = Vec::new();
            while let Some(t) = self.c.poll_timeout() {
                self.now = self.now.max(t);
                let got = self.drain();
                assert!(!got.is_empty(), "poll_timeout {t} but nothing ready");
                out.extend(got);
            }
            assert_eq!(self.c.pending(), 0);
            out
        }
    }

    #[test]
    fn close_after_write_holds_until_every_writer_closes() {
        let mut h = H::new(0, 1000);
        h.ev(Create, "f")
            .ev(OpenWrite, "f")
            .ev(OpenWrite, "f")
            .ev(Modify, "f");
        assert_eq!(h.at(10).drain(), []);
        assert_eq!(h.c.pending(), 1);
        h.ev(CloseWrite, "f");
        assert_eq!(h.at(20).drain(), [], "one of two writers still has it open");
        h.ev(CloseWrite, "f");
        assert_eq!(h.drain(), [up("f")]);
        assert_eq!(h.c.poll_timeout(), None);
    }

    #[test]
    fn open_write_max_ships_a_file_never_closed_and_its_later_changes_again() {
        let mut h = H::new(0, 1000);
        h.ev(OpenWrite, "log").ev(Modify, "log");
        assert_eq!(h.c.poll_timeout(), Some(1000));
        assert_eq!(h.at(999).drain(), []);
        assert_eq!(h.at(1000).drain(), [up("log")]);
        assert_eq!(h.c.poll_timeout(), None, "nothing changed since");
        h.at(1500).ev(Modify, "log");
        assert_eq!(
            h.c.poll_timeout(),
            Some(2500),
            "another full period after its change"
        );
        assert_eq!(h.at(2499).drain(), []);
        assert_eq!(h.at(2500).drain(), [up("log")]);
        h.at(2600).ev(CloseWrite, "log");
        assert_eq!(
            h.drain(),
            [up("log")],
            "the close ships the final content at once"
        );
    }

    #[test]
    fn a_file_opened_long_ago_waits_a_full_period_after_its_first_write() {
        let mut h = H::new(0, 1000);
        h.ev(OpenWrite, "f");
        assert_eq!(h.at(1000).drain(), [up("f")], "O_TRUNC may have changed it");
        h.at(5000).ev(Modify, "f");
        assert_eq!(h.drain(), []);
        assert_eq!(h.c.poll_timeout(), Some(6000));
    }

    #[test]
    fn modify_without_open_ships_after_the_debounce_of_its_last_event() {
        let mut h = H::new(100, 30_000);
        h.ev(Modify, "f");
        assert_eq!(h.c.poll_timeout(), Some(100));
        h.at(50).ev(Modify, "f");
        assert_eq!(h.c.poll_timeout(), Some(150));
        assert_eq!(h.at(149).drain(), []);
        assert_eq!(h.at(150).drain(), [up("f")]);
        // Zero debounce: ready at once.
        let mut h = H::new(0, 30_000);
        h.ev(Modify, "g");
        assert_eq!(h.drain(), [up("g")]);
    }

    #[test]
    fn a_path_changing_without_pause_still_ships_within_open_write_max() {
        let mut h = H::new(100, 1000);
        let mut shipped = None;
        for t in (0..3000).step_by(50) {
            h.at(t).ev(Modify, "busy");
            if !h.drain().is_empty() && shipped.is_none() {
                shipped = Some(t);
            }
        }
        assert_eq!(shipped, Some(1000));
    }

    #[test]
    fn mmap_write_holds_until_a_close_or_modify_follows() {
        let mut h = H::new(0, 1000);
        h.ev(MmapWrite, "m");
        assert_eq!(h.at(10).drain(), []);
        h.ev(Modify, "m");
        assert_eq!(h.drain(), [up("m")]);
        h.ev(MmapWrite, "n");
        assert_eq!(h.drain(), []);
        h.ev(CloseWrite, "n");
        assert_eq!(h.drain(), [up("n")]);
        h.at(100).ev(MmapWrite, "o");
        assert_eq!(h.at(1099).drain(), []);
        assert_eq!(
            h.at(1100).drain(),
            [up("o")],
            "open_write_max applies to mappings"
        );
    }

    #[test]
    fn create_then_unlink_ships_nothing() {
        let mut h = H::new(10, 1000);
        h.ev(Create, "f")
            .ev(OpenWrite, "f")
            .ev(Modify, "f")
            .ev(CloseWrite, "f");
        h.ev(Unlink, "f");
        h.ev(Mkdir, "d")
            .ev(Create, "d/x")
            .ev(Symlink, "d/s")
            .ev(Mkdir, "d/e");
        h.ev(Unlink, "d/x")
            .ev(Unlink, "d/s")
            .ev(Rmdir, "d/e")
            .ev(Rmdir, "d");
        assert_eq!(h.c.pending(), 0);
        assert_eq!(h.c.poll_timeout(), None);
        assert_eq!(h.drain_all(), []);
    }

    #[test]
    fn unlink_of_a_path_the_replica_has_ships_remove() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "f")
            .ev(Unlink, "f")
            .ev(Unlink, "g")
            .ev(Rmdir, "d");
        assert_eq!(h.drain(), [rm("f"), rm("g"), rm("d")]);
    }

    #[test]
    fn unlink_then_recreate_is_one_upsert() {
        let mut h = H::new(0, 1000);
        h.ev(Unlink, "f")
            .ev(Create, "f")
            .ev(OpenWrite, "f")
            .ev(CloseWrite, "f");
        assert_eq!(h.drain(), [up("f")]);
        // A directory removed and re-created keeps its Remove (contents must go).
        h.ev(Rmdir, "d").ev(Mkdir, "d");
        assert_eq!(h.drain(), [rm("d"), up("d")]);
    }

    #[test]
    fn attrib_alone_ships_an_upsert() {
        let mut h = H::new(0, 1000);
        h.ev(Attrib, "f").dir_ev(Attrib, "d");
        assert_eq!(h.drain(), [up("d"), up("f")]);
    }

    #[test]
    fn links_and_symlinks_are_upserts_of_the_new_path() {
        let mut h = H::new(0, 1000);
        h.ev(Link, "l").ev(Symlink, "s");
        assert_eq!(h.drain(), [up("l"), up("s")]);
    }

    #[test]
    fn an_unchanged_rename_stays_a_rename() {
        let mut h = H::new(0, 1000);
        h.mvdir("a", "b").mv("x", "y");
        assert_eq!(h.drain(), [mv("a", "b"), mv("x", "y")]);
    }

    #[test]
    fn rename_chains_collapse() {
        let mut h = H::new(10, 1000);
        h.mv("a", "b").mv("b", "c");
        // `b` may have existed; the first rename replaced it.
        assert_eq!(h.drain_all(), [mv("a", "c"), rm("b")]);
        // When the replica is known to lack `b`, nothing else is needed.
        let mut h = H::new(10, 1000);
        h.ev(Unlink, "b").mv("a", "b").mv("b", "c");
        assert_eq!(h.drain_all(), [rm("b"), mv("a", "c")]);
        // There and back again.
        let mut h = H::new(10, 1000);
        h.ev(Unlink, "b").mv("a", "b").mv("b", "a");
        assert_eq!(h.drain_all(), [rm("b")]);
        // Renamed, then deleted: the original goes.
        let mut h = H::new(10, 1000);
        h.ev(Unlink, "b").mv("a", "b").ev(Unlink, "b");
        assert_eq!(h.drain_all(), [rm("b"), rm("a")]);
    }

    #[test]
    fn rename_of_a_file_created_in_the_window_is_an_upsert_of_the_new_name() {
        let mut h = H::new(10, 1000);
        // Atomic replace: write a temporary, rename it over the target.
        h.ev(Create, ".f.tmp")
            .ev(OpenWrite, ".f.tmp")
            .ev(Modify, ".f.tmp");
        h.ev(CloseWrite, ".f.tmp").mv(".f.tmp", "f");
        assert_eq!(h.drain_all(), [up("f")]);
        // A whole new tree renamed into place.
        h.ev(Mkdir, "new")
            .ev(Create, "new/x")
            .ev(Mkdir, "new/d")
            .ev(Create, "new/d/y");
        h.mvdir("new", "site");
        assert_eq!(
            h.drain_all(),
            [up("site"), up("site/d"), up("site/d/y"), up("site/x")]
        );
    }

    #[test]
    fn rename_of_changed_content_is_a_rename_then_an_upsert() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "a").mv("a", "b");
        assert_eq!(h.drain(), [mv("a", "b"), up("b")]);
    }

    #[test]
    fn rename_over_an_existing_target_drops_its_pending_state() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "b").ev(OpenWrite, "b").mv("a", "b");
        assert_eq!(h.drain(), [mv("a", "b")]);
        assert_eq!(h.c.pending(), 0);
    }

    #[test]
    fn a_directory_rename_moves_pending_state_beneath_it() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "d/f")
            .ev(Create, "d/new")
            .ev(OpenWrite, "d/held");
        h.mvdir("d", "e");
        assert_eq!(h.drain(), [mv("d", "e"), up("e/f"), up("e/new")]);
        h.ev(CloseWrite, "e/held");
        assert_eq!(h.drain(), [up("e/held")], "the writer followed its file");
    }

    #[test]
    fn the_editor_save_pattern_is_one_replace() {
        // vim: keep a backup by renaming, write a new file, drop the backup.
        let mut h = H::new(10, 1000);
        h.mv("f", "f~")
            .ev(Create, "f")
            .ev(OpenWrite, "f")
            .ev(Modify, "f");
        h.ev(CloseWrite, "f").ev(Unlink, "f~");
        assert_eq!(h.drain_all(), [rm("f~"), up("f")]);
    }

    #[test]
    fn a_rename_into_a_new_directory_creates_it_first() {
        let mut h = H::new(0, 1000);
        h.ev(Mkdir, "d")
            .ev(Mkdir, "d/e")
            .mv("a", "d/e/a")
            .mv("b", "d/b");
        assert_eq!(
            h.drain(),
            [up("d"), up("d/e"), mv("a", "d/e/a"), mv("b", "d/b")]
        );
    }

    #[test]
    fn a_pinned_directory_that_moves_again_falls_back_to_a_rescan() {
        let mut h = H::new(10, 1000);
        h.ev(Mkdir, "w/d").mv("w/a", "w/d/a").ev(Modify, "z");
        h.mvdir("w/d", "w/e");
        assert_eq!(h.drain_all(), [rescan("w"), up("z")]);
    }

    #[test]
    fn removing_a_pinned_directory_nothing_depends_on_drops_the_pin() {
        let mut h = H::new(10, 1000);
        h.ev(Mkdir, "d")
            .mv("a", "d/a")
            .mv("d/a", "b")
            .ev(Rmdir, "d");
        assert_eq!(h.drain_all(), [mv("a", "b")]);
    }

    #[test]
    fn renaming_what_the_replica_may_lack_clears_the_target_first() {
        // `n` is new; `x` may or may not have existed (the rename replaced it). After
        // moving on, the replica may have nothing at `x` to rename: `y` must not keep
        // stale contents then.
        let mut h = H::new(10, 1000);
        h.ev(Mkdir, "n")
            .ev(Create, "n/f")
            .mvdir("n", "x")
            .mvdir("x", "y");
        assert_eq!(h.drain_all(), [rm("y"), mv("x", "y"), up("y"), up("y/f")]);
    }

    #[test]
    fn unpinning_a_directory_the_replica_may_hold_still_removes_it() {
        // `a` existed; a new directory replaced it, something moved in and out again.
        let mut h = H::new(10, 1000);
        h.ev(Unlink, "a/x")
            .ev(Mkdir, "n")
            .mvdir("n", "a")
            .mv("b", "a/x");
        h.ev(Unlink, "a/x").ev(Rmdir, "a");
        assert_eq!(h.drain_all(), [rm("a/x"), rm("b"), rm("a")]);
    }

    #[test]
    fn removal_drops_pending_state_beneath() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "d/f")
            .ev(OpenWrite, "d/g")
            .ev(Create, "d/h")
            .ev(Rmdir, "d");
        assert_eq!(h.drain(), [rm("d")]);
        assert_eq!(h.c.pending(), 0);
    }

    #[test]
    fn batch_order_is_safe_for_the_replica() {
        // A rename comes before the upsert of its target's new child.
        let mut h = H::new(0, 1000);
        h.ev(Create, "a/new").mvdir("a", "b").ev(Create, "b/newer");
        assert_eq!(h.drain(), [mv("a", "b"), up("b/new"), up("b/newer")]);
        // A directory's Remove comes after the renames out of it.
        let mut h = H::new(0, 1000);
        h.mv("d/x", "y").ev(Rmdir, "d");
        assert_eq!(h.drain(), [mv("d/x", "y"), rm("d")]);
        // Parents (mkdir) before children, even when the parent is not yet due.
        let mut h = H::new(10, 1000);
        h.ev(Mkdir, "n")
            .at(1)
            .ev(Create, "n/f")
            .at(5)
            .dir_ev(Attrib, "n");
        assert_eq!(h.c.poll_timeout(), Some(11));
        assert_eq!(h.at(11).drain(), [up("n"), up("n/f")]);
    }

    #[test]
    fn max_batch_splits_without_reordering() {
        let mut h = H::with(CoalescerConfig {
            max_batch: 2,
            ..CoalescerConfig::default()
        });
        h.mv("a", "b")
            .mv("c", "d")
            .mv("e", "f")
            .ev(Mkdir, "g")
            .ev(Create, "g/h");
        let mut batches = Vec::new();
        while let Some(b) = h.c.poll_batch(0) {
            batches.push(b.changes);
        }
        assert_eq!(
            batches,
            [
                vec![mv("a", "b"), mv("c", "d")],
                vec![mv("e", "f"), up("g")],
                vec![up("g/h")]
            ]
        );
    }

    #[test]
    fn lost_rescans_the_subtree_and_absorbs_what_is_beneath() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "a/x")
            .ev(Modify, "b")
            .dir_ev(Lost, "a")
            .ev(Create, "a/y");
        assert_eq!(h.drain(), [rescan("a"), up("b")]);
        // Renames out of a lost subtree re-copy the target, into it drop the source.
        let mut h = H::new(0, 1000);
        h.dir_ev(Lost, "a")
            .mv("a/f", "g")
            .mvdir("a/d", "h")
            .mv("k", "a/k");
        assert_eq!(
            h.drain(),
            [
                mv("a/f", "g"),
                mv("a/d", "h"),
                rm("k"),
                rescan("a"),
                up("g"),
                rescan("h")
            ]
        );
    }

    #[test]
    fn lost_of_the_root_collapses_everything() {
        let mut h = H::new(0, 1000);
        h.ev(Modify, "a")
            .mv("b", "c")
            .dir_ev(Lost, "d")
            .lost_root()
            .ev(Modify, "e");
        assert_eq!(h.drain(), [PathChange::Rescan { path: None }]);
        assert_eq!(h.c.pending(), 0);
    }

    #[test]
    fn lost_resets_writer_counts_beneath_it() {
        let mut h = H::new(0, 1000);
        h.ev(OpenWrite, "a/f").dir_ev(Lost, "a");
        assert_eq!(h.drain(), [rescan("a")]);
        h.ev(Modify, "a/f");
        assert_eq!(
            h.drain(),
            [up("a/f")],
            "the matching close may have been lost"
        );
    }

    #[test]
    fn the_memory_bound_collapses_into_rescans() {
        let mut h = H::with(CoalescerConfig {
            max_pending: 10,
            ..CoalescerConfig::default()
        });
        for i in 0..8 {
            h.ev(Modify, &format!("x/a/{i}"));
        }
        h.ev(Modify, "x/a/b/c").mv("y/1", "y/2").ev(Modify, "z");
        assert!(h.c.tracked() <= 10);
        // The collapse happened at the rename; `z` came after it.
        assert_eq!(h.drain(), [rescan("x/a"), rescan("y"), up("z")]);
    }

    #[test]
    fn the_reserved_directory_is_outside_the_root() {
        let mut h = H::new(0, 1000);
        h.ev(Create, ".cdsync/stage/1").ev(Modify, ".cdsync/x");
        assert_eq!(h.drain(), []);
        h.mv(".cdsync/stage/1", "f").mv("g", ".cdsync/g");
        assert_eq!(h.drain(), [rm("g"), up("f")]);
    }

    #[test]
    fn poll_timeout_names_the_next_deadline() {
        let mut h = H::new(20, 1000);
        assert_eq!(h.c.poll_timeout(), None);
        h.at(5).ev(Modify, "f");
        assert_eq!(h.c.poll_timeout(), Some(25));
        h.at(7).mv("a", "b");
        assert_eq!(
            h.c.poll_timeout(),
            Some(27),
            "the log waits for its own debounce"
        );
        assert_eq!(h.at(27).drain(), [mv("a", "b"), up("f")]);
        assert_eq!(h.c.poll_timeout(), None);
    }

    // ----- model test -----------------------------------------------------------------

    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        File,
        Dir,
    }

    type Tree = BTreeMap<RelPath, (Kind, u64)>;

    #[derive(Debug, Clone)]
    enum Op {
        Create {
            dir: u8,
            name: u8,
            keep_open: bool,
        },
        Mkdir {
            dir: u8,
            name: u8,
        },
        Open {
            file: u8,
        },
        Write {
            fd: u8,
        },
        WriteByPath {
            file: u8,
        },
        Close {
            fd: u8,
        },
        Mmap {
            file: u8,
        },
        MmapStore {
            m: u8,
        },
        Attrib {
            entry: u8,
        },
        Unlink {
            file: u8,
        },
        Rmdir {
            dir: u8,
        },
        Rename {
            entry: u8,
            dir: u8,
            name: u8,
        },
        Lost {
            entry: u8,
        },
        Lossy {
            which: u8,
            entry: u8,
            dir: u8,
            name: u8,
        },
        Advance {
            ms: u64,
        },
        Poll,
    }

    const NAMES: [&str; 3] = ["a", "b", "c"];

    /// The source file system: names → inodes, open writers, mappings.
    struct Src {
        names: BTreeMap<RelPath, usize>,
        inodes: Vec<(Kind, u64)>,
        version: u64,
        fds: Vec<usize>,
        mmaps: HashSet<usize>,
        /// Inode → (holds, since): open writers plus an active mapping.
        holds: HashMap<usize, (u32, u64)>,
        /// Inodes whose open/close events may not match what the coalescer saw.
        tainted: HashSet<usize>,
        c: Coalescer,
        now: u64,
        /// Whether events reach the coalescer (false inside a lossy op).
        emit: bool,
        trace: bool,
    }

    impl Src {
        fn new(cfg: CoalescerConfig) -> Self {
            let mut s = Src {
                names: BTreeMap::new(),
                inodes: Vec::new(),
                version: 0,
                fds: Vec::new(),
                mmaps: HashSet::new(),
                holds: HashMap::new(),
                tainted: HashSet::new(),
                c: Coalescer::new(cfg),
                now: 0,
                emit: true,
                trace: false,
            };
            for (path, kind) in [
                ("a", Kind::Dir),
                ("a/a", Kind::Dir),
                ("a/a/c", Kind::File),
                ("a/b", Kind::File),
                ("b", Kind::Dir),
                ("b/c", Kind::File),
                ("c", Kind::File),
            ] {
                s.add(p(path), kind);
            }
            s
        }

        fn add(&mut self, path: RelPath, kind: Kind) -> usize {
            self.version += 1;
            self.inodes.push((kind, self.version));
            let ino = self.inodes.len() - 1;
            self.names.insert(path, ino);
            ino
        }

        fn view(&self) -> Tree {
            self.names
                .iter()
                .map(|(k, &i)| (k.clone(), self.inodes[i]))
                .collect()
        }

        fn bump(&mut self, ino: usize) {
            self.version += 1;
            self.inodes[ino].1 = self.version;
        }

        fn path_of(&self, ino: usize) -> Option<RelPath> {
            self.names
                .iter()
                .find(|(_, i)| **i == ino)
                .map(|(k, _)| k.clone())
        }

        fn pick(&self, kind: Option<Kind>, i: u8) -> Option<RelPath> {
            let v: Vec<&RelPath> = self
                .names
                .iter()
                .filter(|(_, ino)| kind.is_none_or(|k| self.inodes[**ino].0 == k))
                .map(|(k, _)| k)
                .collect();
            (!v.is_empty()).then(|| v[usize::from(i) % v.len()].clone())
        }

        /// A directory or, for `None`, the root.
        fn pick_dir(&self, i: u8) -> Option<Option<RelPath>> {
            let dirs: Vec<&RelPath> = self
                .names
                .iter()
                .filter(|(_, ino)| self.inodes[**ino].0 == Kind::Dir)
                .map(|(k, _)| k)
                .collect();
            let i = usize::from(i) % (dirs.len() + 1);
            Some(if i == 0 {
                None
            } else {
                Some(dirs[i - 1].clone())
            })
        }

        fn child(dir: &Option<RelPath>, name: u8) -> RelPath {
            let n = NAMES[usize::from(name) % NAMES.len()];
            match dir {
                None => p(n),
                Some(d) => d.join(n.as_bytes()).unwrap(),
            }
        }

        fn event(
            &mut self,
            kind: EventKind,
            path: &RelPath,
            path2: Option<&RelPath>,
            is_dir: bool,
        ) {
            if !self.emit {
                return;
            }
            let ino = self.names.get(path2.unwrap_or(path)).copied();
            if let Some(ino) = ino
                && matches!(kind, Modify | CloseWrite)
                && self.mmaps.remove(&ino)
            {
                self.unhold(ino);
            }
            if kind == Lost {
                // The coalescer resets writer counts; do not hold it to them.
                let held: Vec<usize> = self.holds.keys().copied().collect();
                self.tainted.extend(held);
            }
            if self.trace {
                eprintln!("t={} {kind:?} {path:?} {path2:?} dir={is_dir}", self.now);
            }
            self.c.handle_event(
                FsEvent {
                    kind,
                    path: Some(path.clone()),
                    path2: path2.cloned(),
                    is_dir,
                    pid: 1,
                },
                self.now,
            );
            if self.trace {
                eprintln!(
                    "   nodes={:?}",
                    self.c
                        .nodes
                        .iter()
                        .map(|(k, n)| (k.display(), n.dirty, n.replica))
                        .collect::<Vec<_>>()
                );
                eprintln!(
                    "   rescans={:?} log={:?} vacant={:?}",
                    self.c.rescans.keys().collect::<Vec<_>>(),
                    self.c.log.iter().map(|e| &e.op).collect::<Vec<_>>(),
                    self.c.vacant
                );
            }
            self.c.check();
        }

        fn hold(&mut self, ino: usize) {
            let now = self.now;
            let h = self.holds.entry(ino).or_insert((0, now));
            h.0 += 1;
        }

        fn unhold(&mut self, ino: usize) {
            if let Some(h) = self.holds.get_mut(&ino) {
                h.0 -= 1;
                if h.0 == 0 {
                    self.holds.remove(&ino);
                }
            }
        }

        fn is_empty_dir(&self, d: &RelPath) -> bool {
            !self.names.keys().any(|k| k != d && k.starts_with(d))
        }

        /// Applies one operation; returns the paths a lossy variant touched.
        fn apply(&mut self, op: &Op) -> Vec<RelPath> {
            let mut touched = Vec::new();
            match *op {
                Op::Create {
                    dir,
                    name,
                    keep_open,
                } => {
                    let Some(d) = self.pick_dir(dir) else {
                        return touched;
                    };
                    let path = Self::child(&d, name);
                    if self.names.contains_key(&path) {
                        return touched;
                    }
                    let ino = self.add(path.clone(), Kind::File);
                    self.event(Create, &path, None, false);
                    self.event(OpenWrite, &path, None, false);
                    self.hold(ino);
                    self.bump(ino);
                    self.event(Modify, &path, None, false);
                    if keep_open {
                        self.fds.push(ino);
                    } else {
                        self.event(CloseWrite, &path, None, false);
                        self.unhold(ino);
                    }
                    touched.push(path);
                }
                Op::Mkdir { dir, name } => {
                    let Some(d) = self.pick_dir(dir) else {
                        return touched;
                    };
                    let path = Self::child(&d, name);
                    if self.names.contains_key(&path) {
                        return touched;
                    }
                    self.add(path.clone(), Kind::Dir);
                    self.event(Mkdir, &path, None, true);
                    touched.push(path);
                }
                Op::Open { file } => {
                    let Some(f) = self.pick(Some(Kind::File), file) else {
                        return touched;
                    };
                    let ino = self.names[&f];
                    self.event(OpenWrite, &f, None, false);
                    self.hold(ino);
                    self.fds.push(ino);
                    self.bump(ino); // O_TRUNC
                    touched.push(f);
                }
                Op::Write { fd } => {
                    if self.fds.is_empty() {
                        return touched;
                    }
                    let ino = self.fds[usize::from(fd) % self.fds.len()];
                    self.bump(ino);
                    if let Some(f) = self.path_of(ino) {
                        self.event(Modify, &f, None, false);
                        touched.push(f);
                    }
                }
                Op::WriteByPath { file } => {
                    let Some(f) = self.pick(Some(Kind::File), file) else {
                        return touched;
                    };
                    let ino = self.names[&f];
                    self.bump(ino);
                    self.event(Modify, &f, None, false);
                    touched.push(f);
                }
                Op::Close { fd } => {
                    if self.fds.is_empty() {
                        return touched;
                    }
                    let ino = self.fds.remove(usize::from(fd) % self.fds.len());
                    if let Some(f) = self.path_of(ino) {
                        self.event(CloseWrite, &f, None, false);
                        touched.push(f);
                    }
                    self.unhold(ino);
                }
                Op::Mmap { file } => {
                    let Some(f) = self.pick(Some(Kind::File), file) else {
                        return touched;
                    };
                    let ino = self.names[&f];
                    if self.mmaps.insert(ino) {
                        self.hold(ino);
                    }
                    self.event(MmapWrite, &f, None, false);
                    touched.push(f);
                }
                Op::MmapStore { m } => {
                    let v: Vec<usize> = self.mmaps.iter().copied().collect();
                    if v.is_empty() {
                        return touched;
                    }
                    let mut v = v;
                    v.sort_unstable();
                    let ino = v[usize::from(m) % v.len()];
                    self.bump(ino); // no event: that is what a mapping does
                    touched.extend(self.path_of(ino));
                }
                Op::Attrib { entry } => {
                    let Some(e) = self.pick(None, entry) else {
                        return touched;
                    };
                    let ino = self.names[&e];
                    self.bump(ino);
                    let is_dir = self.inodes[ino].0 == Kind::Dir;
                    self.event(Attrib, &e, None, is_dir);
                    touched.push(e);
                }
                Op::Unlink { file } => {
                    let Some(f) = self.pick(Some(Kind::File), file) else {
                        return touched;
                    };
                    self.names.remove(&f);
                    self.event(Unlink, &f, None, false);
                    touched.push(f);
                }
                Op::Rmdir { dir } => {
                    let empty: Vec<RelPath> = self
                        .names
                        .iter()
                        .filter(|(k, i)| self.inodes[**i].0 == Kind::Dir && self.is_empty_dir(k))
                        .map(|(k, _)| k.clone())
                        .collect();
                    if empty.is_empty() {
                        return touched;
                    }
                    let d = empty[usize::from(dir) % empty.len()].clone();
                    self.names.remove(&d);
                    self.event(Rmdir, &d, None, true);
                    touched.push(d);
                }
                Op::Rename { entry, dir, name } => {
                    let Some(from) = self.pick(None, entry) else {
                        return touched;
                    };
                    let Some(d) = self.pick_dir(dir) else {
                        return touched;
                    };
                    let to = Self::child(&d, name);
                    let kind = self.inodes[self.names[&from]].0;
                    if to == from || to.starts_with(&from) {
                        return touched;
                    }
                    if let Some(&t) = self.names.get(&to) {
                        let tk = self.inodes[t].0;
                        if tk != kind || (tk == Kind::Dir && !self.is_empty_dir(&to)) {
                            return touched;
                        }
                        if from.starts_with(&to) {
                            return touched;
                        }
                    }
                    self.names.remove(&to);
                    let moved: Vec<(RelPath, usize)> = self
                        .names
                        .iter()
                        .filter(|(k, _)| k.starts_with(&from))
                        .map(|(k, i)| (k.clone(), *i))
                        .collect();
                    for (k, i) in moved {
                        self.names.remove(&k);
                        self.names.insert(k.rebase(&from, &to).unwrap(), i);
                    }
                    self.event(Rename, &from, Some(&to), kind == Kind::Dir);
                    touched.push(from);
                    touched.push(to);
                }
                Op::Lost { entry } => match self.pick(None, entry) {
                    Some(e) if entry % 7 != 0 => {
                        let is_dir = self.inodes[self.names[&e]].0 == Kind::Dir;
                        self.event(Lost, &e, None, is_dir);
                    }
                    _ => self.lost(None),
                },
                Op::Lossy {
                    which,
                    entry,
                    dir,
                    name,
                } => {
                    let inner = match which % 4 {
                        0 => Op::Rename { entry, dir, name },
                        1 => Op::Unlink { file: entry },
                        2 => Op::WriteByPath { file: entry },
                        _ => Op::Create {
                            dir,
                            name,
                            keep_open: false,
                        },
                    };
                    self.emit = false;
                    let touched = self.apply(&inner);
                    self.emit = true;
                    let root = touched
                        .iter()
                        .map(|t| Some(t.clone()))
                        .reduce(|a, b| a.and_then(|a| b.and_then(|b| common_ancestor(&a, &b))));
                    match root {
                        None => {}
                        Some(None) => self.lost(None),
                        Some(Some(r)) => self.event(Lost, &r, None, true),
                    }
                }
                Op::Advance { ms } => self.now += ms,
                Op::Poll => {}
            }
            touched
        }

        fn lost(&mut self, path: Option<RelPath>) {
            let held: Vec<usize> = self.holds.keys().copied().collect();
            self.tainted.extend(held);
            self.c.handle_event(
                FsEvent {
                    kind: Lost,
                    path,
                    path2: None,
                    is_dir: true,
                    pid: 0,
                },
                self.now,
            );
        }

        /// One batch, applied to `replica`, checking it is safe and honours holds.
        fn poll(&mut self, replica: &mut Tree, pure_renames: bool) -> bool {
            let Some(batch) = self.c.poll_batch(self.now) else {
                return false;
            };
            self.c.check();
            if self.trace {
                eprintln!("t={} batch {:?}", self.now, batch.changes);
            }
            assert!(!batch.changes.is_empty());
            assert!(batch.changes.len() <= self.c.config().max_batch.max(1));
            let owm = self.c.config().open_write_max_ms;
            for ch in &batch.changes {
                if pure_renames {
                    assert!(
                        matches!(ch, PathChange::Rename { .. } | PathChange::Remove { .. }),
                        "a pure rename sequence shipped {ch:?}"
                    );
                }
                if let PathChange::Upsert { path } = ch
                    && let Some(&ino) = self.names.get(path)
                    && let Some(&(_, since)) = self.holds.get(&ino)
                    && !self.tainted.contains(&ino)
                {
                    assert!(
                        self.now >= since + owm,
                        "{path:?} upserted at {} while held since {since}",
                        self.now
                    );
                }
                apply_change(replica, &self.view(), ch);
            }
            true
        }

        /// Closes everything, then drains with time moving on as needed.
        fn finish(&mut self, replica: &mut Tree) {
            for ino in std::mem::take(&mut self.fds) {
                if let Some(f) = self.path_of(ino) {
                    self.event(CloseWrite, &f, None, false);
                }
                self.unhold(ino);
            }
            let mut m: Vec<usize> = self.mmaps.iter().copied().collect();
            m.sort_unstable();
            for ino in m {
                match self.path_of(ino) {
                    Some(f) => self.event(CloseWrite, &f, None, false),
                    None => {
                        self.mmaps.remove(&ino);
                        self.unhold(ino);
                    }
                }
            }
            for _ in 0..10_000 {
                let Some(t) = self.c.poll_timeout() else {
                    break;
                };
                self.now = self.now.max(t);
                assert!(
                    self.poll(replica, false),
                    "poll_timeout {t} but nothing ready"
                );
            }
            assert_eq!(self.c.poll_timeout(), None);
            assert_eq!(self.c.pending(), 0);
        }
    }

    /// The replica side: what each change does, per the module docs.
    fn apply_change(r: &mut Tree, src: &Tree, ch: &PathChange) {
        let remove = |r: &mut Tree, q: &RelPath| r.retain(|k, _| !k.starts_with(q));
        let parent_ok = |r: &Tree, q: &RelPath| {
            q.parent()
                .is_none_or(|pp| matches!(r.get(&pp), Some((Kind::Dir, _))))
        };
        match ch {
            PathChange::Upsert { path } => match src.get(path) {
                None => remove(r, path),
                Some(&(k, v)) => {
                    assert!(parent_ok(r, path), "upsert of {path:?} without its parent");
                    if !(k == Kind::Dir && matches!(r.get(path), Some((Kind::Dir, _)))) {
                        remove(r, path);
                    }
                    r.insert(path.clone(), (k, v));
                }
            },
            PathChange::Remove { path } => remove(r, path),
            PathChange::Rename { from, to } => {
                if !r.contains_key(from) || from == to {
                    return;
                }
                assert!(!to.starts_with(from), "rename into itself");
                assert!(parent_ok(r, to), "rename to {to:?} without its parent");
                let moved: Vec<(RelPath, (Kind, u64))> = r
                    .iter()
                    .filter(|(k, _)| k.starts_with(from))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                remove(r, to);
                remove(r, from);
                for (k, v) in moved {
                    r.insert(k.rebase(from, to).unwrap(), v);
                }
            }
            PathChange::Rescan { path: None } => *r = src.clone(),
            PathChange::Rescan { path: Some(q) } => {
                if src.contains_key(q) {
                    assert!(parent_ok(r, q), "rescan of {q:?} without its parent");
                }
                remove(r, q);
                for (k, v) in src.iter().filter(|(k, _)| k.starts_with(q)) {
                    r.insert(k.clone(), *v);
                }
            }
        }
    }

    /// Operations whose events all reach the coalescer.
    fn precise_op() -> impl Strategy<Value = Op> {
        let b = any::<u8>;
        prop_oneof![
            4 => (b(), 0..3u8, any::<bool>())
                .prop_map(|(dir, name, keep_open)| Op::Create { dir, name, keep_open }),
            2 => (b(), 0..3u8).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
            2 => b().prop_map(|file| Op::Open { file }),
            3 => b().prop_map(|fd| Op::Write { fd }),
            2 => b().prop_map(|file| Op::WriteByPath { file }),
            3 => b().prop_map(|fd| Op::Close { fd }),
            1 => b().prop_map(|file| Op::Mmap { file }),
            1 => b().prop_map(|m| Op::MmapStore { m }),
            1 => b().prop_map(|entry| Op::Attrib { entry }),
            2 => b().prop_map(|file| Op::Unlink { file }),
            1 => b().prop_map(|dir| Op::Rmdir { dir }),
            6 => (b(), b(), 0..3u8).prop_map(|(entry, dir, name)| Op::Rename { entry, dir, name }),
            3 => (0..40u64).prop_map(|ms| Op::Advance { ms }),
            3 => Just(Op::Poll),
        ]
    }

    /// Also reported and unreported loss.
    fn op() -> impl Strategy<Value = Op> {
        let b = any::<u8>;
        prop_oneof![
            36 => precise_op(),
            1 => b().prop_map(|entry| Op::Lost { entry }),
            1 => (b(), b(), b(), 0..3u8)
                .prop_map(|(which, entry, dir, name)| Op::Lossy { which, entry, dir, name }),
        ]
    }

    fn config() -> impl Strategy<Value = CoalescerConfig> {
        (
            prop_oneof![Just(0u64), Just(3), Just(20)],
            prop_oneof![Just(1usize), Just(2), Just(4096)],
            prop_oneof![Just(15u64), Just(60)],
            prop_oneof![1 => Just(6usize), 1 => Just(12), 3 => Just(1_000_000)],
        )
            .prop_map(|(debounce_ms, max_batch, open_write_max_ms, max_pending)| {
                CoalescerConfig {
                    debounce_ms,
                    max_batch,
                    open_write_max_ms,
                    max_pending,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2500))]

        /// Random events over a small tree, with batches drained at random times and
        /// applied to a replica the way the daemon would: once everything is closed and
        /// drained, the replica equals the source. No upsert ships a file while a writer
        /// holds it (before open_write_max), and every batch is safe to apply in order.
        #[test]
        fn the_replica_converges_to_the_source(
            cfg in config(),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let mut src = Src::new(cfg);
            let mut replica = src.view();
            for op in &ops {
                src.apply(op);
                if matches!(op, Op::Poll) {
                    src.poll(&mut replica, false);
                }
            }
            src.finish(&mut replica);
            prop_assert_eq!(replica, src.view());
        }

        /// The same without any loss, and without the memory bound: the precise paths
        /// (pins, chains, cancellation) alone, no rescan to mask a mistake.
        #[test]
        fn the_replica_converges_without_loss(
            cfg in config().prop_map(|c| CoalescerConfig { max_pending: 1_000_000, ..c }),
            ops in proptest::collection::vec(precise_op(), 1..80),
        ) {
            let mut src = Src::new(cfg);
            let mut replica = src.view();
            for op in &ops {
                src.apply(op);
                if matches!(op, Op::Poll) {
                    src.poll(&mut replica, false);
                }
            }
            src.finish(&mut replica);
            prop_assert_eq!(replica, src.view());
        }

        /// Renames alone ship renames (and removals of what they replaced), never
        /// content, and still converge.
        #[test]
        fn pure_renames_ship_no_upsert(
            cfg in config().prop_map(|c| CoalescerConfig { max_pending: 1_000_000, ..c }),
            ops in proptest::collection::vec(
                prop_oneof![
                    6 => (any::<u8>(), any::<u8>(), 0..3u8)
                        .prop_map(|(entry, dir, name)| Op::Rename { entry, dir, name }),
                    1 => (0..40u64).prop_map(|ms| Op::Advance { ms }),
                    1 => Just(Op::Poll),
                ],
                1..40,
            ),
        ) {
            let mut src = Src::new(cfg);
            let mut replica = src.view();
            for op in &ops {
                src.apply(op);
                if matches!(op, Op::Poll) {
                    src.poll(&mut replica, true);
                }
            }
            for _ in 0..1000 {
                let Some(t) = src.c.poll_timeout() else { break };
                src.now = src.now.max(t);
                src.poll(&mut replica, true);
            }
            prop_assert_eq!(replica, src.view());
        }
    }
}
