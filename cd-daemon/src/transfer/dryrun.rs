//! Dry-run transfers: the real exchange up to the need list, and no further.
//!
//! ```text
//! source                                        replica
//!   TransferBegin{dry_run, full}, Manifest… ──▶  validate, scan, plan as usual
//!                                          ◀──  NeedList…
//!   SignatureRequest{} (empty), TransferEnd ──▶  no stage, no apply, no state saved
//!                                          ◀──  ApplyResult{dry_run, planned}
//! ```
//!
//! The replica creates, stages and removes nothing, and does not move its record of
//! the last applied change set. The source builds each target's [`pb::DryRunPlan`]
//! from the need list (which contents would travel, whole or as deltas as far as it
//! can tell without signatures) and the replica's answer (removals, attribute-only
//! changes, local reuse).

use cd_core::delta::{Decision, DumpPolicy, decide};
use cd_core::manifest::EntryKind;
use cd_core::path::RelPath;
use cd_core::plan::{Plan, Step};
use cd_proto::pb::{self, envelope::Msg};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{OutBody, Outgoing, ReceiveStats, TransferError, send_chunked};
use crate::net::{Conn, Incoming, msg_name};

/// Entries in each list of a [`pb::DryRunPlan`], at most.
const LIST_ENTRIES: usize = 1000;
/// Path bytes in each list of a [`pb::DryRunPlan`], at most (a job report carries one
/// plan per target and must stay well under the control frame bound).
const LIST_BYTES: usize = 64 << 10;

/// Appends `path` to `list` unless the list is full; says whether it was.
fn push_bounded(list: &mut Vec<Vec<u8>>, bytes: &mut usize, path: &[u8]) -> bool {
    if list.len() >= LIST_ENTRIES || *bytes + path.len() > LIST_BYTES {
        return false;
    }
    *bytes += path.len();
    list.push(path.to_vec());
    true
}

/// Source side: sends `out` (a full manifest) as a dry run and returns the target's
/// plan. No file content is read or sent.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
) -> Result<(pb::DryRunPlan, Vec<pb::TargetResult>), TransferError> {
    let OutBody::Full(manifest) = &out.body else {
        return Err(TransferError::Refused(
            "a dry run sends a full manifest".into(),
        ));
    };
    conn.send(Msg::TransferBegin(pb::TransferBegin {
        content_set: out.content_set.clone(),
        origin: out.origin.clone(),
        seq: out.seq,
        job_id: out.job_id,
        full: true,
        entry_count: manifest.len() as u64,
        base_seq: 0,
        dry_run: true,
        // N:M: each entry's version, so the replica plans last-writer-wins.
        versioned: out.versions.is_some(),
    }))
    .await?;
    let items: Vec<pb::Entry> = manifest.iter().map(pb::Entry::from).collect();
    send_chunked(conn, items, |entries, last| {
        Msg::ManifestChunk(pb::ManifestChunk { entries, last })
    })
    .await?;
    super::send_full_versions(conn, out).await?;
    let mut needs = Vec::new();
    loop {
        match conn.recv_msg().await? {
            Msg::NeedList(n) => {
                needs.extend(n.needs);
                if n.last {
                    break;
                }
            }
            m => {
                return Err(TransferError::Protocol(format!(
                    "expected NeedList, got {}",
                    msg_name(&m)
                )));
            }
        }
    }
    // The exchange a real transfer has here, empty: no signatures, no files.
    conn.send(Msg::SignatureRequest(pb::SignatureRequest {
        file_ids: vec![],
    }))
    .await?;
    conn.send(Msg::TransferEnd(pb::TransferEnd {})).await?;
    let mut answer = match conn.recv_msg().await? {
        Msg::ApplyResult(r) => r,
        m => {
            return Err(TransferError::Protocol(format!(
                "expected ApplyResult, got {}",
                msg_name(&m)
            )));
        }
    };
    if !answer.dry_run {
        return Err(TransferError::Protocol(
            "the replica did not answer as to a dry run".into(),
        ));
    }
    if !answer.ok {
        return Err(TransferError::Refused(answer.error));
    }
    // A relay's answer carries the plans of the targets below it.
    let subtree = std::mem::take(&mut answer.subtree);
    let mut plan = answer.planned.map(|p| *p).unwrap_or_default();
    let files = out.body.files();
    let policy = DumpPolicy::default();
    let mut bytes = 0usize;
    plan.files.clear();
    plan.files_count = 0;
    plan.files_bytes = 0;
    for need in &needs {
        let path = RelPath::new(need.path.clone())
            .map_err(|e| TransferError::Protocol(format!("need for invalid path: {e}")))?;
        let size = match files.get(&path).map(|e| &e.kind) {
            Some(EntryKind::File { size, .. }) => *size,
            _ => {
                return Err(TransferError::Protocol(format!(
                    "replica asked for {path}, which the manifest does not have"
                )));
            }
        };
        plan.files_count += 1;
        plan.files_bytes += size;
        // A delta needs a base the replica holds and the size rule to allow it; the
        // base's signature (which could still turn it whole) is not asked for.
        let delta = out.delta != pb::DeltaMode::Never
            && !need.base_hash.is_empty()
            && need.base_hash != need.hash
            && decide(&policy, Some(need.base_size), size, None) == Decision::Delta;
        if plan.files.len() < LIST_ENTRIES && bytes + need.path.len() <= LIST_BYTES {
            bytes += need.path.len();
            plan.files.push(pb::PlannedFile {
                path: need.path.clone(),
                size,
                delta,
            });
        } else {
            plan.truncated = true;
        }
    }
    Ok((plan, subtree))
}

/// Replica side, after the need list and the (empty) signature exchange of a dry run:
/// waits for `TransferEnd` and answers with the plan. Nothing is staged or applied.
pub(super) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    plan: &Plan,
    mut stats: ReceiveStats,
) -> Result<ReceiveStats, TransferError> {
    match conn.recv().await? {
        Incoming::Control(Msg::TransferEnd(_)) => {}
        Incoming::Data { file_id, .. } => {
            return Err(TransferError::Protocol(format!(
                "file data (file {file_id}) in a dry run"
            )));
        }
        Incoming::Control(m) => {
            return Err(TransferError::Protocol(format!(
                "expected TransferEnd in a dry run, got {}",
                msg_name(&m)
            )));
        }
    }
    let mut p = pb::DryRunPlan {
        files_count: plan.stats.fetch_files,
        files_bytes: plan.stats.fetch_bytes,
        removed_count: plan.stats.removed,
        meta_only_count: plan.stats.meta_only,
        reused_local: plan.stats.reused_local,
        created_dirs: plan.stats.created_dirs,
        ..Default::default()
    };
    let (mut removed_bytes, mut meta_bytes) = (0, 0);
    for step in &plan.steps {
        let kept = match step {
            Step::Remove { path, .. } => {
                push_bounded(&mut p.removed, &mut removed_bytes, path.as_bytes())
            }
            Step::SetMeta { path, .. } => {
                push_bounded(&mut p.meta_only, &mut meta_bytes, path.as_bytes())
            }
            _ => true,
        };
        p.truncated |= !kept;
    }
    stats.apply = pb::ApplyResult {
        ok: true,
        dry_run: true,
        planned: Some(Box::new(p)),
        ..Default::default()
    };
    // The caller answers (a relay first asks the targets below it for their plans).
    Ok(stats)
}
