//! The relay's wake-up against the real PostgreSQL and RabbitMQ: writers
//! skip the outbox NOTIFY while the relay is busy, and no event waits for
//! the poll because of it. The relays here poll once a minute, so an event
//! whose wake-up was lost would not arrive within these tests' waits.

use std::time::Duration;

use events::Envelope;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgPool};
use testkit::sample::CustomerRegistered;
use testkit::{amqp_url, TestBus};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_producers::{Outbox, Relay, RelayConfig};

const SERVICE: &str = "customers";
const CHANNEL: &str = "warren_outbox_customers";

fn event(n: usize) -> Envelope {
    let id = Uuid::now_v7();
    let data = CustomerRegistered {
        customer_id: id,
        name: format!("customer {n}"),
        email: format!("c{n}@example.com"),
    };
    Envelope::new(SERVICE, id.to_string(), &data)
}

/// A relay that would only find a missed event at its next poll, a minute
/// away.
fn spawn_relay(pool: &PgPool, bus: &TestBus) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let relay = Relay::new(
        Outbox::new(SERVICE).unwrap(),
        pool.clone(),
        amqp_url(),
        bus.topology.clone(),
        RelayConfig {
            poll_interval: Duration::from_secs(60),
            ..Default::default()
        },
    );
    let stop = CancellationToken::new();
    let t = stop.clone();
    (stop, tokio::spawn(async move { relay.run(t).await }))
}

async fn flag(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT pg_sequence_last_value('customers.outbox_relay_busy')")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn append_one(pool: &PgPool, e: Envelope) -> Uuid {
    let mut tx = pool.begin().await.unwrap();
    let stored = Outbox::new(SERVICE)
        .unwrap()
        .append(&mut tx, e)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    stored.id
}

/// `writers` tasks each commit `each` single-event transactions back to
/// back; the ids of all of them. Event numbers start at `first`.
async fn write_concurrently(pool: &PgPool, writers: usize, each: usize, first: usize) -> Vec<Uuid> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut ids = Vec::with_capacity(each);
            for i in 0..each {
                ids.push(append_one(&pool, event(first + w * each + i)).await);
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.unwrap());
    }
    ids
}

/// Waits until the tap has seen every id, failing with how many it saw.
async fn assert_all_published(tap: &mut testkit::Wiretap, ids: &[Uuid]) {
    let tapped = tap.collect_until_seen(ids, Duration::from_secs(20)).await;
    let seen: std::collections::HashSet<Uuid> = tapped.iter().map(|t| t.event.id).collect();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "{} of {} events published",
        ids.iter().filter(|id| seen.contains(id)).count(),
        ids.len()
    );
}

/// Waits until the relay has cleared the busy flag.
async fn wait_until_flag_cleared(pool: &PgPool, why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while flag(pool).await != Some(0) {
        assert!(tokio::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection listening on the customers outbox channel.
async fn listener(pool: &PgPool) -> PgListener {
    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    listener
}

async fn notifications_within(listener: &mut PgListener, wait: Duration) -> usize {
    let mut n = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(wait, listener.recv()).await {
        n += 1;
    }
    n
}

/// warren's outbox in the test's schema, by the library's installer.
async fn install(pool: &PgPool) {
    warren_producers::install::install(pool, SERVICE)
        .await
        .unwrap();
}

/// Eight writers commit single-event transactions back to back: the relay
/// turns busy, most commits go without a NOTIFY, and yet every event is
/// published at once; when the traffic stops the relay clears the flag, so
/// the next lone event notifies and is published too.
#[sqlx::test(migrations = false)]
async fn busy_relay_spares_writers_the_notify_and_misses_no_event(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let mut listener = listener(&pool).await;
    let (stop, task) = spawn_relay(&pool, &bus);
    // Writers start once the relay is up (it publishes a first event), so
    // its start-up does not count as commits nobody was busy for.
    let first = append_one(&pool, event(0)).await;
    let tapped = tap
        .collect_until_seen(&[first], Duration::from_secs(10))
        .await;
    assert!(tapped.iter().any(|t| t.event.id == first), "relay up");
    notifications_within(&mut listener, Duration::from_millis(200)).await;

    let ids = write_concurrently(&pool, 8, 100, 1).await;
    assert_all_published(&mut tap, &ids).await;
    // Every commit would notify without the flag; between bursts (a claim
    // that finds nothing) the relay goes idle and some do.
    let notified = notifications_within(&mut listener, Duration::from_millis(300)).await;
    assert!(
        notified < ids.len() * 3 / 4,
        "{notified} notifications for {} commits: writers did not skip them",
        ids.len()
    );

    // Idle again: the relay cleared the flag before it went to sleep.
    wait_until_flag_cleared(&pool, "flag never cleared").await;
    let lone = append_one(&pool, event(10_000)).await;
    assert_eq!(
        notifications_within(&mut listener, Duration::from_millis(300)).await,
        1,
        "a commit to an idle relay notifies"
    );
    let tapped = tap
        .collect_until_seen(&[lone], Duration::from_secs(10))
        .await;
    assert!(
        tapped.iter().any(|t| t.event.id == lone),
        "lone event published"
    );
    stop.cancel();
    task.await.unwrap();
}

/// The race the handshake exists for: a writer reads the flag as 1 and
/// skips the NOTIFY, and commits only after the relay's last empty claim.
/// The relay may not go to sleep while that writer is open (it holds the
/// writers lock), so the event is published without any notification.
#[sqlx::test(migrations = false)]
async fn writer_that_skipped_the_notify_and_commits_late_is_still_published(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let mut listener = listener(&pool).await;

    // As a busy relay (or one that died busy) leaves it.
    sqlx::query("SELECT setval('customers.outbox_relay_busy', 1, true)")
        .execute(&pool)
        .await
        .unwrap();
    let mut late = pool.acquire().await.unwrap().detach();
    let mut tx = late.begin().await.unwrap();
    let stored = Outbox::new(SERVICE)
        .unwrap()
        .append(&mut tx, event(1))
        .await
        .unwrap();

    // The relay starts, finds nothing committed, clears the flag, and
    // cannot take the writers lock while the transaction is open.
    let (stop, task) = spawn_relay(&pool, &bus);
    wait_until_flag_cleared(&pool, "relay never cleared the flag").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();

    assert_eq!(
        notifications_within(&mut listener, Duration::from_millis(300)).await,
        0,
        "the writer read the flag as 1 and did not notify"
    );
    let tapped = tap
        .collect_until_seen(&[stored.id], Duration::from_secs(10))
        .await;
    assert!(
        tapped.iter().any(|t| t.event.id == stored.id),
        "the late writer's event waited for the poll"
    );
    stop.cancel();
    task.await.unwrap();
}

/// A schema set up without the flag (its trigger always notifies, as
/// before the handshake existed, or a team's own schema with a trigger of
/// its own): the relay never marks itself busy and is woken by every
/// commit.
#[sqlx::test(migrations = false)]
async fn outbox_without_the_flag_is_woken_by_every_commit(pool: PgPool) {
    install(&pool).await;
    sqlx::raw_sql(
        "CREATE FUNCTION customers.always_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM pg_notify('warren_outbox_' || TG_TABLE_SCHEMA, ''); RETURN NULL; END $$; \
         DROP TRIGGER outbox_notify ON customers.outbox; \
         CREATE TRIGGER outbox_notify AFTER INSERT ON customers.outbox \
           FOR EACH STATEMENT EXECUTE FUNCTION customers.always_notify(); \
         DROP FUNCTION customers.outbox_wake(); \
         DROP SEQUENCE customers.outbox_relay_busy;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let mut listener = listener(&pool).await;
    let (stop, task) = spawn_relay(&pool, &bus);

    let ids = write_concurrently(&pool, 4, 25, 0).await;
    assert_all_published(&mut tap, &ids).await;
    assert_eq!(
        notifications_within(&mut listener, Duration::from_millis(300)).await,
        ids.len(),
        "every commit notified"
    );
    // Confirmed and deleted: the relay did not trip over the missing flag.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM customers.outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} rows never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
}
