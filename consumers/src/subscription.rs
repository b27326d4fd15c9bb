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

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use events::{Catalog, Codec};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use producers::{Outbox, OutboxError};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use transport::{self, ConnectError};
use transport::{Backoff, Publisher, Reconnect, Topology};

use crate::acks::Acks;
use crate::config::SubscriptionConfig;
use crate::deadletter::Forwarder;
use crate::delivery::{decode, Held, Item, Processor, SettleError};
use crate::inbox::Inbox;
use crate::outcome::{Feed, Stats};
use crate::Router;

/// How long a lane keeps its database connection with no delivery to
/// handle. Long enough to span the gaps of a steady stream, short enough
/// that lanes of a quiet service leave the pool to others.
const HOLD_IDLE: Duration = Duration::from_millis(100);

/// Why a session ended (the runtime reconnects by itself).
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Could not reach the broker.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The channel or consumer failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
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
    outcomes: tokio::sync::broadcast::Sender<crate::OutcomeRecord>,
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
    ) -> Result<Self, OutboxError> {
        let outbox = Outbox::new(router.service())?;
        Ok(Subscription {
            inbox: Inbox::new(router.service()),
            outbox,
            router: Arc::new(router),
            catalog: catalog.into(),
            pool,
            amqp_url: amqp_url.into(),
            topology,
            config: Arc::new(config),
            stats: Arc::default(),
            outcomes: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Outcomes as they happen, in this process. Bounded: a receiver that
    /// falls behind loses the oldest records (it is told so), the runtime
    /// never waits for it.
    pub fn outcomes(&self) -> tokio::sync::broadcast::Receiver<crate::OutcomeRecord> {
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
    pub async fn declare(&self, ch: &lapin::Channel) -> Result<(), lapin::Error> {
        self.topology
            .declare_service(
                ch,
                self.router.service(),
                &self.catalog.bindings(&self.router.handled_types()),
                &self.config.retry.delays(),
            )
            .await
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

    async fn session(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SubscriptionError> {
        let service = self.router.service();
        let conn =
            transport::connect(&self.amqp_url, &format!("warren consumer {service}")).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        self.declare(&ch).await?;
        let forwards = Publisher::open(&conn).await?;
        let feed = if self.config.live_feed {
            let feed_ch = conn.create_channel().await?;
            self.topology.declare_outcomes_exchange(&feed_ch).await?;
            Some(Feed {
                channel: feed_ch,
                exchange: self.topology.outcomes_exchange(),
            })
        } else {
            None
        };
        let processor = Processor {
            router: self.router.clone(),
            pool: self.pool.clone(),
            outbox: self.outbox.clone(),
            inbox: self.inbox.clone(),
            forwarder: Forwarder::new(
                forwards,
                self.topology.clone(),
                service,
                Duration::from_secs(15),
            ),
            config: self.config.clone(),
            stats: self.stats.clone(),
            feed,
            outcomes: self.outcomes.clone(),
            own_source: events::envelope::source_of(service),
            acks: Arc::new(Acks::new(ch.clone())),
        };
        let tag = format!("warren-{service}-{}", uuid::Uuid::now_v7());
        let mut consumer = ch
            .basic_consume(
                &self.topology.queue(service),
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(service, queue = %self.topology.queue(service), prefetch = self.config.prefetch, lanes = self.config.lanes, "consuming");
        backoff.reset();

        let lanes = self.config.lanes.max(1);
        let per_lane = (self.config.prefetch as usize / lanes).max(1);
        let max_batch = self.config.batch_size.max(1);
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = JoinSet::new();
        // Set when the session fails: lanes finish the delivery they hold
        // (its commit stands; a lost ack only means a redelivery that the
        // inbox absorbs) and drop the ones queued behind it unhandled.
        let abandon = CancellationToken::new();
        for _ in 0..lanes {
            let (tx, mut rx) = mpsc::channel::<Item>(per_lane);
            senders.push(tx);
            let (p, stop, abandoned) = (processor.clone(), shutdown.clone(), abandon.clone());
            tasks.spawn(async move {
                let mut conn: Held = None;
                loop {
                    // The connection stays with the lane while deliveries
                    // keep coming, and goes back to the pool after
                    // `HOLD_IDLE` without any, so idle lanes hold none.
                    let next = if conn.is_some() {
                        match tokio::time::timeout(HOLD_IDLE, rx.recv()).await {
                            Ok(next) => next,
                            Err(_) => {
                                conn = None;
                                continue;
                            }
                        }
                    } else {
                        rx.recv().await
                    };
                    let Some(first) = next else { break };
                    if abandoned.is_cancelled() {
                        continue;
                    }
                    // Whatever else is already waiting joins the batch: no
                    // waiting for a batch to fill, so latency stays low
                    // when traffic is light.
                    let mut batch = vec![first];
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    p.process(batch, &mut conn, &stop).await?;
                }
                Ok::<(), SettleError>(())
            });
        }
        let codec = Codec::new(self.catalog.clone()).with_max_body(self.config.max_body);
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        let result = loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let decoded = decode(&codec, &delivery);
                        let lane = match &decoded {
                            Ok(e) => lane_of(&e.subject, lanes),
                            Err(_) => delivery.delivery_tag as usize % lanes,
                        };
                        if senders[lane].send((delivery, decoded)).await.is_err() {
                            // The lane ended with an error; join_next reports it.
                            continue;
                        }
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(SubscriptionError::ConsumerEnded),
                },
                Some(done) = tasks.join_next() => {
                    break match done {
                        Ok(Err(e)) => Err(e.into()),
                        _ => Err(SubscriptionError::ConsumerEnded),
                    };
                }
                _ = prune.tick() => self.prune().await,
                _ = shutdown.cancelled() => break Ok(()),
            }
        };
        if result.is_ok() {
            let _ = ch.basic_cancel(&tag, BasicCancelOptions::default()).await;
        } else {
            abandon.cancel();
        }
        drop(senders);
        let drained = tokio::time::timeout(self.config.handler_timeout * 2, async {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(e)) = done {
                    tracing::warn!(service, error = %e, "lane ended with an unsettled delivery; the broker will redeliver it");
                }
            }
        });
        // Past the timeout, dropping the JoinSet aborts the lanes: open
        // transactions roll back and unacked deliveries are redelivered.
        let _ = drained.await;
        // Also on error: lapin keeps a dropped connection open, so every
        // reconnect would leak one. Bounded, the broker may be gone.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "consumer session ended"),
        )
        .await;
        result
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
    }
}

/// The lane of a subject: stable for the life of the process.
fn lane_of(subject: &str, lanes: usize) -> usize {
    let mut h = DefaultHasher::new();
    subject.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}
