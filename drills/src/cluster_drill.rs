//! The `cluster` drill: the shop on a three-node RabbitMQ cluster
//! ([`crate::rabbit_cluster`]) with the orders service's database on a
//! second PostgreSQL server, under the mixed load of the other drills,
//! while the cluster loses nodes:
//!
//! 1. `kill -9` of the node leading most of the namespace's work queues,
//!    left down for `node_down`, then started again;
//! 2. a rolling restart: each node in turn stopped cleanly and started
//!    again, the next one only once the restarted node runs and every
//!    quorum queue has all its members online, and stopping it would
//!    cost no queue its majority.
//!
//! For each fault it records when the node was back, when every queue had
//! its members again, when a probe order placed at the moment of the
//! fault shipped (time to recover: the system needs no third node to
//! work, so this is mostly leader election and reconnection), and the
//! orders placed and settled per second from the fault until both
//! happened, against the same rates before the first fault.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::cluster::{Env, Servers};
use crate::leftovers::ServerChange;
use crate::load::{self, lock};
use crate::rabbit_cluster::{self as rc, RabbitCluster};
use crate::scenarios::{self, Done, Fault, Figures, Options, Run};
use crate::servers;

/// Port of the second PostgreSQL cluster (`pg_createcluster … other`).
pub const OTHER_PG_PORT: u16 = 5433;

/// Orders placed and settled per second over an interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rate {
    /// Orders acknowledged (202 or a confirmed publish) per second.
    pub placed_per_s: f64,
    /// Orders reaching `shipped` or `cancelled` per second.
    pub settled_per_s: f64,
    /// Length of the interval, seconds.
    pub over_s: f64,
    /// Longest time within it in which no order settled, seconds (to the
    /// half-second sampling): a stall a rate over the interval averages away.
    pub longest_stall_s: f64,
}

/// One node fault and how the system and the cluster came back.
#[derive(Debug, Clone, Serialize)]
pub struct NodeFault {
    /// What was done.
    pub what: String,
    /// The node.
    pub node: String,
    /// Seconds since the first order.
    pub at_s: f64,
    /// From the fault until the node had booted again, seconds.
    pub node_back_s: f64,
    /// From the kill until every queue of the namespace had a leader on
    /// another node (the kill only), seconds.
    pub leaders_moved_s: Option<f64>,
    /// From the fault until the node ran in the cluster and every quorum
    /// queue of the namespace had all its members online, seconds.
    pub rejoined_s: f64,
    /// From the fault until a probe order placed at that moment shipped.
    pub recover_s: f64,
    /// Throughput from the fault until both the rejoin and the probe.
    pub during: Rate,
}

/// The figures of the drill.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterFigures {
    /// The figures every fault drill has, audit included.
    pub figures: Figures,
    /// `AMQP_URL` the shop ran against.
    pub amqp_url: String,
    /// Server of the orders service's database (`host:port`).
    pub orders_database: String,
    /// Work queues led by each node just before the kill.
    pub leaders_before_kill: BTreeMap<String, usize>,
    /// Throughput before the first fault.
    pub baseline: Rate,
    /// The faults in order.
    pub nodes: Vec<NodeFault>,
    /// Whether orders were still being placed when the last fault ended
    /// (a window too short for the faults leaves the last ones unloaded).
    pub load_covered_faults: bool,
}

impl ClusterFigures {
    /// Whether the drill passed.
    pub fn passed(&self) -> bool {
        self.figures.passed()
    }
}

/// (when, orders acknowledged, orders settled), every half second.
type Samples = Arc<Mutex<Vec<(Instant, usize, i64)>>>;

fn sampler(env: &Env, placed: load::Shared) -> (Samples, tokio::task::JoinHandle<()>) {
    let samples: Samples = Arc::default();
    let out = samples.clone();
    let pool = env.orders().clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let settled: Option<i64> = sqlx::query_scalar(
                "SELECT count(*) FROM orders.orders WHERE status IN ('shipped', 'cancelled')",
            )
            .fetch_one(&pool)
            .await
            .ok();
            // A failed read (the server busy) skips a sample; the rates
            // are taken between samples that exist.
            if let Some(settled) = settled {
                let n = lock(&placed).ids.len();
                out.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), n, settled));
            }
        }
    });
    (samples, task)
}

/// Rates between the last sample at or before `from` and the first at or
/// after `to` (the nearest ones when the interval runs past the samples).
fn rate(samples: &Samples, from: Instant, to: Instant) -> Rate {
    let s = samples.lock().unwrap_or_else(|e| e.into_inner());
    let a = s.iter().rev().find(|x| x.0 <= from).or(s.first());
    let b = s.iter().find(|x| x.0 >= to).or(s.last());
    match (a, b) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            let secs = b.0.duration_since(a.0).as_secs_f64();
            let mut stall = Duration::ZERO;
            let mut last_progress = a;
            for x in s.iter().filter(|x| x.0 > a.0 && x.0 <= b.0) {
                if x.2 > last_progress.2 {
                    last_progress = x;
                }
                stall = stall.max(x.0.duration_since(last_progress.0));
            }
            Rate {
                placed_per_s: (b.1 as f64 - a.1 as f64) / secs,
                settled_per_s: (b.2 - a.2) as f64 / secs,
                over_s: secs,
                longest_stall_s: stall.as_secs_f64(),
            }
        }
        _ => Rate::default(),
    }
}

/// What one fault measured, before the rates are taken.
struct Measured {
    began: Instant,
    node_back: Duration,
    leaders_moved: Option<Duration>,
    rejoined: Duration,
    recover: Duration,
}

/// Injects one fault on node `n` (`kill` true: `kill -9`, left down
/// `down`; false: a clean stop), starts the node again, and measures.
async fn fault(
    c: &RabbitCluster,
    run: &Run,
    n: u8,
    kill: bool,
    down: Duration,
    within: Duration,
) -> anyhow::Result<Measured> {
    let ns = run.env.namespace.clone();
    let targets = lock_targets(run);
    let began = Instant::now();
    if kill {
        rc::kill(c, n).await?;
    } else {
        rc::stop(c, n).await?;
    }
    let cluster_side = async {
        let leaders_moved = if kill {
            Some(rc::wait_leaders_off(n, &ns, Duration::from_secs(60)).await?)
        } else {
            None
        };
        tokio::time::sleep_until((began + down).into()).await;
        rc::restart(c, n).await?;
        let node_back = began.elapsed();
        rc::wait_rejoined(n, &ns, Duration::from_secs(300)).await?;
        anyhow::Ok((leaders_moved, node_back, began.elapsed()))
    };
    let (probe, cluster_side) = tokio::join!(
        load::probe(&run.env, &targets, run.customers[0], &run.placed, within),
        cluster_side
    );
    let (recover, _) = probe?;
    let (leaders_moved, node_back, rejoined) = cluster_side?;
    Ok(Measured {
        began,
        node_back,
        leaders_moved,
        rejoined,
        recover,
    })
}

fn lock_targets(run: &Run) -> Vec<String> {
    run.targets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Runs the drill: servers started (or reused), the shop, the load, the
/// faults, the audit; the servers it started are stopped again unless
/// `keep` or the audit failed (then they stay for a look).
pub async fn run(
    servers: &Servers,
    o: &Options,
    node_down: Duration,
    keep: bool,
) -> anyhow::Result<ClusterFigures> {
    let cluster = rc::ensure()
        .await
        .context("the three-node RabbitMQ cluster")?;
    let rabbit = ServerChange::RabbitCluster(cluster.script.clone());
    if !keep {
        servers.leftovers.add_server(rabbit.clone());
    }
    eprintln!(
        "  RabbitMQ cluster {} ({})",
        if cluster.started_here {
            "started"
        } else {
            "reused"
        },
        cluster.urls
    );
    let (orders_url, pg) = match &servers.orders_database_url {
        Some(u) => (u.clone(), None),
        None => {
            let pg = servers::ensure_pg_cluster("other", OTHER_PG_PORT)
                .await
                .context("the second PostgreSQL cluster")?;
            if pg.started_here && !keep {
                servers.leftovers.add_server(ServerChange::Postgres {
                    version: pg.version.clone(),
                    name: pg.name.clone(),
                });
            }
            (pg.url.clone(), Some(pg))
        }
    };
    let servers = Servers {
        amqp_url: cluster.urls.clone(),
        orders_database_url: Some(orders_url.clone()),
        ..servers.clone()
    };
    let env = Env::create(&servers, "cluster").await?;
    let w = env.start("a", scenarios::free_port()?).await?;
    let mut run = scenarios::prepare(o, &w, env).await?;
    let (samples, sampling) = sampler(&run.env, run.placed.clone());
    let t0 = Instant::now();
    let plan = std::mem::take(&mut run.plan);
    let placing = load::run(
        &run.env,
        plan,
        o.window,
        run.targets.clone(),
        run.placed.clone(),
    );
    let first_fault = o.window.mul_f64(0.1).max(Duration::from_secs(15));
    let mut measured: Vec<(String, u8, Measured)> = Vec::new();
    let mut leaders_before_kill = BTreeMap::new();
    let injecting = async {
        tokio::time::sleep_until((t0 + first_fault).into()).await;
        leaders_before_kill = rc::work_queue_leaders(&run.env.namespace).await?;
        let (leader, _) = leaders_before_kill
            .iter()
            .max_by_key(|(_, count)| **count)
            .context("no work queue has a leader")?;
        let n = rc::number(leader).context("a leader outside the cluster")?;
        eprintln!(
            "  kill -9 of {leader} (leads {leaders_before_kill:?}) at {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        let m = fault(&cluster, &run, n, true, node_down, o.settle_within).await?;
        eprintln!(
            "    leaders moved after {:.2}s, probe shipped after {:.2}s, node back {:.1}s, rejoined {:.1}s",
            m.leaders_moved.unwrap_or_default().as_secs_f64(),
            m.recover.as_secs_f64(),
            m.node_back.as_secs_f64(),
            m.rejoined.as_secs_f64()
        );
        measured.push(("kill -9 of the leading node".into(), n, m));
        for n in rc::NODES {
            let waited = rc::wait_not_quorum_critical(n, Duration::from_secs(300)).await?;
            eprintln!(
                "  rolling restart: stop {} at {:.1}s (waited {:.1}s for it not to be quorum-critical)",
                rc::node(n),
                t0.elapsed().as_secs_f64(),
                waited.as_secs_f64()
            );
            let m = fault(&cluster, &run, n, false, Duration::ZERO, o.settle_within).await?;
            eprintln!(
                "    probe shipped after {:.2}s, node back {:.1}s, rejoined {:.1}s",
                m.recover.as_secs_f64(),
                m.node_back.as_secs_f64(),
                m.rejoined.as_secs_f64()
            );
            measured.push(("rolling restart".into(), n, m));
        }
        anyhow::Ok(Instant::now())
    };
    let (placed, injected) = tokio::join!(
        async {
            let r = placing.await;
            (r, Instant::now())
        },
        injecting
    );
    let (placed, placed_done) = placed;
    placed?;
    let faults_done = injected?;
    let baseline = rate(&samples, t0 + Duration::from_secs(3), t0 + first_fault);
    let nodes: Vec<NodeFault> = measured
        .iter()
        .map(|(what, n, m)| NodeFault {
            what: what.clone(),
            node: rc::node(*n),
            at_s: m.began.duration_since(t0).as_secs_f64(),
            node_back_s: m.node_back.as_secs_f64(),
            leaders_moved_s: m.leaders_moved.map(|d| d.as_secs_f64()),
            rejoined_s: m.rejoined.as_secs_f64(),
            recover_s: m.recover.as_secs_f64(),
            during: rate(&samples, m.began, m.began + m.rejoined.max(m.recover)),
        })
        .collect();
    sampling.abort();
    let faults = nodes
        .iter()
        .map(|f| Fault {
            what: format!("{} ({})", f.what, f.node),
            at_s: f.at_s,
            outage_s: f.node_back_s,
            recover_s: f.recover_s,
        })
        .collect();
    let figures = scenarios::finish(
        run,
        "cluster",
        o,
        Done {
            faults,
            t0,
            placed_done,
            procs: vec![w],
            peak_rss: 0,
        },
        keep,
    )
    .await?;
    let passed = figures.passed();
    if passed && !keep {
        if let Some(pg) = pg.filter(|p| p.started_here) {
            servers::stop_pg_cluster(&pg.version, &pg.name).await?;
            servers.leftovers.remove_server(&ServerChange::Postgres {
                version: pg.version,
                name: pg.name,
            });
        }
        rc::stop_all(&cluster.script).await?;
        servers.leftovers.remove_server(&rabbit);
    } else {
        servers.leftovers.remove_server(&rabbit);
        if let Some(pg) = pg {
            servers.leftovers.remove_server(&ServerChange::Postgres {
                version: pg.version,
                name: pg.name,
            });
        }
        eprintln!("  kept the RabbitMQ cluster (scripts/rabbitmq-cluster stop) and the orders database's server");
    }
    let orders_database = url::Url::parse(&orders_url)
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or_default(),
                u.port().unwrap_or(5432)
            )
        })
        .unwrap_or_default();
    Ok(ClusterFigures {
        figures,
        amqp_url: cluster.urls,
        orders_database,
        leaders_before_kill,
        baseline,
        nodes,
        load_covered_faults: placed_done >= faults_done,
    })
}

fn render_rate(r: &Rate) -> String {
    format!(
        "{:.1} placed/s, {:.1} settled/s over {:.1}s, longest stall {:.1}s",
        r.placed_per_s, r.settled_per_s, r.over_s, r.longest_stall_s
    )
}

/// The figures as report lines.
pub fn render(f: &ClusterFigures) -> String {
    let mut out = scenarios::render(&f.figures);
    out.push_str(&format!(
        "  RabbitMQ {}; orders database on {}\n  before the faults: {}\n",
        f.amqp_url,
        f.orders_database,
        render_rate(&f.baseline)
    ));
    for n in &f.nodes {
        out.push_str(&format!(
            "  {} ({}) at {:.1}s: {}node back {:.1}s, rejoined with every member online {:.1}s, probe shipped {:.2}s; during: {}\n",
            n.what,
            n.node,
            n.at_s,
            n.leaders_moved_s
                .map(|s| format!("leaders moved {s:.2}s, "))
                .unwrap_or_default(),
            n.node_back_s,
            n.rejoined_s,
            n.recover_s,
            render_rate(&n.during)
        ));
    }
    if !f.load_covered_faults {
        out.push_str("  note: the orders were all placed before the last fault ended (use a longer --window)\n");
    }
    out
}
