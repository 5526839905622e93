//! One binary for everything: `capmesh control-plane <flags>` and `capmesh proxy <flags>` run
//! the control plane and the sidecar in-process, with exactly the flags of
//! `capmesh-control-plane` and `capmesh-proxy`. The same happens when this binary is invoked
//! under one of those names (a symlink), busybox-style.
//!
//! These are dispatched before the `capmesh` argument parser runs, so that the global flags
//! (`--control-plane`, `--output`, …) cannot take the inner binaries' flags of the same name.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// The programs this binary can be besides `capmesh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `capmesh-control-plane`.
    ControlPlane,
    /// `capmesh-proxy`.
    Proxy,
    /// The example agents (`capmesh agent llm|flights|weather|planner|all`).
    Agent,
}

impl Program {
    /// The subcommand name (`control-plane`).
    pub fn subcommand(self) -> &'static str {
        match self {
            Program::ControlPlane => "control-plane",
            Program::Proxy => "proxy",
            Program::Agent => "agent",
        }
    }

    /// The stand-alone binary's name (`capmesh-control-plane`), used in its help and errors.
    pub fn binary(self) -> &'static str {
        match self {
            Program::ControlPlane => "capmesh-control-plane",
            Program::Proxy => "capmesh-proxy",
            Program::Agent => "capmesh-example-agent",
        }
    }

    const ALL: [Program; 3] = [Program::ControlPlane, Program::Proxy, Program::Agent];
}

/// Which program the command line asks for, and its arguments (without the program name):
/// by the name this binary was invoked as, or by the first argument.
pub fn select(args: &[OsString]) -> Option<(Program, Vec<OsString>)> {
    let invoked = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str());
    if let Some(program) = Program::ALL
        .into_iter()
        .find(|p| invoked == Some(p.binary()))
    {
        return Some((program, args.iter().skip(1).cloned().collect()));
    }
    let first = args.get(1).and_then(|a| a.to_str())?;
    let program = Program::ALL.into_iter().find(|p| p.subcommand() == first)?;
    // `capmesh agent revoke|lift|revocations` manage workloads; other `capmesh agent …` runs
    // an example agent (whose `--help` names the management subcommands too).
    if program == Program::Agent
        && args
            .get(2)
            .and_then(|a| a.to_str())
            .is_some_and(|a| ["revoke", "lift", "revocations"].contains(&a))
    {
        return None;
    }
    Some((program, args.iter().skip(2).cloned().collect()))
}

/// Runs `program` with `args` (its own flags) until SIGTERM or Ctrl-C (the agent: until it is
/// done or stopped).
pub fn run(program: Program, args: Vec<OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from(program.binary())).chain(args);
    match program {
        Program::ControlPlane => capmesh_control_plane::main_with_args(argv),
        Program::Proxy => capmesh_proxy::main_with_args(argv),
        Program::Agent => {
            let cli = match AgentCli::try_parse_from(argv) {
                Ok(c) => c,
                Err(e) => e.exit(),
            };
            capmesh_client::process::init_tracing("text");
            capmesh_client::process::block_on(program.binary(), capmesh_examples::run(cli.args))
        }
    }
}

/// The example agents' flags as a program of their own.
#[derive(Debug, Parser)]
#[command(
    name = "capmesh agent",
    about = "Run an example MCP agent (llm, flights, weather, planner, all)",
    after_help = "Examples:\n  \
        capmesh agent weather --port 8081\n  \
        capmesh agent revoke default/weather   # revoke a workload (also: lift, revocations)"
)]
struct AgentCli {
    #[command(flatten)]
    args: capmesh_examples::AgentArgs,
}
#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn programs_are_chosen_by_subcommand_or_by_invoked_name() {
        let (p, rest) = select(&os(&["capmesh", "proxy", "--agent-name", "a"])).unwrap();
        assert_eq!(p, Program::Proxy);
        assert_eq!(rest, os(&["--agent-name", "a"]));
        let (p, rest) = select(&os(&["/usr/bin/capmesh-control-plane", "--grace", "1s"])).unwrap();
        assert_eq!(p, Program::ControlPlane);
        assert_eq!(rest, os(&["--grace", "1s"]));
        assert!(select(&os(&["capmesh", "list", "proxy"])).is_none());
        assert!(select(&os(&["capmesh", "agent", "revoke", "default/x"])).is_none());
        assert_eq!(
            select(&os(&["capmesh", "agent", "llm"])).unwrap().0,
            Program::Agent
        );
        assert!(select(&os(&["capmesh"])).is_none());
    }
}
