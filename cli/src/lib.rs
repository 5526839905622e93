//! The `capmesh` command: what a person (or a script) uses to run and inspect a mesh.
//!
//! This crate owns the command's surface: the global flags and where they come from (flag,
//! `CAPMESH_*` environment, `~/.config/capmesh/config.toml`), the REST calls behind each
//! subcommand with errors that say what to do, tables and `--output json`, and `capmesh call`,
//! which joins the mesh as a client with its own short-lived identity. It also runs the control
//! plane and the proxy in-process (`capmesh control-plane …`, `capmesh proxy …`), so one binary
//! is enough. It does not route, store or sign anything itself: the control plane, the proxy
//! library and `capmesh-certs` do.
//!
//! The binary's `main.rs` holds the argument tree and the dispatch; each subcommand lives in
//! its own module here.
#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed assertion. The library build is still linted.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod call;
pub mod cert;
pub mod demo;
pub mod entity;
pub mod inject;
pub mod list;
pub mod local_mesh;
pub mod mesh_settings;
pub mod multicall;
pub mod output;
pub mod policy;
pub mod settings;
pub mod status;
// `supervise`, `demo` and `up` are written by the lead.
pub mod supervise;
pub mod token;
pub mod trace;
pub mod up;

pub use api::{Api, ApiError};
pub use output::Output;
pub use settings::{GlobalArgs, Settings, SettingsError};
