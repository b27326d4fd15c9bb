//! Connecting to RabbitMQ: a timeout on every attempt, tokio as lapin's
//! executor and reactor, TLS trust from the URL (`amqps://…?cacertfile=`),
//! and errors that say what was tried and how to fix it, without ever
//! printing the password.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

/// Time allowed for reading the URL's `cacertfile`, TCP connect, the TLS
/// handshake and the AMQP handshake, all together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// RabbitMQ could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse as an AMQP URL, or asks for what we do not do.
    #[error("invalid AMQP URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The URL's `cacertfile` cannot be read or holds no PEM certificate.
    #[error("cannot use cacertfile {path} of {url}: {reason}")]
    CaCert {
        url: String,
        /// The path as the URL gives it (percent-decoded).
        path: String,
        reason: String,
    },
    /// The TLS handshake worked up to the server's certificate, which we do
    /// not trust (unknown CA, wrong host name, expired).
    #[error("RabbitMQ at {url} presented a certificate we do not trust: {reason}. Give the CA that signed it as ?cacertfile=/path/to/ca.pem in the URL (or add it to the system trust store), and check that the URL's host is a name the certificate holds")]
    Untrusted { url: String, reason: String },
    /// Connecting failed or timed out.
    #[error("cannot reach RabbitMQ at {url}: {reason}. Start it (`rabbitmq-server -detached`, or `docker compose up rabbitmq`) or set AMQP_URL")]
    Unreachable { url: String, reason: String },
}

/// Connects to `url` (amqp:// or amqps://) within [`CONNECT_TIMEOUT`].
/// `name` shows up in the broker's connection list.
///
/// TLS takes one query parameter of RabbitMQ's URI spec, `cacertfile`:
/// `amqps://host:5671/vhost?cacertfile=/path/ca.pem`. The file's PEM
/// certificates are *added* to the system trust store, not put in its
/// place: lapin (tcp-stream 0.28, `into_rustls_common`) builds its root
/// store from the native certificates and then adds the chain with
/// `add_parsable_certificates`. That differs from the Erlang client, where
/// `cacertfile` is the whole set of trusted CAs: here a server with a
/// publicly trusted certificate is accepted whatever the file says. Without
/// `cacertfile`, only the system trust store counts.
///
/// The file is checked before connecting: readable, text, and at least one
/// well-formed PEM `CERTIFICATE` block (with the parser lapin itself uses),
/// else a [`ConnectError::CaCert`] naming the path. A block that is PEM but
/// not a usable X.509 certificate is skipped by lapin and shows up as
/// [`ConnectError::Untrusted`] at the handshake.
///
/// `cacertfile` on an `amqp://` URL is an error, not ignored: it says the
/// writer expected TLS and would not get it. Client certificates
/// (`certfile`, `keyfile`) are refused too rather than silently dropped;
/// other TLS parameters of the Erlang client (`verify`,
/// `server_name_indication`, …) are ignored: the server is always verified
/// against the URL's host.
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
    let cacertfile = tls_parameters(&parsed).map_err(|reason| ConnectError::BadUrl {
        url: shown.clone(),
        reason,
    })?;
    // A TLS failure other than the certificate reads like noise ("corrupt
    // message"); say what to check.
    let tls_hint = if parsed.scheme() == "amqps" {
        " (amqps: is TLS enabled on that port? RabbitMQ's TLS listener is usually 5671)"
    } else {
        ""
    };
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(name.into());
    let attempt = async {
        let tls =
            match cacertfile {
                Some(path) => OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(read_ca(&path).await.map_err(|reason| {
                        ConnectError::CaCert {
                            url: shown.clone(),
                            path,
                            reason,
                        }
                    })?),
                },
                None => OwnedTLSConfig::default(),
            };
        // lapin ignores the query parameters it does not know, cacertfile
        // among them.
        Connection::connect_with_config(url, props, tls)
            .await
            .map_err(|e| {
                if rejected_certificate(&e) {
                    ConnectError::Untrusted {
                        url: shown.clone(),
                        reason: e.to_string(),
                    }
                } else {
                    ConnectError::Unreachable {
                        url: shown.clone(),
                        reason: format!("{e}{tls_hint}"),
                    }
                }
            })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Unreachable {
            url: shown,
            reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
        }),
    }
}

/// The URL's `cacertfile`, if any, after refusing the TLS parameters we
/// cannot honour.
fn tls_parameters(url: &url::Url) -> Result<Option<String>, String> {
    let mut cacertfile = None;
    for (key, value) in url.query_pairs() {
        match &*key {
            // The first one wins, as for lapin's own parameters.
            "cacertfile" if cacertfile.is_none() => cacertfile = Some(value.into_owned()),
            "certfile" | "keyfile" => {
                return Err(format!(
                    "{key}: client certificates are not supported, only cacertfile"
                ))
            }
            _ => {}
        }
    }
    if cacertfile.is_some() && url.scheme() != "amqps" {
        return Err("cacertfile needs amqps://: an amqp:// connection is not encrypted".to_owned());
    }
    Ok(cacertfile)
}

/// Reads a CA file and checks it holds PEM certificates; the text is what
/// lapin takes as `cert_chain`.
async fn read_ca(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("the path is empty".to_owned());
    }
    let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
    let pem = String::from_utf8(bytes)
        .map_err(|_| "not a PEM file (not text; DER must be converted to PEM)".to_owned())?;
    let mut certificates = 0;
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        cert.map_err(|e| format!("not valid PEM: {e}"))?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".to_owned());
    }
    Ok(pem)
}

/// Whether lapin failed because rustls rejected the server's certificate.
/// rustls reports it as an `io::Error` wrapping its own error, which lapin
/// keeps; its type, not its text, decides.
fn rejected_certificate(e: &lapin::Error) -> bool {
    let lapin::Error::IOError(io) = e else {
        return false;
    };
    matches!(
        io.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    )
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

/// Why a publisher confirm does not count as published; `None` when the
/// broker took the message. A returned message (mandatory, no queue bound)
/// is acked too, so it is checked here as well.
pub fn confirm_problem(
    confirm: Result<lapin::publisher_confirm::Confirmation, lapin::Error>,
) -> Option<String> {
    use lapin::publisher_confirm::Confirmation;
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

    /// Connects to a port where nothing listens: every test below must
    /// fail on the URL or the CA file, before any connection is tried.
    async fn refused(query: &str) -> String {
        let url = format!("amqps://guest:pw-unit@127.0.0.1:1/%2f?{query}");
        let err = connect(&url, "test").await.unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains("pw-unit"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            !matches!(err, ConnectError::Unreachable { .. }),
            "must fail before connecting: {msg}"
        );
        msg
    }

    fn temp_file(contents: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("warren-unit-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[tokio::test]
    async fn a_missing_cacertfile_is_named_in_the_error() {
        let path = std::env::temp_dir().join(format!("warren-none-{}.pem", uuid::Uuid::new_v4()));
        let msg = refused(&format!("cacertfile={}", path.display())).await;
        assert!(
            msg.contains(&format!("cacertfile {}", path.display())),
            "{msg}"
        );
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[tokio::test]
    async fn a_cacertfile_without_a_pem_certificate_is_refused() {
        for (contents, says) in [
            (&b"just some text\n"[..], "no PEM certificate"),
            (&b"\x30\x82\x01\xff\xfe"[..], "not text"),
            (
                &b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"[..],
                "not valid PEM",
            ),
        ] {
            let path = temp_file(contents);
            let msg = refused(&format!("cacertfile={}", path.display())).await;
            std::fs::remove_file(&path).unwrap();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(says), "{msg}");
        }
        assert!(refused("cacertfile=").await.contains("the path is empty"));
    }

    #[tokio::test]
    async fn cacertfile_on_a_plain_url_and_client_certificates_are_refused() {
        let err = connect("amqp://guest:pw@127.0.0.1:1/%2f?cacertfile=/x.pem", "t")
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::BadUrl { .. }), "{err}");
        assert!(
            err.to_string().contains("cacertfile needs amqps://"),
            "{err}"
        );
        for param in ["certfile", "keyfile"] {
            let msg = refused(&format!("{param}=/x.pem")).await;
            assert!(
                msg.contains("client certificates are not supported"),
                "{msg}"
            );
        }
    }

    #[tokio::test]
    async fn wrong_scheme_is_rejected_before_connecting() {
        let err = connect("http://127.0.0.1:5672", "test").await.unwrap_err();
        assert!(matches!(err, ConnectError::BadUrl { .. }), "{err}");
    }

    /// A returned message as lapin hands it over with a confirm.
    fn returned() -> Box<lapin::message::BasicReturnMessage> {
        Box::new(lapin::message::BasicReturnMessage {
            delivery: lapin::message::Delivery {
                delivery_tag: 0,
                exchange: "warren.events".into(),
                routing_key: "order.placed".into(),
                redelivered: false,
                properties: lapin::BasicProperties::default(),
                data: b"{}".to_vec(),
                acker: Default::default(),
            },
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        })
    }

    #[test]
    fn confirm_problem_counts_only_a_plain_ack_as_published() {
        use lapin::publisher_confirm::Confirmation;
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
        assert!(confirm_problem(Err(lapin::Error::InvalidChannelState(
            lapin::ChannelState::Closed
        )))
        .is_some());
    }
}
