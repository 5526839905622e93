//! Prometheus metrics of the control plane (`capmesh_cp_*`), served on the admin address.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the control plane exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open topology streams.
    pub streams_connected: IntGauge,
    /// Distinct agents registered (namespace + name).
    pub agents: IntGauge,
    /// Distinct capabilities with at least one endpoint.
    pub capabilities: IntGauge,
    /// Full snapshots sent.
    pub snapshots_sent: IntCounter,
    /// Deltas sent.
    pub deltas_sent: IntCounter,
    /// Frames a proxy refused.
    pub nacks: IntCounter,
    /// Time from sending a snapshot or delta to its ack.
    pub ack_latency: Histogram,
    /// Workload certificates issued.
    pub certificates_issued: IntCounter,
    /// Refused connections, streams and requests, by reason.
    pub refusals: IntCounterVec,
    /// Spans the proxies sent that were kept in the window.
    pub spans_received: IntCounter,
    /// Spans refused as malformed (each one named in a debug log).
    pub spans_refused: IntCounter,
    /// Spans the proxies report they dropped before sending (their queue was full).
    pub spans_dropped_by_proxies: IntCounter,
    /// Spans held in the in-memory window.
    pub spans_held: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are constants: an error here is a programming error caught by the
    // unit test below, never a run-time input.
    #[allow(clippy::expect_used)]
    r.expect("metric definition is valid")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let streams_connected = gauge("capmesh_cp_streams_connected", "Open topology streams");
        let agents = gauge(
            "capmesh_cp_agents",
            "Registered agents (namespace and name)",
        );
        let capabilities = gauge(
            "capmesh_cp_capabilities",
            "Capabilities with at least one endpoint",
        );
        let snapshots_sent = counter(
            "capmesh_cp_snapshots_sent_total",
            "Full snapshots sent to proxies",
        );
        let deltas_sent = counter("capmesh_cp_deltas_sent_total", "Deltas sent to proxies");
        let nacks = counter(
            "capmesh_cp_nacks_total",
            "Snapshots or deltas a proxy refused",
        );
        let certificates_issued = counter(
            "capmesh_cp_certificates_issued_total",
            "Workload certificates issued",
        );
        let ack_latency = must(Histogram::with_opts(
            HistogramOpts::new(
                "capmesh_cp_ack_latency_seconds",
                "Time from sending a frame to its ack",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        ));
        must(registry.register(Box::new(ack_latency.clone())));
        let refusals = must(IntCounterVec::new(
            Opts::new(
                "capmesh_cp_refusals_total",
                "Refused connections, streams and requests by reason",
            ),
            &["reason"],
        ));
        must(registry.register(Box::new(refusals.clone())));
        let spans_received = counter(
            "capmesh_cp_spans_received_total",
            "Spans received from proxies and kept in the in-memory window",
        );
        let spans_refused = counter(
            "capmesh_cp_spans_refused_total",
            "Spans refused as malformed",
        );
        let spans_dropped_by_proxies = counter(
            "capmesh_cp_spans_dropped_by_proxies_total",
            "Spans proxies dropped before sending them (reported in their spans frames)",
        );
        let spans_held = gauge(
            "capmesh_cp_spans_held",
            "Spans held in the in-memory window (this replica)",
        );
        Self {
            spans_received,
            spans_refused,
            spans_dropped_by_proxies,
            spans_held,
            registry,
            streams_connected,
            agents,
            capabilities,
            snapshots_sent,
            deltas_sent,
            nacks,
            ack_latency,
            certificates_issued,
            refusals,
        }
    }

    /// Counts one refusal.
    pub fn refuse(&self, reason: &str) {
        self.refusals.with_label_values(&[reason]).inc();
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

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_registers_and_renders() {
        let m = super::Metrics::new();
        m.refuse("identity_mismatch");
        let text = m.render();
        assert!(text.contains("capmesh_cp_refusals_total{reason=\"identity_mismatch\"} 1"));
        assert!(text.contains("capmesh_cp_streams_connected 0"));
    }
}
