//! Bad input at volume: good events mixed with every kind of malformed
//! message, published straight to the events exchange as fast as the
//! broker confirms. Passes when the good traffic settles (the full audit),
//! every bad message sits in the dead-letter queue of every service its
//! routing key reaches, with the expected `x-warren-reason`, no good
//! message is dead-lettered, and the process's peak RSS stays under the
//! bound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use events::{Codec, Envelope};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use lapin::Confirmation;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use services::catalog::CustomerRegistered;
use uuid::Uuid;

use crate::check::{self, Audit};
use crate::cluster::{Env, Servers, CONSUMING};
use crate::load;

/// Oversized bodies are 1 MiB each: a few dozen prove the limit without
/// pushing gigabytes through a shared broker.
const OVERSIZED: usize = 40;
/// Confirms awaited together.
const WINDOW: usize = 500;

/// Sizes of the run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Messages in all.
    pub messages: usize,
    /// Share of them that is malformed.
    pub bad_share: f64,
    /// Seed.
    pub seed: u64,
    /// Longest wait for everything to settle.
    pub settle_within: Duration,
    /// Peak RSS allowed, MiB.
    pub rss_bound_mib: u64,
}

/// One message to publish.
struct Message {
    key: String,
    body: Vec<u8>,
    props: BasicProperties,
    /// `Some((kind, expected reason))` for a bad one.
    bad: Option<(&'static str, &'static str)>,
    id: String,
}

/// The figures of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Messages published.
    pub messages: usize,
    /// Good events among them.
    pub good: usize,
    /// Bad messages by kind.
    pub bad_by_kind: BTreeMap<String, usize>,
    /// Seconds to publish everything (confirmed).
    pub publish_s: f64,
    /// Seconds from the first publish until everything settled.
    pub settle_s: f64,
    /// Dead letters expected (a message reaching n queues counts n times).
    pub dead_letters_expected: usize,
    /// Dead letters found with the expected reason.
    pub dead_letters_ok: usize,
    /// Expected dead letters not found.
    pub dead_letters_missing: usize,
    /// Dead letters with another reason than expected.
    pub wrong_reason: usize,
    /// Dead letters of good messages or of unknown ids, or repeated.
    pub unexpected: usize,
    /// RSS after start-up, KiB.
    pub rss_start_kib: u64,
    /// Peak RSS (VmHWM) of the warren process, KiB.
    pub peak_rss_kib: u64,
    /// Bound it had to stay under, KiB.
    pub rss_bound_kib: u64,
    /// The audit of the good traffic.
    pub audit: Audit,
}

impl Figures {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.audit.passed()
            && self.dead_letters_missing == 0
            && self.wrong_reason == 0
            && self.unexpected == 0
            && self.dead_letters_ok == self.dead_letters_expected
            && self.peak_rss_kib <= self.rss_bound_kib
    }
}

fn structured(
    id: &str,
    key: &str,
    body: Vec<u8>,
    bad: Option<(&'static str, &'static str)>,
) -> Message {
    Message {
        key: key.to_owned(),
        body,
        props: BasicProperties::default()
            .with_content_type(events::CONTENT_TYPE_STRUCTURED.into())
            .with_message_id(id.into())
            .with_delivery_mode(2),
        bad,
        id: id.to_owned(),
    }
}

/// A valid `order.placed` document to break in one way.
fn order_doc(customer: Uuid) -> Value {
    let (_, e) = load::order_event(&load::Planned {
        via: load::Via::Bus,
        customer,
        lines: vec![services::catalog::OrderLine {
            sku: load::PLENTY[1].into(),
            qty: 1,
            unit_price: 100,
        }],
        token: "tok_ok",
    });
    // An Envelope is plain JSON data.
    serde_json::to_value(e).unwrap_or(Value::Null)
}

/// The `n`th bad message, cycling through every kind.
fn bad_message(
    n: usize,
    customer: Uuid,
    rng: &mut impl Rng,
    oversized_left: &mut usize,
) -> Message {
    let id = format!("bad-{n}");
    let keys = [
        "order.placed",
        "customer.registered",
        "payment.captured",
        "stock.reserved",
    ];
    let key = keys[rng.gen_range(0..keys.len())];
    let mut doc = order_doc(customer);
    let kind = n % 9;
    match kind {
        0 => {
            let bodies: [&[u8]; 4] = [
                b"{\"specversion\":\"1.0\",\"id\":",
                b"\xff\xfe\x00garbage",
                b"[1,2,3]",
                b"",
            ];
            let body = bodies[rng.gen_range(0..bodies.len())].to_vec();
            structured(&id, key, body, Some(("bad JSON", "malformed_json")))
        }
        1 => {
            let required = events::codec::REQUIRED;
            let attr = required[rng.gen_range(0..required.len())];
            if let Some(m) = doc.as_object_mut() {
                m.remove(attr);
            }
            structured(
                &id,
                "order.placed",
                doc.to_string().into_bytes(),
                Some(("missing attribute", "invalid_envelope")),
            )
        }
        2 => {
            doc["specversion"] = if rng.gen_bool(0.5) {
                json!("0.3")
            } else {
                json!(1.0)
            };
            structured(
                &id,
                "order.placed",
                doc.to_string().into_bytes(),
                Some(("wrong specversion", "invalid_envelope")),
            )
        }
        3 => {
            doc["type"] = json!("order.exploded");
            structured(
                &id,
                "order.placed",
                doc.to_string().into_bytes(),
                Some(("unknown type", "unknown_type")),
            )
        }
        4 => {
            match rng.gen_range(0..3) {
                0 => doc["data"]["order_id"] = json!("not-a-uuid"),
                1 => doc["data"]["lines"] = json!("three"),
                _ => {
                    if let Some(d) = doc["data"].as_object_mut() {
                        d.remove("total");
                    }
                }
            }
            structured(
                &id,
                "order.placed",
                doc.to_string().into_bytes(),
                Some(("wrong data shape", "invalid_data")),
            )
        }
        5 => {
            doc["dataversion"] = json!(99);
            structured(
                &id,
                "order.placed",
                doc.to_string().into_bytes(),
                Some(("unsupported dataversion", "unsupported_version")),
            )
        }
        6 if *oversized_left > 0 => {
            *oversized_left -= 1;
            // Valid JSON, one byte over the default limit.
            let pad = "x".repeat(events::DEFAULT_MAX_BODY);
            doc["data"]["pad"] = json!(pad);
            structured(
                &id,
                "customer.registered",
                doc.to_string().into_bytes(),
                Some(("oversized body", "too_large")),
            )
        }
        7 => {
            // Binary mode with a data content type that is not JSON.
            let mut h = FieldTable::default();
            let ce_id = Uuid::now_v7().to_string();
            for (k, v) in [
                ("ce-specversion", "1.0"),
                ("ce-id", ce_id.as_str()),
                ("ce-type", "order.placed"),
                ("ce-source", "/warren/orders"),
            ] {
                h.insert(k.into(), AMQPValue::LongString(v.into()));
            }
            Message {
                key: "order.placed".into(),
                body: b"order please".to_vec(),
                props: BasicProperties::default()
                    .with_content_type("text/plain".into())
                    .with_message_id(id.as_str().into())
                    .with_headers(h)
                    .with_delivery_mode(2),
                bad: Some(("binary mode, non-JSON content type", "invalid_envelope")),
                id,
            }
        }
        _ => {
            if rng.gen_bool(0.5) {
                doc["sequence"] = json!(0);
            } else {
                doc["id"] = json!("not-a-uuid");
            }
            structured(
                &id,
                "order.placed",
                doc.to_string().into_bytes(),
                Some(("invalid attribute value", "invalid_envelope")),
            )
        }
    }
}

/// Which consuming services' queues a routing key reaches.
fn reach(pool: &sqlx::PgPool) -> HashMap<&'static str, Vec<&'static str>> {
    // The routers are only asked for their handled types; the gateway is
    // never called.
    let gateway = Arc::new(services::gateway::Gateway::new(
        Default::default(),
        pool.clone(),
    ));
    let mut map: HashMap<&'static str, Vec<&'static str>> = HashMap::new();
    for s in CONSUMING {
        let Some(router) = services::app::router_of(s, &gateway) else {
            continue;
        };
        for key in services::catalog::catalog().bindings(&router.handled_types()) {
            map.entry(key).or_default().push(s);
        }
    }
    map
}

/// Runs the bad-input drill.
pub async fn run(servers: &Servers, o: &Options, keep: bool) -> anyhow::Result<Figures> {
    let env = Env::create(servers, "badinput").await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let w = env.start("a", port).await?;
    let (customers, stock) = load::seed(&env, &w.base, 20).await?;
    let rss_start_kib = w.rss_kib().map(|r| r.0).unwrap_or(0);
    let mut rng = load::rng(o.seed);

    let bad_n = (o.messages as f64 * o.bad_share) as usize;
    let good_n = o.messages - bad_n;
    let mut messages = Vec::with_capacity(o.messages);
    let mut good_orders = HashSet::new();
    let mut new_customers = 0usize;
    let codec = Codec::new(services::catalog::catalog());
    let plan = load::plan(good_n, &customers, &mut rng);
    for (i, p) in plan.iter().enumerate() {
        let e: Envelope = if i % 5 == 0 {
            new_customers += 1;
            let cid = Uuid::now_v7();
            let mut e = Envelope::new(
                services::customers::SERVICE,
                cid.to_string(),
                &CustomerRegistered {
                    customer_id: cid,
                    name: format!("Bulk {i}"),
                    email: format!("bulk{i}@example.com"),
                },
            );
            e.sequence = 1;
            e
        } else {
            let (id, e) = load::order_event(p);
            good_orders.insert(id);
            e
        };
        messages.push(Message {
            key: e.event_type.clone(),
            body: codec.encode(&e),
            props: transport::event_properties(
                &e.id.to_string(),
                &e.event_type,
                &e.subject,
                None,
                e.time.timestamp(),
                "drills",
            ),
            bad: None,
            id: e.id.to_string(),
        });
    }
    let mut oversized_left = OVERSIZED;
    for n in 0..bad_n {
        messages.push(bad_message(n, customers[0], &mut rng, &mut oversized_left));
    }
    messages.shuffle(&mut rng);
    let mut bad_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    let reach = reach(&env.pool);
    let mut expected: HashMap<(String, String), &'static str> = HashMap::new();
    for m in &messages {
        if let Some((kind, reason)) = m.bad {
            *bad_by_kind.entry(kind.to_owned()).or_default() += 1;
            let services = reach
                .get(m.key.as_str())
                .with_context(|| format!("no queue is bound to {}", m.key))?;
            for s in services {
                expected.insert((s.to_string(), m.id.clone()), reason);
            }
        }
    }
    let good_ids: HashSet<String> = messages
        .iter()
        .filter(|m| m.bad.is_none())
        .map(|m| m.id.clone())
        .collect();

    // Sample RSS while the run lasts (VmHWM is the kernel's own peak).
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (sampling, peak, pid) = (sampling.clone(), peak.clone(), w.pid);
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = s
                        .lines()
                        .find(|l| l.starts_with("VmHWM:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let t0 = Instant::now();
    let conn = transport::connect(&servers.amqp_url, "warren drills bad input").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let exchange = transport::Topology::new(env.namespace.clone()).exchange();
    for chunk in messages.chunks(WINDOW) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            confirms.push(
                ch.basic_publish(
                    exchange.as_str().into(),
                    m.key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    m.props.clone(),
                )
                .await?,
            );
        }
        for c in confirms {
            match c.await? {
                Confirmation::Ack(None) => {}
                other => bail!("a message was not accepted by the broker: {other:?}"),
            }
        }
    }
    let publish_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "  published {} messages ({} bad) in {publish_s:.1}s",
        messages.len(),
        bad_n
    );
    drop(messages);

    // Settle: the good orders' audit passes and every DLQ holds its share.
    let want_per_service: HashMap<String, u32> =
        expected.keys().fold(HashMap::new(), |mut m, (s, _)| {
            *m.entry(s.clone()).or_default() += 1;
            m
        });
    let deadline = Instant::now() + o.settle_within;
    loop {
        let depths = env.queue_depths().await?;
        let dlq_full = depths
            .iter()
            .all(|(s, _, dlq)| *dlq >= want_per_service.get(s).copied().unwrap_or(0));
        if dlq_full || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    let (mut audit, _) = check::settle(&env, &good_orders, &stock, true, remaining).await?;
    let known: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.customers")
        .fetch_one(env.orders())
        .await?;
    audit.violations.insert(
        "registered customer not in orders' read model".into(),
        (20 + new_customers) as i64 - known,
    );
    let settle_s = t0.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    if let Some((_, hwm)) = w.rss_kib() {
        peak.fetch_max(hwm, Ordering::Relaxed);
    }

    // Read every dead letter back.
    let topo = transport::Topology::new(env.namespace.clone());
    let (mut ok, mut wrong, mut unexpected) = (0usize, 0usize, 0usize);
    let mut seen = HashSet::new();
    for s in CONSUMING {
        while let Some(m) = ch
            .basic_get(
                topo.dlq(s).as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await?
        {
            let id = m
                .properties
                .message_id()
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default();
            let reason =
                consumers::deadletter::header_str(&m.properties, consumers::deadletter::H_REASON);
            let key = (s.to_owned(), id.clone());
            match expected.get(&key) {
                _ if !seen.insert(key.clone()) => unexpected += 1,
                Some(want) if reason.as_deref() == Some(*want) => ok += 1,
                Some(want) => {
                    wrong += 1;
                    if wrong <= 5 {
                        eprintln!("  {s}: {id} dead-lettered as {reason:?}, expected {want}");
                    }
                }
                None => {
                    unexpected += 1;
                    if unexpected <= 5 {
                        eprintln!(
                            "  {s}: unexpected dead letter {id} (good: {}) reason {reason:?}",
                            good_ids.contains(&id)
                        );
                    }
                }
            }
        }
    }
    transport::close(conn, "done").await;
    let missing = expected.keys().filter(|k| !seen.contains(*k)).count();
    w.stop().await?;
    let figures = Figures {
        messages: o.messages,
        good: good_n,
        bad_by_kind,
        publish_s,
        settle_s,
        dead_letters_expected: expected.len(),
        dead_letters_ok: ok,
        dead_letters_missing: missing,
        wrong_reason: wrong,
        unexpected,
        rss_start_kib,
        peak_rss_kib: peak.load(Ordering::Relaxed),
        rss_bound_kib: o.rss_bound_mib * 1024,
        audit,
    };
    if figures.passed() && !keep {
        env.destroy().await?;
    } else {
        env.keep();
        eprintln!(
            "  kept database warren_drill_badinput and namespace {}",
            env.namespace
        );
    }
    Ok(figures)
}

/// The figures as report lines.
pub fn render(f: &Figures) -> String {
    let mut out = format!(
        "drill bad-input: {} messages ({} good, {} bad), published in {:.1}s, settled {:.1}s after the first\n  bad by kind: {}\n  dead letters: {} expected, {} with the right reason, {} missing, {} wrong reason, {} unexpected\n  RSS: {:.1} MiB after start-up, peak {:.1} MiB (bound {:.0} MiB)\n",
        f.messages,
        f.good,
        f.messages - f.good,
        f.publish_s,
        f.settle_s,
        f.bad_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
        f.dead_letters_expected,
        f.dead_letters_ok,
        f.dead_letters_missing,
        f.wrong_reason,
        f.unexpected,
        f.rss_start_kib as f64 / 1024.0,
        f.peak_rss_kib as f64 / 1024.0,
        f.rss_bound_kib as f64 / 1024.0,
    );
    out.push_str(&check::render(&f.audit));
    if !f.passed() {
        out.push_str("  bad-input: FAIL\n");
    }
    out
}
