//! The quickstart as a new user runs it, twice in a row against the real
//! servers: the first run relays and handles every event exactly once, the
//! second replays the same ids and changes nothing.

use std::process::Command;

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

fn quickstart(bus: &TestBus, db: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .env("DATABASE_URL", db)
        .env("WARREN_NAMESPACE", &bus.namespace)
        .env("AMQP_URL", testkit::amqp_url())
        .env("RUST_LOG", "off")
        .output()
        .expect("quickstart runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[sqlx::test(migrations = false)]
async fn quickstart_handles_each_event_once_and_a_second_run_changes_nothing(pool: PgPool) {
    let bus = TestBus::new().await;
    let delays = warren::SubscriptionConfig::default().retry.delays();
    for service in ["greeter", "front"] {
        bus.remember(service, &delays);
    }
    let db = db_url(&pool);

    let first = quickstart(&bus, &db);
    assert!(
        first.contains("greeter handled 3 visitor.arrived, 0 duplicate(s)"),
        "{first}"
    );
    for name in ["Ada", "Grace", "Edsger"] {
        let line = format!("front handled visitor.greeted: Hello, {name}!");
        assert_eq!(first.matches(&line).count(), 1, "{first}");
    }

    let second = quickstart(&bus, &db);
    assert!(
        second.contains("greeter handled 0 visitor.arrived, 3 duplicate(s)"),
        "{second}"
    );
    assert!(!second.contains("front handled"), "{second}");

    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT name, text FROM greeter.greetings ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            ("Ada".to_owned(), "Hello, Ada!".to_owned()),
            ("Edsger".to_owned(), "Hello, Edsger!".to_owned()),
            ("Grace".to_owned(), "Hello, Grace!".to_owned()),
        ]
    );
    // Every event was relayed: nothing waits in either outbox.
    for schema in ["greeter", "front"] {
        let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.outbox"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 0, "{schema}");
    }
}
