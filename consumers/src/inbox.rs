//! The inbox of one service schema: which events were applied (the
//! idempotency record) and how far each (source, subject) has been applied
//! (the ordering record). Both are written in the handler's transaction,
//! with one set-based statement per batch of deliveries, so a batch costs
//! a handful of round trips plus its handlers', and one commit.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use events::Envelope;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// (source, subject): the unit of ordering.
pub type Stream = (String, String);

/// SQL of one schema's inbox, built once.
#[derive(Debug, Clone)]
pub struct Inbox {
    schema: String,
    record: String,
    existing: String,
    lock_progress: String,
    advance: String,
    prune: String,
    count: String,
}

impl Inbox {
    /// The inbox of `schema` (already validated by the outbox constructor).
    pub fn new(schema: &str) -> Self {
        let s = schema;
        Inbox {
            schema: s.to_owned(),
            record: format!(
                "INSERT INTO {s}.inbox (event_id, event_type, source, subject, sequence) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
                 ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            ),
            existing: format!("SELECT event_id FROM {s}.inbox WHERE event_id = ANY($1)"),
            // An upsert that changes nothing still takes the row lock, so
            // one statement both creates the rows and serialises every
            // handler of these subjects, across processes, until commit.
            lock_progress: format!(
                "INSERT INTO {s}.subject_progress AS p (source, subject, last_sequence) \
                 SELECT src, sub, 0 FROM unnest($1::text[], $2::text[]) AS u(src, sub) \
                 ON CONFLICT (source, subject) DO UPDATE SET last_sequence = p.last_sequence \
                 RETURNING source, subject, last_sequence"
            ),
            // An upsert rather than UPDATE … FROM unnest: the rows exist
            // (locked above), and an upsert always finds them through the
            // primary key, whereas the join's cached generic plan, chosen
            // while the table was small, stays a sequential scan forever
            // (seen: one per batch, 1.1 M rows read in a bench run).
            advance: format!(
                "INSERT INTO {s}.subject_progress AS p (source, subject, last_sequence) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                 ON CONFLICT (source, subject) DO UPDATE \
                 SET last_sequence = excluded.last_sequence, updated_at = now()"
            ),
            prune: format!(
                "DELETE FROM {s}.inbox WHERE event_id IN ( \
                   SELECT event_id FROM {s}.inbox WHERE handled_at < $1 LIMIT $2)"
            ),
            count: format!("SELECT count(*) FROM {s}.inbox"),
        }
    }

    /// Records events as handled; returns the ids that were new.
    pub async fn record(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let sources: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
        let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
        let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        let new: Vec<Uuid> = sqlx::query_scalar(&self.record)
            .bind(ids)
            .bind(types)
            .bind(sources)
            .bind(subjects)
            .bind(seqs)
            .fetch_all(tx)
            .await?;
        Ok(new.into_iter().collect())
    }

    /// Which of `ids` the inbox already holds.
    pub async fn existing(
        &self,
        tx: &mut PgConnection,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        let found: Vec<Uuid> = sqlx::query_scalar(&self.existing)
            .bind(ids)
            .fetch_all(tx)
            .await?;
        Ok(found.into_iter().collect())
    }

    /// Locks the progress rows of `streams` (in a fixed order, so two
    /// batches never wait on each other in a cycle) and returns the last
    /// applied sequence of each.
    pub async fn lock_progress(
        &self,
        tx: &mut PgConnection,
        streams: &[Stream],
    ) -> Result<HashMap<Stream, i64>, sqlx::Error> {
        let mut sorted: Vec<&Stream> = streams.iter().collect();
        sorted.sort();
        sorted.dedup();
        let sources: Vec<&str> = sorted.iter().map(|s| s.0.as_str()).collect();
        let subjects: Vec<&str> = sorted.iter().map(|s| s.1.as_str()).collect();
        let rows: Vec<(String, String, i64)> = sqlx::query_as(&self.lock_progress)
            .bind(sources)
            .bind(subjects)
            .fetch_all(tx)
            .await?;
        Ok(rows.into_iter().map(|(a, b, n)| ((a, b), n)).collect())
    }

    /// Moves each stream's progress to the given sequence.
    pub async fn advance(
        &self,
        tx: &mut PgConnection,
        to: &HashMap<Stream, i64>,
    ) -> Result<(), sqlx::Error> {
        if to.is_empty() {
            return Ok(());
        }
        let sources: Vec<&str> = to.keys().map(|s| s.0.as_str()).collect();
        let subjects: Vec<&str> = to.keys().map(|s| s.1.as_str()).collect();
        let seqs: Vec<i64> = to.values().copied().collect();
        sqlx::query(&self.advance)
            .bind(sources)
            .bind(subjects)
            .bind(seqs)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Deletes inbox rows older than `window`, `batch` at a time. The window
    /// must exceed the longest time a redelivery can take (retries plus
    /// dead-letter redrive), or a late duplicate would apply twice.
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

    /// Rows in the inbox.
    pub async fn size(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&self.count).fetch_one(pool).await
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}
