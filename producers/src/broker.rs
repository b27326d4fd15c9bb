//! Connecting to RabbitMQ: a timeout on every attempt, tokio as lapin's
//! executor and reactor, and errors that say what was tried and how to
//! start a broker, without ever printing the password.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// Time allowed for TCP connect plus the AMQP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// RabbitMQ could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse as an AMQP URL.
    #[error("invalid AMQP URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// Connecting failed or timed out.
    #[error("cannot reach RabbitMQ at {url}: {reason}. Start it (`rabbitmq-server -detached`, or `docker compose up rabbitmq`) or set AMQP_URL")]
    Unreachable { url: String, reason: String },
}

/// Connects to `url` (amqp:// or amqps://) within [`CONNECT_TIMEOUT`].
/// `name` shows up in the broker's connection list.
pub async fn connect(url: &str, name: &str) -> Result<Connection, ConnectError> {
    let shown = redact(url);
    let parsed = url::Url::parse(url).map_err(|e| ConnectError::BadUrl {
        url: shown.clone(),
        reason: e.to_string(),
    })?;
    if parsed.scheme() != "amqp" && parsed.scheme() != "amqps" {
        return Err(ConnectError::BadUrl {
            url: shown,
            reason: format!("scheme must be amqp or amqps, not {:?}", parsed.scheme()),
        });
    }
    // A TLS failure reads like noise ("corrupt message"); say what to check.
    let tls_hint = if parsed.scheme() == "amqps" {
        " (amqps: is TLS enabled on that port? RabbitMQ's TLS listener is usually 5671)"
    } else {
        ""
    };
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectError::Unreachable {
            url: shown,
            reason: format!("{e}{tls_hint}"),
        }),
        Err(_) => Err(ConnectError::Unreachable {
            url: shown,
            reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
        }),
    }
}

/// AMQP properties of an event message: what brokers and tools look at,
/// repeated from the CloudEvents attributes. Persistent.
pub fn event_properties(
    event_id: &str,
    event_type: &str,
    correlation_id: Option<&str>,
    timestamp: i64,
    app_id: &str,
) -> lapin::BasicProperties {
    let props = lapin::BasicProperties::default()
        .with_content_type(events::CONTENT_TYPE_STRUCTURED.into())
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

/// The URL with its password replaced by `***`, safe for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            // set_password fails only for URLs that cannot have one, and
            // this one has one.
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// Sends publishes together, in the given order, and returns their
/// outcomes in that order.
///
/// Each lapin publish resolves only once lapin's I/O loop has written its
/// frames; awaited one by one, a batch pays one such round trip per
/// message. Here each future is polled once, in order, before the next is
/// made — that first poll is where lapin queues the frames and numbers the
/// publisher confirm — and only then are all awaited, so the broker still
/// receives them in order.
pub async fn publish_in_order<F, T>(publishes: impl IntoIterator<Item = F>) -> Vec<lapin::Result<T>>
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
            p.as_mut()
                .take_output()
                .unwrap_or(Err(lapin::Error::InvalidChannelState(
                    lapin::ChannelState::Error,
                )))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_password_only() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("not a url"), "<unparseable URL>");
    }

    #[tokio::test]
    async fn unreachable_broker_gives_one_line_error_naming_url_and_remedy() {
        // Port 1 on loopback: nothing listens there.
        let err = connect("amqp://guest:pw@127.0.0.1:1/%2f", "test")
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("amqp://guest:***@127.0.0.1:1/%2f"), "{msg}");
        assert!(msg.contains("rabbitmq-server"), "{msg}");
        assert!(!msg.contains("pw@"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[tokio::test]
    async fn wrong_scheme_is_rejected_before_connecting() {
        let err = connect("http://127.0.0.1:5672", "test").await.unwrap_err();
        assert!(matches!(err, ConnectError::BadUrl { .. }), "{err}");
    }
}
