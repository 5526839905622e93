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
    // Logs go to stderr: stdout carries `READY <port>` and the planner's lines. Colours only
    // on a terminal, never with NO_COLOR or TERM=dumb.
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_ansi(std::io::stderr().is_terminal() && !no_color && !dumb)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(capmesh_examples::run(cli.agent))
}
