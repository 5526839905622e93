//! Small MCP agents used by `capmesh demo` and the docs. Not built yet.
#![forbid(unsafe_code)]
