//! Checks that what is committed matches what the sources produce.
//!
//! * `bootstrap`: regenerates the prost bindings from `proto/` with `protox` (a pure-Rust
//!   protobuf compiler, so no system `protoc`) and `prost-build`, and fails if they differ
//!   from the committed `src/gen/cdsync.v1.rs`.
//! * `golden_*`: encodes known frames and compares them byte for byte with
//!   `tests/golden/*.bin`, then decodes the files back.
//!
//! After an intended change, rewrite the committed files with
//!
//! ```text
//! CD_PROTO_BLESS=1 cargo test -p cd-proto --test bootstrap
//! ```
//!
//! and review the diff.

use std::path::{Path, PathBuf};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bless() -> bool {
    std::env::var_os("CD_PROTO_BLESS").is_some_and(|v| v == "1")
}

/// Compares `actual` with the committed file at `path`, or rewrites it in bless mode.
fn check_committed(path: &Path, actual: &[u8]) {
    let rel = path
        .strip_prefix(manifest_dir())
        .unwrap_or(path)
        .display()
        .to_string();
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        eprintln!("blessed cd-proto/{rel}");
        return;
    }
    let committed = std::fs::read(path).unwrap_or_default();
    if committed != actual {
        // Point at the first difference: a line for text, an offset for binary.
        let at = committed
            .iter()
            .zip(actual)
            .take_while(|(a, b)| a == b)
            .count();
        let line = committed[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        panic!(
            "cd-proto/{rel} is out of date ({} bytes committed, {} bytes generated; \
             first difference at byte {at}, line {line}).\n\
             If the change is intended, rewrite it with\n    \
             CD_PROTO_BLESS=1 cargo test -p cd-proto --test bootstrap\n\
             and review the diff.",
            committed.len(),
            actual.len(),
        );
    }
}

/// Generates the prost bindings into a scratch directory and compares them with
/// `src/gen/cdsync.v1.rs`.
#[test]
fn bootstrap() {
    let dir = manifest_dir();
    let proto_root = dir.join("proto");
    let fds = protox::compile([proto_root.join("cdsync/v1/cdsync.proto")], [&proto_root])
        .unwrap_or_else(|e| panic!("cdsync.proto does not compile: {e}"));

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cd-proto-bootstrap");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    prost_build::Config::new()
        // Keeps `ApplyResult` (and with it every `Envelope`) small: a plan is rare.
        .boxed(".cdsync.v1.ApplyResult.planned")
        .out_dir(&out_dir)
        .compile_fds(fds)
        .unwrap();

    let generated = std::fs::read(out_dir.join("cdsync.v1.rs")).unwrap();
    check_committed(&dir.join("src/gen/cdsync.v1.rs"), &generated);
}

mod golden {
    use cd_core::manifest::{Entry, EntryKind, Meta};
    use cd_core::path::RelPath;
    use cd_proto::frame::{self, Frame, FrameDecoder};
    use cd_proto::pb::{self, envelope::Msg};

    use super::{check_committed, manifest_dir};

    /// Checks `bytes` against `tests/golden/{name}.bin`, then decodes the committed
    /// file (or, in bless mode, the new one) and returns the single frame it holds.
    fn check(name: &str, bytes: &[u8]) -> Frame {
        let path = manifest_dir()
            .join("tests/golden")
            .join(format!("{name}.bin"));
        check_committed(&path, bytes);
        let committed = std::fs::read(&path).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&committed);
        let frame = d.next_frame().unwrap().expect("a whole frame");
        assert_eq!(
            d.next_frame(),
            Ok(None),
            "{name}.bin holds exactly one frame"
        );
        frame
    }

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// CRC-32 (IEEE), bit by bit: the reference the data frame's checksum field uses.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn golden_hello() {
        let env = pb::Envelope {
            msg: Some(Msg::Hello(pb::Hello {
                node_name: "web-1".into(),
                software_version: "0.1.0".into(),
                purpose: pb::hello::Purpose::Control.into(),
                ..Default::default()
            })),
        };
        let bytes = frame::encode_control(&env);
        assert_eq!(&bytes[..4], b"CDSY");
        assert_eq!(check("hello", &bytes), Frame::Control(env));
    }

    /// A transfer `Hello` asking for a plaintext link and accepting frames without
    /// CRC (the fields a control `Hello` leaves at their defaults, which encode to
    /// nothing: `hello.bin` is what it was before they existed).
    #[test]
    fn golden_hello_transfer() {
        let env = pb::Envelope {
            msg: Some(Msg::Hello(pb::Hello {
                node_name: "web-1".into(),
                software_version: "0.1.0".into(),
                purpose: pb::hello::Purpose::Transfer.into(),
                plaintext: true,
                accepts_no_crc: true,
            })),
        };
        let bytes = frame::encode_control(&env);
        assert_eq!(check("hello_transfer", &bytes), Frame::Control(env));
    }

    #[test]
    fn golden_manifest_chunk() {
        let meta = Meta {
            mode: 0o644,
            uid: 1000,
            gid: 33,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 123,
        };
        let hash = *b"0123456789abcdef0123456789abcdef";
        let entries = vec![
            Entry {
                path: rp("site"),
                kind: EntryKind::Dir,
                meta: Meta {
                    mode: 0o2775,
                    ..meta
                },
            },
            Entry {
                path: rp("site/index.html"),
                kind: EntryKind::File {
                    size: 14,
                    hash,
                    hardlink_to: None,
                },
                meta,
            },
            Entry {
                path: rp("site/index.htm"),
                kind: EntryKind::File {
                    size: 14,
                    hash,
                    hardlink_to: Some(rp("site/index.html")),
                },
                meta,
            },
            Entry {
                path: rp("site/current"),
                kind: EntryKind::Symlink {
                    target: b"releases/42".to_vec(),
                },
                meta: Meta {
                    mode: 0o777,
                    mtime_nsec: 0,
                    ..meta
                },
            },
        ];
        let env = pb::Envelope {
            msg: Some(Msg::ManifestChunk(pb::ManifestChunk {
                entries: entries.iter().map(pb::Entry::from).collect(),
                last: true,
            })),
        };
        let frame = check("manifest_chunk", &frame::encode_control(&env));
        assert_eq!(frame, Frame::Control(env));
        let Frame::Control(pb::Envelope {
            msg: Some(Msg::ManifestChunk(chunk)),
        }) = frame
        else {
            unreachable!()
        };
        let back: Vec<Entry> = chunk
            .entries
            .into_iter()
            .map(|e| Entry::try_from(e).unwrap())
            .collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn golden_data_frame() {
        let content = b"hello, cdsync\n";
        let crc = crc32(content);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926, "CRC-32 check value");
        let mut bytes =
            frame::encode_data_header(42, Some(crc), content.len() as u32, false, content.len())
                .to_vec();
        bytes.extend_from_slice(content);
        assert_eq!(
            check("data_frame", &bytes),
            Frame::Data {
                file_id: 42,
                crc32: Some(crc),
                raw_len: content.len() as u32,
                compressed: false,
                body: content.to_vec(),
            }
        );
    }

    /// A data frame sent with `sendfile`: FLAG_NO_CRC, CRC field 0.
    #[test]
    fn golden_data_frame_no_crc() {
        let content = b"hello, cdsync\n";
        let mut bytes =
            frame::encode_data_header(42, None, content.len() as u32, false, content.len())
                .to_vec();
        bytes.extend_from_slice(content);
        assert_eq!(bytes[6..8], frame::FLAG_NO_CRC.to_be_bytes());
        assert_eq!(
            check("data_frame_no_crc", &bytes),
            Frame::Data {
                file_id: 42,
                crc32: None,
                raw_len: content.len() as u32,
                compressed: false,
                body: content.to_vec(),
            }
        );
    }
}
