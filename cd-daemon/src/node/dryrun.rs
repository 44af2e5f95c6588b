//! Dry-run jobs on the source: scan, filter, and send the manifest to every target as
//! a dry-run transfer ([`transfer::dryrun`]); report what each would receive, remove
//! and change. No file content is read for sending, no sequence number is used, and
//! nothing the source remembers about its targets changes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, bail};
use cd_proto::pb;

use super::Node;
use crate::fs;
use crate::net;
use crate::transfer::{self, OutBody, Outgoing};

impl Node {
    /// Runs dry-run job `job_id` for `set`; targets appear in the assignment's order.
    pub(super) async fn dry_run_job(self: &Arc<Self>, set: &str, job_id: u64) -> pb::JobReport {
        let mut report = pb::JobReport {
            job_id,
            content_set: set.to_owned(),
            kind: "dry_run".into(),
            started_unix_ms: crate::joblog::now_ms(),
            ..Default::default()
        };
        if let Err(e) = self.dry_run_inner(set, job_id, &mut report).await {
            report.error = format!("{e:#}");
            tracing::warn!(job_id, content_set = set, error = %report.error, "dry run failed");
        }
        report.finished_unix_ms = crate::joblog::now_ms();
        report
    }

    async fn dry_run_inner(
        self: &Arc<Self>,
        set: &str,
        job_id: u64,
        report: &mut pb::JobReport,
    ) -> anyhow::Result<()> {
        let state = self
            .sets
            .get(set)
            .with_context(|| format!("this node has no content set `{set}`"))?;
        // What the replicas hold must not change under the plan.
        let _busy = state.busy.lock().await;
        let Some(assignment) = state.assignment.lock().unwrap().clone() else {
            bail!("no assignment from the master yet for `{set}`")
        };
        if !assignment.is_source {
            bail!(
                "this node is not the source of `{set}` (the source is `{}`)",
                assignment.source
            );
        }
        let t0 = Instant::now();
        let filter = state.filter();
        let seq = self.current_seq(set);
        report.seq = seq;
        // N:M: the versions a full reconcile would carry, scanned and versioned under
        // the apply lock as a real one is; this node's writes not stamped yet get
        // stamps of the next change set in the plan only (nothing is recorded).
        let nm = self.nm(set);
        let nm_guard = match &nm {
            Some(n) => Some(n.apply_lock.lock().await),
            None => None,
        };
        let (root, manifest) = self.scan_for_targets(set, &filter)?;
        let versions = match &nm {
            Some(n) => Some(Arc::new(transfer::OutVersions::Full(
                tokio::task::block_in_place(|| n.versions_for_full(&manifest, seq + 1, false))?,
            ))),
            None => None,
        };
        drop(nm_guard);
        report.scan_ms = t0.elapsed().as_millis() as u64;
        report.source_entries = manifest.len() as u64;
        let out = self.outgoing(
            &assignment,
            set,
            self.name.clone(),
            seq,
            job_id,
            OutBody::Full(manifest),
            Arc::new(root),
        );
        let out = super::with_versions(out, versions);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, peer) in assignment.targets.iter().cloned().enumerate() {
            let node = self.clone();
            let out = out.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let r = node.dry_run_to(&peer, &out).await;
                (i, peer, r, t.elapsed())
            });
        }
        let mut results = Vec::new();
        let mut below = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (i, peer, r, took) = joined.context("dry-run task panicked")?;
            results.push((i, plan_result(&self.name, &peer, r, took, &mut below)));
        }
        results.sort_by_key(|(i, _)| *i);
        report.targets = results.into_iter().map(|(_, t)| t).collect();
        report.targets.extend(below);
        Ok(())
    }

    /// A relay: passes a dry run on to its children, so the plan covers its subtree.
    pub(super) async fn forward_dry_run(
        self: &Arc<Self>,
        begin: &pb::TransferBegin,
        from: &str,
        body: OutBody,
    ) -> Vec<pb::TargetResult> {
        let Some(state) = self.sets.get(&begin.content_set) else {
            return Vec::new();
        };
        let Some(mut a) = state.assignment.lock().unwrap().clone() else {
            return Vec::new();
        };
        // Never back to the sender (see `forward`).
        a.targets.retain(|t| t.name != from);
        let Ok(root) = tokio::task::block_in_place(|| fs::Root::open(&state.root)) else {
            return Vec::new();
        };
        let out = self.outgoing(
            &a,
            &begin.content_set,
            begin.origin.clone(),
            begin.seq,
            begin.job_id,
            body,
            Arc::new(root),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for peer in a.targets {
            let node = self.clone();
            let out = out.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let r = node.dry_run_to(&peer, &out).await;
                (peer, r, t.elapsed())
            });
        }
        let mut results = Vec::new();
        let mut below = Vec::new();
        while let Some(Ok((peer, r, took))) = tasks.join_next().await {
            results.push(plan_result(&self.name, &peer, r, took, &mut below));
        }
        results.extend(below);
        results
    }

    async fn dry_run_to(
        &self,
        peer: &pb::Peer,
        out: &Outgoing,
    ) -> anyhow::Result<(pb::DryRunPlan, Vec<pb::TargetResult>)> {
        if peer.data_addr.is_empty() {
            bail!("target `{}` is not connected to the master", peer.name);
        }
        let (mut conn, _) = net::connect_transfer(
            &peer.data_addr,
            &peer.name,
            self.client_cfg.clone(),
            &self.name,
            peer.plaintext,
            &self.transport,
            false,
        )
        .await?;
        let r = transfer::dryrun::send(&mut conn, out).await;
        if r.is_ok() {
            conn.shutdown().await;
        }
        if conn
            .link_stats()
            .is_some_and(|s| s.budget_exhausted.load(Ordering::Relaxed))
        {
            self.rustls_only.lock().unwrap().insert(peer.name.clone());
        }
        Ok(r?)
    }
}

/// One child's dry-run result (its subtree's go to `below`).
fn plan_result(
    via: &str,
    peer: &pb::Peer,
    r: anyhow::Result<(pb::DryRunPlan, Vec<pb::TargetResult>)>,
    took: std::time::Duration,
    below: &mut Vec<pb::TargetResult>,
) -> pb::TargetResult {
    let mut t = pb::TargetResult {
        target: peer.name.clone(),
        via: via.to_owned(),
        link_class: peer.link_class.clone(),
        duration_ms: took.as_millis() as u64,
        ..Default::default()
    };
    match r {
        Ok((plan, subtree)) => {
            t.ok = true;
            t.removed = plan.removed_count;
            t.meta_only = plan.meta_only_count;
            t.reused_local = plan.reused_local;
            t.planned = Some(plan);
            below.extend(subtree);
        }
        Err(e) => t.error = format!("{e:#}"),
    }
    t
}
