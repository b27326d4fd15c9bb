//! A consumer process killed with SIGKILL between commit and ack, against
//! the real RabbitMQ and PostgreSQL: after a restart the broker redelivers
//! the event and the inbox absorbs it, so the store changes once.
//!
//! The process is real: the test binary runs itself again as a child
//! (`child_consumer_process`, an ignored test that only does something
//! when the parent's environment variables are set). The child's consumer
//! halts right after its commit (`CrashPoint::AfterCommit`), so no ack can
//! ever leave it; the parent sees the commit in the database and kills
//! the child with SIGKILL, as an operator or the OOM killer would.

use std::os::unix::process::ExitStatusExt;
use std::str::FromStr;
use std::time::Duration;

use events::Envelope;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use testkit::sample::{OrderLine, OrderPlaced, ShipmentDispatched};
use testkit::{amqp_url, TestBus};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use transport::Topology;
use uuid::Uuid;
use warren_consumers::{
    Context, CrashPoint, Handle, HandleError, Outcome, RetryPolicy, Router, Subscription,
    SubscriptionConfig,
};

const SERVICE: &str = "shipping";
const CHILD_NAMESPACE: &str = "WARREN_KILL_TEST_NAMESPACE";
const CHILD_DATABASE: &str = "WARREN_KILL_TEST_DATABASE";
const CHILD_TEST: &str = "child_consumer_process";

/// Records the event and raises a follow-up, so both the store and the
/// outbox show whether the event was applied more than once.
#[derive(Clone)]
struct Shipper;

#[async_trait::async_trait]
impl Handle<OrderPlaced> for Shipper {
    async fn handle(&self, ctx: &mut Context<'_>, data: OrderPlaced) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO shipping.effects (event_id) VALUES ($1)")
            .bind(ctx.event.id)
            .execute(&mut *ctx.tx)
            .await?;
        ctx.emit(
            data.order_id.to_string(),
            &ShipmentDispatched {
                order_id: data.order_id,
                shipment_id: Uuid::now_v7(),
            },
        )
        .await?;
        Ok(())
    }
}

fn config() -> SubscriptionConfig {
    SubscriptionConfig {
        prefetch: 8,
        lanes: 2,
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            defer_delay: Duration::from_millis(100),
            ..Default::default()
        },
        live_feed: false,
        ..Default::default()
    }
}

/// The test namespace's topology, declared exactly as `TestBus` does it
/// (queue arguments must match or the broker refuses the declaration).
fn topology(namespace: &str) -> Topology {
    let mut t = Topology::new(namespace);
    t.expires = Some(Duration::from_secs(600));
    t
}

fn subscription(pool: PgPool, namespace: &str, config: SubscriptionConfig) -> Subscription {
    let router = Router::new(SERVICE).on::<OrderPlaced, _>(Shipper);
    Subscription::new(
        router,
        testkit::sample::catalog(),
        pool,
        amqp_url(),
        topology(namespace),
        config,
    )
    .unwrap()
}

/// The child: consumes until the crash point halts it; the parent kills it.
#[tokio::test]
#[ignore = "a helper, run as a child process by the kill test"]
async fn child_consumer_process() {
    let (Ok(namespace), Ok(database)) = (
        std::env::var(CHILD_NAMESPACE),
        std::env::var(CHILD_DATABASE),
    ) else {
        return;
    };
    let server = std::env::var("DATABASE_URL").expect("DATABASE_URL (set by .cargo/config.toml)");
    let options = PgConnectOptions::from_str(&server)
        .unwrap()
        .database(&database);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let config = SubscriptionConfig {
        crash_at: Some(CrashPoint::AfterCommit),
        ..config()
    };
    subscription(pool, &namespace, config)
        .run(CancellationToken::new())
        .await;
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Messages ready in the service's queue (unacknowledged ones not counted).
async fn ready(bus: &TestBus) -> u32 {
    bus.channel
        .queue_declare(
            bus.topology.queue(SERVICE).into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

/// warren's outbox and inbox in the test's schema, by the library's installer.
async fn install(pool: &PgPool) {
    producers::install::install(pool, SERVICE).await.unwrap();
    warren_consumers::install::install(pool, SERVICE)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn consumer_killed_between_commit_and_ack_does_not_apply_the_event_twice(pool: PgPool) {
    install(&pool).await;
    sqlx::query("CREATE TABLE shipping.effects (n bigserial PRIMARY KEY, event_id uuid NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let bus = TestBus::new().await;
    let probe = subscription(pool.clone(), &bus.namespace, config());
    probe.declare(&bus.conn).await.unwrap();
    bus.remember(SERVICE, &config().retry.delays());

    let database = pool.connect_options().get_database().unwrap().to_owned();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_NAMESPACE, &bus.namespace)
        .env(CHILD_DATABASE, database)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let order = Uuid::now_v7();
    let mut event = Envelope::new(
        "orders",
        order.to_string(),
        &OrderPlaced {
            order_id: order,
            customer_id: Uuid::now_v7(),
            lines: vec![OrderLine {
                sku: "SKU-1".into(),
                qty: 1,
                unit_price: 500,
            }],
            total: 500,
            payment_token: "tok_ok".into(),
        },
    );
    event.sequence = 1;
    bus.channel
        .basic_publish(
            bus.topology.exchange().into(),
            event.event_type.as_str().into(),
            BasicPublishOptions::default(),
            &testkit::sample::codec().encode(&event),
            BasicProperties::default()
                .with_content_type(events::CONTENT_TYPE_STRUCTURED.into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap();

    // The child commits, then halts before its ack: once the effect is
    // visible, the kill lands between commit and ack, never after.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&pool, "SELECT count(*) FROM shipping.effects").await == 0 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child consumer exited before committing: {status}");
        }
        assert!(Instant::now() < deadline, "the child never committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM shipping.outbox").await,
        1,
        "the follow-up event committed with the effect"
    );
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");

    // The broker takes the unacknowledged delivery back when the dead
    // process's connection closes: proof that no ack was sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(&bus).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the delivery was not returned to the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The restart: a fresh consumer on the same queue gets the redelivery.
    let stats = probe.stats();
    let stop = CancellationToken::new();
    let (s, t) = (probe.clone(), stop.clone());
    let task = tokio::spawn(async move { s.run(t).await });
    let deadline = Instant::now() + Duration::from_secs(15);
    while stats.count(Outcome::Duplicate) == 0 {
        assert!(
            Instant::now() < deadline,
            "no duplicate outcome: {:?}",
            stats.snapshot().by_outcome
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.count(Outcome::Handled), 0, "not applied again");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM shipping.effects").await,
        1,
        "the store changed once"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM shipping.outbox").await,
        1,
        "one follow-up event"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM shipping.inbox").await, 1);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(ready(&bus).await, 0, "the redelivery was acknowledged");
}
