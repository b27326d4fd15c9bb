//! Starting a chosen set of services in one process — each with its relay,
//! its consumer and its HTTP routes — and stopping them cleanly: on
//! shutdown, HTTP stops accepting, consumers finish their in-flight
//! handlers and acks, relays confirm and mark their batch in flight.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use consumers::{Router, Stats, SubscriptionConfig};
use producers::relay::RelayStats;
use producers::{Outbox, RelayConfig};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use transport::Topology;
use warren::{Bus, Running, Service};

use crate::gateway::{Gateway, GatewayConfig};
use crate::http::{Outboxes, Shared};
use crate::{customers, http, inventory, orders, payments, shipping, ALL};

/// What to run and how.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Broker URL.
    pub amqp_url: String,
    /// Namespace of exchanges and queues.
    pub topology: Topology,
    /// Services to run (names from [`ALL`]).
    pub services: Vec<String>,
    /// Where to serve HTTP; `None` for no HTTP. Port 0 picks a free one.
    pub http: Option<SocketAddr>,
    /// Consumer tuning.
    pub subscription: SubscriptionConfig,
    /// Relay tuning.
    pub relay: RelayConfig,
    /// The simulated gateway.
    pub gateway: GatewayConfig,
}

/// Starting failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A service name that does not exist.
    #[error(
        "unknown service {0:?}; services are: customers, orders, inventory, payments, shipping"
    )]
    UnknownService(String),
    /// A service could not be declared or started.
    #[error(transparent)]
    Service(#[from] warren::ServiceError),
    /// The broker could not be reached or refused the topology.
    #[error(transparent)]
    Connect(#[from] transport::ConnectError),
    /// Declaring the topology failed.
    #[error("declaring the broker topology failed: {0}")]
    Topology(#[from] lapin::Error),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A schema name was invalid.
    #[error(transparent)]
    Outbox(#[from] producers::OutboxError),
    /// A consuming service's name was invalid.
    #[error(transparent)]
    Subscription(#[from] consumers::SubscriptionError),
}

/// Running services.
pub struct App {
    /// Where HTTP listens, when it does.
    pub http_addr: Option<SocketAddr>,
    /// Consumer counters per service.
    pub consumer_stats: BTreeMap<String, Arc<Stats>>,
    /// The simulated payment gateway payments calls here (its breaker
    /// state, and a switch for its failure rate).
    pub gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    /// The HTTP server.
    tasks: JoinSet<()>,
    /// The services on warren's host.
    running: Vec<Running>,
}

/// The router of a consuming service (`None` for customers, which
/// consumes nothing).
pub fn router_of(service: &str, gateway: &Arc<Gateway>) -> Option<Router> {
    match service {
        "orders" => Some(orders::router()),
        "inventory" => Some(inventory::router()),
        "payments" => Some(payments::router(gateway.clone())),
        "shipping" => Some(shipping::router()),
        _ => None,
    }
}

impl App {
    /// Declares the topology of the chosen services, then starts each on
    /// warren's service host (consumer, relay) and serves their HTTP
    /// routes.
    pub async fn start(pool: PgPool, config: AppConfig) -> Result<App, AppError> {
        for s in &config.services {
            if !ALL.contains(&s.as_str()) {
                return Err(AppError::UnknownService(s.clone()));
            }
        }
        let gateway = Arc::new(Gateway::new(config.gateway.clone(), pool.clone()));
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let bus = Bus::new(
            config.amqp_url.clone(),
            config.topology.clone(),
            crate::catalog::catalog(),
        );

        // Every queue first, so nothing a relay publishes before the
        // consumer of its type connects comes back unroutable.
        let mut declared = Vec::new();
        for s in &config.services {
            let mut service = Service::new(s.clone(), bus.clone())
                .pool(pool.clone())
                .subscription(config.subscription.clone())
                .relay(config.relay.clone())
                .shutdown_on(&shutdown);
            if let Some(router) = router_of(s, &gateway) {
                service = service.router(router);
            }
            service.declare().await?;
            declared.push(service);
        }
        let mut running = Vec::new();
        for service in declared {
            running.push(service.start().await?);
        }
        let consumer_stats: BTreeMap<String, Arc<Stats>> = running
            .iter()
            .filter_map(|r| Some((r.name().to_owned(), r.stats()?)))
            .collect();
        let relay_stats: BTreeMap<String, Arc<RelayStats>> = running
            .iter()
            .filter_map(|r| Some((r.name().to_owned(), r.relay_stats()?)))
            .collect();

        let mut http_addr = None;
        if let Some(addr) = config.http {
            let shared = Shared {
                pool: pool.clone(),
                amqp_url: config.amqp_url.clone(),
                outboxes: Arc::new(Outboxes {
                    customers: Outbox::new(customers::SERVICE)?,
                    orders: Outbox::new(orders::SERVICE)?,
                }),
                consumer_stats: Arc::new(consumer_stats.clone()),
                relay_stats: Arc::new(relay_stats),
                gateway: config
                    .services
                    .iter()
                    .any(|s| s == "payments")
                    .then(|| gateway.clone()),
            };
            // The services' routes run in a request span (see
            // `http::traced`); probes and scrapes do not, so a collector
            // is not flooded with health checks.
            let mut routes = axum::Router::new();
            for s in &config.services {
                routes = match s.as_str() {
                    "customers" => routes.merge(customers::routes()),
                    "orders" => routes.merge(orders::routes()),
                    "inventory" => routes.merge(inventory::routes()),
                    _ => routes,
                };
            }
            // axum refuses a route layer on a router without routes.
            if routes.has_routes() {
                routes = routes.route_layer(axum::middleware::from_fn(http::traced));
            }
            let api = routes
                .route("/health", axum::routing::get(http::health))
                .route("/ready", axum::routing::get(http::ready))
                .route("/metrics", axum::routing::get(http::metrics))
                .layer(axum::extract::DefaultBodyLimit::max(http::MAX_BODY))
                .with_state(shared);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| AppError::Bind { addr, source })?;
            http_addr = Some(bound);
            tracing::info!(%bound, "HTTP API listening");
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let served = axum::serve(listener, api)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            });
        }
        Ok(App {
            http_addr,
            consumer_stats,
            gateway,
            shutdown,
            tasks,
            running,
        })
    }

    /// A token that stops everything when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops everything and waits until in-flight work is settled.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        for service in self.running {
            service.stop().await;
        }
    }

    /// Waits until the shutdown token is cancelled (by a signal handler),
    /// then until everything settled.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.stop().await;
    }
}
