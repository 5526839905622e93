//! Flags. Every flag is also an environment variable `CAPMESH_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use capmesh_api::{AgentName, CapabilityOverride, Dependency, Namespace, Tag, TrustDomain};
use capmesh_certs::TlsMode;
use clap::Parser;

/// The capmesh sidecar proxy: put it next to an MCP agent (any language, no SDK) and the agent
/// joins the mesh: its tools become capabilities others can call, and the mesh becomes one MCP
/// server it can call at http://127.0.0.1:15001/mcp.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "capmesh-proxy",
    version,
    after_help = "Examples:\n  \
  capmesh-proxy --agent-name weather --agent-url http://127.0.0.1:9001/mcp \\\n    \
    --control-plane https://127.0.0.1:8000 --control-plane-ca ./capmesh-data/ca.pem \\\n    \
    --bootstrap-token-file ./token --inbound 127.0.0.1:15006\n  \
  capmesh-proxy --agent-name planner --agent-url none --dependency weather \\\n    \
    --dependency 'fast_llm=llm:+claude' --control-plane https://127.0.0.1:8000 \\\n    \
    --control-plane-ca ./capmesh-data/ca.pem --bootstrap-token-file ./token\n\n\
Subcommands:\n  \
  run     the proxy (the default; these flags)\n  \
  init    write the iptables rules of transparent mode (capmesh-proxy init --help)"
)]
pub struct Config {
    /// The control plane's URL; for several replicas, their URLs separated by commas (tried in
    /// that order, moving on at once when one is down) or one name that resolves to all of
    /// them.
    #[arg(
        long,
        env = "CAPMESH_CONTROL_PLANE",
        default_value = "https://127.0.0.1:8000"
    )]
    pub control_plane: String,

    /// The mesh trust bundle (the control plane's `<data-dir>/ca.pem`).
    #[arg(long, env = "CAPMESH_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,

    /// Bootstrap token for the first certificate (`capmesh token create`).
    #[arg(long, env = "CAPMESH_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: Option<String>,

    /// File holding the bootstrap token.
    #[arg(long, env = "CAPMESH_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,

    /// Certificate chain from a file (cert-manager, Vault, SPIRE) instead of the control
    /// plane's CA; reloaded when the file changes. Needs --tls-key.
    #[arg(long, env = "CAPMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key for --tls-cert.
    #[arg(long, env = "CAPMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Trust bundle for file-based certificates (default: --control-plane-ca).
    #[arg(long, env = "CAPMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The agent's name (a DNS label): its identity is spiffe://<trust-domain>/ns/<namespace>/agent/<name>.
    #[arg(long, env = "CAPMESH_AGENT_NAME")]
    pub agent_name: AgentName,

    /// The agent's namespace.
    #[arg(long, env = "CAPMESH_NAMESPACE", default_value = "default")]
    pub namespace: Namespace,

    /// The SPIFFE trust domain of the mesh.
    #[arg(long, env = "CAPMESH_TRUST_DOMAIN", default_value = "capmesh.local")]
    pub trust_domain: TrustDomain,

    /// The agent's MCP endpoint, or `none` for an agent that only consumes (a planner, a CLI).
    #[arg(
        long,
        env = "CAPMESH_AGENT_URL",
        default_value = "http://127.0.0.1:8080/mcp"
    )]
    pub agent_url: String,

    /// The host:port other proxies dial to reach this one (default: the inbound address, with
    /// 127.0.0.1 in place of 0.0.0.0).
    #[arg(long, env = "CAPMESH_ADVERTISE")]
    pub advertise: Option<String>,

    /// Where the local agent calls the mesh (plain HTTP, loopback).
    #[arg(long, env = "CAPMESH_OUTBOUND", default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,

    /// Where the mesh calls the local agent (mutual TLS).
    #[arg(long, env = "CAPMESH_INBOUND", default_value = "0.0.0.0:15006")]
    pub inbound: SocketAddr,

    /// Admin endpoints: /live, /ready, /metrics, /config.
    #[arg(long, env = "CAPMESH_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,

    /// Tags of the agent, comma-separated (added to every tool's tags).
    #[arg(long, env = "CAPMESH_TAGS", value_delimiter = ',')]
    pub tags: Vec<Tag>,

    /// Version of the agent (semver), matched by consumers' version constraints such as
    /// '>=1.2'. (`--version` prints the proxy's own version.)
    #[arg(long, env = "CAPMESH_AGENT_VERSION", value_name = "SEMVER", value_parser = capmesh_api::parse_version)]
    pub agent_version: Option<semver::Version>,

    /// Zone (locality) of this instance.
    #[arg(long, env = "CAPMESH_ZONE")]
    pub zone: Option<String>,

    /// Map a tool to a capability: 'tool=capability@version#tag1,tag2' (repeatable). Default:
    /// capability = tool name.
    #[arg(long = "capability", env = "CAPMESH_CAPABILITY", value_delimiter = ';')]
    pub capabilities: Vec<CapabilityOverride>,

    /// A YAML file listing more mappings in the --capability form, one per item, e.g.
    /// `- get_weather=weather@2.1.0#eu`.
    #[arg(long, env = "CAPMESH_CAPABILITIES_FILE")]
    pub capabilities_file: Option<PathBuf>,

    /// A capability the agent calls: 'alias=capability:+tag,-tag,>=1.2' (repeatable); `*` for all.
    #[arg(long = "dependency", env = "CAPMESH_DEPENDENCY", value_delimiter = ';')]
    pub dependencies: Vec<Dependency>,

    /// Inbound TLS mode: strict (mesh certificates only), permissive (also plaintext, marked
    /// unauthenticated), off (development only).
    #[arg(long, env = "CAPMESH_TLS_MODE", default_value = "strict")]
    pub tls_mode: TlsMode,

    /// Headers carried over every proxy hop: exact names or prefixes like 'x-tenant-*'.
    #[arg(long, env = "CAPMESH_PROPAGATE_HEADERS", value_delimiter = ',', value_parser = parse_propagated)]
    pub propagate_headers: Vec<String>,

    /// This instance's id (default: <agent-name>-<random>).
    #[arg(long, env = "CAPMESH_PROXY_ID")]
    pub proxy_id: Option<String>,

    /// Once the outbound, inbound and admin listeners are bound, write their addresses to this
    /// file as JSON (`{"outbound":"127.0.0.1:41001","inbound":…,"admin":…}`), so a supervisor
    /// that passed port 0 learns the ports the system chose. Written atomically (a rename).
    #[arg(long, env = "CAPMESH_PORTS_FILE", value_name = "FILE")]
    pub ports_file: Option<PathBuf>,

    /// Log format: text or json. The level comes from RUST_LOG (default info).
    #[arg(long, env = "CAPMESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Connections each listener (outbound, inbound; admin at most 64) holds open at once; more
    /// are closed on accept and counted in capmesh_proxy_connections_refused_total.
    #[arg(long, env = "CAPMESH_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Time a client has to send a whole HTTP/1 request head (also the longest an HTTP/1
    /// connection may idle between requests), e.g. 10s.
    #[arg(long, env = "CAPMESH_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub header_read_timeout: std::time::Duration,

    /// The share of new traces whose hops are recorded as spans, from 0 to 1. A request that
    /// carries a sampled W3C trace context is always recorded and an unsampled one never
    /// (parent-based sampling).
    #[arg(long, env = "CAPMESH_TRACE_SAMPLING", default_value = "0.01", value_name = "RATIO", value_parser = parse_ratio)]
    pub trace_sampling: f64,

    /// Export spans over OTLP (HTTP/protobuf) to this collector, e.g. http://127.0.0.1:4318
    /// (`/v1/traces` is appended). Off by default; OTEL_EXPORTER_OTLP_ENDPOINT and
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT turn it on too.
    #[arg(long, env = "CAPMESH_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// A connection with no request in flight for this long is closed gracefully, e.g. 5m.
    #[arg(long, env = "CAPMESH_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub idle_timeout: std::time::Duration,
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    match capmesh_api::duration::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!(
            "{s:?} is zero: give a positive duration such as 10s"
        )),
        Err(e) => Err(format!(
            "{s:?}: {e} (use a duration such as 500ms, 10s or 5m)"
        )),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio from 0 to 1: use 0 (only sampled callers), 0.01 (one new trace in a hundred) or 1 (every call)"
        )),
    }
}

fn parse_propagated(s: &str) -> Result<String, String> {
    capmesh_api::parse_propagated_header(s)
}

impl Config {
    /// What each listener allows its clients.
    pub fn limits(&self) -> crate::serve::Limits {
        crate::serve::Limits {
            max_connections: self.max_connections as usize,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            ..crate::serve::Limits::default()
        }
    }

    /// Every tool → capability mapping: `--capability` flags, then `--capabilities-file`.
    pub fn overrides(&self) -> anyhow::Result<Vec<CapabilityOverride>> {
        let mut all = self.capabilities.clone();
        if let Some(path) = &self.capabilities_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!(
                    "--capabilities-file {}: cannot read it: {e}",
                    path.display()
                )
            })?;
            let items: Vec<String> = serde_yaml_ng::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "--capabilities-file {}: {e} (use a YAML list such as `- get_weather=weather@2.1.0#eu`)",
                    path.display()
                )
            })?;
            for (i, item) in items.iter().enumerate() {
                let o: CapabilityOverride = item.parse().map_err(|e| {
                    anyhow::anyhow!(
                        "--capabilities-file {}: item {}: {e}",
                        path.display(),
                        i + 1
                    )
                })?;
                all.push(o);
            }
        }
        Ok(all)
    }

    /// The agent URL, or `None` for `--agent-url none`.
    pub fn agent(&self) -> Option<&str> {
        (self.agent_url != "none").then_some(self.agent_url.as_str())
    }

    /// What other proxies dial.
    pub fn advertised(&self) -> String {
        match &self.advertise {
            Some(a) => a.clone(),
            None if self.inbound.ip().is_unspecified() => {
                format!("127.0.0.1:{}", self.inbound.port())
            }
            None => self.inbound.to_string(),
        }
    }
}

/// `--version <semver>` (and `CAPMESH_VERSION`) named the agent's version before
/// `--agent-version` existed. When the word after `--version` is a version, it still means that:
/// the arguments are rewritten to `--agent-version` and a deprecation warning is returned.
/// `--version` alone (or before another flag) is left for clap, which prints the proxy's version.
pub fn rewrite_deprecated_version(
    args: &mut Vec<std::ffi::OsString>,
    env_version: Option<String>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let is_version = |s: &str| !s.starts_with('-') && capmesh_api::parse_version(s).is_ok();
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].to_str().unwrap_or_default().to_owned();
        if arg == "--" {
            break;
        }
        if arg == "--version"
            && let Some(value) = args.get(i + 1).and_then(|a| a.to_str()).map(str::to_owned)
            && is_version(&value)
        {
            args[i] = "--agent-version".into();
            warnings.push(format!(
                "--version {value} is deprecated for the agent's version: use --agent-version {value} (--version alone prints the proxy's version)"
            ));
            i += 2;
            continue;
        }
        if let Some(value) = arg.strip_prefix("--version=")
            && is_version(value)
        {
            warnings.push(format!(
                "--version={value} is deprecated for the agent's version: use --agent-version={value}"
            ));
            args[i] = format!("--agent-version={value}").into();
        }
        i += 1;
    }
    let given = args.iter().any(|a| {
        a.to_str()
            .is_some_and(|s| s == "--agent-version" || s.starts_with("--agent-version="))
    });
    if let Some(value) = env_version
        && !given
        && is_version(&value)
    {
        warnings.push(format!(
            "CAPMESH_VERSION={value} is deprecated for the agent's version: set CAPMESH_AGENT_VERSION={value}"
        ));
        args.push(format!("--agent-version={value}").into());
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn capability_files_add_mappings_and_name_bad_items() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("caps.yaml");
        std::fs::write(&file, "- get_weather=weather@2.1.0#eu\n- echo=say\n").unwrap();
        let path = file.display().to_string();
        let c = Config::try_parse_from([
            "capmesh-proxy",
            "--agent-name",
            "a",
            "--capability",
            "x=y",
            "--capabilities-file",
            &path,
        ])
        .unwrap();
        let all = c.overrides().unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].to_string(), "get_weather=weather@2.1.0#eu");
        std::fs::write(&file, "- ok=fine\n- bad=@@\n").unwrap();
        let err = c.overrides().unwrap_err().to_string();
        assert!(err.contains("item 2") && err.contains("caps.yaml"), "{err}");
        std::fs::write(&file, "just: a map\n").unwrap();
        assert!(c.overrides().unwrap_err().to_string().contains("YAML list"));
    }

    #[test]
    fn version_prints_the_proxy_and_the_old_agent_version_flag_still_works() {
        let err = Config::try_parse_from(["capmesh-proxy", "--version"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert!(err.to_string().contains(env!("CARGO_PKG_VERSION")), "{err}");
        let err = Config::try_parse_from(["capmesh-proxy", "-V"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);

        let mut args: Vec<std::ffi::OsString> =
            ["capmesh-proxy", "--agent-name", "a", "--version", "1.4.0"]
                .iter()
                .map(Into::into)
                .collect();
        let warnings = rewrite_deprecated_version(&mut args, None);
        assert!(
            warnings[0].contains("--agent-version 1.4.0"),
            "{warnings:?}"
        );
        let c = Config::try_parse_from(&args).unwrap();
        assert_eq!(c.agent_version.unwrap().to_string(), "1.4.0");

        // Alone, or before another flag, `--version` is the proxy's own.
        for tail in [&["--version"][..], &["--version", "--agent-name", "a"][..]] {
            let mut args: Vec<std::ffi::OsString> = std::iter::once("capmesh-proxy")
                .chain(tail.iter().copied())
                .map(Into::into)
                .collect();
            assert!(rewrite_deprecated_version(&mut args, None).is_empty());
            assert!(args.iter().all(|a| a != "--agent-version"));
        }
        let mut args: Vec<std::ffi::OsString> = ["capmesh-proxy", "--agent-name", "a"]
            .iter()
            .map(Into::into)
            .collect();
        let warnings = rewrite_deprecated_version(&mut args, Some("2.0.0".into()));
        assert!(
            warnings[0].contains("CAPMESH_AGENT_VERSION"),
            "{warnings:?}"
        );
        let c = Config::try_parse_from(&args).unwrap();
        assert_eq!(c.agent_version.unwrap().to_string(), "2.0.0");
    }

    #[test]
    fn flags_are_well_formed() {
        Config::command().debug_assert();
    }

    #[test]
    fn bad_flags_name_the_flag_and_the_fix() {
        let err = Config::try_parse_from(["capmesh-proxy", "--agent-name", "Bad Name"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--agent-name") && err.contains("lowercase letters"),
            "{err}"
        );
        let err = Config::try_parse_from([
            "capmesh-proxy",
            "--agent-name",
            "a",
            "--propagate-headers",
            "*",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--propagate-headers") && err.contains("list the names"),
            "{err}"
        );
        let err =
            Config::try_parse_from(["capmesh-proxy", "--agent-name", "a", "--tls-mode", "loose"])
                .unwrap_err()
                .to_string();
        assert!(err.contains("strict, permissive or off"), "{err}");
        let ok = Config::try_parse_from([
            "capmesh-proxy",
            "--agent-name",
            "a",
            "--agent-version",
            "1.2.3",
            "--dependency",
            "fast_llm=llm:+claude",
            "--capability",
            "get_weather=weather@2.0.0#fast",
        ])
        .unwrap();
        assert_eq!(ok.agent_version.unwrap().to_string(), "1.2.3");
        assert_eq!(ok.dependencies.len(), 1);
    }
}
