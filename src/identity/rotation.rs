//! Renewal timing, as pure functions: renew at half the certificate's lifetime (NotBefore → NotAfter)
//! with ±1% jitter, like istio-agent; on failure back off exponentially from 0.5 s to 150 s with 20%
//! jitter, like ztunnel; errors that retrying cannot fix quickly (Unauthenticated, InvalidArgument,
//! local misconfiguration) wait the maximum.

use std::time::{Duration, SystemTime};

/// When to renew a certificate valid from `not_before` to `not_after`. `jitter` in [-1, 1] moves the
/// point by up to 1% of the lifetime.
pub fn refresh_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let half = lifetime / 2;
    let j = jitter.clamp(-1.0, 1.0) * 0.01 * lifetime.as_secs_f64();
    if j >= 0.0 {
        not_before + half + Duration::from_secs_f64(j)
    } else {
        not_before + half - Duration::from_secs_f64(-j)
    }
}

/// When to renew, seen from `now` (the moment the certificate arrived). Normally `refresh_at`; but
/// istiod backdates NotBefore by two minutes, so for very short lifetimes the half-life point can
/// already be past. Renewing immediately would loop against the CA, so then renew at half of the
/// remaining lifetime instead.
pub fn schedule(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> SystemTime {
    let at = refresh_at(not_before, not_after, jitter);
    if at > now {
        return at;
    }
    let remaining = not_after.duration_since(now).unwrap_or_default();
    now + remaining / 2
}

/// When to retry after a failed request: after the backoff's `delay`, but while a certificate is
/// still in service (`valid_until` in the future) never later than half of the time it has left, so
/// the retries close in on its expiry instead of sleeping past it (ztunnel retries at the earlier of
/// its backoff and the expiry; an istiod-faithful CA answering UNAUTHENTICATED would otherwise leave
/// the 150 s backoff to run out after the certificate did). Never sooner than [`BACKOFF_INITIAL`].
pub fn retry_at(now: SystemTime, delay: Duration, valid_until: Option<SystemTime>) -> SystemTime {
    let backoff_at = now + delay;
    match valid_until {
        Some(na) if na > now => {
            let half_left = now + na.duration_since(now).unwrap_or_default() / 2;
            backoff_at.min(half_left).max(now + BACKOFF_INITIAL)
        }
        // It expired: the gateway cannot complete a handshake with it, so ask again soon whatever
        // the error class (an operator fixing the token should not wait minutes).
        Some(_) => now + delay.min(EXPIRED_RETRY_MAX),
        None => backoff_at,
    }
}

/// Longest wait between attempts once the certificate in service has expired.
pub const EXPIRED_RETRY_MAX: Duration = Duration::from_secs(15);

pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(150);
const BACKOFF_JITTER: f64 = 0.2;

/// Exponential backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_INITIAL,
        }
    }
}

/// How a failure should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient (Unavailable, Internal, timeouts): back off from 0.5 s.
    Transient,
    /// Retrying soon cannot help (Unauthenticated, InvalidArgument, unreadable token): wait the maximum.
    Slow,
}

impl Backoff {
    /// The delay before the next attempt; `rand` in [0, 1) supplies the jitter.
    pub fn next_delay(&mut self, retry: Retry, rand: f64) -> Duration {
        let base = match retry {
            Retry::Transient => {
                let b = self.next;
                self.next = (self.next * 2).min(BACKOFF_MAX);
                b
            }
            Retry::Slow => {
                self.next = BACKOFF_MAX;
                BACKOFF_MAX
            }
        };
        let factor = 1.0 + BACKOFF_JITTER * (2.0 * rand.clamp(0.0, 1.0) - 1.0);
        base.mul_f64(factor)
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_close_in_on_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let max = Duration::from_secs(150);
        // Plenty of time left: the backoff decides.
        assert_eq!(
            retry_at(now, max, Some(now + Duration::from_secs(3600))),
            now + max
        );
        // 15 s left: retry after 7.5 s, not 150 s.
        assert_eq!(
            retry_at(now, max, Some(now + Duration::from_secs(15))),
            now + Duration::from_millis(7500)
        );
        // Almost expired: the floor keeps it from spinning.
        assert_eq!(
            retry_at(now, max, Some(now + Duration::from_millis(100))),
            now + BACKOFF_INITIAL
        );
        // No certificate yet: the backoff. An expired one: keep asking.
        assert_eq!(retry_at(now, max, None), now + max);
        assert_eq!(
            retry_at(now, max, Some(now - Duration::from_secs(1))),
            now + EXPIRED_RETRY_MAX
        );
    }

    #[test]
    fn renews_at_half_life_within_one_percent() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let na = nb + Duration::from_secs(86_400);
        assert_eq!(refresh_at(nb, na, 0.0), nb + Duration::from_secs(43_200));
        assert_eq!(
            refresh_at(nb, na, 1.0),
            nb + Duration::from_secs(43_200 + 864)
        );
        assert_eq!(
            refresh_at(nb, na, -1.0),
            nb + Duration::from_secs(43_200 - 864)
        );
        assert_eq!(refresh_at(nb, na, 7.0), refresh_at(nb, na, 1.0), "clamped");
        // A nonsensical certificate (NotAfter before NotBefore) renews immediately.
        assert_eq!(refresh_at(na, nb, 0.0), na);
    }

    #[test]
    fn short_lived_certificates_do_not_renew_in_a_loop() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // 24h certificate, backdated 2 min: the plain half-life rule applies.
        let (nb, na) = (
            now - Duration::from_secs(120),
            now + Duration::from_secs(86_400),
        );
        assert_eq!(schedule(nb, na, now, 0.0), refresh_at(nb, na, 0.0));
        // 4 s certificate, backdated 2 min: half-life is in the past; renew after 2 s instead.
        let na = now + Duration::from_secs(4);
        assert_eq!(schedule(nb, na, now, 0.0), now + Duration::from_secs(2));
        // Already expired: renew now.
        assert_eq!(schedule(nb, now - Duration::from_secs(1), now, 0.0), now);
    }

    #[test]
    fn transient_backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let seq: Vec<u64> = (0..11)
            .map(|_| b.next_delay(Retry::Transient, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(
            seq,
            vec![
                500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 150000, 150000
            ]
        );
        b.reset();
        assert_eq!(
            b.next_delay(Retry::Transient, 0.5),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn jitter_is_twenty_percent() {
        let mut b = Backoff::default();
        assert_eq!(
            b.next_delay(Retry::Transient, 0.0),
            Duration::from_millis(400)
        );
        let mut b = Backoff::default();
        assert_eq!(
            b.next_delay(Retry::Transient, 1.0),
            Duration::from_millis(600)
        );
    }

    #[test]
    fn auth_errors_are_not_hammered() {
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(Retry::Slow, 0.5), BACKOFF_MAX);
        assert_eq!(b.next_delay(Retry::Transient, 0.5), BACKOFF_MAX);
    }
}
