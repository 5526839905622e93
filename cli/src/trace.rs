//! `capmesh trace <trace-id>`: the call tree of one trace, with each hop's timing and the
//! identities on both ends, from the spans the sidecars sent the control plane; `capmesh trace
//! --last N`: the most recent traces.
//!
//! Sidecars send their spans once a second, so a trace asked for right after its call may be
//! incomplete: the command waits (`--wait`) for it to appear and for late hops to arrive.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use capmesh_api::{SpanKind, StoredSpan, Trace, TraceSummary};

use crate::api::Api;
use crate::output::{self, Output, Table};

/// Flags of `capmesh trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// The trace id: 32 hex digits, as `capmesh call --trace` prints it.
    #[arg(required_unless_present = "last", value_parser = parse_trace_id)]
    pub trace_id: Option<String>,

    /// List the N most recent traces instead.
    #[arg(long, value_name = "N", conflicts_with = "trace_id", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub last: Option<u16>,

    /// How long to wait for a trace's spans to reach the control plane.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = capmesh_api::duration::parse_duration)]
    pub wait: Duration,
}

fn parse_trace_id(s: &str) -> Result<String, String> {
    let id = s.trim().to_ascii_lowercase();
    if capmesh_api::trace::is_hex_id(&id, 32) {
        Ok(id)
    } else {
        Err(format!(
            "{s:?} is not a trace id: give the 32 hex digits `capmesh call --trace` printed, or list recent ones with `capmesh trace --last 10`"
        ))
    }
}

/// Runs `capmesh trace`.
pub async fn run(api: &Api, output: Output, args: TraceArgs) -> anyhow::Result<()> {
    if let Some(n) = args.last {
        let traces: Vec<TraceSummary> = api.get(&format!("/v1/traces?last={n}")).await?;
        return match output {
            Output::Json => output::print_json(&traces),
            Output::Table => {
                if traces.is_empty() {
                    output::print(
                        "no traces held yet: sidecars record a share of new calls (--trace-sampling) and every call that carries a sampled traceparent (capmesh call --trace)\n",
                    )?;
                } else {
                    output::print(&summary_table(&traces))?;
                }
                Ok(())
            }
        };
    }
    let id = args.trace_id.unwrap_or_default();
    let trace = fetch(api, &id, args.wait).await?;
    match output {
        Output::Json => output::print_json(&trace),
        Output::Table => {
            output::print(&render(&trace))?;
            Ok(())
        }
    }
}

/// The trace, once it is held and its late hops had a moment to arrive (at most `wait`).
pub async fn fetch(api: &Api, id: &str, wait: Duration) -> anyhow::Result<Trace> {
    let deadline = Instant::now() + wait;
    let path = format!("/v1/traces/{id}");
    let mut held: Option<Trace> = None;
    loop {
        match api.get::<Trace>(&path).await {
            Ok(t) => {
                // Sidecars flush once a second: a trace that stopped growing is complete.
                if held
                    .as_ref()
                    .is_some_and(|h| h.spans.len() == t.spans.len())
                {
                    return Ok(t);
                }
                held = Some(t);
            }
            Err(e) if e.status() == Some(404) => {
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= deadline
            && let Some(t) = held
        {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}

fn ms(nanos: u64) -> String {
    let v = nanos as f64 / 1e6;
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn summary_table(traces: &[TraceSummary]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut table = Table::new(&[
        "TRACE",
        "FIRST HOP",
        "SPANS",
        "ERRORS",
        "DURATION",
        "STARTED",
    ]);
    for t in traces {
        let ago = Duration::from_nanos(now.saturating_sub(t.start_unix_nanos));
        table.row(vec![
            t.trace_id.clone(),
            t.root.clone(),
            t.spans.to_string(),
            t.errors.to_string(),
            ms(t.duration_nanos),
            format!("{}s ago", ago.as_secs()),
        ]);
    }
    table.render()
}

/// The call tree of `trace`: one line per span (indented under the span it continues), its
/// duration and start offset, then its identities, status and attempts.
pub fn render(trace: &Trace) -> String {
    let spans = &trace.spans;
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&StoredSpan>> = HashMap::new();
    let mut roots: Vec<&StoredSpan> = Vec::new();
    for s in spans {
        match s.span.parent_span_id.as_deref() {
            Some(p) if ids.contains(p) => children.entry(p).or_default().push(s),
            _ => roots.push(s),
        }
    }
    let start = spans
        .iter()
        .map(|s| s.span.start_unix_nanos)
        .min()
        .unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.span.end_unix_nanos)
        .max()
        .unwrap_or(start);
    let errors = spans.iter().filter(|s| s.span.error.is_some()).count();
    let mut out = format!(
        "trace {} · {} spans · {}{}\n",
        trace.trace_id,
        spans.len(),
        ms(end.saturating_sub(start)),
        if errors > 0 {
            format!(" · {errors} failed")
        } else {
            String::new()
        }
    );
    let by_start = |v: &mut Vec<&StoredSpan>| v.sort_by_key(|s| s.span.start_unix_nanos);
    by_start(&mut roots);
    for v in children.values_mut() {
        by_start(v);
    }
    fn walk(
        out: &mut String,
        s: &StoredSpan,
        prefix: &str,
        last: bool,
        start: u64,
        children: &HashMap<&str, Vec<&StoredSpan>>,
    ) {
        let branch = if last { "└─ " } else { "├─ " };
        let span = &s.span;
        let side = match span.kind {
            SpanKind::Client => format!("client span at {}", s.agent),
            SpanKind::Server => format!("server span at {}", s.agent),
        };
        out.push_str(&format!(
            "{prefix}{branch}{}  {}  (+{})  {side}\n",
            span.name,
            ms(span.duration_nanos()),
            ms(span.start_unix_nanos.saturating_sub(start)),
        ));
        let cont = format!("{prefix}{}", if last { "   " } else { "│  " });
        let kids = children.get(span.span_id.as_str());
        let detail_prefix = format!(
            "{cont}{}",
            if kids.is_some_and(|k| !k.is_empty()) {
                "│    "
            } else {
                "     "
            }
        );
        for line in details(s) {
            out.push_str(&format!("{detail_prefix}{line}\n"));
        }
        if let Some(kids) = kids {
            for (i, k) in kids.iter().enumerate() {
                walk(out, k, &cont, i + 1 == kids.len(), start, children);
            }
        }
    }
    for (i, r) in roots.iter().enumerate() {
        walk(&mut out, r, "", i + 1 == roots.len(), start, &children);
    }
    out
}

/// The identities, outcome and attempts of one span, as lines.
fn details(s: &StoredSpan) -> Vec<String> {
    let span = &s.span;
    let a = |k: &str| span.text(k);
    let mut lines = Vec::new();
    match span.kind {
        SpanKind::Client => {
            let caller = a("capmesh.caller").unwrap_or_else(|| s.agent.clone());
            match (a("capmesh.provider"), a("capmesh.instance")) {
                (Some(p), Some(i)) => lines.push(format!("{caller} → {p} (instance {i})")),
                (Some(p), None) => lines.push(format!("{caller} → {p}")),
                _ => lines.push(format!("{caller} → no provider reached")),
            }
        }
        SpanKind::Server => {
            let caller = a("capmesh.caller").unwrap_or_else(|| "unknown".into());
            let me = a("capmesh.provider").unwrap_or_else(|| s.agent.clone());
            lines.push(format!("{caller} → {me} (verified caller)"));
        }
    }
    let mut outcome = Vec::new();
    if let Some(cap) = a("capmesh.capability") {
        outcome.push(format!("capability {cap}"));
    }
    if let Some(status) = a("http.response.status_code") {
        outcome.push(format!("HTTP {status}"));
    }
    if let Some(attempts) = span.attributes.get("capmesh.attempts")
        && attempts != &capmesh_api::AttributeValue::Int(1)
    {
        outcome.push(format!("{attempts} attempts"));
    }
    if a("capmesh.failover").as_deref() == Some("true") {
        outcome.push("failed over".into());
    }
    if let Some(why) = &span.error {
        outcome.push(format!("error: {why}"));
    }
    if !outcome.is_empty() {
        lines.push(outcome.join(", "));
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use capmesh_api::{AttributeValue, SpanRecord};

    use super::*;

    fn stored(agent: &str, kind: SpanKind, id: &str, parent: Option<&str>, at: u64) -> StoredSpan {
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert(
            "capmesh.caller".to_owned(),
            AttributeValue::Text("spiffe://capmesh.local/ns/default/agent/planner".into()),
        );
        attributes.insert(
            "capmesh.provider".to_owned(),
            AttributeValue::Text("spiffe://capmesh.local/ns/default/agent/weather-eu".into()),
        );
        attributes.insert(
            "http.response.status_code".to_owned(),
            AttributeValue::Int(200),
        );
        StoredSpan {
            span: SpanRecord {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                span_id: id.into(),
                parent_span_id: parent.map(str::to_owned),
                name: "tools/call get_weather".into(),
                kind,
                start_unix_nanos: at,
                end_unix_nanos: at + 2_000_000,
                attributes,
                error: None,
            },
            agent: agent.into(),
            proxy_id: format!("{agent}-1"),
        }
    }

    #[test]
    fn the_tree_puts_each_server_span_under_its_client_span_with_identities() {
        let trace = Trace {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            spans: vec![
                stored(
                    "planner",
                    SpanKind::Client,
                    "00000000000000a1",
                    Some("ffffffffffffffff"),
                    1_000_000,
                ),
                stored(
                    "weather-eu",
                    SpanKind::Server,
                    "00000000000000b1",
                    Some("00000000000000a1"),
                    1_500_000,
                ),
                stored(
                    "planner",
                    SpanKind::Client,
                    "00000000000000a2",
                    Some("ffffffffffffffff"),
                    5_000_000,
                ),
            ],
        };
        let text = render(&trace);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("trace 4bf92f3577b34da6a3ce929d0e0e4736 · 3 spans · 6.00 ms"),
            "{text}"
        );
        assert!(
            lines[1].starts_with(
                "├─ tools/call get_weather  2.00 ms  (+0.00 ms)  client span at planner"
            ),
            "{text}"
        );
        assert!(
            lines[2].contains("agent/planner → spiffe://capmesh.local/ns/default/agent/weather-eu"),
            "{text}"
        );
        assert!(
            lines[4].starts_with(
                "│  └─ tools/call get_weather  2.00 ms  (+0.50 ms)  server span at weather-eu"
            ),
            "{text}"
        );
        assert!(lines[5].contains("(verified caller)"), "{text}");
        assert!(
            lines[7].starts_with("└─ tools/call get_weather  2.00 ms  (+4.00 ms)"),
            "{text}"
        );
    }

    #[test]
    fn trace_ids_are_checked_before_any_request() {
        assert!(parse_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736").is_ok());
        assert!(parse_trace_id("abc").unwrap_err().contains("32 hex digits"));
    }
}
