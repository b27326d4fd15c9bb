//! The HTTP API's versioned resources against the real servers: `ETag`
//! and `If-Match` on customers and stock levels (optimistic locking), and
//! the paginated customers list.

use std::time::Duration;

use consumers::SubscriptionConfig;
use producers::RelayConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use testkit::{amqp_url, TestBus};
use uuid::Uuid;
use warren_shop::gateway::GatewayConfig;
use warren_shop::{App, AppConfig};

struct Api {
    app: Option<App>,
    base: String,
    http: reqwest::Client,
    pool: PgPool,
    bus: TestBus,
}

/// One answer: status, `ETag` and JSON body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Value,
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned());
    Answer {
        status,
        etag,
        body: r.json().await.unwrap_or(Value::Null),
    }
}

/// Customers (raises), orders (reads customers' events) and inventory,
/// with HTTP on a free port, in a namespace of their own.
async fn spawn_api(pool: PgPool) -> Api {
    let bus = TestBus::new().await;
    let services = ["customers", "orders", "inventory"];
    let subscription = SubscriptionConfig {
        prefetch: 16,
        lanes: 2,
        live_feed: false,
        ..Default::default()
    };
    for s in services {
        bus.remember(s, &subscription.retry.delays());
    }
    let config = AppConfig {
        amqp_url: amqp_url(),
        topology: bus.topology.clone(),
        services: services.iter().map(|s| s.to_string()).collect(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        subscription,
        relay: RelayConfig {
            poll_interval: Duration::from_millis(200),
            ..Default::default()
        },
        gateway: GatewayConfig::default(),
        partitions: Default::default(),
    };
    let app_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let app = App::start(app_pool, config).await.unwrap();
    let base = format!("http://{}", app.http_addr.unwrap());
    Api {
        app: Some(app),
        base,
        http: reqwest::Client::new(),
        pool,
        bus,
    }
}

impl Api {
    async fn get(&self, path: &str) -> Answer {
        answer(
            self.http
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        answer(
            self.http
                .post(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn put(&self, path: &str, body: Value, if_match: Option<&str>) -> Answer {
        let mut r = self.http.put(format!("{}{path}", self.base)).json(&body);
        if let Some(tag) = if_match {
            r = r.header("if-match", tag);
        }
        answer(r.send().await.unwrap()).await
    }

    async fn register(&self, name: &str) -> Uuid {
        let a = self
            .post(
                "/customers",
                json!({ "name": name, "email": format!("{}@example.com", Uuid::now_v7()) }),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
        a.body["id"].as_str().unwrap().parse().unwrap()
    }

    async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

/// Polls `check` every 50 ms until it holds; panics with `what` after 30 s.
async fn eventually<F, Fut>(what: &str, check: F)
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

#[sqlx::test(migrations = false)]
async fn customer_etag_and_if_match_guard_updates_and_the_event_carries_the_version(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let mut api = spawn_api(pool).await;
    let mut tap = api.bus.wiretap("customer.updated").await;
    let a = api
        .post(
            "/customers",
            json!({ "name": "Ada", "email": "ada@example.com" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(
        a.etag.as_deref(),
        Some("\"1\""),
        "a registration is version 1"
    );
    let id = a.body["id"].as_str().unwrap().to_owned();
    let path = format!("/customers/{id}");

    let got = api.get(&path).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.etag.as_deref(), Some("\"1\""));
    assert_eq!(got.body["version"], 1);
    assert_eq!(got.body["name"], "Ada");

    // With the tag just read: applies, and answers the new one.
    let put = api
        .put(
            &path,
            json!({ "name": "Ada L", "email": "ada@example.com" }),
            Some("\"1\""),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{put:?}");
    assert_eq!(put.etag.as_deref(), Some("\"2\""));
    assert_eq!(put.body["version"], 2);

    // With the stale tag: 412, nothing changed.
    let stale = api
        .put(
            &path,
            json!({ "name": "Lost update", "email": "lost@example.com" }),
            Some("\"1\""),
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{stale:?}");
    assert!(stale.body["error"].as_str().unwrap().contains("version 2"));
    let got = api.get(&path).await;
    assert_eq!(
        (got.body["name"].as_str(), got.etag.as_deref()),
        (Some("Ada L"), Some("\"2\""))
    );
    // A weak tag never matches for If-Match, even of the current version.
    let weak = api
        .put(
            &path,
            json!({ "name": "Weak", "email": "ada@example.com" }),
            Some("W/\"2\""),
        )
        .await;
    assert_eq!(weak.status, StatusCode::PRECONDITION_FAILED);

    // Without If-Match: applies as before; `*` and a list that holds the
    // current tag apply too.
    let plain = api
        .put(
            &path,
            json!({ "name": "Ada K", "email": "ada@example.com" }),
            None,
        )
        .await;
    assert_eq!(
        (plain.status, plain.etag.as_deref()),
        (StatusCode::OK, Some("\"3\""))
    );
    let star = api
        .put(
            &path,
            json!({ "name": "Ada B", "email": "ada@example.com" }),
            Some("*"),
        )
        .await;
    assert_eq!(star.etag.as_deref(), Some("\"4\""));
    let listed = api
        .put(
            &path,
            json!({ "name": "Ada Byron", "email": "ada@example.com" }),
            Some("\"1\", \"4\""),
        )
        .await;
    assert_eq!(
        (listed.status, listed.etag.as_deref()),
        (StatusCode::OK, Some("\"5\""))
    );

    // customer.updated carries each new version, in order, and the
    // refused PUTs raised nothing.
    let seen = tap.collect(4, Duration::from_secs(5)).await;
    let versions: Vec<Value> = seen
        .iter()
        .map(|t| t.event.data.to_value().unwrap()["version"].clone())
        .collect();
    assert_eq!(versions, [json!(2), json!(3), json!(4), json!(5)]);
    assert_eq!(seen[3].event.data.to_value().unwrap()["name"], "Ada Byron");
    // Orders, which reads the event without knowing the field, follows.
    eventually("orders has the last name", || async {
        sqlx::query_scalar::<_, String>("SELECT name FROM orders.customers WHERE id = $1")
            .bind(id.parse::<Uuid>().unwrap())
            .fetch_optional(&api.pool)
            .await
            .unwrap()
            .as_deref()
            == Some("Ada Byron")
    })
    .await;
    api.stop().await;
}

#[test]
fn a_customer_updated_written_before_versions_still_reads() {
    let old = json!({ "customer_id": Uuid::nil(), "name": "Ada", "email": "a@x" });
    let e: warren_shop::catalog::CustomerUpdated = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(e.version, None);
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        old,
        "and writes the same"
    );
}

#[sqlx::test(migrations = false)]
async fn an_unknown_customer_is_404_with_or_without_if_match(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let mut api = spawn_api(pool).await;
    let unknown = format!("/customers/{}", Uuid::now_v7());
    let got = api.get(&unknown).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(got.body["error"].is_string());
    assert!(got.etag.is_none());
    let body = json!({ "name": "N", "email": "n@example.com" });
    for tag in [None, Some("\"1\""), Some("*")] {
        assert_eq!(
            api.put(&unknown, body.clone(), tag).await.status,
            StatusCode::NOT_FOUND,
            "{tag:?}"
        );
    }
    api.stop().await;
}

#[sqlx::test(migrations = false)]
async fn stock_etag_and_if_match_guard_the_level(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let mut api = spawn_api(pool).await;
    let set = api.put("/stock/S-1", json!({ "on_hand": 5 }), None).await;
    assert_eq!(set.status, StatusCode::OK);
    assert_eq!(set.etag.as_deref(), Some("\"0\""), "a new SKU is version 0");
    let got = api.get("/stock/S-1").await;
    assert_eq!(
        (got.etag.as_deref(), got.body["on_hand"].as_i64()),
        (Some("\"0\""), Some(5))
    );

    let ok = api
        .put("/stock/S-1", json!({ "on_hand": 7 }), Some("\"0\""))
        .await;
    assert_eq!(
        (ok.status, ok.etag.as_deref()),
        (StatusCode::OK, Some("\"1\""))
    );
    let stale = api
        .put("/stock/S-1", json!({ "on_hand": 2 }), Some("\"0\""))
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let got = api.get("/stock/S-1").await;
    assert_eq!(
        (got.etag.as_deref(), got.body["on_hand"].as_i64()),
        (Some("\"1\""), Some(7)),
        "the stale PUT changed nothing"
    );

    // If-Match on a SKU that does not exist matches nothing: 412, and it
    // is not created (without If-Match a PUT creates it).
    let missing = api
        .put("/stock/NEW", json!({ "on_hand": 1 }), Some("\"0\""))
        .await;
    assert_eq!(missing.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(api.get("/stock/NEW").await.status, StatusCode::NOT_FOUND);
    let missing = api
        .put("/stock/NEW", json!({ "on_hand": 1 }), Some("*"))
        .await;
    assert_eq!(missing.status, StatusCode::PRECONDITION_FAILED);
    api.stop().await;
}

/// Two clients read the same version and both PUT with it, at once: the
/// compare-and-set lets exactly one through, every round.
#[sqlx::test(migrations = false)]
async fn two_clients_putting_with_the_same_if_match_one_gets_200_the_other_412(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let mut api = spawn_api(pool).await;
    let mut tap = api.bus.wiretap("customer.updated").await;
    let id = api.register("Ada").await;
    api.put("/stock/RACE", json!({ "on_hand": 1 }), None).await;
    let rounds = 10;
    for round in 0..rounds {
        for path in [format!("/customers/{id}"), "/stock/RACE".to_owned()] {
            let tag = api.get(&path).await.etag.unwrap();
            let body = |n: usize| {
                if path.starts_with("/stock") {
                    json!({ "on_hand": round * 10 + n })
                } else {
                    json!({ "name": format!("writer {n} round {round}"), "email": "ada@example.com" })
                }
            };
            let (a, b) = tokio::join!(
                api.put(&path, body(1), Some(&tag)),
                api.put(&path, body(2), Some(&tag))
            );
            let mut statuses = [a.status, b.status];
            statuses.sort();
            assert_eq!(
                statuses,
                [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
                "{path} round {round}: {a:?} {b:?}"
            );
            // What is stored is the winner's write, at the next version.
            let winner = if a.status == StatusCode::OK { &a } else { &b };
            let now = api.get(&path).await;
            assert_eq!(now.etag, winner.etag);
            let field = if path.starts_with("/stock") {
                "on_hand"
            } else {
                "name"
            };
            assert_eq!(now.body[field], winner.body[field]);
        }
    }
    // One change per round, and one customer.updated per winning PUT,
    // none for the refused ones.
    let final_version = api.get(&format!("/customers/{id}")).await.body["version"].clone();
    assert_eq!(final_version, json!(1 + rounds));
    let versions: Vec<Value> = tap
        .collect(rounds + 1, Duration::from_secs(5))
        .await
        .iter()
        .map(|t| t.event.data.to_value().unwrap()["version"].clone())
        .collect();
    assert_eq!(
        versions,
        (2..=rounds + 1).map(|v| json!(v)).collect::<Vec<_>>()
    );
    api.stop().await;
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[sqlx::test(migrations = false)]
async fn customers_list_pages_newest_first_with_an_opaque_cursor(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let mut api = spawn_api(pool).await;
    let mut registered = Vec::new();
    for n in 0..7 {
        registered.push(api.register(&format!("C{n}")).await.to_string());
    }
    let newest_first: Vec<String> = registered.iter().rev().cloned().collect();

    let first = api.get("/customers?limit=3").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(ids(&first.body), newest_first[..3]);
    let item = &first.body["items"][0];
    assert_eq!(item["name"], "C6");
    assert_eq!(item["version"], 1);
    assert!(item["email"].as_str().unwrap().ends_with("@example.com"));
    assert!(item["created_at"].is_string());
    let cursor = first.body["next_cursor"].as_str().unwrap().to_owned();

    // A customer registered between two pages is newer than the cursor:
    // the walk goes on where it was, nothing shifts or repeats.
    let late = api.register("Late").await.to_string();
    let second = api
        .get(&format!("/customers?limit=3&cursor={cursor}"))
        .await;
    assert_eq!(ids(&second.body), newest_first[3..6]);
    let cursor = second.body["next_cursor"].as_str().unwrap().to_owned();
    let last = api
        .get(&format!("/customers?cursor={cursor}&limit=3"))
        .await;
    assert_eq!(ids(&last.body), newest_first[6..]);
    assert_eq!(
        last.body["next_cursor"],
        Value::Null,
        "the last page says so"
    );

    // A fresh walk starts with the late one; without a limit, one page of
    // up to 50 holds them all.
    let all = api.get("/customers").await;
    let mut want = vec![late];
    want.extend(newest_first);
    assert_eq!(ids(&all.body), want);
    assert_eq!(all.body["next_cursor"], Value::Null);
    api.stop().await;
}

#[sqlx::test(migrations = false)]
async fn customers_list_limit_is_bounded_and_a_bad_cursor_is_refused(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let mut api = spawn_api(pool).await;
    // 230 customers, straight into the store (the list reads only it).
    sqlx::query(
        "INSERT INTO customers.customers (id, name, email, created_at) \
         SELECT gen_random_uuid(), 'N' || n, 'n' || n || '@example.com', now() - n * interval '1 second' \
         FROM generate_series(1, 230) n",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    let default = api.get("/customers").await;
    assert_eq!(default.body["items"].as_array().unwrap().len(), 50);
    assert_eq!(default.body["items"][0]["name"], "N1", "newest first");
    assert!(default.body["next_cursor"].is_string());
    let max = api.get("/customers?limit=200").await;
    assert_eq!(max.body["items"].as_array().unwrap().len(), 200);
    let rest = api
        .get(&format!(
            "/customers?limit=200&cursor={}",
            max.body["next_cursor"].as_str().unwrap()
        ))
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 30);
    assert_eq!(rest.body["items"][29]["name"], "N230");
    assert_eq!(rest.body["next_cursor"], Value::Null);

    for (query, field) in [
        ("limit=201", "limit"),
        ("limit=0", "limit"),
        ("limit=-5", "limit"),
        ("limit=ten", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=bm90IGEgY3Vyc29y", "cursor"),
    ] {
        let a = api.get(&format!("/customers?{query}")).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert!(
            a.body["error"].as_str().unwrap().starts_with(field),
            "{query}: {a:?}"
        );
    }
    api.stop().await;
}
