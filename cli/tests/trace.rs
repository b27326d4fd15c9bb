//! `warren trace` against what the real services recorded: the demo's
//! orders (a shipped one with a duplicate delivery, a declined one with its
//! compensation, a dead-lettered message) in text, JSON and Mermaid, and
//! wire text escaped on the terminal.

use std::process::{Command, Output};

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Ada's first order in fixtures/demo.jsonl: shipped; its order.placed is
/// delivered twice.
const SHIPPED: &str = "01a1ee56-7958-765a-95e6-0af593bd04cf";
/// Ada's second order: tok_decline, so payment.failed, then cancelled
/// and its stock released.
const DECLINED: &str = "01a1ee56-90c8-76d6-881e-d162ae2eb154";
/// The malformed order.placed (its order_id is not a UUID).
const MALFORMED: &str = "01a1ee56-9c80-714c-be7d-1bfbc7a2ea20";

fn warren(db: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--database-url", db, "--color", "never"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

async fn warren_async(db: String, args: Vec<&'static str>) -> Output {
    tokio::task::spawn_blocking(move || warren(&db, &args))
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)))
}

/// Every event of a story, depth first: (type, its node).
fn walk(story: &Value) -> Vec<&Value> {
    fn go<'a>(n: &'a Value, out: &mut Vec<&'a Value>) {
        out.push(n);
        for c in n["caused"].as_array().unwrap() {
            go(c, out);
        }
    }
    let mut out = Vec::new();
    for r in story["roots"].as_array().unwrap() {
        go(r, &mut out);
    }
    out
}

fn find<'a>(story: &'a Value, ty: &str) -> &'a Value {
    walk(story)
        .into_iter()
        .find(|n| n["type"] == ty)
        .unwrap_or_else(|| panic!("{ty} missing from {story:#}"))
}

fn outcome_of(node: &Value, service: &str) -> Vec<String> {
    node["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == service)
        .map(|s| s["outcome"].as_str().unwrap().to_owned())
        .collect()
}

fn cause_of<'a>(story: &'a Value, ty: &str) -> &'a str {
    find(story, ty)["causation_id"].as_str().unwrap()
}

fn id_of<'a>(story: &'a Value, ty: &str) -> &'a str {
    find(story, ty)["id"].as_str().unwrap()
}

#[tokio::test]
async fn after_the_demo_trace_tells_the_shipped_the_declined_and_the_dead_lettered_stories() {
    let base = format!(
        "warren_tracetest_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("postgres://postgres@127.0.0.1:5432/{base}");
    let demo = warren_async(url.clone(), vec!["demo"]).await;
    assert!(demo.status.success(), "{}", text(&demo.stderr));

    // The shipped order: the whole saga, a chain by causation.
    let shipped = json(
        &warren_async(
            url.clone(),
            vec!["trace", "--demo", SHIPPED, "--format", "json"],
        )
        .await,
    );
    assert_eq!(shipped["matched"], serde_json::json!(["subject"]));
    assert_eq!(shipped["events"], 6, "{shipped:#}");
    let roots = shipped["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0]["type"], "order.placed");
    let chain = [
        "order.placed",
        "stock.reserved",
        "payment.captured",
        "order.confirmed",
        "shipment.dispatched",
        "order.shipped",
    ];
    let types: Vec<&str> = walk(&shipped)
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, chain);
    for pair in chain.windows(2) {
        assert_eq!(cause_of(&shipped, pair[1]), id_of(&shipped, pair[0]));
    }
    // The same story by its correlation id, the root's own id (which the
    // inboxes record as no correlation, inbox version 3), and by the id of
    // an event deep in it.
    for (id, how) in [
        (id_of(&shipped, "order.placed").to_owned(), "correlation"),
        (id_of(&shipped, "order.shipped").to_owned(), "event"),
    ] {
        let args: Vec<&'static str> =
            vec!["trace", "--demo", id.clone().leak(), "--format", "json"];
        let again = json(&warren_async(url.clone(), args).await);
        assert!(
            again["matched"].as_array().unwrap().contains(&how.into()),
            "{id}: {again:#}"
        );
        assert_eq!(again["events"], 6, "{id}: {again:#}");
        let types: Vec<&str> = walk(&again)
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, chain, "{id}");
    }
    let placed = find(&shipped, "order.placed");
    assert_eq!(outcome_of(placed, "inventory"), ["handled", "duplicate"]);
    assert_eq!(outcome_of(placed, "payments"), ["skipped", "duplicate"]);
    assert_eq!(
        outcome_of(find(&shipped, "stock.reserved"), "payments"),
        ["handled"]
    );
    assert_eq!(
        outcome_of(find(&shipped, "order.confirmed"), "shipping"),
        ["handled"]
    );
    assert_eq!(
        outcome_of(find(&shipped, "shipment.dispatched"), "orders"),
        ["handled"]
    );

    let out = warren_async(url.clone(), vec!["trace", "--demo", SHIPPED]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    for needle in [
        "order.placed",
        "└─",
        "shipment.dispatched",
        "order.shipped",
        "inventory  handled",
        "duplicate",
        "correlation 01a1ee56-7d40-738b-b9eb-dacc0cb1e29c",
    ] {
        assert!(t.contains(needle), "{needle} missing from:\n{t}");
    }
    assert!(!t.contains('\x1b'), "--color never: {t}");
    assert!(
        t.lines().all(|l| l == l.trim_end()),
        "no trailing blanks:\n{t}"
    );

    let out = warren_async(
        url.clone(),
        vec!["trace", "--demo", SHIPPED, "--format", "mermaid"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m = text(&out.stdout);
    assert!(m.starts_with("sequenceDiagram\n"), "{m}");
    for needle in [
        "participant shipping",
        "orders->>inventory: order.placed",
        "orders-->>inventory: order.placed duplicate",
        "inventory->>payments: stock.reserved",
        "orders->>shipping: order.confirmed",
        "shipping->>orders: shipment.dispatched",
        "Note over orders: order.shipped no handler",
    ] {
        assert!(m.contains(needle), "{needle} missing from:\n{m}");
    }

    // The declined order: the failure, and the compensation it caused.
    let declined = json(
        &warren_async(
            url.clone(),
            vec!["trace", "--demo", DECLINED, "--format", "json"],
        )
        .await,
    );
    let failed = find(&declined, "payment.failed");
    assert_eq!(
        cause_of(&declined, "payment.failed"),
        id_of(&declined, "stock.reserved")
    );
    assert_eq!(outcome_of(failed, "orders"), ["handled"]);
    assert_eq!(
        cause_of(&declined, "order.cancelled"),
        id_of(&declined, "payment.failed")
    );
    assert_eq!(
        cause_of(&declined, "stock.released"),
        id_of(&declined, "order.cancelled")
    );
    assert_eq!(
        outcome_of(find(&declined, "order.cancelled"), "inventory"),
        ["handled"]
    );
    assert!(walk(&declined)
        .iter()
        .all(|n| n["type"] != "order.confirmed"));
    let out = warren_async(url.clone(), vec!["trace", "--demo", DECLINED]).await;
    let t = text(&out.stdout);
    for needle in ["payment.failed", "order.cancelled", "stock.released"] {
        assert!(t.contains(needle), "{needle} missing from:\n{t}");
    }

    // The malformed message: dead-lettered by every consumer, with its reason.
    let dead = json(
        &warren_async(
            url.clone(),
            vec!["trace", "--demo", MALFORMED, "--format", "json"],
        )
        .await,
    );
    let node = find(&dead, "order.placed");
    for service in ["orders", "inventory", "payments", "shipping"] {
        let steps: Vec<&Value> = node["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["service"] == service)
            .collect();
        assert_eq!(steps.len(), 1, "{node:#}");
        assert_eq!(steps[0]["outcome"], "dead-lettered");
        assert_eq!(steps[0]["reason"], "invalid_data");
        assert!(steps[0]["error"].as_str().unwrap().contains("order_id"));
    }
    let out = warren_async(url.clone(), vec!["trace", "--demo", MALFORMED]).await;
    assert!(
        text(&out.stdout).contains("dead-lettered invalid_data"),
        "{}",
        text(&out.stdout)
    );

    // Something never recorded: invalid input, exit 2, one line.
    let out = warren_async(url.clone(), vec!["trace", "--demo", "no-such-order"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nothing recorded"));

    let admin = PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {base}_demo WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

/// Any publisher chooses the subject, the type and the ids of other
/// systems; what a consumer recorded of them reaches the terminal escaped.
#[sqlx::test(migrations = false)]
async fn trace_escapes_control_characters_from_the_wire_in_text(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let id = Uuid::now_v7();
    let corr = "corr\x07bell";
    sqlx::query(
        "INSERT INTO inventory.inbox (event_id, event_type, source, subject, sequence, correlation_id, event_time) \
         VALUES ($1, 'order.placed', '/warren/or\x1b]0;title\x07ders', 'o\x1b[2Jcleared\nnext', 1, $2, now())",
    )
    .bind(id)
    .bind(corr)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO payments.inbox_outcomes (event_id, event_type, subject, correlation_id, outcome, attempt, reason, error) \
         VALUES ($1, 'order.placed', 'o', $2, 'dead-lettered', 1, 'invalid_data', 'bad \x1b[31mred\r')",
    )
    .bind(id)
    .bind(corr)
    .execute(&pool)
    .await
    .unwrap();
    let o = pool.connect_options();
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    );
    let id = id.to_string();
    let out = tokio::task::spawn_blocking(move || warren(&db, &["trace", &id]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    for c in ['\x1b', '\x07', '\r'] {
        assert!(!t.contains(c), "{c:?} reached the terminal: {t:?}");
    }
    for needle in [
        "o\\u{1b}[2Jcleared\\nnext",
        "or\\u{1b}]0;title\\u{7}ders",
        "correlation corr\\u{7}bell",
        "bad \\u{1b}[31mred\\r",
    ] {
        assert!(t.contains(needle), "{needle} missing from:\n{t}");
    }
}

/// An order in flight: its event committed to the outbox and not yet
/// published (no relay runs here) is in the story as `raised`.
#[sqlx::test(migrations = false)]
async fn trace_shows_an_event_still_in_its_outbox_as_raised(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let order = Uuid::now_v7();
    let data = services::catalog::OrderPlaced {
        order_id: order,
        customer_id: Uuid::now_v7(),
        lines: vec![services::catalog::OrderLine {
            sku: "WIDGET".into(),
            qty: 1,
            unit_price: 100,
        }],
        total: 100,
        payment_token: "tok_ok".into(),
    };
    let mut tx = pool.begin().await.unwrap();
    let event = producers::Outbox::new("orders")
        .unwrap()
        .append(
            &mut tx,
            events::Envelope::new("orders", order.to_string(), &data),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let o = pool.connect_options();
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    );
    let subject = order.to_string();
    let out =
        tokio::task::spawn_blocking(move || warren(&db, &["trace", &subject, "--format", "json"]))
            .await
            .unwrap();
    let story = json(&out);
    let node = find(&story, "order.placed");
    assert_eq!(node["id"], event.id.to_string());
    assert_eq!(node["correlation_id"], event.correlationid.clone().unwrap());
    assert_eq!(outcome_of(node, "orders"), ["raised"]);
}
