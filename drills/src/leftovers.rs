//! What the drills have running or created at any moment — `warren run`
//! processes, each drill's database and namespace, servers the `cluster`
//! drill started — so that a SIGINT or SIGTERM can stop and remove them
//! before the binary exits, instead of leaving a namespace to expire an
//! hour later and a database for ever.
//!
//! Each thing registers itself when it comes into being and leaves the
//! ledger when the drill tidies it up (or keeps it on purpose for a look):
//! what is left at an interrupt is exactly what the drill would have
//! removed had it finished.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cluster::Teardown;

/// A change a drill made to the servers for its length, undone on an
/// interrupt as the drill would have undone it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerChange {
    /// The three-node RabbitMQ cluster of `scripts/rabbitmq-cluster`
    /// (the script's path), started: stopped and its data removed.
    RabbitCluster(PathBuf),
    /// The `tls` drill's listener on the running broker: stopped.
    TlsListener,
    /// The local broker's application stopped by the `outage` drill:
    /// started again.
    BrokerAppStopped,
    /// A PostgreSQL cluster (`pg_ctlcluster` version and name), started:
    /// stopped.
    Postgres {
        /// Major version, the directory under `/etc/postgresql`.
        version: String,
        /// Cluster name.
        name: String,
    },
}

#[derive(Debug, Default)]
struct Ledger {
    /// Process ids of `warren` children not yet reaped nor dropped.
    pids: BTreeSet<u32>,
    /// Databases and namespaces of drills under way.
    envs: Vec<Teardown>,
    /// Changes to undo, in the order they were made.
    servers: Vec<ServerChange>,
}

/// The shared ledger; cheap to clone, every clone is the same ledger.
#[derive(Debug, Clone, Default)]
pub struct Leftovers(Arc<Mutex<Ledger>>);

impl Leftovers {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Nothing panics while holding the lock (inserts and removes
        // only); a poisoned ledger is still the truth.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `warren` child was spawned.
    pub fn add_pid(&self, pid: u32) {
        self.ledger().pids.insert(pid);
    }

    /// A `warren` child was reaped or handed to `kill_on_drop`.
    pub fn remove_pid(&self, pid: u32) {
        self.ledger().pids.remove(&pid);
    }

    /// A drill's database and namespace exist (or are about to).
    pub fn add_env(&self, t: Teardown) {
        self.ledger().envs.push(t);
    }

    /// A drill's database and namespace were removed, or are kept.
    pub fn remove_env(&self, namespace: &str) {
        self.ledger().envs.retain(|t| t.namespace != namespace);
    }

    /// A drill changed a server.
    pub fn add_server(&self, s: ServerChange) {
        let mut l = self.ledger();
        if !l.servers.contains(&s) {
            l.servers.push(s);
        }
    }

    /// A drill undid its change, or keeps it on purpose.
    pub fn remove_server(&self, s: &ServerChange) {
        self.ledger().servers.retain(|x| x != s);
    }

    /// What the ledger holds, one line each (for an operator when a
    /// drill broke off and left them).
    pub fn describe(&self) -> Vec<String> {
        let l = self.ledger();
        let mut out: Vec<String> = l
            .envs
            .iter()
            .map(|t| format!("namespace {} and {}", t.namespace, t.databases()))
            .collect();
        out.extend(l.servers.iter().map(|s| format!("{s:?}")));
        out
    }

    /// Stops every registered process (SIGTERM, then SIGKILL after
    /// `grace`), removes every registered database and namespace, undoes
    /// every registered change to the servers. Returns what it did, one line each, and
    /// goes on past a failure (reported in its line): an interrupt is no
    /// time to stop half way.
    pub async fn clean_up(&self, grace: Duration) -> Vec<String> {
        let (pids, envs, servers) = {
            let l = self.ledger();
            (l.pids.clone(), l.envs.clone(), l.servers.clone())
        };
        let mut out = Vec::new();
        if !pids.is_empty() {
            out.push(stop_processes(&pids, grace).await);
        }
        // Processes first: a live `warren run` would declare the queues
        // again after they were deleted.
        for t in envs.iter().rev() {
            out.push(match t.run().await {
                Ok(()) => {
                    self.remove_env(&t.namespace);
                    format!("removed namespace {} and {}", t.namespace, t.databases())
                }
                Err(e) => format!(
                    "could not remove namespace {} / {}: {e:#}",
                    t.namespace,
                    t.databases()
                ),
            });
        }
        for s in servers.iter().rev() {
            out.push(match stop_server(s).await {
                Ok(()) => {
                    self.remove_server(s);
                    format!("undid {s:?}")
                }
                Err(e) => format!("could not undo {s:?}: {e:#}"),
            });
        }
        out
    }
}

/// Whether `pid` has exited: gone from `/proc`, or a zombie nobody reaped
/// yet (its parent, this process, stopped polling it).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may
        // itself hold spaces or parentheses: read after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

fn send(signal: &str, pid: u32) {
    // `kill` the command: the drills link no libc binding, and a failed
    // signal (the process just exited) is what the wait below checks.
    let _ = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

async fn wait_exited(pids: &BTreeSet<u32>, within: Duration) -> bool {
    let started = Instant::now();
    loop {
        if pids.iter().all(|p| exited(*p)) {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_processes(pids: &BTreeSet<u32>, grace: Duration) -> String {
    for p in pids {
        send("-TERM", *p);
    }
    if wait_exited(pids, grace).await {
        return format!("stopped warren process(es) {pids:?}");
    }
    for p in pids.iter().filter(|p| !exited(**p)) {
        send("-KILL", *p);
    }
    let gone = wait_exited(pids, Duration::from_secs(5)).await;
    format!("killed warren process(es) {pids:?} after {grace:?} (all gone: {gone})")
}

async fn stop_server(s: &ServerChange) -> anyhow::Result<()> {
    match s {
        ServerChange::RabbitCluster(script) => crate::rabbit_cluster::stop_all(script).await,
        ServerChange::Postgres { version, name } => {
            crate::servers::stop_pg_cluster(version, name).await
        }
        ServerChange::TlsListener => crate::tls::stop_listener(),
        ServerChange::BrokerAppStopped => crate::servers::start_rabbit_app().await,
    }
}
