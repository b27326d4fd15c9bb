//! One batch's trip through the relay, and its SQL: claim the rows,
//! publish them, await their confirms, settle (delete or mark) exactly the
//! confirmed ones.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::{join_all, JoinAll};
use lapin::{Confirmation, PublisherConfirm};
use sqlx::PgConnection;
use tracing::Instrument;
use transport::{confirm_problem, event_properties, Outgoing, Publisher};

use super::{CrashPoint, Relay, RelayError};

/// One claimed row.
#[derive(sqlx::FromRow)]
pub(super) struct Row {
    pub(super) position: i64,
    event_id: uuid::Uuid,
    aggregate: String,
    event_type: String,
    correlation_id: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    payload: String,
}

/// A published batch whose confirms are on their way.
pub(super) struct InFlight {
    pub(super) rows: Vec<Row>,
    /// The confirms of `rows`, in the same order.
    pub(super) confirms: Pin<Box<JoinAll<PublisherConfirm>>>,
    /// When waiting for `confirms` becomes a `ConfirmTimeout`.
    pub(super) deadline: tokio::time::Instant,
    /// When the claim was sent, for the batch's log line.
    started: Instant,
    /// When its publishes were written, for the batch's log line.
    published: Instant,
    /// Whether the claim came back full (more rows are likely waiting).
    pub(super) full: bool,
}

/// The relay's statements on its outbox, formatted once per relay.
#[derive(Clone)]
pub(super) struct Statements {
    /// Up to `$1` unpublished rows in position order, but for the
    /// positions in `$2` (in flight already).
    claim: String,
    /// The claim, after settling the positions in `$3` (confirmed since
    /// the last statement, see [`Relay::claim_and_publish`]).
    settle_and_claim: String,
    /// Deletes the positions in `$1`, or marks them when they are kept.
    settle: String,
}

impl Statements {
    /// The statements on `schema`'s outbox; settling deletes unless rows
    /// are kept for a `retention`.
    pub(super) fn new(schema: &str, retention: Duration) -> Statements {
        let s = schema;
        // Rows leased to an eager publisher (see `crate::eager`) wait for
        // their lease to run out. The rows in flight (up to
        // `max_in_flight`) are left out with a hashed subplan: as
        // `position <> ALL($2)` in a generic plan the array is searched
        // linearly for every row the scan passes, which took a fifth of
        // PostgreSQL's time during a drain.
        let claim = format!(
            "SELECT position, event_id, aggregate, event_type, correlation_id, created_at, payload::text AS payload \
             FROM {s}.outbox WHERE published_at IS NULL \
               AND (leased_until IS NULL OR leased_until < now()) \
               AND position NOT IN (SELECT unnest($2::bigint[])) ORDER BY position LIMIT $1"
        );
        let settle = |param: &str| {
            if retention.is_zero() {
                format!("DELETE FROM {s}.outbox WHERE position = ANY({param})")
            } else {
                format!("UPDATE {s}.outbox SET published_at = now() WHERE position = ANY({param})")
            }
        };
        Statements {
            // A data-modifying WITH always runs to completion, read or not;
            // the claim's snapshot still sees the rows it settles, so the
            // caller excludes them as it does the rows in flight.
            settle_and_claim: format!("WITH settled AS ({}) {claim}", settle("$3")),
            claim,
            settle: settle("$1"),
        }
    }
}

impl Relay {
    /// Sets up the leader's connection for claims and settles.
    pub(super) async fn tune(&self, leader: &mut PgConnection) -> Result<(), RelayError> {
        // This connection only claims (reads) and marks. A mark lost in a
        // database crash means the rows are published again, which
        // consumers' inboxes absorb; so marks need not wait for the WAL
        // flush, which would otherwise sit in every relay pass (and be
        // slowest exactly when the disk is busy). The outbox rows
        // themselves are written by the callers' transactions, whose
        // durability is untouched.
        //
        // Plans: the claim must walk the partial index of unpublished rows
        // in position order and stop at its LIMIT. Left to itself the
        // planner often prefers a bitmap scan plus sort, which visits every
        // index entry, dead ones too: each published row leaves one behind
        // until VACUUM, and a plain index scan is what marks them dead as
        // it passes (seen: 12,000 dead entries, 4 ms per claim, after a
        // drain with autovacuum off). A sequential scan would read the
        // whole outbox. With both off, the generic plan is the index scan
        // whatever the table's size, so claims and marks are planned once
        // per connection: left to choose, the planner kept re-planning the
        // mark for its array's size (~0.1 ms a time, a claim and a mark per
        // burst of events under a trickle).
        for set in [
            "SET synchronous_commit = off",
            "SET enable_bitmapscan = off",
            "SET enable_seqscan = off",
            "SET plan_cache_mode = force_generic_plan",
        ] {
            self.db_timeout(sqlx::query(set).execute(&mut *leader))
                .await?;
        }
        Ok(())
    }

    /// Settles the `settled` rows (confirmed, see [`Relay::settle`]) and
    /// claims up to a batch of unpublished rows in one statement, skipping
    /// the `exclude`d positions (in flight already), and publishes them
    /// without waiting for their confirms. `None` when there is nothing to
    /// publish.
    pub(super) async fn claim_and_publish(
        &self,
        leader: &mut PgConnection,
        publisher: &Publisher,
        exclude: &[i64],
        limit: i64,
        settled: &mut Vec<i64>,
    ) -> Result<Option<InFlight>, RelayError> {
        let service = self.outbox.service();
        let started = Instant::now();
        let rows: Vec<Row> = if settled.is_empty() {
            self.db_timeout(
                sqlx::query_as(&self.sql.claim)
                    .bind(limit)
                    .bind(exclude)
                    .fetch_all(&mut *leader),
            )
            .await?
        } else {
            let skip: Vec<i64> = exclude.iter().chain(settled.iter()).copied().collect();
            let rows = self
                .db_timeout(
                    sqlx::query_as(&self.sql.settle_and_claim)
                        .bind(limit)
                        .bind(&skip)
                        .bind(&*settled)
                        .fetch_all(&mut *leader),
                )
                .await?;
            self.count_settled(settled.len());
            settled.clear();
            rows
        };
        if rows.is_empty() {
            return Ok(None);
        }
        self.maybe_crash(CrashPoint::AfterClaim)?;
        let exchange = self.topology.exchange();
        // Written together, in row order (see `Publisher::send`).
        let messages = rows.iter().map(|row| Outgoing {
            exchange: &exchange,
            routing_key: &row.event_type,
            body: row.payload.as_bytes(),
            properties: event_properties(
                &row.event_id.to_string(),
                &row.event_type,
                &row.aggregate,
                row.correlation_id.as_deref(),
                row.created_at.timestamp(),
                service,
            ),
        });
        let span = tracing::info_span!("warren.relay.publish", service, events = rows.len());
        let mut pending = Vec::with_capacity(rows.len());
        for sent in publisher.send(messages).instrument(span).await {
            pending.push(sent?);
        }
        self.maybe_crash(CrashPoint::AfterPublish)?;
        Ok(Some(InFlight {
            full: rows.len() as i64 >= limit,
            rows,
            confirms: Box::pin(join_all(pending)),
            deadline: tokio::time::Instant::now() + self.config.confirm_timeout,
            started,
            published: Instant::now(),
        }))
    }

    /// Waits for a batch's confirms (up to `confirm_timeout` from its
    /// publication), then settles it.
    pub(super) async fn await_and_settle(
        &self,
        leader: &mut PgConnection,
        mut batch: InFlight,
        held_back: &mut HashSet<String>,
    ) -> Result<(usize, usize), RelayError> {
        let confirms = tokio::time::timeout_at(batch.deadline, &mut batch.confirms)
            .await
            .map_err(|_| RelayError::ConfirmTimeout(self.config.confirm_timeout))?;
        self.settle(leader, batch, confirms, held_back, None).await
    }

    /// Marks (or deletes, see [`super::RelayConfig::retention`]) exactly
    /// the confirmed rows of a batch. A row that was nacked,
    /// returned or not confirmed stays unmarked, and so does every later
    /// row of its subject (`held_back`, shared by the batches settled
    /// together), even if confirmed: they are published again after it.
    /// With `defer`, the rows to mark are added to it instead, for the next
    /// claim or [`Relay::flush`] to settle. Returns (marked, failed).
    pub(super) async fn settle(
        &self,
        leader: &mut PgConnection,
        batch: InFlight,
        confirms: Vec<Result<Confirmation, lapin::Error>>,
        held_back: &mut HashSet<String>,
        defer: Option<&mut Vec<i64>>,
    ) -> Result<(usize, usize), RelayError> {
        self.maybe_crash(CrashPoint::AfterConfirm)?;
        let confirmed = Instant::now();
        let waited = confirmed.saturating_duration_since(batch.published);
        self.stats.record_confirms(waited, batch.rows.len());
        let service = self.outbox.service();
        let mut marked = Vec::with_capacity(batch.rows.len());
        let mut failed = 0;
        for (row, confirm) in batch.rows.iter().zip(confirms) {
            let problem = confirm_problem(confirm);
            match problem {
                None if !held_back.contains(&row.aggregate) => {
                    tracing::debug!(
                        event_id = %row.event_id, event_type = %row.event_type,
                        subject = %row.aggregate,
                        correlation_id = row.correlation_id.as_deref().unwrap_or(""),
                        "published"
                    );
                    marked.push(row.position);
                }
                None => failed += 1,
                Some(why) => {
                    tracing::warn!(
                        event_id = %row.event_id, event_type = %row.event_type,
                        subject = %row.aggregate,
                        correlation_id = row.correlation_id.as_deref().unwrap_or(""),
                        "not published, will retry: {why}"
                    );
                    held_back.insert(row.aggregate.clone());
                    failed += 1;
                }
            }
        }
        let published = marked.len();
        let deferred = defer.is_some();
        match defer {
            Some(later) => later.extend(marked),
            None => self.flush(leader, &mut marked).await?,
        }
        self.stats
            .failed
            .fetch_add(failed as u64, Ordering::Relaxed);
        tracing::info!(
            service,
            published,
            failed,
            elapsed_ms = ms(batch.started.elapsed()),
            publish_ms = ms(batch.published - batch.started),
            confirm_ms = ms(waited),
            // A deferred settle happens in a later statement: no figure
            // here rather than a misleading zero.
            settle_ms = (!deferred).then(|| ms(confirmed.elapsed())),
            deferred,
            "relayed batch"
        );
        Ok((published, failed))
    }

    /// Deletes (or marks) the `settled` rows now, if any.
    pub(super) async fn flush(
        &self,
        leader: &mut PgConnection,
        settled: &mut Vec<i64>,
    ) -> Result<(), RelayError> {
        if settled.is_empty() {
            return Ok(());
        }
        self.db_timeout(
            sqlx::query(&self.sql.settle)
                .bind(&*settled)
                .execute(&mut *leader),
        )
        .await?;
        self.count_settled(settled.len());
        settled.clear();
        Ok(())
    }

    /// Counted once their rows are deleted or marked, so a reader of the
    /// counter finds them gone from the outbox.
    fn count_settled(&self, n: usize) {
        self.stats.published.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A duration in milliseconds, for log fields.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
