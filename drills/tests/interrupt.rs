//! The `drills` binary, interrupted mid-drill, removes what the drill
//! made: its `warren` processes stop, its namespace's queues and exchange
//! go from the broker, its database from the server, and it exits 130
//! (SIGINT) or 143 (SIGTERM). Runs the real binary against the local
//! RabbitMQ and PostgreSQL, with the `warren` binary built beside it
//! (`cargo test --workspace` builds it; alone: `cargo build -p warren-cli`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn warren_binary() -> PathBuf {
    let w = Path::new(env!("CARGO_BIN_EXE_drills")).with_file_name("warren");
    assert!(
        w.exists(),
        "no {} (cargo build -p warren-cli first; cargo test --workspace builds it)",
        w.display()
    );
    w
}

/// Reads the drill's stderr until it names its namespace and database;
/// keeps draining it afterwards so the drill never blocks on the pipe.
fn namespace_and_database(child: &mut std::process::Child) -> (String, String) {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        // `  namespace drill_kill_1a2b3c4d, database warren_drill_kill`
        if let Some(rest) = line.trim().strip_prefix("namespace ") {
            let (ns, db) = rest.split_once(", database ").unwrap();
            let found = (ns.to_owned(), db.to_owned());
            std::thread::spawn(move || for _ in lines {});
            return found;
        }
    }
    panic!("the drill never named its namespace");
}

async fn queue_exists(conn: &lapin::Connection, queue: &str) -> bool {
    // A failed passive declare closes its channel: one channel per ask.
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    if found {
        let _ = ch.close(200, "bye".into()).await;
    }
    found
}

fn rabbitmqctl_names(what: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", what, "name"])
        .output()
        .unwrap();
    assert!(out.status.success(), "rabbitmqctl {what}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Processes whose environment names the namespace: the drill's `warren`s.
fn processes_of(ns: &str) -> Vec<String> {
    let needle = format!("WARREN_NAMESPACE={ns}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn an_interrupted_drill_removes_its_processes_namespace_and_database() {
    let warren = warren_binary();
    let out = std::env::temp_dir().join(format!(
        "warren-drills-interrupt-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let conn = transport::connect(AMQP_URL, "drills interrupt test")
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(DATABASE_URL).await.unwrap();
    for (sig, code) in [("-INT", 130), ("-TERM", 143)] {
        // A window long enough that the drill is still placing orders
        // when the signal comes.
        let child = Command::new(env!("CARGO_BIN_EXE_drills"))
            .args(["kill", "--orders", "100", "--window", "120", "--kills", "1"])
            .arg("--warren")
            .arg(&warren)
            .arg("--out")
            .arg(&out)
            .env("AMQP_URL", AMQP_URL)
            .env("DATABASE_URL", DATABASE_URL)
            .env_remove("WARREN_ORDERS_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (mut child, (ns, db)) = tokio::task::spawn_blocking(move || {
            let mut child = child;
            let found = namespace_and_database(&mut child);
            (child, found)
        })
        .await
        .unwrap();
        let work = format!("{ns}.orders");
        let started = Instant::now();
        while !queue_exists(&conn, &work).await {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{work} never appeared"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!processes_of(&ns).is_empty(), "no warren running for {ns}");
        let sent = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(
            Duration::from_secs(90),
            tokio::task::spawn_blocking(move || child.wait().unwrap()),
        )
        .await
        .expect("the drill did not exit within 90s of the signal")
        .unwrap();
        assert_eq!(status.code(), Some(code), "{sig}");
        let queues: Vec<String> = rabbitmqctl_names("list_queues")
            .into_iter()
            .filter(|q| q.starts_with(&ns))
            .collect();
        assert!(queues.is_empty(), "{sig}: left behind {queues:?}");
        let exchanges: Vec<String> = rabbitmqctl_names("list_exchanges")
            .into_iter()
            .filter(|x| x.starts_with(&ns))
            .collect();
        assert!(exchanges.is_empty(), "{sig}: left behind {exchanges:?}");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&db)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert_eq!(left, 0, "{sig}: database {db} left behind");
        assert_eq!(
            processes_of(&ns),
            Vec::<String>::new(),
            "{sig}: warren left running"
        );
    }
    transport::close(conn, "bye").await;
    let _ = std::fs::remove_dir_all(&out);
}
