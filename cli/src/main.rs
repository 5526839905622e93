//! `capmesh`: the user's command. The argument tree and the dispatch live here; each
//! subcommand is a module of the `capmesh` library.
//!
//! Exit codes: 0 success; 1 failure (including a tool that reported an error); 2 bad usage.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::process::ExitCode;

use capmesh::call::CallArgs;
use capmesh::cert::CertCommand;
use capmesh::entity::EntityCommand;
use capmesh::list::ListArgs;
use capmesh::mesh_settings::MeshSettingsCommand;
use capmesh::policy::PolicyCommand;
use capmesh::settings::ArgSources;
use capmesh::status::StatusArgs;
use capmesh::token::TokenCommand;
use capmesh::{Api, GlobalArgs, Settings, demo, multicall, up};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// capmesh: a service mesh for MCP agents. Agents find each other by capability; a sidecar
/// proxy next to each one routes, balances, fails over and secures the calls with mutual TLS.
#[derive(Debug, Parser)]
#[command(
    name = "capmesh",
    version,
    after_help = "Examples:\n  \
        capmesh demo                        # a local mesh with example agents\n  \
        capmesh list                        # agents\n  \
        capmesh list capabilities\n  \
        capmesh status                      # control plane and every proxy\n  \
        capmesh call get_weather --args '{\"city\":\"Paris\"}' --tags +fast\n  \
        capmesh trace --last 10              # recent traces; capmesh trace <id> draws one\n  \
        capmesh token create --agent weather > weather.token\n  \
        capmesh inject -f deployment.yaml | kubectl apply -f -\n  \
        capmesh settings set --request-timeout 30s --propagate-headers x-tenant-id\n  \
        capmesh --control-plane https://cp.example:8000 --control-plane-ca ca.pem \\\n    \
            --admin-token-file admin-token list endpoints --output json\n\n\
        Where the control plane is comes from flags, then CAPMESH_* variables, then\n\
        ~/.config/capmesh/config.toml (keys control_plane, control_plane_ca, admin_token,\n\
        admin_token_file), then a running `capmesh up` or `capmesh demo --keep`, then ./capmesh-data.\n\
        Exit codes: 0 success, 1 failure (including a tool that reported an error), 2 bad usage."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local mesh with example agents and show calls going through it.
    #[command(after_help = "Examples:\n  \
        capmesh demo\n  \
        capmesh demo --keep        # leave the mesh running until Ctrl-C")]
    Demo(demo::DemoArgs),

    /// Run the mesh described in a file (control plane, agents and their sidecars) until Ctrl-C.
    // Its examples are on `UpArgs` itself.
    Up(up::UpArgs),

    /// List agents, capabilities or endpoints.
    #[command(after_help = "Examples:\n  \
        capmesh list\n  \
        capmesh list capabilities\n  \
        capmesh list endpoints --output json | jq -r '.[] | select(.healthy) | .address'")]
    List(ListArgs),

    /// Show the control plane and every proxy: stream, snapshot version, certificate, health.
    /// Exits non-zero when the control plane cannot be reached.
    #[command(after_help = "Examples:\n  \
        capmesh status\n  \
        capmesh status --output json | jq '.proxies[] | select(.connected | not)'\n\n\
        SNAPSHOT is the version the proxy acked / the control plane's current version. A proxy\n\
        is sent a new version only when something it depends on changes, so it may trail the\n\
        control plane's without harm; `none` means it has not acked any snapshot yet.")]
    Status(StatusArgs),

    /// Call a capability through the mesh (as spiffe://<trust-domain>/ns/capmesh-system/agent/cli)
    /// and print the tool's result. Exits 1 when the tool reports an error.
    #[command(after_help = "Examples:\n  \
        capmesh call get_weather --args '{\"city\":\"Paris\"}'\n  \
        capmesh call llm --args @prompt.json --tags +claude,-beta --version '>=1.2' --timeout 2m\n  \
        capmesh call echo --args '{\"text\":\"hi\"}' --output json | jq -r '.result.content[0].text'")]
    Call(CallArgs),

    /// Show one trace's call tree (hops, timings, identities) from the spans the sidecars
    /// sent the control plane, or list the most recent traces.
    #[command(after_help = "Examples:\n  \
        capmesh call get_weather --args '{\"city\":\"Paris\"}' --trace   # prints the trace id\n  \
        capmesh trace 4bf92f3577b34da6a3ce929d0e0e4736\n  \
        capmesh trace --last 10\n  \
        capmesh trace 4bf92f3577b34da6a3ce929d0e0e4736 --output json | jq '.spans[].name'\n\n\
        Sidecars record every call that carries a sampled W3C traceparent and a share of the\n\
        others (capmesh-proxy --trace-sampling). The control plane keeps the latest 2,000 traces\n\
        in memory (per replica).")]
    Trace(capmesh::trace::TraceArgs),

    /// Register, list or revoke entities: extra CAs the mesh trusts.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        capmesh entity register partner-a --ca ./partner-a-ca.pem\n  \
        capmesh entity list\n  \
        capmesh entity revoke partner-a"
    )]
    Entity(EntityCommand),

    /// Create, list or revoke bootstrap tokens for sidecars.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        capmesh token create --agent weather > weather.token\n  \
        capmesh token list\n  \
        capmesh token revoke 3f9a1c0b2d4e"
    )]
    Token(TokenCommand),

    /// Get or replace the authorization policy.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        capmesh policy get > policy.json\n  \
        capmesh policy set -f policy.json"
    )]
    Policy(PolicyCommand),

    /// Get or change the mesh-wide settings: propagated headers, default request timeout,
    /// retry budget (pushed to every proxy like the policy).
    // Its examples are on the subcommands.
    #[command(subcommand)]
    Settings(MeshSettingsCommand),

    /// Add the capmesh sidecar to Kubernetes workloads in YAML (a file or standard input) and
    /// print the result. Works offline.
    // Its examples and per-pod annotations are on `InjectArgs` itself.
    Inject(capmesh::inject::InjectArgs),

    /// Inspect certificates (offline).
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        capmesh cert inspect ./capmesh-data/ca.pem"
    )]
    Cert(CertCommand),

    /// Run the control plane in this process (the flags of capmesh-control-plane; see
    /// `capmesh control-plane --help`).
    #[command(disable_help_flag = true)]
    ControlPlane(PassThrough),

    /// Run a sidecar proxy in this process (the flags of capmesh-proxy; see
    /// `capmesh proxy --help`).
    #[command(disable_help_flag = true)]
    Proxy(PassThrough),

    /// Run an example MCP agent: llm, flights, weather, planner or all (the demo's agents; see
    /// `capmesh agent --help`). It prints the MCP URL it serves.
    #[command(disable_help_flag = true)]
    Agent(PassThrough),
}

/// The arguments of a program run in-process, passed on untouched.
#[derive(Debug, Args)]
struct PassThrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some((program, args)) = multicall::select(&argv) {
        return multicall::run(program, args);
    }
    let matches = match Cli::command().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.format(&mut Cli::command()).exit(),
    };
    let sources = ArgSources::from_matches(&matches);
    // Reached only when a global flag came first (`capmesh -o json proxy …`); the usual path is
    // `multicall::select` above. These start their own runtime.
    match cli.command {
        Command::ControlPlane(p) => {
            return multicall::run(multicall::Program::ControlPlane, p.args);
        }
        Command::Proxy(p) => return multicall::run(multicall::Program::Proxy, p.args),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, sources)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli, sources: ArgSources) -> anyhow::Result<ExitCode> {
    let output = cli.global.output;
    // Settings (and the config file) are read only by subcommands that talk to the control
    // plane, so `cert inspect` works anywhere.
    let api = || -> anyhow::Result<Api> {
        let settings = Settings::resolve(&cli.global, &sources)?;
        Ok(Api::connect(&settings)?)
    };
    match cli.command {
        Command::Demo(args) => demo::run(args).await?,
        Command::Up(args) => up::run(args).await?,
        Command::List(args) => capmesh::list::run(&api()?, output, args).await?,
        Command::Status(args) => capmesh::status::run(&api()?, output, args).await?,
        Command::Call(args) => return capmesh::call::run(&api()?, output, args).await,
        Command::Trace(args) => capmesh::trace::run(&api()?, output, args).await?,
        Command::Entity(cmd) => capmesh::entity::run(&api()?, output, cmd).await?,
        Command::Token(cmd) => capmesh::token::run(&api()?, output, cmd).await?,
        Command::Policy(cmd) => capmesh::policy::run(&api()?, output, cmd).await?,
        Command::Settings(cmd) => capmesh::mesh_settings::run(&api()?, output, cmd).await?,
        Command::Cert(cmd) => capmesh::cert::run(output, cmd)?,
        Command::Inject(args) => capmesh::inject::run(args, output)?,
        Command::ControlPlane(_) | Command::Proxy(_) | Command::Agent(_) => {
            anyhow::bail!(
                "run `capmesh control-plane …` and `capmesh proxy …` without other flags before them"
            )
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_tree_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_may_follow_the_subcommand_and_keep_their_source() {
        let matches = Cli::command()
            .try_get_matches_from([
                "capmesh",
                "list",
                "--control-plane",
                "https://x:1",
                "-o",
                "json",
            ])
            .unwrap();
        let sources = ArgSources::from_matches(&matches);
        assert_eq!(
            sources.control_plane,
            Some(clap::parser::ValueSource::CommandLine)
        );
        let cli = Cli::from_arg_matches(&matches).unwrap();
        assert_eq!(cli.global.control_plane.as_deref(), Some("https://x:1"));
        assert_eq!(cli.global.output, capmesh::Output::Json);
    }
}
