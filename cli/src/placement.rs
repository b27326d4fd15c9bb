//! Where warren's things are on a RabbitMQ cluster, for `warren status`:
//! the nodes, the node each warren connection is on and each queue's
//! leader and members.
//!
//! AMQP does not say which node a connection landed on (the server
//! properties name the cluster, not the node), and `list_connections` has
//! no node column on RabbitMQ 3.x, so the node is found from the
//! connection's server-side address (`host`, `port`) matched against the
//! AMQP listeners `rabbitmqctl cluster_status` reports for each node. When
//! several nodes listen on the same wildcard address and port (one node
//! per machine), the address itself is shown: it is the node's host.
//! Everything comes from `rabbitmqctl` (no management plugin), so
//! `WARREN_RABBITMQCTL` must reach a node of the cluster; any node answers
//! for all of them.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use crate::rabbitmqctl::run;

/// The cluster as `warren status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Placement {
    /// Every node of the cluster and whether it runs.
    pub nodes: Vec<NodeState>,
    /// warren's connections in the vhost, grouped by name and node.
    pub connections: Vec<ConnectionPlace>,
    /// Quorum queues of the vhost by name: leader and members.
    #[serde(skip)]
    pub queues: BTreeMap<String, QueuePlace>,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeState {
    pub node: String,
    pub running: bool,
    /// Its AMQP listeners, `interface:port`.
    pub listeners: Vec<String>,
}

/// Connections of one name on one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ConnectionPlace {
    /// The connection name warren gave it (`warren consumer orders`).
    pub name: String,
    /// The node's name, or the server-side address when the listeners do
    /// not tell the nodes apart.
    pub node: String,
    pub count: usize,
}

/// Where a quorum queue's replicas are.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueuePlace {
    pub leader: String,
    pub members: Vec<String>,
    /// Members currently up.
    pub online: Vec<String>,
}

/// Asks rabbitmqctl (`command`) about the cluster and the vhost.
pub async fn gather(command: &str, vhost: &str) -> anyhow::Result<Placement> {
    let json = |what: &'static str, out: String| -> anyhow::Result<Value> {
        serde_json::from_str(out.trim())
            .with_context(|| format!("{command} {what}: unexpected output"))
    };
    let cluster = json(
        "cluster_status",
        run(command, &["cluster_status", "--formatter", "json"], None).await?,
    )?;
    let connections = json(
        "list_connections",
        run(
            command,
            &[
                "list_connections",
                "-p",
                vhost,
                "client_properties",
                "host",
                "port",
                "--formatter",
                "json",
            ],
            None,
        )
        .await?,
    )?;
    let queues = json(
        "list_queues",
        run(
            command,
            &[
                "list_queues",
                "-p",
                vhost,
                "name",
                "type",
                "leader",
                "members",
                "online",
                "--formatter",
                "json",
            ],
            None,
        )
        .await?,
    )?;
    Ok(parse(&cluster, &connections, &queues))
}

/// The placement from the three JSON documents (pure, for tests).
pub fn parse(cluster: &Value, connections: &Value, queues: &Value) -> Placement {
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let running = strings(cluster.get("running_nodes"));
    let mut all = strings(cluster.get("disk_nodes"));
    all.extend(strings(cluster.get("ram_nodes")));
    all.sort();
    all.dedup();
    // (interface, port) of every AMQP listener, by node.
    let mut listeners: Vec<(String, String, u64)> = Vec::new();
    if let Some(by_node) = cluster.get("listeners").and_then(Value::as_object) {
        for (node, list) in by_node {
            for l in list.as_array().into_iter().flatten() {
                let protocol = l.get("protocol").and_then(Value::as_str).unwrap_or("");
                if !protocol.starts_with("amqp") {
                    continue;
                }
                let interface = l.get("interface").and_then(Value::as_str).unwrap_or("");
                if let Some(port) = l.get("port").and_then(Value::as_u64) {
                    listeners.push((node.clone(), interface.to_owned(), port));
                }
            }
        }
    }
    let nodes = all
        .iter()
        .map(|n| NodeState {
            node: n.clone(),
            running: running.contains(n),
            listeners: listeners
                .iter()
                .filter(|(node, _, _)| node == n)
                .map(|(_, i, p)| format!("{i}:{p}"))
                .collect(),
        })
        .collect();

    let mut grouped: BTreeMap<(String, String), usize> = BTreeMap::new();
    for c in connections.as_array().into_iter().flatten() {
        let Some(name) = connection_name(c.get("client_properties")) else {
            continue;
        };
        if !name.starts_with("warren") {
            continue;
        }
        let host = address(c.get("host"));
        let port = c.get("port").and_then(Value::as_u64).unwrap_or(0);
        let node = node_of(&listeners, &host, port);
        *grouped.entry((name, node)).or_default() += 1;
    }
    let connections = grouped
        .into_iter()
        .map(|((name, node), count)| ConnectionPlace { name, node, count })
        .collect();

    let mut places = BTreeMap::new();
    for q in queues.as_array().into_iter().flatten() {
        if q.get("type").and_then(Value::as_str) != Some("quorum") {
            continue;
        }
        let Some(name) = q.get("name").and_then(Value::as_str) else {
            continue;
        };
        places.insert(
            name.to_owned(),
            QueuePlace {
                leader: q
                    .get("leader")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                members: strings(q.get("members")),
                online: strings(q.get("online")),
            },
        );
    }
    Placement {
        nodes,
        connections,
        queues: places,
    }
}

/// `connection_name` out of rabbitmqctl's `client_properties`: a list of
/// `[key, type, value]` triples.
fn connection_name(props: Option<&Value>) -> Option<String> {
    props?.as_array()?.iter().find_map(|triple| {
        let t = triple.as_array()?;
        (t.first()?.as_str()? == "connection_name")
            .then(|| t.get(2)?.as_str().map(str::to_owned))?
    })
}

/// An address as rabbitmqctl prints it: a list of 4 bytes (IPv4) or 8
/// words (IPv6), or a string.
fn address(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let n: Vec<u64> = parts.iter().filter_map(Value::as_u64).collect();
            match n.len() {
                4 => n.iter().map(u64::to_string).collect::<Vec<_>>().join("."),
                8 => {
                    let words: Vec<u16> = n.iter().map(|w| *w as u16).collect();
                    let ip = std::net::Ipv6Addr::new(
                        words[0], words[1], words[2], words[3], words[4], words[5], words[6],
                        words[7],
                    );
                    ip.to_string()
                }
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// The node whose AMQP listener takes `host:port`: the one listener on
/// that port bound to that address, else the only one on that port bound
/// to a wildcard; else the address (see the module docs).
fn node_of(listeners: &[(String, String, u64)], host: &str, port: u64) -> String {
    let on_port: Vec<&(String, String, u64)> =
        listeners.iter().filter(|(_, _, p)| *p == port).collect();
    let exact: Vec<_> = on_port.iter().filter(|(_, i, _)| i == host).collect();
    if let [only] = exact.as_slice() {
        return only.0.clone();
    }
    let wildcard: Vec<_> = on_port
        .iter()
        .filter(|(_, i, _)| matches!(i.as_str(), "::" | "[::]" | "0.0.0.0"))
        .collect();
    if let [only] = wildcard.as_slice() {
        return only.0.clone();
    }
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listener(node: &str, interface: &str, port: u64) -> Value {
        json!({"interface": interface, "node": node, "port": port, "protocol": "amqp"})
    }

    fn conn(name: &str, host: Value, port: u64) -> Value {
        json!({"client_properties": [["capabilities", "table", []], ["connection_name", "longstr", name]], "host": host, "port": port})
    }

    #[test]
    fn connections_are_placed_on_the_node_whose_listener_they_reached() {
        let cluster = json!({
            "disk_nodes": ["a@h", "b@h", "c@h"],
            "running_nodes": ["a@h", "c@h"],
            "listeners": {
                "a@h": [listener("a@h", "127.0.0.1", 5673), {"interface": "127.0.0.1", "port": 25673, "protocol": "clustering"}],
                "b@h": [listener("b@h", "127.0.0.1", 5674)],
                "c@h": [listener("c@h", "::", 5675)],
            }
        });
        let connections = json!([
            conn("warren consumer orders", json!([127, 0, 0, 1]), 5673),
            conn("warren consumer orders", json!([127, 0, 0, 1]), 5673),
            conn("warren relay orders", json!([127, 0, 0, 1]), 5675),
            conn("someone else", json!([127, 0, 0, 1]), 5673),
            conn("warren tail", json!([10, 0, 0, 9]), 5672),
        ]);
        let queues = json!([
            {"name": "warren.orders", "type": "quorum", "leader": "a@h", "members": ["a@h", "b@h", "c@h"], "online": ["a@h", "c@h"]},
            {"name": "other", "type": "classic", "leader": "", "members": "", "online": ""},
        ]);
        let p = parse(&cluster, &connections, &queues);
        assert_eq!(p.nodes.len(), 3);
        assert!(!p.nodes[1].running);
        assert_eq!(p.nodes[0].listeners, vec!["127.0.0.1:5673".to_owned()]);
        let placed: Vec<(&str, &str, usize)> = p
            .connections
            .iter()
            .map(|c| (c.name.as_str(), c.node.as_str(), c.count))
            .collect();
        assert_eq!(
            placed,
            vec![
                ("warren consumer orders", "a@h", 2),
                ("warren relay orders", "c@h", 1),
                ("warren tail", "10.0.0.9:5672", 1),
            ]
        );
        assert_eq!(p.queues.len(), 1);
        assert_eq!(p.queues["warren.orders"].leader, "a@h");
        assert_eq!(p.queues["warren.orders"].online.len(), 2);
    }

    #[test]
    fn nodes_sharing_a_wildcard_listener_are_told_apart_by_address() {
        let l = vec![
            ("a@h1".to_owned(), "[::]".to_owned(), 5672),
            ("b@h2".to_owned(), "[::]".to_owned(), 5672),
        ];
        assert_eq!(node_of(&l, "10.0.0.2", 5672), "10.0.0.2:5672");
        assert_eq!(address(Some(&json!([0, 0, 0, 0, 0, 0, 0, 1]))), "::1");
    }
}
