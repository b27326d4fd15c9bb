//! The deliveries that ended otherwise than applied, kept for `warren
//! trace`: an applied (or skipped) event is its inbox row, but a
//! duplicate, a deferral, a retry or a dead letter commits nothing there,
//! so each leaves a row in `<schema>.inbox_outcomes` instead, with its
//! attempt, reason and error.
//!
//! The record is telemetry and stays off the lanes' path: a lane hands
//! its batch's records to a bounded channel without waiting ([`Recorder`]),
//! and one writer per consumer session ([`Writer`]) inserts what has
//! gathered, one statement at a time, without waiting for the WAL flush
//! (`synchronous_commit = off`: a database crash may lose the last
//! records, never an event). A deferral storm (many early events under
//! several consumers) thus costs the lanes nothing but a channel send.
//! When the writer falls more than [`CAPACITY`] records behind, the
//! records that do not fit are dropped and counted in a warning. A
//! session that ends writes what is queued (for up to 5 s) before it
//! returns. Rows are pruned with the inbox, by the same retention.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::{Connection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outcome::{Outcome, OutcomeRecord};

/// Longest one insert may take before it is given up (and logged).
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);

/// Records queued for the writer at most; more are dropped (counted).
pub const CAPACITY: usize = 4096;

/// Most records one insert carries.
const WRITE_BATCH: usize = 512;

/// Longest a finishing session waits for the queued records to be written.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// Starts the writer of one consumer session: the [`Recorder`] the
    /// lanes hand records to, and the [`Writer`] to finish at the end.
    pub fn start(self, pool: PgPool, service: &str) -> (Recorder, Writer) {
        let (tx, mut rx) = mpsc::channel::<OutcomeRecord>(CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let service = service.to_owned();
        let recorder = Recorder {
            tx,
            dropped: dropped.clone(),
        };
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(WRITE_BATCH);
                loop {
                    let n = tokio::select! {
                        n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
                        _ = stop.cancelled() => {
                            // No more sends; what is queued is still read.
                            rx.close();
                            rx.recv_many(&mut batch, WRITE_BATCH).await
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    if let Err(e) = self.write(&pool, &batch).await {
                        tracing::warn!(service, error = %e, records = batch.len(), "could not record outcomes for warren trace");
                    }
                    batch.clear();
                    let lost = dropped.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        tracing::warn!(
                            service,
                            dropped = lost,
                            "outcome records for warren trace dropped: the writer fell behind"
                        );
                    }
                }
            })
        };
        (recorder, Writer { task, stop })
    }

    /// Inserts `records` (all [`kept`] ones) in one statement, in a
    /// transaction that does not wait for the WAL flush.
    async fn write(&self, pool: &PgPool, records: &[OutcomeRecord]) -> Result<(), sqlx::Error> {
        let work = async {
            let mut conn = pool.acquire().await?;
            let mut tx = conn.begin().await?;
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await?;
            self.record(&mut tx, records).await?;
            tx.commit().await
        };
        match tokio::time::timeout(RECORD_TIMEOUT, work).await {
            Ok(done) => done,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    /// Records the [`kept`] outcomes among `records`, in one statement
    /// (none when there are none).
    pub async fn record<'a>(
        &self,
        conn: &mut sqlx::PgConnection,
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
        sqlx::query(&self.insert)
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
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Deletes rows older than `window`, `batch` at a time.
    pub async fn prune(
        &self,
        pool: &PgPool,
        window: Duration,
        batch: i64,
    ) -> Result<u64, sqlx::Error> {
        crate::inbox::prune_older_than(pool, &self.prune, window, batch).await
    }
}

/// The lanes' side of the record: hands records over without waiting.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<OutcomeRecord>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Queues the [`kept`] outcomes among `records`; what does not fit is
    /// dropped and counted (the writer warns).
    pub fn record<'a>(&self, records: impl IntoIterator<Item = &'a OutcomeRecord>) {
        for r in records.into_iter().filter(|r| kept(r.outcome)) {
            if self.tx.try_send(r.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The writer of one session, finished when the session ends.
#[derive(Debug)]
pub struct Writer {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Writer {
    /// Writes what is queued (for up to 5 s), then stops.
    pub async fn finish(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(FINISH_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(
                "outcome records for warren trace still queued at shutdown were dropped"
            );
            task.abort();
        }
    }
}
