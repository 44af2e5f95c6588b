//! An independent statement of what a route table must satisfy, shared by the route
//! property tests and the farm simulation. It restates the rules of `cd_core::route`
//! from the request, not from the implementation's intermediate results.

use std::collections::{BTreeMap, BTreeSet};

use cd_core::route::{
    EdgeKind, Health, HealthMap, OverrideRejection, RouteRequest, RouteTable, Unreached,
};
use cd_core::topology::{LinkClass, ServerId, Topology};

/// What [`check`] found notable about a table (for generator coverage).
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    pub headless_group: bool,
    pub headless_region: bool,
    pub forced_source_copy: bool,
    pub fanout_overflow: bool,
    pub accepted_override: bool,
    pub cycle_rejected: bool,
    pub degraded_leaf: bool,
    pub region_head: bool,
}

/// Checks `table` against `req` under `health`. The error names the broken rule.
pub fn check(
    topo: &Topology,
    health: &HealthMap,
    req: &RouteRequest,
    table: &RouteTable,
) -> Result<Seen, String> {
    let mut seen = Seen::default();
    let src = req.source;
    let name = |i: ServerId| topo.name(i).to_string();
    let receivers: BTreeSet<ServerId> = req.targets.iter().copied().filter(|&t| t != src).collect();
    let k = req.group_fanout.max(1);
    if table.source() != src {
        return Err("table has another source".into());
    }
    if health.get(src) == Health::Down {
        if table.reached().count() != 0 || table.uplink_copies() != 0 {
            return Err("source down, yet something is routed".into());
        }
        let un: BTreeSet<ServerId> = table.unreached().iter().map(|(t, _)| *t).collect();
        if un != receivers
            || table
                .unreached()
                .iter()
                .any(|(_, u)| *u != Unreached::SourceDown)
        {
            return Err("source down: every receiver must be unreached(SourceDown)".into());
        }
        return Ok(seen);
    }
    let live: BTreeSet<ServerId> = receivers
        .iter()
        .copied()
        .filter(|&t| health.get(t) != Health::Down)
        .collect();
    let relay = |i: ServerId| i == src || (live.contains(&i) && health.get(i) == Health::Up);

    // Reached exactly the live receivers; the down ones are reported.
    let reached: BTreeSet<ServerId> = table.reached().collect();
    if reached != live {
        return Err(format!(
            "reached {:?} but live receivers are {:?}",
            reached.iter().map(|&i| name(i)).collect::<Vec<_>>(),
            live.iter().map(|&i| name(i)).collect::<Vec<_>>()
        ));
    }
    let down: BTreeSet<ServerId> = receivers.difference(&live).copied().collect();
    let un: BTreeSet<ServerId> = table.unreached().iter().map(|(t, _)| *t).collect();
    if un != down || table.unreached().iter().any(|(_, u)| *u != Unreached::Down) {
        return Err("unreached must be exactly the down receivers".into());
    }

    // Parents relay; classes right; acyclic; children lists agree.
    let mut listed: BTreeMap<ServerId, ServerId> = BTreeMap::new();
    for p in std::iter::once(src).chain(reached.iter().copied()) {
        for &c in table.children(p) {
            if listed.insert(c, p).is_some() {
                return Err(format!("{} listed as a child twice", name(c)));
            }
        }
    }
    for (c, e) in table.edges() {
        if !relay(e.parent) {
            return Err(format!(
                "{} relays to {} but cannot relay ({:?})",
                name(e.parent),
                name(c),
                health.get(e.parent)
            ));
        }
        if e.class != topo.link_class(e.parent, c) {
            return Err(format!(
                "edge {}<{} has the wrong class",
                name(c),
                name(e.parent)
            ));
        }
        if listed.get(&c) != Some(&e.parent) {
            return Err(format!("{} is not in its parent's children list", name(c)));
        }
        let mut cur = c;
        let mut steps = 0;
        while cur != src {
            cur = table
                .parent(cur)
                .ok_or_else(|| format!("{} hangs off an unreached node", name(c)))?;
            steps += 1;
            if steps > reached.len() {
                return Err(format!("cycle through {}", name(c)));
            }
        }
        if table.depth(c) != Some(steps) {
            return Err("depth disagrees with the parent chain".into());
        }
        if health.get(c) == Health::Degraded {
            seen.degraded_leaf = true;
        }
    }
    if listed.len() != reached.len() {
        return Err("children lists name nodes without an edge".into());
    }

    // Overrides: accepted ones are manual edges, rejected ones have the right reason,
    // and nothing else is manual.
    let rejected: BTreeMap<ServerId, OverrideRejection> = table
        .rejected_overrides()
        .iter()
        .map(|r| (r.child, r.reason))
        .collect();
    for (&c, &p) in &req.overrides {
        let expected = if c == src || !req.targets.contains(&c) {
            Some(OverrideRejection::NotAReceiver)
        } else if health.get(c) == Health::Down {
            Some(OverrideRejection::ChildDown)
        } else if p == c {
            Some(OverrideRejection::SelfParent)
        } else if p != src && !req.targets.contains(&p) {
            Some(OverrideRejection::ParentNotMember)
        } else if p != src && health.get(p) != Health::Up {
            Some(OverrideRejection::ParentCannotRelay(health.get(p)))
        } else {
            None
        };
        match (expected, rejected.get(&c)) {
            (Some(r), Some(&got)) if r == got => {}
            (None, Some(OverrideRejection::Cycle)) => seen.cycle_rejected = true,
            (None, None) => {
                let e = table.edge(c).ok_or("accepted override without an edge")?;
                if e.parent != p || e.kind != EdgeKind::Manual {
                    return Err(format!(
                        "override {}<{} accepted but not applied",
                        name(c),
                        name(p)
                    ));
                }
                seen.accepted_override = true;
            }
            (want, got) => {
                return Err(format!(
                    "override {}<{}: expected {want:?}, got {got:?}",
                    name(c),
                    name(p)
                ));
            }
        }
    }
    if rejected.len()
        + table
            .edges()
            .filter(|(_, e)| e.kind == EdgeKind::Manual)
            .count()
        != req.overrides.len()
    {
        return Err("manual edges or rejections that no override asked for".into());
    }

    // The default shape, for every non-manual edge.
    let mut groups: BTreeMap<usize, Vec<ServerId>> = BTreeMap::new();
    for &t in &live {
        groups
            .entry(topo.server(t).group_index())
            .or_default()
            .push(t);
    }
    let best = |v: &mut dyn Iterator<Item = ServerId>| {
        v.max_by_key(|&i| (topo.weight(i), std::cmp::Reverse(i)))
    };
    let head: BTreeMap<usize, ServerId> = groups
        .iter()
        .filter_map(|(g, m)| Some((*g, best(&mut m.iter().copied().filter(|&i| relay(i)))?)))
        .collect();
    let src_region = topo.server(src).region_index();
    let region_head: BTreeMap<usize, ServerId> = {
        let mut by_region: BTreeMap<usize, Vec<ServerId>> = BTreeMap::new();
        for &h in head.values() {
            by_region
                .entry(topo.server(h).region_index())
                .or_default()
                .push(h);
        }
        by_region
            .into_iter()
            .filter_map(|(r, hs)| Some((r, best(&mut hs.into_iter())?)))
            .collect()
    };
    let relays: Vec<ServerId> = std::iter::once(src)
        .chain(live.iter().copied().filter(|&i| relay(i)))
        .collect();
    let mut expected_uplink = 0usize;
    for (c, e) in table.edges() {
        let g = topo.server(c).group_index();
        let r = topo.server(c).region_index();
        let why = |s: &str| format!("{}<{} ({:?}): {s}", name(c), name(e.parent), e.kind);
        if e.kind == EdgeKind::Manual {
            expected_uplink += usize::from(e.parent == src);
            continue;
        }
        match head.get(&g) {
            Some(&h) if h == c => {
                let want = if r == src_region {
                    src
                } else if region_head[&r] == c {
                    seen.region_head = true;
                    src
                } else {
                    region_head[&r]
                };
                if e.parent != want {
                    return Err(why(&format!("a group head must hang off {}", name(want))));
                }
                expected_uplink += usize::from(want == src);
            }
            Some(_) => {
                if e.class != LinkClass::SameGroup || e.kind != EdgeKind::Member {
                    return Err(why(
                        "a member of a group with a head must hang off its group",
                    ));
                }
            }
            None => {
                seen.headless_group = true;
                if !relays
                    .iter()
                    .any(|&x| x != src && topo.server(x).region_index() == r)
                {
                    seen.headless_region = true;
                }
                let nearest = relays
                    .iter()
                    .map(|&x| topo.link_class(x, c))
                    .min()
                    .ok_or("no relay")?;
                if e.class != nearest {
                    return Err(why(&format!("not the nearest relay ({nearest})")));
                }
                let other = relays
                    .iter()
                    .any(|&x| x != src && topo.link_class(x, c) == nearest);
                if e.parent == src && other {
                    return Err(why("the source fed a target another relay is as near to"));
                }
                if e.parent == src {
                    seen.forced_source_copy = true;
                    expected_uplink += 1;
                }
            }
        }
    }
    // Uplink: one copy per group head of the source's region, one per other region,
    // plus the forced ones and manual routes to the source; and never more than
    // groups + regions + targets nobody else can feed.
    if table.uplink_copies() != expected_uplink {
        return Err(format!(
            "uplink {} copies, expected {expected_uplink}",
            table.uplink_copies()
        ));
    }

    // Fan-out within a group: at most k members below each relay, unless the group's
    // relays have fewer slots than members (only degraded members can cause that).
    let manual_touched: BTreeSet<usize> = table
        .edges()
        .filter(|(_, e)| e.kind == EdgeKind::Manual)
        .flat_map(|(c, e)| {
            [
                topo.server(c).group_index(),
                topo.server(e.parent).group_index(),
            ]
        })
        .collect();
    for (g, members) in &groups {
        if manual_touched.contains(g) || !head.contains_key(g) {
            continue;
        }
        let relays_in = members.iter().filter(|&&m| relay(m)).count();
        let below = members.len() - 1;
        let overflow = below > k * relays_in;
        let max = members
            .iter()
            .map(|&m| {
                table
                    .children(m)
                    .iter()
                    .filter(|&&c| table.edge(c).map(|e| e.kind) == Some(EdgeKind::Member))
                    .count()
            })
            .max()
            .unwrap_or(0);
        if max > k {
            if !overflow {
                return Err(format!(
                    "a relay of group {g} has {max} > {k} members below it with room elsewhere"
                ));
            }
            seen.fanout_overflow = true;
        }
        // Breadth first, relays before degraded members: no degraded member is nearer
        // to the head than the deepest relay of its group (unless overflowing).
        let max_relay_depth = members
            .iter()
            .filter(|&&m| relay(m))
            .filter_map(|&m| table.depth(m))
            .max()
            .unwrap_or(0);
        let min_degraded_depth = members
            .iter()
            .filter(|&&m| !relay(m))
            .filter_map(|&m| table.depth(m))
            .min();
        if let Some(d) = min_degraded_depth
            && !overflow
            && d < max_relay_depth
        {
            return Err(format!("group {g}: a degraded member sits above relays"));
        }
    }
    Ok(seen)
}
