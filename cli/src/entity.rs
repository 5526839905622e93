//! `capmesh entity register|list|revoke`: other SPIFFE trust domains the mesh trusts, each with
//! the CA that speaks for it (registration trust, SPIFFE federation).

use std::path::PathBuf;

use anyhow::Context;
use capmesh_api::{Entity, EntityRequest, TrustDomain};
use serde_json::Value;

use crate::api::Api;
use crate::output::{self, Output, Table};

/// `capmesh entity …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EntityCommand {
    /// Trust another trust domain: certificates its CA issues for identities in that domain
    /// (and only those) are accepted; what they may call and provide is policy.
    #[command(after_help = "Examples:\n  \
        capmesh entity register partner-a --trust-domain partner.example --ca ./partner-a-ca.pem\n  \
        capmesh entity register partner-a --trust-domain partner.example --ca ./partner-a-ca.pem --output json")]
    Register(RegisterArgs),
    /// List registered entities, revoked ones too.
    #[command(after_help = "Examples:\n  \
        capmesh entity list\n  \
        capmesh entity list --output json | jq -r '.[].name'")]
    List,
    /// Revoke an entity: its certificates are refused at once by the control plane and within
    /// a second by every proxy.
    #[command(after_help = "Examples:\n  \
        capmesh entity revoke partner-a")]
    Revoke(RevokeArgs),
}

/// Flags of `capmesh entity register`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegisterArgs {
    /// The entity's name: a DNS label (lowercase letters, digits and '-').
    pub name: String,
    /// The entity's SPIFFE trust domain (`partner.example`): its CA may issue identities
    /// `spiffe://<trust-domain>/ns/<namespace>/agent/<name>` and no others.
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: TrustDomain,
    /// The entity's CA certificate (PEM).
    #[arg(long, value_name = "PEM-FILE")]
    pub ca: PathBuf,
}

/// Flags of `capmesh entity revoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// The entity's name.
    pub name: String,
}

/// Runs an entity subcommand.
pub async fn run(api: &Api, output: Output, command: EntityCommand) -> anyhow::Result<()> {
    match command {
        EntityCommand::Register(args) => register(api, output, args).await,
        EntityCommand::List => list(api, output).await,
        EntityCommand::Revoke(args) => revoke(api, output, args).await,
    }
}

/// Reads and checks the registration locally, so a typo costs no round trip.
pub fn registration(args: &RegisterArgs) -> anyhow::Result<EntityRequest> {
    let request = EntityRequest {
        name: args.name.clone(),
        trust_domain: args.trust_domain.clone(),
        ca_pem: String::new(),
    };
    request
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}: such as partner-a"))?;
    let path = args.ca.display();
    let ca_pem = std::fs::read_to_string(&args.ca).with_context(|| {
        format!("--ca {path}: cannot read it: pass the entity's CA certificate as a PEM file")
    })?;
    let info = capmesh_certs::inspect_pem(&ca_pem).map_err(|e| {
        anyhow::anyhow!(
            "--ca {path}: not a PEM certificate ({e}): pass the entity's CA certificate, a file with a -----BEGIN CERTIFICATE----- block"
        )
    })?;
    if !info.is_ca {
        anyhow::bail!(
            "--ca {path}: the certificate {:?} is not a CA certificate (basicConstraints CA:TRUE): pass the CA that issues the entity's certificates, not one of them",
            if info.subject.is_empty() {
                info.identity.map(|i| i.to_string()).unwrap_or_default()
            } else {
                info.subject
            }
        );
    }
    Ok(EntityRequest {
        name: args.name.clone(),
        trust_domain: args.trust_domain.clone(),
        ca_pem,
    })
}

async fn register(api: &Api, output: Output, args: RegisterArgs) -> anyhow::Result<()> {
    let request = registration(&args)?;
    let created: Value = api.post("/v1/entities", &request).await.map_err(|e| {
        if e.status() == Some(409) {
            anyhow::anyhow!(
                "entity {:?} is already registered: pick another name, or revoke it first (`capmesh entity revoke {}`)",
                args.name,
                args.name
            )
        } else {
            e.into()
        }
    })?;
    if output == Output::Json {
        return output::print_json(&created);
    }
    let entity: Entity = serde_json::from_value(created)?;
    output::print(&format!(
        "registered entity {} for trust domain {} (CA SHA-256 {}): its certificates for spiffe://{}/… are now trusted across the mesh, as far as the policy allows\n",
        entity.name, args.trust_domain, entity.fingerprint_sha256, args.trust_domain
    ))?;
    Ok(())
}

async fn list(api: &Api, output: Output) -> anyhow::Result<()> {
    let raw: Value = api.get("/v1/entities").await?;
    if output == Output::Json {
        return output::print_json(&raw);
    }
    let mut entities: Vec<Entity> = serde_json::from_value(raw)?;
    entities.sort_by(|a, b| a.name.cmp(&b.name));
    let mut table = Table::new(&["NAME", "TRUST DOMAIN", "STATUS", "REGISTERED", "CA SHA-256"]);
    for e in &entities {
        let status = match e.revoked_unix {
            Some(at) => format!("revoked {}", output::ago(at)),
            None => "trusted".to_owned(),
        };
        let domain = e
            .trust_domain
            .as_ref()
            .map_or("(none: register again)".to_owned(), |t| t.to_string());
        table.row(vec![
            e.name.clone(),
            domain,
            status,
            output::ago(e.created_unix),
            e.fingerprint_sha256.clone(),
        ]);
    }
    output::print(&table.render())?;
    if table.is_empty() {
        eprintln!(
            "(no entities are registered: `capmesh entity register <name> --trust-domain <domain> --ca <pem-file>` adds one)"
        );
    }
    Ok(())
}

async fn revoke(api: &Api, output: Output, args: RevokeArgs) -> anyhow::Result<()> {
    let path = format!("/v1/entities/{}", path_segment(&args.name)?);
    let revoked: Value = api.delete(&path).await.map_err(|e| {
        if e.status() == Some(404) {
            anyhow::anyhow!(
                "no entity named {:?} is registered: `capmesh entity list` shows the registered ones",
                args.name
            )
        } else {
            e.into()
        }
    })?;
    if output == Output::Json {
        return output::print_json(&revoked);
    }
    output::print(&format!(
        "revoked entity {}: its certificates are refused by the control plane now and by every proxy within a second\n",
        args.name
    ))?;
    Ok(())
}

/// A name as a URL path segment; names are DNS labels or ids, so anything else is refused
/// rather than encoded.
pub fn path_segment(name: &str) -> anyhow::Result<&str> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(name)
    } else {
        anyhow::bail!(
            "{name:?} is not a valid name: use lowercase letters, digits and '-' (`capmesh entity list` and `capmesh token list` show the names and ids)"
        )
    }
}
