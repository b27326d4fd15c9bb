//! The service host: one consuming and producing service, declared by name
//! with its bus and database, its handlers registered, then run —
//! subscription, relay and optional eager publisher — until shut down,
//! when in-flight work is finished first.
//!
//! A service's name is its schema (where [`Service::install`] puts the
//! outbox, inbox and progress tables), its queue (`<namespace>.<name>`)
//! and its `source` (`/warren/<name>`). Names are part of the contract:
//! renaming a service orphans its queue and re-consumes what it had.
//!
//! ```no_run
//! # use warren::{Bus, Catalog, Service, Topology};
//! # async fn f() -> Result<(), warren::ServiceError> {
//! let bus = Bus::new("amqp://guest:guest@127.0.0.1:5672/%2f", Topology::new("warren"), Catalog::new());
//! // A service that only produces: no handlers, a relay.
//! let running = Service::new("billing", bus)
//!     .database_url("postgres://postgres@127.0.0.1/warren")
//!     .start()
//!     .await?;
//! let mut tx = running.pool().begin().await?;
//! // … change the store, then `running.outbox().append(&mut *tx, event)` …
//! tx.commit().await?;
//! running.stop().await;
//! # Ok(())
//! # }
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use consumers::SubscriptionConfig;
use consumers::{Handle, HandleBatch, OutcomeRecord, Router, Stats, Subscription};
use events::{Catalog, EventData};
use producers::relay::RelayStats;
use producers::{Eager, EagerConfig, Outbox, Relay, RelayConfig};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use transport::Topology;

use crate::install::InstallError;

/// The broker's stock credentials on this machine.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Connections a service keeps for the application's own use (HTTP
/// handlers, commands) on top of what its workers need.
const DEFAULT_EXTRA_CONNECTIONS: u32 = 4;

/// The broker side every service of an application shares: where RabbitMQ
/// is, the namespace, and the application's event types.
#[derive(Debug, Clone)]
pub struct Bus {
    /// The broker's URL (`amqp://` or `amqps://`).
    amqp_url: String,
    /// The namespace's names.
    topology: Topology,
    /// What is decoded and what queues are bound to.
    catalog: Arc<Catalog>,
}

impl Bus {
    /// A bus on `amqp_url` in `topology`'s namespace, for `catalog`'s types.
    pub fn new(
        amqp_url: impl Into<String>,
        topology: Topology,
        catalog: impl Into<Arc<Catalog>>,
    ) -> Self {
        Bus {
            amqp_url: amqp_url.into(),
            topology,
            catalog: catalog.into(),
        }
    }

    /// A bus configured as `warren` is: `AMQP_URL` (default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`) and `WARREN_NAMESPACE`
    /// (default `warren`).
    pub fn from_env(catalog: impl Into<Arc<Catalog>>) -> Self {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        Bus::new(
            var("AMQP_URL", DEFAULT_AMQP_URL),
            Topology::new(var("WARREN_NAMESPACE", "warren")),
            catalog,
        )
    }

    /// The broker's URL.
    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    /// The namespace's names.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The application's event types.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

/// Starting or installing a service failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The name cannot be a schema and queue name.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// Neither a database URL nor a pool was given.
    #[error("service {0}: no database (give Service::database_url or Service::pool)")]
    NoDatabase(String),
    /// The database refused or is unreachable.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Installing the library's tables failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] transport::ConnectError),
    /// The broker refused the topology.
    #[error("declaring the broker topology failed: {0}")]
    Topology(#[from] lapin::Error),
    /// The broker refused the partitioned topology, or lacks its plugin.
    #[error("declaring the broker topology failed: {0}")]
    Partitions(#[from] transport::TopologyError),
}

/// Where the service's store is.
#[derive(Debug, Clone)]
enum Database {
    None,
    /// A pool is built on first use, sized for the service's workers.
    Url(String),
    /// The application's own pool (sized by the application).
    Pool(PgPool),
}

/// A service, declared and not yet running. See the module docs.
pub struct Service {
    name: String,
    bus: Bus,
    database: Database,
    /// Built once from `database`, on first use.
    pool: OnceLock<PgPool>,
    router: Router,
    subscription: SubscriptionConfig,
    relay: Option<RelayConfig>,
    eager: Option<EagerConfig>,
    extra_connections: u32,
    /// How many outcome records an in-process listener may lag.
    outcome_capacity: Option<usize>,
    /// When cancelled, the service stops (its own token is a child).
    shutdown: CancellationToken,
}

impl Service {
    /// A service named `name` on `bus`: no handlers yet, a relay with the
    /// default settings, no eager publisher.
    pub fn new(name: impl Into<String>, bus: Bus) -> Self {
        let name = name.into();
        Service {
            router: Router::new(name.clone()),
            name,
            bus,
            database: Database::None,
            pool: OnceLock::new(),
            subscription: SubscriptionConfig::default(),
            relay: Some(RelayConfig::default()),
            eager: None,
            extra_connections: DEFAULT_EXTRA_CONNECTIONS,
            outcome_capacity: None,
            shutdown: CancellationToken::new(),
        }
    }

    /// The store is at `url`; the service builds a pool sized for its
    /// consumer lanes, relay and eager publisher, plus
    /// [`Service::extra_connections`].
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database = Database::Url(url.into());
        self
    }

    /// The store is reached through the application's `pool`; size it for
    /// at least [`Service::connections_needed`].
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.database = Database::Pool(pool);
        self
    }

    /// Handles events of type `E` one at a time, inside the transaction
    /// that records them in the inbox.
    pub fn handle<E: EventData, H: Handle<E>>(mut self, handler: H) -> Self {
        self.router = self.router.on::<E, H>(handler);
        self
    }

    /// Handles runs of events of type `E` at once (see [`HandleBatch`]).
    pub fn handle_batch<E: EventData, H: HandleBatch<E>>(mut self, handler: H) -> Self {
        self.router = self.router.on_batch::<E, H>(handler);
        self
    }

    /// Replaces the handlers with `router`'s (built elsewhere; its service
    /// name must be this service's).
    pub fn router(mut self, router: Router) -> Self {
        self.router = router;
        self
    }

    /// Consumer tuning: lanes, prefetch, retries, timeouts, partitions.
    pub fn subscription(mut self, config: SubscriptionConfig) -> Self {
        self.subscription = config;
        self
    }

    /// Splits the service's work into `partitions` ordered partitions
    /// (`<ns>.<name>.p<i>`): every event of a subject goes to one
    /// partition, each partition has one active consumer at a time, and
    /// the service's processes share the partitions out (see
    /// [`consumers::partitions`]). 0, the default, is one queue with
    /// competing consumers. Needs RabbitMQ's
    /// `rabbitmq_consistent_hash_exchange` plugin.
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.subscription.partitions = partitions;
        self
    }

    /// Relay tuning.
    pub fn relay(mut self, config: RelayConfig) -> Self {
        self.relay = Some(config);
        self
    }

    /// No relay in this process (another process of the service runs
    /// one, or the service raises no events).
    pub fn without_relay(mut self) -> Self {
        self.relay = None;
        self
    }

    /// Publishes appended events right after their commit
    /// ([`Running::eager`]); the relay takes what it leaves.
    pub fn eager(mut self, config: EagerConfig) -> Self {
        self.eager = Some(config);
        self
    }

    /// Connections kept for the application's own use when the service
    /// builds its pool (default 4).
    pub fn extra_connections(mut self, n: u32) -> Self {
        self.extra_connections = n;
        self
    }

    /// How many outcome records a slow in-process listener of
    /// [`Running::outcomes`] may lag before it loses the oldest (1,024 by
    /// default).
    pub fn outcome_capacity(mut self, capacity: usize) -> Self {
        self.outcome_capacity = Some(capacity);
        self
    }

    /// Stops when `token` is cancelled (besides [`Running::stop`]).
    pub fn shutdown_on(mut self, token: &CancellationToken) -> Self {
        self.shutdown = token.child_token();
        self
    }

    /// The service's name (schema, queue, source).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections its workers hold at most: one per consumer lane, the
    /// relay's leader and `LISTEN` connections and one for its statements,
    /// one for the eager publisher; plus the extra ones.
    pub fn connections_needed(&self) -> u32 {
        let lanes = if self.consumes() {
            self.subscription.lanes as u32
        } else {
            0
        };
        // A partitioned consumer holds one more: its membership session.
        let membership = u32::from(self.consumes() && self.subscription.partitions > 0);
        let relay = if self.relay.is_some() { 3 } else { 0 };
        let eager = u32::from(self.eager.is_some());
        lanes + membership + relay + eager + self.extra_connections
    }

    /// The service's pool (built on first call from its database URL).
    pub fn store(&self) -> Result<PgPool, ServiceError> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool.clone());
        }
        let pool = match &self.database {
            Database::None => return Err(ServiceError::NoDatabase(self.name.clone())),
            Database::Pool(pool) => pool.clone(),
            Database::Url(url) => PgPoolOptions::new()
                .max_connections(self.connections_needed())
                .acquire_timeout(Duration::from_secs(10))
                .connect_lazy(url)?,
        };
        // A racing first call may have set it meanwhile; either pool is
        // equivalent, and the stored one wins.
        Ok(self.pool.get_or_init(|| pool).clone())
    }

    /// Installs (or upgrades) the library's tables in the service's schema.
    pub async fn install(&self) -> Result<(), ServiceError> {
        let pool = self.store()?;
        crate::install::install(&pool, &self.name).await?;
        Ok(())
    }

    /// Declares the events exchange and, when the service handles events,
    /// its queues and their bindings (idempotent; [`Service::start`] does
    /// it too). Declare every service's queues before starting any relay,
    /// so that nothing published meanwhile comes back unroutable.
    pub async fn declare(&self) -> Result<(), ServiceError> {
        let conn =
            transport::connect(self.bus.amqp_url(), &format!("warren {} setup", self.name)).await?;
        let result = self.declare_on(&conn).await;
        transport::close_within(conn, "declared", Duration::from_secs(2)).await;
        result
    }

    async fn declare_on(&self, conn: &lapin::Connection) -> Result<(), ServiceError> {
        let ch = conn.create_channel().await?;
        self.bus.topology().declare_exchange(&ch).await?;
        if self.consumes() {
            let bindings = self.bus.catalog().bindings(&self.router.handled_types());
            let delays = self.subscription.retry.delays();
            let topology = self.bus.topology();
            match self.subscription.partitions {
                0 => {
                    topology
                        .declare_service(conn, &self.name, &bindings, &delays)
                        .await?
                }
                p => {
                    topology
                        .declare_partitioned_service(conn, &self.name, &bindings, &delays, p)
                        .await?
                }
            }
        }
        Ok(())
    }

    /// Declares the topology, then starts the subscription (when the
    /// service handles events), the relay and the eager publisher.
    pub async fn start(self) -> Result<Running, ServiceError> {
        let outbox = Outbox::new(&self.name).map_err(|e| ServiceError::InvalidName {
            name: self.name.clone(),
            reason: e.to_string(),
        })?;
        let pool = self.store()?;
        self.declare().await?;
        let bus = &self.bus;
        let shutdown = self.shutdown.clone();
        let mut tasks = JoinSet::new();

        let subscription = if self.consumes() {
            let sub = Subscription::new(
                self.router,
                bus.catalog().clone(),
                pool.clone(),
                bus.amqp_url(),
                bus.topology().clone(),
                self.subscription,
            )
            .map_err(|e| ServiceError::InvalidName {
                name: self.name.clone(),
                reason: e.to_string(),
            })?;
            let sub = match self.outcome_capacity {
                Some(capacity) => sub.with_outcome_capacity(capacity),
                None => sub,
            };
            let (s, stop) = (sub.clone(), shutdown.clone());
            tasks.spawn(async move { s.run(stop).await });
            Some(sub)
        } else {
            None
        };
        let relay = self.relay.map(|config| {
            let relay = Relay::new(
                outbox.clone(),
                pool.clone(),
                bus.amqp_url(),
                bus.topology().clone(),
                config,
            );
            let (r, stop) = (relay.clone(), shutdown.clone());
            tasks.spawn(async move { r.run(stop).await });
            relay
        });
        let eager = self.eager.map(|config| {
            let (eager, worker) = Eager::new(
                outbox.clone(),
                pool.clone(),
                bus.amqp_url(),
                bus.topology().clone(),
                config,
            );
            tasks.spawn(worker.run(shutdown.clone()));
            eager
        });
        tracing::info!(service = %self.name, consumes = subscription.is_some(), relay = relay.is_some(), eager = eager.is_some(), "service started");
        Ok(Running {
            name: self.name,
            amqp_url: bus.amqp_url().to_owned(),
            pool,
            outbox,
            subscription,
            relay,
            eager,
            shutdown,
            tasks,
        })
    }

    fn consumes(&self) -> bool {
        !self.router.handled_types().is_empty()
    }
}

/// A running service. Dropping it does not stop it: call
/// [`Running::stop`] (or [`Running::until_signal`]) so that in-flight
/// work is settled.
pub struct Running {
    name: String,
    amqp_url: String,
    pool: PgPool,
    outbox: Outbox,
    subscription: Option<Subscription>,
    relay: Option<Relay>,
    eager: Option<Eager>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service's pool: change the store and append events through it.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The service's outbox: append in the same transaction as the change.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The eager publisher, when enabled: append with [`Eager::append`]
    /// and hand over with [`Eager::publish`] after the commit.
    pub fn eager(&self) -> Option<&Eager> {
        self.eager.as_ref()
    }

    /// Outcome counters of the consumer (`None` when it handles nothing).
    pub fn stats(&self) -> Option<Arc<Stats>> {
        self.subscription.as_ref().map(Subscription::stats)
    }

    /// Outcomes as they happen (bounded; a slow listener loses the oldest).
    pub fn outcomes(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<OutcomeRecord>>> {
        self.subscription.as_ref().map(Subscription::outcomes)
    }

    /// The relay's counters (`None` without a relay).
    pub fn relay_stats(&self) -> Option<Arc<RelayStats>> {
        self.relay.as_ref().map(Relay::stats)
    }

    /// The eager publisher's counters (`None` without one).
    pub fn eager_stats(&self) -> Option<Arc<RelayStats>> {
        self.eager.as_ref().map(Eager::stats)
    }

    /// A token that stops the service when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether the database and the broker answer now (each within a few
    /// seconds): what a readiness probe asks.
    pub async fn ready(&self) -> bool {
        let db = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !db {
            return false;
        }
        match transport::connect(&self.amqp_url, &format!("warren {} readiness", self.name)).await {
            Ok(conn) => {
                transport::close_within(conn, "ready", Duration::from_secs(2)).await;
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until the consumer has settled `n` deliveries for good
    /// (handled, duplicate, skipped or dead-lettered), at most `timeout`;
    /// whether it did. For scripts, examples and tests.
    pub async fn settled(&self, n: u64, timeout: Duration) -> bool {
        let Some(stats) = self.stats() else {
            return n == 0;
        };
        let done = || {
            use consumers::Outcome::*;
            [Handled, Duplicate, Skipped, DeadLettered]
                .iter()
                .map(|o| stats.count(*o))
                .sum::<u64>()
                >= n
        };
        let deadline = tokio::time::Instant::now() + timeout;
        while !done() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops: the consumer finishes its in-flight handlers and acks, the
    /// relay and the eager publisher settle what they published.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        tracing::info!(service = %self.name, "service stopped");
    }

    /// Runs until Ctrl-C, SIGTERM or the shutdown token, then stops.
    pub async fn until_signal(self) {
        tokio::select! {
            _ = signal() => tracing::info!(service = %self.name, "signal received; draining"),
            _ = self.shutdown.cancelled() => {}
        }
        self.stop().await;
    }
}

/// Ctrl-C or, on Unix, SIGTERM (what `docker stop` and Kubernetes send).
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
