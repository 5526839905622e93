//! What the proxies see of their traffic, kept in memory for `capmesh trace` and the
//! dashboard: a bounded window of the sampled spans they send up the topology stream, and each
//! proxy's latest traffic report.
//!
//! The window holds at most [`MAX_TRACES`] traces and [`MAX_SPANS`] spans; the trace that
//! arrived first is forgotten first. Nothing here is persisted, and each replica of a
//! multi-replica control plane holds only what its own streams brought: a trace whose hops
//! were recorded by proxies connected to different replicas is seen in part on each.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capmesh_api::{SpanRecord, StoredSpan, Trace, TraceSummary, Traffic};

use crate::metrics::Metrics;

/// The most traces held.
pub const MAX_TRACES: usize = 2_000;
/// The most spans held, all traces together.
pub const MAX_SPANS: usize = 20_000;
/// The most spans held for one trace; more of the same trace are refused.
pub const MAX_SPANS_PER_TRACE: usize = 500;
/// A traffic report older than this no longer counts as live.
pub const TRAFFIC_STALE: Duration = Duration::from_secs(30);

/// A proxy's latest traffic report.
#[derive(Debug, Clone)]
pub struct Reported {
    /// The agent whose sidecar sent it.
    pub agent: String,
    /// When it arrived.
    pub at: Instant,
    /// The report.
    pub traffic: Traffic,
}

#[derive(Debug, Default)]
struct Window {
    traces: HashMap<String, Vec<StoredSpan>>,
    /// Trace ids in the order they first arrived.
    order: VecDeque<String>,
    spans: usize,
    traffic: HashMap<String, Reported>,
}

/// The in-memory window (see the module docs).
#[derive(Debug, Default)]
pub struct Observed {
    window: Mutex<Window>,
}

impl Observed {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the spans of one `spans` frame from `agent`'s proxy `proxy_id`; a span that
    /// fails [`SpanRecord::check`] is refused (counted, logged at debug with the reason).
    pub fn accept(
        &self,
        metrics: &Metrics,
        agent: &str,
        proxy_id: &str,
        spans: Vec<SpanRecord>,
        dropped: u64,
    ) {
        metrics.spans_dropped_by_proxies.inc_by(dropped);
        let mut w = self.window();
        for span in spans {
            if let Err(e) = span.check() {
                tracing::debug!(proxy_id, error = %e, "span refused");
                metrics.spans_refused.inc();
                continue;
            }
            let trace_id = span.trace_id.clone();
            let stored = StoredSpan {
                span,
                agent: agent.to_owned(),
                proxy_id: proxy_id.to_owned(),
            };
            match w.traces.get_mut(&trace_id) {
                Some(held) if held.len() >= MAX_SPANS_PER_TRACE => {
                    metrics.spans_refused.inc();
                    continue;
                }
                Some(held) => held.push(stored),
                None => {
                    w.traces.insert(trace_id.clone(), vec![stored]);
                    w.order.push_back(trace_id);
                }
            }
            w.spans += 1;
            metrics.spans_received.inc();
            while w.order.len() > MAX_TRACES || w.spans > MAX_SPANS {
                let Some(oldest) = w.order.pop_front() else {
                    break;
                };
                let gone = w.traces.remove(&oldest).map_or(0, |v| v.len());
                w.spans -= gone;
            }
        }
        metrics.spans_held.set(w.spans as i64);
    }

    /// Every span held for `trace_id`, earliest first.
    pub fn trace(&self, trace_id: &str) -> Option<Trace> {
        let w = self.window();
        let mut spans = w.traces.get(trace_id)?.clone();
        spans.sort_by_key(|s| {
            (
                s.span.start_unix_nanos,
                s.span.kind == capmesh_api::SpanKind::Server,
            )
        });
        Some(Trace {
            trace_id: trace_id.to_owned(),
            spans,
        })
    }

    /// The `last` traces that began most recently, newest first.
    pub fn recent(&self, last: usize) -> Vec<TraceSummary> {
        let w = self.window();
        let mut all: Vec<TraceSummary> = w
            .traces
            .iter()
            .filter_map(|(id, spans)| summary(id, spans))
            .collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.start_unix_nanos));
        all.truncate(last);
        all
    }

    /// Keeps `proxy_id`'s latest traffic report.
    pub fn traffic(&self, agent: &str, proxy_id: &str, traffic: Traffic) {
        self.window().traffic.insert(
            proxy_id.to_owned(),
            Reported {
                agent: agent.to_owned(),
                at: Instant::now(),
                traffic,
            },
        );
    }

    /// The traffic reports younger than [`TRAFFIC_STALE`], by proxy id.
    pub fn live_traffic(&self) -> Vec<(String, Reported)> {
        let mut w = self.window();
        w.traffic.retain(|_, r| r.at.elapsed() < TRAFFIC_STALE);
        let mut all: Vec<(String, Reported)> = w
            .traffic
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

fn summary(trace_id: &str, spans: &[StoredSpan]) -> Option<TraceSummary> {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span.span_id.as_str()).collect();
    // The root: the earliest span whose parent is not held (a caller that records nothing).
    let first = spans
        .iter()
        .filter(|s| {
            s.span
                .parent_span_id
                .as_deref()
                .is_none_or(|p| !ids.contains(p))
        })
        .min_by_key(|s| s.span.start_unix_nanos)
        .or_else(|| spans.iter().min_by_key(|s| s.span.start_unix_nanos))?;
    let start = spans.iter().map(|s| s.span.start_unix_nanos).min()?;
    let end = spans.iter().map(|s| s.span.end_unix_nanos).max()?;
    let agents: BTreeSet<String> = spans.iter().map(|s| s.agent.clone()).collect();
    Some(TraceSummary {
        trace_id: trace_id.to_owned(),
        root: format!("{}: {}", first.agent, first.span.name),
        start_unix_nanos: start,
        duration_nanos: end.saturating_sub(start),
        spans: spans.len(),
        errors: spans.iter().filter(|s| s.span.error.is_some()).count(),
        agents: agents.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use capmesh_api::SpanKind;

    use super::*;

    fn span(trace: u64, id: u64, parent: Option<u64>, start: u64) -> SpanRecord {
        SpanRecord {
            trace_id: format!("{trace:032x}"),
            span_id: format!("{id:016x}"),
            parent_span_id: parent.map(|p| format!("{p:016x}")),
            name: "tools/call get_weather".into(),
            kind: if parent.is_some() {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            start_unix_nanos: start,
            end_unix_nanos: start + 10,
            attributes: Default::default(),
            error: None,
        }
    }

    #[test]
    fn traces_are_kept_by_id_listed_newest_first_and_the_oldest_forgotten_first() {
        let m = Metrics::new();
        let o = Observed::default();
        o.accept(&m, "planner", "p-1", vec![span(1, 1, None, 100)], 0);
        o.accept(&m, "weather", "w-1", vec![span(1, 2, Some(1), 105)], 2);
        o.accept(&m, "planner", "p-1", vec![span(2, 3, None, 200)], 0);
        let t = o.trace(&format!("{:032x}", 1)).unwrap();
        assert_eq!(t.spans.len(), 2);
        assert_eq!(t.spans[0].agent, "planner");
        let recent = o.recent(10);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[0].trace_id, format!("{:032x}", 2));
        assert_eq!(recent[1].root, "planner: tools/call get_weather");
        assert_eq!(recent[1].agents, vec!["planner", "weather"]);
        assert_eq!(m.spans_dropped_by_proxies.get(), 2);

        for t in 0..MAX_TRACES as u64 {
            o.accept(&m, "planner", "p-1", vec![span(1000 + t, 9, None, 300)], 0);
        }
        assert!(
            o.trace(&format!("{:032x}", 1)).is_none(),
            "the oldest went first"
        );
        assert!(o.trace(&format!("{:032x}", 1000)).is_some());
        assert_eq!(m.spans_held.get() as usize, MAX_TRACES);
    }

    #[test]
    fn malformed_spans_are_refused_and_counted() {
        let m = Metrics::new();
        let o = Observed::default();
        let mut bad = span(1, 1, None, 1);
        bad.trace_id = "not-hex".into();
        o.accept(&m, "planner", "p-1", vec![bad, span(1, 2, None, 1)], 0);
        assert_eq!(m.spans_refused.get(), 1);
        assert_eq!(o.trace(&format!("{:032x}", 1)).unwrap().spans.len(), 1);
    }
}
