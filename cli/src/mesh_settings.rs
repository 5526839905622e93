//! `capmesh settings get|set`: the mesh-wide settings every proxy applies (propagated headers,
//! the default request timeout, the retry budget, …), through `GET|PUT /v1/settings`.
//!
//! (The CLI's *own* settings — where the control plane is — are in [`crate::settings`].)

use std::time::Duration;

use capmesh_api::MeshSettings;
use serde_json::Value;

use crate::api::Api;
use crate::output::{self, Output, Table};

/// `capmesh settings …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MeshSettingsCommand {
    /// Print the mesh settings in force.
    #[command(after_help = "Examples:\n  \
        capmesh settings get\n  \
        capmesh settings get --output json | jq .request_timeout_ms")]
    Get,
    /// Change mesh settings; the ones not named keep their value. Checked by the control
    /// plane (a bad value changes nothing) and pushed to every proxy with its next snapshot.
    #[command(after_help = "Examples:\n  \
        capmesh settings set --propagate-headers 'x-tenant-id,x-request-*'\n  \
        capmesh settings set --request-timeout 30s --retry-budget 10\n  \
        capmesh settings set --reset")]
    Set(SetArgs),
}

/// Flags of `capmesh settings set`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SetArgs {
    /// Headers carried over every proxy hop: names or prefixes like 'x-tenant-*',
    /// comma-separated (replaces the list; '' empties it). Added to each proxy's own
    /// --propagate-headers.
    #[arg(long, value_name = "HEADERS")]
    pub propagate_headers: Option<String>,
    /// How long a call may take when the caller sets no `x-capmesh-timeout`.
    #[arg(long, value_name = "DURATION", value_parser = capmesh_api::duration::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// How long connecting to a provider's proxy may take.
    #[arg(long, value_name = "DURATION", value_parser = capmesh_api::duration::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Retries allowed, as a percentage of requests (0-100).
    #[arg(long, value_name = "PERCENT")]
    pub retry_budget: Option<u32>,
    /// Retries always allowed per second, on top of the budget.
    #[arg(long, value_name = "N")]
    pub retry_min_per_sec: Option<u32>,
    /// Consecutive failures that eject an endpoint.
    #[arg(long, value_name = "N")]
    pub breaker_failures: Option<u32>,
    /// Start from the defaults instead of the settings in force.
    #[arg(long)]
    pub reset: bool,
}

/// Runs a settings subcommand.
pub async fn run(api: &Api, output: Output, command: MeshSettingsCommand) -> anyhow::Result<()> {
    match command {
        MeshSettingsCommand::Get => {
            let raw: Value = api.get("/v1/settings").await?;
            if output == Output::Json {
                return output::print_json(&raw);
            }
            let settings: MeshSettings = serde_json::from_value(raw)?;
            output::print(&table(&settings))
                .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))
        }
        MeshSettingsCommand::Set(args) => {
            let current: MeshSettings = if args.reset {
                MeshSettings::default()
            } else {
                api.get("/v1/settings").await?
            };
            let next = apply(current, &args)?;
            let stored: Value = api.put("/v1/settings", &next).await?;
            if output == Output::Json {
                return output::print_json(&stored);
            }
            let settings: MeshSettings = serde_json::from_value(stored)?;
            output::print(&table(&settings))
                .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?;
            eprintln!("settings replaced; every proxy applies them with its next snapshot");
            Ok(())
        }
    }
}

/// The settings with the flags applied, checked here first so errors name the flag.
pub fn apply(mut settings: MeshSettings, args: &SetArgs) -> anyhow::Result<MeshSettings> {
    settings.session_key.clear();
    if let Some(list) = &args.propagate_headers {
        settings.propagate_headers = list
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                capmesh_api::parse_propagated_header(h)
                    .map_err(|e| anyhow::anyhow!("--propagate-headers: {e}"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    let millis = |flag: &str, d: Duration| -> anyhow::Result<u64> {
        let ms = d.as_millis();
        if ms == 0 {
            anyhow::bail!("{flag}: use at least 1ms, such as 30s");
        }
        Ok(u64::try_from(ms).unwrap_or(u64::MAX))
    };
    if let Some(d) = args.request_timeout {
        settings.request_timeout_ms = millis("--request-timeout", d)?;
    }
    if let Some(d) = args.connect_timeout {
        settings.connect_timeout_ms = millis("--connect-timeout", d)?;
    }
    if let Some(p) = args.retry_budget {
        settings.retry_budget_percent = p;
    }
    if let Some(n) = args.retry_min_per_sec {
        settings.retry_min_per_sec = n;
    }
    if let Some(n) = args.breaker_failures {
        settings.breaker_failures = n;
    }
    settings
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}: nothing was changed"))?;
    Ok(settings)
}

fn table(s: &MeshSettings) -> String {
    let mut t = Table::new(&["SETTING", "VALUE"]);
    let headers = if s.propagate_headers.is_empty() {
        "(none)".to_owned()
    } else {
        s.propagate_headers.join(",")
    };
    t.row(vec!["propagate_headers".into(), headers]);
    t.row(vec![
        "request_timeout".into(),
        format!("{} ms", s.request_timeout_ms),
    ]);
    t.row(vec![
        "connect_timeout".into(),
        format!("{} ms", s.connect_timeout_ms),
    ]);
    t.row(vec![
        "retry_budget".into(),
        format!(
            "{} % of requests + {}/s",
            s.retry_budget_percent, s.retry_min_per_sec
        ),
    ]);
    t.row(vec![
        "breaker_failures".into(),
        s.breaker_failures.to_string(),
    ]);
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_change_only_what_they_name_and_bad_values_name_the_flag() {
        let args = SetArgs {
            request_timeout: Some(Duration::from_secs(30)),
            propagate_headers: Some("X-Tenant-Id, x-request-*".into()),
            ..SetArgs::default()
        };
        let s = apply(MeshSettings::default(), &args).unwrap();
        assert_eq!(s.request_timeout_ms, 30_000);
        assert_eq!(s.propagate_headers, ["x-tenant-id", "x-request-*"]);
        assert_eq!(s.retry_budget_percent, 20);
        let err = apply(
            MeshSettings::default(),
            &SetArgs {
                propagate_headers: Some("*".into()),
                ..SetArgs::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--propagate-headers"), "{err}");
        let err = apply(
            MeshSettings::default(),
            &SetArgs {
                retry_budget: Some(101),
                ..SetArgs::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("retry_budget_percent = 101"), "{err}");
    }
}
