//! Every input bound of the contract, one test each: body size, AMQP
//! header count, attribute lengths and fixture line length. Each gives a
//! clear error (the dead-letter reason an operator reads), never a crash
//! or an unbounded allocation.

use std::path::Path;

use serde_json::{json, Value};
use testkit::sample::CustomerUpdated;
use uuid::Uuid;
use warren_events::fixtures::{self, FixtureErrorKind, MAX_LINE};
use warren_events::{DecodeError, Envelope, MAX_ATTRIBUTE_LEN, MAX_HEADERS};

fn event() -> Envelope {
    let id = Uuid::now_v7();
    let mut e = Envelope::new(
        "customers",
        id.to_string(),
        &CustomerUpdated {
            customer_id: id,
            name: "Ada".into(),
            email: "ada@example.com".into(),
            version: None,
        },
    );
    e.sequence = 1;
    e
}

#[test]
fn body_over_the_limit_is_too_large() {
    let body = testkit::sample::codec().encode(&event());
    let err = testkit::sample::codec()
        .with_max_body(body.len() - 1)
        .decode(&body)
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            size: body.len(),
            max: body.len() - 1
        }
    );
    assert_eq!(err.kind(), "too_large");
    assert!(testkit::sample::codec()
        .with_max_body(body.len())
        .decode(&body)
        .is_ok());
}

#[test]
fn more_headers_than_the_limit_are_refused_in_both_modes() {
    let body = testkit::sample::codec().encode(&event());
    let headers: Vec<(String, Value)> = (0..=MAX_HEADERS)
        .map(|i| (format!("x-junk-{i}"), json!("v")))
        .collect();
    for content_type in [
        Some(warren_events::CONTENT_TYPE_STRUCTURED),
        Some("application/json"),
    ] {
        let err = testkit::sample::codec()
            .decode_message(
                content_type,
                headers.iter().map(|(k, v)| (k.as_str(), v.clone())),
                &body,
            )
            .unwrap_err();
        assert_eq!(err, DecodeError::TooManyHeaders { max: MAX_HEADERS });
        assert_eq!(err.kind(), "too_large");
        assert!(
            err.to_string().contains("more than 64 AMQP headers"),
            "{err}"
        );
    }
    // Exactly the limit is fine.
    let ok = testkit::sample::codec().decode_message(
        Some(warren_events::CONTENT_TYPE_STRUCTURED),
        headers[..MAX_HEADERS]
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone())),
        &body,
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn string_attributes_over_the_limit_are_named() {
    let long = "x".repeat(MAX_ATTRIBUTE_LEN + 1);
    for attr in [
        "subject",
        "source",
        "correlationid",
        "causationid",
        "traceparent",
    ] {
        let mut v = serde_json::to_value(event()).unwrap();
        v[attr] = json!(long);
        let err = testkit::sample::codec()
            .decode(&serde_json::to_vec(&v).unwrap())
            .unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidAttribute { name, reason } if name == attr && reason.contains("257 bytes")),
            "{attr}: {err}"
        );
        assert_eq!(err.kind(), "invalid_envelope");
    }
    let mut v = serde_json::to_value(event()).unwrap();
    v["subject"] = json!("x".repeat(MAX_ATTRIBUTE_LEN));
    assert!(testkit::sample::codec()
        .decode(&serde_json::to_vec(&v).unwrap())
        .is_ok());
}

#[test]
fn fixture_line_over_the_limit_is_reported_and_the_next_line_still_read() {
    let good = String::from_utf8(testkit::sample::codec().encode(&event())).unwrap();
    let huge = "y".repeat(MAX_LINE + 10);
    let text = format!("{huge}\n{good}\n{}", "z".repeat(MAX_LINE + 1));
    let lines = fixtures::parse(
        Path::new("big.jsonl"),
        text.as_bytes(),
        &testkit::sample::codec(),
    )
    .unwrap();
    assert_eq!(lines.len(), 3);
    let err = lines[0].event.as_ref().unwrap_err();
    assert_eq!(err.kind, FixtureErrorKind::LineTooLong(MAX_LINE + 10));
    assert_eq!(
        err.to_string(),
        format!(
            "big.jsonl:1: line of {} bytes is longer than the maximum of {MAX_LINE}",
            MAX_LINE + 10
        )
    );
    assert!(lines[0].raw.is_empty(), "an over-long line is not kept");
    assert_eq!(lines[1].line, 2);
    assert!(lines[1].event.is_ok());
    // The last line has no newline and is over the limit too.
    assert_eq!(
        lines[2].event.as_ref().unwrap_err().kind,
        FixtureErrorKind::LineTooLong(MAX_LINE + 1)
    );
}
