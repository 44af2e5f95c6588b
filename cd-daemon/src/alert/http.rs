//! A small HTTP/1.1 client for alert webhooks: one `POST` of a JSON body per
//! connection (`Connection: close`), over plain TCP or TLS (rustls, ring).
//!
//! It is not a general client: no redirects, no proxies, no keep-alive, no chunked
//! request bodies. It reads the status line and enough of the response to report a
//! failure; a 2xx status is success, anything else an [`HttpError::Status`] with the
//! first bytes of the body. Every step is bounded by the caller's timeout.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of a response read (status line, headers, the start of the body).
const RESPONSE_LIMIT: usize = 16 << 10;

/// A parsed `http://` or `https://` URL: what the client needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http[s]://host[:port][/path]`; an IPv6 host is written in brackets.
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("`{url}` is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(format!("`{url}`: credentials in the URL are not supported"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("`{url}`: bad port `{p}`"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("`{url}`: junk after the host")),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("`{url}`: bad port `{p}`"))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(format!("`{url}` has no valid host"));
        }
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("`{url}`: the path must not contain spaces"));
        }
        Ok(HttpUrl {
            https,
            host,
            port,
            path,
        })
    }

    /// The same server with another path.
    #[must_use]
    pub fn with_path(&self, path: &str) -> HttpUrl {
        HttpUrl {
            path: path.to_owned(),
            ..self.clone()
        }
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.https { 443 } else { 80 } {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host_header(), self.path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{op} {url}: {source}")]
    Io {
        op: &'static str,
        url: String,
        source: std::io::Error,
    },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: TLS: {reason}")]
    Tls { url: String, reason: String },
    #[error("{url}: malformed response: {reason}")]
    Malformed { url: String, reason: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// Trust for `https://` URLs: the system's CA store, or the CAs of one PEM file.
pub fn tls_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let mut n = 0;
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| format!("bad PEM: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("bad CA certificate: {e}"))?;
                n += 1;
            }
            if n == 0 {
                return Err("no certificate in the file".into());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Extra request headers (name, value).
pub type Headers<'a> = &'a [(&'a str, &'a str)];

/// `POST`s `body` as `application/json` to `url` within `timeout`; returns the
/// response status (2xx) or why it failed.
pub async fn post_json(
    url: &HttpUrl,
    headers: Headers<'_>,
    body: &[u8],
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<u16, HttpError> {
    match tokio::time::timeout(timeout, post_inner(url, headers, body, tls)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout {
            url: url.to_string(),
            timeout,
        }),
    }
}

async fn post_inner(
    url: &HttpUrl,
    headers: Headers<'_>,
    body: &[u8],
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<u16, HttpError> {
    let u = url.to_string();
    let io = |op| {
        let u = u.clone();
        move |source| HttpError::Io { op, url: u, source }
    };
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(io("connect to"))?;
    let _ = tcp.set_nodelay(true);
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cdsync/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.host_header(),
        cd_proto::SOFTWARE_VERSION,
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if url.https {
        let cfg = tls.ok_or_else(|| HttpError::Tls {
            url: u.clone(),
            reason: "no TLS configuration".into(),
        })?;
        let name = ServerName::try_from(url.host.clone()).map_err(|e| HttpError::Tls {
            url: u.clone(),
            reason: e.to_string(),
        })?;
        let s = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| HttpError::Tls {
                url: u.clone(),
                reason: e.to_string(),
            })?;
        exchange(s, &u, head.as_bytes(), body).await
    } else {
        exchange(tcp, &u, head.as_bytes(), body).await
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &str,
    head: &[u8],
    body: &[u8],
) -> Result<u16, HttpError> {
    let io = |op| {
        let url = url.to_owned();
        move |source| HttpError::Io { op, url, source }
    };
    s.write_all(head).await.map_err(io("send to"))?;
    s.write_all(body).await.map_err(io("send to"))?;
    s.flush().await.map_err(io("send to"))?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the headers and some body are in, the peer closes, or the limit.
    loop {
        let n = match s.read(&mut buf).await {
            Ok(n) => n,
            // A server that closes without TLS close_notify after a full answer.
            Err(e) if !resp.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io("read from")(e)),
        };
        resp.extend_from_slice(&buf[..n]);
        let headers_done = resp.windows(4).any(|w| w == b"\r\n\r\n");
        if n == 0 || resp.len() >= RESPONSE_LIMIT || (headers_done && status_ok(&resp)) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&resp);
    let status = parse_status(&text).ok_or_else(|| HttpError::Malformed {
        url: url.to_owned(),
        reason: format!("no HTTP status line in {:?}", truncate(&text, 80)),
    })?;
    if (200..300).contains(&status) {
        return Ok(status);
    }
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Err(HttpError::Status {
        url: url.to_owned(),
        status,
        body: truncate(body.trim(), 300),
    })
}

/// Whether the response so far starts with a 2xx status line (then its body does not
/// matter and the client stops reading).
fn status_ok(resp: &[u8]) -> bool {
    parse_status(&String::from_utf8_lossy(resp)).is_some_and(|s| (200..300).contains(&s))
}

fn parse_status(text: &str) -> Option<u16> {
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// At most `max` characters of `s`, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = HttpUrl::parse("http://127.0.0.1:9093").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 9093, "/")
        );
        let u = HttpUrl::parse("https://sms.example.com/send?x=1").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "sms.example.com", 443, "/send?x=1")
        );
        let u = HttpUrl::parse("http://[::1]:8080/a").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        assert_eq!(u.to_string(), "http://[::1]:8080/a");
        assert_eq!(HttpUrl::parse("http://h?q").unwrap().path, "/?q");
        for bad in [
            "ftp://x",
            "http://",
            "http://h:port/",
            "http://u:p@h/",
            "http://h/a b",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// A one-shot server answering `reply`; returns its address and what it read.
    async fn server(
        reply: &'static str,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // Headers, then Content-Length bytes of body.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let t = String::from_utf8_lossy(&got).into_owned();
                if let Some((h, b)) = t.split_once("\r\n\r\n") {
                    let len: usize = h
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if b.len() >= len {
                        break;
                    }
                }
            }
            s.write_all(reply.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            String::from_utf8(got).unwrap()
        });
        (addr, h)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn posts_json_and_reports_status() {
        let (addr, h) = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let url = HttpUrl::parse(&format!("http://{addr}/api/v2/alerts")).unwrap();
        let s = post_json(
            &url,
            &[("X-Test", "1")],
            b"[1]",
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(s, 200);
        let req = h.await.unwrap();
        assert!(req.starts_with("POST /api/v2/alerts HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: {addr}\r\n")), "{req}");
        assert!(
            req.contains("\r\nContent-Type: application/json\r\n"),
            "{req}"
        );
        assert!(req.contains("\r\nX-Test: 1\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n[1]"), "{req}");

        let (addr, _h) =
            server("HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad payload").await;
        let url = HttpUrl::parse(&format!("http://{addr}/")).unwrap();
        let e = post_json(&url, &[], b"{}", None, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HttpError::Status { status: 400, body, .. } if body == "bad payload"),
            "{e}"
        );
    }
}
