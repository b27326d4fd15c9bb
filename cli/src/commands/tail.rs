//! `warren tail [PATTERN]`: a live view of every event on the bus and of
//! every consumer's outcome, across all warren processes of the namespace
//! (consumers publish their outcomes on `<ns>.outcomes`).

use std::time::Duration;

use anstyle::AnsiColor;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;

use crate::config::Settings;
use crate::output::{self, escape, ClosedPipe, Out};

/// Arguments of `warren tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Routing-key pattern of events to show (`#` = all, `order.*`, …).
    #[arg(default_value = "#")]
    pub pattern: String,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Show events only, not consumer outcomes.
    #[arg(long)]
    pub no_outcomes: bool,
    /// Stop after this many lines.
    #[arg(long)]
    pub count: Option<usize>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
}

async fn exclusive_queue(
    ch: &Channel,
    exchange: &str,
    pattern: &str,
) -> anyhow::Result<lapin::Consumer> {
    let q = ch
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().as_str(),
        exchange,
        pattern,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    // no_ack: this is a read-only view on a private copy; nothing is lost
    // for the services by not acknowledging it.
    Ok(ch
        .basic_consume(
            q.name().as_str(),
            "",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// Runs the command until Ctrl-C, `--count` or `--timeout`.
pub async fn run(settings: &Settings, args: &TailArgs) -> anyhow::Result<()> {
    let topology = settings.topology();
    let conn = transport::connect(&settings.amqp_url, "warren tail").await?;
    let ch = conn.create_channel().await?;
    topology.declare_exchange(&ch).await?;
    topology.declare_outcomes_exchange(&ch).await?;
    let events = exclusive_queue(&ch, &topology.exchange(), &args.pattern).await?;
    let outcomes = if args.no_outcomes {
        None
    } else {
        Some(exclusive_queue(&ch, &topology.outcomes_exchange(), "#").await?)
    };
    let codec = settings.codec();
    // Styles are always written; `Out` strips them unless colour is on
    // (`--color`, NO_COLOR, a terminal). JSON never gets any.
    let color = !args.json;
    let mut out = Out::stdout();
    let shutdown = super::shutdown_on_signal();
    let deadline = args
        .timeout
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut stream = futures::stream::select(
        events.map(|d| (true, d)),
        futures::stream::iter(outcomes)
            .flatten()
            .map(|d| (false, d)),
    );
    let mut printed = 0usize;
    output::eline(&format!(
        "tailing {} (pattern {:?}); Ctrl-C to stop",
        topology.exchange(),
        args.pattern
    ));
    loop {
        if args.count.is_some_and(|c| printed >= c) {
            break;
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            n = stream.next() => n,
            _ = shutdown.cancelled() => break,
            _ = sleep => break,
        };
        let Some((is_event, delivery)) = next else {
            break;
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                transport::close(conn, "tail done").await;
                return Err(e.into());
            }
        };
        let line = if is_event {
            render_event(&codec, &delivery, args.json, color)
        } else {
            render_outcome(&delivery.data, args.json, color)
        };
        match out.line(&line) {
            Ok(()) => printed += 1,
            // `warren tail | head -1`: the reader is done, so are we.
            Err(e) if e.is::<ClosedPipe>() => break,
            Err(e) => {
                transport::close(conn, "tail done").await;
                return Err(e);
            }
        }
    }
    transport::close(conn, "tail done").await;
    Ok(())
}

fn paint(s: &str, color: Option<AnsiColor>, on: bool) -> String {
    match color {
        Some(c) if on => output::paint(s, c, false),
        None if on => output::dim(s),
        _ => s.to_owned(),
    }
}

fn render_event(
    codec: &events::Codec,
    d: &lapin::message::Delivery,
    json: bool,
    color: bool,
) -> String {
    match codec.decode(&d.data) {
        Ok(e) if json => serde_json::json!({ "kind": "event", "event": e }).to_string(),
        Ok(e) => format!(
            "{} {} {:<20} subject={} seq={} id={} source={}",
            e.time.format("%H:%M:%S%.3f"),
            paint("event", Some(AnsiColor::Cyan), color),
            escape(&e.event_type),
            escape(&e.subject),
            e.sequence,
            e.id,
            escape(&e.source)
        ),
        Err(err) if json => serde_json::json!({
            "kind": "event", "routing_key": d.routing_key.as_str(), "invalid": err.to_string(),
            "body": String::from_utf8_lossy(&d.data),
        })
        .to_string(),
        Err(err) => format!(
            "{} {:<20} {}",
            paint("invalid", Some(AnsiColor::Red), color),
            escape(d.routing_key.as_str()),
            escape(&err.to_string())
        ),
    }
}

fn render_outcome(body: &[u8], json: bool, color: bool) -> String {
    match serde_json::from_slice::<consumers::OutcomeRecord>(body) {
        Ok(r) if json => serde_json::json!({ "kind": "outcome", "outcome": r }).to_string(),
        Ok(r) => {
            let code = match r.outcome {
                consumers::Outcome::Handled => Some(AnsiColor::Green),
                consumers::Outcome::Duplicate | consumers::Outcome::Skipped => None,
                consumers::Outcome::Deferred | consumers::Outcome::Retried => {
                    Some(AnsiColor::Yellow)
                }
                consumers::Outcome::DeadLettered => Some(AnsiColor::Red),
            };
            let mut line = format!(
                "{} {:<13} {:<10} {:<20} id={} attempt={} {:.1}ms",
                r.at.format("%H:%M:%S%.3f"),
                paint(r.outcome.as_str(), code, color),
                escape(&r.service),
                escape(&r.event_type),
                escape(r.event_id.as_deref().unwrap_or("-")),
                r.attempt,
                r.elapsed_ms
            );
            if let Some(reason) = &r.reason {
                line.push_str(&format!(" reason={}", escape(reason)));
            }
            line
        }
        Err(e) => format!("unreadable outcome record: {}", escape(&e.to_string())),
    }
}
