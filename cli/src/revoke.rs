//! `capmesh agent revoke|lift|revocations`: workload revocation. A revoked identity (or
//! certificate serial) is refused by the control plane at once and by every proxy within a
//! second; its open connections and streams are closed and it gets no new certificate until
//! the revocation is lifted.

use capmesh_api::{Revocation, RevocationRequest};
use serde_json::Value;

use crate::api::Api;
use crate::entity::path_segment;
use crate::output::{self, Output, Table};

/// `capmesh agent …` (the management subcommands; `capmesh agent llm|weather|…` runs an example
/// agent instead).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentCommand {
    /// Revoke a workload: every certificate of `<namespace>/<agent>` (or one certificate, by
    /// --serial) is refused, its open connections are closed, and it gets no new certificate.
    #[command(after_help = "Examples:\n  \
        capmesh agent revoke default/weather --reason 'key leaked'\n  \
        capmesh agent revoke --serial 5f:3a:09:…   # one certificate (see `capmesh cert inspect`)")]
    Revoke(TargetArgs),
    /// Lift a revocation: the workload is trusted again and may renew.
    #[command(after_help = "Examples:\n  \
        capmesh agent lift default/weather\n  \
        capmesh agent lift --serial 5f3a09…")]
    Lift(TargetArgs),
    /// List the revocations in force.
    #[command(after_help = "Examples:\n  \
        capmesh agent revocations\n  \
        capmesh agent revocations --output json | jq -r '.[].identity'")]
    Revocations,
}

/// What to revoke or lift: an identity, or a serial.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// `<namespace>/<agent>` (in the mesh's trust domain) or a whole SPIFFE ID.
    #[arg(required_unless_present = "serial", conflicts_with = "serial")]
    pub identity: Option<String>,
    /// A certificate serial number instead (hex; `:` separators allowed).
    #[arg(long)]
    pub serial: Option<String>,
    /// Why (kept with the revocation; shown by `capmesh agent revocations`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// Runs an agent management subcommand.
pub async fn run(api: &Api, output: Output, command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Revoke(args) => revoke(api, output, args).await,
        AgentCommand::Lift(args) => lift(api, output, args).await,
        AgentCommand::Revocations => list(api, output).await,
    }
}

fn target(r: &Revocation) -> String {
    match (&r.identity, &r.serial) {
        (Some(id), _) => id.clone(),
        (None, Some(serial)) => format!("serial {serial}"),
        (None, None) => "?".to_owned(),
    }
}

async fn revoke(api: &Api, output: Output, args: TargetArgs) -> anyhow::Result<()> {
    let request = RevocationRequest {
        identity: args.identity,
        serial: args.serial,
        reason: args.reason,
    };
    let raw: Value = api.post("/v1/revocations", &request).await.map_err(|e| {
        if e.status() == Some(409) {
            anyhow::anyhow!("{e}: it is revoked already (`capmesh agent revocations` lists them)")
        } else {
            e.into()
        }
    })?;
    if output == Output::Json {
        return output::print_json(&raw);
    }
    let revocation: Revocation = serde_json::from_value(raw)?;
    output::print(&format!(
        "revoked {}: refused by the control plane now and by every proxy within a second; its connections are closed (`capmesh agent lift` restores it)\n",
        target(&revocation)
    ))?;
    Ok(())
}

async fn lift(api: &Api, output: Output, args: TargetArgs) -> anyhow::Result<()> {
    let revocations: Vec<Revocation> = api.get("/v1/revocations").await?;
    let wanted = |r: &Revocation| match (&args.identity, &args.serial) {
        (Some(id), _) => {
            r.identity.as_deref() == Some(id.as_str())
                || r.identity.as_deref().is_some_and(|full| {
                    full.ends_with(&format!("/ns/{}", id.replacen('/', "/agent/", 1)))
                })
        }
        (None, Some(serial)) => {
            let norm = |s: &str| {
                s.to_ascii_lowercase()
                    .replace(':', "")
                    .trim_start_matches('0')
                    .to_owned()
            };
            r.serial.as_deref().is_some_and(|s| norm(s) == norm(serial))
        }
        (None, None) => false,
    };
    let Some(found) = revocations.iter().find(|r| wanted(r)) else {
        anyhow::bail!(
            "{} is not revoked: `capmesh agent revocations` lists what is",
            args.identity
                .clone()
                .or(args.serial.map(|s| format!("serial {s}")))
                .unwrap_or_default()
        );
    };
    let path = format!("/v1/revocations/{}", path_segment(&found.id)?);
    let lifted: Value = api.delete(&path).await?;
    if output == Output::Json {
        return output::print_json(&lifted);
    }
    output::print(&format!(
        "lifted the revocation of {}: it is trusted again and may renew its certificate\n",
        target(found)
    ))?;
    Ok(())
}

async fn list(api: &Api, output: Output) -> anyhow::Result<()> {
    let raw: Value = api.get("/v1/revocations").await?;
    if output == Output::Json {
        return output::print_json(&raw);
    }
    let revocations: Vec<Revocation> = serde_json::from_value(raw)?;
    let mut table = Table::new(&["ID", "REVOKED", "SINCE", "REASON"]);
    for r in &revocations {
        table.row(vec![
            r.id.clone(),
            target(r),
            output::ago(r.created_unix),
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    output::print(&table.render())?;
    if table.is_empty() {
        eprintln!(
            "(nothing is revoked: `capmesh agent revoke <namespace>/<agent>` revokes a workload)"
        );
    }
    Ok(())
}
