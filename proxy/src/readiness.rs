//! Why the proxy is not ready yet, from its first moment: each start-up wait (the first
//! certificate, the first snapshot, the agent's registration and health) records its current
//! reason here, `/ready` shows them, and [`StartupWait`] logs each wait at WARN once, with the
//! reason and the fix, then again only at a bounded interval or when the reason changes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the proxy waits for before it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Condition {
    /// The first workload certificate.
    Certificate,
    /// The first snapshot from the control plane.
    Snapshot,
    /// The agent's tools, registered.
    Registration,
    /// The agent answering its health check.
    AgentHealth,
}

impl Condition {
    const ALL: [Condition; 4] = [
        Condition::Certificate,
        Condition::Snapshot,
        Condition::Registration,
        Condition::AgentHealth,
    ];

    /// How `/ready` names it.
    pub fn name(self) -> &'static str {
        match self {
            Condition::Certificate => "certificate",
            Condition::Snapshot => "snapshot",
            Condition::Registration => "agent registration",
            Condition::AgentHealth => "agent health",
        }
    }

    fn initial_reason(self) -> &'static str {
        match self {
            Condition::Certificate => "asking the control plane for the first certificate",
            Condition::Snapshot => "waiting for the first snapshot from the control plane",
            Condition::Registration => "the agent's tools are not known yet",
            Condition::AgentHealth => "the agent has not answered yet",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The latest reason each condition is not met yet. Whether a condition *is* met comes from the
/// state itself (the admin endpoint checks it); this only says why not.
#[derive(Debug)]
pub struct Readiness {
    reasons: Mutex<[String; 4]>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            reasons: Mutex::new(Condition::ALL.map(|c| c.initial_reason().to_owned())),
        }
    }
}

impl Readiness {
    /// Records why `condition` is not met.
    pub fn waiting(&self, condition: Condition, reason: impl Into<String>) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        reasons[condition.index()] = reason.into();
    }

    /// Why `condition` is not met, as last recorded.
    pub fn reason(&self, condition: Condition) -> String {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        reasons[condition.index()].clone()
    }

    /// `name: reason` for each condition in `unmet`, in a fixed order.
    pub fn describe(&self, unmet: &[Condition]) -> Vec<String> {
        let mut unmet = unmet.to_vec();
        unmet.sort();
        unmet.dedup();
        unmet
            .into_iter()
            .map(|c| format!("{}: {}", c.name(), self.reason(c)))
            .collect()
    }
}

/// An error and its causes in one line, each cause once: error types that already print their
/// source (`…: Connection refused`) are not followed by it a second time.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// How often a start-up wait that goes on is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);
/// The least time between two lines of one wait whose reason changed.
pub const CHANGED_AFTER: Duration = Duration::from_secs(5);

/// One wait at start-up, logged at WARN once with its reason and fix, then again when the
/// reason changes (at most every [`CHANGED_AFTER`]) or every [`REPEAT_EVERY`]; at INFO when it
/// ends, if it was ever logged.
#[derive(Debug)]
pub struct StartupWait {
    what: &'static str,
    started: Instant,
    quiet_for: Duration,
    warned: Option<(Instant, String)>,
}

impl StartupWait {
    /// A wait for `what` ("the first certificate"), logged from its first failure.
    pub fn new(what: &'static str) -> Self {
        Self::after(what, Duration::ZERO)
    }

    /// A wait that is normal for a moment (an agent starting beside its sidecar): reasons for
    /// which [`StartupWait::waiting`] is told `expected` are logged only after `quiet_for`.
    pub fn after(what: &'static str, quiet_for: Duration) -> Self {
        Self {
            what,
            started: Instant::now(),
            quiet_for,
            warned: None,
        }
    }

    /// The wait goes on because of `reason`; `fix` says what the user can do. `expected`
    /// reasons (nothing listening yet) are held back for the quiet period.
    pub fn waiting(&mut self, reason: &str, fix: &str, expected: bool) {
        if self.due(Instant::now(), reason, expected) {
            let waited_s = self.started.elapsed().as_secs();
            tracing::warn!(waited_s, fix, "waiting for {}: {reason}", self.what);
        }
    }

    /// Whether a line is due at `now` for `reason` (and, if so, records it as logged).
    fn due(&mut self, now: Instant, reason: &str, expected: bool) -> bool {
        if expected && now.saturating_duration_since(self.started) < self.quiet_for {
            return false;
        }
        // A new reason is worth a line, but reasons that alternate must not log every attempt.
        let due = match &self.warned {
            None => true,
            Some((at, last)) => {
                let since = now.saturating_duration_since(*at);
                since >= REPEAT_EVERY || (last != reason && since >= CHANGED_AFTER)
            }
        };
        if due {
            self.warned = Some((now, reason.to_owned()));
        }
        due
    }

    /// The wait is over.
    pub fn done(&mut self) {
        if self.warned.take().is_some() {
            let waited_ms = self.started.elapsed().as_millis() as u64;
            tracing::info!(waited_ms, "no longer waiting for {}", self.what);
        }
        self.started = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_logged_once_then_at_a_bounded_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut wait = StartupWait::new("the first certificate");
        wait.started = t0;
        assert!(
            wait.due(t0, "refused", false),
            "the first attempt is logged"
        );
        for ms in [10, 30, 70, 150, 310, 630, 1270, 2550] {
            assert!(!wait.due(t0 + Duration::from_millis(ms), "refused", false));
        }
        assert!(wait.due(t0 + s(30), "refused", false), "then every 30 s");
        // Alternating reasons: a line at most every 5 s.
        assert!(!wait.due(t0 + s(31), "timed out", false));
        assert!(wait.due(t0 + s(35), "timed out", false));
        assert!(!wait.due(t0 + s(36), "refused", false));

        // Nothing listening yet is normal for the quiet period.
        let mut agent = StartupWait::after("the agent's tools", s(2));
        agent.started = t0;
        assert!(!agent.due(t0 + s(1), "nothing listens", true));
        assert!(agent.due(t0 + s(1), "answered 404", false));
        let mut agent = StartupWait::after("the agent's tools", s(2));
        agent.started = t0;
        assert!(agent.due(t0 + s(2), "nothing listens", true));
    }

    #[test]
    fn reasons_are_named_and_ordered() {
        let r = Readiness::default();
        r.waiting(
            Condition::Certificate,
            "the control plane is unreachable at https://127.0.0.1:8000",
        );
        let lines = r.describe(&[Condition::AgentHealth, Condition::Certificate]);
        assert_eq!(
            lines,
            [
                "certificate: the control plane is unreachable at https://127.0.0.1:8000",
                "agent health: the agent has not answered yet"
            ]
        );
    }
}
