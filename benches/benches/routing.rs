//! Criterion micro benches of the proxy's per-request routing work (issue 9):
//!
//! - `resolve`: what the outbound path does for each `tools/call` among 10,000 endpoints —
//!   find the tool, take the capability's endpoints, rank them for the selector, pick one by
//!   power of two choices — next to `pick` alone on ranks computed once (what caching the ranks
//!   per snapshot would leave per request);
//! - `snapshot`: building and swapping in the routing table of a 1,000-endpoint snapshot while
//!   another thread keeps resolving, and those readers' latency during the swaps;
//! - `classify`: classifying a JSON-RPC `tools/call` with `Mcp-Method`/`Mcp-Name` headers
//!   (2026-07-28), without them (a legacy session request), and the header-only route hint.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use capmesh_api::{Dependency, EndpointId, Snapshot};
use capmesh_proxy::balance::{pick, rank};
use capmesh_proxy::breaker::BreakerConfig;
use capmesh_proxy::mcp::classify::{classify, route_hint};
use capmesh_proxy::routing::Routing;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use serde_json::json;

/// A snapshot with `endpoints` endpoints spread evenly over `capabilities` capabilities.
fn snapshot(version: u64, endpoints: usize, capabilities: usize) -> Snapshot {
    let eps: Vec<_> = (0..endpoints)
        .map(|i| {
            let cap = format!("cap-{}", i % capabilities);
            json!({
                "id": format!("default/provider/p{i}/{cap}"),
                "agent": "provider",
                "namespace": "default",
                "instance": format!("p{i}"),
                "identity": "spiffe://capmesh.local/ns/default/agent/provider",
                "address": format!("10.{}.{}.{}:15006", i / 65536, (i / 256) % 256, i % 256),
                "capability": cap,
                "function": cap,
                "tags": if i % 3 == 0 { vec!["fast"] } else { vec![] },
                "healthy": i % 50 != 0,
            })
        })
        .collect();
    let caps: Vec<String> = (0..capabilities).map(|c| format!("cap-{c}")).collect();
    serde_json::from_value(json!({
        "version": version,
        "endpoints": eps,
        "known_capabilities": caps,
        "trust": { "trust_domain": "capmesh.local" },
    }))
    .unwrap()
}

fn table(snap: Snapshot, deps: &[Dependency], previous: &Routing) -> Routing {
    Routing::build(
        snap,
        deps,
        "spiffe://capmesh.local/ns/default/agent/planner",
        previous,
        BreakerConfig::default(),
    )
}

/// The routing work of one call of `tool` when ranks are computed per call (how the proxy
/// worked before ranks were cached per snapshot; kept to compare).
fn resolve(routing: &Routing, tool: &str) -> Option<EndpointId> {
    let entry = routing.tool(tool)?;
    let all = routing.endpoints(&entry.capability);
    let ranks = rank(all.iter().map(|e| e.as_ref()), &entry.selector);
    pick(
        &ranks,
        &|id: &EndpointId| routing.stats(id),
        &[],
        Instant::now(),
    )
    .map(|e| e.id.clone())
}

fn bench_resolve(c: &mut Criterion) {
    let mut g = c.benchmark_group("resolve");
    // (endpoints, capabilities, dependency): one capability with 10,000 providers; 10,000
    // endpoints over 1,000 capabilities with `*` (1,000 tools); a preference rule.
    let cases = [
        ("10000x1", 1usize, "cap-0"),
        ("10000x1+fast", 1, "cap-0:+fast"),
        ("10000over1000", 1000, "*"),
    ];
    for (name, caps, dep) in cases {
        let deps: Vec<Dependency> = vec![dep.parse().unwrap()];
        let routing = table(snapshot(1, 10_000, caps), &deps, &Routing::default());
        let tool = if caps == 1 { "cap-0" } else { "cap-777" };
        assert!(resolve(&routing, tool).is_some());
        g.bench_function(BenchmarkId::new("per_request", name), |b| {
            b.iter(|| resolve(black_box(&routing), black_box(tool)))
        });
        // Ranks cached per snapshot (what the proxy does): only `pick` stays per request.
        let ranks = routing.tool(tool).unwrap().ranks.clone();
        g.bench_function(BenchmarkId::new("pick_on_cached_ranks", name), |b| {
            b.iter(|| {
                pick(
                    black_box(ranks.as_slice()),
                    &|id: &EndpointId| routing.stats(id),
                    &[],
                    Instant::now(),
                )
                .map(|e| e.id.clone())
            })
        });
    }
    g.finish();
}

fn bench_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.measurement_time(Duration::from_secs(4));
    let deps: Vec<Dependency> = vec!["*".parse().unwrap()];
    let snaps: Vec<Snapshot> = (0..4).map(|v| snapshot(v + 2, 1_000, 100)).collect();
    let current = Arc::new(ArcSwap::from_pointee(table(
        snapshot(1, 1_000, 100),
        &deps,
        &Routing::default(),
    )));

    // Writer cost: build the table for a 1,000-endpoint snapshot and swap it in, while a
    // reader thread keeps routing (as request tasks do).
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (current, stop) = (current.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(resolve(&current.load(), "cap-42"));
            }
        })
    };
    let mut i = 0usize;
    g.bench_function("apply_1000_endpoints_with_a_reader", |b| {
        b.iter(|| {
            i += 1;
            let prev = current.load_full();
            let next = table(snaps[i % snaps.len()].clone(), &deps, &prev);
            current.store(Arc::new(next));
        })
    });
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();

    // Reader cost while a writer swaps 1,000-endpoint snapshots back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (current, stop, deps, snaps) = (current.clone(), stop.clone(), deps.clone(), snaps);
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let prev = current.load_full();
                let next = table(snaps[swaps as usize % snaps.len()].clone(), &deps, &prev);
                current.store(Arc::new(next));
                swaps += 1;
            }
            swaps
        })
    };
    let mut worst = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
    g.bench_function("resolve_while_swapping", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                black_box(resolve(&current.load(), "cap-42"));
                let _ = worst.record(t.elapsed().as_nanos() as u64);
            }
            start.elapsed()
        })
    });
    stop.store(true, Ordering::Relaxed);
    let swaps = writer.join().unwrap();
    eprintln!(
        "snapshot/resolve_while_swapping: reader latency over {} reads during {swaps} swaps: p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        worst.len(),
        worst.value_at_quantile(0.5),
        worst.value_at_quantile(0.99),
        worst.value_at_quantile(0.999),
        worst.max()
    );
    g.finish();
}

fn bench_classify(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    let modern_body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Lisbon"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let legacy_body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Lisbon"}}}"#;
    let mut modern = HeaderMap::new();
    modern.insert("content-type", HeaderValue::from_static("application/json"));
    modern.insert(
        "mcp-protocol-version",
        HeaderValue::from_static("2026-07-28"),
    );
    modern.insert("mcp-method", HeaderValue::from_static("tools/call"));
    modern.insert("mcp-name", HeaderValue::from_static("get_weather"));
    let mut legacy = HeaderMap::new();
    legacy.insert("content-type", HeaderValue::from_static("application/json"));
    legacy.insert(
        "mcp-protocol-version",
        HeaderValue::from_static("2025-11-25"),
    );
    legacy.insert(
        "mcp-session-id",
        HeaderValue::from_static("0123456789abcdef0123456789abcdef"),
    );
    assert_eq!(
        classify(&modern, modern_body).unwrap().name.as_deref(),
        Some("get_weather")
    );
    assert_eq!(
        classify(&legacy, legacy_body).unwrap().name.as_deref(),
        Some("get_weather")
    );
    g.bench_function("with_mcp_name", |b| {
        b.iter(|| classify(black_box(&modern), black_box(modern_body)).is_ok())
    });
    g.bench_function("without_mcp_name", |b| {
        b.iter(|| classify(black_box(&legacy), black_box(legacy_body)).is_ok())
    });
    g.bench_function("route_hint_headers_only", |b| {
        b.iter(|| route_hint(black_box(&modern)).is_some())
    });
    g.finish();
}

criterion_group!(benches, bench_resolve, bench_snapshot, bench_classify);
criterion_main!(benches);
