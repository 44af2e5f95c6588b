//! Cut-through relaying: a relay forwards a change set to its children while it is
//! still receiving it, file by file.
//!
//! ```text
//! parent ──▶ relay: receive ─┬─ planned: body + the hashes it will fetch ──▶ Upstream
//!                            ├─ staged:  hash H verified at <stage>/in-N  ──▶ Upstream
//!                            └─ ended:   applied (or failed)              ──▶ Upstream
//! relay ──▶ child: send (one task per child, [`transfer::send`] with `out.upstream`)
//!   TransferBegin + the same body as soon as it is planned; the child's NeedList;
//!   each needed file whose content the relay is fetching: wait until it is staged
//!   and verified, send it from the stage file (whole, or as a delta against the
//!   child's old version); content the relay already held: wait until the relay
//!   applied, send it from the root; TransferEnd only once the relay's own receive
//!   completed.
//! ```
//!
//! The two halves meet in a [`channel`]: the relay's receive holds the [`Tap`]
//! ([`ReceiveContext::tap`](crate::transfer::ReceiveContext::tap)), each child's send
//! an [`Upstream`] ([`Outgoing::upstream`](crate::transfer::Outgoing::upstream)).
//!
//! Stage files and the relay's apply: the relay's apply renames staged files into
//! place and drops its stage when it is done, and nothing holds it back for its
//! children. A child's sender opens a stage file when it learns of it; an fd opened
//! before the rename (or before the stage is removed) reads the same inode to the end.
//! If the open comes too late (the file is gone), the sender waits for the relay's
//! apply and sends the content from the root, as a store-and-forward relay would.
//! Either way every byte it sends is hashed and must be the content the child asked
//! for (a local writer may change the file in place once it is in the tree): if not,
//! the file is aborted with `retrying` and re-sent through the root path, which
//! never ships a torn or different copy either.
//!
//! Failure: if the relay's receive fails (the upstream is cut, a protocol error), the
//! [`Tap`] ends as failed (also when it is dropped without an end), every child's
//! send returns [`TransferError::Refused`] before `TransferEnd` and drops its
//! connection, and the child, which applies only after `TransferEnd`, applies nothing.
//! A child's failure touches neither the relay's receive nor its other children.
//!
//! Deltas cut through too: a patch against the child's old version is made from the
//! stage file (and memoised by content, like every patch of the source's
//! [`DeltaCache`](crate::delta::DeltaCache)).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cd_core::delta::{DumpPolicy, Signature};
use cd_core::manifest::{Entry, Hash};
use cd_proto::pb::{self, envelope::Msg};
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use crate::delta;
use crate::fs::SendFile;
use crate::net::Conn;
use crate::transfer::{OutBody, Outgoing, SendStats, TransferError};

/// What the relay's receive has published so far.
#[derive(Debug, Default)]
struct Progress {
    /// The body as received, once planned: what the children are sent.
    body: Option<OutBody>,
    /// Contents the relay fetches from its parent.
    fetching: HashSet<Hash>,
    /// Contents staged and verified, by hash: the stage file holding each.
    staged: HashMap<Hash, PathBuf>,
    /// `Some(true)`: the receive completed (its apply ran); `Some(false)`: it failed.
    end: Option<bool>,
}

/// The relay's receive side of a [`channel`].
#[derive(Debug)]
pub struct Tap {
    tx: watch::Sender<Progress>,
}

/// A child's send side of a [`channel`]: clones share one view.
#[derive(Debug, Clone)]
pub struct Upstream {
    rx: watch::Receiver<Progress>,
}

/// Where a needed content can be read, as far as the relay's receive knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Verified in the relay's stage at this path (until its apply moves it).
    Staged(PathBuf),
    /// The relay's receive completed: read it from the root, as any source does.
    Root,
}

/// A new tap and the upstream view of it.
pub fn channel() -> (Tap, Upstream) {
    let (tx, rx) = watch::channel(Progress::default());
    (Tap { tx }, Upstream { rx })
}

impl Tap {
    /// The receive planned: `body` is what it received (and what the children get),
    /// `fetch` the contents it will ask its parent for.
    pub fn planned(&self, body: &OutBody, fetch: impl IntoIterator<Item = Hash>) {
        let fetching: HashSet<Hash> = fetch.into_iter().collect();
        self.tx.send_modify(|p| {
            p.body = Some(body.clone());
            p.fetching = fetching;
        });
    }

    /// Content `hash` is staged and verified at `path`.
    pub fn staged(&self, hash: Hash, path: PathBuf) {
        self.tx.send_modify(|p| {
            p.staged.insert(hash, path);
        });
    }

    /// The receive is over: `completed` if it returned its result (the apply ran),
    /// false if it failed. Only the first call counts.
    pub fn end(&self, completed: bool) {
        self.tx.send_if_modified(|p| {
            if p.end.is_some() {
                return false;
            }
            p.end = Some(completed);
            true
        });
    }
}

impl Drop for Tap {
    /// A receive that never said how it ended (dropped, panicked) failed.
    fn drop(&mut self) {
        self.end(false);
    }
}

fn upstream_failed() -> TransferError {
    TransferError::Refused("the relay's own transfer failed; nothing is forwarded".into())
}

impl Upstream {
    /// Waits until the relay's receive planned; its body, or `None` if the receive
    /// ended without one (it failed, or the relay asked its parent for the whole tree
    /// or refused a stale change set: nothing to forward).
    pub async fn body(&self) -> Option<OutBody> {
        let mut rx = self.rx.clone();
        let p = rx
            .wait_for(|p| p.body.is_some() || p.end.is_some())
            .await
            .ok()?;
        if p.end == Some(false) {
            return None;
        }
        p.body.clone()
    }

    /// Whether content `hash` is worth waiting for in the stage: the relay fetches it
    /// (what it already held is in its root, and it is read from there after the
    /// relay's apply).
    pub fn cut_through(&self, hash: &Hash) -> bool {
        self.rx.borrow().fetching.contains(hash)
    }

    /// Waits until content `hash` can be read: staged (when
    /// [`cut_through`](Self::cut_through) says so) or in the root after the relay's
    /// apply. Fails if the relay's receive failed first.
    pub async fn ready(&self, hash: &Hash) -> Result<Ready, TransferError> {
        let staged = self.cut_through(hash);
        let mut rx = self.rx.clone();
        let p = rx
            .wait_for(|p| p.end.is_some() || (staged && p.staged.contains_key(hash)))
            .await
            .map_err(|_| upstream_failed())?;
        if p.end == Some(false) {
            return Err(upstream_failed());
        }
        match p.staged.get(hash) {
            Some(path) if staged => Ok(Ready::Staged(path.clone())),
            _ => Ok(Ready::Root),
        }
    }

    /// Waits until the relay's receive is over; an error if it failed.
    pub async fn finished(&self) -> Result<(), TransferError> {
        let mut rx = self.rx.clone();
        let p = rx
            .wait_for(|p| p.end.is_some())
            .await
            .map_err(|_| upstream_failed())?;
        match p.end {
            Some(true) => Ok(()),
            _ => Err(upstream_failed()),
        }
    }
}

/// Sends needed file `file_id` (announced as `entry`, content `want`) from the relay's
/// stage file `staged`: as a patch against `sig`'s base where one was asked for and
/// pays, else whole. `Ok(true)`: sent (`FileEnd`). `Ok(false)`: not sent, the caller
/// sends it from the root once the relay applied: the stage file was gone (moved
/// into place already), or what was read was not `want` (a `FileAbort` with
/// `retrying` went out if a `FileBegin` had). Counts into `st` and paces like the
/// root path.
#[expect(
    clippy::too_many_arguments,
    reason = "the per-file state of the sender's loop"
)]
pub(crate) async fn send_staged<S: AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    out: &Outgoing,
    staged: &Path,
    entry: &Entry,
    file_id: u32,
    want: Hash,
    sig: Option<&Signature>,
    st: &mut SendStats,
    started: Instant,
    paced: &mut u64,
) -> Result<bool, TransferError> {
    let path = &entry.path;
    let open = || SendFile::open_staged(staged, path);
    if let Some(sig) = sig {
        let policy = DumpPolicy::default();
        match out.cache.patch_from(open, sig, &want, &policy).await {
            Ok(delta::Outcome::Patch(g)) => {
                let end = file_end(file_id, entry, g.sent.size, want);
                crate::transfer::send_patch(conn, out, file_id, &g, sig, end, started, paced, st)
                    .await?;
                return Ok(true);
            }
            Ok(delta::Outcome::Whole) => {}
            Ok(delta::Outcome::Changed) | Err(_) => return Ok(false),
        }
    }
    let f = match tokio::task::block_in_place(open) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(path = %path, error = %e, "stage file gone; the root will serve it");
            return Ok(false);
        }
    };
    let finished = crate::transfer::stream_file(conn, out, file_id, f, started, paced, st).await?;
    let reason = match finished {
        Ok(sent) if sent.hash == want => {
            conn.send(Msg::FileEnd(file_end(file_id, entry, sent.size, want)))
                .await?;
            st.files_sent += 1;
            st.bytes_sent += sent.size;
            return Ok(true);
        }
        Ok(_) => "relayed content is not what was verified".to_owned(),
        Err(e) => e.to_string(),
    };
    tracing::info!(path = %path, reason, "staged content changed while read; sending from the root");
    st.resent += 1;
    conn.send(Msg::FileAbort(pb::FileAbort {
        file_id,
        reason,
        retrying: true,
    }))
    .await?;
    Ok(false)
}

/// `FileEnd` for relayed content: the attributes are the announced ones (the stage
/// file's own are the stage's, and the replica applies the announced ones anyway).
fn file_end(file_id: u32, entry: &Entry, size: u64, hash: Hash) -> pb::FileEnd {
    pb::FileEnd {
        file_id,
        size,
        hash: hash.to_vec(),
        mode: entry.meta.mode,
        mtime_sec: entry.meta.mtime_sec,
        mtime_nsec: entry.meta.mtime_nsec,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn body() -> OutBody {
        OutBody::Incremental {
            base_seq: 1,
            changes: Arc::new(Vec::new()),
        }
    }

    const A: Hash = [1; 32];
    const B: Hash = [2; 32];

    /// Lets every spawned task run until it waits (current-thread runtime).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn fetched_content_is_ready_when_staged_held_content_after_the_apply() {
        let (tap, up) = channel();
        let waiting_body = tokio::spawn({
            let up = up.clone();
            async move { up.body().await.is_some() }
        });
        settle().await;
        assert!(!waiting_body.is_finished(), "a body before the plan");
        tap.planned(&body(), [A]);
        assert!(waiting_body.await.unwrap());
        assert!(up.cut_through(&A) && !up.cut_through(&B));

        let staged = tokio::spawn({
            let up = up.clone();
            async move { up.ready(&A).await.unwrap() }
        });
        let held = tokio::spawn({
            let up = up.clone();
            async move { up.ready(&B).await.unwrap() }
        });
        let done = tokio::spawn({
            let up = up.clone();
            async move { up.finished().await.is_ok() }
        });
        settle().await;
        assert!(!staged.is_finished() && !held.is_finished() && !done.is_finished());
        tap.staged(A, PathBuf::from("/stage/in-1"));
        assert_eq!(
            staged.await.unwrap(),
            Ready::Staged(PathBuf::from("/stage/in-1"))
        );
        // B is not fetched: only the relay's apply makes it readable, from the root.
        tap.staged(B, PathBuf::from("/stage/in-2"));
        settle().await;
        assert!(!held.is_finished() && !done.is_finished());
        tap.end(true);
        assert_eq!(held.await.unwrap(), Ready::Root);
        assert!(done.await.unwrap());
        // Once over, staged content is still offered (the sender falls back to the
        // root if its stage file is gone).
        assert_eq!(
            up.ready(&A).await.unwrap(),
            Ready::Staged(PathBuf::from("/stage/in-1"))
        );
    }

    #[tokio::test]
    async fn a_failed_receive_fails_every_waiter_even_with_content_staged() {
        let (tap, up) = channel();
        tap.planned(&body(), [A, B]);
        tap.staged(A, PathBuf::from("/stage/in-1"));
        let waiting = tokio::spawn({
            let up = up.clone();
            async move { up.ready(&B).await }
        });
        settle().await;
        assert!(!waiting.is_finished());
        tap.end(false);
        tap.end(true); // only the first end counts
        assert!(matches!(
            waiting.await.unwrap(),
            Err(TransferError::Refused(_))
        ));
        assert!(matches!(up.ready(&A).await, Err(TransferError::Refused(_))));
        assert!(up.finished().await.is_err());
        assert!(up.body().await.is_none());
    }

    #[tokio::test]
    async fn a_dropped_tap_is_a_failed_receive() {
        let (tap, up) = channel();
        tap.planned(&body(), [A]);
        let waiting = tokio::spawn({
            let up = up.clone();
            async move { up.finished().await }
        });
        settle().await;
        drop(tap);
        assert!(waiting.await.unwrap().is_err());
        assert!(up.ready(&A).await.is_err());
    }

    #[tokio::test]
    async fn a_receive_that_ends_without_a_plan_forwards_nothing() {
        // The relay asked its parent for the whole tree (or refused a stale change
        // set): it completed, with nothing to pass on.
        let (tap, up) = channel();
        tap.end(true);
        assert!(up.body().await.is_none());
        assert!(up.finished().await.is_ok());
    }
}
