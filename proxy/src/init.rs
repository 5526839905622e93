//! `capmesh-proxy init`: the iptables rules of transparent mode, written once per pod (an init
//! container) or per network namespace before the agent starts.
//!
//! Outbound TCP from the agent is redirected to the proxy's outbound listener and inbound TCP
//! to its inbound listener; the proxy reads the original destination (`SO_ORIGINAL_DST`, see
//! [`crate::transparent`]). Traffic of the proxy's own UID is never redirected, so the proxy
//! can reach peers, the control plane and outside services without looping back to itself.

use std::net::IpAddr;
use std::process::Command;

use clap::Parser;

/// Chain for connections arriving at the pod (nat PREROUTING).
pub const INBOUND_CHAIN: &str = "CAPMESH_INBOUND";
/// Chain for connections the pod opens (nat OUTPUT).
pub const OUTBOUND_CHAIN: &str = "CAPMESH_OUTPUT";

/// Writes the iptables rules that send an agent's traffic through its sidecar (transparent
/// mode). Run it as root (or with NET_ADMIN and NET_RAW) in the agent's network namespace
/// before the agent starts, e.g. as the pod's init container; run the proxy as --proxy-uid.
/// Running it again replaces capmesh's rules (idempotent).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "capmesh-proxy init",
    bin_name = "capmesh-proxy init",
    after_help = "Examples:\n  \
  capmesh-proxy init                       # defaults: proxy UID 1337, 15001/15006\n  \
  capmesh-proxy init --skip-outbound-cidrs 169.254.169.254/32 --skip-outbound-ports 5432\n  \
  capmesh-proxy init --dry-run             # print the iptables commands, change nothing"
)]
pub struct InitConfig {
    /// The UID the proxy runs as: its own connections are never redirected.
    #[arg(long, env = "CAPMESH_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,

    /// The proxy's outbound listener port (the agent's outgoing TCP is redirected here).
    #[arg(long, env = "CAPMESH_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,

    /// The proxy's inbound listener port (incoming TCP is redirected here).
    #[arg(long, env = "CAPMESH_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,

    /// Incoming ports left alone (comma-separated), e.g. the admin port for probes.
    #[arg(
        long,
        env = "CAPMESH_SKIP_INBOUND_PORTS",
        value_delimiter = ',',
        default_value = "15020"
    )]
    pub skip_inbound_ports: Vec<u16>,

    /// Destination ports the agent reaches directly, not through the proxy (comma-separated).
    #[arg(long, env = "CAPMESH_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,

    /// Destination networks the agent reaches directly (comma-separated CIDRs, e.g.
    /// 169.254.169.254/32 for a cloud metadata service).
    #[arg(long, env = "CAPMESH_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_outbound_cidrs: Vec<String>,

    /// Print the iptables commands instead of running them.
    #[arg(long, env = "CAPMESH_DRY_RUN")]
    pub dry_run: bool,

    /// The iptables program (iptables, iptables-legacy, iptables-nft).
    #[arg(long, env = "CAPMESH_IPTABLES", default_value = "iptables")]
    pub iptables: String,
}

/// Checks an IPv4 CIDR (`a.b.c.d/n`, or a bare address for /32) and returns it normalized.
fn parse_cidr(s: &str) -> Result<String, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR: write it as a.b.c.d/n, e.g. 10.0.0.0/8"))?;
    if !ip.is_ipv4() {
        return Err(format!(
            "{s:?}: only IPv4 networks are supported (the rules are written with iptables)"
        ));
    }
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0..=32"))?,
        None => 32,
    };
    Ok(format!("{ip}/{len}"))
}

/// One iptables invocation, as its arguments (after the program name).
pub type Rule = Vec<String>;

fn rule(parts: &[&str]) -> Rule {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The rules that fill capmesh's two chains, in order (the chains are created or flushed and
/// hooked into PREROUTING/OUTPUT separately, see [`apply`]).
pub fn chain_rules(c: &InitConfig) -> Vec<Rule> {
    let inbound = c.inbound_port.to_string();
    let outbound = c.outbound_port.to_string();
    let uid = c.proxy_uid.to_string();
    let mut rules = Vec::new();
    // Inbound: the mTLS port itself is where peers dial; the skipped ports (probes) stay as
    // they are; every other TCP connection goes to the inbound listener.
    let mut keep_in = vec![c.inbound_port];
    keep_in.extend(c.skip_inbound_ports.iter().copied());
    keep_in.dedup();
    for port in keep_in {
        rules.push(rule(&[
            "-A",
            INBOUND_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    rules.push(rule(&[
        "-A",
        INBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound,
    ]));
    // Outbound: the proxy's own traffic, loopback (the agent and its sidecar), and the skipped
    // ports and networks go out as they are; the rest goes to the outbound listener.
    rules.push(rule(&[
        "-A",
        OUTBOUND_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]));
    rules.push(rule(&[
        "-A",
        OUTBOUND_CHAIN,
        "-d",
        "127.0.0.0/8",
        "-j",
        "RETURN",
    ]));
    for port in &c.skip_outbound_ports {
        rules.push(rule(&[
            "-A",
            OUTBOUND_CHAIN,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    for cidr in &c.skip_outbound_cidrs {
        rules.push(rule(&["-A", OUTBOUND_CHAIN, "-d", cidr, "-j", "RETURN"]));
    }
    rules.push(rule(&[
        "-A",
        OUTBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound,
    ]));
    rules
}

/// The built-in chain each of capmesh's chains hangs from.
const HOOKS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)];

/// Errors of `capmesh-proxy init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The iptables program could not be started.
    #[error(
        "cannot run {program:?}: {source} (install iptables, or name the program with --iptables)"
    )]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// An iptables command failed.
    #[error(
        "`{command}` failed: {stderr} (init needs root or the NET_ADMIN and NET_RAW capabilities)"
    )]
    Failed {
        /// The command line.
        command: String,
        /// What iptables printed.
        stderr: String,
    },
}

fn run_iptables(program: &str, args: &[String]) -> Result<bool, InitError> {
    let out = Command::new(program)
        .args(["-w", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|source| InitError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    // These messages answer a question with no: no such rule, or the chain already exists.
    if stderr.contains("does not exist")
        || stderr.contains("already exists")
        || stderr.contains("No chain/target/match by that name")
        || stderr.contains("Bad rule")
    {
        return Ok(false);
    }
    Err(InitError::Failed {
        command: format!("{program} -w -t nat {}", args.join(" ")),
        stderr,
    })
}

/// Every command [`apply`] would run, as shell lines (for `--dry-run` and the docs).
pub fn script(c: &InitConfig) -> Vec<String> {
    let p = &c.iptables;
    let mut lines = Vec::new();
    for (_, chain) in HOOKS {
        lines.push(format!(
            "{p} -w -t nat -N {chain} 2>/dev/null || {p} -w -t nat -F {chain}"
        ));
    }
    for r in chain_rules(c) {
        lines.push(format!("{p} -w -t nat {}", r.join(" ")));
    }
    for (hook, chain) in HOOKS {
        lines.push(format!(
            "{p} -w -t nat -C {hook} -p tcp -j {chain} 2>/dev/null || {p} -w -t nat -A {hook} -p tcp -j {chain}"
        ));
    }
    lines
}

/// Creates (or empties) capmesh's chains, fills them and hooks them in once.
pub fn apply(c: &InitConfig) -> Result<(), InitError> {
    let p = c.iptables.as_str();
    for (_, chain) in HOOKS {
        // "Chain already exists" is the answer no: empty it instead.
        if !run_iptables(p, &rule(&["-N", chain]))? {
            run_iptables(p, &rule(&["-F", chain]))?;
        }
    }
    for r in chain_rules(c) {
        if !run_iptables(p, &r)? {
            return Err(InitError::Failed {
                command: format!("{p} -w -t nat {}", r.join(" ")),
                stderr: "rejected".into(),
            });
        }
    }
    for (hook, chain) in HOOKS {
        let jump = rule(&[hook, "-p", "tcp", "-j", chain]);
        let mut check = rule(&["-C"]);
        check.extend(jump.iter().cloned());
        if !run_iptables(p, &check)? {
            let mut add = rule(&["-A"]);
            add.extend(jump);
            run_iptables(p, &add)?;
        }
    }
    Ok(())
}

/// `capmesh-proxy init …`: `args` starts with the program name.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    let config = match InitConfig::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if config.dry_run {
        for line in script(&config) {
            println!("{line}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    match apply(&config) {
        Ok(()) => {
            eprintln!(
                "capmesh-proxy init: outbound TCP → :{}, inbound TCP → :{}, UID {} excluded",
                config.outbound_port, config.inbound_port, config.proxy_uid
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("capmesh-proxy init: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<InitConfig, clap::Error> {
        InitConfig::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_exclude_the_proxy_uid_loopback_and_the_admin_port() {
        let c = parse(&[]).unwrap();
        let lines = script(&c).join("\n");
        assert!(lines.contains("-A CAPMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(lines.contains("-A CAPMESH_OUTPUT -d 127.0.0.0/8 -j RETURN"));
        assert!(lines.contains("-A CAPMESH_INBOUND -p tcp --dport 15020 -j RETURN"));
        assert!(lines.contains("-A CAPMESH_INBOUND -p tcp --dport 15006 -j RETURN"));
        assert!(lines.ends_with("-A OUTPUT -p tcp -j CAPMESH_OUTPUT"));
        // The redirects come last in each chain, after every exception.
        let rules = chain_rules(&c);
        let last_in = rules.iter().rposition(|r| r[1] == INBOUND_CHAIN).unwrap();
        assert_eq!(rules[last_in].last().unwrap(), "15006");
        assert_eq!(rules.last().unwrap().last().unwrap(), "15001");
    }

    #[test]
    fn skips_are_written_before_the_redirect() {
        let c = parse(&[
            "--proxy-uid",
            "2000",
            "--skip-outbound-ports",
            "5432,6379",
            "--skip-outbound-cidrs",
            "169.254.169.254,10.0.0.0/8",
            "--outbound-port",
            "16001",
        ])
        .unwrap();
        let lines = script(&c);
        let pos = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
        assert!(pos("--uid-owner 2000") < pos("--to-ports 16001"));
        assert!(pos("--dport 6379 -j RETURN") < pos("--to-ports 16001"));
        assert!(pos("-d 169.254.169.254/32 -j RETURN") < pos("--to-ports 16001"));
        assert!(pos("-d 10.0.0.0/8 -j RETURN") < pos("--to-ports 16001"));
    }

    #[test]
    fn bad_values_name_the_flag_and_the_fix() {
        let e = parse(&["--skip-outbound-cidrs", "10.0.0.0/40"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--skip-outbound-cidrs"), "{e}");
        assert!(e.contains("0..=32"), "{e}");
        let e = parse(&["--skip-outbound-cidrs", "fd00::/8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("only IPv4"), "{e}");
        let e = parse(&["--proxy-uid", "root"]).unwrap_err().to_string();
        assert!(e.contains("--proxy-uid"), "{e}");
    }
}
