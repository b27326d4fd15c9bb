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
//!
//! Here the producer's side ([`Eager`]); the worker's loop, one step per
//! turn, in `eager/worker.rs` ([`EagerWorker`]).

mod worker;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::Envelope;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::relay::RelayStats;
use crate::{Outbox, OutboxError};
use transport::Topology;
pub use worker::EagerWorker;

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
    /// The aggregate: the subject header partitions hash.
    subject: String,
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
            EagerWorker::new(outbox, pool, amqp_url.into(), topology, config, rx, stats),
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
            subject: event.subject,
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
