//! `capmesh cert inspect <pem-file>`: what a certificate says, read locally (no control plane
//! needed).

use std::path::PathBuf;
use std::time::SystemTime;

use capmesh_certs::CertInfo;
use capmesh_certs::inspect::{certs_from_pem, inspect_der};
use serde_json::json;

use crate::output::{self, Output};

/// `capmesh cert …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertCommand {
    /// Show a certificate's identity (SPIFFE ID), serial, issuer, validity, key usage and
    /// SHA-256 fingerprint; every certificate of a chain or bundle. Works offline.
    #[command(after_help = "Examples:\n  \
        capmesh cert inspect ./capmesh-data/ca.pem\n  \
        capmesh cert inspect ./weather.pem --output json | jq -r '.[0].identity'")]
    Inspect(InspectArgs),
}

/// Flags of `capmesh cert inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The certificate, chain or bundle (PEM).
    #[arg(value_name = "PEM-FILE")]
    pub file: PathBuf,
}

/// Runs a cert subcommand.
pub fn run(output: Output, command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Inspect(args) => inspect(output, &args),
    }
}

/// Reads every certificate in the file.
pub fn read(file: &std::path::Path) -> anyhow::Result<Vec<CertInfo>> {
    let name = file.display();
    let text = std::fs::read(file)
        .map_err(|e| anyhow::anyhow!("cannot read {name}: {e}: check the path"))?;
    let text = String::from_utf8_lossy(&text);
    let not_pem = |detail: String| {
        anyhow::anyhow!(
            "{name} is not a PEM certificate ({detail}): pass a file with a -----BEGIN CERTIFICATE----- block, such as a sidecar's certificate or the control plane's ca.pem"
        )
    };
    let certs = certs_from_pem(&text).map_err(|e| not_pem(e.to_string()))?;
    certs
        .iter()
        .map(|der| inspect_der(der).map_err(|e| not_pem(e.to_string())))
        .collect()
}

fn unix(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn inspect(output: Output, args: &InspectArgs) -> anyhow::Result<()> {
    let infos = read(&args.file)?;
    if output == Output::Json {
        let list: Vec<_> = infos
            .iter()
            .map(|c| {
                json!({
                    "identity": c.identity.as_ref().map(ToString::to_string),
                    "uris": c.uris,
                    "dns_names": c.dns_names,
                    "serial": c.serial,
                    "issuer": c.issuer,
                    "subject": c.subject,
                    "not_before": output::rfc3339(c.not_before),
                    "not_after": output::rfc3339(c.not_after),
                    "not_before_unix": unix(c.not_before),
                    "not_after_unix": unix(c.not_after),
                    "is_ca": c.is_ca,
                    "key_usage": c.key_usage,
                    "extended_key_usage": c.extended_key_usage,
                    "fingerprint_sha256": c.fingerprint_sha256,
                })
            })
            .collect();
        return output::print_json(&list);
    }
    let mut text = String::new();
    for (i, c) in infos.iter().enumerate() {
        if infos.len() > 1 {
            if i > 0 {
                text.push('\n');
            }
            text.push_str(&format!("Certificate {} of {}\n", i + 1, infos.len()));
        }
        text.push_str(&describe(c));
    }
    output::print(&text)?;
    Ok(())
}

/// The certificate as aligned `Field: value` lines.
pub fn describe(c: &CertInfo) -> String {
    let identity = match (&c.identity, c.uris.as_slice()) {
        (Some(id), _) => id.to_string(),
        (None, []) if c.is_ca => "none (a CA certificate: it issues identities)".to_owned(),
        (None, []) => "none (no SPIFFE ID in the URI SAN)".to_owned(),
        (None, uris) => format!(
            "none (URI SAN {} is not a capmesh SPIFFE ID)",
            uris.join(", ")
        ),
    };
    let or_none = |items: &[&str]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let dns: Vec<&str> = c.dns_names.iter().map(String::as_str).collect();
    let mut lines = vec![
        ("Identity", identity),
        ("Serial", c.serial.clone()),
        ("Issuer", c.issuer.clone()),
        (
            "Subject",
            if c.subject.is_empty() {
                "(empty)".to_owned()
            } else {
                c.subject.clone()
            },
        ),
        ("Not before", output::rfc3339(c.not_before)),
        ("Not after", {
            let left = output::expires(unix(c.not_after));
            let left = if left.starts_with("in ") {
                format!("expires {left}")
            } else {
                left
            };
            format!("{} ({left})", output::rfc3339(c.not_after))
        }),
        ("CA", if c.is_ca { "yes" } else { "no" }.to_owned()),
        ("Key usage", or_none(&c.key_usage)),
        ("Extended key usage", or_none(&c.extended_key_usage)),
    ];
    if !dns.is_empty() {
        lines.push(("DNS names", dns.join(", ")));
    }
    lines.push(("SHA-256", c.fingerprint_sha256.clone()));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}
