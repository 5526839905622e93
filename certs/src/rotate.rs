//! Certificate rotation: renew at 70 % of the lifetime, keep serving the old certificate while
//! renewal fails, and swap the new one in without touching listeners.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::{Credential, CredentialCell};

/// When to renew and how to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewPolicy {
    /// Fraction of the remaining lifetime (from when the credential was received) after which
    /// to renew.
    pub fraction: f64,
    /// Never renew sooner than this...
    pub min: Duration,
    /// ...nor later than this.
    pub max: Duration,
    /// First retry delay after a failed renewal; doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        Self {
            fraction: 0.7,
            min: Duration::from_secs(10),
            max: Duration::from_secs(24 * 3600),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

impl RenewPolicy {
    /// How long to wait before renewing `cred`, measured from `now`: `fraction` of the lifetime
    /// it had when received, clamped to `min..=max`, and never past 90 % of what is left (a
    /// certificate shorter than `min` is renewed before it expires, not after).
    pub fn delay(&self, cred: &Credential, now: SystemTime) -> Duration {
        let lifetime = cred
            .not_after()
            .duration_since(cred.received())
            .unwrap_or_default();
        let due = lifetime.mul_f64(self.fraction).clamp(self.min, self.max);
        let elapsed = now.duration_since(cred.received()).unwrap_or_default();
        let remaining = cred.not_after().duration_since(now).unwrap_or_default();
        due.saturating_sub(elapsed).min(remaining.mul_f64(0.9))
    }
}

/// Something that can get a fresh credential for the same identity (the control plane's CA
/// over HTTP, a file on disk, a test's local CA).
pub trait Renew: Send + Sync + 'static {
    /// Returns a new credential, or a message saying why not.
    fn renew(
        &self,
        current: Arc<Credential>,
    ) -> impl Future<Output = Result<Credential, String>> + Send;
}

/// Keeps `cell` fresh until `shutdown` resolves. Failures are logged and retried with
/// exponential backoff; the old credential stays in force meanwhile.
pub async fn run_rotation<R: Renew>(
    cell: Arc<CredentialCell>,
    renewer: R,
    policy: RenewPolicy,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut retry = policy.retry_initial;
    let mut wait = policy.delay(&cell.current(), SystemTime::now());
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let current = cell.current();
        match renewer.renew(current.clone()).await {
            Ok(next) => match cell.store(next) {
                Ok(()) => {
                    let fresh = cell.current();
                    tracing::info!(
                        identity = %fresh.identity(),
                        serial = %fresh.serial(),
                        "certificate rotated"
                    );
                    retry = policy.retry_initial;
                    wait = policy.delay(&fresh, SystemTime::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewal returned an unusable certificate; keeping the current one");
                    wait = retry;
                    retry = (retry * 2).min(policy.retry_max);
                }
            },
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    retry_in_s = retry.as_secs(),
                    expires_in_s = current.not_after().duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                    "certificate renewal failed; still serving the current certificate"
                );
                wait = retry;
                retry = (retry * 2).min(policy.retry_max);
            }
        }
    }
}
