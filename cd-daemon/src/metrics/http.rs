//! The `/metrics` endpoint: a minimal HTTP/1.1 server on a tokio listener.
//!
//! It answers `GET` (and `HEAD`) for `/metrics` (the exposition from a [`Source`]:
//! OpenMetrics when the `Accept` header asks for `application/openmetrics-text`, as
//! Prometheus does, else the classic Prometheus text format) and `/healthz` (`ok`);
//! `404` for any other path, `405` for any other method, `400` for what is not an
//! HTTP/1.x request, `431` for a request head over [`MAX_REQUEST`] bytes, `408` when
//! the head does not arrive within [`READ_TIMEOUT`]. One response per connection
//! (`Connection: close`); request bodies are not read. At most [`MAX_CONNECTIONS`]
//! are served at once, further ones wait in the kernel's accept queue.
//!
//! It is not an admin API: it exposes counters only and changes nothing, so it has no
//! authentication; bind it to loopback or a management network (`metrics_listen`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing a response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/metrics` serves.
pub trait Source: Send + Sync + 'static {
    /// The exposition text, OpenMetrics or classic (see the module docs).
    fn render(&self, openmetrics: bool) -> String;
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>) {
    serve_with(listener, source, READ_TIMEOUT).await;
}

async fn serve_with(listener: TcpListener, source: Arc<dyn Source>, read_timeout: Duration) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(tcp, source.as_ref(), read_timeout).await {
                tracing::debug!(peer = %peer, error = %e, "metrics request");
            }
            drop(permit);
        });
    }
}

/// A parsed request head: what the server needs of it.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    openmetrics: bool,
}

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    BadRequest,
    TooLarge,
    Timeout,
}

async fn handle(
    mut tcp: TcpStream,
    source: &dyn Source,
    read_timeout: Duration,
) -> std::io::Result<()> {
    let read = match tokio::time::timeout(read_timeout, read_head(&mut tcp)).await {
        Ok(Ok(h)) => Ok(h),
        Ok(Err(Some(r))) => Err(r),
        Ok(Err(None)) => return Ok(()), // closed before a full request
        Err(_) => Err(Refused::Timeout),
    };
    let (status, content_type, body, head_only) = match read.as_deref().map(parse) {
        Err(Refused::BadRequest) | Ok(None) => (
            "400 Bad Request",
            "text/plain",
            "bad request\n".into(),
            false,
        ),
        Err(Refused::TooLarge) => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request too large\n".into(),
            false,
        ),
        Err(Refused::Timeout) => (
            "408 Request Timeout",
            "text/plain",
            "timeout\n".into(),
            false,
        ),
        Ok(Some(req)) if req.method != "GET" && req.method != "HEAD" => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".into(),
            false,
        ),
        Ok(Some(req)) => {
            let head_only = req.method == "HEAD";
            match req.path.split('?').next().unwrap_or("") {
                "/metrics" => {
                    let ct = if req.openmetrics {
                        CONTENT_TYPE_OPENMETRICS
                    } else {
                        CONTENT_TYPE_TEXT
                    };
                    ("200 OK", ct, source.render(req.openmetrics), head_only)
                }
                "/healthz" => ("200 OK", "text/plain", "ok\n".into(), head_only),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found\n".into(),
                    head_only,
                ),
            }
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    tokio::time::timeout(WRITE_TIMEOUT, async {
        tcp.write_all(&out).await?;
        tcp.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "writing the response"))?
}

/// Reads up to the blank line that ends the head. `Err(None)`: the peer closed (or
/// failed) first; `Err(Some(TooLarge))`: no end within [`MAX_REQUEST`] bytes.
async fn read_head(tcp: &mut TcpStream) -> Result<String, Option<Refused>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|_| None)?;
        if n == 0 {
            return Err(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| Some(Refused::BadRequest));
        }
        if buf.len() > MAX_REQUEST {
            return Err(Some(Refused::TooLarge));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The request line and the `Accept` header of a request head.
fn parse(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return None;
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    Some(Request {
        method,
        path,
        openmetrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Source for Fixed {
        fn render(&self, openmetrics: bool) -> String {
            if openmetrics {
                "om 1\n# EOF\n".into()
            } else {
                "text 1\n".into()
            }
        }
    }

    async fn server() -> SocketAddr {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, Arc::new(Fixed)));
        addr
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before all of an oversize request is sent.
        let _ = c.write_all(request).await;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_healthz_and_refuses_the_rest() {
        let addr = server().await;
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains(&format!("Content-Type: {CONTENT_TYPE_TEXT}\r\n")),
            "{r}"
        );
        assert!(r.contains("Content-Length: 7\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\ntext 1\n"), "{r}");

        let r = exchange(
            addr,
            b"GET /metrics?x=1 HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert!(r.contains(CONTENT_TYPE_OPENMETRICS), "{r}");
        assert!(r.ends_with("om 1\n# EOF\n"), "{r}");

        let r = exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK") && r.ends_with("ok\n"),
            "{r}"
        );

        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK") && r.ends_with("\r\n\r\n"),
            "{r}"
        );

        for (req, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404 Not Found"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
            (b"hello\r\n\r\n", "400 Bad Request"),
            (b"GET /metrics SPDY/3\r\n\r\n", "400 Bad Request"),
        ] {
            let r = exchange(addr, req).await;
            assert!(
                r.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{req:?}: {r}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversize_request_is_refused_and_the_server_goes_on() {
        let addr = server().await;
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(4 * MAX_REQUEST, b'a');
        let r = exchange(addr, &big).await;
        assert!(
            r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{r}"
        );
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with(l, Arc::new(Fixed), Duration::from_millis(100)));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        let r = String::from_utf8(out).unwrap();
        assert!(r.starts_with("HTTP/1.1 408 Request Timeout"), "{r}");
    }
}
