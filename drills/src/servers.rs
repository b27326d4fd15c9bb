//! Restarting the real servers (only the outage drill does this: they are
//! shared, so each outage is short and both are checked up afterwards),
//! and the second PostgreSQL cluster the `cluster` drill gives the orders
//! service.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::leftovers::{Leftovers, ServerChange};

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
/// is started again even if something in between failed, and by the
/// interrupt clean-up if the drill is interrupted while it is down.
pub async fn restart_rabbit(down: Duration, leftovers: &Leftovers) -> anyhow::Result<()> {
    run("rabbitmqctl", &["-q", "stop_app"])?;
    // After the (blocking) stop: no interrupt is handled in between.
    leftovers.add_server(ServerChange::BrokerAppStopped);
    tokio::time::sleep(down).await;
    let started = run("rabbitmqctl", &["-q", "start_app"]);
    if started.is_err() {
        // One more try before giving up: leaving a shared broker stopped
        // is the worst outcome of this drill.
        run("rabbitmqctl", &["-q", "start_app"])?;
    }
    leftovers.remove_server(&ServerChange::BrokerAppStopped);
    wait_until("RabbitMQ", rabbit_up, Duration::from_secs(60)).await?;
    Ok(())
}

/// `rabbitmqctl start_app` (after an interrupted outage).
pub async fn start_rabbit_app() -> anyhow::Result<()> {
    run_async("rabbitmqctl", &["-q", "start_app"]).await?;
    wait_until("RabbitMQ", rabbit_up, Duration::from_secs(60)).await?;
    Ok(())
}

/// `pg_ctlcluster --skip-systemctl-redirect <version> main restart` (a
/// fast shutdown: every connection is cut) and waits for `pg_isready`.
pub async fn restart_postgres() -> anyhow::Result<()> {
    let version = pg_version()?;
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

/// The major version of the installed PostgreSQL (the one directory under
/// `/etc/postgresql`).
pub fn pg_version() -> anyhow::Result<String> {
    std::fs::read_dir("/etc/postgresql")
        .context("reading /etc/postgresql")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("no cluster under /etc/postgresql")
}

async fn run_async(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    // tokio's process: a blocking wait would hold one of the runtime's
    // few threads while the load runs beside it.
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
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

/// A second PostgreSQL server on this machine, for a database per service.
#[derive(Debug, Clone)]
pub struct PgCluster {
    /// Major version.
    pub version: String,
    /// Cluster name (`pg_lsclusters`).
    pub name: String,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub url: String,
    /// Whether this call started it (so the drill stops it again).
    pub started_here: bool,
}

/// Makes sure the PostgreSQL cluster `name` exists and runs on `port`:
/// `pg_createcluster` if missing (with the main cluster's `pg_hba.conf`,
/// so the same authentication applies), `pg_ctlcluster … start` if down.
pub async fn ensure_pg_cluster(name: &str, port: u16) -> anyhow::Result<PgCluster> {
    let version = pg_version()?;
    let dir = std::path::Path::new("/etc/postgresql")
        .join(&version)
        .join(name);
    let port_s = port.to_string();
    if !dir.exists() {
        run_async("pg_createcluster", &[&version, name, "--port", &port_s]).await?;
        let main_hba = std::path::Path::new("/etc/postgresql")
            .join(&version)
            .join("main/pg_hba.conf");
        std::fs::copy(&main_hba, dir.join("pg_hba.conf"))
            .with_context(|| format!("copying {}", main_hba.display()))?;
    }
    let up = || ok("pg_isready", &["-h", "127.0.0.1", "-p", &port_s, "-q"]);
    let mut started_here = false;
    if !up() {
        run_async(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", &version, name, "start"],
        )
        .await?;
        started_here = true;
    }
    let started = Instant::now();
    while !up() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("PostgreSQL {version}/{name} not accepting connections on {port} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(PgCluster {
        version,
        name: name.to_owned(),
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        started_here,
    })
}

/// `pg_ctlcluster --skip-systemctl-redirect <version> <name> stop`.
pub async fn stop_pg_cluster(version: &str, name: &str) -> anyhow::Result<()> {
    run_async(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", version, name, "stop"],
    )
    .await
}
