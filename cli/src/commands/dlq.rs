//! `warren dlq list|show|redrive SERVICE`: dead letters with their
//! reasons, one in full, and sending them back to the service's queue.
//!
//! RabbitMQ cannot browse a queue, so listing takes every message with a
//! manual ack and then closes the channel without acking: the broker puts
//! them all back, in order.

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use serde::Serialize;
use std::time::Duration;
use transport::{Outgoing, Publisher};

use consumers::deadletter::{
    header_str, header_u32, H_ATTEMPT, H_DEAD_LETTERED_AT, H_DEFERRALS, H_ERROR, H_REASON,
    H_ROUTING_KEY, H_SERVICE,
};

use crate::config::Settings;
use crate::error::InvalidInput;

/// `warren dlq` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters with their reasons.
    List {
        /// The consuming service.
        service: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full.
    Show {
        /// The consuming service.
        service: String,
        /// Event id (or AMQP message id).
        #[arg(long)]
        id: String,
    },
    /// Send dead letters back to the service's queue (all, or one).
    Redrive {
        /// The consuming service.
        service: String,
        /// Only this event id.
        #[arg(long)]
        id: Option<String>,
    },
}

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub event_type: String,
    pub reason: String,
    pub error: String,
    pub attempt: u32,
    pub dead_lettered_at: String,
    pub service: String,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body: String,
}

fn describe(m: &BasicGetMessage) -> DeadLetter {
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
        service: header_str(p, H_SERVICE).unwrap_or_default(),
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

fn check_service(service: &str) -> Result<(), InvalidInput> {
    if services::ALL.contains(&service) && service != "customers" {
        Ok(())
    } else {
        Err(InvalidInput(format!("{service:?} has no dead-letter queue; consuming services are orders, inventory, payments, shipping")))
    }
}

/// Every dead letter of `service`, left in place.
pub async fn list(settings: &Settings, service: &str) -> anyhow::Result<Vec<DeadLetter>> {
    check_service(service)?;
    let conn = transport::connect(&settings.amqp_url, "warren dlq").await?;
    let ch = conn.create_channel().await?;
    let dlq = settings.topology().dlq(service);
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(&dlq, BasicGetOptions { no_ack: false })
        .await?
    {
        out.push(describe(&m));
    }
    // Closing without acking returns every message to the queue.
    let _ = ch.close(200, "browse done").await;
    let _ = conn.close(200, "dlq done").await;
    Ok(out)
}

/// Sends dead letters (all, or the one with `id`) back to the service's
/// queue without their dead-letter and attempt headers, so they get fresh
/// attempts; each is acked in the DLQ only after the copy is confirmed.
pub async fn redrive(
    settings: &Settings,
    service: &str,
    id: Option<&str>,
) -> anyhow::Result<usize> {
    check_service(service)?;
    let conn = transport::connect(&settings.amqp_url, "warren dlq redrive").await?;
    let publisher = Publisher::open(&conn).await?;
    let ch = publisher.channel();
    let topology = settings.topology();
    let (dlq, queue) = (topology.dlq(service), topology.queue(service));
    let mut moved = 0;
    // Messages skipped stay unacked until the channel closes, which puts
    // them back; they are not handed out twice meanwhile.
    while let Some(m) = ch
        .basic_get(&dlq, BasicGetOptions { no_ack: false })
        .await?
    {
        let d = describe(&m);
        if id.is_some_and(|id| id != d.id) {
            continue;
        }
        // FieldTable has no remove: rebuild it without the dead-letter and
        // attempt headers (the broker's x-death history goes too).
        const DROP: [&str; 11] = [
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
        let mut headers = lapin::types::FieldTable::default();
        if let Some(old) = m.delivery.properties.headers() {
            for (k, v) in old.inner() {
                if !DROP.contains(&k.as_str()) {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        let props = m.delivery.properties.clone().with_headers(headers);
        let copy = Outgoing {
            exchange: "",
            routing_key: &queue,
            body: &m.delivery.data,
            properties: props,
        };
        if let Err(e) = publisher.publish(copy, Duration::from_secs(15)).await {
            anyhow::bail!(
                "redrive of {}: {queue} did not take it ({e}; is the service's queue declared?)",
                d.id
            );
        }
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = ch.close(200, "redrive done").await;
    let _ = conn.close(200, "dlq done").await;
    Ok(moved)
}

/// Runs the command.
pub async fn run(settings: &Settings, cmd: &DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List { service, json } => {
            let letters = list(settings, service).await?;
            if *json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else if letters.is_empty() {
                println!("no dead letters for {service}");
            } else {
                println!(
                    "{:<38} {:<22} {:<20} {:>7}  {:<26} error",
                    "id", "type", "reason", "attempt", "dead-lettered at"
                );
                for l in &letters {
                    let err: String = l.error.chars().take(80).collect();
                    println!(
                        "{:<38} {:<22} {:<20} {:>7}  {:<26} {}",
                        l.id, l.event_type, l.reason, l.attempt, l.dead_lettered_at, err
                    );
                }
            }
        }
        DlqCommand::Show { service, id } => {
            let letters = list(settings, service).await?;
            let l = letters.iter().find(|l| &l.id == id).ok_or_else(|| {
                InvalidInput(format!("no dead letter with id {id} for {service}"))
            })?;
            println!("{}", serde_json::to_string_pretty(l)?);
            if let Ok(body) = serde_json::from_str::<serde_json::Value>(&l.body) {
                println!("body:\n{}", serde_json::to_string_pretty(&body)?);
            }
        }
        DlqCommand::Redrive { service, id } => {
            let n = redrive(settings, service, id.as_deref()).await?;
            println!(
                "redrove {n} dead letter(s) to {}",
                settings.topology().queue(service)
            );
        }
    }
    Ok(())
}
