//! What happens to one delivery, from bytes to acknowledgement:
//!
//! 1. decode (size, JSON, envelope, type, version, data); a failure is
//!    dead-lettered with the decoder's reason;
//! 2. in one transaction for a lane's batch of deliveries: lock the
//!    subjects' progress and check each sequence, record the ids of the
//!    next-in-line events in the inbox (already there → `duplicate`), run
//!    their handlers, advance the progress, commit. If anything in the
//!    batch fails, every event of it is applied alone, so one failing
//!    event never takes the others with it;
//! 3. only then acknowledge each delivery, or forward it (retry, deferral,
//!    dead letter) and then acknowledge it.
//!
//! # Per-subject order
//! Events of one (source, subject) apply in `sequence` order. Inside a
//! process, a subject always maps to the same lane, so deliveries of one
//! subject are handled one after another in queue order. Across processes
//! and after retries, the progress row decides: its row lock serialises
//! handlers of the subject, and an event whose predecessor has not been
//! applied is *deferred* (sent through the short retry queue) instead of
//! applied. Limits: a predecessor that never comes (dead-lettered, or
//! never published) holds its successors back `max_deferrals` times, then
//! they are dead-lettered with reason `sequence_gap`; redriving the
//! predecessor first and then them restores the order. An event at or
//! below the applied sequence with a new id is dead-lettered as
//! `stale_sequence`, never applied out of order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use events::{Codec, DecodeError, Envelope};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use producers::Outbox;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use crate::acks::Acks;
use crate::config::SubscriptionConfig;
use crate::deadletter::{
    header_u32, original_routing_key, ForwardError, Forwarder, H_ATTEMPT, H_DEFERRALS,
};
use crate::inbox::Inbox;
use crate::outcome::{Feed, Outcome, OutcomeRecord, Stats};
use crate::retry::Decision;
use crate::{HandleError, Router};

/// A delivery could not be settled; the session must restart (the broker
/// redelivers it, and the inbox absorbs what had already been applied).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// Forwarding to a retry or dead-letter queue failed.
    #[error("forwarding failed: {0}")]
    Forward(#[from] ForwardError),
    /// The ack could not be sent.
    #[error("ack failed: {0}")]
    Ack(#[from] lapin::Error),
    /// Shut down while waiting for the database to come back.
    #[error("shut down before the delivery could be handled")]
    ShutDown,
}

/// What the transaction did with one event.
#[derive(Debug, Clone, Copy)]
enum Applied {
    Handled,
    Skipped,
    Duplicate,
    Early { expected: i64 },
    Stale { last: i64 },
}

/// Everything a lane needs to settle deliveries.
#[derive(Clone)]
pub(crate) struct Processor {
    pub router: Arc<Router>,
    pub pool: PgPool,
    pub outbox: Outbox,
    pub inbox: Inbox,
    pub forwarder: Forwarder,
    pub config: Arc<SubscriptionConfig>,
    pub stats: Arc<Stats>,
    pub feed: Option<Feed>,
    /// In-process outcome listeners.
    pub outcomes: tokio::sync::broadcast::Sender<OutcomeRecord>,
    /// The consumer channel's acknowledgements.
    pub acks: Arc<Acks>,
    /// `/warren/<service>`: events from here are our own.
    pub own_source: String,
}

/// A lane's database connection, kept from one batch to the next while
/// deliveries keep coming: a connection given back to the pool costs a
/// round trip (sqlx checks it on release), one per batch under a trickle.
pub(crate) type Held = Option<PoolConnection<Postgres>>;

/// A delivery with what decoding made of it.
pub(crate) type Item = (Delivery, Result<Envelope, DecodeError>);

/// Decodes a delivery in either CloudEvents mode.
pub(crate) fn decode(codec: &Codec, d: &Delivery) -> Result<Envelope, DecodeError> {
    // Counted before any header is converted: the conversion copies them.
    if d.properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().len() > events::MAX_HEADERS)
    {
        return Err(DecodeError::TooManyHeaders {
            max: events::MAX_HEADERS,
        });
    }
    let headers: Vec<(String, serde_json::Value)> = d
        .properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_to_json(v)))
                .collect()
        })
        .unwrap_or_default();
    codec.decode_message(
        d.properties.content_type().as_ref().map(|c| c.as_str()),
        headers.iter().map(|(k, v)| (k.as_str(), v.clone())),
        &d.data,
    )
}

impl Processor {
    /// Settles a batch of deliveries of one lane: the decodable ones are
    /// applied in one transaction; if that fails, each is applied on its
    /// own so one bad event cannot hold back the others. Then each is
    /// retried, deferred, dead-lettered or just acknowledged.
    pub async fn process(
        &self,
        items: Vec<Item>,
        conn: &mut Held,
        shutdown: &CancellationToken,
    ) -> Result<(), SettleError> {
        let started = Instant::now();
        let mut settled: Vec<(Delivery, OutcomeRecord)> = Vec::with_capacity(items.len());
        let mut good: Vec<(Delivery, Envelope)> = Vec::with_capacity(items.len());
        for (delivery, decoded) in items {
            match decoded {
                Ok(e) => good.push((delivery, e)),
                Err(e) => {
                    let mut record = self.record_for(&delivery, None);
                    let undecodable = Decision::DeadLetter {
                        reason: e.kind(),
                        error: e.to_string(),
                    };
                    self.carry_out(&delivery, &mut record, undecodable).await?;
                    settled.push((delivery, record));
                }
            }
        }
        if good.is_empty() {
            return self.finish(settled, started).await;
        }
        let envelopes: Vec<&Envelope> = good.iter().map(|(_, e)| e).collect();
        let results: Vec<Result<Applied, HandleError>> = match self
            .apply_waiting(conn, &envelopes, shutdown)
            .await?
        {
            Ok(applied) => applied.into_iter().map(Ok).collect(),
            Err(e) if envelopes.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::debug!(error = %e, size = envelopes.len(), "batch failed; applying one by one");
                let mut one_by_one = Vec::with_capacity(envelopes.len());
                for env in &envelopes {
                    one_by_one.push(
                        self.apply_waiting(conn, &[env], shutdown)
                            .await?
                            .map(|a| a[0]),
                    );
                }
                one_by_one
            }
        };
        for ((delivery, envelope), result) in good.into_iter().zip(results) {
            let record = self.settle(&delivery, &envelope, result).await?;
            settled.push((delivery, record));
        }
        self.finish(settled, started).await
    }

    /// Applies, waiting in place (with backoff) while the database is
    /// unavailable: a lost database must not burn the events' attempts.
    async fn apply_waiting(
        &self,
        conn: &mut Held,
        events: &[&Envelope],
        shutdown: &CancellationToken,
    ) -> Result<Result<Vec<Applied>, HandleError>, SettleError> {
        let mut backoff = self.config.retry.hold_backoff();
        loop {
            match self.apply(conn, events).await {
                Err(HandleError::Unavailable(e)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        service = self.router.service(), events = events.len(), error = %e, retry_in = ?delay,
                        "database unavailable; holding the deliveries"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Err(SettleError::ShutDown),
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// The transaction: admission (order check, progress, inbox),
    /// handlers, commit.
    async fn apply(
        &self,
        conn: &mut Held,
        events: &[&Envelope],
    ) -> Result<Vec<Applied>, HandleError> {
        let held = match conn {
            Some(c) => c,
            None => conn.insert(self.pool.acquire().await?),
        };
        let result = self.apply_on(held, events).await;
        if result.is_err() {
            // Back to the pool, whose check on release flushes whatever a
            // failed or timed-out statement left behind (or closes it).
            *conn = None;
        }
        result
    }

    async fn apply_on(
        &self,
        conn: &mut PgConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Applied>, HandleError> {
        let mut tx = conn.begin().await?;
        let admissions = self.inbox.admit(&mut tx, events).await?;

        // Each event's fate. An admitted event whose id an earlier event of
        // this batch already took is a duplicate, whatever the inbox said.
        let mut plan: Vec<Option<Applied>> = Vec::with_capacity(events.len());
        let mut taken: HashSet<uuid::Uuid> = HashSet::new();
        let mut candidates: Vec<usize> = Vec::new();
        let mut behind: Vec<uuid::Uuid> = Vec::new();
        for (i, (e, a)) in events.iter().zip(&admissions).enumerate() {
            if a.admitted {
                if a.new && taken.insert(e.id) {
                    candidates.push(i);
                    plan.push(None);
                } else {
                    plan.push(Some(Applied::Duplicate));
                }
            } else if e.sequence <= a.last {
                if taken.contains(&e.id) {
                    plan.push(Some(Applied::Duplicate));
                } else {
                    behind.push(e.id);
                    plan.push(Some(Applied::Stale { last: a.last }));
                }
            } else {
                plan.push(Some(Applied::Early {
                    expected: a.last + 1,
                }));
            }
        }
        // Rare: at or below the applied sequence. Asked in a statement of
        // its own, whose snapshot is taken with the progress rows locked,
        // so a copy applied by another consumer just before counts as seen.
        if !behind.is_empty() {
            let seen = self.inbox.existing(&mut tx, &behind).await?;
            for (e, slot) in events.iter().zip(plan.iter_mut()) {
                if matches!(slot, Some(Applied::Stale { .. })) && seen.contains(&e.id) {
                    *slot = Some(Applied::Duplicate);
                }
            }
        }

        // Handlers get runs: consecutive events (in stream order) of one
        // type, so a batch handler writes a run in one statement. Our own
        // events coming back (or ours replayed from elsewhere) go alone,
        // after keeping our sequence counter past them.
        let order = in_stream_order(events, candidates);
        let mut rest = &order[..];
        while let Some(&first) = rest.first() {
            let head = events[first];
            let own = head.source == self.own_source;
            let len = if own {
                1
            } else {
                rest.iter()
                    .take_while(|&&i| {
                        events[i].event_type == head.event_type
                            && events[i].source != self.own_source
                    })
                    .count()
            };
            let (run, tail) = rest.split_at(len);
            rest = tail;
            if own {
                self.outbox
                    .observe(&mut tx, &head.subject, head.sequence)
                    .await?;
            }
            let outcome = match self.router.handler(&head.event_type) {
                Some(h) => {
                    let run_events: Vec<&Envelope> = run.iter().map(|&i| events[i]).collect();
                    h.call(
                        &mut tx,
                        &self.outbox,
                        &run_events,
                        self.config.handler_timeout,
                    )
                    .await?;
                    Applied::Handled
                }
                None => Applied::Skipped,
            };
            for &i in run {
                plan[i] = Some(outcome);
            }
        }
        tx.commit().await?;
        #[cfg(feature = "testkit")]
        if self.config.crash_at == Some(crate::config::CrashPoint::AfterCommit) {
            tracing::error!(
                service = self.router.service(),
                events = events.len(),
                "crash point after commit reached; halting before the ack"
            );
            std::future::pending::<()>().await;
        }
        Ok(plan
            .into_iter()
            .map(|a| a.unwrap_or(Applied::Duplicate))
            .collect())
    }

    /// Acts on one event's result: ack, retry, defer or dead-letter.
    async fn settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        result: Result<Applied, HandleError>,
    ) -> Result<OutcomeRecord, SettleError> {
        let mut record = self.record_for(delivery, Some(envelope));
        let retry = &self.config.retry;
        let decision = match result {
            Ok(Applied::Handled) => return Ok(record.with_outcome(Outcome::Handled)),
            Ok(Applied::Skipped) => return Ok(record.with_outcome(Outcome::Skipped)),
            Ok(Applied::Duplicate) => return Ok(record.with_outcome(Outcome::Duplicate)),
            Ok(Applied::Early { expected }) => {
                let deferred = header_u32(&delivery.properties, H_DEFERRALS).unwrap_or(0);
                let why = format!(
                    "sequence {} of subject {} from {} arrived before {expected}",
                    envelope.sequence, envelope.subject, envelope.source
                );
                retry.after_early(deferred, why)
            }
            Ok(Applied::Stale { last }) => Decision::DeadLetter {
                reason: "stale_sequence",
                error: format!(
                    "sequence {} of subject {} from {} is at or below the applied sequence {last}, under a new event id",
                    envelope.sequence, envelope.subject, envelope.source
                ),
            },
            Err(e) => retry.after_failure(record.attempt, &e),
        };
        self.carry_out(delivery, &mut record, decision).await?;
        Ok(record)
    }

    /// Forwards a delivery as `decision` says and records it as its
    /// outcome.
    async fn carry_out(
        &self,
        delivery: &Delivery,
        record: &mut OutcomeRecord,
        decision: Decision,
    ) -> Result<(), SettleError> {
        let (outcome, reason, error) = match decision {
            Decision::RetryIn {
                delay,
                attempt,
                reason,
                error,
            } => {
                self.forwarder
                    .retry(delivery, delay, H_ATTEMPT, attempt)
                    .await?;
                (Outcome::Retried, reason, error)
            }
            Decision::DeferIn {
                delay,
                deferrals,
                error,
            } => {
                self.forwarder
                    .retry(delivery, delay, H_DEFERRALS, deferrals)
                    .await?;
                (Outcome::Deferred, "sequence_gap", error)
            }
            Decision::DeadLetter { reason, error } => {
                self.forwarder
                    .dead_letter(delivery, reason, &error, record.attempt)
                    .await?;
                (Outcome::DeadLettered, reason, error)
            }
        };
        record.outcome = outcome;
        record.reason = Some(reason.to_owned());
        record.error = Some(error);
        Ok(())
    }

    /// The outcome record of a delivery, before its outcome is known.
    fn record_for(&self, delivery: &Delivery, envelope: Option<&Envelope>) -> OutcomeRecord {
        OutcomeRecord {
            service: self.router.service().to_owned(),
            outcome: Outcome::Handled,
            // An undecodable message has no envelope; its AMQP message_id
            // (the relay and `warren publish` set it to the event id) is
            // still the best handle an operator has on it.
            event_id: envelope.map(|e| e.id.to_string()).or_else(|| {
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
            }),
            event_type: envelope
                .map_or_else(|| original_routing_key(delivery), |e| e.event_type.clone()),
            subject: envelope.map(|e| e.subject.clone()),
            correlation_id: envelope.and_then(|e| e.correlationid.clone()),
            attempt: header_u32(&delivery.properties, H_ATTEMPT)
                .unwrap_or(1)
                .max(1),
            elapsed_ms: 0.0,
            reason: None,
            error: None,
            at: chrono::Utc::now(),
        }
    }

    /// Acknowledges a batch's deliveries, all of them after their commit
    /// (or their forward to a retry or dead-letter queue), then reports
    /// each outcome. One ack with `multiple` covers the batch and whatever
    /// other lanes settled below it (see [`crate::acks`]).
    async fn finish(
        &self,
        settled: Vec<(Delivery, OutcomeRecord)>,
        started: Instant,
    ) -> Result<(), SettleError> {
        self.acks
            .settle(settled.iter().map(|(d, _)| d.delivery_tag))
            .await?;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        for (_, mut record) in settled {
            record.elapsed_ms = elapsed_ms;
            record.at = chrono::Utc::now();
            record.log();
            self.stats.record(&record);
            if let Some(feed) = &self.feed {
                feed.publish(&record).await;
            }
            // No receiver is the normal case; that is not an error.
            let _ = self.outcomes.send(record);
        }
        Ok(())
    }
}

/// The order to run the admitted events (`candidates`, indexes into
/// `events` in delivery order) in: delivery order, except that within a
/// stream the sequences go up. A batch may bring 7 before 6; both are
/// admitted, and 6 must apply first; other streams keep their places.
fn in_stream_order(events: &[&Envelope], candidates: Vec<usize>) -> Vec<usize> {
    let mut by_stream: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for &i in &candidates {
        by_stream
            .entry((events[i].source.as_str(), events[i].subject.as_str()))
            .or_default()
            .push(i);
    }
    let mut order = candidates.clone();
    for slots in by_stream.values() {
        let mut sorted = slots.clone();
        sorted.sort_by_key(|&i| events[i].sequence);
        // `slots` are in delivery order, so are the places in `order`.
        for (slot, i) in slots.iter().zip(sorted) {
            if let Ok(place) = candidates.binary_search(slot) {
                order[place] = i;
            }
        }
    }
    order
}

/// AMQP header values as JSON, for binary-mode attributes.
fn amqp_to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(*f as f64).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::Timestamp(t) => (*t).into(),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(subject: &str, sequence: i64) -> Envelope {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Noted {}
        impl events::EventData for Noted {
            const TYPE: &'static str = "thing.noted";
            const VERSION: u32 = 1;
            const SOURCE: &'static str = "t";
        }
        let mut e = Envelope::new("t", subject.to_owned(), &Noted {});
        e.sequence = sequence;
        e
    }

    #[test]
    fn in_stream_order_sorts_sequences_within_a_stream_and_keeps_other_places() {
        let evs = [
            event("a", 7),
            event("b", 1),
            event("a", 6),
            event("c", 3),
            event("a", 8),
        ];
        let refs: Vec<&Envelope> = evs.iter().collect();
        // Every event admitted: a's slots 0, 2, 4 take 6, 7, 8 (indexes
        // 2, 0, 4); b and c stay where they were.
        assert_eq!(
            in_stream_order(&refs, vec![0, 1, 2, 3, 4]),
            vec![2, 1, 0, 3, 4]
        );
        // Only some admitted.
        assert_eq!(in_stream_order(&refs, vec![0, 2, 3]), vec![2, 0, 3]);
        assert!(in_stream_order(&refs, vec![]).is_empty());
    }
}
