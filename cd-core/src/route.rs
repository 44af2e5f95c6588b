//! Route computation: who sends a content set's changes from one source to whom.
//!
//! The master calls [`routes`] for each (content set, source) whenever health, the
//! topology, the targets or the manual routes change, and pushes each node its
//! [`RouteTable::children`] (with the link class of each edge, which selects the
//! per-class policy: zstd level, encryption, delta or dump, bandwidth). Nodes then
//! forward every change set they apply to their children, without asking the master
//! per change. The computation is a pure function of its inputs: the same inputs give
//! the same table on every master.
//!
//! # Shape of the tree
//!
//! Only the source and the targets ever carry a content set's data (a server outside
//! the set never stages content it does not hold). Among them, a *relay* is the source
//! (unless it is [`Health::Down`]) or a target that is [`Health::Up`].
//!
//! - **Group head.** In every group, the relay target with the highest weight (ties:
//!   smaller name) is the head. It receives the group's one copy and forwards within
//!   the group.
//! - **Source region.** The source sends one copy to the head of every group of its
//!   own region, its own group included (the source does not fan out to its group
//!   mates itself: its uplink carries one copy per group).
//! - **Other regions.** The source sends one copy per region, to the *region head*:
//!   the group head with the highest weight (ties: name). The region head forwards to
//!   the other group heads of its region over same-region links, so each
//!   international link carries one copy.
//! - **Within a group.** The head forwards to at most `group_fanout` members; the
//!   rest hang off members as a `group_fanout`-ary tree filled breadth first, members
//!   that can relay (by weight, then name) before degraded ones, which are always
//!   leaves. The bound is soft: it is exceeded only when a group has more degraded
//!   members than its relays have slots, and then the extra members go to the
//!   group's relay with the fewest members below it (still a same-group link).
//! - **No head.** A target whose group has no relay (every reachable member is
//!   degraded) hangs off the *nearest* relay already in the tree: same group (only
//!   possible when that is the source's group: the source itself), then same region,
//!   then international; among equals a relay other than the source (its uplink is
//!   the scarce one), then one with fewer than `group_fanout` children, then higher
//!   weight, then name. So the source's uplink carries one copy per group of its
//!   region and one per other region, *plus* one per target that no other relay is
//!   as near to (a degraded member of the source's own headless group, or of a
//!   region where nothing but the source can relay).
//!
//! # Health
//!
//! - `Up` nodes receive and relay.
//! - `Degraded` nodes (over the load threshold, or failing checks) still receive, but
//!   never relay: forwarding is the extra load they must shed, and a node failing its
//!   checks should not be the only path to others. They are always leaves.
//! - `Down` nodes get nothing ([`Unreached::Down`]); when they come back the next
//!   computation gives them a parent and they catch up (see [`crate::catchup`]).
//!
//! **Failover** is recomputation: when a relay goes down or degrades, the next table
//! routes around it. Its group mates get the group's next head (same group), a
//! group with no relay left hangs off the nearest relay in its region, and a region
//! with none hangs off the nearest relay abroad: "nearest healthy node, same group →
//! same region → international". The computation is stateless, so the result never
//! depends on the order in which failures happened.
//!
//! # Manual routes
//!
//! [`RouteRequest::overrides`] maps a target to the parent an operator chose. An
//! override is applied (in target-name order) when the child is a reachable target,
//! the parent is a relay, and the tree stays acyclic; the child keeps the subtree the
//! default gave it. Otherwise it is ignored and reported in
//! [`RouteTable::rejected_overrides`] with the reason; it stays in the request and
//! takes effect again once it is valid.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::topology::{LinkClass, ServerId, Topology};

/// A head forwards to at most this many group members by default.
pub const DEFAULT_GROUP_FANOUT: usize = 8;

/// What the master currently believes of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Answers, passes its checks, under its load threshold: receives and relays.
    Up,
    /// Over the load threshold or failing checks (or still catching up after a
    /// restart): receives, never relays.
    Degraded,
    /// Stopped answering: gets nothing until it is back and catches up.
    Down,
}

impl Health {
    pub fn can_relay(self) -> bool {
        self == Health::Up
    }
    pub fn can_receive(self) -> bool {
        self != Health::Down
    }
}

/// Health of every server of one [`Topology`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthMap(Vec<Health>);

impl HealthMap {
    /// Every server of `topo` at `health`.
    pub fn new(topo: &Topology, health: Health) -> Self {
        Self(vec![health; topo.len()])
    }
    /// Panics if `id` is not of the topology this map was made for.
    pub fn get(&self, id: ServerId) -> Health {
        self.0[id.index()]
    }
    pub fn set(&mut self, id: ServerId, health: Health) {
        self.0[id.index()] = health;
    }
}

/// The inputs of one route computation besides topology and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRequest {
    pub source: ServerId,
    /// Servers that must get the content set (the source, if listed, is ignored).
    pub targets: BTreeSet<ServerId>,
    /// Manual routes: target → the parent it must receive from.
    pub overrides: BTreeMap<ServerId, ServerId>,
    /// Most group members a relay forwards to directly (0 is treated as 1).
    pub group_fanout: usize,
}

impl RouteRequest {
    pub fn new(source: ServerId, targets: impl IntoIterator<Item = ServerId>) -> Self {
        Self {
            source,
            targets: targets.into_iter().collect(),
            overrides: BTreeMap::new(),
            group_fanout: DEFAULT_GROUP_FANOUT,
        }
    }
}

/// Why an edge exists (what `cdctl` shows next to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EdgeKind {
    /// Source → head of a group of the source's region.
    GroupHead,
    /// Source → head of another region.
    RegionHead,
    /// Region head → head of another group of its region.
    RegionGroupHead,
    /// Within a group, below its head.
    Member,
    /// The target's group has no relay: the nearest relay.
    Nearest,
    /// A manual route.
    Manual,
}

/// One edge of a [`RouteTable`], stored by child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Edge {
    pub parent: ServerId,
    pub class: LinkClass,
    pub kind: EdgeKind,
}

/// Why a target gets nothing from this table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unreached {
    /// The target is down.
    Down,
    /// The source is down: nothing is sent at all.
    SourceDown,
}

/// Why a manual route was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverrideRejection {
    /// The child is not a target, or is the source.
    NotAReceiver,
    /// The child is down (the route applies again once it is back).
    ChildDown,
    /// The child was named as its own parent.
    SelfParent,
    /// The parent is neither the source nor a target: it does not hold the content.
    ParentNotMember,
    /// The parent is degraded or down.
    ParentCannotRelay(Health),
    /// The parent lies below the child: the route would make a cycle.
    Cycle,
    /// The source is down; no route applies.
    SourceDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RejectedOverride {
    pub child: ServerId,
    pub parent: ServerId,
    pub reason: OverrideRejection,
}

/// The distribution tree of one (content set, source), rooted at the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    source: ServerId,
    edges: BTreeMap<ServerId, Edge>,
    children: BTreeMap<ServerId, Vec<ServerId>>,
    unreached: Vec<(ServerId, Unreached)>,
    rejected: Vec<RejectedOverride>,
}

impl RouteTable {
    pub fn source(&self) -> ServerId {
        self.source
    }

    /// The edge into `id`, if it is reached (the source has none).
    pub fn edge(&self, id: ServerId) -> Option<&Edge> {
        self.edges.get(&id)
    }

    pub fn parent(&self, id: ServerId) -> Option<ServerId> {
        self.edges.get(&id).map(|e| e.parent)
    }

    /// Every edge, by child in id order.
    pub fn edges(&self) -> impl Iterator<Item = (ServerId, &Edge)> {
        self.edges.iter().map(|(c, e)| (*c, e))
    }

    /// What `id` forwards to, in sending order: children with the larger subtree
    /// first (they have more to pass on), then by id. This is what the master pushes.
    pub fn children(&self, id: ServerId) -> &[ServerId] {
        self.children.get(&id).map_or(&[], Vec::as_slice)
    }

    /// [`children`](Self::children) with the class of each link.
    pub fn child_links(&self, id: ServerId) -> impl Iterator<Item = (ServerId, LinkClass)> {
        self.children(id).iter().map(|c| (*c, self.edges[c].class))
    }

    /// Targets that get the content from this table (not the source).
    pub fn reached(&self) -> impl Iterator<Item = ServerId> {
        self.edges.keys().copied()
    }

    pub fn is_reached(&self, id: ServerId) -> bool {
        self.edges.contains_key(&id)
    }

    /// Targets that get nothing, and why, in id order.
    pub fn unreached(&self) -> &[(ServerId, Unreached)] {
        &self.unreached
    }

    /// Manual routes that were ignored, in child order.
    pub fn rejected_overrides(&self) -> &[RejectedOverride] {
        &self.rejected
    }

    /// Copies of each change set that leave the source: its number of children.
    pub fn uplink_copies(&self) -> usize {
        self.children(self.source).len()
    }

    /// Hops from the source (0 for the source); `None` if not reached.
    pub fn depth(&self, id: ServerId) -> Option<usize> {
        let mut d = 0;
        let mut cur = id;
        while cur != self.source {
            cur = self.edges.get(&cur)?.parent;
            d += 1;
        }
        Some(d)
    }
}

/// Computes the route table of `req` (see the module docs).
pub fn routes(topo: &Topology, health: &HealthMap, req: &RouteRequest) -> RouteTable {
    let src = req.source;
    let k = req.group_fanout.max(1);
    let mut b = Builder {
        topo,
        src,
        edges: BTreeMap::new(),
        count: BTreeMap::new(),
    };
    let receivers: Vec<ServerId> = req.targets.iter().copied().filter(|&t| t != src).collect();
    let mut unreached = Vec::new();
    if health.get(src) == Health::Down {
        unreached = receivers
            .iter()
            .map(|&t| (t, Unreached::SourceDown))
            .collect();
        let rejected = req
            .overrides
            .iter()
            .map(|(&child, &parent)| RejectedOverride {
                child,
                parent,
                reason: OverrideRejection::SourceDown,
            })
            .collect();
        return b.finish(unreached, rejected);
    }

    // Reachable receivers by group, relays first, each part by rank.
    let mut groups: BTreeMap<usize, Vec<ServerId>> = BTreeMap::new();
    for &t in &receivers {
        if health.get(t) == Health::Down {
            unreached.push((t, Unreached::Down));
        } else {
            groups
                .entry(topo.server(t).group_index())
                .or_default()
                .push(t);
        }
    }
    for members in groups.values_mut() {
        members.sort_by_key(|&m| (!health.get(m).can_relay(), topo.rank(m)));
    }
    let head = |members: &[ServerId]| {
        members
            .first()
            .copied()
            .filter(|&m| health.get(m).can_relay())
    };

    // Heads by region, by rank.
    let src_region = topo.server(src).region_index();
    let mut heads_by_region: BTreeMap<usize, Vec<ServerId>> = BTreeMap::new();
    for members in groups.values() {
        if let Some(h) = head(members) {
            heads_by_region
                .entry(topo.server(h).region_index())
                .or_default()
                .push(h);
        }
    }
    for (region, heads) in &mut heads_by_region {
        heads.sort_by_key(|&h| topo.rank(h));
        if *region == src_region {
            for &h in heads.iter() {
                b.edge(h, src, EdgeKind::GroupHead);
            }
        } else {
            let rh = heads[0];
            b.edge(rh, src, EdgeKind::RegionHead);
            for &h in &heads[1..] {
                b.edge(h, rh, EdgeKind::RegionGroupHead);
            }
        }
    }

    // Within groups that have a head.
    for members in groups.values() {
        let Some(h) = head(members) else { continue };
        let mut open: VecDeque<ServerId> = VecDeque::from([h]);
        let mut relays = vec![h];
        let mut below: BTreeMap<ServerId, usize> = BTreeMap::new();
        for &m in &members[1..] {
            while open
                .front()
                .is_some_and(|p| below.get(p).copied().unwrap_or(0) >= k)
            {
                open.pop_front();
            }
            let parent = match open.front() {
                Some(&p) => p,
                // Every relay is full: the one with the fewest members below it.
                None => *relays
                    .iter()
                    .min_by_key(|r| below.get(r).copied().unwrap_or(0))
                    .unwrap_or(&h),
            };
            *below.entry(parent).or_default() += 1;
            b.edge(m, parent, EdgeKind::Member);
            if health.get(m).can_relay() {
                open.push_back(m);
                relays.push(m);
            }
        }
    }

    // Groups without a head: each member to the nearest relay.
    let relays: Vec<ServerId> = std::iter::once(src)
        .chain(
            receivers
                .iter()
                .copied()
                .filter(|&t| health.get(t).can_relay()),
        )
        .collect();
    for members in groups.values() {
        if head(members).is_some() {
            continue;
        }
        let mut ordered = members.clone();
        ordered.sort();
        for m in ordered {
            let parent = relays
                .iter()
                .copied()
                .min_by_key(|&c| {
                    (
                        topo.link_class(c, m),
                        c == src,
                        b.children_of(c) >= k,
                        topo.rank(c),
                    )
                })
                .unwrap_or(src);
            b.edge(m, parent, EdgeKind::Nearest);
        }
    }

    // Manual routes.
    let mut rejected = Vec::new();
    for (&child, &parent) in &req.overrides {
        let reason = if child == src || !req.targets.contains(&child) {
            Some(OverrideRejection::NotAReceiver)
        } else if health.get(child) == Health::Down {
            Some(OverrideRejection::ChildDown)
        } else if parent == child {
            Some(OverrideRejection::SelfParent)
        } else if parent != src && !req.targets.contains(&parent) {
            Some(OverrideRejection::ParentNotMember)
        } else if parent != src && !health.get(parent).can_relay() {
            Some(OverrideRejection::ParentCannotRelay(health.get(parent)))
        } else if b.is_below(parent, child) {
            Some(OverrideRejection::Cycle)
        } else {
            None
        };
        match reason {
            Some(reason) => rejected.push(RejectedOverride {
                child,
                parent,
                reason,
            }),
            None => b.edge(child, parent, EdgeKind::Manual),
        }
    }
    b.finish(unreached, rejected)
}

struct Builder<'a> {
    topo: &'a Topology,
    src: ServerId,
    edges: BTreeMap<ServerId, Edge>,
    /// Children per parent, kept as edges are added or moved.
    count: BTreeMap<ServerId, usize>,
}

impl Builder<'_> {
    fn edge(&mut self, child: ServerId, parent: ServerId, kind: EdgeKind) {
        let e = Edge {
            parent,
            class: self.topo.link_class(parent, child),
            kind,
        };
        if let Some(old) = self.edges.insert(child, e)
            && let Some(n) = self.count.get_mut(&old.parent)
        {
            *n -= 1;
        }
        *self.count.entry(parent).or_default() += 1;
    }

    fn children_of(&self, id: ServerId) -> usize {
        self.count.get(&id).copied().unwrap_or(0)
    }

    /// `node` is `ancestor` or lies beneath it.
    fn is_below(&self, node: ServerId, ancestor: ServerId) -> bool {
        let mut cur = node;
        // Bounded: the edges are acyclic, so the walk reaches the source.
        for _ in 0..=self.edges.len() {
            if cur == ancestor {
                return true;
            }
            match self.edges.get(&cur) {
                Some(e) => cur = e.parent,
                None => return false,
            }
        }
        true
    }

    fn finish(
        self,
        unreached: Vec<(ServerId, Unreached)>,
        rejected: Vec<RejectedOverride>,
    ) -> RouteTable {
        let mut size: BTreeMap<ServerId, usize> = BTreeMap::new();
        for &c in self.edges.keys() {
            let mut cur = c;
            *size.entry(cur).or_default() += 1;
            // The edges are acyclic; the bound only keeps a broken invariant from
            // hanging the master.
            for _ in 0..self.edges.len() {
                let Some(e) = self.edges.get(&cur) else { break };
                cur = e.parent;
                *size.entry(cur).or_default() += 1;
            }
        }
        let mut children: BTreeMap<ServerId, Vec<ServerId>> = BTreeMap::new();
        for (&c, e) in &self.edges {
            children.entry(e.parent).or_default().push(c);
        }
        for list in children.values_mut() {
            list.sort_by_key(|c| (std::cmp::Reverse(size[c]), *c));
        }
        RouteTable {
            source: self.src,
            edges: self.edges,
            children,
            unreached,
            rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::ServerSpec;

    /// `name:region:group:weight` per server.
    fn topo(specs: &[&str]) -> Topology {
        Topology::new(specs.iter().map(|s| {
            let v: Vec<&str> = s.split(':').collect();
            ServerSpec::new(v[0], v[1], v[2], v[3].parse().unwrap())
        }))
        .unwrap()
    }

    struct Case {
        t: Topology,
        h: HealthMap,
        req: RouteRequest,
    }

    impl Case {
        /// Everything a target, `src` the source, all up.
        fn new(specs: &[&str], src: &str) -> Self {
            let t = topo(specs);
            let h = HealthMap::new(&t, Health::Up);
            let req = RouteRequest::new(t.id(src).unwrap(), t.ids());
            Case { t, h, req }
        }
        fn id(&self, n: &str) -> ServerId {
            self.t.id(n).unwrap()
        }
        fn health(mut self, n: &str, h: Health) -> Self {
            let id = self.id(n);
            self.h.set(id, h);
            self
        }
        fn fanout(mut self, k: usize) -> Self {
            self.req.group_fanout = k;
            self
        }
        fn manual(mut self, child: &str, parent: &str) -> Self {
            let (c, p) = (self.id(child), self.id(parent));
            self.req.overrides.insert(c, p);
            self
        }
        fn run(&self) -> RouteTable {
            routes(&self.t, &self.h, &self.req)
        }
        /// `child<parent` per edge, in child order.
        fn edges(&self) -> Vec<String> {
            self.run()
                .edges()
                .map(|(c, e)| format!("{}<{}", self.t.name(c), self.t.name(e.parent)))
                .collect()
        }
        fn parent(&self, n: &str) -> Option<String> {
            self.run()
                .parent(self.id(n))
                .map(|p| self.t.name(p).to_string())
        }
    }

    const TWO_BY_TWO_BY_TWO: &[&str] = &[
        "a1:eu:web:1",
        "a2:eu:web:2",
        "b1:eu:db:1",
        "b2:eu:db:1",
        "c1:us:web:5",
        "c2:us:web:1",
        "d1:us:db:1",
        "d2:us:db:9",
    ];

    #[test]
    fn one_head_per_group_region_heads_across_regions() {
        let c = Case::new(TWO_BY_TWO_BY_TWO, "a1");
        assert_eq!(
            c.edges(),
            [
                "a2<a1", // head of the source's own group
                "b1<a1", // head of db/eu: equal weights, smaller name
                "b2<b1", "c1<d2", // us: region head d2 (weight 9) feeds head c1 of web/us
                "c2<c1", "d1<d2", "d2<a1",
            ]
        );
        let r = c.run();
        assert_eq!(r.uplink_copies(), 3);
        assert_eq!(r.edge(c.id("d2")).unwrap().kind, EdgeKind::RegionHead);
        assert_eq!(r.edge(c.id("c1")).unwrap().kind, EdgeKind::RegionGroupHead);
        assert_eq!(r.edge(c.id("d2")).unwrap().class, LinkClass::International);
        assert_eq!(r.edge(c.id("c1")).unwrap().class, LinkClass::SameRegion);
        assert_eq!(r.edge(c.id("c2")).unwrap().class, LinkClass::SameGroup);
        // The region head sends to the larger subtree first.
        let kids: Vec<&str> = r
            .children(c.id("d2"))
            .iter()
            .map(|&i| c.t.name(i))
            .collect();
        assert_eq!(kids, ["c1", "d1"]);
        assert_eq!(r.depth(c.id("c2")), Some(3));
        assert!(r.unreached().is_empty());
    }

    #[test]
    fn head_is_highest_weight_then_name_and_moves_on_failure() {
        let specs = &["s:eu:g0:1", "x:eu:g:3", "y:eu:g:3", "z:eu:g:7"];
        let c = Case::new(specs, "s");
        assert_eq!(c.parent("z").as_deref(), Some("s"));
        // The head goes down: the next by weight, ties by name.
        let c = c.health("z", Health::Down);
        assert_eq!(c.edges(), ["x<s", "y<x"]);
        assert_eq!(c.run().unreached(), &[(c.id("z"), Unreached::Down)]);
        // A degraded member never heads a group, whatever its weight.
        let c = Case::new(specs, "s").health("z", Health::Degraded);
        assert_eq!(c.edges(), ["x<s", "y<x", "z<x"]);
    }

    #[test]
    fn reparenting_goes_same_group_then_region_then_international() {
        let specs = &[
            "s:eu:src:1",
            "g1:eu:web:5",
            "g2:eu:web:1",
            "r1:eu:db:1",
            "r2:eu:db:2",
            "i1:us:web:1",
        ];
        let c = Case::new(specs, "s");
        assert_eq!(c.parent("g2").as_deref(), Some("g1"));
        // The head fails: a member that can relay becomes the head (same group).
        let c = c.health("g1", Health::Down);
        assert_eq!(c.parent("g2").as_deref(), Some("s"));
        assert_eq!(c.run().edge(c.id("g2")).unwrap().kind, EdgeKind::GroupHead);
        // It degrades too: no relay left in the group, so the nearest in the region,
        // preferring a relay other than the source.
        let c = c.health("g2", Health::Degraded);
        assert_eq!(c.parent("g2").as_deref(), Some("r2"));
        assert_eq!(c.run().edge(c.id("g2")).unwrap().kind, EdgeKind::Nearest);
        // A region with no relay at all: abroad, again not the source when another
        // relay is as near.
        let c = c.health("i1", Health::Degraded);
        assert_eq!(c.parent("i1").as_deref(), Some("r2"));
        assert_eq!(
            c.run().edge(c.id("i1")).unwrap().class,
            LinkClass::International
        );
        // Nothing but the source can relay: the source is nearest for everyone.
        let c = c.health("r1", Health::Down).health("r2", Health::Degraded);
        assert_eq!(c.edges(), ["g2<s", "i1<s", "r2<s"]);
        assert_eq!(c.run().uplink_copies(), 3);
    }

    #[test]
    fn headless_group_of_the_source_is_fed_by_the_source() {
        // Same group is nearer than anything: the source's own group mates, when none
        // can relay, get a copy each straight from the source.
        let c = Case::new(&["s:eu:g:1", "m1:eu:g:1", "m2:eu:g:1", "o:eu:h:1"], "s")
            .health("m1", Health::Degraded)
            .health("m2", Health::Degraded);
        assert_eq!(c.edges(), ["m1<s", "m2<s", "o<s"]);
    }

    #[test]
    fn headless_members_spread_over_relays_with_room() {
        let c = Case::new(
            &[
                "s:eu:g:1",
                "r1:eu:h:2",
                "r2:eu:h:1",
                "d1:eu:x:1",
                "d2:eu:x:1",
                "d3:eu:x:1",
            ],
            "s",
        )
        .fanout(2)
        .health("d1", Health::Degraded)
        .health("d2", Health::Degraded)
        .health("d3", Health::Degraded);
        // r1 heads h and already feeds r2; one more fills it; then r2.
        assert_eq!(c.edges(), ["d1<r1", "d2<r2", "d3<r2", "r1<s", "r2<r1"]);
    }

    #[test]
    fn large_group_is_a_bounded_fanout_tree_by_weight() {
        let mut specs: Vec<String> = vec!["s:eu:src:1".into()];
        for i in 0..10 {
            specs.push(format!("m{i}:eu:big:{}", 20 - i));
        }
        let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        let c = Case::new(&refs, "s").fanout(3);
        assert_eq!(
            c.edges(),
            [
                "m0<s", "m1<m0", "m2<m0", "m3<m0", "m4<m1", "m5<m1", "m6<m1", "m7<m2", "m8<m2",
                "m9<m2"
            ]
        );
        // Degraded members are leaves, placed after every relay.
        let c = c.health("m1", Health::Degraded);
        assert_eq!(
            c.edges(),
            [
                "m0<s", "m1<m3", "m2<m0", "m3<m0", "m4<m0", "m5<m2", "m6<m2", "m7<m2", "m8<m3",
                "m9<m3"
            ]
        );
        // Fan-out 1 is a chain.
        let c = Case::new(&refs[..4], "s").fanout(1);
        assert_eq!(c.edges(), ["m0<s", "m1<m0", "m2<m1"]);
    }

    #[test]
    fn fanout_bound_gives_way_when_degraded_members_exceed_the_slots() {
        let c = Case::new(
            &[
                "s:eu:src:1",
                "h:eu:g:5",
                "d1:eu:g:1",
                "d2:eu:g:1",
                "d3:eu:g:1",
            ],
            "s",
        )
        .fanout(2)
        .health("d1", Health::Degraded)
        .health("d2", Health::Degraded)
        .health("d3", Health::Degraded);
        // One relay, two slots, three leaves: the head takes all three.
        assert_eq!(c.edges(), ["d1<h", "d2<h", "d3<h", "h<s"]);
    }

    #[test]
    fn manual_routes_win_when_valid() {
        let c = Case::new(TWO_BY_TWO_BY_TWO, "a1").manual("c2", "b2");
        let r = c.run();
        assert_eq!(c.parent("c2").as_deref(), Some("b2"));
        assert_eq!(r.edge(c.id("c2")).unwrap().kind, EdgeKind::Manual);
        assert_eq!(r.edge(c.id("c2")).unwrap().class, LinkClass::International);
        assert!(r.rejected_overrides().is_empty());
        // A manual route keeps the child's subtree: d2 (region head) under b1.
        let c = Case::new(TWO_BY_TWO_BY_TWO, "a1").manual("d2", "b1");
        assert_eq!(c.parent("d1").as_deref(), Some("d2"));
        assert_eq!(c.run().depth(c.id("d1")), Some(3));
    }

    #[test]
    fn manual_routes_rejected_with_reasons() {
        use OverrideRejection::*;
        let reasons = |c: &Case| -> Vec<(String, OverrideRejection)> {
            c.run()
                .rejected_overrides()
                .iter()
                .map(|r| (c.t.name(r.child).to_string(), r.reason))
                .collect()
        };
        let mut c = Case::new(TWO_BY_TWO_BY_TWO, "a1")
            .health("b2", Health::Degraded)
            .health("c2", Health::Down)
            .manual("a1", "a2") // the source
            .manual("a2", "a2") // itself
            .manual("b1", "b2") // degraded parent
            .manual("c2", "a2") // down child
            .manual("d1", "c1"); // fine
        c.req.targets.remove(&c.id("c1"));
        let c = c.manual("d2", "c1"); // c1 is no longer a member
        assert_eq!(
            reasons(&c),
            [
                ("a1".into(), NotAReceiver),
                ("a2".into(), SelfParent),
                ("b1".into(), ParentCannotRelay(Health::Degraded)),
                ("c2".into(), ChildDown),
                ("d1".into(), ParentNotMember),
                ("d2".into(), ParentNotMember),
            ]
        );
        // Cycles: d2 (region head) under d1, which hangs off d2; b1 (head) under its
        // member b2. Applied in child order, so `b2<b1` (what the default already
        // says) is accepted after `b1<b2` was refused.
        let c = Case::new(TWO_BY_TWO_BY_TWO, "a1")
            .manual("d2", "d1")
            .manual("b1", "b2")
            .manual("b2", "b1");
        assert_eq!(reasons(&c), [("b1".into(), Cycle), ("d2".into(), Cycle)]);
        assert_eq!(c.parent("b1").as_deref(), Some("a1"));
        assert_eq!(c.run().edge(c.id("b2")).unwrap().kind, EdgeKind::Manual);
    }

    #[test]
    fn source_down_or_degraded() {
        let c = Case::new(TWO_BY_TWO_BY_TWO, "a1").manual("b1", "a1");
        // A degraded source still originates (it is the only one holding the change).
        let c = c.health("a1", Health::Degraded);
        assert_eq!(c.run().uplink_copies(), 3);
        let c = c.health("a1", Health::Down);
        let r = c.run();
        assert_eq!(r.reached().count(), 0);
        assert_eq!(r.unreached().len(), 7);
        assert!(
            r.unreached()
                .iter()
                .all(|(_, u)| *u == Unreached::SourceDown)
        );
        assert_eq!(
            r.rejected_overrides()[0].reason,
            OverrideRejection::SourceDown
        );
    }

    #[test]
    fn non_targets_never_relay_and_targets_may_be_a_subset() {
        let mut c = Case::new(&["s:eu:g:1", "big:eu:g:99", "m:eu:g:1"], "s");
        c.req.targets.remove(&c.id("big"));
        assert_eq!(c.edges(), ["m<s"]);
        c.req.targets.clear();
        assert_eq!(c.run().uplink_copies(), 0);
    }
}
