//! Outgrowing one machine, as a user sees it from the command line:
//! several broker URLs in `AMQP_URL`, and a database per service.

use std::process::{Command, Output};

use sqlx::PgPool;
use testkit::TestBus;

fn db_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `warren` with `env` set and `RUST_LOG=warn` (so the line about a
/// node that did not answer is printed too).
async fn warren(env: Vec<(&'static str, String)>, args: Vec<&'static str>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
        c.args(args).env("RUST_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

/// A port that accepts connections and closes them at once.
async fn closing_port() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    (port, task)
}

const CUSTOMER: &str = r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#;

#[tokio::test]
async fn no_node_of_a_broker_list_answering_is_one_line_naming_each_without_passwords() {
    let (p1, t1) = closing_port().await;
    let list = format!(
        "amqp://guest:first-secret@127.0.0.1:{p1}/%2f,amqp://guest:second-secret@127.0.0.1:1/%2f"
    );
    let out = warren(
        vec![("AMQP_URL", list)],
        vec!["publish", "customer.registered", "--data", CUSTOMER],
    )
    .await;
    t1.abort();
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        !stdout.contains("secret") && !stderr.contains("secret"),
        "{stdout}{stderr}"
    );
    let last = stderr.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("no RabbitMQ node answered (2 tried)"),
        "{stderr}"
    );
    assert!(
        last.contains(&format!("guest:***@127.0.0.1:{p1}")),
        "{stderr}"
    );
    assert!(last.contains("guest:***@127.0.0.1:1/"), "{stderr}");
}

#[sqlx::test(migrations = false)]
async fn status_on_a_broker_list_with_a_dead_node_reports_and_never_prints_a_password(
    pool: PgPool,
) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    for s in ["orders", "inventory", "payments", "shipping"] {
        bus.declare_service(s, &["order.placed"], &[]).await;
    }
    let (port, task) = closing_port().await;
    // The real broker's password is `guest`: it must not show either.
    let list = format!(
        "amqp://guest:dead-secret@127.0.0.1:{port}/%2f,amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    let mut tried_dead_node = false;
    // Shuffled: until a run drew the dead node first (even odds each).
    for _ in 0..12 {
        let out = warren(
            vec![
                ("AMQP_URL", list.clone()),
                ("DATABASE_URL", db_url(&pool)),
                ("WARREN_NAMESPACE", bus.namespace.clone()),
            ],
            vec!["status"],
        )
        .await;
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{stdout}{stderr}");
        for shown in [&stdout, &stderr] {
            assert!(!shown.contains("secret"), "{shown}");
            assert!(!shown.contains("guest:guest"), "{shown}");
        }
        assert!(
            stdout.contains("connected to amqp://guest:***@127.0.0.1:5672/%2f"),
            "{stdout}"
        );
        if stderr.contains("did not answer") {
            assert!(
                stderr.contains(&format!("guest:***@127.0.0.1:{port}")),
                "{stderr}"
            );
            tried_dead_node = true;
            break;
        }
    }
    task.abort();
    assert!(tried_dead_node, "the dead node was never drawn first");
}

/// Orders on a database of its own (here a second database on the same
/// server; the cluster drill uses a second PostgreSQL server), the rest on
/// DATABASE_URL's: `warren migrate` puts each service's tables where it
/// lives, a saga completes across the two, and `warren status` names both.
#[sqlx::test(migrations = false)]
async fn orders_on_a_database_of_its_own_completes_a_saga_and_status_names_both(pool: PgPool) {
    let shared_url = db_url(&pool);
    // PostgreSQL truncates names to 63 bytes: sqlx's test names are long.
    let orders_name = format!(
        "warren_orders_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let orders_url = format!("postgres://postgres@127.0.0.1:5432/{orders_name}");
    let admin = PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{orders_name}\""))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{orders_name}\""))
        .execute(&admin)
        .await
        .unwrap();
    let env = |ns: &str| {
        vec![
            ("DATABASE_URL", shared_url.clone()),
            ("WARREN_ORDERS_DATABASE_URL", orders_url.clone()),
            ("WARREN_NAMESPACE", ns.to_owned()),
        ]
    };

    let bus = TestBus::new().await;
    let migrated = warren(env(&bus.namespace), vec!["migrate", "--json"]).await;
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    let m: serde_json::Value = serde_json::from_slice(&migrated.stdout).unwrap();
    let dbs = m["databases"].as_array().unwrap();
    assert_eq!(dbs.len(), 2, "{m}");
    assert_eq!(dbs[1]["services"], serde_json::json!(["orders"]), "{m}");

    let orders_pool = PgPool::connect(&orders_url).await.unwrap();
    let outbox_in = |p: &PgPool| {
        let p = p.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass('orders.outbox') IS NOT NULL")
                .fetch_one(&p)
                .await
                .unwrap()
        }
    };
    assert!(
        outbox_in(&orders_pool).await,
        "orders' outbox where orders lives"
    );
    assert!(!outbox_in(&pool).await, "and not in the shared database");

    // A pool large enough for four services' lanes, relays and the
    // gateway (the test's own pool is small).
    let shared_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(30)
        .connect(&shared_url)
        .await
        .unwrap();
    let stores = services::Stores::new(shared_url.clone(), shared_pool.clone()).with(
        "orders",
        orders_url.clone(),
        orders_pool.clone(),
    );
    let subscription = consumers::SubscriptionConfig {
        lanes: 2,
        retry: consumers::RetryPolicy {
            initial: std::time::Duration::from_millis(100),
            max: std::time::Duration::from_millis(500),
            defer_delay: std::time::Duration::from_millis(100),
            ..Default::default()
        },
        ..Default::default()
    };
    for s in services::ALL {
        bus.remember(s, &subscription.retry.delays());
    }
    let app = services::App::start(
        stores,
        services::AppConfig {
            amqp_url: testkit::amqp_url(),
            topology: bus.topology.clone(),
            services: services::ALL.iter().map(|s| s.to_string()).collect(),
            http: Some("127.0.0.1:0".parse().unwrap()),
            subscription,
            relay: producers::RelayConfig {
                poll_interval: std::time::Duration::from_millis(200),
                ..Default::default()
            },
            gateway: services::gateway::GatewayConfig {
                latency: std::time::Duration::from_millis(1),
                ..Default::default()
            },
            partitions: Default::default(),
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", app.http_addr.unwrap());
    let http = reqwest::Client::new();
    let stock = http
        .put(format!("{base}/stock/SKU-1"))
        .json(&serde_json::json!({ "on_hand": 5 }))
        .send()
        .await
        .unwrap();
    assert!(stock.status().is_success());
    let customer: serde_json::Value = http
        .post(format!("{base}/customers"))
        .json(&serde_json::json!({ "name": "Ada", "email": "ada@example.com" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let customer = customer["id"].as_str().unwrap().to_owned();
    let mut known = false;
    for _ in 0..200 {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders.customers WHERE id = $1::uuid")
                .bind(&customer)
                .fetch_one(&orders_pool)
                .await
                .unwrap();
        if n == 1 {
            known = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(known, "orders (on its own database) heard of the customer");
    let order: serde_json::Value = http
        .post(format!("{base}/orders"))
        .json(&serde_json::json!({
            "customer_id": customer,
            "lines": [{ "sku": "SKU-1", "qty": 2, "unit_price": 1250 }],
            "payment_token": "tok_ok",
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let order = order["id"].as_str().unwrap().to_owned();
    let mut status = String::new();
    for _ in 0..300 {
        let body: serde_json::Value = http
            .get(format!("{base}/orders/{order}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status = body["status"].as_str().unwrap_or("").to_owned();
        if status == "shipped" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, "shipped", "the saga completed across two databases");
    let count = |p: &PgPool, sql: &'static str| {
        let p = p.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&p)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count(&orders_pool, "SELECT count(*) FROM orders.orders").await,
        1
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM orders.orders").await, 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM shipping.shipments").await,
        1
    );
    assert_eq!(
        count(
            &pool,
            "SELECT reserved::bigint FROM inventory.stock WHERE sku = 'SKU-1'"
        )
        .await,
        0
    );

    let reported = warren(env(&bus.namespace), vec!["status", "--json"]).await;
    app.stop().await;
    shared_pool.close().await;
    let s: serde_json::Value = serde_json::from_slice(&reported.stdout)
        .unwrap_or_else(|_| panic!("{}{}", text(&reported.stdout), text(&reported.stderr)));
    for svc in s["services"].as_array().unwrap() {
        let db = svc["database"].as_str().unwrap();
        if svc["service"] == "orders" {
            assert!(db.ends_with(&format!("/{orders_name}")), "{s}");
        } else {
            assert!(
                !db.ends_with(&format!("/{orders_name}"))
                    && db.ends_with(pool.connect_options().get_database().unwrap()),
                "{s}"
            );
        }
    }
    let table = warren(env(&bus.namespace), vec!["status"]).await;
    let shown = text(&table.stdout);
    assert!(
        shown.contains(&format!("/{orders_name}: orders")),
        "{shown}"
    );

    orders_pool.close().await;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{orders_name}\" WITH (FORCE)"
    ))
    .execute(&admin)
    .await
    .unwrap();
}
