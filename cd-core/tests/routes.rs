//! Property tests of route computation over random topologies, health, target sets,
//! manual routes and fan-out bounds. Every table is checked against
//! `support/route_check.rs`, an independent statement of the rules.

use std::collections::BTreeMap;

use cd_core::route::{Health, HealthMap, RouteRequest, routes};
use cd_core::topology::{ServerSpec, Topology};
use proptest::prelude::*;

#[path = "support/route_check.rs"]
mod route_check;

/// Per server: (region 0..4, group 0..3, weight 1..4, health roll, target roll).
type Drawn = (Vec<(u8, u8, u32, u8, u8)>, u16, Vec<(u16, u16)>, usize);

fn drawn() -> impl Strategy<Value = Drawn> {
    (
        proptest::collection::vec((0u8..4, 0u8..3, 1u32..4, any::<u8>(), any::<u8>()), 1..40),
        any::<u16>(),
        proptest::collection::vec((any::<u16>(), any::<u16>()), 0..4),
        0usize..5,
    )
}

fn build((servers, src, overrides, fanout): &Drawn) -> (Topology, HealthMap, RouteRequest) {
    let t = Topology::new(servers.iter().enumerate().map(|(i, (r, g, w, _, _))| {
        ServerSpec::new(&format!("s{i:02}"), &format!("r{r}"), &format!("g{g}"), *w)
    }))
    .unwrap();
    let ids: Vec<_> = t.ids().collect();
    let mut h = HealthMap::new(&t, Health::Up);
    let mut targets = Vec::new();
    for (i, (_, _, _, hr, tr)) in servers.iter().enumerate() {
        h.set(
            ids[i],
            match hr % 8 {
                0..=4 => Health::Up,
                5 | 6 => Health::Degraded,
                _ => Health::Down,
            },
        );
        if tr % 8 != 0 {
            targets.push(ids[i]);
        }
    }
    let mut req = RouteRequest::new(ids[usize::from(*src) % ids.len()], targets);
    req.group_fanout = *fanout;
    let pick = |x: u16| ids[usize::from(x) % ids.len()];
    req.overrides = overrides
        .iter()
        .map(|&(c, p)| (pick(c), pick(p)))
        .collect::<BTreeMap<_, _>>();
    (t, h, req)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn route_tables_keep_every_rule(d in drawn()) {
        let (t, h, req) = build(&d);
        let table = routes(&t, &h, &req);
        if let Err(e) = route_check::check(&t, &h, &req, &table) {
            return Err(TestCaseError::fail(format!("{e}\n{table:#?}")));
        }
        // Deterministic, and independent of the order servers were configured in.
        prop_assert_eq!(&routes(&t, &h, &req), &table);
    }
}

/// The generator reaches every situation the rules distinguish, so the property
/// above is not passing on easy cases only.
#[test]
fn generator_covers_every_case() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for _ in 0..1024 {
        let d = drawn().new_tree(&mut runner).unwrap().current();
        let (t, h, req) = build(&d);
        let s = route_check::check(&t, &h, &req, &routes(&t, &h, &req)).unwrap();
        for (k, v) in [
            ("headless group", s.headless_group),
            ("headless region", s.headless_region),
            ("forced source copy", s.forced_source_copy),
            ("fanout overflow", s.fanout_overflow),
            ("accepted override", s.accepted_override),
            ("cycle rejected", s.cycle_rejected),
            ("degraded leaf", s.degraded_leaf),
            ("region head", s.region_head),
            ("source down", h.get(req.source) == Health::Down),
        ] {
            *seen.entry(k).or_default() += u32::from(v);
        }
    }
    eprintln!("{seen:#?}");
    for (k, n) in &seen {
        assert!(*n >= 5, "{k} seen only {n} times in 1024 cases: {seen:#?}");
    }
}

/// The checker itself rejects broken tables.
#[test]
fn checker_catches_broken_tables() {
    let t = Topology::new([
        ServerSpec::new("a", "eu", "g", 1),
        ServerSpec::new("b", "eu", "g", 5),
        ServerSpec::new("c", "eu", "g", 1),
        ServerSpec::new("d", "us", "g", 1),
    ])
    .unwrap();
    let id = |n| t.id(n).unwrap();
    let mut h = HealthMap::new(&t, Health::Up);
    let req = RouteRequest::new(id("a"), t.ids());
    let good = routes(&t, &h, &req);
    assert!(route_check::check(&t, &h, &req, &good).is_ok());
    // The same table under other health: b degraded must not relay c.
    h.set(id("b"), Health::Degraded);
    assert!(route_check::check(&t, &h, &req, &good).is_err());
    // d down must not be reached.
    let mut h2 = HealthMap::new(&t, Health::Up);
    h2.set(id("d"), Health::Down);
    assert!(route_check::check(&t, &h2, &req, &good).is_err());
    // A table for fewer targets misses one.
    let fewer = RouteRequest::new(id("a"), [id("b"), id("c")]);
    let h3 = HealthMap::new(&t, Health::Up);
    assert!(route_check::check(&t, &h3, &req, &routes(&t, &h3, &fewer)).is_err());
    // A table computed for another source.
    let other = RouteRequest::new(id("b"), t.ids());
    assert!(route_check::check(&t, &h3, &req, &routes(&t, &h3, &other)).is_err());
}
