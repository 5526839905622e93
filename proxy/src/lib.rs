//! capmesh sidecar proxy: the outbound MCP router (the mesh as one MCP server), the inbound
//! mutual-TLS server in front of the local agent, and the admin endpoints. Not built yet.
#![forbid(unsafe_code)]
