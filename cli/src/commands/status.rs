//! `warren status [--json]`: per service, the queue and its consumers,
//! dead letters, outbox backlog, inbox size and whether a relay is active.
//! Exits 1 when something needs attention.
//!
//! The broker's own health (resource alarms, file descriptors, memory)
//! comes from `rabbitmqctl status`, and where things are on a cluster
//! (nodes, the node each warren connection is on, each work queue's
//! leader and members: see [`crate::placement`]) from other rabbitmqctl
//! listings; without rabbitmqctl the report says so and goes on: the
//! per-service figures need only AMQP and PostgreSQL.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use secrecy::ExposeSecret as _;
use serde::Serialize;
use services::Stores;

use crate::config::{connect_stores, Settings};
use crate::error::Unhealthy;
use crate::output::{escape, Out};
use crate::placement::{self, Placement};
use crate::rabbitmqctl::{broker_health, BrokerHealth, RabbitmqctlArg};

/// Arguments of `warren status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// One JSON object on standard output, nothing else.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rabbitmqctl: RabbitmqctlArg,
}

/// Unpublished outbox rows older than this make a service unhealthy.
pub const STALE_OUTBOX_S: f64 = 60.0;

/// One service's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    /// Where its store is (DATABASE_URL's database, or its own), password
    /// masked.
    pub database: String,
    /// Ready messages in the work queue (`None`: not declared).
    pub queue_depth: Option<u32>,
    pub consumers: Option<u32>,
    pub dead_letters: Option<u32>,
    pub outbox_backlog: i64,
    pub outbox_oldest_s: Option<f64>,
    pub inbox_size: i64,
    pub relay_active: bool,
    /// The work queue's leader node and members (from rabbitmqctl; `None`
    /// without it).
    pub queue_leader: Option<String>,
    pub queue_members: Option<Vec<String>>,
    pub problems: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub namespace: String,
    /// The broker URL this report's own connection went to, password
    /// masked (with several in AMQP_URL, the one that answered).
    pub connected_to: String,
    pub services: Vec<ServiceStatus>,
    /// The broker's alarms and resources; `None` when rabbitmqctl could
    /// not be run (see `broker_unavailable`).
    pub broker: Option<BrokerHealth>,
    /// Why `broker` is missing.
    pub broker_unavailable: Option<String>,
    /// Alarms, resources near their limit, nodes down, queue members
    /// offline.
    pub broker_problems: Vec<String>,
    /// The cluster's nodes and the node of each warren connection; `None`
    /// when rabbitmqctl could not be run.
    pub cluster: Option<Placement>,
    pub healthy: bool,
}

/// (ready messages, consumers) of a queue, `None` when it does not exist.
/// A failed passive declare closes its channel, hence one per question.
pub async fn queue_counts(conn: &Connection, queue: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let ch = conn.create_channel().await?;
    let r = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    Ok(match r {
        Ok(q) => {
            let _ = ch.close(200, "ok".into()).await;
            Some((q.message_count(), q.consumer_count()))
        }
        Err(_) => None,
    })
}

/// A partitioned service's messages and consumers summed over its
/// partition queues (`p0`, `p1`, … while they exist); `None` when it has
/// none.
async fn partition_counts(
    conn: &Connection,
    topology: &transport::Topology,
    service: &str,
) -> anyhow::Result<Option<(u32, u32)>> {
    let mut total: Option<(u32, u32)> = None;
    for i in 0..transport::topology::MAX_PARTITIONS {
        let Some((n, c)) = queue_counts(conn, &topology.partition_queue(service, i)).await? else {
            break;
        };
        let (tn, tc) = total.unwrap_or((0, 0));
        total = Some((tn + n, tc + c));
    }
    Ok(total)
}

/// Gathers the report.
pub async fn gather(
    settings: &Settings,
    stores: &Stores,
    conn: &Connection,
) -> anyhow::Result<Status> {
    let topology = settings.topology();
    let mut services = Vec::new();
    for service in services::ALL {
        let pool = stores.of(service);
        let outbox = producers::Outbox::new(service)?;
        let backlog = outbox.backlog(pool).await?;
        let inbox_size = consumers::inbox::Inbox::new(service).size(pool).await?;
        let relay_active: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = $1::oid AND objid = (hashtext($2) & 2147483647)::oid",
        )
        .bind(producers::leader::LEADER_LOCK_CLASS)
        .bind(service)
        .fetch_one(pool)
        .await?;
        let mut problems = Vec::new();
        // customers consumes nothing, so it has no queues to look at.
        let (queue, dlq) = if service == "customers" {
            (None, Some((0, 0)))
        } else {
            let q = match queue_counts(conn, &topology.queue(service)).await? {
                Some(q) => Some(q),
                None => partition_counts(conn, &topology, service).await?,
            };
            if q.is_none() {
                problems.push("queue not declared".to_owned());
            }
            (q, queue_counts(conn, &topology.dlq(service)).await?)
        };
        if let Some((n, _)) = dlq {
            if n > 0 {
                problems.push(format!("{n} dead letter(s)"));
            }
        }
        if let Some(age) = backlog.oldest_age_s {
            if age > STALE_OUTBOX_S {
                problems.push(format!("oldest unpublished event is {age:.0}s old"));
            }
        }
        services.push(ServiceStatus {
            service: service.to_owned(),
            database: stores.shown(service),
            queue_depth: queue.map(|q| q.0),
            consumers: queue.map(|q| q.1),
            dead_letters: if service == "customers" {
                None
            } else {
                dlq.map(|d| d.0)
            },
            outbox_backlog: backlog.unpublished,
            outbox_oldest_s: backlog.oldest_age_s,
            inbox_size,
            relay_active,
            queue_leader: None,
            queue_members: None,
            problems,
        });
    }
    let healthy = services.iter().all(|s| s.problems.is_empty());
    Ok(Status {
        namespace: settings.namespace.clone(),
        connected_to: String::new(),
        services,
        broker: None,
        broker_unavailable: None,
        broker_problems: Vec::new(),
        cluster: None,
        healthy,
    })
}

fn opt(v: Option<u32>) -> String {
    v.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// Runs the command.
pub async fn run(settings: &Settings, args: &StatusArgs) -> anyhow::Result<()> {
    let stores = connect_stores(settings, false, 2).await?;
    let (conn, connected_to) =
        transport::connect_any(settings.amqp_url.expose_secret(), "warren status").await?;
    let gathered = gather(settings, &stores, &conn).await;
    transport::close(conn, "status done").await;
    stores.close().await;
    let mut status = gathered?;
    status.connected_to = connected_to;
    match broker_health(&args.rabbitmqctl.rabbitmqctl).await {
        Ok(h) => {
            status.broker_problems = h.problems();
            status.broker = Some(h);
        }
        Err(e) => status.broker_unavailable = Some(format!("{e:#}")),
    }
    if status.broker.is_some() {
        let vhost = transport::nodes::vhost(settings.amqp_url.expose_secret())?;
        match placement::gather(&args.rabbitmqctl.rabbitmqctl, &vhost).await {
            Ok(p) => place(&mut status, &settings.topology(), p),
            Err(e) => status.broker_unavailable = Some(format!("{e:#}")),
        }
    }
    status.healthy &= status.broker_problems.is_empty();
    let mut out = Out::stdout();
    if args.json {
        out.line(&serde_json::to_string(&status)?)?;
    } else {
        print_table(&mut out, &status)?;
    }
    if !status.healthy {
        return Err(Unhealthy("unhealthy: see the problems column".into()).into());
    }
    Ok(())
}

/// Adds the cluster's placement to the report: each work queue's leader
/// and members, and as problems the nodes down and the members offline.
fn place(status: &mut Status, topology: &transport::Topology, p: Placement) {
    for n in p.nodes.iter().filter(|n| !n.running) {
        status
            .broker_problems
            .push(format!("node {} is not running", n.node));
    }
    for s in &mut status.services {
        let Some(q) = p.queues.get(&topology.queue(&s.service)) else {
            continue;
        };
        if q.online.len() < q.members.len() {
            status.broker_problems.push(format!(
                "queue {}: {} of {} members online",
                topology.queue(&s.service),
                q.online.len(),
                q.members.len()
            ));
        }
        s.queue_leader = Some(q.leader.clone());
        s.queue_members = Some(q.members.clone());
    }
    status.cluster = Some(p);
}

fn print_table(out: &mut Out, status: &Status) -> anyhow::Result<()> {
    out.line(&format!("namespace {}", escape(&status.namespace)))?;
    out.line(&format!(
        "connected to {}",
        escape(&transport::redact(&status.connected_to))
    ))?;
    match (&status.broker, &status.broker_unavailable) {
        (Some(b), _) => {
            let pair = |u: Option<u64>, l: Option<u64>| format!("{}/{}", opt64(u), opt64(l));
            out.line(&format!(
                "broker: alarms {}, file descriptors {}, sockets {}, memory {} MiB of {} MiB",
                if b.alarms.is_empty() {
                    "none".to_owned()
                } else {
                    escape(&b.alarms.join(", "))
                },
                pair(b.file_descriptors_used, b.file_descriptors_limit),
                pair(b.sockets_used, b.sockets_limit),
                opt64(b.memory_bytes.map(|m| m >> 20)),
                opt64(b.memory_limit_bytes.map(|m| m >> 20)),
            ))?;
            for p in &status.broker_problems {
                out.line(&format!("broker problem: {}", escape(p)))?;
            }
        }
        (None, Some(why)) => out.line(&format!(
            "broker: alarms and file descriptors unknown ({}); set WARREN_RABBITMQCTL",
            escape(why)
        ))?,
        (None, None) => {}
    }
    if let Some(cluster) = &status.cluster {
        let nodes: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{} ({}{})",
                    escape(&n.node),
                    if n.running { "running" } else { "DOWN" },
                    if n.listeners.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", escape(&n.listeners.join(" ")))
                    }
                )
            })
            .collect();
        out.line(&format!("nodes: {}", nodes.join(", ")))?;
        for s in &status.services {
            if let (Some(leader), Some(members)) = (&s.queue_leader, &s.queue_members) {
                out.line(&format!(
                    "queue of {}: leader {}, members {}",
                    s.service,
                    escape(leader),
                    escape(&members.join(" "))
                ))?;
            }
        }
        for c in &cluster.connections {
            out.line(&format!(
                "connection {} on {}{}",
                escape(&c.name),
                escape(&c.node),
                if c.count > 1 {
                    format!(" (x{})", c.count)
                } else {
                    String::new()
                }
            ))?;
        }
    }
    // One line per database when the services do not all share one.
    let mut databases: Vec<(&str, Vec<&str>)> = Vec::new();
    for s in &status.services {
        match databases.iter_mut().find(|(d, _)| *d == s.database) {
            Some((_, names)) => names.push(&s.service),
            None => databases.push((&s.database, vec![&s.service])),
        }
    }
    if databases.len() > 1 {
        for (db, names) in &databases {
            out.line(&format!("database {}: {}", escape(db), names.join(", ")))?;
        }
    }
    out.line(&format!(
        "{:<10} {:>7} {:>9} {:>6} {:>8} {:>10} {:>8} {:>6}  problems",
        "service", "queued", "consumers", "dlq", "outbox", "oldest(s)", "inbox", "relay"
    ))?;
    for s in &status.services {
        out.line(&format!(
            "{:<10} {:>7} {:>9} {:>6} {:>8} {:>10} {:>8} {:>6}  {}",
            s.service,
            opt(s.queue_depth),
            opt(s.consumers),
            opt(s.dead_letters),
            s.outbox_backlog,
            s.outbox_oldest_s
                .map_or("-".to_owned(), |a| format!("{a:.1}")),
            s.inbox_size,
            if s.relay_active { "active" } else { "none" },
            s.problems.join("; ")
        ))?;
    }
    Ok(())
}

fn opt64(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |n| n.to_string())
}
