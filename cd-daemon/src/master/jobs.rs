//! The master's jobs: running them on a source (`cdctl sync`, dry runs, the timers of
//! scheduled content sets), recording every job and the reports sources send on their
//! own (real-time change sets, catch-up rounds) in the [`JobLog`], and answering
//! `cdctl jobs`, `cdctl job ID` and `cdctl stats` from it.
//!
//! Every job gets its row (state `running`) before its `SyncRequest` leaves, so its id
//! is the log's; the row is finished from the source's report, or failed when the
//! source is not connected, disconnects or does not report in time.
//!
//! A scheduled content set has one timer task. When a run is due while the previous
//! one is still running, the due run is skipped and a `schedule_skipped` event says so.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cd_core::schedule::Schedule;
use cd_proto::pb::{self, envelope::Msg};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{JOB_TIMEOUT, Master, report_json};
use crate::alert::{Alert, Severity};
use crate::config::MasterContentSet;
use crate::joblog::{JobKind, JobLog, JobQuery, now_ms};
use crate::localtime::{self, Local};

/// Why a finished job failed (its error, or its failed targets), `None` if it is ok.
fn failure(r: &pb::JobReport) -> Option<String> {
    if !r.error.is_empty() {
        return Some(r.error.clone());
    }
    let failed: Vec<String> = r
        .targets
        .iter()
        .filter(|t| !t.ok)
        .map(|t| format!("{}: {}", t.target, t.error))
        .collect();
    (!failed.is_empty())
        .then(|| format!("{} target(s) failed: {}", failed.len(), failed.join("; ")))
}

/// A scheduled content set's timer, for `status`.
#[derive(Debug, Default, Clone)]
pub(super) struct Timer {
    pub next_unix: Option<i64>,
    /// The job the timer started that is still running.
    pub running: Option<u64>,
}

impl Master {
    /// Runs a job of `kind` (`Sync`, `Scheduled` or `DryRun`) for `set` (the only one
    /// when `None`) on its source and waits for the report.
    pub async fn run_job(&self, set: Option<&str>, kind: JobKind) -> anyhow::Result<Value> {
        let cs = self.set_named(set)?;
        let id = self.joblog.begin_job(kind, &cs.name, &cs.source);
        // Counted as running until it reports (dropped unfinished: failed).
        let job = crate::metrics::get().job_started();
        let r = self.run_started(cs, id, kind).await;
        job.finish(matches!(&r, Ok(v) if v["ok"] == true));
        r
    }

    async fn run_started(
        &self,
        cs: &MasterContentSet,
        job_id: u64,
        kind: JobKind,
    ) -> anyhow::Result<Value> {
        let fail = |msg: String| {
            self.joblog.fail_job(job_id, &msg);
            self.job_alert(cs, job_id, kind, Some(&msg));
            anyhow::anyhow!(msg)
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().unwrap();
            let Some(session) = st.sessions.get(&cs.source) else {
                return Err(fail(format!(
                    "job {job_id}: source node `{}` of `{}` is not connected",
                    cs.source, cs.name
                )));
            };
            let session_tx = session.tx.clone();
            st.pending.insert(job_id, (cs.source.clone(), tx));
            if let Err(e) = session_tx.try_send(Msg::SyncRequest(pb::SyncRequest {
                job_id,
                content_set: cs.name.clone(),
                dry_run: kind == JobKind::DryRun,
            })) {
                st.pending.remove(&job_id);
                return Err(fail(format!(
                    "job {job_id}: cannot reach `{}`: {e}",
                    cs.source
                )));
            }
        }
        tracing::info!(job_id, kind = kind.as_str(), content_set = %cs.name, source = %cs.source, "job started");
        let started = std::time::Instant::now();
        let mut report = match tokio::time::timeout(JOB_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                return Err(fail(format!(
                    "job {job_id}: source `{}` disconnected before reporting",
                    cs.source
                )));
            }
            Err(_) => {
                self.state.lock().unwrap().pending.remove(&job_id);
                return Err(fail(format!(
                    "job {job_id}: no report within {JOB_TIMEOUT:?}"
                )));
            }
        };
        // Targets that were never reached still belong in the report, with why, in
        // the configured order.
        {
            let st = self.state.lock().unwrap();
            let routes = st.farm.routes(&cs.name);
            for t in &cs.targets {
                if !report.targets.iter().any(|r| &r.target == t) && report.error.is_empty() {
                    let error = match routes.and_then(|r| r.unreached.get(t)) {
                        Some(why) => format!("not routed: {why}"),
                        None => match routes.and_then(|r| r.parent(t)) {
                            Some(p) => format!(
                                "not attempted: its parent `{p}` did not pass the change set on"
                            ),
                            None => "not attempted".into(),
                        },
                    };
                    report.targets.push(pb::TargetResult {
                        target: t.clone(),
                        ok: false,
                        error,
                        ..Default::default()
                    });
                }
            }
        }
        report
            .targets
            .sort_by_key(|t| cs.targets.iter().position(|c| c == &t.target));
        report.kind = kind.as_str().to_owned();
        let ok = report.error.is_empty() && report.targets.iter().all(|t| t.ok);
        tracing::info!(
            job_id,
            ok,
            took_ms = started.elapsed().as_millis() as u64,
            "job finished"
        );
        self.joblog.finish_job(job_id, &report);
        self.job_alert(cs, job_id, kind, failure(&report).as_deref());
        let mut json = report_json(&report);
        if kind == JobKind::DryRun
            && let Some(o) = json.as_object_mut()
        {
            // The plan includes the routes the data would take.
            let routes = self.state.lock().unwrap().farm.routes_json(&cs.name);
            o.insert("routes".into(), routes.unwrap_or_default());
        }
        if kind != JobKind::DryRun {
            self.state
                .lock()
                .unwrap()
                .last
                .insert(cs.name.clone(), json.clone());
        }
        Ok(json)
    }

    /// The N:M conflicts a report carries, each once in the job log as a `conflict`
    /// event (several replicas resolve the same pair; the record is the same).
    fn log_conflicts(&self, node: &str, r: &pb::JobReport) {
        for c in &r.conflicts {
            let path = String::from_utf8_lossy(&c.path);
            let key = format!("{}\0{path}\0{}\0{}", r.content_set, c.winner, c.loser);
            {
                let mut st = self.state.lock().unwrap();
                if st.conflicts_seen.len() >= 10_000 {
                    st.conflicts_seen.clear();
                }
                if !st.conflicts_seen.insert(key) {
                    continue;
                }
            }
            let detail = format!("{path}: {} overwrote concurrent {}", c.winner, c.loser);
            tracing::warn!(content_set = %r.content_set, source = node, resolved_by = %c.node, %detail, "conflict");
            self.joblog.event(
                "conflict",
                Some(&c.node),
                Some(&r.content_set),
                (r.job_id != 0).then_some(r.job_id),
                &detail,
            );
        }
    }

    /// A `JobReport` from `node`: the answer to a job this master started, or (job id
    /// 0) a round the source ran on its own.
    pub(super) fn take_report(&self, node: &str, r: pb::JobReport) {
        self.log_conflicts(node, &r);
        if r.job_id == 0 {
            let kind = match JobKind::parse(&r.kind) {
                Some(k @ (JobKind::Realtime | JobKind::CatchUp)) => k,
                _ => {
                    tracing::warn!(node, kind = %r.kind, "unsolicited report of an unknown kind; ignored");
                    return;
                }
            };
            let id = self.joblog.record_report(kind, node, &r);
            if let Ok(cs) = self.set_named(Some(&r.content_set)) {
                self.job_alert(cs, id, kind, failure(&r).as_deref());
            }
            tracing::debug!(node, job_id = id, kind = kind.as_str(), content_set = %r.content_set, "recorded a source's own round");
            self.state
                .lock()
                .unwrap()
                .last
                .insert(r.content_set.clone(), {
                    let mut v = report_json(&r);
                    v["job_id"] = id.into();
                    v
                });
            return;
        }
        let waiter = self.state.lock().unwrap().pending.remove(&r.job_id);
        match waiter {
            Some((_, w)) => {
                let _ = w.send(r);
            }
            None => {
                tracing::info!(node, job_id = r.job_id, "report for a job nobody waits for")
            }
        }
    }

    /// Raises `JobFailed` for `cs` when a job failed (`error`), resolves it when one
    /// succeeded; dry runs change nothing.
    fn job_alert(&self, cs: &MasterContentSet, job_id: u64, kind: JobKind, error: Option<&str>) {
        if kind == JobKind::DryRun {
            return;
        }
        let alert = Alert::firing(
            "JobFailed",
            None,
            Severity::Warning,
            format!(
                "{} job {job_id} of `{}` (source {}) failed: {}",
                kind.as_str(),
                cs.name,
                cs.source,
                error.unwrap_or_default()
            ),
        )
        .label("content_set", cs.name.clone());
        self.alerts.raise(match error {
            Some(_) => alert,
            None => alert.resolved(format!(
                "{} job {job_id} of `{}` succeeded",
                kind.as_str(),
                cs.name
            )),
        });
    }

    /// `cdctl alerts`: the alerts firing now, the configured sinks, and the newest
    /// `limit` alert events of the job log (raised, resolved, undelivered).
    pub async fn alerts_json(&self, limit: usize) -> anyhow::Result<Value> {
        let limit = if limit == 0 { 50 } else { limit.min(10_000) };
        let history = self.joblog.events_of_kind("alert_", limit).await?;
        Ok(json!({
            "firing": self.alerts.firing_json(),
            "sinks": self.alerts.sinks(),
            "history": history,
        }))
    }

    pub async fn jobs(&self, q: JobQuery) -> anyhow::Result<Value> {
        Ok(Value::Array(self.joblog.jobs(q).await?))
    }

    pub async fn job(&self, id: u64) -> anyhow::Result<Value> {
        self.joblog
            .job(id)
            .await?
            .with_context(|| format!("no job {id} in the job log (never run, or pruned)"))
    }

    pub async fn stats(&self) -> anyhow::Result<Value> {
        self.joblog.stats().await
    }

    /// The newest farm events (node up/down, reroutes, broken links, catch-ups,
    /// skipped runs), newest first.
    pub async fn events(&self, limit: usize) -> anyhow::Result<Value> {
        let limit = if limit == 0 { 100 } else { limit.min(10_000) };
        Ok(Value::Array(self.joblog.events(limit).await?))
    }

    /// The job log, for the routing code's events.
    #[must_use]
    pub fn joblog(&self) -> &Arc<JobLog> {
        &self.joblog
    }

    /// `status` of a scheduled set's timer.
    pub(super) fn schedule_json(&self, cs: &MasterContentSet) -> Value {
        let Some(schedule) = &cs.schedule else {
            return Value::Null;
        };
        let t = self
            .timers
            .lock()
            .unwrap()
            .get(&cs.name)
            .cloned()
            .unwrap_or_default();
        let (cron, every) = match schedule {
            Schedule::Cron(c) => (Some(c.as_str().to_owned()), None),
            Schedule::Every { seconds } => (None, Some(*seconds)),
        };
        json!({
            "cron": cron,
            "every_seconds": every,
            "next_unix": t.next_unix,
            "next_local": t.next_unix.map(localtime::rfc3339),
            "running_job": t.running,
        })
    }

    /// Starts a timer task for every scheduled content set.
    pub(super) fn start_timers(self: &Arc<Self>) {
        for cs in &self.cfg.content_sets {
            if let Some(s) = cs.schedule.clone() {
                tokio::spawn(self.clone().timer(cs.name.clone(), s));
            }
        }
    }

    async fn timer(self: Arc<Self>, set: String, schedule: Schedule) {
        let mut prev = now_ms().div_euclid(1000);
        loop {
            let base = match schedule {
                // An interval counts from the previous due time, a cron from now.
                Schedule::Every { .. } => prev,
                Schedule::Cron(_) => prev.max(now_ms().div_euclid(1000)),
            };
            let Some(next) = schedule.next_after(base, &Local) else {
                tracing::warn!(content_set = %set, schedule = %schedule, "the schedule never runs again");
                self.timers
                    .lock()
                    .unwrap()
                    .entry(set.clone())
                    .or_default()
                    .next_unix = None;
                return;
            };
            self.timers
                .lock()
                .unwrap()
                .entry(set.clone())
                .or_default()
                .next_unix = Some(next);
            tracing::debug!(content_set = %set, next = %localtime::rfc3339(next), "next scheduled run");
            // Sleep in steps, so a wall-clock change is noticed within a minute.
            loop {
                let left = next * 1000 - now_ms();
                if left <= 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(left.min(60_000) as u64)).await;
            }
            prev = next;
            let running = self
                .timers
                .lock()
                .unwrap()
                .get(&set)
                .and_then(|t| t.running);
            if let Some(job) = running {
                let detail = format!(
                    "run due at {} skipped: job {job} is still running",
                    localtime::rfc3339(next)
                );
                tracing::warn!(content_set = %set, job, "scheduled run skipped: the previous one is still running");
                self.joblog
                    .event("schedule_skipped", None, Some(&set), Some(job), &detail);
                continue;
            }
            let Ok(cs) = self.set_named(Some(&set)) else {
                return;
            };
            let id = self.joblog.begin_job(JobKind::Scheduled, &set, &cs.source);
            self.timers
                .lock()
                .unwrap()
                .entry(set.clone())
                .or_default()
                .running = Some(id);
            let master = self.clone();
            let name = set.clone();
            tokio::spawn(async move {
                if let Ok(cs) = master.set_named(Some(&name)) {
                    match master.run_started(cs, id, JobKind::Scheduled).await {
                        Ok(r) if r["ok"] == true => {}
                        Ok(r) => {
                            tracing::warn!(content_set = %name, job_id = id, report = %r, "scheduled job failed")
                        }
                        Err(e) => {
                            tracing::warn!(content_set = %name, job_id = id, error = %format!("{e:#}"), "scheduled job failed")
                        }
                    }
                }
                if let Some(t) = master.timers.lock().unwrap().get_mut(&name)
                    && t.running == Some(id)
                {
                    t.running = None;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, ok: bool, error: &str) -> pb::TargetResult {
        pb::TargetResult {
            target: name.into(),
            ok,
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_report_fails_on_its_error_or_any_failed_target() {
        let mut r = pb::JobReport {
            targets: vec![target("node2", true, ""), target("node3", true, "")],
            ..Default::default()
        };
        assert_eq!(failure(&r), None, "every target ok");
        r.targets.push(target("node4", false, "disk full"));
        r.targets.push(target("node5", false, "not attempted"));
        assert_eq!(
            failure(&r).as_deref(),
            Some("2 target(s) failed: node4: disk full; node5: not attempted")
        );
        // The job's own error is the reason, whatever the targets say.
        r.error = "scan failed: permission denied".into();
        assert_eq!(
            failure(&r).as_deref(),
            Some("scan failed: permission denied")
        );
        r.targets.clear();
        assert!(failure(&r).is_some(), "an error without targets fails");
    }
}
