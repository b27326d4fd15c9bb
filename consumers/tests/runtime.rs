//! The subscription runtime against the real RabbitMQ and PostgreSQL:
//! idempotency, retries, dead letters, bad input, order, shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumers::deadletter::{
    H_ATTEMPT, H_DEAD_LETTERED_AT, H_ERROR, H_REASON, H_ROUTING_KEY, H_SERVICE,
};
use consumers::{Context, Handle, HandleError, Outcome, Router, Subscription, SubscriptionConfig};
use events::catalog::{OrderCancelled, OrderLine, OrderPlaced, ShipmentDispatched};
use events::{Codec, Envelope};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use producers::testkit::{amqp_url, Proxy, TestBus};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SERVICE: &str = "shipping";

/// Records every applied event in a table of the service's schema; fails
/// on demand: `fail_first[n]` transient failures per event id, or always.
#[derive(Clone, Default)]
struct Recorder {
    fail_transient: Arc<Mutex<HashMap<Uuid, u32>>>,
    always: Arc<Mutex<Option<HandleErrorKind>>>,
    delay: Option<Duration>,
}

#[derive(Clone, Copy)]
enum HandleErrorKind {
    Transient,
    Permanent,
}

#[async_trait::async_trait]
impl Handle<OrderPlaced> for Recorder {
    async fn handle(&self, ctx: &mut Context<'_>, data: OrderPlaced) -> Result<(), HandleError> {
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
        max_attempts: 3,
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        defer_delay: Duration::from_millis(100),
        max_deferrals: 20,
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
    sqlx::query("CREATE TABLE shipping.effects (n bigserial PRIMARY KEY, event_id uuid NOT NULL, subject text NOT NULL, sequence bigint NOT NULL, total bigint NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let bus = TestBus::new().await;
    let router = Router::new(SERVICE)
        .on::<OrderPlaced, _>(recorder.clone())
        .on::<OrderCancelled, _>(recorder);
    let cfg = config();
    let sub = Subscription::new(
        router,
        pool.clone(),
        url.unwrap_or_else(amqp_url),
        bus.topology.clone(),
        cfg.clone(),
    )
    .unwrap();
    sub.declare(&bus.channel).await.unwrap();
    bus.remember(SERVICE, &cfg.retry_delays());
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
                &self.bus.topology.exchange(),
                routing_key,
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
        self.publish_raw(&e.event_type, &Codec::default().encode(e), props)
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
                &self.bus.topology.dlq(SERVICE),
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

#[sqlx::test(migrations = "../migrations")]
async fn same_event_three_times_changes_the_store_once(pool: PgPool) {
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

#[sqlx::test(migrations = "../migrations")]
async fn redelivery_after_a_failed_ack_is_absorbed_by_the_inbox(pool: PgPool) {
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

#[sqlx::test(migrations = "../migrations")]
async fn handler_failing_twice_is_applied_once_after_two_delayed_retries(pool: PgPool) {
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

#[sqlx::test(migrations = "../migrations")]
async fn handler_always_failing_is_dead_lettered_after_the_limit_with_reason_headers(pool: PgPool) {
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
        Codec::default().decode(&m.delivery.data).unwrap(),
        e,
        "body kept"
    );
    assert!(f.effects().await.is_empty());
    f.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn permanent_failure_is_dead_lettered_at_once(pool: PgPool) {
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

#[sqlx::test(migrations = "../migrations")]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason_and_good_traffic_flows(
    pool: PgPool,
) {
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
#[sqlx::test(migrations = "../migrations")]
async fn too_many_headers_and_an_overlong_subject_are_dead_lettered(pool: PgPool) {
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
        &Codec::default().encode(&e),
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

#[sqlx::test(migrations = "../migrations")]
async fn sequence_two_before_one_is_applied_as_one_then_two(pool: PgPool) {
    let mut f = start(pool, Recorder::default(), None).await;
    let order = Uuid::now_v7();
    f.publish(&cancelled(order, 2)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.publish(&placed(order, 1)).await;
    f.wait_for(&[Outcome::Handled], 2).await;
    let seqs: Vec<i64> = f.effects().await.into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert!(f.sub.stats().count(Outcome::Deferred) >= 1);
    f.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn unhandled_sibling_types_are_skipped_and_keep_the_sequence_moving(pool: PgPool) {
    let mut f = start(pool, Recorder::default(), None).await;
    let order = Uuid::now_v7();
    // order.confirmed (seq 2) has no handler here, but the queue is bound
    // to it so that order.cancelled (seq 3) is not held back forever.
    let mut confirmed = Envelope::new(
        "orders",
        order.to_string(),
        &events::catalog::OrderConfirmed {
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

#[sqlx::test(migrations = "../migrations")]
async fn binary_mode_message_is_handled(pool: PgPool) {
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

#[sqlx::test(migrations = "../migrations")]
async fn follow_up_events_carry_correlation_and_causation(pool: PgPool) {
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
    let out = Codec::default().decode(payload.as_bytes()).unwrap();
    assert_eq!(out.event_type, "shipment.dispatched");
    assert_eq!(out.causationid, Some(c.id.to_string()));
    assert_eq!(out.correlationid, c.correlationid);
    assert_eq!(out.source, "/warren/shipping");
    assert_eq!(out.sequence, 1);
    let trace = |t: &Option<String>| t.as_ref().unwrap().split('-').nth(1).unwrap().to_owned();
    assert_eq!(trace(&out.traceparent), trace(&c.traceparent), "same trace");
    f.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn shutdown_finishes_the_handler_in_flight_and_acks_it(pool: PgPool) {
    let recorder = Recorder {
        delay: Some(Duration::from_millis(700)),
        ..Default::default()
    };
    let mut f = start(pool, recorder, None).await;
    f.publish(&placed(Uuid::now_v7(), 1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.stop().await;
    assert_eq!(f.effects().await.len(), 1, "in-flight handler completed");
    let q = f
        .bus
        .channel
        .queue_declare(
            &f.bus.topology.queue(SERVICE),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0, "and was acknowledged");
}
