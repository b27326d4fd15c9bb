//! The system under drill: a dedicated database and namespace, created
//! fresh for each drill, and `warren run` processes started from the
//! release binary, killed with SIGKILL and watched through `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use consumers::RetryPolicy;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::{Child, Command};

use crate::leftovers::Leftovers;

/// Services with a work queue (customers consumes nothing).
pub const CONSUMING: [&str; 4] = ["orders", "inventory", "payments", "shipping"];
/// Every schema with an outbox.
pub const SCHEMAS: [&str; 5] = ["customers", "orders", "inventory", "payments", "shipping"];

/// Where the servers are and where the binary is.
#[derive(Debug, Clone)]
pub struct Servers {
    /// The `warren` release binary.
    pub warren: PathBuf,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// A PostgreSQL URL; its path is replaced by each drill's database.
    pub database_url: String,
    /// Another PostgreSQL server for the orders service's database (path
    /// replaced likewise), to drill a database per service; `None`: orders
    /// shares `database_url`'s.
    pub orders_database_url: Option<String>,
    /// Logs of the warren processes go here.
    pub log_dir: PathBuf,
    /// What is running or created, for the clean-up on an interrupt.
    pub leftovers: Leftovers,
}

/// One drill's private database and namespace.
pub struct Env {
    /// Short name of the drill (`kill`, `outage`, …).
    pub name: String,
    /// Servers and binary.
    pub servers: Servers,
    /// `postgres://…/warren_drill_<name>`.
    pub database_url: String,
    /// `drill_<name>_<random>`.
    pub namespace: String,
    /// A pool on the drill's database, for seeding checks and the final audit.
    pub pool: PgPool,
    /// The orders service's own database (`WARREN_ORDERS_DATABASE_URL`)
    /// and a pool on it, when it has one.
    pub orders_database: Option<(String, PgPool)>,
}

/// `url` with the database `db`, and the same server's `postgres`
/// database for dropping it.
fn drill_urls(url: &str, db: &str) -> anyhow::Result<(url::Url, url::Url)> {
    let mut admin = url::Url::parse(url).context("database URL")?;
    admin.set_path("/postgres");
    let mut own = admin.clone();
    own.set_path(&format!("/{db}"));
    Ok((own, admin))
}

async fn drop_database(admin_url: &url::Url, db: &str) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url.as_str())
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(())
}

/// What removing a drill's database and namespace needs, apart from the
/// drill itself: what [`Env::destroy`] runs, and what an interrupt runs
/// when the drill never gets that far (see [`crate::leftovers`]).
#[derive(Debug, Clone)]
pub struct Teardown {
    /// RabbitMQ URL (list) the namespace lives on.
    pub amqp_url: String,
    /// The drill's namespace.
    pub namespace: String,
    /// `postgres://…/warren_drill_<name>`.
    pub database_url: String,
    /// The orders service's own database, when it has one.
    pub orders_database_url: Option<String>,
}

fn db_name(url: &str) -> String {
    url::Url::parse(url)
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .unwrap_or_default()
}

impl Teardown {
    /// The databases it drops, for messages.
    pub fn databases(&self) -> String {
        let mut dbs = vec![db_name(&self.database_url)];
        if let Some(u) = &self.orders_database_url {
            dbs.push(db_name(u));
        }
        format!("database(s) {}", dbs.join(", "))
    }

    /// Deletes the namespace's queues and exchange, then drops the
    /// databases (`WITH (FORCE)`: connections still open are cut).
    pub async fn run(&self) -> anyhow::Result<()> {
        let conn = transport::connect(&self.amqp_url, "warren drills").await?;
        let ch = conn.create_channel().await?;
        let topo = transport::Topology::new(self.namespace.clone());
        for s in CONSUMING {
            topo.delete_service(&ch, s, &Env::retry_delays()).await?;
        }
        topo.delete_exchange(&ch).await?;
        transport::close(conn, "drill cleaned up").await;
        if let Some(url) = &self.orders_database_url {
            let db = db_name(url);
            let (_, admin) = drill_urls(url, &db)?;
            drop_database(&admin, &db).await?;
        }
        let db = db_name(&self.database_url);
        let (_, admin) = drill_urls(&self.database_url, &db)?;
        drop_database(&admin, &db).await
    }
}

impl Env {
    /// Drops and recreates the drill's database, migrates it with
    /// `warren migrate`, and picks a fresh namespace.
    pub async fn create(servers: &Servers, name: &str) -> anyhow::Result<Env> {
        let db = format!("warren_drill_{name}");
        let mut admin_url = url::Url::parse(&servers.database_url).context("database URL")?;
        admin_url.set_path("/postgres");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url.as_str())
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let mut url = admin_url.clone();
        url.set_path(&format!("/{db}"));
        let orders_url = match &servers.orders_database_url {
            // A name of its own, so that the other server may also be
            // this one.
            Some(other) => {
                let (own, admin) = drill_urls(other, &format!("{db}_orders"))?;
                drop_database(&admin, &format!("{db}_orders")).await?;
                Some(own.to_string())
            }
            None => None,
        };
        let namespace = format!(
            "drill_{name}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        // Registered before anything exists, so that an interrupt from
        // here on removes whatever part of it was made.
        servers.leftovers.add_env(Teardown {
            amqp_url: servers.amqp_url.clone(),
            namespace: namespace.clone(),
            database_url: url.to_string(),
            orders_database_url: orders_url.clone(),
        });
        // Printed so that an operator (and the interrupt test) can find
        // them on the broker and the server.
        eprintln!("  namespace {namespace}, database {db}");
        let env = Env {
            name: name.to_owned(),
            servers: servers.clone(),
            database_url: url.to_string(),
            namespace,
            // Placeholders until the databases exist; replaced below.
            pool: PgPoolOptions::new().connect_lazy(url.as_str())?,
            orders_database: match &orders_url {
                Some(u) => Some((u.clone(), PgPoolOptions::new().connect_lazy(u)?)),
                None => None,
            },
        };
        let status = Command::new(&servers.warren)
            .arg("migrate")
            .envs(env.warren_env())
            .env("RUST_LOG", "warn,sqlx=error")
            .stdout(Stdio::null())
            .status()
            .await
            .context("running warren migrate")?;
        if !status.success() {
            bail!("warren migrate failed for {db}");
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url.as_str())
            .await?;
        let orders_database = match orders_url {
            Some(u) => {
                let p = PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(&u)
                    .await?;
                Some((u, p))
            }
            None => None,
        };
        Ok(Env {
            pool,
            orders_database,
            ..env
        })
    }

    /// The pool on the orders service's database.
    pub fn orders(&self) -> &PgPool {
        self.orders_database.as_ref().map_or(&self.pool, |(_, p)| p)
    }

    fn warren_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("AMQP_URL", self.servers.amqp_url.clone()),
            ("DATABASE_URL", self.database_url.clone()),
            ("WARREN_NAMESPACE", self.namespace.clone()),
            // The drill's queues go by themselves an hour after the last
            // `warren run` of an interrupted or failed drill (kept that
            // long for a look); a passed drill removes them at once.
            ("WARREN_QUEUE_EXPIRES_SECS", "3600".into()),
            ("RUST_LOG", "info".into()),
        ];
        if let Some((url, _)) = &self.orders_database {
            env.push(("WARREN_ORDERS_DATABASE_URL", url.clone()));
        }
        env
    }

    /// Starts `warren run` (every service) serving HTTP on `port`.
    pub async fn start(&self, label: &str, port: u16) -> anyhow::Result<Warren> {
        Warren::spawn(self, label, port, &[]).await
    }

    /// The retry queue delays `warren run` declares with its defaults.
    pub fn retry_delays() -> Vec<Duration> {
        RetryPolicy::default().delays()
    }

    /// Ready-message counts of (work + retry queues, dead-letter queues)
    /// per consuming service.
    pub async fn queue_depths(&self) -> anyhow::Result<Vec<(String, u32, u32)>> {
        let conn = transport::connect(&self.servers.amqp_url, "warren drills").await?;
        let ch = conn.create_channel().await?;
        let topo = transport::Topology::new(self.namespace.clone());
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        for s in CONSUMING {
            let mut work = ch
                .queue_declare(
                    topo.queue(s).as_str().into(),
                    passive,
                    FieldTable::default(),
                )
                .await?
                .message_count();
            for d in Self::retry_delays() {
                work += ch
                    .queue_declare(
                        topo.retry_queue(s, d).into(),
                        passive,
                        FieldTable::default(),
                    )
                    .await?
                    .message_count();
            }
            let dlq = ch
                .queue_declare(topo.dlq(s).as_str().into(), passive, FieldTable::default())
                .await?
                .message_count();
            out.push((s.to_owned(), work, dlq));
        }
        transport::close(conn, "depths read").await;
        Ok(out)
    }

    /// Deletes the namespace's queues and exchanges and the database.
    /// Called only after a drill passed: a failed one is left for a look
    /// (see [`Env::keep`]).
    pub async fn destroy(self) -> anyhow::Result<()> {
        self.pool.close().await;
        if let Some((_, pool)) = &self.orders_database {
            pool.close().await;
        }
        self.teardown().run().await?;
        self.servers.leftovers.remove_env(&self.namespace);
        Ok(())
    }

    /// Leaves the database and namespace in place on purpose: an
    /// interrupt later on does not remove them either.
    pub fn keep(&self) {
        self.servers.leftovers.remove_env(&self.namespace);
    }

    fn teardown(&self) -> Teardown {
        Teardown {
            amqp_url: self.servers.amqp_url.clone(),
            namespace: self.namespace.clone(),
            database_url: self.database_url.clone(),
            orders_database_url: self.orders_database.as_ref().map(|(u, _)| u.clone()),
        }
    }
}

/// A running `warren run` process.
pub struct Warren {
    /// Name in logs and figures (`a`, `b`, …).
    pub label: String,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// HTTP port.
    pub port: u16,
    child: Child,
    /// OS process id.
    pub pid: u32,
    /// When it was spawned.
    pub started: Instant,
    /// Where the pid is registered while the child is ours to stop.
    leftovers: Leftovers,
}

impl Drop for Warren {
    fn drop(&mut self) {
        // `kill_on_drop` takes the process down with the handle: nothing
        // is left for an interrupt to stop.
        self.leftovers.remove_pid(self.pid);
    }
}

impl Warren {
    /// Spawns `warren run` with `extra` arguments, logging to
    /// `<log_dir>/<drill>-<label>.log`, and waits until `/health` answers.
    pub async fn spawn(
        env: &Env,
        label: &str,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Warren> {
        let log = log_file(&env.servers.log_dir, &format!("{}-{label}.log", env.name))?;
        let child = Command::new(&env.servers.warren)
            .arg("run")
            .args(extra)
            .envs(env.warren_env())
            .env("WARREN_HTTP", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning warren run")?;
        let pid = child.id().context("warren exited at once")?;
        env.servers.leftovers.add_pid(pid);
        let mut w = Warren {
            label: label.to_owned(),
            base: format!("http://127.0.0.1:{port}"),
            port,
            child,
            pid,
            started: Instant::now(),
            leftovers: env.servers.leftovers.clone(),
        };
        w.wait_healthy(Duration::from_secs(30)).await?;
        Ok(w)
    }

    /// Waits until `/health` answers 200, failing if the process dies.
    pub async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<Duration> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "warren {} exited with {status} before it was healthy",
                    self.label
                );
            }
            let ok = client
                .get(format!("{}/health", self.base))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("warren {} not healthy within {within:?}", self.label);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, no chance to drain, then reap.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        // Reaped: the pid may be reused by anything from now on.
        self.leftovers.remove_pid(self.pid);
        Ok(())
    }

    /// SIGTERM (a clean stop) and wait for the exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(r) => {
                r?;
                self.leftovers.remove_pid(self.pid);
            }
            Err(_) => self.kill9().await?,
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// (current RSS, peak RSS) in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Services whose relay lock this process holds, from `/metrics`.
    pub async fn active_relays(&self) -> usize {
        let Ok(resp) = reqwest::Client::new()
            .get(format!("{}/metrics", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        else {
            return 0;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("warren_relay_active{") && l.ends_with(" 1"))
            .count()
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?)
}
