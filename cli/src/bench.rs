//! `warren bench`: what the pipeline does on this machine, next to what the
//! broker alone can do, measured in the same run on a fresh namespace.
//!
//! 1. ceiling: `order.placed`-sized bodies, persistent, published with
//!    pipelined publisher confirms to a quorum queue and consumed with
//!    manual acks — no database;
//! 2. drain: N events committed in the `bench` outbox beforehand, then the
//!    relay and a consumer (inbox row + one store row per event) start; the
//!    time until all N are handled;
//! 3. latency: events committed at a fixed rate while relay and consumer
//!    run; commit-to-handled (the consumer stamps "handled" after its
//!    commit and ack);
//! 4. idle wake-up: with the relay asleep on LISTEN, commit-to-on-the-bus;
//! 5. peak RSS of the process.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use consumers::{Batch, HandleBatch, HandleError, Outcome, Stats, SubscriptionConfig};
use events::Envelope;
use futures::future::join_all;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use producers::{Eager, EagerConfig, Outbox, RelayConfig};
use serde::Serialize;
use services::catalog::{OrderLine, OrderPlaced};
use sqlx::{Connection, PgPool};
use transport::{Outgoing, Publisher, Topology};
use uuid::Uuid;
use warren::{Bus, Running, Service};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events in the ceiling and drain runs.
    pub events: usize,
    /// Events per second in the latency run.
    pub rate: u32,
    /// Length of the latency run.
    pub duration: Duration,
    /// Broker URL.
    pub amqp_url: String,
    /// Consumer lanes.
    pub lanes: usize,
    /// Consumer prefetch.
    pub prefetch: u16,
    /// How the latency run's events get out: published by the producer
    /// right after its commit ([`producers::eager`]), or by the relay.
    pub eager: bool,
    /// The run's own throwaway namespace (removed by the caller on a
    /// signal, and expiring on the broker if the process dies).
    pub namespace: String,
}

/// The figures, as printed and as `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub events: usize,
    /// Consumer lanes of the drain and latency runs.
    pub lanes: usize,
    pub body_bytes: usize,
    pub ceiling_events_per_s: f64,
    pub drain_events_per_s: f64,
    pub drain_vs_ceiling: f64,
    pub latency_rate_per_s: u32,
    /// Who published the latency run's events: `eager` (the producer,
    /// right after its commit) or `relay`.
    pub latency_publisher: &'static str,
    /// The rate the producer really committed at (events / time from the
    /// first tick to the last commit), to check it kept up.
    pub latency_committed_per_s: f64,
    pub latency_samples: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// The latency run's producer transactions (BEGIN, append, COMMIT of
    /// one event), timed by the producer: what the outbox costs a
    /// service's request, NOTIFY and commit included.
    pub producer_txn_p50_ms: f64,
    pub producer_txn_p99_ms: f64,
    /// Where the latency run's time went after the commit, stage by stage:
    /// events per published batch, and the publisher's mean wait from a
    /// batch's publishes to its last confirm (the broker's share, its log's
    /// fsync included) — the relay's, or with `eager` the eager
    /// publisher's (the keys kept their names from before it existed)...
    pub relay_events_per_batch: f64,
    pub relay_confirm_mean_ms: f64,
    /// ...and the consumer lane's batch, from taking the deliveries to
    /// their ack (transaction, handler, commit, ack), per handled event.
    pub consumer_batch_p50_ms: f64,
    pub consumer_batch_p99_ms: f64,
    pub wakeup_samples: usize,
    pub wakeup_p50_ms: f64,
    pub wakeup_max_ms: f64,
    pub rss_mb: f64,
}

/// The consuming service (and its schema).
pub const SINK: &str = "bench_sink";

/// The benchmark's consumer: one store row per event, written for a run of
/// events in one statement (a batch handler, as a projection or a sink
/// would be written).
#[derive(Clone)]
pub(crate) struct Sink;

#[async_trait::async_trait]
impl HandleBatch<OrderPlaced> for Sink {
    async fn handle_batch(
        &self,
        batch: &mut Batch<'_>,
        events: Vec<(&Envelope, OrderPlaced)>,
    ) -> Result<(), HandleError> {
        let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.id).collect();
        let subjects: Vec<&str> = events.iter().map(|(e, _)| e.subject.as_str()).collect();
        sqlx::query(
            "INSERT INTO bench_sink.items (event_id, subject) \
             SELECT * FROM unnest($1::uuid[], $2::text[])",
        )
        .bind(ids)
        .bind(subjects)
        .execute(&mut *batch.tx)
        .await?;
        Ok(())
    }
}

/// An `order.placed` of about 1 KB, like a real order with a few lines.
pub(crate) fn sample(subject: Uuid) -> Envelope {
    let data = OrderPlaced {
        order_id: subject,
        customer_id: Uuid::now_v7(),
        lines: (0..6)
            .map(|i| OrderLine {
                sku: format!("SKU-{i:04}-BENCHMARK-ITEM"),
                qty: i + 1,
                unit_price: 1999,
            })
            .collect(),
        total: 41979,
        payment_token: "tok_ok".into(),
    };
    Envelope::new("bench", subject.to_string(), &data)
}

/// Sets up the benchmark's two schemas, which are the CLI's and not the
/// shop's: warren's outbox and inbox in each (by the library's installer,
/// as any application would) and the consumer's store table.
pub async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    for schema in ["bench", SINK] {
        producers::install::install(pool, schema).await?;
        consumers::install::install(pool, schema).await?;
    }
    // What the consumer writes: one row per handled event.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_sink.items ( \
           event_id   uuid PRIMARY KEY, \
           subject    text NOT NULL, \
           handled_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await
    .context("creating bench_sink.items")?;
    Ok(())
}

/// Runs the three measurements in the database of `pool`, setting up its
/// schemas first ([`prepare`]).
pub async fn run(pool: PgPool, opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    prepare(&pool)
        .await
        .context("setting up the bench schemas")?;
    let namespace = opts.namespace.clone();
    let mut topology = Topology::new(namespace.clone());
    topology.expires = Some(crate::commands::teardown::THROWAWAY_EXPIRES);
    let body = events::encode(&{
        let mut e = sample(Uuid::now_v7());
        e.sequence = 1;
        e
    });
    tracing::info!(
        namespace,
        events = opts.events,
        body_bytes = body.len(),
        "benchmark starting"
    );

    let ceiling = ceiling(&opts.amqp_url, &topology, opts.events, &body)
        .await
        .context("ceiling run")?;
    tracing::info!(events_per_s = ceiling, "ceiling measured");

    sqlx::query(
        "TRUNCATE bench.outbox, bench.outbox_sequences, bench_sink.inbox, bench_sink.subject_progress, bench_sink.items",
    )
        .execute(&pool)
        .await?;
    let outbox = Outbox::new("bench")?;
    prefill(&pool, &outbox, opts.events).await?;

    let config = SubscriptionConfig {
        prefetch: opts.prefetch,
        lanes: opts.lanes,
        live_feed: false,
        ..Default::default()
    };
    // Two services on warren's host, as a user of the library would write
    // them: the producer `bench` (its relay and eager publisher) and the
    // consumer `bench_sink`, another service, as in a real system.
    let bus = Bus::new(
        opts.amqp_url.clone(),
        topology.clone(),
        services::catalog::catalog(),
    );
    let sink = Service::new(SINK, bus.clone())
        .pool(pool.clone())
        .handle_batch::<OrderPlaced, _>(Sink)
        .subscription(config.clone())
        .outcome_capacity(1 << 16)
        .without_relay();
    sink.declare().await?;
    let setup = transport::connect(&opts.amqp_url, "warren bench setup").await?;
    let setup_ch = setup.create_channel().await?;
    let producing = Service::new("bench", bus)
        .pool(pool.clone())
        .relay(RelayConfig::default())
        .eager(EagerConfig::default());

    let started = Instant::now();
    let sink = sink.start().await?;
    let producing = producing.start().await?;
    let (eager, relay_stats, eager_stats) = match (
        producing.eager(),
        producing.relay_stats(),
        producing.eager_stats(),
    ) {
        (Some(e), Some(r), Some(s)) => (e.clone(), r, s),
        _ => anyhow::bail!("the bench producer runs a relay and an eager publisher"),
    };
    let stats = sink.stats().context("the sink consumes")?;
    until_handled(&stats, opts.events, Duration::from_secs(600))
        .await
        .context("drain")?;
    let drain = opts.events as f64 / started.elapsed().as_secs_f64();
    tracing::info!(events_per_s = drain, "drain measured");

    let publisher_stats = if opts.eager { eager_stats } else { relay_stats };
    let before = publisher_stats.confirms();
    let producer = Producer {
        outbox: outbox.clone(),
        eager: opts.eager.then(|| eager.clone()),
        subjects: None,
    };
    let run = latency(
        &pool,
        &producer,
        std::slice::from_ref(&sink),
        opts.rate,
        opts.duration,
    )
    .await?;
    let relayed = publisher_stats.confirms().since(before);
    let LatencyRun {
        latencies,
        committed_per_s,
        txns,
        consumer_batches,
        ..
    } = run;
    let wakeups = wakeup(&pool, &outbox, &setup, &topology, 20).await?;
    // The wake-up probe sees its last event on its own classic queue, a
    // moment before the sink's quorum queue delivers it: wait until the
    // sink has handled everything committed, or shutting down would leave
    // that event in a queue about to be deleted.
    let committed = opts.events + txns.len() + wakeups.len();
    until_handled(&stats, committed, Duration::from_secs(30))
        .await
        .context("after the last commit")?;
    sink.stop().await;
    producing.stop().await;
    topology
        .delete_service(&setup_ch, SINK, &config.retry.delays())
        .await?;
    topology.delete_exchange(&setup_ch).await?;
    transport::close(setup, "bench done").await;

    let pct = |v: &[f64], p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    };
    let report = BenchReport {
        events: opts.events,
        lanes: opts.lanes,
        body_bytes: body.len(),
        ceiling_events_per_s: ceiling.round(),
        drain_events_per_s: drain.round(),
        drain_vs_ceiling: (drain / ceiling * 100.0).round() / 100.0,
        latency_rate_per_s: opts.rate,
        latency_publisher: if opts.eager { "eager" } else { "relay" },
        latency_committed_per_s: committed_per_s.round(),
        latency_samples: latencies.len(),
        latency_p50_ms: round2(pct(&latencies, 0.50)),
        latency_p99_ms: round2(pct(&latencies, 0.99)),
        latency_max_ms: round2(latencies.last().copied().unwrap_or(f64::NAN)),
        producer_txn_p50_ms: round2(pct(&txns, 0.50)),
        producer_txn_p99_ms: round2(pct(&txns, 0.99)),
        relay_events_per_batch: round2(relayed.events_per_batch().unwrap_or(f64::NAN)),
        relay_confirm_mean_ms: round2(
            relayed
                .mean_wait()
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        ),
        consumer_batch_p50_ms: round2(pct(&consumer_batches, 0.50)),
        consumer_batch_p99_ms: round2(pct(&consumer_batches, 0.99)),
        wakeup_samples: wakeups.len(),
        wakeup_p50_ms: round2(pct(&wakeups, 0.50)),
        wakeup_max_ms: round2(wakeups.last().copied().unwrap_or(f64::NAN)),
        rss_mb: round2(peak_rss_mb()),
    };
    if !report.producer_kept_up() {
        tracing::warn!(
            committed_per_s = report.latency_committed_per_s,
            asked_per_s = report.latency_rate_per_s,
            "the latency run's producer fell behind the rate asked: its figures are at a lower load"
        );
    }
    Ok(report)
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The broker alone: confirmed persistent publishes into a quorum queue,
/// consumed with manual acks.
async fn ceiling(url: &str, topology: &Topology, n: usize, body: &[u8]) -> anyhow::Result<f64> {
    let conn = transport::connect(url, "warren bench ceiling").await?;
    let publisher = Publisher::open(&conn).await?;
    let consumer_ch = conn.create_channel().await?;
    consumer_ch
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let queue = format!("{}.ceiling", topology.namespace);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    publisher
        .channel()
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    // Deliveries are acked one by one (no `multiple`), but the acks of
    // whatever has arrived go out together, as warren's consumer does.
    let consume = tokio::spawn(async move {
        let mut seen = 0;
        let mut chunks = (&mut consumer).ready_chunks(256);
        while seen < n {
            let Some(chunk) = chunks.next().await else {
                anyhow::bail!("ceiling consumer ended after {seen}");
            };
            let mut acks = Vec::with_capacity(chunk.len());
            for d in chunk {
                let d = d?;
                acks.push(async move { d.ack(BasicAckOptions::default()).await });
                seen += 1;
            }
            for r in join_all(acks).await {
                r?;
            }
        }
        Ok(())
    });
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(events::CONTENT_TYPE_STRUCTURED.into());
    // Published the way the relay publishes, through the same publisher
    // (mandatory, confirms): chunks of 500 written together, with up to
    // 2,000 confirms outstanding.
    let mut window = VecDeque::new();
    let mut left = n;
    while left > 0 {
        let chunk = left.min(500);
        left -= chunk;
        while window.len() + chunk > 2000 {
            if let Some(c) = window.pop_front() {
                c.await?;
            }
        }
        let messages = (0..chunk).map(|_| Outgoing {
            exchange: "",
            routing_key: &queue,
            body,
            properties: props.clone(),
        });
        for sent in publisher.send(messages).await {
            window.push_back(sent?);
        }
    }
    for c in window {
        c.await?;
    }
    tokio::time::timeout(Duration::from_secs(300), consume)
        .await
        .context("ceiling consumer timed out")???;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Close the consumer's channel before deleting its queue: deleting a
    // queue with a live consumer makes the broker cancel it, which races
    // with lapin's own cancel of the dropped consumer (seen here as a
    // connection-killing UNEXPECTED-FRAME on cancel-ok).
    consumer_ch.close(200, ("ceiling done").into()).await?;
    publisher
        .channel()
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    transport::close(conn, "ceiling done").await;
    Ok(rate)
}

/// Commits `n` events in the outbox, 1000 per transaction, 20 per subject.
pub(crate) async fn prefill(pool: &PgPool, outbox: &Outbox, n: usize) -> anyhow::Result<()> {
    let mut left = n;
    let mut subject = Uuid::now_v7();
    let mut i = 0usize;
    while left > 0 {
        let mut tx = pool.begin().await?;
        for _ in 0..left.min(1000) {
            if i.is_multiple_of(20) {
                subject = Uuid::now_v7();
            }
            outbox.append(&mut tx, sample(subject)).await?;
            i += 1;
            left -= 1;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Waits until the sink has handled `n` events in all, for at most `limit`.
pub(crate) async fn until_handled(stats: &Stats, n: usize, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while (stats.count(Outcome::Handled) as usize) < n {
        if started.elapsed() > limit {
            anyhow::bail!(
                "{} of {n} events handled within {limit:?}",
                stats.count(Outcome::Handled)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// What the latency run measured; every series sorted, in ms.
pub(crate) struct LatencyRun {
    /// Commit to handled, per event.
    pub latencies: Vec<f64>,
    /// The rate the producer really committed at.
    pub committed_per_s: f64,
    /// The producer's transactions.
    pub txns: Vec<f64>,
    /// The consumer's batch (taken to acked) of each handled event.
    pub consumer_batches: Vec<f64>,
    /// When each event's commit returned to the producer.
    pub committed: HashMap<Uuid, Wall>,
}

/// A wall-clock instant: both ends of a latency sample are taken on the
/// same clock, whichever process (or the database) took them.
pub(crate) type Wall = chrono::DateTime<chrono::Utc>;

/// Milliseconds from `from` to `to`, 0 if `to` is earlier.
pub(crate) fn ms_between(from: Wall, to: Wall) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX).max(0) as f64 / 1000.0
}

/// How the latency run's producer appends and publishes.
#[derive(Clone)]
pub(crate) struct Producer {
    pub outbox: Outbox,
    /// Publish right after the commit instead of leaving it to the relay.
    pub eager: Option<Eager>,
    /// Subjects the events are spread over, round-robin; `None`: a new
    /// subject per event.
    pub subjects: Option<std::sync::Arc<Vec<Uuid>>>,
}

impl Producer {
    /// Commits one event in a transaction of its own (and hands it to the
    /// eager publisher after the commit).
    async fn commit_one(&self, conn: &mut sqlx::PgConnection, e: Envelope) -> anyhow::Result<()> {
        let mut tx = conn.begin().await?;
        match &self.eager {
            Some(eager) => {
                let appended = eager.append(&mut tx, e).await?;
                tx.commit().await?;
                eager.publish([appended]);
            }
            None => {
                self.outbox.append(&mut tx, e).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

/// Commits one event per tick at `rate`/s for `duration`, and times each
/// from its commit to its handling by any of `sinks`.
pub(crate) async fn latency(
    pool: &PgPool,
    producer: &Producer,
    sinks: &[Running],
    rate: u32,
    duration: Duration,
) -> anyhow::Result<LatencyRun> {
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let collector = collect_handled(sinks, total)?;
    let produced = produce(pool, producer, rate, duration).await?;
    let (handled, mut consumer_batches) = collector.await?;
    let mut latencies: Vec<f64> = handled
        .iter()
        .filter_map(|(id, at)| produced.committed.get(id).map(|c| ms_between(*c, *at)))
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    consumer_batches.sort_by(|a, b| a.total_cmp(b));
    Ok(LatencyRun {
        latencies,
        committed_per_s: produced.committed_per_s,
        txns: produced.txns,
        consumer_batches,
        committed: produced.committed,
    })
}

/// When each event was handled, and each handled event's batch (ms).
type Handled = (HashMap<Uuid, Wall>, Vec<f64>);

/// Gathers, from every sink's outcomes, when each event was handled and
/// how long its batch took, until `total` are handled (or nothing came
/// for 30 s).
fn collect_handled(
    sinks: &[Running],
    total: usize,
) -> anyhow::Result<tokio::task::JoinHandle<Handled>> {
    // Every sink's outcomes into one bounded channel.
    let (merged, mut outcomes) =
        tokio::sync::mpsc::channel::<std::sync::Arc<consumers::OutcomeRecord>>(1 << 16);
    for sink in sinks {
        let mut rx = sink.outcomes().context("the sink consumes")?;
        let merged = merged.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(r) => {
                        if merged.send(r).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "latency collector lagged");
                    }
                    Err(_) => break,
                }
            }
        });
    }
    drop(merged);
    // Wall-clock instants on both ends: "handled" is the time the consumer
    // stamped on its outcome after the ack (`OutcomeRecord::at`), not when
    // this collector task got round to reading it, which added the
    // collector's own wake-up to every sample.
    Ok(tokio::spawn(async move {
        let mut handled: HashMap<Uuid, Wall> = HashMap::with_capacity(total);
        let mut batches: Vec<f64> = Vec::with_capacity(total);
        while handled.len() < total {
            match tokio::time::timeout(Duration::from_secs(30), outcomes.recv()).await {
                Ok(Some(r)) if r.outcome == Outcome::Handled => {
                    if let Some(id) = r.event_id.as_deref().and_then(|i| i.parse::<Uuid>().ok()) {
                        handled.insert(id, r.at);
                        batches.push(r.elapsed_ms);
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        (handled, batches)
    }))
}

/// What the producer of a latency run committed.
pub(crate) struct Produced {
    /// When each event's commit returned.
    pub committed: HashMap<Uuid, Wall>,
    /// The rate it really committed at.
    pub committed_per_s: f64,
    /// Its transactions, sorted, in ms.
    pub txns: Vec<f64>,
}

/// Commits one event per tick at `rate`/s for `duration`, noting when
/// each commit returned.
pub(crate) async fn produce(
    pool: &PgPool,
    producer: &Producer,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Produced> {
    let committed: std::sync::Arc<std::sync::Mutex<HashMap<Uuid, Wall>>> = Default::default();
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    // The producer is a service's request workers: `WORKERS` tasks, each
    // with a connection of its own, take the ticks and commit one event
    // per tick. Concurrent, because one after another each commit waits
    // for its WAL flush and the producer fell behind the rate whenever the
    // disk was busy (and measured a lower rate than it reported); workers
    // holding their connections, because a connection given back to the
    // pool costs a round trip that is sqlx's, not warren's.
    const WORKERS: usize = 16;
    let (ticks, rx) = tokio::sync::mpsc::channel::<usize>(WORKERS * 16);
    let rx = Ticks::new(rx);
    let mut producers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (pool, producer, committed, rx) = (
            pool.clone(),
            producer.clone(),
            committed.clone(),
            rx.clone(),
        );
        producers.spawn(async move {
            let conn = pool.acquire().await?;
            work(rx, conn, move |mut conn, n| {
                let (producer, committed) = (producer.clone(), committed.clone());
                async move {
                    let subject = match &producer.subjects {
                        Some(s) if !s.is_empty() => s[n % s.len()],
                        _ => Uuid::now_v7(),
                    };
                    let e = sample(subject);
                    let id = e.id;
                    producer.commit_one(&mut conn, e).await?;
                    let wall = chrono::Utc::now();
                    if let Ok(mut c) = committed.lock() {
                        c.insert(id, wall);
                    }
                    Ok(conn)
                }
            })
            .await
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for n in 0..total {
        tick.tick().await;
        if ticks.send(n).await.is_err() {
            break;
        }
    }
    drop(ticks);
    let mut txns = Vec::with_capacity(total);
    while let Some(done) = producers.join_next().await {
        txns.extend(done??);
    }
    let committed_per_s = total as f64 / started.elapsed().as_secs_f64();
    txns.sort_by(|a, b| a.total_cmp(b));
    let committed = committed
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default();
    Ok(Produced {
        committed,
        committed_per_s,
        txns,
    })
}

/// The ticks of a latency run, shared by its workers.
#[derive(Clone)]
pub(crate) struct Ticks(std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<usize>>>);

impl Ticks {
    fn new(rx: tokio::sync::mpsc::Receiver<usize>) -> Self {
        Ticks(std::sync::Arc::new(tokio::sync::Mutex::new(rx)))
    }

    /// The next tick, `None` once the run is over. The lock is held only
    /// while waiting for a tick and is released when this returns, never
    /// held through the commit that follows: a worker that kept it (as a
    /// guard in a `while let` scrutinee does, to the end of the loop's
    /// body) would make the workers take turns, and the producer would
    /// commit at one transaction's pace instead of the rate asked for.
    async fn next(&self) -> Option<usize> {
        self.0.lock().await.recv().await
    }
}

/// One producer worker: runs `commit` on each tick it takes until the run
/// is over, handing `state` (its connection) from one commit to the next;
/// the duration of each, in ms.
async fn work<S, F, Fut>(ticks: Ticks, mut state: S, mut commit: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut(S, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let mut txns = Vec::new();
    while let Some(n) = ticks.next().await {
        let began = Instant::now();
        state = commit(state, n).await?;
        txns.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(txns)
}

/// With the relay idle (asleep on LISTEN), commits one event at a time and
/// measures commit-to-on-the-bus through a wiretap queue; sorted ms.
async fn wakeup(
    pool: &PgPool,
    outbox: &Outbox,
    conn: &lapin::Connection,
    topology: &Topology,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        topology.exchange().into(),
        "order.placed".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await?;
    let mut tap = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        // Long enough for the relay to finish its pass and sleep again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut tx = pool.begin().await?;
        outbox.append(&mut tx, sample(Uuid::now_v7())).await?;
        tx.commit().await?;
        let committed = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), tap.next())
            .await
            .context("idle relay did not publish within 10s")?
            .context("wiretap closed")??;
        out.push(committed.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = ch.close(200, ("wakeup done").into()).await;
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

/// Peak resident set size of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Below this share of the rate asked, the latency run's producer fell
/// behind (a slow disk, or a defect like the one of BENCHMARKS.md's 17:04
/// section): its figures are then at a lower load than the run says.
const KEPT_UP: f64 = 0.95;

impl BenchReport {
    /// Whether the latency run's producer committed at the rate asked.
    pub fn producer_kept_up(&self) -> bool {
        self.latency_committed_per_s >= KEPT_UP * f64::from(self.latency_rate_per_s)
    }
}

/// The readable table.
pub fn render(r: &BenchReport) -> String {
    let behind = if r.producer_kept_up() {
        String::new()
    } else {
        format!(
            "\n  ! the producer committed {:.0} events/s of the {}/s asked: the latency run measured a lower load",
            r.latency_committed_per_s, r.latency_rate_per_s
        )
    };
    format!(
        "warren bench — {events} events of {bytes} bytes, {lanes} consumer lanes\n\
         \n  ceiling (broker alone)   {ceil:>10.0} events/s\
         \n  drain (outbox→consumer)  {drain:>10.0} events/s   ({ratio:.2} × ceiling)\
         \n  latency @ {rate}/s         p50 {p50:.2} ms   p99 {p99:.2} ms   max {max:.2} ms   ({n} samples; committed at {done:.0}/s; published by the {publisher}){behind}\
         \n  producer transaction     p50 {tp50:.2} ms   p99 {tp99:.2} ms   (BEGIN, append, COMMIT of one event, in that run)\
         \n  published batch          {epb:.1} events, publish → confirms mean {conf:.2} ms   (in that run)\
         \n  consumer batch           p50 {cp50:.2} ms   p99 {cp99:.2} ms   (deliveries taken → acked, in that run)\
         \n  idle relay wake-up       p50 {wp50:.2} ms   max {wmax:.2} ms   ({wn} samples, commit → on the bus)\
         \n  peak RSS                 {rss:>10.1} MB\n",
        events = r.events,
        bytes = r.body_bytes,
        lanes = r.lanes,
        ceil = r.ceiling_events_per_s,
        drain = r.drain_events_per_s,
        ratio = r.drain_vs_ceiling,
        rate = r.latency_rate_per_s,
        publisher = r.latency_publisher,
        done = r.latency_committed_per_s,
        p50 = r.latency_p50_ms,
        p99 = r.latency_p99_ms,
        max = r.latency_max_ms,
        tp50 = r.producer_txn_p50_ms,
        tp99 = r.producer_txn_p99_ms,
        epb = r.relay_events_per_batch,
        conf = r.relay_confirm_mean_ms,
        cp50 = r.consumer_batch_p50_ms,
        cp99 = r.consumer_batch_p99_ms,
        n = r.latency_samples,
        wp50 = r.wakeup_p50_ms,
        wmax = r.wakeup_max_ms,
        wn = r.wakeup_samples,
        rss = r.rss_mb,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two workers must be inside their commits at once: each waits in
    /// its commit for the other to arrive. Workers that took turns on the
    /// ticks would never meet (the timeout is only how the test fails).
    fn report(committed_per_s: f64) -> BenchReport {
        BenchReport {
            events: 20_000,
            lanes: 2,
            body_bytes: 915,
            ceiling_events_per_s: 20_000.0,
            drain_events_per_s: 10_000.0,
            drain_vs_ceiling: 0.5,
            latency_rate_per_s: 1000,
            latency_publisher: "eager",
            latency_committed_per_s: committed_per_s,
            latency_samples: 1000,
            latency_p50_ms: 4.0,
            latency_p99_ms: 20.0,
            latency_max_ms: 30.0,
            producer_txn_p50_ms: 1.2,
            producer_txn_p99_ms: 5.0,
            relay_events_per_batch: 1.0,
            relay_confirm_mean_ms: 2.5,
            consumer_batch_p50_ms: 1.5,
            consumer_batch_p99_ms: 10.0,
            wakeup_samples: 20,
            wakeup_p50_ms: 1.3,
            wakeup_max_ms: 2.0,
            rss_mb: 70.0,
        }
    }

    /// A producer that fell behind the rate is said on the table, so
    /// that latency at a lower load is not read as latency at the rate.
    #[test]
    fn the_table_says_when_the_producer_fell_behind() {
        let behind = render(&report(638.0));
        assert!(
            behind.contains("committed 638 events/s of the 1000/s asked"),
            "{behind}"
        );
        let kept_up = render(&report(998.0));
        assert!(!kept_up.contains("asked"), "{kept_up}");
        assert!(kept_up.contains("committed at 998/s"), "{kept_up}");
    }

    #[tokio::test]
    async fn producer_workers_commit_concurrently() {
        let (tx, rx) = tokio::sync::mpsc::channel::<usize>(4);
        let ticks = Ticks::new(rx);
        let met = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let worker = |ticks: Ticks| {
            let met = met.clone();
            work(ticks, (), move |(), _n| {
                let met = met.clone();
                async move {
                    met.wait().await;
                    Ok(())
                }
            })
        };
        let (a, b) = (
            tokio::spawn(worker(ticks.clone())),
            tokio::spawn(worker(ticks)),
        );
        tx.send(0).await.expect("send");
        tx.send(1).await.expect("send");
        drop(tx);
        let both = async { (a.await, b.await) };
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the workers took turns: neither got a tick while the other committed");
        let (a, b) = (a.expect("join").expect("a"), b.expect("join").expect("b"));
        assert_eq!(a.len() + b.len(), 2, "every tick committed once");
        assert_eq!((a.len(), b.len()), (1, 1), "one tick each");
    }
}
