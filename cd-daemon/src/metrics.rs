//! Prometheus metrics of one daemon, served on `/metrics` (see [`http`]).
//!
//! Every metric is named `cd_<subsystem>_<name>_<unit>[_total]` and carries only
//! labels with a small, fixed set of values (backend, link class, record layer,
//! job state, queue name): never a path, a job id or a node name, so a farm of any
//! size exposes the same few series per daemon.
//!
//! **One process-global [`Metrics`]** ([`get`]), not an `Arc` threaded through the
//! roles: the counters are bumped from the capture reader, the transfer code, the
//! node's real-time loop and the master's job dispatch, and a global keeps each of
//! those sites a one-line call instead of a constructor argument in every module. A
//! process runs one daemon; what differs by role is which metrics are *exposed*:
//! [`Metrics::registry`] registers the node's metrics only where the node role runs
//! and the master's only where the master does (a master-only daemon must not show
//! `cd_node_master_connected 0` and set off the "node disconnected" alert).
//!
//! Counters are bumped where things happen. Gauges that mirror state held elsewhere
//! (connected nodes, the capture queue, kernel drop counters) are sampled when
//! `/metrics` is scraped ([`refresh`]), so nothing runs between scrapes.
//!
//! Besides the Prometheus histogram, change-to-replica latencies go into an
//! [`hdrhistogram`] (microseconds, 3 significant digits) whose quantiles
//! `cdctl status` shows ([`Metrics::latency_json`]): exact percentiles since start,
//! where Prometheus gives bucketed rates.

pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cd_proto::pb;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::link::LinkPath;
use crate::realtime::CaptureService;

/// A label set of one label; values are `&'static str` so none can be a path.
type L1 = [(&'static str, &'static str); 1];
type L2 = [(&'static str, &'static str); 2];

/// The monitor's values exported as `cd_monitor_<metric>` gauges, with their help.
const MONITOR_GAUGES: [(crate::config::Metric, &str); 6] = {
    use crate::config::Metric;
    [
        (
            Metric::Load1,
            "1-minute load average of this node (server monitor)",
        ),
        (
            Metric::Load5,
            "5-minute load average of this node (server monitor)",
        ),
        (
            Metric::Load15,
            "15-minute load average of this node (server monitor)",
        ),
        (
            Metric::CpuBusyRatio,
            "Busy share (0..1) of all CPUs between the last two monitor samples",
        ),
        (
            Metric::MemoryUsedRatio,
            "1 - MemAvailable/MemTotal of this node (server monitor)",
        ),
        (
            Metric::Sessions,
            "Established TCP connections on the service ports (server monitor)",
        ),
    ]
};

/// Upper bound of the latencies the hdrhistogram tracks (longer ones are clamped).
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// All metrics of the process. See the module docs.
#[derive(Debug)]
pub struct Metrics {
    pub capture_events: Family<L1, Counter>,
    pub capture_dropped: Family<L1, Counter>,
    pub capture_rescans: Family<L1, Counter>,
    latency: Histogram,
    latency_hdr: Mutex<hdrhistogram::Histogram<u64>>,
    sent_bytes: Family<L2, Counter>,
    received_bytes: Family<L2, Counter>,
    wire_bytes: Family<L1, Counter>,
    delta_saved_bytes: Family<L1, Counter>,
    files: Family<L1, Counter>,
    links: Family<L1, Counter>,
    jobs: Family<L1, Counter>,
    jobs_running: Gauge,
    queue_depth: Family<L1, Gauge>,
    master_nodes: Family<L1, Gauge>,
    node_master_connected: Gauge,
    /// The node monitor's newest sample: `cd_monitor_<metric>` per value.
    monitor: Vec<(crate::config::Metric, Gauge<f64, AtomicU64>)>,
    /// The used share of each content root's file system (label: the content set,
    /// a name from the node's config).
    monitor_disk: Family<[(&'static str, String); 1], Gauge<f64, AtomicU64>>,
    build_info: Family<L1, Gauge>,
    /// The node's capture service, sampled at scrape time (queue depth, drops).
    capture: Mutex<Option<Weak<CaptureService>>>,
    /// The capture backend's cumulative loss counter as last added to `capture_dropped`.
    capture_lost_seen: AtomicU64,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Which roles' metrics a registry exposes.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    pub master: bool,
    pub node: bool,
}

/// The link class of a transfer to or from `peer`, for the `class` label:
/// `same_group`, `same_region`, `international` (as the master's route table gives
/// it), or `unclassified` when the peer's class is not known (e.g. a transfer from
/// the source to a node whose parent is a relay).
pub fn link_class_label(peer: &pb::Peer) -> &'static str {
    match peer.link_class.as_str() {
        "same_group" => "same_group",
        "same_region" => "same_region",
        "international" => "international",
        _ => "unclassified",
    }
}

impl Metrics {
    fn new() -> Self {
        let build_info = Family::<L1, Gauge>::default();
        build_info
            .get_or_create(&[("version", cd_proto::SOFTWARE_VERSION)])
            .set(1);
        Metrics {
            capture_events: Family::default(),
            capture_dropped: Family::default(),
            capture_rescans: Family::default(),
            // 1 ms .. ~131 s.
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            latency_hdr: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
                    .expect("valid hdrhistogram bounds"),
            ),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            wire_bytes: Family::default(),
            delta_saved_bytes: Family::default(),
            files: Family::default(),
            links: Family::default(),
            jobs: Family::default(),
            jobs_running: Gauge::default(),
            queue_depth: Family::default(),
            master_nodes: Family::default(),
            node_master_connected: Gauge::default(),
            monitor: MONITOR_GAUGES
                .iter()
                .map(|(m, _)| (*m, Gauge::default()))
                .collect(),
            monitor_disk: Family::default(),
            build_info,
            capture: Mutex::new(None),
            capture_lost_seen: AtomicU64::new(0),
        }
    }

    /// A registry exposing the metrics of `roles` (the handles are shared: a registry
    /// built later sees the same values).
    pub fn registry(&self, roles: Roles) -> Registry {
        let mut r = Registry::default();
        r.register(
            "cd_build_info",
            "Build of this daemon (value 1; the version is in the label)",
            self.build_info.clone(),
        );
        if roles.node {
            for scope in ["subtree", "full"] {
                let _ = self.capture_rescans.get_or_create(&[("scope", scope)]);
            }
            r.register(
                "cd_capture_events",
                "File-system events read from the kernel capture backend",
                self.capture_events.clone(),
            );
            r.register(
                "cd_capture_events_dropped",
                "Capture events lost (kernel buffer overrun or a full per-set queue); each loss triggers a rescan",
                self.capture_dropped.clone(),
            );
            r.register(
                "cd_capture_rescans",
                "Rescans because events were lost, by scope (subtree or full tree)",
                self.capture_rescans.clone(),
            );
            r.register_with_unit(
                "cd_sync_change_to_replica_latency",
                "Time from a change batch being cut at the source to a replica's apply result for it, per target",
                Unit::Seconds,
                self.latency.clone(),
            );
            r.register_with_unit(
                "cd_transfer_sent",
                "File content bytes sent to replicas, by link class and record layer",
                Unit::Bytes,
                self.sent_bytes.clone(),
            );
            r.register_with_unit(
                "cd_transfer_received",
                "File content bytes received from sources, by link class and record layer",
                Unit::Bytes,
                self.received_bytes.clone(),
            );
            r.register_with_unit(
                "cd_transfer_wire",
                "Bytes of file data put on the wire (after delta and compression), by link class",
                Unit::Bytes,
                self.wire_bytes.clone(),
            );
            r.register_with_unit(
                "cd_delta_saved",
                "Bytes deltas did not have to send (delta file content minus patch size), by link class",
                Unit::Bytes,
                self.delta_saved_bytes.clone(),
            );
            r.register(
                "cd_transfer_files",
                "Files sent to replicas, by link class",
                self.files.clone(),
            );
            r.register(
                "cd_transfer_links",
                "Transfer connections opened, by record layer (ktls, rustls, plain)",
                self.links.clone(),
            );
            r.register(
                "cd_queue_depth",
                "Items waiting in an internal queue (capture: event batches; coalescer: paths)",
                self.queue_depth.clone(),
            );
            r.register(
                "cd_node_master_connected",
                "1 while this node has a session with the master",
                self.node_master_connected.clone(),
            );
            for ((m, g), (_, help)) in self.monitor.iter().zip(MONITOR_GAUGES) {
                r.register(format!("cd_monitor_{}", m.as_str()), help, g.clone());
            }
            r.register(
                "cd_monitor_disk_used_ratio",
                "Used share (0..1) of each content root's file system, by content set",
                self.monitor_disk.clone(),
            );
        }
        if roles.master {
            for state in ["ok", "failed"] {
                let _ = self.jobs.get_or_create(&[("state", state)]);
            }
            r.register(
                "cd_jobs",
                "Sync jobs finished, by outcome",
                self.jobs.clone(),
            );
            r.register(
                "cd_jobs_running",
                "Sync jobs dispatched and not yet reported",
                self.jobs_running.clone(),
            );
            r.register(
                "cd_master_nodes",
                "Nodes known to the master, by session state",
                self.master_nodes.clone(),
            );
        }
        r
    }

    /// The node's monitor took `sample`: its values become the `cd_monitor` gauges
    /// (a value it could not read keeps its previous one).
    pub fn record_sample(&self, sample: &pb::MonitorSample) {
        for (m, g) in &self.monitor {
            if let Some(v) = crate::monitor::metric_value(sample, *m) {
                g.set(v);
            }
        }
        for d in &sample.disks {
            self.monitor_disk
                .get_or_create(&[("content_set", d.content_set.clone())])
                .set(d.used_ratio);
        }
    }

    /// A change batch reached one replica, `took` after it was cut.
    pub fn observe_latency(&self, took: Duration) {
        self.latency.observe(took.as_secs_f64());
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latency_hdr.lock().unwrap().saturating_record(us);
    }

    /// For `cdctl status`: the latency quantiles since start, in milliseconds.
    pub fn latency_json(&self) -> serde_json::Value {
        let h = self.latency_hdr.lock().unwrap();
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return serde_json::json!({"count": 0, "p50_ms": null, "p90_ms": null, "p99_ms": null, "max_ms": null});
        }
        serde_json::json!({
            "count": h.len(),
            "p50_ms": ms(h.value_at_quantile(0.50)),
            "p90_ms": ms(h.value_at_quantile(0.90)),
            "p99_ms": ms(h.value_at_quantile(0.99)),
            "max_ms": ms(h.max()),
        })
    }

    /// A source's transfer link to `peer` (record layer `path`) is done: counts the
    /// link, and what it carried when the transfer succeeded (`st`).
    pub fn record_send(
        &self,
        peer: &pb::Peer,
        path: Option<LinkPath>,
        st: Option<&crate::transfer::SendStats>,
    ) {
        let path = path.map_or("rustls", LinkPath::as_str);
        self.links.get_or_create(&[("path", path)]).inc();
        let Some(st) = st else { return };
        let class = link_class_label(peer);
        self.sent_bytes
            .get_or_create(&[("class", class), ("path", path)])
            .inc_by(st.bytes_sent);
        self.wire_bytes
            .get_or_create(&[("class", class)])
            .inc_by(st.wire_bytes);
        self.delta_saved_bytes
            .get_or_create(&[("class", class)])
            .inc_by(st.delta_bytes.saturating_sub(st.patch_bytes));
        self.files
            .get_or_create(&[("class", class)])
            .inc_by(st.files_sent);
    }

    /// A replica received a change set from `peer` over a link of `path`.
    pub fn record_receive(&self, peer: &pb::Peer, path: Option<LinkPath>, fetched_bytes: u64) {
        let class = link_class_label(peer);
        let path = path.map_or("rustls", LinkPath::as_str);
        self.received_bytes
            .get_or_create(&[("class", class), ("path", path)])
            .inc_by(fetched_bytes);
    }

    /// Rescans because events were lost: `scope` is `"subtree"` or `"full"`.
    pub fn rescans(&self, scope: &'static str, n: u64) {
        self.capture_rescans
            .get_or_create(&[("scope", scope)])
            .inc_by(n);
    }

    /// A job was dispatched; the guard counts it as running until it is finished
    /// (and as failed if it is dropped unfinished).
    pub fn job_started(&'static self) -> JobGuard {
        self.jobs_running.inc();
        JobGuard {
            metrics: self,
            done: false,
        }
    }

    /// Lets the scrape sample `svc` (queue depth, kernel drop counter); its backend's
    /// counters start at 0 (so `increase()` sees the first event and the first loss).
    pub fn watch_capture(&self, svc: &std::sync::Arc<CaptureService>) {
        let backend = [("backend", svc.kind)];
        let _ = self.capture_events.get_or_create(&backend);
        let _ = self.capture_dropped.get_or_create(&backend);
        *self.capture.lock().unwrap() = Some(std::sync::Arc::downgrade(svc));
    }

    fn refresh_capture(&self) {
        let Some(svc) = self
            .capture
            .lock()
            .unwrap()
            .as_ref()
            .and_then(Weak::upgrade)
        else {
            return;
        };
        self.queue_depth
            .get_or_create(&[("queue", "capture")])
            .set(svc.queue_depth() as i64);
        let lost = svc.lost_count();
        let seen = self.capture_lost_seen.fetch_max(lost, Ordering::Relaxed);
        if lost > seen {
            self.capture_dropped
                .get_or_create(&[("backend", svc.kind)])
                .inc_by(lost - seen);
        }
    }
}

/// A running job (see [`Metrics::job_started`]).
#[derive(Debug)]
pub struct JobGuard {
    metrics: &'static Metrics,
    done: bool,
}

impl JobGuard {
    pub fn finish(mut self, ok: bool) {
        self.done = true;
        self.count(ok);
    }

    fn count(&self, ok: bool) {
        self.metrics.jobs_running.dec();
        let state = if ok { "ok" } else { "failed" };
        self.metrics.jobs.get_or_create(&[("state", state)]).inc();
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.done {
            self.count(false);
        }
    }
}

/// One owner's share of a `cd_queue_depth` gauge: several content sets each have a
/// coalescer, and the gauge is their sum. Dropping it takes its share back out.
#[derive(Debug)]
pub struct Depth {
    gauge: Gauge,
    last: i64,
}

impl Depth {
    pub fn new(queue: &'static str) -> Self {
        Depth {
            gauge: get().queue_depth.get_or_create_owned(&[("queue", queue)]),
            last: 0,
        }
    }

    pub fn set(&mut self, depth: usize) {
        let d = i64::try_from(depth).unwrap_or(i64::MAX);
        if d != self.last {
            self.gauge.inc_by(d - self.last);
            self.last = d;
        }
    }
}

impl Drop for Depth {
    fn drop(&mut self) {
        self.gauge.dec_by(self.last);
    }
}

/// Samples the gauges that mirror state held by the roles (see the module docs).
pub fn refresh(daemon: &crate::Daemon) {
    let m = get();
    if let Some(master) = &daemon.master {
        let status = master.status();
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        let up = nodes.iter().filter(|n| n["connected"] == true).count() as i64;
        m.master_nodes
            .get_or_create(&[("state", "connected")])
            .set(up);
        m.master_nodes
            .get_or_create(&[("state", "disconnected")])
            .set(nodes.len() as i64 - up);
    }
    if let Some(node) = &daemon.node {
        let status = node.status();
        m.node_master_connected
            .set(i64::from(status["master_connected"] == true));
        m.refresh_capture();
    }
}

/// The registry's metrics as text: OpenMetrics 1.0 (what Prometheus asks for), or
/// the classic Prometheus text format 0.0.4 (what `curl` and `promtool check
/// metrics` get).
pub fn encode(registry: &Registry, openmetrics: bool) -> String {
    let mut om = String::new();
    // Writing to a String cannot fail; an error would be a bug in the encoder.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut om, registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    if openmetrics {
        om
    } else {
        openmetrics_to_prometheus(&om)
    }
}

/// OpenMetrics text → Prometheus text 0.0.4: a counter family `x` is announced as
/// `x_total` (the sample's name), and the `# UNIT` and `# EOF` lines go (the classic
/// format has neither). Everything else is the same in both formats.
fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// When a change batch was cut (the coalescer's `poll_batch` returned it), for the
/// latency of each target that applies it.
#[derive(Debug, Clone, Copy)]
pub struct Cut(pub Instant);

impl Cut {
    pub fn now() -> Self {
        Cut(Instant::now())
    }

    /// One target applied the batch.
    pub fn reached(self) {
        get().observe_latency(self.0.elapsed());
    }

    /// The batch went out as (part of) a full round: every target of `report` that
    /// applied it.
    pub fn reached_all(self, report: &pb::JobReport) {
        let took = self.0.elapsed();
        for _ in report.targets.iter().filter(|t| t.ok) {
            get().observe_latency(took);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_labels() {
        let m = Metrics::new();
        m.capture_events
            .get_or_create(&[("backend", "fanotify")])
            .inc_by(3);
        m.record_send(
            &pb::Peer::default(),
            Some(LinkPath::Rustls),
            Some(&crate::transfer::SendStats {
                files_sent: 2,
                bytes_sent: 100,
                wire_bytes: 40,
                delta_bytes: 80,
                patch_bytes: 10,
                ..Default::default()
            }),
        );
        m.observe_latency(Duration::from_millis(5));
        m.record_sample(&pb::MonitorSample {
            load1: 2.5,
            sessions: 7,
            disks: vec![pb::DiskSample {
                content_set: "www".into(),
                used_ratio: 0.25,
                available_bytes: 1,
            }],
            unavailable: vec!["cpu_busy_ratio: first".into()],
            ..Default::default()
        });
        let reg = m.registry(Roles {
            master: false,
            node: true,
        });
        let om = encode(&reg, true);
        for want in [
            "cd_capture_events_total{backend=\"fanotify\"} 3",
            "cd_transfer_sent_bytes_total{class=\"unclassified\",path=\"rustls\"} 100",
            "cd_transfer_wire_bytes_total{class=\"unclassified\"} 40",
            "cd_delta_saved_bytes_total{class=\"unclassified\"} 70",
            "cd_transfer_files_total{class=\"unclassified\"} 2",
            "cd_transfer_links_total{path=\"rustls\"} 1",
            "cd_sync_change_to_replica_latency_seconds_count 1",
            "cd_monitor_load1 2.5",
            "cd_monitor_sessions 7.0",
            "cd_monitor_disk_used_ratio{content_set=\"www\"} 0.25",
            "cd_build_info{version=",
            "# EOF",
        ] {
            assert!(om.contains(want), "missing {want:?} in\n{om}");
        }
        assert!(!om.contains("cd_jobs"), "master metrics on a node:\n{om}");
        assert!(
            om.contains("cd_monitor_cpu_busy_ratio 0.0"),
            "not measured yet:\n{om}"
        );
        let text = encode(&reg, false);
        assert!(text.contains("# TYPE cd_capture_events_total counter\n"));
        assert!(text.contains("# HELP cd_capture_events_total "));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert_eq!(m.latency_json()["count"], 1);
        let p50 = m.latency_json()["p50_ms"].as_f64().unwrap();
        assert!((4.99..=5.01).contains(&p50), "{p50}");
    }

    #[test]
    fn jobs_and_depth_gauges() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let a = m.job_started();
        let b = m.job_started();
        assert_eq!(m.jobs_running.get(), 2);
        a.finish(true);
        drop(b);
        assert_eq!(m.jobs_running.get(), 0);
        assert_eq!(m.jobs.get_or_create(&[("state", "ok")]).get(), 1);
        assert_eq!(m.jobs.get_or_create(&[("state", "failed")]).get(), 1);
        let reg = m.registry(Roles {
            master: true,
            node: false,
        });
        let om = encode(&reg, true);
        assert!(om.contains("cd_jobs_total{state=\"failed\"} 1"), "{om}");
        assert!(!om.contains("cd_node_master_connected"), "{om}");
    }

    #[test]
    fn depth_shares_add_up_and_leave() {
        let g = get().queue_depth.get_or_create_owned(&[("queue", "test")]);
        let mut a = Depth::new("test");
        let mut b = Depth::new("test");
        a.set(3);
        b.set(4);
        assert_eq!(g.get(), 7);
        a.set(1);
        assert_eq!(g.get(), 5);
        drop(b);
        assert_eq!(g.get(), 1);
        drop(a);
        assert_eq!(g.get(), 0);
    }
}
