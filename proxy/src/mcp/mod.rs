//! The MCP wire rules the proxy enforces and relies on, for both protocol generations
//! (2025-03-26 … 2025-11-25 with sessions; 2026-07-28 stateless with `Mcp-Method`/`Mcp-Name`).
//!
//! * [`inspect`]: every message of a body read in one strict pass without a tree (method,
//!   target, id shape): what inbound authorization decides on.
//! * [`jsonrpc`]: JSON-RPC 2.0 messages, parse/invalid-request errors, error and result bodies,
//!   and the error codes capmesh sends.
//! * [`call`]: a single `tools/call` request read in one pass without a tree (what the
//!   classifier needs of the mesh's most common message).
//! * [`classify`]: what a POST is (generation, method, target name, id, session) and the 400s
//!   owed to a client that breaks the transport rules; the header-only [`route_hint`].
//! * [`header`]: MCP header names, the `=?base64?…?=` value encoding, re-emitting routing headers.
//! * [`rewrite`]: renaming the tool of a `tools/call` body without disturbing any other byte.
//! * [`relay`]: a response body relaying an event stream event by event through a mapping
//!   (JSON-RPC id remapping on the federated endpoint).
//! * [`sse`]: a bounded, incremental `text/event-stream` decoder and encoder, and
//!   [`find_response`] for when the proxy itself calls an agent.
//!
//! This module does no I/O and holds no state; routing, sessions and forwarding live elsewhere.

#![warn(missing_docs)]

pub mod call;
pub mod classify;
pub mod header;
pub mod inspect;
pub mod jsonrpc;
pub mod relay;
pub mod rewrite;
pub mod sse;

pub use classify::{
    Classified, Generation, LEGACY_VERSIONS, MODERN, Rejection, SUPPORTED_VERSIONS, classify,
    route_hint,
};
pub use header::{
    MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, header_value_decode,
    header_value_encode, set_routing_headers,
};
pub use jsonrpc::{Id, Message, Parsed, RpcError, error_body, parse, result_body};
pub use rewrite::{rename_tool_call, rename_tool_call_with_id};
pub use sse::{Event, FindError, SseDecoder, SseError, find_response};
