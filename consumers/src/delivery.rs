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
//! Which events of a batch apply now and in which runs is `order`'s
//! call; what follows a failure or an early event is [`crate::retry`]'s.

use std::sync::Arc;
use std::time::Instant;

use events::{Codec, DecodeError, Envelope};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use producers::Outbox;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::acks::Acks;
use crate::config::SubscriptionConfig;
use crate::deadletter::{
    header_str, header_u32, original_routing_key, ForwardError, Forwarder, H_ATTEMPT, H_DEFERRALS,
};
use crate::inbox::Inbox;
use crate::order::{self, Applied, Run};
use crate::outcome::{Feed, Outcome, OutcomeRecord, Stats};
use crate::retry::Decision;
use crate::spans;
use crate::trail::{self, Recorder};
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

/// Everything a lane needs to settle deliveries.
#[derive(Clone)]
pub(crate) struct Processor {
    pub router: Arc<Router>,
    pub pool: PgPool,
    pub outbox: Outbox,
    pub inbox: Inbox,
    /// Where the outcomes the inbox does not show go.
    pub trail: Recorder,
    pub forwarder: Forwarder,
    pub config: Arc<SubscriptionConfig>,
    pub stats: Arc<Stats>,
    pub feed: Option<Feed>,
    /// In-process outcome listeners.
    pub outcomes: tokio::sync::broadcast::Sender<Arc<OutcomeRecord>>,
    /// `/warren/<service>`: events from here are our own.
    pub own_source: String,
}

/// A lane's database connection, kept from one batch to the next while
/// deliveries keep coming: a connection given back to the pool costs a
/// round trip (sqlx checks it on release), one per batch under a trickle.
pub(crate) type Held = Option<PoolConnection<Postgres>>;

/// A delivery with what decoding made of it and the acknowledgements of
/// the channel it came on (a partitioned session consumes on several).
pub(crate) type Item = (Delivery, Result<Envelope, DecodeError>, Arc<Acks>);

/// A settled delivery: its channel's acks and what became of it.
type Settled = (Delivery, Arc<Acks>, Fate);

/// What became of a delivery, until its report.
enum Fate {
    /// Handled, skipped or a duplicate, with the envelope: the outcome
    /// record is built at the report only if something reads it (a log
    /// line that is enabled, the live feed, a listener, the trail), so
    /// the common case copies nothing.
    Applied(Outcome, Envelope),
    /// Retried, deferred or dead-lettered: the record as it was carried
    /// out (rare, and always logged).
    CarriedOut(OutcomeRecord),
}

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
    let content_type = d.properties.content_type().as_ref().map(|c| c.as_str());
    // Structured mode (what warren's relay sends) reads the body alone:
    // converting its headers would only be thrown away.
    if events::is_structured(content_type) {
        return codec.decode_message(content_type, std::iter::empty(), &d.data);
    }
    let headers = d
        .properties
        .headers()
        .as_ref()
        .into_iter()
        .flat_map(|h| h.inner().iter())
        .map(|(k, v)| (k.as_str(), amqp_to_json(v)));
    codec.decode_message(content_type, headers, &d.data)
}

/// The id of an envelope that did not decode as a whole (wrong data, an
/// unknown type): the structured body's `id`, or the binary mode's
/// `ce-id` header. Only a UUID is taken — envelope ids are UUIDs, and this
/// goes into log lines and the outcome feed, where wire text must not.
fn undecoded_id(body: &[u8], ce_id: Option<String>) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<serde_json::Value>,
    }
    let from_body = (body.len() <= events::DEFAULT_MAX_BODY)
        .then(|| serde_json::from_slice::<IdOnly>(body).ok()?.id)
        .flatten()
        .and_then(|v| v.as_str().map(str::to_owned));
    from_body
        .into_iter()
        .chain(ce_id)
        .find_map(|s| uuid::Uuid::parse_str(&s).ok())
        .map(|u| u.to_string())
}

/// Attributes of an envelope that did not decode as a whole, from the
/// structured body or the binary mode's `ce-` headers.
#[derive(Debug, Default)]
struct Attributes {
    subject: Option<String>,
    correlationid: Option<String>,
    causationid: Option<String>,
    source: Option<String>,
    time: Option<String>,
}

/// Reads [`Attributes`] leniently. They go into log lines and the trace
/// record, so only short text without control characters is kept; a
/// value that is not text (or the body that is not an object) counts as
/// absent.
fn undecoded_attributes(body: &[u8], props: &lapin::BasicProperties) -> Attributes {
    let clean = |s: Option<String>| {
        s.filter(|s| s.len() <= events::MAX_ATTRIBUTE_LEN && !s.chars().any(char::is_control))
    };
    let text =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let doc: serde_json::Value = (body.len() <= events::DEFAULT_MAX_BODY)
        .then(|| serde_json::from_slice(body).ok())
        .flatten()
        .unwrap_or_default();
    // In binary mode the body is the data alone, whose fields may share
    // these names: only the headers count there.
    let binary = header_str(props, "ce-specversion").is_some();
    let pick = |k: &str| {
        clean(if binary {
            header_str(props, &format!("ce-{k}"))
        } else {
            text(&doc, k)
        })
    };
    Attributes {
        subject: pick("subject"),
        correlationid: pick("correlationid"),
        causationid: pick("causationid"),
        source: pick("source"),
        time: pick("time"),
    }
}

impl Processor {
    /// Settles a batch of deliveries of one lane: the decodable ones are
    /// applied in one transaction; if that fails, each is applied on its
    /// own so one bad event cannot hold back the others. Then each is
    /// retried, deferred, dead-lettered or just acknowledged.
    ///
    /// The settling runs in the batch's `warren.batch` span; the outcome
    /// lines come after it, outside, as they carry every field themselves.
    pub async fn process(
        &self,
        items: Vec<Item>,
        conn: &mut Held,
        shutdown: &CancellationToken,
    ) -> Result<(), SettleError> {
        let started = Instant::now();
        let span = spans::batch(self.router.service(), items.len());
        let settled = self
            .settle_batch(items, conn, shutdown)
            .instrument(span)
            .await?;
        self.report(settled, started).await;
        Ok(())
    }

    /// Decodes, applies and settles a batch, then acknowledges it.
    async fn settle_batch(
        &self,
        items: Vec<Item>,
        conn: &mut Held,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Settled>, SettleError> {
        let mut settled: Vec<Settled> = Vec::with_capacity(items.len());
        let mut good: Vec<(Delivery, Envelope, Arc<Acks>)> = Vec::with_capacity(items.len());
        for (delivery, decoded, acks) in items {
            match decoded {
                Ok(e) => good.push((delivery, e, acks)),
                Err(e) => {
                    let record = self.dead_letter_undecodable(&delivery, &e).await?;
                    settled.push((delivery, acks, Fate::CarriedOut(record)));
                }
            }
        }
        if !good.is_empty() {
            let envelopes: Vec<&Envelope> = good.iter().map(|(_, e, _)| e).collect();
            let service = self.router.service();
            let handling: Vec<Span> = good
                .iter()
                .map(|(d, e, _)| spans::handle(service, e, attempt_of(d)))
                .collect();
            let results = self
                .apply_batch(conn, &envelopes, &handling, shutdown)
                .await?;
            for ((delivery, envelope, acks), result) in good.into_iter().zip(results) {
                let fate = self.settle(&delivery, envelope, result).await?;
                settled.push((delivery, acks, fate));
            }
        }
        self.acknowledge(&settled).await?;
        Ok(settled)
    }

    /// Dead-letters a delivery that did not decode, with the decoder's
    /// reason.
    async fn dead_letter_undecodable(
        &self,
        delivery: &Delivery,
        error: &DecodeError,
    ) -> Result<OutcomeRecord, SettleError> {
        let mut record = self.record_for(delivery, None);
        // What can still be read of its envelope, so that `warren trace`
        // finds the dead letter in its story (an order.placed whose data
        // is wrong still names its order and correlation).
        let attrs = undecoded_attributes(&delivery.data, &delivery.properties);
        record.subject = attrs.subject;
        record.correlation_id = attrs.correlationid;
        record.causation_id = attrs.causationid;
        record.source = attrs.source;
        record.event_time = attrs.time.and_then(|t| t.parse().ok());
        let decision = Decision::DeadLetter {
            reason: error.kind(),
            error: error.to_string(),
        };
        self.carry_out(delivery, &mut record, decision).await?;
        Ok(record)
    }

    /// Applies `events` in one transaction and, if that fails, each in a
    /// transaction of its own, so the error lands on the event that causes
    /// it: one result per event.
    async fn apply_batch(
        &self,
        conn: &mut Held,
        events: &[&Envelope],
        spans: &[Span],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Result<Applied, HandleError>>, SettleError> {
        match self.apply_waiting(conn, events, spans, shutdown).await? {
            Ok(applied) => Ok(applied.into_iter().map(Ok).collect()),
            Err(e) if events.len() == 1 => Ok(vec![Err(e)]),
            Err(e) => {
                tracing::debug!(error = %e, size = events.len(), "batch failed; applying one by one");
                let mut one_by_one = Vec::with_capacity(events.len());
                for (i, event) in events.iter().enumerate() {
                    let span = [spans::nth(spans, i)];
                    let alone = self.apply_waiting(conn, &[event], &span, shutdown).await?;
                    one_by_one.push(alone.map(|a| a[0]));
                }
                Ok(one_by_one)
            }
        }
    }

    /// Applies, waiting in place (with backoff) while the database is
    /// unavailable: a lost database must not burn the events' attempts.
    async fn apply_waiting(
        &self,
        conn: &mut Held,
        events: &[&Envelope],
        spans: &[Span],
        shutdown: &CancellationToken,
    ) -> Result<Result<Vec<Applied>, HandleError>, SettleError> {
        let mut backoff = self.config.retry.hold_backoff();
        loop {
            match self.apply(conn, events, spans).await {
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
    /// handlers, commit. `spans` holds each event's handling span.
    async fn apply(
        &self,
        conn: &mut Held,
        events: &[&Envelope],
        spans: &[Span],
    ) -> Result<Vec<Applied>, HandleError> {
        let held = match conn {
            Some(c) => c,
            None => conn.insert(self.pool.acquire().await?),
        };
        let result = self.apply_on(held, events, spans).await;
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
        spans: &[Span],
    ) -> Result<Vec<Applied>, HandleError> {
        let mut tx = conn.begin().await?;
        // Which events the service has no handler for, so the inbox
        // records them as skipped (what `warren trace` shows).
        let skipped: Vec<bool> = events
            .iter()
            .map(|e| self.router.handler(&e.event_type).is_none())
            .collect();
        let admissions = self.inbox.admit_marked(&mut tx, events, &skipped).await?;
        let mut plan = order::plan(events, &admissions);
        // Rare: at or below the applied sequence. Asked in a statement of
        // its own, whose snapshot is taken with the progress rows locked,
        // so a copy applied by another consumer just before counts as seen.
        if !plan.behind.is_empty() {
            let seen = self.inbox.existing(&mut tx, &plan.behind).await?;
            plan.mark_seen(events, &seen);
        }
        // A preparer (e.g. locking every row the batch will touch, in one
        // order) sees the events about to be handled, once, first.
        if let Some(preparer) = self.router.preparer() {
            let handled: Vec<&Envelope> = plan
                .candidates
                .iter()
                .map(|&i| events[i])
                .filter(|e| self.router.handler(&e.event_type).is_some())
                .collect();
            if !handled.is_empty() {
                crate::router::bounded(
                    self.config.handler_timeout,
                    preparer.prepare(&mut tx, &handled),
                )
                .await?;
            }
        }
        for run in order::runs(events, &plan.candidates, &self.own_source) {
            let outcome = self.handle_run(&mut tx, events, spans, &run).await?;
            plan.ran(&run, outcome);
        }
        tx.commit().await?;
        #[cfg(feature = "testkit")]
        self.crash_point_after_commit(events.len()).await;
        Ok(plan.fates())
    }

    /// Runs the handler of a run's type on its events, in the open
    /// transaction. An event of our own first keeps the outbox's sequence
    /// counter past it, so the next append on its subject numbers after it.
    async fn handle_run(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
        spans: &[Span],
        run: &Run,
    ) -> Result<Applied, HandleError> {
        let head = events[run.events[0]];
        if run.own {
            self.outbox
                .observe(tx, &head.subject, head.sequence)
                .await?;
        }
        let Some(handler) = self.router.handler(&head.event_type) else {
            return Ok(Applied::Skipped);
        };
        let run_events: Vec<&Envelope> = run.events.iter().map(|&i| events[i]).collect();
        let run_spans: Vec<Span> = run.events.iter().map(|&i| spans::nth(spans, i)).collect();
        handler
            .call(
                tx,
                &self.outbox,
                &run_events,
                &run_spans,
                self.config.handler_timeout,
            )
            .await?;
        Ok(Applied::Handled)
    }

    /// Test-only fault injection: halts the lane for good after a commit,
    /// before any ack, when the test asked for it.
    #[cfg(feature = "testkit")]
    async fn crash_point_after_commit(&self, events: usize) {
        if self.config.crash_at == Some(crate::config::CrashPoint::AfterCommit) {
            tracing::error!(
                service = self.router.service(),
                events,
                "crash point after commit reached; halting before the ack"
            );
            std::future::pending::<()>().await;
        }
    }

    /// Acts on one event's result: ack, retry, defer or dead-letter.
    async fn settle(
        &self,
        delivery: &Delivery,
        envelope: Envelope,
        result: Result<Applied, HandleError>,
    ) -> Result<Fate, SettleError> {
        let retry = &self.config.retry;
        let decision = match result {
            Ok(Applied::Handled) => return Ok(Fate::Applied(Outcome::Handled, envelope)),
            Ok(Applied::Skipped) => return Ok(Fate::Applied(Outcome::Skipped, envelope)),
            Ok(Applied::Duplicate) => return Ok(Fate::Applied(Outcome::Duplicate, envelope)),
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
            Err(e) => retry.after_failure(attempt_of(delivery), &e),
        };
        let mut record = self.record_for(delivery, Some(&envelope));
        self.carry_out(delivery, &mut record, decision).await?;
        Ok(Fate::CarriedOut(record))
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
            event_id: envelope
                .map(|e| e.id.to_string())
                .or_else(|| {
                    delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.to_string())
                })
                .or_else(|| {
                    undecoded_id(&delivery.data, header_str(&delivery.properties, "ce-id"))
                }),
            // An undecodable message's type is whatever its (original)
            // routing key claims: wire text, escaped before it reaches a
            // log line or the live feed (counters file it as `unknown`).
            event_type: envelope.map_or_else(
                || events::printable(&original_routing_key(delivery)).into_owned(),
                |e| e.event_type.clone(),
            ),
            subject: envelope.map(|e| e.subject.clone()),
            correlation_id: envelope.and_then(|e| e.correlationid.clone()),
            causation_id: envelope.and_then(|e| e.causationid.clone()),
            source: envelope.map(|e| e.source.clone()),
            event_time: envelope.map(|e| e.time),
            attempt: attempt_of(delivery),
            elapsed_ms: 0.0,
            reason: None,
            error: None,
            at: chrono::Utc::now(),
        }
    }

    /// Acknowledges a batch's deliveries, all of them after their commit
    /// (or their forward to a retry or dead-letter queue). One ack with
    /// `multiple` per channel covers the batch and whatever other lanes
    /// settled below it (see [`crate::acks`]).
    async fn acknowledge(&self, settled: &[Settled]) -> Result<(), SettleError> {
        // One ack per channel the batch's deliveries came on (one, unless
        // the session consumes several partitions).
        if let Some((_, first, _)) = settled.first() {
            if settled.iter().all(|(_, acks, _)| Arc::ptr_eq(first, acks)) {
                first
                    .settle(settled.iter().map(|(d, _, _)| d.delivery_tag))
                    .await?;
                return Ok(());
            }
        }
        let mut done = vec![false; settled.len()];
        for i in 0..settled.len() {
            if done[i] {
                continue;
            }
            let acks = &settled[i].1;
            let mut tags = Vec::new();
            for (j, (d, other, _)) in settled.iter().enumerate().skip(i) {
                if !done[j] && Arc::ptr_eq(acks, other) {
                    done[j] = true;
                    tags.push(d.delivery_tag);
                }
            }
            acks.settle(tags).await?;
        }
        Ok(())
    }

    /// Reports each outcome of an acknowledged batch: its log line, the
    /// counters, the trail, the live feed and in-process listeners.
    async fn report(&self, settled: Vec<Settled>, started: Instant) {
        let elapsed = started.elapsed();
        self.stats.record_batch(elapsed);
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        for (delivery, _, fate) in settled {
            let mut record = match fate {
                Fate::CarriedOut(mut record) => {
                    record.at = chrono::Utc::now();
                    self.stats.record(&record);
                    record
                }
                Fate::Applied(outcome, envelope) => {
                    self.stats.tally(&envelope.event_type, outcome, None);
                    if !self.reads(outcome) {
                        continue;
                    }
                    self.record_for(&delivery, Some(&envelope))
                        .with_outcome(outcome)
                }
            };
            record.elapsed_ms = elapsed_ms;
            record.log();
            self.tell(record).await;
        }
    }

    /// Whether anything reads the record of an applied event's `outcome`:
    /// its log line, the trail, the live feed or a listener.
    fn reads(&self, outcome: Outcome) -> bool {
        OutcomeRecord::logged(outcome)
            || trail::kept(outcome)
            || self.feed.is_some()
            || self.outcomes.receiver_count() > 0
    }

    /// Hands a record to the trail, the live feed and in-process
    /// listeners.
    async fn tell(&self, record: OutcomeRecord) {
        // Handed to the trail's writer, never waited for: the record is
        // for `warren trace`, not part of settling.
        self.trail.record(std::iter::once(&record));
        if let Some(feed) = &self.feed {
            feed.publish(&record).await;
        }
        // No receiver is the normal case (then nothing is allocated for
        // one); that is not an error.
        if self.outcomes.receiver_count() > 0 {
            let _ = self.outcomes.send(Arc::new(record));
        }
    }
}

/// Which delivery of its event this is: 1 for the first, +1 per retry.
fn attempt_of(delivery: &Delivery) -> u32 {
    header_u32(&delivery.properties, H_ATTEMPT)
        .unwrap_or(1)
        .max(1)
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

    #[test]
    fn an_undecodable_envelope_keeps_its_clean_attributes_for_the_trace() {
        let body = br#"{"id":"x","subject":"o-1","correlationid":"c-1","causationid":"e\u001b[31m","source":"/warren/orders","data":{}}"#;
        let a = undecoded_attributes(body, &lapin::BasicProperties::default());
        assert_eq!(a.subject.as_deref(), Some("o-1"));
        assert_eq!(a.correlationid.as_deref(), Some("c-1"));
        assert_eq!(a.causationid, None, "control characters: dropped");
        assert_eq!(a.source.as_deref(), Some("/warren/orders"));
    }

    #[test]
    fn an_undecodable_envelope_still_names_its_uuid_id_and_nothing_else() {
        let id = "0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e";
        let body = format!(r#"{{"id":"{id}","type":"order.placed","data":{{"total":"x"}}}}"#);
        assert_eq!(undecoded_id(body.as_bytes(), None).as_deref(), Some(id));
        assert_eq!(
            undecoded_id(b"not json", Some(id.to_owned())).as_deref(),
            Some(id)
        );
        // Wire text that is not a UUID never reaches a log line.
        assert_eq!(undecoded_id(br#"{"id":"[31mevil"}"#, None), None);
        assert_eq!(
            undecoded_id(
                b"{}",
                Some(
                    "evil
"
                    .into()
                )
            ),
            None
        );
    }
}
