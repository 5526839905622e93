//! Spans: one per hop, a client span on the consumer's side ([`ClientSpan`], over the forward
//! stack) and a server span on the provider's side ([`ServerSpan`], in the inbound stack),
//! linked by W3C trace context and carrying MCP and GenAI attributes (OpenTelemetry's MCP
//! conventions) plus the mesh's own (`capmesh.caller`, `capmesh.provider`, attempts).
//!
//! Sampling is parent-based: a request whose `traceparent` is sampled is recorded, one that is
//! not sampled is not, and a new trace is recorded with the probability `--trace-sampling`
//! (OpenTelemetry's `ParentBased(TraceIdRatioBased)` sampler). A hop that records writes its own
//! span id into the `traceparent` the next hop sees; one that does not passes the context on
//! unchanged (or starts an unsampled one).
//!
//! A finished span goes, without waiting, to two bounded queues: the control plane's (sent up
//! the topology stream once a second, for `capmesh trace` and the dashboard) and, when OTLP
//! export is on, the exporter's ([`export`]). A full queue drops the span and counts it in
//! `capmesh_proxy_spans_dropped_total`; a call never waits for either.

pub mod context;
pub mod export;
mod layer;
pub mod traffic;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use capmesh_api::trace::MAX_SPANS_PER_FRAME;
use capmesh_api::{AttributeValue, ProxyFrame, SpanKind, SpanRecord};
use http::HeaderMap;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};
use prometheus::IntCounterVec;
use tokio::sync::mpsc;

pub use self::context::{Parent, TRACEPARENT};
pub use self::layer::{ClientSpan, RecordAttempts, ServerSpan};

/// Spans waiting for the control-plane stream; more are dropped (and counted).
const OUTBOX: usize = 1024;
/// How often waiting spans go up the topology stream (one frame each time).
pub const SPANS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a traffic report goes up the topology stream.
pub const TRAFFIC_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Counters shared by everything that records or ships spans.
#[derive(Debug, Clone)]
pub struct SpanMetrics {
    /// `capmesh_proxy_spans_total{kind}`: spans recorded.
    pub recorded: IntCounterVec,
    /// `capmesh_proxy_spans_dropped_total{sink, reason}`: spans lost on their way out.
    pub dropped: IntCounterVec,
    /// `capmesh_proxy_spans_exported_total{sink}`: spans delivered.
    pub exported: IntCounterVec,
}

/// Where finished spans go.
#[derive(Debug)]
struct Sinks {
    outbox: Mutex<Outbox>,
    otlp: Option<mpsc::Sender<SpanRecord>>,
    metrics: SpanMetrics,
}

#[derive(Debug, Default)]
struct Outbox {
    spans: VecDeque<SpanRecord>,
    dropped: u64,
}

impl Sinks {
    fn finished(&self, span: SpanRecord) {
        self.metrics
            .recorded
            .with_label_values(&[span.kind.as_str()])
            .inc();
        if let Some(otlp) = &self.otlp
            && let Err(e) = otlp.try_send(span.clone())
        {
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "exporter_stopped",
            };
            self.metrics
                .dropped
                .with_label_values(&["otlp", reason])
                .inc();
        }
        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        if outbox.spans.len() >= OUTBOX {
            outbox.dropped += 1;
            drop(outbox);
            self.metrics
                .dropped
                .with_label_values(&["control_plane", "queue_full"])
                .inc();
            return;
        }
        outbox.spans.push_back(span);
    }
}

/// Decides which hops are recorded and makes their spans.
#[derive(Debug)]
pub struct Tracer {
    sampler: Sampler,
    ids: RandomIdGenerator,
    sinks: Arc<Sinks>,
    /// Counts this sidecar's traffic for the control plane's dashboard.
    pub traffic: Mutex<traffic::Meter>,
}

impl Tracer {
    /// A tracer recording a `ratio` of new traces, its spans also sent to `otlp` when set.
    pub fn new(ratio: f64, otlp: Option<mpsc::Sender<SpanRecord>>, metrics: SpanMetrics) -> Self {
        Self {
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
            ids: RandomIdGenerator::default(),
            sinks: Arc::new(Sinks {
                outbox: Mutex::default(),
                otlp,
                metrics,
            }),
            traffic: Mutex::default(),
        }
    }

    fn sampled(&self, parent: Option<&Parent>, trace_id: TraceId) -> bool {
        let parent_cx = parent.map(|p| {
            let flags = if p.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                p.trace_id,
                p.span_id,
                flags,
                true,
                TraceState::NONE,
            ))
        });
        let decision = self.sampler.should_sample(
            parent_cx.as_ref(),
            trace_id,
            "",
            &opentelemetry::trace::SpanKind::Internal,
            &[],
            &[],
        );
        decision.decision == SamplingDecision::RecordAndSample
    }

    /// Starts a hop: decides whether it is recorded and writes the `traceparent` the next hop
    /// will see into `headers` (this span's id when recorded; otherwise the context as it
    /// came, or a new unsampled one). The span ends when the last clone is dropped.
    pub fn begin(&self, headers: &mut HeaderMap, kind: SpanKind) -> Option<Span> {
        let parent = context::parent(headers);
        let trace_id = parent.map_or_else(|| self.ids.new_trace_id(), |p| p.trace_id);
        if !self.sampled(parent.as_ref(), trace_id) {
            if parent.is_none() {
                let v = context::value(trace_id, self.ids.new_span_id(), false);
                headers.insert(TRACEPARENT, v);
            }
            return None;
        }
        let span_id = self.ids.new_span_id();
        headers.insert(TRACEPARENT, context::value(trace_id, span_id, true));
        Some(Span(Arc::new(Open {
            sinks: self.sinks.clone(),
            trace_id,
            span_id,
            parent: parent.map(|p| p.span_id),
            kind,
            start: SystemTime::now(),
            started: Instant::now(),
            state: Mutex::new(State::default()),
        })))
    }

    /// The next `spans` frame for the control plane and how many spans it holds, if spans
    /// are waiting.
    pub fn spans_frame(&self) -> Option<(ProxyFrame, usize)> {
        let mut outbox = self.sinks.outbox.lock().unwrap_or_else(|p| p.into_inner());
        if outbox.spans.is_empty() && outbox.dropped == 0 {
            return None;
        }
        let n = outbox.spans.len().min(MAX_SPANS_PER_FRAME);
        let spans: Vec<SpanRecord> = outbox.spans.drain(..n).collect();
        let dropped = std::mem::take(&mut outbox.dropped);
        Some((ProxyFrame::Spans { spans, dropped }, n))
    }

    /// The traffic report since the previous one, if anything was called or ejected.
    pub fn traffic_frame(
        &self,
        metrics: &crate::metrics::Metrics,
        routing: &crate::routing::Routing,
    ) -> Option<ProxyFrame> {
        self.traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report(metrics, routing)
            .map(ProxyFrame::Traffic)
    }

    /// Counts `n` spans of a `spans` frame the stream could not take.
    pub fn lost_to_stream(&self, n: usize) {
        self.sinks
            .metrics
            .dropped
            .with_label_values(&["control_plane", "stream_down"])
            .inc_by(n as u64);
    }

    /// Counts `n` spans delivered to the control plane.
    pub fn sent_to_control_plane(&self, n: usize) {
        self.sinks
            .metrics
            .exported
            .with_label_values(&["control_plane"])
            .inc_by(n as u64);
    }
}

/// An open span. Cheap to clone; the span ends (at [`Span::end`]'s time, or now) and is handed
/// to the sinks when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Span(Arc<Open>);

#[derive(Debug)]
struct Open {
    sinks: Arc<Sinks>,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    kind: SpanKind,
    start: SystemTime,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    name: String,
    attributes: BTreeMap<String, AttributeValue>,
    error: Option<String>,
    ended: Option<Instant>,
}

impl Span {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The trace id, as the W3C header writes it.
    pub fn trace_id(&self) -> String {
        self.0.trace_id.to_string()
    }

    /// Names the span (`tools/call get_weather`).
    pub fn name(&self, name: String) {
        self.state().name = name;
    }

    /// Sets an attribute (the last value wins).
    pub fn set(&self, key: &str, value: impl Into<AttributeValue>) {
        self.state().attributes.insert(key.to_owned(), value.into());
    }

    /// Marks the span failed; the first reason given is kept.
    pub fn fail(&self, why: impl Into<String>) {
        let mut state = self.state();
        if state.error.is_none() {
            state.error = Some(why.into());
        }
    }

    /// Ends the span now (the first call wins); it is shipped once the last clone is dropped.
    pub fn end(&self) {
        let mut state = self.state();
        if state.ended.is_none() {
            state.ended = Some(Instant::now());
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Drop for Open {
    fn drop(&mut self) {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|p| p.into_inner()));
        let ended = state.ended.unwrap_or_else(Instant::now);
        let start = unix_nanos(self.start);
        let record = SpanRecord {
            trace_id: self.trace_id.to_string(),
            span_id: self.span_id.to_string(),
            parent_span_id: self.parent.map(|p| p.to_string()),
            name: if state.name.is_empty() {
                "mcp".to_owned()
            } else {
                state.name
            },
            kind: self.kind,
            start_unix_nanos: start,
            end_unix_nanos: start + ended.saturating_duration_since(self.started).as_nanos() as u64,
            attributes: state.attributes,
            error: state.error,
        };
        self.sinks.finished(record);
    }
}

tokio::task_local! {
    /// The client span of the hop whose request is being sent: [`ClientSpan`] sets it while
    /// the forward stack's layers are called (they build their futures then: it is not set
    /// while those are polled), and [`RecordAttempts`] takes it to add what only it sees (the
    /// endpoint that served, how many were tried). The forward stack's
    /// [`crate::forward::Call`] is shared by every listener, so the span travels beside it
    /// rather than in it.
    static HOP: Span;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::HeaderValue;

    use super::*;

    fn metrics() -> SpanMetrics {
        let m = crate::metrics::Metrics::new();
        m.spans()
    }

    #[test]
    fn sampled_parents_are_recorded_unsampled_ones_pass_through_and_new_traces_follow_the_ratio() {
        let always = Tracer::new(1.0, None, metrics());
        let never = Tracer::new(0.0, None, metrics());
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

        // A sampled parent is recorded even at ratio 0; the next hop sees this span's id.
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(sampled));
        let span = never.begin(&mut h, SpanKind::Client).unwrap();
        let next = context::parent(&h).unwrap();
        assert_eq!(
            next.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(next.span_id, span.0.span_id);
        assert_eq!(span.0.parent.unwrap().to_string(), "00f067aa0ba902b7");

        // An unsampled parent is never recorded, even at ratio 1, and goes on unchanged.
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(unsampled));
        assert!(always.begin(&mut h, SpanKind::Server).is_none());
        assert_eq!(h[TRACEPARENT], unsampled);

        // No context: ratio 1 records a root span, ratio 0 starts an unsampled trace.
        let mut h = HeaderMap::new();
        let root = always.begin(&mut h, SpanKind::Client).unwrap();
        assert!(root.0.parent.is_none());
        assert!(context::parent(&h).unwrap().sampled);
        let mut h = HeaderMap::new();
        assert!(never.begin(&mut h, SpanKind::Client).is_none());
        assert!(!context::parent(&h).unwrap().sampled);
    }

    #[test]
    fn a_span_is_shipped_once_when_its_last_clone_drops_and_a_full_outbox_counts_drops() {
        let m = metrics();
        let tracer = Tracer::new(1.0, None, m.clone());
        let mut h = HeaderMap::new();
        let span = tracer.begin(&mut h, SpanKind::Client).unwrap();
        span.name("tools/call get_weather".into());
        span.set("mcp.method.name", "tools/call");
        span.fail("first");
        span.fail("second");
        let clone = span.clone();
        drop(span);
        assert!(tracer.spans_frame().is_none(), "a clone still holds it");
        clone.end();
        drop(clone);
        let Some((ProxyFrame::Spans { spans, dropped }, _)) = tracer.spans_frame() else {
            panic!("no frame");
        };
        assert_eq!((spans.len(), dropped), (1, 0));
        assert_eq!(spans[0].name, "tools/call get_weather");
        assert_eq!(spans[0].error.as_deref(), Some("first"));
        assert!(spans[0].check().is_ok());

        for _ in 0..OUTBOX + 3 {
            drop(tracer.begin(&mut HeaderMap::new(), SpanKind::Server));
        }
        assert_eq!(
            m.dropped
                .with_label_values(&["control_plane", "queue_full"])
                .get(),
            3
        );
        let Some((ProxyFrame::Spans { spans, dropped }, _)) = tracer.spans_frame() else {
            panic!("no frame");
        };
        assert_eq!((spans.len(), dropped), (MAX_SPANS_PER_FRAME, 3));
    }
}
