//! capmesh benchmarks. Speed and memory are measured here, never asserted in tests; each result
//! goes into `benches/RESULTS.md` with the command and the machine.
//!
//! - `capmesh-bench-certs`: leaf issuance per second and full mutual-TLS handshakes per second.
#![forbid(unsafe_code)]
