//! `warren dlq`: dead letters across every consuming service — a summary
//! grouped by service, reason and type; `list`, `show`, `redrive` and
//! `purge`, all with the same filters (`--service`, `--reason`, `--type`).
//!
//! RabbitMQ cannot browse a queue, and the usual workaround (take with a
//! manual ack, then give back with a requeue or a channel close) is not
//! safe here: since RabbitMQ 4.0 a quorum queue declared without
//! `x-delivery-limit` — our DLQs, see `transport::topology` — gets a
//! default limit of 20, and before 4.3 every return counts as a delivery
//! (4.3 still counts `basic.reject` with requeue and a channel closed on
//! an unacknowledged message: rabbitmq-server#15387).
//! Twenty browses would then drop (the DLQ has no dead-letter exchange of
//! its own) the very letters an operator is looking at. So every walk
//! here takes each message and publishes a copy back to the DLQ's tail
//! (with a confirm) before acknowledging the original: nothing is ever
//! returned, and a crash in between leaves a duplicate, never a loss. A
//! walk visits at most the messages present when it starts, so a full
//! browse leaves the queue in its order; one stopped early (`--count`)
//! moves the letters it read to the end.

use secrecy::ExposeSecret as _;
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::ops::ControlFlow;
use std::time::Duration;

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use serde::Serialize;
use transport::{Outgoing, Publisher, Topology};

use consumers::deadletter::{
    header_str, header_u32, H_ATTEMPT, H_DEAD_LETTERED_AT, H_DEFERRALS, H_ERROR, H_REASON,
    H_ROUTING_KEY, H_SERVICE,
};

use crate::commands::status::queue_counts;
use crate::config::{ConsumingService, Settings};
use crate::error::InvalidInput;
use crate::output::{self, escape, Out};

/// Time allowed for the broker to confirm one copy.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// `warren dlq [FILTERS]` (a summary) or one of its subcommands.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: Option<DlqCommand>,
    #[command(flatten)]
    pub filter: Filter,
    /// One JSON object on standard output, nothing else.
    #[arg(long)]
    pub json: bool,
}

/// Which dead letters a command applies to; every one by default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only these services (repeatable; default: every consuming service).
    #[arg(long, value_enum)]
    pub service: Vec<ConsumingService>,
    /// Only this reason (`invalid_data`, `unknown_type`, `malformed_json`,
    /// `handler_rejected`, `retries_exhausted`, `sequence_gap`, …).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this event type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Only the dead letter with this event id (or AMQP message id).
    #[arg(long)]
    pub id: Option<String>,
}

impl Filter {
    fn services(&self) -> Vec<ConsumingService> {
        if self.service.is_empty() {
            ConsumingService::ALL.to_vec()
        } else {
            self.service.clone()
        }
    }

    /// Whether `d` passes every filter given.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.reason.as_ref().is_none_or(|r| *r == d.reason)
            && self.event_type.as_ref().is_none_or(|t| *t == d.event_type)
            && self.id.as_ref().is_none_or(|i| *i == d.id)
    }
}

/// `warren dlq` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, one line each.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Browse at most this many.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full, as JSON.
    Show {
        /// Event id (or AMQP message id).
        id: String,
        /// Only look in these services' DLQs (default: every one).
        #[arg(long, value_enum)]
        service: Vec<ConsumingService>,
    },
    /// Send dead letters back to their service's work queue, without their
    /// dead-letter and attempt headers (fresh attempts; the inbox absorbs
    /// any duplicate).
    Redrive {
        #[command(flatten)]
        filter: Filter,
        /// Count what would be sent back; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the counts as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good (asks first, unless `--yes`).
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the counts as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// A dead letter as read from its queue.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub event_type: String,
    pub reason: String,
    pub error: String,
    pub attempt: u32,
    pub dead_lettered_at: String,
    /// The service whose DLQ holds it.
    pub service: String,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body: String,
}

fn describe(service: &str, m: &BasicGetMessage) -> DeadLetter {
    let p = &m.delivery.properties;
    let id = p
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
        })
        .or_else(|| header_str(p, "ce-id"))
        .unwrap_or_else(|| "-".to_owned());
    let headers = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_json(v)))
                .collect()
        })
        .unwrap_or_default();
    DeadLetter {
        id,
        event_type: header_str(p, H_ROUTING_KEY)
            .unwrap_or_else(|| m.delivery.routing_key.to_string()),
        reason: header_str(p, H_REASON).unwrap_or_else(|| "-".into()),
        error: header_str(p, H_ERROR).unwrap_or_default(),
        attempt: header_u32(p, H_ATTEMPT).unwrap_or(0),
        dead_lettered_at: header_str(p, H_DEAD_LETTERED_AT).unwrap_or_default(),
        service: header_str(p, H_SERVICE).unwrap_or_else(|| service.to_owned()),
        headers,
        body: String::from_utf8_lossy(&m.delivery.data).into_owned(),
    }
}

fn amqp_json(v: &AMQPValue) -> serde_json::Value {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Boolean(b) => (*b).into(),
        other => format!("{other:?}").into(),
    }
}

/// What a walk does with one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Copy it back to the DLQ's tail.
    Keep,
    /// Copy it, without its dead-letter headers, to the work queue.
    Redrive,
    /// Delete it.
    Drop,
}

/// Headers a redriven copy loses: the dead-letter and attempt ones, and
/// the broker's own history and delivery count.
const REDRIVE_DROPS: [&str; 11] = [
    H_REASON,
    H_ERROR,
    H_ATTEMPT,
    H_DEFERRALS,
    H_SERVICE,
    H_DEAD_LETTERED_AT,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
];

fn without(headers: Option<&FieldTable>, drop: &[&str]) -> FieldTable {
    // FieldTable has no remove: rebuild it.
    let mut out = FieldTable::default();
    if let Some(old) = headers {
        for (k, v) in old.inner() {
            if !drop.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Takes each dead letter present in `service`'s DLQ when it starts and
/// does what `decide` says with it (see the module docs); `decide` may
/// stop the walk. Returns how many it visited.
pub async fn walk(
    conn: &Connection,
    topology: &Topology,
    service: &str,
    mut decide: impl FnMut(&DeadLetter) -> (Action, ControlFlow<()>),
) -> anyhow::Result<usize> {
    let (dlq, queue) = (topology.dlq(service), topology.queue(service));
    let Some((present, _)) = queue_counts(conn, &dlq).await? else {
        return Ok(0);
    };
    // A partitioned service has no work queue: a redriven event goes back
    // through its hash exchange, to its subject's partition (the dead
    // letter kept the subject header).
    let partitioned = queue_counts(conn, &queue).await?.is_none()
        && queue_counts(conn, &topology.partition_queue(service, 0))
            .await?
            .is_some();
    let hash = topology.partition_exchange(service);
    let publisher = Publisher::open(conn).await?;
    let ch = publisher.channel();
    let mut visited = 0;
    let result = async {
        while visited < present as usize {
            let Some(m) = ch
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            visited += 1;
            let d = describe(service, &m);
            let (action, flow) = decide(&d);
            let old = m.delivery.properties.headers().as_ref();
            let copy = match action {
                Action::Keep => Some(("", &dlq, without(old, &["x-delivery-count"]))),
                Action::Redrive if partitioned => {
                    Some((hash.as_str(), &hash, without(old, &REDRIVE_DROPS)))
                }
                Action::Redrive => Some(("", &queue, without(old, &REDRIVE_DROPS))),
                Action::Drop => None,
            };
            if let Some((exchange, to, headers)) = copy {
                let message = Outgoing {
                    exchange,
                    // The hash exchange ignores it (it hashes the header).
                    routing_key: to,
                    body: &m.delivery.data,
                    properties: m.delivery.properties.clone().with_headers(headers),
                };
                if let Err(e) = publisher.publish(message, CONFIRM_TIMEOUT).await {
                    anyhow::bail!(
                        "dead letter {}: {to} did not take the copy ({e}); the original stays in {dlq}",
                        escape(&d.id)
                    );
                }
            }
            m.delivery.acker.ack(BasicAckOptions::default()).await?;
            if flow.is_break() {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    // Closing returns any message taken and not acked (only after an error).
    let _ = ch.close(200, ("dlq walk done").into()).await;
    result.map(|()| visited)
}

/// One group of the summary.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    pub service: String,
    pub reason: String,
    pub event_type: String,
    pub count: usize,
    pub oldest: String,
    pub newest: String,
}

/// Counts of dead letters per (service, reason, type), with the oldest and
/// newest dead-lettering time of each.
pub async fn summary(settings: &Settings, filter: &Filter) -> anyhow::Result<Vec<Group>> {
    let mut groups: BTreeMap<(String, String, String), Group> = BTreeMap::new();
    each_service(settings, filter, |d| {
        let g = groups
            .entry((d.service.clone(), d.reason.clone(), d.event_type.clone()))
            .or_insert_with(|| Group {
                service: d.service.clone(),
                reason: d.reason.clone(),
                event_type: d.event_type.clone(),
                count: 0,
                oldest: d.dead_lettered_at.clone(),
                newest: d.dead_lettered_at.clone(),
            });
        g.count += 1;
        // RFC 3339 in UTC (as the forwarder writes it) sorts as text.
        if d.dead_lettered_at < g.oldest {
            g.oldest = d.dead_lettered_at.clone();
        }
        if d.dead_lettered_at > g.newest {
            g.newest = d.dead_lettered_at.clone();
        }
        (Action::Keep, ControlFlow::Continue(()))
    })
    .await?;
    Ok(groups.into_values().collect())
}

/// Walks the DLQ of every service the filter names, calling `visit` for
/// each dead letter that matches (the others are kept), on one connection.
async fn each_service(
    settings: &Settings,
    filter: &Filter,
    mut visit: impl FnMut(&DeadLetter) -> (Action, ControlFlow<()>),
) -> anyhow::Result<()> {
    let topology = settings.topology();
    let conn = transport::connect(settings.amqp_url.expose_secret(), "warren dlq").await?;
    let mut stopped = false;
    let mut result = Ok(());
    for service in filter.services() {
        if stopped {
            break;
        }
        let walked = walk(&conn, &topology, service.as_str(), |d| {
            if !filter.matches(d) {
                return (Action::Keep, ControlFlow::Continue(()));
            }
            let (action, flow) = visit(d);
            stopped |= flow.is_break();
            (action, flow)
        })
        .await;
        if let Err(e) = walked {
            result = Err(e);
            break;
        }
    }
    transport::close(conn, "dlq done").await;
    result
}

/// Up to `count` matching dead letters, across the filter's services.
pub async fn list(
    settings: &Settings,
    filter: &Filter,
    count: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    if count == 0 {
        return Ok(out);
    }
    each_service(settings, filter, |d| {
        out.push(d.clone());
        let flow = if out.len() >= count {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        };
        (Action::Keep, flow)
    })
    .await?;
    Ok(out)
}

/// What `redrive` and `purge` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Moved {
    /// Matching dead letters per service.
    pub by_service: BTreeMap<String, usize>,
    pub total: usize,
    pub dry_run: bool,
}

/// Applies `action` to every matching dead letter (none with `dry_run`).
pub async fn apply(
    settings: &Settings,
    filter: &Filter,
    action: Action,
    dry_run: bool,
) -> anyhow::Result<Moved> {
    let mut moved = Moved {
        dry_run,
        ..Default::default()
    };
    each_service(settings, filter, |d| {
        *moved.by_service.entry(d.service.clone()).or_default() += 1;
        moved.total += 1;
        let act = if dry_run { Action::Keep } else { action };
        (act, ControlFlow::Continue(()))
    })
    .await?;
    Ok(moved)
}

/// Sends every matching dead letter back to its work queue.
pub async fn redrive(settings: &Settings, filter: &Filter, dry_run: bool) -> anyhow::Result<Moved> {
    apply(settings, filter, Action::Redrive, dry_run).await
}

/// Runs the command.
pub async fn run(settings: &Settings, args: &DlqArgs) -> anyhow::Result<()> {
    let mut out = Out::stdout();
    match &args.command {
        None => {
            let groups = summary(settings, &args.filter).await?;
            let total: usize = groups.iter().map(|g| g.count).sum();
            if args.json {
                let doc = serde_json::json!({ "namespace": settings.namespace, "total": total, "groups": groups });
                return out.line(&doc.to_string());
            }
            if groups.is_empty() {
                return out.line("no dead letters");
            }
            out.line(&format!(
                "{:<10} {:<20} {:<22} {:>6}  {:<30} newest",
                "service", "reason", "type", "count", "oldest"
            ))?;
            for g in &groups {
                out.line(&format!(
                    "{:<10} {:<20} {:<22} {:>6}  {:<30} {}",
                    g.service,
                    escape(&g.reason),
                    escape(&g.event_type),
                    g.count,
                    escape(&g.oldest),
                    escape(&g.newest)
                ))?;
            }
            out.line(&format!("{total} dead letter(s)"))
        }
        Some(DlqCommand::List {
            filter,
            count,
            json,
        }) => {
            let letters = list(settings, filter, *count).await?;
            if *json {
                for l in &letters {
                    out.line(&serde_json::to_string(l)?)?;
                }
                return Ok(());
            }
            if letters.is_empty() {
                return out.line("no dead letters");
            }
            out.line(&format!(
                "{:<38} {:<10} {:<22} {:<20} {:>7}  {:<30} error",
                "id", "service", "type", "reason", "attempt", "dead-lettered at"
            ))?;
            for l in &letters {
                let err: String = l.error.chars().take(80).collect();
                out.line(&format!(
                    "{:<38} {:<10} {:<22} {:<20} {:>7}  {:<30} {}",
                    escape(&l.id),
                    escape(&l.service),
                    escape(&l.event_type),
                    escape(&l.reason),
                    l.attempt,
                    escape(&l.dead_lettered_at),
                    escape(&err)
                ))?;
            }
            Ok(())
        }
        Some(DlqCommand::Show { id, service }) => {
            let filter = Filter {
                id: Some(id.clone()),
                service: service.clone(),
                ..Filter::default()
            };
            let found = list(settings, &filter, 1).await?;
            let l = found
                .into_iter()
                .next()
                .ok_or_else(|| InvalidInput(format!("no dead letter with id {}", escape(id))))?;
            // One JSON document: the body inline when it is JSON.
            let mut doc = serde_json::to_value(&l)?;
            if let Ok(body) = serde_json::from_str::<serde_json::Value>(&l.body) {
                doc["body"] = body;
            }
            out.line(&serde_json::to_string_pretty(&doc)?)
        }
        Some(DlqCommand::Redrive {
            filter,
            dry_run,
            json,
        }) => {
            let moved = redrive(settings, filter, *dry_run).await?;
            report(
                &mut out,
                &moved,
                *json,
                if *dry_run { "would redrive" } else { "redrove" },
            )
        }
        Some(DlqCommand::Purge {
            filter,
            yes,
            dry_run,
            json,
        }) => {
            if !*yes && !*dry_run {
                let counted = apply(settings, filter, Action::Keep, true).await?;
                if counted.total == 0 {
                    return report(&mut out, &counted, *json, "purged");
                }
                confirm(counted.total)?;
            }
            let moved = apply(settings, filter, Action::Drop, *dry_run).await?;
            report(
                &mut out,
                &moved,
                *json,
                if *dry_run { "would purge" } else { "purged" },
            )
        }
    }
}

fn report(out: &mut Out, moved: &Moved, json: bool, verb: &str) -> anyhow::Result<()> {
    if json {
        return out.line(&serde_json::to_string(moved)?);
    }
    for (service, n) in &moved.by_service {
        out.line(&format!("{verb} {n} dead letter(s) of {service}"))?;
    }
    out.line(&format!("{verb} {} dead letter(s) in all", moved.total))
}

/// Asks on the terminal before a purge; without one, `--yes` is needed.
fn confirm(n: usize) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(InvalidInput(format!(
            "purge would delete {n} dead letter(s) for good: pass --yes (no terminal to ask on)"
        ))
        .into());
    }
    output::eline(&format!("delete {n} dead letter(s) for good? [y/N]"));
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(InvalidInput("purge cancelled".into()).into())
    }
}
