//! The one publisher with confirms that everything in warren publishes
//! through: the relay, the eager publisher, the consumer's retry and
//! dead-letter forwarder, and the command line.
//!
//! Its contract, after lapin's `publisher_confirms` example: the channel is
//! put in confirm mode once; [`Publisher::send`] is "sent" (frames queued,
//! in order) and hands back one pending confirm per message; a confirm
//! counts as *taken* only when [`confirm_problem`] finds nothing wrong with
//! it. With `mandatory`, an unroutable message is acked **and** returned:
//! that is a failure too, as are a nack and "confirms not requested".

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// The exchange; `""` is the default exchange (routing key = queue).
    pub exchange: &'a str,
    /// The routing key (an event's type, or a queue's name).
    pub routing_key: &'a str,
    /// The body, as it goes on the wire.
    pub body: &'a [u8],
    /// AMQP properties (see [`event_properties`]).
    pub properties: BasicProperties,
}

/// The broker did not take a message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// A nack, a returned (unroutable) message, or confirms not enabled.
    #[error("{0}")]
    Refused(String),
    /// No confirm arrived in time.
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
}

/// A confirm-mode channel. Cheap to clone (lapin's channel is a handle).
#[derive(Clone)]
pub struct Publisher {
    /// Used for nothing but publishing (and declaring what it publishes to).
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn open(conn: &Connection) -> Result<Publisher, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(Default::default()).await?;
        Ok(Publisher { channel })
    }

    /// The channel, to declare the topology it publishes to.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends `messages` (all `mandatory`) together, in the given order,
    /// and returns one pending confirm (or the error sending it) each, in
    /// that order. Await them and read each with [`confirm_problem`].
    ///
    /// Each lapin publish resolves only once lapin's I/O loop has written
    /// its frames; awaited one by one, a batch pays one such round trip per
    /// message. Here each publish is polled once, in order, before the
    /// next is made — that first poll is where lapin queues the frames and
    /// numbers the publisher confirm — and only then are all awaited, so
    /// the broker still receives them in order.
    pub async fn send<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
    ) -> Vec<lapin::Result<PublisherConfirm>> {
        // Collected before the first await: a lazy iterator held across it
        // would tie the caller's future to the iterator's `Send`-ness.
        // Nothing is sent until polled.
        let publishes: Vec<_> = messages
            .into_iter()
            .map(|m| {
                self.channel.basic_publish(
                    m.exchange.into(),
                    m.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    m.body,
                    m.properties,
                )
            })
            .collect();
        publish_in_order(publishes).await
    }

    /// Sends one message and waits up to `timeout` for the broker to take
    /// it.
    pub async fn publish(
        &self,
        message: Outgoing<'_>,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let mut sent = self.send([message]).await;
        let confirm = sent.pop().unwrap_or(Err(unsent()))?;
        let confirm = tokio::time::timeout(timeout, confirm)
            .await
            .map_err(|_| PublishError::Timeout(timeout))?;
        match confirm_problem(confirm) {
            None => Ok(()),
            Some(problem) => Err(PublishError::Refused(problem)),
        }
    }
}

/// Why a publisher confirm does not count as published; `None` when the
/// broker took the message. A returned message (mandatory, no queue bound)
/// is acked too, so it is checked here as well.
pub fn confirm_problem(confirm: Result<Confirmation, lapin::Error>) -> Option<String> {
    match confirm {
        Ok(Confirmation::Ack(None)) => None,
        Ok(Confirmation::Ack(Some(_))) => {
            Some("returned unroutable: no queue is bound to its type".to_owned())
        }
        Ok(Confirmation::Nack(_)) => Some("nacked by the broker".to_owned()),
        Ok(Confirmation::NotRequested) => Some("confirms not enabled".to_owned()),
        Err(e) => Some(e.to_string()),
    }
}

/// AMQP properties of an event message: what brokers and tools look at,
/// repeated from the CloudEvents attributes, and the subject in the
/// [`SUBJECT_HEADER`](crate::topology::SUBJECT_HEADER) header, which a
/// partitioned service's consistent-hash exchange hashes. Persistent.
pub fn event_properties(
    event_id: &str,
    event_type: &str,
    subject: &str,
    correlation_id: Option<&str>,
    timestamp: i64,
    app_id: &str,
) -> BasicProperties {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        crate::topology::SUBJECT_HEADER.into(),
        lapin::types::AMQPValue::LongString(subject.into()),
    );
    let props = BasicProperties::default()
        .with_content_type(events::CONTENT_TYPE_STRUCTURED.into())
        .with_headers(headers)
        .with_message_id(event_id.into())
        .with_type(event_type.into())
        .with_timestamp(timestamp.max(0) as u64)
        .with_app_id(app_id.into())
        .with_delivery_mode(2);
    match correlation_id {
        Some(c) => props.with_correlation_id(c.into()),
        None => props,
    }
}

/// The error for a publish that has no result (cannot happen; see the
/// callers), as lapin reports a channel that cannot publish.
fn unsent() -> lapin::Error {
    lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Error, "basic.publish").into()
}

/// Polls each publish once, in order, then awaits them all (see
/// [`Publisher::send`]).
async fn publish_in_order<F, T>(publishes: impl IntoIterator<Item = F>) -> Vec<lapin::Result<T>>
where
    F: std::future::Future<Output = lapin::Result<T>>,
{
    let mut sending: Vec<_> = Vec::new();
    for publish in publishes {
        let mut publish = Box::pin(futures::future::maybe_done(publish));
        let _ = futures::poll!(publish.as_mut());
        sending.push(publish);
    }
    futures::future::join_all(sending.iter_mut().map(|p| p.as_mut())).await;
    sending
        .into_iter()
        .map(|mut p| {
            // join_all returned, so every MaybeDone holds its output.
            p.as_mut().take_output().unwrap_or(Err(unsent()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A returned message as lapin hands it over with a confirm.
    fn returned() -> lapin::message::BasicReturnMessage {
        lapin::message::BasicReturnMessage {
            delivery: lapin::message::Delivery::mock(
                0,
                "warren.events".into(),
                "thing.happened".into(),
                false,
                b"{}".to_vec(),
            ),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    #[test]
    fn event_properties_repeat_the_attributes_and_are_persistent() {
        let p = event_properties(
            "e-1",
            "order.placed",
            "order-1",
            Some("c-1"),
            1_700_000_000,
            "orders",
        );
        let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.to_string());
        assert_eq!(text(p.message_id()), Some("e-1".to_owned()));
        assert_eq!(text(p.kind()), Some("order.placed".to_owned()));
        assert_eq!(text(p.correlation_id()), Some("c-1".to_owned()));
        assert_eq!(text(p.app_id()), Some("orders".to_owned()));
        assert_eq!(
            text(p.content_type()),
            Some(events::CONTENT_TYPE_STRUCTURED.to_owned())
        );
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        let p = event_properties("e-2", "order.placed", "order-2", None, -5, "orders");
        assert_eq!(*p.correlation_id(), None);
        assert_eq!(*p.timestamp(), Some(0), "a time before 1970 is clamped");
    }

    #[test]
    fn event_properties_carry_the_subject_header_partitions_hash() {
        let props = event_properties("id", "order.placed", "order-7", None, 0, "orders");
        let headers = props.headers().as_ref().expect("headers");
        assert_eq!(
            headers.inner().get(crate::topology::SUBJECT_HEADER),
            // A long string: the exchange hashes the value with its type.
            Some(&lapin::types::AMQPValue::LongString("order-7".into()))
        );
        assert_eq!(props.message_id().as_ref().map(|m| m.as_str()), Some("id"));
    }

    #[test]
    fn confirm_problem_counts_only_a_plain_ack_as_published() {
        use lapin::Confirmation;
        assert_eq!(confirm_problem(Ok(Confirmation::Ack(None))), None);
        let nacked = confirm_problem(Ok(Confirmation::Nack(None))).expect("a nack fails");
        assert!(nacked.contains("nacked"), "{nacked}");
        assert!(
            confirm_problem(Ok(Confirmation::Nack(Some(returned())))).is_some(),
            "a nack with a returned message fails"
        );
        let returned = confirm_problem(Ok(Confirmation::Ack(Some(returned()))))
            .expect("an ack with a returned message fails");
        assert!(returned.contains("unroutable"), "{returned}");
        assert!(confirm_problem(Ok(Confirmation::NotRequested)).is_some());
        assert!(confirm_problem(Err(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "basic.publish"
        )
        .into()))
        .is_some());
    }
}
