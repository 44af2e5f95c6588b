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
//! `alert_resolved`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::joblog::JobLog;

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

/// The master's alerting: see the module docs.
#[derive(Debug)]
pub struct Alerts {
    joblog: Arc<JobLog>,
    /// Keys of the alerts firing now.
    firing: Mutex<BTreeSet<String>>,
}

impl Alerts {
    pub fn new(joblog: Arc<JobLog>) -> Self {
        Alerts {
            joblog,
            firing: Mutex::new(BTreeSet::new()),
        }
    }

    /// Keys of the alerts firing now, in order.
    pub fn firing(&self) -> Vec<String> {
        self.firing.lock().unwrap().iter().cloned().collect()
    }

    /// Raises (or resolves) `alert`: unless it is a repeat, logs it and writes it to
    /// the job log. Returns whether it was new.
    pub fn raise(&self, alert: Alert) -> bool {
        let key = alert.key();
        let new = {
            let mut firing = self.firing.lock().unwrap();
            match alert.state {
                AlertState::Firing => firing.insert(key),
                AlertState::Resolved => firing.remove(&key),
            }
        };
        if !new {
            return false;
        }
        let kind = match alert.state {
            AlertState::Firing => "alert_firing",
            AlertState::Resolved => "alert_resolved",
        };
        match alert.state {
            AlertState::Firing => tracing::warn!(alert = %alert, "alert"),
            AlertState::Resolved => tracing::info!(alert = %alert, "alert"),
        }
        let set = alert.labels.get("content_set").map(String::as_str);
        self.joblog
            .event(kind, alert.node.as_deref(), set, None, &alert.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
