//! What one namespace costs the broker.
//!
//! The shape is checked on every run: a namespace is, per consuming
//! service, a work queue, one retry queue per delay tier and a dead-letter
//! queue, all quorum queues (28 for the shop), plus two exchanges. The
//! figures of BENCHMARKS.md ("What a namespace costs the broker") assume
//! that shape; a new tier or queue kind changes them, and this test says so.
//!
//! The measurement itself is run on purpose (it declares hundreds of
//! queues on the shared broker for a minute):
//!
//! ```sh
//! cargo test -p warren-cli --test namespace_cost -- --ignored --nocapture
//! ```
//!
//! It samples `rabbitmqctl status` (the broker's own file-descriptor count,
//! Erlang processes, memory by category), the descriptors the broker's OS
//! process holds (`/proc/<pid>/fd`), and `list_queues memory` before and
//! after declaring namespaces as warren declares them, after traffic has
//! passed through every queue, and the same for a layout whose retry tiers
//! are classic queues, for comparison.

use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::Value;
use transport::Topology;

const CONSUMING: [&str; 4] = ["orders", "inventory", "payments", "shipping"];

fn delays() -> Vec<Duration> {
    consumers::RetryPolicy::default().delays()
}

fn rabbitmqctl_json(args: &[&str]) -> Value {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Queues of `namespace`: (name, type, memory in bytes).
fn queues_of(namespace: &str) -> Vec<(String, String, u64)> {
    let prefix = format!("{namespace}.");
    rabbitmqctl_json(&["list_queues", "name", "type", "memory"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["name"].as_str().unwrap().starts_with(&prefix))
        .map(|q| {
            (
                q["name"].as_str().unwrap().to_owned(),
                q["type"].as_str().unwrap().to_owned(),
                q["memory"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Declares the shop's queues of `topology` as `warren run` does.
async fn declare(conn: &lapin::Connection, ch: &Channel, topology: &Topology) {
    let catalog = services::catalog::catalog();
    let all: Vec<&str> = catalog.iter().map(|s| s.event_type).collect();
    for s in CONSUMING {
        topology
            .declare_service(conn, s, &all, &delays())
            .await
            .unwrap();
    }
    topology.declare_outcomes_exchange(ch).await.unwrap();
}

async fn delete(ch: &Channel, topology: &Topology) {
    for s in CONSUMING {
        topology.delete_service(ch, s, &delays()).await.unwrap();
    }
    topology.delete_exchange(ch).await.unwrap();
}

#[tokio::test]
async fn a_namespace_is_seven_quorum_queues_per_consuming_service() {
    let ns = format!("cost-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut topology = Topology::new(ns.clone());
    topology.expires = Some(Duration::from_secs(600));
    let conn = transport::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "cost")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare(&conn, &ch, &topology).await;
    let queues = queues_of(&ns);
    delete(&ch, &topology).await;
    transport::close(conn, "cost").await;
    assert_eq!(delays().len(), 5, "five retry tiers: {:?}", delays());
    assert_eq!(queues.len(), 28, "{queues:?}");
    assert!(queues.iter().all(|(_, t, _)| t == "quorum"), "{queues:?}");
}

/// One reading of the broker.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// Descriptors rabbitmqctl reports in use (its file-handle accounting).
    broker_fds: i64,
    /// Descriptors the broker's OS process holds (`/proc/<pid>/fd`).
    os_fds: i64,
    /// Erlang processes.
    processes: i64,
    /// Memory the broker reports as its total (its calculation strategy).
    total: i64,
    /// quorum_queue_procs + quorum_ets + queue_procs.
    queue_memory: i64,
}

fn sample() -> Sample {
    let s = rabbitmqctl_json(&["status"]);
    let pid = s["pid"].as_i64().unwrap();
    let os_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as i64)
        .unwrap_or(-1);
    let m = &s["memory"];
    let cat = |k: &str| m[k].as_i64().unwrap_or(0);
    let strategy = s["vm_memory_calculation_strategy"]
        .as_str()
        .unwrap_or("rss");
    Sample {
        broker_fds: s["file_descriptors"]["total_used"].as_i64().unwrap(),
        os_fds,
        processes: s["processes"]["used"].as_i64().unwrap(),
        total: m["total"][strategy].as_i64().unwrap_or(0),
        queue_memory: cat("quorum_queue_procs") + cat("quorum_ets") + cat("queue_procs"),
    }
}

fn delta(label: &str, before: Sample, after: Sample, namespaces: i64) {
    let per = |a: i64, b: i64| (b - a) as f64 / namespaces as f64;
    println!(
        "{label:<44} fds(broker) {:>7.1}  fds(os) {:>7.1}  processes {:>7.1}  memory {:>6.2} MiB  queue memory {:>6.2} MiB",
        per(before.broker_fds, after.broker_fds),
        per(before.os_fds, after.os_fds),
        per(before.processes, after.processes),
        per(before.total, after.total) / 1048576.0,
        per(before.queue_memory, after.queue_memory) / 1048576.0,
    );
}

/// Puts messages through every queue of the namespace: 200 events of
/// 600 bytes through each work queue, 5 through each retry tier (they
/// expire back into the work queue, which is drained again), 20 left in
/// each DLQ, as after a run with some failures.
async fn traffic(ch: &Channel, topology: &Topology) {
    let body = vec![b'x'; 600];
    let props = BasicProperties::default().with_delivery_mode(2);
    let publish = |queue: String, n: usize| {
        let (body, props) = (body.clone(), props.clone());
        async move {
            let mut confirms = Vec::new();
            for _ in 0..n {
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props.clone(),
                    )
                    .await
                    .unwrap(),
                );
            }
            for c in confirms {
                c.await.unwrap();
            }
        }
    };
    let drain = |queue: String| async move {
        while ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_some()
        {}
    };
    for s in CONSUMING {
        publish(topology.queue(s), 200).await;
        publish(topology.dlq(s), 20).await;
        for d in delays() {
            publish(topology.retry_queue(s, d), 5).await;
        }
    }
    for s in CONSUMING {
        drain(topology.queue(s)).await;
    }
    // The longest tier, then what it sent back.
    tokio::time::sleep(*delays().last().unwrap() + Duration::from_secs(2)).await;
    for s in CONSUMING {
        drain(topology.queue(s)).await;
    }
}

/// The same namespace with classic retry tiers: what they would save. They
/// cannot keep the guarantees (see BENCHMARKS.md); declared here only to
/// measure.
async fn declare_classic_tiers(conn: &lapin::Connection, ch: &Channel, topology: &Topology) {
    let catalog = services::catalog::catalog();
    let all: Vec<&str> = catalog.iter().map(|s| s.event_type).collect();
    for s in CONSUMING {
        topology.declare_service(conn, s, &all, &[]).await.unwrap();
        for d in delays() {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("classic".into()),
            );
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(d.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(topology.queue(s).into()),
            );
            args.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
            ch.queue_declare(
                topology.retry_queue(s, d).into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        }
    }
    topology.declare_outcomes_exchange(ch).await.unwrap();
}

async fn settle() -> Sample {
    tokio::time::sleep(Duration::from_secs(5)).await;
    sample()
}

#[tokio::test]
#[ignore = "a measurement: declares hundreds of queues on the shared broker"]
async fn measure_what_a_namespace_costs() {
    let conn = transport::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "cost")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let status = rabbitmqctl_json(&["status"]);
    println!(
        "RabbitMQ {} on Erlang {}, descriptor limit {} (broker) / {}, {} queues on the broker before",
        status["rabbitmq_version"],
        status["erlang_version"].as_str().unwrap_or("?").split_whitespace().take(2).collect::<Vec<_>>().join(" "),
        status["file_descriptors"]["total_limit"],
        std::fs::read_to_string(format!("/proc/{}/limits", status["pid"]))
            .ok()
            .and_then(|l| l.lines().find(|l| l.starts_with("Max open files")).map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_owned()))
            .unwrap_or_else(|| "?".into()),
        rabbitmqctl_json(&["list_queues", "name"]).as_array().unwrap().len(),
    );
    let run = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    let expiring = |name: String| {
        let mut t = Topology::new(name);
        t.expires = Some(Duration::from_secs(600));
        t
    };

    // One namespace as warren declares it, empty, then after traffic.
    let one = expiring(format!("cost-{run}-q0"));
    let before = settle().await;
    declare(&conn, &ch, &one).await;
    let declared = settle().await;
    delta(
        "1 namespace, quorum, declared (per namespace)",
        before,
        declared,
        1,
    );
    traffic(&ch, &one).await;
    let used = settle().await;
    delta("1 namespace, quorum, after traffic", before, used, 1);
    let qs = queues_of(one.namespace.as_str());
    let mem: u64 = qs.iter().map(|q| q.2).sum();
    println!(
        "  list_queues memory: {} queues, {:.2} MiB in all, {:.0} KiB per queue",
        qs.len(),
        mem as f64 / 1048576.0,
        mem as f64 / qs.len() as f64 / 1024.0
    );
    delete(&ch, &one).await;

    // Ten namespaces: the slope, as leftovers pile up.
    let many: Vec<Topology> = (1..=10)
        .map(|i| expiring(format!("cost-{run}-q{i}")))
        .collect();
    let before = settle().await;
    for t in &many {
        declare(&conn, &ch, t).await;
    }
    let declared = settle().await;
    delta(
        "10 namespaces, quorum, declared (per namespace)",
        before,
        declared,
        10,
    );
    for t in &many {
        traffic(&ch, t).await;
    }
    let used = settle().await;
    delta(
        "10 namespaces, quorum, after traffic (per ns)",
        before,
        used,
        10,
    );
    for t in &many {
        delete(&ch, t).await;
    }

    // Classic retry tiers, for comparison.
    let classic = expiring(format!("cost-{run}-c0"));
    let before = settle().await;
    declare_classic_tiers(&conn, &ch, &classic).await;
    let declared = settle().await;
    delta("1 namespace, classic tiers, declared", before, declared, 1);
    traffic(&ch, &classic).await;
    let used = settle().await;
    delta("1 namespace, classic tiers, after traffic", before, used, 1);
    let qs = queues_of(classic.namespace.as_str());
    for kind in ["quorum", "classic"] {
        let of: Vec<_> = qs.iter().filter(|q| q.1 == kind).collect();
        let mem: u64 = of.iter().map(|q| q.2).sum();
        println!(
            "  list_queues memory, {kind}: {} queues, {:.0} KiB per queue",
            of.len(),
            mem as f64 / of.len().max(1) as f64 / 1024.0
        );
    }
    delete(&ch, &classic).await;
    transport::close(conn, "cost").await;
}
