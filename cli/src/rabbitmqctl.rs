//! Running RabbitMQ's own CLI (`rabbitmqctl`, or whatever
//! `WARREN_RABBITMQCTL` says, e.g. `docker compose exec -T rabbitmq
//! rabbitmqctl`): what AMQP cannot do without the management plugin —
//! users, listing a namespace's queues, the broker's alarms and file
//! descriptors.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

/// The `--rabbitmqctl` flag shared by the commands that call it.
#[derive(Debug, Clone, clap::Args)]
pub struct RabbitmqctlArg {
    /// How to run rabbitmqctl, split on spaces, e.g.
    /// `docker compose exec -T rabbitmq rabbitmqctl`.
    #[arg(long, env = "WARREN_RABBITMQCTL", default_value = "rabbitmqctl")]
    pub rabbitmqctl: String,
}

/// Runs `command args…` (with `--quiet`), feeding `stdin`; returns its
/// standard output, or an error with what it said on standard error.
pub async fn run(command: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut words = command.split_whitespace();
    let Some(program) = words.next() else {
        bail!("WARREN_RABBITMQCTL is empty");
    };
    let mut child = tokio::process::Command::new(program)
        .args(words)
        .args(["--quiet"])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {command:?}: install RabbitMQ's CLI tools or set WARREN_RABBITMQCTL"
            )
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .with_context(|| format!("{command} {} took over 60 s", args.join(" ")))??;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let said: Vec<&str> = err
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        bail!(
            "{command} {} failed ({}): {}",
            args.first().copied().unwrap_or(""),
            out.status,
            said.join(" ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The names of the vhost's queues (`what` = `list_queues`) or exchanges
/// (`list_exchanges`).
pub async fn list_names(command: &str, what: &str, vhost: &str) -> anyhow::Result<Vec<String>> {
    let out = run(
        command,
        &[what, "-p", vhost, "name", "--formatter", "json"],
        None,
    )
    .await?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(out.trim())
        .with_context(|| format!("{command} {what}: unexpected output"))?;
    Ok(rows
        .iter()
        .filter_map(|r| r.get("name")?.as_str().map(str::to_owned))
        .collect())
}

/// What `warren status` tells of the broker itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BrokerHealth {
    /// Resource alarms in force (memory, disk, file descriptors): while
    /// one is, publishers are blocked.
    pub alarms: Vec<String>,
    /// File descriptors in use and the limit: every quorum queue holds
    /// some, and at the limit the broker stops accepting connections.
    pub file_descriptors_used: Option<u64>,
    pub file_descriptors_limit: Option<u64>,
    /// Sockets (connections) in use and the limit.
    pub sockets_used: Option<u64>,
    pub sockets_limit: Option<u64>,
    /// Memory the node uses (bytes) and the high watermark that raises the
    /// memory alarm.
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
}

impl BrokerHealth {
    /// The problems worth an operator's attention: alarms, and file
    /// descriptors or sockets above 80 % of their limit.
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self.alarms.iter().map(|a| format!("alarm: {a}")).collect();
        for (what, used, limit) in [
            (
                "file descriptors",
                self.file_descriptors_used,
                self.file_descriptors_limit,
            ),
            ("sockets", self.sockets_used, self.sockets_limit),
        ] {
            if let (Some(u), Some(l)) = (used, limit) {
                if l > 0 && u * 10 >= l * 8 {
                    p.push(format!("{what}: {u} of {l} in use"));
                }
            }
        }
        p
    }
}

/// Reads `rabbitmqctl status --formatter json`.
pub async fn broker_health(command: &str) -> anyhow::Result<BrokerHealth> {
    let out = run(command, &["status", "--formatter", "json"], None).await?;
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("{command} status: unexpected output"))?;
    Ok(parse_health(&v))
}

/// The figures of a `rabbitmqctl status` JSON document; missing ones stay
/// `None` (the layout differs between versions).
pub fn parse_health(v: &serde_json::Value) -> BrokerHealth {
    let num = |path: &[&str]| -> Option<u64> {
        let mut at = v;
        for k in path {
            at = at.get(k)?;
        }
        at.as_u64()
    };
    let alarms = v
        .get("alarms")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    BrokerHealth {
        alarms,
        file_descriptors_used: num(&["file_descriptors", "total_used"]),
        file_descriptors_limit: num(&["file_descriptors", "total_limit"]),
        sockets_used: num(&["file_descriptors", "sockets_used"]),
        sockets_limit: num(&["file_descriptors", "sockets_limit"]),
        memory_bytes: num(&["memory", "total", "rss"]).or(num(&["memory", "total", "erlang"])),
        memory_limit_bytes: num(&["vm_memory_high_watermark_limit"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_gives_alarms_descriptors_and_memory() {
        let v = serde_json::json!({
            "alarms": ["file_descriptor_limit"],
            "file_descriptors": {"sockets_limit": 832, "sockets_used": 3, "total_limit": 927, "total_used": 900},
            "memory": {"total": {"erlang": 10, "rss": 20, "allocated": 30}},
            "vm_memory_high_watermark_limit": 1000
        });
        let h = parse_health(&v);
        assert_eq!(h.alarms, vec!["file_descriptor_limit".to_owned()]);
        assert_eq!(h.file_descriptors_used, Some(900));
        assert_eq!(h.memory_bytes, Some(20));
        let p = h.problems();
        assert!(p.iter().any(|p| p.contains("alarm")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("900 of 927")), "{p:?}");
        assert!(!p.iter().any(|p| p.contains("sockets")), "{p:?}");
        assert_eq!(
            parse_health(&serde_json::json!({})),
            BrokerHealth::default()
        );
    }
}
