//! The topology stream, as either side reads it: bytes split into lines (`LineDecoder`, with
//! its size limit), each line decoded as a proxy frame and as a control-plane frame, a decoded
//! frame encoded and read back, and a delta applied to a snapshot when the input holds both.
#![no_main]

use capmesh_api::{ControlFrame, ProxyFrame, decode_frame, encode_frame};
use capmesh_client::LineDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small limit so the fuzzer reaches the over-limit path too.
    let mut lines = LineDecoder::new(4096);
    // Feed in two chunks: a line split across reads must come out whole.
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    lines.push(&data[..cut]);
    lines.push(&data[cut..]);
    let mut snapshot = None;
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => match lines.finish() {
                Ok(Some(line)) => line,
                _ => break,
            },
            Err(_) => break,
        };
        if let Ok(frame) = decode_frame::<ProxyFrame>(&line) {
            let again = decode_frame::<ProxyFrame>(&encode_frame(&frame));
            assert!(again.is_ok(), "a proxy frame we encoded does not decode: {again:?}");
        }
        match decode_frame::<ControlFrame>(&line) {
            Ok(ControlFrame::Snapshot(s)) => snapshot = Some(s),
            Ok(ControlFrame::Delta(d)) => {
                if let Some(held) = &snapshot {
                    let _ = held.apply(&d);
                }
            }
            Ok(frame) => {
                let again = decode_frame::<ControlFrame>(&encode_frame(&frame));
                assert!(again.is_ok(), "a control frame we encoded does not decode");
            }
            Err(_) => {}
        }
    }
});
