//! `warren demo`: the whole system in one process, telling a story.
//!
//! It uses a database of its own (`<database>_demo`), dropped and created
//! afresh each run, and a fresh namespace, so it runs on a machine where
//! warren never ran and again as often as wanted, without touching the
//! data of `warren run`.

use secrecy::ExposeSecret as _;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use consumers::{Outcome, RetryPolicy, SubscriptionConfig};
use producers::RelayConfig;
use services::gateway::GatewayConfig;
use services::Stores;
use services::{App, AppConfig, ALL};
use sqlx::migrate::MigrateDatabase;
use sqlx::Postgres;

use crate::commands::replay::{replay, replay_lines, ReplayArgs};
use crate::commands::status::queue_counts;
use crate::config::{connect_db, connect_stores, migrate_stores, Settings};
use crate::error::InvalidInput;

/// fixtures/demo.jsonl and demo-stock.json, built in: `warren demo` runs
/// wherever the binary is (a container image, another machine), not only
/// in a checkout of the repository.
const DEMO_FIXTURE: &str = include_str!("../../../fixtures/demo.jsonl");
const DEMO_STOCK: &str = include_str!("../../../fixtures/demo-stock.json");

/// Arguments of `warren demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The story to replay [default: fixtures/demo.jsonl, built in].
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// Stock levels to set first (JSON object SKU → units)
    /// [default: fixtures/demo-stock.json, built in].
    #[arg(long)]
    pub stock: Option<PathBuf>,
    /// Longest wait for the story to settle, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// The demo's own database: `<database>_demo` (`warren_demo` by
/// default), recreated by every run and left for `warren trace --demo`.
pub fn database_name(settings: &Settings) -> anyhow::Result<String> {
    let base = url::Url::parse(settings.database_url.expose_secret())
        .context("DATABASE_URL is not a URL")?;
    let db_name = format!(
        "{}_demo",
        base.path()
            .trim_start_matches('/')
            .trim()
            .to_owned()
            .replace('/', "")
    );
    Ok(if db_name == "_demo" {
        "warren_demo".to_owned()
    } else {
        db_name
    })
}

/// Runs the demo and prints its summary.
pub async fn run(settings: &Settings, args: &DemoArgs) -> anyhow::Result<()> {
    let db_name = database_name(settings)?;
    let mut settings = settings.with_database(&db_name)?;
    settings.namespace = format!(
        "{}-demo-{}",
        settings.namespace,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );

    // A clean slate: the demo's own database, recreated.
    let server_check = connect_db(&settings.with_database("postgres")?, false, 1).await?;
    server_check.close().await;
    let _ = Postgres::drop_database(settings.database_url.expose_secret()).await;
    for s in ALL {
        if let Some(own) = settings.own_database(s) {
            let _ = Postgres::drop_database(own).await;
        }
    }
    let stores = connect_stores(&settings, true, 40).await?;
    migrate_stores(&stores).await?;
    tracing::info!(database = %db_name, namespace = %settings.namespace, "demo database and namespace ready");

    // The namespace is the demo's own: its queues expire on the broker if
    // this process dies without its cleanup (SIGKILL, a crash).
    let mut topology = settings.topology();
    topology.expires = Some(super::teardown::THROWAWAY_EXPIRES);
    let config = AppConfig {
        amqp_url: settings.amqp_url.expose_secret().to_owned(),
        topology: topology.clone(),
        services: ALL.iter().map(|s| s.to_string()).collect(),
        http: None,
        subscription: SubscriptionConfig {
            lanes: 2,
            retry: RetryPolicy {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(2),
                defer_delay: Duration::from_millis(200),
                ..Default::default()
            },
            ..Default::default()
        },
        relay: RelayConfig {
            poll_interval: Duration::from_millis(250),
            ..Default::default()
        },
        gateway: GatewayConfig::default(),
        partitions: Default::default(),
    };
    let retry_delays = config.subscription.retry.delays();
    // Ctrl-C/SIGTERM from here on stops the services and removes the
    // namespace, as the end of the story does.
    let shutdown = super::shutdown_on_signal();
    let app = match App::start(stores.clone(), config).await {
        Ok(app) => app,
        Err(e) => {
            super::teardown::cleanup_throwaway(
                settings.amqp_url.expose_secret(),
                &topology,
                &retry_delays,
            )
            .await;
            return Err(e.into());
        }
    };
    let told = tokio::select! {
        r = story(&settings, args, &stores, &app, &retry_delays) => r,
        () = shutdown.cancelled() => Err(crate::error::Interrupted.into()),
    };
    app.stop().await;
    super::teardown::cleanup_throwaway(settings.amqp_url.expose_secret(), &topology, &retry_delays)
        .await;
    stores.close().await;
    told
}

/// Sets the stock, replays the story, waits for it to settle and prints
/// what happened.
async fn story(
    settings: &Settings,
    args: &DemoArgs,
    stores: &Stores,
    app: &App,
    retry_delays: &[Duration],
) -> anyhow::Result<()> {
    let (stock_name, stock_text) = match &args.stock {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => ("fixtures/demo-stock.json".to_owned(), DEMO_STOCK.to_owned()),
    };
    let stock: BTreeMap<String, i32> = serde_json::from_str(&stock_text)
        .with_context(|| format!("{stock_name} must be a JSON object of SKU → units"))?;
    for (sku, units) in &stock {
        services::inventory::set_level(stores.of("inventory"), sku, *units).await?;
        tracing::info!(sku, units, "stock set");
    }

    let replay_args = ReplayArgs {
        files: args.fixture.iter().cloned().collect(),
        rate: Some(20),
        dry_run: false,
        to: None,
        strict: false,
        raw_invalid: true,
        json: false,
    };
    let summary = match &args.fixture {
        Some(_) => replay(settings, &replay_args).await?,
        None => {
            let codec = settings.codec();
            let lines = events::fixtures::parse(
                std::path::Path::new("fixtures/demo.jsonl"),
                DEMO_FIXTURE.as_bytes(),
                &codec,
            )
            .map_err(|e| InvalidInput(e.to_string()))?;
            replay_lines(settings, &replay_args, lines).await?
        }
    };
    tracing::info!(
        published = summary.published,
        invalid = summary.invalid,
        "story replayed; waiting for it to settle"
    );

    let settled = wait_settled(
        settings,
        stores,
        app,
        retry_delays,
        Duration::from_secs(args.timeout),
    )
    .await;
    print_summary(stores, app, settings).await?;
    settled
}

/// Settled: no outbox backlog, no message waiting in any queue, and no
/// outcome for a while.
async fn wait_settled(
    settings: &Settings,
    stores: &Stores,
    app: &App,
    delays: &[Duration],
    timeout: Duration,
) -> anyhow::Result<()> {
    let conn = transport::connect(settings.amqp_url.expose_secret(), "warren demo watch").await?;
    let topology = settings.topology();
    let started = Instant::now();
    let total = |app: &App| -> u64 {
        app.consumer_stats
            .values()
            .map(|s| s.snapshot().by_outcome.values().sum::<u64>())
            .sum()
    };
    let (mut last_total, mut quiet_since) = (total(app), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now_total = total(app);
        if now_total != last_total {
            (last_total, quiet_since) = (now_total, Instant::now());
        }
        let mut busy = false;
        for s in ALL {
            if producers::Outbox::new(s)?
                .backlog(stores.of(s))
                .await?
                .unpublished
                > 0
            {
                busy = true;
            }
            if s == "customers" {
                continue;
            }
            let mut queues = vec![topology.queue(s)];
            queues.extend(delays.iter().map(|d| topology.retry_queue(s, *d)));
            for q in queues {
                if queue_counts(&conn, &q).await?.is_some_and(|(n, _)| n > 0) {
                    busy = true;
                }
            }
        }
        if !busy && quiet_since.elapsed() > Duration::from_millis(1500) {
            break;
        }
        if started.elapsed() > timeout {
            transport::close(conn, "demo watch").await;
            anyhow::bail!("the story did not settle within {timeout:?}");
        }
    }
    transport::close(conn, "demo watch").await;
    Ok(())
}

async fn print_summary(stores: &Stores, app: &App, settings: &Settings) -> anyhow::Result<()> {
    let cols = [
        Outcome::Handled,
        Outcome::Duplicate,
        Outcome::Skipped,
        Outcome::Deferred,
        Outcome::Retried,
        Outcome::DeadLettered,
    ];
    println!();
    println!("== consumers ({}) ==", settings.namespace);
    print!("{:<10}", "service");
    for c in cols {
        print!(" {:>13}", c.as_str());
    }
    println!();
    for (service, stats) in &app.consumer_stats {
        print!("{service:<10}");
        for c in cols {
            print!(" {:>13}", stats.count(c));
        }
        println!();
    }

    println!();
    println!("== orders ==");
    let orders: Vec<(uuid::Uuid, String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT o.id, coalesce(c.name, o.customer_id::text), o.status, o.total, o.reason \
         FROM orders.orders o LEFT JOIN orders.customers c ON c.id = o.customer_id ORDER BY o.created_at, o.id",
    )
    .fetch_all(stores.of("orders"))
    .await?;
    println!(
        "{:<38} {:<16} {:<10} {:>9}  reason",
        "order", "customer", "status", "total"
    );
    for (id, customer, status, total, reason) in orders {
        println!(
            "{id:<38} {customer:<16} {status:<10} {:>9.2}  {}",
            total as f64 / 100.0,
            reason.unwrap_or_default()
        );
    }

    println!();
    println!("== stock ==");
    let stock: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT sku, on_hand, reserved FROM inventory.stock ORDER BY sku")
            .fetch_all(stores.of("inventory"))
            .await?;
    println!("{:<10} {:>8} {:>9}", "sku", "on_hand", "reserved");
    for (sku, on_hand, reserved) in stock {
        println!("{sku:<10} {on_hand:>8} {reserved:>9}");
    }

    println!();
    println!("== payments and shipments ==");
    let payments: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM payments.payments GROUP BY status ORDER BY status",
    )
    .fetch_all(stores.of("payments"))
    .await?;
    for (status, n) in payments {
        println!("payments {status:<9} {n}");
    }
    let shipments: i64 = sqlx::query_scalar("SELECT count(*) FROM shipping.shipments")
        .fetch_one(stores.of("shipping"))
        .await?;
    println!("shipments          {shipments}");

    println!();
    println!("== dead letters ==");
    let all = super::dlq::Filter::default();
    for l in super::dlq::list(settings, &all, 1000).await? {
        println!(
            "{:<10} {:<14} {:<16} {}",
            l.service,
            l.event_type,
            l.reason,
            l.error.chars().take(90).collect::<String>()
        );
    }
    println!();
    println!("Follow one order through every service: warren trace --demo <order id> [--format json|mermaid]");
    Ok(())
}
