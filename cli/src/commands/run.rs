//! `warren run [SERVICE…]`: runs services until Ctrl-C/SIGTERM, then
//! drains in-flight work and stops.

use secrecy::ExposeSecret as _;
use std::collections::BTreeMap;

use consumers::{RetryPolicy, SubscriptionConfig};
use producers::RelayConfig;
use services::gateway::GatewayConfig;
use services::{App, AppConfig, ALL};

use crate::config::{connect_stores, migrate_stores_if_permitted, Service, Settings};
use crate::error::InvalidInput;

/// Tuning flags of `warren run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Services to run (all by default).
    #[arg(value_enum)]
    pub services: Vec<Service>,
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
    /// Let the broker delete the namespace's queues once they have been
    /// unused (no consumer, no redeclaration) this many seconds
    /// (`x-expires`): for throwaway namespaces such as the fault drills'.
    /// A queue keeps the arguments it was first declared with, so set it
    /// from a namespace's first run on, or never.
    #[arg(long, env = "WARREN_QUEUE_EXPIRES_SECS")]
    pub queue_expires_secs: Option<u64>,
    /// Ordered partitions: `SERVICE=P` (e.g. `orders=4`) splits a consuming
    /// service's work into P partitions, each with one active consumer,
    /// shared among the processes that run it; a bare `P` applies to every
    /// consuming service run. Repeat the flag or separate with commas.
    /// Needs RabbitMQ's rabbitmq_consistent_hash_exchange plugin.
    #[arg(long, env = "WARREN_PARTITIONS", value_delimiter = ',', value_parser = parse_partitions)]
    pub partitions: Vec<Partitions>,
    /// Days each service keeps its inbox rows and the outcome records
    /// `warren trace` reads (pruned every 5 minutes). Must exceed the
    /// longest redelivery (retries plus a dead-letter redrive): a later
    /// duplicate is no longer recognised by its id.
    #[arg(long, env = "WARREN_INBOX_RETENTION_DAYS", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub inbox_retention_days: u64,
}

/// One `--partitions` value: a service's partition count, or every
/// service's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// `None`: every consuming service run.
    pub service: Option<String>,
    /// The partition count (0: competing consumers on one queue).
    pub count: u16,
}

/// Parses `SERVICE=P` or `P`.
fn parse_partitions(s: &str) -> Result<Partitions, String> {
    let (service, count) = match s.split_once('=') {
        Some((service, count)) => (Some(service.trim().to_owned()), count),
        None => (None, s),
    };
    let count: u16 = count
        .trim()
        .parse()
        .map_err(|_| format!("{count:?} is not a partition count (0 to 1024)"))?;
    if count > 1024 {
        return Err(format!("{count} partitions: at most 1024"));
    }
    Ok(Partitions { service, count })
}

impl RunArgs {
    /// The chosen services (clap checked the names); all when none were
    /// named.
    pub fn services(&self) -> Vec<String> {
        if self.services.is_empty() {
            return ALL.iter().map(|s| s.to_string()).collect();
        }
        self.services
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect()
    }

    /// The partition count of every service that `--partitions` names,
    /// checked against the services that consume; a bare count applies to
    /// each consuming service.
    pub fn partitions(&self) -> Result<BTreeMap<String, u16>, InvalidInput> {
        let consuming = ["orders", "inventory", "payments", "shipping"];
        let mut out = BTreeMap::new();
        for p in &self.partitions {
            match &p.service {
                None => {
                    for s in consuming {
                        out.insert(s.to_owned(), p.count);
                    }
                }
                Some(s) if consuming.contains(&s.as_str()) => {
                    out.insert(s.clone(), p.count);
                }
                Some(s) => {
                    return Err(InvalidInput(format!(
                        "--partitions {s:?}: only a consuming service has partitions ({})",
                        consuming.join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The application configuration these flags describe.
    pub fn app_config(
        &self,
        settings: &Settings,
        http: Option<std::net::SocketAddr>,
    ) -> Result<AppConfig, InvalidInput> {
        Ok(AppConfig {
            amqp_url: settings.amqp_url.expose_secret().to_owned(),
            topology: {
                let mut t = settings.topology();
                t.expires = self.queue_expires_secs.map(std::time::Duration::from_secs);
                t
            },
            services: self.services(),
            partitions: self.partitions()?,
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
    let stores = connect_stores(
        settings,
        false,
        // Per service: its lanes, the relay's three, a partitioned
        // consumer's membership session.
        (args.lanes as u32 + 4) * config.services.len() as u32 + 4,
    )
    .await?;
    migrate_stores_if_permitted(&stores).await?;
    let shutdown = super::shutdown_on_signal();
    let app = App::start(stores, config).await?;
    tracing::info!(services = ?args.services(), namespace = %settings.namespace, "warren running; Ctrl-C to stop");
    shutdown.cancelled().await;
    app.stop().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_given_per_service_or_for_all() {
        assert_eq!(
            parse_partitions("orders=4"),
            Ok(Partitions {
                service: Some("orders".into()),
                count: 4
            })
        );
        assert_eq!(
            parse_partitions("3"),
            Ok(Partitions {
                service: None,
                count: 3
            })
        );
        assert!(parse_partitions("orders=x").is_err());
        assert!(parse_partitions("2000").is_err());
    }
}
