//! `/metrics` as a scraper reads it: after messages whose headers try to
//! inject exposition lines and types outside the catalog, the output still
//! parses with the reference OpenMetrics parser (Python's
//! `prometheus_client`, run through `python3`), holds no family that the
//! services did not define, files the hostile messages under
//! `type="unknown"`, keeps each family's samples together, and serves every
//! name the Grafana dashboard queries.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde_json::{json, Value};
use sqlx::PgPool;
use testkit::{amqp_url, TestBus};
use warren_shop::gateway::GatewayConfig;
use warren_shop::{App, AppConfig};

/// Wire text meant to break out of a label value and forge a family.
const HOSTILE: &str = "evil\"} 1\n# HELP warren_injected forged\n# TYPE warren_injected counter\nwarren_injected_total{x=\"1\"} 1\n";

/// Parses OpenMetrics text with Python's `prometheus_client` and returns
/// each family as `{name, type, samples: [{name, labels, value}]}`.
fn parse_with_prometheus_client(text: &str) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed for this test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected /metrics (needs `pip install prometheus-client`): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each family's metadata appears once and its samples follow it with no
/// other family's in between: the exposition format requires it, and the
/// hand-written renderer before prometheus-client broke it.
fn assert_families_contiguous(text: &str) {
    let mut seen = BTreeSet::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(seen.insert(name), "family {name} declared twice:\n{text}");
            current = Some(name);
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let family = current.unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
            assert!(
                line.starts_with(family),
                "sample {line:?} sits in family {family}:\n{text}"
            );
        }
    }
}

/// Publishes to the events exchange as anyone who can publish could.
async fn publish(bus: &TestBus, key: &str, body: &[u8], props: BasicProperties) {
    bus.channel
        .basic_publish(
            bus.topology.exchange().into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn metrics_parse_and_stay_bounded_after_hostile_headers(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let services = ["customers", "orders"];
    let config = AppConfig {
        amqp_url: amqp_url(),
        topology: bus.topology.clone(),
        services: services.iter().map(|s| s.to_string()).collect(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        subscription: consumers::SubscriptionConfig {
            live_feed: false,
            ..Default::default()
        },
        relay: Default::default(),
        gateway: GatewayConfig::default(),
        partitions: Default::default(),
    };
    for s in services {
        bus.remember(s, &config.subscription.retry.delays());
    }
    let app = App::start(pool.clone(), config).await.unwrap();
    let base = format!("http://{}", app.http_addr.unwrap());
    let http = reqwest::Client::new();

    // One real event, handled by orders.
    let created = http
        .post(format!("{base}/customers"))
        .json(&json!({ "name": "Ada", "email": "ada@example.com" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);

    // Undecodable, on a bound routing key, claiming a hostile original
    // routing key (the header dead letters carry).
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-warren-routing-key"),
        AMQPValue::LongString(HOSTILE.into()),
    );
    publish(
        &bus,
        "customer.registered",
        b"not json",
        BasicProperties::default().with_headers(headers),
    )
    .await;
    // Binary mode with a type outside the catalog, carrying the same text,
    // and an original routing key that names no catalog type either.
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-warren-routing-key"),
        AMQPValue::LongString("shop.unheard_of".into()),
    );
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e"),
        ("ce-source", "/warren/customers"),
        ("ce-type", HOSTILE),
        ("ce-subject", HOSTILE),
        ("ce-time", "2026-01-01T00:00:00Z"),
        ("ce-dataversion", "1"),
        ("ce-sequence", "1"),
    ] {
        headers.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
    }
    publish(
        &bus,
        "customer.registered",
        b"{}",
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers),
    )
    .await;

    let orders = app.consumer_stats["orders"].clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while orders.count(consumers::Outcome::DeadLettered) < 2
        || orders.count(consumers::Outcome::Handled) < 1
    {
        assert!(Instant::now() < deadline, "{:?}", orders.snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let response = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    assert_families_contiguous(&text);
    let families = parse_with_prometheus_client(&text);
    let names: BTreeSet<&str> = families
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("warren_") || n.starts_with("process_")),
        "a family that warren does not define: {names:?}"
    );
    assert!(!text.contains("warren_injected"), "{text}");

    let family = |name: &str| -> &Value {
        families
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no family {name} in {text}"))
    };
    let samples = |name: &str| -> Vec<BTreeMap<String, String>> {
        family(name)["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| serde_json::from_value(s["labels"].clone()).unwrap())
            .collect()
    };
    // Both hostile messages are dead letters of type `unknown`.
    let dead = samples("warren_dead_letters");
    let unknown: BTreeSet<&str> = dead
        .iter()
        .filter(|l| l["type"] == "unknown")
        .map(|l| l["reason"].as_str())
        .collect();
    assert_eq!(
        unknown,
        BTreeSet::from(["malformed_json", "unknown_type"]),
        "{text}"
    );
    // Every `type` label is the catalog's or `unknown`.
    let catalog = warren_shop::catalog::catalog();
    for labels in samples("warren_consumer_events").iter().chain(dead.iter()) {
        let t = labels["type"].as_str();
        assert!(
            t == "unknown" || catalog.find(t).is_some(),
            "type label {t:?}"
        );
    }
    assert!(samples("warren_consumer_events").iter().any(|l| {
        l["service"] == "orders" && l["type"] == "customer.registered" && l["outcome"] == "handled"
    }));
    assert_eq!(family("warren_consumer_batch_seconds")["type"], "histogram");
    assert_eq!(family("warren_relay_confirm_seconds")["type"], "histogram");
    assert!(names.contains("process_cpu_seconds"), "{names:?}");
    assert!(names.contains("process_resident_memory_bytes"), "{names:?}");

    // Every warren name the Grafana dashboard queries is served (as a
    // sample name: a counter's `_total`, a histogram's `_bucket`).
    let served: BTreeSet<String> = families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap().iter())
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .chain(names.iter().map(|n| n.to_string()))
        .collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/dashboards/warren.json"
    ))
    .unwrap();
    let queried: BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("warren_") && *t != "warren_")
        .collect();
    assert!(!queried.is_empty());
    for name in queried {
        // Names of families without a sample yet (the outbox age of a
        // service that raised nothing) are still declared.
        let declared = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .any(|base| names.contains(base));
        assert!(
            served.contains(name) || declared,
            "the dashboard queries {name}, which /metrics does not serve"
        );
    }
    app.stop().await;
}
