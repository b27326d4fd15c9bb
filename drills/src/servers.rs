//! Restarting the real servers (only the outage drill does this: they are
//! shared, so each outage is short and both are checked up afterwards).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether RabbitMQ answers (`rabbitmq-diagnostics -q ping`).
pub fn rabbit_up() -> bool {
    ok("rabbitmq-diagnostics", &["-q", "ping"])
}

/// Whether PostgreSQL accepts connections (`pg_isready -h 127.0.0.1`).
pub fn postgres_up() -> bool {
    ok("pg_isready", &["-h", "127.0.0.1", "-q"])
}

async fn wait_until(what: &str, up: fn() -> bool, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !up() {
        if started.elapsed() > within {
            bail!("{what} not up within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

/// `rabbitmqctl stop_app`, `down` of outage, `rabbitmqctl start_app`, and
/// waits for a ping. Returns when the broker answered again. The broker
/// is started again even if something in between failed.
pub async fn restart_rabbit(down: Duration) -> anyhow::Result<()> {
    run("rabbitmqctl", &["-q", "stop_app"])?;
    tokio::time::sleep(down).await;
    let started = run("rabbitmqctl", &["-q", "start_app"]);
    if started.is_err() {
        // One more try before giving up: leaving a shared broker stopped
        // is the worst outcome of this drill.
        run("rabbitmqctl", &["-q", "start_app"])?;
    }
    wait_until("RabbitMQ", rabbit_up, Duration::from_secs(60)).await?;
    Ok(())
}

/// `pg_ctlcluster --skip-systemctl-redirect <version> main restart` (a
/// fast shutdown: every connection is cut) and waits for `pg_isready`.
pub async fn restart_postgres() -> anyhow::Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")
        .context("reading /etc/postgresql")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("no cluster under /etc/postgresql")?;
    let result = run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "restart"],
    );
    if result.is_err() && !postgres_up() {
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", &version, "main", "start"],
        )?;
    }
    result?;
    wait_until("PostgreSQL", postgres_up, Duration::from_secs(60)).await?;
    Ok(())
}
