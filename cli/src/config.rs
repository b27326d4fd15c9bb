//! The one typed place for configuration: every setting is a flag with an
//! environment variable and a default that points at the local servers
//! with their stock credentials.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{PgPool, Postgres};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable; coloured on a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A service of the shop, as the command line names it (`--help` lists
/// them; clap refuses others with exit code 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Service {
    Customers,
    Orders,
    Inventory,
    Payments,
    Shipping,
}

impl Service {
    /// The name in `services::ALL`, queue names and schemas.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Customers => "customers",
            Service::Orders => "orders",
            Service::Inventory => "inventory",
            Service::Payments => "payments",
            Service::Shipping => "shipping",
        }
    }
}

/// A service that consumes events, so has a work queue and a dead-letter
/// queue (customers only produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum ConsumingService {
    Orders,
    Inventory,
    Payments,
    Shipping,
}

impl ConsumingService {
    /// Every consuming service, in `services::ALL` order.
    pub const ALL: [ConsumingService; 4] = [
        ConsumingService::Orders,
        ConsumingService::Inventory,
        ConsumingService::Payments,
        ConsumingService::Shipping,
    ];

    /// The name in `services::ALL` and in queue names.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumingService::Orders => "orders",
            ConsumingService::Inventory => "inventory",
            ConsumingService::Payments => "payments",
            ConsumingService::Shipping => "shipping",
        }
    }
}

/// A URL that may carry a password, as a secret: it never prints (`Debug`
/// shows it redacted), is wiped from memory when dropped, and is read
/// only where a connection is made (`expose_secret`).
fn secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

/// Settings shared by every command. The broker and database URLs are
/// secrets (see `secret` above: never printed, wiped on drop).
#[derive(Clone, clap::Args)]
pub struct Settings {
    /// RabbitMQ URL (amqp:// or amqps://); several nodes of one cluster
    /// separated by commas, each URL with its own credentials and vhost:
    /// connections go to a node drawn at random and move to another when
    /// theirs dies.
    #[arg(
        long,
        env = "AMQP_URL",
        global = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        value_parser = secret
    )]
    pub amqp_url: SecretString,
    /// PostgreSQL URL (add ?sslmode=require for TLS; a loopback host
    /// without an sslmode connects in the clear).
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/warren",
        hide_env_values = true,
        value_parser = secret
    )]
    pub database_url: SecretString,
    /// The customers service's database, when not DATABASE_URL's.
    #[arg(
        long,
        env = "WARREN_CUSTOMERS_DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_parser = secret
    )]
    pub customers_database_url: Option<SecretString>,
    /// The orders service's database, when not DATABASE_URL's.
    #[arg(
        long,
        env = "WARREN_ORDERS_DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_parser = secret
    )]
    pub orders_database_url: Option<SecretString>,
    /// The inventory service's database, when not DATABASE_URL's.
    #[arg(
        long,
        env = "WARREN_INVENTORY_DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_parser = secret
    )]
    pub inventory_database_url: Option<SecretString>,
    /// The payments service's database, when not DATABASE_URL's.
    #[arg(
        long,
        env = "WARREN_PAYMENTS_DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_parser = secret
    )]
    pub payments_database_url: Option<SecretString>,
    /// The shipping service's database, when not DATABASE_URL's.
    #[arg(
        long,
        env = "WARREN_SHIPPING_DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_parser = secret
    )]
    pub shipping_database_url: Option<SecretString>,
    /// Prefix of every exchange and queue.
    #[arg(
        long,
        env = "WARREN_NAMESPACE",
        global = true,
        default_value = "warren"
    )]
    pub namespace: String,
    /// Address of the HTTP API (`warren run`).
    #[arg(
        long,
        env = "WARREN_HTTP",
        global = true,
        default_value = "127.0.0.1:8080"
    )]
    pub http: SocketAddr,
    /// Log format.
    #[arg(
        long,
        env = "WARREN_LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "pretty"
    )]
    pub log_format: LogFormat,
    /// Largest event body accepted, in bytes.
    #[arg(long, env = "WARREN_MAX_BODY", global = true, default_value_t = events::DEFAULT_MAX_BODY)]
    pub max_body: usize,
}

/// Credentials never print: URLs are shown with their password masked.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field(
                "amqp_url",
                &transport::redact(self.amqp_url.expose_secret()),
            )
            .field(
                "database_url",
                &transport::redact(self.database_url.expose_secret()),
            )
            .field(
                "service_databases",
                &services::ALL
                    .iter()
                    .filter(|s| self.own_database(s).is_some())
                    .map(|s| (*s, transport::redact(self.database_url_of(s))))
                    .collect::<Vec<_>>(),
            )
            .field("namespace", &self.namespace)
            .field("http", &self.http)
            .field("log_format", &self.log_format)
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl Settings {
    /// The shop's codec, with the configured body limit.
    pub fn codec(&self) -> events::Codec {
        events::Codec::new(services::catalog::catalog()).with_max_body(self.max_body)
    }

    /// The broker topology of the configured namespace.
    pub fn topology(&self) -> transport::Topology {
        transport::Topology::new(self.namespace.clone())
    }

    /// `service`'s own database URL (`WARREN_<SERVICE>_DATABASE_URL`),
    /// `None` when it uses DATABASE_URL's (unset, empty or the same URL).
    pub fn own_database(&self, service: &str) -> Option<&str> {
        let own = match service {
            "customers" => &self.customers_database_url,
            "orders" => &self.orders_database_url,
            "inventory" => &self.inventory_database_url,
            "payments" => &self.payments_database_url,
            "shipping" => &self.shipping_database_url,
            _ => &None,
        };
        own.as_ref()
            .map(|u| u.expose_secret())
            .filter(|u| !u.is_empty() && *u != self.database_url.expose_secret())
    }

    /// The URL of `service`'s database.
    pub fn database_url_of(&self, service: &str) -> &str {
        self.own_database(service)
            .unwrap_or(self.database_url.expose_secret())
    }

    /// The same settings with `service`'s database as DATABASE_URL (for
    /// the helpers that take settings to reach one database).
    pub fn for_service(&self, service: &str) -> Settings {
        Settings {
            database_url: SecretString::from(self.database_url_of(service)),
            ..self.clone()
        }
    }

    /// The same settings pointing at another database: DATABASE_URL's
    /// and each service's own database renamed `name` on their servers.
    pub fn with_database(&self, name: &str) -> anyhow::Result<Settings> {
        let rename = |u: &str, what: &str| -> anyhow::Result<String> {
            let mut url = url::Url::parse(u).with_context(|| format!("{what} is not a URL"))?;
            url.set_path(&format!("/{name}"));
            Ok(url.to_string())
        };
        let mut out = Settings {
            database_url: rename(self.database_url.expose_secret(), "DATABASE_URL")?.into(),
            ..self.clone()
        };
        for (own, var) in [
            (
                &mut out.customers_database_url,
                "WARREN_CUSTOMERS_DATABASE_URL",
            ),
            (&mut out.orders_database_url, "WARREN_ORDERS_DATABASE_URL"),
            (
                &mut out.inventory_database_url,
                "WARREN_INVENTORY_DATABASE_URL",
            ),
            (
                &mut out.payments_database_url,
                "WARREN_PAYMENTS_DATABASE_URL",
            ),
            (
                &mut out.shipping_database_url,
                "WARREN_SHIPPING_DATABASE_URL",
            ),
        ] {
            let renamed = match own.as_ref().map(|u| u.expose_secret()) {
                Some(u) if !u.is_empty() => Some(rename(u, var)?),
                _ => None,
            };
            if let Some(u) = renamed {
                *own = Some(u.into());
            }
        }
        Ok(out)
    }
}

/// Opens a pool of `max` connections; with `create`, creates the database
/// first when it does not exist. Errors are one line naming what was tried.
pub async fn connect_db(settings: &Settings, create: bool, max: u32) -> anyhow::Result<PgPool> {
    let url = settings.database_url.expose_secret();
    let shown = transport::redact(url);
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot reach PostgreSQL at {shown}: {e}. Start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or `docker compose up -d postgres`) or set DATABASE_URL"
        )
    };
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid DATABASE_URL {shown}: {e}"))?;
    let options = plain_on_loopback(url, std::env::var_os("PGSSLMODE").is_some(), options);
    if create {
        let exists = tokio::time::timeout(Duration::from_secs(5), Postgres::database_exists(url))
            .await
            .map_err(|_| unreachable(&"no answer within 5s"))?
            .map_err(|e| unreachable(&e))?;
        if !exists {
            Postgres::create_database(url)
                .await
                .map_err(|e| unreachable(&e))?;
            tracing::info!(
                database = options.get_database().unwrap_or(""),
                "created database"
            );
        }
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before each acquire: sqlx already pings a connection when
        // it goes back to the pool, and the extra round trip per
        // transaction was the largest single cost in `warren bench`
        // (BENCHMARKS.md). A connection that died idle (database restart)
        // fails its first statement instead: consumers hold the delivery
        // and retry, HTTP answers 503, and sqlx discards the connection.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(|e| unreachable(&e))
}

/// Connects a loopback host in the clear when nothing chose an sslmode.
///
/// sqlx, like libpq, defaults to `prefer`: TLS whenever the server offers
/// it. On 127.0.0.1, ::1 or `localhost` the bytes never leave the kernel,
/// so TLS there protects nothing and costs both sides a cipher pass per
/// round trip (a PostgreSQL with `ssl = on` made it a measurable share of
/// `warren bench`'s CPU: BENCHMARKS.md). An `sslmode` in the URL or in
/// `PGSSLMODE` is always obeyed, `require` included.
fn plain_on_loopback(url: &str, env_chose: bool, options: PgConnectOptions) -> PgConnectOptions {
    let url_chose = url::Url::parse(url).is_ok_and(|u| {
        u.query_pairs()
            .any(|(k, _)| k == "sslmode" || k == "ssl-mode")
    });
    let host = options.get_host().trim_matches(['[', ']']);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback && !url_chose && !env_chose {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    }
}

/// Opens each service's database (see [`Settings::own_database`]): one
/// pool for DATABASE_URL and one per other database, each of `max`
/// connections; with `create`, creates those that do not exist.
pub async fn connect_stores(
    settings: &Settings,
    create: bool,
    max: u32,
) -> anyhow::Result<services::Stores> {
    let shared = connect_db(settings, create, max).await?;
    let mut stores =
        services::Stores::new(settings.database_url.expose_secret().to_owned(), shared);
    let mut opened: Vec<(String, PgPool)> = Vec::new();
    for service in services::ALL {
        let Some(url) = settings.own_database(service) else {
            continue;
        };
        let pool = match opened.iter().find(|(u, _)| u == url) {
            Some((_, pool)) => pool.clone(),
            None => {
                let pool = connect_db(&settings.for_service(service), create, max)
                    .await
                    .with_context(|| format!("the {service} service's database"))?;
                opened.push((url.to_owned(), pool.clone()));
                pool
            }
        };
        stores = stores.with(service, url, pool);
    }
    Ok(stores)
}

/// Applies the shop's migrations and installs warren's tables in every
/// service schema of each database (idempotent; see
/// `services::migrate_stores`).
pub async fn migrate_stores(stores: &services::Stores) -> anyhow::Result<()> {
    services::migrate_stores(stores)
        .await
        .context("migrating the database")
}

/// As [`migrate_stores`], unless the connected role may not (see
/// [`migrate_if_permitted`]).
pub async fn migrate_stores_if_permitted(stores: &services::Stores) -> anyhow::Result<()> {
    for (pool, services) in stores.databases() {
        match services::migrate_for(pool, &services).await {
            Err(e) if e.permission_denied() => {
                tracing::info!("this database role may not migrate; assuming `warren setup` applied the migrations");
            }
            other => other.context("migrating the database")?,
        }
    }
    Ok(())
}

/// Applies the shop's migrations and installs warren's tables in every
/// service schema (idempotent; see `services::migrate`).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    services::migrate(pool)
        .await
        .context("migrating the database")
}

/// Migrates, unless the connected role may not: a service running with
/// its own role from `warren setup` has no right to change the schema
/// (SQLSTATE 42501), and the administrator who ran setup has migrated
/// already.
pub async fn migrate_if_permitted(pool: &PgPool) -> anyhow::Result<()> {
    match services::migrate(pool).await {
        Err(e) if e.permission_denied() => {
            tracing::info!("this database role may not migrate; assuming `warren setup` applied the migrations");
            Ok(())
        }
        other => other.context("migrating the database"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The settings as a command line takes them.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn mode(url: &str, env_chose: bool) -> PgSslMode {
        let options: PgConnectOptions = url.parse().unwrap();
        plain_on_loopback(url, env_chose, options).get_ssl_mode()
    }

    #[test]
    fn a_loopback_host_without_an_sslmode_gets_sslmode_disable() {
        for url in [
            "postgres://postgres:postgres@127.0.0.1:5432/warren",
            "postgres://u@localhost/warren",
            "postgres://u@[::1]:5432/warren",
            "postgres://u@127.0.0.2/warren",
        ] {
            assert!(matches!(mode(url, false), PgSslMode::Disable), "{url}");
        }
    }

    #[test]
    fn an_sslmode_someone_chose_is_kept() {
        assert!(matches!(
            mode("postgres://u@127.0.0.1/warren?sslmode=require", false),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/warren?sslmode=prefer", false),
            PgSslMode::Prefer
        ));
        // PGSSLMODE set: whatever sqlx read from it stands.
        assert!(!matches!(
            mode("postgres://u@127.0.0.1/warren", true),
            PgSslMode::Disable
        ));
    }

    #[test]
    fn settings_shown_mask_every_password_of_a_broker_list() {
        let cli = Cli::parse_from([
            "warren",
            "--amqp-url",
            "amqp://a:first-secret@h1:5672/%2f,amqps://b:second-secret@h2:5671/%2f",
            "--database-url",
            "postgres://u:db-secret@127.0.0.1/warren",
        ]);
        let shown = format!("{:?}", cli.settings);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("amqp://a:***@h1:5672/%2f,amqps://b:***@h2:5671/%2f"),
            "{shown}"
        );
    }

    #[test]
    fn service_database_urls_are_secrets_that_survive_renaming_unprinted() {
        let cli = Cli::parse_from([
            "warren",
            "--database-url",
            "postgres://u:db-secret@127.0.0.1/warren",
            "--orders-database-url",
            "postgres://o:orders-secret@127.0.0.1:5433/warren",
        ]);
        // Held as secrets: readable where a connection is made...
        let orders: &SecretString = cli.settings.orders_database_url.as_ref().unwrap();
        assert_eq!(
            orders.expose_secret(),
            "postgres://o:orders-secret@127.0.0.1:5433/warren"
        );
        // ...and never in what prints, however the settings are derived.
        let renamed = cli.settings.with_database("drill").unwrap();
        assert_eq!(
            renamed.database_url_of("orders"),
            "postgres://o:orders-secret@127.0.0.1:5433/drill"
        );
        for shown in [
            format!("{:?}", cli.settings),
            format!("{:?}", renamed),
            format!("{:?}", cli.settings.for_service("orders")),
        ] {
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains("o:***@127.0.0.1:5433"), "{shown}");
        }
    }

    #[test]
    fn a_remote_host_keeps_the_default_prefer() {
        assert!(matches!(
            mode("postgres://u@db.example.com/warren", false),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@10.0.0.5/warren", false),
            PgSslMode::Prefer
        ));
    }
}
