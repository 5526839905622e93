//! A provider's `text/event-stream` as the proxy relays it: the incremental decoder (split at
//! a point the input chooses, under a size limit), the encoder (an event re-encoded decodes to
//! the same data), and `find_response` for both content types.
#![no_main]

use capmesh_proxy::mcp::jsonrpc::Id;
use capmesh_proxy::mcp::sse::{SseDecoder, find_response};
use libfuzzer_sys::fuzz_target;

fn decode(chunks: &[&[u8]]) -> Option<Vec<capmesh_proxy::mcp::sse::Event>> {
    let mut decoder = SseDecoder::with_limit(4096);
    let mut events = Vec::new();
    for chunk in chunks {
        decoder.push(chunk).ok()?;
        while let Some(e) = decoder.next_event() {
            events.push(e);
        }
    }
    decoder.finish().ok()?;
    while let Some(e) = decoder.next_event() {
        events.push(e);
    }
    Some(events)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(body.len());
    let events = decode(&[&body[..at], &body[at..]]);
    // Split or whole, the same events.
    assert_eq!(
        events.as_ref().map(|e| e.iter().map(|e| e.data.clone()).collect::<Vec<_>>()),
        decode(&[body]).map(|e| e.iter().map(|e| e.data.clone()).collect::<Vec<_>>())
    );
    for event in events.unwrap_or_default() {
        let wire = event.encode();
        if let Some(again) = decode(&[&wire]) {
            assert_eq!(again.len(), 1, "{event:?} re-encoded as {wire:?}");
            assert_eq!(again[0].data, event.data);
        }
    }
    let id = Id::from(1);
    let _ = find_response(body, "text/event-stream", &id);
    let _ = find_response(body, "application/json", &id);
});
