//! Jittered exponential backoff (the control-plane reconnect loop, the breaker's ejection times)
//! and the proxy's cheap per-thread random numbers that jitter and load balancing draw from.
//!
//! Modelled on linkerd2-proxy's `exp-backoff`: each delay is drawn between half and all of the
//! current step, and the step doubles from `min` up to `max`. It owns no timers: callers sleep.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// The bounds of a jittered exponential backoff.
///
/// The `n`-th delay (from 0) is drawn uniformly between half and all of `min × 2ⁿ`, capped at
/// `max`. A `max` below `min` is treated as `min`; a zero `min` gives zero delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExponentialBackoff {
    /// The first step.
    pub min: Duration,
    /// The largest step.
    pub max: Duration,
}

impl ExponentialBackoff {
    /// A backoff whose steps double from `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        ExponentialBackoff { min, max }
    }

    /// The control-plane stream's reconnect backoff: 10 ms doubling up to 500 ms, so a proxy is
    /// back on a live replica within 1 s of its replica dying, or of the control plane coming
    /// back after an outage. At the cap, 1,000 proxies retry ~2,700 times a second: connection
    /// attempts to a closed port, cheap for both ends.
    pub fn default_stream() -> Self {
        ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(500))
    }

    /// The un-jittered step after `attempt` doublings: `min × 2^attempt`, capped at `max`.
    pub fn step(&self, attempt: u32) -> Duration {
        let cap = self.max.max(self.min);
        1u32.checked_shl(attempt)
            .and_then(|factor| self.min.checked_mul(factor))
            .map_or(cap, |step| step.min(cap))
    }

    /// A fresh backoff state starting at `min`.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(*self)
    }
}

impl Default for ExponentialBackoff {
    /// The control-plane reconnect backoff ([`ExponentialBackoff::default_stream`]).
    fn default() -> Self {
        ExponentialBackoff::default_stream()
    }
}

/// The state of one backoff sequence: how many delays were handed out since the last reset.
///
/// Also an endless [`Iterator`] of delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: ExponentialBackoff,
    attempt: u32,
}

impl Backoff {
    /// A sequence starting at `config.min`.
    pub fn new(config: ExponentialBackoff) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// The bounds this sequence follows.
    pub fn config(&self) -> &ExponentialBackoff {
        &self.config
    }

    /// The next delay: drawn between half and all of the current step; the step then doubles
    /// (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.config.step(self.attempt);
        // Once the step is capped, more doublings change nothing; stop counting there.
        if step < self.config.max {
            self.attempt = self.attempt.saturating_add(1);
        }
        jitter(step)
    }

    /// Starts over from `min`, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

/// A delay drawn uniformly between half and all of `step` ("equal jitter"): spreads retries of
/// many proxies apart while keeping at least half the intended pause. Steps beyond 2⁶⁴ ns
/// (584 years) count as that.
pub(crate) fn jitter(step: Duration) -> Duration {
    let full = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
    let half = full / 2;
    // full - half <= 2^63, so the + 1 cannot overflow.
    Duration::from_nanos(half + random_below_u64(full - half + 1))
}

thread_local! {
    /// One generator per thread, seeded once, so drawing a number takes no lock and no syscall.
    static RNG: Cell<u64> = Cell::new(seed());
}

/// A seed from the operating system (through ring); should that fail, std's per-thread hash
/// keys, which are themselves seeded from the operating system.
fn seed() -> u64 {
    let rng = ring::rand::SystemRandom::new();
    match ring::rand::generate::<[u8; 8]>(&rng) {
        Ok(bytes) => u64::from_le_bytes(bytes.expose()),
        Err(_) => RandomState::new().hash_one(std::thread::current().id()),
    }
}

/// A uniformly distributed `u64` from this thread's splitmix64 generator. Fast and statistically
/// sound for load balancing and jitter; not for secrets.
pub(crate) fn random_u64() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// A number in `0..n` (0 when `n` is 0), by multiply-shift; its bias of at most n/2⁶⁴ is
/// irrelevant here.
fn random_below_u64(n: u64) -> u64 {
    ((u128::from(random_u64()) * u128::from(n)) >> 64) as u64
}

/// An index in `0..n` (0 when `n` is 0).
pub(crate) fn random_below(n: usize) -> usize {
    random_below_u64(n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_double_from_min() {
        let b = ExponentialBackoff::new(10 * MS, Duration::from_secs(15));
        assert_eq!(b.step(0), 10 * MS);
        assert_eq!(b.step(1), 20 * MS);
        assert_eq!(b.step(4), 160 * MS);
        let mut backoff = b.backoff();
        for attempt in 0..8 {
            let step = b.step(attempt);
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} vs step {step:?}"
            );
        }
    }

    #[test]
    fn delays_cap_at_max() {
        let b = ExponentialBackoff::new(10 * MS, 100 * MS);
        let mut backoff = b.backoff();
        let late: Vec<Duration> = backoff.by_ref().skip(20).take(100).collect();
        assert!(
            late.iter().all(|d| *d >= 50 * MS && *d <= 100 * MS),
            "{late:?}"
        );
        assert_eq!(b.step(u32::MAX), 100 * MS);
        // A max below min is read as min.
        assert_eq!(ExponentialBackoff::new(10 * MS, MS).step(3), 10 * MS);
        // The stream's cap leaves room to connect within 1 s of a replica being reachable.
        let stream = ExponentialBackoff::default_stream();
        assert_eq!(stream.step(30), Duration::from_millis(500));
        let mut delays = stream.backoff();
        assert!(
            delays
                .by_ref()
                .take(1_000)
                .all(|d| d <= Duration::from_millis(500))
        );
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_step() {
        let step = Duration::from_secs(1);
        let draws: Vec<Duration> = (0..10_000).map(|_| jitter(step)).collect();
        assert!(draws.iter().all(|d| *d >= step / 2 && *d <= step));
        let min = draws.iter().min().copied().unwrap_or_default();
        let max = draws.iter().max().copied().unwrap_or_default();
        // The draws really spread over the interval, not around one point.
        assert!(min < Duration::from_millis(550), "{min:?}");
        assert!(max > Duration::from_millis(950), "{max:?}");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        assert!(jitter(Duration::MAX) >= Duration::from_nanos(u64::MAX / 2));
    }

    #[test]
    fn reset_starts_over_from_min() {
        let mut backoff = ExponentialBackoff::new(10 * MS, Duration::from_secs(15)).backoff();
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() > 10 * MS);
        backoff.reset();
        assert!(backoff.next_delay() <= 10 * MS);
        assert!(backoff.next_delay() <= 20 * MS);
    }

    #[test]
    fn random_indices_cover_the_range() {
        let mut seen = [0u32; 5];
        for _ in 0..5_000 {
            seen[random_below(5)] += 1;
        }
        assert!(seen.iter().all(|n| *n > 800), "{seen:?}");
        assert_eq!(random_below(0), 0);
    }
}
