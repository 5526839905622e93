//! The per-endpoint circuit breaker: consecutive failures eject an endpoint for a jittered,
//! exponentially growing time; after that exactly one probe request may go, and its outcome
//! re-admits the endpoint or ejects it again for longer.
//!
//! It owns only the state machine. What counts as a failure is decided in
//! [`crate::balance::Outcome`], and the rule "never eject below one ready endpoint" is applied
//! when picking, in [`crate::balance::pick`].
//!
//! The whole state fits in three atomics and is read with one load, so checking an endpoint on
//! every request takes no lock.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::backoff::{ExponentialBackoff, jitter};

/// When to eject an endpoint and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that eject the endpoint (default 5; 0 counts as 1).
    pub failures: u32,
    /// The first ejection's length before jitter (default 1 s); it doubles with each consecutive
    /// ejection.
    pub base: Duration,
    /// The longest ejection (default 30 s). Also how long a claimed probe may stay unanswered
    /// before another request may probe, so a cancelled probe cannot strand the endpoint.
    pub max: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// Where a breaker stands at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// The endpoint is ejected until `until`.
    Open {
        /// When the ejection ends.
        until: Instant,
    },
    /// The ejection has ended: one probe request may go (see [`Breaker::try_probe`]), or is
    /// already on its way.
    HalfOpen,
}

/// What a breaker allows now, from one load (see [`Breaker::admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Closed: any request may go.
    Ready,
    /// Half-open with the probe unclaimed: one request may go after claiming it.
    Probe,
    /// Ejected, or its probe is on its way; usable again at this [`ticks`] value.
    Blocked(i64),
}

/// A circuit breaker for one endpoint. Shared between requests; all methods take `&self`.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    /// Consecutive ejections without a success in between; sets the next ejection's length.
    ejections: AtomicU32,
    /// [`CLOSED`], or a deadline in [`ticks`] shifted left by one with the low bit set while a
    /// probe is claimed. Unclaimed: ejected until the deadline, then half-open. Claimed: the
    /// probe is on its way and lapses at the deadline. One word, so transitions are single
    /// compare-and-swaps and exactly one request wins a probe.
    gate: AtomicI64,
}

const CLOSED: i64 = i64::MIN;
/// Deadlines are clamped to ±2⁶¹ ns (73 years) so that shifting never overflows and no
/// encoded gate equals [`CLOSED`].
const LIMIT: i64 = 1 << 61;

fn encode(deadline: i64, probing: bool) -> i64 {
    (deadline.clamp(-LIMIT, LIMIT) << 1) | i64::from(probing)
}

fn decode(gate: i64) -> (i64, bool) {
    (gate >> 1, gate & 1 == 1)
}

impl BreakerState {
    /// The state's name as the admin endpoint shows it: `closed`, `open` or `half-open`.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            gate: AtomicI64::new(CLOSED),
        }
    }

    /// The configuration this breaker follows.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Records a success: the failure streak ends and the breaker closes (a successful probe
    /// re-admits the endpoint). Returns true when this call closed an open or half-open breaker,
    /// so the caller can log the re-admission once.
    pub fn on_success(&self) -> bool {
        // Plain loads first: a healthy endpoint's success then writes nothing, which keeps its
        // cache line shared between cores.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.gate.load(Ordering::Acquire) == CLOSED {
            return false;
        }
        self.ejections.store(0, Ordering::Relaxed);
        self.gate.swap(CLOSED, Ordering::AcqRel) != CLOSED
    }

    /// Records a failure at `now`. The `failures`-th consecutive one ejects the endpoint until
    /// `now` plus a jittered backoff (`base` doubled per consecutive ejection, up to `max`); a
    /// failure once the ejection has ended (a failed probe) ejects it again for twice as long.
    /// Failures while ejected (requests sent before the ejection) change nothing.
    ///
    /// Returns true when this call caused an ejection, so the caller logs it once.
    pub fn on_failure(&self, now: Instant) -> bool {
        let gate = self.gate.load(Ordering::Acquire);
        if gate == CLOSED {
            let failures = self
                .failures
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            return failures >= self.config.failures.max(1) && self.eject(CLOSED, now);
        }
        let (deadline, probing) = decode(gate);
        if !probing && ticks(now) < deadline {
            return false;
        }
        self.eject(gate, now)
    }

    /// Moves the gate from `expected` to "ejected"; only one of racing callers succeeds.
    fn eject(&self, expected: i64, now: Instant) -> bool {
        let ejections = self.ejections.load(Ordering::Acquire);
        let step = ExponentialBackoff::new(self.config.base, self.config.max).step(ejections);
        let until = ticks(now).saturating_add(nanos(jitter(step)));
        let ejected = self
            .gate
            .compare_exchange(
                expected,
                encode(until, false),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if ejected {
            self.failures.store(0, Ordering::Relaxed);
            self.ejections
                .store(ejections.saturating_add(1), Ordering::Release);
        }
        ejected
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        let gate = self.gate.load(Ordering::Acquire);
        if gate == CLOSED {
            return BreakerState::Closed;
        }
        match decode(gate) {
            (deadline, false) if ticks(now) < deadline => BreakerState::Open {
                until: instant(deadline),
            },
            _ => BreakerState::HalfOpen,
        }
    }

    /// True when a request may go at `now`: closed, or half-open with the probe unclaimed (the
    /// request must then win [`Breaker::try_probe`]).
    pub fn is_available(&self, now: Instant) -> bool {
        !matches!(self.admission(now), Admission::Blocked(_))
    }

    /// Claims the half-open breaker's single probe at `now`. True for exactly one caller per
    /// ejection; false when closed (no probe needed), still ejected, or already claimed. A claim
    /// left unanswered for `max` lapses, and another request may probe.
    pub fn try_probe(&self, now: Instant) -> bool {
        let gate = self.gate.load(Ordering::Acquire);
        if gate == CLOSED {
            return false;
        }
        let t = ticks(now);
        let (deadline, _) = decode(gate);
        if t < deadline {
            return false;
        }
        let lapse = t.saturating_add(nanos(self.config.max));
        self.gate
            .compare_exchange(
                gate,
                encode(lapse, true),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// What the breaker allows at `now`, read with a single load.
    pub(crate) fn admission(&self, now: Instant) -> Admission {
        let gate = self.gate.load(Ordering::Acquire);
        if gate == CLOSED {
            return Admission::Ready;
        }
        let (deadline, _) = decode(gate);
        if ticks(now) < deadline {
            Admission::Blocked(deadline)
        } else {
            Admission::Probe
        }
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new(BreakerConfig::default())
    }
}

/// The process-wide reference instant that [`ticks`] count from.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `now` as signed nanoseconds from [`ORIGIN`], so an instant fits in an atomic integer.
pub(crate) fn ticks(now: Instant) -> i64 {
    let origin = *ORIGIN;
    match now.checked_duration_since(origin) {
        Some(after) => nanos(after),
        None => -nanos(origin.duration_since(now)),
    }
}

/// The instant `ticks` nanoseconds from [`ORIGIN`].
fn instant(ticks: i64) -> Instant {
    let origin = *ORIGIN;
    let offset = Duration::from_nanos(ticks.unsigned_abs());
    let at = if ticks >= 0 {
        origin.checked_add(offset)
    } else {
        origin.checked_sub(offset)
    };
    at.unwrap_or(origin)
}

/// A duration in nanoseconds, saturating at `i64::MAX` (292 years).
pub(crate) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default())
    }

    /// Fails `b` until it ejects; returns the ejection's end.
    fn eject(b: &Breaker, now: Instant) -> Instant {
        for _ in 0..b.config().failures {
            if b.on_failure(now) {
                break;
            }
        }
        match b.state(now) {
            BreakerState::Open { until } => until,
            other => panic!("expected an ejection, got {other:?}"),
        }
    }

    #[test]
    fn consecutive_failures_eject_once() {
        let b = breaker();
        let now = Instant::now();
        for _ in 0..4 {
            assert!(!b.on_failure(now));
            assert_eq!(b.state(now), BreakerState::Closed);
        }
        assert!(b.on_failure(now), "the fifth failure ejects");
        let BreakerState::Open { until } = b.state(now) else {
            panic!("not ejected: {:?}", b.state(now));
        };
        // The first ejection lasts between half and all of `base`.
        assert!(
            until >= now + SEC / 2 && until <= now + SEC,
            "{:?}",
            until - now
        );
        assert!(!b.is_available(now));
        // Failures of requests sent before the ejection change nothing.
        assert!(!b.on_failure(now));
        assert_eq!(b.state(now), BreakerState::Open { until });
    }

    #[test]
    fn a_success_ends_the_streak() {
        let b = breaker();
        let now = Instant::now();
        for _ in 0..4 {
            b.on_failure(now);
        }
        assert!(!b.on_success(), "nothing to re-admit");
        for _ in 0..4 {
            assert!(!b.on_failure(now));
        }
        assert_eq!(b.state(now), BreakerState::Closed);
    }

    #[test]
    fn the_ejection_ends_in_half_open_with_one_probe() {
        let b = breaker();
        let now = Instant::now();
        let until = eject(&b, now);
        assert!(!b.try_probe(now), "no probe while ejected");
        assert_eq!(b.state(until), BreakerState::HalfOpen);
        assert!(b.is_available(until));
        assert!(b.try_probe(until));
        assert!(!b.try_probe(until), "only one probe");
        assert!(!b.is_available(until + SEC));
        assert_eq!(b.state(until + SEC), BreakerState::HalfOpen);
    }

    #[test]
    fn only_one_of_many_concurrent_probes_wins() {
        let b = breaker();
        let now = Instant::now();
        let until = eject(&b, now);
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..1_000).filter(|_| b.try_probe(until)).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn a_successful_probe_closes() {
        let b = breaker();
        let now = Instant::now();
        let until = eject(&b, now);
        assert!(b.try_probe(until));
        assert!(b.on_success(), "the probe re-admits");
        assert_eq!(b.state(until), BreakerState::Closed);
        assert!(!b.try_probe(until), "closed: nothing to probe");
        // The ejection count restarted: the next ejection is short again.
        let again = eject(&b, until);
        assert!(again <= until + SEC, "{:?}", again - until);
    }

    #[test]
    fn a_failed_probe_ejects_again_for_longer() {
        let b = breaker();
        let mut now = Instant::now();
        let mut until = eject(&b, now);
        for ejection in 1..8u32 {
            now = until;
            assert!(b.try_probe(now));
            assert!(b.on_failure(now), "a failed probe ejects again");
            let BreakerState::Open { until: next } = b.state(now) else {
                panic!("not ejected again: {:?}", b.state(now));
            };
            let step = (SEC * 2u32.pow(ejection)).min(30 * SEC);
            let length = next - now;
            assert!(
                length >= step / 2 && length <= step,
                "{ejection}: {length:?}"
            );
            until = next;
        }
    }

    #[test]
    fn an_unanswered_probe_lapses() {
        let b = breaker();
        let now = Instant::now();
        let until = eject(&b, now);
        assert!(b.try_probe(until));
        assert!(!b.is_available(until + 29 * SEC));
        let later = until + 30 * SEC;
        assert!(b.is_available(later));
        assert!(b.try_probe(later));
    }

    #[test]
    fn ticks_round_trip_around_the_origin() {
        let origin = *ORIGIN;
        for t in [origin, origin + SEC * 100] {
            assert_eq!(instant(ticks(t)), t);
        }
        if let Some(before) = origin.checked_sub(Duration::from_millis(5)) {
            assert_eq!(ticks(before), -5_000_000);
            assert_eq!(instant(ticks(before)), before);
        }
    }
}
