//! Load balancing across a capability's endpoints: ranking them by a consumer's selector, the
//! runtime state kept per endpoint (peak-EWMA latency, requests in flight, circuit breaker),
//! picking one by power of two choices with fallback to lower ranks, and the retry budget.
//!
//! Modelled on linkerd2-proxy's `pool/p2c` and tower's peak-EWMA. It does not send requests,
//! decide which failures are retryable, or hold the endpoint map: the caller keeps one
//! `Arc<EndpointStats>` per [`EndpointId`] across snapshot updates and reports each outcome.

use std::borrow::Borrow;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capmesh_api::{Endpoint, EndpointId, Selector};

use crate::backoff::random_below;
use crate::breaker::{Admission, Breaker, BreakerConfig, ticks};

/// How fast old latency samples lose weight (τ of the exponential decay).
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint never observed, so that new endpoints get traffic.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// The least latency an overloaded (429) or unavailable answer counts as, so P2C steers away.
const PENALTY: Duration = Duration::from_millis(500);

/// How one request to an endpoint ended, as the balancer and breaker see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response the endpoint served (including MCP errors inside a 200).
    Success,
    /// HTTP 429: the endpoint works but sheds load. Counts as a slow answer (at least 500 ms),
    /// not as a breaker failure.
    Overloaded,
    /// HTTP 5xx other than a 503 refused before processing: a breaker failure.
    ServerError,
    /// Connect or TLS failure, 503, or a reset before response headers: a breaker failure and
    /// a slow answer (at least 500 ms).
    Unavailable,
}

/// The runtime state of one endpoint: its peak-EWMA latency, its requests in flight and its
/// circuit breaker. Shared by `Arc`; every method takes `&self` and no lock.
///
/// The latency estimate follows tower's peak-EWMA: a sample above the estimate replaces it at
/// once (the peak); a lower one is blended in with weight `1 - e^(-elapsed/τ)`, elapsed being
/// the time since the last sample and τ = 10 s. Between samples the estimate read by
/// [`EndpointStats::cost`] decays toward zero with the same τ, so an endpoint that was slow or
/// penalized gets tried again instead of starving.
#[derive(Debug)]
pub struct EndpointStats {
    /// [`UNOBSERVED`], or the estimate in nanoseconds as `f32` bits (high half) and the time of
    /// the last sample in wrapping milliseconds (low half): one word, updated by
    /// compare-and-swap.
    rtt: AtomicU64,
    in_flight: AtomicU32,
    breaker: Breaker,
}

const UNOBSERVED: u64 = u64::MAX;

fn pack(estimate_ns: f64, stamp: u32) -> u64 {
    (u64::from((estimate_ns as f32).to_bits()) << 32) | u64::from(stamp)
}

fn unpack(word: u64) -> (f64, u32) {
    (f64::from(f32::from_bits((word >> 32) as u32)), word as u32)
}

/// `now` in milliseconds, wrapping at 2³² (49 days).
fn stamp(now: Instant) -> u32 {
    (ticks(now) / 1_000_000) as u32
}

/// Milliseconds from `earlier` to `later`; negative when `later` is the earlier (racing
/// updates). Gaps beyond 24 days read wrong, which only delays an idle endpoint's decay.
fn elapsed_ms(earlier: u32, later: u32) -> i32 {
    later.wrapping_sub(earlier) as i32
}

/// `e^(-elapsed/τ)`: the weight an estimate keeps after `elapsed_ms`.
fn decay(elapsed_ms: i32) -> f64 {
    if elapsed_ms <= 0 {
        return 1.0;
    }
    (-f64::from(elapsed_ms) / DECAY.as_millis() as f64).exp()
}

impl EndpointStats {
    /// Fresh state: never observed, nothing in flight, the breaker closed.
    pub fn new(config: BreakerConfig) -> Self {
        EndpointStats {
            rtt: AtomicU64::new(UNOBSERVED),
            in_flight: AtomicU32::new(0),
            breaker: Breaker::new(config),
        }
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: Arc::clone(self),
            started: Instant::now(),
        }
    }

    /// Records how a request ended, `rtt` after it was sent; returns true when this ejected the
    /// endpoint (log it once). See [`Outcome`] for what each outcome feeds.
    pub fn observe(&self, outcome: Outcome, rtt: Duration) -> bool {
        self.observe_at(outcome, rtt, Instant::now())
    }

    /// [`EndpointStats::observe`] with the clock read by the caller.
    pub fn observe_at(&self, outcome: Outcome, rtt: Duration, now: Instant) -> bool {
        self.settle(outcome, rtt, true, now)
    }

    /// What [`EndpointStats::observe_at`] does; a success that is not `sampled` closes the
    /// breaker but gives no latency sample (penalties still apply to the other outcomes).
    fn settle(&self, outcome: Outcome, rtt: Duration, sampled: bool, now: Instant) -> bool {
        match outcome {
            Outcome::Success => {
                if sampled {
                    self.record(rtt, now);
                }
                self.breaker.on_success();
                false
            }
            Outcome::Overloaded => {
                self.record(rtt.max(PENALTY), now);
                false
            }
            Outcome::ServerError => self.breaker.on_failure(now),
            Outcome::Unavailable => {
                self.record(rtt.max(PENALTY), now);
                self.breaker.on_failure(now)
            }
        }
    }

    /// Folds one latency sample into the peak-EWMA estimate.
    fn record(&self, sample: Duration, now: Instant) {
        let sample_ns = sample.as_nanos() as f64;
        let stamp = stamp(now);
        let mut current = self.rtt.load(Ordering::Relaxed);
        loop {
            let next = if current == UNOBSERVED {
                pack(sample_ns, stamp)
            } else {
                let (estimate, at) = unpack(current);
                let elapsed = elapsed_ms(at, stamp);
                let at = if elapsed < 0 { at } else { stamp };
                if sample_ns > estimate {
                    pack(sample_ns, at)
                } else {
                    let w = decay(elapsed);
                    pack(estimate * w + sample_ns * (1.0 - w), at)
                }
            };
            match self.rtt.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// The latency estimate at `now` in nanoseconds (decayed since the last sample), or `None`
    /// for an endpoint never observed.
    pub fn estimate(&self, now: Instant) -> Option<f64> {
        let word = self.rtt.load(Ordering::Relaxed);
        if word == UNOBSERVED {
            return None;
        }
        let (estimate, at) = unpack(word);
        Some(estimate * decay(elapsed_ms(at, stamp(now))))
    }

    /// The load P2C compares: the latency estimate at `now` in nanoseconds, times requests in
    /// flight plus one. An endpoint never observed counts 1 ms here; [`pick`] instead takes it
    /// to be as fast as the endpoint it is compared with.
    pub fn cost(&self, now: Instant) -> f64 {
        let estimate = self.estimate(now).unwrap_or(DEFAULT_RTT.as_nanos() as f64);
        estimate * f64::from(self.in_flight().saturating_add(1))
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The endpoint's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats::new(BreakerConfig::default())
    }
}

/// A request in flight to one endpoint ([`EndpointStats::start`]); the count drops with it.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight {
    stats: Arc<EndpointStats>,
    started: Instant,
}

impl InFlight {
    /// The endpoint's state.
    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.stats
    }

    /// When the request started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Ends the request, observing `outcome` with the time since it started less `setup` (what
    /// it waited for its connection to open, which says nothing of the endpoint's speed);
    /// returns true when this ejected the endpoint. An answer that is not `sampled` (one of the
    /// first on a new connection, [`crate::pool::Warming`]) counts for the breaker, and as a
    /// penalty when it failed, but gives no latency sample.
    pub fn finish(self, outcome: Outcome, setup: Duration, sampled: bool) -> bool {
        let now = Instant::now();
        let rtt = now
            .saturating_duration_since(self.started)
            .saturating_sub(setup);
        self.stats.settle(outcome, rtt, sampled, now)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ranks a capability's endpoints for a selector: healthy endpoints the selector accepts,
/// grouped by score, best first; each group sorted by id so the result is deterministic.
///
/// The result depends only on the snapshot and the selector, so callers compute it once per
/// snapshot and pass it to [`pick`] on every request.
pub fn rank<E: Borrow<Endpoint>>(
    endpoints: impl IntoIterator<Item = E>,
    selector: &Selector,
) -> Vec<Vec<E>> {
    let mut scored: Vec<(u32, E)> = endpoints
        .into_iter()
        .filter(|e| e.borrow().healthy)
        .filter_map(|e| {
            let ep = e.borrow();
            Some((selector.matches(&ep.tags, ep.version.as_ref())?, e))
        })
        .collect();
    scored.sort_by(|(sa, a), (sb, b)| sb.cmp(sa).then_with(|| a.borrow().id.cmp(&b.borrow().id)));
    let mut ranks: Vec<Vec<E>> = Vec::new();
    let mut current = None;
    for (score, endpoint) in scored {
        match ranks.last_mut() {
            Some(group) if current == Some(score) => group.push(endpoint),
            _ => {
                ranks.push(vec![endpoint]);
                current = Some(score);
            }
        }
    }
    ranks
}

/// An endpoint that may take the request, with what is needed to compare and admit it.
struct Candidate<'a, E> {
    endpoint: &'a E,
    stats: Option<Arc<EndpointStats>>,
    /// Half-open: the request must claim the probe first.
    probe: bool,
}

impl<E> Candidate<'_, E> {
    /// The latency estimate, `None` for an endpoint never observed.
    fn estimate(&self, now: Instant) -> Option<f64> {
        self.stats.as_ref().and_then(|s| s.estimate(now))
    }

    fn in_flight(&self) -> u32 {
        self.stats.as_ref().map_or(0, |s| s.in_flight())
    }
}

/// `endpoint` as a candidate, or `None` when excluded or blocked by its breaker. An endpoint
/// without stats has never been used and counts as ready.
fn candidate<'a, E: Borrow<Endpoint>>(
    endpoint: &'a E,
    stats: &impl Fn(&EndpointId) -> Option<Arc<EndpointStats>>,
    exclude: &[EndpointId],
    now: Instant,
) -> Option<Candidate<'a, E>> {
    let id = &endpoint.borrow().id;
    if exclude.contains(id) {
        return None;
    }
    let stats = stats(id);
    let probe = match stats.as_ref().map(|s| s.breaker().admission(now)) {
        None | Some(Admission::Ready) => false,
        Some(Admission::Probe) => true,
        Some(Admission::Blocked(_)) => return None,
    };
    Some(Candidate {
        endpoint,
        stats,
        probe,
    })
}

/// Power of two choices: the cheaper of two (ties to the first, itself drawn at random).
///
/// The cost is the latency estimate times requests in flight plus one. An endpoint never
/// observed is taken to be as fast as the other (a neutral first estimate): a new endpoint
/// gets its share at once instead of waiting until the known one looks slow, and its requests
/// in flight still count, so a burst is not all sent to it before its first answer.
fn cheaper<'a, E>(a: Candidate<'a, E>, b: Candidate<'a, E>, now: Instant) -> Candidate<'a, E> {
    let (ea, eb) = match (a.estimate(now), b.estimate(now)) {
        (Some(x), Some(y)) => (x, y),
        (Some(x), None) => (x, x),
        (None, Some(y)) => (y, y),
        (None, None) => (1.0, 1.0),
    };
    let cost_a = ea * f64::from(a.in_flight().saturating_add(1));
    let cost_b = eb * f64::from(b.in_flight().saturating_add(1));
    if cost_b < cost_a { b } else { a }
}

/// P2C within one rank: two distinct random candidates, the cheaper wins.
fn choose<'a, E: Borrow<Endpoint>>(
    rank: &'a [E],
    stats: &impl Fn(&EndpointId) -> Option<Arc<EndpointStats>>,
    exclude: &[EndpointId],
    now: Instant,
) -> Option<Candidate<'a, E>> {
    let n = rank.len();
    if n <= 1 {
        return candidate(rank.first()?, stats, exclude, now);
    }
    // Usual case: two random endpoints, both usable; two stats lookups in all.
    let a = random_below(n);
    let b = (a + 1 + random_below(n - 1)) % n;
    let first = candidate(&rank[a], stats, exclude, now);
    let second = candidate(&rank[b], stats, exclude, now);
    if let (Some(first), Some(second)) = (first, second) {
        return Some(cheaper(first, second, now));
    }
    // Some are excluded or ejected: one pass of reservoir sampling draws two distinct usable
    // endpoints uniformly, without allocating.
    let mut picked: [Option<Candidate<'a, E>>; 2] = [None, None];
    let mut seen = 0usize;
    for endpoint in rank {
        let Some(c) = candidate(endpoint, stats, exclude, now) else {
            continue;
        };
        let slot = if seen < 2 {
            seen
        } else {
            random_below(seen + 1)
        };
        if let Some(place) = picked.get_mut(slot) {
            *place = Some(c);
        }
        seen += 1;
    }
    match picked {
        [Some(a), Some(b)] => Some(cheaper(a, b, now)),
        [a, b] => a.or(b),
    }
}

/// Picks the endpoint for one request (or retry).
///
/// Walks `ranks` best first; the first rank with an available endpoint (not in `exclude`, its
/// breaker closed or half-open with the probe free) serves, by power of two choices over
/// latency estimate × requests in flight. That is how `+claude` falls back to `openai`. A
/// half-open pick claims the endpoint's single probe. When no endpoint is available anywhere,
/// the one whose ejection ends soonest is returned anyway: never eject below one ready
/// endpoint. `None` only when every endpoint is excluded, or there are none.
pub fn pick<'a, E: Borrow<Endpoint>>(
    ranks: &'a [Vec<E>],
    stats: &impl Fn(&EndpointId) -> Option<Arc<EndpointStats>>,
    exclude: &[EndpointId],
    now: Instant,
) -> Option<&'a E> {
    for rank in ranks {
        // A lost probe race blocks that endpoint, so each retry has one fewer candidate.
        for _ in 0..=rank.len() {
            let Some(chosen) = choose(rank, stats, exclude, now) else {
                break;
            };
            match &chosen.stats {
                Some(s) if chosen.probe && !s.breaker().try_probe(now) => continue,
                _ => return Some(chosen.endpoint),
            }
        }
    }
    soonest_ready(ranks, stats, exclude, now)
}

/// The non-excluded endpoint whose ejection ends first (better ranks win ties).
fn soonest_ready<'a, E: Borrow<Endpoint>>(
    ranks: &'a [Vec<E>],
    stats: &impl Fn(&EndpointId) -> Option<Arc<EndpointStats>>,
    exclude: &[EndpointId],
    now: Instant,
) -> Option<&'a E> {
    let mut best: Option<(&'a E, i64)> = None;
    for endpoint in ranks.iter().flatten() {
        let id = &endpoint.borrow().id;
        if exclude.contains(id) {
            continue;
        }
        let ready_at = match stats(id).map(|s| s.breaker().admission(now)) {
            Some(Admission::Blocked(at)) => at,
            _ => i64::MIN,
        };
        if best.is_none_or(|(_, best_at)| ready_at < best_at) {
            best = Some((endpoint, ready_at));
        }
    }
    best.map(|(endpoint, _)| endpoint)
}

/// How many slots of one second the retry budget remembers.
const BUDGET_SLOTS: usize = 10;
/// One retry, in budget units; a request deposits `percent` units.
const RETRY_COST: i64 = 100;

/// Limits retries to a share of requests plus a small floor, so retries cannot multiply load
/// when an upstream struggles (as Finagle's and linkerd's retry budgets do).
///
/// Each request [`deposits`](RetryBudget::deposit) `percent / 100` of a retry, each retry
/// [withdraws](RetryBudget::try_withdraw) one, and on top a reserve of `min_per_sec × 10`
/// retries is always there. Deposits and withdrawals are kept in ten one-second slots and
/// forgotten after about 10 s: in any 10 s window at most `min_per_sec × 10` retries plus
/// `percent` % of that window's requests go. Lock-free; racing withdrawals may overdraw by a
/// retry or two.
#[derive(Debug)]
pub struct RetryBudget {
    /// Per slot: the second it holds (high half) and its balance in units (low half, `i32`).
    slots: [AtomicU64; BUDGET_SLOTS],
    /// Units a request deposits (`percent`).
    deposit_units: AtomicI32,
    /// Units always there (`min_per_sec` × 10 retries).
    reserve: AtomicI64,
    origin: Instant,
}

impl RetryBudget {
    /// A budget of `percent` % of requests (up to 10 000 %) plus `min_per_sec` retries a second.
    pub fn new(percent: u32, min_per_sec: u32) -> Self {
        let budget = RetryBudget {
            slots: std::array::from_fn(|_| AtomicU64::new(budget_slot(u32::MAX, 0))),
            deposit_units: AtomicI32::new(0),
            reserve: AtomicI64::new(0),
            origin: Instant::now(),
        };
        budget.set(percent, min_per_sec);
        budget
    }

    /// Changes the share and the floor (the mesh settings changed); what was deposited stays.
    pub fn set(&self, percent: u32, min_per_sec: u32) {
        let units = i32::try_from(percent.min(10_000)).unwrap_or(10_000);
        self.deposit_units.store(units, Ordering::Relaxed);
        let reserve = i64::from(min_per_sec) * BUDGET_SLOTS as i64 * RETRY_COST;
        self.reserve.store(reserve, Ordering::Relaxed);
    }

    /// Records an original request (not a retry).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`RetryBudget::deposit`] with the clock read by the caller.
    pub fn deposit_at(&self, now: Instant) {
        let units = self.deposit_units.load(Ordering::Relaxed);
        if units > 0 {
            self.add(now, units);
        }
    }

    /// Takes one retry from the budget; false when none is left (do not retry).
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    /// [`RetryBudget::try_withdraw`] with the clock read by the caller.
    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let second = self.second(now);
        let recent: i64 = self
            .slots
            .iter()
            .map(|slot| budget_unslot(slot.load(Ordering::Acquire)))
            .filter(|(at, _)| (second.wrapping_sub(*at) as i32) < BUDGET_SLOTS as i32)
            .map(|(_, balance)| i64::from(balance))
            .sum();
        if self.reserve.load(Ordering::Relaxed) + recent < RETRY_COST {
            return false;
        }
        self.add(now, -(RETRY_COST as i32));
        true
    }

    fn second(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin).as_secs() as u32
    }

    /// Adds `units` to the slot of `now`'s second, clearing what the slot held from 10 s ago.
    fn add(&self, now: Instant, units: i32) {
        let second = self.second(now);
        let slot = &self.slots[second as usize % BUDGET_SLOTS];
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (at, balance) = budget_unslot(current);
            // A slot already on a later second (a caller with an old clock) is added to as is.
            let next = if second.wrapping_sub(at) as i32 <= 0 {
                budget_slot(at, balance.saturating_add(units))
            } else {
                budget_slot(second, units)
            };
            match slot.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 retries a second.
    fn default() -> Self {
        RetryBudget::new(20, 10)
    }
}

fn budget_slot(second: u32, balance: i32) -> u64 {
    (u64::from(second) << 32) | u64::from(balance as u32)
}

fn budget_unslot(word: u64) -> (u32, i32) {
    ((word >> 32) as u32, word as u32 as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capmesh_api::{AgentName, Capability, Namespace, Tag};
    use std::collections::HashMap;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn endpoint(agent: &str, tags: &[&str], version: Option<&str>) -> Endpoint {
        let namespace = Namespace::new("default").unwrap();
        let agent_name = AgentName::new(agent).unwrap();
        Endpoint {
            id: EndpointId::new(&namespace, &agent_name, "p1", "chat"),
            agent: agent_name,
            namespace,
            instance: "p1".to_owned(),
            identity: format!("spiffe://capmesh.local/ns/default/agent/{agent}"),
            address: format!("{agent}:15006"),
            zone: None,
            capability: Capability::new("chat").unwrap(),
            function: "chat".to_owned(),
            version: version.map(|v| semver::Version::parse(v).unwrap()),
            tags: tags.iter().map(|t| Tag::new(*t).unwrap()).collect(),
            description: None,
            input_schema: None,
            healthy: true,
        }
    }

    fn names(ranks: &[Vec<&Endpoint>]) -> Vec<Vec<String>> {
        ranks
            .iter()
            .map(|r| r.iter().map(|e| e.agent.to_string()).collect())
            .collect()
    }

    /// Stats for each endpoint, looked up the way the proxy does.
    struct Table(HashMap<EndpointId, Arc<EndpointStats>>);

    impl Table {
        fn new(endpoints: &[Endpoint]) -> Self {
            Table(
                endpoints
                    .iter()
                    .map(|e| (e.id.clone(), Arc::new(EndpointStats::default())))
                    .collect(),
            )
        }
        fn get(&self, e: &Endpoint) -> &Arc<EndpointStats> {
            &self.0[&e.id]
        }
        fn lookup(&self) -> impl Fn(&EndpointId) -> Option<Arc<EndpointStats>> + '_ {
            |id| self.0.get(id).cloned()
        }
        /// Ejects `e` at `now`; returns when the ejection ends.
        fn eject(&self, e: &Endpoint, now: Instant) -> Instant {
            let stats = self.get(e);
            while !stats.observe_at(Outcome::ServerError, MS, now) {}
            match stats.breaker().state(now) {
                crate::breaker::BreakerState::Open { until } => until,
                other => panic!("not ejected: {other:?}"),
            }
        }
    }

    #[test]
    fn rank_groups_by_preferred_tags_and_drops_the_rest() {
        let mut sick = endpoint("sick", &["claude"], None);
        sick.healthy = false;
        let endpoints = [
            endpoint("openai-b", &["openai"], None),
            endpoint("claude-b", &["claude", "fast"], None),
            endpoint("claude-a", &["claude"], None),
            endpoint("openai-a", &["openai"], None),
            endpoint("slow", &["claude", "slow"], None),
            endpoint("fast", &["claude", "fast"], None),
            sick,
        ];
        let selector: Selector = "+claude,+fast,-slow".parse().unwrap();
        assert_eq!(
            names(&rank(&endpoints, &selector)),
            [
                vec!["claude-b", "fast"],
                vec!["claude-a"],
                vec!["openai-a", "openai-b"]
            ]
        );
        let required: Selector = "claude".parse().unwrap();
        assert_eq!(
            names(&rank(&endpoints, &required)),
            [vec!["claude-a", "claude-b", "fast", "slow"]]
        );
        assert!(rank(&endpoints, &"gemini".parse().unwrap()).is_empty());
    }

    #[test]
    fn rank_applies_version_requirements() {
        let endpoints = [
            endpoint("old", &[], Some("1.1.0")),
            endpoint("new", &["claude"], Some("1.4.2")),
            endpoint("next", &[], Some("2.0.0")),
            endpoint("none", &[], None),
        ];
        let selector: Selector = "+claude,>=1.2,<2".parse().unwrap();
        assert_eq!(names(&rank(&endpoints, &selector)), [vec!["new"]]);
        let any = Selector::default();
        assert_eq!(
            names(&rank(&endpoints, &any)),
            [vec!["new", "next", "none", "old"]]
        );
    }

    #[test]
    fn pick_serves_from_the_best_rank_and_falls_back() {
        let endpoints = [
            endpoint("claude-a", &["claude"], None),
            endpoint("claude-b", &["claude"], None),
            endpoint("openai", &["openai"], None),
        ];
        let ranks = rank(&endpoints, &"+claude".parse().unwrap());
        let table = Table::new(&endpoints);
        let stats = table.lookup();
        let now = Instant::now();
        for _ in 0..100 {
            let chosen = pick(&ranks, &stats, &[], now).unwrap();
            assert!(chosen.tags.iter().any(|t| t.as_str() == "claude"));
        }
        // One Claude endpoint ejected: the other serves alone.
        table.eject(&endpoints[0], now);
        for _ in 0..100 {
            assert_eq!(
                pick(&ranks, &stats, &[], now).unwrap().agent.as_str(),
                "claude-b"
            );
        }
        // The other excluded (a retry): OpenAI serves.
        let exclude = [endpoints[1].id.clone()];
        assert_eq!(
            pick(&ranks, &stats, &exclude, now).unwrap().agent.as_str(),
            "openai"
        );
        // Both Claude endpoints ejected: OpenAI serves.
        table.eject(&endpoints[1], now);
        assert_eq!(
            pick(&ranks, &stats, &[], now).unwrap().agent.as_str(),
            "openai"
        );
        // Everything excluded: nothing.
        let all: Vec<EndpointId> = endpoints.iter().map(|e| e.id.clone()).collect();
        assert!(pick(&ranks, &stats, &all, now).is_none());
        assert!(pick::<&Endpoint>(&[], &stats, &[], now).is_none());
    }

    #[test]
    fn pick_never_ejects_below_one_endpoint() {
        let endpoints = [endpoint("a", &[], None), endpoint("b", &[], None)];
        let ranks = rank(&endpoints, &Selector::default());
        let table = Table::new(&endpoints);
        let stats = table.lookup();
        let now = Instant::now();
        let until_a = table.eject(&endpoints[0], now);
        let until_b = table.eject(&endpoints[1], now);
        let soonest = if until_a <= until_b { "a" } else { "b" };
        for _ in 0..10 {
            assert_eq!(
                pick(&ranks, &stats, &[], now).unwrap().agent.as_str(),
                soonest
            );
        }
        // Excluding the soonest leaves the other.
        let exclude = [if soonest == "a" {
            &endpoints[0]
        } else {
            &endpoints[1]
        }
        .id
        .clone()];
        assert_ne!(
            pick(&ranks, &stats, &exclude, now).unwrap().agent.as_str(),
            soonest
        );
    }

    #[test]
    fn p2c_favours_cheap_endpoints_without_starving_others() {
        let endpoints = [
            endpoint("fast", &[], None),
            endpoint("medium", &[], None),
            endpoint("slow", &[], None),
        ];
        let ranks = rank(&endpoints, &Selector::default());
        let table = Table::new(&endpoints);
        let now = Instant::now();
        for (e, rtt) in endpoints.iter().zip([MS, 10 * MS, 100 * MS]) {
            table.get(e).observe_at(Outcome::Success, rtt, now);
        }
        let stats = table.lookup();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..10_000 {
            let e = pick(&ranks, &stats, &[], now).unwrap();
            *counts.entry(e.agent.to_string()).or_default() += 1;
        }
        // Uniform pairs: fast wins 2/3 of them, medium 1/3, slow none.
        let fast = counts.get("fast").copied().unwrap_or(0);
        let medium = counts.get("medium").copied().unwrap_or(0);
        assert!((6_000..7_300).contains(&fast), "{counts:?}");
        assert!((2_700..4_000).contains(&medium), "{counts:?}");
        assert_eq!(counts.get("slow"), None, "{counts:?}");
    }

    #[test]
    fn a_new_endpoint_takes_its_share_at_once() {
        // A known endpoint answering in 0.2 ms and a new one never observed. With a pessimistic
        // first estimate (1 ms) the new one would lose every comparison until the known one
        // looked slow; with the neutral estimate it is as fast as the one it is compared with.
        let endpoints = [endpoint("known", &[], None), endpoint("new", &[], None)];
        let ranks = rank(&endpoints, &Selector::default());
        let table = Table::new(&endpoints);
        let now = Instant::now();
        table
            .get(&endpoints[0])
            .observe_at(Outcome::Success, Duration::from_micros(200), now);
        let stats = table.lookup();
        let mut new = 0;
        for _ in 0..1_000 {
            if pick(&ranks, &stats, &[], now).unwrap().agent.as_str() == "new" {
                new += 1;
            }
        }
        assert!(
            (400..600).contains(&new),
            "the new endpoint got {new} of 1000"
        );
        // Its requests in flight count: a burst does not all go to it before it answers.
        let mut guards = Vec::new();
        let mut burst_new = 0;
        for _ in 0..100 {
            let e = pick(&ranks, &stats, &[], now).unwrap();
            if e.agent.as_str() == "new" {
                burst_new += 1;
            }
            guards.push(table.get(e).start());
        }
        assert!(
            (30..70).contains(&burst_new),
            "{burst_new} of a burst of 100"
        );
    }

    #[test]
    fn a_warming_answer_counts_for_the_breaker_but_gives_no_latency_sample() {
        // A known endpoint answering in 1 ms, and a new one whose first answer, on a fresh
        // connection, took 30 ms: the provider was opening its own connections.
        let endpoints = [endpoint("known", &[], None), endpoint("new", &[], None)];
        let ranks = rank(&endpoints, &Selector::default());
        let table = Table::new(&endpoints);
        table
            .get(&endpoints[0])
            .observe(Outcome::Success, Duration::from_millis(1));
        let first = table.get(&endpoints[1]).start();
        std::thread::sleep(Duration::from_millis(30));
        first.finish(Outcome::Success, Duration::ZERO, false);
        assert_eq!(table.get(&endpoints[1]).estimate(Instant::now()), None);
        let (stats, now) = (table.lookup(), Instant::now());
        let new = (0..1_000)
            .filter(|_| pick(&ranks, &stats, &[], now).unwrap().agent.as_str() == "new")
            .count();
        assert!(
            (300..=700).contains(&new),
            "the new endpoint got {new} of 1000"
        );
        // A failed warming answer still counts against it.
        let failed = table.get(&endpoints[1]).start();
        failed.finish(Outcome::Unavailable, Duration::ZERO, false);
        assert!(table.get(&endpoints[1]).estimate(Instant::now()).unwrap() >= 5e8 * 0.99);
    }

    #[test]
    fn the_wait_for_a_new_connection_does_not_count_against_an_endpoint() {
        // A known endpoint answering in 1 ms, and a new one whose first request waited 30 ms
        // for its connection to open (the TLS handshake) and was then answered at once.
        let endpoints = [endpoint("known", &[], None), endpoint("new", &[], None)];
        let ranks = rank(&endpoints, &Selector::default());
        let share = |setup_left_out: bool| {
            let table = Table::new(&endpoints);
            table
                .get(&endpoints[0])
                .observe(Outcome::Success, Duration::from_millis(1));
            let first = table.get(&endpoints[1]).start();
            let began = Instant::now();
            std::thread::sleep(Duration::from_millis(30));
            let setup = began.elapsed();
            first.finish(
                Outcome::Success,
                if setup_left_out {
                    setup
                } else {
                    Duration::ZERO
                },
                true,
            );
            let (stats, now) = (table.lookup(), Instant::now());
            (0..1_000)
                .filter(|_| pick(&ranks, &stats, &[], now).unwrap().agent.as_str() == "new")
                .count()
        };
        let new = share(true);
        assert!(
            (400..=1_000).contains(&new),
            "the new endpoint got {new} of 1000"
        );
        // Counted in, the handshake makes it the slower one: it would get nothing.
        assert_eq!(share(false), 0);
    }

    #[test]
    fn requests_in_flight_spread_load_by_latency() {
        let endpoints = [endpoint("fast", &[], None), endpoint("slow", &[], None)];
        let ranks = rank(&endpoints, &Selector::default());
        let table = Table::new(&endpoints);
        let now = Instant::now();
        table
            .get(&endpoints[0])
            .observe_at(Outcome::Success, MS, now);
        table
            .get(&endpoints[1])
            .observe_at(Outcome::Success, 10 * MS, now);
        let stats = table.lookup();
        let mut guards = Vec::new();
        for _ in 0..10_000 {
            let e = pick(&ranks, &stats, &[], now).unwrap();
            guards.push(table.get(e).start());
        }
        let fast = table.get(&endpoints[0]).in_flight();
        let slow = table.get(&endpoints[1]).in_flight();
        // Costs even out at about 10 : 1.
        assert!((8_500..9_500).contains(&fast), "{fast} vs {slow}");
        assert!(slow > 500, "{fast} vs {slow}");
        drop(guards);
        assert_eq!(table.get(&endpoints[0]).in_flight(), 0);
    }

    #[test]
    fn a_half_open_endpoint_gets_exactly_one_probe() {
        let endpoints = [endpoint("healed", &[], None), endpoint("steady", &[], None)];
        let ranks = rank(&endpoints, &Selector::default());
        let table = Table::new(&endpoints);
        let now = Instant::now();
        // "healed" stays the cheaper (never timed), so only its breaker keeps traffic away.
        table
            .get(&endpoints[1])
            .observe_at(Outcome::Success, 100 * MS, now);
        let until = table.eject(&endpoints[0], now);
        let later = until + MS;
        let probes: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let stats = table.lookup();
                        (0..1_000)
                            .filter_map(|_| pick(&ranks, &stats, &[], later))
                            .filter(|e| e.agent.as_str() == "healed")
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(probes, 1);
        // The probe succeeds: traffic returns.
        let healed = table.get(&endpoints[0]);
        healed.observe_at(Outcome::Success, MS, later);
        let stats = table.lookup();
        assert_eq!(
            pick(&ranks, &stats, &[], later).unwrap().agent.as_str(),
            "healed"
        );
    }

    #[test]
    fn ewma_takes_peaks_at_once_and_decays() {
        let stats = EndpointStats::default();
        let t0 = Instant::now();
        let ms = |cost: f64| cost / 1e6;
        assert!(
            (ms(stats.cost(t0)) - 1.0).abs() < 1e-6,
            "never observed: 1 ms"
        );
        stats.observe_at(Outcome::Success, 10 * MS, t0);
        assert!((ms(stats.cost(t0)) - 10.0).abs() < 1e-3);
        stats.observe_at(Outcome::Success, 100 * MS, t0);
        assert!((ms(stats.cost(t0)) - 100.0).abs() < 1e-3, "a peak replaces");
        // A lower sample τ later keeps e⁻¹ of the old estimate.
        let t1 = t0 + 10 * SEC;
        stats.observe_at(Outcome::Success, 10 * MS, t1);
        let blended = 100.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!(
            (ms(stats.cost(t1)) - blended).abs() < 0.01,
            "{}",
            ms(stats.cost(t1))
        );
        // Idle, the estimate decays toward zero.
        let t2 = t1 + 10 * SEC;
        assert!((ms(stats.cost(t2)) - blended / std::f64::consts::E).abs() < 0.01);
        // Requests in flight multiply the cost.
        let stats = Arc::new(stats);
        let _one = stats.start();
        let _two = stats.start();
        assert!((ms(stats.cost(t1)) - 3.0 * blended).abs() < 0.03);
    }

    #[test]
    fn overload_and_unavailability_raise_cost() {
        let now = Instant::now();
        let overloaded = EndpointStats::default();
        overloaded.observe_at(Outcome::Success, 10 * MS, now);
        overloaded.observe_at(Outcome::Overloaded, 10 * MS, now);
        assert!(overloaded.cost(now) >= 500e6);
        assert_eq!(
            overloaded.breaker().state(now),
            crate::breaker::BreakerState::Closed
        );
        let unavailable = EndpointStats::default();
        assert!(!unavailable.observe_at(Outcome::Unavailable, MS, now));
        assert!(unavailable.cost(now) >= 500e6);
        // A server error counts toward the breaker only.
        let failing = EndpointStats::default();
        failing.observe_at(Outcome::ServerError, 900 * MS, now);
        assert!(failing.cost(now) < 2e6);
    }

    #[test]
    fn outcomes_drive_the_breaker() {
        let now = Instant::now();
        let stats = EndpointStats::default();
        for _ in 0..4 {
            assert!(!stats.observe_at(Outcome::Unavailable, MS, now));
        }
        stats.observe_at(Outcome::Success, MS, now);
        for _ in 0..4 {
            assert!(!stats.observe_at(Outcome::ServerError, MS, now));
        }
        assert!(
            stats.observe_at(Outcome::ServerError, MS, now),
            "ejected once"
        );
        assert!(!stats.breaker().is_available(now));
    }

    #[test]
    fn retry_budget_allows_the_floor_then_a_share_of_requests() {
        let budget = RetryBudget::new(20, 10);
        let t0 = Instant::now();
        // The floor: 10 a second over the 10 s window.
        assert_eq!((0..200).filter(|_| budget.try_withdraw_at(t0)).count(), 100);
        // 50 requests earn 20 % of a retry each.
        for _ in 0..50 {
            budget.deposit_at(t0);
        }
        assert_eq!((0..50).filter(|_| budget.try_withdraw_at(t0)).count(), 10);
        assert!(!budget.try_withdraw_at(t0 + 5 * SEC));
        // Ten seconds on, the spent retries are forgotten.
        let t1 = t0 + 11 * SEC;
        assert_eq!((0..200).filter(|_| budget.try_withdraw_at(t1)).count(), 100);
        // So are deposits: old requests earn nothing.
        let t2 = t1 + 11 * SEC;
        let none = RetryBudget::new(20, 0);
        for _ in 0..50 {
            none.deposit_at(t0);
        }
        assert!(!none.try_withdraw_at(t2));
        for _ in 0..5 {
            none.deposit_at(t2);
        }
        assert!(none.try_withdraw_at(t2));
        assert!(!none.try_withdraw_at(t2));
    }

    #[test]
    fn the_mesh_settings_change_a_running_budget() {
        let budget = RetryBudget::new(20, 10);
        let t0 = Instant::now();
        budget.set(0, 1);
        assert_eq!((0..200).filter(|_| budget.try_withdraw_at(t0)).count(), 10);
        for _ in 0..50 {
            budget.deposit_at(t0);
        }
        assert!(!budget.try_withdraw_at(t0), "a 0 % budget earned retries");
        budget.set(100, 1);
        budget.deposit_at(t0);
        assert!(budget.try_withdraw_at(t0));
    }
}
