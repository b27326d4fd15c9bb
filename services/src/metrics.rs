//! `GET /metrics`: what the services in this process count, in the
//! OpenMetrics text format (which Prometheus scrapes), rendered by
//! `prometheus-client`.
//!
//! The counters live in the library ([`consumers::Stats`],
//! [`RelayStats`]); a scrape reads them and hands typed families to the
//! crate, which writes each family's samples together and escapes label
//! values. Every label value comes from a fixed set besides: `service`
//! from the services this process runs, `type` from the catalog (anything
//! else is `unknown`, see [`consumers::outcome::UNKNOWN_TYPE`]),
//! `outcome` from [`consumers::Outcome`], `reason` from
//! [`consumers::outcome::REASONS`]. Nothing from the wire becomes a label.
//!
//! Families (see README "Metrics"):
//! - `warren_consumer_events_total{service,type,outcome}`
//! - `warren_retries_total{service,type,reason}`
//! - `warren_dead_letters_total{service,type,reason}`
//! - `warren_consumer_batch_seconds{service}` (histogram)
//! - `warren_relay_published_total{service}`, `warren_relay_active{service}`
//! - `warren_relay_confirm_seconds{service}` (histogram)
//! - `warren_outbox_backlog{service}`, `warren_outbox_oldest_age_seconds{service}`
//! - `warren_gateway_breaker_state` (when payments runs here)
//! - `process_*`: CPU, memory, file descriptors, threads, start time (Linux)

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use consumers::outcome::StatsSnapshot;
use consumers::Outcome;
use producers::relay::RelayStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::http::Shared;

/// The media type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a scrape waits for an outbox's backlog query: a scrape must
/// answer even while the database does not (its samples are left out).
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /metrics`.
pub async fn scrape(State(shared): State<Shared>) -> Response {
    match render(&shared).await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => {
            tracing::error!("encoding /metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The exposition of everything `shared` counts, plus process metrics.
pub async fn render(shared: &Shared) -> Result<String, std::fmt::Error> {
    let reading = Reading::take(shared).await;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(reading));
    #[cfg(target_os = "linux")]
    registry.register_collector(Box::new(process::Process));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Label sets are arrays of (name, value) pairs: prometheus-client's
/// derived label-set structs cannot borrow, and a scrape would otherwise
/// copy every label value.
type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

fn by_service(service: &str) -> Labels<'_, 1> {
    [("service", service)]
}

/// One relay's counters at the scrape.
#[derive(Debug)]
struct RelayReading {
    published: u64,
    active: bool,
    confirm_buckets: Vec<(f64, u64)>,
    confirm_sum: f64,
    confirm_count: u64,
}

impl RelayReading {
    fn of(stats: &RelayStats) -> Self {
        let confirms = stats.confirms();
        RelayReading {
            published: stats.published.load(Ordering::Relaxed),
            active: stats.active.load(Ordering::Relaxed),
            confirm_buckets: stats.confirm_histogram(),
            confirm_sum: confirms.wait_us as f64 / 1e6,
            confirm_count: confirms.batches,
        }
    }
}

/// Everything a scrape reports besides process metrics, read once (the
/// outboxes' backlog asynchronously, before encoding, which is not).
#[derive(Debug)]
struct Reading {
    consumers: Vec<(String, StatsSnapshot)>,
    relays: Vec<(String, RelayReading)>,
    /// (service, unpublished rows, age of the oldest in seconds).
    outboxes: Vec<(String, i64, f64)>,
    breaker: Option<i64>,
}

impl Reading {
    async fn take(shared: &Shared) -> Reading {
        let mut outboxes = Vec::new();
        for service in shared.relay_stats.keys() {
            let Ok(outbox) = producers::Outbox::new(service) else {
                continue;
            };
            match tokio::time::timeout(BACKLOG_TIMEOUT, outbox.backlog(shared.stores.of(service)))
                .await
            {
                Ok(Ok(b)) => outboxes.push((
                    service.clone(),
                    b.unpublished,
                    b.oldest_age_s.unwrap_or(0.0),
                )),
                Ok(Err(e)) => tracing::debug!(service, error = %e, "outbox backlog unreadable"),
                Err(_) => tracing::debug!(service, "outbox backlog query timed out"),
            }
        }
        Reading {
            consumers: shared
                .consumer_stats
                .iter()
                .map(|(s, stats)| (s.clone(), stats.snapshot()))
                .collect(),
            relays: shared
                .relay_stats
                .iter()
                .map(|(s, stats)| (s.clone(), RelayReading::of(stats)))
                .collect(),
            outboxes,
            breaker: shared
                .gateway
                .as_ref()
                .map(|g| i64::from(g.breaker_state().as_gauge())),
        }
    }

    /// A counter of events by (service, type, reason) for one outcome.
    fn encode_reasons(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        outcome: Outcome,
    ) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (service, s) in &self.consumers {
            let mut by_reason: Vec<((&str, &str), u64)> = Vec::new();
            for ((t, o, reason), n) in &s.counts {
                if *o != outcome {
                    continue;
                }
                let key = (*t, reason.unwrap_or(consumers::outcome::OTHER_REASON));
                match by_reason.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, total)) => *total += n,
                    None => by_reason.push((key, *n)),
                }
            }
            for ((t, reason), n) in by_reason {
                let labels: Labels<3> = [("service", service), ("type", t), ("reason", reason)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for Reading {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(
            "warren_consumer_events",
            "Events a consumer settled, by service, type and outcome",
            None,
            MetricType::Counter,
        )?;
        for (service, s) in &self.consumers {
            for (t, outcome, n) in &s.by_type {
                let labels: Labels<3> = [("service", service), ("type", t), ("outcome", outcome)];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        self.encode_reasons(
            &mut encoder,
            "warren_retries",
            "Events sent to a delayed retry, by service, type and reason",
            Outcome::Retried,
        )?;
        self.encode_reasons(
            &mut encoder,
            "warren_dead_letters",
            "Events dead-lettered, by service, type and reason",
            Outcome::DeadLettered,
        )?;

        let mut family = encoder.encode_descriptor(
            "warren_consumer_batch",
            "Time a consumer lane took for a batch, from taking it to its ack",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (service, s) in &self.consumers {
            family
                .encode_family(&by_service(service))?
                .encode_histogram::<NoLabelSet>(
                    s.batch_sum,
                    s.batch_count,
                    &s.batch_buckets,
                    None,
                )?;
        }

        let mut family = encoder.encode_descriptor(
            "warren_relay_published",
            "Events the relay published and the broker confirmed",
            None,
            MetricType::Counter,
        )?;
        for (service, r) in &self.relays {
            ConstCounter::new(r.published).encode(family.encode_family(&by_service(service))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "warren_relay_active",
            "Whether this process holds the service's relay lock (1) or stands by (0)",
            None,
            MetricType::Gauge,
        )?;
        for (service, r) in &self.relays {
            ConstGauge::new(i64::from(r.active))
                .encode(family.encode_family(&by_service(service))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "warren_relay_confirm",
            "Wait of a published batch for its publisher confirms",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (service, r) in &self.relays {
            family
                .encode_family(&by_service(service))?
                .encode_histogram::<NoLabelSet>(
                    r.confirm_sum,
                    r.confirm_count,
                    &r.confirm_buckets,
                    None,
                )?;
        }

        let mut family = encoder.encode_descriptor(
            "warren_outbox_backlog",
            "Unpublished outbox rows",
            None,
            MetricType::Gauge,
        )?;
        for (service, backlog, _) in &self.outboxes {
            ConstGauge::new(*backlog).encode(family.encode_family(&by_service(service))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "warren_outbox_oldest_age",
            "Age of the oldest unpublished outbox row (0 when there is none)",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (service, _, age) in &self.outboxes {
            ConstGauge::new(*age).encode(family.encode_family(&by_service(service))?)?;
        }

        if let Some(state) = self.breaker {
            let family = encoder.encode_descriptor(
                "warren_gateway_breaker_state",
                "Payment gateway circuit breaker: 0 closed, 1 half-open, 2 open",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(state).encode(family)?;
        }
        Ok(())
    }
}

/// Process metrics as Prometheus' client libraries name them, read from
/// `/proc/self` at each scrape (prometheus-client has no process
/// collector, and the one crate that adds one is built on an older
/// prometheus-client that does not escape label values). Reading `/proc`
/// touches no disk, so doing it inside the async handler blocks nothing.
#[cfg(target_os = "linux")]
mod process {
    use procfs::process::{LimitValue, Process as Proc};
    use procfs::WithCurrentSystemInfo;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::MetricType;
    use prometheus_client::registry::Unit;

    /// This process, read at each scrape.
    #[derive(Debug)]
    pub(super) struct Process;

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: f64,
    ) -> std::fmt::Result {
        ConstGauge::new(value).encode(encoder.encode_descriptor(
            name,
            help,
            unit,
            MetricType::Gauge,
        )?)
    }

    impl Collector for Process {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            let me = match Proc::myself() {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "/proc/self unreadable");
                    return Ok(());
                }
            };
            if let Ok(stat) = me.stat() {
                let ticks = procfs::ticks_per_second() as f64;
                let cpu = (stat.utime + stat.stime) as f64 / ticks;
                ConstCounter::new(cpu).encode(encoder.encode_descriptor(
                    "process_cpu",
                    "Total user and system CPU time spent",
                    Some(&Unit::Seconds),
                    MetricType::Counter,
                )?)?;
                gauge(
                    &mut encoder,
                    "process_resident_memory",
                    "Resident memory size",
                    Some(&Unit::Bytes),
                    stat.rss_bytes().get() as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_virtual_memory",
                    "Virtual memory size",
                    Some(&Unit::Bytes),
                    stat.vsize as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_threads",
                    "Threads of the process",
                    None,
                    stat.num_threads as f64,
                )?;
                if let Ok(boot) = procfs::boot_time_secs() {
                    gauge(
                        &mut encoder,
                        "process_start_time",
                        "Start time of the process since the Unix epoch",
                        Some(&Unit::Seconds),
                        boot as f64 + stat.starttime as f64 / ticks,
                    )?;
                }
            }
            if let Ok(n) = me.fd_count() {
                gauge(
                    &mut encoder,
                    "process_open_fds",
                    "Open file descriptors",
                    None,
                    n as f64,
                )?;
            }
            if let Ok(limits) = me.limits() {
                if let LimitValue::Value(max) = limits.max_open_files.soft_limit {
                    gauge(
                        &mut encoder,
                        "process_max_fds",
                        "Limit on open file descriptors",
                        None,
                        max as f64,
                    )?;
                }
            }
            Ok(())
        }
    }
}
