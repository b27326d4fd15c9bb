//! `warren bench --scaling`: what each consumer layout costs as the
//! consumers of one service grow from 1 to 3, measured in one run on a
//! fresh namespace — the figures of issue 22's scaling table (single node).
//!
//! For each layout (`competing`: one queue, consumers competing, order
//! kept by deferring early events; `partitioned`: P partitions with single
//! active consumer, shared out) and each number of consumers, the same
//! two measurements as `warren bench`'s drain and latency runs:
//!
//! 1. drain: N events committed in the `bench` outbox beforehand (20 per
//!    subject, in order), then the relay starts; the time until all are
//!    handled by the consumers together;
//! 2. latency: events committed at a fixed rate over a pool of subjects
//!    (so that one subject's events do follow each other closely),
//!    commit-to-handled, by whichever consumer handled each.
//!
//! Deferrals (early events put back through the retry queue) and dead
//! letters are counted in each. Each consumer is a `Service` of its own
//! with its own broker connection and database pool, as a process of its
//! own would have; they share this process's cores with the relay, the
//! producer, the broker and the database, so more consumers cannot be
//! faster on this machine: the point is the cost of each layout per event,
//! and that it does not grow with the consumers.
//!
//! With `--processes` ([`processes`]) each consumer is an OS process of
//! its own (this program again, running one sink until SIGTERM), and what
//! the consumers did is read from the database instead of their outcomes:
//! the drain from the inbox's row count, the latency from the inbox's
//! `handled_at`, the deferrals, duplicates and dead letters from
//! `inbox_outcomes`. Both modes report the inbox latency and the events
//! lost, measured the same way from the database, so their rows compare.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use consumers::{Outcome, Stats, SubscriptionConfig};
use producers::{EagerConfig, Outbox, RelayConfig};
use serde::Serialize;
use services::catalog::OrderPlaced;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use transport::Topology;
use uuid::Uuid;
use warren::{Bus, Running, Service};

use crate::bench::{latency, ms_between, prefill, prepare, round2, Producer, Sink, Wall, SINK};

pub mod processes;

pub use processes::Children;

/// What to run.
#[derive(Debug, Clone)]
pub struct ScalingOptions {
    /// Events in each drain run.
    pub events: usize,
    /// Events per second in each latency run.
    pub rate: u32,
    /// Length of each latency run.
    pub duration: Duration,
    /// Broker URL.
    pub amqp_url: String,
    /// Lanes of each consumer.
    pub lanes: usize,
    /// Prefetch of each consumer (per partition when partitioned).
    pub prefetch: u16,
    /// Partitions of the partitioned layout.
    pub partitions: u16,
    /// Consumers, from 1 up to this.
    pub max_consumers: usize,
    /// Subjects the latency runs' events are spread over.
    pub subjects: usize,
    /// The run's throwaway namespace.
    pub namespace: String,
    /// Each consumer an OS process of its own ([`processes`]) rather than
    /// a task of this one.
    pub processes: bool,
    /// The database URL, handed to the consumer processes.
    pub database_url: secrecy::SecretString,
}

/// One layout with one number of consumers.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// `competing` or `partitioned`.
    pub layout: &'static str,
    /// `in-process` (each consumer a task of the bench) or `processes`
    /// (each an OS process of its own).
    pub mode: &'static str,
    pub consumers: usize,
    /// 0 for the competing layout.
    pub partitions: u16,
    pub drain_events_per_s: f64,
    /// Deferrals (an event put back because its predecessor was not
    /// applied yet) during the drain; one event may count several times.
    pub drain_deferrals: u64,
    pub drain_dead_letters: u64,
    pub latency_rate_per_s: u32,
    pub latency_committed_per_s: f64,
    /// Commit to handled as the consumer stamped it after its commit
    /// and ack; in-process only (0 samples and null for `processes`).
    pub latency_samples: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Commit to the start of the transaction that handled the event (the
    /// inbox's `handled_at`), read from the database in both modes.
    pub inbox_samples: usize,
    pub inbox_p50_ms: f64,
    pub inbox_p99_ms: f64,
    pub latency_deferrals: u64,
    /// Redeliveries the inbox absorbed, in both runs.
    pub duplicates: u64,
    /// Events committed (both runs) that are at the end neither in the
    /// sink's inbox nor dead-lettered.
    pub lost: u64,
}

/// Runs every layout and number of consumers, one after the other.
///
/// With [`ScalingOptions::processes`], the consumer processes are kept in
/// `children`, and stopped when each row ends, whether it was measured or
/// failed; a caller that abandons the run (on a signal) stops what is left
/// there ([`Children::stop`]).
pub async fn run(
    pool: PgPool,
    opts: &ScalingOptions,
    children: &Children,
) -> anyhow::Result<Vec<ScalingRow>> {
    prepare(&pool)
        .await
        .context("setting up the bench schemas")?;
    let topology = throwaway(&opts.namespace);
    tracing::info!(namespace = %opts.namespace, processes = opts.processes, "scaling bench starting");
    let mut rows = Vec::new();
    for partitions in [0, opts.partitions] {
        for consumers in 1..=opts.max_consumers.max(1) {
            let row = if opts.processes {
                let row =
                    processes::one(&pool, opts, &topology, partitions, consumers, children).await;
                // Measured or not, no consumer process outlives its row.
                let stopped = children.stop().await;
                if let (Err(_), Err(e)) = (&row, &stopped) {
                    tracing::warn!(error = format!("{e:#}"), "stopping the consumer processes");
                }
                row.and_then(|r| stopped.map(|()| r))
            } else {
                one(&pool, opts, &topology, partitions, consumers).await
            };
            let row = row
                .with_context(|| format!("{consumers} consumer(s), {}", layout_name(partitions)))?;
            tracing::info!(?row, "scaling run measured");
            rows.push(row);
        }
    }
    let conn = transport::connect(&opts.amqp_url, "warren bench cleanup").await?;
    let ch = conn.create_channel().await?;
    topology.delete_exchange(&ch).await?;
    transport::close(conn, "bench done").await;
    Ok(rows)
}

/// The run's namespace, expiring on the broker if the bench dies.
fn throwaway(namespace: &str) -> Topology {
    let mut topology = Topology::new(namespace.to_owned());
    topology.expires = Some(crate::commands::teardown::THROWAWAY_EXPIRES);
    topology
}

fn layout_name(partitions: u16) -> &'static str {
    if partitions == 0 {
        "competing"
    } else {
        "partitioned"
    }
}

fn count(sinks: &[Running], outcome: Outcome) -> u64 {
    sinks
        .iter()
        .filter_map(Running::stats)
        .map(|s: Arc<Stats>| s.count(outcome))
        .sum()
}

/// Waits until the sinks together have handled or dead-lettered `n`.
async fn until_settled(sinks: &[Running], n: u64, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let done = count(sinks, Outcome::Handled) + count(sinks, Outcome::DeadLettered);
        if done >= n {
            return Ok(());
        }
        if started.elapsed() > limit {
            anyhow::bail!("{done} of {n} events settled within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the partitions are shared out among `consumers` (each
/// holding its share, per `consumers::partitions`), so that the runs
/// measure the steady state, not the start.
async fn until_shared(pool: &PgPool, partitions: u16, consumers: usize) -> anyhow::Result<()> {
    let want: Vec<i64> = {
        let mut v: Vec<i64> = (0..consumers)
            .map(|r| consumers::partitions::share(partitions, consumers, r) as i64)
            .filter(|&n| n > 0)
            .collect();
        v.sort();
        v
    };
    let started = Instant::now();
    loop {
        let mut held: Vec<i64> = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND classid::bigint >= $1 AND classid::bigint < $1 + 65536 \
               AND objid::bigint = (hashtext($2) & 2147483647) \
             GROUP BY pid",
        )
        .bind(i64::from(consumers::partitions::PARTITION_LOCK_BASE))
        .bind(SINK)
        .fetch_all(pool)
        .await?;
        held.sort();
        if held == want {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("partitions not shared out within 60s: {held:?}, want {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Empties the bench tables and commits the drain's events in the outbox.
async fn reset(pool: &PgPool, events: usize) -> anyhow::Result<Outbox> {
    sqlx::query(
        "TRUNCATE bench.outbox, bench.outbox_sequences, bench_sink.inbox, \
         bench_sink.inbox_outcomes, bench_sink.subject_progress, bench_sink.items",
    )
    .execute(pool)
    .await?;
    let outbox = Outbox::new("bench")?;
    prefill(pool, &outbox, events).await?;
    Ok(outbox)
}

/// The sink's subscription: the same in both modes.
fn sink_config(lanes: usize, prefetch: u16, partitions: u16) -> SubscriptionConfig {
    SubscriptionConfig {
        prefetch,
        lanes,
        live_feed: false,
        partitions,
        ..Default::default()
    }
}

/// One consumer of the sink, on `pool`.
fn sink_service(bus: &Bus, config: &SubscriptionConfig, pool: PgPool) -> Service {
    Service::new(SINK, bus.clone())
        .pool(pool)
        .handle_batch::<OrderPlaced, _>(Sink)
        .subscription(config.clone())
        .outcome_capacity(1 << 16)
        .without_relay()
}

fn bus(amqp_url: &str, topology: &Topology) -> Bus {
    Bus::new(
        amqp_url.to_owned(),
        topology.clone(),
        services::catalog::catalog(),
    )
}

/// The producing service (relay and eager publisher), started.
async fn start_producing(bus: &Bus, pool: &PgPool) -> anyhow::Result<Running> {
    Ok(Service::new("bench", bus.clone())
        .pool(pool.clone())
        .relay(RelayConfig::default())
        .eager(EagerConfig::default())
        .start()
        .await?)
}

/// The latency run's producer: eager, over `opts.subjects` subjects.
fn latency_producer(
    producing: &Running,
    outbox: Outbox,
    opts: &ScalingOptions,
) -> anyhow::Result<Producer> {
    let eager = producing
        .eager()
        .context("the bench producer runs an eager publisher")?
        .clone();
    Ok(Producer {
        outbox,
        eager: Some(eager),
        subjects: Some(Arc::new(
            (0..opts.subjects.max(1)).map(|_| Uuid::now_v7()).collect(),
        )),
    })
}

/// Deletes the sink's queues of one row's layout.
async fn remove_queues(
    amqp_url: &str,
    topology: &Topology,
    partitions: u16,
    config: &SubscriptionConfig,
) -> anyhow::Result<()> {
    let conn = transport::connect(amqp_url, "warren bench cleanup").await?;
    let ch = conn.create_channel().await?;
    let delays = config.retry.delays();
    if partitions > 0 {
        topology
            .delete_partitions(&ch, SINK, partitions, &delays)
            .await?;
    } else {
        topology.delete_service(&ch, SINK, &delays).await?;
    }
    transport::close(conn, "scaling run done").await;
    Ok(())
}

/// Commit to the handling transaction's start (the inbox's `handled_at`)
/// of each of `committed`'s events found in the inbox; sorted, in ms.
async fn inbox_latencies(
    pool: &PgPool,
    committed: &std::collections::HashMap<Uuid, Wall>,
) -> anyhow::Result<Vec<f64>> {
    let ids: Vec<Uuid> = committed.keys().copied().collect();
    let handled: Vec<(Uuid, Wall)> = sqlx::query_as(
        "SELECT i.event_id, i.handled_at FROM bench_sink.inbox i \
         JOIN unnest($1::uuid[]) AS c(id) ON c.id = i.event_id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let mut ms: Vec<f64> = handled
        .iter()
        .filter_map(|(id, at)| committed.get(id).map(|c| ms_between(*c, *at)))
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms)
}

/// Events in the sink's inbox plus those dead-lettered (as recorded in
/// `inbox_outcomes`).
async fn settled_in_db(pool: &PgPool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM bench_sink.inbox) + \
                (SELECT count(DISTINCT event_id) FROM bench_sink.inbox_outcomes \
                 WHERE outcome = 'dead-lettered')",
    )
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What one row measured, in either mode.
struct Measured {
    drain_per_s: f64,
    drain_deferrals: u64,
    drain_dead_letters: u64,
    committed_per_s: f64,
    /// Commit to handled as stamped on the outcomes; empty for processes.
    acked: Vec<f64>,
    /// Commit to the inbox's `handled_at`.
    inbox: Vec<f64>,
    latency_deferrals: u64,
    duplicates: u64,
    lost: u64,
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn row(
    opts: &ScalingOptions,
    mode: &'static str,
    partitions: u16,
    consumers: usize,
    m: Measured,
) -> ScalingRow {
    ScalingRow {
        layout: layout_name(partitions),
        mode,
        consumers,
        partitions,
        drain_events_per_s: m.drain_per_s.round(),
        drain_deferrals: m.drain_deferrals,
        drain_dead_letters: m.drain_dead_letters,
        latency_rate_per_s: opts.rate,
        latency_committed_per_s: m.committed_per_s.round(),
        latency_samples: m.acked.len(),
        latency_p50_ms: round2(pct(&m.acked, 0.50)),
        latency_p99_ms: round2(pct(&m.acked, 0.99)),
        inbox_samples: m.inbox.len(),
        inbox_p50_ms: round2(pct(&m.inbox, 0.50)),
        inbox_p99_ms: round2(pct(&m.inbox, 0.99)),
        latency_deferrals: m.latency_deferrals,
        duplicates: m.duplicates,
        lost: m.lost,
    }
}

/// One layout with `consumers` consumers in this process: drain, then
/// latency.
async fn one(
    pool: &PgPool,
    opts: &ScalingOptions,
    topology: &Topology,
    partitions: u16,
    consumers: usize,
) -> anyhow::Result<ScalingRow> {
    let outbox = reset(pool, opts.events).await?;
    let config = sink_config(opts.lanes, opts.prefetch, partitions);
    let bus = bus(&opts.amqp_url, topology);
    // Each consumer with a pool of its own, as a process would have.
    let options = (*pool.connect_options()).clone();
    let pools: Vec<PgPool> = (0..consumers)
        .map(|_| {
            PgPoolOptions::new()
                .max_connections(opts.lanes as u32 + 3)
                .acquire_timeout(Duration::from_secs(10))
                .connect_lazy_with(options.clone())
        })
        .collect();
    sink_service(&bus, &config, pool.clone()).declare().await?;
    let mut sinks = Vec::with_capacity(consumers);
    for p in &pools {
        sinks.push(sink_service(&bus, &config, p.clone()).start().await?);
    }
    if partitions > 0 {
        until_shared(pool, partitions, consumers).await?;
    }

    let producing = start_producing(&bus, pool).await?;
    let started = Instant::now();
    until_settled(&sinks, opts.events as u64, Duration::from_secs(600))
        .await
        .context("drain")?;
    let drain_per_s = opts.events as f64 / started.elapsed().as_secs_f64();
    let drain_deferrals = count(&sinks, Outcome::Deferred);
    let drain_dead_letters = count(&sinks, Outcome::DeadLettered);

    let producer = latency_producer(&producing, outbox, opts)?;
    let run = latency(pool, &producer, &sinks, opts.rate, opts.duration).await?;
    let committed = opts.events as u64 + run.txns.len() as u64;
    until_settled(&sinks, committed, Duration::from_secs(120))
        .await
        .context("after the last commit")?;
    let latency_deferrals = count(&sinks, Outcome::Deferred) - drain_deferrals;
    let duplicates = count(&sinks, Outcome::Duplicate);

    producing.stop().await;
    for s in sinks {
        s.stop().await;
    }
    for p in pools {
        p.close().await;
    }
    let inbox = inbox_latencies(pool, &run.committed).await?;
    let lost = committed.saturating_sub(settled_in_db(pool).await?);
    remove_queues(&opts.amqp_url, topology, partitions, &config).await?;
    let measured = Measured {
        drain_per_s,
        drain_deferrals,
        drain_dead_letters,
        committed_per_s: run.committed_per_s,
        acked: run.latencies,
        inbox,
        latency_deferrals,
        duplicates,
        lost,
    };
    Ok(row(opts, "in-process", partitions, consumers, measured))
}

/// The readable table.
pub fn render(rows: &[ScalingRow], opts: &ScalingOptions) -> String {
    let mut out = format!(
        "warren bench --scaling — drain of {} events (20 per subject), latency at {}/s over {} subjects for {:?}; {} lanes per consumer\n\
         (latency: commit → handled and acked, in-process only; inbox: commit → the handling transaction's start, from the database)\n\n\
         layout           mode        consumers  drain ev/s  deferrals  dead letters   latency p50    p99 ms     inbox p50    p99 ms  deferrals  duplicates  lost\n",
        opts.events, opts.rate, opts.subjects, opts.duration, opts.lanes
    );
    let ms = |v: f64| {
        if v.is_nan() {
            "—".to_owned()
        } else {
            format!("{v:.2}")
        }
    };
    for r in rows {
        let layout = if r.partitions > 0 {
            format!("{} ({})", r.layout, r.partitions)
        } else {
            r.layout.to_owned()
        };
        out.push_str(&format!(
            "{layout:<16} {:<11} {:>5} {:>11.0} {:>10} {:>13} {:>10} ms {:>9} {:>10} ms {:>9} {:>10} {:>11} {:>5}\n",
            r.mode,
            r.consumers,
            r.drain_events_per_s,
            r.drain_deferrals,
            r.drain_dead_letters,
            ms(r.latency_p50_ms),
            ms(r.latency_p99_ms),
            ms(r.inbox_p50_ms),
            ms(r.inbox_p99_ms),
            r.latency_deferrals,
            r.duplicates,
            r.lost,
        ));
    }
    out
}
