//! Ordered partitions against the real RabbitMQ and PostgreSQL: three
//! processes of one service share its partitions, one of them dies
//! midway, and still every subject is applied in order, with nothing
//! deferred, lost or doubled.
//!
//! The three "processes" are three subscriptions in this process, each
//! with its own broker connection and database pool. The one that dies
//! reaches both servers through proxies of its own (`testkit::Proxy`):
//! its death is both proxies cut at once and its task aborted, so the
//! broker sees its connection close (and puts back what it had not
//! acknowledged) and PostgreSQL sees its sessions end (its partition
//! locks go), as when a process is killed.
//!
//! Needs the broker's `rabbitmq_consistent_hash_exchange` plugin
//! (`.ci/run` enables it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use events::Envelope;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use testkit::sample::{OrderLine, OrderPlaced};
use testkit::{amqp_url, Proxy, TestBus};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use transport::{event_properties, Outgoing, Publisher, Topology};
use uuid::Uuid;
use warren_consumers::{
    Batch, HandleBatch, HandleError, Outcome, RetryPolicy, Router, Stats, Subscription,
    SubscriptionConfig,
};

const SERVICE: &str = "ledger";
const PARTITIONS: u16 = 6;
const SUBJECTS: usize = 200;
const PER_SUBJECT: i64 = 50;
const EVENTS: usize = SUBJECTS * PER_SUBJECT as usize;

/// A handler's pause per event in the tests that need the stream to
/// last: about 400 events a second per process, so that processes can
/// join and hand partitions over while it flows.
const PAUSE: Duration = Duration::from_millis(5);

/// Records each event with its subject and sequence; `n` (a sequence of
/// the table's) gives the order the rows were applied in. `pause` per
/// event slows a handler down, so that a stream lasts long enough for a
/// test to change hands under it.
#[derive(Default)]
struct Ledger {
    pause: Duration,
}

#[async_trait::async_trait]
impl HandleBatch<OrderPlaced> for Ledger {
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<(&Envelope, OrderPlaced)>,
    ) -> Result<(), HandleError> {
        let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.id).collect();
        let subjects: Vec<String> = events.iter().map(|(e, _)| e.subject.clone()).collect();
        let seqs: Vec<i64> = events.iter().map(|(e, _)| e.sequence).collect();
        tokio::time::sleep(self.pause * events.len() as u32).await;
        // One statement, rows numbered in the order given (the run is in
        // per-subject order).
        sqlx::query(
            "INSERT INTO ledger.applied (event_id, subject, seq) \
             SELECT i, s, q FROM unnest($1::uuid[], $2::text[], $3::bigint[]) WITH ORDINALITY AS t(i, s, q, o) \
             ORDER BY o",
        )
        .bind(&ids)
        .bind(&subjects)
        .bind(&seqs)
        .execute(&mut *batch.tx)
        .await?;
        Ok(())
    }
}

fn config() -> SubscriptionConfig {
    SubscriptionConfig {
        partitions: PARTITIONS,
        prefetch: 64,
        lanes: 2,
        retry: RetryPolicy {
            defer_delay: Duration::from_millis(100),
            ..Default::default()
        },
        live_feed: false,
        ..Default::default()
    }
}

/// The test namespace's topology, with the same `x-expires` as `TestBus`.
fn topology(namespace: &str) -> Topology {
    let mut t = Topology::new(namespace);
    t.expires = Some(Duration::from_secs(600));
    t
}

fn subscription(pool: PgPool, amqp: String, namespace: &str) -> Subscription {
    slow_subscription(pool, amqp, namespace, Duration::ZERO)
}

fn slow_subscription(pool: PgPool, amqp: String, namespace: &str, pause: Duration) -> Subscription {
    let router = Router::new(SERVICE).on_batch::<OrderPlaced, _>(Ledger { pause });
    Subscription::new(
        router,
        testkit::sample::catalog(),
        pool,
        amqp,
        topology(namespace),
        config(),
    )
    .unwrap()
}

/// A running subscription: its counters and the task to abort.
struct Process {
    stats: Arc<Stats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A process on slowed handlers (see [`PAUSE`]), reaching both servers
/// directly.
fn slow_process(pool: &PgPool, namespace: &str) -> Process {
    let options = (*pool.connect_options()).clone();
    start(slow_subscription(
        own_pool(options),
        amqp_url(),
        namespace,
        PAUSE,
    ))
}

/// Two slowed processes, once they hold three partitions each.
async fn two_slow_members(pool: &PgPool, namespace: &str) -> [Process; 2] {
    let members = [slow_process(pool, namespace), slow_process(pool, namespace)];
    wait_for(
        "two members with three partitions each",
        Duration::from_secs(30),
        async || holders(pool).await == vec![3, 3],
    )
    .await;
    members
}

fn start(sub: Subscription) -> Process {
    let stop = CancellationToken::new();
    let stats = sub.stats();
    let s = stop.clone();
    let task = tokio::spawn(async move { sub.run(s).await });
    Process { stats, stop, task }
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Partition locks held, per database session (see `consumers::partitions`).
async fn holders(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND classid::bigint >= $1 AND classid::bigint < $1 + 65536 \
         GROUP BY pid ORDER BY pid",
    )
    .bind(i64::from(warren_consumers::partitions::PARTITION_LOCK_BASE))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The events: `PER_SUBJECT` per subject, sequences from 1, published
/// round-robin over the subjects (sequence 1 of every subject, then 2, …).
fn events() -> Vec<Envelope> {
    let subjects: Vec<Uuid> = (0..SUBJECTS).map(|_| Uuid::now_v7()).collect();
    let mut out = Vec::with_capacity(EVENTS);
    for seq in 1..=PER_SUBJECT {
        for s in &subjects {
            let mut e = Envelope::new(
                "orders",
                s.to_string(),
                &OrderPlaced {
                    order_id: *s,
                    customer_id: *s,
                    lines: vec![OrderLine {
                        sku: "SKU-1".into(),
                        qty: 1,
                        unit_price: 100,
                    }],
                    total: 100,
                    payment_token: "tok_ok".into(),
                },
            );
            e.sequence = seq;
            out.push(e);
        }
    }
    out
}

/// Publishes as the relay does (with the subject header), with confirms.
async fn publish(bus: &TestBus, events: &[Envelope]) {
    let publisher = Publisher::open(&bus.conn).await.unwrap();
    let codec = testkit::sample::codec();
    let exchange = bus.topology.exchange();
    for chunk in events.chunks(500) {
        let bodies: Vec<Vec<u8>> = chunk.iter().map(|e| codec.encode(e)).collect();
        let messages = chunk.iter().zip(&bodies).map(|(e, body)| Outgoing {
            exchange: &exchange,
            routing_key: &e.event_type,
            body,
            properties: event_properties(
                &e.id.to_string(),
                &e.event_type,
                &e.subject,
                None,
                e.time.timestamp(),
                "orders",
            ),
        });
        for sent in publisher.send(messages).await {
            let confirm = sent.unwrap().await;
            assert_eq!(transport::confirm_problem(confirm), None);
        }
    }
}

/// The service's tables, the test's ledger, and a namespace whose
/// partitioned queues are removed afterwards.
async fn setup(pool: &PgPool) -> TestBus {
    producers::install::install(pool, SERVICE).await.unwrap();
    warren_consumers::install::install(pool, SERVICE)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE ledger.applied (n bigserial PRIMARY KEY, event_id uuid NOT NULL, \
         subject text NOT NULL, seq bigint NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
    let bus = TestBus::new().await;
    bus.remember_partitioned(SERVICE, PARTITIONS, &config().retry.delays());
    bus
}

/// A pool of its own, as a process has.
fn own_pool(options: sqlx::postgres::PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(config().lanes as u32 + 2)
        .connect_lazy_with(options)
}

/// Settled for good by a consumer.
fn settled(stats: &Stats) -> u64 {
    [Outcome::Handled, Outcome::Duplicate, Outcome::Skipped]
        .iter()
        .map(|o| stats.count(*o))
        .sum::<u64>()
}

/// Every event applied exactly once, each subject's in sequence order.
async fn assert_applied_once_in_order(pool: &PgPool) {
    assert_eq!(
        scalar(pool, "SELECT count(*) FROM ledger.applied").await,
        EVENTS as i64,
        "each event applied once"
    );
    assert_eq!(
        scalar(pool, "SELECT count(DISTINCT event_id) FROM ledger.applied").await,
        EVENTS as i64
    );
    // Each subject's sequences, in the order applied, are exactly
    // 1..=PER_SUBJECT.
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT subject, seq FROM ledger.applied ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut by_subject: HashMap<String, Vec<i64>> = HashMap::new();
    for (subject, seq) in rows {
        by_subject.entry(subject).or_default().push(seq);
    }
    assert_eq!(by_subject.len(), SUBJECTS);
    let in_order: Vec<i64> = (1..=PER_SUBJECT).collect();
    for (subject, seqs) in &by_subject {
        assert_eq!(seqs, &in_order, "subject {subject} applied out of order");
    }
}

/// Nothing deferred for coming early, nothing retried or dead-lettered.
fn assert_nothing_deferred<'a>(processes: impl IntoIterator<Item = &'a Process>) {
    for p in processes {
        for o in [Outcome::Deferred, Outcome::Retried, Outcome::DeadLettered] {
            assert_eq!(p.stats.count(o), 0, "{o:?}");
        }
    }
}

async fn wait_all_applied(pool: &PgPool) {
    wait_for(
        "every event applied",
        Duration::from_secs(300),
        async || {
            scalar(pool, "SELECT count(DISTINCT event_id) FROM ledger.applied").await
                >= EVENTS as i64
        },
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn three_processes_share_partitions_and_one_dies_midway_without_reordering(pool: PgPool) {
    let bus = setup(&pool).await;
    let db = pool.connect_options();
    let amqp: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let broker = format!("{}:{}", amqp.authority.host, amqp.authority.port);
    let db_server = format!("{}:{}", db.get_host(), db.get_port());
    let (mq_proxy, db_proxy) = (Proxy::start(&broker).await, Proxy::start(&db_server).await);

    let survivors = [
        start(subscription(
            own_pool((*db).clone()),
            amqp_url(),
            &bus.namespace,
        )),
        start(subscription(
            own_pool((*db).clone()),
            amqp_url(),
            &bus.namespace,
        )),
    ];
    let victim = start(subscription(
        own_pool((*db).clone().host("127.0.0.1").port(db_proxy.addr.port())),
        mq_proxy.amqp_url(),
        &bus.namespace,
    ));

    // All three hold their share (two each) before any event comes, so
    // what follows is the steady state and the death, not the start.
    wait_for(
        "three members with two partitions each",
        Duration::from_secs(30),
        async || holders(&pool).await == vec![2, 2, 2],
    )
    .await;

    let events = events();
    let started = Instant::now();
    publish(&bus, &events).await;
    // Midway: a third of the events applied; the victim has taken part.
    wait_for(
        "a third of the events",
        Duration::from_secs(120),
        async || scalar(&pool, "SELECT count(*) FROM ledger.applied").await >= (EVENTS / 3) as i64,
    )
    .await;
    assert!(settled(&victim.stats) > 0, "the victim consumed its share");
    mq_proxy.cut();
    db_proxy.cut();
    victim.task.abort();
    let killed_at = Instant::now();

    // Its partitions go to the two others.
    wait_for(
        "two members with three partitions each",
        Duration::from_secs(30),
        async || holders(&pool).await == vec![3, 3],
    )
    .await;
    let handed_over = killed_at.elapsed();
    wait_for(
        "every event applied",
        Duration::from_secs(300),
        async || {
            scalar(&pool, "SELECT count(DISTINCT event_id) FROM ledger.applied").await
                >= EVENTS as i64
        },
    )
    .await;
    let drained = started.elapsed();

    // 0 lost, 0 doubled, each subject in order, 0 deferred.
    assert_applied_once_in_order(&pool).await;
    assert_nothing_deferred(survivors.iter().chain([&victim]));
    let (dups, handled): (u64, u64) = survivors
        .iter()
        .chain([&victim])
        .map(|p| (p.stats.count(Outcome::Duplicate), settled(&p.stats)))
        .fold((0, 0), |(d, s), (d1, s1)| (d + d1, s + s1));
    eprintln!(
        "partitions: {EVENTS} events over {SUBJECTS} subjects in {drained:?}; \
         partitions handed over {handed_over:?} after the kill; \
         {dups} redelivered duplicate(s) absorbed; {handled} settled in all"
    );

    for p in survivors {
        p.stop.cancel();
        p.task.await.unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn a_process_that_joins_midway_takes_its_share_without_reordering(pool: PgPool) {
    let bus = setup(&pool).await;
    let first = two_slow_members(&pool, &bus.namespace).await;
    publish(&bus, &events()).await;
    wait_for(
        "a third of the events",
        Duration::from_secs(120),
        async || scalar(&pool, "SELECT count(*) FROM ledger.applied").await >= (EVENTS / 3) as i64,
    )
    .await;
    // The newcomer: the two hand one partition each over, mid-stream
    // (slowed handlers keep the stream flowing for seconds more; at full
    // speed the first two could finish it before the hand-over, and the
    // newcomer would have nothing to take part in).
    let joined = slow_process(&pool, &bus.namespace);
    wait_for(
        "three members with two partitions each",
        Duration::from_secs(30),
        async || holders(&pool).await == vec![2, 2, 2],
    )
    .await;
    wait_all_applied(&pool).await;
    assert_applied_once_in_order(&pool).await;
    assert_nothing_deferred(first.iter().chain([&joined]));
    // A hand-over settles what was sent before the lock goes: nothing
    // comes twice.
    let dups: u64 = first
        .iter()
        .chain([&joined])
        .map(|p| p.stats.count(Outcome::Duplicate))
        .sum();
    assert_eq!(dups, 0, "no redelivery on a clean hand-over");
    assert!(settled(&joined.stats) > 0, "the newcomer took part");
    for p in first.into_iter().chain([joined]) {
        p.stop.cancel();
        p.task.await.unwrap();
    }
}

/// Hand-overs while deliveries are on their way: a third process joins
/// and stops cleanly, again and again, while the others drain the
/// stream, so partitions change hands many times with prefetched
/// deliveries in flight. Each hand-over must give the partition's undone
/// deliveries back ahead of the rest (a `basic.cancel` first let the next
/// owner get a later event of a subject before one the broker was still
/// handing back: a deferral).
#[sqlx::test(migrations = false)]
async fn partitions_handed_over_again_and_again_mid_stream_keep_order(pool: PgPool) {
    let bus = setup(&pool).await;
    let steady = two_slow_members(&pool, &bus.namespace).await;
    publish(&bus, &events()).await;
    let mut hand_overs = 0;
    let mut churned = Vec::new();
    while scalar(&pool, "SELECT count(*) FROM ledger.applied").await < (EVENTS * 9 / 10) as i64 {
        let visitor = slow_process(&pool, &bus.namespace);
        wait_for(
            "the visitor holding its share",
            Duration::from_secs(30),
            async || holders(&pool).await == vec![2, 2, 2],
        )
        .await;
        visitor.stop.cancel();
        visitor.task.await.unwrap();
        hand_overs += 4;
        churned.push(visitor.stats);
    }
    wait_all_applied(&pool).await;
    assert_applied_once_in_order(&pool).await;
    for p in &steady {
        for o in [Outcome::Deferred, Outcome::Retried, Outcome::DeadLettered] {
            assert_eq!(p.stats.count(o), 0, "{o:?}");
        }
    }
    for stats in &churned {
        for o in [Outcome::Deferred, Outcome::Retried, Outcome::DeadLettered] {
            assert_eq!(stats.count(o), 0, "{o:?}");
        }
    }
    // At least one whole join and leave mid-stream (24–64 hand-overs on
    // a quiet machine; fewer when a loaded one slows the churn down).
    assert!(hand_overs >= 4, "only {hand_overs} hand-overs happened");
    eprintln!("partitions: {hand_overs} hand-overs mid-stream, nothing deferred");
    for p in steady {
        p.stop.cancel();
        p.task.await.unwrap();
    }
}

/// Messages ready in a queue.
async fn ready(bus: &TestBus, queue: &str) -> u32 {
    bus.channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

#[tokio::test]
async fn a_retried_event_comes_back_to_its_subjects_partition() {
    let bus = TestBus::new().await;
    let delays = config().retry.delays();
    bus.topology
        .declare_partitioned_service(&bus.conn, SERVICE, &["order.placed"], &delays, PARTITIONS)
        .await
        .unwrap();
    bus.remember_partitioned(SERVICE, PARTITIONS, &delays);
    let queues: Vec<String> = (0..PARTITIONS)
        .map(|i| bus.topology.partition_queue(SERVICE, i))
        .collect();

    // Published as the relay does: it lands in exactly one partition.
    let event = &events()[0];
    publish(&bus, std::slice::from_ref(event)).await;
    let mut home = None;
    wait_for(
        "the event in a partition",
        Duration::from_secs(10),
        async || {
            let mut found = Vec::new();
            for (i, q) in queues.iter().enumerate() {
                if ready(&bus, q).await > 0 {
                    found.push(i);
                }
            }
            home = (found.len() == 1).then(|| found[0]);
            home.is_some()
        },
    )
    .await;
    let home = home.unwrap();

    // The consumer's forwarder defers it (the shortest retry queue);
    // when the delay runs out it comes back to the same partition.
    // A consumer of its own (basic.get is refused on a queue with a
    // single active consumer).
    let ch = bus.conn.create_channel().await.unwrap();
    ch.basic_qos(1, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queues[home].as_str().into(),
            "test".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let taken = futures::StreamExt::next(&mut consumer)
        .await
        .expect("the event")
        .unwrap();
    let publisher = Publisher::open(&bus.conn).await.unwrap();
    let forwarder = warren_consumers::deadletter::Forwarder::new(
        publisher,
        bus.topology.clone(),
        SERVICE,
        Duration::from_secs(10),
    )
    .partitioned(true);
    forwarder
        .retry(
            &taken,
            delays[0],
            warren_consumers::deadletter::H_DEFERRALS,
            1,
        )
        .await
        .unwrap();
    taken
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .unwrap();
    ch.close(200, "taken".into()).await.unwrap();
    wait_for(
        "the copy back in its partition",
        Duration::from_secs(10),
        async || ready(&bus, &queues[home]).await == 1,
    )
    .await;
    for (i, q) in queues.iter().enumerate() {
        if i != home {
            assert_eq!(ready(&bus, q).await, 0, "{q} got nothing");
        }
    }
    assert_eq!(
        ready(
            &bus,
            &bus.topology.partition_retry_queue(SERVICE, delays[0])
        )
        .await,
        0
    );
}

/// What `declare_partitioned_service` reads as "the plugin is missing":
/// RabbitMQ answers an exchange type it does not know with reply code 503
/// (COMMAND_INVALID), which closes the connection.
#[tokio::test]
async fn an_unknown_exchange_type_is_refused_with_command_invalid() {
    let conn = transport::connect(&amqp_url(), "warren test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let refused = ch
        .exchange_declare(
            (format!("t{}.unknown", Uuid::now_v7().simple()))
                .as_str()
                .into(),
            lapin::ExchangeKind::Custom("x-no-such-type".into()),
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect_err("an unknown exchange type");
    match refused.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => assert_eq!(amqp.get_id(), 503, "{amqp}"),
        other => panic!("another error: {other:?}"),
    }
}
