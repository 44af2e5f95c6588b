//! A real Prometheus scrapes a real cluster: every daemon's `/metrics` as
//! Prometheus itself reads it (OpenMetrics, negotiated by its `Accept` header), the
//! series and labels its query API returns after a manual job and real-time changes,
//! the shipped alert rules loaded and evaluated, every query of the shipped Grafana
//! dashboard accepted, and `promtool check metrics` / `check rules` passing.
//!
//! Privileged (it needs Debian's `prometheus` package, which `cargo xtask test
//! privileged` installs with apt, and root for the real-time capture). The daemons
//! come from `CD_CDD` and `CD_CDCTL`. Nothing here times anything: every wait is a
//! bounded poll for a state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cd_testkit::cluster::{Cluster, ClusterSpec, MASTER, free_port};
use cd_testkit::realtime;
use serde_json::Value;

/// How long Prometheus may take to show what a scrape must show.
const SETTLE: Duration = Duration::from_secs(90);

/// Labels a `cd_` series may carry besides those Prometheus adds (`instance`, `job`).
/// Labels the daemons may put on `cd_` series: each has a handful of values
/// (`content_set` as many as the config names).
const LABELS: &[&str] = &[
    "backend",
    "scope",
    "class",
    "path",
    "state",
    "queue",
    "version",
    "le",
    "content_set",
];

fn binary(var: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run this test with `cargo xtask test privileged`")
    });
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} is not a file", p.display());
    p
}

fn tool(name: &str) -> PathBuf {
    let p = Path::new("/usr/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: `cargo xtask test privileged` installs Debian's `prometheus` \
         package (or: apt-get install prometheus)",
        p.display()
    );
    p
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// One HTTP/1.0 GET (the server closes the connection after the response, and sends
/// no chunked body); returns (status code, body).
fn http_get(
    addr: SocketAddr,
    target: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of our own: its config, its data, its process.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &BTreeMap<String, SocketAddr>) -> Prometheus {
        let rules = repo_file("deploy/prometheus/cdsync.rules.yml");
        let mut cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: cdsync\n    static_configs:\n"
        );
        for (name, addr) in targets {
            cfg += &format!(
                "      - targets: [\"{addr}\"]\n        labels:\n          daemon: {name}\n"
            );
        }
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, cfg).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, addr, log };
        p.wait_for("Prometheus ready", |p| {
            http_get(p.addr, "/-/ready", None).is_ok_and(|(c, _)| c == 200)
        });
        p
    }

    fn api(&self, path: &str) -> Value {
        let (code, body) = http_get(self.addr, path, None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}{}", self.tail()));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {code} {e}: {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {code} {v}");
        v["data"].clone()
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(expr)));
        v["result"].as_array().cloned().unwrap_or_default()
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut(&Self) -> bool) {
        let until = Instant::now() + SETTLE;
        while !ok(self) {
            assert!(
                Instant::now() < until,
                "{what}: not within {SETTLE:?}{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until `expr` returns series from exactly the daemons `want` (the
    /// `daemon` label of the scrape target), and returns them.
    fn wait_daemons(&self, expr: &str, want: &BTreeSet<String>) -> Vec<Value> {
        let mut last = Vec::new();
        self.wait_for(&format!("{expr} from {want:?}"), |p| {
            last = p.query(expr);
            last.iter().map(daemon).collect::<BTreeSet<_>>() == *want
        });
        last
    }

    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "\n--- prometheus log (last lines) ---\n{}",
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

/// The value of a query result sample, and the daemon it came from.
fn value(s: &Value) -> f64 {
    s["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn daemon(s: &Value) -> String {
    s["metric"]["daemon"].as_str().unwrap_or("?").to_owned()
}

#[test]
#[ignore = "spawns daemons and Prometheus; run by cargo xtask test privileged"]
fn prometheus_scrapes_a_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(
        3,
        &tmp.path().join("c"),
        &binary("CD_CDD"),
        &binary("CD_CDCTL"),
    );
    spec.mode = Some("realtime");
    spec.startup_timeout = Duration::from_secs(120);
    let c = Cluster::start(spec).unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let mut daemons = vec![MASTER.to_owned()];
    daemons.extend(c.nodes());
    let addrs: BTreeMap<String, SocketAddr> = daemons
        .iter()
        .map(|d| {
            (
                d.clone(),
                c.metrics_addr(d).unwrap_or_else(|e| panic!("{e:#}")),
            )
        })
        .collect();

    // Scraping from before the changes, so rates over them are defined.
    let prom = Prometheus::start(tmp.path(), &addrs);
    let all: BTreeSet<String> = daemons.iter().cloned().collect();
    let nodes: BTreeSet<String> = c.nodes().into_iter().collect();
    let targets: BTreeSet<String> = c.targets().into_iter().collect();
    prom.wait_daemons("up{job=\"cdsync\"} == 1", &all);

    // Real-time changes (latency samples, capture events), then a manual job.
    realtime::wait_capture(&c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e:#}"));
    realtime::replicated_dir(&c, "watched", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    realtime::measure_latency(&c, "watched", 5, 64 << 10, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    c.sync().unwrap_or_else(|e| panic!("{e:#}"));

    // promtool's linter on what curl gets (the classic text format), and the
    // OpenMetrics exposition Prometheus asks for ends as the format requires.
    for (d, addr) in &addrs {
        let (code, text) = http_get(*addr, "/metrics", None).unwrap();
        assert_eq!(code, 200, "{d}: {text}");
        let mut lint = Command::new(tool("promtool"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        lint.stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = lint.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on {d}'s /metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, om) = http_get(
            *addr,
            "/metrics",
            Some("application/openmetrics-text; version=1.0.0"),
        )
        .unwrap();
        assert!(om.ends_with("# EOF\n"), "{d}: {om}");
        assert_eq!(http_get(*addr, "/healthz", None).unwrap().0, 200);
        assert_eq!(http_get(*addr, "/nope", None).unwrap().0, 404);
    }
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(repo_file("deploy/prometheus/cdsync.rules.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every daemon says which build it runs.
    let info = prom.wait_daemons("cd_build_info", &all);
    for s in &info {
        assert_eq!(value(s), 1.0, "{s}");
        assert_eq!(s["metric"]["version"], cd_proto::SOFTWARE_VERSION, "{s}");
    }

    // Health: the master counts three connected nodes and none disconnected; each
    // node has its session (and only nodes have the metric).
    let master = BTreeSet::from([MASTER.to_owned()]);
    let source = BTreeSet::from([c.source().to_owned()]);
    prom.wait_daemons("cd_master_nodes{state=\"connected\"} == 3", &master);
    prom.wait_daemons("cd_master_nodes{state=\"disconnected\"} == 0", &master);
    prom.wait_daemons("cd_node_master_connected == 1", &nodes);
    prom.wait_daemons("cd_node_master_connected", &nodes);

    // Jobs on the master: the manual job succeeded, none running, none failed.
    prom.wait_daemons("cd_jobs_total{state=\"ok\"} >= 1", &master);
    prom.wait_daemons("cd_jobs_total{state=\"failed\"} == 0", &master);
    prom.wait_daemons("cd_jobs_running == 0", &master);

    // Transfer: the source sent to its group's head (node2: all three are in the
    // default group, and the head is chosen by weight, then name), which forwarded to
    // node3; both sent over a named record layer and the same-group link class, and
    // both targets received.
    let senders = BTreeSet::from([c.source().to_owned(), "node2".to_owned()]);
    let layer = |s: &Value| {
        assert_eq!(s["metric"]["class"], "same_group", "{s}");
        assert!(
            ["ktls", "rustls", "plain"].contains(&s["metric"]["path"].as_str().unwrap_or("")),
            "{s}"
        );
    };
    prom.wait_daemons("cd_transfer_sent_bytes_total > 0", &senders)
        .iter()
        .for_each(layer);
    prom.wait_daemons("cd_transfer_received_bytes_total > 0", &targets)
        .iter()
        .for_each(layer);
    for m in ["cd_transfer_wire_bytes_total", "cd_transfer_files_total"] {
        prom.wait_daemons(&format!("{m}{{class=\"same_group\"}} > 0"), &senders);
    }
    prom.wait_daemons(
        "cd_transfer_links_total{path=~\"ktls|rustls|plain\"} > 0",
        &senders,
    );
    prom.wait_daemons("cd_delta_saved_bytes_total{class=\"same_group\"}", &senders);

    // Capture and latency: events from the source's kernel backend; a latency sample
    // per target and real-time batch (five samples, two targets), with quantiles.
    let ev = prom.wait_daemons("cd_capture_events_total > 0", &source);
    assert!(
        ev.iter()
            .all(|s| ["ebpf", "fanotify"].contains(&s["metric"]["backend"].as_str().unwrap_or(""))),
        "{ev:?}"
    );
    prom.wait_daemons(
        "cd_capture_events_dropped_total{backend=~\"ebpf|fanotify\"}",
        &source,
    );
    prom.wait_daemons(
        "cd_sync_change_to_replica_latency_seconds_count >= 10",
        &source,
    );
    prom.wait_daemons(
        "histogram_quantile(0.99, sum by (daemon, le) (rate(cd_sync_change_to_replica_latency_seconds_bucket[5m]))) > 0",
        &source,
    );
    prom.wait_daemons("cd_queue_depth{queue=\"coalescer\"}", &source);
    prom.wait_daemons("cd_queue_depth{queue=\"capture\"}", &source);
    let own = &c.status(c.source()).unwrap()["latency"];
    assert!(own["count"].as_u64().is_some_and(|n| n >= 10), "{own}");
    assert!(own["p99_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{own}");

    // The server monitor's gauges, on every node.
    prom.wait_daemons("cd_monitor_load1 >= 0", &nodes);
    prom.wait_daemons(
        "cd_monitor_disk_used_ratio{content_set=\"www\"} > 0",
        &nodes,
    );

    // Labels: only the low-cardinality ones, on every cd_ series.
    for s in prom.query("{__name__=~\"cd_.+\"}") {
        for k in s["metric"].as_object().unwrap().keys() {
            assert!(
                ["__name__", "instance", "job", "daemon"].contains(&k.as_str())
                    || LABELS.contains(&k.as_str()),
                "unexpected label `{k}` on {s}"
            );
        }
    }

    // The shipped rules are loaded and evaluate cleanly; none fires on a healthy cluster.
    prom.wait_for("rules evaluated", |p| {
        let groups = p.api("/api/v1/rules")["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.len() >= 9 && rules.iter().all(|r| r["health"] == "ok")
    });
    let firing: Vec<Value> = prom.api("/api/v1/alerts")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );

    // Every query of the Grafana dashboard is valid PromQL over these metrics.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/cdsync-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push((
                p["title"].as_str().unwrap_or("?").to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");
    for (title, e) in exprs {
        let e = e
            .replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$instance", ".*");
        let path = format!("/api/v1/query?query={}", urlencode(&e));
        let (code, body) = http_get(prom.addr, &path, None).unwrap();
        assert!(
            code == 200 && body.contains("\"status\":\"success\""),
            "dashboard panel `{title}`: {e}: {code} {body}"
        );
    }
}
