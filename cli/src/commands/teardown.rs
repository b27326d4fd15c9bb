//! `warren teardown --namespace NS`: removes a namespace's queues and
//! exchanges from the broker and says what it removed; and the same
//! cleanup for the throwaway namespaces of `warren demo` and `warren
//! bench`, run when they finish or get Ctrl-C/SIGTERM.
//!
//! The names come from `rabbitmqctl list_queues`/`list_exchanges`
//! (no management plugin needed), kept only when they have the shape the
//! topology gives them, so a namespace `a` never takes `a-demo-…` or
//! someone's `a.mine`. Without rabbitmqctl, the names the topology knows
//! are tried: every catalog service with the default retry delays.
//!
//! Exchanges cannot expire on their own (RabbitMQ has no `x-expires` for
//! them, only for queues), so a throwaway namespace killed with SIGKILL
//! leaves its two exchanges; they hold no messages and no file handles,
//! and `warren teardown` removes them.

use secrecy::ExposeSecret as _;
use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use serde::Serialize;
use transport::Topology;

use crate::config::Settings;
use crate::error::InvalidInput;
use crate::output::Out;
use crate::rabbitmqctl::{self, RabbitmqctlArg};

/// How long a throwaway namespace's queues outlive their last user
/// (`x-expires`): long enough for the slowest `warren bench` (its retry
/// and dead-letter queues see no consumer for the whole run), short
/// enough that a killed demo costs the broker nothing for long.
pub const THROWAWAY_EXPIRES: Duration = Duration::from_secs(600);

/// The consuming services whose queues a namespace may hold: the shop's,
/// and the benchmark's sink.
pub const QUEUE_OWNERS: [&str; 5] = ["orders", "inventory", "payments", "shipping", "bench_sink"];

/// Arguments of `warren teardown`.
#[derive(Debug, Clone, clap::Args)]
pub struct TeardownArgs {
    /// Remove the default namespace `warren` too (its messages are lost).
    #[arg(long)]
    pub yes: bool,
    /// Print what was removed as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rabbitmqctl: RabbitmqctlArg,
}

/// What a teardown removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Removed {
    pub namespace: String,
    /// Queue names with the messages they held.
    pub queues: Vec<(String, u32)>,
    pub exchanges: Vec<String>,
}

/// Whether `name` is one the topology of `namespace` gives: its
/// exchanges, a service's work, dead-letter or retry queue (or a
/// partitioned service's hash exchange, partitions and retry queues), or
/// the benchmark's ceiling queue.
pub fn belongs(namespace: &str, name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(namespace)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    if matches!(rest, "events" | "outcomes" | "ceiling") {
        return true;
    }
    let (service, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let service_ok = !service.is_empty()
        && service
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    // A partitioned service's: its hash exchange, partitions, retry queues.
    let partitioned = tail == "partitions"
        || tail.strip_prefix("p.retry.").is_some_and(digits)
        || tail.strip_prefix('p').is_some_and(digits);
    service_ok
        && (tail.is_empty()
            || tail == "dlq"
            || tail.strip_prefix("retry.").is_some_and(digits)
            || partitioned)
}

/// The names the topology knows for `services` with `delays`.
pub fn known_names(
    topology: &Topology,
    services: &[&str],
    delays: &[Duration],
) -> (Vec<String>, Vec<String>) {
    let mut queues = vec![format!("{}.ceiling", topology.namespace)];
    for s in services {
        queues.push(topology.dlq(s));
        queues.extend(delays.iter().map(|d| topology.retry_queue(s, *d)));
    }
    // Work queues last: deleting one cancels its consumer, whose session
    // then redeclares the service after its backoff (100 ms); the process
    // of a throwaway namespace exits before that.
    queues.extend(services.iter().map(|s| topology.queue(s)));
    (
        queues,
        vec![topology.exchange(), topology.outcomes_exchange()],
    )
}

/// Deletes the queues and exchanges among `queues` and `exchanges` that
/// exist (a passive declare on a channel of its own asks, since a failed
/// one closes the channel) and returns those it removed.
pub async fn remove(
    conn: &Connection,
    namespace: &str,
    queues: &[String],
    exchanges: &[String],
) -> anyhow::Result<Removed> {
    let mut removed = Removed {
        namespace: namespace.to_owned(),
        ..Default::default()
    };
    for q in queues {
        let probe = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if probe
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            continue;
        }
        let n = probe
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let _ = probe.close(200, "teardown".into()).await;
        removed.queues.push((q.clone(), n));
    }
    for x in exchanges {
        let probe = conn.create_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if probe
            .exchange_declare(
                x.as_str().into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .is_err()
        {
            continue;
        }
        probe
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
        let _ = probe.close(200, "teardown".into()).await;
        removed.exchanges.push(x.clone());
    }
    Ok(removed)
}

/// Removes a throwaway namespace whose names are known (demo, bench):
/// at the end of the run and on Ctrl-C/SIGTERM. Failures are logged, not
/// returned: the queues expire anyway ([`THROWAWAY_EXPIRES`]).
pub async fn cleanup_throwaway(amqp_url: &str, topology: &Topology, delays: &[Duration]) {
    let (queues, exchanges) = known_names(topology, &QUEUE_OWNERS, delays);
    let result = async {
        let conn = transport::connect(amqp_url, "warren cleanup").await?;
        let removed = remove(&conn, &topology.namespace, &queues, &exchanges).await;
        transport::close(conn, "cleanup done").await;
        removed
    }
    .await;
    match result {
        Ok(r) => tracing::info!(
            namespace = %topology.namespace,
            queues = r.queues.len(),
            exchanges = r.exchanges.len(),
            "throwaway namespace removed"
        ),
        Err(e) => tracing::warn!(
            namespace = %topology.namespace,
            error = %format!("{e:#}"),
            "could not remove the throwaway namespace; its queues expire on their own"
        ),
    }
}

/// Runs the command.
pub async fn run(settings: &Settings, args: &TeardownArgs) -> anyhow::Result<()> {
    let ns = &settings.namespace;
    if ns == "warren" && !args.yes {
        return Err(InvalidInput(
            "refusing to remove the default namespace `warren` (its messages would be lost); pass --yes to do it anyway".into(),
        )
        .into());
    }
    let vhost = transport::nodes::vhost(settings.amqp_url.expose_secret())
        .map_err(|e| InvalidInput(e.to_string()))?;
    let cmd = &args.rabbitmqctl.rabbitmqctl;
    let listed = async {
        let q = rabbitmqctl::list_names(cmd, "list_queues", &vhost).await?;
        let x = rabbitmqctl::list_names(cmd, "list_exchanges", &vhost).await?;
        anyhow::Ok((q, x))
    }
    .await;
    let (queues, exchanges) = match listed {
        Ok((q, x)) => (
            q.into_iter().filter(|n| belongs(ns, n)).collect(),
            x.into_iter().filter(|n| belongs(ns, n)).collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot list the broker's queues; trying the names the topology knows (default retry delays)");
            let delays = consumers::SubscriptionConfig::default().retry.delays();
            known_names(&settings.topology(), &QUEUE_OWNERS, &delays)
        }
    };
    let conn = transport::connect(settings.amqp_url.expose_secret(), "warren teardown").await?;
    let removed = remove(&conn, ns, &queues, &exchanges).await;
    transport::close(conn, "teardown done").await;
    let removed = removed?;
    let mut out = Out::stdout();
    if args.json {
        out.line(&serde_json::to_string(&removed)?)?;
        return Ok(());
    }
    for (q, n) in &removed.queues {
        out.line(&format!(
            "removed queue {} ({n} message(s))",
            crate::output::escape(q)
        ))?;
    }
    for x in &removed.exchanges {
        out.line(&format!("removed exchange {}", crate::output::escape(x)))?;
    }
    out.line(&format!(
        "namespace {}: {} queue(s), {} exchange(s) removed",
        crate::output::escape(ns),
        removed.queues.len(),
        removed.exchanges.len()
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_topologys_names_belong_to_a_namespace() {
        for n in [
            "ns.events",
            "ns.outcomes",
            "ns.orders",
            "ns.orders.dlq",
            "ns.orders.retry.1500",
            "ns.bench_sink.retry.250",
            "ns.ceiling",
            "ns.orders.partitions",
            "ns.orders.p0",
            "ns.orders.p12",
            "ns.orders.p.retry.250",
        ] {
            assert!(belongs("ns", n), "{n}");
        }
        for n in [
            "ns",
            "ns-demo-1.orders",
            "nsx.orders",
            "other.ns.orders",
            "ns.orders.mine",
            "ns.orders.retry.",
            "ns.orders.retry.x",
            "ns.Orders",
            "ns.orders.p",
            "ns.orders.px",
            "ns.orders.p.retry.",
        ] {
            assert!(!belongs("ns", n), "{n}");
        }
    }
}
