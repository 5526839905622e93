//! `capmesh-example-agent`: one of the example agents as a process (the same as `capmesh agent`).
#![forbid(unsafe_code)]

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Runs a capmesh example MCP agent.
#[derive(Debug, Parser)]
#[command(name = "capmesh-example-agent", version, about)]
struct Cli {
    #[command(flatten)]
    agent: capmesh_examples::AgentArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr: stdout carries `READY <port>` and the planner's lines.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(capmesh_examples::run(cli.agent))
}
