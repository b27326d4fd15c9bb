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
//! Only one relay per service is active: the [`Leader`] (see
//! [`crate::leader`]). A standby waits for the lock and then runs like a
//! freshly started relay.
//!
//! Where the parts are: [`Relay::run`] and its session here, with the
//! publish loop as a sequence of steps; the loop's state and each step's
//! decision in `relay/pipeline.rs`; one batch's claim, publish and settle,
//! with their SQL, in `relay/batch.rs`; the counters in `relay/stats.rs`.

mod batch;
mod pipeline;
mod stats;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::leader::Leader;
use crate::Outbox;
use batch::Statements;
use pipeline::Pipeline;
pub use stats::{Confirms, RelayStats, CONFIRM_BUCKETS};
use transport::{self, Backoff, ConnectError, Publisher, Reconnect, Topology};

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

/// `fut`, failed with [`RelayError::DatabaseTimeout`] after `limit`: every
/// statement of the relay, its leader election and the eager publisher is
/// bounded this way.
pub(crate) async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, RelayError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| RelayError::DatabaseTimeout(limit))?
        .map_err(RelayError::from)
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
    /// Published a batch.
    Published {
        /// Rows confirmed and settled (deleted or marked).
        marked: usize,
        /// Rows left for a retry: nacked, returned, or behind such a row
        /// of their subject.
        failed: usize,
        /// The claim came back full: more rows are likely waiting.
        full: bool,
    },
}

/// The relay of one service.
#[derive(Clone)]
pub struct Relay {
    /// The outbox published; its schema names the service.
    outbox: Outbox,
    /// Where the leader connection, the listener and retention come from.
    pool: PgPool,
    amqp_url: String,
    topology: Topology,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    /// The claim and settle statements on this outbox.
    sql: Statements,
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
        Relay {
            sql: Statements::new(outbox.service(), config.retention),
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

    /// One session: become the leader, connect to the broker, publish until
    /// shutdown or the first error. The leader's connection (and with it
    /// the lock) goes when the session ends.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        let service = self.outbox.service();
        let Some(mut leader) = Leader::acquire(
            &self.pool,
            service,
            self.config.standby_interval,
            self.config.db_timeout,
            shutdown,
        )
        .await?
        else {
            return Ok(());
        };
        self.tune(leader.conn()).await?;
        let conn = transport::connect(&self.amqp_url, &format!("warren relay {service}")).await?;
        let result = self
            .publish_loop(shutdown, backoff, leader.conn(), &conn)
            .await;
        // lapin keeps a dropped connection open: close it on every exit, or
        // each reconnect after a database error would leak one. Bounded,
        // since the broker may be the thing that is gone.
        // `close_within` also waits for lapin's I/O thread (no ERROR line
        // when the process ends right after).
        transport::close_within(conn, "relay session ended", Duration::from_secs(2)).await;
        result
    }

    /// Publishes until `shutdown`: claims while there are rows and room in
    /// flight, settles batches as their confirms come back, and sleeps
    /// when the outbox is empty. Each step is a [`Pipeline`] method.
    async fn publish_loop(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        leader: &mut PgConnection,
        conn: &lapin::Connection,
    ) -> Result<(), RelayError> {
        let mut pipeline = Pipeline::open(self, leader, conn).await?;
        backoff.reset();
        loop {
            // A batch in flight always ends with its confirms awaited and
            // its rows settled before the relay stops.
            if shutdown.is_cancelled() {
                return pipeline.stop().await;
            }
            // Claimed and published a batch: decide again at once (in a
            // backlog, that is the next claim).
            if pipeline.wants_claim() && pipeline.claim().await? {
                continue;
            }
            pipeline.prune_if_due().await;
            pipeline.flush().await?;
            if pipeline.has_in_flight() {
                pipeline.await_oldest(shutdown).await?;
            } else {
                pipeline.idle(shutdown).await?;
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

    /// Deletes published rows older than `retention`; a failure is logged
    /// and retried at the next turn.
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

    /// A statement of the relay, bounded by `db_timeout`.
    async fn db_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, RelayError> {
        bounded(self.config.db_timeout, fut).await
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
}
