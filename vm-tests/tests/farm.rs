//! A web farm in network namespaces: relay routes, failover around a killed relay and a
//! cut link, and catch-up of the restarted node from its group peer, judged from
//! outside: trees compared byte for byte, the job reports of `cdctl sync` (who sent to
//! each target, over which link class, or why it failed), `cdctl routes`, the deploy
//! barrier `cdctl wait` and the master's farm events (`cdctl events`).
//!
//! The farm: every daemon in its own namespace on one bridge ([`cd_testkit::netns`]),
//! every link limited to 200 Mbit/s each way, 2 ms added to what a host receives (10 ms
//! for the west hosts) where the kernel has `netem` (this CI host's does not; the test
//! says so and runs without delay):
//!
//! ```text
//!   master (own namespace)
//!   east:  node1 (source, group east-src)
//!          east-a: node2 (weight 4), node3        east-b: node4 (weight 4), node5
//!   west:  west-a: node6 (weight 8), node7        west-b: node8 (weight 4), node9
//! ```
//!
//! The story, in order:
//!
//! 1. **Initial sync** of a 300-file tree (nested dirs, links, odd names) along the
//!    relay tree: the source sends three copies (the east group heads node2 and node4,
//!    the west region head node6), node6 forwards to node7 and to the other west group
//!    head node8; each target's row in the job report names that parent as `via` with
//!    the link class of the edge, `cdctl routes` shows the same tree, `cdctl wait` for
//!    the job's change set holds at once, and all eight targets are identical.
//! 2. **Failover during a sync.** The tree is changed a lot (new, changed, removed
//!    files and a 48 MiB file); while `cdctl sync` runs, once node2 is receiving the big
//!    file, node2 is killed (SIGKILL) and the link node6 ↔ node8 is cut. In that job
//!    node2 fails, node3 is reached by the source itself (re-routed within the job),
//!    node8 fails (node6 cannot connect) and node9 is `not attempted`; the master routes
//!    node8 around the broken link via node7 (`around_broken_link`). The next sync
//!    reaches every live target (node8 via node7), node2 is `not routed`, the live
//!    targets are identical, and `cdctl wait` names node2 (disconnected) as the one
//!    behind. The events tell it: `node_down` node2, `reroute` node3, `link_failed`
//!    node8 (by node6), `reroute` node8.
//! 3. **Catch-up.** node2 restarts behind the source (`catch_up = "immediate"`):
//!    `cdctl wait` for the last change set returns consistent, node2 is identical, and
//!    the events show `node_up`, `catch_up_waiting`, `catch_up_done` and node2's
//!    `reroute` back under the source *from node3*: it caught up from its group peer;
//!    node3 is under node2 again, and the job log has node3's catch-up job with node2
//!    reached `via` node3 over the same-group link.
//!
//! Finally the cut is healed and one more sync reaches all eight targets (node2 from
//! the source, node3 from node2), consistent and identical.
//! The test prints a timeline of what happened; it never asserts on wall-clock time.
//!
//! The daemons come from `CD_CDD` and `CD_CDCTL` (`cargo xtask test privileged` sets
//! them). Run alone, as root:
//!
//! ```sh
//! CD_CDD=target/debug/cdd CD_CDCTL=target/debug/cdctl \
//!   cargo test -p vm-tests --test farm -- --ignored --nocapture
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use cd_testkit::cluster::{Cluster, ClusterSpec, MASTER, SyncOutcome};
use cd_testkit::compare::compare;
use cd_testkit::mutate::{MutateSpec, mutate};
use cd_testkit::netns::{Link, Net};
use cd_testkit::tree::files_under;
use cd_testkit::tree::noise;
use cd_testkit::tree::{TreeSpec, generate};
use serde_json::Value;

/// The servers: name, region, group, capacity weight.
const SERVERS: [(&str, &str, &str, u32); 9] = [
    ("node1", "east", "east-src", 1),
    ("node2", "east", "east-a", 4),
    ("node3", "east", "east-a", 2),
    ("node4", "east", "east-b", 4),
    ("node5", "east", "east-b", 2),
    ("node6", "west", "west-a", 8),
    ("node7", "west", "west-a", 2),
    ("node8", "west", "west-b", 4),
    ("node9", "west", "west-b", 2),
];
/// The east-a head, killed in step 2, and its group peer.
const VICTIM: &str = "node2";
const VICTIM_PEER: &str = "node3";
/// The west region head and the other west group head, whose link is cut.
const WEST_HEAD: &str = "node6";
const WEST_OTHER: &str = "node8";

const RATE: &str = "200mbit";
const BIG: usize = 48 << 20;

fn binary(var: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run this test with `cargo xtask test privileged`")
    });
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} is not a file", p.display());
    p
}

/// What happened, printed as it happens with the time since the start.
struct Timeline(Instant);

impl Timeline {
    fn note(&self, what: impl AsRef<str>) {
        println!(
            "[farm {:>7.2}s] {}",
            self.0.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }
}

/// Fails with the cluster's logs.
fn ok<T>(c: &Cluster, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}{}", c.diagnostics()))
}

/// The topology and content-set lines of the master's config.
fn topology(spec: &mut ClusterSpec) {
    for (name, region, group, weight) in SERVERS {
        spec.server(name, region, group, weight);
    }
    spec.set_lines.extend([
        "routing = \"relay\"".to_owned(),
        "catch_up = \"immediate\"".to_owned(),
    ]);
}

/// The namespaces, shaped as in the module docs.
fn network(tl: &Timeline) -> Net {
    let mut names = vec![MASTER];
    names.extend(SERVERS.iter().map(|s| s.0));
    let net = Net::create("cdfarm", &names).unwrap_or_else(|e| panic!("{e:#}"));
    let netem = net.netem_available().unwrap_or_else(|e| panic!("{e:#}"));
    if !netem {
        tl.note(format!(
            "links: {RATE} each way, NO added delay: this kernel has no netem qdisc \
             (CONFIG_NET_SCH_NETEM)"
        ));
    }
    for h in net.hosts() {
        let west = SERVERS.iter().any(|s| s.0 == h.name && s.1 == "west");
        let delay = match (netem, west) {
            (false, _) => Duration::ZERO,
            (true, false) => Duration::from_millis(2),
            (true, true) => Duration::from_millis(10),
        };
        let link = Link {
            rate: Some(RATE.to_owned()),
            delay,
        };
        net.set_link(&h.name, &link)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    if netem {
        tl.note(format!(
            "links: {RATE} each way, +2 ms on what a host receives, +10 ms for west hosts"
        ));
    }
    net
}

fn start(net: &Net, dir: &Path) -> Cluster {
    let mut spec = ClusterSpec::new(SERVERS.len(), dir, &binary("CD_CDD"), &binary("CD_CDCTL"));
    spec.startup_timeout = Duration::from_secs(120);
    spec.sync_timeout = Duration::from_secs(900);
    for h in net.hosts() {
        spec.placements.insert(h.name.clone(), h.placement());
    }
    topology(&mut spec);
    Cluster::start(spec).unwrap_or_else(|e| panic!("farm did not start: {e:#}"))
}

/// Differences between the source and `target` (empty: identical).
fn differences(c: &Cluster, target: &str) -> Vec<String> {
    let src = ok(c, c.root(c.source()));
    let dst = ok(c, c.root(target));
    ok(c, compare(&src, &dst))
}

fn assert_identical(c: &Cluster, targets: &[String]) {
    for t in targets {
        let d = differences(c, t);
        assert!(
            d.is_empty(),
            "{t} differs from the source in {} place(s), first: {:?}{}",
            d.len(),
            &d[..d.len().min(10)],
            c.diagnostics()
        );
    }
}

/// The routing tree of the content set (`cdctl routes www --json`).
#[derive(Debug)]
struct Routes {
    /// (child, parent, class, kind).
    edges: Vec<(String, String, String, String)>,
    /// (node, reason).
    unreached: Vec<(String, String)>,
}

impl Routes {
    fn get(c: &Cluster) -> Self {
        let (code, v) = ok(
            c,
            c.cdctl_json(MASTER, &["routes", "www", "--json"], CDCTL_TIMEOUT),
        );
        assert_eq!(code, 0, "cdctl routes: {v}");
        let s = |x: &Value, k: &str| x[k].as_str().unwrap_or_default().to_owned();
        let edges = v["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("routes without `edges`: {v}"))
            .iter()
            .map(|e| (s(e, "child"), s(e, "parent"), s(e, "class"), s(e, "kind")))
            .collect();
        let unreached = v["unreached"]
            .as_array()
            .unwrap_or_else(|| panic!("routes without `unreached`: {v}"))
            .iter()
            .map(|x| (s(x, "node"), s(x, "reason")))
            .collect();
        Self { edges, unreached }
    }

    fn edge(&self, child: &str) -> Option<&(String, String, String, String)> {
        self.edges.iter().find(|e| e.0 == child)
    }

    fn parent(&self, child: &str) -> Option<&str> {
        self.edge(child).map(|e| e.1.as_str())
    }

    fn children(&self, parent: &str) -> BTreeSet<&str> {
        self.edges
            .iter()
            .filter(|e| e.1 == parent)
            .map(|e| e.0.as_str())
            .collect()
    }

    fn show(&self) -> String {
        let mut s: Vec<String> = self
            .edges
            .iter()
            .map(|(c, p, k, why)| format!("{p}→{c} ({k}, {why})"))
            .collect();
        s.extend(
            self.unreached
                .iter()
                .map(|(n, r)| format!("{n}: unreached ({r})")),
        );
        s.join(", ")
    }

    /// Polls until `pred` holds (at most a minute).
    fn wait_for(c: &Cluster, what: &str, pred: impl Fn(&Self) -> bool) -> Self {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = Self::get(c);
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "routes never showed {what}: {}{}",
                r.show(),
                c.diagnostics()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Time allowed to a `cdctl` call that does not wait for anything.
const CDCTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `<root>/.cdsync/stage/` until it holds a file of more than 1 MiB but less
/// than `full_len` bytes (the big file arriving) or `sync` has finished.
fn wait_receiving(
    root: &Path,
    full_len: u64,
    sync: &mut cd_testkit::cluster::BackgroundSync,
) -> Option<u64> {
    let stage = root.join(".cdsync/stage");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Some((_, len)) = files_under(&stage)
            .into_iter()
            .find(|(_, l)| ((1 << 20)..full_len).contains(l))
        {
            return Some(len);
        }
        if sync.is_finished().unwrap() {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

/// One line per target of a sync's job report: who sent to it, over which link
/// class, or why it failed.
fn show_outcome(out: &SyncOutcome) -> String {
    out.report["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let name = t["target"].as_str().unwrap_or("?");
            if t["ok"] == true {
                format!(
                    "{name} ok via {} ({})",
                    t["via"].as_str().unwrap_or("?"),
                    t["link_class"].as_str().unwrap_or("?")
                )
            } else {
                format!("{name} FAILED ({})", t["error"].as_str().unwrap_or("?"))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The job's change set of the source.
fn seq_of(out: &SyncOutcome) -> u64 {
    out.report["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("job report without `seq`: {}", out.report))
}

/// Asserts that `target` is ok in the report, sent to by `via` over `class`.
fn assert_reached(c: &Cluster, out: &SyncOutcome, target: &str, via: &str, class: &str) {
    let t = ok(c, out.target(target));
    assert_eq!(
        (&t["ok"], t["via"].as_str(), t["link_class"].as_str()),
        (&Value::Bool(true), Some(via), Some(class)),
        "{target} in job {}: {}",
        out.report["job_id"],
        show_outcome(out)
    );
}

/// Asserts that `target` failed in the report with an error starting with `prefix`;
/// returns the error.
fn assert_failed(c: &Cluster, out: &SyncOutcome, target: &str, prefix: &str) -> String {
    let t = ok(c, out.target(target));
    let error = t["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        t["ok"] == false && !error.is_empty() && error.starts_with(prefix),
        "{target} in job {} should have failed with `{prefix}…`: {}",
        out.report["job_id"],
        show_outcome(out)
    );
    error
}

/// `cdctl wait www --seq SEQ --timeout SECS --json` on the master: exit code and
/// answer.
fn wait_seq(c: &Cluster, seq: u64, secs: u64) -> (i32, Value) {
    ok(
        c,
        c.cdctl_json(
            MASTER,
            &[
                "wait",
                "www",
                "--seq",
                &seq.to_string(),
                "--timeout",
                &secs.to_string(),
                "--json",
            ],
            Duration::from_secs(secs + 60),
        ),
    )
}

/// The farm events of the master's job log (`cdctl events --json`), oldest first.
fn events(c: &Cluster) -> Vec<Value> {
    let (code, v) = ok(
        c,
        c.cdctl_json(
            MASTER,
            &["events", "--limit", "10000", "--json"],
            CDCTL_TIMEOUT,
        ),
    );
    assert_eq!(code, 0, "cdctl events: {v}");
    let mut ev = v
        .as_array()
        .unwrap_or_else(|| panic!("cdctl events --json printed no list: {v}"))
        .clone();
    ev.reverse();
    ev
}

/// The first event (oldest first) of `kind` about `node` whose detail contains
/// `detail`, after event id `after`; its id.
fn find_event(ev: &[Value], after: i64, kind: &str, node: &str, detail: &str) -> Option<i64> {
    ev.iter()
        .find(|e| {
            e["id"].as_i64().unwrap_or(0) > after
                && e["kind"] == kind
                && e["node"] == node
                && e["detail"].as_str().unwrap_or_default().contains(detail)
        })
        .and_then(|e| e["id"].as_i64())
}

/// Asserts that the events after `after` hold, in this order, one event per
/// `(kind, node, detail contains)`; returns the id of the last.
fn assert_story(ev: &[Value], after: i64, story: &[(&str, &str, &str)]) -> i64 {
    let mut at = after;
    for &(kind, node, detail) in story {
        at = find_event(ev, at, kind, node, detail).unwrap_or_else(|| {
            panic!(
                "no {kind} event for {node} (detail containing {detail:?}) after event {at}; \
                 the story so far: {story:?}; events:\n{}",
                ev.iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    }
    at
}

/// The catch-up job after job `after` in the master's job log, once it has ended
/// (`cdctl jobs`, then `cdctl job ID`).
fn catch_up_job(c: &Cluster, after: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, v) = ok(c, c.cdctl_json(MASTER, &["jobs", "--json"], CDCTL_TIMEOUT));
        assert_eq!(code, 0, "cdctl jobs: {v}");
        let list = v
            .as_array()
            .unwrap_or_else(|| panic!("cdctl jobs --json printed no list: {v}"));
        let found = list.iter().find(|j| {
            j["job_id"].as_u64().is_some_and(|id| id > after)
                && j["kind"] == "catch_up"
                && j["state"] != "running"
        });
        if let Some(j) = found {
            let id = j["job_id"].as_u64().unwrap_or_default().to_string();
            let (code, detail) = ok(
                c,
                c.cdctl_json(MASTER, &["job", &id, "--json"], CDCTL_TIMEOUT),
            );
            assert_eq!(code, 0, "cdctl job {id}: {detail}");
            return detail;
        }
        assert!(
            Instant::now() < deadline,
            "no ended catch-up job after job {after} within a minute: {v}{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The relay tree of the module docs: (child, parent, link class).
const TREE: [(&str, &str, &str); 8] = [
    ("node2", "node1", "same_region"),
    ("node4", "node1", "same_region"),
    (WEST_HEAD, "node1", "international"),
    ("node3", "node2", "same_group"),
    ("node5", "node4", "same_group"),
    ("node7", WEST_HEAD, "same_group"),
    (WEST_OTHER, WEST_HEAD, "same_region"),
    ("node9", WEST_OTHER, "same_group"),
];

/// Step 1's routes: the relay tree of the module docs.
fn check_initial_routes(c: &Cluster, tl: &Timeline) {
    let routes = Routes::get(c);
    tl.note(format!("routes: {}", routes.show()));
    assert_eq!(
        routes.children("node1"),
        BTreeSet::from(["node2", "node4", WEST_HEAD]),
        "the source sends one copy per east group and one to the west region head: {}",
        routes.show()
    );
    for (child, parent, class) in TREE {
        let e = routes.edge(child);
        assert_eq!(
            e.map(|e| (e.1.as_str(), e.2.as_str())),
            Some((parent, class)),
            "{child}: {}",
            routes.show()
        );
    }
    assert!(routes.unreached.is_empty(), "{}", routes.show());
}

#[test]
#[ignore = "network namespaces and daemons; run by cargo xtask test privileged"]
fn farm_relays_fails_over_and_catches_up() {
    let tl = Timeline(Instant::now());
    let net = network(&tl);
    let tmp = tempfile::tempdir().unwrap();
    let mut c = start(&net, tmp.path());
    let targets = c.targets();
    tl.note(format!(
        "farm up: master + {} nodes, each in its own namespace",
        SERVERS.len()
    ));

    // 1. Initial sync, along the relay tree.
    let source = ok(&c, c.root(c.source()));
    let mut spec = TreeSpec::new(300, 0xfa53);
    spec.max_total_bytes = 6 << 20;
    let summary = generate(&source, &spec).unwrap();
    tl.note(format!(
        "tree: {} files, {} dirs, {} bytes",
        summary.files, summary.dirs, summary.bytes
    ));
    let first = ok(&c, c.try_sync());
    tl.note(format!(
        "initial sync (job {}): {}",
        first.report["job_id"],
        show_outcome(&first)
    ));
    assert_eq!(first.exit_code, 0, "{}{}", first.report, c.diagnostics());
    for (child, parent, class) in TREE {
        assert_reached(&c, &first, child, parent, class);
    }
    let (code, w) = wait_seq(&c, seq_of(&first), 30);
    assert_eq!((code, &w["consistent"]), (0, &Value::Bool(true)), "{w}");
    assert_identical(&c, &targets);
    tl.note("initial sync: every target reached along the tree, consistent, identical");
    check_initial_routes(&c, &tl);
    let story_start = events(&c)
        .last()
        .and_then(|e| e["id"].as_i64())
        .unwrap_or(0);

    // 2. Failover during a sync: node2 killed while it receives the big file, the
    // link node6 ↔ node8 cut.
    let counts = mutate(&source, &MutateSpec::new(0x5eed, 12)).unwrap();
    fs::create_dir_all(source.join("media/video")).unwrap();
    fs::write(source.join("media/video/big.bin"), noise(0xb16, BIG)).unwrap();
    tl.note(format!(
        "mutated the tree: {} edits, plus a {} MiB file",
        counts.total(),
        BIG >> 20
    ));
    let mut bg = ok(&c, c.sync_background());
    tl.note("sync started in the background");
    let victim_root = ok(&c, c.root(VICTIM));
    let seen = wait_receiving(&victim_root, BIG as u64, &mut bg);
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "{VICTIM} never held a partial big file in its stage before the sync ended{}",
            c.diagnostics()
        )
    });
    tl.note(format!(
        "{VICTIM} is receiving the big file ({seen} bytes staged)"
    ));
    let r = c.kill(VICTIM, libc::SIGKILL);
    ok(&c, r);
    tl.note(format!("killed {VICTIM} (SIGKILL)"));
    net.cut(WEST_HEAD, WEST_OTHER)
        .unwrap_or_else(|e| panic!("{e:#}"));
    tl.note(format!("cut the link {WEST_HEAD} ↔ {WEST_OTHER}"));
    let failed = ok(&c, bg.wait());
    tl.note(format!(
        "sync (job {}) returned {}: {}",
        failed.report["job_id"],
        failed.exit_code,
        show_outcome(&failed)
    ));
    assert_eq!(failed.exit_code, 1, "{}", failed.report);
    // The source lost node2 on the link, waited for the master's re-route and sent
    // the job to node3 (now its child) in another round.
    assert_failed(&c, &failed, VICTIM, "");
    assert_reached(&c, &failed, VICTIM_PEER, "node1", "same_region");
    for (child, parent, class) in TREE {
        if ![VICTIM, VICTIM_PEER, WEST_OTHER, "node9"].contains(&child) {
            assert_reached(&c, &failed, child, parent, class);
        }
    }
    // node6 could not reach node8 across the cut, so node8 and its child missed the
    // job (a relay does not wait for re-routes; the next job goes around).
    assert_failed(&c, &failed, WEST_OTHER, "");
    assert_failed(
        &c,
        &failed,
        "node9",
        &format!("not attempted: its parent `{WEST_OTHER}`"),
    );
    let routes = Routes::wait_for(&c, "node8 routed around the cut link", |r| {
        r.parent(WEST_OTHER).is_some_and(|p| p != WEST_HEAD)
    });
    tl.note(format!("routes: {}", routes.show()));
    assert_eq!(
        routes
            .edge(WEST_OTHER)
            .map(|e| (e.1.as_str(), e.3.as_str())),
        Some(("node7", "around_broken_link")),
        "{WEST_OTHER} hangs off the nearest other west relay: {}",
        routes.show()
    );
    assert_eq!(
        routes.parent(VICTIM_PEER),
        Some("node1"),
        "{}",
        routes.show()
    );
    assert!(
        routes.parent(VICTIM).is_none() && routes.unreached.iter().any(|u| u.0 == VICTIM),
        "the killed {VICTIM} is unreached, not routed: {}",
        routes.show()
    );

    // One more sync reaches every live target around the cut; node2 is not routed.
    let second = ok(&c, c.try_sync());
    tl.note(format!(
        "sync again (job {}) returned {}: {}",
        second.report["job_id"],
        second.exit_code,
        show_outcome(&second)
    ));
    assert_eq!(second.exit_code, 1, "{}", second.report);
    assert_failed(&c, &second, VICTIM, "not routed: ");
    assert_reached(&c, &second, VICTIM_PEER, "node1", "same_region");
    assert_reached(&c, &second, WEST_OTHER, "node7", "same_region");
    for (child, parent, class) in TREE {
        if ![VICTIM, VICTIM_PEER, WEST_OTHER].contains(&child) {
            assert_reached(&c, &second, child, parent, class);
        }
    }
    let live: Vec<String> = targets.iter().filter(|t| *t != VICTIM).cloned().collect();
    assert_identical(&c, &live);
    tl.note("all 7 live targets identical");
    // The deploy barrier names the one laggard.
    let seq2 = seq_of(&second);
    let (code, w) = wait_seq(&c, seq2, 2);
    tl.note(format!("cdctl wait --seq {seq2}: exit {code}: {w}"));
    let behind: Vec<(&str, bool)> = w["behind"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| (b["target"].as_str().unwrap_or("?"), b["connected"] == true))
        .collect();
    assert_eq!(
        (code, &w["consistent"], behind),
        (1, &Value::Bool(false), vec![(VICTIM, false)]),
        "{w}"
    );
    let ev = events(&c);
    let failover = assert_story(
        &ev,
        story_start,
        &[
            ("node_down", VICTIM, ""),
            (
                "reroute",
                VICTIM_PEER,
                &format!(
                    "now receives from `node1` (same_region, group_head) instead of `{VICTIM}`"
                ),
            ),
        ],
    );
    let around = assert_story(
        &ev,
        story_start,
        &[
            (
                "link_failed",
                WEST_OTHER,
                &format!("`{WEST_HEAD}` cannot reach it"),
            ),
            (
                "reroute",
                WEST_OTHER,
                &format!(
                    "now receives from `node7` (same_region, around_broken_link) instead of `{WEST_HEAD}`"
                ),
            ),
        ],
    );
    tl.note(format!(
        "events: {VICTIM} down, {VICTIM_PEER} re-routed (up to event {failover}); \
         {WEST_OTHER}'s link failed, re-routed via node7 (up to event {around})"
    ));

    // 3. node2 comes back behind the source: it catches up from its group peer, then
    // heads east-a again.
    let r = c.restart(VICTIM);
    ok(&c, r);
    tl.note(format!("restarted {VICTIM}; it is connected"));
    let (code, w) = wait_seq(&c, seq2, 120);
    tl.note(format!("cdctl wait --seq {seq2}: exit {code}: {w}"));
    assert_eq!((code, &w["consistent"]), (0, &Value::Bool(true)), "{w}");
    assert_identical(&c, &[VICTIM.to_owned()]);
    tl.note(format!("{VICTIM} identical after its catch-up"));
    let routes = Routes::wait_for(&c, "node2 heading east-a again", |r| {
        r.parent(VICTIM) == Some("node1") && r.parent(VICTIM_PEER) == Some(VICTIM)
    });
    tl.note(format!("routes: {}", routes.show()));
    let ev = events(&c);
    let caught = assert_story(
        &ev,
        failover,
        &[
            ("node_up", VICTIM, "re-established"),
            (
                "catch_up_waiting",
                VICTIM,
                &format!("the source is at {seq2}; catches up now"),
            ),
            (
                "catch_up_done",
                VICTIM,
                &format!("holds change set {seq2} "),
            ),
            // It caught up hanging off its group peer: the edge it leaves is node3's.
            (
                "reroute",
                VICTIM,
                &format!(
                    "now receives from `node1` (same_region, group_head) instead of `{VICTIM_PEER}`"
                ),
            ),
        ],
    );
    assert!(
        find_event(
            &ev,
            failover,
            "reroute",
            VICTIM_PEER,
            &format!("from `{VICTIM}`")
        )
        .is_some(),
        "{VICTIM_PEER} is not back under {VICTIM}: {ev:?}"
    );
    tl.note(format!(
        "events: {VICTIM} up, waiting, caught up from {VICTIM_PEER}, heads again (up to event {caught})"
    ));
    // The job log has the catch-up job node3 ran for node2.
    let job = catch_up_job(&c, second.report["job_id"].as_u64().unwrap_or_default());
    tl.note(format!(
        "catch-up job {}: {}, source {}, seq {}",
        job["job_id"], job["state"], job["source"], job["seq"]
    ));
    let row = job["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["target"] == VICTIM)
        .unwrap_or_else(|| panic!("catch-up job without a row for {VICTIM}: {job}"));
    assert_eq!(
        (
            &job["state"],
            &job["source"],
            &job["seq"],
            &row["ok"],
            row["via"].as_str(),
            row["link_class"].as_str()
        ),
        (
            &Value::from("ok"),
            &Value::from(VICTIM_PEER),
            &Value::from(seq2),
            &Value::Bool(true),
            Some(VICTIM_PEER),
            Some("same_group")
        ),
        "{job}"
    );
    for e in ev.iter().filter(|e| e["id"].as_i64() > Some(story_start)) {
        tl.note(format!(
            "event {}: {} {} {}",
            e["id"], e["kind"], e["node"], e["detail"]
        ));
    }

    // Heal, and the next sync reaches all eight (node8 stays around the broken link
    // until its hold ends; either parent is fine here).
    net.heal(WEST_HEAD, WEST_OTHER)
        .unwrap_or_else(|e| panic!("{e:#}"));
    tl.note(format!("healed the link {WEST_HEAD} ↔ {WEST_OTHER}"));
    let fin = ok(&c, c.try_sync());
    tl.note(format!(
        "final sync (job {}): {}",
        fin.report["job_id"],
        show_outcome(&fin)
    ));
    assert_eq!(fin.exit_code, 0, "{}{}", fin.report, c.diagnostics());
    assert_reached(&c, &fin, VICTIM, "node1", "same_region");
    assert_reached(&c, &fin, VICTIM_PEER, VICTIM, "same_group");
    let (code, w) = wait_seq(&c, seq_of(&fin), 30);
    assert_eq!((code, &w["consistent"]), (0, &Value::Bool(true)), "{w}");
    assert_identical(&c, &targets);
    tl.note("all 8 targets identical and consistent");
    drop(c);
    drop(net);
}

/// Sends `len` bytes from `from` to a listener on `to`, port `port`; `Err` if the
/// connection cannot be made within 2 s. Returns the seconds the bytes took.
fn transfer(net: &Net, from: &str, to: &str, port: u16, len: usize) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let to_ip = net.host(to)?.ip;
    let (tx, rx) = std::sync::mpsc::channel();
    let server = net.host(to)?.spawn_in(move || {
        let l = TcpListener::bind((to_ip, port))?;
        tx.send(())?;
        // The client gives up after 2 s; so does the server.
        let deadline = Instant::now() + Duration::from_secs(3);
        l.set_nonblocking(true)?;
        loop {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0;
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Ok(0);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    });
    rx.recv()?;
    let client = net.host(from)?.spawn_in(move || {
        let addr = SocketAddr::from((to_ip, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        let t = Instant::now();
        let chunk = vec![0x5au8; 1 << 16];
        let mut left = len;
        while left > 0 {
            let k = left.min(chunk.len());
            s.write_all(&chunk[..k])?;
            left -= k;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut end = [0u8; 1];
        // Wait for the server's close: every byte has arrived.
        let _ = s.read(&mut end);
        Ok(t.elapsed().as_secs_f64())
    });
    let took = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))?;
    let got = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    let took = took?;
    anyhow::ensure!(got == len, "{to} received {got} of {len} bytes");
    Ok(took)
}

/// The namespace network itself: cuts drop exactly one pair both ways and heal, the
/// rate limit holds, the counters count, and a delay is refused with a reason where
/// the kernel has no netem.
#[test]
#[ignore = "network namespaces; run by cargo xtask test privileged"]
fn namespace_network_cuts_heals_and_shapes() {
    let net = Net::create("cdnt", &["a", "b", "c"]).unwrap();
    let mb = 4 << 20;
    transfer(&net, "a", "b", 7001, mb).unwrap();
    net.cut("a", "b").unwrap();
    assert!(transfer(&net, "a", "b", 7002, mb).is_err(), "a → b is cut");
    assert!(transfer(&net, "b", "a", 7003, mb).is_err(), "b → a is cut");
    transfer(&net, "a", "c", 7004, mb).unwrap();
    transfer(&net, "c", "b", 7005, mb).unwrap();
    net.cut("a", "c").unwrap();
    net.heal("a", "b").unwrap();
    transfer(&net, "b", "a", 7006, mb).unwrap();
    assert!(
        transfer(&net, "c", "a", 7007, mb).is_err(),
        "a ↔ c is still cut"
    );
    net.heal("a", "c").unwrap();
    assert!(
        net.heal("a", "c").is_err(),
        "healing an intact link is an error"
    );

    // 100 Mbit/s: 16 MiB take at least about 1.3 s (less the 1 MB burst); unshaped
    // veths are far faster.
    let before = net.tx_bytes(net.host("a").unwrap()).unwrap();
    net.set_link(
        "a",
        &Link {
            rate: Some("100mbit".to_owned()),
            delay: Duration::ZERO,
        },
    )
    .unwrap();
    let len = 16 << 20;
    let took = transfer(&net, "a", "c", 7008, len).unwrap();
    #[expect(clippy::cast_precision_loss, reason = "a rate for humans")]
    let mbit = len as f64 * 8.0 / took / 1e6;
    println!("a → c at 100mbit: {mbit:.1} Mbit/s");
    assert!(
        mbit < 120.0,
        "the rate limit does not hold: {mbit:.1} Mbit/s"
    );
    let sent = net.tx_bytes(net.host("a").unwrap()).unwrap() - before;
    assert!(
        sent >= len as u64,
        "a's counter says {sent} bytes for {len}"
    );
    net.shape(None).unwrap();

    let delayed = Link {
        rate: Some("100mbit".to_owned()),
        delay: Duration::from_millis(20),
    };
    if net.netem_available().unwrap() {
        net.set_link("b", &delayed).unwrap();
        let t = Instant::now();
        transfer(&net, "a", "b", 7009, 1).unwrap();
        println!(
            "a → b with 20 ms on b's downlink: {:?} for 1 byte",
            t.elapsed()
        );
    } else {
        let e = net.set_link("b", &delayed).unwrap_err();
        println!("netem: {e:#}");
        assert!(format!("{e:#}").contains("CONFIG_NET_SCH_NETEM"), "{e:#}");
    }
}
