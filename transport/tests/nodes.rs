//! Several broker URLs against the real broker on 127.0.0.1:5672, and the
//! quorum queues' group size on a single node.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use warren_transport::{connect, connect_any, Topology};

fn broker() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A listener that accepts every connection and closes it at once: a node
/// whose port is open but which is not a working broker. Counts accepts.
async fn closing_listener() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, accepted, task)
}

#[tokio::test]
async fn a_list_whose_first_node_is_dead_connects_to_the_next() {
    let (port, accepted, task) = closing_listener().await;
    let list = format!("amqp://guest:dead-secret@127.0.0.1:{port}/%2f,{}", broker());
    // The order is shuffled: connect until the dead node has been drawn
    // first once (each try has an even chance; after a failure it goes
    // last, so later tries skip it).
    for _ in 0..40 {
        let (conn, node) = connect_any(&list, "nodes test").await.unwrap();
        assert!(!node.contains(&port.to_string()), "{node}");
        let ch = conn.create_channel().await.unwrap();
        ch.close(200, "ok".into()).await.unwrap();
        warren_transport::close(conn, "done").await;
        if accepted.load(Ordering::SeqCst) > 0 {
            break;
        }
    }
    task.abort();
    assert!(
        accepted.load(Ordering::SeqCst) > 0,
        "the dead node was never tried"
    );
}

#[tokio::test]
async fn an_all_dead_list_names_each_node_without_a_password() {
    let (p1, _, t1) = closing_listener().await;
    let (p2, _, t2) = closing_listener().await;
    let list = format!(
        "amqp://u1:first-secret@127.0.0.1:{p1}/%2f, amqp://u2:second-secret@127.0.0.1:{p2}/%2f"
    );
    let err = connect(&list, "nodes test").await.unwrap_err();
    t1.abort();
    t2.abort();
    let msg = err.to_string();
    assert!(msg.contains(&format!("u1:***@127.0.0.1:{p1}")), "{msg}");
    assert!(msg.contains(&format!("u2:***@127.0.0.1:{p2}")), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");
    assert!(!format!("{err:?}").contains("secret"), "{err:?}");
}

#[tokio::test]
async fn quorum_queues_with_a_group_size_of_three_work_on_one_node_and_keep_older_queues() {
    let conn = connect(&broker(), "nodes test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut topology = Topology::new(format!("nodes-{}", uuid::Uuid::new_v4().simple()));
    // Queues of a test that panics before its cleanup go on their own.
    topology.expires = Some(std::time::Duration::from_secs(600));
    let service = "billing";
    // A queue as warren declared it before the group size: redeclaring
    // with the argument must not be refused as inequivalent.
    let mut old = FieldTable::default();
    old.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    old.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    ch.queue_declare(
        topology.dlq(service).into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        old,
    )
    .await
    .unwrap();
    let declared = topology
        .declare_service(&conn, service, &["invoice.sent"], &[])
        .await;
    // Usable on this one-node broker: a message goes through.
    let published = async {
        ch.confirm_select(Default::default()).await?;
        let confirm = ch
            .basic_publish(
                "".into(),
                topology.queue(service).into(),
                Default::default(),
                b"hello",
                Default::default(),
            )
            .await?
            .await?;
        let got = ch
            .basic_get(topology.queue(service).into(), Default::default())
            .await?;
        Ok::<_, lapin::Error>((confirm.is_ack(), got.map(|m| m.delivery.data)))
    }
    .await;
    for q in [topology.queue(service), topology.dlq(service)] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = topology.delete_exchange(&ch).await;
    let _ = ch.close(200, "ok".into()).await;
    warren_transport::close(conn, "done").await;
    declared.unwrap();
    let (acked, got) = published.unwrap();
    assert!(acked, "a single node holds a majority of its one member");
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
}
