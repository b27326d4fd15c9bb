//! The subscription runtime of one service: connects, declares its queues,
//! consumes with a bounded prefetch, fans deliveries out to lanes by
//! subject, and reconnects with backoff when the broker goes away.
//!
//! Flow control: the broker sends at most `prefetch` unacknowledged
//! deliveries, each lane's channel holds a bounded number, and a lane
//! handles one delivery at a time; a slow database or handler therefore
//! slows consumption instead of growing memory (lapin buffers deliveries
//! internally without bound, so prefetch is the real limit).
//!
//! Shutdown: stop consuming (basic.cancel), let every lane finish what it
//! holds — handle, commit, ack — then close the connection.
//!
//! A partitioned service (`SubscriptionConfig::partitions` > 0) consumes
//! the partitions it holds instead of one work queue; which ones, and how
//! they change hands, is [`crate::partitions`]' part.

use std::sync::Arc;
use std::time::Duration;

use events::{Catalog, Codec};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use producers::Outbox;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use transport::{self, ConnectError};
use transport::{Backoff, Publisher, Reconnect, Topology, TopologyError};

use crate::acks::Acks;
use crate::config::SubscriptionConfig;
use crate::deadletter::Forwarder;
use crate::delivery::{decode, Processor, SettleError};
use crate::inbox::Inbox;
use crate::lanes::Lanes;
use crate::outcome::{Feed, Stats};
use crate::partitions::{Held, Membership, PartitionSource, REBALANCE_EVERY};
use crate::trail::{Recorder, Trail};
use crate::Router;

/// Why a subscription could not be built, or why a session ended (the
/// runtime reconnects by itself then).
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// The service's name cannot name its schema and queues.
    #[error("invalid service name {0:?}: use lower-case letters, digits and _")]
    InvalidService(String),
    /// Could not reach the broker.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The channel or consumer failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused the service's topology (or lacks a plugin it needs).
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The database session that holds a partitioned service's membership
    /// and partitions failed.
    #[error("partition membership: {0}")]
    Membership(#[source] sqlx::Error),
    /// This process's member lock is gone from the database's view.
    #[error("partition membership lost")]
    MembershipLost,
    /// The broker cancelled the consumer (queue deleted?).
    #[error("the broker ended the consumer")]
    ConsumerEnded,
    /// A lane could not settle a delivery.
    #[error(transparent)]
    Settle(#[from] SettleError),
}

/// A service's subscription: its router, store and broker.
#[derive(Clone)]
pub struct Subscription {
    router: Arc<Router>,
    /// The application's event types: what the queue is bound to and what
    /// decodes.
    catalog: Arc<Catalog>,
    pool: PgPool,
    amqp_url: String,
    topology: Topology,
    config: Arc<SubscriptionConfig>,
    stats: Arc<Stats>,
    outbox: Outbox,
    inbox: Inbox,
    /// In-process listeners of outcomes (demo summary, benchmarks).
    /// Records behind an `Arc`: a broadcast channel keeps its last
    /// `capacity` values alive in a ring allocated up front, and a record
    /// inline is some 300 bytes a slot (the 65,536 slots `warren bench`
    /// asks for were 18 MB, growing with every field a record gains).
    outcomes: tokio::sync::broadcast::Sender<Arc<crate::OutcomeRecord>>,
}

impl Subscription {
    /// A subscription of `router`'s service, decoding with `catalog`,
    /// storing into `pool`.
    pub fn new(
        router: Router,
        catalog: impl Into<Arc<Catalog>>,
        pool: PgPool,
        amqp_url: impl Into<String>,
        topology: Topology,
        config: SubscriptionConfig,
    ) -> Result<Self, SubscriptionError> {
        // The outbox checks the name (it becomes SQL); that is the only
        // way its constructor fails.
        let outbox = Outbox::new(router.service())
            .map_err(|_| SubscriptionError::InvalidService(router.service().to_owned()))?;
        let catalog: Arc<Catalog> = catalog.into();
        let stats = Arc::new(Stats::new(catalog.iter().map(|spec| spec.event_type)));
        Ok(Subscription {
            inbox: Inbox::new(router.service()),
            outbox,
            router: Arc::new(router),
            catalog,
            pool,
            amqp_url: amqp_url.into(),
            topology,
            config: Arc::new(config),
            stats,
            outcomes: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Outcomes as they happen, in this process. Bounded: a receiver that
    /// falls behind loses the oldest records (it is told so), the runtime
    /// never waits for it.
    pub fn outcomes(&self) -> tokio::sync::broadcast::Receiver<Arc<crate::OutcomeRecord>> {
        self.outcomes.subscribe()
    }

    /// Sets how many outcome records a slow in-process listener may lag.
    pub fn with_outcome_capacity(mut self, capacity: usize) -> Self {
        self.outcomes = tokio::sync::broadcast::channel(capacity.max(1)).0;
        self
    }

    /// Outcome counters, for metrics and summaries.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The service.
    pub fn service(&self) -> &str {
        self.router.service()
    }

    /// The inbox, for status and retention.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The configuration.
    pub fn config(&self) -> &SubscriptionConfig {
        &self.config
    }

    /// Declares the service's queues (idempotent); `run` does it too.
    /// A partitioned service gets its hash exchange and partitions.
    pub async fn declare(&self, conn: &lapin::Connection) -> Result<(), TopologyError> {
        let bindings = self.catalog.bindings(&self.router.handled_types());
        let delays = self.config.retry.delays();
        let service = self.router.service();
        if self.config.partitions > 0 {
            return self
                .topology
                .declare_partitioned_service(
                    conn,
                    service,
                    &bindings,
                    &delays,
                    self.config.partitions,
                )
                .await;
        }
        Ok(self
            .topology
            .declare_service(conn, service, &bindings, &delays)
            .await?)
    }

    /// Consumes until `shutdown`, reconnecting with backoff.
    pub async fn run(&self, shutdown: CancellationToken) {
        let service = self.router.service();
        let mut reconnect = Reconnect::new(
            "consumer",
            service,
            Duration::from_millis(100),
            Duration::from_secs(10),
        );
        while reconnect.should_start(&shutdown) {
            let result = self.session(&shutdown, reconnect.backoff()).await;
            if !reconnect.ended(result, &shutdown).await {
                break;
            }
        }
        tracing::info!(service, "consumer stopped");
    }

    /// One session: connect, consume until shutdown or a failure, close.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SubscriptionError> {
        let service = self.router.service();
        let conn =
            transport::connect(&self.amqp_url, &format!("warren consumer {service}")).await?;
        let result = self.consume_on(&conn, shutdown, backoff).await;
        // Also on error: lapin keeps a dropped connection open, so every
        // reconnect would leak one. Bounded, the broker may be gone.
        // And wait for lapin's I/O thread: a process ending right after
        // would otherwise log an ERROR from a runtime shutting down.
        transport::close_within(conn, "consumer session ended", Duration::from_secs(2)).await;
        result
    }

    /// Declares, starts the consumer and the lanes, feeds the lanes until
    /// shutdown or a failure, then stops consuming and drains the lanes.
    async fn consume_on(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SubscriptionError> {
        if self.config.partitions > 0 {
            return self.consume_partitions(conn, shutdown, backoff).await;
        }
        let service = self.router.service();
        let ch = conn.create_channel().await?;
        ch.basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        self.declare(conn).await?;
        let (recorder, writer) = Trail::new(service).start(self.pool.clone(), service);
        let processor = match self.processor(conn, recorder).await {
            Ok(p) => p,
            Err(e) => {
                writer.finish().await;
                return Err(e);
            }
        };
        let tag = format!("warren-{service}-{}", uuid::Uuid::now_v7());
        let queue = self.topology.queue(service);
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(service, %queue, prefetch = self.config.prefetch, lanes = self.config.lanes, "consuming");
        backoff.reset();

        let mut lanes = Lanes::start(&self.config, &processor, shutdown);
        let acks = Arc::new(Acks::new(ch.clone()));
        let result = self
            .feed_lanes(&mut consumer, &acks, &mut lanes, shutdown)
            .await;
        if result.is_ok() {
            // No more deliveries, so the lanes can finish what they hold.
            let _ = ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        lanes
            .stop(result.is_ok(), self.config.handler_timeout * 2, service)
            .await;
        drop(processor);
        writer.finish().await;
        result
    }

    /// A partitioned session: declares, joins the service's members, then
    /// every [`REBALANCE_EVERY`] takes or hands over partitions (see
    /// [`crate::partitions`]) while their consumers feed the lanes, until
    /// shutdown or a failure; then hands its partitions over (or drops
    /// them, after a failure), drains the lanes and leaves.
    async fn consume_partitions(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SubscriptionError> {
        let service = self.router.service();
        self.declare(conn).await?;
        // Left by a larger partition count: off the ring, still drained.
        let surplus = self
            .topology
            .retire_surplus_partitions(conn, service, self.config.partitions)
            .await?;
        if surplus > 0 {
            tracing::warn!(service, partitions = self.config.partitions, surplus, "partition queues beyond the partition count get no new events; they are drained, then can be deleted");
        }
        let (recorder, writer) = Trail::new(service).start(self.pool.clone(), service);
        let processor = match self.processor(conn, recorder).await {
            Ok(p) => p,
            Err(e) => {
                writer.finish().await;
                return Err(e);
            }
        };
        let mut membership = match Membership::join(&self.pool, service).await {
            Ok(m) => m,
            Err(e) => {
                drop(processor);
                writer.finish().await;
                return Err(e);
            }
        };
        tracing::info!(
            service,
            partitions = self.config.partitions,
            prefetch = self.config.prefetch,
            lanes = self.config.lanes,
            "consuming partitions"
        );
        backoff.reset();

        let mut lanes = Lanes::start(&self.config, &processor, shutdown);
        let source = PartitionSource {
            conn,
            service,
            topology: &self.topology,
            partitions: self.config.partitions + surplus,
            prefetch: self.config.prefetch,
            codec: Codec::new(self.catalog.clone()).with_max_body(self.config.max_body),
            dispatcher: lanes.dispatcher(),
            drain: self.config.handler_timeout * 2,
        };
        let mut held = Held::default();
        let mut rebalance = tokio::time::interval(REBALANCE_EVERY);
        rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        let result = loop {
            tokio::select! {
                _ = rebalance.tick() => {
                    if let Err(e) = held.rebalance(&source, &mut membership).await {
                        break Err(e);
                    }
                }
                failed = lanes.failure() => {
                    break Err(failed.map_or(SubscriptionError::ConsumerEnded, Into::into));
                }
                _ = prune.tick() => self.prune().await,
                _ = shutdown.cancelled() => break Ok(()),
            }
        };
        held.release_all(&source, result.is_ok()).await;
        // The partitions' consumers are done: the lanes may end.
        drop(source);
        lanes
            .stop(result.is_ok(), self.config.handler_timeout * 2, service)
            .await;
        membership.leave().await;
        drop(processor);
        writer.finish().await;
        result
    }

    /// What the lanes settle deliveries with: a publisher of its own for
    /// retries and dead letters, and the live feed when enabled.
    async fn processor(
        &self,
        conn: &Connection,
        trail: Recorder,
    ) -> Result<Processor, SubscriptionError> {
        let service = self.router.service();
        let forwards = Publisher::open(conn).await?;
        Ok(Processor {
            router: self.router.clone(),
            pool: self.pool.clone(),
            outbox: self.outbox.clone(),
            inbox: self.inbox.clone(),
            trail,
            forwarder: Forwarder::new(
                forwards,
                self.topology.clone(),
                service,
                Duration::from_secs(15),
            )
            .partitioned(self.config.partitions > 0),
            config: self.config.clone(),
            stats: self.stats.clone(),
            feed: self.open_feed(conn).await?,
            outcomes: self.outcomes.clone(),
            own_source: events::envelope::source_of(service),
        })
    }

    /// The live feed's channel and exchange, when the feed is enabled.
    async fn open_feed(&self, conn: &Connection) -> Result<Option<Feed>, lapin::Error> {
        if !self.config.live_feed {
            return Ok(None);
        }
        let channel = conn.create_channel().await?;
        self.topology.declare_outcomes_exchange(&channel).await?;
        Ok(Some(Feed {
            channel,
            exchange: self.topology.outcomes_exchange(),
        }))
    }

    /// Decodes each delivery and hands it to its lane, until shutdown
    /// (`Ok`) or until the consumer, its channel or a lane fails. Prunes
    /// the inbox on the side.
    async fn feed_lanes(
        &self,
        consumer: &mut Consumer,
        acks: &Arc<Acks>,
        lanes: &mut Lanes,
        shutdown: &CancellationToken,
    ) -> Result<(), SubscriptionError> {
        let codec = Codec::new(self.catalog.clone()).with_max_body(self.config.max_body);
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        loop {
            let delivery = tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(SubscriptionError::ConsumerEnded),
                },
                failed = lanes.failure() => {
                    return Err(failed.map_or(SubscriptionError::ConsumerEnded, Into::into));
                }
                _ = prune.tick() => {
                    self.prune().await;
                    continue;
                }
                _ = shutdown.cancelled() => return Ok(()),
            };
            let decoded = decode(&codec, &delivery);
            lanes.dispatch((delivery, decoded, acks.clone())).await;
        }
    }

    async fn prune(&self) {
        let service = self.router.service();
        match self
            .inbox
            .prune(&self.pool, self.config.inbox_retention, 1000)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(service, deleted = n, "pruned inbox rows"),
            Err(e) => tracing::warn!(service, error = %e, "inbox retention failed"),
        }
        // The outcomes kept for `warren trace` go with the inbox rows.
        match Trail::new(service)
            .prune(&self.pool, self.config.inbox_retention, 1000)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(service, deleted = n, "pruned outcome records"),
            Err(e) => tracing::warn!(service, error = %e, "outcome record retention failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_service_name_that_cannot_name_a_schema_is_refused_with_our_error() {
        // Lazy: nothing connects, the name is refused before.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://postgres@127.0.0.1/unused")
            .expect("a well-formed URL");
        let built = Subscription::new(
            Router::new("Orders; DROP"),
            Catalog::new(),
            pool,
            "amqp://127.0.0.1",
            Topology::new("t"),
            SubscriptionConfig::default(),
        );
        match built {
            Err(SubscriptionError::InvalidService(name)) => assert_eq!(name, "Orders; DROP"),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }
}
