//! The tracing subscriber: readable lines on stderr (coloured as
//! `--color`/`NO_COLOR` and the terminal say) or JSON, filtered by `RUST_LOG` (default `info`, with the
//! drivers' chatter at `warn`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset: `info`, drivers at `warn`.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,amq_protocol=warn";

/// Installs the global subscriber; `default_filter` applies when
/// `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let asked = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty());
    let mut filter = asked
        .as_deref()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    // A passive declare that finds nothing is how warren asks whether a
    // queue exists (status, dlq, teardown, demo); the broker answers by
    // closing the channel, and lapin logs every channel the server closes
    // at ERROR. The commands report real failures themselves, so those
    // lines are silenced unless RUST_LOG asks about lapin by name.
    if !asked.is_some_and(|f| f.contains("lapin")) {
        if let Ok(d) = "lapin::channel=off".parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Pretty => builder
            .with_ansi(crate::output::stderr_colored())
            .with_target(false)
            .compact()
            .init(),
    }
}
