//! The eager publisher against the real PostgreSQL and RabbitMQ: events
//! published right after their commit are on the bus once and gone from
//! the outbox, with the relay running beside it and publishing none of
//! them; what it never publishes (a producer that died, an unroutable
//! event) the relay publishes once the lease has run out; leased rows do
//! not wake the relay.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use events::Envelope;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use testkit::sample::CustomerRegistered;
use testkit::TestBus;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_producers::{Eager, EagerConfig, EagerWorker, Outbox, Relay, RelayConfig};

const SERVICE: &str = "customers";

fn registered(n: usize) -> Envelope {
    let subject = Uuid::now_v7();
    let data = CustomerRegistered {
        customer_id: subject,
        name: format!("customer {n}"),
        email: format!("c{n}@example.com"),
    };
    Envelope::new(SERVICE, subject.to_string(), &data)
}

fn relay(pool: &PgPool, bus: &TestBus) -> Relay {
    Relay::new(
        Outbox::new(SERVICE).unwrap(),
        pool.clone(),
        testkit::amqp_url(),
        bus.topology.clone(),
        RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..Default::default()
        },
    )
}

fn eager(pool: &PgPool, bus: &TestBus, lease: Duration, token: &CancellationToken) -> Eager {
    let (eager, worker) = eager_with(
        pool,
        bus,
        EagerConfig {
            lease,
            ..Default::default()
        },
    );
    tokio::spawn(worker.run(token.clone()));
    eager
}

/// An eager publisher of `config` whose worker the test runs itself.
fn eager_with(pool: &PgPool, bus: &TestBus, config: EagerConfig) -> (Eager, EagerWorker) {
    Eager::new(
        Outbox::new(SERVICE).unwrap(),
        pool.clone(),
        testkit::amqp_url(),
        bus.topology.clone(),
        config,
    )
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM customers.outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until the eager publisher counts `n` rows deleted. The counter
/// moves after each delete statement commits, so an empty outbox seen
/// first could still precede the last count: wait on the counter, then look
/// at the table.
async fn until_deleted(eager: &Eager, n: u64, within: Duration) {
    let stats = eager.stats();
    let end = Instant::now() + within;
    while stats.published.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(Instant::now() < end, "rows were not deleted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn until_outbox_empty(pool: &PgPool, within: Duration) {
    let end = Instant::now() + within;
    while outbox_rows(pool).await > 0 {
        assert!(Instant::now() < end, "outbox still holds rows");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Appends `n` events leased, one transaction each, and hands each to the
/// eager publisher after its commit; returns their ids.
async fn commit_and_publish(pool: &PgPool, eager: &Eager, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut tx = pool.begin().await.unwrap();
        let appended = eager.append(&mut tx, registered(i)).await.unwrap();
        tx.commit().await.unwrap();
        ids.push(appended.event_id());
        eager.publish([appended]);
    }
    ids
}

/// warren's outbox in the test's schema, by the library's installer.
async fn install(pool: &PgPool) {
    warren_producers::install::install(pool, SERVICE)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn eager_events_are_on_the_bus_once_and_the_relay_publishes_none(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    bus.declare_service("sink", &["customer.registered"], &[])
        .await;
    let mut tap = bus.wiretap("#").await;
    let token = CancellationToken::new();
    let relay = relay(&pool, &bus);
    let relay_stats = relay.stats();
    let t = token.clone();
    let relay_task = tokio::spawn(async move { relay.run(t).await });
    // A lease far longer than the test: only the eager publisher may
    // publish these rows.
    let eager = eager(&pool, &bus, Duration::from_secs(60), &token);

    let ids = commit_and_publish(&pool, &eager, 200).await;
    let tapped = tap.collect_until_seen(&ids, Duration::from_secs(20)).await;
    // Whatever else would come (a second copy) has time to arrive.
    let extra = tap.collect(1, Duration::from_millis(500)).await;
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for t in tapped.iter().chain(&extra) {
        *seen.entry(t.event.id).or_default() += 1;
        assert_eq!(t.properties.delivery_mode(), &Some(2));
        assert_eq!(t.event.sequence, 1, "numbered by the outbox");
    }
    assert_eq!(seen.len(), ids.len(), "every event on the bus");
    assert!(seen.values().all(|&n| n == 1), "each once: {seen:?}");
    until_deleted(&eager, 200, Duration::from_secs(10)).await;
    assert_eq!(outbox_rows(&pool).await, 0);
    let stats = eager.stats();
    assert_eq!(
        stats.published.load(std::sync::atomic::Ordering::Relaxed),
        200
    );
    assert_eq!(
        relay_stats
            .published
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the relay left the leased rows alone"
    );
    token.cancel();
    relay_task.await.unwrap();
}

/// A producer that dies between its commit and its publish: the row stays
/// leased, the relay leaves it while the lease runs and publishes it after.
#[sqlx::test(migrations = false)]
async fn a_committed_event_never_published_eagerly_is_relayed_after_its_lease(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    bus.declare_service("sink", &["customer.registered"], &[])
        .await;
    let mut tap = bus.wiretap("#").await;
    let token = CancellationToken::new();
    let lease = Duration::from_millis(1500);
    let eager = eager(&pool, &bus, lease, &token);
    // Taken before BEGIN: the lease runs from the transaction's `now()`,
    // its start, so a clock read after the commit would be late by the
    // commit's own time and the check below would fail under load.
    let began = Instant::now();
    let mut tx = pool.begin().await.unwrap();
    let appended = eager.append(&mut tx, registered(0)).await.unwrap();
    tx.commit().await.unwrap();
    // Not handed to the publisher: as if the process had died here.
    let relay = relay(&pool, &bus);
    let t = token.clone();
    let relay_task = tokio::spawn(async move { relay.run(t).await });

    assert!(
        tap.next(lease / 2).await.is_none(),
        "published while still leased"
    );
    let got = tap
        .next(Duration::from_secs(10))
        .await
        .expect("relayed once the lease ran out");
    assert_eq!(got.event.id, appended.event_id());
    assert!(began.elapsed() >= lease, "relayed before the lease ran out");
    until_outbox_empty(&pool, Duration::from_secs(5)).await;
    token.cancel();
    relay_task.await.unwrap();
}

/// Unroutable (no queue bound to the type): the broker returns it, the
/// eager publisher keeps its row, and the relay has it after the lease.
#[sqlx::test(migrations = false)]
async fn an_event_returned_unroutable_stays_in_the_outbox(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let token = CancellationToken::new();
    let eager = eager(&pool, &bus, Duration::from_secs(60), &token);
    commit_and_publish(&pool, &eager, 1).await;
    let stats = eager.stats();
    let end = Instant::now() + Duration::from_secs(10);
    while stats
        .confirmed_batches
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < end, "no confirm came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        outbox_rows(&pool).await,
        1,
        "the returned event was deleted"
    );
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        stats.published.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    token.cancel();
}

/// Leased rows send no NOTIFY (the relay has nothing to claim for them);
/// a plain append in the same schema still does.
#[sqlx::test(migrations = false)]
async fn leased_appends_do_not_wake_the_relay(pool: PgPool) {
    install(&pool).await;
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen("warren_outbox_customers").await.unwrap();
    let outbox = Outbox::new(SERVICE).unwrap();
    for i in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        outbox
            .append_leased(&mut tx, registered(i), Duration::from_secs(60))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), listener.recv())
            .await
            .is_err(),
        "a leased append notified"
    );
    let mut tx = pool.begin().await.unwrap();
    outbox.append(&mut tx, registered(9)).await.unwrap();
    tx.commit().await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a plain append must notify")
        .unwrap();
    assert_eq!(n.channel(), "warren_outbox_customers");
}

/// On shutdown the worker publishes and settles what was handed to it.
#[sqlx::test(migrations = false)]
async fn shutdown_publishes_what_was_queued_first(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    bus.declare_service("sink", &["customer.registered"], &[])
        .await;
    let mut tap = bus.wiretap("#").await;
    let token = CancellationToken::new();
    let (eager, worker) = eager_with(
        &pool,
        &bus,
        EagerConfig {
            lease: Duration::from_secs(60),
            ..Default::default()
        },
    );
    // Handed over before the worker runs, and the shutdown asked at once.
    let ids = commit_and_publish(&pool, &eager, 50).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), worker.run(token.clone()))
        .await
        .expect("worker stops");
    assert_eq!(outbox_rows(&pool).await, 0, "every event settled");
    let tapped = tap.collect_until_seen(&ids, Duration::from_secs(10)).await;
    assert!(tapped.len() >= ids.len());
}

/// Confirmed rows wait for their delete until `delete_every` or until
/// `delete_batch` of them are gathered, and shutdown deletes what waits.
#[sqlx::test(migrations = false)]
async fn confirmed_rows_are_deleted_together_and_at_shutdown(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    bus.declare_service("sink", &["customer.registered"], &[])
        .await;
    let mut tap = bus.wiretap("#").await;
    let token = CancellationToken::new();
    let (eager, worker) = eager_with(
        &pool,
        &bus,
        EagerConfig {
            lease: Duration::from_secs(120),
            // Longer than the test: only the batch size or the shutdown
            // can delete anything here.
            delete_every: Duration::from_secs(60),
            delete_batch: 10,
            ..Default::default()
        },
    );
    let worker = tokio::spawn(worker.run(token.clone()));
    let stats = eager.stats();
    let published = || stats.published.load(std::sync::atomic::Ordering::Relaxed);

    // Fewer than a batch, one at a time: on the bus, confirmed, and still
    // waiting in the outbox for their delete.
    let ids = commit_and_publish(&pool, &eager, 4).await;
    tap.collect_until_seen(&ids, Duration::from_secs(10)).await;
    let confirmed = || {
        stats
            .confirmed_events
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let end = Instant::now() + Duration::from_secs(10);
    while confirmed() < 4 {
        assert!(Instant::now() < end, "confirms did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(outbox_rows(&pool).await, 4, "deletes wait to be gathered");
    assert_eq!(published(), 0);

    // A batch's worth handed over together: the batch size is reached, and
    // everything confirmed goes in one go, long before `delete_every`.
    let mut more = Vec::new();
    let mut appended = Vec::new();
    for i in 0..10 {
        let mut tx = pool.begin().await.unwrap();
        let a = eager.append(&mut tx, registered(100 + i)).await.unwrap();
        tx.commit().await.unwrap();
        more.push(a.event_id());
        appended.push(a);
    }
    eager.publish(appended);
    tap.collect_until_seen(&more, Duration::from_secs(10)).await;
    until_deleted(&eager, 14, Duration::from_secs(10)).await;
    assert_eq!(outbox_rows(&pool).await, 0, "a full batch deletes at once");
    assert_eq!(published(), 14);

    // Again fewer than a batch; the shutdown deletes them before it ends.
    let last = commit_and_publish(&pool, &eager, 3).await;
    tap.collect_until_seen(&last, Duration::from_secs(10)).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("worker stops")
        .unwrap();
    assert_eq!(outbox_rows(&pool).await, 0, "shutdown deleted the rest");
    assert_eq!(published(), 17);
}

/// A queue bound to the events exchange that is full and refuses more
/// (`x-max-length`, `x-overflow: reject-publish`) makes RabbitMQ nack the
/// eager publishes routed to it. The eager publisher keeps those rows (it
/// deletes only what was acked); once their lease runs out and the queue
/// takes messages again, the relay publishes them, each subject in order.
#[sqlx::test(migrations = false)]
async fn nacked_eager_events_stay_and_are_relayed_in_order_once_the_queue_takes_them(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let name = format!("{}.full", bus.namespace);
    let blocker = testkit::Blocker::new(&bus, &name, Some("customer.*")).await;
    let token = CancellationToken::new();
    let eager = eager(&pool, &bus, Duration::from_secs(2), &token);
    let stats = eager.stats();
    let subjects: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for n in 0..3 {
        for s in &subjects {
            let e = if n == 0 {
                Envelope::new(
                    SERVICE,
                    s.to_string(),
                    &CustomerRegistered {
                        customer_id: *s,
                        name: "N".into(),
                        email: format!("{s}@example.com"),
                    },
                )
            } else {
                Envelope::new(
                    SERVICE,
                    s.to_string(),
                    &testkit::sample::CustomerUpdated {
                        customer_id: *s,
                        name: format!("N{n}"),
                        email: format!("{s}@example.com"),
                        version: None,
                    },
                )
            };
            let mut tx = pool.begin().await.unwrap();
            let appended = eager.append(&mut tx, e).await.unwrap();
            tx.commit().await.unwrap();
            eager.publish([appended]);
        }
    }
    let total = 3 * subjects.len();

    // Every eager publish nacked; every row still there.
    let end = Instant::now() + Duration::from_secs(10);
    while stats.failed.load(std::sync::atomic::Ordering::Relaxed) < total as u64 {
        assert!(Instant::now() < end, "the eager publisher saw no nacks");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        outbox_rows(&pool).await,
        total as i64,
        "a nacked row was deleted"
    );
    assert_eq!(
        stats.published.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // The queue takes messages again; the relay takes over after the lease.
    let mut taken = blocker.release().await;
    let relay = relay(&pool, &bus);
    let t = token.clone();
    let relay_task = tokio::spawn(async move { relay.run(t).await });
    until_outbox_empty(&pool, Duration::from_secs(20)).await;
    let tapped = taken.collect(usize::MAX, Duration::from_secs(2)).await;
    let mut by_subject: HashMap<String, Vec<i64>> = HashMap::new();
    for t in &tapped {
        by_subject
            .entry(t.event.subject.clone())
            .or_default()
            .push(t.event.sequence);
    }
    assert_eq!(by_subject.len(), subjects.len(), "{by_subject:?}");
    for (subject, seqs) in by_subject {
        let last_first = seqs
            .iter()
            .rposition(|&q| q == 1)
            .unwrap_or_else(|| panic!("subject {subject}: sequence 1 never came: {seqs:?}"));
        assert_eq!(
            &seqs[last_first..],
            [1, 2, 3],
            "subject {subject}: {seqs:?}"
        );
    }
    token.cancel();
    relay_task.await.unwrap();
    drop(taken);
    bus.channel
        .queue_delete(name.as_str().into(), Default::default())
        .await
        .unwrap();
}
