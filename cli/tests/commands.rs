//! The `warren` binary against the real services: each command as a user
//! runs it, exit codes included.

use std::process::{Command, Output};
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sqlx::PgPool;
use testkit::TestBus;
use uuid::Uuid;

fn db_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    )
}

fn warren(ns: &str, db: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
    c.args(["--namespace", ns])
        .args(args)
        .env("RUST_LOG", "warn");
    if let Some(db) = db {
        c.args(["--database-url", db]);
    }
    // Not the repository: what a command reads from it must come from its
    // arguments (or be built in, as the demo's story is).
    c.current_dir(std::env::temp_dir());
    c.output().unwrap()
}

async fn warren_async(ns: String, db: Option<String>, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        warren(&ns, db.as_deref(), &a)
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const CUSTOMER: &str = r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#;

#[tokio::test]
async fn publish_validates_against_the_catalog_and_prints_the_id() {
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let ns = bus.namespace.clone();

    let bad = warren_async(
        ns.clone(),
        None,
        vec![
            "publish".into(),
            "order.placed".into(),
            "--data".into(),
            r#"{"order_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","total":"x"}"#.into(),
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    let err = text(&bad.stderr);
    assert!(err.contains("data."), "names the field: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let unknown = warren_async(
        ns.clone(),
        None,
        vec![
            "publish".into(),
            "order.exploded".into(),
            "--data".into(),
            "{}".into(),
        ],
    )
    .await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("unknown event type"));

    let ok = warren_async(
        ns.clone(),
        None,
        vec![
            "publish".into(),
            "customer.registered".into(),
            "--data".into(),
            CUSTOMER.into(),
        ],
    )
    .await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let id: Uuid = text(&ok.stdout).trim().parse().unwrap();
    let seen = tap.next(Duration::from_secs(5)).await.expect("on the bus");
    assert_eq!(seen.event.id, id);
    assert_eq!(
        seen.event.subject, "0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e",
        "subject from customer_id"
    );
    assert_eq!(seen.event.source, "/warren/customers");
}

#[tokio::test]
async fn replay_keeps_ids_reports_bad_lines_and_honours_strict_and_dry_run() {
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let ns = bus.namespace.clone();
    let dir = std::env::temp_dir().join(format!("warren-replay-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = dir.join("f.jsonl");
    let good = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/saga-happy.jsonl"
    ))
    .unwrap();
    std::fs::write(&fixture, format!("{good}{{\"broken\n")).unwrap();
    let f = fixture.to_str().unwrap().to_owned();
    let bad_line = good.lines().count() + 1;

    let dry = warren_async(
        ns.clone(),
        None,
        vec!["replay".into(), f.clone(), "--dry-run".into()],
    )
    .await;
    assert!(dry.status.success());
    assert!(
        text(&dry.stdout).contains("2 valid, 1 invalid"),
        "{}",
        text(&dry.stdout)
    );
    assert!(
        tap.next(Duration::from_millis(500)).await.is_none(),
        "dry run publishes nothing"
    );

    let strict = warren_async(
        ns.clone(),
        None,
        vec!["replay".into(), f.clone(), "--strict".into()],
    )
    .await;
    assert_eq!(strict.status.code(), Some(2));
    assert!(
        text(&strict.stderr).contains(&format!("f.jsonl:{bad_line}: ")),
        "{}",
        text(&strict.stderr)
    );
    assert!(
        tap.next(Duration::from_millis(500)).await.is_none(),
        "strict publishes nothing"
    );

    let mut runs = Vec::new();
    for _ in 0..2 {
        let out = warren_async(ns.clone(), None, vec!["replay".into(), f.clone()]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("published 2, skipped 1 invalid"),
            "{}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stderr).contains(&format!("f.jsonl:{bad_line}: body is not valid JSON")),
            "{}",
            text(&out.stderr)
        );
        let ids: Vec<Uuid> = tap
            .collect(2, Duration::from_secs(5))
            .await
            .iter()
            .map(|t| t.event.id)
            .collect();
        runs.push(ids);
    }
    assert_eq!(runs[0].len(), 2);
    assert_eq!(runs[0], runs[1], "a replay keeps ids");
    std::fs::remove_dir_all(dir).unwrap();
}

#[sqlx::test(migrations = false)]
async fn status_json_reports_queues_and_exits_1_with_dead_letters(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    for s in ["orders", "inventory", "payments", "shipping"] {
        bus.declare_service(s, &["order.placed"], &[]).await;
    }
    let (ns, db) = (bus.namespace.clone(), db_url(&pool));
    let healthy = warren_async(
        ns.clone(),
        Some(db.clone()),
        vec!["status".into(), "--json".into()],
    )
    .await;
    assert!(
        healthy.status.success(),
        "{}{}",
        text(&healthy.stdout),
        text(&healthy.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&healthy.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    assert_eq!(v["services"].as_array().unwrap().len(), 5);

    bus.channel
        .basic_publish(
            "".into(),
            bus.topology.dlq("inventory").into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sick = warren_async(ns, Some(db), vec!["status".into(), "--json".into()]).await;
    assert_eq!(sick.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&sick.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    let inv = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "inventory")
        .unwrap();
    assert_eq!(inv["dead_letters"], 1);
    assert_eq!(inv["queue_depth"], 0);
}

#[tokio::test]
async fn dlq_list_leaves_dead_letters_and_redrive_sends_them_back_clean() {
    let bus = TestBus::new().await;
    bus.declare_service("inventory", &["order.placed"], &[])
        .await;
    let ns = bus.namespace.clone();
    let id = Uuid::now_v7().to_string();
    let mut h = FieldTable::default();
    h.insert(
        "x-warren-reason".into(),
        AMQPValue::LongString("handler_rejected".into()),
    );
    h.insert(
        "x-warren-error".into(),
        AMQPValue::LongString("SKU was unknown".into()),
    );
    h.insert("x-warren-attempt".into(), AMQPValue::LongInt(5));
    h.insert(
        "x-warren-routing-key".into(),
        AMQPValue::LongString("order.placed".into()),
    );
    let props = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_headers(h);
    bus.channel
        .basic_publish(
            "".into(),
            bus.topology.dlq("inventory").into(),
            BasicPublishOptions::default(),
            b"{\"fixed\":true}",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();

    for _ in 0..2 {
        let list = warren_async(
            ns.clone(),
            None,
            vec![
                "dlq".into(),
                "list".into(),
                "--service".into(),
                "inventory".into(),
            ],
        )
        .await;
        assert!(list.status.success(), "{}", text(&list.stderr));
        let out = text(&list.stdout);
        assert!(
            out.contains(&id)
                && out.contains("handler_rejected")
                && out.contains("SKU was unknown"),
            "{out}"
        );
    }

    let redrive = warren_async(
        ns.clone(),
        None,
        vec![
            "dlq".into(),
            "redrive".into(),
            "--service".into(),
            "inventory".into(),
            "--id".into(),
            id.clone(),
        ],
    )
    .await;
    assert!(redrive.status.success(), "{}", text(&redrive.stderr));
    assert!(text(&redrive.stdout).contains("redrove 1"));
    let back = bus
        .channel
        .basic_get(
            bus.topology.queue("inventory").into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("back in the work queue");
    assert_eq!(&back.delivery.data[..], b"{\"fixed\":true}");
    let headers = back
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(!headers.contains_key("x-warren-reason") && !headers.contains_key("x-warren-attempt"));
    assert!(
        headers.contains_key("x-warren-routing-key"),
        "original routing key kept"
    );
    let dlq_left = bus
        .channel
        .basic_get(
            bus.topology.dlq("inventory").into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert!(dlq_left.is_none());
}

#[tokio::test]
async fn tail_json_prints_events_as_they_pass() {
    use std::io::{BufRead, BufReader};
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--namespace",
            &ns,
            "tail",
            "customer.*",
            "--json",
            "--count",
            "1",
            "--timeout",
            "20",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Publish only once tail says its queue is bound.
    let stderr = child.stderr.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("tailing"))
    });
    assert!(ready.await.unwrap(), "tail started");
    let ok = warren_async(
        ns,
        None,
        vec![
            "publish".into(),
            "customer.registered".into(),
            "--data".into(),
            CUSTOMER.into(),
        ],
    )
    .await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let line: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["kind"], "event");
    assert_eq!(line["event"]["id"], text(&ok.stdout).trim());
}

#[test]
fn unreachable_servers_give_one_line_errors_and_exit_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--amqp-url",
            "amqp://guest:secret@127.0.0.1:1/%2f",
            "publish",
            "customer.registered",
            "--data",
            CUSTOMER,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("rabbitmq-server") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("secret"), "password hidden: {err}");
    assert!(!err.contains("panicked"));

    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--database-url",
            "postgres://postgres:secret@127.0.0.1:1/warren",
            "migrate",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("PostgreSQL") && err.contains("127.0.0.1:1") && !err.contains("secret"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test]
async fn migrate_creates_the_database_and_twice_is_harmless() {
    let name = format!(
        "warren_migrate_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    for _ in 0..2 {
        let out = warren_async("unused".into(), Some(url.clone()), vec!["migrate".into()]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let pool = PgPool::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'orders'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(tables >= 5);
    pool.close().await;
    let admin = PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn demo_tells_its_story_and_exits_0_twice() {
    let base = format!(
        "warren_demotest_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("postgres://postgres@127.0.0.1:5432/{base}");
    for _ in 0..2 {
        let out = warren_async("warren".into(), Some(url.clone()), vec!["demo".into()]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        // Connections closed before the runtime goes: no ERROR at the end.
        assert!(
            !text(&out.stderr).contains("ERROR"),
            "{}",
            text(&out.stderr)
        );
        let s = text(&out.stdout);
        for needle in [
            "== consumers",
            "shipped",
            "out of stock",
            "payment failed",
            "invalid_data",
            "dead-lettered",
        ] {
            assert!(s.contains(needle), "{needle} missing from:\n{s}");
        }
        let shipped = s.lines().filter(|l| l.contains(" shipped ")).count();
        assert_eq!(shipped, 3, "{s}");
    }
    let admin = PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {base}_demo WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn bench_runs_every_measurement_and_ends_with_a_json_line(pool: PgPool) {
    // Small sizes: this checks what the report holds, not how fast.
    let out = warren_async(
        "unused".into(),
        Some(db_url(&pool)),
        [
            "bench",
            "--json",
            "--events",
            "300",
            "--rate",
            "100",
            "--seconds",
            "1",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Under --json, standard output is the JSON line alone; the table
    // goes to standard error.
    let stdout = text(&out.stdout);
    assert!(
        text(&out.stderr).contains("ceiling (broker alone)"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let last = stdout.trim().lines().last().unwrap();
    let r: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "ceiling_events_per_s",
        "drain_events_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "latency_max_ms",
        "producer_txn_p50_ms",
        "producer_txn_p99_ms",
        "relay_events_per_batch",
        "relay_confirm_mean_ms",
        "consumer_batch_p50_ms",
        "consumer_batch_p99_ms",
        "rss_mb",
    ] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {last}");
    }
    assert_eq!(r["events"], 300);
    // Every event committed in the latency run was seen handled.
    assert_eq!(r["latency_samples"], 100, "{last}");
    assert!(r["latency_p50_ms"].as_f64() <= r["latency_p99_ms"].as_f64());
    // A stage of an event's trip cannot take longer than the whole trip,
    // and no batch holds fewer than one event.
    assert!(
        r["consumer_batch_p50_ms"].as_f64() <= r["latency_p50_ms"].as_f64(),
        "{last}"
    );
    assert!(r["relay_events_per_batch"].as_f64() >= Some(1.0), "{last}");
    let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_sink.items")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(handled, 300 + 100 + 20, "drain, latency and wake-up events");
}

/// `warren bench --scaling --processes`: each consumer a process of its
/// own, measured from the database; the processes, the queues and the
/// exchange are gone afterwards.
#[sqlx::test(migrations = false)]
async fn bench_scaling_runs_each_consumer_as_a_process_of_its_own(pool: PgPool) {
    let bus = TestBus::new().await;
    let db = db_url(&pool);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["bench", "--scaling", "--processes", "--json"])
            .args(["--events", "200", "--rate", "50", "--seconds", "2"])
            .args([
                "--consumers",
                "2",
                "--partitions",
                "2",
                "--database-url",
                &db,
            ])
            // The run's namespace, from its first line.
            .env("RUST_LOG", "warn,warren_cli::scaling=info")
            .env("NO_COLOR", "1")
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = text(&out.stdout);
    let rows: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).unwrap();
    let shape: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["layout"].as_str().unwrap().to_owned(),
                r["consumers"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("competing", 1),
            ("competing", 2),
            ("partitioned", 1),
            ("partitioned", 2)
        ]
        .map(|(l, n)| (l.to_owned(), n)),
        "{stdout}"
    );
    for r in &rows {
        assert_eq!(r["mode"], "processes", "{r}");
        assert!(
            r["drain_events_per_s"].as_f64().is_some_and(|v| v > 0.0),
            "{r}"
        );
        assert_eq!(r["lost"], 0, "{r}");
        // Every latency event found in the inbox; none stamped in-process.
        assert_eq!(r["inbox_samples"], 100, "{r}");
        assert!(
            r["inbox_p50_ms"].as_f64() <= r["inbox_p99_ms"].as_f64(),
            "{r}"
        );
        assert!(r["latency_p50_ms"].is_null(), "{r}");
    }
    let ns = stderr
        .split("namespace=")
        .nth(1)
        .map(|rest| {
            rest.trim_start_matches('"')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .expect("the namespace in the log");
    assert!(ns.starts_with("bench-"), "{ns}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("--scaling-sink") && c.contains(&ns))
        .collect();
    assert!(left.is_empty(), "consumer processes left: {left:?}");
    for q in ["", ".dlq", ".p0", ".p1"].map(|s| format!("{ns}.bench_sink{s}")) {
        // A channel per probe: a failed passive declare closes its channel.
        let ch = bus.conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await;
        assert!(found.is_err(), "{q} left behind");
    }
}
