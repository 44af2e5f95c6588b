//! Sans-IO frame codec.
//!
//! A connection carries a sequence of frames. Each frame is a fixed 12-byte header
//! followed by `len` bytes of body:
//!
//! ```text
//! offset  size  field
//!      0     4  magic    b"CDSY"
//!      4     1  version  protocol version of the sender
//!      5     1  kind     1 = control, 2 = data
//!      6     2  flags    big-endian; FLAG_ZSTD, FLAG_NO_CRC (data frames only)
//!      8     4  len      big-endian body length, <= MAX_FRAME_LEN
//! ```
//!
//! A **control** frame's body is one protobuf [`Envelope`]. A **data** frame's body is a
//! 12-byte prefix (`file_id`, `crc32` of the uncompressed bytes, `raw_len`, each a
//! big-endian `u32`) followed by a chunk of file content, zstd-compressed if the
//! header has [`FLAG_ZSTD`]. The codec never copies file content when encoding: the
//! caller writes [`encode_data_header`] and then the body itself.
//!
//! A data frame with [`FLAG_NO_CRC`] carries no CRC: its `crc32` field must be 0 and its
//! content must be uncompressed (the flag is refused together with [`FLAG_ZSTD`]). The
//! sender uses it when the content goes from the file to the socket without passing
//! through user space (`sendfile` onto kernel TLS or a plain TCP link), so it never
//! sees the bytes to checksum them. Integrity is then the TLS record's AEAD (on an
//! encrypted link) and, in every case, the whole-file BLAKE3 the receiver checks
//! before it keeps the file. A receiver only gets such frames from a sender that it
//! told, in its `Hello`, that it accepts them.
//!
//! Every frame carries the version so that a peer of a different version is reported
//! as such ([`FrameError::PeerTooNew`], [`FrameError::PeerTooOld`]) on the first frame,
//! instead of as a garbled message.
//!
//! Checksums and decompression are the caller's business: [`decode_data`] checks the
//! framing (lengths, bounds), not the content.

use prost::Message as _;

use crate::pb::Envelope;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CDSY";
/// Protocol version this build speaks (and writes into every frame).
pub const VERSION: u8 = 1;
/// Oldest protocol version this build accepts from a peer.
pub const MIN_VERSION: u8 = 1;
/// Length of the frame header: magic(4) version(1) kind(1) flags(2, BE) len(4, BE).
pub const HEADER_LEN: usize = 12;
/// Upper bound of a frame's body length.
pub const MAX_FRAME_LEN: u32 = 16 << 20;
/// Length of the data frame prefix: file_id u32 BE, crc32 u32 BE (of the raw,
/// uncompressed bytes), raw_len u32 BE.
pub const DATA_PREFIX_LEN: usize = 12;
/// Largest number of uncompressed content bytes in one data frame.
pub const MAX_CHUNK_RAW: usize = 256 * 1024;
/// Flag bit: the data frame's body is zstd-compressed.
pub const FLAG_ZSTD: u16 = 1;
/// Flag bit: the data frame carries no CRC (its `crc32` field is 0); never together
/// with [`FLAG_ZSTD`]. See the module docs.
pub const FLAG_NO_CRC: u16 = 2;

/// What a frame's body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One protobuf [`Envelope`].
    Control = 1,
    /// A data prefix and a chunk of file content.
    Data = 2,
}

impl FrameKind {
    fn from_u8(kind: u8) -> Option<Self> {
        match kind {
            1 => Some(Self::Control),
            2 => Some(Self::Data),
            _ => None,
        }
    }

    /// Flag bits defined for this kind of frame; any other bit is refused.
    fn known_flags(self) -> u16 {
        match self {
            Self::Control => 0,
            Self::Data => FLAG_ZSTD | FLAG_NO_CRC,
        }
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of the sender (between [`MIN_VERSION`] and [`VERSION`] once
    /// decoded).
    pub version: u8,
    pub kind: FrameKind,
    pub flags: u16,
    /// Body length in bytes (at most [`MAX_FRAME_LEN`] once decoded).
    pub len: u32,
}

impl FrameHeader {
    /// Parses and validates a header, in this order: magic, version, kind, flags (only
    /// the bits defined for the kind: none for control frames, [`FLAG_ZSTD`] and
    /// [`FLAG_NO_CRC`], but not both, for data frames), and `len <= MAX_FRAME_LEN`. The
    /// length is checked here, before the caller reads or allocates the body.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let [m0, m1, m2, m3, version, kind, f0, f1, l0, l1, l2, l3] = *buf;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if version > VERSION {
            return Err(FrameError::PeerTooNew {
                peer: version,
                ours: VERSION,
            });
        }
        if version < MIN_VERSION {
            return Err(FrameError::PeerTooOld {
                peer: version,
                min: MIN_VERSION,
            });
        }
        let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind { kind })?;
        let flags = u16::from_be_bytes([f0, f1]);
        if flags & !kind.known_flags() != 0 {
            return Err(FrameError::UnknownFlags { flags });
        }
        if flags & (FLAG_ZSTD | FLAG_NO_CRC) == FLAG_ZSTD | FLAG_NO_CRC {
            return Err(FrameError::ConflictingFlags { flags });
        }
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        Ok(FrameHeader {
            version,
            kind,
            flags,
            len,
        })
    }

    /// Serialises the header as is (no validation: a header built with bad values
    /// is refused by the receiving [`FrameHeader::decode`]).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = self.version;
        out[5] = self.kind as u8;
        out[6..8].copy_from_slice(&self.flags.to_be_bytes());
        out[8..12].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Encodes `msg` as a complete control frame (header and protobuf body), with
/// `version = VERSION`.
///
/// The sender must keep messages below [`MAX_FRAME_LEN`] (manifests and need lists are
/// sent in chunks); a longer body yields a frame the receiver refuses with
/// [`FrameError::TooLong`] (this function does not check).
pub fn encode_control(msg: &Envelope) -> Vec<u8> {
    let body_len = msg.encoded_len();
    let header = FrameHeader {
        version: VERSION,
        kind: FrameKind::Control,
        flags: 0,
        len: u32::try_from(body_len).unwrap_or(u32::MAX),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body_len);
    out.extend_from_slice(&header.encode());
    msg.encode(&mut out).expect("a Vec<u8> grows as needed");
    out
}

/// Decodes the body of a control frame. The frame must be [`FrameKind::Control`], and
/// the envelope must carry a message: an empty envelope (which is also what a message
/// type unknown to this build decodes to) is [`FrameError::EmptyEnvelope`].
pub fn decode_control(header: &FrameHeader, body: &[u8]) -> Result<Envelope, FrameError> {
    if header.kind != FrameKind::Control {
        return Err(FrameError::WrongKind {
            expected: FrameKind::Control,
            found: header.kind,
        });
    }
    let env = Envelope::decode(body)?;
    if env.msg.is_none() {
        return Err(FrameError::EmptyEnvelope);
    }
    Ok(env)
}

/// A decoded data frame body, borrowing the content from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChunk<'a> {
    /// The file, as numbered by the replica in its need list.
    pub file_id: u32,
    /// CRC-32 (IEEE) of the uncompressed content of this chunk; `None` for a frame with
    /// [`FLAG_NO_CRC`].
    pub crc32: Option<u32>,
    /// Length of the uncompressed content, at most [`MAX_CHUNK_RAW`].
    pub raw_len: u32,
    /// `body` is zstd-compressed ([`FLAG_ZSTD`]); otherwise `body.len() == raw_len`.
    pub compressed: bool,
    pub body: &'a [u8],
}

/// The frame header and data prefix of a data frame whose content is `body_len`
/// bytes. The caller writes the content directly after these bytes, so the codec
/// never copies file content.
///
/// `crc32` is the CRC-32 of the raw bytes, or `None` for a frame with [`FLAG_NO_CRC`]
/// (the field is then 0).
///
/// `raw_len` must be at most [`MAX_CHUNK_RAW`] and, for an uncompressed chunk, equal to
/// `body_len`, and a chunk without CRC must be uncompressed; otherwise the receiver
/// refuses the frame (this function does not check, so that tests can build hostile
/// frames with it).
pub fn encode_data_header(
    file_id: u32,
    crc32: Option<u32>,
    raw_len: u32,
    compressed: bool,
    body_len: usize,
) -> [u8; HEADER_LEN + DATA_PREFIX_LEN] {
    let header = FrameHeader {
        version: VERSION,
        kind: FrameKind::Data,
        flags: if compressed { FLAG_ZSTD } else { 0 }
            | if crc32.is_none() { FLAG_NO_CRC } else { 0 },
        len: u32::try_from(DATA_PREFIX_LEN.saturating_add(body_len)).unwrap_or(u32::MAX),
    };
    let mut out = [0u8; HEADER_LEN + DATA_PREFIX_LEN];
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&file_id.to_be_bytes());
    out[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&crc32.unwrap_or(0).to_be_bytes());
    out[HEADER_LEN + 8..].copy_from_slice(&raw_len.to_be_bytes());
    out
}

/// Decodes the body of a data frame (the `header.len` bytes after the header). The
/// frame must be [`FrameKind::Data`], hold at least the prefix, claim at most
/// [`MAX_CHUNK_RAW`] raw bytes, and, if uncompressed, carry exactly `raw_len` bytes; a
/// frame with [`FLAG_NO_CRC`] must have 0 in its `crc32` field.
pub fn decode_data<'a>(header: &FrameHeader, body: &'a [u8]) -> Result<DataChunk<'a>, FrameError> {
    if header.kind != FrameKind::Data {
        return Err(FrameError::WrongKind {
            expected: FrameKind::Data,
            found: header.kind,
        });
    }
    let Some((prefix, content)) = body.split_first_chunk::<DATA_PREFIX_LEN>() else {
        return Err(FrameError::DataTooShort {
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        });
    };
    let [i0, i1, i2, i3, c0, c1, c2, c3, r0, r1, r2, r3] = *prefix;
    let file_id = u32::from_be_bytes([i0, i1, i2, i3]);
    let crc32 = u32::from_be_bytes([c0, c1, c2, c3]);
    let raw_len = u32::from_be_bytes([r0, r1, r2, r3]);
    if raw_len as usize > MAX_CHUNK_RAW {
        return Err(FrameError::ChunkTooLarge { raw_len });
    }
    let compressed = header.flags & FLAG_ZSTD != 0;
    let crc32 = if header.flags & FLAG_NO_CRC != 0 {
        if crc32 != 0 {
            return Err(FrameError::CrcInNoCrcFrame { crc32 });
        }
        None
    } else {
        Some(crc32)
    };
    if !compressed && content.len() != raw_len as usize {
        return Err(FrameError::RawLenMismatch {
            raw_len,
            body_len: content.len(),
        });
    }
    Ok(DataChunk {
        file_id,
        crc32,
        raw_len,
        compressed,
        body: content,
    })
}

/// A whole decoded frame, owning its content.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Control(Envelope),
    Data {
        file_id: u32,
        /// `None`: a frame with [`FLAG_NO_CRC`].
        crc32: Option<u32>,
        raw_len: u32,
        compressed: bool,
        body: Vec<u8>,
    },
}

/// Streaming decoder for fuzzing and byte-level tests: push bytes, pull whole frames.
///
/// Memory: the decoder holds the bytes pushed and not yet returned as frames. It
/// reserves nothing on the strength of a header's length field: a header is validated
/// (including `len <= MAX_FRAME_LEN`) as soon as its 12 bytes are there, and one
/// returned frame owns at most `MAX_FRAME_LEN` bytes of content.
///
/// Errors: an error in a header cannot be skipped (the stream has lost its framing),
/// so it is returned again by every later call and the caller should drop the
/// connection. An error in a body (bad protobuf, bad data prefix) consumes that frame,
/// and the next call continues with the frame after it.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet consumed.
    pos: usize,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &(self.buf.len() - self.pos))
            .finish()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            // Drop what was consumed; what remains is less than one frame if the
            // caller pulls frames between pushes.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error (see
    /// the type's docs for which errors are sticky).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let start = self.pos;
        let Some(head) = self
            .buf
            .get(start..)
            .and_then(|b| b.first_chunk::<HEADER_LEN>())
        else {
            return Ok(None);
        };
        let header = FrameHeader::decode(head)?;
        let end = start + HEADER_LEN + header.len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        // Consume the frame before decoding its body: a bad body is not sticky.
        self.pos = end;
        let body = &self.buf[start + HEADER_LEN..end];
        let frame = match header.kind {
            FrameKind::Control => Frame::Control(decode_control(&header, body)?),
            FrameKind::Data => {
                let c = decode_data(&header, body)?;
                Frame::Data {
                    file_id: c.file_id,
                    crc32: c.crc32,
                    raw_len: c.raw_len,
                    compressed: c.compressed,
                    body: c.body.to_vec(),
                }
            }
        };
        Ok(Some(frame))
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a cdsync peer (magic \"{}\", expected \"CDSY\")", .found.as_slice().escape_ascii())]
    BadMagic { found: [u8; 4] },
    #[error("peer speaks protocol v{peer}, this build speaks v{ours}: upgrade this node")]
    PeerTooNew { peer: u8, ours: u8 },
    #[error("peer speaks protocol v{peer}, this build needs at least v{min}: upgrade the peer")]
    PeerTooOld { peer: u8, min: u8 },
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("unknown frame flags {flags:#06x}")]
    UnknownFlags { flags: u16 },
    #[error("frame flags {flags:#06x}: a data chunk without CRC cannot be compressed")]
    ConflictingFlags { flags: u16 },
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: u32, max: u32 },
    #[error("expected a {expected:?} frame, got a {found:?} frame")]
    WrongKind {
        expected: FrameKind,
        found: FrameKind,
    },
    #[error("bad control message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("control frame carries no message known to this build")]
    EmptyEnvelope,
    #[error("data frame body of {len} bytes is shorter than its {DATA_PREFIX_LEN}-byte prefix")]
    DataTooShort { len: u32 },
    #[error("data chunk of {raw_len} raw bytes exceeds the limit of {MAX_CHUNK_RAW} bytes")]
    ChunkTooLarge { raw_len: u32 },
    #[error("uncompressed data chunk claims {raw_len} bytes but carries {body_len}")]
    RawLenMismatch { raw_len: u32, body_len: usize },
    #[error("data chunk flagged as carrying no CRC has {crc32:#010x} in its CRC field")]
    CrcInNoCrcFrame { crc32: u32 },
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pb::{self, envelope::Msg};

    fn hello() -> Envelope {
        Envelope {
            msg: Some(Msg::Hello(pb::Hello {
                node_name: "web-1".into(),
                software_version: crate::SOFTWARE_VERSION.into(),
                purpose: pb::hello::Purpose::Control.into(),
                ..Default::default()
            })),
        }
    }

    fn header(kind: FrameKind, flags: u16, len: u32) -> FrameHeader {
        FrameHeader {
            version: VERSION,
            kind,
            flags,
            len,
        }
    }

    fn data_frame(
        file_id: u32,
        crc32: Option<u32>,
        raw_len: u32,
        compressed: bool,
        body: &[u8],
    ) -> Vec<u8> {
        let mut v = encode_data_header(file_id, crc32, raw_len, compressed, body.len()).to_vec();
        v.extend_from_slice(body);
        v
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    /// The error `FrameHeader::decode` returns, checking that the streaming decoder
    /// returns the same one from the header alone.
    fn decode_header_err(bytes: [u8; HEADER_LEN]) -> FrameError {
        let e = FrameHeader::decode(&bytes).unwrap_err();
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(d.next_frame().unwrap_err(), e);
        e
    }

    #[test]
    fn header_round_trip() {
        for h in [
            header(FrameKind::Control, 0, 0),
            header(FrameKind::Data, FLAG_ZSTD, MAX_FRAME_LEN),
            header(FrameKind::Data, 0, 12345),
        ] {
            assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }
        let b = header(FrameKind::Data, FLAG_ZSTD, 0x0102_0304).encode();
        assert_eq!(b, [b'C', b'D', b'S', b'Y', 1, 2, 0, 1, 1, 2, 3, 4]);
    }

    #[test]
    fn header_errors() {
        let good = header(FrameKind::Control, 0, 5).encode();

        let mut b = good;
        b[..4].copy_from_slice(b"GET ");
        let e = decode_header_err(b);
        assert_eq!(e, FrameError::BadMagic { found: *b"GET " });
        assert!(e.to_string().contains("not a cdsync peer"), "{e}");

        let mut b = good;
        b[4] = VERSION + 1;
        let e = decode_header_err(b);
        assert_eq!(
            e,
            FrameError::PeerTooNew {
                peer: VERSION + 1,
                ours: VERSION
            }
        );
        assert!(e.to_string().ends_with("upgrade this node"), "{e}");

        let mut b = good;
        b[4] = MIN_VERSION - 1;
        let e = decode_header_err(b);
        assert_eq!(
            e,
            FrameError::PeerTooOld {
                peer: MIN_VERSION - 1,
                min: MIN_VERSION
            }
        );
        assert!(e.to_string().ends_with("upgrade the peer"), "{e}");

        for kind in [0, 3, 255] {
            let mut b = good;
            b[5] = kind;
            assert_eq!(decode_header_err(b), FrameError::UnknownKind { kind });
        }

        // Control frames define no flags; data frames only FLAG_ZSTD.
        let b = header(FrameKind::Control, FLAG_ZSTD, 5).encode();
        assert_eq!(
            decode_header_err(b),
            FrameError::UnknownFlags { flags: FLAG_ZSTD }
        );
        let b = header(FrameKind::Data, 0x8001, 5).encode();
        assert_eq!(
            decode_header_err(b),
            FrameError::UnknownFlags { flags: 0x8001 }
        );

        let b = header(FrameKind::Data, 0, MAX_FRAME_LEN + 1).encode();
        assert_eq!(
            decode_header_err(b),
            FrameError::TooLong {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            }
        );
        let b = header(FrameKind::Control, 0, u32::MAX).encode();
        assert!(matches!(decode_header_err(b), FrameError::TooLong { .. }));
    }

    #[test]
    fn oversize_length_refused_before_allocation() {
        let mut d = FrameDecoder::new();
        d.push(&header(FrameKind::Data, 0, u32::MAX).encode());
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLong { len: u32::MAX, .. })
        ));
        assert!(
            d.buf.capacity() < 1024,
            "decoder reserved {} bytes",
            d.buf.capacity()
        );
        // The error is sticky: the stream has lost its framing.
        d.push(&[0; 100]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong { .. })));

        // A valid maximal length is waited for, not reserved.
        let mut d = FrameDecoder::new();
        d.push(&header(FrameKind::Data, 0, MAX_FRAME_LEN).encode());
        assert_eq!(d.next_frame(), Ok(None));
        assert!(
            d.buf.capacity() < 1024,
            "decoder reserved {} bytes",
            d.buf.capacity()
        );
    }

    #[test]
    fn control_round_trip() {
        let env = hello();
        let bytes = encode_control(&env);
        let h = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            header(FrameKind::Control, 0, (bytes.len() - HEADER_LEN) as u32)
        );
        assert_eq!(decode_control(&h, &bytes[HEADER_LEN..]), Ok(env.clone()));
        assert_eq!(decode_all(&bytes), Ok(vec![Frame::Control(env)]));

        // A message with no fields set is still a message (an empty body on the wire
        // inside the envelope), not an empty envelope.
        let end = Envelope {
            msg: Some(Msg::TransferEnd(pb::TransferEnd {})),
        };
        assert_eq!(
            decode_all(&encode_control(&end)),
            Ok(vec![Frame::Control(end)])
        );
    }

    #[test]
    fn control_errors() {
        let h = header(FrameKind::Data, FLAG_ZSTD, 0);
        assert_eq!(
            decode_control(&h, &[]),
            Err(FrameError::WrongKind {
                expected: FrameKind::Control,
                found: FrameKind::Data
            })
        );

        let h = header(FrameKind::Control, 0, 0);
        assert_eq!(decode_control(&h, &[]), Err(FrameError::EmptyEnvelope));
        // An envelope holding only a field this build does not know (a newer message)
        // is empty to us: tag 100, varint 1.
        assert_eq!(
            decode_control(&h, &[0xa0, 0x06, 0x01]),
            Err(FrameError::EmptyEnvelope)
        );
        // Truncated: field 1 (Hello), length 5, 1 byte present.
        assert!(matches!(
            decode_control(&h, &[0x0a, 0x05, 0x0a]),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn data_round_trip() {
        let content = b"hello, world\n";
        let bytes = data_frame(7, Some(0xdead_beef), content.len() as u32, false, content);
        assert_eq!(bytes.len(), HEADER_LEN + DATA_PREFIX_LEN + content.len());
        let h = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            header(FrameKind::Data, 0, (DATA_PREFIX_LEN + content.len()) as u32)
        );
        let c = decode_data(&h, &bytes[HEADER_LEN..]).unwrap();
        assert_eq!(
            c,
            DataChunk {
                file_id: 7,
                crc32: Some(0xdead_beef),
                raw_len: 13,
                compressed: false,
                body: content
            }
        );

        // Compressed: the body length is independent of raw_len.
        let bytes = data_frame(1, Some(2), MAX_CHUNK_RAW as u32, true, b"zz");
        assert_eq!(
            decode_all(&bytes),
            Ok(vec![Frame::Data {
                file_id: 1,
                crc32: Some(2),
                raw_len: MAX_CHUNK_RAW as u32,
                compressed: true,
                body: b"zz".to_vec()
            }])
        );

        // Empty chunk (an empty file is sent as one).
        let bytes = data_frame(3, Some(0), 0, false, b"");
        assert_eq!(decode_all(&bytes).unwrap().len(), 1);

        // Without CRC: the flag is set, the field is 0, and the chunk says so.
        let bytes = data_frame(5, None, 3, false, b"abc");
        let h = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(h.flags, FLAG_NO_CRC);
        assert_eq!(bytes[HEADER_LEN + 4..HEADER_LEN + 8], [0; 4]);
        assert_eq!(
            decode_all(&bytes),
            Ok(vec![Frame::Data {
                file_id: 5,
                crc32: None,
                raw_len: 3,
                compressed: false,
                body: b"abc".to_vec()
            }])
        );
    }

    #[test]
    fn no_crc_is_refused_where_not_allowed() {
        // Never with FLAG_ZSTD: compressed bytes were in user space, so they have a CRC.
        let b = header(FrameKind::Data, FLAG_ZSTD | FLAG_NO_CRC, 20).encode();
        assert_eq!(
            decode_header_err(b),
            FrameError::ConflictingFlags {
                flags: FLAG_ZSTD | FLAG_NO_CRC
            }
        );
        // Never on a control frame.
        let b = header(FrameKind::Control, FLAG_NO_CRC, 5).encode();
        assert_eq!(
            decode_header_err(b),
            FrameError::UnknownFlags { flags: FLAG_NO_CRC }
        );
        // The next bit up is still unknown on data frames.
        let b = header(FrameKind::Data, 4, 5).encode();
        assert_eq!(decode_header_err(b), FrameError::UnknownFlags { flags: 4 });
        // A CRC value in a frame that says it has none is ambiguous: refused.
        let mut bytes = data_frame(5, None, 3, false, b"abc");
        bytes[HEADER_LEN + 7] = 1;
        let h = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            decode_data(&h, &bytes[HEADER_LEN..]),
            Err(FrameError::CrcInNoCrcFrame { crc32: 1 })
        );
        // The uncompressed length rule holds for it too.
        let mut body = encode_data_header(1, None, 4, false, 3)[HEADER_LEN..].to_vec();
        body.extend_from_slice(b"abc");
        let h = header(FrameKind::Data, FLAG_NO_CRC, body.len() as u32);
        assert_eq!(
            decode_data(&h, &body),
            Err(FrameError::RawLenMismatch {
                raw_len: 4,
                body_len: 3
            })
        );
    }

    #[test]
    fn data_errors() {
        let h = header(FrameKind::Control, 0, 0);
        assert_eq!(
            decode_data(&h, &[0; DATA_PREFIX_LEN]),
            Err(FrameError::WrongKind {
                expected: FrameKind::Data,
                found: FrameKind::Control
            })
        );

        let h = header(FrameKind::Data, 0, 11);
        assert_eq!(
            decode_data(&h, &[0; 11]),
            Err(FrameError::DataTooShort { len: 11 })
        );

        let too_big = MAX_CHUNK_RAW as u32 + 1;
        let mut body = encode_data_header(1, Some(0), too_big, true, 0)[HEADER_LEN..].to_vec();
        let h = header(FrameKind::Data, FLAG_ZSTD, body.len() as u32);
        assert_eq!(
            decode_data(&h, &body),
            Err(FrameError::ChunkTooLarge { raw_len: too_big })
        );

        body = encode_data_header(1, Some(0), 4, false, 3)[HEADER_LEN..].to_vec();
        body.extend_from_slice(b"abc");
        let h = header(FrameKind::Data, 0, body.len() as u32);
        assert_eq!(
            decode_data(&h, &body),
            Err(FrameError::RawLenMismatch {
                raw_len: 4,
                body_len: 3
            })
        );
    }

    #[test]
    fn body_errors_are_not_sticky() {
        let mut bytes = data_frame(1, Some(0), 4, false, b"abc"); // raw_len mismatch
        bytes.extend_from_slice(&encode_control(&hello()));
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::RawLenMismatch { .. })
        ));
        assert_eq!(d.next_frame(), Ok(Some(Frame::Control(hello()))));
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn error_messages() {
        let e = FrameError::BadMagic {
            found: [0x16, 0x03, 0x01, b'A'],
        };
        assert_eq!(
            e.to_string(),
            r#"not a cdsync peer (magic "\x16\x03\x01A", expected "CDSY")"#
        );
        let e = FrameError::PeerTooNew { peer: 3, ours: 1 };
        assert_eq!(
            e.to_string(),
            "peer speaks protocol v3, this build speaks v1: upgrade this node"
        );
        let e = FrameError::PeerTooOld { peer: 1, min: 2 };
        assert_eq!(
            e.to_string(),
            "peer speaks protocol v1, this build needs at least v2: upgrade the peer"
        );
    }

    #[test]
    fn byte_at_a_time() {
        let mut stream = encode_control(&hello());
        stream.extend(data_frame(9, Some(1), 3, false, b"xyz"));
        stream.extend(encode_control(&hello()));
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames, decode_all(&stream).unwrap());
        assert_eq!(frames.len(), 3);
        assert_eq!(d.buf.len() - d.pos, 0);
    }

    /// A valid frame built from proptest inputs.
    fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (any::<String>(), 0..4i32).prop_map(|(name, purpose)| encode_control(&Envelope {
                msg: Some(Msg::Hello(pb::Hello {
                    node_name: name,
                    software_version: "1".into(),
                    purpose,
                    ..Default::default()
                }))
            })),
            (
                any::<u32>(),
                any::<Option<u32>>(),
                prop::collection::vec(any::<u8>(), 0..64),
                any::<bool>()
            )
                .prop_map(|(id, crc, body, z)| data_frame(
                    id,
                    // A compressed chunk always has a CRC.
                    if z { Some(crc.unwrap_or(0)) } else { crc },
                    body.len() as u32,
                    z,
                    &body
                )),
        ]
    }

    /// Drives a decoder over `bytes` pushed in pieces of the given sizes, and checks it
    /// only ever returns frames, "need more", or a typed error; stops at a header error
    /// (which is sticky).
    fn drive(bytes: &[u8], pieces: &[usize]) -> Vec<Result<Frame, FrameError>> {
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        let mut rest = bytes;
        let mut sizes = pieces.iter().copied().cycle();
        while !rest.is_empty() {
            let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
            let (now, later) = rest.split_at(n);
            d.push(now);
            rest = later;
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => out.push(Ok(f)),
                    Ok(None) => break,
                    Err(e) => {
                        let sticky = d.next_frame().err() == Some(e.clone());
                        out.push(Err(e));
                        if sticky {
                            return out;
                        }
                    }
                }
            }
            assert!(d.buf.len() - d.pos <= bytes.len());
        }
        out
    }

    proptest! {
        #[test]
        fn decoder_survives_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            pieces in prop::collection::vec(1usize..64, 1..8),
        ) {
            drive(&bytes, &pieces);
            // Also with a valid header in front, so that bodies get exercised.
            let mut framed = header(FrameKind::Control, 0, bytes.len() as u32).encode().to_vec();
            framed.extend_from_slice(&bytes);
            drive(&framed, &pieces);
            let mut framed = header(FrameKind::Data, 0, bytes.len() as u32).encode().to_vec();
            framed.extend_from_slice(&bytes);
            drive(&framed, &pieces);
        }

        #[test]
        fn valid_frames_survive_any_split(
            frames in prop::collection::vec(arb_frame(), 1..6),
            pieces in prop::collection::vec(1usize..40, 1..8),
        ) {
            let stream = frames.concat();
            let got = drive(&stream, &pieces);
            prop_assert_eq!(got.len(), frames.len());
            for (g, f) in got.into_iter().zip(&frames) {
                prop_assert_eq!(g, decode_all(f).map(|mut v| v.remove(0)));
            }
        }

        #[test]
        fn decoder_survives_mutated_frames(
            frames in prop::collection::vec(arb_frame(), 1..4),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            pieces in prop::collection::vec(1usize..40, 1..8),
        ) {
            let mut stream = frames.concat();
            for (i, x) in flips {
                let i = i.index(stream.len());
                stream[i] ^= x;
            }
            drive(&stream, &pieces);
            stream.truncate(cut.index(stream.len() + 1));
            drive(&stream, &pieces);
        }
    }
}
