//! [`Topology`]: the Region → Group → Server tree the master builds from its config,
//! with each server's capacity weight, and the [`LinkClass`] of the link between two
//! servers.
//!
//! A group is named within its region: group `web` of region `eu` and group `web` of
//! region `us` are two groups. Servers get dense [`ServerId`]s in name order, so
//! "ties by name" and "ties by id" are the same thing everywhere in routing.
//!
//! **Nearest.** Distance between servers is the link class only: same group, then
//! same region, then international ([`LinkClass`] orders that way). Among candidates
//! of the same class [`Topology::nearest`] prefers the higher weight (more cores, a
//! faster link), then the smaller name, so the answer is deterministic.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;

/// A server of one [`Topology`]: an index into it, in name order. Ids of one topology
/// mean nothing in another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(u32);

impl ServerId {
    /// Position in [`Topology::ids`] (and in name order).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One server as the config describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub name: String,
    pub region: String,
    pub group: String,
    /// Capacity weight (cores, link speed, as the daemon scores them); at least 1.
    pub weight: u32,
}

impl ServerSpec {
    pub fn new(name: &str, region: &str, group: &str, weight: u32) -> Self {
        Self {
            name: name.into(),
            region: region.into(),
            group: group.into(),
            weight,
        }
    }
}

/// One server of a validated [`Topology`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    spec: ServerSpec,
    region: u32,
    group: u32,
}

impl Server {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn region(&self) -> &str {
        &self.spec.region
    }
    pub fn group(&self) -> &str {
        &self.spec.group
    }
    pub fn weight(&self) -> u32 {
        self.spec.weight
    }
    /// Dense index of the region (regions in name order).
    pub fn region_index(&self) -> usize {
        self.region as usize
    }
    /// Dense index of the (region, group) pair (in (region, group) name order).
    pub fn group_index(&self) -> usize {
        self.group as usize
    }
}

/// The class of the link between two servers, nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkClass {
    SameGroup,
    SameRegion,
    International,
}

impl LinkClass {
    pub const ALL: [LinkClass; 3] = [
        LinkClass::SameGroup,
        LinkClass::SameRegion,
        LinkClass::International,
    ];
}

impl fmt::Display for LinkClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkClass::SameGroup => "same-group",
            LinkClass::SameRegion => "same-region",
            LinkClass::International => "international",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("a server has an empty name")]
    EmptyName,
    #[error("server {0:?} is listed twice")]
    DuplicateServer(String),
    #[error("server {0:?} has an empty region name")]
    EmptyRegion(String),
    #[error("server {0:?} has an empty group name")]
    EmptyGroup(String),
    #[error("server {0:?} has weight 0 (the least is 1)")]
    ZeroWeight(String),
    #[error("no server named {0:?} in the topology")]
    UnknownServer(String),
}

/// Servers, their groups and regions. Built once from config with [`Topology::new`];
/// immutable afterwards (a config change builds a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    servers: Vec<Server>,
    by_name: BTreeMap<String, ServerId>,
    regions: Vec<String>,
    /// (region index, group name) per group index.
    groups: Vec<(u32, String)>,
}

impl Topology {
    /// Validates and indexes `specs` (in any order).
    pub fn new(specs: impl IntoIterator<Item = ServerSpec>) -> Result<Self, TopologyError> {
        let mut by_spec_name: BTreeMap<String, ServerSpec> = BTreeMap::new();
        for s in specs {
            if s.name.is_empty() {
                return Err(TopologyError::EmptyName);
            }
            if s.region.is_empty() {
                return Err(TopologyError::EmptyRegion(s.name));
            }
            if s.group.is_empty() {
                return Err(TopologyError::EmptyGroup(s.name));
            }
            if s.weight == 0 {
                return Err(TopologyError::ZeroWeight(s.name));
            }
            if by_spec_name.contains_key(&s.name) {
                return Err(TopologyError::DuplicateServer(s.name));
            }
            by_spec_name.insert(s.name.clone(), s);
        }
        let mut region_ix: BTreeMap<&str, u32> = BTreeMap::new();
        let mut group_ix: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        for s in by_spec_name.values() {
            region_ix.insert(&s.region, 0);
            group_ix.insert((&s.region, &s.group), 0);
        }
        for (i, v) in region_ix.values_mut().enumerate() {
            *v = i as u32;
        }
        for (i, v) in group_ix.values_mut().enumerate() {
            *v = i as u32;
        }
        let regions = region_ix.keys().map(|r| r.to_string()).collect();
        let groups = group_ix
            .keys()
            .map(|(r, g)| (region_ix[r], g.to_string()))
            .collect();
        let servers: Vec<Server> = by_spec_name
            .values()
            .map(|s| Server {
                region: region_ix[s.region.as_str()],
                group: group_ix[&(s.region.as_str(), s.group.as_str())],
                spec: s.clone(),
            })
            .collect();
        let by_name = servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.spec.name.clone(), ServerId(i as u32)))
            .collect();
        Ok(Self {
            servers,
            by_name,
            regions,
            groups,
        })
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Every server, in name order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = ServerId> + use<> {
        (0..self.servers.len() as u32).map(ServerId)
    }

    pub fn id(&self, name: &str) -> Option<ServerId> {
        self.by_name.get(name).copied()
    }

    /// The id of `name`, or [`TopologyError::UnknownServer`].
    pub fn resolve(&self, name: &str) -> Result<ServerId, TopologyError> {
        self.id(name)
            .ok_or_else(|| TopologyError::UnknownServer(name.into()))
    }

    /// Panics if `id` is not of this topology.
    pub fn server(&self, id: ServerId) -> &Server {
        &self.servers[id.index()]
    }

    pub fn name(&self, id: ServerId) -> &str {
        self.server(id).name()
    }

    pub fn weight(&self, id: ServerId) -> u32 {
        self.server(id).weight()
    }

    /// Region names, in order of [`Server::region_index`].
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// Number of (region, group) pairs.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The class of the link between `a` and `b` (`SameGroup` when `a == b`).
    pub fn link_class(&self, a: ServerId, b: ServerId) -> LinkClass {
        let (a, b) = (self.server(a), self.server(b));
        if a.group == b.group {
            LinkClass::SameGroup
        } else if a.region == b.region {
            LinkClass::SameRegion
        } else {
            LinkClass::International
        }
    }

    /// The candidate nearest to `to` (see the module docs): by link class, then higher
    /// weight, then name. `to` itself is never chosen.
    pub fn nearest(
        &self,
        to: ServerId,
        candidates: impl IntoIterator<Item = ServerId>,
    ) -> Option<ServerId> {
        candidates
            .into_iter()
            .filter(|&c| c != to)
            .min_by_key(|&c| (self.link_class(c, to), Reverse(self.weight(c)), c))
    }

    /// The order heads are chosen in: higher weight first, then name.
    pub(crate) fn rank(&self, id: ServerId) -> (Reverse<u32>, ServerId) {
        (Reverse(self.weight(id)), id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: &str, r: &str, g: &str, w: u32) -> ServerSpec {
        ServerSpec::new(n, r, g, w)
    }

    #[test]
    fn validation_errors() {
        let ok = spec("a", "eu", "web", 1);
        let bad = |s: ServerSpec| Topology::new([ok.clone(), s]).unwrap_err();
        assert_eq!(bad(spec("", "eu", "web", 1)), TopologyError::EmptyName);
        assert_eq!(
            bad(spec("b", "", "web", 1)),
            TopologyError::EmptyRegion("b".into())
        );
        assert_eq!(
            bad(spec("b", "eu", "", 1)),
            TopologyError::EmptyGroup("b".into())
        );
        assert_eq!(
            bad(spec("b", "eu", "web", 0)),
            TopologyError::ZeroWeight("b".into())
        );
        // Same name in another group is still a duplicate.
        assert_eq!(
            bad(spec("a", "us", "db", 3)),
            TopologyError::DuplicateServer("a".into())
        );
        let t = Topology::new([ok]).unwrap();
        assert_eq!(
            t.resolve("zz"),
            Err(TopologyError::UnknownServer("zz".into()))
        );
        assert!(Topology::new([]).unwrap().is_empty());
    }

    #[test]
    fn ids_follow_name_order_whatever_the_config_order() {
        let t = Topology::new([
            spec("c", "eu", "web", 1),
            spec("a", "us", "web", 1),
            spec("b", "eu", "db", 1),
        ])
        .unwrap();
        let names: Vec<&str> = t.ids().map(|i| t.name(i)).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(t.resolve("b").unwrap().index(), 1);
        assert_eq!(t.regions(), ["eu", "us"]);
        assert_eq!(t.group_count(), 3);
    }

    #[test]
    fn link_classes() {
        let t = Topology::new([
            spec("a1", "eu", "web", 1),
            spec("a2", "eu", "web", 1),
            spec("b1", "eu", "db", 1),
            spec("c1", "us", "web", 1),
        ])
        .unwrap();
        let id = |n| t.id(n).unwrap();
        assert_eq!(t.link_class(id("a1"), id("a1")), LinkClass::SameGroup);
        assert_eq!(t.link_class(id("a1"), id("a2")), LinkClass::SameGroup);
        assert_eq!(t.link_class(id("a1"), id("b1")), LinkClass::SameRegion);
        assert_eq!(t.link_class(id("b1"), id("a2")), LinkClass::SameRegion);
        // Group `web` of `us` is not group `web` of `eu`.
        assert_eq!(t.link_class(id("a1"), id("c1")), LinkClass::International);
        assert!(LinkClass::SameGroup < LinkClass::SameRegion);
        assert!(LinkClass::SameRegion < LinkClass::International);
    }

    #[test]
    fn nearest_is_link_class_then_weight_then_name() {
        let t = Topology::new([
            spec("me", "eu", "web", 1),
            spec("g-light", "eu", "web", 1),
            spec("r-heavy", "eu", "db", 9),
            spec("r-heavy2", "eu", "db", 9),
            spec("i-heavy", "us", "web", 50),
        ])
        .unwrap();
        let id = |n| t.id(n).unwrap();
        let all: Vec<ServerId> = t.ids().collect();
        assert_eq!(t.nearest(id("me"), all.clone()), Some(id("g-light")));
        let no_group = all.iter().copied().filter(|&i| i != id("g-light"));
        // Same weight: the smaller name.
        assert_eq!(t.nearest(id("me"), no_group), Some(id("r-heavy")));
        assert_eq!(t.nearest(id("me"), [id("i-heavy")]), Some(id("i-heavy")));
        assert_eq!(t.nearest(id("me"), [id("me")]), None);
    }
}
