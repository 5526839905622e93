//! The traffic report for the dashboard: per capability, the calls, errors and p99 latency
//! since the previous report, read from the request metrics the forward stack already keeps
//! (nothing more is counted on the request path), and the endpoints the breaker holds ejected.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use capmesh_api::{EdgeTraffic, Traffic};
use prometheus::core::Collector;

use crate::metrics::Metrics;
use crate::routing::Routing;

/// Cumulative counts of one capability at the previous report.
#[derive(Debug, Default, Clone)]
struct Counts {
    requests: u64,
    errors: u64,
    /// Cumulative bucket counts of the latency histogram, by upper bound.
    buckets: Vec<(f64, u64)>,
    /// Latencies observed.
    samples: u64,
}

/// Remembers the counters at the last report, so that each report holds the interval's own.
#[derive(Debug, Default)]
pub struct Meter {
    last: HashMap<String, Counts>,
    at: Option<Instant>,
}

fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// Cumulative counts per capability, now.
fn read(metrics: &Metrics) -> BTreeMap<String, Counts> {
    let mut now: BTreeMap<String, Counts> = BTreeMap::new();
    for family in metrics.requests.collect() {
        for m in family.get_metric() {
            now.entry(label(m, "capability").to_owned())
                .or_default()
                .requests += m.get_counter().get_value() as u64;
        }
    }
    for family in metrics.responses.collect() {
        for m in family.get_metric() {
            let status: u16 = label(m, "status").parse().unwrap_or(0);
            let error = status >= 400 || !label(m, "rpc_error").is_empty();
            if error {
                now.entry(label(m, "capability").to_owned())
                    .or_default()
                    .errors += m.get_counter().get_value() as u64;
            }
        }
    }
    for family in metrics.latency.collect() {
        for m in family.get_metric() {
            let h = m.get_histogram();
            let counts = now.entry(label(m, "capability").to_owned()).or_default();
            counts.samples = h.get_sample_count();
            counts.buckets = h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect();
        }
    }
    now
}

/// The 99th percentile of the interval's latencies, in milliseconds: the upper bound of the
/// bucket it falls in (as Prometheus' `histogram_quantile` would bound it).
/// Beyond the last bucket it is that bucket's bound.
fn p99_ms(now: &Counts, before: &Counts) -> Option<f64> {
    let count = |i: usize| {
        let b = before.buckets.get(i).map_or(0, |b| b.1);
        now.buckets[i].1.saturating_sub(b)
    };
    let total = now.samples.saturating_sub(before.samples);
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * 0.99).ceil() as u64;
    (0..now.buckets.len())
        .find(|&i| count(i) >= rank)
        .or(now.buckets.len().checked_sub(1))
        .map(|i| now.buckets[i].0 * 1000.0)
}

impl Meter {
    /// The report since the previous one (`None` when nothing was called or ejected; the
    /// first call only takes the baseline).
    pub fn report(&mut self, metrics: &Metrics, routing: &Routing) -> Option<Traffic> {
        let now = read(metrics);
        let at = Instant::now();
        let since = self.at.replace(at);
        let mut ejected: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (cap, ep, stats) in routing.all_stats() {
            if ep.healthy && !stats.breaker().is_available(at) {
                ejected
                    .entry(cap.to_string())
                    .or_default()
                    .push(format!("{}#{}", ep.agent, ep.instance));
            }
        }
        let since = since?;
        let mut edges = Vec::new();
        for (cap, counts) in &now {
            let before = self.last.get(cap).cloned().unwrap_or_default();
            let requests = counts.requests.saturating_sub(before.requests);
            let errors = counts.errors.saturating_sub(before.errors);
            let out = ejected.remove(cap).unwrap_or_default();
            if requests == 0 && errors == 0 && out.is_empty() {
                continue;
            }
            edges.push(EdgeTraffic {
                capability: cap.clone(),
                requests,
                errors,
                p99_ms: p99_ms(counts, &before),
                ejected: out,
            });
        }
        for (cap, out) in ejected {
            edges.push(EdgeTraffic {
                capability: cap,
                requests: 0,
                errors: 0,
                p99_ms: None,
                ejected: out,
            });
        }
        self.last = now.into_iter().collect();
        if edges.is_empty() {
            return None;
        }
        Some(Traffic {
            interval_ms: at.duration_since(since).as_millis() as u64,
            edges,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_report_holds_its_own_interval() {
        let metrics = Metrics::new();
        let routing = Routing::default();
        let mut meter = Meter::default();
        assert!(meter.report(&metrics, &routing).is_none(), "baseline");
        for _ in 0..99 {
            metrics.requests.with_label_values(&["weather"]).inc();
            metrics.answered("weather", http::StatusCode::OK, Duration::from_micros(800));
        }
        metrics.requests.with_label_values(&["weather"]).inc();
        metrics.answered(
            "weather",
            http::StatusCode::BAD_GATEWAY,
            Duration::from_millis(40),
        );
        let Some(report) = meter.report(&metrics, &routing) else {
            panic!("no report after 100 calls");
        };
        assert_eq!(report.edges.len(), 1);
        let e = &report.edges[0];
        assert_eq!(
            (e.capability.as_str(), e.requests, e.errors),
            ("weather", 100, 1)
        );
        // 99 of 100 within the 1 ms bucket: p99 is that bucket's bound.
        assert_eq!(e.p99_ms, Some(1.0));
        assert!(meter.report(&metrics, &routing).is_none(), "nothing new");
        metrics.requests.with_label_values(&["weather"]).inc();
        metrics.answered("weather", http::StatusCode::OK, Duration::from_millis(40));
        let again = meter.report(&metrics, &routing).unwrap();
        assert_eq!(again.edges[0].requests, 1);
        assert_eq!(again.edges[0].p99_ms, Some(50.0));
    }
}
