//! `warren tail` as a user runs it, against the real broker (and, for
//! outcomes, the real services): filters, the correlation on every line,
//! escaped wire text, colours only when asked, and fixture lines that
//! `warren replay -` takes back.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use consumers::SubscriptionConfig;
use producers::RelayConfig;
use serde_json::Value;
use services::gateway::GatewayConfig;
use services::{App, AppConfig};
use sqlx::PgPool;
use testkit::{amqp_url, TestBus};
use uuid::Uuid;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts `warren tail` and returns once its queues are bound.
async fn tail(ns: &str, args: &[&str], envs: &[(&str, &str)]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--namespace", ns, "tail", "--timeout", "60"])
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("tailing"))
    });
    assert!(ready.await.unwrap(), "tail started");
    child
}

async fn finish(child: Child) -> Vec<String> {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

async fn publish(ns: &str, args: Vec<String>) -> String {
    let ns = ns.to_owned();
    let out: Output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["--namespace", &ns, "publish"])
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn customer(ty: &str, id: Uuid, subject: &str) -> Vec<String> {
    vec![
        ty.into(),
        "--data".into(),
        format!(r#"{{"customer_id":"{id}","name":"Ada","email":"ada@example.com"}}"#),
        "--subject".into(),
        subject.into(),
    ]
}

#[tokio::test]
async fn tail_fixture_lines_go_back_through_replay_from_standard_input() {
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let fixture = tail(
        &ns,
        &["customer.*", "--format", "fixture", "--count", "2"],
        &[],
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = Uuid::now_v7();
        ids.push(publish(&ns, customer("customer.registered", id, &id.to_string())).await);
    }
    let lines = finish(fixture).await;
    assert_eq!(lines.len(), 2, "{lines:?}");

    // Replay those lines from standard input while a second tail watches:
    // the same events (ids kept) pass again.
    let watch = tail(&ns, &["customer.*", "--json", "--count", "2"], &[]).await;
    let mut replay = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--namespace", &ns, "replay", "-"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    replay
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .unwrap();
    let replayed = tokio::task::spawn_blocking(move || replay.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    let seen: Vec<String> = finish(watch)
        .await
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["event"]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn tail_escapes_wire_text_and_colours_only_when_asked() {
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let args = ["customer.*", "--count", "1"];
    let plain = tail(&ns, &args, &[]).await;
    let no_color = tail(&ns, &args, &[("NO_COLOR", "1")]).await;
    let mut always_args = args.to_vec();
    always_args.extend(["--color", "always"]);
    let always = tail(&ns, &always_args, &[]).await;
    let id = Uuid::now_v7();
    let event = publish(&ns, customer("customer.registered", id, "a\x1b[2Jb\nc")).await;
    for (child, colours) in [(plain, false), (no_color, false), (always, true)] {
        let lines = finish(child).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert!(l.contains("subject=a\\u{1b}[2Jb\\nc"), "{l:?}");
        assert!(l.contains(&format!("corr={event}")), "{l:?}");
        assert!(!l.contains("\x1b[2J"), "{l:?}");
        assert_eq!(l.contains('\x1b'), colours, "{l:?}");
    }
}

#[sqlx::test(migrations = false)]
async fn tail_filters_events_and_outcomes_by_type_service_subject_and_correlation(pool: PgPool) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let ns = bus.namespace.clone();
    let subscription = SubscriptionConfig::default();
    bus.remember("orders", &subscription.retry.delays());
    let app = App::start(
        pool.clone(),
        AppConfig {
            amqp_url: amqp_url(),
            topology: bus.topology.clone(),
            services: vec!["orders".into()],
            http: None,
            subscription,
            relay: RelayConfig::default(),
            gateway: GatewayConfig::default(),
            partitions: Default::default(),
        },
    )
    .await
    .unwrap();

    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    let (a_s, b_s) = (a.to_string(), b.to_string());
    // A's registration gets this id, hence this correlation id.
    let c = Uuid::now_v7().to_string();
    // Each tail stops at its count; B's event and outcome come first, so
    // anything let through wrongly would be among the lines read.
    let by_subject = tail(&ns, &["--subject", &a_s, "--count", "2"], &[]).await;
    let by_service = tail(&ns, &["--service", "orders", "--json", "--count", "1"], &[]).await;
    let by_type = tail(
        &ns,
        &["--type", "customer.updated", "--json", "--count", "2"],
        &[],
    )
    .await;
    let by_corr = tail(&ns, &["--correlation", &c, "--json", "--count", "2"], &[]).await;
    let handled = |id: Uuid, name: &'static str| {
        let pool = pool.clone();
        async move {
            for _ in 0..400 {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM orders.customers WHERE id = $1 AND name = $2",
                )
                .bind(id)
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap();
                if n > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("orders never handled {id}");
        }
    };
    publish(&ns, customer("customer.registered", b, &b_s)).await;
    handled(b, "Ada").await;
    let mut registered = customer("customer.registered", a, &a_s);
    registered.extend(["--id".into(), c.clone()]);
    assert_eq!(publish(&ns, registered).await, c);
    handled(a, "Ada").await;
    let mut updated = customer("customer.updated", a, &a_s);
    updated[2] = format!(r#"{{"customer_id":"{a}","name":"Grace","email":"grace@example.com"}}"#);
    updated.extend(["--sequence".into(), "2".into()]);
    publish(&ns, updated).await;
    handled(a, "Grace").await;

    let lines = finish(by_subject).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(l.contains(&format!("subject={a_s}")), "{l}");
        assert!(l.contains("corr="), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains(" event ")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("handled")), "{lines:?}");

    let lines = finish(by_service).await;
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["kind"], "outcome", "customers' events are left out: {v}");
    assert_eq!(v["outcome"]["service"], "orders");

    let lines = finish(by_type).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let kinds: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ty = if v["kind"] == "event" {
                v["event"]["type"].clone()
            } else {
                v["outcome"]["event_type"].clone()
            };
            (
                v["kind"].as_str().unwrap().to_owned(),
                ty.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.iter().all(|(_, t)| t == "customer.updated"),
        "outcomes of other types left out: {kinds:?}"
    );
    assert!(kinds.iter().any(|(k, _)| k == "outcome"), "{kinds:?}");

    let lines = finish(by_corr).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        let corr = if v["kind"] == "event" {
            v["event"]["correlationid"].clone()
        } else {
            v["outcome"]["correlation_id"].clone()
        };
        assert_eq!(corr, Value::String(c.clone()), "{v}");
    }
    app.stop().await;
}
