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
//! file) is moved locally, never re-sent, and a drifted replica is repaired. What it
//! plans towards is what the source sent passed through the content set's filter
//! ([`Filter::reconcile_target`]): entries the filter excludes are never taken from the
//! source and never removed from the replica, and the command mask holds (with
//! `delete` off, a file the source no longer has stays). The source filters too; the
//! replica does not rely on it. A file
//! that changes while the source reads it is detected by comparing `fstat` before and
//! after the read and by its hash; it is re-read (torn copies are never shipped), and
//! content that differs from the manifest is aborted and left for the next round of
//! the same job.
//!
//! A dry run ([`dryrun`]) is the same exchange up to the need list; then the source
//! ends it without sending any file and the replica answers with its plan, applying
//! nothing.
//!
//! On a relay both sides run at once (cut-through, [`relay`](crate::relay)): its
//! [`receive`] publishes the plan and each verified staged content through
//! [`ReceiveContext::tap`], and the [`send`]s to its children, given
//! [`Outgoing::upstream`], announce the same body at once, send each needed file from
//! the relay's stage as soon as it is verified there (the rest from the root once the
//! relay applied), and send `TransferEnd` only after the relay's own receive
//! completed. If it failed, they fail before `TransferEnd` and the children apply
//! nothing.

pub mod dryrun;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cd_core::changeset::{Change, ChangeBody, ChangeSet};
use cd_core::delta::{DumpPolicy, Signature};
use cd_core::filter::Filter;
use cd_core::manifest::{Entry, EntryKind, Hash, Manifest};
use cd_core::path::RelPath;
use cd_core::plan::{Plan, PlanOptions};
use cd_proto::pb::{self, envelope::Msg};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::delta::{self, Base, DeltaCache};
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
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub content_set: String,
    pub origin: String,
    pub seq: u64,
    pub job_id: u64,
    pub body: OutBody,
    pub root: Arc<Root>,
    pub zstd_level: i32,
    pub max_rate_bytes_per_sec: u64,
    /// Deltas where they pay, or whole files only.
    pub delta: pb::DeltaMode,
    /// The source's signature cache and patch memo, shared by all its transfers.
    pub cache: Arc<DeltaCache>,
    /// On a relay forwarding while it still receives: where content comes from
    /// before it is in `root` ([`relay`](crate::relay)). `None`: `root` holds it all.
    pub upstream: Option<crate::relay::Upstream>,
    /// N:M content sets: the versions the body carries (see [`crate::nm`]).
    pub versions: Option<Arc<OutVersions>>,
}

/// The versions of an N:M body ([`Outgoing::versions`]).
#[derive(Debug, Clone)]
pub enum OutVersions {
    /// One per change of an incremental body, in order.
    Changes(Vec<pb::LwwVersion>),
    /// A full manifest's: every entry's, and the sender's tombstones.
    Full(Vec<pb::PathVersion>),
}

/// N:M: the `VersionChunk`s that follow a full manifest (nothing for other sets).
pub(crate) async fn send_full_versions<S: AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
) -> Result<(), TransferError> {
    let Some(v) = &out.versions else {
        return Ok(());
    };
    let OutVersions::Full(v) = &**v else {
        return Err(TransferError::Protocol(
            "a full body with per-change versions".into(),
        ));
    };
    send_chunked(conn, v.clone(), |versions, last| {
        Msg::VersionChunk(pb::VersionChunk { versions, last })
    })
    .await
}

/// What a transfer carries.
#[derive(Debug, Clone)]
pub enum OutBody {
    /// The whole tree: the replica reconciles against its own scan.
    Full(Arc<Manifest>),
    /// Changes on top of change set `base_seq`, which the replica must hold.
    Incremental {
        base_seq: u64,
        changes: Arc<Vec<Change>>,
    },
}

impl OutBody {
    /// The regular files this body announces, by path: built once per transfer, so
    /// checking each need costs a lookup, not a scan of an incremental body.
    fn files(&self) -> HashMap<&RelPath, &Entry> {
        let file = |e: &&Entry| matches!(e.kind, EntryKind::File { .. });
        match self {
            OutBody::Full(m) => m.iter().filter(file).map(|e| (&e.path, e)).collect(),
            OutBody::Incremental { changes, .. } => {
                let mut out = HashMap::new();
                // The last change of a path decides what it is.
                for c in changes.iter() {
                    match c {
                        Change::Upsert(e) if file(&e) => {
                            out.insert(&e.path, e);
                        }
                        Change::Upsert(e) => {
                            out.remove(&e.path);
                        }
                        _ => {}
                    }
                }
                out
            }
        }
    }
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
    /// The replica could not apply an incremental body: send it a full manifest.
    pub need_full: bool,
    /// Files sent as deltas, their content bytes, and the patch bytes that carried them.
    pub delta_files: u64,
    pub delta_bytes: u64,
    pub patch_bytes: u64,
    /// Bases whose signature the replica had to send (not in the source's cache).
    pub signature_exchanges: u64,
}

/// Runs the source side over an established, `Hello`-ed connection.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
) -> Result<SendStats, TransferError> {
    let mut st = SendStats::default();
    let (full, count, base_seq) = match &out.body {
        OutBody::Full(m) => (true, m.len() as u64, 0),
        OutBody::Incremental { base_seq, changes } => (false, changes.len() as u64, *base_seq),
    };
    conn.send(Msg::TransferBegin(pb::TransferBegin {
        content_set: out.content_set.clone(),
        origin: out.origin.clone(),
        seq: out.seq,
        job_id: out.job_id,
        full,
        entry_count: count,
        base_seq,
        dry_run: false,
        versioned: out.versions.is_some(),
    }))
    .await?;
    match &out.body {
        OutBody::Full(m) => {
            let items: Vec<pb::Entry> = m.iter().map(pb::Entry::from).collect();
            send_chunked(conn, items, |entries, last| {
                Msg::ManifestChunk(pb::ManifestChunk { entries, last })
            })
            .await?;
            send_full_versions(conn, out).await?;
        }
        OutBody::Incremental { changes, .. } => {
            let mut items: Vec<pb::Change> = changes.iter().map(pb::Change::from).collect();
            if let Some(v) = &out.versions {
                match &**v {
                    OutVersions::Changes(v) if v.len() == items.len() => {
                        for (c, v) in items.iter_mut().zip(v) {
                            c.version = Some(v.clone());
                        }
                    }
                    _ => {
                        return Err(TransferError::Protocol(
                            "an incremental body without one version per change".into(),
                        ));
                    }
                }
            }
            send_chunked(conn, items, |changes, last| {
                Msg::ChangeChunk(pb::ChangeChunk { changes, last })
            })
            .await?
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
            Msg::ApplyResult(r) if r.need_full && !full => {
                st.need_full = true;
                st.apply = r;
                return Ok(st);
            }
            m => {
                return Err(TransferError::Protocol(format!(
                    "expected NeedList, got {}",
                    msg_name(&m)
                )));
            }
        }
    }

    // Check every need before any work, and find which can go as deltas.
    let policy = DumpPolicy::default();
    let files = out.body.files();
    let mut checked = Vec::with_capacity(needs.len());
    for need in needs {
        let path = RelPath::new(need.path.clone())
            .map_err(|e| TransferError::Protocol(format!("need for invalid path: {e}")))?;
        let want = cd_proto::convert::hash_from_bytes(&need.hash)
            .map_err(|e| TransferError::Protocol(format!("need for {path}: {e}")))?;
        let Some(entry) = files
            .get(&path)
            .copied()
            .filter(|e| e.hash() == Some(&want))
        else {
            return Err(TransferError::Protocol(format!(
                "replica asked for {path} with a hash the manifest does not have"
            )));
        };
        let base = if need.base_hash.is_empty() {
            None
        } else {
            let h = cd_proto::convert::hash_from_bytes(&need.base_hash)
                .map_err(|e| TransferError::Protocol(format!("need for {path}: base {e}")))?;
            Some(Base {
                hash: h,
                size: need.base_size,
            })
        };
        checked.push(Checked {
            need,
            path,
            want,
            entry,
            base,
        });
    }
    let sigs = signatures(conn, out, &policy, &checked, &mut st).await?;
    if let Some(up) = &out.upstream {
        // What comes through the relay's stage first, in order; then what must wait
        // for its apply.
        checked.sort_by_key(|c| !up.cut_through(&c.want));
    }

    let started = Instant::now();
    let mut paced: u64 = 0;
    for Checked {
        need,
        path,
        want,
        entry,
        ..
    } in checked
    {
        if let Some(up) = &out.upstream
            && let crate::relay::Ready::Staged(staged) = up.ready(&want).await?
        {
            let sent = crate::relay::send_staged(
                conn,
                out,
                &staged,
                entry,
                need.file_id,
                want,
                sigs.get(&need.file_id).map(|s| &**s),
                &mut st,
                started,
                &mut paced,
            )
            .await?;
            if sent {
                continue;
            }
            up.finished().await?;
        }
        if let Some(sig) = sigs.get(&need.file_id) {
            let outcome = out.cache.patch(&out.root, &path, sig, &want, &policy).await;
            match outcome {
                Ok(delta::Outcome::Patch(g)) => {
                    let end = file_end(need.file_id, &g.sent);
                    send_patch(
                        conn,
                        out,
                        need.file_id,
                        &g,
                        sig,
                        end,
                        started,
                        &mut paced,
                        &mut st,
                    )
                    .await?;
                    continue;
                }
                Ok(delta::Outcome::Changed) => {
                    st.changed_since_scan += 1;
                    abort(conn, need.file_id, "changed since scan", false).await?;
                    continue;
                }
                Ok(delta::Outcome::Whole) => {}
                Err(e) => {
                    tracing::info!(path = %path, error = %e, "delta generation failed; sending the whole file");
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match crate::sendfile::try_send(
                conn,
                out,
                entry,
                need.file_id,
                want,
                attempt < READ_ATTEMPTS,
                &mut st,
                started,
                &mut paced,
            )
            .await?
            {
                crate::sendfile::ZeroCopied::NotUsed => {}
                crate::sendfile::ZeroCopied::Finished => break,
                crate::sendfile::ZeroCopied::Retry => continue,
            }
            let opened = tokio::task::block_in_place(|| fs::SendFile::open(&out.root, &path));
            let f = match opened {
                Ok(f) => f,
                Err(e) => {
                    tracing::info!(path = %path, error = %e, "file vanished or changed type before sending");
                    st.changed_since_scan += 1;
                    abort(conn, need.file_id, e.to_string(), false).await?;
                    break;
                }
            };
            let finished =
                stream_file(conn, out, need.file_id, f, started, &mut paced, &mut st).await?;
            match finished {
                Ok(sent) if sent.hash == want => {
                    conn.send(Msg::FileEnd(file_end(need.file_id, &sent)))
                        .await?;
                    st.files_sent += 1;
                    st.bytes_sent += sent.size;
                    break;
                }
                Ok(_) => {
                    // A consistent copy, but not the content the manifest promised: the
                    // file changed after the scan. The next round ships it.
                    st.changed_since_scan += 1;
                    abort(conn, need.file_id, "changed since scan", false).await?;
                    break;
                }
                Err(e) => {
                    st.resent += 1;
                    let retrying = attempt < READ_ATTEMPTS;
                    tracing::info!(path = %path, error = %e, retrying, "file changed while being read");
                    abort(conn, need.file_id, e.to_string(), retrying).await?;
                    if !retrying {
                        st.changed_since_scan += 1;
                        break;
                    }
                }
            }
        }
    }
    if let Some(up) = &out.upstream {
        // The replica applies on TransferEnd: never before this relay's own transfer
        // completed.
        up.finished().await?;
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

/// Sends file `file_id` as the delta `g` against the replica's `sig`: `FileBegin`, the
/// patch in paced data frames, then `end`; counts it in `st`.
#[expect(
    clippy::too_many_arguments,
    reason = "the pieces of one send, as stream_file takes them"
)]
pub(crate) async fn send_patch<S: AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
    file_id: u32,
    g: &delta::Generated,
    sig: &Signature,
    end: pb::FileEnd,
    started: Instant,
    paced: &mut u64,
    st: &mut SendStats,
) -> Result<(), TransferError> {
    conn.send(Msg::FileBegin(pb::FileBegin {
        file_id,
        size: g.sent.size,
        patch_size: g.patch.len() as u64,
        base_hash: sig.base().hash.to_vec(),
    }))
    .await?;
    for chunk in g.patch.chunks(cd_proto::frame::MAX_CHUNK_RAW) {
        st.wire_bytes += conn.send_data(file_id, chunk, out.zstd_level).await?;
        *paced += chunk.len() as u64;
        pace(started, *paced, out.max_rate_bytes_per_sec).await;
    }
    conn.send(Msg::FileEnd(end)).await?;
    st.files_sent += 1;
    st.bytes_sent += g.sent.size;
    st.delta_files += 1;
    st.delta_bytes += g.sent.size;
    st.patch_bytes += g.patch.len() as u64;
    Ok(())
}

/// Sends one whole file: `FileBegin`, its content in paced data frames, and returns
/// what was read (its size and hash, for `FileEnd`), or the read error that stopped it
/// (the caller aborts the file).
pub(crate) async fn stream_file<S: AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
    file_id: u32,
    mut f: fs::SendFile,
    started: Instant,
    paced: &mut u64,
    st: &mut SendStats,
) -> Result<Result<fs::SentFile, fs::FsError>, TransferError> {
    conn.send(Msg::FileBegin(pb::FileBegin {
        file_id,
        size: f.size(),
        ..Default::default()
    }))
    .await?;
    loop {
        // With io_uring the chunk is the registered buffer the kernel read into: no
        // copy on the way to the socket.
        let chunk = match tokio::task::block_in_place(|| f.next_chunk()) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len() as u64;
        st.wire_bytes += conn.send_data(file_id, chunk, out.zstd_level).await?;
        *paced += n;
        pace(started, *paced, out.max_rate_bytes_per_sec).await;
    }
    Ok(tokio::task::block_in_place(|| f.finish()))
}

/// Tells the replica to drop file `file_id`; `retrying`: a fresh `FileBegin` follows.
async fn abort<S: AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    file_id: u32,
    reason: impl Into<String>,
    retrying: bool,
) -> Result<(), TransferError> {
    conn.send(Msg::FileAbort(pb::FileAbort {
        file_id,
        reason: reason.into(),
        retrying,
    }))
    .await?;
    Ok(())
}

/// A need the source checked against what it announced.
struct Checked<'a> {
    need: pb::Need,
    path: RelPath,
    want: Hash,
    /// What the source announced for the path (a regular file of content `want`).
    entry: &'a Entry,
    /// The replica's version at the path, if it named one.
    base: Option<Base>,
}

fn file_end(file_id: u32, sent: &fs::SentFile) -> pb::FileEnd {
    pb::FileEnd {
        file_id,
        size: sent.size,
        hash: sent.hash.to_vec(),
        mode: sent.mode,
        mtime_sec: sent.mtime_sec,
        mtime_nsec: sent.mtime_nsec,
    }
}

/// Finds the signature of every base a delta should be made against: from the cache
/// (the broadcast case, no round trip) or, for the rest, from the replica (one
/// `SignatureRequest`, always sent, possibly empty). Returns them by file id.
async fn signatures<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
    policy: &DumpPolicy,
    checked: &[Checked<'_>],
    st: &mut SendStats,
) -> Result<HashMap<u32, Arc<Signature>>, TransferError> {
    use cd_core::delta::{Decision, decide};
    let mut sigs = HashMap::new();
    let mut request = Vec::new();
    if out.delta != pb::DeltaMode::Never {
        for c in checked {
            let Some(base) = c.base else {
                continue;
            };
            let size = match c.entry.kind {
                EntryKind::File { size, .. } => size,
                _ => continue,
            };
            if base.hash == c.want || decide(policy, Some(base.size), size, None) != Decision::Delta
            {
                continue;
            }
            match out.cache.signature(&base.hash, base.size) {
                Some(sig) => {
                    sigs.insert(c.need.file_id, sig);
                }
                None => request.push((c.need.file_id, base)),
            }
        }
    }
    conn.send(Msg::SignatureRequest(pb::SignatureRequest {
        file_ids: request.iter().map(|r| r.0).collect(),
    }))
    .await?;
    for (file_id, base) in request {
        let mut data = Vec::new();
        loop {
            match conn.recv_msg().await? {
                Msg::SignaturePart(p) if p.file_id == file_id => {
                    if data.len() + p.data.len() > delta::MAX_SIGNATURE_BYTES {
                        return Err(TransferError::Protocol(format!(
                            "signature for file {file_id} is larger than {} bytes",
                            delta::MAX_SIGNATURE_BYTES
                        )));
                    }
                    data.extend_from_slice(&p.data);
                    if p.last {
                        break;
                    }
                }
                m => {
                    return Err(TransferError::Protocol(format!(
                        "expected the signature of file {file_id}, got {}",
                        msg_name(&m)
                    )));
                }
            }
        }
        if data.is_empty() {
            // The replica's base changed or vanished: the file goes whole.
            continue;
        }
        let sig = Signature::decode(&data)
            .map_err(|e| TransferError::Protocol(format!("signature for file {file_id}: {e}")))?;
        if sig.base().hash != base.hash || sig.base().len != base.size {
            return Err(TransferError::Protocol(format!(
                "signature for file {file_id} is not of the base the replica named"
            )));
        }
        let sig = Arc::new(sig);
        out.cache.remember(sig.clone());
        sigs.insert(file_id, sig);
        st.signature_exchanges += 1;
    }
    Ok(sigs)
}

/// Sends `items` as chunk messages bounded by entries and encoded bytes (paths can be
/// 4 KiB each), well under the receiver's control frame bound. At least one chunk (the
/// last) is always sent.
async fn send_chunked<S, T>(
    conn: &mut Conn<S>,
    items: Vec<T>,
    make: fn(Vec<T>, bool) -> Msg,
) -> Result<(), TransferError>
where
    S: AsyncWrite + Unpin,
    T: prost::Message,
{
    let mut chunk: Vec<T> = Vec::new();
    let mut bytes = 0usize;
    let mut it = items.into_iter().peekable();
    loop {
        if let Some(item) = it.next() {
            bytes += item.encoded_len() + 4;
            chunk.push(item);
        }
        let last = it.peek().is_none();
        if last || chunk.len() >= CHUNK_ENTRIES || bytes >= CHUNK_BYTES {
            conn.send(make(std::mem::take(&mut chunk), last)).await?;
            bytes = 0;
        }
        if last {
            return Ok(());
        }
    }
}

pub(crate) async fn pace(started: Instant, sent: u64, rate: u64) {
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
    /// Where [`ReplicaState::last_applied`] is persisted.
    pub state_path: std::path::PathBuf,
    pub owner: bool,
    /// The content set's filter, as this node was assigned it.
    pub filter: Arc<Filter>,
    /// On a relay that forwards while it receives: told the plan and each verified
    /// staged content as they happen ([`relay`](crate::relay)).
    pub tap: Option<Arc<crate::relay::Tap>>,
    /// An N:M content set: its version store (see [`crate::nm`]); every transfer
    /// must be versioned and is applied last-writer-wins per path.
    pub nm: Option<Arc<crate::nm::NmSet>>,
    /// N:M: this node is one of the sources (its unversioned paths are its own
    /// writes not yet captured, never removed by a reconcile).
    pub nm_source: bool,
}

/// Replica-side outcome, for status and logs. The caller answers the source with
/// `apply` (after forwarding, on a relay).
#[derive(Debug, Clone, Default)]
pub struct ReceiveStats {
    pub entries: u64,
    pub fetched_files: u64,
    pub fetched_bytes: u64,
    pub apply: pb::ApplyResult,
    /// The body as received, for a relay to forward to its children: set when the
    /// change set was planned and applied (whatever the apply's outcome).
    pub forward: Option<OutBody>,
}

/// What a replica remembers between transfers of one content set.
#[derive(Debug, Default)]
pub struct ReplicaState {
    /// Its tree as of the last complete apply (saves a scan per incremental change set).
    pub local: Option<Manifest>,
    /// `(origin, seq)` of the last change set applied completely.
    pub last_applied: Option<(String, u64)>,
}

impl ReplicaState {
    /// Loads `last_applied` from `path` (the cached tree is never persisted: after a
    /// restart the first incremental change set triggers a scan).
    pub fn load(path: &std::path::Path) -> Self {
        let last_applied = std::fs::read_to_string(path).ok().and_then(|s| {
            let (origin, seq) = s.trim().rsplit_once(' ')?;
            Some((origin.to_owned(), seq.parse().ok()?))
        });
        Self {
            local: None,
            last_applied,
        }
    }

    fn save(&self, path: &std::path::Path) {
        let tmp = path.with_extension("tmp");
        let body = match &self.last_applied {
            Some((o, s)) => format!("{o} {s}\n"),
            None => String::new(),
        };
        if std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::warn!(path = %path.display(), "could not persist the applied sequence number");
        }
    }
}

/// The replica's root, its plan, the tree it plans towards, and the delta base it
/// holds for each file it fetches.
type Planned = (Root, Plan, Manifest, Vec<Option<Base>>);

/// Answers the source's `SignatureRequest` (always sent after the need list): the
/// signature of each base it asks for, in its order, or an empty run where the base
/// is gone or changed. Only bases this replica offered may be asked for, once each.
async fn send_signatures<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    root: &Root,
    plan: &Plan,
    bases: &[Option<Base>],
) -> Result<(), TransferError> {
    let req = match conn.recv_msg().await? {
        Msg::SignatureRequest(r) => r,
        m => {
            return Err(TransferError::Protocol(format!(
                "expected SignatureRequest, got {}",
                msg_name(&m)
            )));
        }
    };
    let mut seen = std::collections::HashSet::new();
    for file_id in req.file_ids {
        let Some(base) = bases.get(file_id as usize).copied().flatten() else {
            return Err(TransferError::Protocol(format!(
                "signature asked for file {file_id}, which has no base here"
            )));
        };
        if !seen.insert(file_id) {
            return Err(TransferError::Protocol(format!(
                "signature asked twice for file {file_id}"
            )));
        }
        let path = &plan.fetch[file_id as usize].path;
        let sig = tokio::task::block_in_place(|| {
            delta::base_signature(root, path, base)
        })
        .unwrap_or_else(|e| {
            tracing::info!(path = %path, error = %e, "cannot sign the delta base; the file comes whole");
            None
        });
        let data = sig.map(|s| s.encode()).unwrap_or_default();
        let mut parts = data.chunks(delta::SIGNATURE_PART_BYTES).peekable();
        if parts.peek().is_none() {
            conn.send(Msg::SignaturePart(pb::SignaturePart {
                file_id,
                data: Vec::new(),
                last: true,
            }))
            .await?;
        }
        while let Some(part) = parts.next() {
            conn.send(Msg::SignaturePart(pb::SignaturePart {
                file_id,
                data: part.to_vec(),
                last: parts.peek().is_none(),
            }))
            .await?;
        }
    }
    Ok(())
}

/// Runs the replica side after `TransferBegin` was received and authorised, up to
/// (not including) the `ApplyResult` answer, which the caller sends.
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    begin: &pb::TransferBegin,
    ctx: &ReceiveContext,
    state: &mut ReplicaState,
) -> Result<ReceiveStats, TransferError> {
    if begin.dry_run && !begin.full {
        return Err(TransferError::Protocol(
            "a dry run must carry a full manifest".into(),
        ));
    }
    if begin.entry_count > MAX_ENTRIES {
        return Err(TransferError::BadManifest(format!(
            "{} entries is more than {MAX_ENTRIES}",
            begin.entry_count
        )));
    }
    if begin.versioned != ctx.nm.is_some() {
        return Err(TransferError::Refused(if begin.versioned {
            "a versioned (N:M) transfer for a content set with one source here".into()
        } else {
            "an unversioned transfer for an N:M content set".into()
        }));
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut changes: Vec<Change> = Vec::new();
    let mut versions: Vec<Option<pb::LwwVersion>> = Vec::new();
    loop {
        let (n, last) = match conn.recv_msg().await? {
            Msg::ManifestChunk(c) if begin.full => {
                for e in c.entries {
                    entries.push(
                        Entry::try_from(e)
                            .map_err(|e| TransferError::BadManifest(e.to_string()))?,
                    );
                }
                (entries.len(), c.last)
            }
            Msg::ChangeChunk(c) if !begin.full => {
                for mut ch in c.changes {
                    versions.push(ch.version.take());
                    changes.push(
                        Change::try_from(ch)
                            .map_err(|e| TransferError::BadManifest(e.to_string()))?,
                    );
                }
                (changes.len(), c.last)
            }
            m => {
                return Err(TransferError::Protocol(format!(
                    "expected {} chunk, got {}",
                    if begin.full { "a manifest" } else { "a change" },
                    msg_name(&m)
                )));
            }
        };
        if n as u64 > begin.entry_count {
            return Err(TransferError::BadManifest(
                "more entries than announced".into(),
            ));
        }
        if last {
            break;
        }
    }
    // N:M: per-path versions instead of one sequence to follow (see crate::nm).
    let mut nm_versions = Vec::new();
    if let Some(nm) = &ctx.nm {
        if begin.full {
            nm_versions = recv_versions(conn, begin.entry_count).await?;
        } else if nm.last_seq(&begin.origin) != begin.base_seq {
            tracing::info!(content_set = %begin.content_set, origin = %begin.origin, base_seq = begin.base_seq, holds = nm.last_seq(&begin.origin), "N:M change set does not follow what this replica holds of its origin; asking for a full manifest");
            return Ok(ReceiveStats {
                apply: pb::ApplyResult {
                    need_full: true,
                    ..Default::default()
                },
                ..Default::default()
            });
        }
    }
    if ctx.nm.is_none()
        && !begin.full
        && state.last_applied.as_ref() != Some(&(begin.origin.clone(), begin.base_seq))
    {
        // A gap (or no base at all, e.g. after a restart): this replica cannot know
        // what the changes apply to. Ask for the whole tree instead of guessing.
        tracing::info!(
            content_set = %begin.content_set,
            base_seq = begin.base_seq,
            last = ?state.last_applied,
            "incremental change set does not follow what this replica holds; asking for a full manifest"
        );
        return Ok(ReceiveStats {
            apply: pb::ApplyResult {
                need_full: true,
                ..Default::default()
            },
            ..Default::default()
        });
    }
    if let Some((origin, seq)) = &state.last_applied
        && ctx.nm.is_none()
        && begin.full
        && *origin == begin.origin
        && begin.seq < *seq
    {
        // A relay that fell behind (or a late retry) must never roll this replica
        // back: what it holds from the same origin is newer.
        tracing::info!(content_set = %begin.content_set, seq = begin.seq, holds = seq, "refused a full change set older than what this replica holds");
        drain_files(conn).await?;
        return Ok(ReceiveStats {
            apply: pb::ApplyResult {
                stale: true,
                error: format!(
                    "holds change set {seq} of `{origin}`, newer than {}",
                    begin.seq
                ),
                ..Default::default()
            },
            ..Default::default()
        });
    }
    // An N:M set is routed directly: nothing is passed on.
    let forward = if ctx.nm.is_some() {
        None
    } else if begin.full {
        Some(OutBody::Full(Arc::new(
            Manifest::from_entries(entries.clone())
                .map_err(|e| TransferError::BadManifest(e.to_string()))?,
        )))
    } else {
        Some(OutBody::Incremental {
            base_seq: begin.base_seq,
            changes: Arc::new(changes.clone()),
        })
    };
    let owner = ctx.owner;
    // N:M: members write locally too, so the tree is scanned every time.
    let cached = if begin.full || ctx.nm.is_some() {
        None
    } else {
        state.local.take()
    };
    let mut nm_outcome = None;
    state.local = None;
    let (root, plan, desired, bases) =
        tokio::task::block_in_place(|| -> Result<Planned, TransferError> {
            let root = Root::open(&ctx.root)?;
            let local = match cached {
                Some(m) => m,
                None => {
                    let mut index = fs::HashIndex::load(&ctx.index_path);
                    let (local, _) = fs::scan(&root, &mut index)?;
                    index.save(&ctx.index_path)?;
                    local
                }
            };
            let received = if let Some(nm) = &ctx.nm {
                let (tree, outcome) = crate::nm::received(
                    nm,
                    &local,
                    begin,
                    entries,
                    changes,
                    versions,
                    std::mem::take(&mut nm_versions),
                    ctx.nm_source,
                )?;
                nm_outcome = Some(outcome);
                Ok::<_, cd_core::manifest::ManifestError>(tree)
            } else if begin.full {
                Manifest::from_entries(entries)
            } else {
                ChangeSet {
                    origin: begin.origin.clone(),
                    seq: begin.seq,
                    body: ChangeBody::Incremental(changes),
                }
                .desired(&local)
            }
            .map_err(|e| TransferError::BadManifest(e.to_string()))?;
            // An incremental body is judged by the tree it leads to: a rename the mask
            // forbids becomes its create and delete parts, each subject to the mask.
            let desired = if ctx.filter.is_noop() {
                received
            } else {
                ctx.filter.reconcile_target(&received, &local)
            };
            let plan = cd_core::plan::plan(&desired, &local, PlanOptions { owner });
            // What this replica holds at each path it fetches: a base for a delta.
            let bases = plan
                .fetch
                .iter()
                .map(|f| match local.get(&f.path).map(|e| &e.kind) {
                    Some(EntryKind::File { hash, size, .. }) if *hash != f.hash => Some(Base {
                        hash: *hash,
                        size: *size,
                    }),
                    _ => None,
                })
                .collect();
            Ok((root, plan, desired, bases))
        })?;
    let mut stats = ReceiveStats {
        entries: desired.len() as u64,
        fetched_files: plan.fetch.len() as u64,
        fetched_bytes: plan.stats.fetch_bytes,
        forward,
        ..Default::default()
    };
    if let (Some(tap), Some(body)) = (&ctx.tap, &stats.forward)
        && !begin.dry_run
    {
        tap.planned(body, plan.fetch.iter().map(|f| f.hash));
    }

    let needs: Vec<pb::Need> = plan
        .fetch
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (base_hash, base_size) = match bases[i] {
                Some(b) => (b.hash.to_vec(), b.size),
                None => (Vec::new(), 0),
            };
            pb::Need {
                file_id: i as u32,
                path: f.path.as_bytes().to_vec(),
                hash: f.hash.to_vec(),
                base_hash,
                base_size,
            }
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

    send_signatures(conn, &root, &plan, &bases).await?;
    if begin.dry_run {
        return dryrun::answer(conn, &plan, stats).await;
    }

    let mut stage = tokio::task::block_in_place(|| fs::Stage::new(&root))?;
    // apply() fsyncs each staged file right before renaming it into place.
    stage.set_fsync(false);
    let mut open: Option<u32> = None;
    // The patch being received for the open file, if it comes as a delta.
    let mut patch: Option<(Vec<u8>, u64)> = None;
    let mut skipped = 0u64;
    loop {
        match conn.recv().await? {
            Incoming::Data { file_id, bytes } => {
                if open != Some(file_id) {
                    return Err(TransferError::Protocol(format!(
                        "data for file {file_id}, which is not open"
                    )));
                }
                match &mut patch {
                    Some((buf, size)) => {
                        if (buf.len() + bytes.len()) as u64 > *size {
                            return Err(TransferError::Protocol(format!(
                                "file {file_id}: more patch bytes than announced"
                            )));
                        }
                        buf.extend_from_slice(&bytes);
                    }
                    None => tokio::task::block_in_place(|| stage.write(file_id, &bytes))?,
                }
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
                patch = None;
                if b.patch_size > 0 {
                    let base = bases[b.file_id as usize];
                    if base.map(|b| b.hash.to_vec()) != Some(b.base_hash.clone()) {
                        return Err(TransferError::Protocol(format!(
                            "file {}: a delta against a base this replica did not offer",
                            b.file_id
                        )));
                    }
                    if b.patch_size > delta::MAX_PATCH_BYTES {
                        return Err(TransferError::Protocol(format!(
                            "file {}: a patch of {} bytes (at most {} accepted)",
                            b.file_id,
                            b.patch_size,
                            delta::MAX_PATCH_BYTES
                        )));
                    }
                    patch = Some((Vec::new(), b.patch_size));
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
                let built = match patch.take() {
                    Some((bytes, size)) if bytes.len() as u64 != size => {
                        return Err(TransferError::Protocol(format!(
                            "file {}: {} patch bytes, {size} announced",
                            e.file_id,
                            bytes.len()
                        )));
                    }
                    Some((bytes, _)) => {
                        let f = &plan.fetch[e.file_id as usize];
                        let base = bases[e.file_id as usize].expect("checked at FileBegin");
                        tokio::task::block_in_place(|| {
                            delta::apply_patch(
                                &root, &f.path, &bytes, base, &hash, &mut stage, e.file_id,
                            )
                        })
                    }
                    None => Ok(()),
                };
                let finished = built.map_err(|e| e.to_string()).and_then(|()| {
                    tokio::task::block_in_place(|| stage.finish(e.file_id, hash, e.size))
                        .map_err(|e| e.to_string())
                });
                if let Err(err) = finished {
                    // Corrupt content never reaches its final path; the file keeps its
                    // old version and the job reports the skip.
                    tracing::warn!(file_id = e.file_id, error = %err, "staged content rejected");
                    stage.abort_file(e.file_id);
                    skipped += 1;
                } else if let Some(tap) = &ctx.tap
                    && let Some(path) = stage.staged_path(&hash)
                {
                    tap.staged(hash, path);
                }
            }
            Incoming::Control(Msg::FileAbort(a)) => {
                if open.take() == Some(a.file_id) {
                    patch = None;
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
        ..Default::default()
    };
    if let (Some(nm), Some(outcome)) = (&ctx.nm, nm_outcome) {
        // Recorded before the busy lock is released, so the capture judges the
        // writes it sees against them (echo suppression).
        crate::nm::applied(nm, begin, &desired, outcome, &mut stats.apply);
    }
    // Remember the tree only when it is exactly what was asked for; anything less and
    // the next change set must not build on it.
    if report.errors.is_empty() && stats.apply.skipped == 0 {
        state.local = Some(desired);
        state.last_applied = Some((begin.origin.clone(), begin.seq));
    } else {
        state.last_applied = None;
    }
    state.save(&ctx.state_path);
    Ok(stats)
}

/// The `VersionChunk`s that follow a versioned full manifest (at most one version per
/// entry plus as many tombstones).
async fn recv_versions<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    entry_count: u64,
) -> Result<Vec<pb::PathVersion>, TransferError> {
    let mut out = Vec::new();
    loop {
        match conn.recv_msg().await? {
            Msg::VersionChunk(c) => {
                out.extend(c.versions);
                if out.len() as u64 > MAX_ENTRIES.max(entry_count.saturating_mul(2)) {
                    return Err(TransferError::BadManifest("too many versions".into()));
                }
                if c.last {
                    return Ok(out);
                }
            }
            m => {
                return Err(TransferError::Protocol(format!(
                    "expected a version chunk, got {}",
                    msg_name(&m)
                )));
            }
        }
    }
}

/// Refuses a transfer after its body: an empty need list and no signatures, then
/// waits for its end (the caller answers with the reason in `ApplyResult`).
async fn drain_files<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
) -> Result<(), TransferError> {
    conn.send(Msg::NeedList(pb::NeedList {
        needs: vec![],
        last: true,
    }))
    .await?;
    match conn.recv_msg().await? {
        Msg::SignatureRequest(r) if r.file_ids.is_empty() => {}
        m => {
            return Err(TransferError::Protocol(format!(
                "expected an empty SignatureRequest, got {}",
                msg_name(&m)
            )));
        }
    }
    match conn.recv_msg().await? {
        Msg::TransferEnd(_) => Ok(()),
        m => Err(TransferError::Protocol(format!(
            "expected TransferEnd, got {}",
            msg_name(&m)
        ))),
    }
}
