//! `Publisher::publish` against the real broker: `Ok` only for a plain
//! ack; a nack (a full queue that rejects publishes) and a returned,
//! unroutable message are `Refused`. The other publishers' tests cover
//! their own call sites; this one keeps the shared path honest on its own,
//! so a mutation run narrowed to this crate sees it too.

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use warren_transport::{self as transport, Outgoing, PublishError, Publisher};

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn to_queue(queue: &str) -> Outgoing<'_> {
    Outgoing {
        exchange: "",
        routing_key: queue,
        body: b"{}",
        properties: BasicProperties::default(),
    }
}

#[tokio::test]
async fn publish_is_ok_only_for_a_plain_ack_and_refused_for_a_nack_or_a_return() {
    let conn = transport::connect(&amqp_url(), "publisher-test")
        .await
        .unwrap();
    let publisher = Publisher::open(&conn).await.unwrap();
    // One message fills it; RabbitMQ nacks every publish after that.
    // Exclusive: gone with the connection even if the test fails.
    let full = format!("warren-test-publisher-{}", uuid::Uuid::new_v4());
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    publisher
        .channel()
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    let wait = Duration::from_secs(10);

    publisher
        .publish(to_queue(&full), wait)
        .await
        .expect("an empty queue takes the message: a plain ack");

    match publisher.publish(to_queue(&full), wait).await {
        Err(PublishError::Refused(why)) => assert!(why.contains("nacked"), "{why}"),
        other => panic!("a full queue's nack must be refused, got {other:?}"),
    }

    // No queue of that name: mandatory, so acked *and* returned.
    let nowhere = format!("warren-test-nowhere-{}", uuid::Uuid::new_v4());
    match publisher.publish(to_queue(&nowhere), wait).await {
        Err(PublishError::Refused(why)) => assert!(why.contains("unroutable"), "{why}"),
        other => panic!("a returned message must be refused, got {other:?}"),
    }

    publisher
        .channel()
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    transport::close(conn, "done").await;
}
