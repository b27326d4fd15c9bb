//! The outbox and relay against the real PostgreSQL and RabbitMQ: order,
//! crash points, outages, two relays, unroutable events, retention.

use std::collections::HashMap;
use std::time::Duration;

use events::Envelope;
use sqlx::{Connection, PgPool};
use testkit::sample::{CustomerRegistered, CustomerUpdated};
use testkit::{amqp_url, Proxy, Tapped, TestBus};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_producers::relay::{BatchOutcome, Confirms, CrashPoint};
use warren_producers::{Outbox, Relay, RelayConfig};

const SERVICE: &str = "customers";

fn registered(subject: Uuid, n: usize) -> Envelope {
    let data = CustomerRegistered {
        customer_id: subject,
        name: format!("customer {n}"),
        email: format!("c{n}@example.com"),
    };
    Envelope::new(SERVICE, subject.to_string(), &data)
}

fn updated(subject: Uuid, n: usize) -> Envelope {
    let data = CustomerUpdated {
        customer_id: subject,
        name: format!("renamed {n}"),
        email: format!("c{n}@example.com"),
        version: None,
    };
    Envelope::new(SERVICE, subject.to_string(), &data)
}

/// Appends `per_subject` events for each subject, one transaction each.
async fn append_events(pool: &PgPool, subjects: &[Uuid], per_subject: usize) -> Vec<Envelope> {
    let outbox = Outbox::new(SERVICE).unwrap();
    let mut out = Vec::new();
    for n in 0..per_subject {
        for s in subjects {
            let mut tx = pool.begin().await.unwrap();
            let e = if n == 0 {
                registered(*s, n)
            } else {
                updated(*s, n)
            };
            out.push(outbox.append(&mut tx, e).await.unwrap());
            tx.commit().await.unwrap();
        }
    }
    out
}

fn fast_config() -> RelayConfig {
    RelayConfig {
        batch_size: 50,
        poll_interval: Duration::from_millis(200),
        standby_interval: Duration::from_millis(100),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        ..Default::default()
    }
}

fn relay(pool: &PgPool, bus: &TestBus, url: &str, config: RelayConfig) -> Relay {
    Relay::new(
        Outbox::new(SERVICE).unwrap(),
        pool.clone(),
        url,
        bus.topology.clone(),
        config,
    )
}

fn spawn(relay: Relay) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let t = token.clone();
    (token, tokio::spawn(async move { relay.run(t).await }))
}

/// Asserts that, per subject, the tapped events contain every sequence
/// 1..=n and that the *first* occurrence of each appears in order.
/// Duplicates (republished after a crash) may follow; consumers absorb them.
fn assert_complete_and_ordered(tapped: &[Tapped], expected: &[Envelope]) {
    let mut want: HashMap<&str, i64> = HashMap::new();
    for e in expected {
        let m = want.entry(e.subject.as_str()).or_default();
        *m = (*m).max(e.sequence);
    }
    let mut seen: HashMap<&str, i64> = HashMap::new();
    for t in tapped {
        let last = seen.entry(t.event.subject.as_str()).or_default();
        if t.event.sequence == *last + 1 {
            *last += 1;
        } else {
            assert!(
                t.event.sequence <= *last,
                "subject {} jumped from {} to {}",
                t.event.subject,
                last,
                t.event.sequence
            );
        }
    }
    for (subject, max) in want {
        assert_eq!(
            seen.get(subject).copied(),
            Some(max),
            "subject {subject} incomplete"
        );
    }
}

/// The one number a `SELECT count(*) …` returns.
async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn unpublished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM customers.outbox WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// warren's outbox in the test's schema, by the library's installer.
async fn install(pool: &PgPool) {
    warren_producers::install::install(pool, SERVICE)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn relay_publishes_every_event_in_subject_order_with_amqp_properties(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let subjects: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let expected = append_events(&pool, &subjects, 4).await;
    assert!(expected.iter().all(|e| e.sequence >= 1 && e.sequence <= 4));

    let (stop, task) = spawn(relay(&pool, &bus, &amqp_url(), fast_config()));
    let tapped = tap.collect(expected.len(), Duration::from_secs(10)).await;
    assert_eq!(tapped.len(), expected.len());
    assert_complete_and_ordered(&tapped, &expected);

    let first = &tapped[0];
    assert_eq!(first.routing_key, first.event.event_type);
    let p = &first.properties;
    assert_eq!(
        p.message_id().as_ref().unwrap().as_str(),
        first.event.id.to_string()
    );
    assert_eq!(p.kind().as_ref().unwrap().as_str(), first.event.event_type);
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), SERVICE);
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/cloudevents+json"
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|c| c.to_string()),
        first.event.correlationid
    );
    assert_eq!(first.event.source, "/warren/customers");

    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        unpublished(&pool).await,
        0,
        "every confirmed event is marked"
    );
}

#[sqlx::test(migrations = false)]
async fn concurrent_appends_on_one_subject_get_gap_free_sequences(pool: PgPool) {
    install(&pool).await;
    let subject = Uuid::now_v7();
    let outbox = Outbox::new(SERVICE).unwrap();
    let mut tasks = Vec::new();
    for n in 0..20 {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let e = outbox.append(&mut tx, updated(subject, n)).await.unwrap();
            tx.commit().await.unwrap();
            e.sequence
        }));
    }
    let mut seqs: Vec<i64> = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    // Positions follow sequences: the relay's commit-order claim is also
    // the subject's sequence order.
    let by_position: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM customers.outbox ORDER BY position")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(by_position, (1..=20).collect::<Vec<_>>());
}

#[sqlx::test(migrations = false)]
async fn rolled_back_append_never_reaches_the_bus(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let outbox = Outbox::new(SERVICE).unwrap();
    let s = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    outbox.append(&mut tx, registered(s, 0)).await.unwrap();
    tx.rollback().await.unwrap();
    let kept = append_events(&pool, &[Uuid::now_v7()], 1).await;

    let (stop, task) = spawn(relay(&pool, &bus, &amqp_url(), fast_config()));
    let tapped = tap.collect(2, Duration::from_secs(2)).await;
    assert_eq!(tapped.len(), 1);
    assert_eq!(tapped[0].event.id, kept[0].id);
    stop.cancel();
    task.await.unwrap();
}

/// Kills the relay at each crash point of a pass and restarts it.
/// After claim: nothing was published, the restart publishes everything.
/// After publish (confirms not awaited) and after confirm (not marked): the
/// batch reached the broker but stays unmarked, so the restart publishes it
/// again — those duplicates are possible and consumers' inboxes absorb them.
#[sqlx::test(migrations = false)]
async fn relay_crash_at_any_point_loses_nothing_and_keeps_order(pool: PgPool) {
    install(&pool).await;
    for point in [
        CrashPoint::AfterClaim,
        CrashPoint::AfterPublish,
        CrashPoint::AfterConfirm,
    ] {
        let bus = TestBus::new().await;
        let mut tap = bus.wiretap("#").await;
        let subjects: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let expected = append_events(&pool, &subjects, 5).await;

        let crashing = relay(
            &pool,
            &bus,
            &amqp_url(),
            RelayConfig {
                crash_at: Some(point),
                batch_size: 100,
                ..fast_config()
            },
        );
        let mut leader = pool.acquire().await.unwrap().detach();
        let conn = transport::connect(&amqp_url(), "crashing relay")
            .await
            .unwrap();
        let ch = transport::Publisher::open(&conn).await.unwrap();
        let err = crashing.publish_batch(&mut leader, &ch).await.unwrap_err();
        assert!(err.to_string().contains("injected crash"), "{err}");
        // The process "dies": its connections go away without a goodbye.
        drop(ch);
        drop(conn);
        leader.close().await.unwrap();
        assert_eq!(
            unpublished(&pool).await,
            expected.len() as i64,
            "{point:?}: nothing marked"
        );

        let (stop, task) = spawn(relay(&pool, &bus, &amqp_url(), fast_config()));
        let tapped = tap
            .collect(expected.len() * 2, Duration::from_secs(2))
            .await;
        assert_complete_and_ordered(&tapped, &expected);
        if point == CrashPoint::AfterClaim {
            assert_eq!(
                tapped.len(),
                expected.len(),
                "nothing published before the crash"
            );
        } else {
            assert!(tapped.len() >= expected.len());
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            unpublished(&pool).await,
            0,
            "{point:?}: all marked after restart"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn broker_outage_of_five_seconds_delays_but_loses_nothing(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let (stop, task) = spawn(relay(&pool, &bus, &proxy.amqp_url(), fast_config()));

    let subjects: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let mut expected = append_events(&pool, &subjects, 2).await;
    tap.collect(expected.len(), Duration::from_secs(5)).await;
    proxy.cut();
    let during = tokio::spawn({
        let (pool, subjects) = (pool.clone(), subjects.clone());
        async move {
            let mut out = Vec::new();
            for _ in 0..5 {
                out.extend(append_events(&pool, &subjects, 1).await);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            out
        }
    });
    let appended_during = during.await.unwrap();
    assert!(
        unpublished(&pool).await > 0,
        "events wait while the broker is away"
    );
    proxy.restore();
    expected.extend(appended_during);

    let mut tapped = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while unpublished(&pool).await > 0 && tokio::time::Instant::now() < deadline {
        tapped.extend(tap.collect(usize::MAX, Duration::from_millis(300)).await);
    }
    tapped.extend(tap.collect(usize::MAX, Duration::from_millis(500)).await);
    assert_eq!(unpublished(&pool).await, 0, "relay resumed by itself");
    let after: Vec<Envelope> = expected
        .iter()
        .filter(|e| e.sequence > 2)
        .cloned()
        .collect();
    for e in &after {
        assert!(tapped.iter().any(|t| t.event.id == e.id), "{} lost", e.id);
    }
    stop.cancel();
    task.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn database_outage_of_five_seconds_delays_but_loses_nothing(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    // The relay reaches the database only through the proxy; the
    // application keeps appending on its own connections.
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(
            (*pool.connect_options())
                .clone()
                .host("127.0.0.1")
                .port(proxy.addr.port()),
        )
        .await
        .unwrap();
    let r = Relay::new(
        Outbox::new(SERVICE).unwrap(),
        relay_pool,
        amqp_url(),
        bus.topology.clone(),
        fast_config(),
    );
    let (stop, task) = spawn(r);

    let subjects: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let mut expected = append_events(&pool, &subjects, 1).await;
    tap.collect(expected.len(), Duration::from_secs(5)).await;
    proxy.cut();
    for _ in 0..5 {
        expected.extend(append_events(&pool, &subjects, 1).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    proxy.restore();
    // Duplicates are possible here: a cut between confirm and mark makes
    // the relay publish that batch again; consumers' inboxes absorb them.
    let want: Vec<Uuid> = expected
        .iter()
        .filter(|e| e.sequence > 1)
        .map(|e| e.id)
        .collect();
    let tapped = tap.collect_until_seen(&want, Duration::from_secs(30)).await;
    for e in expected.iter().filter(|e| e.sequence > 1) {
        assert!(tapped.iter().any(|t| t.event.id == e.id), "{} lost", e.id);
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(unpublished(&pool).await, 0);
}

#[sqlx::test(migrations = false)]
async fn two_relays_only_one_publishes_and_the_standby_takes_over(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let a = relay(&pool, &bus, &amqp_url(), fast_config());
    let b = relay(&pool, &bus, &amqp_url(), fast_config());
    let (a_stats, b_stats) = (a.stats(), b.stats());
    let (_stop_a, task_a) = spawn(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (stop_b, task_b) = spawn(b);

    let subjects: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let mut expected = append_events(&pool, &subjects, 3).await;
    let tapped = tap
        .collect(expected.len() + 1, Duration::from_secs(2))
        .await;
    assert_eq!(
        tapped.len(),
        expected.len(),
        "one active relay: no duplicates"
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert!(a_stats.active.load(Relaxed) && !b_stats.active.load(Relaxed));
    assert_eq!(b_stats.published.load(Relaxed), 0);

    // Kill the active one: its task and connections vanish mid-flight.
    task_a.abort();
    let _ = task_a.await;
    let more = append_events(&pool, &subjects, 2).await;
    expected.extend(more.iter().cloned());
    let mut after = tap.collect(more.len(), Duration::from_secs(10)).await;
    assert_eq!(after.len(), more.len());
    assert!(b_stats.active.load(Relaxed), "standby became active");
    let mut all = tapped;
    all.append(&mut after);
    assert_complete_and_ordered(&all, &expected);
    stop_b.cancel();
    task_b.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn unroutable_event_is_not_marked_and_later_events_of_its_subject_wait(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await; // no queue bound: every publish is returned
    let subject = Uuid::now_v7();
    append_events(&pool, &[subject], 2).await;
    let r = relay(&pool, &bus, &amqp_url(), fast_config());
    let mut leader = pool.acquire().await.unwrap().detach();
    let conn = transport::connect(&amqp_url(), "relay").await.unwrap();
    let ch = transport::Publisher::open(&conn).await.unwrap();
    let outcome = r.publish_batch(&mut leader, &ch).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Published {
            marked: 0,
            failed: 2,
            full: false
        }
    );
    assert_eq!(unpublished(&pool).await, 2);

    // Once something listens, the same rows go out, in order.
    let mut tap = bus.wiretap("customer.*").await;
    let outcome = r.publish_batch(&mut leader, &ch).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Published {
            marked: 2,
            failed: 0,
            full: false
        }
    );
    let tapped = tap.collect(2, Duration::from_secs(5)).await;
    let seqs: Vec<i64> = tapped.iter().map(|t| t.event.sequence).collect();
    assert_eq!(seqs, vec![1, 2]);
}

#[sqlx::test(migrations = false)]
async fn retention_prunes_old_published_rows_and_backlog_reports_the_rest(pool: PgPool) {
    install(&pool).await;
    let outbox = Outbox::new(SERVICE).unwrap();
    append_events(&pool, &[Uuid::now_v7(), Uuid::now_v7()], 3).await;
    let b = outbox.backlog(&pool).await.unwrap();
    assert_eq!(b.unpublished, 6);
    assert!(b.oldest_age_s.unwrap() >= 0.0);
    sqlx::query(
        "UPDATE customers.outbox SET published_at = now() - interval '2 hours' WHERE sequence <= 2",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE customers.outbox SET published_at = now() WHERE sequence = 3")
        .execute(&pool)
        .await
        .unwrap();
    let pruned = outbox
        .prune_published(&pool, Duration::from_secs(3600), 1)
        .await
        .unwrap();
    assert_eq!(pruned, 4, "old rows go in batches of 1; fresh ones stay");
    let b = outbox.backlog(&pool).await.unwrap();
    assert_eq!((b.unpublished, b.published), (0, 2));
    assert_eq!(b.oldest_age_s, None);
}

/// By default a confirmed row leaves the outbox at once; with a retention
/// it stays, marked, for inspection. Both only after the broker confirmed.
#[sqlx::test(migrations = false)]
async fn confirmed_rows_are_deleted_by_default_and_kept_marked_with_a_retention(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    assert!(RelayConfig::default().retention.is_zero());

    let first = append_events(&pool, &[Uuid::now_v7()], 3).await;
    let mut leader = pool.acquire().await.unwrap().detach();
    let conn = transport::connect(&amqp_url(), "relay test").await.unwrap();
    let ch = transport::Publisher::open(&conn).await.unwrap();
    let deleting = relay(&pool, &bus, &amqp_url(), fast_config());
    let outcome = deleting.publish_batch(&mut leader, &ch).await.unwrap();
    assert!(matches!(
        outcome,
        BatchOutcome::Published {
            marked: 3,
            failed: 0,
            ..
        }
    ));
    assert_eq!(
        tap.collect(3, Duration::from_secs(5)).await.len(),
        first.len()
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM customers.outbox").await,
        0,
        "deleted once confirmed"
    );

    let second = append_events(&pool, &[Uuid::now_v7()], 2).await;
    let keeping = relay(
        &pool,
        &bus,
        &amqp_url(),
        RelayConfig {
            retention: Duration::from_secs(3600),
            ..fast_config()
        },
    );
    let outcome = keeping.publish_batch(&mut leader, &ch).await.unwrap();
    assert!(matches!(
        outcome,
        BatchOutcome::Published {
            marked: 2,
            failed: 0,
            ..
        }
    ));
    assert_eq!(
        tap.collect(2, Duration::from_secs(5)).await.len(),
        second.len()
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM customers.outbox WHERE published_at IS NOT NULL"
        )
        .await,
        2,
        "kept and marked"
    );
    assert_eq!(unpublished(&pool).await, 0);
    let _ = conn.close(200, "done".into()).await;
}

/// The running relay, with several small batches in flight at once: while
/// each subject's first event is unroutable, none of the subject's later
/// events is marked, even though they are routable and confirmed. Once the
/// first becomes routable, the last round that publishes it carries the
/// rest after it, in order, and everything ends marked.
#[sqlx::test(migrations = false)]
async fn pipelined_relay_holds_a_subject_back_behind_its_unroutable_event(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let _updates_only = bus.wiretap("customer.updated").await;
    let subjects: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let expected = append_events(&pool, &subjects, 4).await;
    let config = RelayConfig {
        batch_size: 2,
        batches_in_flight: 3,
        ..fast_config()
    };
    let r = relay(&pool, &bus, &amqp_url(), config);
    let stats = r.stats();
    let (stop, task) = spawn(r);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.failed.load(std::sync::atomic::Ordering::Relaxed) < 2 * expected.len() as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay kept retrying"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        unpublished(&pool).await,
        expected.len() as i64,
        "nothing marked while each subject's first event is unroutable"
    );

    let mut tap = bus.wiretap("#").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while unpublished(&pool).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tapped = tap.collect(usize::MAX, Duration::from_millis(700)).await;
    for s in &subjects {
        let seqs: Vec<i64> = tapped
            .iter()
            .filter(|t| t.event.subject == s.to_string())
            .map(|t| t.event.sequence)
            .collect();
        let last_first = seqs
            .iter()
            .rposition(|&q| q == 1)
            .unwrap_or_else(|| panic!("subject {s}: sequence 1 never published: {seqs:?}"));
        assert_eq!(
            &seqs[last_first..],
            &[1, 2, 3, 4],
            "subject {s}: the final round is in order: {seqs:?}"
        );
    }
    stop.cancel();
    task.await.unwrap();
}

/// Under a trickle the relay claims after every batch, and that claim
/// settles the batch before it (one statement): each event still reaches
/// the bus exactly once, and its row ends deleted, or marked when kept,
/// by the time the relay counts it published.
#[sqlx::test(migrations = false)]
async fn a_trickle_is_published_once_each_and_settled_by_the_next_claim(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let outbox = Outbox::new(SERVICE).unwrap();
    for (retention, kept) in [(Duration::ZERO, 0), (Duration::from_secs(3600), 40)] {
        let r = relay(
            &pool,
            &bus,
            &amqp_url(),
            RelayConfig {
                retention,
                ..fast_config()
            },
        );
        let stats = r.stats();
        let (stop, task) = spawn(r);
        let mut ids = Vec::new();
        for n in 0..40 {
            let mut tx = pool.begin().await.unwrap();
            let e = outbox
                .append(&mut tx, registered(Uuid::now_v7(), n))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            ids.push(e.id);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let mut tapped = tap.collect_until_seen(&ids, Duration::from_secs(10)).await;
        // Any copy of a settled row would follow within a batch or two.
        tapped.extend(tap.collect(40, Duration::from_millis(500)).await);
        let mut times: HashMap<Uuid, usize> = HashMap::new();
        for t in &tapped {
            *times.entry(t.event.id).or_default() += 1;
        }
        assert!(
            ids.iter().all(|id| times.get(id) == Some(&1)),
            "retention {retention:?}: each event once on the bus, got {:?}",
            ids.iter()
                .map(|id| times.get(id).copied().unwrap_or(0))
                .collect::<Vec<_>>()
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.published.load(std::sync::atomic::Ordering::Relaxed) < 40 {
            assert!(tokio::time::Instant::now() < deadline, "counted published");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            count(&pool, "SELECT count(*) FROM customers.outbox").await,
            kept,
            "retention {retention:?}: rows left once counted published"
        );
        assert_eq!(unpublished(&pool).await, 0, "retention {retention:?}");
        stop.cancel();
        task.await.unwrap();
    }
}

/// The relay counts every batch it has the confirms of, the events in it
/// and the wait for them: `warren bench` and `/metrics` report the broker's
/// share of an event's trip from these.
#[sqlx::test(migrations = false)]
async fn the_relay_counts_confirmed_batches_their_events_and_their_wait(pool: PgPool) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let r = relay(&pool, &bus, &amqp_url(), fast_config());
    let stats = r.stats();
    assert_eq!(stats.confirms(), Confirms::default());
    assert_eq!(stats.confirms().mean_wait(), None);
    assert_eq!(stats.confirms().events_per_batch(), None);
    let (stop, task) = spawn(r);

    let confirmed_events = |n: u64| {
        let stats = stats.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while stats.confirms().events < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{n} events confirmed"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let subjects: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let first = append_events(&pool, &subjects, 4).await;
    let ids: Vec<Uuid> = first.iter().map(|e| e.id).collect();
    tap.collect_until_seen(&ids, Duration::from_secs(10)).await;
    confirmed_events(20).await;
    let after_first = stats.confirms();
    assert_eq!(after_first.events, 20, "{after_first:?}");
    assert!((1..=20).contains(&after_first.batches), "{after_first:?}");
    assert!(
        after_first.wait_us > 0,
        "a real broker's confirm takes time"
    );

    // One more event, alone: one batch of one, and the difference of two
    // readings describes exactly it.
    let one = append_events(&pool, &[Uuid::now_v7()], 1).await;
    tap.collect_until_seen(&[one[0].id], Duration::from_secs(10))
        .await;
    confirmed_events(21).await;
    let it = stats.confirms().since(after_first);
    assert_eq!((it.batches, it.events), (1, 1), "{it:?}");
    assert_eq!(it.events_per_batch(), Some(1.0));
    let wait = it.mean_wait().unwrap();
    assert!(
        wait > Duration::ZERO && wait < RelayConfig::default().confirm_timeout,
        "{wait:?}"
    );
    stop.cancel();
    task.await.unwrap();
}

/// Events of `tapped` per subject, in the order they came.
fn sequences_by_subject(tapped: &[Tapped]) -> HashMap<String, Vec<i64>> {
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for t in tapped {
        out.entry(t.event.subject.clone())
            .or_default()
            .push(t.event.sequence);
    }
    out
}

/// A queue bound to the events exchange that is full and refuses more
/// (`x-max-length`, `x-overflow: reject-publish`) makes RabbitMQ nack
/// every publish routed to it. The relay keeps each nacked row (and the
/// rows of its subject behind it) and publishes them, in subject order,
/// once the queue takes messages again.
#[sqlx::test(migrations = false)]
async fn nacked_events_stay_in_the_outbox_and_go_out_in_order_once_the_queue_takes_them(
    pool: PgPool,
) {
    install(&pool).await;
    let bus = TestBus::new().await;
    let blocker =
        testkit::Blocker::new(&bus, &format!("{}.full", bus.namespace), Some("customer.*")).await;
    let subjects: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let expected = append_events(&pool, &subjects, 3).await;
    let r = relay(&pool, &bus, &amqp_url(), fast_config());
    let stats = r.stats();
    let (stop, task) = spawn(r);

    // Every row nacked at least once, and none of them settled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stats.failed.load(std::sync::atomic::Ordering::Relaxed) < expected.len() as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay saw no nacks: {} failed",
            stats.failed.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM customers.outbox").await,
        expected.len() as i64,
        "every nacked row is still in the outbox"
    );
    assert_eq!(
        stats.published.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // The queue takes messages again: everything goes out, and the queue
    // that refused them gets each subject's events in order.
    let mut taken = blocker.release().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(&pool, "SELECT count(*) FROM customers.outbox").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never published the nacked rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A row acked in the moment between the purge and the consumer while
    // an earlier one of its subject was nacked again is sent once more
    // after it: the last round of each subject is complete and in order.
    let tapped = taken.collect(usize::MAX, Duration::from_secs(2)).await;
    let by_subject = sequences_by_subject(&tapped);
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
    stop.cancel();
    task.await.unwrap();
    drop(taken);
    bus.channel
        .queue_delete(format!("{}.full", bus.namespace).into(), Default::default())
        .await
        .unwrap();
}
