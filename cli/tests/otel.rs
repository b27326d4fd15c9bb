//! OpenTelemetry export with the real binary: `warren run` pointed at an
//! OTLP/HTTP receiver of the test's own (decoding the protobuf it is sent)
//! exports one order's saga as one trace, the trace of the `traceparent`
//! the order's POST carried; and without the variable nothing is set up.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use prost::Message;
use serde_json::{json, Value as Json};
use sqlx::PgPool;
use testkit::TestBus;
use uuid::Uuid;

/// One span as the receiver got it, ids in hex.
#[derive(Debug, Clone)]
struct Received {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
}

fn text_of(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, as a collector takes it.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let store = store.clone();
            async move {
                assert_eq!(
                    headers.get("content-type").unwrap(),
                    "application/x-protobuf",
                    "OTLP/HTTP with protobuf bodies"
                );
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut got = Vec::new();
                for rs in request.resource_spans {
                    let resource = text_of(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            got.push(Received {
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent_span_id: hex(&s.parent_span_id),
                                name: s.name,
                                attributes: text_of(&s.attributes),
                                resource: resource.clone(),
                            });
                        }
                    }
                }
                store.lock().unwrap().extend(got);
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

fn db_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    )
}

/// Reads `child`'s stderr until the HTTP API's address, then keeps
/// draining it (into `log`, shown when the test fails).
fn http_address(child: &mut std::process::Child, log: Arc<Mutex<String>>) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.lock().unwrap().push_str(&format!("{line}\n"));
        if line.contains("HTTP API listening") {
            let at = line.find("bound=").expect("bound=") + "bound=".len();
            let addr: String = line[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
            return addr;
        }
    }
    panic!("warren run never listened:\n{}", log.lock().unwrap());
}

/// Polls `check` every 200 ms until it gives a value, up to `limit`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn each_orders_saga_and_compensation_is_one_trace_continuing_the_traceparent_of_its_post(
    pool: PgPool,
) {
    let (endpoint, spans) = receiver().await;
    let bus = TestBus::new().await;
    let delays = consumers::SubscriptionConfig::default().retry.delays();
    for s in services::ALL {
        bus.remember(s, &delays);
    }
    let log = Arc::new(Mutex::new(String::new()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--namespace",
            &bus.namespace,
            "--database-url",
            &db_url(&pool),
        ])
        .args(["run", "--http", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "warren-otel-test")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        // Nothing leaves before the shutdown's flush: the spans asserted
        // below arrive only if `warren` flushes them on its way out.
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logged = log.clone();
    let (mut child, addr) = tokio::task::spawn_blocking(move || {
        let addr = http_address(&mut child, logged);
        (child, addr)
    })
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    let customer: Json = http
        .post(format!("{base}/customers"))
        .json(&json!({ "name": "Ada", "email": "ada@example.com" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let customer_id: Uuid = customer["id"].as_str().unwrap().parse().unwrap();
    let stock = http
        .put(format!("{base}/stock/otel-sku"))
        .json(&json!({ "on_hand": 5 }))
        .send()
        .await
        .unwrap();
    assert!(stock.status().is_success(), "{}", stock.status());
    until("orders knows the customer", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders.customers WHERE id = $1")
                .bind(customer_id)
                .fetch_one(&pool)
                .await
                .ok()
                .filter(|n| *n == 1)
        }
    })
    .await;

    // Two orders, each POSTed with a traceparent of the test's: one that
    // ships, one whose payment is declined (its compensation: the order
    // cancelled, the stock released).
    let place = |token: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let trace_id = Uuid::new_v4().simple().to_string();
            let caller_span = Uuid::new_v4().simple().to_string()[..16].to_owned();
            let placed = http
                .post(format!("{base}/orders"))
                .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
                .json(&json!({
                    "customer_id": customer_id,
                    "lines": [{ "sku": "otel-sku", "qty": 1, "unit_price": 1250 }],
                    "payment_token": token,
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(placed.status(), 202);
            let order: Json = placed.json().await.unwrap();
            (
                order["id"].as_str().unwrap().to_owned(),
                trace_id,
                caller_span,
            )
        }
    };
    let (shipped_id, shipped_trace, shipped_caller) = place("tok_ok").await;
    let (declined_id, declined_trace, declined_caller) = place("tok_decline").await;
    for (id, status) in [(&shipped_id, "shipped"), (&declined_id, "cancelled")] {
        until(&format!("order {status}"), Duration::from_secs(60), || {
            let (http, url) = (http.clone(), format!("{base}/orders/{id}"));
            async move {
                let o: Json = http.get(url).send().await.ok()?.json().await.ok()?;
                (o["status"] == status).then_some(())
            }
        })
        .await;
    }
    // The last steps of both sagas: inventory removes the shipped unit and
    // releases the declined order's.
    until("inventory settled both", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>(
                "SELECT on_hand * 10 + reserved FROM inventory.stock WHERE sku = 'otel-sku'",
            )
            .fetch_one(&pool)
            .await
            .ok()
            .filter(|r| *r == 40)
        }
    })
    .await;

    // Ctrl-C: `warren run` drains, stops, and flushes its spans.
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "warren run: {status}\n{log}");

    let spans = spans.lock().unwrap().clone();
    let shipped = Trace::of(&spans, &shipped_trace, &shipped_caller, &log);
    let declined = Trace::of(&spans, &declined_trace, &declined_caller, &log);

    // The requests: each a child of its caller's span.
    for (trace, caller) in [(&shipped, &shipped_caller), (&declined, &declined_caller)] {
        let request = trace.named("POST /orders");
        assert_eq!(
            &request.parent_span_id, caller,
            "continues the caller's span"
        );
        assert_eq!(request.attributes["http.route"], "/orders");
        assert_eq!(request.attributes["http.response.status_code"], "202");
        assert_eq!(request.resource["service.name"], "warren-otel-test");
        assert_eq!(request.resource["deployment.environment"], "test");
        trace.assert_connected(caller);
    }

    // Every service's handling of the shipped order's events, each a child
    // of the span that raised its event: the request for order.placed, the
    // handler of the event before for each one after it.
    let request = shipped.named("POST /orders");
    let reserve = shipped.handling("inventory", "order.placed");
    assert_eq!(reserve.name, "process order.placed");
    assert_eq!(reserve.attributes["subject"], shipped_id);
    assert_eq!(reserve.parent_span_id, request.span_id);
    let capture = shipped.handling("payments", "stock.reserved");
    assert_eq!(capture.parent_span_id, reserve.span_id);
    let confirm = shipped.handling("orders", "payment.captured");
    assert_eq!(confirm.parent_span_id, capture.span_id);
    let dispatch = shipped.handling("shipping", "order.confirmed");
    assert_eq!(dispatch.parent_span_id, confirm.span_id);
    let done = shipped.handling("orders", "shipment.dispatched");
    assert_eq!(done.parent_span_id, dispatch.span_id);
    let removed = shipped.handling("inventory", "shipment.dispatched");
    assert_eq!(removed.parent_span_id, dispatch.span_id);

    // The declined order's failure and compensation, in its own trace.
    let request = declined.named("POST /orders");
    let reserve = declined.handling("inventory", "order.placed");
    assert_eq!(reserve.attributes["subject"], declined_id);
    assert_eq!(reserve.parent_span_id, request.span_id);
    let decline = declined.handling("payments", "stock.reserved");
    assert_eq!(decline.parent_span_id, reserve.span_id);
    let cancel = declined.handling("orders", "payment.failed");
    assert_eq!(cancel.parent_span_id, decline.span_id);
    let release = declined.handling("inventory", "order.cancelled");
    assert_eq!(release.parent_span_id, cancel.span_id);
}

/// The spans of one trace, as received.
struct Trace<'a> {
    spans: Vec<&'a Received>,
    /// For messages: what the trace holds.
    names: Vec<String>,
}

impl<'a> Trace<'a> {
    fn of(all: &'a [Received], trace_id: &str, caller: &str, log: &str) -> Trace<'a> {
        let spans: Vec<&Received> = all.iter().filter(|s| s.trace_id == trace_id).collect();
        assert!(
            !spans.is_empty(),
            "no span of trace {trace_id} (caller {caller}) among {} received\n{log}",
            all.len()
        );
        let names = spans
            .iter()
            .map(|s| format!("{} {:?}", s.name, s.attributes.get("service")))
            .collect();
        Trace { spans, names }
    }

    fn named(&self, name: &str) -> &'a Received {
        self.spans
            .iter()
            .copied()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {:?}", self.names))
    }

    /// `service`'s span handling the trace's `event_type` event.
    fn handling(&self, service: &str, event_type: &str) -> &'a Received {
        self.spans
            .iter()
            .copied()
            .find(|s| {
                s.attributes.get("service").map(String::as_str) == Some(service)
                    && s.attributes.get("event_type").map(String::as_str) == Some(event_type)
            })
            .unwrap_or_else(|| panic!("no {service} span for {event_type} in {:?}", self.names))
    }

    /// No span hangs from a parent the collector never got, but the
    /// caller's own.
    fn assert_connected(&self, caller: &str) {
        let ids: BTreeMap<&str, &str> = self
            .spans
            .iter()
            .map(|s| (s.span_id.as_str(), s.name.as_str()))
            .collect();
        for s in &self.spans {
            assert!(
                s.parent_span_id == caller || ids.contains_key(s.parent_span_id.as_str()),
                "{} has a parent outside the trace: {:?}",
                s.name,
                self.names
            );
        }
    }
}

#[test]
fn without_an_endpoint_no_exporter_layer_or_propagator_is_set_up() {
    // This test binary's own environment: nothing may turn export on.
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "RUST_LOG",
    ] {
        std::env::remove_var(var);
    }
    // This test's spans logged, the drivers' lines of the other test not.
    let telemetry =
        warren_cli::telemetry::init(warren_cli::config::LogFormat::Json, "otel=info,warn").unwrap();
    assert!(!telemetry.exporting(), "no exporter");
    // No OpenTelemetry layer: a span cannot take a remote parent, and an
    // event raised in it carries no span of it.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let span = tracing::info_span!("http.request");
    assert!(!span.is_disabled(), "the span is logged");
    assert!(!events::trace_context::continue_trace(&span, Some(tp)));
    assert_eq!(events::trace_context::of_span(&span), None);
    // No propagator: an HTTP request's traceparent is not read.
    let mut headers = HashMap::new();
    headers.insert("traceparent".to_owned(), tp.to_owned());
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&headers));
    use opentelemetry::trace::TraceContextExt;
    assert!(!cx.span().span_context().is_valid());
}

#[test]
fn the_exporter_brings_no_other_tls_stack_or_grpc() {
    // rustls on ring is the one TLS stack (lapin's): no OpenSSL, no
    // native-tls, no aws-lc (a second rustls provider would leave rustls
    // without a default one), and no gRPC stack for an exporter that
    // speaks OTLP/HTTP.
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    for name in [
        "openssl",
        "openssl-sys",
        "native-tls",
        "aws-lc-rs",
        "aws-lc-sys",
        "tonic",
    ] {
        assert!(
            !lock.contains(&format!("name = \"{name}\"\n")),
            "{name} is in Cargo.lock"
        );
    }
}
