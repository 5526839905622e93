//! Small MCP agents for `capmesh demo` and the docs, built on the official Rust MCP SDK (`rmcp`)
//! and served over Streamable HTTP, each meant to run as its own process beside its own capmesh
//! sidecar (the shape of MCP Mesh's TripPlanner):
//!
//! - `llm` (`chat`), `flights` (`search_flights`), `weather` (`get_weather`): tool providers
//!   with deterministic answers that name the serving agent, so routing and failover are
//!   visible to a person; `all` serves every tool in one process, for tests.
//! - `planner`: a consumer that sees the mesh as one MCP server (its sidecar's federated
//!   endpoint) and plans a trip with whatever providers the mesh routes it to.
//!
//! This crate owns the agents and their flags (`capmesh agent ...` is [`run`]); it knows nothing
//! of the mesh: no capmesh code runs in an agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod answers;
mod args;
mod client;
mod planner;
mod server;
mod tools;

pub use args::{AgentArgs, AgentKind, DEFAULT_CITY, DEFAULT_MESH_URL, Flavor, run};
pub use client::{HttpClientError, HyperClient, SERVED_BY_HEADER, TraceContext};
pub use planner::{ORIGIN, PlanStep, TRAVEL_DATE, TripPlan, plan_trip};
pub use server::{AgentServer, MCP_PATH, ServeOptions, serve};
