//! End-to-end tests that start the real binaries with real MCP peers (Python, TypeScript, the
//! conformance suite). Helpers to build and start them live here; the tests in `tests/tests/`.
#![forbid(unsafe_code)]
