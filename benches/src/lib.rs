//! capmesh benchmarks. Speed and memory are measured here, never asserted in tests; each result
//! goes into `benches/RESULTS.md` with the command and the machine.
//!
//! - `capmesh-bench-certs`: leaf issuance per second and full mutual-TLS handshakes per second.
//! - `capmesh-bench-fanout`: control-plane change → last of 1,000 proxies.
//! - `capmesh-bench`: routing latency of the mesh path beside direct, nginx and HAProxy
//!   ([`echo`] upstream, [`load`] generator, [`suite`] of scenarios, [`report`] tables;
//!   [`peers`] sets up nginx and HAProxy, [`procstat`] meters CPU and RSS). Driven by
//!   `benches/run.sh`; `capmesh-bench soak` (`benches/soak.sh`) holds a rate for a long time
//!   while providers restart ([`soak`]); `capmesh-bench hold` ([`hold`]) starts one path for
//!   measuring from outside, the [`floor`] path among them.
//! - `cargo bench -p capmesh-bench`: criterion micro benches of route resolution, snapshot
//!   swaps under readers and JSON-RPC classification (`benches/benches/routing.rs`).
#![forbid(unsafe_code)]

pub mod echo;
pub mod floor;
pub mod hold;
pub mod load;
pub mod peers;
pub mod procstat;
pub mod report;
pub mod soak;
pub mod suite;
