//! Tests for [`super`]: parsing, error codes, id round trips and body builders.

use super::*;
use serde_json::json;

fn err(body: &str) -> RpcError {
    parse(body.as_bytes()).unwrap_err()
}

fn single(body: &str) -> Message {
    match parse(body.as_bytes()).unwrap() {
        Parsed::Single(m) => m,
        Parsed::Batch(_) => panic!("expected a single message"),
    }
}

#[test]
fn parses_request_notification_response() {
    let m = single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}"#);
    assert_eq!(m.method(), Some("tools/call"));
    assert_eq!(m.id(), Some(&Id::from(1)));
    assert_eq!(m.params(), Some(&json!({"name":"add"})));

    let n = single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert!(
        matches!(n, Message::Notification { ref method, params: None } if method == "notifications/initialized")
    );

    let r = single(r#"{"jsonrpc":"2.0","id":"a","result":{"ok":true}}"#);
    assert_eq!(
        r,
        Message::Response {
            id: Some(Id::from("a")),
            outcome: Ok(json!({"ok":true}))
        }
    );

    let e =
        single(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"bad","data":[1]}}"#);
    let expected = ErrorObject {
        code: -32600,
        message: "bad".into(),
        data: Some(json!([1])),
    };
    assert_eq!(
        e,
        Message::Response {
            id: None,
            outcome: Err(expected)
        }
    );
}

#[test]
fn not_json_is_parse_error() {
    for body in ["", "{", "nope", "{\"jsonrpc\":\"2.0\",}"] {
        let e = err(body);
        assert_eq!(e.code, PARSE_ERROR, "{body}");
        assert_eq!(e.id, None);
    }
}

#[test]
fn invalid_requests() {
    let cases = [
        r#"{"id":1,"method":"x"}"#,
        r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
        r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":true,"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":[1],"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"x","params":3}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"m"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"error":"boom"}"#,
        r#"{"jsonrpc":"2.0","result":1}"#,
        r#"{"jsonrpc":"2.0","id":null,"result":1}"#,
        r#"[]"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"x"}, 5]"#,
        r#"42"#,
        r#""str""#,
    ];
    for body in cases {
        assert_eq!(err(body).code, INVALID_REQUEST, "{body}");
    }
}

#[test]
fn invalid_request_keeps_readable_id() {
    let e = err(r#"{"jsonrpc":"2.0","id":"req-9","method":"x","params":"s"}"#);
    assert_eq!(e.id, Some(Id::from("req-9")));
    let body: Value = serde_json::from_slice(&e.to_body()).unwrap();
    assert_eq!(body["id"], json!("req-9"));
    assert_eq!(body["error"]["code"], json!(INVALID_REQUEST));
}

#[test]
fn batch_parses() {
    let p = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","method":"b"}]"#)
        .unwrap();
    assert_eq!(p.messages().len(), 2);
    assert!(p.single().is_none());
}

#[test]
fn ids_round_trip_exactly() {
    for raw in [
        "0",
        "-1",
        "9007199254740993",
        "18446744073709551615",
        "-9223372036854775808",
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{raw},"method":"m"}}"#);
        let m = single(&body);
        let id = m.id().unwrap().clone();
        assert_eq!(
            String::from_utf8(result_body(&id, &json!(null)).to_vec()).unwrap(),
            format!(r#"{{"jsonrpc":"2.0","id":{raw},"result":null}}"#)
        );
        assert_eq!(String::from_utf8(m.to_bytes().to_vec()).unwrap(), body);
    }
    let m = single(r#"{"jsonrpc":"2.0","id":"a\"b\u00e9","method":"m"}"#);
    assert_eq!(m.id(), Some(&Id::String("a\"bé".into())));
    let out: Value = serde_json::from_slice(&m.to_bytes()).unwrap();
    assert_eq!(out["id"], json!("a\"bé"));
    // A string "1" and a number 1 are different ids.
    assert_ne!(Id::from("1"), Id::from(1));
    assert_eq!(Id::from("1").to_string(), "\"1\"");
    assert_eq!(Id::from(1).to_string(), "1");
}

#[test]
fn error_body_null_and_data() {
    let b = error_body(None, PARSE_ERROR, "bad json", None);
    assert_eq!(
        &b[..],
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad json"}}"#
    );
    let b = error_body(
        Some(&Id::from(3)),
        NO_ENDPOINT,
        "none",
        Some(json!({"capability":"add"})),
    );
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v,
        json!({"jsonrpc":"2.0","id":3,"error":{"code":-32004,"message":"none","data":{"capability":"add"}}})
    );
}

#[test]
fn id_serde() {
    let id: Id = serde_json::from_str("12").unwrap();
    assert_eq!(id, Id::from(12));
    // Every number form an SDK may accept is an id (`1.0` is an integer to JavaScript and to
    // pydantic); the agent judges the rest.
    for n in ["1.0", "1e3", "-7", "1.5"] {
        let id: Id = serde_json::from_str(n).unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            serde_json::to_string(&serde_json::from_str::<Value>(n).unwrap()).unwrap()
        );
    }
    assert!(serde_json::from_str::<Id>("null").is_err());
    assert_eq!(Id::from_value(&json!("x")).unwrap().to_value(), json!("x"));
}
