//! The master's routing state: who sends each content set to whom, now.
//!
//! [`Farm`] holds the topology, what the master believes of every node's health, what
//! each node reported holding ([`pb::Progress`]), the links relays reported broken,
//! and the catch-ups still to run. From these it computes one route table per
//! content set with [`cd_core::route::routes`] (or the 1:N table of
//! `routing = "direct"`), which the master turns into each node's `parent` and
//! `targets` (its children, each with the policy of its link class).
//!
//! It is sans-IO, like the cd-core parts it drives: the master feeds it events
//! (a node connected or disconnected, progress, a broken link, a command, the clock)
//! and gets back [`FarmEvent`]s to log; after each it recomputes and pushes
//! assignments.
//!
//! - **Health.** A node with a control session is `Up`, one without is `Down`. A node
//!   still to catch up is `Degraded` for routing (a leaf: it must not pass its gaps
//!   on), and, until its catch-up is due under `catch_up = "command"` or `"at HH:MM"`,
//!   not routed at all (it keeps what it has, stale, as the operator chose).
//! - **Behind.** A node is behind when, at (re)connection, the change set it last
//!   applied from the source is older than the source's newest. It then catches up
//!   under its policy: it gets a parent (the nearest healthy peer: the route
//!   computation hangs a degraded node off its group's head), and that parent's first
//!   transfer to a new child is a full reconcile. It is done when it reports holding
//!   the change set it was behind.
//! - **Monitor.** The master's monitor (thresholds with `action = "route_around"`,
//!   failing checks) marks a node degraded with a cause ([`Farm::set_degraded`]); a
//!   node with any cause is `Degraded` for routing: it still receives but never
//!   relays, so its children are re-parented (events `degraded` and `recovered`, and
//!   the `reroute`s that follow).
//! - **Broken links.** A relay that cannot reach a child (connect, handshake or I/O
//!   failure while the child's own session to the master is fine) reports the link;
//!   the child is re-parented to the nearest other relay (a manual route the master
//!   makes), for [`BROKEN_LINK_HOLD`], after which the default route is tried again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cd_core::catchup::{CatchUpPolicy, CatchUpScheduler};
use cd_core::route::{self, Health, HealthMap, RouteRequest};
use cd_core::topology::{LinkClass, ServerId, Topology};
use cd_proto::pb;

use crate::config::{CatchUp, MasterConfig, MasterContentSet, Routing};

/// How long a link a relay reported broken is routed around before it is tried again.
pub const BROKEN_LINK_HOLD: Duration = Duration::from_secs(120);

/// An N:M set's members that `node` (one of its `sources`) sends to: every other
/// member that is up. The first source's direct table (`routes`) has an edge to every
/// other member that is up; the first source itself counts when it `is_up`.
pub fn nm_children(
    sources: &[String],
    routes: Option<&SetRoutes>,
    node: &str,
    is_up: impl Fn(&str) -> bool,
) -> Vec<String> {
    let primary = sources.first().filter(|p| is_up(p)).cloned();
    let mut out: Vec<String> = routes
        .map(|r| r.edges.keys().cloned().collect())
        .unwrap_or_default();
    out.extend(primary);
    out.retain(|m| m != node);
    out.sort();
    out.dedup();
    out
}

/// The wire and label name of a link class.
pub fn class_name(c: LinkClass) -> &'static str {
    match c {
        LinkClass::SameGroup => "same_group",
        LinkClass::SameRegion => "same_region",
        LinkClass::International => "international",
    }
}

/// Something the master should log (and keep in its job log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmEvent {
    /// `node_up`, `node_down`, `reroute`, `link_failed`, `catch_up_waiting`,
    /// `catch_up_started`, `catch_up_done`, `degraded`, `recovered`.
    pub kind: &'static str,
    pub node: String,
    pub content_set: Option<String>,
    pub detail: String,
}

/// One edge of a computed route: `parent` sends to the child over a `class` link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEdge {
    pub parent: String,
    pub class: LinkClass,
    /// Why the edge exists (`group_head`, `member`, `manual`, `direct`, …).
    pub kind: &'static str,
}

/// One content set's routes as last computed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRoutes {
    /// Every routed target → its edge.
    pub edges: BTreeMap<String, RouteEdge>,
    /// Targets that get nothing now, with why.
    pub unreached: BTreeMap<String, String>,
    /// Manual routes not applied, with why.
    pub rejected: Vec<String>,
}

impl SetRoutes {
    /// `node`'s children, in name order, with their link classes.
    pub fn children(&self, node: &str) -> Vec<(String, LinkClass)> {
        self.edges
            .iter()
            .filter(|(_, e)| e.parent == node)
            .map(|(c, e)| (c.clone(), e.class))
            .collect()
    }

    pub fn parent(&self, node: &str) -> Option<&str> {
        self.edges.get(node).map(|e| e.parent.as_str())
    }
}

#[derive(Debug)]
struct SetState {
    cfg: MasterContentSet,
    source: ServerId,
    targets: BTreeSet<ServerId>,
    scheduler: CatchUpScheduler,
    /// Nodes behind, with the source's change set they must reach.
    behind: BTreeMap<ServerId, u64>,
    /// child → (the relay that could not reach it, until when it is avoided).
    broken: BTreeMap<ServerId, (ServerId, Instant)>,
    routes: SetRoutes,
    /// The source's newest change set, as it reported.
    source_seq: Option<u64>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Farm {
    topo: Topology,
    sets: Vec<SetState>,
    up: BTreeSet<ServerId>,
    /// Nodes that have had a session since the master started.
    seen: BTreeSet<ServerId>,
    /// Per node and content set: the change set it last applied `(origin, seq)`.
    progress: BTreeMap<(ServerId, String), (String, u64)>,
    /// N:M sets: per member and set, the newest change set of each source it holds
    /// (a source's own under its name).
    nm_held: BTreeMap<(ServerId, String), BTreeMap<String, u64>>,
    /// Nodes the monitor routes around: cause (`threshold:load1`, `check:tcp:80`,
    /// `check:silence`, …) → what was seen.
    degraded: BTreeMap<ServerId, BTreeMap<String, String>>,
    epoch: Instant,
}

impl Farm {
    /// The farm of `cfg` with every node down. `cfg` was validated: its topology is
    /// known to build.
    pub fn new(cfg: &MasterConfig) -> anyhow::Result<Self> {
        let topo = cfg.topology()?;
        let sets = cfg
            .content_sets
            .iter()
            .map(|s| {
                let id = |n: &str| topo.resolve(n);
                Ok(SetState {
                    source: id(&s.source)?,
                    // An N:M set's other sources receive the primary's writes as its
                    // targets do (see `MasterConfig::members`).
                    targets: s
                        .sources
                        .iter()
                        .skip(1)
                        .chain(&s.targets)
                        .map(|t| id(t))
                        .collect::<Result<_, _>>()?,
                    scheduler: CatchUpScheduler::new(match s.catch_up {
                        CatchUp::Immediate => CatchUpPolicy::Immediate,
                        // The master makes them due: by command, or at the time.
                        CatchUp::Command | CatchUp::Daily { .. } => CatchUpPolicy::OnCommand,
                    }),
                    behind: BTreeMap::new(),
                    broken: BTreeMap::new(),
                    routes: SetRoutes::default(),
                    source_seq: None,
                    cfg: s.clone(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut farm = Self {
            topo,
            sets,
            up: BTreeSet::new(),
            seen: BTreeSet::new(),
            progress: BTreeMap::new(),
            nm_held: BTreeMap::new(),
            degraded: BTreeMap::new(),
            epoch: Instant::now(),
        };
        farm.compute();
        Ok(farm)
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The routes of content set `set`.
    pub fn routes(&self, set: &str) -> Option<&SetRoutes> {
        self.sets
            .iter()
            .find(|s| s.cfg.name == set)
            .map(|s| &s.routes)
    }

    /// The class of the link between two nodes of the farm (same group when either
    /// is unknown, which a validated config never gives).
    pub fn link_class(&self, a: &str, b: &str) -> LinkClass {
        match (self.topo.id(a), self.topo.id(b)) {
            (Some(a), Some(b)) => self.topo.link_class(a, b),
            _ => LinkClass::SameGroup,
        }
    }

    /// `node` is catching up in `set` (behind, and routed for it).
    pub fn catching_up(&self, set: &str, node: &str) -> bool {
        let (Some(s), Some(id)) = (
            self.sets.iter().find(|s| s.cfg.name == set),
            self.topo.id(node),
        ) else {
            return false;
        };
        s.behind.contains_key(&id) && !s.scheduler.is_held(id)
    }

    /// The newest change set the source of `set` reported.
    pub fn source_seq(&self, set: &str) -> Option<u64> {
        self.sets
            .iter()
            .find(|s| s.cfg.name == set)
            .and_then(|s| s.source_seq)
    }

    /// What `node` last reported holding of `set`.
    pub fn progress(&self, node: &str, set: &str) -> Option<&(String, u64)> {
        let id = self.topo.id(node)?;
        self.progress.get(&(id, set.to_owned()))
    }

    /// N:M: the newest change set of each source that `node` holds of `set` (a
    /// source's own under its name), as it last reported.
    pub fn nm_held(&self, node: &str, set: &str) -> Option<&BTreeMap<String, u64>> {
        let id = self.topo.id(node)?;
        self.nm_held.get(&(id, set.to_owned()))
    }

    /// A node opened its control session and reported what it holds.
    pub fn connected(
        &mut self,
        node: &str,
        progress: &[pb::SetProgress],
        now: Instant,
    ) -> Vec<FarmEvent> {
        let Some(id) = self.topo.id(node) else {
            return Vec::new();
        };
        let mut ev = vec![FarmEvent {
            kind: "node_up",
            node: node.to_owned(),
            content_set: None,
            detail: if self.seen.contains(&id) {
                "control session re-established".into()
            } else {
                "control session established".into()
            },
        }];
        self.up.insert(id);
        self.seen.insert(id);
        ev.extend(self.record_progress(id, progress, true, now));
        ev.extend(self.compute());
        ev
    }

    /// A node's control session ended.
    pub fn disconnected(&mut self, node: &str, why: &str) -> Vec<FarmEvent> {
        let Some(id) = self.topo.id(node) else {
            return Vec::new();
        };
        if !self.up.remove(&id) {
            return Vec::new();
        }
        for s in &mut self.sets {
            s.scheduler.handle_down(id);
            s.behind.remove(&id);
        }
        // Down now; the monitor judges it afresh when it is back.
        self.degraded.remove(&id);
        // What it held of other sources is unknown until it reports again (its tree
        // may be gone); a source keeps its own newest, which the others must reach.
        let name = self.topo.name(id).to_owned();
        for ((n, _), held) in self.nm_held.iter_mut() {
            if *n == id {
                held.retain(|origin, _| *origin == name);
            }
        }
        let mut ev = vec![FarmEvent {
            kind: "node_down",
            node: node.to_owned(),
            content_set: None,
            detail: why.to_owned(),
        }];
        ev.extend(self.compute());
        ev
    }

    /// A node reported what it holds now.
    pub fn progressed(
        &mut self,
        node: &str,
        progress: &[pb::SetProgress],
        now: Instant,
    ) -> Vec<FarmEvent> {
        let Some(id) = self.topo.id(node) else {
            return Vec::new();
        };
        let mut ev = self.record_progress(id, progress, false, now);
        if !ev.is_empty() {
            ev.extend(self.compute());
        }
        ev
    }

    /// Records `progress`; at a (re)connection (`joining`) or when the source first
    /// reports, judges who is behind.
    fn record_progress(
        &mut self,
        id: ServerId,
        progress: &[pb::SetProgress],
        joining: bool,
        now: Instant,
    ) -> Vec<FarmEvent> {
        let now_ms = self.ms(now);
        let mut ev = Vec::new();
        for p in progress {
            let Some(si) = self.sets.iter().position(|s| s.cfg.name == p.content_set) else {
                continue;
            };
            let cfg = &self.sets[si].cfg;
            if cfg.sources.len() > 1 {
                // N:M: no single sequence (and no catch-up list, see `judge`); what
                // each member holds of each source, for `cdctl wait`.
                let name = self.topo.name(id);
                let origin = if p.is_source { name } else { p.origin.as_str() };
                if !cfg.sources.iter().any(|s| s == origin) || (p.is_source && p.origin != name) {
                    continue;
                }
                self.nm_held
                    .entry((id, p.content_set.clone()))
                    .or_default()
                    .insert(origin.to_owned(), p.seq);
                continue;
            }
            if p.is_source {
                if self.sets[si].source != id {
                    continue;
                }
                let first = self.sets[si].source_seq.is_none();
                self.sets[si].source_seq = Some(p.seq);
                if first {
                    // Now "behind" can be judged for the nodes that came first.
                    let members: Vec<ServerId> = self.sets[si]
                        .targets
                        .iter()
                        .copied()
                        .filter(|t| self.up.contains(t))
                        .collect();
                    for t in members {
                        ev.extend(self.judge(si, t, now_ms));
                    }
                }
                continue;
            }
            self.progress
                .insert((id, p.content_set.clone()), (p.origin.clone(), p.seq));
            let s = &mut self.sets[si];
            if let Some(&need) = s.behind.get(&id)
                && p.origin == s.cfg.source
                && p.seq >= need
            {
                s.behind.remove(&id);
                // Whether its catch-up ran or a sync job reached it first.
                s.scheduler.forget(id);
                ev.push(FarmEvent {
                    kind: "catch_up_done",
                    node: self.topo.name(id).to_owned(),
                    content_set: Some(s.cfg.name.clone()),
                    detail: format!("holds change set {} of `{}`", p.seq, s.cfg.source),
                });
            }
        }
        if joining {
            for si in 0..self.sets.len() {
                if self.sets[si].targets.contains(&id) {
                    ev.extend(self.judge(si, id, now_ms));
                }
            }
        }
        ev
    }

    /// Puts target `id` of set `si` on the catch-up list if it is behind the source.
    fn judge(&mut self, si: usize, id: ServerId, now_ms: u64) -> Vec<FarmEvent> {
        let s = &self.sets[si];
        // An N:M set has no single sequence to be behind on: every source gives each
        // member it (re)gains a full last-writer-wins reconcile of its own.
        if s.cfg.sources.len() > 1 {
            return Vec::new();
        }
        let Some(source_seq) = s.source_seq else {
            return Vec::new();
        };
        let held = self
            .progress
            .get(&(id, s.cfg.name.clone()))
            .filter(|(o, _)| *o == s.cfg.source)
            .map_or(0, |(_, q)| *q);
        if held >= source_seq || s.behind.contains_key(&id) {
            return Vec::new();
        }
        let name = self.topo.name(id).to_owned();
        let s = &mut self.sets[si];
        s.behind.insert(id, source_seq);
        s.scheduler.handle_recovered(id, now_ms);
        let when = match s.cfg.catch_up {
            CatchUp::Immediate => "now".to_owned(),
            other => format!("{other}"),
        };
        vec![FarmEvent {
            kind: "catch_up_waiting",
            node: name,
            content_set: Some(s.cfg.name.clone()),
            detail: format!(
                "holds change set {held} of `{}`, the source is at {source_seq}; catches up {when}",
                s.cfg.source
            ),
        }]
    }

    /// The monitor's judgement of `node` for `cause`: `Some(detail)` routes around it
    /// (it still receives, never relays) until every cause is cleared with `None`.
    pub fn set_degraded(
        &mut self,
        node: &str,
        cause: &str,
        detail: Option<&str>,
    ) -> Vec<FarmEvent> {
        let Some(id) = self.topo.id(node) else {
            return Vec::new();
        };
        let causes = self.degraded.entry(id).or_default();
        let was_degraded = !causes.is_empty();
        let event = match detail {
            Some(d) => {
                let new = causes.insert(cause.to_owned(), d.to_owned()).is_none();
                new.then(|| FarmEvent {
                    kind: "degraded",
                    node: node.to_owned(),
                    content_set: None,
                    detail: format!("{cause}: {d}; routed around (receives, never relays)"),
                })
            }
            None => causes.remove(cause).map(|_| FarmEvent {
                kind: "recovered",
                node: node.to_owned(),
                content_set: None,
                detail: if causes.is_empty() {
                    format!("{cause} cleared; relays again")
                } else {
                    let rest: Vec<&str> = causes.keys().map(String::as_str).collect();
                    format!("{cause} cleared; still degraded by {}", rest.join(", "))
                },
            }),
        };
        let now_degraded = !causes.is_empty();
        if !now_degraded {
            self.degraded.remove(&id);
        }
        let mut ev: Vec<FarmEvent> = event.into_iter().collect();
        if was_degraded != now_degraded {
            ev.extend(self.compute());
        }
        ev
    }

    /// Why the monitor routes around `node` (cause → detail); empty when it does not.
    pub fn degraded(&self, node: &str) -> BTreeMap<String, String> {
        self.topo
            .id(node)
            .and_then(|id| self.degraded.get(&id))
            .cloned()
            .unwrap_or_default()
    }

    /// A relay could not reach `child` of `set`.
    pub fn link_failed(
        &mut self,
        set: &str,
        parent: &str,
        child: &str,
        error: &str,
        now: Instant,
    ) -> Vec<FarmEvent> {
        let (Some(p), Some(c)) = (self.topo.id(parent), self.topo.id(child)) else {
            return Vec::new();
        };
        let Some(s) = self.sets.iter_mut().find(|s| s.cfg.name == set) else {
            return Vec::new();
        };
        // A child without a session is down, not cut off: that is handled as such.
        if !self.up.contains(&c) || s.routes.parent(child) != Some(parent) {
            return Vec::new();
        }
        s.broken.insert(c, (p, now + BROKEN_LINK_HOLD));
        let mut ev = vec![FarmEvent {
            kind: "link_failed",
            node: child.to_owned(),
            content_set: Some(set.to_owned()),
            detail: format!("`{parent}` cannot reach it: {error}"),
        }];
        ev.extend(self.compute());
        ev
    }

    /// `cdctl catchup [NODE]`: makes waiting catch-ups due now. Returns how many.
    pub fn catch_up_command(&mut self, node: Option<&str>, now: Instant) -> anyhow::Result<usize> {
        let id = match node {
            Some(n) => Some(
                self.topo
                    .id(n)
                    .ok_or_else(|| anyhow::anyhow!("no node `{n}` in the farm"))?,
            ),
            None => None,
        };
        let now_ms = self.ms(now);
        let mut n = 0;
        for s in &mut self.sets {
            if let Some(id) = id
                && !s.scheduler.is_pending(id)
                && s.targets.contains(&id)
                && self.up.contains(&id)
            {
                // A manual catch-up of a current node: a full reconcile from its parent.
                s.behind.insert(id, s.source_seq.unwrap_or(0));
                s.scheduler.handle_recovered(id, now_ms);
            }
            n += s.scheduler.handle_command(id, now_ms);
        }
        Ok(n)
    }

    /// Advances the clock: catch-ups that are due start, broken links are tried again.
    pub fn tick(&mut self, now: Instant) -> Vec<FarmEvent> {
        let now_ms = self.ms(now);
        let mut changed = false;
        let mut ev = Vec::new();
        for s in &mut self.sets {
            if let CatchUp::Daily { hour, minute } = s.cfg.catch_up
                && local_minute_of_day(now) == Some(u32::from(hour) * 60 + u32::from(minute))
            {
                s.scheduler.handle_command(None, now_ms);
            }
            while let Some(id) = s.scheduler.poll_due(now_ms) {
                changed = true;
                ev.push(FarmEvent {
                    kind: "catch_up_started",
                    node: self.topo.name(id).to_owned(),
                    content_set: Some(s.cfg.name.clone()),
                    detail: "routed again, under the nearest healthy peer".into(),
                });
            }
            let before = s.broken.len();
            s.broken.retain(|_, (_, until)| *until > now);
            changed |= s.broken.len() != before;
        }
        if changed {
            ev.extend(self.compute());
        }
        ev
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub fn next_tick(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        for s in &self.sets {
            let due = s
                .scheduler
                .poll_timeout()
                .map(|ms| self.epoch + Duration::from_millis(ms));
            let broken = s.broken.values().map(|(_, u)| *u).min();
            for x in [due, broken].into_iter().flatten() {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
            if matches!(s.cfg.catch_up, CatchUp::Daily { .. })
                && s.scheduler.pending().next().is_some()
            {
                // Checked every minute while something waits for its time.
                let x = Instant::now() + Duration::from_secs(30);
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        }
        t
    }

    /// Recomputes every set's routes; events for the edges that changed.
    fn compute(&mut self) -> Vec<FarmEvent> {
        let mut ev = Vec::new();
        for si in 0..self.sets.len() {
            let new = self.compute_set(si);
            let s = &self.sets[si];
            for (child, e) in &new.edges {
                let was = s.routes.edges.get(child);
                if was.is_some_and(|w| w.parent != e.parent) {
                    ev.push(FarmEvent {
                        kind: "reroute",
                        node: child.clone(),
                        content_set: Some(s.cfg.name.clone()),
                        detail: format!(
                            "now receives from `{}` ({}, {}) instead of `{}`",
                            e.parent,
                            class_name(e.class),
                            e.kind,
                            was.map(|w| w.parent.as_str()).unwrap_or_default()
                        ),
                    });
                }
            }
            self.sets[si].routes = new;
        }
        ev
    }

    fn compute_set(&self, si: usize) -> SetRoutes {
        let s = &self.sets[si];
        let mut out = SetRoutes::default();
        let mut health = HealthMap::new(&self.topo, Health::Down);
        for &id in &self.up {
            let h = s.scheduler.route_health(id, Health::Up);
            // Waiting for a catch-up that is not due yet: keeps what it has, unrouted.
            // A target holding only some data kinds receives but never relays.
            let h = if s.scheduler.is_held(id) {
                Health::Down
            } else if h == Health::Up
                && (s.cfg.target_filters.contains_key(self.topo.name(id))
                    || self.degraded.contains_key(&id))
            {
                Health::Degraded
            } else {
                h
            };
            health.set(id, h);
        }
        let name = |id: ServerId| self.topo.name(id).to_owned();
        if s.cfg.routing == Routing::Direct {
            // N:M: every source sends to every member; the table says who is up (the
            // primary source's edges), whether the primary is or not.
            let nm = s.cfg.sources.len() > 1;
            for &t in &s.targets {
                if !nm && health.get(s.source) == Health::Down {
                    out.unreached.insert(name(t), "source down".into());
                } else if health.get(t) == Health::Down {
                    out.unreached.insert(name(t), self.down_reason(s, t));
                } else {
                    out.edges.insert(
                        name(t),
                        RouteEdge {
                            parent: name(s.source),
                            class: self.topo.link_class(s.source, t),
                            kind: "direct",
                        },
                    );
                }
            }
            return out;
        }
        let mut req = RouteRequest::new(s.source, s.targets.iter().copied());
        for (c, p) in &s.cfg.routes {
            if let (Some(c), Some(p)) = (self.topo.id(c), self.topo.id(p)) {
                req.overrides.insert(c, p);
            }
        }
        // Around broken links: the child goes under the nearest other relay (manual
        // routes take precedence: the operator's choice is kept even then).
        let first = route::routes(&self.topo, &health, &req);
        for (&child, &(bad_parent, _)) in &s.broken {
            if req.overrides.contains_key(&child) || first.parent(child) != Some(bad_parent) {
                continue;
            }
            let below = descendants(&first, child);
            let candidates = first
                .reached()
                .chain(std::iter::once(s.source))
                .filter(|&r| {
                    r != bad_parent
                        && r != child
                        && !below.contains(&r)
                        && health.get(r).can_relay()
                });
            if let Some(alt) = self.topo.nearest(child, candidates) {
                req.overrides.insert(child, alt);
            }
        }
        let table = route::routes(&self.topo, &health, &req);
        for (child, e) in table.edges() {
            out.edges.insert(
                name(child),
                RouteEdge {
                    parent: name(e.parent),
                    class: e.class,
                    kind: match e.kind {
                        route::EdgeKind::GroupHead => "group_head",
                        route::EdgeKind::RegionHead => "region_head",
                        route::EdgeKind::RegionGroupHead => "region_group_head",
                        route::EdgeKind::Member => "member",
                        route::EdgeKind::Nearest => "nearest",
                        route::EdgeKind::Manual
                            if s.cfg.routes.contains_key(self.topo.name(child)) =>
                        {
                            "manual"
                        }
                        route::EdgeKind::Manual => "around_broken_link",
                    },
                },
            );
        }
        for (id, why) in table.unreached() {
            let reason = match why {
                route::Unreached::SourceDown => "source down".to_owned(),
                route::Unreached::Down => self.down_reason(s, *id),
            };
            out.unreached.insert(name(*id), reason);
        }
        for r in table.rejected_overrides() {
            out.rejected.push(format!(
                "{} <- {}: {:?}",
                self.topo.name(r.child),
                self.topo.name(r.parent),
                r.reason
            ));
        }
        out
    }

    fn down_reason(&self, s: &SetState, id: ServerId) -> String {
        if !self.up.contains(&id) {
            "down (no control session)".into()
        } else if s.scheduler.is_pending(id) {
            format!("behind; waiting to catch up ({})", s.cfg.catch_up)
        } else {
            "down".into()
        }
    }

    /// The route table of `set` as `cdctl routes --json` prints it.
    pub fn routes_json(&self, set: &str) -> Option<serde_json::Value> {
        let s = self.sets.iter().find(|s| s.cfg.name == set)?;
        let r = &s.routes;
        Some(serde_json::json!({
            "content_set": s.cfg.name,
            "source": s.cfg.source,
            "routing": s.cfg.routing,
            "catch_up": s.cfg.catch_up.to_string(),
            "source_seq": s.source_seq,
            "edges": r.edges.iter().map(|(c, e)| serde_json::json!({
                "child": c, "parent": e.parent, "class": class_name(e.class), "kind": e.kind,
                "region": self.topo.id(c).map(|i| self.topo.server(i).region().to_owned()),
                "group": self.topo.id(c).map(|i| self.topo.server(i).group().to_owned()),
            })).collect::<Vec<_>>(),
            "unreached": r.unreached.iter().map(|(n, why)| serde_json::json!({"node": n, "reason": why})).collect::<Vec<_>>(),
            "rejected_routes": r.rejected,
            "catching_up": s.behind.iter().map(|(id, seq)| serde_json::json!({"node": self.topo.name(*id), "until_seq": seq})).collect::<Vec<_>>(),
            "degraded": self.degraded.iter()
                .filter(|(id, _)| **id == s.source || s.targets.contains(id))
                .map(|(id, c)| serde_json::json!({"node": self.topo.name(*id), "causes": c}))
                .collect::<Vec<_>>(),
        }))
    }
}

/// Every node below `id` in `table`.
fn descendants(table: &route::RouteTable, id: ServerId) -> BTreeSet<ServerId> {
    let mut out = BTreeSet::new();
    let mut stack = vec![id];
    while let Some(n) = stack.pop() {
        for &c in table.children(n) {
            if out.insert(c) {
                stack.push(c);
            }
        }
    }
    out
}

/// Minutes since local midnight at `at` (for `catch_up = "at HH:MM"`).
pub fn local_minute_of_day(at: Instant) -> Option<u32> {
    let unix = std::time::SystemTime::now()
        .checked_sub(Instant::now().saturating_duration_since(at))?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    local_minutes(unix)
}

#[expect(
    unsafe_code,
    reason = "the C library is what knows the local time zone"
)]
fn local_minutes(unix: i64) -> Option<u32> {
    let t: libc::time_t = unix;
    // SAFETY: localtime_r only writes the `tm` it is given; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    (!r.is_null()).then(|| (tm.tm_hour * 60 + tm.tm_min) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn farm(extra: &str) -> Farm {
        let text = format!(
            "name = \"m\"\nstate_dir = \"/tmp/x\"\n[master]\nlisten = \"127.0.0.1:0\"\npki_dir = \"/tmp/p\"\n\
             [[master.content_sets]]\nname = \"www\"\nsource = \"n1\"\ntargets = [\"n2\", \"n3\", \"n4\"]\n{extra}"
        );
        let cfg = crate::config::parse(std::path::Path::new("m.toml"), &text).unwrap();
        Farm::new(cfg.master.as_ref().unwrap()).unwrap()
    }

    fn up(f: &mut Farm, nodes: &[&str]) {
        for n in nodes {
            f.connected(n, &[], Instant::now());
        }
    }

    #[test]
    fn nm_progress_is_kept_per_member_and_source_and_forgotten_on_disconnect() {
        let text = "name = \"m\"\nstate_dir = \"/tmp/x\"\n[master]\nlisten = \"127.0.0.1:0\"\n\
                    pki_dir = \"/tmp/p\"\n[[master.content_sets]]\nname = \"www\"\n\
                    sources = [\"n1\", \"n2\"]\ntargets = [\"n3\"]\n";
        let cfg = crate::config::parse(std::path::Path::new("m.toml"), text).unwrap();
        let mut f = Farm::new(cfg.master.as_ref().unwrap()).unwrap();
        let p = |origin: &str, seq, is_source| pb::SetProgress {
            content_set: "www".into(),
            origin: origin.into(),
            seq,
            is_source,
        };
        let now = Instant::now();
        f.connected("n1", &[p("n1", 7, true), p("n2", 3, false)], now);
        // n3 is no source: its claim to be one is ignored; so is an unknown origin.
        f.connected(
            "n3",
            &[p("n3", 9, true), p("n1", 7, false), p("x", 1, false)],
            now,
        );
        f.progressed("n3", &[p("n2", 2, false)], now);
        let held = |f: &Farm, n: &str| f.nm_held(n, "www").cloned().unwrap_or_default();
        assert_eq!(
            held(&f, "n1"),
            BTreeMap::from([("n1".into(), 7), ("n2".into(), 3)])
        );
        assert_eq!(
            held(&f, "n3"),
            BTreeMap::from([("n1".into(), 7), ("n2".into(), 2)])
        );
        // Down: what it held of others is unknown; a source keeps its own newest.
        f.disconnected("n1", "test");
        f.disconnected("n3", "test");
        assert_eq!(held(&f, "n1"), BTreeMap::from([("n1".into(), 7)]));
        assert!(held(&f, "n3").is_empty());
    }

    #[test]
    fn a_target_with_its_own_data_kinds_never_relays() {
        let mut f = farm(
            "[master.content_sets.target_filters.n2]\ninclude = [\"*.jpg\"]\n\
             [master.content_sets.target_filters.n3]\nexclude = [\"*.log\"]\n",
        );
        up(&mut f, &["n1", "n2", "n3", "n4"]);
        let r = f.routes("www").unwrap();
        assert_eq!(
            r.children("n1"),
            [("n4".to_owned(), LinkClass::SameGroup)],
            "{r:?}"
        );
        assert!(
            r.children("n2").is_empty() && r.children("n3").is_empty(),
            "{r:?}"
        );
        assert_eq!(r.parent("n2"), Some("n4"));
    }

    #[test]
    fn a_degraded_head_is_routed_around_and_heads_again_when_it_recovers() {
        let mut f = farm("");
        up(&mut f, &["n1", "n2", "n3", "n4"]);
        let head = f.routes("www").unwrap().children("n1")[0].0.clone();
        let ev = f.set_degraded(&head, "threshold:load1", Some("load1 9 > 8"));
        assert_eq!(ev[0].kind, "degraded", "{ev:?}");
        assert!(ev.iter().any(|e| e.kind == "reroute"), "{ev:?}");
        let r = f.routes("www").unwrap();
        assert!(r.children(&head).is_empty(), "{r:?}");
        assert_eq!(r.edges.len(), 3, "still receives: {r:?}");
        let new_head = r.children("n1")[0].0.clone();
        assert_ne!(new_head, head);
        // A second cause changes nothing in the routes; clearing one of two neither.
        let ev = f.set_degraded(&head, "check:tcp:80", Some("refused"));
        assert_eq!(ev.iter().map(|e| e.kind).collect::<Vec<_>>(), ["degraded"]);
        assert!(
            f.set_degraded(&head, "check:tcp:80", Some("refused"))
                .is_empty(),
            "repeat"
        );
        let ev = f.set_degraded(&head, "threshold:load1", None);
        assert_eq!(ev.iter().map(|e| e.kind).collect::<Vec<_>>(), ["recovered"]);
        assert!(
            ev[0].detail.contains("still degraded by check:tcp:80"),
            "{ev:?}"
        );
        assert!(f.routes("www").unwrap().children(&head).is_empty());
        let ev = f.set_degraded(&head, "check:tcp:80", None);
        assert_eq!(ev[0].kind, "recovered");
        assert!(f.degraded(&head).is_empty());
        // Back to the computation of a farm with no monitor input.
        let mut g = farm("");
        up(&mut g, &["n1", "n2", "n3", "n4"]);
        assert_eq!(f.routes("www").unwrap(), g.routes("www").unwrap());
        assert!(
            f.set_degraded(&head, "check:tcp:80", None).is_empty(),
            "not degraded"
        );
    }

    #[test]
    fn one_group_goes_through_its_head() {
        let mut f = farm("");
        up(&mut f, &["n1", "n2", "n3", "n4"]);
        let r = f.routes("www").unwrap();
        assert_eq!(r.children("n1").len(), 1, "{r:?}");
        let head = &r.children("n1")[0].0;
        assert_eq!(r.children(head).len(), 2, "{r:?}");
    }
}
