//! Each HTTP request runs in an `http.request` span named by its matched
//! route, never its raw path, with its status; what the request's handler
//! does (the outbox append of `POST /customers`) happens inside it. (One
//! test in this file: it installs the process's global subscriber.)

use serde_json::json;
use sqlx::PgPool;
use testkit::capture::Capture;
use testkit::{amqp_url, TestBus};
use uuid::Uuid;
use warren_shop::gateway::GatewayConfig;
use warren_shop::{App, AppConfig};

#[sqlx::test(migrations = false)]
async fn a_request_runs_in_an_http_span_named_by_its_route(pool: PgPool) {
    let capture = Capture::install();
    warren_shop::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    let config = AppConfig {
        amqp_url: amqp_url(),
        topology: bus.topology.clone(),
        services: vec!["customers".into(), "orders".into()],
        http: Some("127.0.0.1:0".parse().unwrap()),
        subscription: consumers::SubscriptionConfig {
            live_feed: false,
            ..Default::default()
        },
        relay: Default::default(),
        gateway: GatewayConfig::default(),
        partitions: Default::default(),
    };
    bus.remember("orders", &config.subscription.retry.delays());
    let app = App::start(pool.clone(), config).await.unwrap();
    let base = format!("http://{}", app.http_addr.unwrap());
    let http = reqwest::Client::new();

    let unknown = Uuid::now_v7();
    let missing = http
        .get(format!("{base}/orders/{unknown}"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let created = http
        .post(format!("{base}/customers"))
        .json(&json!({ "name": "Ada", "email": "ada@example.com" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    app.stop().await;

    let closed = capture.closed();
    let requests: Vec<_> = closed
        .iter()
        .filter(|(name, _)| name == "http.request")
        .map(|(_, f)| f)
        .collect();
    assert!(
        requests.iter().any(|f| f["http.route"] == "/orders/{id}"
            && f["http.request.method"] == "GET"
            && f["http.response.status_code"] == "404"),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|f| !f["http.route"].contains(&unknown.to_string())),
        "a raw path became a field: {requests:#?}"
    );
    // The customer's event was appended inside the request's span.
    let append = capture
        .events()
        .into_iter()
        .find(|e| e.message == "appended to outbox" && e.span("warren.outbox.append").is_some())
        .expect("the append's line");
    let request = append
        .span("http.request")
        .unwrap_or_else(|| panic!("the append ran outside the request: {append:?}"));
    assert_eq!(request["http.route"], "/customers");
    assert_eq!(request["http.request.method"], "POST");
}
