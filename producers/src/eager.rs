//! Eager publishing: a producer publishes its own events right after the
//! commit that stored them, instead of waiting for the relay to be woken,
//! claim them and read them back.
//!
//! The outbox keeps the guarantee; this only takes the relay's work off
//! the common path. [`Eager::append`] appends the event *leased* (the
//! `leased_until` column, see [`crate::install`]): the relay leaves the row
//! alone until the lease runs out, and the commit sends no NOTIFY. After
//! the commit the caller hands the event to [`Eager::publish`], which
//! queues it (bounded, never waiting) for the worker ([`EagerWorker`]): it
//! publishes what is queued together, with `mandatory` and publisher
//! confirms, and deletes exactly the confirmed rows. The deletes are
//! gathered for up to `delete_every` (or `delete_batch` rows), so under a
//! trickle one statement settles dozens of events instead of one each,
//! and the worker is back to publishing at once after a confirm. Its
//! database connection does not wait for the WAL flush: a delete lost in
//! a crash republishes, as a crash between the relay's confirm and its
//! settle always has.
//!
//! Whatever goes wrong the row is still in the outbox, and once its lease
//! has run out the relay publishes it on its periodic poll: the process
//! died after the commit, the queue was full, the broker was unreachable,
//! or the message was nacked or returned unroutable. A publish whose
//! confirm comes after the lease ran out may meet the relay's copy on the
//! bus; consumers' inboxes absorb the duplicate.
//!
//! Order: one worker publishes in the order it was handed events, on one
//! channel. Two transactions of one subject commit in sequence order (the
//! sequence row lock), but their callers may hand them over in the other
//! order, and an event left to the relay comes after its successors. So
//! the bus does not always carry a subject's events in sequence order;
//! consumers apply them in that order anyway (an early event is deferred
//! until its predecessor is applied: `max_deferrals` × `defer_delay`, 10 s
//! by default, which is why the default lease is a few seconds).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::Envelope;
use futures::future::{join_all, JoinAll};
use futures::FutureExt as _;
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::relay::{RelayError, RelayStats};
use crate::{Outbox, OutboxError};
use transport::{
    confirm_problem, event_properties, Backoff, Outgoing, Publisher, Reconnect, Topology,
};

/// Tuning of an eager publisher.
#[derive(Debug, Clone)]
pub struct EagerConfig {
    /// How long an appended row belongs to the eager publisher before the
    /// relay may take it. Longer than a publish and its confirm take, and
    /// well inside the consumers' deferral window (see the module docs).
    pub lease: Duration,
    /// Events queued for the worker; when it is full, `publish` leaves the
    /// event to the relay instead of waiting.
    pub queue: usize,
    /// Most events published together.
    pub batch_size: usize,
    /// Events published and awaiting confirms at once.
    pub max_in_flight: usize,
    /// Longest a confirmed row waits for its delete. Far inside `lease`:
    /// a row still there when its lease runs out is published again by
    /// the relay (a duplicate, absorbed by consumers' inboxes).
    pub delete_every: Duration,
    /// Confirmed rows that are deleted at once, without waiting for
    /// `delete_every`; also bounds a delete statement.
    pub delete_batch: usize,
    /// Timeout on each database statement.
    pub db_timeout: Duration,
    /// Backoff after a lost connection.
    pub retry_initial: Duration,
    /// Cap of that backoff.
    pub retry_max: Duration,
}

impl Default for EagerConfig {
    fn default() -> Self {
        EagerConfig {
            lease: Duration::from_secs(3),
            queue: 4096,
            batch_size: 500,
            max_in_flight: 2000,
            delete_every: Duration::from_millis(50),
            delete_batch: 1000,
            db_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// An event appended leased and committed, ready to publish.
#[derive(Debug, Clone)]
pub struct Appended {
    event_id: Uuid,
    event_type: String,
    correlation_id: Option<String>,
    timestamp: i64,
    payload: String,
    /// When the lease runs out (by this process's clock, measured from
    /// just after the append): past it the relay may publish the row too.
    lease_ends: Instant,
}

impl Appended {
    /// The event's id.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }
}

/// The producer's side: append leased, then publish after the commit.
/// Cheap to clone; every clone feeds the same worker.
#[derive(Clone)]
pub struct Eager {
    outbox: Outbox,
    lease: Duration,
    queue: mpsc::Sender<Appended>,
    stats: Arc<RelayStats>,
}

/// The worker that publishes what [`Eager::publish`] queued; run it with
/// [`EagerWorker::run`].
pub struct EagerWorker {
    outbox: Outbox,
    pool: PgPool,
    amqp_url: String,
    topology: Topology,
    config: EagerConfig,
    queue: mpsc::Receiver<Appended>,
    stats: Arc<RelayStats>,
    /// Deletes the confirmed rows; built once.
    delete_sql: String,
    /// Confirmed rows not deleted yet. Kept across sessions, so rows
    /// confirmed before a lost database connection are deleted after it.
    confirmed: Vec<Uuid>,
    /// When `confirmed` must be deleted at the latest.
    delete_due: Option<tokio::time::Instant>,
}

impl Eager {
    /// An eager publisher for `outbox` and its worker.
    pub fn new(
        outbox: Outbox,
        pool: PgPool,
        amqp_url: impl Into<String>,
        topology: Topology,
        config: EagerConfig,
    ) -> (Eager, EagerWorker) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::<RelayStats>::default();
        (
            Eager {
                outbox: outbox.clone(),
                lease: config.lease,
                queue: tx,
                stats: stats.clone(),
            },
            EagerWorker {
                delete_sql: format!(
                    "DELETE FROM {}.outbox WHERE event_id = ANY($1)",
                    outbox.service()
                ),
                outbox,
                pool,
                amqp_url: amqp_url.into(),
                topology,
                config,
                queue: rx,
                stats,
                confirmed: Vec::new(),
                delete_due: None,
            },
        )
    }

    /// Appends `event` leased, in the caller's transaction; hand the result
    /// to [`Eager::publish`] once that transaction has committed (never
    /// before: the event must not be on the bus if the change rolls back).
    pub async fn append(
        &self,
        conn: &mut PgConnection,
        event: Envelope,
    ) -> Result<Appended, OutboxError> {
        let (event, payload) = self.outbox.append_leased(conn, event, self.lease).await?;
        Ok(Appended {
            event_id: event.id,
            event_type: event.event_type,
            correlation_id: event.correlationid,
            timestamp: event.time.timestamp(),
            payload,
            lease_ends: Instant::now() + self.lease,
        })
    }

    /// Queues committed events for the worker, without waiting. An event
    /// the queue has no room for (or that arrives after shutdown) stays in
    /// the outbox, for the relay once its lease runs out.
    pub fn publish(&self, appended: impl IntoIterator<Item = Appended>) {
        for a in appended {
            if let Err(e) = self.queue.try_send(a) {
                let a = e.into_inner();
                tracing::debug!(event_id = %a.event_id, event_type = %a.event_type,
                    "eager queue full or closed; left to the relay");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counters: `published` (confirmed and deleted), `failed` (left to
    /// the relay) and the confirm counters, as the relay keeps them.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }
}

/// Published events awaiting their confirms.
struct InFlight {
    ids: Vec<Uuid>,
    confirms: Pin<Box<JoinAll<PublisherConfirm>>>,
    published: Instant,
}

impl EagerWorker {
    /// Runs until `shutdown`, reconnecting with backoff; on shutdown what
    /// is queued is published and settled first (bounded by the lease).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let service = self.outbox.service().to_owned();
        // A session even when shut down already, so what was handed over
        // goes out; after a failure, none once shut down (the relay takes
        // what it left).
        let mut reconnect = Reconnect::new(
            "eager publisher",
            service.clone(),
            self.config.retry_initial,
            self.config.retry_max,
        )
        .first_even_if_stopped();
        while reconnect.should_start(&shutdown) {
            let result = self.session(&shutdown, reconnect.backoff()).await;
            self.stats.active.store(false, Ordering::Relaxed);
            if !reconnect.ended(result, &shutdown).await {
                break;
            }
        }
        tracing::info!(service, "eager publisher stopped");
    }

    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        let service = self.outbox.service().to_owned();
        let mut db = self.db_timeout(self.pool.acquire()).await?.detach();
        // Deletes need not wait for the WAL flush (see the module docs).
        self.db_timeout(sqlx::query("SET synchronous_commit = off").execute(&mut db))
            .await?;
        let conn = transport::connect(&self.amqp_url, &format!("warren eager {service}")).await?;
        let result = self.publish_loop(shutdown, backoff, &mut db, &conn).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "eager publisher stopped"),
        )
        .await;
        let _ = db.close().await;
        result
    }

    async fn publish_loop(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        db: &mut PgConnection,
        conn: &lapin::Connection,
    ) -> Result<(), RelayError> {
        let publisher = Publisher::open(conn).await?;
        self.topology.declare_exchange(publisher.channel()).await?;
        self.stats.active.store(true, Ordering::Relaxed);
        tracing::info!(service = self.outbox.service(), "eager publisher active");
        backoff.reset();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut stopping = false;
        loop {
            if stopping && in_flight.is_empty() {
                // What was queued before the shutdown goes out first.
                let rest = self.take_queued(usize::MAX);
                if rest.is_empty() {
                    self.delete(db).await?;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        publisher.channel().close(200, "eager publisher stopping"),
                    )
                    .await;
                    return Ok(());
                }
                in_flight.extend(self.publish(&publisher, rest).await?);
                continue;
            }
            let outstanding: usize = in_flight.iter().map(|b| b.ids.len()).sum();
            let room = outstanding < self.config.max_in_flight && !stopping;
            let oldest = in_flight.front_mut();
            let has_oldest = oldest.is_some();
            let wait = async {
                match oldest {
                    Some(b) => {
                        let deadline =
                            tokio::time::Instant::from_std(b.published + self.config.lease);
                        tokio::time::timeout_at(deadline, &mut b.confirms).await
                    }
                    None => std::future::pending().await,
                }
            };
            let due = self.delete_due;
            tokio::select! {
                biased;
                confirms = wait, if has_oldest => {
                    let confirms = confirms
                        .map_err(|_| RelayError::ConfirmTimeout(self.config.lease))?;
                    let Some(batch) = in_flight.pop_front() else { continue };
                    self.confirmed(batch, confirms);
                    // Batches confirmed meanwhile join it.
                    while let Some(next) = in_flight.front_mut() {
                        let Some(confirms) = (&mut next.confirms).now_or_never() else { break };
                        if let Some(batch) = in_flight.pop_front() {
                            self.confirmed(batch, confirms);
                        }
                    }
                    if self.confirmed.len() >= self.config.delete_batch.max(1) {
                        self.delete(db).await?;
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    self.delete(db).await?;
                }
                Some(first) = self.queue.recv(), if room => {
                    let room = self.config.max_in_flight - outstanding;
                    let mut events = vec![first];
                    events.extend(self.take_queued(self.config.batch_size.min(room).saturating_sub(1)));
                    in_flight.extend(self.publish(&publisher, events).await?);
                }
                _ = shutdown.cancelled(), if !stopping => stopping = true,
            }
        }
    }

    /// Up to `n` queued events whose lease has not run out; the others
    /// are the relay's now.
    fn take_queued(&mut self, n: usize) -> Vec<Appended> {
        let now = Instant::now();
        let mut out = Vec::new();
        while out.len() < n {
            let Ok(a) = self.queue.try_recv() else { break };
            if a.lease_ends > now {
                out.push(a);
            } else {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        out
    }

    /// Publishes `events` together, in order; `None` when every one of
    /// them had run out of lease.
    async fn publish(
        &mut self,
        publisher: &Publisher,
        events: Vec<Appended>,
    ) -> Result<Option<InFlight>, RelayError> {
        let now = Instant::now();
        let (events, expired): (Vec<_>, Vec<_>) =
            events.into_iter().partition(|a| a.lease_ends > now);
        self.stats
            .failed
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        if events.is_empty() {
            return Ok(None);
        }
        let exchange = self.topology.exchange();
        let service = self.outbox.service();
        let messages = events.iter().map(|a| Outgoing {
            exchange: &exchange,
            routing_key: &a.event_type,
            body: a.payload.as_bytes(),
            properties: event_properties(
                &a.event_id.to_string(),
                &a.event_type,
                a.correlation_id.as_deref(),
                a.timestamp,
                service,
            ),
        });
        let mut pending = Vec::with_capacity(events.len());
        for sent in publisher.send(messages).await {
            pending.push(sent?);
        }
        Ok(Some(InFlight {
            ids: events.iter().map(|a| a.event_id).collect(),
            confirms: Box::pin(join_all(pending)),
            published: Instant::now(),
        }))
    }

    /// Queues the rows of a batch the broker took for their delete; the
    /// others stay leased, for the relay.
    fn confirmed(&mut self, batch: InFlight, confirms: Vec<Result<Confirmation, lapin::Error>>) {
        let waited = batch.published.elapsed();
        self.stats
            .confirm_wait_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.stats.confirmed_batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .confirmed_events
            .fetch_add(batch.ids.len() as u64, Ordering::Relaxed);
        for (id, confirm) in batch.ids.into_iter().zip(confirms) {
            let Some(problem) = confirm_problem(confirm) else {
                self.confirmed.push(id);
                continue;
            };
            tracing::warn!(event_id = %id, "not published eagerly, left to the relay: {problem}");
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        if !self.confirmed.is_empty() && self.delete_due.is_none() {
            self.delete_due = Some(tokio::time::Instant::now() + self.config.delete_every);
        }
    }

    /// Deletes the confirmed rows, `delete_batch` per statement.
    async fn delete(&mut self, db: &mut PgConnection) -> Result<(), RelayError> {
        while !self.confirmed.is_empty() {
            let n = self.confirmed.len().min(self.config.delete_batch.max(1));
            let ids = &self.confirmed[..n];
            self.db_timeout(sqlx::query(&self.delete_sql).bind(ids).execute(&mut *db))
                .await?;
            self.stats.published.fetch_add(n as u64, Ordering::Relaxed);
            self.confirmed.drain(..n);
        }
        self.delete_due = None;
        Ok(())
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
