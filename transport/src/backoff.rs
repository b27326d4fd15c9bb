//! Capped exponential backoff with jitter, for reconnects and retries.

use std::time::Duration;

/// Delays that double from `initial` up to `max`, with ±20% jitter so that
/// many clients cut off together do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; the following one is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = base.as_nanos() as u64;
        // Jitter from the clock's sub-microsecond digits: good enough to
        // spread reconnects, and needs no RNG state.
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 % 400)
            .unwrap_or(200);
        Duration::from_nanos(nanos / 1000 * (800 + noise))
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The delay a caller would wait after `attempt` failures (1-based),
    /// without jitter: used to pick retry tiers.
    pub fn delay_for(initial: Duration, max: Duration, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        initial.saturating_mul(factor).min(max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        for (got, base) in d.iter().zip([100u128, 200, 400, 400, 400]) {
            assert!(*got >= base * 8 / 10 && *got <= base * 12 / 10, "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn delay_for_attempt_is_capped_exponential() {
        let (i, m) = (Duration::from_millis(10), Duration::from_millis(50));
        assert_eq!(Backoff::delay_for(i, m, 1), i);
        assert_eq!(Backoff::delay_for(i, m, 2), Duration::from_millis(20));
        assert_eq!(Backoff::delay_for(i, m, 3), Duration::from_millis(40));
        assert_eq!(Backoff::delay_for(i, m, 4), m);
        assert_eq!(Backoff::delay_for(i, m, 100), m);
    }
}
