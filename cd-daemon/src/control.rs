//! The local control socket: `cdctl` ↔ `cdd`.
//!
//! A Unix stream socket, mode 0600, owned by the daemon's user; a connecting process
//! must also be root or the daemon's own user (checked with `SO_PEERCRED`). One request
//! per connection: a JSON line in, a JSON line out (`{"ok":true,"result":…}` or
//! `{"ok":false,"error":"…"}`). JSON keeps the socket scriptable with `socat` and the
//! CLI thin; the cluster protocol itself is protobuf over TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// A request from `cdctl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Sync {
        content_set: Option<String>,
        /// Plan only: what would be sent, removed and changed; nothing is.
        #[serde(default)]
        dry_run: bool,
    },
    TokenCreate {
        ttl_seconds: u64,
    },
    /// The master's route table of a content set.
    Routes {
        content_set: Option<String>,
    },
    /// Start catch-ups waiting for a command (all, or one node's).
    CatchUp {
        node: Option<String>,
    },
    /// Deploy barrier: wait until every target holds change set `seq` (default: the
    /// source's newest now).
    Wait {
        content_set: Option<String>,
        seq: Option<u64>,
        timeout_ms: u64,
    },
    /// The master's job log, newest first.
    Jobs {
        content_set: Option<String>,
        /// 0 = the default (50).
        #[serde(default)]
        limit: usize,
        #[serde(default)]
        failed: bool,
    },
    /// One job with its per-target results and events.
    Job {
        id: u64,
    },
    /// Per-node and per-link statistics from the job log.
    Stats,
    /// The newest farm events from the job log (0 = the default, 100).
    Events {
        #[serde(default)]
        limit: usize,
    },
    /// The monitor: newest sample, thresholds, checks and history of each node (or one).
    Health {
        #[serde(default)]
        node: Option<String>,
    },
    /// The alerts firing now, the sinks, and the newest alert events of the job log
    /// (0 = the default, 50).
    Alerts {
        #[serde(default)]
        limit: usize,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Handles requests; implemented by the daemon.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: Request,
    ) -> impl Future<Output = Result<serde_json::Value, String>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: {reason}", path.display())]
    Protocol { path: PathBuf, reason: String },
    #[error("{0}")]
    Remote(String),
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Io {
            op: "create directory",
            path: dir.to_owned(),
            source,
        })?;
    }
    if path.exists() {
        // A live daemon answers; a stale socket from a killed one refuses.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::Protocol {
                path: path.to_owned(),
                reason: "another daemon is listening on it".into(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|source| ControlError::Io {
        op: "bind",
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Io {
            op: "chmod",
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(l)
}

/// Serves requests until the listener fails.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    let me = rustix::process::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == me)
            .unwrap_or(false);
        let h = handler.clone();
        tokio::spawn(async move {
            if !allowed {
                tracing::warn!(
                    "control socket: refused a client that is neither root nor the daemon's user"
                );
                return;
            }
            if let Err(e) = serve_one(stream, h).await {
                tracing::debug!(error = %e, "control socket client");
            }
        });
    }
}

async fn serve_one<H: Handler>(stream: UnixStream, handler: Arc<H>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).take_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match handler.handle(req).await {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(e),
            },
        },
        Err(e) => Response {
            ok: false,
            result: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&resp).expect("response serialises");
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

trait TakeLine {
    async fn take_line(&mut self, line: &mut String) -> std::io::Result<()>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeLine for BufReader<R> {
    async fn take_line(&mut self, line: &mut String) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt;
        // Requests are small; bound them so a confused client cannot grow memory.
        let mut limited = self.take(1 << 20);
        limited.read_line(line).await.map(|_| ())
    }
}

/// Sends one request and returns the result (client side, used by `cdctl`).
pub async fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Io {
            op: "connect to control socket",
            path: path.to_owned(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut body = serde_json::to_vec(req).expect("request serialises");
    body.push(b'\n');
    w.write_all(&body)
        .await
        .map_err(|source| ControlError::Io {
            op: "write",
            path: path.to_owned(),
            source,
        })?;
    let mut line = String::new();
    BufReader::new(r)
        .read_line(&mut line)
        .await
        .map_err(|source| ControlError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
    if line.is_empty() {
        return Err(ControlError::Protocol {
            path: path.to_owned(),
            reason: "daemon closed the connection without answering (not allowed?)".into(),
        });
    }
    let resp: Response = serde_json::from_str(&line).map_err(|e| ControlError::Protocol {
        path: path.to_owned(),
        reason: format!("bad response: {e}"),
    })?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Remote(
            resp.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}
