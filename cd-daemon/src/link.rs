//! The transport under a transfer connection: rustls in user space, kernel TLS, or
//! plain TCP between trusted peers.
//!
//! Every transfer connection starts the same way: TCP, a rustls TLS 1.3 handshake with
//! mutual authentication, and the `Hello` exchange (see [`crate::net`]). Then
//! [`establish`] picks the record layer for the rest of the connection:
//!
//! - [`LinkPath::Plain`] when both peers agreed in their `Hello`s (the source's content
//!   set is `encryption = false` and the replica lists it in `trusted_peers`): rustls is
//!   dropped and the frames go over the bare TCP stream.
//! - [`LinkPath::Ktls`] when the kernel has TLS ([`probe`]), it is not disabled (`ktls =
//!   false` in the node config, `CDD_KTLS=off` in the environment), and the kernel takes
//!   the negotiated cipher suite: the traffic secrets are taken out of rustls
//!   (`dangerous_extract_secrets`) and installed with `TCP_ULP "tls"` and `SOL_TLS
//!   TLS_TX` / `TLS_RX`. The socket then reads and writes plaintext and the kernel does
//!   the records, so file data can go from the page cache to the wire with `sendfile`
//!   (see [`ZeroCopy`]).
//! - [`LinkPath::Rustls`] otherwise: the TLS stream as it came out of the handshake.
//!
//! The choice is local to each end as far as encryption goes: a kernel-TLS end and a
//! rustls end speak the same records with the same keys. Only plaintext needs both.
//!
//! # Why nothing is lost at the switch
//!
//! Once rustls hands its keys over (or is dropped, for plaintext), whatever it had read
//! from the socket and not yet returned would be lost, and so would anything it still
//! had to write. The `Hello` exchange is the synchronisation point that makes both
//! empty, on both sides:
//!
//! - The client sends its `Hello` and then reads until the server's `Hello`; it sends
//!   nothing else before it has switched. The server reads the client's `Hello`,
//!   answers, flushes, and switches before it reads again.
//! - So when the server switches, the client has sent nothing after its `Hello` (it is
//!   waiting for the answer), and the server's rustls holds no unread bytes: the
//!   client's `Hello` was read to its last byte by the frame reader, and no later byte
//!   exists yet. Its answer is flushed, so rustls has nothing left to write.
//! - When the client switches, the server has sent nothing after its `Hello` (it waits
//!   for the client's first frame, which the client sends on the new record layer), so
//!   the client's rustls holds nothing after the `Hello` it just read.
//! - Bytes the peer sends after its switch land in the socket's receive queue, which
//!   the kernel parses as TLS records when `TLS_RX` is set (or we read as plaintext):
//!   they are never in rustls.
//! - The server sends no session tickets (`send_tls13_tickets = 0`, see [`crate::pki`]),
//!   which would otherwise follow the handshake at a time the client cannot predict.
//!
//! [`establish`] checks this instead of trusting it: it processes whatever rustls has
//! buffered and refuses to switch if that yields any plaintext or left TLS bytes to
//! write. rustls itself refuses to extract secrets while records are still queued for
//! sending.
//!
//! # Receiving on kernel TLS
//!
//! A plain `read` on a kernel-TLS socket fails with `EIO` when the next record is not
//! application data. [`KtlsStream`] reads with `recvmsg` and a control buffer, so it
//! learns each record's type (`TLS_GET_RECORD_TYPE`): an alert `close_notify` is the
//! end of the stream, any other alert is an error naming it, a `NewSessionTicket` is
//! ignored (no resumption is used), and a `KeyUpdate` is an error: kernels before 6.14
//! cannot install new receive keys, and the records after it would not decrypt.
//!
//! # No rekeying: the record budget
//!
//! Kernel TLS before 6.14 cannot update keys, and AES-GCM must not protect more than
//! about 2^24.5 full records under one key (RFC 8446, 5.5). A kernel-TLS link therefore
//! counts the records it may have sent (an upper bound: each successful write or
//! `sendfile` of `n` bytes counts `n / 16 KiB + 1`) and refuses to send once
//! [`KTLS_RECORD_BUDGET`] (2^23 records: 128 GiB of full records, less with small ones;
//! well below the limit) would be exceeded. The transfer then fails with an error
//! saying so; the node remembers the peer and uses rustls (which rekeys by itself) for
//! its next connection to it. The same bound is applied to ChaCha20-Poly1305, whose
//! limit is far higher, for simplicity. A rustls peer sending to a kernel-TLS receiver
//! rekeys at its own confidentiality limit (2^23 or 2^24 AES-GCM records with the ring
//! provider); the receiver then fails with the clear `KeyUpdate` error above, and the
//! next round reconnects.

mod sys;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use rustls::ConnectionTrafficSecrets;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Records a kernel-TLS link may send under its one key (see the module docs).
pub const KTLS_RECORD_BUDGET: u64 = 1 << 23;
/// Largest plaintext of one TLS record.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// TLS content types.
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPLICATION_DATA: u8 = 23;
/// Handshake message types that can follow a TLS 1.3 handshake.
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
/// The environment variable that disables kernel TLS (`off`, `0`, `false`, `no`).
pub const ENV_KTLS: &str = "CDD_KTLS";

/// Which record layer a link uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkPath {
    /// Kernel TLS: records encrypted and decrypted by the kernel.
    Ktls,
    /// rustls in user space.
    Rustls,
    /// Plain TCP after the authenticated handshake (trusted peers only).
    Plain,
}

impl LinkPath {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkPath::Ktls => "ktls",
            LinkPath::Rustls => "rustls",
            LinkPath::Plain => "plain",
        }
    }
}

/// The TLS 1.3 AEADs the kernel can take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Cipher {
    #[serde(rename = "AES-128-GCM")]
    Aes128Gcm,
    #[serde(rename = "AES-256-GCM")]
    Aes256Gcm,
    #[serde(rename = "CHACHA20-POLY1305")]
    Chacha20Poly1305,
}

impl Cipher {
    const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    fn of_suite(suite: rustls::CipherSuite) -> Option<Cipher> {
        match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        }
    }
}

/// What the kernel offers, as found by [`probe`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct KtlsSupport {
    /// The kernel has the TLS upper layer protocol.
    pub available: bool,
    /// How that was decided (the errno of the probe).
    pub detail: String,
    /// The ciphers the kernel accepted keys for on a loopback connection.
    pub ciphers: Vec<Cipher>,
}

/// How the probe's `setsockopt(TCP_ULP, "tls")` on an unconnected socket answered.
fn classify_ulp(r: &io::Result<()>) -> (bool, String) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => (
            true,
            "TCP_ULP \"tls\" on an unconnected socket: ENOTCONN (present)".into(),
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => (
            false,
            "TCP_ULP \"tls\" on an unconnected socket: ENOENT (the kernel has no TLS)".into(),
        ),
        Err(e) => (
            false,
            format!("TCP_ULP \"tls\" on an unconnected socket: unexpected error: {e}"),
        ),
        Ok(()) => (
            false,
            "TCP_ULP \"tls\" on an unconnected socket unexpectedly succeeded".into(),
        ),
    }
}

/// Asks the kernel whether it has TLS, and which ciphers it takes keys for.
pub fn probe() -> KtlsSupport {
    use rustix::net::{AddressFamily, SocketType};
    let sock = match rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None) {
        Ok(s) => s,
        Err(e) => {
            return KtlsSupport {
                available: false,
                detail: format!("cannot create a TCP socket to probe: {e}"),
                ciphers: Vec::new(),
            };
        }
    };
    let (available, detail) = classify_ulp(&sys::set_ulp_tls(sock.as_fd()));
    let ciphers = if available {
        Cipher::ALL
            .into_iter()
            .filter(|c| probe_cipher(*c).is_ok())
            .collect()
    } else {
        Vec::new()
    };
    KtlsSupport {
        available,
        detail,
        ciphers,
    }
}

/// Installs a throw-away key for `cipher` in both directions of a loopback connection:
/// the kernel loads the AEAD (or fails) here rather than on a real link, where a
/// refusal after the secrets left rustls could not fall back.
fn probe_cipher(cipher: Cipher) -> io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    let dummy = |seq| crypto_info(cipher, &[7u8; 32], &[9u8; 12], seq);
    sys::set_ulp_tls(client.as_fd())?;
    sys::set_crypto_info(client.as_fd(), sys::Direction::Tx, &dummy(0))?;
    sys::set_ulp_tls(server.as_fd())?;
    sys::set_crypto_info(server.as_fd(), sys::Direction::Rx, &dummy(0))?;
    Ok(())
}

/// The probe's result, run once per process and logged once.
pub fn probed() -> &'static KtlsSupport {
    static PROBE: OnceLock<KtlsSupport> = OnceLock::new();
    PROBE.get_or_init(|| {
        let p = probe();
        if p.available {
            tracing::info!(detail = %p.detail, ciphers = ?p.ciphers.iter().map(|c| c.name()).collect::<Vec<_>>(), "kernel TLS is available");
        } else {
            tracing::info!(detail = %p.detail, "kernel TLS is not available; transfers use rustls in user space");
        }
        p
    })
}

/// Whether `CDD_KTLS` (its value, if set) disables kernel TLS.
pub fn env_disables(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "no"
        )
    })
}

/// How this node sets up its transfer links.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Use kernel TLS where the kernel has it (config `ktls`, and `CDD_KTLS`).
    pub ktls: bool,
    /// Peers this node accepts plaintext transfers from (`*` = any authenticated
    /// cluster member).
    pub trusted_peers: Vec<String>,
    /// What the kernel offers (probed even when disabled, for `status`; `None` only
    /// in tests).
    pub support: Option<KtlsSupport>,
}

impl Policy {
    /// From the node's configuration and the environment; probes the kernel (once per
    /// process, logged).
    pub fn new(ktls_config: bool, env: Option<&str>, trusted_peers: Vec<String>) -> Policy {
        let ktls = ktls_config && !env_disables(env);
        let support = probed().clone();
        if !ktls {
            tracing::info!(
                config = ktls_config,
                env = env.unwrap_or(""),
                "kernel TLS disabled; transfers use rustls in user space"
            );
        }
        Policy {
            ktls,
            trusted_peers,
            support: Some(support),
        }
    }

    /// Whether `peer` may send to this node without encryption.
    pub fn trusts(&self, peer: &str) -> bool {
        self.trusted_peers.iter().any(|p| p == "*" || p == peer)
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.ktls,
            "probe": self.support,
            "trusted_peers": self.trusted_peers,
        })
    }
}

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("rustls still holds {0} at the switch of the record layer; refusing to lose it")]
    Pending(String),
    #[error("rustls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("kernel TLS: {op}: {source}")]
    Kernel { op: &'static str, source: io::Error },
}

/// Counters of one link, shared by its stream and the [`ZeroCopy`] handle.
#[derive(Debug)]
pub struct LinkStats {
    pub path: LinkPath,
    pub cipher: Option<Cipher>,
    /// Why kernel TLS was not used, when it was wanted.
    pub note: Option<String>,
    /// Bytes written with `write`/`send` (frames, control and data, as plaintext).
    pub bytes_write: AtomicU64,
    /// File bytes carried by `sendfile`.
    pub bytes_sendfile: AtomicU64,
    /// Upper bound of the records sent on kernel TLS.
    pub records: AtomicU64,
    /// The record budget ran out on this link.
    pub budget_exhausted: AtomicBool,
}

impl LinkStats {
    fn new(path: LinkPath, cipher: Option<Cipher>, note: Option<String>) -> Arc<LinkStats> {
        Arc::new(LinkStats {
            path,
            cipher,
            note,
            bytes_write: AtomicU64::new(0),
            bytes_sendfile: AtomicU64::new(0),
            records: AtomicU64::new(0),
            budget_exhausted: AtomicBool::new(false),
        })
    }

    /// The records a write of `len` bytes may produce: at most one per full 16 KiB,
    /// plus one it may close (a record left open by `MSG_MORE` was charged already).
    fn cost(len: usize) -> u64 {
        (len / MAX_RECORD_PLAINTEXT) as u64 + 1
    }

    /// Fails when a write of `len` bytes might exceed the record budget (kernel TLS only).
    fn check(&self, len: usize) -> io::Result<()> {
        if self.path != LinkPath::Ktls
            || self.records.load(Ordering::Relaxed) + Self::cost(len) <= KTLS_RECORD_BUDGET
        {
            return Ok(());
        }
        self.budget_exhausted.store(true, Ordering::Relaxed);
        Err(io::Error::other(format!(
            "kernel TLS: this connection used its budget of {KTLS_RECORD_BUDGET} records \
             under one key, and this kernel cannot rekey; the next connection to this \
             peer uses rustls"
        )))
    }

    /// Counts a write of `n` bytes that went out.
    fn count(&self, n: usize) {
        if self.path == LinkPath::Ktls {
            self.records.fetch_add(Self::cost(n), Ordering::Relaxed);
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "cipher": self.cipher,
            "note": self.note,
            "bytes_write": self.bytes_write.load(Ordering::Relaxed),
            "bytes_sendfile": self.bytes_sendfile.load(Ordering::Relaxed),
        })
    }
}

/// A transfer connection's byte stream: see the module docs.
#[derive(Debug)]
pub enum Link {
    Rustls(Box<tokio_rustls::TlsStream<TcpStream>>, Arc<LinkStats>),
    Ktls(KtlsStream),
    Plain(PlainStream),
}

impl Link {
    pub fn stats(&self) -> &Arc<LinkStats> {
        match self {
            Link::Rustls(_, s) => s,
            Link::Ktls(k) => &k.stats,
            Link::Plain(p) => &p.stats,
        }
    }

    pub fn path(&self) -> LinkPath {
        self.stats().path
    }

    /// A handle for writing straight to the socket, when the record layer is in the
    /// kernel (kernel TLS) or absent (plain): nothing is buffered in user space.
    pub fn zero_copy(&self) -> Option<ZeroCopy> {
        match self {
            Link::Rustls(..) => None,
            Link::Ktls(k) => Some(ZeroCopy {
                sock: k.sock.clone(),
                stats: k.stats.clone(),
            }),
            Link::Plain(p) => Some(ZeroCopy {
                sock: p.sock.clone(),
                stats: p.stats.clone(),
            }),
        }
    }
}

/// Checks that rustls holds nothing that switching the record layer would lose (see
/// the module docs).
fn check_drained<D>(conn: &mut rustls::ConnectionCommon<D>) -> Result<(), LinkError> {
    let st = conn.process_new_packets()?;
    if st.plaintext_bytes_to_read() > 0 {
        return Err(LinkError::Pending(format!(
            "{} bytes of received data",
            st.plaintext_bytes_to_read()
        )));
    }
    if st.tls_bytes_to_write() > 0 {
        return Err(LinkError::Pending(format!(
            "{} TLS bytes to send",
            st.tls_bytes_to_write()
        )));
    }
    if st.peer_has_closed() {
        return Err(LinkError::Pending("the peer's close_notify".into()));
    }
    Ok(())
}

/// Sets up the record layer after the handshake and the `Hello` exchange: plain TCP
/// when `plaintext` (both peers agreed), else kernel TLS when `policy` allows it and the
/// kernel takes it, else rustls. See the module docs for why nothing is lost.
pub fn establish(
    mut tls: tokio_rustls::TlsStream<TcpStream>,
    plaintext: bool,
    policy: &Policy,
    force_rustls: bool,
) -> Result<Link, LinkError> {
    match &mut tls {
        tokio_rustls::TlsStream::Client(c) => check_drained(c.get_mut().1)?,
        tokio_rustls::TlsStream::Server(s) => check_drained(s.get_mut().1)?,
    }
    let suite = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
    let cipher = suite.and_then(Cipher::of_suite);
    if plaintext {
        let tcp = match tls {
            tokio_rustls::TlsStream::Client(c) => c.into_inner().0,
            tokio_rustls::TlsStream::Server(s) => s.into_inner().0,
        };
        return Ok(Link::Plain(PlainStream {
            sock: Arc::new(tcp),
            stats: LinkStats::new(LinkPath::Plain, None, None),
        }));
    }
    let rustls = |tls, note: Option<String>| {
        Ok(Link::Rustls(
            Box::new(tls),
            LinkStats::new(LinkPath::Rustls, cipher, note),
        ))
    };
    if !policy.ktls {
        return rustls(tls, None);
    }
    if force_rustls {
        return rustls(
            tls,
            Some("kernel TLS ran out of records with this peer before".into()),
        );
    }
    let Some(support) = policy.support.as_ref().filter(|s| s.available) else {
        return rustls(tls, Some("the kernel has no TLS".into()));
    };
    let Some(cipher) = cipher.filter(|c| support.ciphers.contains(c)) else {
        return rustls(
            tls,
            Some(format!(
                "the kernel does not take the negotiated cipher suite {suite:?}"
            )),
        );
    };
    // Still reversible: if the kernel refuses the upper layer, rustls carries on.
    if let Err(e) = sys::set_ulp_tls(tls.get_ref().0.as_fd()) {
        return rustls(tls, Some(format!("setsockopt(TCP_ULP, \"tls\"): {e}")));
    }
    let (tcp, secrets) = match tls {
        tokio_rustls::TlsStream::Client(c) => {
            let (tcp, conn) = c.into_inner();
            (tcp, conn.dangerous_extract_secrets()?)
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (tcp, conn) = s.into_inner();
            (tcp, conn.dangerous_extract_secrets()?)
        }
    };
    // From here on there is no way back to rustls: a refusal fails the connection (the
    // probe installed keys of this cipher on a loopback link, so it should not happen).
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    for (dir, seq, secret, op) in [
        (
            sys::Direction::Tx,
            tx_seq,
            tx,
            "setsockopt(SOL_TLS, TLS_TX)",
        ),
        (
            sys::Direction::Rx,
            rx_seq,
            rx,
            "setsockopt(SOL_TLS, TLS_RX)",
        ),
    ] {
        let info = info_from_secrets(&secret, seq).ok_or_else(|| LinkError::Kernel {
            op,
            source: io::Error::other("rustls extracted secrets of another cipher"),
        })?;
        sys::set_crypto_info(tcp.as_fd(), dir, &info)
            .map_err(|source| LinkError::Kernel { op, source })?;
    }
    Ok(Link::Ktls(KtlsStream {
        sock: Arc::new(tcp),
        stats: LinkStats::new(LinkPath::Ktls, Some(cipher), None),
        rbuf: Vec::new(),
        rpos: 0,
        rlen: 0,
        eof: false,
        close_sent: false,
    }))
}

fn info_from_secrets(secret: &ConnectionTrafficSecrets, seq: u64) -> Option<sys::CryptoInfo> {
    let (cipher, key, iv) = match secret {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key, iv)
        }
        _ => return None,
    };
    Some(crypto_info(cipher, key.as_ref(), iv.as_ref(), seq))
}

/// The kernel's key structure for one direction. For AES-GCM the 12-byte TLS 1.3 IV is
/// split into the 4-byte salt and an 8-byte IV; ChaCha20-Poly1305 takes all 12 bytes as
/// its IV. `rec_seq` is the next record's sequence number, big-endian.
fn crypto_info(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> sys::CryptoInfo {
    fn copy<const N: usize>(src: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(src.len());
        out[..n].copy_from_slice(&src[..n]);
        out
    }
    let info = |cipher_type| libc::tls_crypto_info {
        version: libc::TLS_1_3_VERSION,
        cipher_type,
    };
    let rec_seq = seq.to_be_bytes();
    match cipher {
        Cipher::Aes128Gcm => sys::CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
            info: info(libc::TLS_CIPHER_AES_GCM_128),
            iv: copy(iv.get(4..).unwrap_or_default()),
            key: copy(key),
            salt: copy(iv),
            rec_seq,
        }),
        Cipher::Aes256Gcm => sys::CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
            info: info(libc::TLS_CIPHER_AES_GCM_256),
            iv: copy(iv.get(4..).unwrap_or_default()),
            key: copy(key),
            salt: copy(iv),
            rec_seq,
        }),
        Cipher::Chacha20Poly1305 => {
            sys::CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: copy(iv),
                key: copy(key),
                salt: [],
                rec_seq,
            })
        }
    }
}

/// Writes `buf` to `sock` (readiness-driven, non-blocking), counting it.
fn poll_write_sock(
    sock: &TcpStream,
    stats: &LinkStats,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(sock.poll_write_ready(cx))?;
        match sock.try_write(buf) {
            Ok(n) => {
                stats.count(n);
                stats.bytes_write.fetch_add(n as u64, Ordering::Relaxed);
                return Poll::Ready(Ok(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// A TCP stream whose record layer is in the kernel. See the module docs.
#[derive(Debug)]
pub struct KtlsStream {
    sock: Arc<TcpStream>,
    stats: Arc<LinkStats>,
    /// Records read for small reads (a frame header) land here first; `rbuf[rpos..rlen]`
    /// is what the caller has not taken yet. Allocated at the first small read.
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    /// `close_notify` (or the end of the TCP stream) was received.
    eof: bool,
    close_sent: bool,
}

/// What a received non-data record means.
fn control_record(record_type: u8, body: &[u8]) -> io::Result<bool> {
    match record_type {
        CT_ALERT => match body {
            [_, 0] => Ok(true),
            [level, desc] => Err(io::Error::other(format!(
                "peer sent TLS alert {desc} (level {level})"
            ))),
            _ => Err(io::Error::other("peer sent a malformed TLS alert")),
        },
        CT_HANDSHAKE => {
            let mut rest = body;
            while let [kind, l0, l1, l2, tail @ ..] = rest {
                let len = usize::from(*l0) << 16 | usize::from(*l1) << 8 | usize::from(*l2);
                match *kind {
                    HS_NEW_SESSION_TICKET => {
                        tracing::debug!("kernel TLS: ignoring a NewSessionTicket (no resumption)");
                    }
                    HS_KEY_UPDATE => {
                        return Err(io::Error::other(
                            "peer updated its TLS keys (KeyUpdate); kernel TLS on this kernel \
                             cannot follow: the connection must be re-established",
                        ));
                    }
                    other => {
                        return Err(io::Error::other(format!(
                            "peer sent TLS handshake message {other} after the handshake; \
                             kernel TLS cannot handle it"
                        )));
                    }
                }
                rest = tail.get(len..).unwrap_or_default();
            }
            Ok(false)
        }
        t => Err(io::Error::other(format!(
            "kernel TLS: unexpected record type {t}"
        ))),
    }
}

impl AsyncRead for KtlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.rpos < this.rlen {
                let n = buf.remaining().min(this.rlen - this.rpos);
                buf.put_slice(&this.rbuf[this.rpos..this.rpos + n]);
                this.rpos += n;
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.sock.poll_read_ready(cx))?;
            // Big reads (a frame body) go straight into the caller's buffer; small ones
            // (a frame header) through our own, which holds a whole record, so that a
            // control record is never cut short.
            let direct = buf.remaining() > MAX_RECORD_PLAINTEXT;
            if !direct && this.rbuf.is_empty() {
                this.rbuf = vec![0; MAX_RECORD_PLAINTEXT + 256];
            }
            let sock = &this.sock;
            let rbuf = &mut this.rbuf;
            let r = sock.try_io(Interest::READABLE, || {
                let fd = sock.as_fd();
                if direct {
                    sys::recv_record(fd, buf.initialize_unfilled())
                } else {
                    sys::recv_record(fd, rbuf)
                }
            });
            let (n, record_type) = match r {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n == 0 {
                // The TCP stream ended without close_notify: the reader sees the end and
                // the frame layer reports a truncated frame if it was inside one.
                this.eof = true;
                continue;
            }
            if record_type == CT_APPLICATION_DATA {
                if direct {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                this.rpos = 0;
                this.rlen = n;
                continue;
            }
            let body = if direct {
                &buf.initialize_unfilled()[..n]
            } else {
                &this.rbuf[..n]
            };
            match control_record(record_type, body) {
                Ok(true) => this.eof = true,
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for KtlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.stats.check(buf.len())?;
        poll_write_sock(&this.sock, &this.stats, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends `close_notify`, then shuts down the sending side of the TCP connection.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_sent {
            ready!(this.sock.poll_write_ready(cx))?;
            let sock = &this.sock;
            match sock.try_io(Interest::WRITABLE, || {
                sys::send_record(sock.as_fd(), CT_ALERT, &[1, 0])
            }) {
                Ok(_) => {
                    this.stats.count(2);
                    this.close_sent = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(
            rustix::net::shutdown(this.sock.as_fd(), rustix::net::Shutdown::Write)
                .map_err(io::Error::from),
        )
    }
}

/// A TCP stream without TLS, after an authenticated handshake between trusted peers.
#[derive(Debug)]
pub struct PlainStream {
    sock: Arc<TcpStream>,
    stats: Arc<LinkStats>,
}

impl AsyncRead for PlainStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.sock.poll_read_ready(cx))?;
            match self.sock.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PlainStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_sock(&self.sock, &self.stats, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(self.sock.as_fd(), rustix::net::Shutdown::Write)
                .map_err(io::Error::from),
        )
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Rustls(t, _) => Pin::new(t.as_mut()).poll_read(cx, buf),
            Link::Ktls(k) => Pin::new(k).poll_read(cx, buf),
            Link::Plain(p) => Pin::new(p).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Rustls(t, stats) => {
                let r = Pin::new(t.as_mut()).poll_write(cx, buf);
                if let Poll::Ready(Ok(n)) = &r {
                    stats.bytes_write.fetch_add(*n as u64, Ordering::Relaxed);
                }
                r
            }
            Link::Ktls(k) => Pin::new(k).poll_write(cx, buf),
            Link::Plain(p) => Pin::new(p).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Rustls(t, _) => Pin::new(t.as_mut()).poll_flush(cx),
            Link::Ktls(k) => Pin::new(k).poll_flush(cx),
            Link::Plain(p) => Pin::new(p).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Rustls(t, _) => Pin::new(t.as_mut()).poll_shutdown(cx),
            Link::Ktls(k) => Pin::new(k).poll_shutdown(cx),
            Link::Plain(p) => Pin::new(p).poll_shutdown(cx),
        }
    }
}

/// Direct access to the socket of a kernel-TLS or plain link, for `sendfile`. Writes
/// through it and through the link's stream interleave correctly because neither keeps
/// bytes in user space.
#[derive(Debug, Clone)]
pub struct ZeroCopy {
    sock: Arc<TcpStream>,
    stats: Arc<LinkStats>,
}

impl ZeroCopy {
    pub fn path(&self) -> LinkPath {
        self.stats.path
    }

    /// Writes all of `bytes` with `MSG_MORE`: the kernel holds them back (in the same
    /// TLS record, on kernel TLS) until what follows is written.
    pub async fn send_more(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.stats.check(bytes.len())?;
            self.sock.writable().await?;
            let sock = &self.sock;
            match sock.try_io(Interest::WRITABLE, || {
                rustix::net::send(
                    sock.as_fd(),
                    bytes,
                    rustix::net::SendFlags::MORE
                        | rustix::net::SendFlags::NOSIGNAL
                        | rustix::net::SendFlags::DONTWAIT,
                )
                .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    self.stats.count(n);
                    self.stats
                        .bytes_write
                        .fetch_add(n as u64, Ordering::Relaxed);
                    bytes = &bytes[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `sendfile`s `len` bytes of `file` from `offset` to the socket. A file that ends
    /// early is an error: the frame header already promised `len` bytes.
    pub async fn sendfile(&self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            self.stats.check(left)?;
            self.sock.writable().await?;
            let sock = &self.sock;
            // The page cache may have to be filled from disk: a blocking call.
            let r = tokio::task::block_in_place(|| {
                sock.try_io(Interest::WRITABLE, || {
                    rustix::fs::sendfile(sock.as_fd(), file, Some(&mut off), left)
                        .map_err(io::Error::from)
                })
            });
            match r {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("file ended {left} bytes early during sendfile"),
                    ));
                }
                Ok(n) => {
                    self.stats.count(n);
                    self.stats
                        .bytes_sendfile
                        .fetch_add(n as u64, Ordering::Relaxed);
                    left -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_are_classified() {
        let errno = |e| Err(io::Error::from_raw_os_error(e));
        assert!(classify_ulp(&errno(libc::ENOTCONN)).0);
        let (ok, why) = classify_ulp(&errno(libc::ENOENT));
        assert!(!ok);
        assert!(why.contains("ENOENT"), "{why}");
        let (ok, why) = classify_ulp(&errno(libc::EPERM));
        assert!(!ok);
        assert!(why.contains("unexpected"), "{why}");
        assert!(!classify_ulp(&Ok(())).0);
    }

    /// The probe agrees with the kernel's own view: `/proc/sys/net/ipv4/tcp_available_ulp`
    /// lists `tls` once the module is loaded (the probe loads it when it can).
    #[test]
    fn probe_matches_the_kernel() {
        let p = probe();
        let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .unwrap_or_default()
            .split_whitespace()
            .any(|u| u == "tls");
        assert_eq!(p.available, listed, "{p:?}");
        if p.available {
            assert!(!p.ciphers.is_empty(), "{p:?}");
        } else {
            assert!(p.ciphers.is_empty());
        }
    }

    #[test]
    fn env_switch() {
        for off in ["off", "OFF", "0", "false", "no", " off\n"] {
            assert!(env_disables(Some(off)), "{off}");
        }
        for on in ["on", "1", "", "yes", "auto"] {
            assert!(!env_disables(Some(on)), "{on}");
        }
        assert!(!env_disables(None));
        let p = Policy::new(true, Some("off"), vec![]);
        assert!(!p.ktls);
        // Probed all the same, for status.
        assert!(p.support.is_some());
        let p = Policy::new(false, None, vec![]);
        assert!(!p.ktls);
    }

    #[test]
    fn trust() {
        let p = Policy {
            ktls: false,
            trusted_peers: vec!["node-a".into()],
            support: None,
        };
        assert!(p.trusts("node-a"));
        assert!(!p.trusts("node-b"));
        let p = Policy {
            trusted_peers: vec!["*".into()],
            ..p
        };
        assert!(p.trusts("node-b"));
        let p = Policy {
            trusted_peers: vec![],
            ..p
        };
        assert!(!p.trusts("node-a"));
    }

    #[test]
    fn key_layout() {
        let key: Vec<u8> = (0..32).collect();
        let iv: Vec<u8> = (100..112).collect();
        match crypto_info(Cipher::Aes128Gcm, &key[..16], &iv, 0x0102) {
            sys::CryptoInfo::Aes128Gcm(i) => {
                assert_eq!(i.info.version, libc::TLS_1_3_VERSION);
                assert_eq!(i.info.cipher_type, libc::TLS_CIPHER_AES_GCM_128);
                assert_eq!(i.salt, [100, 101, 102, 103]);
                assert_eq!(i.iv, [104, 105, 106, 107, 108, 109, 110, 111]);
                assert_eq!(i.key[..], key[..16]);
                assert_eq!(i.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
            }
            _ => panic!("wrong cipher"),
        }
        match crypto_info(Cipher::Aes256Gcm, &key, &iv, 7) {
            sys::CryptoInfo::Aes256Gcm(i) => {
                assert_eq!(i.info.cipher_type, libc::TLS_CIPHER_AES_GCM_256);
                assert_eq!(i.salt, [100, 101, 102, 103]);
                assert_eq!(i.key[..], key[..]);
                assert_eq!(i.rec_seq, 7u64.to_be_bytes());
            }
            _ => panic!("wrong cipher"),
        }
        match crypto_info(Cipher::Chacha20Poly1305, &key, &iv, 0) {
            sys::CryptoInfo::Chacha20Poly1305(i) => {
                assert_eq!(i.info.cipher_type, libc::TLS_CIPHER_CHACHA20_POLY1305);
                assert_eq!(i.iv[..], iv[..]);
                assert_eq!(i.key[..], key[..]);
            }
            _ => panic!("wrong cipher"),
        }
    }

    #[test]
    fn control_records() {
        assert!(control_record(CT_ALERT, &[1, 0]).unwrap());
        let e = control_record(CT_ALERT, &[2, 40]).unwrap_err();
        assert!(e.to_string().contains("alert 40"), "{e}");
        assert!(control_record(CT_ALERT, &[1]).is_err());
        // A NewSessionTicket is ignored; a KeyUpdate (even after one) is an error.
        assert!(!control_record(CT_HANDSHAKE, &[4, 0, 0, 2, 9, 9]).unwrap());
        let e = control_record(CT_HANDSHAKE, &[4, 0, 0, 1, 9, 24, 0, 0, 1, 0]).unwrap_err();
        assert!(e.to_string().contains("KeyUpdate"), "{e}");
        assert!(control_record(CT_HANDSHAKE, &[1, 0, 0, 0]).is_err());
        assert!(control_record(99, &[]).is_err());
    }

    #[test]
    fn record_budget() {
        let s = LinkStats::new(LinkPath::Ktls, Some(Cipher::Aes256Gcm), None);
        s.count(3 * MAX_RECORD_PLAINTEXT + 5);
        assert_eq!(s.records.load(Ordering::Relaxed), 4);
        s.records.store(KTLS_RECORD_BUDGET - 2, Ordering::Relaxed);
        s.check(100).unwrap();
        s.check(MAX_RECORD_PLAINTEXT).unwrap();
        assert!(!s.budget_exhausted.load(Ordering::Relaxed));
        let e = s.check(2 * MAX_RECORD_PLAINTEXT).unwrap_err();
        assert!(e.to_string().contains("budget"), "{e}");
        assert!(s.budget_exhausted.load(Ordering::Relaxed));
        // Other paths are neither limited nor counted.
        let s = LinkStats::new(LinkPath::Rustls, None, None);
        s.count(1 << 30);
        assert_eq!(s.records.load(Ordering::Relaxed), 0);
        s.records.store(u64::MAX / 2, Ordering::Relaxed);
        s.check(1 << 30).unwrap();
    }
}
