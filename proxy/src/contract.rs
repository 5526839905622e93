//! The contract between two proxies of the mesh: the paths one proxy's outbound side calls on
//! another's inbound listener, the headers they exchange, and the limits both enforce.
//!
//! Both sides depend on this module and on nothing of each other.

/// A federated call, or a message that belongs to one (the client's answer to a provider's
/// request, a cancellation): one JSON-RPC message per POST, tool names already the provider's.
pub const CALL_PATH: &str = "/.capmesh/call";
/// Passthrough: a whole MCP conversation with the agent, for the capability named in
/// [`CAPABILITY_HEADER`].
pub const PASSTHROUGH_PATH: &str = "/.capmesh/passthrough";
/// The capability a passthrough conversation was opened for.
pub const CAPABILITY_HEADER: &str = "x-capmesh-capability";
/// The verified caller, as the provider's proxy tells its agent.
pub const CALLER_HEADER: &str = "x-capmesh-caller";
/// Set on every answer the mesh makes itself (never on an agent's): the error's label. A
/// `503` carrying it did not reach an agent.
pub const ERROR_HEADER: &str = "x-capmesh-error";
/// Which endpoint served a call: `<spiffe id>#<instance>`.
pub const SERVED_BY_HEADER: &str = "x-capmesh-served-by";
/// The caller's deadline for a call (`30s`, `500ms`).
pub const TIMEOUT_HEADER: &str = "x-capmesh-timeout";
/// Every header with this prefix is the mesh's own: stripped from what callers send.
pub const MESH_HEADER_PREFIX: &str = "x-capmesh-";
/// The largest request body any listener accepts (bytes); larger ones get 413.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// The largest JSON response the mesh reads whole to rewrite (bytes).
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;
