//! Feeds arbitrary bytes to every decoder of untrusted input in cd-proto: the
//! streaming `FrameDecoder` (with the input split at a data-dependent point), the
//! one-shot header/control/data decoders, and the wire-to-domain entry conversion.
//! None may panic; an accepted entry must convert back to the same wire entry.
//!
//! Run (needs nightly and `cargo install cargo-fuzz`), from `cd-proto/`:
//!
//! ```text
//! cargo +nightly fuzz run frame_decoder -- -max_total_time=300
//! ```
//!
//! Golden frames make a good seed corpus:
//! `mkdir -p fuzz/corpus/frame_decoder && cp tests/golden/*.bin fuzz/corpus/frame_decoder/`.

#![no_main]

use cd_core::manifest::Entry;
use cd_proto::frame::{self, FrameDecoder, FrameError, FrameHeader, HEADER_LEN};
use cd_proto::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// Pulls frames until the decoder needs more bytes or reports a header error (which is
/// sticky: the same error again on the next call).
fn drain(d: &mut FrameDecoder) -> bool {
    loop {
        match d.next_frame() {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(e) => {
                let again: Result<_, FrameError> = d.next_frame();
                if again.as_ref().err() == Some(&e) {
                    return false;
                }
            }
        }
    }
}

fn check_entry(e: pb::Entry) {
    if let Ok(domain) = Entry::try_from(e.clone()) {
        assert_eq!(pb::Entry::from(&domain), e, "conversion is not one to one");
    }
}

fuzz_target!(|data: &[u8]| {
    // Streaming, in two pushes.
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut d = FrameDecoder::new();
    d.push(&data[..split]);
    if drain(&mut d) {
        d.push(&data[split..]);
        drain(&mut d);
    }

    // One-shot decoders, on the body after a valid header.
    if let Some((head, body)) = data.split_first_chunk::<HEADER_LEN>()
        && let Ok(h) = FrameHeader::decode(head)
    {
        if let Ok(env) = frame::decode_control(&h, body)
            && let Some(pb::envelope::Msg::ManifestChunk(chunk)) = env.msg
        {
            chunk.entries.into_iter().for_each(check_entry);
        }
        let _ = frame::decode_data(&h, body);
    }

    // Wire entries straight from protobuf.
    if let Ok(e) = pb::Entry::decode(data) {
        check_entry(e);
    }
});
