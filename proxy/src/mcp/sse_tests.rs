//! Tests for [`super`]: chunk boundaries, line endings, limits, encoding and `find_response`.

use super::*;
use serde_json::json;

fn decode_in_chunks(input: &[u8], chunk: usize) -> Vec<Event> {
    let mut d = SseDecoder::new();
    let mut out = Vec::new();
    for part in input.chunks(chunk) {
        d.push(part).unwrap();
        while let Some(e) = d.next_event() {
            out.push(e);
        }
    }
    out
}

fn ev(id: Option<&str>, event: Option<&str>, data: &str, retry: Option<u64>) -> Event {
    Event {
        id: id.map(Into::into),
        event: event.map(Into::into),
        data: data.into(),
        retry,
    }
}

const STREAM: &str = "\u{feff}: keep-alive\n\nid: 1\nevent: message\ndata: {\"a\":1}\n\n\
    data: line one\ndata:line two\ndata\ndata:  spaced\n\n\
    retry: 3000\nid: prime\ndata:\n\n\
    unknown: x\n\n\
    id: bad\0id\nretry: 12x\ndata: kept\n\n";

fn expected() -> Vec<Event> {
    vec![
        ev(Some("1"), Some("message"), "{\"a\":1}", None),
        ev(None, None, "line one\nline two\n\n spaced", None),
        ev(Some("prime"), None, "", Some(3000)),
        ev(None, None, "kept", None),
    ]
}

#[test]
fn decodes_fields_comments_and_multiline_data() {
    assert_eq!(
        decode_in_chunks(STREAM.as_bytes(), STREAM.len()),
        expected()
    );
}

#[test]
fn any_chunk_boundary_gives_the_same_events() {
    for size in 1..=STREAM.len() {
        assert_eq!(
            decode_in_chunks(STREAM.as_bytes(), size),
            expected(),
            "chunk size {size}"
        );
    }
}

#[test]
fn crlf_and_cr_line_endings_byte_by_byte() {
    let lf = STREAM.replace("\n", "\r\n");
    assert_eq!(decode_in_chunks(lf.as_bytes(), 1), expected());
    let cr = STREAM.replace("\n", "\r");
    assert_eq!(decode_in_chunks(cr.as_bytes(), 1), expected());
    assert_eq!(decode_in_chunks(cr.as_bytes(), 3), expected());
    // A \r at the end of one chunk and \n at the start of the next is one line end, not two.
    let mut d = SseDecoder::new();
    d.push(b"data: a\r").unwrap();
    d.push(b"\ndata: b\r\n\r").unwrap();
    d.push(b"\n").unwrap();
    assert_eq!(d.next_event(), Some(Event::message("a\nb")));
    assert_eq!(d.next_event(), None);
}

#[test]
fn incomplete_event_waits_for_blank_line() {
    let mut d = SseDecoder::new();
    d.push(b"data: {\"x\"").unwrap();
    assert_eq!(d.next_event(), None);
    d.push(b":1}\n").unwrap();
    assert_eq!(d.next_event(), None);
    d.push(b"\n").unwrap();
    assert_eq!(d.next_event().unwrap().data, "{\"x\":1}");
    // finish() completes an event whose closing blank line never came.
    d.push(b"data: tail").unwrap();
    d.finish().unwrap();
    assert_eq!(d.next_event(), Some(Event::message("tail")));
}

#[test]
fn oversize_event_is_an_error_not_growth() {
    let mut d = SseDecoder::with_limit(64);
    d.push(b"data: small\n\n").unwrap();
    let big = [b'x'; 100];
    let mut result = Ok(());
    for b in big.chunks(7) {
        result = d.push(b);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(SseError::EventTooLarge { limit: 64 }));
    // Events completed before the failure are still delivered; further input is refused.
    assert_eq!(d.next_event(), Some(Event::message("small")));
    assert!(d.push(b"\n\n").is_err());
    assert!(d.finish().is_err());

    // Many data lines, each small, adding up past the limit.
    let mut d = SseDecoder::with_limit(64);
    let lines = "data: 0123456789\n".repeat(10);
    assert!(d.push(lines.as_bytes()).is_err());

    // Many small events in one big chunk are fine.
    let mut d = SseDecoder::with_limit(64);
    let many = "data: 0123456789\n\n".repeat(1000);
    d.push(many.as_bytes()).unwrap();
    assert_eq!(std::iter::from_fn(|| d.next_event()).count(), 1000);
}

#[test]
fn encode_round_trips() {
    let events = [
        ev(
            Some("7"),
            Some("message"),
            "{\"jsonrpc\":\"2.0\"}",
            Some(500),
        ),
        ev(None, None, "multi\nline\n\ndata", None),
        ev(None, None, " leading space", None),
        ev(Some("prime"), None, "", None),
    ];
    for e in &events {
        let wire = e.encode();
        assert!(wire.ends_with(b"\n\n"));
        assert_eq!(decode_in_chunks(&wire, 1), vec![e.clone()]);
    }
    assert_eq!(
        &Event::message("a\nb").encode()[..],
        b"data: a\ndata: b\n\n"
    );
    let e = ev(Some("x\ny"), None, "a\r\nb", None);
    assert_eq!(&e.encode()[..], b"id: xy\ndata: a\ndata: b\n\n");
}

const ID: i64 = 2;

#[test]
fn find_response_in_json() {
    let body = br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[]}}"#;
    let r = find_response(body, "application/json; charset=utf-8", &Id::from(ID)).unwrap();
    assert_eq!(
        r,
        Some(json!({"jsonrpc":"2.0","id":2,"result":{"tools":[]}}))
    );
    assert_eq!(
        find_response(body, "application/json", &Id::from("2")).unwrap(),
        None
    );
    let batch = br#"[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-32601,"message":"nope"}}]"#;
    let r = find_response(batch, "Application/JSON", &Id::from(ID))
        .unwrap()
        .unwrap();
    assert_eq!(r["error"]["code"], json!(-32601));
    let null_id = br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"Server not initialized"}}"#;
    let r = find_response(null_id, "application/json", &Id::from(ID))
        .unwrap()
        .unwrap();
    assert_eq!(r["error"]["message"], json!("Server not initialized"));
    assert!(matches!(
        find_response(b"<html>", "application/json", &Id::from(ID)),
        Err(FindError::Json(_))
    ));
    assert!(matches!(
        find_response(b"x", "text/html", &Id::from(ID)),
        Err(FindError::ContentType(_))
    ));
}

#[test]
fn find_response_in_sse_after_notifications() {
    let body = "id: p\nretry: 1000\ndata:\n\n\
        : keep-alive\n\n\
        event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\n\n\
        data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":2}}\n\n\
        data: {\"jsonrpc\":\"2.0\",\"id\":99,\"method\":\"sampling/createMessage\"}\n\n\
        data: not json\n\n\
        event: other\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":\"wrong event type\"}\n\n\
        data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"other request\"}\n\n\
        data: {\"jsonrpc\":\"2.0\",\r\ndata: \"id\":2,\"result\":{\"content\":[]}}\r\n\r\n";
    let r = find_response(body.as_bytes(), "text/event-stream", &Id::from(ID)).unwrap();
    assert_eq!(
        r,
        Some(json!({"jsonrpc":"2.0","id":2,"result":{"content":[]}}))
    );
    let r = find_response(body.as_bytes(), "text/event-stream", &Id::from(5)).unwrap();
    assert_eq!(r, None);
    // A final event without its blank line is still found.
    let tail = "data: {\"jsonrpc\":\"2.0\",\"id\":\"s\",\"result\":{}}";
    assert!(
        find_response(tail.as_bytes(), "text/event-stream", &Id::from("s"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn find_response_oversize_sse_is_an_error() {
    let body = format!("data: {}\n\n", "x".repeat(DEFAULT_MAX_EVENT_BYTES + 1));
    let r = find_response(body.as_bytes(), "text/event-stream", &Id::from(ID));
    assert!(matches!(
        r,
        Err(FindError::Sse(SseError::EventTooLarge { .. }))
    ));
}
