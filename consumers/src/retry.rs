//! The retry policy, as one value: how often an event whose handler failed
//! is tried again and after what delay, how long an early event (its
//! predecessor not applied yet) waits, and when either is given up and
//! dead-lettered.
//!
//! The runtime asks the policy what to do ([`RetryPolicy::after_failure`],
//! [`RetryPolicy::after_early`]) and carries out the [`Decision`] through
//! the broker (see [`crate::deadletter`]); the topology declares one retry
//! queue per delay the policy can answer ([`RetryPolicy::delays`]), since a
//! queue's TTL cannot change once declared.
//!
//! | what failed | decision |
//! |---|---|
//! | [`HandleError::Transient`] (or `Unavailable`), attempts left | retry after a capped exponential delay, as the next attempt |
//! | the same, at `max_attempts` | dead letter, `retries_exhausted` |
//! | [`HandleError::Throttled`] | retry after the attempt's delay (at most the last tier's), as the same attempt (nothing was tried) |
//! | [`HandleError::Permanent`] | dead letter, `handler_rejected` |
//! | early event, deferrals left | defer by `defer_delay` |
//! | early event, `max_deferrals` used up | dead letter, `sequence_gap` |
//!
//! `Unavailable` (the service's own database is gone) normally never gets
//! here: the runtime holds such deliveries in place with
//! [`RetryPolicy::hold_backoff`] instead of spending their attempts.

use std::time::Duration;

use transport::Backoff;

use crate::HandleError;

/// How failing and early events are retried, and when they are given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of a transiently failing event before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt.
    pub initial: Duration,
    /// Cap of the retry delay.
    pub max: Duration,
    /// Delay before an early event (predecessor missing) is tried again.
    pub defer_delay: Duration,
    /// Deferrals before an early event is dead-lettered as `sequence_gap`.
    pub max_deferrals: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            defer_delay: Duration::from_millis(250),
            max_deferrals: 40,
        }
    }
}

/// What to do with an event that was not applied this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the handler again after `delay`, as attempt `attempt` (the same
    /// number again when nothing was tried).
    RetryIn {
        /// How long the copy waits in its retry queue.
        delay: Duration,
        /// The attempt number the copy carries.
        attempt: u32,
        /// Short reason code for the outcome (`transient`, `throttled`).
        reason: &'static str,
        /// What failed, and when it is tried again.
        error: String,
    },
    /// Put an early event back for `delay`, until its predecessor is
    /// applied.
    DeferIn {
        /// How long the copy waits in its retry queue.
        delay: Duration,
        /// The deferral count the copy carries.
        deferrals: u32,
        /// Which predecessor it waits for.
        error: String,
    },
    /// Give up: send it to the dead-letter queue.
    DeadLetter {
        /// Short reason code, kept in the dead letter's headers.
        reason: &'static str,
        /// The error text, kept in the dead letter's headers.
        error: String,
    },
}

impl RetryPolicy {
    /// Delay after failed attempt `attempt` (1-based): capped exponential,
    /// without jitter, so that it names one of the declared retry queues.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        Backoff::delay_for(self.initial, self.max, attempt)
    }

    /// Every delay this policy can answer, sorted and without repeats: the
    /// retry queues to declare (one each).
    pub fn delays(&self) -> Vec<Duration> {
        let mut d: Vec<Duration> = (1..self.max_attempts.max(2))
            .map(|a| self.delay_for(a))
            .collect();
        d.push(self.defer_delay);
        d.sort();
        d.dedup();
        d
    }

    /// What follows attempt `attempt` (1-based) of an event whose handler
    /// (or transaction) failed with `error`.
    pub fn after_failure(&self, attempt: u32, error: &HandleError) -> Decision {
        match error {
            // Unavailable is waited out before we get here; should it
            // arrive anyway, a broker retry is the safe place for it.
            HandleError::Transient(e) | HandleError::Unavailable(e)
                if attempt < self.max_attempts =>
            {
                let delay = self.delay_for(attempt);
                Decision::RetryIn {
                    delay,
                    attempt: attempt + 1,
                    reason: "transient",
                    error: format!("{e}; retry in {delay:?}"),
                }
            }
            HandleError::Throttled(e) => {
                // Same attempt number: nothing was tried, so nothing spent.
                // At or past the last attempt, the last declared tier: a
                // delay with no queue would make the forward fail.
                let last_tier = self.max_attempts.max(2) - 1;
                let delay = self.delay_for(attempt.min(last_tier));
                Decision::RetryIn {
                    delay,
                    attempt,
                    reason: "throttled",
                    error: format!("{e}; retry in {delay:?}"),
                }
            }
            HandleError::Transient(e) | HandleError::Unavailable(e) => Decision::DeadLetter {
                reason: "retries_exhausted",
                error: format!("{e} (after {attempt} attempts)"),
            },
            HandleError::Permanent(e) => Decision::DeadLetter {
                reason: "handler_rejected",
                error: e.clone(),
            },
        }
    }

    /// What follows an early event that was deferred `deferred` times
    /// before; `why` names the predecessor it waits for.
    pub fn after_early(&self, deferred: u32, why: String) -> Decision {
        // Saturating: the count comes from a header, which anyone can set.
        let deferrals = deferred.saturating_add(1);
        if deferrals > self.max_deferrals {
            Decision::DeadLetter {
                reason: "sequence_gap",
                error: format!("{why}; gave up after {} deferrals", self.max_deferrals),
            }
        } else {
            Decision::DeferIn {
                delay: self.defer_delay,
                deferrals,
                error: why,
            }
        }
    }

    /// The backoff of a lane holding its deliveries while the service's
    /// database is unavailable: from 100 ms up to the retry cap (at least
    /// 200 ms), so a lost database does not burn the events' attempts.
    pub fn hold_backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(100),
            self.max.max(Duration::from_millis(200)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            defer_delay: Duration::from_millis(100),
            max_deferrals: 2,
        }
    }

    #[test]
    fn delays_are_the_retry_tiers_and_the_deferral_delay_once_each() {
        let ms = |v: Vec<Duration>| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
        assert_eq!(ms(policy().delays()), vec![100, 200]);
        assert_eq!(
            ms(RetryPolicy::default().delays()),
            vec![250, 1000, 2000, 4000, 8000]
        );
        // One attempt still declares the first tier: throttling retries.
        let once = RetryPolicy {
            max_attempts: 1,
            ..policy()
        };
        assert_eq!(ms(once.delays()), vec![100]);
    }

    #[test]
    fn a_transient_failure_is_retried_until_the_attempts_are_spent() {
        let p = policy();
        let e = HandleError::transient("flaky");
        assert_eq!(
            p.after_failure(1, &e),
            Decision::RetryIn {
                delay: Duration::from_millis(100),
                attempt: 2,
                reason: "transient",
                error: "flaky; retry in 100ms".into(),
            }
        );
        assert!(matches!(
            p.after_failure(2, &e),
            Decision::RetryIn { attempt: 3, delay, .. } if delay == Duration::from_millis(200)
        ));
        assert_eq!(
            p.after_failure(3, &e),
            Decision::DeadLetter {
                reason: "retries_exhausted",
                error: "flaky (after 3 attempts)".into(),
            }
        );
    }

    #[test]
    fn throttling_spends_no_attempt_and_a_permanent_failure_is_final() {
        let p = policy();
        assert!(matches!(
            p.after_failure(2, &HandleError::Throttled("open".into())),
            Decision::RetryIn {
                attempt: 2,
                reason: "throttled",
                ..
            }
        ));
        assert_eq!(
            p.after_failure(1, &HandleError::permanent("no such order")),
            Decision::DeadLetter {
                reason: "handler_rejected",
                error: "no such order".into(),
            }
        );
    }

    #[test]
    fn every_retry_goes_to_a_declared_queue_even_throttled_at_the_last_attempt() {
        for p in [policy(), RetryPolicy::default()] {
            let declared = p.delays();
            for attempt in 1..=p.max_attempts + 2 {
                for e in [
                    HandleError::transient("x"),
                    HandleError::Throttled("x".into()),
                ] {
                    if let Decision::RetryIn { delay, .. } = p.after_failure(attempt, &e) {
                        assert!(
                            declared.contains(&delay),
                            "{delay:?} after attempt {attempt}"
                        );
                    }
                }
                if let Decision::DeferIn { delay, .. } = p.after_early(attempt, "w".into()) {
                    assert!(declared.contains(&delay));
                }
            }
        }
    }

    #[test]
    fn an_early_event_is_deferred_max_deferrals_times_then_dead_lettered() {
        let p = policy();
        assert_eq!(
            p.after_early(0, "waits for 3".into()),
            Decision::DeferIn {
                delay: Duration::from_millis(100),
                deferrals: 1,
                error: "waits for 3".into(),
            }
        );
        assert!(matches!(
            p.after_early(1, "w".into()),
            Decision::DeferIn { deferrals: 2, .. }
        ));
        assert_eq!(
            p.after_early(2, "waits for 3".into()),
            Decision::DeadLetter {
                reason: "sequence_gap",
                error: "waits for 3; gave up after 2 deferrals".into(),
            }
        );
        assert!(matches!(
            p.after_early(u32::MAX, "w".into()),
            Decision::DeadLetter { .. }
        ));
    }
}
