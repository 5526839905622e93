//! Turns the suite's JSON lines into the Markdown section of `benches/RESULTS.md`: medians over
//! the interleaved rounds, capmesh's added latency and throughput beside nginx's and HAProxy's
//! as ratios, and the DESIGN budgets beside the measurements.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::load::Proto;
use crate::suite::{Idle, Line, Machine, Point, Setup};

/// Median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The medians of one (set-up, path, load, protocol) cell.
#[derive(Debug, Clone, Default)]
struct Cell {
    rounds: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    rps: f64,
    sent: u64,
    errors: u64,
    /// Per instance, % of a core per 1,000 req/s.
    cpu_per_k: Vec<f64>,
    /// Per instance, MiB.
    rss_mib: Vec<f64>,
    step: Option<(f64, f64, f64, f64, f64)>,
    first_error: Option<String>,
}

fn cell(points: &[&Point]) -> Cell {
    let m = |f: &dyn Fn(&Point) -> f64| median(points.iter().map(|p| f(p)).collect());
    let instances = points.iter().map(|p| p.cores.len()).max().unwrap_or(0);
    let cpu_per_k = (0..instances)
        .map(|i| {
            m(&|p: &Point| {
                let k = p.report.achieved_rps / 1000.0;
                p.cores.get(i).copied().unwrap_or(0.0) * 100.0 / k.max(1e-9)
            })
        })
        .collect();
    let rss_mib = (0..instances)
        .map(|i| m(&|p: &Point| p.rss_kib.get(i).copied().unwrap_or(0) as f64 / 1024.0))
        .collect();
    let step = points.first().and_then(|p| p.report.after_step).map(|_| {
        let s = |f: &dyn Fn(&crate::load::Percentiles) -> u64| {
            m(&|p: &Point| p.report.after_step.map_or(0.0, |a| f(&a) as f64 / 1000.0))
        };
        (
            s(&|a| a.p50_us),
            s(&|a| a.p99_us),
            s(&|a| a.p999_us),
            s(&|a| a.max_us),
            m(&|p: &Point| p.report.after_step_over_5ms.unwrap_or(0) as f64),
        )
    });
    Cell {
        rounds: points.len(),
        p50: m(&|p| p.report.latency.p50_us as f64 / 1000.0),
        p90: m(&|p| p.report.latency.p90_us as f64 / 1000.0),
        p99: m(&|p| p.report.latency.p99_us as f64 / 1000.0),
        p999: m(&|p| p.report.latency.p999_us as f64 / 1000.0),
        max: m(&|p| p.report.latency.max_us as f64 / 1000.0),
        rps: m(&|p| p.report.achieved_rps),
        sent: points.iter().map(|p| p.report.sent).sum(),
        errors: points.iter().map(|p| p.report.errors).sum(),
        cpu_per_k,
        rss_mib,
        step,
        first_error: points.iter().find_map(|p| p.report.first_error.clone()),
    }
}

type Key = (String, String, String, String);

struct Data {
    cells: BTreeMap<Key, Cell>,
    idle: Vec<Idle>,
    machines: Vec<Machine>,
}

fn setup_name(s: Setup) -> &'static str {
    match s {
        Setup::Compare => "compare",
        Setup::Defaults => "defaults",
    }
}

impl Data {
    /// The open-loop rates measured, lowest first.
    fn rates(&self) -> Vec<String> {
        let mut r: Vec<(u64, String)> = self
            .cells
            .keys()
            .filter_map(|k| Some((k.2.parse::<u64>().ok()?, k.2.clone())))
            .collect();
        r.sort();
        r.dedup();
        r.into_iter().map(|(_, l)| l).collect()
    }

    fn get(&self, setup: Setup, path: &str, load: &str, proto: Proto) -> Option<&Cell> {
        self.cells.get(&(
            setup_name(setup).to_owned(),
            path.to_owned(),
            load.to_owned(),
            proto.to_string(),
        ))
    }
}

fn load(inputs: &[PathBuf]) -> Result<Data> {
    let mut points: BTreeMap<Key, Vec<Point>> = BTreeMap::new();
    let (mut idle, mut machines) = (vec![], vec![]);
    for path in inputs {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (n, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let line: Line = serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: not a line written by `capmesh-bench suite`",
                    path.display(),
                    n + 1
                )
            })?;
            match line {
                Line::Point(p) => points
                    .entry((
                        setup_name(p.setup).to_owned(),
                        p.path.clone(),
                        p.load.clone(),
                        p.proto.to_string(),
                    ))
                    .or_default()
                    .push(*p),
                Line::Idle(i) => idle.push(i),
                Line::Machine(m) => machines.push(m),
            }
        }
    }
    let cells = points
        .iter()
        .map(|(k, v)| (k.clone(), cell(&v.iter().collect::<Vec<_>>())))
        .collect();
    Ok(Data {
        cells,
        idle,
        machines,
    })
}

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

fn list(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn ratio(a: f64, b: f64) -> String {
    if b.abs() < 1e-9 {
        "–".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// The added-latency budget (capmesh adds at most 0.8 × what nginx adds), judged only where
/// nginx adds something: when the direct path's percentile came out above nginx's (noise at
/// a tail), the ratio of two negative figures says nothing either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Added {
    Met,
    Missed,
    NoReading,
}

impl Added {
    fn text(self) -> &'static str {
        match self {
            Self::Met => verdict(true),
            Self::Missed => verdict(false),
            Self::NoReading => "no reading",
        }
    }
}

fn added_verdict(capmesh_adds: f64, nginx_adds: f64) -> Added {
    if nginx_adds <= 0.0 {
        Added::NoReading
    } else if capmesh_adds <= 0.8 * nginx_adds {
        Added::Met
    } else {
        Added::Missed
    }
}

const PATHS: [&str; 4] = ["direct", "capmesh", "nginx", "haproxy"];

fn latency_table(out: &mut String, d: &Data, setup: Setup, proto: Proto, loads: &[&str]) {
    let _ = writeln!(
        out,
        "| path | load (req/s) | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | achieved req/s | failed / sent | CPU per 1,000 req/s, % of a core (per instance) | RSS MiB (per instance) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for path in PATHS {
        for load in loads {
            if let Some(c) = d.get(setup, path, load, proto) {
                let _ = writeln!(
                    out,
                    "| {path} | {load} | {} | {} | {} | {} | {} | {:.0} | {} / {} | {} | {} |",
                    ms(c.p50),
                    ms(c.p90),
                    ms(c.p99),
                    ms(c.p999),
                    ms(c.max),
                    c.rps,
                    c.errors,
                    c.sent,
                    list(&c.cpu_per_k, 1),
                    list(&c.rss_mib, 1)
                );
            }
        }
    }
}

/// The Markdown section (without the marker comments).
pub fn render(inputs: &[PathBuf]) -> Result<String> {
    let d = load(inputs)?;
    let mut out = String::new();
    let c = Setup::Compare;
    let h1 = Proto::Http1;
    let rates = d.rates();
    let low = rates.first().cloned().unwrap_or_default();
    let high = rates.last().cloned().unwrap_or_default();
    let mut all_loads: Vec<&str> = rates.iter().map(String::as_str).collect();
    all_loads.push("saturation");
    let _ = writeln!(out, "### Machine and set-up of this run\n");
    for m in &d.machines {
        let _ = writeln!(
            out,
            "- `{}`: {} CPUs; proxies, upstream and control plane on CPUs `{}`; load generator on `{}`; TOKIO_WORKER_THREADS={}; load average at start {}{}",
            setup_name(m.setup),
            m.cpus,
            m.sut_cpus,
            m.gen_cpus,
            m.tokio_worker_threads
                .as_deref()
                .unwrap_or("unset (capmesh default)"),
            m.loadavg,
            if m.peers.is_empty() {
                String::new()
            } else {
                format!("; {}", m.peers.join(", "))
            }
        );
    }
    let rounds = d.cells.values().map(|c| c.rounds).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "\nEvery figure is the median over {rounds} interleaved round(s); \"failed / sent\" adds up all rounds.\n"
    );

    // Budgets first: what a reader comes for.
    let _ = writeln!(
        out,
        "### capmesh beside nginx and HAProxy, and the DESIGN budgets\n"
    );
    let _ = writeln!(
        out,
        "Added latency = the path's percentile minus the direct path's, same load, same run (ms).\n\n| load (req/s) | percentile | capmesh adds | nginx adds | HAProxy adds | capmesh ÷ nginx | capmesh ÷ HAProxy | budget: ≤ 0.8 × nginx |\n|---|---|---|---|---|---|---|---|"
    );
    let mut missed: Vec<String> = vec![];
    for load in &rates {
        let load = load.as_str();
        let get = |p: &str| d.get(c, p, load, h1);
        if let (Some(dir), Some(cm), Some(ng), Some(ha)) =
            (get("direct"), get("capmesh"), get("nginx"), get("haproxy"))
        {
            for (name, f) in [
                ("p50", (|c: &Cell| c.p50) as fn(&Cell) -> f64),
                ("p99", |c: &Cell| c.p99),
            ] {
                let (a, n, h) = (f(cm) - f(dir), f(ng) - f(dir), f(ha) - f(dir));
                let judged = added_verdict(a, n);
                match judged {
                    Added::Met => {}
                    Added::Missed => missed.push(format!("added latency {name} at {load} req/s")),
                    Added::NoReading => missed.push(format!(
                        "added latency {name} at {load} req/s (no reading: the direct path's {name} was above nginx's)"
                    )),
                }
                let _ = writeln!(
                    out,
                    "| {load} | {name} | {} | {} | {} | {} | {} | {} |",
                    ms(a),
                    ms(n),
                    ms(h),
                    if judged == Added::NoReading {
                        "–".into()
                    } else {
                        ratio(a, n)
                    },
                    ratio(a, h),
                    judged.text()
                );
            }
        }
    }
    let sat = |p: &str| d.get(c, p, "saturation", h1).map(|c| c.rps);
    if let (Some(cm), Some(ng), Some(ha)) = (sat("capmesh"), sat("nginx"), sat("haproxy")) {
        let best = ng.max(ha);
        let ok = cm >= best;
        if !ok {
            missed.push("throughput at saturation".into());
        }
        let _ = writeln!(
            out,
            "\n| throughput at saturation (req/s, {} HTTP/1.1 workers, closed loop) | capmesh | nginx | HAProxy | capmesh ÷ nginx | capmesh ÷ HAProxy | budget: ≥ the better peer |\n|---|---|---|---|---|---|---|\n| two-hop mutual TLS | {cm:.0} | {ng:.0} | {ha:.0} | {} | {} | {} |",
            crate::suite::SATURATION_WORKERS_DOC,
            ratio(cm, ng),
            ratio(cm, ha),
            verdict(ok)
        );
        if let Some(dir) = sat("direct") {
            let _ = writeln!(
                out,
                "\nDirect (no proxy) at saturation: {dir:.0} req/s; there the generator's own core is the limit."
            );
        }
    }
    // CPU and memory budgets.
    let cpu = |p: &str, load: &str| {
        d.get(c, p, load, h1)
            .map(|c| c.cpu_per_k.iter().copied().fold(0.0, f64::max))
    };
    let rss = |p: &str, load: &str| {
        d.get(c, p, load, h1)
            .map(|c| c.rss_mib.iter().copied().fold(0.0, f64::max))
    };
    let idle = |p: &str| {
        d.idle
            .iter()
            .find(|i| i.setup == c && i.path == p)
            .map(|i| i.rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0)
    };
    let _ = writeln!(
        out,
        "\n| per proxy instance (the busier of the two) | capmesh | nginx | HAProxy | budget | |\n|---|---|---|---|---|---|"
    );
    for load in &rates {
        let load = load.as_str();
        if let (Some(cm), Some(ng), Some(ha)) = (
            cpu("capmesh", load),
            cpu("nginx", load),
            cpu("haproxy", load),
        ) {
            let ok = cm < ng;
            if !ok {
                missed.push(format!("CPU per 1,000 req/s at {load} req/s"));
            }
            let _ = writeln!(
                out,
                "| CPU per 1,000 req/s at {load} req/s (% of a core) | {cm:.1} | {ng:.1} | {ha:.1} | below nginx's | {} |",
                verdict(ok)
            );
        }
    }
    if let (Some(cm), Some(ng), Some(ha)) = (idle("capmesh"), idle("nginx"), idle("haproxy")) {
        let ok = cm <= 10.0;
        if !ok {
            missed.push("idle RSS".into());
        }
        let _ = writeln!(
            out,
            "| RSS idle (MiB) | {cm:.1} | {ng:.1} | {ha:.1} | ≤ 10 MB | {} |",
            verdict(ok)
        );
    }
    if let (Some(cm), Some(ng), Some(ha)) = (
        rss("capmesh", &high),
        rss("nginx", &high),
        rss("haproxy", &high),
    ) {
        let ok = cm <= 25.0;
        if !ok {
            missed.push("RSS under load".into());
        }
        let _ = writeln!(
            out,
            "| RSS at {high} req/s (MiB; the budget is stated at 2,000) | {cm:.1} | {ng:.1} | {ha:.1} | ≤ 25 MB | {} |",
            verdict(ok)
        );
    }
    let step = |p: &str| d.get(c, p, "step", h1).and_then(|c| c.step);
    if let (Some(cm), Some(ng)) = (step("capmesh"), step("nginx")) {
        // No stall (DESIGN); issue 16 sets the bar at HAProxy's count, nginx's without it.
        let ha = step("haproxy");
        let (bar, budget) = match ha {
            Some(h) => (h.4, "≤ HAProxy's"),
            None => (ng.4, "≤ nginx's"),
        };
        let ok = cm.4 <= bar;
        if !ok {
            missed.push("load step (requests over 5 ms)".into());
        }
        let _ = writeln!(
            out,
            "| load step {low} → {high} req/s: requests over 5 ms after the step | {:.0} | {:.0} | {} | {budget} | {} |",
            cm.4,
            ng.4,
            ha.map_or("–".into(), |h| format!("{:.0}", h.4)),
            verdict(ok)
        );
    }
    if let Some(k) = d.get(c, "capmesh-10-kill", &low, h1) {
        let _ = writeln!(
            out,
            "| one of 10 providers SIGKILLed mid-run at {low} req/s: failed calls | {} of {} | | | zero that had not reached it | see below |",
            k.errors, k.sent
        );
    }
    if missed.is_empty() {
        let _ = writeln!(out, "\nBudgets missed in this run: none.");
    } else {
        let _ = writeln!(
            out,
            "\nBudgets missed in this run: {}. The profile and the named cause are under \"Profiles of missed budgets\" below.",
            missed.join("; ")
        );
    }

    let _ = writeln!(
        out,
        "\n### Latency, throughput, CPU and memory (comparison set-up, HTTP/1.1 from the generator)\n\nFor proxies the per-instance columns read `outbound / inbound` (capmesh), `front / back` (nginx, HAProxy); for direct, the echo server.\n"
    );
    latency_table(&mut out, &d, c, h1, &all_loads);
    let _ = writeln!(
        out,
        "\n### HTTP/2 from the generator (prior knowledge, all calls on one connection)\n"
    );
    latency_table(&mut out, &d, c, Proto::Http2, &[low.as_str()]);

    let _ = writeln!(
        out,
        "\n### Load step: {low} → {high} req/s with no warm-up at {high} (fresh pools, first scenario of the run)\n\n| path | after the step: p50 ms | p99 ms | p99.9 ms | max ms | requests over 5 ms | failed / sent (whole run) |\n|---|---|---|---|---|---|---|"
    );
    for path in PATHS {
        if let Some(cl) = d.get(c, path, "step", h1)
            && let Some(s) = cl.step
        {
            let _ = writeln!(
                out,
                "| {path} | {} | {} | {} | {} | {:.0} | {} / {} |",
                ms(s.0),
                ms(s.1),
                ms(s.2),
                ms(s.3),
                s.4,
                cl.errors,
                cl.sent
            );
        }
    }

    let _ = writeln!(
        out,
        "\n### Balancing over 2 and 10 providers, and a provider killed mid-run\n\nCPU and RSS columns: the consumer's outbound proxy first, then each provider's inbound proxy.\n\n| scenario | load (req/s) | p50 ms | p99 ms | p99.9 ms | achieved req/s | failed / sent | CPU per 1,000 req/s (% of a core) | RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
    );
    for path in ["capmesh", "capmesh-2", "capmesh-10", "capmesh-10-kill"] {
        for load in &all_loads {
            if let Some(cl) = d.get(c, path, load, h1) {
                let _ = writeln!(
                    out,
                    "| {path} | {load} | {} | {} | {} | {:.0} | {} / {} | {} | {} |",
                    ms(cl.p50),
                    ms(cl.p99),
                    ms(cl.p999),
                    cl.rps,
                    cl.errors,
                    cl.sent,
                    list(&cl.cpu_per_k, 1),
                    list(&cl.rss_mib, 1)
                );
            }
        }
    }
    if let (Some(one), Some(ten)) = (
        d.get(c, "capmesh", &high, h1),
        d.get(c, "capmesh-10", &high, h1),
    ) && one.p99 > 0.0
    {
        let ratio = ten.p99 / one.p99;
        let verdict = if ratio <= 1.5 { "met" } else { "**missed**" };
        let _ = writeln!(
            out,
            "\n10 providers at {high} req/s: p99 {} ms against {} ms with one, {ratio:.2}× (budget: ≤ 1.5×): {verdict}. Medians over {} and {} round(s).",
            ms(ten.p99),
            ms(one.p99),
            ten.rounds,
            one.rounds
        );
    }
    if let Some(k) = d.get(c, "capmesh-10-kill", &low, h1)
        && let Some(e) = &k.first_error
    {
        let _ = writeln!(out, "\nFirst failed call in the kill run: `{e}`.");
    }

    if d.machines.iter().any(|m| m.setup == Setup::Defaults) {
        let _ = writeln!(
            out,
            "\n### capmesh with its defaults (worker threads = CPUs, proxies not pinned; generator still on its own CPU)\n"
        );
        latency_table(&mut out, &d, Setup::Defaults, h1, &all_loads);
    }
    let failed: Vec<String> = d
        .cells
        .iter()
        .filter(|(k, c)| c.errors > 0 && !k.1.ends_with("-kill"))
        .map(|(k, c)| {
            format!(
                "{} {} {}: {} failed ({})",
                k.1,
                k.2,
                k.3,
                c.errors,
                c.first_error.as_deref().unwrap_or("?")
            )
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(
            out,
            "\nCalls failed where none should: {}",
            failed.join("; ")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{Added, added_verdict, median};

    #[test]
    fn added_latency_is_judged_only_where_nginx_adds_some() {
        assert_eq!(added_verdict(0.10, 0.15), Added::Met);
        assert_eq!(added_verdict(0.25, 0.15), Added::Missed);
        // The run of 2026-12-07 19:44: the direct path's p99 above every proxy's.
        assert_eq!(added_verdict(-0.470, -0.161), Added::NoReading);
        assert_eq!(added_verdict(0.1, 0.0), Added::NoReading);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
