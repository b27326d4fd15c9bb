//! `warren run [SERVICE…]`: runs services until Ctrl-C/SIGTERM, then
//! drains in-flight work and stops.

use consumers::{RetryPolicy, SubscriptionConfig};
use producers::RelayConfig;
use services::gateway::GatewayConfig;
use services::{App, AppConfig, ALL};

use crate::config::{connect_db, migrate_if_permitted, Settings};
use crate::error::InvalidInput;

/// Tuning flags of `warren run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Services to run (all by default): customers, orders, inventory, payments, shipping.
    pub services: Vec<String>,
    /// Unacknowledged deliveries per consumer.
    #[arg(long, env = "WARREN_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,
    /// Deliveries handled concurrently per service.
    #[arg(long, env = "WARREN_LANES", default_value_t = 4)]
    pub lanes: usize,
    /// Attempts of a transiently failing event before it is dead-lettered.
    #[arg(long, env = "WARREN_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Simulated payment gateway latency, in milliseconds.
    #[arg(long, env = "WARREN_GATEWAY_LATENCY_MS", default_value_t = 5)]
    pub gateway_latency_ms: u64,
    /// Simulated payment gateway transient-failure rate (0.0–1.0).
    #[arg(long, env = "WARREN_GATEWAY_FAILURE_RATE", default_value_t = 0.0)]
    pub gateway_failure_rate: f64,
    /// Seconds a published event stays in its outbox (marked) for
    /// inspection; 0 deletes it once the broker confirmed it.
    #[arg(long, env = "WARREN_OUTBOX_RETENTION_SECS", default_value_t = 0)]
    pub outbox_retention_secs: u64,
    /// Days each service keeps its inbox rows and the outcome records
    /// `warren trace` reads (pruned every 5 minutes). Must exceed the
    /// longest redelivery (retries plus a dead-letter redrive): a later
    /// duplicate is no longer recognised by its id.
    #[arg(long, env = "WARREN_INBOX_RETENTION_DAYS", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub inbox_retention_days: u64,
}

impl RunArgs {
    /// The chosen services, checked; all when none were named.
    pub fn services(&self) -> Result<Vec<String>, InvalidInput> {
        if self.services.is_empty() {
            return Ok(ALL.iter().map(|s| s.to_string()).collect());
        }
        for s in &self.services {
            if !ALL.contains(&s.as_str()) {
                return Err(InvalidInput(format!(
                    "unknown service {s:?}; services are: {}",
                    ALL.join(", ")
                )));
            }
        }
        Ok(self.services.clone())
    }

    /// The application configuration these flags describe.
    pub fn app_config(
        &self,
        settings: &Settings,
        http: Option<std::net::SocketAddr>,
    ) -> Result<AppConfig, InvalidInput> {
        Ok(AppConfig {
            amqp_url: settings.amqp_url.clone(),
            topology: settings.topology(),
            services: self.services()?,
            http,
            subscription: SubscriptionConfig {
                prefetch: self.prefetch,
                lanes: self.lanes,
                retry: RetryPolicy {
                    max_attempts: self.max_attempts,
                    ..Default::default()
                },
                max_body: settings.max_body,
                inbox_retention: std::time::Duration::from_secs(
                    self.inbox_retention_days * 24 * 3600,
                ),
                ..Default::default()
            },
            relay: RelayConfig {
                retention: std::time::Duration::from_secs(self.outbox_retention_secs),
                ..Default::default()
            },
            gateway: GatewayConfig {
                latency: std::time::Duration::from_millis(self.gateway_latency_ms),
                failure_rate: self.gateway_failure_rate.clamp(0.0, 1.0),
                ..Default::default()
            },
        })
    }
}

/// Runs the command.
pub async fn run(settings: &Settings, args: &RunArgs) -> anyhow::Result<()> {
    let config = args.app_config(settings, Some(settings.http))?;
    let pool = connect_db(
        settings,
        false,
        (args.lanes as u32 + 3) * config.services.len() as u32 + 4,
    )
    .await?;
    migrate_if_permitted(&pool).await?;
    let shutdown = super::shutdown_on_signal();
    let app = App::start(pool, config).await?;
    tracing::info!(services = ?args.services()?, namespace = %settings.namespace, "warren running; Ctrl-C to stop");
    shutdown.cancelled().await;
    app.stop().await;
    tracing::info!("stopped cleanly");
    Ok(())
}
