//! The `tls` drill: warren over `amqps://` against RabbitMQ's own TLS
//! listener, trusting a private CA through the URL alone
//! (`?cacertfile=`). The test suite covers the same through a TLS proxy of
//! its own; this is the real listener, Erlang's TLS on the other side.
//!
//! The shared broker gets the listener for the drill's length only: it is
//! started and stopped on the running node with `rabbitmqctl eval`
//! (`rabbit_networking:start_ssl_listener/3`, `stop_tcp_listener/1`), on
//! 127.0.0.1:5671, with no restart and no configuration file changed. The
//! CA and the `localhost` certificate are made by `openssl` in a temporary
//! directory, removed at the end. The drill refuses to start if something
//! already listens on the port, so it never stops a listener it did not
//! start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::process::Command as AsyncCommand;
use transport::{self, ConnectError};

use crate::cluster::Servers;
use crate::leftovers::ServerChange;

/// Where the drill's listener listens: RabbitMQ's usual TLS port, loopback
/// only.
const HOST: &str = "127.0.0.1";
/// RabbitMQ's usual TLS port.
pub const PORT: u16 = 5671;
/// Longest `warren demo` run.
const DEMO_WITHIN: Duration = Duration::from_secs(300);

/// What the drill saw.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Drill name (`tls`).
    pub drill: String,
    /// The listener started and stopped, `127.0.0.1:5671`.
    pub listener: String,
    /// `openssl version` of the certificates' maker.
    pub openssl: String,
    /// The error without `cacertfile` (it must be the untrusted-certificate one).
    pub untrusted_error: Option<String>,
    /// Our connection as the broker listed it: `ssl`, `ssl_protocol`, `ssl_cipher`.
    pub broker_saw: Option<String>,
    /// `warren demo` over amqps: its exit code.
    pub demo_exit: Option<i32>,
    /// `warren demo` over amqps: seconds.
    pub demo_s: f64,
    /// After the drill: nothing on the TLS port, the plain URL connects.
    pub left_as_found: bool,
    /// What went wrong; empty when the drill passed.
    pub failures: Vec<String>,
}

impl Figures {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// One line per check.
pub fn render(f: &Figures) -> String {
    let mut out = format!(
        "drill tls: listener {} (certificates by {}), warren demo over amqps exit {:?} in {:.1}s\n",
        f.listener, f.openssl, f.demo_exit, f.demo_s
    );
    out.push_str(&format!(
        "  without cacertfile: {}\n",
        f.untrusted_error.as_deref().unwrap_or("(connected: wrong)")
    ));
    out.push_str(&format!(
        "  broker lists our connection as: {}\n",
        f.broker_saw.as_deref().unwrap_or("(not found)")
    ));
    out.push_str(&format!(
        "  listener stopped and plain port fine afterwards: {}\n",
        f.left_as_found
    ));
    for x in &f.failures {
        out.push_str(&format!("  FAILED: {x}\n"));
    }
    out
}

/// Runs the drill. The listener, once started, is stopped whatever
/// happens in between; the certificates are removed unless `keep`.
pub async fn run(servers: &Servers, keep: bool) -> anyhow::Result<Figures> {
    let addr = format!("{HOST}:{PORT}");
    if port_open(&addr) {
        bail!("something already listens on {addr}; the tls drill only stops listeners it started");
    }
    let dir = std::env::temp_dir().join(format!(
        "warren-tls-drill-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = async {
        let pki = make_certificates(&dir)?;
        if let Err(e) = start_listener(&pki) {
            // Half started (an answer we did not expect)? Leave no listener.
            if port_open(&addr) {
                let _ = stop_listener();
            }
            return Err(e);
        }
        // Started (a blocking call: no interrupt is handled before this
        // line runs), so an interrupt from here on stops it.
        servers.leftovers.add_server(ServerChange::TlsListener);
        let exercised = exercise(servers, &pki).await;
        let stopped = stop_listener();
        servers.leftovers.remove_server(&ServerChange::TlsListener);
        let mut f = exercised?;
        if let Err(e) = stopped {
            f.failures.push(format!("stopping the listener: {e:#}"));
        }
        f.openssl = pki.openssl;
        Ok::<_, anyhow::Error>(f)
    }
    .await;
    let mut f = result?;
    let plain_ok = match transport::connect(&servers.amqp_url, "warren tls drill after").await {
        Ok(conn) => {
            transport::close(conn, "bye").await;
            true
        }
        Err(_) => false,
    };
    f.left_as_found = !port_open(&addr) && plain_ok;
    if !f.left_as_found {
        f.failures.push(format!(
            "broker not as found: {addr} open {}, plain URL connects {plain_ok}",
            port_open(&addr)
        ));
    }
    if keep {
        println!("   certificates kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(f)
}

/// The drill's CA and server certificate, as files the broker can read.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    openssl: String,
}

fn make_certificates(dir: &Path) -> anyhow::Result<Pki> {
    // The paths go into an Erlang string literal below.
    let shown = dir.to_string_lossy();
    if !shown
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
    {
        bail!("temporary directory {shown:?} has characters the drill does not quote; set TMPDIR");
    }
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints = CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = DNS:localhost\n",
    )?;
    // No argument has a space: each command line reads as typed.
    let openssl = |line: &str| run_in(dir, "openssl", &line.split(' ').collect::<Vec<_>>());
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -sha256 -days 1 -subj /CN=warren-tls-drill-CA \
         -keyout ca.key -out ca.pem \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    )?;
    openssl(
        "req -newkey rsa:2048 -nodes -sha256 -subj /CN=localhost \
         -keyout server.key -out server.csr",
    )?;
    openssl(
        "x509 -req -sha256 -days 1 -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
         -out server.pem -extfile server.ext",
    )?;
    // The broker runs as its own user: the directory and certificates are
    // world-readable, the key only to the broker's group (openssl wrote it
    // 0600); where that group does not exist, to everyone: it is a
    // throwaway key in a directory removed at the end.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let key = dir.join("server.key");
    let mode = if run_in(dir, "chgrp", &["rabbitmq", "server.key"]).is_ok() {
        0o640
    } else {
        0o644
    };
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode))?;
    Ok(Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key,
        // "OpenSSL 3.0.19 27 Jan 2026 (Library: …)": the first part.
        openssl: run_in(dir, "openssl", &["version"])?
            .split(" (")
            .next()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// `rabbitmqctl eval`: the broker's answer, which must be `ok`.
fn eval(expr: &str) -> anyhow::Result<()> {
    let answer = run_in(Path::new("."), "rabbitmqctl", &["-q", "eval", expr])?;
    if answer != "ok" {
        bail!("rabbitmqctl eval answered {answer}");
    }
    Ok(())
}

fn start_listener(pki: &Pki) -> anyhow::Result<()> {
    let (ca, cert, key) = (pki.ca.display(), pki.cert.display(), pki.key.display());
    // The server asks nothing of the client (no client certificates);
    // fix_ssl_options applies RabbitMQ's own defaults, as for a configured
    // listener. The ssl application is a dependency of `rabbit` (3.10), so
    // it is running already and ensure_all_started changes nothing; it is
    // there for a node where it is not.
    eval(&format!(
        "{{ok, _}} = application:ensure_all_started(ssl), \
         rabbit_networking:start_ssl_listener({{\"{HOST}\", {PORT}}}, \
         rabbit_networking:fix_ssl_options([{{cacertfile, \"{ca}\"}}, \
         {{certfile, \"{cert}\"}}, {{keyfile, \"{key}\"}}, \
         {{verify, verify_none}}, {{fail_if_no_peer_cert, false}}]), 1)."
    ))
    .context("starting the TLS listener")
}

/// Stops the drill's TLS listener (also on an interrupt, see
/// [`crate::leftovers`]).
pub(crate) fn stop_listener() -> anyhow::Result<()> {
    eval(&format!(
        "rabbit_networking:stop_tcp_listener({{\"{HOST}\", {PORT}}})."
    ))
    .context("stopping the TLS listener")
}

/// The checks, with the listener up.
async fn exercise(servers: &Servers, pki: &Pki) -> anyhow::Result<Figures> {
    let mut f = Figures {
        drill: "tls".into(),
        listener: format!("{HOST}:{PORT}"),
        openssl: String::new(),
        untrusted_error: None,
        broker_saw: None,
        demo_exit: None,
        demo_s: 0.0,
        left_as_found: false,
        failures: Vec::new(),
    };
    let mut plain = url::Url::parse(&servers.amqp_url).context("AMQP URL")?;
    plain.set_query(None);
    let mut untrusted = plain.clone();
    untrusted
        .set_scheme("amqps")
        .map_err(|()| anyhow::anyhow!("cannot make an amqps URL of the AMQP URL"))?;
    untrusted.set_host(Some("localhost"))?;
    untrusted
        .set_port(Some(PORT))
        .map_err(|()| anyhow::anyhow!("cannot set the port of the AMQP URL"))?;
    let mut trusted = untrusted.clone();
    trusted
        .query_pairs_mut()
        .append_pair("cacertfile", &pki.ca.to_string_lossy());

    // The private CA is in no trust store: refused, and said so.
    match transport::connect(untrusted.as_str(), "warren tls drill").await {
        Err(e @ ConnectError::Untrusted { .. }) => f.untrusted_error = Some(e.to_string()),
        Err(e) => f.failures.push(format!(
            "without cacertfile: expected an untrusted certificate, got: {e}"
        )),
        Ok(c) => {
            let _ = c.close(200, "bye".into()).await;
            f.failures
                .push("without cacertfile: connected to a certificate of an unknown CA".into());
        }
    }

    // With it: connected, and the broker lists the connection as TLS.
    match transport::connect(trusted.as_str(), "warren tls drill").await {
        Ok(conn) => {
            let listed = run_in(
                Path::new("."),
                "rabbitmqctl",
                &[
                    "-q",
                    "list_connections",
                    "--no-table-headers",
                    "port",
                    "ssl",
                    "ssl_protocol",
                    "ssl_cipher",
                ],
            )?;
            let ours: Vec<&str> = listed
                .lines()
                .filter(|l| l.split('\t').next() == Some(&PORT.to_string()))
                .collect();
            match ours.as_slice() {
                [line] => {
                    let cols: Vec<&str> = line.split('\t').collect();
                    if cols.get(1) != Some(&"true") {
                        f.failures
                            .push(format!("broker lists it without TLS: {line}"));
                    }
                    f.broker_saw = Some(cols[1..].join(" "));
                }
                other => f.failures.push(format!(
                    "expected our one connection on port {PORT}, the broker lists {other:?}"
                )),
            }
            transport::close(conn, "bye").await;
        }
        Err(e) => f.failures.push(format!("with cacertfile: {e}")),
    }

    // The whole system over it: every relay and consumer of `warren demo`.
    let (exit, secs) = demo(servers, trusted.as_str()).await?;
    f.demo_exit = exit;
    f.demo_s = secs;
    if exit != Some(0) {
        f.failures.push(format!(
            "warren demo over amqps exited {exit:?} (log: {})",
            servers.log_dir.join("tls-demo.log").display()
        ));
    }
    Ok(f)
}

/// `warren demo` on the drill's database, its output in `tls-demo.log`;
/// the demo database is dropped afterwards.
async fn demo(servers: &Servers, amqp_url: &str) -> anyhow::Result<(Option<i32>, f64)> {
    let mut db = url::Url::parse(&servers.database_url).context("database URL")?;
    db.set_path("/warren_drill_tls");
    std::fs::create_dir_all(&servers.log_dir)?;
    let log = std::fs::File::create(servers.log_dir.join("tls-demo.log"))?;
    let started = Instant::now();
    let mut child = AsyncCommand::new(&servers.warren)
        .arg("demo")
        .env("AMQP_URL", amqp_url)
        .env("DATABASE_URL", db.as_str())
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting warren demo")?;
    let exit = match tokio::time::timeout(DEMO_WITHIN, child.wait()).await {
        Ok(status) => status?.code(),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let secs = started.elapsed().as_secs_f64();
    // The demo keeps its database for inspection; the drill does not need it.
    db.set_path("/postgres");
    if let Ok(admin) = sqlx::PgPool::connect(db.as_str()).await {
        let _ = sqlx::query("DROP DATABASE IF EXISTS warren_drill_tls_demo WITH (FORCE)")
            .execute(&admin)
            .await;
        admin.close().await;
    }
    Ok((exit, secs))
}

fn port_open(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
        .is_some()
}

/// Runs a command in `dir`; its trimmed stdout, or an error with its stderr.
fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
