//! The proxy's byte-level rewrites, which change a body without building a JSON tree: a
//! `tools/call`'s tool name and id on the way to a provider, a response's id on the way back.
//! Whatever JSON they accept comes out as the same JSON with just that field changed.
#![no_main]

use capmesh_proxy::mcp::rewrite::{rename_tool_call_with_id, replace_response_id};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    // The scanners check structure, not every byte: a body that is not JSON (a provider's
    // broken answer, say) may come out as broken as it went in. What is JSON stays JSON.
    let Ok(before) = serde_json::from_slice::<Value>(data) else {
        let _ = rename_tool_call_with_id(data, "renamed", &json!("cm-1"));
        let _ = replace_response_id(data, br#""cm-1""#, b"7");
        return;
    };
    if let Ok(out) = rename_tool_call_with_id(data, "renamed", &json!("cm-1")) {
        let after: Value = serde_json::from_slice(&out).expect("a rewritten call is JSON");
        let mut expected = before.clone();
        expected["params"]["name"] = json!("renamed");
        expected["id"] = json!("cm-1");
        assert_eq!(after, expected);
    }
    if let Some(out) = replace_response_id(data, br#""cm-1""#, b"7") {
        let after: Value = serde_json::from_slice(&out).expect("a response given its id is JSON");
        let mut expected = before;
        assert_eq!(expected["id"], json!("cm-1"));
        expected["id"] = json!(7);
        assert_eq!(after, expected);
    }
});
