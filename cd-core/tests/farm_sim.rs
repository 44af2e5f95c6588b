//! A deterministic discrete-event simulation of a farm distributing one content set:
//! no network, virtual time, seeded randomness. It drives the sans-IO pieces of
//! cd-core (topology, routes, catch-up scheduling, hybrid clocks, last-writer-wins)
//! the way the daemon will, through crashes, degraded nodes and cut links, and checks
//! that everything converges.
//!
//! # The model
//!
//! - **Master** (never fails here; its control channel to a live node never breaks):
//!   collects heartbeats every `TICK_MS` (up or not, incarnation, degraded flag,
//!   version vector), declares a node down after `DOWN_AFTER_MS` of silence, sees a
//!   restart by its new incarnation, recomputes every source's route table when the
//!   routed health changes (checking each table with `support/route_check.rs`) and
//!   pushes the tables to every node. It runs the [`CatchUpScheduler`] (catch-up from
//!   the nearest healthy member, per policy) and a lag repair: a node whose version
//!   vector stays behind the farm's for `LAG_REPAIR_MS` is told to catch up from its
//!   parent for the origin it lags on.
//! - **Nodes** hold per-path last-writer-wins cells and a version vector, durable as
//!   of the last applied change set (a crash is SIGKILL: routes, pending retries and
//!   in-flight catch-ups are lost; the clock is re-seeded from the stored stamps, and
//!   the physical clock may come back skewed differently, even backwards). A change
//!   set applies if it is the next of its origin; its writes are resolved with
//!   [`resolve`] and forwarded at once to the node's children for that origin
//!   (cut-through). A gap makes the node pull a catch-up from the sender, unless it is
//!   waiting for its own policy catch-up after a restart.
//! - **Links** deliver in order after a latency that depends on the link class. A
//!   delivery to a dead node or over a cut link fails; the sender learns it after a
//!   timeout and retries at most `MAX_RETRIES` times with backoff, then gives up.
//! - **Sources** (one to three: N:M) write change sets of one to three paths from a
//!   small set, some at the same instant on the same path on purpose.
//!
//! # What it checks
//!
//! - Every route table the master computes satisfies the route rules.
//! - Every copy a source sends of its own change set is one of its table's uplink
//!   copies, which is at most one per group of its region plus one per other region
//!   plus the targets only the source can feed.
//! - Local writes always win where they are made (the clock keeps causality).
//! - Catch-ups obey the policy: not before `At(t)`, not before the command.
//! - After the chaos stops (every node restarted, links healed, degradation
//!   cleared, the catch-up command issued), every member converges to the same
//!   state, equal to the last-writer-wins merge of all writes, with the version
//!   vector of all change sets, and nothing left to catch up.
//! - The conflict log is sound (each record names two concurrent writes of the path,
//!   the winner greater) and complete (every write that no later write of its path
//!   had seen, other than the final winner, is named as a loser).
//!
//! # What it does not prove
//!
//! Bytes, deltas and apply are modelled as whole-cell values; bandwidth and queueing
//! are not modelled (cut-through is "forward on arrival"); the master does not fail
//! and its control channel does not partition; link cuts are symmetric; message loss
//! other than a dead receiver or a cut link does not happen. It shows that the
//! algorithms converge under these faults, not how fast a real farm does.
//!
//! # Reproducing
//!
//! A failure prints the seed and the trace's tail. `FARM_SIM_SEED=<seed>` runs that
//! scenario alone, `FARM_SIM_TRACE=1` keeps every delivery in the trace and prints it,
//! `FARM_SIM_SCENARIOS=<n>` runs more scenarios.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use cd_core::catchup::{CatchUpPolicy, CatchUpScheduler};
use cd_core::lww::{Conflict, HlcClock, Stamp, Version, VersionVector, resolve};
use cd_core::path::RelPath;
use cd_core::route::{EdgeKind, Health, HealthMap, RouteRequest, RouteTable, routes};
use cd_core::topology::{LinkClass, ServerId, ServerSpec, Topology};

#[path = "support/route_check.rs"]
mod route_check;

const TICK_MS: u64 = 250;
const DOWN_AFTER_MS: u64 = 1_000;
const LAG_REPAIR_MS: u64 = 1_000;
const MAX_RETRIES: u32 = 3;
const RETRY_BASE_MS: u64 = 40;
const CHAOS_MS: u64 = 12_000;
const COMMAND_AT_MS: u64 = CHAOS_MS + 2_000;
const DEADLINE_MS: u64 = CHAOS_MS + 60_000;
const PATHS: usize = 8;

fn latency(c: LinkClass) -> u64 {
    match c {
        LinkClass::SameGroup => 1,
        LinkClass::SameRegion => 5,
        LinkClass::International => 40,
    }
}

// ---------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------

/// SplitMix64: small, seedable, good enough for scenario generation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------
// Topologies
// ---------------------------------------------------------------------------------

const TOPOLOGIES: [&str; 4] = ["one-group", "2x2x2", "uneven-3-regions", "giant-50"];

/// Group sizes per region.
fn shape(name: &str) -> Vec<Vec<usize>> {
    match name {
        "one-group" => vec![vec![6]],
        "2x2x2" => vec![vec![2, 2], vec![2, 2]],
        "uneven-3-regions" => vec![vec![4, 1], vec![2], vec![3, 2, 1]],
        "giant-50" => vec![vec![50]],
        _ => unreachable!(),
    }
}

fn build_topology(name: &str, rng: &mut Rng) -> Topology {
    let mut specs = Vec::new();
    for (r, groups) in shape(name).iter().enumerate() {
        for (g, &n) in groups.iter().enumerate() {
            for i in 0..n {
                let w = rng.range(1, 4) as u32;
                specs.push(ServerSpec::new(
                    &format!("r{r}g{g}n{i:02}"),
                    &format!("r{r}"),
                    &format!("g{g}"),
                    w,
                ));
            }
        }
    }
    Topology::new(specs).unwrap()
}

// ---------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------

/// `None` is a deletion (a tombstone that wins or loses like any write).
type Value = Option<u32>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cell {
    value: Value,
    ver: Version,
}

/// What a node keeps on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Store {
    cells: BTreeMap<usize, Cell>,
    vv: VersionVector,
}

impl Store {
    fn max_stamp(&self) -> Option<&Stamp> {
        self.cells.values().map(|c| c.ver.stamp()).max()
    }
}

#[derive(Debug)]
struct ChangeSet {
    origin: ServerId,
    seq: u64,
    writes: Vec<(usize, Cell)>,
}

type Tables = BTreeMap<ServerId, Rc<RouteTable>>;

#[derive(Debug)]
struct Node {
    up: bool,
    inc: u32,
    degraded: bool,
    store: Store,
    clock: HlcClock,
    skew: i64,
    tables: Rc<Tables>,
    epoch: u64,
    /// Restarted and not yet caught up per policy: no self-repair meanwhile.
    awaiting: bool,
    /// A gap or lag repair is in flight.
    repairing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Policy,
    Repair,
}

#[derive(Debug)]
enum Ev {
    Write {
        node: ServerId,
        writes: Vec<(usize, Value)>,
    },
    Deliver {
        from: ServerId,
        from_inc: u32,
        to: ServerId,
        cs: Rc<ChangeSet>,
        attempt: u32,
    },
    Retry {
        from: ServerId,
        from_inc: u32,
        to: ServerId,
        cs: Rc<ChangeSet>,
        attempt: u32,
    },
    Tables {
        node: ServerId,
        epoch: u64,
        tables: Rc<Tables>,
    },
    Order {
        node: ServerId,
        inc: u32,
        peer: ServerId,
        kind: Kind,
    },
    Request {
        node: ServerId,
        inc: u32,
        peer: ServerId,
        kind: Kind,
    },
    Reply {
        node: ServerId,
        inc: u32,
        peer: ServerId,
        kind: Kind,
        store: Rc<Store>,
    },
    Failed {
        node: ServerId,
        inc: u32,
        kind: Kind,
    },
    Tick,
    Crash(ServerId),
    Restart(ServerId),
    Degrade(ServerId, bool),
    Cut(ServerId, ServerId, bool),
    EndChaos,
    Command,
}

#[derive(Debug)]
struct Master {
    sched: CatchUpScheduler,
    last_seen: Vec<u64>,
    known_inc: Vec<u32>,
    believed_down: Vec<bool>,
    degraded: Vec<bool>,
    vv: Vec<VersionVector>,
    lag_since: Vec<Option<u64>>,
    health: Option<HealthMap>,
    tables: Rc<Tables>,
    epoch: u64,
}

/// Counts over all scenarios, to show what the runs exercised.
#[derive(Debug, Default, Clone)]
struct Stats {
    scenarios: BTreeMap<&'static str, u64>,
    writes: u64,
    source_copies: u64,
    target_copies_if_direct: u64,
    conflicts: u64,
    tie_conflicts: u64,
    gap_repairs: u64,
    lag_repairs: u64,
    policy_catchups: BTreeMap<&'static str, u64>,
    retries: u64,
    gave_up: u64,
    crashes: u64,
    source_crashes: u64,
    region_outages: u64,
    farm_outages: u64,
    clock_backwards: u64,
    recomputes: u64,
    headless_tables: u64,
    forced_source_copies: u64,
    overrides_accepted: u64,
    overrides_rejected: u64,
    /// Route situations met by the tables computed, by name.
    route_cases: BTreeMap<&'static str, u64>,
    converge_ms_max: u64,
    /// Per topology: what sources sent of their own change sets.
    uplink: BTreeMap<&'static str, Uplink>,
}

#[derive(Debug, Default, Clone)]
struct Uplink {
    writes: u64,
    copies: u64,
    /// Copies to targets that only the source could feed, or that a manual route put
    /// under it.
    forced: u64,
    /// Targets per write (the copies a source without routes would send).
    targets: u64,
}

struct Sim<'s> {
    seed: u64,
    topo_name: &'static str,
    topo: Topology,
    members: Vec<ServerId>,
    sources: Vec<ServerId>,
    overrides: BTreeMap<ServerId, ServerId>,
    fanout: usize,
    policy: CatchUpPolicy,
    rng: Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    next: u64,
    nodes: Vec<Node>,
    cuts: BTreeSet<(ServerId, ServerId)>,
    link_last: BTreeMap<(ServerId, ServerId), u64>,
    master: Master,
    history: Vec<(usize, Value, Version)>,
    conflicts: BTreeSet<Conflict>,
    paths: Vec<RelPath>,
    command_at: Option<u64>,
    trace: Vec<String>,
    full_trace: bool,
    stats: &'s mut Stats,
}

impl Sim<'_> {
    fn name(&self, id: ServerId) -> &str {
        self.topo.name(id)
    }

    fn log(&mut self, msg: impl FnOnce(&Self) -> String) {
        let line = format!("{:>6} {}", self.now, msg(self));
        self.trace.push(line);
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.queue.insert((at, self.next), ev);
        self.next += 1;
    }

    fn phys(&self, n: ServerId) -> u64 {
        (self.now as i64 + self.nodes[n.index()].skew).max(0) as u64
    }

    fn lat(&self, a: ServerId, b: ServerId) -> u64 {
        latency(self.topo.link_class(a, b))
    }

    fn cut(&self, a: ServerId, b: ServerId) -> bool {
        self.cuts.contains(&(a.min(b), a.max(b)))
    }

    fn send(&mut self, from: ServerId, to: ServerId, cs: Rc<ChangeSet>, attempt: u32) {
        let last = self.link_last.get(&(from, to)).copied().unwrap_or(0);
        let at = (self.now + self.lat(from, to)).max(last);
        self.link_last.insert((from, to), at);
        let from_inc = self.nodes[from.index()].inc;
        self.push(
            at,
            Ev::Deliver {
                from,
                from_inc,
                to,
                cs,
                attempt,
            },
        );
    }

    /// Resolves one incoming cell at `n`; conflicts go to the log.
    fn merge_cell(&mut self, n: ServerId, path: usize, cell: &Cell) -> bool {
        let cur = self.nodes[n.index()].store.cells.get(&path);
        let r = resolve(&self.paths[path], cur.map(|c| &c.ver), &cell.ver);
        if let Some(c) = r.conflict
            && self.conflicts.insert(c.clone())
        {
            self.log(|_| format!("conflict {c}"));
        }
        if r.take {
            self.nodes[n.index()].store.cells.insert(path, cell.clone());
        }
        r.take
    }

    fn run(&mut self) -> Result<(), String> {
        self.push(0, Ev::Tick);
        let mut converged = false;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            self.now = t;
            if t > DEADLINE_MS {
                break;
            }
            match ev {
                Ev::Tick => {
                    self.tick()?;
                    if self.now >= COMMAND_AT_MS && self.converged() {
                        converged = true;
                        break;
                    }
                    self.push(t + TICK_MS, Ev::Tick);
                }
                ev => self.handle(ev)?,
            }
        }
        if !converged {
            return Err(format!(
                "did not converge by {DEADLINE_MS} ms:\n{}",
                self.divergence()
            ));
        }
        self.stats.converge_ms_max = self.stats.converge_ms_max.max(self.now - CHAOS_MS);
        self.check_final()
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Write { node, writes } => self.write(node, writes)?,
            Ev::Deliver {
                from,
                from_inc,
                to,
                cs,
                attempt,
            } => {
                if self.full_trace {
                    self.log(|s| {
                        format!(
                            "deliver {}#{} {}→{} try {attempt}",
                            s.name(cs.origin),
                            cs.seq,
                            s.name(from),
                            s.name(to)
                        )
                    });
                }
                if !self.nodes[to.index()].up || self.cut(from, to) {
                    let lat = self.lat(from, to);
                    if attempt < MAX_RETRIES {
                        let at = self.now + lat + (RETRY_BASE_MS << attempt);
                        self.push(
                            at,
                            Ev::Retry {
                                from,
                                from_inc,
                                to,
                                cs,
                                attempt: attempt + 1,
                            },
                        );
                    } else {
                        self.stats.gave_up += 1;
                        self.log(|s| {
                            format!(
                                "{} gives up sending {}#{} to {}",
                                s.name(from),
                                s.name(cs.origin),
                                cs.seq,
                                s.name(to)
                            )
                        });
                    }
                } else {
                    self.apply(to, from, &cs)?;
                }
            }
            Ev::Retry {
                from,
                from_inc,
                to,
                cs,
                attempt,
            } => {
                let f = &self.nodes[from.index()];
                if f.up && f.inc == from_inc {
                    self.stats.retries += 1;
                    self.send(from, to, cs, attempt);
                }
            }
            Ev::Tables {
                node,
                epoch,
                tables,
            } => {
                let n = &mut self.nodes[node.index()];
                if n.up && epoch > n.epoch {
                    n.epoch = epoch;
                    n.tables = tables;
                }
            }
            Ev::Order {
                node,
                inc,
                peer,
                kind,
            } => {
                let n = &mut self.nodes[node.index()];
                if !n.up || n.inc != inc || (kind == Kind::Repair && n.repairing) {
                    return Ok(());
                }
                if kind == Kind::Repair {
                    n.repairing = true;
                }
                let at = self.now + self.lat(node, peer);
                self.push(
                    at,
                    Ev::Request {
                        node,
                        inc,
                        peer,
                        kind,
                    },
                );
            }
            Ev::Request {
                node,
                inc,
                peer,
                kind,
            } => {
                let at = self.now + self.lat(node, peer);
                if self.nodes[peer.index()].up && !self.cut(node, peer) {
                    let store = Rc::new(self.nodes[peer.index()].store.clone());
                    self.push(
                        at,
                        Ev::Reply {
                            node,
                            inc,
                            peer,
                            kind,
                            store,
                        },
                    );
                } else {
                    self.push(at, Ev::Failed { node, inc, kind });
                }
            }
            Ev::Reply {
                node,
                inc,
                peer,
                kind,
                store,
            } => {
                let n = &self.nodes[node.index()];
                if !n.up || n.inc != inc {
                    return Ok(());
                }
                for (&p, c) in &store.cells {
                    self.merge_cell(node, p, c);
                }
                let phys = self.phys(node);
                let n = &mut self.nodes[node.index()];
                n.store.vv.merge(&store.vv);
                if let Some(s) = store.max_stamp() {
                    n.clock.observe(s.hlc, phys);
                }
                match kind {
                    Kind::Repair => n.repairing = false,
                    Kind::Policy => {
                        n.awaiting = false;
                        self.master.sched.handle_done(node);
                        let k = match self.policy {
                            CatchUpPolicy::Immediate => "immediate",
                            CatchUpPolicy::At(_) => "scheduled",
                            CatchUpPolicy::OnCommand => "on command",
                        };
                        *self.stats.policy_catchups.entry(k).or_default() += 1;
                    }
                }
                self.log(|s| {
                    format!(
                        "{} caught up ({kind:?}) from {}",
                        s.name(node),
                        s.name(peer)
                    )
                });
            }
            Ev::Failed { node, inc, kind } => {
                let n = &mut self.nodes[node.index()];
                if !n.up || n.inc != inc {
                    return Ok(());
                }
                match kind {
                    Kind::Repair => n.repairing = false,
                    Kind::Policy => self.master.sched.handle_failed(node, self.now + TICK_MS),
                }
                self.log(|s| format!("{} catch-up ({kind:?}) failed", s.name(node)));
            }
            Ev::Crash(id) => {
                let n = &mut self.nodes[id.index()];
                if n.up {
                    n.up = false;
                    n.tables = Rc::default();
                    n.epoch = 0;
                    self.stats.crashes += 1;
                    if self.sources.contains(&id) {
                        self.stats.source_crashes += 1;
                    }
                    self.log(|s| format!("{} crashes", s.name(id)));
                }
            }
            Ev::Restart(id) => {
                if !self.nodes[id.index()].up {
                    let skew = self.rng.range(0, 600) as i64 - 400;
                    let n = &mut self.nodes[id.index()];
                    if skew < n.skew {
                        self.stats.clock_backwards += 1;
                    }
                    n.skew = skew;
                    n.up = true;
                    n.inc += 1;
                    n.awaiting = true;
                    n.repairing = false;
                    n.clock = HlcClock::new();
                    let phys = self.phys(id);
                    let n = &mut self.nodes[id.index()];
                    if let Some(s) = n.store.max_stamp() {
                        let h = s.hlc;
                        n.clock.observe(h, phys);
                    }
                    self.log(|s| format!("{} restarts (skew {skew} ms)", s.name(id)));
                }
            }
            Ev::Degrade(id, on) => {
                self.nodes[id.index()].degraded = on;
                self.log(|s| {
                    format!(
                        "{} {}",
                        s.name(id),
                        if on { "degrades" } else { "recovers its load" }
                    )
                });
            }
            Ev::Cut(a, b, on) => {
                if on {
                    self.cuts.insert((a.min(b), a.max(b)));
                } else {
                    self.cuts.remove(&(a.min(b), a.max(b)));
                }
                self.log(|s| {
                    format!(
                        "link {}–{} {}",
                        s.name(a),
                        s.name(b),
                        if on { "cut" } else { "healed" }
                    )
                });
            }
            Ev::EndChaos => {
                self.cuts.clear();
                for &m in &self.members.clone() {
                    self.nodes[m.index()].degraded = false;
                    self.handle(Ev::Restart(m))?;
                }
                self.log(|_| "chaos ends".into());
            }
            Ev::Command => {
                let n = self.master.sched.handle_command(None, self.now);
                self.command_at = Some(self.now);
                self.log(|_| format!("operator: catch up ({n} waiting)"));
            }
            Ev::Tick => unreachable!(),
        }
        Ok(())
    }

    fn write(&mut self, node: ServerId, writes: Vec<(usize, Value)>) -> Result<(), String> {
        if !self.nodes[node.index()].up {
            self.log(|s| format!("{} is down: its write does not happen", s.name(node)));
            return Ok(());
        }
        let origin = self.name(node).to_string();
        let phys = self.phys(node);
        let n = &mut self.nodes[node.index()];
        let seq = n.store.vv.get(&origin) + 1;
        let hlc = n.clock.now(phys);
        let ver = Version::new(
            Stamp {
                hlc,
                origin: origin.clone(),
            },
            seq,
            n.store.vv.clone(),
        );
        let cells: Vec<(usize, Cell)> = writes
            .iter()
            .map(|&(p, value)| {
                (
                    p,
                    Cell {
                        value,
                        ver: ver.clone(),
                    },
                )
            })
            .collect();
        let before = self.conflicts.len();
        for (p, c) in &cells {
            if !self.merge_cell(node, *p, c) {
                return Err(format!(
                    "{origin}'s own write of p{p} lost where it was made: causality broken"
                ));
            }
        }
        if self.conflicts.len() != before {
            return Err(format!(
                "{origin}'s own write conflicted with something it had seen"
            ));
        }
        self.nodes[node.index()].store.vv.observe(&origin, seq);
        for (p, c) in &cells {
            self.history.push((*p, c.value, c.ver.clone()));
        }
        self.log(|_| format!("{origin} writes #{seq} at {hlc}: {writes:?}"));
        let cs = Rc::new(ChangeSet {
            origin: node,
            seq,
            writes: cells,
        });
        // Uplink: what leaves the source is its table's children, no more.
        let table = self.nodes[node.index()].tables.get(&node).cloned();
        let children = table
            .as_ref()
            .map(|t| t.children(node).to_vec())
            .unwrap_or_default();
        let mut forced = 0;
        if let Some(t) = &table {
            let src_region = self.topo.server(node).region_index();
            let mut groups = BTreeSet::new();
            let mut regions = BTreeSet::new();
            for &m in self.members.iter().filter(|&&m| m != node) {
                let s = self.topo.server(m);
                if s.region_index() == src_region {
                    groups.insert(s.group_index());
                } else {
                    regions.insert(s.region_index());
                }
            }
            forced = children
                .iter()
                .filter(|&&c| {
                    matches!(
                        t.edge(c).map(|e| e.kind),
                        Some(EdgeKind::Nearest | EdgeKind::Manual)
                    )
                })
                .count();
            if children.len() != t.uplink_copies()
                || children.len() > groups.len() + regions.len() + forced
            {
                return Err(format!(
                    "{origin} sends {} copies; groups of its region {}, other regions {}, forced {forced}",
                    children.len(),
                    groups.len(),
                    regions.len()
                ));
            }
        }
        self.stats.writes += 1;
        self.stats.source_copies += children.len() as u64;
        self.stats.target_copies_if_direct += self.members.len() as u64 - 1;
        let u = self.stats.uplink.entry(self.topo_name).or_default();
        u.writes += 1;
        u.copies += children.len() as u64;
        u.forced += forced as u64;
        u.targets = self.members.len() as u64 - 1;
        for c in children {
            self.send(node, c, cs.clone(), 0);
        }
        Ok(())
    }

    fn apply(&mut self, n: ServerId, from: ServerId, cs: &Rc<ChangeSet>) -> Result<(), String> {
        let origin = self.name(cs.origin).to_string();
        let node = &self.nodes[n.index()];
        let have = node.store.vv.get(&origin);
        if cs.seq <= have {
            return Ok(());
        }
        if cs.seq > have + 1 {
            if !node.awaiting && !node.repairing {
                self.nodes[n.index()].repairing = true;
                self.stats.gap_repairs += 1;
                let inc = self.nodes[n.index()].inc;
                let at = self.now + self.lat(n, from);
                self.push(
                    at,
                    Ev::Request {
                        node: n,
                        inc,
                        peer: from,
                        kind: Kind::Repair,
                    },
                );
                self.log(|s| {
                    format!(
                        "{} has {origin}#{have}, got #{}: gap, pulls from {}",
                        s.name(n),
                        cs.seq,
                        s.name(from)
                    )
                });
            }
            return Ok(());
        }
        for (p, c) in &cs.writes {
            self.merge_cell(n, *p, c);
        }
        let phys = self.phys(n);
        let node = &mut self.nodes[n.index()];
        node.store.vv.observe(&origin, cs.seq);
        if let Some((_, c)) = cs.writes.first() {
            node.clock.observe(c.ver.stamp().hlc, phys);
        }
        let children = node
            .tables
            .get(&cs.origin)
            .map(|t| t.children(n).to_vec())
            .unwrap_or_default();
        for c in children {
            self.send(n, c, cs.clone(), 0);
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), String> {
        let now = self.now;
        let mut recovered = false;
        for &m in &self.members.clone() {
            let i = m.index();
            let (up, inc, degraded) = {
                let n = &self.nodes[i];
                (n.up, n.inc, n.degraded)
            };
            if up {
                self.master.last_seen[i] = now;
                if self.master.known_inc[i] != inc {
                    if self.master.known_inc[i] != 0 {
                        self.master.sched.handle_recovered(m, now);
                        recovered = true;
                        self.log(|s| {
                            format!("master: {} is back, catch-up per {:?}", s.name(m), s.policy)
                        });
                    }
                    self.master.known_inc[i] = inc;
                }
                if self.master.believed_down[i] {
                    self.master.believed_down[i] = false;
                }
                self.master.degraded[i] = degraded;
                self.master.vv[i] = self.nodes[i].store.vv.clone();
            } else if now - self.master.last_seen[i] > DOWN_AFTER_MS
                && !self.master.believed_down[i]
            {
                self.master.believed_down[i] = true;
                self.master.sched.handle_down(m);
                self.log(|s| format!("master: {} is down", s.name(m)));
            }
        }

        // Catch-ups that are due, from the nearest member that is healthy (or, if
        // every other member is catching up too, from the nearest one that is up).
        while let Some(n) = self.master.sched.poll_due(now) {
            if let CatchUpPolicy::At(t) = self.policy
                && now < t
            {
                return Err(format!(
                    "catch-up of {} at {now} before its time {t}",
                    self.name(n)
                ));
            }
            if self.policy == CatchUpPolicy::OnCommand && self.command_at.is_none() {
                return Err(format!("catch-up of {} before the command", self.name(n)));
            }
            let m = &self.master;
            let healthy = self.members.iter().copied().filter(|&x| {
                !m.believed_down[x.index()] && !m.sched.is_pending(x) && !m.degraded[x.index()]
            });
            let any_up = self
                .members
                .iter()
                .copied()
                .filter(|&x| !m.believed_down[x.index()]);
            match self
                .topo
                .nearest(n, healthy)
                .or_else(|| self.topo.nearest(n, any_up))
            {
                Some(peer) => {
                    let inc = self.master.known_inc[n.index()];
                    self.push(
                        now + 1,
                        Ev::Order {
                            node: n,
                            inc,
                            peer,
                            kind: Kind::Policy,
                        },
                    );
                    self.log(|s| format!("master: {} catches up from {}", s.name(n), s.name(peer)));
                }
                None => self.master.sched.handle_failed(n, now + TICK_MS),
            }
        }

        // Route health; recompute and push on change.
        let mut h = HealthMap::new(&self.topo, Health::Up);
        for &m in &self.members {
            let i = m.index();
            let reported = if self.master.believed_down[i] {
                Health::Down
            } else if self.master.degraded[i] {
                Health::Degraded
            } else {
                Health::Up
            };
            h.set(m, self.master.sched.route_health(m, reported));
        }
        if recovered || self.master.health.as_ref() != Some(&h) {
            let mut tables = Tables::new();
            for &src in &self.sources {
                let mut req = RouteRequest::new(src, self.members.iter().copied());
                req.overrides = self.overrides.clone();
                req.group_fanout = self.fanout;
                let t = routes(&self.topo, &h, &req);
                let seen = route_check::check(&self.topo, &h, &req, &t).map_err(|e| {
                    format!(
                        "route table of {} broke a rule: {e}\n{t:#?}",
                        self.name(src)
                    )
                })?;
                self.stats.recomputes += 1;
                self.stats.headless_tables += u64::from(seen.headless_group);
                self.stats.forced_source_copies += u64::from(seen.forced_source_copy);
                self.stats.overrides_accepted += u64::from(seen.accepted_override);
                self.stats.overrides_rejected += t.rejected_overrides().len() as u64;
                for (k, v) in [
                    ("headless region", seen.headless_region),
                    ("fan-out overflow", seen.fanout_overflow),
                    ("cycle rejected", seen.cycle_rejected),
                    ("degraded leaf", seen.degraded_leaf),
                    ("region head", seen.region_head),
                ] {
                    *self.stats.route_cases.entry(k).or_default() += u64::from(v);
                }
                tables.insert(src, Rc::new(t));
            }
            self.master.epoch += 1;
            self.master.tables = Rc::new(tables);
            self.master.health = Some(h);
            let (epoch, tables) = (self.master.epoch, self.master.tables.clone());
            for &m in &self.members.clone() {
                self.push(
                    now + 1,
                    Ev::Tables {
                        node: m,
                        epoch,
                        tables: tables.clone(),
                    },
                );
            }
            self.log(|s| {
                let up: Vec<String> = s
                    .sources
                    .iter()
                    .map(|&x| format!("{}:{}", s.name(x), s.master.tables[&x].uplink_copies()))
                    .collect();
                format!(
                    "master: routes epoch {epoch} (uplink copies {})",
                    up.join(" ")
                )
            });
        }

        // Lag repair.
        let mut target = VersionVector::new();
        for &m in &self.members {
            target.merge(&self.master.vv[m.index()]);
        }
        for &m in &self.members.clone() {
            let i = m.index();
            if self.master.believed_down[i]
                || self.master.sched.is_pending(m)
                || self.master.vv[i].dominates(&target)
            {
                self.master.lag_since[i] = None;
                continue;
            }
            match self.master.lag_since[i] {
                None => self.master.lag_since[i] = Some(now),
                Some(t) if now - t >= LAG_REPAIR_MS => {
                    self.master.lag_since[i] = Some(now);
                    let behind =
                        self.sources.iter().copied().find(|&o| {
                            self.master.vv[i].get(self.name(o)) < target.get(self.name(o))
                        });
                    let parent = behind.and_then(|o| self.master.tables.get(&o)?.parent(m));
                    if let Some(p) = parent {
                        self.stats.lag_repairs += 1;
                        let inc = self.master.known_inc[i];
                        self.push(
                            now + 1,
                            Ev::Order {
                                node: m,
                                inc,
                                peer: p,
                                kind: Kind::Repair,
                            },
                        );
                        self.log(|s| {
                            format!("master: {} lags, repairs from {}", s.name(m), s.name(p))
                        });
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The last-writer-wins merge of every write.
    fn expected(&self) -> (BTreeMap<usize, Cell>, VersionVector) {
        let mut cells: BTreeMap<usize, Cell> = BTreeMap::new();
        let mut vv = VersionVector::new();
        for (p, value, ver) in &self.history {
            vv.observe(ver.origin(), ver.seq());
            if cells.get(p).is_none_or(|c| ver.stamp() > c.ver.stamp()) {
                cells.insert(
                    *p,
                    Cell {
                        value: *value,
                        ver: ver.clone(),
                    },
                );
            }
        }
        (cells, vv)
    }

    fn converged(&self) -> bool {
        let (cells, vv) = self.expected();
        self.master.sched.pending().next().is_none()
            && self.members.iter().all(|&m| {
                let n = &self.nodes[m.index()];
                n.up && n.store.cells == cells && n.store.vv == vv
            })
    }

    fn divergence(&self) -> String {
        let (cells, vv) = self.expected();
        let mut out = format!(
            "expected vv {vv:?}\npending catch-ups: {:?}\n",
            self.master
                .sched
                .pending()
                .map(|m| self.name(m))
                .collect::<Vec<_>>()
        );
        for &m in &self.members {
            let n = &self.nodes[m.index()];
            if n.store.cells != cells || n.store.vv != vv {
                let wrong: Vec<usize> = (0..PATHS)
                    .filter(|p| n.store.cells.get(p) != cells.get(p))
                    .collect();
                out += &format!(
                    "{}: up {} vv {:?} wrong paths {wrong:?}\n",
                    self.name(m),
                    n.up,
                    n.store.vv
                );
            }
        }
        out
    }

    fn check_final(&mut self) -> Result<(), String> {
        // Soundness: each record names two concurrent writes of its path, the winner
        // greater.
        let by_stamp: BTreeMap<(usize, &Stamp), &Version> = self
            .history
            .iter()
            .map(|(p, _, v)| ((*p, v.stamp()), v))
            .collect();
        let path_ix = |r: &RelPath| self.paths.iter().position(|p| p == r);
        for c in &self.conflicts {
            let p = path_ix(&c.path).ok_or("conflict on an unknown path")?;
            let (Some(w), Some(l)) = (by_stamp.get(&(p, &c.winner)), by_stamp.get(&(p, &c.loser)))
            else {
                return Err(format!("conflict {c} names a write that did not happen"));
            };
            if !w.concurrent_with(l) || c.winner <= c.loser {
                return Err(format!("conflict {c} is not a concurrent overwrite"));
            }
        }
        // Completeness: every write of a path that no other write of it had seen,
        // other than the final winner, is named as a loser.
        let (cells, _) = self.expected();
        let losers: BTreeSet<(usize, &Stamp)> = self
            .conflicts
            .iter()
            .filter_map(|c| Some((path_ix(&c.path)?, &c.loser)))
            .collect();
        for (p, _, v) in &self.history {
            let superseded = self
                .history
                .iter()
                .any(|(q, _, w)| q == p && w.stamp() != v.stamp() && w.has_seen(v));
            let winner = cells.get(p).is_some_and(|c| c.ver.stamp() == v.stamp());
            if !superseded && !winner && !losers.contains(&(*p, v.stamp())) {
                return Err(format!(
                    "p{p}: {} was overwritten by a concurrent write, but no conflict names it",
                    v.stamp()
                ));
            }
        }
        self.stats.conflicts += self.conflicts.len() as u64;
        self.stats.tie_conflicts += self
            .conflicts
            .iter()
            .filter(|c| c.winner.hlc == c.loser.hlc)
            .count() as u64;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------

/// Runs scenario `seed`; returns its outcome and its trace.
fn scenario(seed: u64, full_trace: bool, stats: &mut Stats) -> (Result<(), String>, Vec<String>) {
    let topo_name = TOPOLOGIES[(seed % 4) as usize];
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED);
    let topo = build_topology(topo_name, &mut rng);
    let all: Vec<ServerId> = topo.ids().collect();
    let n_sources = match rng.below(3) {
        0 => 1,
        1 => 2,
        _ => 2 + rng.below(2) as usize,
    };
    let mut sources: Vec<ServerId> = Vec::new();
    while sources.len() < n_sources.min(all.len()) {
        let s = rng.pick(&all);
        if !sources.contains(&s) {
            sources.push(s);
        }
    }
    sources.sort();
    // Most servers hold the content set; a few do not.
    let members: Vec<ServerId> = all
        .iter()
        .copied()
        .filter(|s| sources.contains(s) || !rng.percent(10))
        .collect();
    let mut overrides = BTreeMap::new();
    for _ in 0..rng.below(3) {
        overrides.insert(rng.pick(&members), rng.pick(&members));
    }
    let fanout = if topo_name == "giant-50" {
        rng.range(3, 8)
    } else {
        rng.range(1, 4)
    } as usize;
    let policy = match rng.below(3) {
        0 => CatchUpPolicy::Immediate,
        1 => CatchUpPolicy::At(rng.range(0, CHAOS_MS + 3_000)),
        _ => CatchUpPolicy::OnCommand,
    };
    let skews = [-300i64, 0, 0, 0, 200];
    let nodes = all
        .iter()
        .map(|_| Node {
            up: true,
            inc: 1,
            degraded: false,
            store: Store::default(),
            clock: HlcClock::new(),
            skew: rng.pick(&skews),
            tables: Rc::default(),
            epoch: 0,
            awaiting: false,
            repairing: false,
        })
        .collect();
    let master = Master {
        sched: CatchUpScheduler::new(policy),
        last_seen: vec![0; all.len()],
        known_inc: vec![0; all.len()],
        believed_down: vec![false; all.len()],
        degraded: vec![false; all.len()],
        vv: vec![VersionVector::new(); all.len()],
        lag_since: vec![None; all.len()],
        health: None,
        tables: Rc::default(),
        epoch: 0,
    };
    *stats.scenarios.entry(topo_name).or_default() += 1;
    let mut sim = Sim {
        seed,
        topo_name,
        topo,
        members,
        sources,
        overrides,
        fanout,
        policy,
        rng,
        now: 0,
        queue: BTreeMap::new(),
        next: 0,
        nodes,
        cuts: BTreeSet::new(),
        link_last: BTreeMap::new(),
        master,
        history: Vec::new(),
        conflicts: BTreeSet::new(),
        paths: (0..PATHS)
            .map(|i| RelPath::new(format!("p{i}")).unwrap())
            .collect(),
        command_at: None,
        trace: Vec::new(),
        full_trace,
        stats,
    };
    sim.log(|s| {
        format!(
            "seed {} topology {} sources {:?} members {} fanout {} policy {:?} overrides {:?}",
            s.seed,
            s.topo_name,
            s.sources.iter().map(|&x| s.name(x)).collect::<Vec<_>>(),
            s.members.len(),
            s.fanout,
            s.policy,
            s.overrides
                .iter()
                .map(|(c, p)| format!("{}<{}", s.name(*c), s.name(*p)))
                .collect::<Vec<_>>()
        )
    });
    schedule(&mut sim);
    let r = sim.run();
    (r, std::mem::take(&mut sim.trace))
}

/// Writes and chaos, all before `CHAOS_MS`.
fn schedule(sim: &mut Sim<'_>) {
    let members = sim.members.clone();
    let sources = sim.sources.clone();
    let rng = &mut sim.rng;
    let mut evs: Vec<(u64, Ev)> = Vec::new();
    // Writes.
    for &s in &sources {
        for _ in 0..rng.range(5, 14) {
            let t = rng.below(CHAOS_MS);
            let mut writes: Vec<(usize, Value)> = Vec::new();
            for _ in 0..rng.range(1, 3) {
                let p = rng.below(PATHS as u64) as usize;
                if writes.iter().all(|(q, _)| *q != p) {
                    writes.push((p, (!rng.percent(10)).then(|| rng.next() as u32 % 1000)));
                }
            }
            evs.push((t, Ev::Write { node: s, writes }));
        }
    }
    // Conflicts on purpose: every source writes one path at the same instant.
    if sources.len() > 1 {
        for _ in 0..rng.range(1, 3) {
            let t = rng.below(CHAOS_MS);
            let p = rng.below(PATHS as u64) as usize;
            for &s in &sources {
                evs.push((
                    t,
                    Ev::Write {
                        node: s,
                        writes: vec![(p, Some(rng.next() as u32 % 1000))],
                    },
                ));
            }
        }
    }
    // Crashes (sources too), degradation, link cuts.
    let span = |rng: &mut Rng, max: u64| {
        let start = rng.below(CHAOS_MS - 500);
        (start, (start + rng.range(100, max)).min(CHAOS_MS - 1))
    };
    for _ in 0..rng.range(1, 2 + members.len() as u64 / 4) {
        let n = rng.pick(&members);
        let (a, b) = span(rng, 4_000);
        evs.push((a, Ev::Crash(n)));
        evs.push((b, Ev::Restart(n)));
    }
    for _ in 0..rng.range(0, 2 + members.len() as u64 / 4) {
        let n = rng.pick(&members);
        let (a, b) = span(rng, 5_000);
        evs.push((a, Ev::Degrade(n, true)));
        evs.push((b, Ev::Degrade(n, false)));
    }
    // Cuts: half of them on an edge of a source's all-up routes (the links that
    // matter), some lasting until the chaos ends (past the last writes).
    let edges: Vec<(ServerId, ServerId)> = {
        let h = HealthMap::new(&sim.topo, Health::Up);
        let mut v = Vec::new();
        for &src in &sources {
            let mut req = RouteRequest::new(src, members.iter().copied());
            req.overrides = sim.overrides.clone();
            req.group_fanout = sim.fanout;
            v.extend(
                routes(&sim.topo, &h, &req)
                    .edges()
                    .map(|(c, e)| (c, e.parent)),
            );
        }
        v
    };
    for _ in 0..rng.range(0, 3 + members.len() as u64 / 5) {
        let (x, y) = if rng.percent(50) && !edges.is_empty() {
            rng.pick(&edges)
        } else {
            (rng.pick(&members), rng.pick(&members))
        };
        if x != y {
            let (a, mut b) = span(rng, 5_000);
            if rng.percent(20) {
                b = CHAOS_MS - 1;
            }
            evs.push((a, Ev::Cut(x, y, true)));
            evs.push((b, Ev::Cut(x, y, false)));
        }
    }
    // A whole region goes dark.
    if sim.topo.regions().len() > 1 && rng.percent(25) {
        let r = rng.below(sim.topo.regions().len() as u64) as usize;
        let (a, b) = span(rng, 4_000);
        for &m in members
            .iter()
            .filter(|&&m| sim.topo.server(m).region_index() == r)
        {
            evs.push((a, Ev::Crash(m)));
            evs.push((b, Ev::Restart(m)));
        }
        sim.stats.region_outages += 1;
    }
    // Or the whole farm, restarting one by one.
    if rng.percent(8) {
        let a = rng.below(CHAOS_MS - 3_000);
        for &m in &members {
            evs.push((a, Ev::Crash(m)));
            evs.push((a + rng.range(200, 2_500), Ev::Restart(m)));
        }
        sim.stats.farm_outages += 1;
    }
    evs.push((CHAOS_MS, Ev::EndChaos));
    if sim.policy == CatchUpPolicy::OnCommand {
        evs.push((COMMAND_AT_MS, Ev::Command));
    }
    for (t, ev) in evs {
        sim.push(t, ev);
    }
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok()?.parse().ok()
}

#[test]
fn farms_converge_under_chaos() {
    let full_trace = std::env::var_os("FARM_SIM_TRACE").is_some();
    let seeds: Vec<u64> = match env_u64("FARM_SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("FARM_SIM_SCENARIOS").unwrap_or(256)).collect(),
    };
    let mut stats = Stats::default();
    for seed in seeds {
        let (result, trace) = scenario(seed, full_trace, &mut stats);
        if full_trace && result.is_ok() {
            eprintln!("{}", trace.join("\n"));
        }
        if let Err(err) = result {
            // The scenario and its chaos come first, the end shows where it got stuck.
            let shown: Vec<String> = if full_trace || trace.len() <= 300 {
                trace.clone()
            } else {
                let mut v = trace[..150].to_vec();
                v.push(format!("   ... {} lines ...", trace.len() - 300));
                v.extend_from_slice(&trace[trace.len() - 150..]);
                v
            };
            panic!(
                "farm simulation seed {seed} failed: {err}\n\
                 reproduce: FARM_SIM_SEED={seed} FARM_SIM_TRACE=1 cargo test -p cd-core --test farm_sim -- --nocapture\n\
                 trace ({} lines):\n{}",
                trace.len(),
                shown.join("\n")
            );
        }
    }
    eprintln!("{stats:#?}");
    if env_u64("FARM_SIM_SEED").is_some() {
        return;
    }
    // The runs exercised what they claim to.
    let at_least = |what: &str, n: u64, min: u64| {
        assert!(n >= min, "{what}: only {n} (want {min}): {stats:#?}")
    };
    at_least("conflicts", stats.conflicts, 50);
    at_least("conflicts tied on the clock", stats.tie_conflicts, 5);
    at_least("gap repairs", stats.gap_repairs, 20);
    at_least("lag repairs", stats.lag_repairs, 20);
    at_least("retries given up", stats.gave_up, 20);
    at_least("source crashes", stats.source_crashes, 20);
    at_least("region outages", stats.region_outages, 10);
    at_least("farm outages", stats.farm_outages, 5);
    at_least("clocks set back on restart", stats.clock_backwards, 20);
    at_least("tables with a headless group", stats.headless_tables, 10);
    at_least(
        "tables where the source feeds a target no one else can",
        stats.forced_source_copies,
        5,
    );
    at_least(
        "tables with an accepted manual route",
        stats.overrides_accepted,
        20,
    );
    at_least("rejected manual routes", stats.overrides_rejected, 20);
    for k in ["immediate", "scheduled", "on command"] {
        at_least(k, stats.policy_catchups.get(k).copied().unwrap_or(0), 20);
    }
    // The source's uplink carries about one copy per group/region, not one per target.
    assert!(
        stats.source_copies * 4 < stats.target_copies_if_direct,
        "{stats:#?}"
    );
    // One group of 50: one copy per write, but for targets only the source could feed
    // (everyone else down or catching up after a farm-wide outage).
    let u = &stats.uplink["giant-50"];
    assert!(
        u.copies - u.forced <= u.writes && u.copies * 10 < u.writes * u.targets,
        "giant group: {u:?}"
    );
}
