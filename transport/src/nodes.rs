//! Several broker addresses of one RabbitMQ cluster: `AMQP_URL` may list
//! URLs separated by commas (`amqp://u:p@node1:5672/%2f,amqp://u:p@node2:5672/%2f`),
//! each with its own credentials and vhost. [`connect()`] tries them in a
//! shuffled order, so the copies of a service spread over the nodes, and
//! takes the first that answers.
//!
//! Every worker's session (relay, consumer, eager publisher) calls
//! [`connect()`] again with the whole list when it reconnects, so after a
//! node dies the new session lands on another node. A node that failed in
//! the last [`FAILED_RECENTLY`] is tried after the others: a dead node that
//! does not refuse at once (a host gone from the network) would otherwise
//! cost [`crate::CONNECT_TIMEOUT`] of every reconnect that drew it first.
//!
//! A single URL behaves exactly as [`crate::connect::connect`]: same
//! errors, nothing remembered.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use lapin::Connection;
use rand::seq::SliceRandom;

use crate::connect::{self, redact_one, ConnectError};

/// How long a node that failed to connect is tried after the others.
pub const FAILED_RECENTLY: Duration = Duration::from_secs(30);

/// The URLs of a comma-separated list, trimmed, empty entries dropped.
///
/// A new URL starts after a comma only where the text goes on with a
/// scheme (`amqp://`, `amqps://`, any `scheme://`): a comma inside a URL
/// (a password with a literal comma, a query value) stays in that URL.
/// A password that itself contains `,amqp://` must be percent-encoded.
pub fn urls(list: &str) -> Vec<&str> {
    fn push<'a>(out: &mut Vec<&'a str>, s: &'a str) {
        let s = s.trim();
        if !s.is_empty() {
            out.push(s);
        }
    }
    let mut out = Vec::new();
    // Byte offset where the URL being read began, if one is open.
    let mut start: Option<usize> = None;
    let mut offset = 0;
    for piece in list.split(',') {
        let at = offset;
        offset += piece.len() + 1;
        if piece.trim().is_empty() {
            if let Some(s) = start.take() {
                // `at - 1` is the comma before this piece; `at > s` since
                // this piece comes after the one that opened `s`.
                push(&mut out, &list[s..at - 1]);
            }
            continue;
        }
        match start {
            None => start = Some(at),
            Some(s) if starts_with_scheme(piece.trim_start()) => {
                push(&mut out, &list[s..at - 1]);
                start = Some(at);
            }
            Some(_) => {}
        }
    }
    if let Some(s) = start {
        push(&mut out, &list[s..]);
    }
    out
}

/// Whether `s` begins with `scheme://` (RFC 3986 scheme characters).
fn starts_with_scheme(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The vhost of the list's first URL (the nodes of one cluster share
/// their vhosts), percent-decoded as lapin reads it.
pub fn vhost(list: &str) -> Result<String, ConnectError> {
    let first = urls(list).into_iter().next().unwrap_or("");
    first
        .parse::<lapin::uri::AMQPUri>()
        .map(|u| u.vhost)
        .map_err(|reason| ConnectError::BadUrl {
            url: redact_one(first),
            reason,
        })
}

/// Connects to one node of `list` (see the module docs); `name` shows up
/// in the broker's connection list.
pub async fn connect(list: &str, name: &str) -> Result<Connection, ConnectError> {
    connect_any(list, name).await.map(|(conn, _)| conn)
}

/// As [`connect()`], also returning the URL that answered, password masked
/// (for a log line or a report of which node a connection is on).
pub async fn connect_any(list: &str, name: &str) -> Result<(Connection, String), ConnectError> {
    let all = urls(list);
    let many = match all.as_slice() {
        [] => {
            return Err(ConnectError::BadUrl {
                url: String::new(),
                reason: "no URL given".to_owned(),
            })
        }
        [one] => {
            return connect::connect(one, name)
                .await
                .map(|c| (c, redact_one(one)))
        }
        many => many,
    };
    // A malformed URL is a configuration error even while another node
    // answers: say so now rather than when the shuffle first draws it.
    for url in many {
        let parsed = url::Url::parse(url).map_err(|e| ConnectError::BadUrl {
            url: redact_one(url),
            reason: e.to_string(),
        })?;
        if parsed.scheme() != "amqp" && parsed.scheme() != "amqps" {
            return Err(ConnectError::BadUrl {
                url: redact_one(url),
                reason: format!("scheme must be amqp or amqps, not {:?}", parsed.scheme()),
            });
        }
    }
    let mut errors = Vec::new();
    for url in order(many) {
        match connect::connect(url, name).await {
            Ok(conn) => {
                failures().remove(url);
                let node = redact_one(url);
                if !errors.is_empty() {
                    tracing::info!(%node, skipped = errors.len(), "connected to RabbitMQ");
                }
                return Ok((conn, node));
            }
            // The node's URL or CA file is wrong: a fix is needed, not
            // another node.
            Err(e @ (ConnectError::BadUrl { .. } | ConnectError::CaCert { .. })) => return Err(e),
            Err(e) => {
                tracing::warn!(node = %redact_one(url), error = %e, "RabbitMQ node did not answer; trying the next");
                failures().insert(url.to_owned(), Instant::now());
                errors.push(e);
            }
        }
    }
    Err(ConnectError::NoNode { errors })
}

/// The URLs shuffled, those that failed recently moved to the end (in
/// shuffled order too).
fn order<'a>(urls: &[&'a str]) -> Vec<&'a str> {
    let mut order = urls.to_vec();
    order.shuffle(&mut rand::thread_rng());
    let failed = {
        let mut failures = failures();
        let now = Instant::now();
        // Forget old failures so the map stays as small as the lists used.
        failures.retain(|_, at| now.duration_since(*at) < FAILED_RECENTLY);
        order
            .iter()
            .map(|u| failures.contains_key(*u))
            .collect::<Vec<_>>()
    };
    let (mut fresh, stale): (Vec<_>, Vec<_>) = order
        .into_iter()
        .zip(failed)
        .partition(|(_, failed)| !failed);
    fresh.extend(stale);
    fresh.into_iter().map(|(u, _)| u).collect()
}

/// When each URL last failed to connect, process-wide: every worker of a
/// process shares what one learnt about a dead node.
fn failures() -> std::sync::MutexGuard<'static, HashMap<String, Instant>> {
    static FAILURES: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    let lock = FAILURES.get_or_init(Mutex::default).lock();
    // A panic while holding the lock leaves a map that is still valid
    // (each operation is one insert, remove or retain).
    lock.unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_splits_where_a_new_url_begins() {
        assert_eq!(
            urls("amqp://a:p1@h1:5672/%2f, amqps://b:p2@h2/v ,amqp://h3"),
            vec!["amqp://a:p1@h1:5672/%2f", "amqps://b:p2@h2/v", "amqp://h3"]
        );
        assert_eq!(urls("amqp://h1"), vec!["amqp://h1"]);
        assert_eq!(
            urls(" ,amqp://h1,, amqp://h2 ,"),
            vec!["amqp://h1", "amqp://h2"]
        );
        assert!(urls(" , ").is_empty());
    }

    #[test]
    fn a_comma_inside_a_url_stays_in_it() {
        assert_eq!(
            urls("amqp://u:pa,ss@h1/%2f,amqp://u:x,y@h2/%2f"),
            vec!["amqp://u:pa,ss@h1/%2f", "amqp://u:x,y@h2/%2f"]
        );
    }

    #[test]
    fn vhost_comes_from_the_first_url() {
        assert_eq!(vhost("amqp://h1/shop,amqp://h2/shop").unwrap(), "shop");
        assert_eq!(vhost("amqp://h1:5672/%2f").unwrap(), "/");
    }

    #[test]
    fn recently_failed_nodes_are_tried_last() {
        let (a, b, c) = (
            "amqp://order-test-a:1",
            "amqp://order-test-b:1",
            "amqp://order-test-c:1",
        );
        failures().insert(b.to_owned(), Instant::now());
        for _ in 0..20 {
            let o = order(&[a, b, c]);
            assert_eq!(o.len(), 3);
            assert_eq!(o[2], b, "{o:?}");
        }
        failures().remove(b);
    }

    #[tokio::test]
    async fn when_no_node_answers_every_node_is_named_and_no_password_shown() {
        let list = "amqp://u1:secret-one@127.0.0.1:1/%2f,amqp://u2:secret-two@127.0.0.1:2/%2f";
        let err = connect(list, "test").await.unwrap_err();
        assert!(matches!(err, ConnectError::NoNode { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("amqp://u1:***@127.0.0.1:1/%2f"), "{msg}");
        assert!(msg.contains("amqp://u2:***@127.0.0.1:2/%2f"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[tokio::test]
    async fn a_malformed_url_anywhere_in_the_list_is_refused_before_connecting() {
        let err = connect("amqp://u:pw1@127.0.0.1:1/%2f,http://u:pw2@h/", "test")
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::BadUrl { .. }), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }
}
