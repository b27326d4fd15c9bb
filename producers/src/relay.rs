//! The relay: one worker per service that publishes its outbox to the
//! events exchange.
//!
//! Each pass claims a bounded batch of unpublished rows in position order,
//! publishes all of them pipelined with publisher confirms and `mandatory`,
//! and marks exactly the confirmed ones once their confirms arrive. While
//! claims come back full (a backlog), up to `batches_in_flight` batches
//! (`max_in_flight` rows) await their confirms at once: the next claim
//! skips the rows in flight, so new events go out while the broker is
//! still syncing the previous ones. Under a trickle a notification only
//! leads to a claim once nothing is in flight, so what was committed
//! meanwhile goes out as one batch. No database transaction is open while
//! it waits on the broker. It sleeps on `LISTEN` (with a periodic poll as
//! fallback, so a lost notification only delays) when the outbox is empty.
//! From a claim that finds rows until one that finds none it is busy: it
//! claims after every batch, and writers skip the `NOTIFY` until a
//! handshake before its next sleep (see [`crate::wake`]).
//!
//! Order: rows of one subject are committed in sequence order and get
//! increasing positions (the per-subject sequence row lock serialises
//! their transactions), so claiming in position order, with earlier rows
//! either marked or in flight, publishes each subject in sequence order.
//!
//! Confirmed rows are deleted, or marked `published_at` and kept for
//! `retention` when that is set (see [`RelayConfig::retention`]). Under a
//! trickle that statement rides in the next claim (one round trip a batch
//! instead of two); in a backlog, or before the relay waits, it runs alone.
//!
//! Crash points and what they cost: a crash after publish and before mark
//! republishes the batch on restart (duplicates, absorbed by consumers'
//! inboxes); nothing is ever marked that the broker did not confirm.
//!
//! When an event is nacked or returned unroutable, it stays unmarked and so
//! do the later events of the same subject in flight, even if they were
//! confirmed; every batch in flight is settled before the next claim, which
//! publishes them again after it, so the bus always ends with the subject's
//! events in sequence order.
//!
//! Only one relay per service is active: the one holding a PostgreSQL
//! session advisory lock on a dedicated connection. A standby retries the
//! lock every `standby_interval`; when the active process dies, PostgreSQL
//! drops its connection and with it the lock.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{join_all, JoinAll};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::wake::{Idle, Wake};
use crate::Outbox;
use transport::{self, ConnectError};
use transport::{
    confirm_problem, event_properties, Backoff, Outgoing, Publisher, Reconnect, Topology,
};

/// First key of the relay's two-key advisory lock (`'WA'`); the second is
/// derived from the schema name. `warren status` reads it from `pg_locks`.
pub const RELAY_LOCK_CLASS: i32 = 0x5741;

/// Tuning of a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most rows claimed and published per pass.
    pub batch_size: i64,
    /// Poll when no notification came for this long.
    pub poll_interval: Duration,
    /// Longest wait for a batch's confirms before the channel is recycled.
    pub confirm_timeout: Duration,
    /// Batches published and awaiting confirms at once: the next batch is
    /// claimed and published while the previous ones' confirms (a broker
    /// fsync away) are on their way. Under a steady trickle every batch is
    /// a row or two, so this is generous; `max_in_flight` bounds the rows.
    pub batches_in_flight: usize,
    /// Rows published and awaiting confirms at once, over all batches.
    pub max_in_flight: usize,
    /// Timeout on each database statement of the relay.
    pub db_timeout: Duration,
    /// How often a standby tries to become the active relay.
    pub standby_interval: Duration,
    /// How long a published row stays in the outbox. Zero (the default):
    /// a confirmed row is deleted at once, in the statement that would
    /// otherwise mark it. Above zero it is marked (`published_at`) and
    /// deleted by retention once older than this, for inspection; the
    /// mark rewrites the whole row (its payload included) and every
    /// index entry of it, which cost the drain about a quarter of its
    /// rate in `warren bench` (see BENCHMARKS.md).
    pub retention: Duration,
    /// How often retention runs (only when `retention` is above zero).
    pub retention_every: Duration,
    /// Backoff after a failed publish or a lost connection.
    pub retry_initial: Duration,
    /// Cap of that backoff.
    pub retry_max: Duration,
    /// Test-only fault injection: end the session abruptly at this point
    /// of the first pass, as if the process died there.
    #[cfg(feature = "testkit")]
    pub crash_at: Option<CrashPoint>,
}

/// Where a test makes the relay die (feature `testkit`).
#[cfg(feature = "testkit")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Rows claimed, nothing published.
    AfterClaim,
    /// Published, confirms not awaited.
    AfterPublish,
    /// Confirmed, not marked.
    AfterConfirm,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(15),
            batches_in_flight: 64,
            max_in_flight: 2000,
            db_timeout: Duration::from_secs(10),
            standby_interval: Duration::from_secs(1),
            retention: Duration::ZERO,
            retention_every: Duration::from_secs(60),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            #[cfg(feature = "testkit")]
            crash_at: None,
        }
    }
}

/// Why a relay session ended (it then reconnects by itself).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed or timed out.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A database statement took longer than `db_timeout`.
    #[error("database statement timed out after {0:?}")]
    DatabaseTimeout(Duration),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The AMQP channel failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// Confirms did not arrive within `confirm_timeout`.
    #[error("no publisher confirms within {0:?}")]
    ConfirmTimeout(Duration),
    /// A test asked the relay to die here.
    #[cfg(feature = "testkit")]
    #[error("injected crash at {0:?}")]
    InjectedCrash(CrashPoint),
}

/// Counters of a relay, shared with metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events confirmed and marked.
    pub published: AtomicU64,
    /// Events nacked, returned or unconfirmed (they are retried).
    pub failed: AtomicU64,
    /// Whether this relay holds the lock.
    pub active: AtomicBool,
    /// Batches whose confirms came back (settled or not).
    pub confirmed_batches: AtomicU64,
    /// Events in those batches.
    pub confirmed_events: AtomicU64,
    /// Their total wait, in microseconds, from their publishes written to
    /// the relay holding all their confirms: mostly the broker's share of
    /// an event's trip (for a quorum queue, its log's fsync); in a backlog
    /// also the claims the relay makes meanwhile.
    pub confirm_wait_us: AtomicU64,
}

impl RelayStats {
    /// The confirm counters now; two readings' difference describes the
    /// batches in between.
    pub fn confirms(&self) -> Confirms {
        Confirms {
            batches: self.confirmed_batches.load(Ordering::Relaxed),
            events: self.confirmed_events.load(Ordering::Relaxed),
            wait_us: self.confirm_wait_us.load(Ordering::Relaxed),
        }
    }
}

/// A reading of a relay's confirm counters (see [`RelayStats::confirms`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confirms {
    /// Batches confirmed.
    pub batches: u64,
    /// Events in them.
    pub events: u64,
    /// Total publish-to-confirms wait, microseconds.
    pub wait_us: u64,
}

impl Confirms {
    /// What happened between `earlier` and this reading.
    pub fn since(self, earlier: Confirms) -> Confirms {
        Confirms {
            batches: self.batches.saturating_sub(earlier.batches),
            events: self.events.saturating_sub(earlier.events),
            wait_us: self.wait_us.saturating_sub(earlier.wait_us),
        }
    }

    /// Mean wait of a batch for its confirms; `None` without batches.
    pub fn mean_wait(&self) -> Option<Duration> {
        (self.batches > 0).then(|| Duration::from_micros(self.wait_us / self.batches))
    }

    /// Mean events per batch; `None` without batches.
    pub fn events_per_batch(&self) -> Option<f64> {
        (self.batches > 0).then(|| self.events as f64 / self.batches as f64)
    }
}

/// Stand-in so fault points compile away without the `testkit` feature.
/// Its variants mirror the public enum's names, prefix and all.
#[cfg(not(feature = "testkit"))]
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy)]
enum CrashPoint {
    AfterClaim,
    AfterPublish,
    AfterConfirm,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Nothing to publish.
    Empty,
    /// Published and marked `marked` rows; `failed` stay for a retry.
    Published {
        marked: usize,
        failed: usize,
        full: bool,
    },
}

/// One claimed row.
#[derive(sqlx::FromRow)]
struct Row {
    position: i64,
    event_id: uuid::Uuid,
    aggregate: String,
    event_type: String,
    correlation_id: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    payload: String,
}

/// A published batch whose confirms are on their way.
struct InFlight {
    rows: Vec<Row>,
    /// The confirms of `rows`, in the same order.
    confirms: Pin<Box<JoinAll<PublisherConfirm>>>,
    /// When waiting for `confirms` becomes a `ConfirmTimeout`.
    deadline: tokio::time::Instant,
    /// When the claim was sent, for the batch's log line.
    started: Instant,
    /// When its publishes were written, for the batch's log line.
    published: Instant,
    /// Whether the claim came back full (more rows are likely waiting).
    full: bool,
}

/// The relay of one service.
#[derive(Clone)]
pub struct Relay {
    outbox: Outbox,
    pool: PgPool,
    amqp_url: String,
    topology: Topology,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    claim_sql: String,
    /// The claim, after settling the rows of the batches confirmed since
    /// the last statement (see [`Relay::claim_and_publish`]).
    settle_and_claim_sql: String,
    /// Deletes the confirmed rows, or marks them when they are kept.
    settle_sql: String,
}

impl Relay {
    /// A relay publishing `outbox` of `pool` to the exchange of `topology`.
    pub fn new(
        outbox: Outbox,
        pool: PgPool,
        amqp_url: impl Into<String>,
        topology: Topology,
        config: RelayConfig,
    ) -> Self {
        let s = outbox.service();
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
            if config.retention.is_zero() {
                format!("DELETE FROM {s}.outbox WHERE position = ANY({param})")
            } else {
                format!("UPDATE {s}.outbox SET published_at = now() WHERE position = ANY({param})")
            }
        };
        Relay {
            // A data-modifying WITH always runs to completion, read or not;
            // the claim's snapshot still sees the rows it settles, so the
            // caller excludes them as it does the rows in flight.
            settle_and_claim_sql: format!("WITH settled AS ({}) {claim}", settle("$3")),
            claim_sql: claim,
            settle_sql: settle("$1"),
            outbox,
            pool,
            amqp_url: amqp_url.into(),
            topology,
            config,
            stats: Arc::default(),
        }
    }

    /// Counters, for metrics.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown`: elects itself or waits as standby, publishes,
    /// and reconnects with backoff whenever the broker or database goes
    /// away. On shutdown the batch in flight is confirmed and marked first.
    pub async fn run(&self, shutdown: CancellationToken) {
        let service = self.outbox.service();
        let mut reconnect = Reconnect::new(
            "relay",
            service,
            self.config.retry_initial,
            self.config.retry_max,
        );
        while reconnect.should_start(&shutdown) {
            let result = self.session(&shutdown, reconnect.backoff()).await;
            self.stats.active.store(false, Ordering::Relaxed);
            if !reconnect.ended(result, &shutdown).await {
                break;
            }
        }
        tracing::info!(service, "relay stopped");
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        let service = self.outbox.service();
        let Some(mut leader) = self.become_leader(shutdown).await? else {
            return Ok(());
        };
        let conn = transport::connect(&self.amqp_url, &format!("warren relay {service}")).await?;
        let result = self
            .publish_loop(shutdown, backoff, &mut leader, &conn)
            .await;
        // lapin keeps a dropped connection open: close it on every exit, or
        // each reconnect after a database error would leak one. Bounded,
        // since the broker may be the thing that is gone.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "relay session ended"),
        )
        .await;
        result
    }

    async fn publish_loop(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        leader: &mut PgConnection,
        conn: &lapin::Connection,
    ) -> Result<(), RelayError> {
        let service = self.outbox.service();
        let publisher = Publisher::open(conn).await?;
        self.topology.declare_exchange(publisher.channel()).await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&crate::wake::channel(service)).await?;
        let mut wake = self
            .db_timeout(Wake::start(leader, service, self.config.poll_interval))
            .await?;
        self.stats.active.store(true, Ordering::Relaxed);
        tracing::info!(service, "relay active");
        backoff.reset();

        let depth = self.config.batches_in_flight.max(1);
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(depth);
        let mut held_back: HashSet<String> = HashSet::new();
        let mut last_prune: Option<Instant> = None;
        let mut failures = Backoff::new(self.config.retry_initial, self.config.retry_max);
        let mut claim = true;
        // The last claim came back full: more rows are waiting, so claims
        // go out back to back, pipelined. Otherwise (a trickle) a new claim
        // waits until nothing is in flight: the rows committed meanwhile
        // go out together, one claim, one publish burst and one mark for
        // all of them, instead of one each (it costs them at most one
        // confirm round trip of waiting).
        let mut backlog = false;
        // Confirmed rows not deleted (or marked) yet: under a trickle (one
        // claim after every batch) the next claim does it in the same
        // statement, which saves a round trip per batch; they are settled
        // on their own before anything waits. A crash meanwhile republishes
        // them, as a crash between confirm and settle always has.
        let mut settled: Vec<i64> = Vec::new();
        loop {
            // A batch in flight always ends with its confirms awaited and
            // its rows marked before the relay stops.
            if shutdown.is_cancelled() {
                self.flush(leader, &mut settled).await?;
                while let Some(batch) = in_flight.pop_front() {
                    self.await_and_settle(leader, batch, &mut held_back).await?;
                }
                // Closed here, before the connection: a channel dropped
                // while its connection closes makes lapin log a spurious
                // "invalid channel state: Closing" error.
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    publisher.channel().close(200, "relay stopping"),
                )
                .await;
                return Ok(());
            }
            let rows_in_flight: usize = in_flight.iter().map(|b| b.rows.len()).sum();
            let free = self.config.max_in_flight.saturating_sub(rows_in_flight);
            let room = in_flight.len() < depth && free > 0;
            if claim && room && (backlog || in_flight.is_empty()) {
                let exclude: Vec<i64> = in_flight
                    .iter()
                    .flat_map(|b| b.rows.iter().map(|r| r.position))
                    .collect();
                let limit = (self.config.batch_size as usize).min(free) as i64;
                match self
                    .claim_and_publish(leader, &publisher, &exclude, limit, &mut settled)
                    .await?
                {
                    Some(batch) => {
                        // A full batch means more is waiting: claim again at
                        // once, while this one's confirms are on their way.
                        claim = batch.full;
                        backlog = batch.full;
                        // Rows to publish: busy until a claim comes back
                        // empty, so writers need not notify meanwhile.
                        self.db_timeout(wake.mark_busy(leader)).await?;
                        in_flight.push_back(batch);
                        continue;
                    }
                    None => {
                        claim = false;
                        backlog = false;
                    }
                }
            }
            // Time-gated, and checked on busy passes too: under steady
            // traffic the pipeline may never run empty.
            if !self.config.retention.is_zero()
                && last_prune.is_none_or(|t| t.elapsed() >= self.config.retention_every)
            {
                last_prune = Some(Instant::now());
                self.prune().await;
            }
            self.flush(leader, &mut settled).await?;
            if let Some(oldest) = in_flight.front_mut() {
                tokio::select! {
                    confirms = tokio::time::timeout_at(oldest.deadline, &mut oldest.confirms) => {
                        let confirms = confirms
                            .map_err(|_| RelayError::ConfirmTimeout(self.config.confirm_timeout))?;
                        let Some(batch) = in_flight.pop_front() else { continue };
                        // In a backlog the claims run ahead of the
                        // settles: a claim that settled rows would walk
                        // past them in the index once more (its snapshot
                        // still sees them), so they are deleted on their
                        // own there, and seen dead by the claim after.
                        let defer = (!backlog).then_some(&mut settled);
                        let (_, failed) = self
                            .settle(leader, batch, confirms, &mut held_back, defer)
                            .await?;
                        // No claim just because a batch came back: `claim`
                        // is still set if the last claim was full, and
                        // commits since then have notified. Under a trickle
                        // this halves the claims (each event used to cost
                        // a second, empty one).
                        if failed > 0 || !held_back.is_empty() {
                            claim = true;
                            // Settle everything in flight before anything is
                            // claimed again, so a row to retry is never
                            // republished while a later row of its subject
                            // is still on its way: the bus keeps each
                            // subject's order.
                            self.flush(leader, &mut settled).await?;
                            while let Some(batch) = in_flight.pop_front() {
                                self.await_and_settle(leader, batch, &mut held_back).await?;
                            }
                            held_back.clear();
                            let delay = failures.next_delay();
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = shutdown.cancelled() => {}
                            }
                        } else {
                            failures.reset();
                            // Busy: writers may not notify, so every batch
                            // that comes back is followed by a claim.
                            claim |= wake.busy();
                        }
                    }
                    n = listener.recv(), if room => { n?; claim = true; }
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            // Nothing in flight and nothing claimed: the handshake decides
            // whether a notification is sure to come.
            let sleep = match self.db_timeout(wake.idle(leader)).await? {
                Idle::ClaimAgain => {
                    claim = true;
                    continue;
                }
                Idle::Listen => self.config.poll_interval,
                Idle::Poll(delay) => delay,
            };
            tokio::select! {
                n = listener.recv() => { n?; }
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.cancelled() => {}
            }
            claim = true;
        }
    }

    /// Takes the advisory lock on a dedicated connection, retrying as a
    /// standby until it gets it. `None` when shut down while waiting.
    async fn become_leader(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<PgConnection>, RelayError> {
        let service = self.outbox.service();
        let mut conn = self.db_timeout(self.pool.acquire()).await?.detach();
        let mut announced = false;
        loop {
            let got: bool = self
                .db_timeout(
                    sqlx::query_scalar(
                        "SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)",
                    )
                    .bind(RELAY_LOCK_CLASS)
                    .bind(service)
                    .fetch_one(&mut conn),
                )
                .await?;
            if got {
                // This connection only claims (reads) and marks. A mark lost
                // in a database crash means the rows are published again,
                // which consumers' inboxes absorb; so marks need not wait
                // for the WAL flush, which would otherwise sit in every
                // relay pass (and be slowest exactly when the disk is busy).
                // The outbox rows themselves are written by the callers'
                // transactions, whose durability is untouched.
                //
                // Plans: the claim must walk the partial index of
                // unpublished rows in position order and stop at its LIMIT.
                // Left to itself the planner often prefers a bitmap scan
                // plus sort, which visits every index entry, dead ones too:
                // each published row leaves one behind until VACUUM, and a
                // plain index scan is what marks them dead as it passes
                // (seen: 12,000 dead entries, 4 ms per claim, after a
                // drain with autovacuum off). A sequential scan would read
                // the whole outbox. With both off, the generic plan is the
                // index scan whatever the table's size, so claims and marks
                // are planned once per connection: left to choose, the
                // planner kept re-planning the mark for its array's size
                // (~0.1 ms a time, a claim and a mark per burst of events
                // under a trickle).
                for set in [
                    "SET synchronous_commit = off",
                    "SET enable_bitmapscan = off",
                    "SET enable_seqscan = off",
                    "SET plan_cache_mode = force_generic_plan",
                ] {
                    self.db_timeout(sqlx::query(set).execute(&mut conn)).await?;
                }
                return Ok(Some(conn));
            }
            if !announced {
                tracing::info!(service, "another relay is active; standing by");
                announced = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.standby_interval) => {}
                _ = shutdown.cancelled() => {
                    let _ = conn.close().await;
                    return Ok(None);
                }
            }
        }
    }

    /// One pass on its own: claim, publish, await the confirms, mark.
    pub async fn publish_batch(
        &self,
        leader: &mut PgConnection,
        publisher: &Publisher,
    ) -> Result<BatchOutcome, RelayError> {
        let Some(batch) = self
            .claim_and_publish(
                leader,
                publisher,
                &[],
                self.config.batch_size,
                &mut Vec::new(),
            )
            .await?
        else {
            return Ok(BatchOutcome::Empty);
        };
        let full = batch.full;
        let (marked, failed) = self
            .await_and_settle(leader, batch, &mut HashSet::new())
            .await?;
        Ok(BatchOutcome::Published {
            marked,
            failed,
            full,
        })
    }

    /// Settles the `settled` rows (confirmed, see [`Relay::settle`]) and
    /// claims up to a batch of unpublished rows in one statement, skipping
    /// the `exclude`d positions (in flight already), and publishes them
    /// without waiting for their confirms. `None` when there is nothing to
    /// publish.
    async fn claim_and_publish(
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
                sqlx::query_as(&self.claim_sql)
                    .bind(limit)
                    .bind(exclude)
                    .fetch_all(&mut *leader),
            )
            .await?
        } else {
            let skip: Vec<i64> = exclude.iter().chain(settled.iter()).copied().collect();
            let rows = self
                .db_timeout(
                    sqlx::query_as(&self.settle_and_claim_sql)
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
                row.correlation_id.as_deref(),
                row.created_at.timestamp(),
                service,
            ),
        });
        let mut pending = Vec::with_capacity(rows.len());
        for sent in publisher.send(messages).await {
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
    async fn await_and_settle(
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

    /// Marks (or deletes, see [`RelayConfig::retention`]) exactly the
    /// confirmed rows of a batch. A row that was nacked,
    /// returned or not confirmed stays unmarked, and so does every later
    /// row of its subject (`held_back`, shared by the batches settled
    /// together), even if confirmed: they are published again after it.
    /// With `defer`, the rows to mark are added to it instead, for the next
    /// claim or [`Relay::flush`] to settle. Returns (marked, failed).
    async fn settle(
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
        self.stats
            .confirm_wait_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.stats.confirmed_batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .confirmed_events
            .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
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
    async fn flush(
        &self,
        leader: &mut PgConnection,
        settled: &mut Vec<i64>,
    ) -> Result<(), RelayError> {
        if settled.is_empty() {
            return Ok(());
        }
        self.db_timeout(
            sqlx::query(&self.settle_sql)
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

    #[cfg(feature = "testkit")]
    fn maybe_crash(&self, point: CrashPoint) -> Result<(), RelayError> {
        match self.config.crash_at {
            Some(p) if p == point => Err(RelayError::InjectedCrash(point)),
            _ => Ok(()),
        }
    }

    #[cfg(not(feature = "testkit"))]
    #[inline(always)]
    fn maybe_crash(&self, _point: CrashPoint) -> Result<(), RelayError> {
        Ok(())
    }

    async fn prune(&self) {
        let service = self.outbox.service();
        match self
            .outbox
            .prune_published(&self.pool, self.config.retention, 1000)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(service, deleted = n, "pruned published outbox rows"),
            Err(e) => tracing::warn!(service, error = %e, "outbox retention failed"),
        }
    }

    async fn db_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, RelayError> {
        tokio::time::timeout(self.config.db_timeout, fut)
            .await
            .map_err(|_| RelayError::DatabaseTimeout(self.config.db_timeout))?
            .map_err(RelayError::from)
    }
}

/// A duration in milliseconds, for log fields.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
