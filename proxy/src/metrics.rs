//! Prometheus metrics of the proxy (`capmesh_proxy_*`), served on the admin address.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the proxy exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Outbound calls by capability.
    pub requests: IntCounterVec,
    /// Outbound responses by capability, HTTP status and JSON-RPC error class.
    pub responses: IntCounterVec,
    /// Outbound latency to response headers, by capability.
    pub latency: HistogramVec,
    /// Retries by capability.
    pub retries: IntCounterVec,
    /// Calls served by another endpoint after the first choice failed.
    pub failovers: IntCounterVec,
    /// Endpoint ejections by capability.
    pub ejections: IntCounterVec,
    /// Endpoints by capability and state (`ready`, `ejected`, `unhealthy`), set at scrape.
    pub endpoints: IntGaugeVec,
    /// Inbound calls by capability and outcome (`allowed`, `denied`).
    pub inbound: IntCounterVec,
    /// Inbound TLS refusals by reason.
    pub tls_refusals: IntCounterVec,
    /// Inbound TLS handshakes completed.
    pub tls_handshakes: IntCounterVec,
    /// Snapshot version held.
    pub snapshot_version: IntGauge,
    /// Unix time the last snapshot or delta was applied.
    pub snapshot_applied: IntGauge,
    /// 1 while the control-plane stream is up.
    pub control_plane_connected: IntGauge,
    /// Unix time the certificate expires.
    pub certificate_expiry: IntGauge,
    /// Traffic redirected here by the init rules (transparent mode): HTTP requests sent to a
    /// provider's proxy (`route="mesh"`) and connections relayed as they are (`route="direct"`).
    pub transparent: IntCounterVec,
    /// Connections closed on accept because a listener was at its cap, by listener.
    pub connections_refused: IntCounterVec,
    /// Connections open on each worker thread, by listener (how evenly they are spread).
    pub worker_connections: IntGaugeVec,
    /// Spans recorded, by kind (`client`, `server`).
    pub spans: IntCounterVec,
    /// Spans lost on their way out, by sink (`otlp`, `control_plane`) and reason.
    pub spans_dropped: IntCounterVec,
    /// Spans delivered, by sink.
    pub spans_exported: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    #[allow(clippy::expect_used)]
    r.expect("metric definitions are constants and valid")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = must($m);
                must(registry.register(Box::new(m.clone())));
                m
            }};
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        Self {
            requests: reg!(counter(
                "capmesh_proxy_requests_total",
                "Outbound calls",
                &["capability"]
            )),
            responses: reg!(counter(
                "capmesh_proxy_responses_total",
                "Outbound responses by status and JSON-RPC error class",
                &["capability", "status", "rpc_error"]
            )),
            latency: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "capmesh_proxy_request_duration_seconds",
                    "Outbound latency to response headers"
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    10.0, 60.0
                ]),
                &["capability"]
            )),
            retries: reg!(counter(
                "capmesh_proxy_retries_total",
                "Retries to another endpoint",
                &["capability"]
            )),
            failovers: reg!(counter(
                "capmesh_proxy_failovers_total",
                "Calls served by another endpoint after the first choice failed",
                &["capability"]
            )),
            ejections: reg!(counter(
                "capmesh_proxy_endpoint_ejections_total",
                "Endpoints ejected by the circuit breaker",
                &["capability"]
            )),
            endpoints: reg!(IntGaugeVec::new(
                Opts::new("capmesh_proxy_endpoints", "Endpoints by state"),
                &["capability", "state"]
            )),
            inbound: reg!(counter(
                "capmesh_proxy_inbound_requests_total",
                "Inbound calls by outcome",
                &["capability", "outcome"]
            )),
            tls_refusals: reg!(counter(
                "capmesh_proxy_tls_refusals_total",
                "Inbound TLS refusals",
                &["reason"]
            )),
            tls_handshakes: reg!(counter(
                "capmesh_proxy_tls_handshakes_total",
                "Inbound connections accepted",
                &["mode"]
            )),
            snapshot_version: reg!(IntGauge::new(
                "capmesh_proxy_snapshot_version",
                "Snapshot version held"
            )),
            snapshot_applied: reg!(IntGauge::new(
                "capmesh_proxy_snapshot_applied_timestamp_seconds",
                "When the last snapshot or delta was applied"
            )),
            control_plane_connected: reg!(IntGauge::new(
                "capmesh_proxy_control_plane_connected",
                "1 while the topology stream is up"
            )),
            certificate_expiry: reg!(IntGauge::new(
                "capmesh_proxy_certificate_expiry_timestamp_seconds",
                "When the workload certificate expires"
            )),
            transparent: reg!(counter(
                "capmesh_proxy_intercepted_total",
                "Traffic redirected by the init rules: HTTP requests to the mesh (mesh), connections relayed as they are (direct)",
                &["route"]
            )),
            connections_refused: reg!(counter(
                "capmesh_proxy_connections_refused_total",
                "Connections closed on accept because the listener held --max-connections",
                &["listener"]
            )),
            worker_connections: reg!(IntGaugeVec::new(
                Opts::new(
                    "capmesh_proxy_worker_connections",
                    "Connections open on each worker thread, by listener"
                ),
                &["listener", "worker"]
            )),
            spans: reg!(counter(
                "capmesh_proxy_spans_total",
                "Spans recorded (sampled hops), by kind",
                &["kind"]
            )),
            spans_dropped: reg!(counter(
                "capmesh_proxy_spans_dropped_total",
                "Spans lost before delivery: a full queue, an export that failed, the stream down",
                &["sink", "reason"]
            )),
            spans_exported: reg!(counter(
                "capmesh_proxy_spans_exported_total",
                "Spans delivered, by sink (otlp, control_plane)",
                &["sink"]
            )),
            registry,
        }
    }

    /// The span counters, for the tracer and its exporters.
    pub fn spans(&self) -> crate::trace::SpanMetrics {
        crate::trace::SpanMetrics {
            recorded: self.spans.clone(),
            dropped: self.spans_dropped.clone(),
            exported: self.spans_exported.clone(),
        }
    }

    /// Records a provider's answer to a call of `capability`: latency to headers and status.
    pub fn answered(&self, capability: &str, status: http::StatusCode, rtt: std::time::Duration) {
        self.latency
            .with_label_values(&[capability])
            .observe(rtt.as_secs_f64());
        let class = if status.is_success() { "" } else { "http" };
        self.responses
            .with_label_values(&[capability, status.as_str(), class])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
