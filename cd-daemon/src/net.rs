//! Framed connections: cd-proto frames over a TLS stream.
//!
//! [`Conn`] owns one TLS stream and speaks the frame format of [`cd_proto::frame`]:
//! control frames carry a prost [`Envelope`](cd_proto::pb::Envelope); data frames carry
//! file bytes, zstd-compressed per link and protected by a CRC32 of the raw bytes,
//! which is checked here on receipt. A peer that speaks another protocol version gets
//! an `Error` frame naming both versions before the connection closes, so neither side
//! hangs. Reads of a frame body are bounded by `MAX_FRAME_LEN` before any allocation.
//!
//! Also here: connecting and accepting with the cluster's TLS configurations, and
//! the `Hello` exchange that binds the name a peer claims to its certificate.
//!
//! Transfer connections ([`connect_transfer`], [`accept_transfer`]) then go on over a
//! [`Link`]: kernel TLS, rustls, or plain TCP between trusted peers (see
//! [`crate::link`]). On kernel TLS and plain links, whole files can be sent with
//! `sendfile` ([`Conn::send_data_zero_copy`]); such data frames carry no CRC (see
//! [`cd_proto::frame::FLAG_NO_CRC`]), and are only sent to a peer whose `Hello` said it
//! accepts them.

use std::sync::Arc;
use std::time::Duration;

use cd_proto::frame::{self, FrameError, FrameHeader, FrameKind};
use cd_proto::pb::{self, envelope::Msg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::link::{self, Link, LinkError, LinkStats, Policy, ZeroCopy};
use crate::pki;

/// Control frame bound for authenticated cluster members.
pub const MAX_CONTROL_AUTHENTICATED: u32 = 4 << 20;
/// Control frame bound for a peer without a certificate (it may only join).
pub const MAX_CONTROL_UNAUTHENTICATED: u32 = 64 << 10;

/// How long a TLS handshake plus `Hello` exchange may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        peer: String,
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer reported {code:?}: {message}")]
    Remote {
        code: pb::error::ErrorCode,
        message: String,
    },
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("data frame for file {file_id}: CRC32 mismatch (frame {expected:08x}, data {got:08x})")]
    Crc {
        file_id: u32,
        expected: u32,
        got: u32,
    },
    #[error("data frame for file {file_id}: {reason}")]
    BadData { file_id: u32, reason: String },
    #[error("peer `{claimed}` presented a certificate that is not valid for that name")]
    NameMismatch { claimed: String },
    #[error("peer presented no client certificate")]
    NoCertificate,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// One received frame.
#[derive(Debug)]
pub enum Incoming {
    Control(Msg),
    /// Raw (decompressed, CRC-checked unless sent without CRC) file bytes.
    Data {
        file_id: u32,
        bytes: Vec<u8>,
    },
}

/// A framed, bidirectional connection.
pub struct Conn<S> {
    stream: S,
    /// Largest control frame body accepted. prost decoding amplifies memory (a
    /// 16 MiB frame of empty entries decodes to over 1 GB), so this is far below
    /// the codec's `MAX_FRAME_LEN`, and tiny until the peer is authenticated.
    max_control: u32,
    /// Bytes of data frames sent and received, after compression (wire size).
    pub data_wire_out: u64,
    pub data_wire_in: u64,
    zstd: Zstd,
    /// Direct socket access for `sendfile`, on a kernel-TLS or plain link whose peer
    /// accepts data frames without CRC.
    zero_copy: Option<ZeroCopy>,
    /// The link's counters, for a transfer connection.
    link: Option<Arc<LinkStats>>,
}

/// Compression state of one direction of a connection: contexts made once (a zstd
/// context allocates and clears its tables when made: per chunk, that cost more than
/// compressing), and what was learnt about the file being sent.
#[derive(Default)]
struct Zstd {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    out: Vec<u8>,
    /// The file whose last chunk did not compress, and how many of its next chunks
    /// go raw without trying (random data, images: compression only costs CPU).
    incompressible: Option<(u32, u32)>,
}

/// Chunks of a file that go raw after one that did not shrink, before trying again.
const SKIP_AFTER_INCOMPRESSIBLE: u32 = 7;
/// A chunk "does not compress" unless it shrinks below this fraction (in 1/64).
const COMPRESSIBLE_64THS: usize = 62;

impl Zstd {
    /// Compresses `raw` at `level` if that pays (see [`Conn::send_data`]); the result
    /// is in `self.out`.
    fn compress(&mut self, file_id: u32, raw: &[u8], level: i32) -> bool {
        if level <= 0 || raw.len() < 64 {
            return false;
        }
        if let Some((id, left)) = &mut self.incompressible
            && *id == file_id
            && *left > 0
        {
            *left -= 1;
            return false;
        }
        if self.compressor.as_ref().is_none_or(|(l, _)| *l != level) {
            match zstd::bulk::Compressor::new(level) {
                Ok(c) => self.compressor = Some((level, c)),
                Err(_) => return false,
            }
        }
        let Some((_, c)) = self.compressor.as_mut() else {
            return false;
        };
        // Room for a result worth sending only: a bigger one fails and goes raw.
        let room = raw.len() * COMPRESSIBLE_64THS / 64;
        self.out.clear();
        self.out.reserve(room);
        let ok = c.compress_to_buffer(raw, &mut self.out).is_ok() && self.out.len() <= room;
        self.incompressible = if ok {
            None
        } else {
            Some((file_id, SKIP_AFTER_INCOMPRESSIBLE))
        };
        ok
    }

    fn decompress(&mut self, body: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
        if self.decompressor.is_none() {
            self.decompressor = Some(zstd::bulk::Decompressor::new()?);
        }
        self.decompressor
            .as_mut()
            .expect("made above")
            .decompress(body, raw_len)
    }
}

impl<S> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("data_wire_out", &self.data_wire_out)
            .finish_non_exhaustive()
    }
}

impl<S> Conn<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            max_control: MAX_CONTROL_AUTHENTICATED,
            data_wire_out: 0,
            data_wire_in: 0,
            zstd: Zstd::default(),
            zero_copy: None,
            link: None,
        }
    }

    /// The `sendfile` handle, when this connection can carry file data that way.
    pub fn zero_copy(&self) -> Option<&ZeroCopy> {
        self.zero_copy.as_ref()
    }

    /// The link's counters (transfer connections only).
    pub fn link_stats(&self) -> Option<&Arc<LinkStats>> {
        self.link.as_ref()
    }

    /// Lowers or raises the control frame bound (see [`MAX_CONTROL_UNAUTHENTICATED`]).
    pub fn set_max_control(&mut self, len: u32) {
        self.max_control = len;
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream (tests write raw bytes with it).
    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl Conn<Link> {
    /// A transfer connection over `link`; `peer_accepts_no_crc` from the peer's `Hello`.
    pub fn from_link(link: Link, peer_accepts_no_crc: bool) -> Self {
        let zero_copy = link.zero_copy().filter(|_| peer_accepts_no_crc);
        let stats = link.stats().clone();
        let mut c = Conn::new(link);
        c.zero_copy = zero_copy;
        c.link = Some(stats);
        c
    }
}

impl<S> Conn<S> {
    /// Sends `len` bytes of `file` from `offset` as one data frame without CRC: the
    /// header with `MSG_MORE`, then the content with `sendfile`, so it never passes
    /// through user space. Only on a connection with [`Conn::zero_copy`]; `len` at most
    /// `MAX_CHUNK_RAW`. An error leaves the frame unfinished: the connection is unusable.
    pub async fn send_data_zero_copy(
        &mut self,
        file_id: u32,
        file: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Result<u64, NetError> {
        let zc = self.zero_copy.as_ref().ok_or(NetError::Io {
            op: "sendfile",
            source: std::io::Error::other("this connection cannot send zero-copy"),
        })?;
        let header = frame::encode_data_header(file_id, None, len as u32, false, len);
        zc.send_more(&header).await.map_err(|source| NetError::Io {
            op: "write data header",
            source,
        })?;
        zc.sendfile(file, offset, len)
            .await
            .map_err(|source| NetError::Io {
                op: "sendfile",
                source,
            })?;
        let n = (header.len() + len) as u64;
        self.data_wire_out += n;
        Ok(n)
    }
}

impl<S: AsyncRead + AsyncWrite> Conn<S> {
    /// Splits into a receiving and a sending half, for a reader task and a writer
    /// task (a frame read must never be cancelled half-way, so no `select!` on it).
    pub fn split(self) -> (Conn<tokio::io::ReadHalf<S>>, Conn<tokio::io::WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        let (mut r, mut w) = (Conn::new(r), Conn::new(w));
        r.max_control = self.max_control;
        w.max_control = self.max_control;
        (r, w)
    }
}

impl<S: AsyncWrite + Unpin> Conn<S> {
    pub async fn send(&mut self, msg: Msg) -> Result<(), NetError> {
        let bytes = frame::encode_control(&pb::Envelope { msg: Some(msg) });
        self.stream
            .write_all(&bytes)
            .await
            .map_err(|source| NetError::Io {
                op: "write frame",
                source,
            })?;
        self.stream.flush().await.map_err(|source| NetError::Io {
            op: "flush",
            source,
        })
    }

    /// Sends one chunk of file `file_id`, compressed with `zstd_level` (0 = none) when
    /// that makes it smaller by at least 1/32; after a chunk that does not, the next
    /// few chunks of the same file go raw without trying. Returns the bytes put on the
    /// wire.
    pub async fn send_data(
        &mut self,
        file_id: u32,
        raw: &[u8],
        zstd_level: i32,
    ) -> Result<u64, NetError> {
        let crc = crc32fast::hash(raw);
        let compressed = self.zstd.compress(file_id, raw, zstd_level);
        let body: &[u8] = if compressed { &self.zstd.out } else { raw };
        let header =
            frame::encode_data_header(file_id, Some(crc), raw.len() as u32, compressed, body.len());
        self.stream
            .write_all(&header)
            .await
            .map_err(|source| NetError::Io {
                op: "write data",
                source,
            })?;
        self.stream
            .write_all(body)
            .await
            .map_err(|source| NetError::Io {
                op: "write data",
                source,
            })?;
        let n = (header.len() + body.len()) as u64;
        self.data_wire_out += n;
        Ok(n)
    }

    pub async fn flush(&mut self) -> Result<(), NetError> {
        self.stream.flush().await.map_err(|source| NetError::Io {
            op: "flush",
            source,
        })
    }

    pub async fn send_error(&mut self, code: pb::error::ErrorCode, message: impl Into<String>) {
        let _ = self
            .send(Msg::Error(pb::Error {
                code: code as i32,
                message: message.into(),
            }))
            .await;
    }

    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Receives the next frame. A remote `Error` message becomes [`NetError::Remote`].
    pub async fn recv(&mut self) -> Result<Incoming, NetError> {
        let mut hdr = [0u8; frame::HEADER_LEN];
        match self.stream.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(NetError::Closed);
            }
            Err(source) => {
                return Err(NetError::Io {
                    op: "read frame header",
                    source,
                });
            }
        }
        let header = FrameHeader::decode(&hdr)?;
        if header.kind == FrameKind::Control && header.len > self.max_control {
            return Err(FrameError::TooLong {
                len: header.len,
                max: self.max_control,
            }
            .into());
        }
        let mut body = vec![0u8; header.len as usize];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|source| NetError::Io {
                op: "read frame body",
                source,
            })?;
        match header.kind {
            FrameKind::Control => {
                let env = frame::decode_control(&header, &body)?;
                match env.msg {
                    Some(Msg::Error(e)) => Err(NetError::Remote {
                        code: pb::error::ErrorCode::try_from(e.code)
                            .unwrap_or(pb::error::ErrorCode::Unspecified),
                        message: e.message,
                    }),
                    Some(m) => Ok(Incoming::Control(m)),
                    None => Err(FrameError::EmptyEnvelope.into()),
                }
            }
            FrameKind::Data => {
                self.data_wire_in += (frame::HEADER_LEN + body.len()) as u64;
                let chunk = frame::decode_data(&header, &body)?;
                let bytes = if chunk.compressed {
                    let out = self
                        .zstd
                        .decompress(chunk.body, chunk.raw_len as usize)
                        .map_err(|e| NetError::BadData {
                            file_id: chunk.file_id,
                            reason: format!("zstd: {e}"),
                        })?;
                    if out.len() != chunk.raw_len as usize {
                        return Err(NetError::BadData {
                            file_id: chunk.file_id,
                            reason: format!(
                                "decompressed to {} bytes, header says {}",
                                out.len(),
                                chunk.raw_len
                            ),
                        });
                    }
                    out
                } else {
                    chunk.body.to_vec()
                };
                // Without CRC (FLAG_NO_CRC) the link's AEAD, if any, and the BLAKE3 of the
                // whole file that the receiver checks at FileEnd protect the content.
                if let Some(expected) = chunk.crc32 {
                    let got = crc32fast::hash(&bytes);
                    if got != expected {
                        return Err(NetError::Crc {
                            file_id: chunk.file_id,
                            expected,
                            got,
                        });
                    }
                }
                Ok(Incoming::Data {
                    file_id: chunk.file_id,
                    bytes,
                })
            }
        }
    }

    /// Receives a control message, refusing data frames.
    pub async fn recv_msg(&mut self) -> Result<Msg, NetError> {
        match self.recv().await? {
            Incoming::Control(m) => Ok(m),
            Incoming::Data { file_id, .. } => Err(NetError::Unexpected {
                expected: "a control message",
                got: format!("data frame for file {file_id}"),
            }),
        }
    }
}

/// Short name of a message, for protocol errors.
pub fn msg_name(m: &Msg) -> String {
    let s = format!("{m:?}");
    s.split(['(', ' ', '{']).next().unwrap_or("?").to_owned()
}

pub type ClientConn = Conn<tokio_rustls::client::TlsStream<TcpStream>>;
pub type ServerConn = Conn<tokio_rustls::server::TlsStream<TcpStream>>;

/// Connects to `addr` and completes a TLS handshake verifying the server as `server_name`.
pub async fn connect(
    addr: &str,
    server_name: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<ClientConn, NetError> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| NetError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        tune(&tcp);
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| {
            NetError::Handshake {
                peer: server_name.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            }
        })?;
        let tls = TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|source| NetError::Handshake {
                peer: format!("{server_name} at {addr}"),
                source,
            })?;
        Ok(Conn::new(tls))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| NetError::Timeout("TLS handshake"))?
}

/// How long sent data may stay unacknowledged, or a silent peer unanswered to
/// keepalive probes, before the kernel gives the connection up: a cut link then fails
/// the transfer (and is reported and routed around) in tens of seconds, not after
/// TCP's default of about a quarter of an hour. A peer that is merely busy (applying
/// a large change set, forwarding to its own children) still acknowledges probes.
pub const LINK_DEAD_AFTER: Duration = Duration::from_secs(30);

/// No Nagle delay; a dead peer is detected within [`LINK_DEAD_AFTER`].
fn tune(tcp: &TcpStream) {
    use rustix::net::sockopt;
    let _ = tcp.set_nodelay(true);
    let _ = sockopt::set_tcp_user_timeout(tcp, LINK_DEAD_AFTER.as_millis() as u32);
    let _ = sockopt::set_socket_keepalive(tcp, true);
    let _ = sockopt::set_tcp_keepidle(tcp, Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepintvl(tcp, Duration::from_secs(5));
    let _ = sockopt::set_tcp_keepcnt(tcp, 4);
}

/// Completes the server side of a TLS handshake.
pub async fn accept(tcp: TcpStream, acceptor: &TlsAcceptor) -> Result<ServerConn, NetError> {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    tune(&tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| NetError::Timeout("TLS handshake"))?
        .map_err(|source| NetError::Handshake { peer, source })?;
    Ok(Conn::new(tls))
}

impl ServerConn {
    /// The verified client certificate, if the client presented one.
    pub fn peer_cert(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.get_ref()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned())
    }

    /// Receives the client's `Hello` and checks its claimed name against its
    /// certificate (when `require_cert`), then answers with our own `Hello`.
    pub async fn server_hello(
        &mut self,
        our_name: &str,
        require_cert: bool,
    ) -> Result<pb::Hello, NetError> {
        self.server_hello_with(require_cert, |h| {
            hello(
                our_name,
                pb::hello::Purpose::try_from(h.purpose).unwrap_or_default(),
            )
        })
        .await
    }

    /// [`ServerConn::server_hello`] with the answer built by `answer` from the client's
    /// (already authenticated) `Hello`.
    pub async fn server_hello_with(
        &mut self,
        require_cert: bool,
        answer: impl FnOnce(&pb::Hello) -> pb::Hello,
    ) -> Result<pb::Hello, NetError> {
        let msg = self.recv_hello_msg().await?;
        let Msg::Hello(h) = msg else {
            return Err(NetError::Unexpected {
                expected: "Hello",
                got: msg_name(&msg),
            });
        };
        match self.peer_cert() {
            Some(cert) if !pki::cert_matches_name(&cert, &h.node_name) => {
                self.send_error(
                    pb::error::ErrorCode::Unauthenticated,
                    "certificate does not match the name in Hello",
                )
                .await;
                return Err(NetError::NameMismatch {
                    claimed: h.node_name,
                });
            }
            Some(_) => {}
            None if require_cert => {
                self.send_error(
                    pb::error::ErrorCode::Unauthenticated,
                    "a client certificate is required",
                )
                .await;
                return Err(NetError::NoCertificate);
            }
            None => {}
        }
        self.send(Msg::Hello(answer(&h))).await?;
        Ok(h)
    }
}

impl ClientConn {
    /// Sends our `Hello` and waits for the server's.
    pub async fn client_hello(
        &mut self,
        our_name: &str,
        purpose: pb::hello::Purpose,
    ) -> Result<pb::Hello, NetError> {
        self.client_hello_with(hello(our_name, purpose)).await
    }

    /// Sends `ours` and waits for the server's `Hello`.
    pub async fn client_hello_with(&mut self, ours: pb::Hello) -> Result<pb::Hello, NetError> {
        self.send(Msg::Hello(ours)).await?;
        let msg = self.recv_hello_msg().await?;
        match msg {
            Msg::Hello(h) => Ok(h),
            m => Err(NetError::Unexpected {
                expected: "Hello",
                got: msg_name(&m),
            }),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// The first message of a connection. A peer speaking another protocol version
    /// is told so in our version before we hang up, so it reports a clear error
    /// instead of waiting.
    async fn recv_hello_msg(&mut self) -> Result<Msg, NetError> {
        let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.recv_msg())
            .await
            .map_err(|_| NetError::Timeout("hello"))?;
        if let Err(NetError::Frame(
            e @ (FrameError::PeerTooNew { .. } | FrameError::PeerTooOld { .. }),
        )) = &r
        {
            self.send_error(pb::error::ErrorCode::VersionMismatch, e.to_string())
                .await;
        }
        r
    }
}

pub fn hello(name: &str, purpose: pb::hello::Purpose) -> pb::Hello {
    pb::Hello {
        node_name: name.to_owned(),
        software_version: cd_proto::SOFTWARE_VERSION.to_owned(),
        purpose: purpose as i32,
        ..Default::default()
    }
}

/// A transfer connection after the handshake, the `Hello`s and the switch of the record
/// layer.
pub type LinkConn = Conn<Link>;

/// Connects to replica `server_name` at `addr` for a transfer: TLS handshake, `Hello`
/// (asking for plaintext when `want_plaintext`), then the record layer of
/// [`link::establish`]. `force_rustls`: do not use kernel TLS for this connection.
/// Returns the connection and the replica's `Hello`.
pub async fn connect_transfer(
    addr: &str,
    server_name: &str,
    cfg: Arc<rustls::ClientConfig>,
    our_name: &str,
    want_plaintext: bool,
    policy: &Policy,
    force_rustls: bool,
) -> Result<(LinkConn, pb::Hello), NetError> {
    let mut conn = connect(addr, server_name, cfg).await?;
    let ours = pb::Hello {
        plaintext: want_plaintext,
        accepts_no_crc: true,
        ..hello(our_name, pb::hello::Purpose::Transfer)
    };
    let theirs = conn.client_hello_with(ours).await?;
    if theirs.plaintext && !want_plaintext {
        return Err(NetError::Unexpected {
            expected: "an encrypted link (none was asked for)",
            got: "a plaintext answer".into(),
        });
    }
    let link = link::establish(
        tokio_rustls::TlsStream::Client(conn.into_inner()),
        theirs.plaintext,
        policy,
        force_rustls,
    )?;
    tracing::debug!(peer = server_name, path = link.path().as_str(), cipher = ?link.stats().cipher, note = ?link.stats().note, "transfer link (sending)");
    Ok((Conn::from_link(link, theirs.accepts_no_crc), theirs))
}

/// Accepts a transfer connection: TLS handshake, the client's `Hello` (certificate
/// required and matching its name), our answer (plaintext only when asked for, for a
/// transfer, by a peer `policy` trusts), then the record layer of [`link::establish`].
/// Returns the connection and the client's `Hello`.
pub async fn accept_transfer(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    our_name: &str,
    policy: &Policy,
) -> Result<(LinkConn, pb::Hello), NetError> {
    let mut conn = accept(tcp, acceptor).await?;
    let mut plaintext = false;
    let theirs = conn
        .server_hello_with(true, |h| {
            plaintext = h.plaintext
                && h.purpose == pb::hello::Purpose::Transfer as i32
                && policy.trusts(&h.node_name);
            pb::Hello {
                plaintext,
                accepts_no_crc: true,
                ..hello(
                    our_name,
                    pb::hello::Purpose::try_from(h.purpose).unwrap_or_default(),
                )
            }
        })
        .await?;
    if theirs.plaintext && !plaintext {
        tracing::info!(peer = %theirs.node_name, "peer asked for a plaintext link; not in trusted_peers, so the link stays encrypted");
    }
    let link = link::establish(
        tokio_rustls::TlsStream::Server(conn.into_inner()),
        plaintext,
        policy,
        false,
    )?;
    tracing::debug!(peer = %theirs.node_name, path = link.path().as_str(), cipher = ?link.stats().cipher, note = ?link.stats().note, "transfer link (receiving)");
    Ok((Conn::from_link(link, theirs.accepts_no_crc), theirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn data_is_compressed_only_where_it_pays() {
        let (a, b) = tokio::io::duplex(64 << 20);
        let (mut tx, mut rx) = (Conn::new(a), Conn::new(b));
        let text = b"<p>the same words again and again</p>\n".repeat(3000);
        let noise = random(9, 100_000);
        let mut sent = Vec::new();
        // File 1: text, compressed. File 2: noise, then text that is not tried for
        // the next chunks, then tried again. File 3: text again, compressed at once.
        let plan: Vec<(u32, &[u8])> = std::iter::once((1, &text[..]))
            .chain(std::iter::once((2, &noise[..])))
            .chain((0..SKIP_AFTER_INCOMPRESSIBLE).map(|_| (2, &text[..])))
            .chain([(2, &text[..]), (3, &text[..])])
            .collect();
        for (id, raw) in &plan {
            let wire = tx.send_data(*id, raw, 3).await.unwrap();
            sent.push(wire);
        }
        let hdr = (frame::HEADER_LEN + frame::DATA_PREFIX_LEN) as u64;
        let raw_cost = |raw: &[u8]| raw.len() as u64 + hdr;
        assert!(sent[0] < raw_cost(&text) / 10, "text compressed: {sent:?}");
        assert_eq!(sent[1], raw_cost(&noise), "noise goes raw");
        for w in &sent[2..2 + SKIP_AFTER_INCOMPRESSIBLE as usize] {
            assert_eq!(*w, raw_cost(&text), "not tried after noise: {sent:?}");
        }
        let n = plan.len();
        assert!(sent[n - 2] < raw_cost(&text) / 10, "tried again: {sent:?}");
        assert!(sent[n - 1] < raw_cost(&text) / 10, "another file: {sent:?}");
        for (id, raw) in &plan {
            match rx.recv().await.unwrap() {
                Incoming::Data { file_id, bytes } => {
                    assert_eq!(file_id, *id);
                    assert_eq!(&bytes[..], *raw);
                }
                Incoming::Control(m) => panic!("{m:?}"),
            }
        }
        assert_eq!(rx.data_wire_in, sent.iter().sum::<u64>());
    }
}
