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
