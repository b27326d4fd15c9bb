//! `warren bench --scaling --processes`: each consumer an OS process of
//! its own.
//!
//! The bench runs this program again (`std::env::current_exe()`) with the
//! hidden `warren bench --scaling-sink <NAMESPACE>`, which runs exactly
//! one consumer of the scaling bench's sink ([`serve_sink`]: the same
//! `Service`, layout, lanes, prefetch and partitions as in-process) and
//! nothing else, says `ready` on its standard output once it consumes,
//! and stops gracefully on SIGTERM or SIGINT — or when its standard input
//! closes, which is how a bench that died without stopping it (SIGKILL)
//! still ends it.
//!
//! Since the outcomes are then in other processes, a row is measured
//! from the database: the drain ends when the inbox (plus what was
//! dead-lettered) holds every event; the latency is each event's commit,
//! as the producer saw it return, to the inbox's `handled_at`; the
//! deferrals, duplicates and dead letters are the rows of
//! `bench_sink.inbox_outcomes`, counted once the consumers have stopped
//! (a stopping consumer writes its queued records first).

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;
use transport::Topology;
use uuid::Uuid;

use super::{
    bus, latency_producer, reset, row, settled_in_db, sink_config, sink_service, start_producing,
    throwaway, until_shared, Measured, ScalingOptions, ScalingRow,
};
use crate::bench::produce;

/// How long a consumer process may take to start consuming.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How long a consumer process may take to stop after SIGTERM before it
/// is killed.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// What one consumer process runs: the hidden `--scaling-sink` flags.
#[derive(Debug, Clone)]
pub struct SinkProcess {
    /// The scaling run's namespace.
    pub namespace: String,
    /// Broker URL.
    pub amqp_url: String,
    /// Lanes of the consumer.
    pub lanes: usize,
    /// Prefetch of the consumer (per partition when partitioned).
    pub prefetch: u16,
    /// 0 for the competing layout.
    pub partitions: u16,
}

/// Runs one consumer of the sink until SIGTERM/SIGINT (`shutdown`) or
/// until standard input closes, then stops it gracefully (in-flight
/// batches finished and acked, outcome records written).
pub async fn serve_sink(
    pool: PgPool,
    sink: &SinkProcess,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bus = bus(&sink.amqp_url, &throwaway(&sink.namespace));
    let config = sink_config(sink.lanes, sink.prefetch, sink.partitions);
    let running = sink_service(&bus, &config, pool.clone()).start().await?;
    let parent_gone = stdin_closed();
    tracing::info!(namespace = %sink.namespace, partitions = sink.partitions, "scaling consumer ready");
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = parent_gone.cancelled() => {
            tracing::warn!("the bench's pipe closed: stopping");
        }
    }
    running.stop().await;
    pool.close().await;
    Ok(())
}

/// A token cancelled when standard input reaches its end. Read on a
/// thread of its own, not tokio's: a blocking read there could not be
/// cancelled and would hold up the runtime's shutdown.
fn stdin_closed() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        t.cancel();
    });
    token
}

/// The consumer processes of a run. Each is registered before it is
/// waited for, so that [`Children::stop`] covers it on every path.
#[derive(Debug, Clone, Default)]
pub struct Children(Arc<Mutex<Vec<Child>>>);

impl Children {
    fn push(&self, child: Child) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
    }

    fn take(&self) -> Vec<Child> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Starts one consumer process and waits until it consumes.
    async fn spawn(&self, sink: &SinkProcess, database_url: &SecretString) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding this program to run its consumers")?;
        let mut child = Command::new(exe)
            .args(["bench", "--scaling-sink", &sink.namespace])
            .args(["--partitions", &sink.partitions.to_string()])
            .args(["--lanes", &sink.lanes.to_string()])
            .args(["--prefetch", &sink.prefetch.to_string()])
            // In the environment, not on the command line (`ps`).
            .env("AMQP_URL", &sink.amqp_url)
            .env("DATABASE_URL", database_url.expose_secret())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // The last resort, should a `Children` be dropped unstopped.
            .kill_on_drop(true)
            .spawn()
            .context("starting a consumer process")?;
        let stdout = child.stdout.take();
        self.push(child);
        let stdout = stdout.context("the consumer process has no standard output")?;
        tokio::time::timeout(READY_WITHIN, ready(stdout))
            .await
            .with_context(|| format!("a consumer process was not ready within {READY_WITHIN:?}"))?
    }

    /// Stops every process (SIGTERM, then SIGKILL after 30 s) and reaps
    /// it; an error if any did not exit cleanly. Harmless when empty.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let children = self.take();
        for child in &children {
            if let Some(pid) = child.id() {
                signal("-TERM", pid).await;
            }
        }
        let mut failed = Vec::new();
        for mut child in children {
            match stop_one(&mut child).await {
                Ok(status) if status.success() => {}
                Ok(status) => failed.push(status.to_string()),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        anyhow::ensure!(
            failed.is_empty(),
            "consumer process(es) did not stop cleanly: {}",
            failed.join("; ")
        );
        Ok(())
    }
}

/// Waits for `child` to exit after SIGTERM, killing it after 30 s.
async fn stop_one(child: &mut Child) -> anyhow::Result<ExitStatus> {
    // Held open until the exit: `wait` would close it first, and the
    // process, seeing its standard input end, would take it for a bench
    // that died rather than for the SIGTERM it got.
    let _stdin = child.stdin.take();
    match tokio::time::timeout(STOP_WITHIN, child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            child.kill().await?;
            anyhow::bail!("killed: still running {STOP_WITHIN:?} after SIGTERM")
        }
    }
}

/// Sends `sig` to `pid` through `kill(1)`, as the drills do (no libc
/// binding); a failure means it had exited, which the wait then sees.
async fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Waits for the consumer process's `ready` line.
async fn ready(stdout: ChildStdout) -> anyhow::Result<()> {
    let mut lines = BufReader::new(stdout).lines();
    match lines.next_line().await? {
        Some(line) if line.trim() == "ready" => Ok(()),
        Some(line) => anyhow::bail!("a consumer process said {line:?} instead of ready"),
        None => anyhow::bail!("a consumer process ended before it was ready (its error is above)"),
    }
}

/// Waits until the database holds `n` events handled or dead-lettered.
async fn until_in_db(pool: &PgPool, n: u64, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let done = settled_in_db(pool).await?;
        if done >= n {
            return Ok(());
        }
        if started.elapsed() > limit {
            anyhow::bail!("{done} of {n} events settled within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The rare outcomes of a row, from `bench_sink.inbox_outcomes`.
struct Trail {
    drain_deferrals: u64,
    drain_dead_letters: u64,
    latency_deferrals: u64,
    duplicates: u64,
}

/// Counts the recorded outcomes, split between the drain's events and
/// the latency run's (`latency_ids`).
async fn trail(pool: &PgPool, latency_ids: Vec<Uuid>) -> anyhow::Result<Trail> {
    let counts: Vec<(String, bool, i64)> = sqlx::query_as(
        "SELECT o.outcome, l.id IS NOT NULL, count(*) FROM bench_sink.inbox_outcomes o \
         LEFT JOIN unnest($1::uuid[]) AS l(id) ON l.id = o.event_id \
         GROUP BY 1, 2",
    )
    .bind(latency_ids)
    .fetch_all(pool)
    .await?;
    let n = |outcome: &str, latency: Option<bool>| -> u64 {
        counts
            .iter()
            .filter(|(o, l, _)| o == outcome && latency.is_none_or(|want| *l == want))
            .map(|(_, _, c)| u64::try_from(*c).unwrap_or(0))
            .sum()
    };
    Ok(Trail {
        drain_deferrals: n("deferred", Some(false)),
        drain_dead_letters: n("dead-lettered", Some(false)),
        latency_deferrals: n("deferred", Some(true)),
        duplicates: n("duplicate", None),
    })
}

/// One layout with `consumers` consumer processes: drain, then latency,
/// measured from the database. The caller stops the processes if this
/// fails.
pub(super) async fn one(
    pool: &PgPool,
    opts: &ScalingOptions,
    topology: &Topology,
    partitions: u16,
    consumers: usize,
    children: &Children,
) -> anyhow::Result<ScalingRow> {
    let outbox = reset(pool, opts.events).await?;
    let config = sink_config(opts.lanes, opts.prefetch, partitions);
    let bus = bus(&opts.amqp_url, topology);
    sink_service(&bus, &config, pool.clone()).declare().await?;
    let sink = SinkProcess {
        namespace: opts.namespace.clone(),
        amqp_url: opts.amqp_url.clone(),
        lanes: opts.lanes,
        prefetch: opts.prefetch,
        partitions,
    };
    for _ in 0..consumers {
        children.spawn(&sink, &opts.database_url).await?;
    }
    if partitions > 0 {
        until_shared(pool, partitions, consumers).await?;
    }

    let producing = start_producing(&bus, pool).await?;
    let started = Instant::now();
    until_in_db(pool, opts.events as u64, Duration::from_secs(600))
        .await
        .context("drain")?;
    let drain_per_s = opts.events as f64 / started.elapsed().as_secs_f64();

    let producer = latency_producer(&producing, outbox, opts)?;
    let produced = produce(pool, &producer, opts.rate, opts.duration).await?;
    let committed = opts.events as u64 + produced.committed.len() as u64;
    until_in_db(pool, committed, Duration::from_secs(120))
        .await
        .context("after the last commit")?;
    producing.stop().await;
    // Stopped before counting: each writes its queued outcome records.
    children.stop().await?;

    let trail = trail(pool, produced.committed.keys().copied().collect()).await?;
    let inbox = super::inbox_latencies(pool, &produced.committed).await?;
    let lost = committed.saturating_sub(settled_in_db(pool).await?);
    super::remove_queues(&opts.amqp_url, topology, partitions, &config).await?;
    let measured = Measured {
        drain_per_s,
        drain_deferrals: trail.drain_deferrals,
        drain_dead_letters: trail.drain_dead_letters,
        committed_per_s: produced.committed_per_s,
        acked: Vec::new(),
        inbox,
        latency_deferrals: trail.latency_deferrals,
        duplicates: trail.duplicates,
        lost,
    };
    Ok(row(opts, "processes", partitions, consumers, measured))
}
