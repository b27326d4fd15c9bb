//! A simulated payment gateway, behaving like a real one in test mode:
//! configurable latency and transient-failure rate, deterministic answers
//! by token (`tok_decline` is declined, anything else captured), and
//! idempotency keys, so a retried charge returns the first result instead
//! of charging twice. Its ledger table stands for the gateway's own
//! storage: it is written outside the caller's transaction, as a remote
//! call would be.
//!
//! Calls go through a timeout and a circuit breaker: after `threshold`
//! consecutive failures it opens and fails fast for `cooldown`, then lets
//! one probe through (half-open); the probe's success closes it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

/// Tuning of the simulated gateway and its guards.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Time each call takes.
    pub latency: Duration,
    /// Share of calls (0.0–1.0) that fail transiently before doing anything;
    /// the starting value, [`Gateway::set_failure_rate`] changes it live.
    pub failure_rate: f64,
    /// Longest wait for an answer.
    pub timeout: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before a probe.
    pub breaker_cooldown: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            latency: Duration::from_millis(5),
            failure_rate: 0.0,
            timeout: Duration::from_secs(2),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

/// What the gateway said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Money taken.
    Captured { payment_id: Uuid },
    /// Refused for good.
    Declined { reason: String },
}

/// The gateway could not answer; try later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The breaker is open: the call was not made.
    #[error("payment gateway circuit open; not calling it for a while")]
    Open,
    /// The call failed or timed out.
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
}

/// The breaker's state, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// One probe is allowed.
    HalfOpen,
    /// Calls fail fast.
    Open,
}

impl BreakerState {
    /// 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(&self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// A circuit breaker on consecutive failures. Uses tokio's clock so tests
/// can pause time.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    open_until: Option<Instant>,
    /// When the half-open probe went out. A probe whose caller was dropped
    /// before reporting (a handler timeout) never reports; after one more
    /// cool-down it counts as lost and another may go, so the breaker
    /// cannot stay open forever.
    probe_since: Option<Instant>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(Inner {
                failures: 0,
                open_until: None,
                probe_since: None,
            }),
        }
    }

    /// Whether a call may go out now (claims the probe when half-open).
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if s.probe_since.is_some_and(|t| now < t + self.cooldown) => false,
            Some(_) => {
                s.probe_since = Some(now);
                true
            }
        }
    }

    /// Records a successful call: closes the breaker.
    pub fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = Inner {
            failures: 0,
            open_until: None,
            probe_since: None,
        };
    }

    /// Records a failed call: opens after `threshold` in a row, and a
    /// failed probe opens it again for another cooldown.
    pub fn failure(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.failures += 1;
        if s.probe_since.is_some() || s.failures >= self.threshold {
            s.open_until = Some(Instant::now() + self.cooldown);
            s.probe_since = None;
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

/// The simulated gateway behind its breaker.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    /// The current failure rate as `f64` bits: an outage can start and end
    /// while the service runs (tests, demos), without a lock on the path.
    failure_rate: AtomicU64,
    breaker: Breaker,
    ledger: PgPool,
}

impl Gateway {
    /// A gateway keeping its ledger in `ledger`.
    pub fn new(config: GatewayConfig, ledger: PgPool) -> Self {
        Gateway {
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cooldown),
            failure_rate: AtomicU64::new(config.failure_rate.clamp(0.0, 1.0).to_bits()),
            config,
            ledger,
        }
    }

    /// Changes the share of calls that fail (clamped to 0.0–1.0): 1.0 is
    /// an outage, 0.0 a healthy gateway.
    pub fn set_failure_rate(&self, rate: f64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.failure_rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// The share of calls that fail now.
    pub fn failure_rate(&self) -> f64 {
        f64::from_bits(self.failure_rate.load(Ordering::Relaxed))
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Charges `amount` for `order_id`; the order id is the idempotency key.
    pub async fn charge(
        &self,
        order_id: Uuid,
        amount: i64,
        token: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        let key = format!("charge:{order_id}");
        let (outcome, payment_id) = self
            .call(
                &key,
                "charge",
                order_id,
                amount,
                if token == "tok_decline" {
                    "declined"
                } else {
                    "captured"
                },
            )
            .await?;
        Ok(match outcome.as_str() {
            "declined" => ChargeOutcome::Declined {
                reason: "card declined (tok_decline)".into(),
            },
            _ => ChargeOutcome::Captured { payment_id },
        })
    }

    /// Refunds `amount` of a captured charge, idempotent per order.
    pub async fn refund(&self, order_id: Uuid, amount: i64) -> Result<(), GatewayError> {
        self.call(
            &format!("refund:{order_id}"),
            "refund",
            order_id,
            amount,
            "refunded",
        )
        .await?;
        Ok(())
    }

    async fn call(
        &self,
        key: &str,
        kind: &str,
        order_id: Uuid,
        amount: i64,
        outcome: &str,
    ) -> Result<(String, Uuid), GatewayError> {
        if !self.breaker.allow() {
            return Err(GatewayError::Open);
        }
        let result = tokio::time::timeout(
            self.config.timeout,
            self.remote(key, kind, order_id, amount, outcome),
        )
        .await
        .unwrap_or_else(|_| {
            Err(GatewayError::Unavailable(format!(
                "no answer within {:?}",
                self.config.timeout
            )))
        });
        match &result {
            Ok(_) => self.breaker.success(),
            Err(_) => self.breaker.failure(),
        }
        result
    }

    /// The "remote" side: latency, random failures, idempotent ledger.
    async fn remote(
        &self,
        key: &str,
        kind: &str,
        order_id: Uuid,
        amount: i64,
        outcome: &str,
    ) -> Result<(String, Uuid), GatewayError> {
        tokio::time::sleep(self.config.latency).await;
        let rate = self.failure_rate();
        if rate > 0.0 && rand::thread_rng().gen_bool(rate) {
            return Err(GatewayError::Unavailable(
                "simulated transient failure".into(),
            ));
        }
        let row: (String, Uuid) = sqlx::query_as(
            "WITH ins AS ( \
               INSERT INTO payments.gateway_ledger (idempotency_key, kind, order_id, amount, outcome, payment_id) \
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING \
               RETURNING outcome, payment_id) \
             SELECT outcome, payment_id FROM ins \
             UNION ALL SELECT outcome, payment_id FROM payments.gateway_ledger WHERE idempotency_key = $1 \
             LIMIT 1",
        )
        .bind(key)
        .bind(kind)
        .bind(order_id)
        .bind(amount)
        .bind(outcome)
        .bind(Uuid::now_v7())
        .fetch_one(&self.ledger)
        .await
        .map_err(|e| GatewayError::Unavailable(e.to_string()))?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_threshold_probes_after_cooldown_and_closes_on_success() {
        let b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.allow());
            b.failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(), "open: fail fast");

        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one");
        b.failure();
        assert_eq!(b.state(), BreakerState::Open, "failed probe reopens");

        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow() && b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_replaced_after_a_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(10));
        b.failure();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.allow(), "the probe, whose caller is then dropped");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.allow(), "still in flight");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(b.allow(), "presumed lost: another probe");
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
