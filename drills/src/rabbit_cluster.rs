//! The three-node RabbitMQ cluster of `scripts/rabbitmq-cluster`
//! (`warren1..3@localhost`, AMQP on 127.0.0.1:5681–5683), driven for the
//! `cluster` drill: started or reused, one node killed or stopped and
//! started again, and asked through `rabbitmqctl -n <node>` where each of
//! a namespace's quorum queues has its leader and which members are online.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::Command;

/// Nodes of the cluster, numbered as the script numbers them.
pub const NODES: [u8; 3] = [1, 2, 3];

/// The Erlang node name of node `n`.
pub fn node(n: u8) -> String {
    format!("warren{n}@localhost")
}

/// `scripts/rabbitmq-cluster`: under the working directory (where
/// `scripts/drills` runs the binary), else in the source tree this binary
/// was built from.
pub fn script() -> anyhow::Result<PathBuf> {
    let here = Path::new("scripts/rabbitmq-cluster");
    if here.exists() {
        return Ok(here.canonicalize()?);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster");
    if built.exists() {
        return Ok(built);
    }
    bail!("scripts/rabbitmq-cluster not found (run the drills from the repository's root)")
}

async fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn run_script(script: &Path, args: &[&str]) -> anyhow::Result<String> {
    output(
        Command::new(script).args(args),
        &format!("rabbitmq-cluster {}", args.join(" ")),
    )
    .await
}

async fn ctl(n: u8, args: &[&str]) -> anyhow::Result<String> {
    output(
        Command::new("rabbitmqctl")
            .args(["-n", &node(n), "-q", "--timeout", "10"])
            .args(args),
        &format!("rabbitmqctl -n {} {}", node(n), args.join(" ")),
    )
    .await
}

/// Whether node `n` answers a ping.
pub async fn up(n: u8) -> bool {
    ctl(n, &["ping"]).await.is_ok()
}

/// The cluster for the drill's length.
#[derive(Debug, Clone)]
pub struct RabbitCluster {
    /// The script.
    pub script: PathBuf,
    /// The comma-separated `AMQP_URL` of the three nodes.
    pub urls: String,
    /// Whether this drill started it (otherwise it was up already).
    pub started_here: bool,
}

/// Starts the cluster, or reuses it when a node answers (nodes down, left
/// by an earlier run, are started again); waits until all three run.
pub async fn ensure() -> anyhow::Result<RabbitCluster> {
    let script = script()?;
    let mut answering = Vec::new();
    for n in NODES {
        if up(n).await {
            answering.push(n);
        }
    }
    let started_here = answering.is_empty();
    if started_here {
        // Nothing answers: whatever the base directory holds is stale.
        run_script(&script, &["stop"]).await?;
        run_script(&script, &["start"]).await?;
    } else {
        for n in NODES.iter().filter(|n| !answering.contains(n)) {
            run_script(&script, &["restart", &n.to_string()]).await?;
        }
    }
    let started = Instant::now();
    while running_nodes().await.map(|r| r.len()).unwrap_or(0) < NODES.len() {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the three RabbitMQ nodes are not all running after 120s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let urls = run_script(&script, &["urls"]).await?.trim().to_owned();
    Ok(RabbitCluster {
        script,
        urls,
        started_here,
    })
}

/// `scripts/rabbitmq-cluster stop`: every node stopped, data removed.
pub async fn stop_all(script: &Path) -> anyhow::Result<()> {
    run_script(script, &["stop"]).await.map(|_| ())
}

/// The node that answered last: asked first next time, so that while a
/// node is down every question does not wait for it to refuse first.
/// Process-wide like the cluster it describes; a hint, never a fact.
static LAST_ANSWERED: AtomicU8 = AtomicU8::new(1);

/// Asks the first node that answers; `rabbitmqctl` speaks for the whole
/// cluster from any of its nodes.
async fn ctl_any(args: &[&str]) -> anyhow::Result<String> {
    let first = LAST_ANSWERED.load(Ordering::Relaxed);
    let order = std::iter::once(first).chain(NODES.into_iter().filter(|n| *n != first));
    let mut last = None;
    for n in order {
        match ctl(n, args).await {
            Ok(out) => {
                LAST_ANSWERED.store(n, Ordering::Relaxed);
                return Ok(out);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no node of the cluster answers")))
}

/// The nodes running, as the cluster sees them.
pub async fn running_nodes() -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(&ctl_any(&["cluster_status", "--formatter", "json"]).await?)?;
    Ok(strings(&v["running_nodes"]))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// One quorum queue's replicas.
#[derive(Debug, Clone, Default)]
pub struct QueueState {
    /// Queue name.
    pub name: String,
    /// Leader node (empty while none is elected).
    pub leader: String,
    /// Member nodes.
    pub members: Vec<String>,
    /// Members online.
    pub online: Vec<String>,
}

/// The quorum queues whose names start with `<namespace>.`.
pub async fn queues(namespace: &str) -> anyhow::Result<Vec<QueueState>> {
    let out = ctl_any(&[
        "list_queues",
        "name",
        "type",
        "leader",
        "members",
        "online",
        "--formatter",
        "json",
    ])
    .await?;
    let v: serde_json::Value = serde_json::from_str(&out).context("list_queues output")?;
    let prefix = format!("{namespace}.");
    Ok(v.as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|q| q["type"] == "quorum")
        .filter_map(|q| {
            let name = q["name"].as_str()?;
            name.starts_with(&prefix).then(|| QueueState {
                name: name.to_owned(),
                leader: q["leader"].as_str().unwrap_or_default().to_owned(),
                members: strings(&q["members"]),
                online: strings(&q["online"]),
            })
        })
        .collect())
}

/// How many of the namespace's work queues (`<ns>.<service>` for each
/// consuming service) each node leads.
pub async fn work_queue_leaders(namespace: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let work: Vec<String> = crate::cluster::CONSUMING
        .iter()
        .map(|s| format!("{namespace}.{s}"))
        .collect();
    let mut by_node = BTreeMap::new();
    for q in queues(namespace).await? {
        if work.contains(&q.name) && !q.leader.is_empty() {
            *by_node.entry(q.leader).or_insert(0) += 1;
        }
    }
    Ok(by_node)
}

/// Node number of an Erlang node name of this cluster.
pub fn number(node_name: &str) -> Option<u8> {
    NODES.into_iter().find(|n| node(*n) == node_name)
}

/// `kill -9` of node `n` (its data stays).
pub async fn kill(c: &RabbitCluster, n: u8) -> anyhow::Result<()> {
    run_script(&c.script, &["kill", &n.to_string()])
        .await
        .map(|_| ())
}

/// A clean stop of node `n` (its data stays).
pub async fn stop(c: &RabbitCluster, n: u8) -> anyhow::Result<()> {
    run_script(&c.script, &["stop", &n.to_string()])
        .await
        .map(|_| ())
}

/// Starts node `n` again; returns once it booted.
pub async fn restart(c: &RabbitCluster, n: u8) -> anyhow::Result<()> {
    run_script(&c.script, &["restart", &n.to_string()])
        .await
        .map(|_| ())
}

/// Waits until no queue of the namespace has its leader on node `n` or
/// none, i.e. the others elected new leaders; returns the time it took.
pub async fn wait_leaders_off(
    n: u8,
    namespace: &str,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let gone = node(n);
    loop {
        if let Ok(qs) = queues(namespace).await {
            if !qs.is_empty() && qs.iter().all(|q| !q.leader.is_empty() && q.leader != gone) {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > within {
            bail!("queues of {namespace} still led by {gone} (or by none) after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until node `n` runs in the cluster and every quorum queue of
/// the namespace has all its members online again; returns the time it
/// took.
pub async fn wait_rejoined(n: u8, namespace: &str, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let back = node(n);
    loop {
        let running = running_nodes().await.unwrap_or_default();
        if running.contains(&back) {
            if let Ok(qs) = queues(namespace).await {
                if !qs.is_empty()
                    && qs
                        .iter()
                        .all(|q| !q.leader.is_empty() && q.online.len() == q.members.len())
                {
                    return Ok(started.elapsed());
                }
            }
        }
        if started.elapsed() > within {
            bail!(
                "{back} not back with every member of {namespace}'s queues online after {within:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until stopping node `n` would leave every quorum queue its
/// majority (`rabbitmq-queues check_if_node_is_quorum_critical`), the
/// check an operator runs before each step of a rolling restart.
pub async fn wait_not_quorum_critical(n: u8, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let ok = Command::new("rabbitmq-queues")
            .args(["-n", &node(n), "-q", "check_if_node_is_quorum_critical"])
            .output()
            .await
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("{} still quorum-critical after {within:?}", node(n));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
