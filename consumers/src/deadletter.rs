//! Delayed retries and dead letters, both through the broker.
//!
//! A retry is a copy of the message published (with confirm) to the
//! service's retry queue for the delay at hand; the queue's TTL expires it
//! back into the work queue. A dead letter is a copy published to
//! `<ns>.<service>.dlq` with headers that say why. In both cases the
//! original is acknowledged only after the copy is confirmed, so a crash in
//! between leaves a duplicate (absorbed by the inbox), never a loss.
//!
//! When to retry, after what delay and when to give up is the
//! [`crate::retry`] policy's call; this module only carries it out.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use transport::{Outgoing, PublishError, Publisher, Topology};

/// 1-based delivery attempt, incremented on each retry.
pub const H_ATTEMPT: &str = "x-warren-attempt";
/// Times the event was put back because a predecessor was missing.
pub const H_DEFERRALS: &str = "x-warren-deferrals";
/// Why it was dead-lettered: a short code (`invalid_data`, `retries_exhausted`, …).
pub const H_REASON: &str = "x-warren-reason";
/// The error text.
pub const H_ERROR: &str = "x-warren-error";
/// The routing key it was first published with (its type).
pub const H_ROUTING_KEY: &str = "x-warren-routing-key";
/// The service that gave up on it.
pub const H_SERVICE: &str = "x-warren-service";
/// When it was dead-lettered (RFC 3339).
pub const H_DEAD_LETTERED_AT: &str = "x-warren-dead-lettered-at";

/// Longest error text kept in a header.
const MAX_ERROR_LEN: usize = 2000;

/// Forwarding failed: the original must not be acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("the copy for {queue} was not taken: {source}")]
pub struct ForwardError {
    /// The retry or dead-letter queue.
    pub queue: String,
    /// What the publisher saw (a channel error, a nack, a return, no
    /// confirm in time).
    #[source]
    pub source: PublishError,
}

/// Publishes retry and dead-letter copies for one service.
#[derive(Clone)]
pub struct Forwarder {
    /// A publisher of its own, used only for these copies.
    publisher: Publisher,
    topology: Topology,
    service: String,
    timeout: Duration,
    /// Retries go to the partitioned layout's retry queues, which expire
    /// back into the service's hash exchange.
    partitioned: bool,
}

impl Forwarder {
    /// Copies go out through `publisher`, each waiting up to `timeout`
    /// for its confirm.
    pub fn new(publisher: Publisher, topology: Topology, service: &str, timeout: Duration) -> Self {
        Forwarder {
            publisher,
            topology,
            service: service.to_owned(),
            timeout,
            partitioned: false,
        }
    }

    /// Retries of a partitioned service: through its own retry queues,
    /// which return a copy to its subject's partition.
    pub fn partitioned(mut self, partitioned: bool) -> Self {
        self.partitioned = partitioned;
        self
    }

    /// Sends a copy to the retry queue of `delay`, with `header` set to `value`.
    pub async fn retry(
        &self,
        delivery: &Delivery,
        delay: Duration,
        header: &str,
        value: u32,
    ) -> Result<(), ForwardError> {
        let mut headers = base_headers(delivery);
        headers.insert(header.into(), AMQPValue::LongInt(value as i32));
        let queue = if self.partitioned {
            self.topology.partition_retry_queue(&self.service, delay)
        } else {
            self.topology.retry_queue(&self.service, delay)
        };
        self.publish(&queue, delivery, headers).await
    }

    /// Sends a copy to the dead-letter queue with its reason headers.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        error: &str,
        attempt: u32,
    ) -> Result<(), ForwardError> {
        let mut headers = base_headers(delivery);
        let error: String = error.chars().take(MAX_ERROR_LEN).collect();
        headers.insert(H_REASON.into(), long(reason));
        headers.insert(H_ERROR.into(), long(&error));
        headers.insert(H_ATTEMPT.into(), AMQPValue::LongInt(attempt as i32));
        headers.insert(H_SERVICE.into(), long(&self.service));
        headers.insert(
            H_DEAD_LETTERED_AT.into(),
            long(&chrono::Utc::now().to_rfc3339()),
        );
        let queue = self.topology.dlq(&self.service);
        self.publish(&queue, delivery, headers).await
    }

    async fn publish(
        &self,
        queue: &str,
        delivery: &Delivery,
        headers: FieldTable,
    ) -> Result<(), ForwardError> {
        let props: BasicProperties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let copy = Outgoing {
            exchange: "",
            routing_key: queue,
            body: &delivery.data,
            properties: props,
        };
        self.publisher
            .publish(copy, self.timeout)
            .await
            .map_err(|source| ForwardError {
                queue: queue.to_owned(),
                source,
            })
    }
}

/// The message's headers plus the original routing key (kept from the
/// first delivery: retries come back with the queue name as routing key).
fn base_headers(delivery: &Delivery) -> FieldTable {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    if !headers.inner().contains_key(H_ROUTING_KEY) {
        headers.insert(H_ROUTING_KEY.into(), long(delivery.routing_key.as_str()));
    }
    headers
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Reads an integer header, whatever integer width or string it arrived as.
pub fn header_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    let v = props.headers().as_ref()?.inner().get(name)?;
    match v {
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(*n as u32),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(*n as u32),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// Reads a string header.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The routing key the message was first published with.
pub fn original_routing_key(delivery: &Delivery) -> String {
    header_str(&delivery.properties, H_ROUTING_KEY)
        .unwrap_or_else(|| delivery.routing_key.to_string())
}
