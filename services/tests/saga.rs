//! End-to-end: the five services through HTTP and the real bus.

use std::time::Duration;

use consumers::{RetryPolicy, SubscriptionConfig};
use producers::RelayConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use testkit::{amqp_url, TestBus};
use uuid::Uuid;
use warren_shop::gateway::GatewayConfig;
use warren_shop::{App, AppConfig, ALL};

struct TestApp {
    app: Option<App>,
    base: String,
    http: reqwest::Client,
    pool: PgPool,
    _bus: TestBus,
}

fn subscription_config() -> SubscriptionConfig {
    SubscriptionConfig {
        prefetch: 32,
        lanes: 4,
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            defer_delay: Duration::from_millis(100),
            ..Default::default()
        },
        live_feed: false,
        ..Default::default()
    }
}

fn gateway_config() -> GatewayConfig {
    GatewayConfig {
        latency: Duration::from_millis(1),
        ..Default::default()
    }
}

fn app_config(bus: &TestBus, services: &[&str], http: bool) -> AppConfig {
    AppConfig {
        amqp_url: amqp_url(),
        topology: bus.topology.clone(),
        services: services.iter().map(|s| s.to_string()).collect(),
        http: http.then(|| "127.0.0.1:0".parse().unwrap()),
        subscription: subscription_config(),
        relay: RelayConfig {
            poll_interval: Duration::from_millis(200),
            // Published rows are kept: the audit looks for an order whose
            // payment.captured was raised twice in the payments outbox.
            retention: Duration::from_secs(3600),
            ..Default::default()
        },
        gateway: gateway_config(),
        partitions: Default::default(),
    }
}

/// A pool of its own for an app, large enough for every lane.
async fn app_pool(pool: &PgPool) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(30)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap()
}

async fn spawn_app(pool: PgPool, services: &[&str]) -> TestApp {
    spawn_app_with(pool, services, gateway_config()).await
}

async fn spawn_app_with(pool: PgPool, services: &[&str], gateway: GatewayConfig) -> TestApp {
    warren_shop::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let subscription = subscription_config();
    for s in services {
        bus.remember(s, &subscription.retry.delays());
    }
    let config = AppConfig {
        gateway,
        ..app_config(&bus, services, true)
    };
    let app = App::start(app_pool(&pool).await, config).await.unwrap();
    let base = format!("http://{}", app.http_addr.unwrap());
    TestApp {
        app: Some(app),
        base,
        http: reqwest::Client::new(),
        pool,
        _bus: bus,
    }
}

impl TestApp {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn put(&self, path: &str, body: Value) -> StatusCode {
        self.http
            .put(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    /// Registers a customer and waits until orders has heard of it.
    async fn customer(&self) -> Uuid {
        let email = format!("{}@example.com", Uuid::now_v7());
        let (status, body) = self
            .post("/customers", json!({ "name": "Ada", "email": email }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
        self.eventually("orders knows the customer", || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders.customers WHERE id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .unwrap()
                == 1
        })
        .await;
        id
    }

    async fn order(&self, customer: Uuid, sku: &str, qty: i32, token: &str) -> Uuid {
        let (status, body) = self
            .post(
                "/orders",
                json!({ "customer_id": customer, "lines": [{ "sku": sku, "qty": qty, "unit_price": 1250 }], "payment_token": token }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["status"], "pending");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    async fn status_of(&self, order: Uuid) -> String {
        let (_, body) = self.get(&format!("/orders/{order}")).await;
        body["status"].as_str().unwrap_or("").to_owned()
    }

    async fn wait_status(&self, order: Uuid, want: &str) {
        self.eventually(&format!("order {order} {want}"), || async {
            self.status_of(order).await == want
        })
        .await;
    }

    async fn eventually<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        for _ in 0..600 {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting until {what}");
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until every order reached a final state and every
    /// compensation ran, then checks the invariants of DESIGN.md.
    async fn assert_settled(&self, stock_set: &[(&str, i64)]) {
        self.eventually("every order settled", || async {
            self.scalar("SELECT count(*) FROM orders.orders WHERE status IN ('pending', 'confirmed')").await == 0
                && self.scalar("SELECT count(*) FROM inventory.reservations r JOIN orders.orders o ON o.id = r.order_id WHERE r.status = 'held'").await == 0
                && self.scalar("SELECT count(*) FROM payments.payments p JOIN orders.orders o ON o.id = p.order_id WHERE o.status = 'cancelled' AND p.status = 'captured'").await == 0
        })
        .await;
        assert_eq!(
            self.scalar("SELECT coalesce(sum(reserved), 0)::bigint FROM inventory.stock")
                .await,
            0,
            "reserved is 0"
        );
        for (sku, set) in stock_set {
            let shipped: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(l.qty), 0)::bigint FROM orders.order_lines l JOIN orders.orders o ON o.id = l.order_id \
                 WHERE o.status = 'shipped' AND l.sku = $1",
            )
            .bind(sku)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            let on_hand: i64 =
                sqlx::query_scalar("SELECT on_hand::bigint FROM inventory.stock WHERE sku = $1")
                    .bind(sku)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            assert_eq!(on_hand, set - shipped, "{sku}: on_hand = set - shipped");
            assert!(on_hand >= 0);
        }
        assert_eq!(
            self.scalar("SELECT count(*) FROM orders.orders o WHERE o.status = 'shipped' AND (SELECT count(*) FROM shipping.shipments s WHERE s.order_id = o.id) <> 1").await,
            0,
            "one shipment per shipped order"
        );
        assert_eq!(
            self.scalar("SELECT count(*) FROM shipping.shipments s JOIN orders.orders o ON o.id = s.order_id WHERE o.status <> 'shipped'").await,
            0,
            "no shipment for an order that did not ship"
        );
        // The gateway ledger's idempotency key allows one charge per order
        // by construction, so "captured twice" is looked for where it could
        // happen: two payment.captured events, or money taken that the
        // payments store does not know about.
        assert_eq!(
            self.scalar("SELECT count(*) FROM (SELECT aggregate FROM payments.outbox WHERE event_type = 'payment.captured' GROUP BY aggregate HAVING count(*) > 1) d").await,
            0,
            "no order captured twice"
        );
        assert_eq!(
            self.scalar("SELECT count(*) FROM payments.gateway_ledger c WHERE c.kind = 'charge' AND c.outcome = 'captured' \
                         AND NOT EXISTS (SELECT 1 FROM payments.payments p WHERE p.order_id = c.order_id AND p.status IN ('captured', 'refunded'))").await,
            0,
            "every captured charge is on record"
        );
        assert_eq!(
            self.scalar("SELECT count(*) FROM orders.orders o WHERE o.status = 'shipped' \
                         AND NOT EXISTS (SELECT 1 FROM payments.payments p WHERE p.order_id = o.id AND p.status = 'captured')").await,
            0,
            "every shipped order is paid"
        );
        assert_eq!(
            self.scalar("SELECT count(*) FROM payments.payments p JOIN orders.orders o ON o.id = p.order_id WHERE o.status = 'cancelled' AND p.status = 'captured'").await,
            0,
            "no cancelled order left captured"
        );
        assert_eq!(
            self.scalar("SELECT count(*) FROM payments.gateway_ledger c JOIN orders.orders o ON o.id = c.order_id \
                         WHERE o.status = 'cancelled' AND c.kind = 'charge' AND c.outcome = 'captured' \
                         AND NOT EXISTS (SELECT 1 FROM payments.gateway_ledger r WHERE r.kind = 'refund' AND r.order_id = c.order_id)").await,
            0,
            "no cancelled order keeps the customer's money at the gateway"
        );
    }

    async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

#[sqlx::test(migrations = false)]
async fn happy_path_order_is_shipped(pool: PgPool) {
    let mut t = spawn_app(pool, &ALL).await;
    assert_eq!(
        t.put("/stock/SKU-1", json!({ "on_hand": 10 })).await,
        StatusCode::OK
    );
    let c = t.customer().await;
    let o = t.order(c, "SKU-1", 2, "tok_ok").await;
    t.wait_status(o, "shipped").await;
    t.assert_settled(&[("SKU-1", 10)]).await;
    assert_eq!(
        t.scalar("SELECT on_hand::bigint FROM inventory.stock WHERE sku = 'SKU-1'")
            .await,
        8
    );
    let (_, body) = t.get(&format!("/orders/{o}")).await;
    assert_eq!(body["total"], 2500);
    assert_eq!(body["lines"][0]["sku"], "SKU-1");
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn out_of_stock_order_is_cancelled_with_nothing_reserved(pool: PgPool) {
    let mut t = spawn_app(pool, &ALL).await;
    t.put("/stock/SKU-1", json!({ "on_hand": 1 })).await;
    let c = t.customer().await;
    let o = t.order(c, "SKU-1", 5, "tok_ok").await;
    t.wait_status(o, "cancelled").await;
    let (_, body) = t.get(&format!("/orders/{o}")).await;
    assert!(
        body["reason"].as_str().unwrap().contains("out of stock"),
        "{body}"
    );
    t.assert_settled(&[("SKU-1", 1)]).await;
    assert_eq!(
        t.scalar("SELECT count(*) FROM inventory.reservations")
            .await,
        0
    );
    assert_eq!(
        t.scalar("SELECT count(*) FROM payments.gateway_ledger")
            .await,
        0,
        "never charged"
    );
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn declined_payment_cancels_the_order_and_releases_stock(pool: PgPool) {
    let mut t = spawn_app(pool, &ALL).await;
    t.put("/stock/SKU-1", json!({ "on_hand": 3 })).await;
    let c = t.customer().await;
    let o = t.order(c, "SKU-1", 2, "tok_decline").await;
    t.wait_status(o, "cancelled").await;
    t.eventually("stock released", || async {
        t.scalar("SELECT count(*) FROM inventory.reservations WHERE status = 'released'")
            .await
            == 1
    })
    .await;
    t.assert_settled(&[("SKU-1", 3)]).await;
    assert_eq!(
        t.scalar("SELECT on_hand::bigint FROM inventory.stock")
            .await,
        3
    );
    assert_eq!(
        t.scalar("SELECT count(*) FROM payments.payments WHERE status = 'failed'")
            .await,
        1
    );
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn captured_order_cancelled_later_is_refunded_and_restocked(pool: PgPool) {
    // Without shipping, a confirmed order stays confirmed until cancelled.
    let mut t = spawn_app(pool, &["customers", "orders", "inventory", "payments"]).await;
    t.put("/stock/SKU-1", json!({ "on_hand": 4 })).await;
    let c = t.customer().await;
    let o = t.order(c, "SKU-1", 1, "tok_ok").await;
    t.wait_status(o, "confirmed").await;
    let (status, _) = t.post(&format!("/orders/{o}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    t.eventually("refunded", || async {
        t.scalar("SELECT count(*) FROM payments.payments WHERE status = 'refunded'")
            .await
            == 1
    })
    .await;
    assert_eq!(t.scalar("SELECT count(*) FROM payments.refunds").await, 1);
    t.assert_settled(&[("SKU-1", 4)]).await;
    assert_eq!(
        t.scalar("SELECT on_hand::bigint FROM inventory.stock")
            .await,
        4
    );
    let (status, _) = t.post(&format!("/orders/{o}/cancel"), json!({})).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a cancelled order stays cancelled"
    );
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn two_hundred_concurrent_orders_for_fifty_units_sell_exactly_fifty(pool: PgPool) {
    let mut t = spawn_app(pool, &ALL).await;
    t.put("/stock/HOT", json!({ "on_hand": 50 })).await;
    let c = t.customer().await;
    let mut tasks = Vec::new();
    let t_ref = std::sync::Arc::new((t.base.clone(), t.http.clone()));
    for _ in 0..200 {
        let r = t_ref.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({ "customer_id": c, "lines": [{ "sku": "HOT", "qty": 1, "unit_price": 100 }], "payment_token": "tok_ok" });
            r.1.post(format!("{}/orders", r.0)).json(&body).send().await.unwrap().status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::ACCEPTED);
    }
    t.assert_settled(&[("HOT", 50)]).await;
    assert_eq!(
        t.scalar("SELECT count(*) FROM orders.orders WHERE status = 'shipped'")
            .await,
        50
    );
    assert_eq!(
        t.scalar("SELECT count(*) FROM orders.orders WHERE status = 'cancelled'")
            .await,
        150
    );
    assert_eq!(
        t.scalar("SELECT on_hand::bigint FROM inventory.stock WHERE sku = 'HOT'")
            .await,
        0
    );
    t.stop().await;
}

/// Regression: lanes apply batches of events in one transaction each, and
/// a batch touches SKUs in no common order, so two batches could deadlock
/// on stock rows (each costing a 1 s `deadlock_timeout` and a retry; enough
/// of them in a row dead-letter the event and strand its stock).
/// Inventory locks a batch's stock rows in SKU order, so none is ever retried.
#[sqlx::test(migrations = false)]
async fn concurrent_multi_sku_orders_never_deadlock_inventory(pool: PgPool) {
    let mut t = spawn_app(pool, &ALL).await;
    let skus = ["S1", "S2", "S3", "S4", "S5", "S6"];
    for sku in skus {
        t.put(&format!("/stock/{sku}"), json!({ "on_hand": 10_000 }))
            .await;
    }
    let c = t.customer().await;
    let r = std::sync::Arc::new((t.base.clone(), t.http.clone()));
    let mut tasks = Vec::new();
    for i in 0..150usize {
        let r = r.clone();
        // Three SKUs per order, in a different order each time.
        let lines: Vec<Value> = (0..3)
            .map(|k| json!({ "sku": skus[(i * 5 + k * (1 + i % 5)) % 6], "qty": 1, "unit_price": 100 }))
            .collect();
        tasks.push(tokio::spawn(async move {
            let body = json!({ "customer_id": c, "lines": lines, "payment_token": if i % 4 == 0 { "tok_decline" } else { "tok_ok" } });
            r.1.post(format!("{}/orders", r.0)).json(&body).send().await.unwrap().status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::ACCEPTED);
    }
    t.assert_settled(&skus.map(|s| (s, 10_000))).await;
    let inventory = &t.app.as_ref().unwrap().consumer_stats["inventory"];
    assert_eq!(
        inventory.count(consumers::Outcome::Retried),
        0,
        "inventory retried events: {:?}",
        inventory.snapshot().by_type
    );
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn bad_requests_get_4xx_with_a_json_error(pool: PgPool) {
    let mut t = spawn_app(pool, &ALL).await;
    let c = t.customer().await;
    let cases = [
        (
            json!({ "customer_id": c, "lines": [], "payment_token": "tok_ok" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "lines",
        ),
        (
            json!({ "customer_id": c, "lines": [{ "sku": "A", "qty": 0, "unit_price": 1 }], "payment_token": "tok_ok" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "qty",
        ),
        (
            json!({ "customer_id": c, "lines": [{ "sku": "A", "qty": 1, "unit_price": -1 }], "payment_token": "tok_ok" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unit_price",
        ),
        (
            json!({ "customer_id": Uuid::now_v7(), "lines": [{ "sku": "A", "qty": 1, "unit_price": 1 }], "payment_token": "tok_ok" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not known",
        ),
        (
            json!({ "customer_id": "nope", "lines": [] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "customer_id",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, err) = t.post("/orders", body.clone()).await;
        assert_eq!(got, status, "{body}");
        assert!(err["error"].as_str().unwrap().contains(needle), "{err}");
    }
    let r = t
        .http
        .post(format!("{}/orders", t.base))
        .header("content-type", "application/json")
        .body("{broken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    let big = "x".repeat(200 * 1024);
    let r = t
        .http
        .post(format!("{}/customers", t.base))
        .header("content-type", "application/json")
        .body(format!("{{\"name\":\"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // No JSON content type, a malformed id in the path: 4xx, not a 500.
    let r = t
        .http
        .post(format!("{}/customers", t.base))
        .body(r#"{"name":"A","email":"a@b"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = t.get("/orders/not-a-uuid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = t.get(&format!("/orders/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = t
        .post("/customers", json!({ "name": "", "email": "x@y" }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        t.put("/stock/A", json!({ "on_hand": -1 })).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let (status, _) = t.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = t.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let metrics = t
        .http
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("warren_consumer_events_total{service=\"orders\",type=\"customer.registered\",outcome=\"handled\"} 1"), "{metrics}");
    assert!(
        metrics.contains("warren_outbox_backlog{service=\"customers\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warren_gateway_breaker_state 0"),
        "{metrics}"
    );
    // The customer registered above was relayed: at least one batch's
    // confirms came back and were counted, with their wait.
    let confirm_batches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warren_relay_confirm_seconds_count{service=\"customers\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("confirm count of customers in {metrics}"));
    assert!(confirm_batches >= 1, "{metrics}");
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn two_copies_of_every_service_share_the_work_without_double_effects(pool: PgPool) {
    let mut t = spawn_app(pool.clone(), &ALL).await;
    // A second process's worth of every service: same database, same
    // namespace; consumers compete for each queue, relays stand by.
    let second = App::start(app_pool(&pool).await, app_config(&t._bus, &ALL, false))
        .await
        .unwrap();
    t.put("/stock/TWIN", json!({ "on_hand": 30 })).await;
    let c = t.customer().await;
    let mut orders = Vec::new();
    for i in 0..60 {
        let token = if i % 4 == 0 { "tok_decline" } else { "tok_ok" };
        orders.push((t.order(c, "TWIN", 1, token).await, token));
    }
    t.assert_settled(&[("TWIN", 30)]).await;
    // How many ship depends on timing: a unit held by a declined order
    // until its release turns away the good orders placed meanwhile. What
    // does not depend on timing: declined orders never ship, good ones
    // ship or are turned away for stock, and no unit is lost.
    let mut shipped = 0;
    for (o, token) in &orders {
        let (_, body) = t.get(&format!("/orders/{o}")).await;
        match (body["status"].as_str().unwrap(), *token) {
            ("cancelled", "tok_decline") => {}
            ("shipped", "tok_ok") => shipped += 1,
            ("cancelled", "tok_ok") => assert!(
                body["reason"].as_str().unwrap().contains("out of stock"),
                "{body}"
            ),
            (status, token) => panic!("order {o} with {token} ended {status}: {body}"),
        }
    }
    let on_hand = t
        .scalar("SELECT on_hand::bigint FROM inventory.stock WHERE sku = 'TWIN'")
        .await;
    assert!(shipped > 0);
    assert_eq!(
        shipped + on_hand,
        30,
        "every unit sold once or back on the shelf: declined orders gave theirs back"
    );
    let second_handled: u64 = second
        .consumer_stats
        .values()
        .map(|s| s.count(consumers::Outcome::Handled))
        .sum();
    assert!(second_handled > 0, "the second copy took part");
    second.stop().await;
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn gateway_outage_opens_the_breaker_parks_payments_in_delayed_retry_and_all_orders_settle(
    pool: PgPool,
) {
    let gateway = GatewayConfig {
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_millis(500),
        ..gateway_config()
    };
    let mut t = spawn_app_with(pool, &ALL, gateway).await;
    let app = t.app.as_ref().unwrap();
    let (gw, payments) = (app.gateway.clone(), app.consumer_stats["payments"].clone());
    t.put("/stock/SKU-1", json!({ "on_hand": 20 })).await;
    let c = t.customer().await;

    gw.set_failure_rate(1.0);
    let mut orders = Vec::new();
    for i in 0..6 {
        let token = if i == 5 { "tok_decline" } else { "tok_ok" };
        orders.push((t.order(c, "SKU-1", 2, token).await, token));
    }
    let breaker = || async {
        let text = t
            .http
            .get(format!("{}/metrics", t.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("warren_gateway_breaker_state "))
            .unwrap_or("")
            .to_owned()
    };
    t.eventually("the breaker opens", || async { breaker().await == "2" })
        .await;
    // The outage lasts until every payment went back to delayed retry
    // several times over: longer than the retry schedule's whole budget
    // (max_attempts 5: 100 + 200 + 400 + 500 ms).
    let retried = |n: u64| {
        let payments = payments.clone();
        async move { payments.count(consumers::Outcome::Retried) >= n }
    };
    t.eventually("payments retried through the outage", || retried(8 * 6))
        .await;
    for (o, _) in &orders {
        assert_eq!(
            t.status_of(*o).await,
            "pending",
            "nothing settles while the gateway is down"
        );
    }
    assert_eq!(
        t.scalar("SELECT count(*) FROM payments.gateway_ledger")
            .await,
        0,
        "the gateway never answered"
    );

    gw.set_failure_rate(0.0);
    for (o, token) in &orders {
        let want = if *token == "tok_ok" {
            "shipped"
        } else {
            "cancelled"
        };
        t.wait_status(*o, want).await;
    }
    t.assert_settled(&[("SKU-1", 20)]).await;
    assert_eq!(breaker().await, "0", "closed again");
    assert_eq!(
        payments.count(consumers::Outcome::DeadLettered),
        0,
        "no payment was given up on"
    );
    t.stop().await;
}
