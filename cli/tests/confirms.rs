//! `warren publish` reads the broker's confirm: an event the broker
//! refuses (a nack) is an error with exit 1, never printed as published.

use std::process::Command;
use std::time::Duration;

use testkit::TestBus;

const CUSTOMER: &str = r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#;

/// `warren publish customer.registered` in namespace `ns`.
async fn publish(ns: &str) -> std::process::Output {
    let ns = ns.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["--namespace", &ns])
            .args(["publish", "customer.registered", "--data", CUSTOMER])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// A full queue with `x-overflow: reject-publish` bound to the type makes
/// RabbitMQ nack the publish: the command says so and exits 1 with
/// nothing on stdout; once the queue takes messages, the same command
/// succeeds and the event arrives.
#[tokio::test]
async fn publish_nacked_by_the_broker_exits_1_and_prints_no_id() {
    let bus = TestBus::new().await;
    let name = format!("{}.full", bus.namespace);
    let blocker = testkit::Blocker::new(&bus, &name, Some("customer.*")).await;

    let refused = publish(&bus.namespace).await;
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("nacked"), "says the broker refused it: {err}");
    assert!(
        refused.stdout.is_empty(),
        "no id printed for a refused event: {}",
        String::from_utf8_lossy(&refused.stdout)
    );

    let mut taken = blocker.release().await;
    let ok = publish(&bus.namespace).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let id: uuid::Uuid = String::from_utf8_lossy(&ok.stdout).trim().parse().unwrap();
    let seen = taken
        .next(Duration::from_secs(5))
        .await
        .expect("the accepted event reaches the queue");
    assert_eq!(seen.event.id, id);
    drop(taken);
    bus.channel
        .queue_delete(name.as_str().into(), Default::default())
        .await
        .unwrap();
}
