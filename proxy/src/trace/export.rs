//! OTLP export (HTTP/protobuf, with the `opentelemetry-otlp` exporter over hyper), off unless
//! `--otlp-endpoint`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` names
//! a collector.
//!
//! Finished spans wait in a bounded queue ([`QUEUE`]); one task sends them in batches (up to
//! [`BATCH`] spans, or what arrived within [`LINGER`]). A full queue drops new spans, and a
//! batch the collector does not take is dropped too: both are counted in
//! `capmesh_proxy_spans_dropped_total{sink="otlp"}`. Nothing here is ever awaited by a call.

use std::borrow::Cow;
use std::time::{Duration, Instant, UNIX_EPOCH};

use capmesh_api::{AttributeValue, SpanKind, SpanRecord};
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::mpsc;

use super::SpanMetrics;

/// Spans waiting for the exporter.
pub const QUEUE: usize = 2048;
/// The most spans in one export request.
pub const BATCH: usize = 512;
/// How long the first span of a batch waits for others.
pub const LINGER: Duration = Duration::from_millis(200);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where OTLP spans go, once resolved from the flag and the standard variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpTarget {
    /// The full URL spans are posted to (`…/v1/traces`).
    pub url: String,
    /// Which setting named it, for messages.
    pub from: &'static str,
}

/// Resolves the OTLP traces endpoint: `--otlp-endpoint` (a base URL, like
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), then `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as given),
/// then `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended). `Ok(None)`: export is off.
/// Refuses, naming the setting, a URL that is not `http://` and a protocol other than
/// `http/protobuf`.
pub fn resolve(
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpTarget>, String> {
    let set = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let base = |url: &str| format!("{}/v1/traces", url.trim().trim_end_matches('/'));
    let target = if let Some(url) = flag.map(str::to_owned).filter(|s| !s.trim().is_empty()) {
        OtlpTarget {
            url: base(&url),
            from: "--otlp-endpoint",
        }
    } else if let Some(url) = set(env(opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)) {
        OtlpTarget {
            url: url.trim().to_owned(),
            from: opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
        }
    } else if let Some(url) = set(env(opentelemetry_otlp::OTEL_EXPORTER_OTLP_ENDPOINT)) {
        OtlpTarget {
            url: base(&url),
            from: opentelemetry_otlp::OTEL_EXPORTER_OTLP_ENDPOINT,
        }
    } else {
        return Ok(None);
    };
    for var in [
        opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
        opentelemetry_otlp::OTEL_EXPORTER_OTLP_PROTOCOL,
    ] {
        if let Some(p) = set(env(var)) {
            if p.trim() != opentelemetry_otlp::OTEL_EXPORTER_OTLP_PROTOCOL_HTTP_PROTOBUF {
                return Err(format!(
                    "{var}={p}: capmesh exports OTLP over http/protobuf only; unset it or set it to http/protobuf (a collector's port 4318)"
                ));
            }
            break;
        }
    }
    match target.url.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Ok(Some(target)),
        Ok(uri) if uri.scheme_str() == Some("https") => Err(format!(
            "{} {}: capmesh exports OTLP over plain http only; point it at a collector on the node or in the pod (http://127.0.0.1:4318), which may forward over TLS",
            target.from, target.url
        )),
        _ => Err(format!(
            "{} {:?} is not an http:// URL: use one such as http://127.0.0.1:4318",
            target.from, target.url
        )),
    }
}

/// Who the spans are from: OpenTelemetry resource attributes.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `service.name`: the agent's name, unless `OTEL_SERVICE_NAME` says otherwise.
    pub service: String,
    /// `service.namespace`.
    pub namespace: String,
    /// `service.instance.id`: the proxy id.
    pub instance: String,
}

/// Builds the exporter and starts the export task. The sender is the tracer's OTLP sink.
pub fn start(
    target: &OtlpTarget,
    origin: &Origin,
    metrics: SpanMetrics,
) -> anyhow::Result<(mpsc::Sender<SpanRecord>, tokio::task::JoinHandle<()>)> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(target.url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("{} {}: {e}", target.from, target.url))?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(origin.service.clone())
            .with_attributes([
                KeyValue::new("service.namespace", origin.namespace.clone()),
                KeyValue::new("service.instance.id", origin.instance.clone()),
                KeyValue::new("telemetry.sdk.name", "capmesh-proxy"),
                KeyValue::new("telemetry.sdk.language", "rust"),
            ])
            .build(),
    );
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tokio::spawn(run(exporter, rx, metrics, target.url.clone()));
    Ok((tx, task))
}

async fn run<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanRecord>,
    metrics: SpanMetrics,
    url: String,
) {
    let scope = InstrumentationScope::builder("capmesh-proxy")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut last_warning: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(span) => batch.push(span),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let n = batch.len() as u64;
        let data: Vec<SpanData> = batch.iter().filter_map(|s| span_data(s, &scope)).collect();
        let failure = match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(data)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        match failure {
            None => metrics.exported.with_label_values(&["otlp"]).inc_by(n),
            Some(why) => {
                metrics
                    .dropped
                    .with_label_values(&["otlp", "export_failed"])
                    .inc_by(n);
                // One line per half minute at most: a collector that is down is one event.
                if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(30)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(collector = %url, error = %why, spans = n, "OTLP export failed; these spans are dropped (counted in capmesh_proxy_spans_dropped_total)");
                }
            }
        }
    }
}

/// The OpenTelemetry form of a recorded span (`None` for one whose ids do not parse, which
/// the tracer never makes).
pub fn span_data(span: &SpanRecord, scope: &InstrumentationScope) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&span.trace_id).ok()?;
    let span_id = SpanId::from_hex(&span.span_id).ok()?;
    let parent = match &span.parent_span_id {
        Some(p) => SpanId::from_hex(p).ok()?,
        None => SpanId::INVALID,
    };
    let at = |nanos: u64| UNIX_EPOCH + Duration::from_nanos(nanos);
    let attributes = span
        .attributes
        .iter()
        .map(|(k, v)| {
            let key = opentelemetry::Key::new(k.clone());
            match v {
                AttributeValue::Bool(b) => KeyValue::new(key, *b),
                AttributeValue::Int(i) => KeyValue::new(key, *i),
                AttributeValue::Text(t) => KeyValue::new(key, t.clone()),
            }
        })
        .collect();
    Some(SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: parent,
        // The parent of every hop's span is in another process.
        parent_span_is_remote: span.parent_span_id.is_some(),
        span_kind: match span.kind {
            SpanKind::Client => opentelemetry::trace::SpanKind::Client,
            SpanKind::Server => opentelemetry::trace::SpanKind::Server,
        },
        name: Cow::Owned(span.name.clone()),
        start_time: at(span.start_unix_nanos),
        end_time: at(span.end_unix_nanos),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match &span.error {
            Some(why) => Status::error(why.clone()),
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_endpoint_comes_from_the_flag_then_the_standard_variables() {
        assert_eq!(resolve(None, env(&[])), Ok(None));
        let general = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]);
        assert_eq!(
            resolve(None, &general).unwrap().unwrap().url,
            "http://collector:4318/v1/traces"
        );
        let both = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/custom",
            ),
        ]);
        assert_eq!(
            resolve(None, &both).unwrap().unwrap().url,
            "http://traces:9999/custom"
        );
        let flag = resolve(Some("http://127.0.0.1:4318"), &both)
            .unwrap()
            .unwrap();
        assert_eq!(flag.url, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(flag.from, "--otlp-endpoint");
    }

    #[test]
    fn what_cannot_be_exported_is_refused_with_the_setting_named() {
        let tls = resolve(
            None,
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]),
        );
        assert!(
            tls.unwrap_err()
                .contains("OTEL_EXPORTER_OTLP_ENDPOINT https://c:4318")
        );
        let grpc = resolve(
            Some("http://c:4317"),
            env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
        );
        assert!(
            grpc.unwrap_err()
                .contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc")
        );
        assert!(
            resolve(Some("not a url"), env(&[]))
                .unwrap_err()
                .contains("--otlp-endpoint")
        );
    }

    #[test]
    fn records_become_span_data_with_typed_attributes_and_links() {
        let record = SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: Some("1111111111111111".into()),
            name: "tools/call get_weather".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 1_000,
            end_unix_nanos: 3_000,
            attributes: [("server.port".to_owned(), AttributeValue::Int(15006))].into(),
            error: Some("denied".into()),
        };
        let scope = InstrumentationScope::builder("t").build();
        let d = span_data(&record, &scope).unwrap();
        assert_eq!(d.parent_span_id.to_string(), "1111111111111111");
        assert!(d.parent_span_is_remote);
        assert_eq!(d.span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(d.attributes[0], KeyValue::new("server.port", 15006i64));
        assert_eq!(d.status, Status::error("denied"));
        assert_eq!(
            d.end_time.duration_since(d.start_time).unwrap(),
            Duration::from_nanos(2_000)
        );
    }
}
