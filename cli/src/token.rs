//! `capmesh token create|list|revoke`: bootstrap tokens, with which a sidecar gets its first
//! certificate.

use std::time::Duration;

use capmesh_api::{Namespace, TokenCreated, TokenInfo, TokenRequest};
use serde_json::Value;

use crate::api::Api;
use crate::entity::path_segment;
use crate::output::{self, Output, Table};

/// The longest token lifetime the control plane accepts.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// `capmesh token …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a bootstrap token. The secret is printed once, alone on stdout; details and how
    /// to pass it to a sidecar go to stderr.
    #[command(after_help = "Examples:\n  \
        capmesh token create --agent weather > weather.token\n  \
        capmesh token create --namespace prod --agent 'weather-*' --ttl 1h --description 'weather pods'\n  \
        capmesh token create --agent weather --uses 3     # three replicas, one token\n  \
        capmesh-proxy --agent-name weather --bootstrap-token-file weather.token ...")]
    Create(CreateArgs),
    /// List bootstrap tokens (never their secrets). The one-shot tokens `capmesh call` made
    /// for itself and used are left out unless --all is given.
    #[command(after_help = "Examples:\n  \
        capmesh token list\n  \
        capmesh token list --all\n  \
        capmesh token list --output json | jq -r '.[] | select(.revoked | not) | .id'")]
    List(ListArgs),
    /// Revoke a bootstrap token: no new certificate can be got with it (certificates already
    /// issued stay valid until they expire).
    #[command(after_help = "Examples:\n  \
        capmesh token revoke 3f9a1c0b2d4e")]
    Revoke(RevokeArgs),
}

/// Flags of `capmesh token create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// The namespace the token may get certificates in.
    #[arg(long, value_name = "NAMESPACE", default_value = "default")]
    pub namespace: Namespace,
    /// Which agent names it may get certificates for: a name, or a glob such as 'weather-*'
    /// or '*'.
    #[arg(long = "agent", value_name = "PATTERN", value_parser = parse_pattern)]
    pub agent_pattern: String,
    /// How long the token is valid.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// How many certificates it may get. Default: 1 when --agent names one exact agent
    /// (a token stolen after use is worthless), unlimited for a pattern with '*'.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: Option<u32>,
    /// Allow a token for the capmesh-system namespace (the control plane's, the admin's and
    /// the CLI's identities). Without it such a token is refused.
    #[arg(long)]
    pub system: bool,
    /// A note for people (`capmesh token list` shows it).
    #[arg(long)]
    pub description: Option<String>,
}

/// Flags of `capmesh token list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Also list the used one-shot tokens of `capmesh call`.
    #[arg(long)]
    pub all: bool,
}

/// Whether `t` is a token `capmesh call` made for its own short-lived identity and has used
/// (revoked) or let expire: bookkeeping nobody needs to see.
pub fn is_used_cli_token(t: &TokenInfo, now_unix: i64) -> bool {
    t.namespace.as_str() == crate::call::CLI_NAMESPACE
        && t.agent_pattern == crate::call::CLI_AGENT
        && (t.revoked || t.expires_unix <= now_unix)
}

/// Flags of `capmesh token revoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// The token's id (`capmesh token list` shows it; the secret starts `cmt_<id>_`).
    pub id: String,
}

fn parse_pattern(input: &str) -> Result<String, String> {
    if !input.is_empty()
        && input
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
    {
        Ok(input.to_owned())
    } else {
        Err(format!(
            "{input:?} is not an agent name pattern: use lowercase letters, digits, '-' and '*' wildcards, such as weather or 'weather-*'"
        ))
    }
}

fn parse_ttl(input: &str) -> Result<Duration, String> {
    let ttl = capmesh_api::duration::parse_duration(input)?;
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(format!(
            "{input:?} is out of range: use 1s to 365 days, such as 1h or 24h"
        ));
    }
    Ok(ttl)
}

/// Runs a token subcommand.
pub async fn run(api: &Api, output: Output, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create(args) => create(api, output, args).await,
        TokenCommand::List(args) => list(api, output, args).await,
        TokenCommand::Revoke(args) => revoke(api, output, args).await,
    }
}

async fn create(api: &Api, output: Output, args: CreateArgs) -> anyhow::Result<()> {
    let request = TokenRequest {
        namespace: args.namespace,
        agent_pattern: args.agent_pattern,
        ttl_secs: args.ttl.as_secs().max(1),
        uses: args.uses,
        system: args.system,
        description: args.description,
    };
    let raw: Value = api.post("/v1/tokens", &request).await?;
    if output == Output::Json {
        return output::print_json(&raw);
    }
    let created: TokenCreated = serde_json::from_value(raw)?;
    let info = &created.info;
    output::print(&format!("{}\n", created.token))?;
    let example_agent = if info.agent_pattern.contains('*') {
        "<agent-name>"
    } else {
        info.agent_pattern.as_str()
    };
    let uses = match info.uses {
        Some(1) => "one certificate".to_owned(),
        Some(n) => format!("{n} certificates"),
        None => "any number of certificates".to_owned(),
    };
    eprintln!(
        "Created bootstrap token {} for agents {:?} in namespace {}, good for {uses}, valid until {} ({}).\n\
         The secret above is shown only this once. Give it to the agent's sidecar, in a file:\n  \
         capmesh-proxy --agent-name {example_agent} --namespace {} --bootstrap-token-file ./token ...\n\
         or in the environment: CAPMESH_BOOTSTRAP_TOKEN=<secret>",
        info.id,
        info.agent_pattern,
        info.namespace,
        output::rfc3339_unix(info.expires_unix),
        output::expires(info.expires_unix),
        info.namespace,
    );
    Ok(())
}

async fn list(api: &Api, output: Output, args: ListArgs) -> anyhow::Result<()> {
    let mut tokens: Vec<TokenInfo> = api.get("/v1/tokens").await?;
    let now = output::now_unix();
    let before = tokens.len();
    if !args.all {
        tokens.retain(|t| !is_used_cli_token(t, now));
    }
    let hidden = before - tokens.len();
    let note = || {
        if hidden > 0 {
            eprintln!(
                "({hidden} used one-shot token(s) of `capmesh call` not shown; --all lists them)"
            );
        }
    };
    if output == Output::Json {
        output::print_json(&tokens)?;
        note();
        return Ok(());
    }
    tokens.sort_by_key(|t| std::cmp::Reverse(t.expires_unix));
    let mut table = Table::new(&[
        "ID",
        "NAMESPACE",
        "AGENTS",
        "USES",
        "STATUS",
        "EXPIRES",
        "DESCRIPTION",
    ]);
    for t in &tokens {
        let used_up = t.uses.is_some_and(|u| t.used >= u);
        let status = if t.revoked {
            "revoked"
        } else if t.expires_unix <= now {
            "expired"
        } else if used_up {
            "used up"
        } else {
            "active"
        };
        let uses = match t.uses {
            Some(u) => format!("{}/{u}", t.used),
            None => format!("{}/unlimited", t.used),
        };
        table.row(vec![
            t.id.clone(),
            t.namespace.to_string(),
            t.agent_pattern.clone(),
            uses,
            status.to_owned(),
            output::expires(t.expires_unix),
            t.description.clone().unwrap_or_default(),
        ]);
    }
    output::print(&table.render())?;
    if table.is_empty() {
        eprintln!("(no bootstrap tokens: `capmesh token create --agent <name>` makes one)");
    }
    note();
    Ok(())
}

async fn revoke(api: &Api, output: Output, args: RevokeArgs) -> anyhow::Result<()> {
    // Accept the whole secret too: its id is the part after `cmt_`.
    let id = args
        .id
        .strip_prefix("cmt_")
        .and_then(|rest| rest.split('_').next())
        .unwrap_or(&args.id);
    let path = format!("/v1/tokens/{}", path_segment(id)?);
    let revoked: Value = api.delete(&path).await.map_err(|e| {
        if e.status() == Some(404) {
            anyhow::anyhow!("no bootstrap token with id {id:?}: `capmesh token list` shows the ids")
        } else {
            e.into()
        }
    })?;
    if output == Output::Json {
        return output::print_json(&revoked);
    }
    output::print(&format!(
        "revoked bootstrap token {id}: it cannot get new certificates (those already issued stay valid until they expire)\n"
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_ttls_are_checked_locally() {
        assert!(parse_pattern("weather-*").is_ok());
        assert!(parse_pattern("Weather").unwrap_err().contains("lowercase"));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("400d").is_err());
        assert!(parse_ttl("500ms").unwrap_err().contains("out of range"));
    }
}
