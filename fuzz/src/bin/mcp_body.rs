//! A POST body as the proxy reads it on every listener: the outbound classifier (JSON-RPC
//! parse and each generation's transport rules, with no headers, legacy headers and
//! 2026-07-28 headers) and the inbound authorization layer's one-pass inspection. The two must
//! read a message the same way: what the classifier accepts, the inspection accepts, and a
//! single request has the same method for both. The classifier reads a plain `tools/call`
//! without a tree: it must reach the same verdict, field for field, as through the tree.
#![no_main]

use capmesh_proxy::mcp::classify::{Classified, classify, classify_with_tree};
use capmesh_proxy::mcp::inspect::inspect;
use capmesh_proxy::mcp::jsonrpc;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                http::header::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            )
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let inspected = inspect(data);
    let _ = jsonrpc::parse(data);
    for h in [
        headers(&[]),
        headers(&[("mcp-protocol-version", "2025-06-18")]),
        headers(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "get_weather"),
        ]),
    ] {
        let tree = classify_with_tree(&h, data).map(|c| Classified {
            message: None,
            ..c
        });
        let fast = classify(&h, data).map(|c| Classified {
            message: None,
            ..c
        });
        assert_eq!(fast, tree, "read without a tree, then with one");
        // What the mesh routes, the provider's side reads the same way.
        let Ok(classified) = fast else {
            continue;
        };
        let seen = inspected.as_ref().unwrap_or_else(|e| {
            panic!("the classifier accepted a body that the inspection refused: {e}")
        });
        if let Some(method) = &classified.method {
            assert_eq!(seen.len(), 1, "one message read as {}", seen.len());
            assert_eq!(seen[0].method.as_deref(), Some(method.as_ref()));
            if method == "tools/call" {
                assert_eq!(seen[0].name, classified.name, "the tool named");
            }
        }
    }
});
