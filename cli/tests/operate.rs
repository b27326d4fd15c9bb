//! Operating warren with the real binary against the real broker: dead
//! letters across services, teardown, closed pipes, `--json` purity,
//! signals removing throwaway namespaces, and quiet exits.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
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

fn warren_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
    c.args(["--namespace", ns])
        .args(args)
        .env("RUST_LOG", "warn");
    c
}

async fn warren(ns: &str, args: &[&str]) -> Output {
    let mut c = warren_cmd(ns, args);
    c.stdin(Stdio::null());
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `queue` exists (a passive declare on a channel of its own).
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ok = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    if ok {
        let _ = ch.close(200, "probe".into()).await;
    }
    ok
}

/// Puts a dead letter as the forwarder writes it into `service`'s DLQ;
/// returns its id.
async fn dead_letter(
    bus: &TestBus,
    service: &str,
    reason: &str,
    event_type: &str,
    at: &str,
) -> String {
    let mut h = FieldTable::default();
    for (k, v) in [
        ("x-warren-reason", reason),
        ("x-warren-error", "it broke"),
        ("x-warren-routing-key", event_type),
        ("x-warren-service", service),
        ("x-warren-dead-lettered-at", at),
    ] {
        h.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    h.insert("x-warren-attempt".into(), AMQPValue::LongInt(1));
    let id = Uuid::now_v7().to_string();
    let props = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_headers(h);
    bus.channel
        .basic_publish(
            "".into(),
            bus.topology.dlq(service).into(),
            BasicPublishOptions::default(),
            b"{}",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    id
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}\nstderr: {}",
            text(&o.stdout),
            text(&o.stderr)
        )
    })
}

#[tokio::test]
async fn dlq_groups_across_services_browses_safely_and_filters_redrive_and_purge() {
    let bus = TestBus::new().await;
    bus.declare_service("orders", &["order.placed"], &[]).await;
    // inventory's DLQ with a delivery limit of 1, as brokers from 4.0 give
    // every quorum queue by default (20): a browse that hands letters back
    // (requeue) would make this broker drop them on the second pass.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1));
    args.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in [
        bus.topology.dlq("inventory"),
        bus.topology.queue("inventory"),
    ] {
        bus.channel
            .queue_declare(q.as_str().into(), durable, args.clone())
            .await
            .unwrap();
    }
    bus.remember("inventory", &[]);
    let ns = bus.namespace.clone();
    dead_letter(
        &bus,
        "inventory",
        "handler_rejected",
        "order.placed",
        "2026-01-01T10:00:00Z",
    )
    .await;
    dead_letter(
        &bus,
        "inventory",
        "handler_rejected",
        "order.placed",
        "2026-01-02T10:00:00Z",
    )
    .await;
    dead_letter(
        &bus,
        "inventory",
        "invalid_data",
        "payment.failed",
        "2026-01-03T10:00:00Z",
    )
    .await;
    let exhausted = dead_letter(
        &bus,
        "orders",
        "retries_exhausted",
        "order.placed",
        "2026-01-04T10:00:00Z",
    )
    .await;

    // Three full browses: nothing is lost, and the groups are right.
    for _ in 0..3 {
        let out = warren(&ns, &["dlq", "--json"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v = json(&out);
        assert_eq!(v["total"], 4, "{v}");
        let groups = v["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 3, "{v}");
        let rejected = groups
            .iter()
            .find(|g| g["reason"] == "handler_rejected")
            .unwrap();
        assert_eq!(rejected["service"], "inventory");
        assert_eq!(rejected["event_type"], "order.placed");
        assert_eq!(rejected["count"], 2);
        assert_eq!(rejected["oldest"], "2026-01-01T10:00:00Z");
        assert_eq!(rejected["newest"], "2026-01-02T10:00:00Z");
    }
    let text_summary = warren(&ns, &["dlq", "--service", "orders"]).await;
    let s = text(&text_summary.stdout);
    assert!(
        s.contains("retries_exhausted") && !s.contains("handler_rejected"),
        "{s}"
    );

    // list --count bounds the browse.
    let listed = warren(&ns, &["dlq", "list", "--count", "2", "--json"]).await;
    assert_eq!(
        text(&listed.stdout).lines().count(),
        2,
        "{}",
        text(&listed.stdout)
    );

    // Redrive by reason: the dry run moves nothing, the real one moves two.
    let dry = warren(
        &ns,
        &[
            "dlq",
            "redrive",
            "--reason",
            "handler_rejected",
            "--dry-run",
            "--json",
        ],
    )
    .await;
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert_eq!(json(&dry)["total"], 2);
    let work = bus.topology.queue("inventory");
    let empty = bus
        .channel
        .basic_get(work.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(empty.is_none(), "a dry run sends nothing");
    let moved = warren(
        &ns,
        &["dlq", "redrive", "--reason", "handler_rejected", "--json"],
    )
    .await;
    assert_eq!(json(&moved)["total"], 2, "{}", text(&moved.stderr));
    for _ in 0..2 {
        let back = bus
            .channel
            .basic_get(work.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("redriven into the work queue");
        let h = back
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        assert!(!h.contains_key("x-warren-reason"));
    }

    // Purge by type: refused without a terminal or --yes, then done.
    let refused = warren(&ns, &["dlq", "purge", "--type", "payment.failed"]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("--yes"));
    let purged = warren(
        &ns,
        &[
            "dlq",
            "purge",
            "--type",
            "payment.failed",
            "--yes",
            "--json",
        ],
    )
    .await;
    assert_eq!(json(&purged)["total"], 1, "{}", text(&purged.stderr));

    let left = json(&warren(&ns, &["dlq", "--json"]).await);
    assert_eq!(left["total"], 1, "{left}");
    assert_eq!(left["groups"][0]["reason"], "retries_exhausted");

    // show: one JSON document, the body inline, found across services.
    let shown = warren(&ns, &["dlq", "show", &exhausted]).await;
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let v = json(&shown);
    assert_eq!(v["id"], exhausted.as_str(), "{v}");
    assert_eq!(v["service"], "orders", "{v}");
    assert_eq!(v["reason"], "retries_exhausted", "{v}");
    assert_eq!(v["body"], serde_json::json!({}), "{v}");
    let missing = warren(&ns, &["dlq", "show", "no-such-id"]).await;
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing.stderr));
    let still = json(&warren(&ns, &["dlq", "--json"]).await);
    assert_eq!(still["total"], 1, "show keeps the letter: {still}");
}

#[tokio::test]
async fn teardown_removes_a_namespace_and_refuses_the_default_one() {
    let bus = TestBus::new().await;
    let delays = [Duration::from_millis(1500)];
    bus.declare_service("payments", &["order.placed"], &delays)
        .await;
    let ns = bus.namespace.clone();
    let out = warren(&ns, &["teardown", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json(&out);
    let queues: Vec<&str> = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q[0].as_str().unwrap())
        .collect();
    for q in [
        bus.topology.queue("payments"),
        bus.topology.dlq("payments"),
        bus.topology.retry_queue("payments", delays[0]),
    ] {
        assert!(queues.contains(&q.as_str()), "{q} in {v}");
        assert!(!exists(&bus.conn, &q).await, "{q} still there");
    }
    assert!(v["exchanges"]
        .as_array()
        .unwrap()
        .contains(&bus.topology.exchange().into()));

    let refused = warren("warren", &["teardown"]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused.stderr)
    );
}

#[sqlx::test(migrations = false)]
async fn a_closed_stdout_ends_status_and_tail_with_0_and_no_panic(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let db = db_url(&pool);

    // `warren status | head -0`: the reader is gone before the first line.
    let mut status = warren_cmd(&ns, &["status", "--database-url", &db])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(status.stdout.take());
    let out = tokio::task::spawn_blocking(move || status.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );

    // `warren tail | head -1`: one line read, then the pipe closes.
    let mut tail = warren_cmd(&ns, &["tail", "--json", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first).unwrap();
        first // the pipe closes when the reader drops here
    });
    let publish = |n: usize| {
        let ns = ns.clone();
        async move {
            for _ in 0..n {
                let out = warren(
                    &ns,
                    &[
                        "publish",
                        "customer.registered",
                        "--data",
                        r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#,
                    ],
                )
                .await;
                // Unroutable until tail's queue is bound: that is fine.
                let _ = out;
            }
        }
    };
    // Tail needs a moment to bind its queue: publish until it saw one.
    let started = Instant::now();
    while !reader.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tail saw nothing"
        );
        publish(1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let first = reader.join().unwrap();
    assert!(first.contains("\"kind\":\"event\""), "{first}");
    publish(2).await;
    let out = tokio::task::spawn_blocking(move || tail.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}

#[sqlx::test(migrations = false)]
async fn status_json_is_pure_and_names_the_brokers_health_or_its_absence(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let db = db_url(&pool);
    let out = warren(&bus.namespace, &["status", "--json", "--database-url", &db]).await;
    let v = json(&out);
    assert!(
        v["broker"]["file_descriptors_used"].as_u64().is_some(),
        "{v}"
    );
    assert!(v["broker"]["alarms"].is_array(), "{v}");

    // Without rabbitmqctl: still a report, saying why the broker part is missing.
    let mut c = warren_cmd(&bus.namespace, &["status", "--json", "--database-url", &db]);
    c.env("WARREN_RABBITMQCTL", "/nonexistent/rabbitmqctl");
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let v = json(&out);
    assert!(v["broker"].is_null(), "{v}");
    assert!(
        v["broker_unavailable"]
            .as_str()
            .unwrap()
            .contains("rabbitmqctl"),
        "{v}"
    );
    assert_eq!(v["services"].as_array().unwrap().len(), 5);
}

/// Runs `c` with logs at `info`, uncoloured, and returns its stderr.
async fn stderr_of(mut c: Command) -> (Output, String) {
    c.env("RUST_LOG", "info").env("NO_COLOR", "1");
    c.stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let err = text(&out.stderr);
    (out, err)
}

/// Every command closes its broker connections (and waits for lapin's I/O
/// thread) before the runtime goes: otherwise lapin logs `ERROR io_loop …
/// Tokio context … being shutdown`, which an operator reads as a failure.
/// The race is lost only now and then, so each short command runs three
/// times.
#[sqlx::test(migrations = false)]
async fn commands_end_without_an_error_line(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    // `warren run orders` below declares them (without the tests'
    // x-expires); removed when the bus drops, if teardown did not.
    bus.remember("orders", &consumers::RetryPolicy::default().delays());
    // Somewhere for the replayed events to go.
    let _tap = bus.wiretap("#").await;
    let db = db_url(&pool);
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/saga-happy.jsonl");
    let customer = r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#;
    for _ in 0..3 {
        for args in [
            vec!["status", "--database-url", &db],
            vec!["replay", fixture, "--json"],
            vec!["publish", "customer.registered", "--data", customer],
            vec!["dlq", "--json"],
            vec!["dlq", "list"],
            vec!["dlq", "redrive", "--dry-run"],
            vec!["migrate", "--database-url", &db],
        ] {
            let (out, err) = stderr_of(warren_cmd(&bus.namespace, &args)).await;
            // status exits 1 here (no service runs): unhealthy, not broken.
            assert!(
                out.status.success() || args[0] == "status",
                "{args:?}: {err}"
            );
            assert!(!err.contains("ERROR"), "{args:?}: {err}");
        }
    }

    // A long-running one, stopped as an operator stops it.
    let child = warren_cmd(
        &bus.namespace,
        &[
            "run",
            "orders",
            "--database-url",
            &db,
            "--http",
            "127.0.0.1:0",
        ],
    )
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("warren running") {
                break;
            }
        }
        signal(&child, "-INT");
        for line in lines {
            seen.push_str(&line.unwrap());
            seen.push('\n');
        }
        (child.wait().unwrap(), seen)
    })
    .await
    .unwrap();
    let (status, err) = out;
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("stopped cleanly"), "{err}");
    assert!(!err.contains("ERROR"), "{err}");

    // teardown last: it removes the namespace.
    let (out, err) = stderr_of(warren_cmd(&bus.namespace, &["teardown"])).await;
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("ERROR"), "{err}");
}

#[tokio::test]
async fn publish_and_replay_read_standard_input() {
    let bus = TestBus::new().await;
    let mut tap = bus.wiretap("#").await;
    let run = |args: Vec<&'static str>, input: String| {
        let mut c = warren_cmd(&bus.namespace, &args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        async move {
            tokio::task::spawn_blocking(move || {
                let mut child = c.spawn().unwrap();
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                child.wait_with_output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    let customer = r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#;
    let out = run(
        vec!["publish", "customer.registered", "--data", "-"],
        customer.into(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id: Uuid = text(&out.stdout).trim().parse().unwrap();
    assert_eq!(tap.next(Duration::from_secs(5)).await.unwrap().event.id, id);

    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/saga-happy.jsonl"
    ))
    .unwrap();
    let out = run(vec!["replay", "-", "--json"], fixture).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = json(&out);
    assert!(summary["valid"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["published"], summary["valid"], "{summary}");
}

#[test]
fn help_documents_exit_codes_and_completions_are_generated() {
    let help = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--help")
        .output()
        .unwrap();
    let h = text(&help.stdout);
    assert!(h.contains("Exit codes") && h.contains("130"), "{h}");
    let bad = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["dlq", "list", "--service", "customers"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "services are a value enum");
    // Every place a service or a format is named: a value enum, so `--help`
    // lists the choices and clap refuses others (exit 2) before anything
    // connects.
    for (args, bad) in [
        (&["run"][..], &["run", "billing"][..]),
        (&["setup"][..], &["setup", "billing"][..]),
        (
            &["replay"][..],
            &["replay", "x.jsonl", "--to", "customers"][..],
        ),
        (&["dlq", "list"][..], &["dlq", "--service", "billing"][..]),
        (
            &["dlq", "show"][..],
            &["dlq", "show", "x", "--service", "billing"][..],
        ),
        (&["status"][..], &["--log-format", "xml", "status"][..]),
        (
            &["bench"][..],
            &["bench", "--publish", "carrier-pigeon"][..],
        ),
    ] {
        let mut with_help = args.to_vec();
        with_help.push("--help");
        let help = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(&with_help)
            .output()
            .unwrap();
        let h = text(&help.stdout);
        assert!(
            h.to_lowercase().contains("possible values"),
            "{args:?}: {h}"
        );
        let refused = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(2), "{bad:?}");
        assert!(
            text(&refused.stderr).contains("invalid value"),
            "{bad:?}: {}",
            text(&refused.stderr)
        );
    }
    let bash = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(bash.status.success());
    assert!(text(&bash.stdout).contains("teardown"));
    // NO_COLOR wins over CLICOLOR_FORCE: no escape sequence reaches a pipe.
    let plain = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--help"])
        .env("CLICOLOR_FORCE", "1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!text(&plain.stdout).contains('\x1b'));
}

/// Waits until `queue` exists, up to `limit`.
async fn until_exists(conn: &Connection, queue: &str, limit: Duration) {
    let started = Instant::now();
    while !exists(conn, queue).await {
        assert!(started.elapsed() < limit, "{queue} never appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `child`'s stderr until a line holds `key=VALUE`, returns VALUE.
fn field_in_stderr(child: &mut std::process::Child, key: &str) -> String {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let needle = format!("{key}=");
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(at) = line.find(&needle) {
            let rest = line[at + needle.len()..].trim_start_matches('"');
            let value: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return value;
        }
    }
    panic!("no {key}= in stderr");
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn an_interrupted_demo_and_a_terminated_bench_leave_no_queue_behind() {
    let bus = TestBus::new().await;
    let base = format!(
        "warren_sigtest_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("postgres://postgres@127.0.0.1:5432/{base}");
    for (command, key, sig, probe) in [
        (&["demo"][..], "namespace", "-INT", "orders"),
        (
            &["bench", "--events", "300", "--seconds", "30"][..],
            "namespace",
            "-TERM",
            "bench_sink",
        ),
    ] {
        let mut args = command.to_vec();
        args.extend(["--database-url", &url]);
        let child = warren_cmd("sigtest", &args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (mut child, ns) = tokio::task::spawn_blocking(move || {
            let mut child = child;
            let ns = field_in_stderr(&mut child, key);
            (child, ns)
        })
        .await
        .unwrap();
        let work = format!("{ns}.{probe}");
        until_exists(&bus.conn, &work, Duration::from_secs(60)).await;
        signal(&child, sig);
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(130), "{command:?}");
        for q in [work.clone(), format!("{work}.dlq")] {
            assert!(!exists(&bus.conn, &q).await, "{command:?}: {q} left behind");
        }
    }
    let admin = PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    for db in [base.clone(), format!("{base}_demo")] {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
    }
}

/// `warren run --queue-expires-secs` (the fault drills' namespaces): the
/// broker is told to delete the queues once they go unused.
#[sqlx::test(migrations = false)]
async fn run_can_declare_a_throwaway_namespace_that_expires(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    bus.remember("shipping", &consumers::RetryPolicy::default().delays());
    let db = db_url(&pool);
    let child = warren_cmd(
        &bus.namespace,
        &[
            "run",
            "shipping",
            "--database-url",
            &db,
            "--http",
            "127.0.0.1:0",
            "--queue-expires-secs",
            "600",
        ],
    )
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("warren running") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        child
    })
    .await
    .unwrap();
    let listed = Command::new("rabbitmqctl")
        .args(["list_queues", "name", "arguments", "--formatter", "json"])
        .output()
        .unwrap();
    signal(&child, "-INT");
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let queues: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let prefix = format!("{}.shipping", bus.namespace);
    let ours: Vec<&serde_json::Value> = queues
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["name"].as_str().unwrap().starts_with(&prefix))
        .collect();
    assert_eq!(ours.len(), 7, "work, five tiers, dlq: {ours:?}");
    for q in ours {
        // rabbitmqctl's JSON gives arguments as [name, type, value].
        let expires = q["arguments"]
            .as_array()
            .and_then(|a| a.iter().find(|kv| kv[0] == "x-expires"))
            .map(|kv| kv[2].clone());
        assert_eq!(expires, Some(serde_json::json!(600_000)), "{q}");
    }
}

/// `warren tail` with one event, under a colour setting: its stdout.
async fn tail_one(ns: &str, global: &[&str], env: &[(&str, &str)]) -> String {
    let mut args = global.to_vec();
    args.extend(["tail", "--no-outcomes", "--count", "1", "--timeout", "30"]);
    let mut c = warren_cmd(ns, &args);
    c.env_remove("NO_COLOR").env_remove("CLICOLOR_FORCE");
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    // Tail binds its queue after it starts: publish until it saw one.
    let started = Instant::now();
    while !waiting.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tail saw nothing"
        );
        let _ = warren(
            ns,
            &[
                "publish",
                "customer.registered",
                "--data",
                r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#,
            ],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = waiting.await.unwrap();
    assert!(out.status.success());
    text(&out.stdout)
}

#[tokio::test]
async fn tail_colours_follow_color_and_no_color() {
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let esc = '\x1b';
    let always = tail_one(&ns, &["--color", "always"], &[]).await;
    assert!(
        always.contains(esc) && always.contains("customer.registered"),
        "{always:?}"
    );
    let never = tail_one(&ns, &["--color", "never"], &[("CLICOLOR_FORCE", "1")]).await;
    assert!(
        !never.contains(esc) && never.contains("customer.registered"),
        "{never:?}"
    );
    // auto: not a terminal, so none; CLICOLOR_FORCE forces it, NO_COLOR wins.
    let piped = tail_one(&ns, &[], &[]).await;
    assert!(!piped.contains(esc), "{piped:?}");
    let forced = tail_one(&ns, &[], &[("CLICOLOR_FORCE", "1")]).await;
    assert!(forced.contains(esc), "{forced:?}");
    let no_color = tail_one(&ns, &[], &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")]).await;
    assert!(!no_color.contains(esc), "{no_color:?}");
}
