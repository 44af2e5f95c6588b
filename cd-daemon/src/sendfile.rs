//! Whole files sent with `sendfile`, on links whose record layer is in the kernel
//! (kernel TLS) or absent (plain TCP between trusted peers).
//!
//! [`try_send`] is the source's zero-copy branch of the per-file loop of
//! [`transfer::send`](crate::transfer::send). It applies when the connection can
//! ([`Conn::zero_copy`]: a kernel-TLS or plain link to a peer that accepts data frames
//! without CRC), the content set sends uncompressed (`zstd_level = 0`: compressing
//! needs the bytes in user space), and the file is at least [`SENDFILE_MIN`] bytes
//! (below that, reading is as cheap). The file is first pinned ([`fs::Snapshot`]:
//! reflink clone, else read lease), and only if its size and mtime are what the
//! manifest announced; anything else falls back to the ordinary read path, which
//! hashes what it sends.
//!
//! The source does not hash what `sendfile` sends. It puts the manifest's hash in
//! `FileEnd`, and the receiver, which hashes every byte it stages, keeps the file only
//! if that hash matches; the pin makes a mismatch unlikely, the check makes it harmless.

use std::time::Instant;

use cd_core::manifest::{Entry, EntryKind, Hash};
use cd_proto::pb::{self, envelope::Msg};
use tokio::io::AsyncWrite;

use crate::fs::{self, Snapshot};
use crate::net::Conn;
use crate::transfer::{Outgoing, SendStats, TransferError};

/// Smallest file sent with `sendfile`.
pub const SENDFILE_MIN: u64 = 16 * 1024;

/// What [`try_send`] did with one needed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopied {
    /// Not applicable, or the file could not be pinned: nothing was sent; use the
    /// read path.
    NotUsed,
    /// The file was sent (`FileEnd`), or given up for this round (`FileAbort`, not
    /// retrying, counted in `changed_since_scan`).
    Finished,
    /// A writer interrupted it: `FileAbort` with `retrying` was sent; try again.
    Retry,
}

/// The zero-copy branch for one needed file, `announced` (its manifest entry; see the
/// module docs). `retrying`: whether
/// an interrupted attempt may be retried. Updates `st` like the read path does, and
/// paces with `paced` bytes sent since `started`.
#[expect(
    clippy::too_many_arguments,
    reason = "the per-file state of the caller's loop"
)]
pub async fn try_send<S: AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
    announced: &Entry,
    file_id: u32,
    want: Hash,
    retrying: bool,
    st: &mut SendStats,
    started: Instant,
    paced: &mut u64,
) -> Result<ZeroCopied, TransferError> {
    if out.zstd_level != 0 || conn.zero_copy().is_none() {
        return Ok(ZeroCopied::NotUsed);
    }
    let path = &announced.path;
    let EntryKind::File { size, .. } = announced.kind else {
        return Ok(ZeroCopied::NotUsed);
    };
    let (mtime_sec, mtime_nsec) = (announced.meta.mtime_sec, announced.meta.mtime_nsec);
    if size < SENDFILE_MIN {
        return Ok(ZeroCopied::NotUsed);
    }
    let snap = match tokio::task::block_in_place(|| Snapshot::take(&out.root, path)) {
        Ok(Some(s)) => s,
        // Not pinnable, or not openable: the read path decides (and reports).
        Ok(None) | Err(_) => return Ok(ZeroCopied::NotUsed),
    };
    let meta = snap.meta();
    if snap.size() != size || (meta.mtime_sec, meta.mtime_nsec) != (mtime_sec, mtime_nsec) {
        // Not the version that was scanned: the read path hashes it and tells.
        return Ok(ZeroCopied::NotUsed);
    }
    tracing::trace!(path = %path, pin = ?snap.pin(), size, "sending with sendfile");
    conn.send(Msg::FileBegin(pb::FileBegin {
        file_id,
        size,
        ..Default::default()
    }))
    .await?;
    let mut offset = 0u64;
    let mut interrupted = false;
    while offset < size {
        if !snap.intact() {
            interrupted = true;
            break;
        }
        let len = (size - offset).min(cd_proto::frame::MAX_CHUNK_RAW as u64) as usize;
        st.wire_bytes += conn
            .send_data_zero_copy(file_id, snap.fd(), offset, len)
            .await?;
        offset += len as u64;
        *paced += len as u64;
        crate::transfer::pace(started, *paced, out.max_rate_bytes_per_sec).await;
    }
    let finished: Result<_, fs::FsError> = if interrupted {
        // Let the writer in now, not after the abort went out.
        drop(snap);
        Err(fs::FsError::Changed {
            path: path.display(),
            what: "a writer opened it while it was sent",
        })
    } else {
        tokio::task::block_in_place(|| snap.finish())
    };
    match finished {
        Ok(meta) => {
            conn.send(Msg::FileEnd(pb::FileEnd {
                file_id,
                size,
                hash: want.to_vec(),
                mode: meta.mode,
                mtime_sec: meta.mtime_sec,
                mtime_nsec: meta.mtime_nsec,
            }))
            .await?;
            st.files_sent += 1;
            st.bytes_sent += size;
            Ok(ZeroCopied::Finished)
        }
        Err(e) => {
            st.resent += 1;
            tracing::info!(path = %path, error = %e, retrying, "file changed while being sent");
            conn.send(Msg::FileAbort(pb::FileAbort {
                file_id,
                reason: e.to_string(),
                retrying,
            }))
            .await?;
            if retrying {
                Ok(ZeroCopied::Retry)
            } else {
                st.changed_since_scan += 1;
                Ok(ZeroCopied::Finished)
            }
        }
    }
}
