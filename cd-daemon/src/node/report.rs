//! Reports of the rounds a source runs on its own (real-time change sets, catch-up
//! rounds) to the master's job log: a `JobReport` with job id 0 and its `kind`.
//!
//! Best effort: the report is queued on the master session without waiting; when the
//! session is down or its queue is full it is dropped (and logged at debug level), so
//! a slow master never holds a batch up.

use cd_proto::pb::{self, envelope::Msg};

use super::Node;
use crate::joblog::now_ms;
use crate::transfer::SendStats;

impl Node {
    /// Sends `report` (of `kind`, for `set`, begun at `started_ms`) to the master.
    pub(super) fn report_round(
        &self,
        kind: &str,
        set: &str,
        started_ms: i64,
        mut report: pb::JobReport,
        result: Result<(), String>,
    ) {
        report.job_id = 0;
        report.kind = kind.to_owned();
        report.content_set = set.to_owned();
        report.started_unix_ms = started_ms;
        report.finished_unix_ms = now_ms();
        if let Err(e) = result {
            report.error = e;
        }
        let tx = self.master_tx.lock().unwrap().clone();
        let sent = tx.is_some_and(|tx| tx.try_send(Msg::JobReport(report)).is_ok());
        if !sent {
            tracing::debug!(
                content_set = set,
                kind,
                "master unreachable or busy; round not reported"
            );
        }
    }
}

/// One target's outcome of an incremental (real-time) transfer.
pub(super) fn incremental_result(
    target: &str,
    r: &anyhow::Result<SendStats>,
    took: std::time::Duration,
) -> pb::TargetResult {
    let mut t = pb::TargetResult {
        target: target.to_owned(),
        duration_ms: took.as_millis() as u64,
        ..Default::default()
    };
    match r {
        Ok(st) => {
            t.ok = st.apply.ok && !st.need_full && st.changed_since_scan == 0;
            t.error = st.apply.error.clone();
            t.files_sent = st.files_sent;
            t.bytes_sent = st.bytes_sent;
            t.wire_bytes = st.wire_bytes;
            t.resent = st.resent;
            t.delta_files = st.delta_files;
            t.delta_bytes = st.delta_bytes;
            t.patch_bytes = st.patch_bytes;
            t.signature_exchanges = st.signature_exchanges;
            t.reused_local = st.apply.reused_local;
            t.removed = st.apply.removed;
            t.meta_only = st.apply.meta_only;
            if st.need_full && t.error.is_empty() {
                t.error = "needed the full tree".into();
            }
        }
        Err(e) => t.error = format!("{e:#}"),
    }
    t
}

/// Merges the results of a fallback full round into those of the incremental
/// transfers: a target's full-round result replaces its incremental one.
pub(super) fn merge_fallback(report: &mut pb::JobReport, incremental: Vec<pb::TargetResult>) {
    for t in incremental {
        if !report.targets.iter().any(|f| f.target == t.target) {
            report.targets.push(t);
        }
    }
    report.targets.sort_by(|a, b| a.target.cmp(&b.target));
}
