//! What became of each delivery: one log line per outcome, counters for
//! `/metrics` and `warren status`, and a record for the live feed that
//! `warren tail` shows across processes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The fate of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Applied; its effects committed.
    Handled,
    /// Already applied before; nothing committed.
    Duplicate,
    /// No handler for its type; only the subject's progress moved.
    Skipped,
    /// A predecessor of its subject is missing; delayed until it arrives.
    Deferred,
    /// The handler failed transiently; delayed retry.
    Retried,
    /// Sent to the dead-letter queue with its reason.
    DeadLettered,
}

impl Outcome {
    /// The name used in logs, metrics and the live feed.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Handled => "handled",
            Outcome::Duplicate => "duplicate",
            Outcome::Skipped => "skipped",
            Outcome::Deferred => "deferred",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead-lettered",
        }
    }
}

/// One outcome, as logged and as published on the live feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// The consuming service.
    pub service: String,
    /// What happened.
    pub outcome: Outcome,
    /// Event id, when the message could be decoded that far.
    pub event_id: Option<String>,
    /// Event type (or the routing key of an undecodable message).
    pub event_type: String,
    /// Subject, when known.
    pub subject: Option<String>,
    /// Correlation id, when known.
    pub correlation_id: Option<String>,
    /// Causation id, when known (absent from records of older warrens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The event's source, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The event's own `time`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<chrono::DateTime<chrono::Utc>>,
    /// 1 for the first delivery, +1 per retry.
    pub attempt: u32,
    /// Time from delivery to outcome, in milliseconds.
    pub elapsed_ms: f64,
    /// Short reason code for retries and dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Error text for retries and dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the outcome happened.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl OutcomeRecord {
    /// The record with `outcome`, for outcomes that need no reason.
    pub(crate) fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Writes the outcome's log line: every line about an event carries its
    /// id, type, subject and correlation id.
    pub fn log(&self) {
        let id = self.event_id.as_deref().unwrap_or("-");
        let subject = self.subject.as_deref().unwrap_or("-");
        let corr = self.correlation_id.as_deref().unwrap_or("-");
        let reason = self.reason.as_deref().unwrap_or("");
        let error = self.error.as_deref().unwrap_or("");
        match self.outcome {
            Outcome::Handled | Outcome::Duplicate | Outcome::Skipped | Outcome::Deferred => {
                tracing::info!(
                    service = %self.service, outcome = self.outcome.as_str(), event_id = id,
                    event_type = %self.event_type, subject, correlation_id = corr,
                    attempt = self.attempt, elapsed_ms = format_args!("{:.2}", self.elapsed_ms),
                    "{}", self.outcome.as_str()
                );
            }
            Outcome::Retried | Outcome::DeadLettered => {
                tracing::warn!(
                    service = %self.service, outcome = self.outcome.as_str(), event_id = id,
                    event_type = %self.event_type, subject, correlation_id = corr,
                    attempt = self.attempt, elapsed_ms = format_args!("{:.2}", self.elapsed_ms),
                    reason, error, "{}", self.outcome.as_str()
                );
            }
        }
    }
}

/// Upper bounds of the handling-latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Counters of one service's consumer, rendered by `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<StatsInner>,
}

#[derive(Debug, Default, Clone)]
struct StatsInner {
    counts: BTreeMap<(String, Outcome), u64>,
    /// Cumulative bucket counts, plus sum and count, for handled events.
    buckets: [u64; LATENCY_BUCKETS.len()],
    latency_sum: f64,
    latency_count: u64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsSnapshot {
    /// Count per outcome name, all types together.
    pub by_outcome: BTreeMap<String, u64>,
    /// Count per (event type, outcome name).
    pub by_type: Vec<(String, String, u64)>,
    /// Handled-latency histogram: (upper bound s, cumulative count).
    pub latency_buckets: Vec<(f64, u64)>,
    /// Sum of handled latencies, seconds.
    pub latency_sum: f64,
    /// Number of handled latencies.
    pub latency_count: u64,
}

impl Stats {
    /// Counts one outcome.
    pub fn record(&self, r: &OutcomeRecord) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *s.counts
            .entry((r.event_type.clone(), r.outcome))
            .or_default() += 1;
        if r.outcome == Outcome::Handled {
            let secs = r.elapsed_ms / 1000.0;
            for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                if secs <= *le {
                    s.buckets[i] += 1;
                }
            }
            s.latency_sum += secs;
            s.latency_count += 1;
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut by_outcome = BTreeMap::new();
        let mut by_type = Vec::new();
        for ((t, o), n) in &s.counts {
            *by_outcome.entry(o.as_str().to_owned()).or_default() += n;
            by_type.push((t.clone(), o.as_str().to_owned(), *n));
        }
        StatsSnapshot {
            by_outcome,
            by_type,
            latency_buckets: LATENCY_BUCKETS.iter().copied().zip(s.buckets).collect(),
            latency_sum: s.latency_sum,
            latency_count: s.latency_count,
        }
    }

    /// How many events ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.counts
            .iter()
            .filter(|((_, o), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Best-effort live feed of outcomes on `<ns>.outcomes` (a topic exchange,
/// routing key `<service>.<outcome>`), so `warren tail` sees every
/// process's consumers. Telemetry only: published without confirms, and a
/// failure is logged at debug and never holds up an event.
#[derive(Clone)]
pub struct Feed {
    /// A channel of its own, not in confirm mode.
    pub channel: lapin::Channel,
    /// `<ns>.outcomes`
    pub exchange: String,
}

impl Feed {
    /// Publishes one record.
    pub async fn publish(&self, r: &OutcomeRecord) {
        let Ok(body) = serde_json::to_vec(r) else {
            return;
        };
        let key = format!("{}.{}", r.service, r.outcome.as_str());
        let sent = self
            .channel
            .basic_publish(
                &self.exchange,
                &key,
                lapin::options::BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default().with_content_type("application/json".into()),
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "outcome feed publish failed");
        }
    }
}
