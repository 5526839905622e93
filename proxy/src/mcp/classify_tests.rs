//! Tests for [`super`]: both generations, every rejection with its status and code.

use super::*;
use crate::mcp::jsonrpc::{PARSE_ERROR, result_body};
use http::HeaderValue;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn reject(h: &[(&str, &str)], body: &str) -> (StatusCode, i64, Value) {
    let r = classify(&headers(h), body.as_bytes()).unwrap_err();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["error"]["code"],
        json!(r.code),
        "code field agrees with body"
    );
    (r.status, r.code, v)
}

const CALL: &str =
    r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#;
const MODERN_CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
const V: &str = "MCP-Protocol-Version";

#[test]
fn legacy_request_with_session() {
    let c = classify(
        &headers(&[(V, "2025-06-18"), ("MCP-SESSION-ID", "abc123")]),
        CALL.as_bytes(),
    )
    .unwrap();
    assert_eq!(c.generation, Generation::Legacy);
    assert_eq!(c.protocol_version, Some("2025-06-18"));
    assert_eq!(c.method.as_deref(), Some("tools/call"));
    assert_eq!(c.name.as_deref(), Some("add"));
    assert_eq!(c.id, Some(Id::from(7)));
    assert_eq!(c.session_id.as_deref(), Some("abc123"));
}

#[test]
fn legacy_without_header_and_initialize() {
    let body = r#"{"jsonrpc":"2.0","id":"i","method":"initialize","params":{"protocolVersion":"2025-11-25"}}"#;
    let c = classify(&HeaderMap::new(), body.as_bytes()).unwrap();
    assert_eq!(c.generation, Generation::Legacy);
    assert_eq!(c.protocol_version, None);
    assert_eq!(c.method.as_deref(), Some("initialize"));
    assert_eq!(c.name, None);
    assert_eq!(c.id, Some(Id::from("i")));
    // Legacy ignores the modern routing headers, even wrong ones.
    let c = classify(
        &headers(&[(V, "2025-11-25"), ("Mcp-Method", "nope")]),
        CALL.as_bytes(),
    )
    .unwrap();
    assert_eq!(c.method.as_deref(), Some("tools/call"));
}

#[test]
fn legacy_client_response_and_notification() {
    let c = classify(
        &headers(&[(V, "2025-11-25")]),
        &result_body(&Id::from(3), &json!({})),
    )
    .unwrap();
    assert_eq!((c.method, c.id), (None, Some(Id::from(3))));
    let c = classify(
        &HeaderMap::new(),
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .unwrap();
    assert_eq!(
        (c.method.as_deref(), c.id),
        (Some("notifications/initialized"), None)
    );
}

#[test]
fn modern_by_header() {
    let h = [
        (V, MODERN),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "add"),
        ("Mcp-Session-Id", "s"),
    ];
    let c = classify(&headers(&h), MODERN_CALL.as_bytes()).unwrap();
    assert_eq!(c.generation, Generation::Modern);
    assert_eq!(c.protocol_version, Some(MODERN));
    assert_eq!(c.name.as_deref(), Some("add"));
    assert_eq!(c.session_id, None, "2026-07-28 has no sessions");
}

#[test]
fn modern_by_meta_without_header() {
    let c = classify(
        &headers(&[("Mcp-Method", "tools/call"), ("Mcp-Name", "add")]),
        MODERN_CALL.as_bytes(),
    )
    .unwrap();
    assert_eq!(c.generation, Generation::Modern);
    assert_eq!(c.protocol_version, Some(MODERN));
    // ...and the modern rules then apply.
    let (status, code, _) = reject(&[], MODERN_CALL);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
}

#[test]
fn modern_non_ascii_name_in_base64() {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"ねこ"}}"#;
    let h = [
        (V, MODERN),
        ("Mcp-Method", "prompts/get"),
        ("Mcp-Name", "=?base64?44Gt44GT?="),
    ];
    let c = classify(&headers(&h), body.as_bytes()).unwrap();
    assert_eq!(c.name.as_deref(), Some("ねこ"));
    let h = [
        (V, MODERN),
        ("Mcp-Method", "prompts/get"),
        ("Mcp-Name", "=?base64?!!?="),
    ];
    let (status, code, v) = reject(&h, body);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
    assert!(v["error"]["message"].as_str().unwrap().contains("Mcp-Name"));
}

#[test]
fn modern_resources_read_uses_uri() {
    let body =
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a.txt"}}"#;
    let h = [
        (V, MODERN),
        ("Mcp-Method", "resources/read"),
        ("Mcp-Name", "file:///a.txt"),
    ];
    assert_eq!(
        classify(&headers(&h), body.as_bytes())
            .unwrap()
            .name
            .as_deref(),
        Some("file:///a.txt")
    );
    let h = [
        (V, MODERN),
        ("Mcp-Method", "resources/read"),
        ("Mcp-Name", "file:///b.txt"),
    ];
    let (_, code, v) = reject(&h, body);
    assert_eq!(code, HEADER_MISMATCH);
    assert_eq!(
        v["error"]["data"],
        json!({"header":"Mcp-Name","headerValue":"file:///b.txt","bodyValue":"file:///a.txt"})
    );
}

#[test]
fn modern_missing_or_wrong_method_header() {
    let (status, code, v) = reject(&[(V, MODERN), ("Mcp-Name", "add")], MODERN_CALL);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Mcp-Method") && msg.contains("absent") && msg.contains("tools/call"),
        "{msg}"
    );
    assert_eq!(v["id"], json!(7));

    let (status, code, v) = reject(
        &[
            (V, MODERN),
            ("Mcp-Method", "tools/list"),
            ("Mcp-Name", "add"),
        ],
        MODERN_CALL,
    );
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"tools/list\"") && msg.contains("\"tools/call\""),
        "{msg}"
    );
}

#[test]
fn modern_name_header_rules() {
    // Missing where required.
    let (status, code, v) = reject(&[(V, MODERN), ("Mcp-Method", "tools/call")], MODERN_CALL);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
    assert!(v["error"]["message"].as_str().unwrap().contains("Mcp-Name"));
    // Different from the body.
    let (_, code, v) = reject(
        &[
            (V, MODERN),
            ("Mcp-Method", "tools/call"),
            ("Mcp-Name", "sub"),
        ],
        MODERN_CALL,
    );
    assert_eq!(code, HEADER_MISMATCH);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"sub\"") && msg.contains("\"add\""), "{msg}");
    // Optional for other methods, but must not name something the body does not.
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    assert!(
        classify(
            &headers(&[(V, MODERN), ("Mcp-Method", "tools/list")]),
            list.as_bytes()
        )
        .is_ok()
    );
    let (_, code, _) = reject(
        &[(V, MODERN), ("Mcp-Method", "tools/list"), ("Mcp-Name", "x")],
        list,
    );
    assert_eq!(code, HEADER_MISMATCH);
    // Sent twice.
    let h = [
        (V, MODERN),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "add"),
        ("Mcp-Name", "add"),
    ];
    let (_, code, v) = reject(&h, MODERN_CALL);
    assert_eq!(code, HEADER_MISMATCH);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than once")
    );
}

#[test]
fn modern_version_header_must_equal_meta() {
    let body = MODERN_CALL.replace("\"2026-07-28\"", "\"2025-11-25\"");
    let (status, code, v) = reject(
        &[
            (V, MODERN),
            ("Mcp-Method", "tools/call"),
            ("Mcp-Name", "add"),
        ],
        &body,
    );
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, HEADER_MISMATCH));
    assert_eq!(v["error"]["data"]["header"], json!("MCP-Protocol-Version"));
}

#[test]
fn modern_refuses_batches_and_responses() {
    let batch = format!("[{MODERN_CALL}]");
    let (status, code, v) = reject(&[(V, MODERN), ("Mcp-Method", "tools/call")], &batch);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, INVALID_REQUEST));
    assert_eq!(
        v["error"]["message"],
        json!("batches are not allowed in protocol 2026-07-28")
    );
    let resp = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
    let (status, code, _) = reject(&[(V, MODERN)], resp);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, INVALID_REQUEST));
}

#[test]
fn unsupported_version() {
    for bad in ["2024-11-05", "2099-01-01", "garbage"] {
        let (status, code, v) = reject(&[(V, bad)], CALL);
        assert_eq!(
            (status, code),
            (StatusCode::BAD_REQUEST, UNSUPPORTED_PROTOCOL_VERSION),
            "{bad}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(bad) && msg.contains("2025-03-26") && msg.contains(MODERN),
            "{msg}"
        );
        assert_eq!(v["error"]["data"]["supported"], json!(SUPPORTED_VERSIONS));
    }
    // Checked before the body, so even a broken body gets -32022.
    let (_, code, _) = reject(&[(V, "1999-01-01")], "{");
    assert_eq!(code, UNSUPPORTED_PROTOCOL_VERSION);
}

#[test]
fn parse_and_invalid_errors() {
    let (status, code, v) = reject(&[(V, "2025-06-18")], "{not json");
    assert_eq!(
        (status, code, v["id"].clone()),
        (StatusCode::BAD_REQUEST, PARSE_ERROR, Value::Null)
    );
    let (status, code, _) = reject(&[], r#"{"jsonrpc":"2.0","id":1}"#);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, INVALID_REQUEST));
    let (_, code, _) = reject(&[], "[]");
    assert_eq!(code, INVALID_REQUEST);
}

#[test]
fn batches_by_version() {
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","method":"notifications/x"}]"#;
    for h in [&[(V, "2025-03-26")][..], &[]] {
        let c = classify(&headers(h), batch.as_bytes()).unwrap();
        assert_eq!(c.message.as_ref().unwrap().messages().len(), 2);
        assert_eq!((c.method, c.id), (None, None));
    }
    for v in ["2025-06-18", "2025-11-25"] {
        let (status, code, body) = reject(&[(V, v)], batch);
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, INVALID_REQUEST));
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("removed after protocol 2025-03-26")
        );
    }
    let with_init = r#"[{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}]"#;
    let (_, code, body) = reject(&[], with_init);
    assert_eq!(code, INVALID_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("initialize")
    );
    let mixed = r#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":2,"result":{}}]"#;
    assert_eq!(reject(&[], mixed).1, INVALID_REQUEST);
    let responses =
        r#"[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":"2","result":{}}]"#;
    assert!(classify(&HeaderMap::new(), responses.as_bytes()).is_ok());
}

#[test]
fn repeated_headers_are_refused() {
    let (_, code, _) = reject(&[(V, "2025-06-18"), (V, "2025-06-18")], CALL);
    assert_eq!(code, HEADER_MISMATCH);
    let (status, code, _) = reject(&[("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")], CALL);
    assert_eq!((status, code), (StatusCode::BAD_REQUEST, INVALID_REQUEST));
}

#[test]
fn route_hint_reads_headers_only() {
    let h = headers(&[
        (V, MODERN),
        ("mcp-method", "tools/call"),
        ("MCP-NAME", "=?base64?44Gt44GT?="),
    ]);
    let (method, name) = route_hint(&h).unwrap();
    assert_eq!((method, name.as_deref()), ("tools/call", Some("ねこ")));
    assert_eq!(
        route_hint(&headers(&[(V, MODERN), ("Mcp-Method", "tools/list")]))
            .unwrap()
            .1,
        None
    );
    assert!(route_hint(&headers(&[(V, "2025-11-25"), ("Mcp-Method", "tools/call")])).is_none());
    assert!(route_hint(&headers(&[("Mcp-Method", "tools/call")])).is_none());
    assert!(route_hint(&headers(&[(V, MODERN)])).is_none());
    assert!(
        route_hint(&headers(&[
            (V, MODERN),
            ("Mcp-Method", "a"),
            ("Mcp-Method", "b")
        ]))
        .is_none()
    );
}

#[test]
fn rename_then_headers_agree_again() {
    let h0 = [
        (V, MODERN),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "add"),
    ];
    let mut h = headers(&h0);
    let c = classify(&h, MODERN_CALL.as_bytes()).unwrap();
    let body = rename_tool_call(MODERN_CALL.as_bytes(), "math.add/ü").unwrap();
    set_routing_headers(&mut h, c.method.as_deref().unwrap(), Some("math.add/ü"));
    let c2 = classify(&h, &body).unwrap();
    assert_eq!(c2.name.as_deref(), Some("math.add/ü"));
    assert_eq!(c2.id, c.id);
    // Renaming the body without re-emitting the header is caught.
    let (_, code, _) = reject(&h0, std::str::from_utf8(&body).unwrap());
    assert_eq!(code, HEADER_MISMATCH);
}

#[test]
fn a_repeated_key_is_refused_not_read_one_way() {
    // The last "method" wins in a tree, the first in some readers: refused either way.
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"resources/read","params":{"uri":"file:///x"}}"#;
    let r = classify(&HeaderMap::new(), body).unwrap_err();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], INVALID_REQUEST);
    assert_eq!(v["id"], 1);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"method\""),
        "{v}"
    );
}

#[test]
fn a_tools_call_read_without_a_tree_is_classified_as_with_one() {
    let modern = [
        (V, MODERN),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "add"),
    ];
    let bodies = [
        CALL,
        MODERN_CALL,
        r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"add","requestState":"s","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        r#"{"jsonrpc":"2.0","id":1.0,"method":"tools/call","params":{"name":"other"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["add"]}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","_meta":{"io.modelcontextprotocol/protocolVersion":"2025-06-18"}}}"#,
        // Refused by the strict inspection after either read.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","name":"x"}}"#,
    ];
    let header_sets: [&[(&str, &str)]; 4] = [
        &[],
        &[(V, "2025-06-18"), ("Mcp-Session-Id", "s1")],
        &modern,
        &[(V, MODERN), ("Mcp-Method", "tools/call")],
    ];
    for body in bodies {
        for h in header_sets {
            let h = headers(h);
            let fast = classify(&h, body.as_bytes());
            let tree = classify_with_tree(&h, body.as_bytes());
            match (fast, tree) {
                (Ok(fast), Ok(mut tree)) => {
                    assert!(tree.message.take().is_some());
                    if fast.message.is_none() {
                        assert_eq!(fast.method.as_deref(), Some("tools/call"));
                    }
                    let fast = Classified {
                        message: None,
                        ..fast
                    };
                    assert_eq!(fast, tree, "{body} {h:?}");
                }
                (Err(fast), Err(tree)) => assert_eq!(fast, tree, "{body} {h:?}"),
                (fast, tree) => panic!("{body} {h:?}: {fast:?} against {tree:?}"),
            }
        }
    }
    // The mesh's usual call is read without a tree.
    let c = classify(&headers(&modern), MODERN_CALL.as_bytes()).unwrap();
    assert_eq!(c.message, None);
    assert_eq!(c.request_state, None);
}
