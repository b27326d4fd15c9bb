//! Outgrowing one machine, as a user sees it from the command line:
//! several broker URLs in `AMQP_URL`, and a database per service.

use std::process::{Command, Output};

use sqlx::PgPool;
use testkit::TestBus;

fn db_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        o.get_port(),
        o.get_database().unwrap()
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `warren` with `env` set and `RUST_LOG=warn` (so the line about a
/// node that did not answer is printed too).
async fn warren(env: Vec<(&'static str, String)>, args: Vec<&'static str>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
        c.args(args).env("RUST_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

/// A port that accepts connections and closes them at once.
async fn closing_port() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    (port, task)
}

const CUSTOMER: &str = r#"{"customer_id":"0192f0c4-7a3e-7cc1-9d1e-3b1f2a4c5d6e","name":"Ada","email":"ada@example.com"}"#;

#[tokio::test]
async fn no_node_of_a_broker_list_answering_is_one_line_naming_each_without_passwords() {
    let (p1, t1) = closing_port().await;
    let list = format!(
        "amqp://guest:first-secret@127.0.0.1:{p1}/%2f,amqp://guest:second-secret@127.0.0.1:1/%2f"
    );
    let out = warren(
        vec![("AMQP_URL", list)],
        vec!["publish", "customer.registered", "--data", CUSTOMER],
    )
    .await;
    t1.abort();
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        !stdout.contains("secret") && !stderr.contains("secret"),
        "{stdout}{stderr}"
    );
    let last = stderr.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("no RabbitMQ node answered (2 tried)"),
        "{stderr}"
    );
    assert!(
        last.contains(&format!("guest:***@127.0.0.1:{p1}")),
        "{stderr}"
    );
    assert!(last.contains("guest:***@127.0.0.1:1/"), "{stderr}");
}

#[sqlx::test(migrations = false)]
async fn status_on_a_broker_list_with_a_dead_node_reports_and_never_prints_a_password(
    pool: PgPool,
) {
    services::migrate(&pool).await.unwrap();
    let bus = TestBus::new().await;
    for s in ["orders", "inventory", "payments", "shipping"] {
        bus.declare_service(s, &["order.placed"], &[]).await;
    }
    let (port, task) = closing_port().await;
    // The real broker's password is `guest`: it must not show either.
    let list = format!(
        "amqp://guest:dead-secret@127.0.0.1:{port}/%2f,amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    let mut tried_dead_node = false;
    // Shuffled: until a run drew the dead node first (even odds each).
    for _ in 0..12 {
        let out = warren(
            vec![
                ("AMQP_URL", list.clone()),
                ("DATABASE_URL", db_url(&pool)),
                ("WARREN_NAMESPACE", bus.namespace.clone()),
            ],
            vec!["status"],
        )
        .await;
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{stdout}{stderr}");
        for shown in [&stdout, &stderr] {
            assert!(!shown.contains("secret"), "{shown}");
            assert!(!shown.contains("guest:guest"), "{shown}");
        }
        assert!(
            stdout.contains("connected to amqp://guest:***@127.0.0.1:5672/%2f"),
            "{stdout}"
        );
        if stderr.contains("did not answer") {
            assert!(
                stderr.contains(&format!("guest:***@127.0.0.1:{port}")),
                "{stderr}"
            );
            tried_dead_node = true;
            break;
        }
    }
    task.abort();
    assert!(tried_dead_node, "the dead node was never drawn first");
}
