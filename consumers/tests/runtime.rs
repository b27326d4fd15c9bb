//! The subscription runtime against the real RabbitMQ and PostgreSQL:
//! idempotency, retries, dead letters, bad input, order, shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use events::Envelope;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use testkit::sample::{OrderCancelled, OrderLine, OrderPlaced, ShipmentDispatched};
use testkit::{amqp_url, Proxy, TestBus};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_consumers::deadletter::{
    H_ATTEMPT, H_DEAD_LETTERED_AT, H_ERROR, H_REASON, H_ROUTING_KEY, H_SERVICE,
};
use warren_consumers::{
    Batch, Context, Handle, HandleBatch, HandleError, Outcome, RetryPolicy, Router, Subscription,
    SubscriptionConfig,
};

const SERVICE: &str = "shipping";

/// Records every applied event in a table of the service's schema; fails
/// on demand: `fail_first[n]` transient failures per event id, or always.
#[derive(Clone, Default)]
struct Recorder {
    fail_transient: Arc<Mutex<HashMap<Uuid, u32>>>,
    always: Arc<Mutex<Option<HandleErrorKind>>>,
    delay: Option<Duration>,
    /// Handler calls begun, so a test can act while one is in flight.
    entered: Arc<std::sync::atomic::AtomicU32>,
}

#[derive(Clone, Copy)]
enum HandleErrorKind {
    Transient,
    Permanent,
}

#[async_trait::async_trait]
impl Handle<OrderPlaced> for Recorder {
    async fn handle(&self, ctx: &mut Context<'_>, data: OrderPlaced) -> Result<(), HandleError> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        match *self.always.lock().unwrap() {
            Some(HandleErrorKind::Transient) => return Err(HandleError::transient("gateway down")),
            Some(HandleErrorKind::Permanent) => {
                return Err(HandleError::permanent("order is unshippable"))
            }
            None => {}
        }
        if let Some(left) = self.fail_transient.lock().unwrap().get_mut(&ctx.event.id) {
            if *left > 0 {
                *left -= 1;
                return Err(HandleError::transient("flaky"));
            }
        }
        sqlx::query("INSERT INTO shipping.effects (event_id, subject, sequence, total) VALUES ($1, $2, $3, $4)")
            .bind(ctx.event.id)
            .bind(&ctx.event.subject)
            .bind(ctx.event.sequence)
            .bind(data.total)
            .execute(&mut *ctx.tx)
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handle<OrderCancelled> for Recorder {
    async fn handle(&self, ctx: &mut Context<'_>, data: OrderCancelled) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO shipping.effects (event_id, subject, sequence, total) VALUES ($1, $2, $3, 0)")
            .bind(ctx.event.id)
            .bind(&ctx.event.subject)
            .bind(ctx.event.sequence)
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
        prefetch: 16,
        lanes: 4,
        retry: RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            defer_delay: Duration::from_millis(100),
            max_deferrals: 20,
        },
        max_body: 4096,
        ..Default::default()
    }
}

struct Fixture {
    bus: TestBus,
    pool: PgPool,
    sub: Subscription,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn start(pool: PgPool, recorder: Recorder, url: Option<String>) -> Fixture {
    start_with(pool, recorder, url, config()).await
}

fn router(recorder: Recorder) -> Router {
    Router::new(SERVICE)
        .on::<OrderPlaced, _>(recorder.clone())
        .on::<OrderCancelled, _>(recorder)
}

async fn start_with(
    pool: PgPool,
    recorder: Recorder,
    url: Option<String>,
    cfg: SubscriptionConfig,
) -> Fixture {
    start_routed(pool, router(recorder), url, cfg).await
}

async fn start_routed(
    pool: PgPool,
    router: Router,
    url: Option<String>,
    cfg: SubscriptionConfig,
) -> Fixture {
    sqlx::query("CREATE TABLE shipping.effects (n bigserial PRIMARY KEY, event_id uuid NOT NULL, subject text NOT NULL, sequence bigint NOT NULL, total bigint NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let bus = TestBus::new().await;
    let sub = Subscription::new(
        router,
        testkit::sample::catalog(),
        pool.clone(),
        url.unwrap_or_else(amqp_url),
        bus.topology.clone(),
        cfg.clone(),
    )
    .unwrap();
    sub.declare(&bus.conn).await.unwrap();
    bus.remember(SERVICE, &cfg.retry.delays());
    let stop = CancellationToken::new();
    let (s, t) = (sub.clone(), stop.clone());
    let task = tokio::spawn(async move { s.run(t).await });
    Fixture {
        bus,
        pool,
        sub,
        stop,
        task: Some(task),
    }
}

impl Fixture {
    async fn publish_raw(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        self.bus
            .channel
            .basic_publish(
                self.bus.topology.exchange().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
    }

    async fn publish(&self, e: &Envelope) {
        let props = BasicProperties::default()
            .with_content_type(events::CONTENT_TYPE_STRUCTURED.into())
            .with_delivery_mode(2);
        self.publish_raw(&e.event_type, &testkit::sample::codec().encode(e), props)
            .await;
    }

    /// Waits until `n` outcomes of any kind `kinds` were counted.
    async fn wait_for(&self, kinds: &[Outcome], n: u64) {
        let stats = self.sub.stats();
        for _ in 0..200 {
            if kinds.iter().map(|k| stats.count(*k)).sum::<u64>() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {n} of {kinds:?}: {:?}",
            stats.snapshot().by_outcome
        );
    }

    async fn effects(&self) -> Vec<(Uuid, String, i64)> {
        sqlx::query_as("SELECT event_id, subject, sequence FROM shipping.effects ORDER BY n")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    async fn dead_letters(&self) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        while let Some(m) = self
            .bus
            .channel
            .basic_get(
                self.bus.topology.dlq(SERVICE).into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            out.push(m);
        }
        out
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// Stops the consumer and starts a new session of the same subscription.
    async fn restart(&mut self) {
        self.stop().await;
        self.stop = CancellationToken::new();
        let (s, t) = (self.sub.clone(), self.stop.clone());
        self.task = Some(tokio::spawn(async move { s.run(t).await }));
    }

    /// The service's queue as the broker reports it (passive declare).
    async fn queue_state(&self) -> lapin::Queue {
        self.bus
            .channel
            .queue_declare(
                self.bus.topology.queue(SERVICE).into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// Messages ready in the service's queue (unacknowledged ones count
    /// again once their consumer's channel is closed).
    async fn messages_ready(&self) -> u32 {
        self.queue_state().await.message_count()
    }

    /// Consumers attached to the service's queue.
    async fn consumers_attached(&self) -> u32 {
        self.queue_state().await.consumer_count()
    }
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn placed(order: Uuid, seq: i64) -> Envelope {
    let data = OrderPlaced {
        order_id: order,
        customer_id: Uuid::now_v7(),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            qty: 1,
            unit_price: 500,
        }],
        total: 500,
        payment_token: "tok_ok".into(),
    };
    let mut e = Envelope::new("orders", order.to_string(), &data);
    e.sequence = seq;
    e
}

fn cancelled(order: Uuid, seq: i64) -> Envelope {
    let mut e = Envelope::new(
        "orders",
        order.to_string(),
        &OrderCancelled {
            order_id: order,
            reason: "test".into(),
        },
    );
    e.sequence = seq;
    e
}

fn header(m: &lapin::message::BasicGetMessage, name: &str) -> String {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get(name)
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::LongInt(n)) => n.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

/// warren's outbox and inbox in the test's schema, by the library's installer.
async fn install(pool: &PgPool) {
    producers::install::install(pool, SERVICE).await.unwrap();
    warren_consumers::install::install(pool, SERVICE)
        .await
        .unwrap();
}

/// Three copies at once, most likely in one lane batch: the batch's own
/// duplicate check (see the sibling test below for copies arriving after
/// the first was committed).
#[sqlx::test(migrations = false)]
async fn same_event_three_times_at_once_changes_the_store_once(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let e = placed(Uuid::now_v7(), 1);
    for _ in 0..3 {
        f.publish(&e).await;
    }
    f.wait_for(&[Outcome::Handled, Outcome::Duplicate], 3).await;
    assert_eq!(f.effects().await.len(), 1);
    assert_eq!(f.sub.stats().count(Outcome::Handled), 1);
    assert_eq!(f.sub.stats().count(Outcome::Duplicate), 2);
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn redelivery_after_a_failed_ack_is_absorbed_by_the_inbox(pool: PgPool) {
    install(&pool).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let recorder = Recorder {
        delay: Some(Duration::from_millis(800)),
        ..Default::default()
    };
    let mut f = start(pool, recorder, Some(proxy.amqp_url())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = placed(Uuid::now_v7(), 1);
    f.publish(&e).await;
    // Cut the consumer's connection while the handler runs: the commit
    // succeeds, the ack cannot be sent, the broker redelivers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        f.effects().await.len(),
        1,
        "committed before the ack was lost"
    );
    proxy.restore();
    f.wait_for(&[Outcome::Duplicate], 1).await;
    assert_eq!(f.effects().await.len(), 1, "the redelivery changed nothing");
    f.stop().await;
}

/// `AMQP_URL` listing two nodes (here two proxies to the one broker):
/// when the node the consumer is on dies, its reconnect, which reads the
/// whole list again, lands on the other and the next event is handled.
#[sqlx::test(migrations = false)]
async fn a_consumer_whose_node_dies_reconnects_to_the_other_url_of_the_list(pool: PgPool) {
    install(&pool).await;
    let (a, b) = (
        Proxy::start("127.0.0.1:5672").await,
        Proxy::start("127.0.0.1:5672").await,
    );
    let list = format!("{},{}", a.amqp_url(), b.amqp_url());
    let mut f = start(pool, Recorder::default(), Some(list)).await;
    f.publish(&placed(Uuid::now_v7(), 1)).await;
    f.wait_for(&[Outcome::Handled], 1).await;
    let (on, other) = match (a.forwarded(), b.forwarded()) {
        (n, 0) if n > 0 => (&a, &b),
        (0, n) if n > 0 => (&b, &a),
        seen => panic!("the consumer should be on exactly one node: {seen:?}"),
    };
    // The node dies: its connections drop and it refuses new ones.
    on.cut();
    f.publish(&placed(Uuid::now_v7(), 1)).await;
    f.wait_for(&[Outcome::Handled], 2).await;
    assert!(other.forwarded() > 0, "reconnected through the other URL");
    assert_eq!(f.effects().await.len(), 2);
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn handler_failing_twice_is_applied_once_after_two_delayed_retries(pool: PgPool) {
    install(&pool).await;
    let recorder = Recorder::default();
    let e = placed(Uuid::now_v7(), 1);
    recorder.fail_transient.lock().unwrap().insert(e.id, 2);
    let mut f = start(pool, recorder, None).await;
    f.publish(&e).await;
    f.wait_for(&[Outcome::Handled], 1).await;
    assert_eq!(f.sub.stats().count(Outcome::Retried), 2);
    assert_eq!(f.effects().await.len(), 1);
    assert!(f.dead_letters().await.is_empty());
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn handler_always_failing_is_dead_lettered_after_the_limit_with_reason_headers(pool: PgPool) {
    install(&pool).await;
    let recorder = Recorder::default();
    *recorder.always.lock().unwrap() = Some(HandleErrorKind::Transient);
    let mut f = start(pool, recorder, None).await;
    let e = placed(Uuid::now_v7(), 1);
    f.publish(&e).await;
    f.wait_for(&[Outcome::DeadLettered], 1).await;
    assert_eq!(f.sub.stats().count(Outcome::Retried), 2, "max_attempts = 3");
    let dl = f.dead_letters().await;
    assert_eq!(dl.len(), 1);
    let m = &dl[0];
    assert_eq!(header(m, H_REASON), "retries_exhausted");
    assert!(header(m, H_ERROR).contains("gateway down"));
    assert_eq!(header(m, H_ATTEMPT), "3");
    assert_eq!(header(m, H_ROUTING_KEY), "order.placed");
    assert_eq!(header(m, H_SERVICE), SERVICE);
    assert!(chrono::DateTime::parse_from_rfc3339(&header(m, H_DEAD_LETTERED_AT)).is_ok());
    assert_eq!(
        testkit::sample::codec().decode(&m.delivery.data).unwrap(),
        e,
        "body kept"
    );
    assert!(f.effects().await.is_empty());
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn permanent_failure_is_dead_lettered_at_once(pool: PgPool) {
    install(&pool).await;
    let recorder = Recorder::default();
    *recorder.always.lock().unwrap() = Some(HandleErrorKind::Permanent);
    let mut f = start(pool, recorder, None).await;
    f.publish(&placed(Uuid::now_v7(), 1)).await;
    f.wait_for(&[Outcome::DeadLettered], 1).await;
    assert_eq!(f.sub.stats().count(Outcome::Retried), 0);
    let dl = f.dead_letters().await;
    assert_eq!(header(&dl[0], H_REASON), "handler_rejected");
    assert!(header(&dl[0], H_ERROR).contains("unshippable"));
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason_and_good_traffic_flows(
    pool: PgPool,
) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let good = |n: i64| placed(Uuid::now_v7(), n.min(1));
    let json = |e: &Envelope| serde_json::to_value(e).unwrap();
    let structured =
        BasicProperties::default().with_content_type(events::CONTENT_TYPE_STRUCTURED.into());

    let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
    bad.push(("malformed_json", b"{not json".to_vec()));
    let mut v = json(&good(1));
    v.as_object_mut().unwrap().remove("subject");
    bad.push(("invalid_envelope", serde_json::to_vec(&v).unwrap()));
    let mut v = json(&good(1));
    v["specversion"] = "0.3".into();
    bad.push(("invalid_envelope", serde_json::to_vec(&v).unwrap()));
    let mut v = json(&good(1));
    v["type"] = "order.exploded".into();
    bad.push(("unknown_type", serde_json::to_vec(&v).unwrap()));
    let mut v = json(&good(1));
    v["data"]["total"] = "lots".into();
    bad.push(("invalid_data", serde_json::to_vec(&v).unwrap()));
    let mut v = json(&good(1));
    v["dataversion"] = 9.into();
    bad.push(("unsupported_version", serde_json::to_vec(&v).unwrap()));
    let mut v = json(&good(1));
    v["data"]["padding"] = "x".repeat(5000).into();
    bad.push(("too_large", serde_json::to_vec(&v).unwrap()));

    let mut goods = Vec::new();
    for (_, body) in &bad {
        let g = good(1);
        f.publish(&g).await;
        goods.push(g);
        f.publish_raw("order.placed", body, structured.clone())
            .await;
    }
    f.wait_for(
        &[Outcome::Handled, Outcome::DeadLettered],
        (goods.len() + bad.len()) as u64,
    )
    .await;
    assert_eq!(f.sub.stats().count(Outcome::Handled), goods.len() as u64);
    let handled: Vec<Uuid> = f.effects().await.into_iter().map(|(id, _, _)| id).collect();
    for g in &goods {
        assert!(handled.contains(&g.id));
    }
    let dl = f.dead_letters().await;
    let mut reasons: Vec<String> = dl.iter().map(|m| header(m, H_REASON)).collect();
    let mut want: Vec<String> = bad.iter().map(|(r, _)| r.to_string()).collect();
    reasons.sort();
    want.sort();
    assert_eq!(reasons, want);
    for m in &dl {
        assert!(!header(m, H_ERROR).is_empty());
        assert_eq!(header(m, H_ROUTING_KEY), "order.placed");
    }
    f.stop().await;
}

/// The limits hold on the live path too: a message with more headers than
/// `events::MAX_HEADERS` (refused before they are converted) and one whose
/// subject is over `events::MAX_ATTRIBUTE_LEN` are dead-lettered with
/// their reason, not handled.
#[sqlx::test(migrations = false)]
async fn too_many_headers_and_an_overlong_subject_are_dead_lettered(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let structured =
        BasicProperties::default().with_content_type(events::CONTENT_TYPE_STRUCTURED.into());
    let mut headers = FieldTable::default();
    for i in 0..=events::MAX_HEADERS {
        headers.insert(
            format!("x-junk-{i}").into(),
            AMQPValue::LongString("v".into()),
        );
    }
    let e = placed(Uuid::now_v7(), 1);
    f.publish_raw(
        "order.placed",
        &testkit::sample::codec().encode(&e),
        structured.clone().with_headers(headers),
    )
    .await;
    let mut v = serde_json::to_value(placed(Uuid::now_v7(), 1)).unwrap();
    v["subject"] = "s".repeat(events::MAX_ATTRIBUTE_LEN + 1).into();
    f.publish_raw("order.placed", &serde_json::to_vec(&v).unwrap(), structured)
        .await;
    f.wait_for(&[Outcome::DeadLettered], 2).await;
    assert_eq!(f.sub.stats().count(Outcome::Handled), 0);
    let dl = f.dead_letters().await;
    let mut got: Vec<(String, String)> = dl
        .iter()
        .map(|m| (header(m, H_REASON), header(m, H_ERROR)))
        .collect();
    got.sort();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, "invalid_envelope");
    assert!(
        got[0].1.contains("`subject`") && got[0].1.contains("257 bytes"),
        "{got:?}"
    );
    assert_eq!(got[1].0, "too_large");
    assert!(got[1].1.contains("more than 64 AMQP headers"), "{got:?}");
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn sequence_two_before_one_is_applied_as_one_then_two(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let order = Uuid::now_v7();
    f.publish(&cancelled(order, 2)).await;
    // 2 must be seen (and deferred) on its own before 1 comes: sent
    // together they could share a batch, which orders them without a
    // deferral.
    f.wait_for(&[Outcome::Deferred], 1).await;
    f.publish(&placed(order, 1)).await;
    f.wait_for(&[Outcome::Handled], 2).await;
    let seqs: Vec<i64> = f.effects().await.into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert!(f.sub.stats().count(Outcome::Deferred) >= 1);
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn unhandled_sibling_types_are_skipped_and_keep_the_sequence_moving(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let order = Uuid::now_v7();
    // order.confirmed (seq 2) has no handler here, but the queue is bound
    // to it so that order.cancelled (seq 3) is not held back forever.
    let mut confirmed = Envelope::new(
        "orders",
        order.to_string(),
        &testkit::sample::OrderConfirmed {
            order_id: order,
            customer_id: Uuid::now_v7(),
        },
    );
    confirmed.sequence = 2;
    f.publish(&placed(order, 1)).await;
    f.publish(&confirmed).await;
    f.publish(&cancelled(order, 3)).await;
    f.wait_for(&[Outcome::Handled], 2).await;
    assert_eq!(f.sub.stats().count(Outcome::Skipped), 1);
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn binary_mode_message_is_handled(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let e = placed(Uuid::now_v7(), 1);
    let mut h = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    h.insert("ce-specversion".into(), s("1.0"));
    h.insert("ce-id".into(), s(&e.id.to_string()));
    h.insert("ce-source".into(), s("/knative/test"));
    h.insert("ce-type".into(), s("order.placed"));
    h.insert("ce-time".into(), s(&e.time.to_rfc3339()));
    h.insert("ce-subject".into(), s(&e.subject));
    h.insert("ce-dataversion".into(), s("1"));
    h.insert("ce-sequence".into(), s("1"));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(h);
    f.publish_raw("order.placed", &serde_json::to_vec(&e.data).unwrap(), props)
        .await;
    f.wait_for(&[Outcome::Handled], 1).await;
    assert_eq!(f.effects().await[0].0, e.id);
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn follow_up_events_carry_correlation_and_causation(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let order = Uuid::now_v7();
    f.publish(&placed(order, 1)).await;
    let c = cancelled(order, 2);
    f.publish(&c).await;
    f.wait_for(&[Outcome::Handled], 2).await;
    let payload: String = sqlx::query_scalar("SELECT payload::text FROM shipping.outbox")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let out = testkit::sample::codec().decode(payload.as_bytes()).unwrap();
    assert_eq!(out.event_type, "shipment.dispatched");
    assert_eq!(out.causationid, Some(c.id.to_string()));
    assert_eq!(out.correlationid, c.correlationid);
    assert_eq!(out.source, "/warren/shipping");
    assert_eq!(out.sequence, 1);
    let trace = |t: &Option<String>| t.as_ref().unwrap().split('-').nth(1).unwrap().to_owned();
    assert_eq!(trace(&out.traceparent), trace(&c.traceparent), "same trace");
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn shutdown_finishes_the_handler_in_flight_and_acks_it(pool: PgPool) {
    install(&pool).await;
    let recorder = Recorder {
        delay: Some(Duration::from_millis(700)),
        ..Default::default()
    };
    let entered = recorder.entered.clone();
    let mut f = start(pool, recorder, None).await;
    f.publish(&placed(Uuid::now_v7(), 1)).await;
    // Stop once the handler runs (a fixed sleep raced the consumer's start
    // on a loaded machine and stopped it before the delivery arrived).
    until(
        "the handler is in flight",
        Duration::from_secs(10),
        || async { entered.load(std::sync::atomic::Ordering::SeqCst) > 0 },
    )
    .await;
    f.stop().await;
    assert_eq!(f.effects().await.len(), 1, "in-flight handler completed");
    assert_eq!(f.messages_ready().await, 0, "and was acknowledged");
}

#[sqlx::test(migrations = false)]
async fn thousand_events_over_fifty_subjects_keep_per_subject_order_across_two_consumers(
    pool: PgPool,
) {
    install(&pool).await;
    // Deferral count as in production (40): with two consumers, early
    // events of one subject are split between them and a chain resolves
    // only a few links per round, so one event may be deferred ~10 times
    // here (measured); 20 leaves too thin a margin on a loaded machine.
    let cfg = SubscriptionConfig {
        prefetch: 32,
        lanes: 4,
        retry: RetryPolicy {
            max_deferrals: RetryPolicy::default().max_deferrals,
            ..config().retry
        },
        ..config()
    };
    let mut f = start_with(pool.clone(), Recorder::default(), None, cfg.clone()).await;
    // A competing consumer on the same queue, as a second process would
    // be: its own connection, prefetch and lanes, the same store.
    let rival = Subscription::new(
        router(Recorder::default()),
        testkit::sample::catalog(),
        pool.clone(),
        amqp_url(),
        f.bus.topology.clone(),
        cfg,
    )
    .unwrap();
    let rival_stop = CancellationToken::new();
    let rival_task = tokio::spawn({
        let (s, t) = (rival.clone(), rival_stop.clone());
        async move { s.run(t).await }
    });
    until(
        "both consumers are attached",
        Duration::from_secs(10),
        || async { f.consumers_attached().await == 2 },
    )
    .await;

    // 50 subjects × sequences 1..=20, subjects interleaved at random and,
    // within a subject, about one pair in five swapped (n+1 sent before n).
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let subjects: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    let mut swaps = 0;
    let mut queues: Vec<Vec<Envelope>> = subjects
        .iter()
        .map(|s| {
            let mut evs: Vec<Envelope> = (1..=20).map(|n| placed(*s, n)).collect();
            let mut i = 0;
            while i + 1 < evs.len() {
                if rng.gen_bool(0.2) {
                    evs.swap(i, i + 1);
                    swaps += 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            evs.reverse(); // popped from the end, in publication order
            evs
        })
        .collect();
    assert!(swaps > 0);
    let mut published = 0;
    while published < 1000 {
        let open: Vec<usize> = (0..queues.len())
            .filter(|i| !queues[*i].is_empty())
            .collect();
        let pick = open[rng.gen_range(0..open.len())];
        let e = queues[pick].pop().unwrap();
        f.publish(&e).await;
        published += 1;
    }

    let (ours, theirs) = (f.sub.stats(), rival.stats());
    until("1,000 events handled", Duration::from_secs(45), || async {
        ours.count(Outcome::Handled) + theirs.count(Outcome::Handled) >= 1000
    })
    .await;
    for stats in [&ours, &theirs] {
        assert_eq!(stats.count(Outcome::DeadLettered), 0);
        assert_eq!(stats.count(Outcome::Duplicate), 0);
    }
    assert!(
        ours.count(Outcome::Handled) > 0 && theirs.count(Outcome::Handled) > 0,
        "both consumers took part: {} and {}",
        ours.count(Outcome::Handled),
        theirs.count(Outcome::Handled)
    );
    assert!(
        ours.count(Outcome::Deferred) + theirs.count(Outcome::Deferred) > 0,
        "some events arrived before their predecessor"
    );

    // The store's own record of the order in which events were applied.
    let effects = f.effects().await;
    assert_eq!(effects.len(), 1000, "each event applied exactly once");
    let mut applied: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, subject, seq) in effects {
        applied.entry(subject).or_default().push(seq);
    }
    assert_eq!(applied.len(), 50);
    let want: Vec<i64> = (1..=20).collect();
    for (subject, seqs) in &applied {
        assert_eq!(seqs, &want, "subject {subject} applied out of order");
    }
    rival_stop.cancel();
    rival_task.await.unwrap();
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn inbox_retention_prunes_old_rows_in_bounded_batches_and_keeps_recent_ones(pool: PgPool) {
    install(&pool).await;
    let cfg = SubscriptionConfig {
        inbox_retention: Duration::from_secs(3600),
        ..config()
    };
    let mut f = start_with(pool.clone(), Recorder::default(), None, cfg.clone()).await;
    let events: Vec<Envelope> = (0..7).map(|_| placed(Uuid::now_v7(), 1)).collect();
    for e in &events {
        f.publish(e).await;
    }
    f.wait_for(&[Outcome::Handled], 7).await;
    let ids = |range: std::ops::Range<usize>| -> Vec<Uuid> {
        let mut v: Vec<Uuid> = events[range].iter().map(|e| e.id).collect();
        v.sort();
        v
    };
    let inbox = || async {
        let v: Vec<Uuid> =
            sqlx::query_scalar("SELECT event_id FROM shipping.inbox ORDER BY event_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        v
    };
    let backdate = |ids: Vec<Uuid>| {
        let pool = pool.clone();
        async move {
            sqlx::query("UPDATE shipping.inbox SET handled_at = now() - interval '2 hours' WHERE event_id = ANY($1)")
                .bind(ids)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Every DELETE statement on the inbox logs how many rows it removed.
    for sql in [
        "CREATE TABLE shipping.prune_log (n bigserial PRIMARY KEY, deleted bigint NOT NULL)",
        "CREATE FUNCTION shipping.log_prune() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO shipping.prune_log (deleted) SELECT count(*) FROM gone; RETURN NULL; END $$",
        "CREATE TRIGGER log_prune AFTER DELETE ON shipping.inbox REFERENCING OLD TABLE AS gone \
         FOR EACH STATEMENT EXECUTE FUNCTION shipping.log_prune()",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let batches = || async {
        let v: Vec<i64> = sqlx::query_scalar("SELECT deleted FROM shipping.prune_log ORDER BY n")
            .fetch_all(&pool)
            .await
            .unwrap();
        v
    };

    // Five rows handled two hours ago, past the one-hour window; two fresh.
    backdate(ids(0..5)).await;
    let pruned = f
        .sub
        .inbox()
        .prune(&pool, cfg.inbox_retention, 2)
        .await
        .unwrap();
    assert_eq!(pruned, 5);
    assert_eq!(batches().await, vec![2, 2, 1], "deleted two at a time");
    assert_eq!(inbox().await, ids(5..7), "recent rows stay");

    // The runtime prunes by itself with its configured window (at the
    // start of each session, then periodically).
    backdate(ids(5..6)).await;
    f.restart().await;
    until(
        "the runtime pruned the old row",
        Duration::from_secs(10),
        || async { inbox().await == ids(6..7) },
    )
    .await;
    assert_eq!(batches().await, vec![2, 2, 1, 1]);

    // A redelivery later than the window is no longer known to the inbox;
    // the subject's progress still refuses to apply it a second time.
    f.publish(&events[0]).await;
    f.wait_for(&[Outcome::DeadLettered], 1).await;
    assert_eq!(
        header(&f.dead_letters().await[0], H_REASON),
        "stale_sequence"
    );
    assert_eq!(f.effects().await.len(), 7, "not applied twice");
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn lanes_give_their_connections_back_once_deliveries_stop(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool.clone(), Recorder::default(), None).await;
    // Several subjects, so several lanes take a connection and keep it
    // from one batch to the next.
    for _ in 0..8 {
        f.publish(&placed(Uuid::now_v7(), 1)).await;
    }
    f.wait_for(&[Outcome::Handled], 8).await;
    until(
        "every connection back in the pool",
        Duration::from_secs(5),
        || async { pool.size() > 0 && pool.num_idle() == pool.size() as usize },
    )
    .await;
    // And they are taken again when deliveries come back.
    f.publish(&placed(Uuid::now_v7(), 1)).await;
    f.wait_for(&[Outcome::Handled], 9).await;
    f.stop().await;
}

#[sqlx::test(migrations = false)]
async fn acks_with_multiple_leave_no_delivery_of_any_lane_unacknowledged(pool: PgPool) {
    install(&pool).await;
    // Four lanes settle their batches out of tag order, and some
    // deliveries are dead-lettered instead of handled: an ack with
    // `multiple` sent too early would cover another lane's unsettled
    // deliveries, one never sent would leave them to be redelivered when
    // the channel closes. Either way the queue would not be empty after
    // the stop below.
    let cfg = SubscriptionConfig {
        prefetch: 64,
        ..config()
    };
    let mut f = start_with(pool, Recorder::default(), None, cfg).await;
    let subjects: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    for seq in 1..=10 {
        for (i, s) in subjects.iter().enumerate() {
            f.publish(&placed(*s, seq)).await;
            if i % 13 == 0 {
                let props = BasicProperties::default()
                    .with_content_type(events::CONTENT_TYPE_STRUCTURED.into());
                f.publish_raw("order.placed", b"{not json", props).await;
            }
        }
    }
    f.wait_for(&[Outcome::Handled], 400).await;
    f.wait_for(&[Outcome::DeadLettered], 40).await;
    f.stop().await;
    assert_eq!(
        f.messages_ready().await,
        0,
        "every delivery was acknowledged"
    );
    assert_eq!(f.effects().await.len(), 400);
    assert_eq!(f.dead_letters().await.len(), 40);
}

/// One run a batch handler was given: (subject, sequence) of each event.
type Run = Vec<(String, i64)>;

/// Writes a run of `order.placed` in one statement and remembers each run
/// it was given; rejects any run holding an order of total 13.
#[derive(Clone, Default)]
struct BatchRecorder {
    runs: Arc<Mutex<Vec<Run>>>,
}

#[async_trait::async_trait]
impl HandleBatch<OrderPlaced> for BatchRecorder {
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<(&Envelope, OrderPlaced)>,
    ) -> Result<(), HandleError> {
        self.runs.lock().unwrap().push(
            events
                .iter()
                .map(|(e, _)| (e.subject.clone(), e.sequence))
                .collect(),
        );
        if events.iter().any(|(_, d)| d.total == 13) {
            return Err(HandleError::permanent("total 13 is refused"));
        }
        let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.id).collect();
        let subjects: Vec<String> = events.iter().map(|(e, _)| e.subject.clone()).collect();
        let seqs: Vec<i64> = events.iter().map(|(e, _)| e.sequence).collect();
        let totals: Vec<i64> = events.iter().map(|(_, d)| d.total).collect();
        sqlx::query(
            "INSERT INTO shipping.effects (event_id, subject, sequence, total) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::bigint[])",
        )
        .bind(ids)
        .bind(subjects)
        .bind(seqs)
        .bind(totals)
        .execute(&mut *batch.tx)
        .await?;
        Ok(())
    }
}

#[sqlx::test(migrations = false)]
async fn a_batch_handler_gets_runs_in_subject_order_and_a_refused_event_fails_alone(pool: PgPool) {
    install(&pool).await;
    let recorder = BatchRecorder::default();
    let router = Router::new(SERVICE).on_batch::<OrderPlaced, _>(recorder.clone());
    // One lane, so the whole backlog lands in a few large batches.
    let cfg = SubscriptionConfig {
        prefetch: 200,
        lanes: 1,
        batch_size: 64,
        ..config()
    };
    let subjects: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let mut refused = None;
    let mut events = Vec::new();
    for seq in 1..=10 {
        for s in &subjects {
            events.push(placed(*s, seq));
        }
    }
    // A subject's last event is refused: it is dead-lettered alone, and
    // everything batched with it still applies.
    let victim = subjects[3];
    for e in events.iter_mut() {
        if e.subject == victim.to_string() && e.sequence == 10 {
            let mut d: OrderPlaced = e.data_as().unwrap();
            d.total = 13;
            *e = {
                let mut x = Envelope::new("orders", victim.to_string(), &d);
                x.sequence = 10;
                x
            };
            refused = Some(e.id);
        }
    }
    // Published while the consumer is stopped: a backlog, not a trickle.
    let mut f = start_routed(pool, router, None, cfg).await;
    f.stop().await;
    for e in &events {
        f.publish(e).await;
    }
    f.restart().await;
    f.wait_for(&[Outcome::Handled], 99).await;
    f.wait_for(&[Outcome::DeadLettered], 1).await;

    let runs = recorder.runs.lock().unwrap().clone();
    assert!(
        runs.iter().any(|r| r.len() > 1),
        "events arrived in runs, not one by one: {runs:?}"
    );
    assert!(
        runs.iter()
            .any(|r| r.len() == 1 && r[0] == (victim.to_string(), 10)),
        "the refused event was tried alone"
    );
    // Within every run each subject's sequences go up by one.
    for run in &runs {
        let mut last: HashMap<&str, i64> = HashMap::new();
        for (s, q) in run {
            if let Some(prev) = last.insert(s, *q) {
                assert_eq!(*q, prev + 1, "subject {s} out of order in {run:?}");
            }
        }
    }
    let effects = f.effects().await;
    assert_eq!(
        effects.len(),
        99,
        "each applied event wrote exactly one row"
    );
    assert!(!effects.iter().any(|(id, _, _)| Some(*id) == refused));
    let dead = f.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], H_REASON), "handler_rejected");
    f.stop().await;
}

/// The redelivery the inbox exists for: the first copy is handled and
/// committed (its outcome is reported only after commit and ack), and only
/// then do two more copies arrive, each seen by a new transaction that
/// finds the id in the inbox.
#[sqlx::test(migrations = false)]
async fn same_event_three_times_changes_the_store_once(pool: PgPool) {
    install(&pool).await;
    let mut f = start(pool, Recorder::default(), None).await;
    let e = placed(Uuid::now_v7(), 1);
    f.publish(&e).await;
    f.wait_for(&[Outcome::Handled], 1).await;
    let stats = f.sub.stats();
    assert_eq!(stats.count(Outcome::Duplicate), 0);
    assert_eq!(f.effects().await.len(), 1, "the first copy committed");

    for _ in 0..2 {
        f.publish(&e).await;
    }
    f.wait_for(&[Outcome::Duplicate], 2).await;
    assert_eq!(f.effects().await.len(), 1, "the copies changed nothing");
    assert_eq!(stats.count(Outcome::Handled), 1);
    assert_eq!(stats.count(Outcome::Duplicate), 2);
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM shipping.inbox WHERE event_id = $1")
        .bind(e.id)
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 1);
    assert_eq!(f.messages_ready().await, 0, "every copy was acknowledged");
    f.stop().await;
}

/// The forwarder's publish nacked by the broker: the retry queue the first
/// retry goes to is replaced by a full one that refuses more
/// (`x-max-length`, `x-overflow: reject-publish`), so RabbitMQ nacks the
/// retry copy. The original is then not acknowledged (the session ends and
/// the broker takes both deliveries back; while the impostor is there the
/// next session cannot even declare its queues), nothing is applied out of
/// order, and once the retry queue takes messages again the event is
/// retried and applied, before its successor.
#[sqlx::test(migrations = false)]
async fn a_retry_copy_nacked_by_the_broker_keeps_the_delivery_until_the_retry_queue_takes_it(
    pool: PgPool,
) {
    install(&pool).await;
    let recorder = Recorder::default();
    let order = Uuid::now_v7();
    let (first, second) = (placed(order, 1), cancelled(order, 2));
    // order.placed fails until the test says otherwise; attempts to spare,
    // so however often it comes back meanwhile it is never dead-lettered.
    *recorder.always.lock().unwrap() = Some(HandleErrorKind::Transient);
    let base = config();
    let cfg = SubscriptionConfig {
        retry: RetryPolicy {
            max_attempts: 10,
            ..base.retry.clone()
        },
        ..base
    };
    let mut f = start_with(pool, recorder.clone(), None, cfg.clone()).await;
    // The session declared its queues and consumes; it declares them only
    // at its start, so the swap below is what its forwarder meets.
    until(
        "the consumer is attached",
        Duration::from_secs(10),
        || async { f.consumers_attached().await == 1 },
    )
    .await;
    let retry_queue = f.bus.topology.retry_queue(SERVICE, cfg.retry.delay_for(1));
    assert_eq!(
        retry_queue,
        f.bus.topology.retry_queue(SERVICE, cfg.retry.defer_delay),
        "deferrals go through the same queue"
    );
    f.bus
        .channel
        .queue_delete(retry_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let blocker = testkit::Blocker::new(&f.bus, &retry_queue, None).await;

    f.publish(&first).await;
    f.publish(&second).await;
    until(
        "the nacked delivery is back in the queue, unacknowledged",
        Duration::from_secs(20),
        || async {
            recorder.entered.load(std::sync::atomic::Ordering::SeqCst) >= 1
                && f.consumers_attached().await == 0
                && f.messages_ready().await == 2
        },
    )
    .await;
    let stats = f.sub.stats();
    assert!(f.effects().await.is_empty());
    assert_eq!(
        stats.count(Outcome::Retried),
        0,
        "no retry was counted as sent"
    );
    assert_eq!(stats.count(Outcome::Deferred), 0);
    assert!(!blocker.offer().await, "the retry queue still refuses");

    // The retry queue takes messages again (the next session declares the
    // real one): the retry copy is confirmed and the original acked; then
    // the event stops failing, comes back from the retry queue and is
    // applied, then its successor.
    blocker.delete().await;
    f.wait_for(&[Outcome::Retried], 1).await;
    *recorder.always.lock().unwrap() = None;
    f.wait_for(&[Outcome::Handled], 2).await;
    let effects = f.effects().await;
    let applied: Vec<(Uuid, i64)> = effects.iter().map(|(id, _, q)| (*id, *q)).collect();
    assert_eq!(
        applied,
        [(first.id, 1), (second.id, 2)],
        "each once, in order"
    );
    assert!(f.dead_letters().await.is_empty());
    assert_eq!(f.messages_ready().await, 0);
    f.stop().await;
}

/// The same for a dead letter: the dead-letter queue is replaced by a full
/// one that refuses more, so RabbitMQ nacks the dead-letter copy; the
/// delivery is not acknowledged, and once the queue takes messages again
/// the event is dead-lettered there, once, with its reason.
#[sqlx::test(migrations = false)]
async fn a_dead_letter_nacked_by_the_broker_keeps_the_delivery_until_the_dlq_takes_it(
    pool: PgPool,
) {
    install(&pool).await;
    let recorder = Recorder::default();
    *recorder.always.lock().unwrap() = Some(HandleErrorKind::Permanent);
    let mut f = start(pool, recorder.clone(), None).await;
    until(
        "the consumer is attached",
        Duration::from_secs(10),
        || async { f.consumers_attached().await == 1 },
    )
    .await;
    let dlq = f.bus.topology.dlq(SERVICE);
    f.bus
        .channel
        .queue_delete(dlq.as_str().into(), Default::default())
        .await
        .unwrap();
    let blocker = testkit::Blocker::new(&f.bus, &dlq, None).await;

    let e = placed(Uuid::now_v7(), 1);
    f.publish(&e).await;
    until(
        "the nacked delivery is back in the queue, unacknowledged",
        Duration::from_secs(20),
        || async {
            recorder.entered.load(std::sync::atomic::Ordering::SeqCst) >= 1
                && f.consumers_attached().await == 0
                && f.messages_ready().await == 1
        },
    )
    .await;
    assert_eq!(f.sub.stats().count(Outcome::DeadLettered), 0);
    assert!(
        !blocker.offer().await,
        "the dead-letter queue still refuses"
    );

    blocker.delete().await;
    f.wait_for(&[Outcome::DeadLettered], 1).await;
    let dead = f.dead_letters().await;
    assert_eq!(dead.len(), 1, "dead-lettered once");
    assert_eq!(header(&dead[0], H_REASON), "handler_rejected");
    assert_eq!(
        testkit::sample::codec()
            .decode(&dead[0].delivery.data)
            .unwrap(),
        e
    );
    assert!(f.effects().await.is_empty());
    assert_eq!(f.messages_ready().await, 0);
    f.stop().await;
}

/// What `warren trace` reads: the inbox row of an applied event keeps its
/// correlation (none for a story's root, whose id is its correlation),
/// causation, time and whether it was skipped; a retry and a
/// duplicate, which commit nothing in the inbox, leave a row with their
/// attempt and reason in `inbox_outcomes`, pruned by the inbox's window.
#[sqlx::test(migrations = false)]
async fn the_inbox_and_the_outcome_record_keep_what_trace_reads(pool: PgPool) {
    install(&pool).await;
    let recorder = Recorder::default();
    let order = Uuid::now_v7();
    let first = placed(order, 1);
    let mut confirmed = Envelope::new(
        "orders",
        order.to_string(),
        &testkit::sample::OrderConfirmed {
            order_id: order,
            customer_id: Uuid::now_v7(),
        },
    );
    confirmed.sequence = 2;
    let confirmed = confirmed.caused_by(&first);
    recorder.fail_transient.lock().unwrap().insert(first.id, 1);
    let cfg = SubscriptionConfig {
        inbox_retention: Duration::from_secs(3600),
        ..config()
    };
    let mut f = start_with(pool.clone(), recorder, None, cfg.clone()).await;
    f.publish(&first).await;
    f.wait_for(&[Outcome::Handled], 1).await;
    f.publish(&confirmed).await;
    f.wait_for(&[Outcome::Skipped], 1).await;
    f.publish(&first).await;
    f.wait_for(&[Outcome::Duplicate], 1).await;

    type Row = (
        Uuid,
        Option<String>,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
        bool,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, correlation_id, causation_id, event_time, skipped \
         FROM shipping.inbox ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let corr = first.correlationid.clone();
    assert_eq!(corr, Some(first.id.to_string()), "the story's root");
    // PostgreSQL keeps microseconds.
    use chrono::SubsecRound;
    assert_eq!(
        rows,
        vec![
            (
                first.id,
                // The root's correlation is its id: not repeated.
                None,
                None,
                Some(first.time.trunc_subsecs(6)),
                false
            ),
            (
                confirmed.id,
                corr.clone(),
                Some(first.id.to_string()),
                Some(confirmed.time.trunc_subsecs(6)),
                true
            ),
        ]
    );
    type Kept = (
        Option<Uuid>,
        String,
        i32,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let kept = || async {
        let v: Vec<Kept> = sqlx::query_as(
            "SELECT event_id, outcome, attempt, reason, correlation_id, subject \
             FROM shipping.inbox_outcomes ORDER BY recorded_at",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        v
    };
    // Written off the lanes' path, by the session's writer.
    until(
        "both outcomes recorded",
        Duration::from_secs(10),
        || async { kept().await.len() == 2 },
    )
    .await;
    let kept = kept().await;
    let subject = Some(order.to_string());
    assert_eq!(
        kept,
        vec![
            (
                Some(first.id),
                "retried".into(),
                1,
                Some("transient".into()),
                corr.clone(),
                subject.clone()
            ),
            (
                Some(first.id),
                "duplicate".into(),
                1,
                None,
                corr.clone(),
                subject.clone()
            ),
        ]
    );

    // Pruned with the inbox's window.
    sqlx::query("UPDATE shipping.inbox_outcomes SET recorded_at = now() - interval '2 hours' WHERE outcome = 'retried'")
        .execute(&pool)
        .await
        .unwrap();
    let pruned = warren_consumers::trail::Trail::new(SERVICE)
        .prune(&pool, cfg.inbox_retention, 10)
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT outcome FROM shipping.inbox_outcomes")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["duplicate".to_owned()]);
    f.stop().await;
}
