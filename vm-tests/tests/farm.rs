//! A web farm in network namespaces: relay routes, failover around a killed relay and a
//! cut link, and catch-up of the restarted node from its group peer, judged from
//! outside (trees compared byte for byte, `cdctl routes`, `cdctl jobs`, `cdctl job`, `cdctl events`).
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
//! 1. **Initial sync** of a 300-file tree (nested dirs, links, odd names): all eight
//!    targets identical to the source; `cdctl routes` shows the relay tree: the source
//!    sends three copies (the east group heads node2 and node4, the west region head
//!    node6), node6 forwards to node7 and to the other west group head node8, and every
//!    target has a parent.
//! 2. **Failover during a sync.** The tree is changed a lot (new, changed, removed
//!    files and a 48 MiB file); while `cdctl sync` runs, once node2 is receiving the big
//!    file, node2 is killed (SIGKILL) and the link node6 ↔ node8 is cut. The sync may
//!    report failures (node2 always, others while the master reroutes); it is repeated
//!    (at most three more times) until every live target is ok; then every live target
//!    is identical, routes show node2 gone with node3 heading east-a under the source,
//!    and node8 under some parent other than node6.
//! 3. **Catch-up.** node2 restarts; with `catch_up = "immediate"` the master starts a
//!    catch-up job for it, whose row for node2 names node3 (its group peer) as `via`
//!    (or routes show node2 under node3 meanwhile); node2 ends identical.
//! 4. **The job log tells the story** (`cdctl job`, `cdctl events`): the sync of step 2 is failed or partial with an
//!    error for node2; the events include `node_down` (node2), `reroute`,
//!    `link_failed` (node6 → node8), `node_up` (node2) and `catch_up_done` (node2).
//!
//! Finally the cut is healed and one more sync leaves all eight targets identical.
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

/// Deterministic, incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
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

/// The routing tree of the content set.
#[derive(Debug)]
struct Routes {
    /// (child, parent, class).
    edges: Vec<(String, String, String)>,
    /// (node, reason).
    unreached: Vec<(String, String)>,
}

impl Routes {
    fn get(c: &Cluster) -> Self {
        let v = ok(c, c.cdctl_ok_json(MASTER, &["routes", "www", "--json"]));
        let s = |x: &Value, k: &str| x[k].as_str().unwrap_or_default().to_owned();
        let edges = v["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("routes without `edges`: {v}"))
            .iter()
            .map(|e| (s(e, "child"), s(e, "parent"), s(e, "class")))
            .collect();
        let unreached = v["unreached"]
            .as_array()
            .map(|u| u.iter().map(|x| (s(x, "node"), s(x, "reason"))).collect())
            .unwrap_or_default();
        Self { edges, unreached }
    }

    fn parent(&self, child: &str) -> Option<&str> {
        self.edges
            .iter()
            .find(|e| e.0 == child)
            .map(|e| e.1.as_str())
    }

    fn children(&self, parent: &str) -> BTreeSet<&str> {
        self.edges
            .iter()
            .filter(|e| e.1 == parent)
            .map(|e| e.0.as_str())
            .collect()
    }

    fn class(&self, child: &str) -> Option<&str> {
        self.edges
            .iter()
            .find(|e| e.0 == child)
            .map(|e| e.2.as_str())
    }

    fn show(&self) -> String {
        let mut s: Vec<String> = self
            .edges
            .iter()
            .map(|(c, p, k)| format!("{p}→{c} ({k})"))
            .collect();
        s.extend(
            self.unreached
                .iter()
                .map(|(n, r)| format!("{n}: unreached ({r})")),
        );
        s.join(", ")
    }
}

/// Regular files anywhere under `dir` (empty if it does not exist).
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            out.extend(files_under(&p));
        } else if md.is_file() {
            out.push((p, md.len()));
        }
    }
    out
}

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

/// `(target, ok, error)` of every target of a sync report.
fn outcome(out: &SyncOutcome) -> Vec<(String, bool, String)> {
    out.report["targets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t["target"].as_str().unwrap_or_default().to_owned(),
                        t["ok"] == true,
                        t["error"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn show_outcome(out: &SyncOutcome) -> String {
    outcome(out)
        .iter()
        .map(|(t, ok, e)| {
            if *ok {
                format!("{t} ok")
            } else {
                format!("{t} FAILED ({e})")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether any string in `v` names `node` (the whole string, or a word of it).
fn mentions(v: &Value, node: &str) -> bool {
    match v {
        Value::String(s) => {
            s == node
                || s.split(|ch: char| !ch.is_ascii_alphanumeric())
                    .any(|w| w == node)
        }
        Value::Array(a) => a.iter().any(|x| mentions(x, node)),
        Value::Object(o) => o.values().any(|x| mentions(x, node)),
        _ => false,
    }
}

/// The jobs of `cdctl jobs --json`, newest first.
fn jobs(c: &Cluster) -> Vec<Value> {
    let v = ok(c, c.cdctl_ok_json(MASTER, &["jobs", "--json"]));
    v.as_array()
        .or_else(|| v["jobs"].as_array())
        .unwrap_or_else(|| panic!("cdctl jobs --json printed no list: {v}"))
        .clone()
}

fn job_id(job: &Value) -> u64 {
    job["id"]
        .as_u64()
        .or_else(|| job["job_id"].as_u64())
        .unwrap_or_else(|| panic!("job without an id: {job}"))
}

/// `cdctl job ID --json`.
fn job(c: &Cluster, id: u64) -> Value {
    ok(
        c,
        c.cdctl_ok_json(MASTER, &["job", &id.to_string(), "--json"]),
    )
}

/// The per-target rows of a job's detail.
fn job_rows(detail: &Value) -> Vec<Value> {
    detail["targets"]
        .as_array()
        .or_else(|| detail["job"]["targets"].as_array())
        .cloned()
        .unwrap_or_default()
}

fn row_for<'a>(rows: &'a [Value], node: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["target"] == node || r["node"] == node)
}

fn job_events(detail: &Value) -> Vec<Value> {
    detail["events"]
        .as_array()
        .or_else(|| detail["job"]["events"].as_array())
        .cloned()
        .unwrap_or_default()
}

fn event_kind(e: &Value) -> &str {
    e["kind"]
        .as_str()
        .or_else(|| e["type"].as_str())
        .unwrap_or_default()
}

fn job_state(j: &Value) -> String {
    let j = if j["job"].is_object() { &j["job"] } else { j };
    j["state"].as_str().unwrap_or_default().to_owned()
}

fn is_terminal(state: &str) -> bool {
    !matches!(
        state,
        "" | "pending" | "queued" | "scheduled" | "running" | "started" | "in_progress"
    )
}

/// The catch-up job of `node` newer than job `after`, once it has ended; meanwhile
/// the parents routes give `node`.
fn wait_catch_up(c: &Cluster, node: &str, after: u64, tl: &Timeline) -> (Value, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut parents: Vec<String> = Vec::new();
    let mut announced = false;
    loop {
        if let Some(p) = Routes::get(c).parent(node)
            && parents.last().map(String::as_str) != Some(p)
        {
            tl.note(format!("routes: {node} is under {p}"));
            parents.push(p.to_owned());
        }
        // The list has no per-target rows: a catch-up job's detail says whom it reached.
        let found = jobs(c).into_iter().find(|j| {
            job_id(j) > after
                && j["kind"] == "catch_up"
                && job_rows(&job(c, job_id(j)))
                    .iter()
                    .any(|r| r["target"] == node)
        });
        if let Some(j) = found {
            let id = job_id(&j);
            if !announced {
                tl.note(format!("catch-up job {id} for {node}: {}", job_state(&j)));
                announced = true;
            }
            let state = job_state(&j);
            if is_terminal(&state) {
                tl.note(format!("catch-up job {id} ended: {state}"));
                return (job(c, id), parents);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no finished catch-up job for {node} after job {after}; jobs: {:?}{}",
            jobs(c),
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Step 1's routes: the relay tree of the module docs.
fn check_initial_routes(c: &Cluster, targets: &[String], tl: &Timeline) {
    let routes = Routes::get(c);
    tl.note(format!("routes: {}", routes.show()));
    assert_eq!(
        routes.children("node1"),
        BTreeSet::from(["node2", "node4", WEST_HEAD]),
        "the source sends one copy per east group and one to the west region head: {}",
        routes.show()
    );
    for t in targets {
        assert!(
            routes.parent(t).is_some(),
            "{t} has no parent: {}",
            routes.show()
        );
    }
    for (child, parent, class) in [
        ("node2", "node1", "same_region"),
        ("node4", "node1", "same_region"),
        (WEST_HEAD, "node1", "international"),
        ("node3", "node2", "same_group"),
        ("node5", "node4", "same_group"),
        ("node7", WEST_HEAD, "same_group"),
        (WEST_OTHER, WEST_HEAD, "same_region"),
        ("node9", WEST_OTHER, "same_group"),
    ] {
        assert_eq!(
            (routes.parent(child), routes.class(child)),
            (Some(parent), Some(class)),
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

    // 1. Initial sync.
    let source = ok(&c, c.root(c.source()));
    let mut spec = TreeSpec::new(300, 0xfa53);
    spec.max_total_bytes = 6 << 20;
    let summary = generate(&source, &spec).unwrap();
    tl.note(format!(
        "tree: {} files, {} dirs, {} bytes",
        summary.files, summary.dirs, summary.bytes
    ));
    let first = ok(&c, c.try_sync());
    tl.note(format!("initial sync: {}", show_outcome(&first)));
    assert_eq!(first.exit_code, 0, "{}{}", first.report, c.diagnostics());
    assert_identical(&c, &targets);
    tl.note("initial sync: all 8 targets identical");
    check_initial_routes(&c, &targets, &tl);

    // 2. Failover during a sync.

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
    let failed_job = failed.report["job_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("sync report without job_id: {}", failed.report));
    tl.note(format!(
        "sync (job {failed_job}) returned {}: {}",
        failed.exit_code,
        show_outcome(&failed)
    ));
    let victim_row = failed.target(VICTIM).map(|t| t["ok"] == true);
    assert!(
        matches!(victim_row, Ok(false)),
        "the killed {VICTIM} cannot be ok: {}",
        failed.report
    );
    let live: Vec<String> = targets.iter().filter(|t| *t != VICTIM).cloned().collect();
    let mut extra_syncs = 0;
    let mut last = failed;
    while outcome(&last).iter().any(|(t, ok, _)| t != VICTIM && !ok) {
        assert!(
            extra_syncs < 3,
            "live targets still failing after {extra_syncs} more syncs: {}{}",
            show_outcome(&last),
            c.diagnostics()
        );
        extra_syncs += 1;
        last = ok(&c, c.try_sync());
        tl.note(format!(
            "sync again (#{extra_syncs}, job {}): {}",
            last.report["job_id"],
            show_outcome(&last)
        ));
    }
    tl.note(format!(
        "every live target ok after {extra_syncs} more sync(s) beyond the interrupted one"
    ));
    assert_identical(&c, &live);
    tl.note("all 7 live targets identical");
    let routes = Routes::get(&c);
    tl.note(format!("routes: {}", routes.show()));
    assert!(
        !routes.edges.iter().any(|e| e.0 == VICTIM || e.1 == VICTIM),
        "the killed {VICTIM} is still routed: {}",
        routes.show()
    );
    assert_eq!(
        routes.parent(VICTIM_PEER),
        Some("node1"),
        "{VICTIM_PEER} heads east-a now: {}",
        routes.show()
    );
    let reparented = routes.parent(WEST_OTHER).map(str::to_owned);
    assert!(
        reparented.as_deref().is_some_and(|p| p != WEST_HEAD),
        "{WEST_OTHER} is still under {WEST_HEAD} across the cut link: {}",
        routes.show()
    );

    // 3. Catch-up from the group peer.
    let newest = jobs(&c).first().map_or(0, job_id);
    let r = c.restart(VICTIM);
    ok(&c, r);
    tl.note(format!("restarted {VICTIM}; it is connected"));
    let (catch_up, parents) = wait_catch_up(&c, VICTIM, newest, &tl);
    let rows = job_rows(&catch_up);
    let via = row_for(&rows, VICTIM)
        .and_then(|r| r["via"].as_str())
        .map(str::to_owned);
    tl.note(format!(
        "catch-up of {VICTIM}: via {via:?}; parents seen in routes: {parents:?}"
    ));
    assert!(
        via.as_deref() == Some(VICTIM_PEER) || parents.iter().any(|p| p == VICTIM_PEER),
        "{VICTIM} did not catch up from its group peer {VICTIM_PEER}: job {catch_up}; \
         parents seen {parents:?}"
    );
    assert_identical(&c, &[VICTIM.to_owned()]);
    tl.note(format!("{VICTIM} identical after its catch-up"));

    // 4. The job log.
    let detail = job(&c, failed_job);
    let state = job_state(&detail);
    tl.note(format!("job {failed_job}: state {state}"));
    assert!(
        matches!(state.as_str(), "failed" | "partial"),
        "the interrupted sync's job: {detail}"
    );
    let victim_error = row_for(&job_rows(&detail), VICTIM)
        .and_then(|r| r["error"].as_str())
        .map(str::to_owned);
    assert!(
        victim_error.as_deref().is_some_and(|e| !e.is_empty()),
        "job {failed_job} has no error for {VICTIM}: {detail}"
    );
    // The interrupted job's own detail shows node2 going down while it ran; the
    // farm's whole story is in `cdctl events`.
    assert!(
        job_events(&detail)
            .iter()
            .any(|e| event_kind(e) == "node_down" && mentions(e, VICTIM)),
        "job {failed_job}'s events do not show {VICTIM} going down: {detail}"
    );
    let events: Vec<Value> = ok(
        &c,
        c.cdctl_ok_json(MASTER, &["events", "--limit", "500", "--json"]),
    )
    .as_array()
    .cloned()
    .unwrap_or_default();
    for e in &events {
        tl.note(format!("event {}: {e}", event_kind(e)));
    }
    let has = |kind: &str, nodes: &[&str]| {
        events
            .iter()
            .any(|e| event_kind(e) == kind && nodes.iter().all(|n| mentions(e, n)))
    };
    for (kind, nodes) in [
        ("node_down", &[VICTIM][..]),
        ("reroute", &[][..]),
        ("link_failed", &[WEST_OTHER][..]),
        ("node_up", &[VICTIM][..]),
        ("catch_up_done", &[VICTIM][..]),
    ] {
        assert!(
            has(kind, nodes),
            "no {kind} event naming {nodes:?} in the job log: {events:?}"
        );
    }

    // Heal, and everything converges.
    net.heal(WEST_HEAD, WEST_OTHER)
        .unwrap_or_else(|e| panic!("{e:#}"));
    tl.note(format!("healed the link {WEST_HEAD} ↔ {WEST_OTHER}"));
    let fin = ok(&c, c.try_sync());
    tl.note(format!("final sync: {}", show_outcome(&fin)));
    assert_eq!(fin.exit_code, 0, "{}{}", fin.report, c.diagnostics());
    assert_identical(&c, &targets);
    tl.note("all 8 targets identical");
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
