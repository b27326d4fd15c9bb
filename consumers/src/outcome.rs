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

    /// Whether [`OutcomeRecord::log`] would write a line for `outcome`
    /// (the subscriber's level for this module's lines).
    pub fn logged(outcome: Outcome) -> bool {
        match outcome {
            Outcome::Handled | Outcome::Duplicate | Outcome::Skipped | Outcome::Deferred => {
                tracing::enabled!(tracing::Level::INFO)
            }
            Outcome::Retried | Outcome::DeadLettered => tracing::enabled!(tracing::Level::WARN),
        }
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
                    event_type = self.event_type.as_str(), subject, correlation_id = corr,
                    attempt = self.attempt, elapsed_ms = format_args!("{:.2}", self.elapsed_ms),
                    "{}", self.outcome.as_str()
                );
            }
            Outcome::Retried | Outcome::DeadLettered => {
                tracing::warn!(
                    service = %self.service, outcome = self.outcome.as_str(), event_id = id,
                    event_type = self.event_type.as_str(), subject, correlation_id = corr,
                    attempt = self.attempt, elapsed_ms = format_args!("{:.2}", self.elapsed_ms),
                    reason, error, "{}", self.outcome.as_str()
                );
            }
        }
    }
}

/// Upper bounds of the consumer's batch-time histogram, in seconds: from
/// a lane taking a batch to its ack (a batch of one under a trickle is a
/// few milliseconds; a held database or a slow handler, seconds).
pub const BATCH_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// The `type` a counter files an event under when its type is not one of
/// the catalog's (an undecodable message, whose only claim to a type is a
/// header anyone can set): counters stay bounded and free of wire text.
pub const UNKNOWN_TYPE: &str = "unknown";

/// Every reason a retry, a deferral or a dead letter can give: the
/// decoder's kinds ([`events::DecodeError::kind`]) and the runtime's own
/// ([`crate::retry`], [`crate::delivery`]). Counters file any other as
/// [`OTHER_REASON`].
pub const REASONS: [&str; 12] = [
    "too_large",
    "malformed_json",
    "invalid_envelope",
    "unknown_type",
    "unsupported_version",
    "invalid_data",
    "transient",
    "throttled",
    "retries_exhausted",
    "handler_rejected",
    "sequence_gap",
    "stale_sequence",
];

/// What a reason outside [`REASONS`] is counted as (none today; a guard
/// against a future one turning into an unbounded label).
pub const OTHER_REASON: &str = "other";

/// One counter's key: (event type, outcome, reason), every part from a
/// fixed set.
pub type CountKey = (&'static str, Outcome, Option<&'static str>);

/// Counters of one service's consumer, rendered by `/metrics` and read by
/// `warren status` and the tests. Every key comes from a fixed set (the
/// catalog's types, the outcomes, [`REASONS`]), so the counters stay
/// bounded whatever arrives on the wire.
#[derive(Debug)]
pub struct Stats {
    /// The catalog's types; any other type counts as [`UNKNOWN_TYPE`].
    known_types: Vec<&'static str>,
    inner: Mutex<StatsInner>,
}

#[derive(Debug, Default, Clone)]
struct StatsInner {
    counts: BTreeMap<CountKey, u64>,
    /// Batch times: count per bucket of [`BATCH_BUCKETS`] (not cumulative;
    /// the last slot counts those above every bound), sum and count.
    batch_buckets: [u64; BATCH_BUCKETS.len() + 1],
    batch_sum: f64,
    batch_count: u64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsSnapshot {
    /// Count per outcome name, all types together.
    pub by_outcome: BTreeMap<String, u64>,
    /// Count per (event type, outcome name).
    pub by_type: Vec<(String, String, u64)>,
    /// Count per (event type, outcome, reason): the labels of `/metrics`.
    #[serde(skip)]
    pub counts: Vec<(CountKey, u64)>,
    /// Batch-time histogram: (upper bound s, count in that bucket alone),
    /// `f64::INFINITY` last.
    pub batch_buckets: Vec<(f64, u64)>,
    /// Sum of batch times, seconds.
    pub batch_sum: f64,
    /// Number of batches.
    pub batch_count: u64,
}

impl Stats {
    /// Counters for a consumer whose events are `known_types` (the
    /// catalog's); any other type is counted as [`UNKNOWN_TYPE`].
    pub fn new(known_types: impl IntoIterator<Item = &'static str>) -> Self {
        let mut known_types: Vec<&'static str> = known_types.into_iter().collect();
        known_types.sort_unstable();
        known_types.dedup();
        Stats {
            known_types,
            inner: Mutex::default(),
        }
    }

    /// The label of `event_type`: itself if the catalog knows it, else
    /// [`UNKNOWN_TYPE`].
    fn type_label(&self, event_type: &str) -> &'static str {
        self.known_types
            .binary_search(&event_type)
            .map_or(UNKNOWN_TYPE, |i| self.known_types[i])
    }

    /// Counts one outcome.
    pub fn record(&self, r: &OutcomeRecord) {
        self.tally(&r.event_type, r.outcome, r.reason.as_deref());
    }

    /// Counts one outcome of an event of `event_type` (filed as
    /// [`UNKNOWN_TYPE`] when the catalog does not have it).
    pub fn tally(&self, event_type: &str, outcome: Outcome, reason: Option<&str>) {
        let key = (
            self.type_label(event_type),
            outcome,
            reason.map(reason_label),
        );
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *s.counts.entry(key).or_default() += 1;
    }

    /// Records how long a batch took, from its lane taking it to its ack.
    pub fn record_batch(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = BATCH_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BATCH_BUCKETS.len());
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.batch_buckets[slot] += 1;
        s.batch_sum += secs;
        s.batch_count += 1;
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut by_outcome = BTreeMap::new();
        let mut by_type: BTreeMap<(&str, Outcome), u64> = BTreeMap::new();
        for ((t, o, _), n) in &s.counts {
            *by_outcome.entry(o.as_str().to_owned()).or_default() += n;
            *by_type.entry((t, *o)).or_default() += n;
        }
        StatsSnapshot {
            by_outcome,
            by_type: by_type
                .into_iter()
                .map(|((t, o), n)| (t.to_owned(), o.as_str().to_owned(), n))
                .collect(),
            counts: s.counts.into_iter().collect(),
            batch_buckets: BATCH_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(s.batch_buckets)
                .collect(),
            batch_sum: s.batch_sum,
            batch_count: s.batch_count,
        }
    }

    /// How many events ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.counts
            .iter()
            .filter(|((_, o, _), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The label of a reason: itself if it is one of [`REASONS`], else
/// [`OTHER_REASON`].
fn reason_label(reason: &str) -> &'static str {
    REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or(OTHER_REASON)
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
                self.exchange.as_str().into(),
                key.as_str().into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_type: &str, outcome: Outcome, reason: Option<&str>) -> OutcomeRecord {
        OutcomeRecord {
            service: "orders".into(),
            outcome,
            event_id: None,
            event_type: event_type.into(),
            subject: None,
            correlation_id: None,
            causation_id: None,
            source: None,
            event_time: None,
            attempt: 1,
            elapsed_ms: 0.0,
            reason: reason.map(str::to_owned),
            error: None,
            at: chrono::Utc::now(),
        }
    }

    #[test]
    fn counters_keep_catalog_types_and_known_reasons_and_file_the_rest_under_fixed_names() {
        let stats = Stats::new(["order.placed"]);
        stats.record(&record("order.placed", Outcome::Handled, None));
        stats.record(&record(
            "evil\"}\n# HELP x",
            Outcome::DeadLettered,
            Some("malformed_json"),
        ));
        stats.record(&record("order.placed", Outcome::Retried, Some("made up")));
        let counts: Vec<CountKey> = stats
            .snapshot()
            .counts
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            counts,
            vec![
                ("order.placed", Outcome::Handled, None),
                ("order.placed", Outcome::Retried, Some(OTHER_REASON)),
                (UNKNOWN_TYPE, Outcome::DeadLettered, Some("malformed_json")),
            ]
        );
        assert_eq!(stats.count(Outcome::DeadLettered), 1);
    }

    #[test]
    fn batch_times_land_in_one_bucket_each_with_sum_and_count() {
        let stats = Stats::new([]);
        stats.record_batch(std::time::Duration::from_micros(1500));
        stats.record_batch(std::time::Duration::from_secs(60));
        let s = stats.snapshot();
        assert_eq!(s.batch_count, 2);
        assert!((s.batch_sum - 60.0015).abs() < 1e-9);
        assert_eq!(s.batch_buckets[1], (0.002, 1));
        assert_eq!(s.batch_buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.batch_buckets.iter().map(|(_, n)| n).sum::<u64>(), 2);
    }
}
