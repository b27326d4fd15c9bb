//! The inbox of one service schema: which events were applied (the
//! idempotency record) and how far each (source, subject) has been applied
//! (the ordering record). Both are written in the handler's transaction,
//! with one set-based statement per batch of deliveries, so a batch costs
//! BEGIN, that statement, its handlers' statements and COMMIT.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use events::Envelope;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// What [`Inbox::admit`] made of one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The stream's applied sequence once the batch commits.
    pub last: i64,
    /// Its sequence is next in line (and it is the first event of the
    /// batch with that sequence): it applies now.
    pub admitted: bool,
    /// Admitted and its id was not in the inbox yet.
    pub new: bool,
}

/// SQL of one schema's inbox, built once.
#[derive(Debug, Clone)]
pub struct Inbox {
    schema: String,
    admit: String,
    admit_one: String,
    existing: String,
    prune: String,
    count: String,
}

impl Inbox {
    /// The inbox of `schema` (already validated by the outbox constructor).
    pub fn new(schema: &str) -> Self {
        let s = schema;
        Inbox {
            schema: s.to_owned(),
            // One statement per batch. `b` is the batch in delivery
            // order, only the columns admission reads: it is scanned once
            // per stream, and the columns kept for `warren trace`
            // (correlation, causation, time) and `skipped` join in by
            // position at the insert. `adv` locks the progress row of each stream it touches
            // (in sorted order, so two batches never wait on each other in
            // a cycle; an upsert that changes nothing still takes the row
            // lock, which serialises every handler of these subjects,
            // across processes, until commit) and moves it to the end of
            // the run of consecutive sequences the batch continues it
            // with, remembering where it was. A sequence `r.seq` is in that
            // run exactly when it is the `r.n`-th distinct sequence above
            // the old position and equals old + n. `acc` is the first
            // event of each admitted sequence, `ins` records them in the
            // inbox (an id already there is a duplicate). Every table is
            // reached through a unique index (upsert arbiters), so no
            // cached generic plan can turn into a scan as tables grow.
            admit: format!(
                "WITH b AS ( \
                   SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
                   WITH ORDINALITY AS b(id, event_type, src, sub, seq, ord)), \
                 adv AS ( \
                   INSERT INTO {s}.subject_progress AS p (source, subject, last_sequence, prev_sequence) \
                   SELECT k.src, k.sub, \
                     (SELECT coalesce(max(r.seq), 0) FROM ( \
                        SELECT d.seq, row_number() OVER (ORDER BY d.seq) AS n FROM ( \
                          SELECT DISTINCT b.seq FROM b WHERE b.src = k.src AND b.sub = k.sub AND b.seq > 0) AS d) AS r \
                      WHERE r.seq = r.n), \
                     0 \
                   FROM (SELECT DISTINCT src, sub FROM b) AS k ORDER BY k.src, k.sub \
                   ON CONFLICT (source, subject) DO UPDATE SET \
                     prev_sequence = p.last_sequence, \
                     last_sequence = (SELECT coalesce(max(r.seq), p.last_sequence) FROM ( \
                        SELECT d.seq, row_number() OVER (ORDER BY d.seq) AS n FROM ( \
                          SELECT DISTINCT b.seq FROM b \
                          WHERE b.src = p.source AND b.sub = p.subject AND b.seq > p.last_sequence) AS d) AS r \
                      WHERE r.seq - p.last_sequence = r.n), \
                     updated_at = now() \
                   RETURNING source, subject, prev_sequence, last_sequence), \
                 acc AS ( \
                   SELECT DISTINCT ON (b.src, b.sub, b.seq) b.* \
                   FROM b JOIN adv ON adv.source = b.src AND adv.subject = b.sub \
                   WHERE b.seq > adv.prev_sequence AND b.seq <= adv.last_sequence \
                   ORDER BY b.src, b.sub, b.seq, b.ord), \
                 ins AS ( \
                   INSERT INTO {s}.inbox (event_id, event_type, source, subject, sequence, \
                     correlation_id, causation_id, event_time, skipped) \
                   SELECT a.id, a.event_type, a.src, a.sub, a.seq, t.corr, t.caus, t.etime, t.skip \
                   FROM acc AS a JOIN unnest($6::text[], $7::text[], $8::timestamptz[], $9::bool[]) \
                     WITH ORDINALITY AS t(corr, caus, etime, skip, ord) ON t.ord = a.ord \
                   ON CONFLICT (event_id) DO NOTHING RETURNING event_id) \
                 SELECT adv.last_sequence, b.ord IN (SELECT ord FROM acc), \
                   b.ord IN (SELECT ord FROM acc) AND b.id IN (SELECT event_id FROM ins) \
                 FROM b JOIN adv ON adv.source = b.src AND adv.subject = b.sub \
                 ORDER BY b.ord"
            ),
            // The same admission for a batch of one, the usual batch under
            // a trickle: without the batch's set logic (the run of
            // consecutive sequences, first-of-each-sequence) there is
            // nothing to compute but "is it the next one", and the plan
            // is a fraction of the general one's to start up, which is
            // most of its cost at one event per transaction. Results
            // and writes are the general statement's (tested side by
            // side in tests/inbox.rs).
            admit_one: format!(
                "WITH adv AS ( \
                   INSERT INTO {s}.subject_progress AS p (source, subject, last_sequence, prev_sequence) \
                   VALUES ($3::text, $4::text, CASE WHEN $5::bigint = 1 THEN 1 ELSE 0 END, 0) \
                   ON CONFLICT (source, subject) DO UPDATE SET \
                     prev_sequence = p.last_sequence, \
                     last_sequence = CASE WHEN $5::bigint = p.last_sequence + 1 \
                                     THEN $5::bigint ELSE p.last_sequence END, \
                     updated_at = now() \
                   RETURNING prev_sequence, last_sequence), \
                 ins AS ( \
                   INSERT INTO {s}.inbox (event_id, event_type, source, subject, sequence, \
                     correlation_id, causation_id, event_time, skipped) \
                   SELECT $1::uuid, $2::text, $3::text, $4::text, $5::bigint, \
                     $6::text, $7::text, $8::timestamptz, $9::bool FROM adv \
                   WHERE $5::bigint > adv.prev_sequence AND $5::bigint <= adv.last_sequence \
                   ON CONFLICT (event_id) DO NOTHING RETURNING event_id) \
                 SELECT adv.last_sequence, \
                   $5::bigint > adv.prev_sequence AND $5::bigint <= adv.last_sequence, \
                   EXISTS (SELECT 1 FROM ins) \
                 FROM adv"
            ),
            existing: format!("SELECT event_id FROM {s}.inbox WHERE event_id = ANY($1)"),
            prune: format!(
                "DELETE FROM {s}.inbox WHERE event_id IN ( \
                   SELECT event_id FROM {s}.inbox WHERE handled_at < $1 LIMIT $2)"
            ),
            count: format!("SELECT count(*) FROM {s}.inbox"),
        }
    }

    /// Admits a batch of events (in delivery order) in the caller's
    /// transaction: locks their streams' progress, moves each stream past
    /// the run of consecutive sequences the batch brings, and records the
    /// admitted events in the inbox. One statement, one round trip.
    ///
    /// Every event is recorded as handled; [`Inbox::admit_marked`] says
    /// which ones the service has no handler for.
    pub async fn admit(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Admission>, sqlx::Error> {
        self.admit_marked(tx, events, &[]).await
    }

    /// [`Inbox::admit`], recording the events whose `skipped[i]` is true as
    /// skipped (no handler: only their subject's progress moves). A
    /// `skipped` shorter than `events` counts the rest as handled.
    pub async fn admit_marked(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
        skipped: &[bool],
    ) -> Result<Vec<Admission>, sqlx::Error> {
        let skipped: Vec<bool> = (0..events.len())
            .map(|i| skipped.get(i).copied().unwrap_or(false))
            .collect();
        match events {
            [one] => self.admit_one(tx, one, skipped[0]).await.map(|a| vec![a]),
            _ => self.admit_batch(tx, events, skipped).await,
        }
    }

    /// [`Inbox::admit`] of a batch of one.
    async fn admit_one(
        &self,
        tx: &mut PgConnection,
        e: &Envelope,
        skipped: bool,
    ) -> Result<Admission, sqlx::Error> {
        let (last, admitted, new): (i64, bool, bool) = sqlx::query_as(&self.admit_one)
            .bind(e.id)
            .bind(e.event_type.as_str())
            .bind(e.source.as_str())
            .bind(e.subject.as_str())
            .bind(e.sequence)
            .bind(caused_correlation(e))
            .bind(e.causationid.as_deref())
            .bind(e.time)
            .bind(skipped)
            .fetch_one(tx)
            .await?;
        Ok(Admission {
            last,
            admitted,
            new,
        })
    }

    /// [`Inbox::admit`] through the general statement, whatever the batch's
    /// size: for tests that hold the one-event statement to it.
    #[cfg(feature = "testkit")]
    #[doc(hidden)]
    pub async fn admit_general(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
    ) -> Result<Vec<Admission>, sqlx::Error> {
        self.admit_batch(tx, events, vec![false; events.len()])
            .await
    }

    async fn admit_batch(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
        skipped: Vec<bool>,
    ) -> Result<Vec<Admission>, sqlx::Error> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let sources: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
        let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
        let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        let corrs: Vec<Option<&str>> = events.iter().map(|e| caused_correlation(e)).collect();
        let causes: Vec<Option<&str>> = events.iter().map(|e| e.causationid.as_deref()).collect();
        let times: Vec<chrono::DateTime<Utc>> = events.iter().map(|e| e.time).collect();
        let rows: Vec<(i64, bool, bool)> = sqlx::query_as(&self.admit)
            .bind(ids)
            .bind(types)
            .bind(sources)
            .bind(subjects)
            .bind(seqs)
            .bind(corrs)
            .bind(causes)
            .bind(times)
            .bind(skipped)
            .fetch_all(tx)
            .await?;
        if rows.len() != events.len() {
            return Err(sqlx::Error::Protocol(format!(
                "inbox admission returned {} rows for {} events",
                rows.len(),
                events.len()
            )));
        }
        Ok(rows
            .into_iter()
            .map(|(last, admitted, new)| Admission {
                last,
                admitted,
                new,
            })
            .collect())
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

    /// Deletes inbox rows older than `window`, `batch` at a time. The window
    /// must exceed the longest time a redelivery can take (retries plus
    /// dead-letter redrive), or a late duplicate would apply twice.
    pub async fn prune(
        &self,
        pool: &PgPool,
        window: Duration,
        batch: i64,
    ) -> Result<u64, sqlx::Error> {
        prune_older_than(pool, &self.prune, window, batch).await
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

/// The correlation id the inbox records for `e`: none when it is the
/// event's own id in its canonical text (the event starts its own story;
/// inbox version 3, see [`crate::install`]), so the row and the
/// correlation index need not repeat it. Any other text, another event's
/// id or the same id spelled otherwise, is kept as it came, so
/// `coalesce(correlation_id, event_id::text)` always gives it back.
pub(crate) fn caused_correlation(e: &Envelope) -> Option<&str> {
    let corr = e.correlationid.as_deref()?;
    let mut own = [0u8; uuid::fmt::Hyphenated::LENGTH];
    (corr != e.id.hyphenated().encode_lower(&mut own)).then_some(corr)
}

/// Runs `sql` (a delete taking `$1` the cutoff time and `$2` the batch
/// size) until a pass deletes fewer than `batch` rows: the inbox's and the
/// outcome trail's pruning, in batches so no pass holds locks for long.
pub(crate) async fn prune_older_than(
    pool: &PgPool,
    sql: &str,
    window: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    // A window too large for chrono keeps everything (the epoch as cutoff).
    let cutoff = chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| Utc::now().checked_sub_signed(w))
        .unwrap_or(chrono::DateTime::UNIX_EPOCH);
    let mut total = 0;
    loop {
        let n = sqlx::query(sql)
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

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::sample::OrderCancelled;

    fn cancelled() -> Envelope {
        let data = OrderCancelled {
            order_id: Uuid::nil(),
            reason: "test".into(),
        };
        Envelope::new("orders", "order-1", &data)
    }

    fn with_correlation(corr: Option<&str>) -> Envelope {
        let mut e = cancelled();
        e.correlationid = corr.map(str::to_owned);
        e
    }

    #[test]
    fn a_story_s_root_records_no_correlation_and_anything_else_is_kept_as_it_came() {
        // A new envelope starts its own story: its correlation is its id.
        let root = cancelled();
        assert_eq!(root.correlationid, Some(root.id.to_string()));
        assert_eq!(caused_correlation(&root), None);
        // Caused by the root: the root's id is recorded.
        let root_id = root.id.to_string();
        let child = with_correlation(Some(&root_id));
        assert_eq!(caused_correlation(&child), Some(root_id.as_str()));
        // Its own id spelled otherwise, and any other text: kept as they
        // came, so `coalesce(correlation_id, event_id::text)` gives back
        // exactly what the event carried.
        let mut upper = with_correlation(None);
        let shout = upper.id.to_string().to_uppercase();
        upper.correlationid = Some(shout.clone());
        assert_eq!(caused_correlation(&upper), Some(shout.as_str()));
        let told = with_correlation(Some("req-42"));
        assert_eq!(caused_correlation(&told), Some("req-42"));
        assert_eq!(caused_correlation(&with_correlation(None)), None);
    }
}
