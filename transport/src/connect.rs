//! Connecting to RabbitMQ: a timeout on every attempt, tokio as lapin's
//! executor and reactor, TLS trust from the URL (`amqps://…?cacertfile=`),
//! and errors that say what was tried and how to fix it, without ever
//! printing the password.

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

/// Time allowed for reading the URL's `cacertfile`, TCP connect, the TLS
/// handshake and the AMQP handshake, all together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// RabbitMQ could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse as an AMQP URL, or asks for what we do not do.
    #[error("invalid AMQP URL {url}: {reason}")]
    BadUrl {
        /// The URL, password masked.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL's `cacertfile` cannot be read or holds no PEM certificate.
    #[error("cannot use cacertfile {path} of {url}: {reason}")]
    CaCert {
        /// The URL, password masked.
        url: String,
        /// The path as the URL gives it (percent-decoded).
        path: String,
        /// Why the file cannot be used.
        reason: String,
    },
    /// The TLS handshake worked up to the server's certificate, which we do
    /// not trust (unknown CA, wrong host name, expired).
    #[error("RabbitMQ at {url} presented a certificate we do not trust: {reason}. Give the CA that signed it as ?cacertfile=/path/to/ca.pem in the URL (or add it to the system trust store), and check that the URL's host is a name the certificate holds")]
    Untrusted {
        /// The URL, password masked.
        url: String,
        /// rustls's verdict.
        reason: String,
    },
    /// TCP connected but the broker never answered the AMQP handshake
    /// within the timeout: the signature of a broker out of file
    /// descriptors or memory, which accepts sockets and then ignores them.
    #[error("RabbitMQ at {url} accepted the connection but did not answer the AMQP handshake within {timeout:?}: it may be out of file descriptors or memory (check `rabbitmq-diagnostics status`, leftover queues: `warren teardown`)")]
    NoHandshake {
        /// The URL, password masked.
        url: String,
        /// The time the whole attempt was given.
        timeout: Duration,
    },
    /// Connecting failed or timed out.
    #[error("cannot reach RabbitMQ at {url}: {reason}. Start it (`rabbitmq-server -detached`, or `docker compose up rabbitmq`) or set AMQP_URL")]
    Unreachable {
        /// The URL, password masked.
        url: String,
        /// The connection error, or the timeout.
        reason: String,
    },
    /// `AMQP_URL` listed several nodes and none answered (see
    /// [`crate::nodes`]).
    #[error("no RabbitMQ node answered ({} tried): {}", .errors.len(), one_line(.errors))]
    NoNode {
        /// Each node's error, in the order tried.
        errors: Vec<ConnectError>,
    },
}

/// The nodes' errors, numbered, on one line.
fn one_line(errors: &[ConnectError]) -> String {
    let each: Vec<String> = errors
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{}) {e}", i + 1))
        .collect();
    each.join("; ")
}

/// Connects to `url` (amqp:// or amqps://) within [`CONNECT_TIMEOUT`].
/// `name` shows up in the broker's connection list.
///
/// TLS takes one query parameter of RabbitMQ's URI spec, `cacertfile`:
/// `amqps://host:5671/vhost?cacertfile=/path/ca.pem`. The file's PEM
/// certificates are *added* to the system trust store, not put in its
/// place: lapin (tcp-stream 0.34, `rustls_connector`) builds its root
/// store from the native certificates and then adds the chain with
/// `add_parsable_certificates`. That differs from the Erlang client, where
/// `cacertfile` is the whole set of trusted CAs: here a server with a
/// publicly trusted certificate is accepted whatever the file says. Without
/// `cacertfile`, only the system trust store counts.
///
/// The file is checked before connecting: readable, text, and at least one
/// well-formed PEM `CERTIFICATE` block (rustls-pki-types' reader, which the
/// parser lapin uses wraps), else a [`ConnectError::CaCert`] naming the
/// path. A block that is PEM but not a usable X.509 certificate is skipped
/// by lapin and shows up as [`ConnectError::Untrusted`] at the handshake.
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
    // No automatic recovery (lapin 4's `enable_auto_recover` is off by
    // default): sessions reconnect themselves, with their own backoff, and
    // know that deliveries of the old channel are gone.
    let props = ConnectionProperties::default().with_connection_name(name.into());
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
        // tokio, the runtime we are called on (`Runtime::tokio_current`).
        let runtime = lapin::runtime::default_runtime().map_err(|e| ConnectError::Unreachable {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        Connection::connect_with_config(url, props, tls, runtime)
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
        // Timed out somewhere: if a plain TCP connect succeeds now, the
        // network is fine and the broker is the one not answering.
        Err(_) if tcp_accepts(&parsed).await => Err(ConnectError::NoHandshake {
            url: shown,
            timeout: CONNECT_TIMEOUT,
        }),
        Err(_) => Err(ConnectError::Unreachable {
            url: shown,
            reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
        }),
    }
}

/// Closes a connection politely (within [`CONNECT_TIMEOUT`]) and waits, a
/// second at most, for lapin's I/O thread to end. Without the wait a
/// short command can return while that thread still flushes the close,
/// and it logs `ERROR io_loop … Tokio context … being shutdown` as the
/// runtime goes away: noise an operator reads as a failure.
pub async fn close(conn: Connection, reason: &str) {
    close_within(conn, reason, CONNECT_TIMEOUT).await;
}

/// [`close`] with the polite close bounded by `limit` instead (sessions
/// that reconnect give a broker that may be gone less time).
pub async fn close_within(conn: Connection, reason: &str, limit: Duration) {
    let _ = tokio::time::timeout(limit, conn.close(200, reason.into())).await;
    // `run` blocks until the I/O thread has finished; on a closed
    // connection that is at most the time to flush the last frames.
    let waited = tokio::task::spawn_blocking(move || conn.run());
    let _ = tokio::time::timeout(Duration::from_secs(1), waited).await;
}

/// Whether a TCP connection to the URL's host and port opens within a
/// second (closed again at once).
async fn tcp_accepts(url: &url::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let port = url
        .port()
        .unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
    let host = host.trim_matches(['[', ']']).to_owned();
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((host.as_str(), port))
        )
        .await,
        Ok(Ok(_))
    )
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
    // rustls-pki-types' PEM reader (through rustls): the one lapin's
    // tcp-stream applies to the same text.
    let mut certificates = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
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
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return false;
    };
    matches!(
        io.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

/// The URL with its password replaced by `***`, safe for logs and errors.
/// A comma-separated list of URLs (see [`crate::nodes::urls`]) has every
/// URL's password masked.
pub fn redact(url: &str) -> String {
    let all = crate::nodes::urls(url);
    if all.len() <= 1 {
        return redact_one(url);
    }
    let each: Vec<String> = all.into_iter().map(redact_one).collect();
    each.join(",")
}

/// One URL with its password masked.
pub(crate) fn redact_one(url: &str) -> String {
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

    #[test]
    fn redact_hides_every_password_of_a_list() {
        let list =
            "amqp://a:pw-one@h1:5672/%2f,amqps://b:pw-two@h2:5671/v, amqp://c:pw,three@h3/%2f";
        let shown = redact(list);
        assert_eq!(
            shown,
            "amqp://a:***@h1:5672/%2f,amqps://b:***@h2:5671/v,amqp://c:***@h3/%2f"
        );
        assert!(!shown.contains("pw"), "{shown}");
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
    async fn a_listener_that_never_answers_is_named_as_a_broker_out_of_resources() {
        // Accepts every connection and never writes a byte: what a broker
        // out of file descriptors looks like from outside.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                sockets.push(s);
            }
        });
        let err = connect(&format!("amqp://guest:pw@127.0.0.1:{port}/%2f"), "test")
            .await
            .unwrap_err();
        held.abort();
        assert!(matches!(err, ConnectError::NoHandshake { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("accepted the connection but did not answer the AMQP handshake"),
            "{msg}"
        );
        assert!(msg.contains("file descriptors"), "{msg}");
        assert!(!msg.contains("pw@"), "{msg}");
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
}
