//! `warren tail [PATTERN]`: a live view of every event on the bus and of
//! every consumer's outcome, across all warren processes of the namespace
//! (consumers publish their outcomes on `<ns>.outcomes`), filtered by type
//! pattern, service, subject or correlation; as text (every line with its
//! correlation id, wire text escaped), JSON, or fixture lines that
//! `warren replay -` takes back.

use secrecy::ExposeSecret as _;
use std::time::Duration;

use anstyle::AnsiColor;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;

use crate::config::Settings;
use crate::output::{self, escape, ClosedPipe, Out};

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TailFormat {
    /// One line per event and per outcome, wire text escaped.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// Events only, one CloudEvents document per line: what `warren
    /// replay -` reads back.
    Fixture,
}

/// Arguments of `warren tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Event types to show, as a routing-key pattern (`#` = all, `order.*`, …);
    /// applies to consumer outcomes too.
    #[arg(default_value = "#")]
    pub pattern: String,
    /// The same as PATTERN, as an option.
    #[arg(long = "type", value_name = "PATTERN")]
    pub event_type: Option<String>,
    /// Only events this service raised and this service's outcomes.
    #[arg(long)]
    pub service: Option<String>,
    /// Only events (and outcomes) of this subject, e.g. an order's id.
    #[arg(long)]
    pub subject: Option<String>,
    /// Only events (and outcomes) of this correlation id.
    #[arg(long)]
    pub correlation: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TailFormat::Text)]
    pub format: TailFormat,
    /// One JSON object per line (the same as `--format json`).
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

impl TailArgs {
    fn format(&self) -> TailFormat {
        if self.json {
            TailFormat::Json
        } else {
            self.format
        }
    }

    fn pattern(&self) -> &str {
        self.event_type.as_deref().unwrap_or(&self.pattern)
    }
}

/// What a line must match, besides the type pattern the broker filters
/// events by.
struct Filter<'a> {
    pattern: &'a str,
    source: Option<String>,
    service: Option<&'a str>,
    subject: Option<&'a str>,
    correlation: Option<&'a str>,
}

impl Filter<'_> {
    fn event(&self, e: &events::Envelope) -> bool {
        self.source.as_ref().is_none_or(|s| *s == e.source)
            && self.subject.is_none_or(|s| s == e.subject)
            && self
                .correlation
                .is_none_or(|c| e.correlationid.as_deref() == Some(c))
    }

    /// An event that did not decode has no subject or correlation to
    /// match: shown only when no filter asks for them.
    fn undecodable(&self) -> bool {
        self.source.is_none() && self.subject.is_none() && self.correlation.is_none()
    }

    fn outcome(&self, r: &consumers::OutcomeRecord) -> bool {
        topic_matches(self.pattern, &r.event_type)
            && self.service.is_none_or(|s| s == r.service)
            && self.subject.is_none_or(|s| r.subject.as_deref() == Some(s))
            && self
                .correlation
                .is_none_or(|c| r.correlation_id.as_deref() == Some(c))
    }
}

/// Whether `key` matches the AMQP topic `pattern` (`*` one word, `#`
/// zero or more), as the broker would bind it.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

async fn exclusive_queue(
    ch: &Channel,
    exchange: &str,
    pattern: &str,
) -> anyhow::Result<lapin::Consumer> {
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
        exchange.into(),
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    // no_ack: this is a read-only view on a private copy; nothing is lost
    // for the services by not acknowledging it.
    Ok(ch
        .basic_consume(
            q.name().clone(),
            "".into(),
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
    let conn = transport::connect(settings.amqp_url.expose_secret(), "warren tail").await?;
    let ch = conn.create_channel().await?;
    topology.declare_exchange(&ch).await?;
    topology.declare_outcomes_exchange(&ch).await?;
    let format = args.format();
    let events = exclusive_queue(&ch, &topology.exchange(), args.pattern()).await?;
    // Outcomes are published as `<service>.<outcome>`: the type pattern
    // cannot be bound there, so it is matched here (Filter::outcome).
    let outcomes = if args.no_outcomes || format == TailFormat::Fixture {
        None
    } else {
        let key = args
            .service
            .as_deref()
            .map_or_else(|| "#".to_owned(), |s| format!("{s}.*"));
        Some(exclusive_queue(&ch, &topology.outcomes_exchange(), &key).await?)
    };
    let filter = Filter {
        pattern: args.pattern(),
        source: args.service.as_deref().map(events::envelope::source_of),
        service: args.service.as_deref(),
        subject: args.subject.as_deref(),
        correlation: args.correlation.as_deref(),
    };
    let codec = settings.codec();
    // Styles are always written; `Out` strips them unless colour is on
    // (`--color`, NO_COLOR, a terminal). JSON and fixtures never get any.
    let color = format == TailFormat::Text;
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
        escape(args.pattern())
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
            render_event(&codec, &delivery, format, color, &filter)
        } else {
            render_outcome(&delivery.data, format, color, &filter)
        };
        let Some(line) = line else {
            continue;
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

/// The line of an event, `None` when the filter leaves it out.
fn render_event(
    codec: &events::Codec,
    d: &lapin::message::Delivery,
    format: TailFormat,
    color: bool,
    filter: &Filter<'_>,
) -> Option<String> {
    let decoded = codec.decode(&d.data);
    match &decoded {
        Ok(e) if !filter.event(e) => return None,
        Err(_) if !filter.undecodable() => return None,
        _ => {}
    }
    Some(match (decoded, format) {
        (Ok(e), TailFormat::Json) => serde_json::json!({ "kind": "event", "event": e }).to_string(),
        // The document on one line, as fixtures hold it (serde_json
        // escapes control characters inside strings).
        (Ok(e), TailFormat::Fixture) => serde_json::to_string(&e)
            .unwrap_or_else(|err| format!("# unprintable event: {}", escape(&err.to_string()))),
        (Ok(e), TailFormat::Text) => format!(
            "{} {} {:<20} subject={} seq={} id={} source={} corr={}",
            e.time.format("%H:%M:%S%.3f"),
            paint("event", Some(AnsiColor::Cyan), color),
            escape(&e.event_type),
            escape(&e.subject),
            e.sequence,
            e.id,
            escape(&e.source),
            escape(e.correlationid.as_deref().unwrap_or("-"))
        ),
        (Err(err), TailFormat::Json) => serde_json::json!({
            "kind": "event", "routing_key": d.routing_key.as_str(), "invalid": err.to_string(),
            "body": String::from_utf8_lossy(&d.data),
        })
        .to_string(),
        // A comment line: `warren replay` skips it.
        (Err(err), TailFormat::Fixture) => format!(
            "# not replayable ({}): {}",
            escape(d.routing_key.as_str()),
            escape(&err.to_string())
        ),
        (Err(err), TailFormat::Text) => format!(
            "{} {:<20} {} corr=-",
            paint("invalid", Some(AnsiColor::Red), color),
            escape(d.routing_key.as_str()),
            escape(&err.to_string())
        ),
    })
}

/// The line of an outcome record, `None` when the filter leaves it out.
fn render_outcome(
    body: &[u8],
    format: TailFormat,
    color: bool,
    filter: &Filter<'_>,
) -> Option<String> {
    let r = match serde_json::from_slice::<consumers::OutcomeRecord>(body) {
        Ok(r) => r,
        Err(e) => {
            return Some(format!(
                "unreadable outcome record: {}",
                escape(&e.to_string())
            ))
        }
    };
    if !filter.outcome(&r) {
        return None;
    }
    if format == TailFormat::Json {
        return Some(serde_json::json!({ "kind": "outcome", "outcome": r }).to_string());
    }
    let code = match r.outcome {
        consumers::Outcome::Handled => Some(AnsiColor::Green),
        consumers::Outcome::Duplicate | consumers::Outcome::Skipped => None,
        consumers::Outcome::Deferred | consumers::Outcome::Retried => Some(AnsiColor::Yellow),
        consumers::Outcome::DeadLettered => Some(AnsiColor::Red),
    };
    let mut line = format!(
        "{} {:<13} {:<10} {:<20} subject={} id={} attempt={} {:.1}ms corr={}",
        r.at.format("%H:%M:%S%.3f"),
        paint(r.outcome.as_str(), code, color),
        escape(&r.service),
        escape(&r.event_type),
        escape(r.subject.as_deref().unwrap_or("-")),
        escape(r.event_id.as_deref().unwrap_or("-")),
        r.attempt,
        r.elapsed_ms,
        escape(r.correlation_id.as_deref().unwrap_or("-"))
    );
    if let Some(reason) = &r.reason {
        line.push_str(&format!(" reason={}", escape(reason)));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_the_broker_binds_them() {
        for (p, k, yes) in [
            ("#", "order.placed", true),
            ("order.*", "order.placed", true),
            ("order.*", "order.placed.v2", false),
            ("order.#", "order", true),
            ("order.#", "order.placed.v2", true),
            ("*.placed", "order.placed", true),
            ("*.placed", "placed", false),
            ("#.placed", "placed", true),
            ("payment.captured", "payment.failed", false),
            ("#.#", "a.b.c", true),
        ] {
            assert_eq!(topic_matches(p, k), yes, "{p} vs {k}");
        }
    }
}
