//! The deliveries that ended otherwise than applied, kept for `warren
//! trace`: an applied (or skipped) event is its inbox row, but a
//! duplicate, a deferral, a retry or a dead letter commits nothing there,
//! so each leaves a row in `<schema>.inbox_outcomes` instead, with its
//! attempt, reason and error.
//!
//! The record is telemetry: written after the deliveries are settled, in
//! one statement per batch and only for batches that have such outcomes
//! (the usual batch has none and costs nothing here), under a timeout; a
//! failure is logged and never holds an event up. Pruned with the inbox,
//! by the same retention.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::outcome::{Outcome, OutcomeRecord};

/// Longest the record of a batch's outcomes may take before it is given
/// up (and logged): the lane waits for it.
const RECORD_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest error text kept in a row (the dead-letter header keeps the
/// same).
const MAX_ERROR_LEN: usize = 2000;

/// Whether an outcome gets a row: the ones the inbox does not show.
pub fn kept(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Duplicate | Outcome::Deferred | Outcome::Retried | Outcome::DeadLettered
    )
}

/// SQL of one schema's outcome record, built once.
#[derive(Debug, Clone)]
pub struct Trail {
    insert: String,
    prune: String,
}

impl Trail {
    /// The record of `schema` (already validated by the outbox constructor).
    pub fn new(schema: &str) -> Self {
        let s = schema;
        Trail {
            insert: format!(
                "INSERT INTO {s}.inbox_outcomes (event_id, event_type, source, subject, \
                   correlation_id, causation_id, event_time, outcome, attempt, reason, error) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                   $6::text[], $7::timestamptz[], $8::text[], $9::int[], $10::text[], $11::text[])"
            ),
            prune: format!(
                "DELETE FROM {s}.inbox_outcomes WHERE ctid IN ( \
                   SELECT ctid FROM {s}.inbox_outcomes WHERE recorded_at < $1 LIMIT $2)"
            ),
        }
    }

    /// Records the [`kept`] outcomes among `records`, in one statement
    /// (none when there are none).
    pub async fn record<'a>(
        &self,
        pool: &PgPool,
        records: impl IntoIterator<Item = &'a OutcomeRecord>,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<&OutcomeRecord> = records.into_iter().filter(|r| kept(r.outcome)).collect();
        if rows.is_empty() {
            return Ok(());
        }
        // The id of an undecodable message is whatever its message_id
        // said; only a UUID is kept (the column's type).
        let ids: Vec<Option<Uuid>> = rows
            .iter()
            .map(|r| r.event_id.as_deref().and_then(|s| Uuid::parse_str(s).ok()))
            .collect();
        let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
        let sources: Vec<Option<&str>> = rows.iter().map(|r| r.source.as_deref()).collect();
        let subjects: Vec<Option<&str>> = rows.iter().map(|r| r.subject.as_deref()).collect();
        let corrs: Vec<Option<&str>> = rows.iter().map(|r| r.correlation_id.as_deref()).collect();
        let causes: Vec<Option<&str>> = rows.iter().map(|r| r.causation_id.as_deref()).collect();
        let times: Vec<Option<chrono::DateTime<Utc>>> = rows.iter().map(|r| r.event_time).collect();
        let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
        let attempts: Vec<i32> = rows
            .iter()
            .map(|r| i32::try_from(r.attempt).unwrap_or(i32::MAX))
            .collect();
        let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.reason.as_deref()).collect();
        let errors: Vec<Option<String>> = rows
            .iter()
            .map(|r| {
                r.error
                    .as_deref()
                    .map(|e| e.chars().take(MAX_ERROR_LEN).collect())
            })
            .collect();
        let insert = sqlx::query(&self.insert)
            .bind(ids)
            .bind(types)
            .bind(sources)
            .bind(subjects)
            .bind(corrs)
            .bind(causes)
            .bind(times)
            .bind(outcomes)
            .bind(attempts)
            .bind(reasons)
            .bind(errors)
            .execute(pool);
        match tokio::time::timeout(RECORD_TIMEOUT, insert).await {
            Ok(done) => done.map(|_| ()),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    /// Deletes rows older than `window`, `batch` at a time.
    pub async fn prune(
        &self,
        pool: &PgPool,
        window: Duration,
        batch: i64,
    ) -> Result<u64, sqlx::Error> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        let mut total = 0;
        loop {
            let n = sqlx::query(&self.prune)
                .bind(cutoff)
                .bind(batch)
                .execute(pool)
                .await?
                .rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }
}
