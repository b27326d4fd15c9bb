//! The tracing subscriber: readable lines on stderr (coloured as
//! `--color`/`NO_COLOR` and the terminal say) or JSON, filtered by `RUST_LOG` (default `info`, with the
//! drivers' chatter at `warn`); and, opt-in, the export of spans to an
//! OpenTelemetry collector.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and not empty: spans go over
//! OTLP/HTTP with protobuf bodies (`http/protobuf`, the only protocol this
//! build has; `grpc` is refused with a message) to `<endpoint>/v1/traces`,
//! with the resource the SDK's detectors read from `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` (service name `warren` when neither names
//! one). `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the
//! batch processor's `OTEL_BSP_*` apply as the specification says;
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.
//! Without an endpoint no SDK, exporter or layer is built: logging costs
//! what it did before.
//!
//! The spans stay what `RUST_LOG` enables (the default `info` exports every
//! span warren makes). W3C Trace Context becomes the global propagator, so
//! an HTTP request's `traceparent` header continues the caller's trace (see
//! `warren_shop::http::traced`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::error::InvalidInput;

/// The filter when `RUST_LOG` is unset: `info`, drivers at `warn`.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,amq_protocol=warn";

/// The OTLP exporter's default request timeout (the specification's 10 s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The service name when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` gives one (the SDK would say
/// `unknown_service`).
pub const DEFAULT_SERVICE_NAME: &str = "warren";

/// Where and how spans are exported, read from the standard `OTEL_*`
/// variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The full URL spans are POSTed to (`…/v1/traces`).
    pub traces_url: String,
    /// Per request, connection and response included.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// Reads the configuration through `var` (the process environment in
    /// [`init`], a map in tests): `None` when export is off, an error
    /// naming the variable when it asks for what this build cannot do.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, InvalidInput> {
        let var = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if let Some(exporter) = var("OTEL_TRACES_EXPORTER") {
            match exporter.to_ascii_lowercase().as_str() {
                "none" => return Ok(None),
                "otlp" => {}
                other => {
                    return Err(InvalidInput(format!(
                        "OTEL_TRACES_EXPORTER={other:?} is not supported: warren exports traces with otlp (or none)"
                    )))
                }
            }
        }
        // The signal's own endpoint is used as it is; the general one gets
        // the signal's path, as the specification says.
        let (name, traces_url) = if let Some(url) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)
        } else if let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{}/v1/traces", base.trim_end_matches('/')),
            )
        } else {
            return Ok(None);
        };
        let parsed = url::Url::parse(&traces_url).map_err(|e| {
            InvalidInput(format!(
                "{name} is not a URL ({e}): {}",
                redacted(&traces_url)
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(InvalidInput(format!(
                "{name} must be an http:// or https:// URL of the collector's OTLP/HTTP receiver (usually port 4318), not {}",
                redacted(&traces_url)
            )));
        }
        for protocol_var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = var(protocol_var) {
                if protocol != "http/protobuf" {
                    return Err(InvalidInput(format!(
                        "{protocol_var}={protocol:?} is not supported: warren exports OTLP over HTTP with protobuf bodies only; \
                         set it to http/protobuf (or leave it unset) and point {name} at the collector's OTLP/HTTP port (usually 4318, not gRPC's 4317)"
                    )));
                }
                // The signal's own variable wins over the general one.
                break;
            }
        }
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
        {
            Some(ms) => Duration::from_millis(ms.parse().map_err(|_| {
                InvalidInput(format!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT must be milliseconds, not {ms:?}"
                ))
            })?),
            None => DEFAULT_TIMEOUT,
        };
        Ok(Some(OtlpConfig {
            traces_url,
            timeout,
        }))
    }
}

/// `url` without user and password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(not shown)".to_owned(),
    }
}

/// What [`init`] installed; [`Telemetry::shutdown`] sends the spans still
/// buffered before the process ends.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Telemetry {
    /// Present only when spans are exported.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what the batch processor still holds and stops it, so the
    /// spans of the last moments (a shutdown's drain) reach the collector.
    /// Bounded by the exporter's timeout.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // It blocks until the processor's thread has exported, and that
        // export runs on this runtime (`OnRuntime`): off the runtime's
        // threads.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "flushing the last spans to the collector failed");
        }
    }
}

/// Installs the global subscriber; `default_filter` applies when
/// `RUST_LOG` is unset. Exports spans when the `OTEL_*` variables say so
/// (see the module's documentation); must run inside the Tokio runtime
/// then, which carries the exporter's requests.
pub fn init(format: LogFormat, default_filter: &str) -> Result<Telemetry, InvalidInput> {
    let otlp = OtlpConfig::from_vars(|name| std::env::var(name).ok())?;
    let provider = otlp.as_ref().map(tracer_provider).transpose()?;
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("warren")));
    let registry = tracing_subscriber::registry()
        .with(filter(default_filter))
        // `None` when not exporting: a layer that does nothing.
        .with(otel_layer);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(crate::output::stderr_colored())
                    .with_target(false)
                    .compact(),
            )
            .init(),
    }
    if let Some(cfg) = &otlp {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing::debug!(endpoint = %redacted(&cfg.traces_url), "exporting spans over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

/// `RUST_LOG`, or `default_filter` when it is unset or invalid.
fn filter(default_filter: &str) -> EnvFilter {
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
    // lines are silenced unless RUST_LOG asks about lapin by name. So are
    // the I/O loop's: at shutdown it logs a socket that wrote 0 bytes or a
    // connection already closing at ERROR, and a connection that really
    // fails reaches warren as an error that warren logs with its context.
    if !asked.is_some_and(|f| f.contains("lapin")) {
        for quiet in ["lapin::channel=off", "lapin::io_loop=off"] {
            if let Ok(d) = quiet.parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    filter
}

/// The SDK's provider: a batch processor (a thread of its own) feeding the
/// OTLP/HTTP exporter, and the resource from the environment.
fn tracer_provider(cfg: &OtlpConfig) -> Result<SdkTracerProvider, InvalidInput> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(cfg.traces_url.clone())
        .with_timeout(cfg.timeout)
        .with_http_client(OnRuntime::new(cfg)?)
        .build()
        .map_err(|e| InvalidInput(format!("cannot export traces: {e}")))?;
    let mut resource = Resource::builder().build();
    let unnamed = resource
        .get(&opentelemetry::Key::new("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    if unnamed {
        resource = Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build();
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The exporter's HTTP client: hyper (http and https with rustls on ring)
/// on the application's Tokio runtime. The SDK's batch processor exports
/// from a thread of its own with a plain executor, where hyper cannot run;
/// each request is spawned onto the runtime and awaited from there. A
/// failing collector is reported once, and again when it recovers, not at
/// every batch.
#[derive(Debug)]
struct OnRuntime {
    client: HyperClient<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    >,
    runtime: tokio::runtime::Handle,
    /// Where to, for the messages (no credentials).
    endpoint: String,
    failing: Arc<AtomicBool>,
}

impl OnRuntime {
    fn new(cfg: &OtlpConfig) -> Result<Self, InvalidInput> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            InvalidInput("trace export needs the Tokio runtime to be running".into())
        })?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(OnRuntime {
            client: HyperClient::new(connector, cfg.timeout, None),
            runtime,
            endpoint: redacted(&cfg.traces_url),
            failing: Arc::new(AtomicBool::new(false)),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self
            .runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as HttpError)
            .and_then(|r| r);
        let problem = match &sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the collector answered {}", r.status())),
            Err(e) => Some(e.to_string()),
        };
        match problem {
            Some(error) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                endpoint = %self.endpoint, %error,
                "exporting spans failed; spans are dropped until the collector answers"
            ),
            None if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(endpoint = %self.endpoint, "exporting spans works again")
            }
            _ => {}
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, InvalidInput> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported() {
        assert_eq!(read(&[]).unwrap(), None);
        // compose's default when the observability profile is off.
        assert_eq!(read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]).unwrap(), None);
        assert_eq!(
            read(&[
                ("OTEL_SERVICE_NAME", "x"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ])
            .unwrap(),
            None,
            "nothing to refuse while nothing is exported"
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(
                read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), off]).unwrap(),
                None
            );
        }
    }

    #[test]
    fn the_endpoint_gets_the_traces_path_and_the_signals_own_is_taken_as_is() {
        let c = read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.traces_url, "http://jaeger:4318/v1/traces");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        let c = read(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://tempo.example/otlp/traces",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.traces_url, "https://tempo.example/otlp/traces");
        assert_eq!(c.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn grpc_and_json_are_refused_with_the_way_out() {
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ] {
            let e = read(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                (var, value),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(var) && e.contains("http/protobuf") && e.contains("4318"),
                "{e}"
            );
        }
        let e = read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4318")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://"), "{e}");
    }

    #[test]
    fn credentials_in_the_endpoint_never_reach_a_message() {
        let e = read(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://user:s3cret@c:4318")])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
