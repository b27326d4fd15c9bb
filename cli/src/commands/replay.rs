//! `warren replay FILE…`: publishes JSON Lines fixtures with their ids
//! kept, so replaying twice changes nothing the second time. `-` reads
//! standard input.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use events::fixtures::{self, FixtureLine};
use lapin::BasicProperties;

use crate::bus::{confirmed, Bus, Target};
use crate::config::{ConsumingService, Settings};
use crate::error::InvalidInput;
use crate::output::{self, escape};

/// Confirms awaited together; bounds memory and keeps the pipe full.
const WINDOW: usize = 500;

/// Arguments of `warren replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// JSON Lines fixture files (`-`: standard input).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Events per second (default: as fast as the broker confirms).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Validate and count only; publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Publish straight into one service's queue instead of the exchange.
    #[arg(long, value_enum)]
    pub to: Option<ConsumingService>,
    /// Fail (exit 2) on any bad line, before publishing anything.
    #[arg(long)]
    pub strict: bool,
    /// Publish bad lines as they are (to show dead-lettering), routed by
    /// their `type` field when they have one.
    #[arg(long)]
    pub raw_invalid: bool,
    /// Print the counts as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplaySummary {
    /// Valid events (published unless dry run).
    pub valid: usize,
    /// Lines that are not valid events.
    pub invalid: usize,
    /// Invalid lines left out.
    pub skipped: usize,
    /// Messages the broker confirmed.
    pub published: usize,
}

/// Reads every file, reports bad lines as `file:line: error` and publishes.
pub async fn replay(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<ReplaySummary> {
    let codec = settings.codec();
    let mut lines: Vec<FixtureLine> = Vec::new();
    for file in &args.files {
        let read = if file.as_os_str() == "-" {
            fixtures::parse(
                std::path::Path::new("<stdin>"),
                std::io::stdin().lock(),
                &codec,
            )
        } else {
            fixtures::read(file, &codec)
        };
        lines.extend(read.map_err(|e| InvalidInput(e.to_string()))?);
    }
    replay_lines(settings, args, lines).await
}

/// [`replay`] of lines already read (`args.files` unused), such as the
/// fixture built into the binary for `warren demo`.
pub async fn replay_lines(
    settings: &Settings,
    args: &ReplayArgs,
    lines: Vec<FixtureLine>,
) -> anyhow::Result<ReplaySummary> {
    let codec = settings.codec();
    let mut summary = ReplaySummary::default();
    for l in &lines {
        match &l.event {
            Ok(_) => summary.valid += 1,
            Err(e) => {
                summary.invalid += 1;
                output::eline(&escape(&e.to_string()));
            }
        }
    }
    if args.strict && summary.invalid > 0 {
        return Err(InvalidInput(format!(
            "{} invalid line(s); nothing published (--strict)",
            summary.invalid
        ))
        .into());
    }
    if args.dry_run {
        return Ok(summary);
    }
    let target = match &args.to {
        Some(service) => Target::Queue(service.as_str().to_owned()),
        None => Target::Exchange,
    };
    let bus = Bus::connect(settings).await?;
    let progress = (std::io::stderr().is_terminal() && lines.len() > 50).then(|| {
        let bar = indicatif::ProgressBar::new(lines.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut tick = args.rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1) as f64));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut pending = Vec::with_capacity(WINDOW);
    for l in &lines {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let confirm = match &l.event {
            Ok(e) => bus.send_event(&target, e, &codec.encode(e)).await?,
            // A line over the fixture limit was never read whole: nothing to send.
            Err(e)
                if args.raw_invalid
                    && !matches!(e.kind, events::fixtures::FixtureErrorKind::LineTooLong(_)) =>
            {
                let key = serde_json::from_str::<serde_json::Value>(&l.raw)
                    .ok()
                    .and_then(|v| v.get("type")?.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "invalid".to_owned());
                let props = BasicProperties::default()
                    .with_content_type(events::CONTENT_TYPE_STRUCTURED.into())
                    .with_delivery_mode(2);
                bus.send(&target, &key, l.raw.as_bytes(), props).await?
            }
            Err(_) => {
                summary.skipped += 1;
                continue;
            }
        };
        pending.push((confirm, l.line));
        if pending.len() >= WINDOW || tick.is_some() {
            summary.published += settle(&mut pending).await?;
            if let Some(bar) = &progress {
                bar.set_position(summary.published as u64);
            }
        }
    }
    summary.published += settle(&mut pending).await?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    bus.close().await;
    Ok(summary)
}

async fn settle(pending: &mut Vec<(lapin::PublisherConfirm, usize)>) -> anyhow::Result<usize> {
    let n = pending.len();
    for (confirm, line) in pending.drain(..) {
        confirmed(confirm, &format!("fixture line {line}")).await?;
    }
    Ok(n)
}

/// Runs the command and prints the counts.
pub async fn run(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<()> {
    let s = replay(settings, args).await?;
    if args.json {
        output::line(&serde_json::to_string(&s)?)
    } else if args.dry_run {
        output::line(&format!(
            "dry run: {} valid, {} invalid, nothing published",
            s.valid, s.invalid
        ))
    } else {
        output::line(&format!(
            "published {}, skipped {} invalid",
            s.published, s.skipped
        ))
    }
}
