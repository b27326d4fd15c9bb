//! The eager publisher's worker: publishes what [`super::Eager::publish`]
//! queued, in order and together, awaits the confirms, and deletes the
//! confirmed rows in gathered statements (see the [module docs](super)).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{join_all, JoinAll};
use futures::FutureExt as _;
use lapin::{Confirmation, PublisherConfirm};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::{Appended, EagerConfig};
use crate::relay::{bounded, RelayError, RelayStats};
use crate::Outbox;
use transport::{
    confirm_problem, event_properties, Backoff, Outgoing, Publisher, Reconnect, Topology,
};

/// The worker that publishes what [`super::Eager::publish`] queued; run it with
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

/// Published events awaiting their confirms.
struct InFlight {
    ids: Vec<Uuid>,
    /// The confirms of `ids`, in the same order.
    confirms: Pin<Box<JoinAll<PublisherConfirm>>>,
    /// When they were written; their lease bounds the wait from here.
    published: Instant,
}

/// What the worker does next (see [`EagerWorker::next_step`]).
enum Step {
    /// The oldest batch's confirms came back.
    Confirmed(Vec<Result<Confirmation, lapin::Error>>),
    /// Confirmed rows have waited `delete_every`: delete them.
    DeleteDue,
    /// An event was queued: publish it with what else is queued.
    Publish(Appended),
    /// Shutdown: publish what is queued, settle, stop.
    Stop,
}

/// Events published and awaiting their confirms.
fn outstanding(in_flight: &VecDeque<InFlight>) -> usize {
    in_flight.iter().map(|b| b.ids.len()).sum()
}

impl EagerWorker {
    /// The worker of [`super::Eager::new`], fed by `queue`.
    pub(super) fn new(
        outbox: Outbox,
        pool: PgPool,
        amqp_url: String,
        topology: Topology,
        config: EagerConfig,
        queue: mpsc::Receiver<Appended>,
        stats: Arc<RelayStats>,
    ) -> EagerWorker {
        EagerWorker {
            delete_sql: format!(
                "DELETE FROM {}.outbox WHERE event_id = ANY($1)",
                outbox.service()
            ),
            outbox,
            pool,
            amqp_url,
            topology,
            config,
            queue,
            stats,
            confirmed: Vec::new(),
            delete_due: None,
        }
    }

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
        transport::close_within(conn, "eager publisher stopped", Duration::from_secs(2)).await;
        let _ = db.close().await;
        result
    }

    /// Publishes what is queued until `shutdown`, then what was queued
    /// before it; deletes the confirmed rows on the way. Each turn waits
    /// for the next [`Step`] and takes it.
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
                    return self.finish(db, &publisher).await;
                }
                in_flight.extend(self.publish(&publisher, rest).await?);
                continue;
            }
            match self.next_step(&mut in_flight, stopping, shutdown).await? {
                Step::Confirmed(confirms) => {
                    self.settle_confirmed(&mut in_flight, confirms, db).await?
                }
                Step::DeleteDue => self.delete(db).await?,
                Step::Publish(first) => {
                    let batch = self.take_batch(&in_flight, first);
                    in_flight.extend(self.publish(&publisher, batch).await?);
                }
                Step::Stop => stopping = true,
            }
        }
    }

    /// Waits for what comes first: the oldest batch's confirms (failing
    /// with [`RelayError::ConfirmTimeout`] once its lease has run out), the
    /// deletes falling due, a queued event (only with room in flight and
    /// not stopping), or `shutdown`. In that order when several are ready.
    async fn next_step(
        &mut self,
        in_flight: &mut VecDeque<InFlight>,
        stopping: bool,
        shutdown: &CancellationToken,
    ) -> Result<Step, RelayError> {
        let room = outstanding(in_flight) < self.config.max_in_flight && !stopping;
        let oldest = in_flight.front_mut();
        let has_oldest = oldest.is_some();
        let wait = async {
            match oldest {
                Some(b) => {
                    let deadline = tokio::time::Instant::from_std(b.published + self.config.lease);
                    tokio::time::timeout_at(deadline, &mut b.confirms).await
                }
                None => std::future::pending().await,
            }
        };
        let due = self.delete_due;
        Ok(tokio::select! {
            biased;
            confirms = wait, if has_oldest => Step::Confirmed(
                confirms.map_err(|_| RelayError::ConfirmTimeout(self.config.lease))?,
            ),
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                Step::DeleteDue
            }
            Some(first) = self.queue.recv(), if room => Step::Publish(first),
            _ = shutdown.cancelled(), if !stopping => Step::Stop,
        })
    }

    /// The oldest batch's `confirms` are in: queues its confirmed rows for
    /// their delete, with those of the batches confirmed meanwhile, and
    /// deletes at once when `delete_batch` rows are waiting.
    async fn settle_confirmed(
        &mut self,
        in_flight: &mut VecDeque<InFlight>,
        confirms: Vec<Result<Confirmation, lapin::Error>>,
        db: &mut PgConnection,
    ) -> Result<(), RelayError> {
        let Some(batch) = in_flight.pop_front() else {
            return Ok(());
        };
        self.confirmed(batch, confirms);
        // Batches confirmed meanwhile join it.
        while let Some(next) = in_flight.front_mut() {
            let Some(confirms) = (&mut next.confirms).now_or_never() else {
                break;
            };
            if let Some(batch) = in_flight.pop_front() {
                self.confirmed(batch, confirms);
            }
        }
        if self.confirmed.len() >= self.config.delete_batch.max(1) {
            self.delete(db).await?;
        }
        Ok(())
    }

    /// `first` and what else is queued, up to a batch and the room left in
    /// flight.
    fn take_batch(&mut self, in_flight: &VecDeque<InFlight>, first: Appended) -> Vec<Appended> {
        let room = self.config.max_in_flight - outstanding(in_flight);
        let mut events = vec![first];
        events.extend(self.take_queued(self.config.batch_size.min(room).saturating_sub(1)));
        events
    }

    /// Stopping, with nothing queued or in flight: deletes the last
    /// confirmed rows and closes the channel.
    async fn finish(
        &mut self,
        db: &mut PgConnection,
        publisher: &Publisher,
    ) -> Result<(), RelayError> {
        self.delete(db).await?;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            publisher
                .channel()
                .close(200, ("eager publisher stopping").into()),
        )
        .await;
        Ok(())
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
                &a.subject,
                a.correlation_id.as_deref(),
                a.timestamp,
                service,
            ),
        });
        let span = tracing::info_span!("warren.eager.publish", service, events = events.len());
        let mut pending = Vec::with_capacity(events.len());
        for sent in publisher.send(messages).instrument(span).await {
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
        self.stats.record_confirms(waited, batch.ids.len());
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
        bounded(self.config.db_timeout, fut).await
    }
}
