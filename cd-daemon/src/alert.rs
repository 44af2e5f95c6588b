//! Alerts: what the master tells operators when something goes wrong, and when it is
//! right again.
//!
//! Everything that can alert (a node's session ends, a check fails, a monitored value
//! crosses its threshold, a job fails) calls [`Alerts::raise`] with an [`Alert`] that
//! is either firing or resolved. An alert is identified by its [`Alert::key`] (name,
//! node and identifying labels), so a firing alert raised again while it fires is the
//! same alert, and a resolution names what it resolves.
//!
//! An alert raised again while it fires, or resolved while it does not fire, is a
//! repeat and dropped. Every other goes to the job log as an event (`alert_firing` /
//! `alert_resolved`) and, as a [`Notice`], to every configured sink
//! (`[master.alerts]`: Alertmanager, e-mail, SMS gateway; see [`sink`]). Handing a
//! notice to a sink is a non-blocking queue push: `raise` never waits on the network,
//! and may be called under the master's locks. Each sink rate-limits what it sends
//! ([`limit`]), retries, and records a delivery it gave up on in the job log
//! (`alert_delivery_failed`).

pub mod http;
pub mod limit;
pub mod sink;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::config::AlertsConfig;
use crate::joblog::{JobLog, now_ms};

/// How bad it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Whether the condition holds now or has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Resolved,
}

/// One alert as raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// What kind of condition: `NodeDown`, `CheckFailed`, `ThresholdCrossed`,
    /// `JobFailed`, … (CamelCase, as Alertmanager's `alertname`).
    pub name: String,
    /// The server it is about, if any.
    pub node: Option<String>,
    /// Further identifying labels (`check = "tcp:80"`, `metric = "load1"`,
    /// `content_set = "www"`); part of the key, so keep them low-cardinality.
    pub labels: BTreeMap<String, String>,
    pub severity: Severity,
    pub state: AlertState,
    /// One line for humans.
    pub summary: String,
}

impl Alert {
    /// A firing alert with no extra labels.
    pub fn firing(
        name: &str,
        node: Option<&str>,
        severity: Severity,
        summary: impl Into<String>,
    ) -> Self {
        Alert {
            name: name.to_owned(),
            node: node.map(str::to_owned),
            labels: BTreeMap::new(),
            severity,
            state: AlertState::Firing,
            summary: summary.into(),
        }
    }

    /// The same alert, resolved, with `summary`.
    pub fn resolved(mut self, summary: impl Into<String>) -> Self {
        self.state = AlertState::Resolved;
        self.summary = summary.into();
        self
    }

    /// With one more identifying label.
    pub fn label(mut self, k: &str, v: impl Into<String>) -> Self {
        self.labels.insert(k.to_owned(), v.into());
        self
    }

    /// What identifies it across firing and resolution: name, node and labels.
    pub fn key(&self) -> String {
        let mut k = self.name.clone();
        if let Some(n) = &self.node {
            k.push_str(&format!(" node={n}"));
        }
        for (l, v) in &self.labels {
            k.push_str(&format!(" {l}={v}"));
        }
        k
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            AlertState::Firing => "FIRING",
            AlertState::Resolved => "RESOLVED",
        };
        write!(f, "[{state}] {}: {}", self.key(), self.summary)
    }
}

/// A change of an alert's state, as sinks get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub alert: Alert,
    /// When it started firing (Unix ms).
    pub starts_at_ms: i64,
    /// When this change happened: the firing's start, or the resolution (Unix ms).
    pub at_ms: i64,
}

/// An alert firing now.
#[derive(Debug, Clone)]
struct Firing {
    alert: Alert,
    since_ms: i64,
}

/// The master's alerting: see the module docs.
#[derive(Debug)]
pub struct Alerts {
    joblog: Arc<JobLog>,
    /// The alerts firing now, by key.
    firing: Mutex<BTreeMap<String, Firing>>,
    /// The configured sinks' queues.
    sinks: Vec<sink::SinkHandle>,
}

impl Alerts {
    /// Alerting into the job log only, without sinks.
    pub fn new(joblog: Arc<JobLog>) -> Self {
        Alerts {
            joblog,
            firing: Mutex::new(BTreeMap::new()),
            sinks: Vec::new(),
        }
    }

    /// Alerting with the sinks of `cfg`, each a task on the current tokio runtime.
    /// `master` is the master's name (in texts, the SMTP greeting and the default
    /// `generatorURL`).
    pub fn start(joblog: Arc<JobLog>, cfg: &AlertsConfig, master: &str) -> anyhow::Result<Self> {
        let sinks = sink::start(cfg, master, &joblog)?;
        Ok(Alerts {
            joblog,
            firing: Mutex::new(BTreeMap::new()),
            sinks,
        })
    }

    /// Keys of the alerts firing now, in order.
    pub fn firing(&self) -> Vec<String> {
        self.firing.lock().unwrap().keys().cloned().collect()
    }

    /// The alerts firing now, for `cdctl alerts`.
    pub fn firing_json(&self) -> Vec<serde_json::Value> {
        self.firing
            .lock()
            .unwrap()
            .iter()
            .map(|(key, f)| {
                serde_json::json!({
                    "key": key,
                    "name": f.alert.name,
                    "node": f.alert.node,
                    "labels": f.alert.labels,
                    "severity": f.alert.severity,
                    "summary": f.alert.summary,
                    "since_unix_ms": f.since_ms,
                })
            })
            .collect()
    }

    /// The names of the configured sinks.
    pub fn sinks(&self) -> Vec<String> {
        self.sinks.iter().map(|s| s.name.clone()).collect()
    }

    /// Raises (or resolves) `alert`: unless it is a repeat, logs it, writes it to the
    /// job log and queues it for every sink. Returns whether it was new.
    pub fn raise(&self, alert: Alert) -> bool {
        let key = alert.key();
        let now = now_ms();
        let starts_at_ms = {
            let mut firing = self.firing.lock().unwrap();
            match alert.state {
                AlertState::Firing if firing.contains_key(&key) => None,
                AlertState::Firing => {
                    firing.insert(
                        key,
                        Firing {
                            alert: alert.clone(),
                            since_ms: now,
                        },
                    );
                    Some(now)
                }
                AlertState::Resolved => firing.remove(&key).map(|f| f.since_ms),
            }
        };
        let Some(starts_at_ms) = starts_at_ms else {
            return false;
        };
        let kind = match alert.state {
            AlertState::Firing => "alert_firing",
            AlertState::Resolved => "alert_resolved",
        };
        match alert.state {
            AlertState::Firing => tracing::warn!(alert = %alert, "alert"),
            AlertState::Resolved => tracing::info!(alert = %alert, "alert"),
        }
        let set = alert.labels.get("content_set").cloned();
        let set = set.as_deref();
        self.joblog
            .event(kind, alert.node.as_deref(), set, None, &alert.to_string());
        let notice = Notice {
            starts_at_ms,
            at_ms: now,
            alert,
        };
        for s in &self.sinks {
            if let Err(e) = s.tx.try_send(notice.clone()) {
                let why = match e {
                    tokio::sync::mpsc::error::TrySendError::Full(_) => "its queue is full",
                    tokio::sync::mpsc::error::TrySendError::Closed(_) => "it has stopped",
                };
                tracing::warn!(sink = %s.name, alert = %notice.alert, "alert not queued: {why}");
                self.joblog.event(
                    "alert_delivery_failed",
                    notice.alert.node.as_deref(),
                    set,
                    None,
                    &format!("{}: not queued ({why}): {}", s.name, notice.alert),
                );
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn changes_reach_the_sinks_and_the_job_log_once_with_their_start() {
        let dir = tempfile::tempdir().unwrap();
        let joblog = Arc::new(JobLog::open(&dir.path().join("j.sqlite")).unwrap());
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let alerts = Alerts {
            joblog: joblog.clone(),
            firing: Mutex::new(BTreeMap::new()),
            sinks: vec![sink::SinkHandle {
                name: "test".into(),
                tx,
            }],
        };
        let down = Alert::firing("NodeDown", Some("node2"), Severity::Critical, "gone");
        assert!(alerts.raise(down.clone()));
        assert!(!alerts.raise(down.clone()), "a repeat");
        assert!(
            !alerts.raise(down.clone().label("x", "y").resolved("")),
            "not firing"
        );
        assert_eq!(alerts.firing(), ["NodeDown node=node2"]);
        assert_eq!(alerts.firing_json()[0]["summary"], "gone");
        assert!(alerts.raise(down.clone().resolved("back")));
        assert!(!alerts.raise(down.clone().resolved("back")), "a repeat");
        assert!(alerts.firing().is_empty());

        let fired = rx.recv().await.unwrap();
        assert_eq!(fired.alert, down);
        assert_eq!(fired.starts_at_ms, fired.at_ms);
        let resolved = rx.recv().await.unwrap();
        assert_eq!(resolved.alert.state, AlertState::Resolved);
        assert_eq!(
            resolved.starts_at_ms, fired.starts_at_ms,
            "it says when it started"
        );
        assert!(resolved.at_ms >= fired.at_ms);
        assert!(rx.try_recv().is_err(), "repeats are not sent");

        let ev = joblog.events_of_kind("alert_", 10).await.unwrap();
        let kinds: Vec<&str> = ev.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["alert_resolved", "alert_firing"]);
    }

    #[test]
    fn key_names_the_alert_node_and_labels_and_survives_resolution() {
        let a = Alert::firing(
            "CheckFailed",
            Some("node2"),
            Severity::Critical,
            "tcp:80 refused",
        )
        .label("check", "tcp:80");
        assert_eq!(a.key(), "CheckFailed node=node2 check=tcp:80");
        let r = a.clone().resolved("tcp:80 answers");
        assert_eq!(r.key(), a.key());
        assert_eq!(r.state, AlertState::Resolved);
        assert!(
            r.to_string()
                .starts_with("[RESOLVED] CheckFailed node=node2")
        );
    }
}
