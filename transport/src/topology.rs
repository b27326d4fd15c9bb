//! The broker topology, declared idempotently from code. Names are part of
//! the contract (renaming a queue orphans its messages), so they are built
//! in exactly one place:
//!
//! | name | kind | role |
//! |---|---|---|
//! | `<ns>.events` | topic exchange | every event, routing key = type |
//! | `<ns>.<service>` | quorum queue | a consuming service's work queue |
//! | `<ns>.<service>.retry.<ms>` | quorum queue, TTL | delayed retry; expires back into the work queue |
//! | `<ns>.<service>.dlq` | quorum queue | dead letters, with reason headers |
//!
//! A service split into P ordered partitions (see
//! [`Topology::declare_partitioned_service`]) has instead of its work and
//! retry queues:
//!
//! | name | kind | role |
//! |---|---|---|
//! | `<ns>.<service>.partitions` | `x-consistent-hash` exchange, bound to `<ns>.events` | hashes the [`SUBJECT_HEADER`] onto the partitions |
//! | `<ns>.<service>.p<i>` | quorum queue, single active consumer | partition `i` (0-based), weight 1 on the ring |
//! | `<ns>.<service>.p.retry.<ms>` | quorum queue, TTL | delayed retry; expires back into the hash exchange, so into the same partition |
//!
//! A service's queue is bound to every type raised by the services whose
//! events it handles, not only to the types it handles: `sequence` counts
//! all events of a (source, subject), so a consumer must see them all to
//! know that none is missing before applying the next (see
//! `consumers::order`). Types without a handler are acknowledged as
//! skipped.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

/// Deliveries of one message before the broker itself dead-letters it.
/// The runtime dead-letters far earlier with a reason; this only stops a
/// message that crashes the consuming process from looping forever.
pub const DELIVERY_LIMIT: i64 = 20;

/// Members each quorum queue starts with (`x-quorum-initial-group-size`):
/// on a cluster of three or more nodes, a queue survives the loss of any
/// one node; RabbitMQ caps the size at the number of nodes, so the same
/// declaration gives one member on a single node
/// (`rabbit_quorum_queue:select_quorum_nodes`). Without it RabbitMQ 3.x
/// puts a member on every node, which on a large cluster makes each
/// publish wait for a majority of all of them. RabbitMQ compares the
/// argument when a queue is declared again (checked on 3.10: a queue
/// created without it answers 406 `inequivalent arg`), so a queue created
/// before warren set it is declared again without it and keeps its
/// members (add some with `rabbitmq-queues grow`).
pub const QUORUM_GROUP_SIZE: i64 = 3;

/// The header carrying an event's `subject` on every message warren
/// publishes: what a partitioned service's consistent-hash exchange hashes,
/// so every event of a subject lands in one partition. Always a long
/// string: the exchange hashes the value with its AMQP type.
pub const SUBJECT_HEADER: &str = "x-warren-subject";

/// The RabbitMQ plugin that provides the `x-consistent-hash` exchange type
/// that partitions need.
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// Most partitions a service may have.
pub const MAX_PARTITIONS: u16 = 1024;

/// Declaring a topology failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The channel or connection failed, or the broker refused a declaration.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// The broker does not know the `x-consistent-hash` exchange type.
    #[error(
        "the broker has no x-consistent-hash exchange type, which partitions need: \
         enable the plugin with `rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN}` ({0})"
    )]
    MissingPlugin(lapin::Error),
    /// A partition count out of range.
    #[error("{0} partitions: a partitioned service has 1 to {MAX_PARTITIONS}")]
    Partitions(u16),
}

/// Names and declarations of one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Prefix of every name; `warren` by default, random in tests.
    pub namespace: String,
    /// When set, queues are deleted by the broker after being unused this
    /// long (`x-expires`): test namespaces clean themselves up even when a
    /// test dies before its own cleanup.
    pub expires: Option<Duration>,
}

impl Topology {
    /// The topology of `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Topology {
            namespace: namespace.into(),
            expires: None,
        }
    }

    /// `<ns>.events`
    pub fn exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// `<ns>.outcomes`: the live feed of consumer outcomes (transient).
    pub fn outcomes_exchange(&self) -> String {
        format!("{}.outcomes", self.namespace)
    }

    /// Declares the outcomes exchange: non-durable, since it carries only
    /// live telemetry, and redeclared by every consumer session.
    pub async fn declare_outcomes_exchange(&self, ch: &Channel) -> Result<(), lapin::Error> {
        ch.exchange_declare(
            self.outcomes_exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// `<ns>.<service>`
    pub fn queue(&self, service: &str) -> String {
        format!("{}.{service}", self.namespace)
    }

    /// `<ns>.<service>.dlq`
    pub fn dlq(&self, service: &str) -> String {
        format!("{}.{service}.dlq", self.namespace)
    }

    /// `<ns>.<service>.retry.<ms>`: the delay is in the name because a
    /// queue's TTL cannot change once declared.
    pub fn retry_queue(&self, service: &str, delay: Duration) -> String {
        format!("{}.{service}.retry.{}", self.namespace, delay.as_millis())
    }

    /// `<ns>.<service>.partitions`: a partitioned service's consistent-hash
    /// exchange.
    pub fn partition_exchange(&self, service: &str) -> String {
        format!("{}.{service}.partitions", self.namespace)
    }

    /// `<ns>.<service>.p<i>`: partition `i` of a partitioned service.
    pub fn partition_queue(&self, service: &str, partition: u16) -> String {
        format!("{}.{service}.p{partition}", self.namespace)
    }

    /// `<ns>.<service>.p.retry.<ms>`: a partitioned service's retry queue.
    /// A name of its own, since it dead-letters elsewhere than the
    /// competing layout's (queue arguments cannot change once declared).
    pub fn partition_retry_queue(&self, service: &str, delay: Duration) -> String {
        format!("{}.{service}.p.retry.{}", self.namespace, delay.as_millis())
    }

    /// Declares the events exchange (durable topic).
    pub async fn declare_exchange(&self, ch: &Channel) -> Result<(), lapin::Error> {
        ch.exchange_declare(
            self.exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    }

    /// Declares a consuming service's work queue bound to `bindings`
    /// (routing keys: see `Catalog::bindings`), its retry queues (one per
    /// delay) and its dead-letter queue.
    ///
    /// It takes the connection rather than a channel because each queue is
    /// declared on a channel of its own: a queue created before warren set
    /// [`QUORUM_GROUP_SIZE`] refuses the new argument (406
    /// PRECONDITION_FAILED, which closes the channel), and is then declared
    /// again as it was, on a fresh channel.
    pub async fn declare_service(
        &self,
        conn: &Connection,
        service: &str,
        bindings: &[&str],
        retry_delays: &[Duration],
    ) -> Result<(), lapin::Error> {
        let ch = conn.create_channel().await?;
        let result = self
            .declare_work_queue(conn, &ch, service, bindings, retry_delays)
            .await;
        if ch.status().connected() {
            let _ = ch.close(200, "declared".into()).await;
        }
        result
    }

    async fn declare_work_queue(
        &self,
        conn: &Connection,
        ch: &Channel,
        service: &str,
        bindings: &[&str],
        retry_delays: &[Duration],
    ) -> Result<(), lapin::Error> {
        self.declare_exchange(ch).await?;
        let queue = self.queue(service);
        let dlq = self.dlq(service);
        self.declare_quorum(conn, &dlq, FieldTable::default())
            .await?;

        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), string(""));
        args.insert("x-dead-letter-routing-key".into(), string(&dlq));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        self.declare_quorum(conn, &queue, args).await?;
        for key in bindings {
            ch.queue_bind(
                queue.as_str().into(),
                self.exchange().into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }

        for delay in retry_delays {
            // Expired messages dead-letter back into the work queue through
            // the default exchange; at-least-once dead-lettering (with
            // reject-publish overflow, which it requires) so a broker
            // failure during the move cannot drop a retry.
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert("x-dead-letter-exchange".into(), string(""));
            args.insert("x-dead-letter-routing-key".into(), string(&queue));
            args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
            args.insert("x-overflow".into(), string("reject-publish"));
            self.declare_quorum(conn, &self.retry_queue(service, *delay), args)
                .await?;
        }
        Ok(())
    }

    /// Declares a service split into `partitions` ordered partitions: a
    /// consistent-hash exchange bound to the events exchange with
    /// `bindings`, hashing on [`SUBJECT_HEADER`]; one quorum queue with
    /// single active consumer per partition, each on the ring with weight
    /// 1; retry queues that expire back into the hash exchange (so a retry
    /// returns to its subject's partition); the dead-letter queue.
    ///
    /// The ring maps a hash to the n-th binding in the order bindings were
    /// made, and a restarted broker rebuilds it from its bindings sorted by
    /// queue name: the partitions are bound in that same (byte) order, so
    /// that a restart moves no subject (`p10` sorts before `p2`).
    ///
    /// Takes the connection for the reason [`Topology::declare_service`]
    /// does: each quorum queue is declared on a channel of its own.
    pub async fn declare_partitioned_service(
        &self,
        conn: &Connection,
        service: &str,
        bindings: &[&str],
        retry_delays: &[Duration],
        partitions: u16,
    ) -> Result<(), TopologyError> {
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(TopologyError::Partitions(partitions));
        }
        let ch = conn.create_channel().await?;
        let result = self
            .declare_partitions(conn, &ch, service, bindings, retry_delays, partitions)
            .await;
        if ch.status().connected() {
            let _ = ch.close(200, "declared".into()).await;
        }
        result
    }

    async fn declare_partitions(
        &self,
        conn: &Connection,
        ch: &Channel,
        service: &str,
        bindings: &[&str],
        retry_delays: &[Duration],
        partitions: u16,
    ) -> Result<(), TopologyError> {
        self.declare_exchange(ch).await?;
        let hash = self.partition_exchange(service);
        let mut args = FieldTable::default();
        args.insert("hash-header".into(), string(SUBJECT_HEADER));
        ch.exchange_declare(
            hash.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|e| {
            // 503 COMMAND_INVALID is RabbitMQ's answer to an exchange type
            // it does not know: the plugin is not enabled.
            match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 503 => {
                    TopologyError::MissingPlugin(e)
                }
                _ => TopologyError::Broker(e),
            }
        })?;
        let dlq = self.dlq(service);
        self.declare_quorum(conn, &dlq, FieldTable::default())
            .await?;

        let mut names: Vec<String> = (0..partitions)
            .map(|i| self.partition_queue(service, i))
            .collect();
        names.sort();
        for queue in &names {
            let mut args = FieldTable::default();
            args.insert("x-dead-letter-exchange".into(), string(""));
            args.insert("x-dead-letter-routing-key".into(), string(&dlq));
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            self.declare_quorum(conn, queue, args).await?;
            // Weight 1 each: every partition takes an equal share.
            ch.queue_bind(
                ShortString::from(queue.as_str()),
                hash.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        for key in bindings {
            ch.exchange_bind(
                hash.as_str().into(),
                self.exchange().into(),
                (*key).into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        for delay in retry_delays {
            // As in the competing layout (at-least-once dead-lettering),
            // but back through the hash exchange: the copy keeps its
            // subject header, so it returns to its partition.
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert("x-dead-letter-exchange".into(), string(&hash));
            args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
            args.insert("x-overflow".into(), string("reject-publish"));
            self.declare_quorum(conn, &self.partition_retry_queue(service, *delay), args)
                .await?;
        }
        Ok(())
    }

    /// Partition queues beyond `partitions` left by a larger partition
    /// count: those that exist (asked with a passive declare on a channel
    /// of their own, since a failed one closes its channel), from
    /// `partitions` upwards until one does not, each taken off the hash
    /// exchange's ring so it gets no new events. Returns how many exist:
    /// the consumer still drains them.
    pub async fn retire_surplus_partitions(
        &self,
        conn: &lapin::Connection,
        service: &str,
        partitions: u16,
    ) -> Result<u16, lapin::Error> {
        let mut surplus = 0;
        for i in partitions..MAX_PARTITIONS {
            let probe = conn.create_channel().await?;
            let queue = self.partition_queue(service, i);
            let exists = probe
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_ok();
            if !exists {
                break;
            }
            probe
                .queue_unbind(
                    queue.as_str().into(),
                    self.partition_exchange(service).into(),
                    "1".into(),
                    FieldTable::default(),
                )
                .await?;
            let _ = probe.close(200, "probed".into()).await;
            surplus += 1;
        }
        Ok(surplus)
    }

    /// Deletes a partitioned service's partitions, retry queues, dead-letter
    /// queue and hash exchange.
    pub async fn delete_partitions(
        &self,
        ch: &Channel,
        service: &str,
        partitions: u16,
        retry_delays: &[Duration],
    ) -> Result<(), lapin::Error> {
        let mut names: Vec<String> = (0..partitions)
            .map(|i| self.partition_queue(service, i))
            .collect();
        names.extend(
            retry_delays
                .iter()
                .map(|d| self.partition_retry_queue(service, *d)),
        );
        names.push(self.dlq(service));
        for name in names {
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        ch.exchange_delete(
            self.partition_exchange(service).into(),
            ExchangeDeleteOptions::default(),
        )
        .await
    }

    /// Declares a quorum queue with [`QUORUM_GROUP_SIZE`]; a queue that
    /// exists without it is declared again as it was (see
    /// [`Topology::declare_service`]). Any other difference fails the
    /// second declaration too, and its error is the one returned.
    async fn declare_quorum(
        &self,
        conn: &Connection,
        name: &str,
        mut args: FieldTable,
    ) -> Result<(), lapin::Error> {
        args.insert("x-queue-type".into(), string("quorum"));
        if let Some(expires) = self.expires {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(expires.as_millis() as i64),
            );
        }
        let mut sized = args.clone();
        sized.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(QUORUM_GROUP_SIZE),
        );
        match declare_on_own_channel(conn, name, sized).await {
            Err(e) if precondition_failed(&e) => {
                declare_on_own_channel(conn, name, args).await?;
                tracing::info!(
                    queue = name,
                    "quorum queue predates warren's initial group size; kept as it is (rabbitmq-queues grow adds members)"
                );
                Ok(())
            }
            other => other,
        }
    }

    /// Deletes a service's queues (work, retry, dead letters). Used by
    /// tests and by operators tearing down a namespace.
    pub async fn delete_service(
        &self,
        ch: &Channel,
        service: &str,
        retry_delays: &[Duration],
    ) -> Result<(), lapin::Error> {
        let mut names = vec![self.queue(service), self.dlq(service)];
        names.extend(retry_delays.iter().map(|d| self.retry_queue(service, *d)));
        for name in names {
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Deletes the events and outcomes exchanges.
    pub async fn delete_exchange(&self, ch: &Channel) -> Result<(), lapin::Error> {
        ch.exchange_delete(
            self.outcomes_exchange().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
        ch.exchange_delete(self.exchange().into(), ExchangeDeleteOptions::default())
            .await
    }
}

/// Declares a durable queue on a channel opened for it (a refusal closes
/// only that channel).
async fn declare_on_own_channel(
    conn: &Connection,
    name: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    let declared = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await;
    if declared.is_ok() {
        let _ = ch.close(200, "declared".into()).await;
    }
    declared.map(|_| ())
}

/// Whether the broker refused a declaration as inequivalent to the
/// existing queue (reply code 406), by the code, not the text.
fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(
            amqp.kind(),
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
        )
    )
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// A short string for AMQP properties.
pub fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topology::new("warren");
        assert_eq!(t.exchange(), "warren.events");
        assert_eq!(t.queue("billing"), "warren.billing");
        assert_eq!(t.dlq("billing"), "warren.billing.dlq");
        assert_eq!(
            t.retry_queue("billing", Duration::from_millis(1500)),
            "warren.billing.retry.1500"
        );
        assert_eq!(t.partition_exchange("billing"), "warren.billing.partitions");
        let missing = TopologyError::MissingPlugin(
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "exchange.declare")
                .into(),
        );
        assert!(missing
            .to_string()
            .contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"));
        assert_eq!(t.partition_queue("billing", 3), "warren.billing.p3");
        assert_eq!(
            t.partition_retry_queue("billing", Duration::from_millis(250)),
            "warren.billing.p.retry.250"
        );
    }
}
