//! The master's view of every node's health: the newest monitor sample, the thresholds
//! of `[master.monitor]` with their hysteresis, and the checks the master runs
//! (agent silence, TCP connects to the service ports, ICMP echo).
//!
//! Sans-IO: the master feeds it samples, check results and the clock, and gets back
//! [`Change`]s (a threshold fired or cleared, a check failed or recovered), which it
//! turns into alerts and, for thresholds with `action = "route_around"` and for every
//! failing check, into a degraded node in the routing farm.

use std::collections::BTreeMap;
use std::time::Instant;

use cd_proto::pb;
use serde_json::{Value, json};

use crate::config::{Metric, MonitorConfig, Threshold, ThresholdAction};
use crate::monitor::{Crossing, Hysteresis, metric_value};

/// A node with no sample for this many intervals fails the `silence` check.
pub const SILENT_INTERVALS: u32 = 3;

/// What changed about a node's health.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Threshold {
        node: String,
        threshold: Threshold,
        firing: bool,
        /// The value that crossed (`None`: cleared because the node went away).
        value: Option<f64>,
    },
    Check {
        node: String,
        /// `silence`, `tcp:PORT`, `icmp`.
        check: String,
        failing: bool,
        detail: String,
    },
}

impl Change {
    pub fn node(&self) -> &str {
        match self {
            Change::Threshold { node, .. } | Change::Check { node, .. } => node,
        }
    }

    /// The farm's degraded cause this change sets or clears, if it routes.
    pub fn cause(&self) -> Option<String> {
        match self {
            Change::Threshold { threshold, .. }
                if threshold.action == ThresholdAction::RouteAround =>
            {
                Some(format!("threshold:{}", threshold.metric.as_str()))
            }
            Change::Threshold { .. } => None,
            Change::Check { check, .. } => Some(format!("check:{check}")),
        }
    }
}

#[derive(Debug, Clone)]
struct CheckState {
    failing: bool,
    detail: String,
    since_unix_ms: i64,
}

#[derive(Debug)]
struct NodeHealth {
    group: String,
    connected: Instant,
    /// When the newest sample came, its sending time, and the sample.
    last: Option<(Instant, i64, pb::MonitorSample)>,
    /// The node sends samples (it said so at registration; an older cdd does not,
    /// and is then never judged silent: its heartbeats still prove it alive).
    samples: bool,
    thresholds: Vec<(Threshold, Hysteresis)>,
    checks: BTreeMap<String, CheckState>,
}

/// See the module docs.
#[derive(Debug)]
pub struct HealthBook {
    cfg: MonitorConfig,
    nodes: BTreeMap<String, NodeHealth>,
}

/// The thresholds that apply to a server of `group`: the group's own, and the
/// farm-wide ones of the metrics the group has none for.
pub fn thresholds_for(cfg: &MonitorConfig, group: &str) -> Vec<Threshold> {
    let own = |m: Metric| {
        cfg.thresholds
            .iter()
            .any(|t| t.metric == m && t.group.as_deref() == Some(group))
    };
    cfg.thresholds
        .iter()
        .filter(|t| match &t.group {
            Some(g) => g == group,
            None => !own(t.metric),
        })
        .cloned()
        .collect()
}

impl HealthBook {
    pub fn new(cfg: MonitorConfig) -> Self {
        HealthBook {
            cfg,
            nodes: BTreeMap::new(),
        }
    }

    /// `node` (of `group`) opened a control session: judged afresh from now.
    /// `samples`: whether it sends monitor samples at all.
    pub fn connected(&mut self, node: &str, group: &str, samples: bool, now: Instant) {
        let thresholds = thresholds_for(&self.cfg, group)
            .into_iter()
            .map(|t| {
                let h = Hysteresis::new(t.above, t.clear_below, t.for_samples);
                (t, h)
            })
            .collect();
        self.nodes.insert(
            node.to_owned(),
            NodeHealth {
                group: group.to_owned(),
                connected: now,
                last: None,
                samples,
                thresholds,
                checks: BTreeMap::new(),
            },
        );
    }

    /// `node`'s session ended: everything firing about it is resolved (it is down,
    /// which is an alert of its own).
    pub fn disconnected(&mut self, node: &str) -> Vec<Change> {
        let Some(n) = self.nodes.remove(node) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (t, h) in n.thresholds {
            if h.is_firing() {
                out.push(Change::Threshold {
                    node: node.to_owned(),
                    threshold: t,
                    firing: false,
                    value: None,
                });
            }
        }
        for (check, st) in n.checks {
            if st.failing {
                out.push(Change::Check {
                    node: node.to_owned(),
                    check,
                    failing: false,
                    detail: "node disconnected; no longer checked".into(),
                });
            }
        }
        out
    }

    /// A sample from `node` (sent at `unix_ms`).
    pub fn sample(
        &mut self,
        node: &str,
        unix_ms: i64,
        sample: pb::MonitorSample,
        now: Instant,
    ) -> Vec<Change> {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (t, h) in &mut n.thresholds {
            let Some(v) = metric_value(&sample, t.metric) else {
                continue;
            };
            if let Some(c) = h.observe(v) {
                out.push(Change::Threshold {
                    node: node.to_owned(),
                    threshold: t.clone(),
                    firing: c == Crossing::Fired,
                    value: Some(v),
                });
            }
        }
        n.last = Some((now, unix_ms, sample));
        out.extend(set_check(n, node, "silence", Ok(()), unix_ms));
        out
    }

    /// The result of check `check` (`tcp:PORT`, `icmp`) of `node`.
    pub fn check(
        &mut self,
        node: &str,
        check: &str,
        result: Result<String, String>,
        unix_ms: i64,
    ) -> Vec<Change> {
        match self.nodes.get_mut(node) {
            Some(n) => set_check(n, node, check, result.map(|_| ()), unix_ms)
                .into_iter()
                .collect(),
            None => Vec::new(),
        }
    }

    /// Runs the silence check of every node at `now`.
    pub fn silence(&mut self, now: Instant, unix_ms: i64) -> Vec<Change> {
        let limit = self.cfg.interval * SILENT_INTERVALS;
        let mut out = Vec::new();
        for (name, n) in self.nodes.iter_mut().filter(|(_, n)| n.samples) {
            let since = n.last.as_ref().map_or(n.connected, |l| l.0);
            let quiet = now.saturating_duration_since(since);
            if quiet > limit {
                let what = if n.last.is_some() {
                    "no monitor sample"
                } else {
                    "no monitor sample since it connected"
                };
                out.extend(set_check(
                    n,
                    name,
                    "silence",
                    Err(format!(
                        "{what} for {:.1}s (limit {SILENT_INTERVALS} intervals of {:?})",
                        quiet.as_secs_f64(),
                        self.cfg.interval
                    )),
                    unix_ms,
                ));
            }
        }
        out
    }

    /// Nodes being monitored.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// `cdctl health`: the newest sample, thresholds and checks of `node` (or all).
    pub fn json(&self, node: Option<&str>, now: Instant) -> Vec<Value> {
        self.nodes
            .iter()
            .filter(|(name, _)| node.is_none_or(|x| x == name.as_str()))
            .map(|(name, n)| {
                let sample = n.last.as_ref().map(|(at, unix_ms, s)| {
                    let mut v = sample_json(s);
                    v["unix_ms"] = json!(unix_ms);
                    v["age_ms"] = json!(now.saturating_duration_since(*at).as_millis() as u64);
                    v
                });
                json!({
                    "node": name,
                    "group": n.group,
                    "monitored": n.samples,
                    "sample": sample,
                    "thresholds": n.thresholds.iter().map(|(t, h)| json!({
                        "metric": t.metric.as_str(), "above": t.above,
                        "clear_below": t.clear_below, "for_samples": t.for_samples,
                        "action": t.action, "firing": h.is_firing(),
                        "value": n.last.as_ref().and_then(|l| metric_value(&l.2, t.metric)),
                    })).collect::<Vec<_>>(),
                    "checks": n.checks.iter().map(|(c, st)| json!({
                        "check": c, "ok": !st.failing, "detail": st.detail,
                        "since_unix_ms": st.since_unix_ms,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

/// Records a check result; a change when it flips (a first result counts as a flip
/// only when it fails).
fn set_check(
    n: &mut NodeHealth,
    node: &str,
    check: &str,
    result: Result<(), String>,
    unix_ms: i64,
) -> Option<Change> {
    let failing = result.is_err();
    let detail = match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => e,
    };
    let prev = n.checks.get(check).map(|s| s.failing);
    let entry = n.checks.entry(check.to_owned()).or_insert(CheckState {
        failing,
        detail: detail.clone(),
        since_unix_ms: unix_ms,
    });
    if prev != Some(failing) {
        entry.since_unix_ms = unix_ms;
    }
    entry.failing = failing;
    entry.detail = detail.clone();
    let flipped = match prev {
        None => failing,
        Some(p) => p != failing,
    };
    flipped.then(|| Change::Check {
        node: node.to_owned(),
        check: check.to_owned(),
        failing,
        detail,
    })
}

/// A sample as JSON (`cdctl health`, the job log's history).
pub fn sample_json(s: &pb::MonitorSample) -> Value {
    json!({
        "cpu_busy_ratio": metric_value(s, Metric::CpuBusyRatio),
        "memory_used_ratio": metric_value(s, Metric::MemoryUsedRatio),
        "load1": metric_value(s, Metric::Load1),
        "load5": metric_value(s, Metric::Load5),
        "load15": metric_value(s, Metric::Load15),
        "sessions": metric_value(s, Metric::Sessions),
        "disks": s.disks.iter().map(|d| json!({
            "content_set": d.content_set, "used_ratio": d.used_ratio,
            "available_bytes": d.available_bytes,
        })).collect::<Vec<_>>(),
        "unavailable": s.unavailable,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> MonitorConfig {
        let t = |group: Option<&str>, metric, above, clear_below, action| Threshold {
            group: group.map(str::to_owned),
            metric,
            above,
            clear_below,
            for_samples: 1,
            action,
        };
        MonitorConfig {
            interval: Duration::from_millis(100),
            thresholds: vec![
                t(None, Metric::Load1, 8.0, 6.0, ThresholdAction::Alert),
                t(
                    Some("web"),
                    Metric::Load1,
                    4.0,
                    2.0,
                    ThresholdAction::RouteAround,
                ),
                t(
                    None,
                    Metric::DiskUsedRatio,
                    0.9,
                    0.8,
                    ThresholdAction::Alert,
                ),
            ],
            ..MonitorConfig::default()
        }
    }

    fn load(v: f64) -> pb::MonitorSample {
        pb::MonitorSample {
            load1: v,
            ..Default::default()
        }
    }

    #[test]
    fn a_groups_thresholds_replace_the_farm_wide_ones_of_their_metric() {
        let c = cfg();
        let web = thresholds_for(&c, "web");
        assert_eq!(web.len(), 2);
        assert!(
            web.iter()
                .any(|t| t.metric == Metric::Load1 && t.above == 4.0)
        );
        assert!(web.iter().any(|t| t.metric == Metric::DiskUsedRatio));
        let db = thresholds_for(&c, "db");
        assert!(
            db.iter()
                .any(|t| t.metric == Metric::Load1 && t.above == 8.0)
        );
        assert!(!db.iter().any(|t| t.above == 4.0));
    }

    #[test]
    fn samples_cross_thresholds_with_hysteresis() {
        let mut b = HealthBook::new(cfg());
        let t0 = Instant::now();
        b.connected("n2", "web", true, t0);
        b.connected("n3", "db", true, t0);
        assert!(b.sample("n2", 1, load(3.0), t0).is_empty());
        let c = b.sample("n2", 2, load(5.0), t0);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(matches!(
            &c[0],
            Change::Threshold {
                firing: true,
                value: Some(5.0),
                ..
            }
        ));
        assert_eq!(c[0].cause().as_deref(), Some("threshold:load1"));
        // The db group's threshold is 8, and only alerts.
        assert!(b.sample("n3", 2, load(5.0), t0).is_empty());
        let c = b.sample("n3", 3, load(9.0), t0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].cause(), None);
        assert!(
            b.sample("n2", 3, load(3.0), t0).is_empty(),
            "above clear_below"
        );
        let c = b.sample("n2", 4, load(1.0), t0);
        assert!(
            matches!(&c[0], Change::Threshold { firing: false, .. }),
            "{c:?}"
        );
        // Metrics the node could not read leave the state as it is.
        let mut s = load(0.0);
        s.unavailable.push("load1: gone".into());
        assert!(b.sample("n3", 5, s, t0).is_empty());
        let gone = b.disconnected("n3");
        assert!(matches!(
            &gone[0],
            Change::Threshold {
                firing: false,
                value: None,
                ..
            }
        ));
        assert!(b.sample("n3", 6, load(9.0), t0).is_empty(), "not monitored");
    }

    #[test]
    fn a_node_without_a_monitor_is_never_silent() {
        // An older cdd: it registers without `monitor` and never sends a sample.
        let mut b = HealthBook::new(cfg());
        let t0 = Instant::now();
        b.connected("n2", "web", false, t0);
        assert!(b.silence(t0 + Duration::from_secs(3600), 0).is_empty());
        assert_eq!(b.json(Some("n2"), t0)[0]["monitored"], false);
        // Its port checks still count.
        let c = b.check("n2", "tcp:80", Err("refused".into()), 2);
        assert!(
            matches!(&c[0], Change::Check { failing: true, .. }),
            "{c:?}"
        );
    }

    #[test]
    fn silence_and_checks_flip_once_each_way() {
        let mut b = HealthBook::new(cfg());
        let t0 = Instant::now();
        b.connected("n2", "web", true, t0);
        assert!(b.silence(t0 + Duration::from_millis(250), 0).is_empty());
        let c = b.silence(t0 + Duration::from_millis(350), 0);
        assert!(
            matches!(&c[0], Change::Check { check, failing: true, .. } if check == "silence"),
            "{c:?}"
        );
        assert_eq!(c[0].cause().as_deref(), Some("check:silence"));
        assert!(
            b.silence(t0 + Duration::from_millis(450), 0).is_empty(),
            "once"
        );
        let c = b.sample("n2", 1, load(1.0), t0 + Duration::from_millis(500));
        assert!(
            matches!(&c[0], Change::Check { failing: false, .. }),
            "{c:?}"
        );
        assert!(b.silence(t0 + Duration::from_millis(700), 0).is_empty());

        assert!(
            b.check("n2", "tcp:80", Ok("connected".into()), 1)
                .is_empty()
        );
        let c = b.check("n2", "tcp:80", Err("refused".into()), 2);
        assert!(
            matches!(&c[0], Change::Check { failing: true, detail, .. } if detail == "refused")
        );
        assert!(b.check("n2", "tcp:80", Err("refused".into()), 3).is_empty());
        let j = b.json(Some("n2"), t0);
        assert_eq!(j[0]["checks"][1]["check"], "tcp:80", "{j:?}");
        assert_eq!(j[0]["checks"][1]["ok"], false);
        assert_eq!(j[0]["checks"][1]["since_unix_ms"], 2);
        let c = b.check("n2", "tcp:80", Ok("connected".into()), 4);
        assert!(matches!(&c[0], Change::Check { failing: false, .. }));
        // A first result that fails is a change.
        let c = b.check("n2", "tcp:443", Err("timed out".into()), 5);
        assert_eq!(c.len(), 1);
        let gone = b.disconnected("n2");
        assert!(
            matches!(&gone[0], Change::Check { failing: false, check, .. } if check == "tcp:443")
        );
    }
}
