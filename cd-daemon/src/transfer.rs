//! One transfer of a change set from a source node to one replica.
//!
//! ```text
//! source                                   replica
//!   TransferBegin, ManifestChunk…  ──────▶  validate manifest, scan own tree, plan
//!                                  ◀──────  NeedList… (contents it lacks, by hash)
//!   FileBegin, data frames, FileEnd ─────▶  stage beside the root, verify BLAKE3
//!   (FileAbort if the file changed)         (discard the partial content)
//!   TransferEnd                    ──────▶  apply the plan: rename staged files into
//!                                  ◀──────  place in order; ApplyResult
//! ```
//!
//! The replica plans against its own scan, so content it already holds (a renamed
//! file) is moved locally, never re-sent, and a drifted replica is repaired. A file
//! that changes while the source reads it is detected by comparing `fstat` before and
//! after the read and by its hash; it is re-read (torn copies are never shipped), and
//! content that differs from the manifest is aborted and left for the next round of
//! the same job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_core::manifest::{Entry, Manifest};
use cd_core::plan::{Plan, PlanOptions};
use cd_proto::pb::{self, envelope::Msg};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::fs::{self, Root};
use crate::net::{Conn, Incoming, NetError, msg_name};

/// Entries per manifest chunk and needs per need-list chunk.
const CHUNK_ENTRIES: usize = 4096;
/// Encoded bytes per manifest or need-list chunk.
const CHUNK_BYTES: usize = 1 << 20;
/// Largest manifest a replica accepts (entries).
const MAX_ENTRIES: u64 = 50_000_000;
/// Attempts to read a consistent copy of a file that keeps changing.
const READ_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("filesystem: {0}")]
    Fs(#[from] fs::FsError),
    #[error("peer sent an invalid manifest: {0}")]
    BadManifest(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// What the source sends to every target of one job round.
#[derive(Debug)]
pub struct Outgoing {
    pub content_set: String,
    pub origin: String,
    pub seq: u64,
    pub job_id: u64,
    pub manifest: Arc<Manifest>,
    pub root: Arc<Root>,
    pub zstd_level: i32,
    pub max_rate_bytes_per_sec: u64,
}

/// Source-side counters for one target.
#[derive(Debug, Default, Clone)]
pub struct SendStats {
    pub files_sent: u64,
    pub bytes_sent: u64,
    pub wire_bytes: u64,
    /// Re-reads because the file changed while being read.
    pub resent: u64,
    /// Files whose content no longer matched the manifest: another round is needed.
    pub changed_since_scan: u64,
    pub apply: pb::ApplyResult,
}

/// Runs the source side over an established, `Hello`-ed connection.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
) -> Result<SendStats, TransferError> {
    let mut st = SendStats::default();
    conn.send(Msg::TransferBegin(pb::TransferBegin {
        content_set: out.content_set.clone(),
        origin: out.origin.clone(),
        seq: out.seq,
        job_id: out.job_id,
        full: true,
        entry_count: out.manifest.len() as u64,
    }))
    .await?;
    // Chunks are bounded by entries and by encoded bytes (paths can be 4 KiB each),
    // well under the receiver's control frame bound.
    let mut chunk: Vec<pb::Entry> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut it = out.manifest.iter().peekable();
    loop {
        let next = it.next();
        if let Some(e) = next {
            let w = pb::Entry::from(e);
            chunk_bytes += prost::Message::encoded_len(&w) + 4;
            chunk.push(w);
        }
        let last = it.peek().is_none();
        if last || chunk.len() >= CHUNK_ENTRIES || chunk_bytes >= CHUNK_BYTES {
            conn.send(Msg::ManifestChunk(pb::ManifestChunk {
                entries: std::mem::take(&mut chunk),
                last,
            }))
            .await?;
            chunk_bytes = 0;
        }
        if last {
            break;
        }
    }

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

    let started = Instant::now();
    let mut paced: u64 = 0;
    let mut buf = vec![0u8; cd_proto::frame::MAX_CHUNK_RAW];
    for need in needs {
        let path = cd_core::path::RelPath::new(need.path.clone())
            .map_err(|e| TransferError::Protocol(format!("need for invalid path: {e}")))?;
        let want = cd_proto::convert::hash_from_bytes(&need.hash)
            .map_err(|e| TransferError::Protocol(format!("need for {path}: {e}")))?;
        if out.manifest.get(&path).and_then(Entry::hash) != Some(&want) {
            return Err(TransferError::Protocol(format!(
                "replica asked for {path} with a hash the manifest does not have"
            )));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let opened = tokio::task::block_in_place(|| fs::SendFile::open(&out.root, &path));
            let mut f = match opened {
                Ok(f) => f,
                Err(e) => {
                    tracing::info!(path = %path, error = %e, "file vanished or changed type before sending");
                    st.changed_since_scan += 1;
                    conn.send(Msg::FileAbort(pb::FileAbort {
                        file_id: need.file_id,
                        reason: e.to_string(),
                        retrying: false,
                    }))
                    .await?;
                    break;
                }
            };
            conn.send(Msg::FileBegin(pb::FileBegin {
                file_id: need.file_id,
                size: f.size(),
            }))
            .await?;
            let mut read_err = None;
            loop {
                let n = match tokio::task::block_in_place(|| f.read_chunk(&mut buf)) {
                    Ok(n) => n,
                    Err(e) => {
                        read_err = Some(e);
                        break;
                    }
                };
                if n == 0 {
                    break;
                }
                st.wire_bytes += conn
                    .send_data(need.file_id, &buf[..n], out.zstd_level)
                    .await?;
                paced += n as u64;
                pace(started, paced, out.max_rate_bytes_per_sec).await;
            }
            let finished = match read_err {
                Some(e) => Err(e),
                None => tokio::task::block_in_place(|| f.finish()),
            };
            match finished {
                Ok(sent) if sent.hash == want => {
                    conn.send(Msg::FileEnd(pb::FileEnd {
                        file_id: need.file_id,
                        size: sent.size,
                        hash: sent.hash.to_vec(),
                        mode: sent.mode,
                        mtime_sec: sent.mtime_sec,
                        mtime_nsec: sent.mtime_nsec,
                    }))
                    .await?;
                    st.files_sent += 1;
                    st.bytes_sent += sent.size;
                    break;
                }
                Ok(_) => {
                    // A consistent copy, but not the content the manifest promised: the
                    // file changed after the scan. The next round ships it.
                    st.changed_since_scan += 1;
                    conn.send(Msg::FileAbort(pb::FileAbort {
                        file_id: need.file_id,
                        reason: "changed since scan".into(),
                        retrying: false,
                    }))
                    .await?;
                    break;
                }
                Err(e) => {
                    st.resent += 1;
                    let retrying = attempt < READ_ATTEMPTS;
                    tracing::info!(path = %path, error = %e, retrying, "file changed while being read");
                    conn.send(Msg::FileAbort(pb::FileAbort {
                        file_id: need.file_id,
                        reason: e.to_string(),
                        retrying,
                    }))
                    .await?;
                    if !retrying {
                        st.changed_since_scan += 1;
                        break;
                    }
                }
            }
        }
    }
    conn.send(Msg::TransferEnd(pb::TransferEnd {})).await?;
    match conn.recv_msg().await? {
        Msg::ApplyResult(r) => {
            st.apply = r;
            Ok(st)
        }
        m => Err(TransferError::Protocol(format!(
            "expected ApplyResult, got {}",
            msg_name(&m)
        ))),
    }
}

async fn pace(started: Instant, sent: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
    let elapsed = started.elapsed();
    if due > elapsed {
        tokio::time::sleep(due - elapsed).await;
    }
}

/// What the replica side needs from its node.
#[derive(Debug, Clone)]
pub struct ReceiveContext {
    pub root: std::path::PathBuf,
    pub index_path: std::path::PathBuf,
    pub owner: bool,
}

/// Replica-side outcome, for status and logs.
#[derive(Debug, Clone, Default)]
pub struct ReceiveStats {
    pub entries: u64,
    pub fetched_files: u64,
    pub fetched_bytes: u64,
    pub apply: pb::ApplyResult,
}

/// Runs the replica side after `TransferBegin` was received and authorised.
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    begin: &pb::TransferBegin,
    ctx: &ReceiveContext,
) -> Result<ReceiveStats, TransferError> {
    if begin.entry_count > MAX_ENTRIES {
        return Err(TransferError::BadManifest(format!(
            "{} entries is more than {MAX_ENTRIES}",
            begin.entry_count
        )));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(begin.entry_count.min(1 << 20) as usize);
    loop {
        match conn.recv_msg().await? {
            Msg::ManifestChunk(c) => {
                for e in c.entries {
                    entries.push(
                        Entry::try_from(e)
                            .map_err(|e| TransferError::BadManifest(e.to_string()))?,
                    );
                }
                if entries.len() as u64 > begin.entry_count {
                    return Err(TransferError::BadManifest(
                        "more entries than announced".into(),
                    ));
                }
                if c.last {
                    break;
                }
            }
            m => {
                return Err(TransferError::Protocol(format!(
                    "expected ManifestChunk, got {}",
                    msg_name(&m)
                )));
            }
        }
    }
    let desired =
        Manifest::from_entries(entries).map_err(|e| TransferError::BadManifest(e.to_string()))?;
    let owner = ctx.owner;
    let (root, plan) = tokio::task::block_in_place(|| -> Result<(Root, Plan), TransferError> {
        let root = Root::open(&ctx.root)?;
        let mut index = fs::HashIndex::load(&ctx.index_path);
        let (local, _) = fs::scan(&root, &mut index)?;
        index.save(&ctx.index_path)?;
        let plan = cd_core::plan::plan(&desired, &local, PlanOptions { owner });
        Ok((root, plan))
    })?;
    let mut stats = ReceiveStats {
        entries: desired.len() as u64,
        fetched_files: plan.fetch.len() as u64,
        fetched_bytes: plan.stats.fetch_bytes,
        ..Default::default()
    };

    let needs: Vec<pb::Need> = plan
        .fetch
        .iter()
        .enumerate()
        .map(|(i, f)| pb::Need {
            file_id: i as u32,
            path: f.path.as_bytes().to_vec(),
            hash: f.hash.to_vec(),
        })
        .collect();
    // A need carries a path (up to 4 KiB) and a hash: 128 per chunk stays under CHUNK_BYTES.
    let mut chunks = needs.chunks(128).peekable();
    if chunks.peek().is_none() {
        conn.send(Msg::NeedList(pb::NeedList {
            needs: vec![],
            last: true,
        }))
        .await?;
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        conn.send(Msg::NeedList(pb::NeedList {
            needs: c.to_vec(),
            last,
        }))
        .await?;
    }

    let mut stage = tokio::task::block_in_place(|| fs::Stage::new(&root))?;
    // apply() fsyncs each staged file right before renaming it into place.
    stage.set_fsync(false);
    let mut open: Option<u32> = None;
    let mut skipped = 0u64;
    loop {
        match conn.recv().await? {
            Incoming::Data { file_id, bytes } => {
                if open != Some(file_id) {
                    return Err(TransferError::Protocol(format!(
                        "data for file {file_id}, which is not open"
                    )));
                }
                tokio::task::block_in_place(|| stage.write(file_id, &bytes))?;
            }
            Incoming::Control(Msg::FileBegin(b)) => {
                let f = plan.fetch.get(b.file_id as usize).ok_or_else(|| {
                    TransferError::Protocol(format!("FileBegin for unknown file {}", b.file_id))
                })?;
                if let Some(prev) = open.take() {
                    return Err(TransferError::Protocol(format!(
                        "FileBegin {} while file {prev} is open",
                        b.file_id
                    )));
                }
                tokio::task::block_in_place(|| stage.begin(b.file_id, f.hash))?;
                open = Some(b.file_id);
            }
            Incoming::Control(Msg::FileEnd(e)) => {
                if open.take() != Some(e.file_id) {
                    return Err(TransferError::Protocol(format!(
                        "FileEnd for file {}, which is not open",
                        e.file_id
                    )));
                }
                let hash = cd_proto::convert::hash_from_bytes(&e.hash).map_err(|err| {
                    TransferError::Protocol(format!("FileEnd {}: {err}", e.file_id))
                })?;
                if let Err(err) =
                    tokio::task::block_in_place(|| stage.finish(e.file_id, hash, e.size))
                {
                    // Corrupt content never reaches its final path; the file keeps its
                    // old version and the job reports the skip.
                    tracing::warn!(file_id = e.file_id, error = %err, "staged content rejected");
                    stage.abort_file(e.file_id);
                    skipped += 1;
                }
            }
            Incoming::Control(Msg::FileAbort(a)) => {
                if open.take() == Some(a.file_id) {
                    stage.abort_file(a.file_id);
                }
                if !a.retrying {
                    skipped += 1;
                }
            }
            Incoming::Control(Msg::TransferEnd(_)) => break,
            Incoming::Control(m) => {
                return Err(TransferError::Protocol(format!(
                    "unexpected {} during file transfer",
                    msg_name(&m)
                )));
            }
        }
    }
    let opts = fs::ApplyOptions { owner, fsync: true };
    let report = tokio::task::block_in_place(|| fs::apply(&root, &mut stage, &plan, &opts))?;
    drop(stage);
    stats.apply = pb::ApplyResult {
        ok: report.errors.is_empty(),
        error: report.errors.join("; "),
        placed_files: report.placed_files,
        reused_local: report.reused_local,
        removed: report.removed,
        meta_only: report.meta_only,
        created_dirs: report.created_dirs,
        skipped: report.skipped.max(skipped),
    };
    conn.send(Msg::ApplyResult(stats.apply.clone())).await?;
    Ok(stats)
}
