//! The wire contract: round trips for every event type, one rejection per
//! kind of bad input, binary mode, upcasting and fixtures.

use std::path::Path;

use events::fixtures::{self, FixtureErrorKind};
use events::{Codec, DecodeError, Envelope, EventData};
use serde_json::{json, Value};
use uuid::Uuid;
use warren_shop::catalog::*;

fn u() -> Uuid {
    Uuid::now_v7()
}

fn envelope<E: EventData>(data: &E) -> Envelope {
    let mut e = Envelope::new(E::SOURCE, u().to_string(), data);
    e.sequence = 3;
    e
}

fn round_trip<E: EventData + PartialEq + std::fmt::Debug>(data: E) {
    let codec = Codec::new(catalog());
    let e = envelope(&data);
    let decoded = codec.decode(&codec.encode(&e)).unwrap();
    assert_eq!(decoded, e, "{}", E::TYPE);
    assert_eq!(decoded.data_as::<E>().unwrap(), data);
    assert_eq!(decoded.source, format!("/warren/{}", E::SOURCE));
    assert_eq!(decoded.dataversion, E::VERSION);
}

#[test]
fn every_catalog_type_round_trips() {
    let lines = vec![OrderLine {
        sku: "A".into(),
        qty: 2,
        unit_price: 150,
    }];
    let stock = vec![StockLine {
        sku: "A".into(),
        qty: 2,
    }];
    round_trip(CustomerRegistered {
        customer_id: u(),
        name: "Ada".into(),
        email: "a@x".into(),
    });
    round_trip(CustomerUpdated {
        customer_id: u(),
        name: "Ada L".into(),
        email: "a@x".into(),
        version: Some(2),
    });
    round_trip(OrderPlaced {
        order_id: u(),
        customer_id: u(),
        lines,
        total: 300,
        payment_token: "tok_ok".into(),
    });
    round_trip(OrderConfirmed {
        order_id: u(),
        customer_id: u(),
    });
    round_trip(OrderCancelled {
        order_id: u(),
        reason: "no".into(),
    });
    round_trip(OrderShipped {
        order_id: u(),
        shipment_id: u(),
    });
    round_trip(StockReserved {
        order_id: u(),
        lines: stock.clone(),
        total: 300,
        payment_token: "tok_ok".into(),
    });
    round_trip(StockRejected {
        order_id: u(),
        reason: "none left".into(),
    });
    round_trip(StockReleased {
        order_id: u(),
        lines: stock,
    });
    round_trip(PaymentCaptured {
        order_id: u(),
        payment_id: u(),
        amount: 300,
    });
    round_trip(PaymentFailed {
        order_id: u(),
        reason: "declined".into(),
    });
    round_trip(PaymentRefunded {
        order_id: u(),
        payment_id: u(),
        amount: 300,
    });
    round_trip(ShipmentDispatched {
        order_id: u(),
        shipment_id: u(),
    });
}

#[test]
fn catalog_is_the_domain_table() {
    let got: Vec<(&str, &str)> = catalog().iter().map(|s| (s.event_type, s.source)).collect();
    let want = [
        ("customer.registered", "customers"),
        ("customer.updated", "customers"),
        ("order.placed", "orders"),
        ("order.confirmed", "orders"),
        ("order.cancelled", "orders"),
        ("order.shipped", "orders"),
        ("stock.reserved", "inventory"),
        ("stock.rejected", "inventory"),
        ("stock.released", "inventory"),
        ("payment.captured", "payments"),
        ("payment.failed", "payments"),
        ("payment.refunded", "payments"),
        ("shipment.dispatched", "shipping"),
    ];
    assert_eq!(got, want);
}

#[test]
fn new_envelopes_carry_the_contract_attributes() {
    let e = envelope(&OrderCancelled {
        order_id: u(),
        reason: "x".into(),
    });
    let v: Value = serde_json::from_slice(&Codec::new(catalog()).encode(&e)).unwrap();
    for attr in [
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "dataversion",
        "sequence",
        "correlationid",
        "traceparent",
        "data",
    ] {
        assert!(v.get(attr).is_some(), "{attr} missing");
    }
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(e.id.get_version_num(), 7, "UUID v7");
    let tp = e.traceparent.clone().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    let caused = Envelope::new(
        "payments",
        "s",
        &OrderCancelled {
            order_id: u(),
            reason: "y".into(),
        },
    )
    .caused_by(&e);
    assert_eq!(caused.causationid, Some(e.id.to_string()));
    assert_eq!(caused.correlationid, e.correlationid);
    assert_eq!(
        &caused.traceparent.unwrap()[3..35],
        &tp[3..35],
        "same trace id"
    );
}

fn valid() -> Value {
    let e = envelope(&OrderPlaced {
        order_id: u(),
        customer_id: u(),
        lines: vec![OrderLine {
            sku: "A".into(),
            qty: 1,
            unit_price: 5,
        }],
        total: 5,
        payment_token: "tok_ok".into(),
    });
    serde_json::to_value(e).unwrap()
}

fn decode(v: &Value) -> Result<Envelope, DecodeError> {
    Codec::new(catalog()).decode(&serde_json::to_vec(v).unwrap())
}

#[test]
fn bad_json_is_rejected() {
    let err = Codec::new(catalog()).decode(b"{\"id\": ").unwrap_err();
    assert!(matches!(err, DecodeError::MalformedJson(_)), "{err}");
    assert_eq!(err.kind(), "malformed_json");
    let err = Codec::new(catalog()).decode(b"[1,2]").unwrap_err();
    assert_eq!(err, DecodeError::NotAnObject("an array"));
}

#[test]
fn missing_attribute_is_named() {
    let mut v = valid();
    v.as_object_mut().unwrap().remove("subject");
    let err = decode(&v).unwrap_err();
    assert_eq!(err, DecodeError::MissingAttribute("subject"));
    assert!(err.to_string().contains("`subject`"));
    assert_eq!(err.kind(), "invalid_envelope");
}

#[test]
fn wrong_specversion_is_rejected() {
    let mut v = valid();
    v["specversion"] = json!("0.3");
    let err = decode(&v).unwrap_err();
    assert_eq!(err, DecodeError::WrongSpecVersion("0.3".into()));
    assert!(err.to_string().contains("0.3"));
}

#[test]
fn unknown_type_is_rejected() {
    let mut v = valid();
    v["type"] = json!("order.exploded");
    let err = decode(&v).unwrap_err();
    assert_eq!(err, DecodeError::UnknownType("order.exploded".into()));
    assert_eq!(err.kind(), "unknown_type");
}

#[test]
fn wrong_data_shape_names_the_path() {
    let mut v = valid();
    v["data"]["total"] = json!("lots");
    match decode(&v).unwrap_err() {
        DecodeError::WrongData {
            path, event_type, ..
        } => {
            assert_eq!(path, "data.total");
            assert_eq!(event_type, "order.placed");
        }
        other => panic!("{other}"),
    }
    let mut v = valid();
    v["data"]["lines"][0]["qty"] = json!("one");
    let err = decode(&v).unwrap_err();
    assert!(err.to_string().contains("data.lines[0].qty"), "{err}");
    let mut v = valid();
    v["data"].as_object_mut().unwrap().remove("lines");
    let err = decode(&v).unwrap_err();
    assert!(err.to_string().contains("lines"), "{err}");
    assert_eq!(err.kind(), "invalid_data");
}

#[test]
fn unsupported_dataversion_is_rejected() {
    for version in [0, 7] {
        let mut v = valid();
        v["dataversion"] = json!(version);
        let err = decode(&v).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedDataVersion { version: got, current: 1, .. } if got == version),
            "{err}"
        );
        assert_eq!(err.kind(), "unsupported_version");
    }
}

#[test]
fn oversized_body_is_rejected_unread() {
    let body = serde_json::to_vec(&valid()).unwrap();
    let err = Codec::new(catalog())
        .with_max_body(100)
        .decode(&body)
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            size: body.len(),
            max: 100
        }
    );
    assert_eq!(err.kind(), "too_large");
}

#[test]
fn invalid_attribute_values_are_named() {
    let mut v = valid();
    v["id"] = json!("not-a-uuid");
    let err = decode(&v).unwrap_err();
    assert!(
        matches!(&err, DecodeError::InvalidAttribute { name, .. } if name == "id"),
        "{err}"
    );
    let mut v = valid();
    v["sequence"] = json!(0);
    let err = decode(&v).unwrap_err();
    assert!(
        matches!(&err, DecodeError::InvalidAttribute { name, .. } if name == "sequence"),
        "{err}"
    );
    let mut v = valid();
    v["datacontenttype"] = json!("application/xml");
    let err = decode(&v).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedContentType("application/xml".into())
    );
}

#[test]
fn integer_extensions_accept_numeric_strings() {
    let mut v = valid();
    v["sequence"] = json!("5");
    v["dataversion"] = json!("1");
    let e = decode(&v).unwrap();
    assert_eq!((e.sequence, e.dataversion), (5, 1));
}

#[test]
fn binary_mode_reads_ce_headers_as_strings() {
    let structured = decode(&valid()).unwrap();
    let s = |v: String| Value::String(v);
    let headers = vec![
        ("ce-specversion", s("1.0".into())),
        ("ce-id", s(structured.id.to_string())),
        ("ce-source", s(structured.source.clone())),
        ("ce-type", s(structured.event_type.clone())),
        ("ce-time", s(structured.time.to_rfc3339())),
        ("ce-subject", s(structured.subject.clone())),
        ("ce-dataversion", s("1".into())),
        ("ce-sequence", s("3".into())),
        (
            "ce-correlationid",
            s(structured.correlationid.clone().unwrap()),
        ),
        ("ce-traceparent", s(structured.traceparent.clone().unwrap())),
        ("x-other", s("ignored".into())),
    ];
    let body = serde_json::to_vec(&structured.data).unwrap();
    let binary = Codec::new(catalog())
        .decode_message(Some("application/json"), headers.clone(), &body)
        .unwrap();
    assert_eq!(binary, structured);

    let numeric: Vec<(&str, Value)> = headers
        .iter()
        .map(|(k, v)| match *k {
            "ce-sequence" => (*k, json!(3)),
            "ce-dataversion" => (*k, json!(1)),
            _ => (*k, v.clone()),
        })
        .collect();
    assert_eq!(
        Codec::new(catalog())
            .decode_message(Some("application/json"), numeric, &body)
            .unwrap(),
        structured
    );

    // Structured content type wins over stray headers.
    let whole = serde_json::to_vec(&valid()).unwrap();
    let e = Codec::new(catalog())
        .decode_message(Some(events::CONTENT_TYPE_STRUCTURED), headers, &whole)
        .unwrap();
    assert_eq!(e.event_type, "order.placed");
}

#[test]
fn customer_registered_v1_is_upcast_to_v2() {
    let mut v = serde_json::to_value(envelope(&CustomerRegistered {
        customer_id: u(),
        name: "x".into(),
        email: "a@x".into(),
    }))
    .unwrap();
    v["dataversion"] = json!(1);
    v["data"] =
        json!({ "customer_id": Uuid::now_v7(), "full_name": "Grace Hopper", "email": "g@x" });
    let e = decode(&v).unwrap();
    assert_eq!(e.dataversion, 2);
    assert_eq!(
        e.data_as::<CustomerRegistered>().unwrap().name,
        "Grace Hopper"
    );
    v["data"] = json!({ "customer_id": Uuid::now_v7(), "email": "g@x" });
    let err = decode(&v).unwrap_err();
    assert!(err.to_string().contains("full_name"), "{err}");
}

#[test]
fn fixtures_report_file_and_line_and_round_trip() {
    let codec = Codec::new(catalog());
    let good = serde_json::to_string(&valid()).unwrap();
    let mut unknown = valid();
    unknown["type"] = json!("nope.nope");
    let text = format!("# a comment\n\n{good}\n{{broken\n// another\n{}\n", unknown);
    let lines = fixtures::parse(Path::new("story.jsonl"), text.as_bytes(), &codec).unwrap();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0].line, 3);
    assert!(lines[0].event.is_ok());
    let bad = lines[1].event.as_ref().unwrap_err();
    assert_eq!(bad.line, 4);
    assert!(
        bad.to_string()
            .starts_with("story.jsonl:4: body is not valid JSON"),
        "{bad}"
    );
    let unknown = lines[2].event.as_ref().unwrap_err();
    assert!(matches!(
        unknown.kind,
        FixtureErrorKind::Decode(DecodeError::UnknownType(_))
    ));
    assert!(
        unknown.to_string().starts_with("story.jsonl:6: "),
        "{unknown}"
    );

    let missing = fixtures::read(Path::new("/no/such/file.jsonl"), &codec).unwrap_err();
    assert_eq!(missing.line, 0);
    assert!(
        missing
            .to_string()
            .starts_with("/no/such/file.jsonl: cannot read"),
        "{missing}"
    );

    let events: Vec<Envelope> = (0..3).map(|_| decode(&valid()).unwrap()).collect();
    let mut out = Vec::new();
    fixtures::write(&mut out, &events, &codec).unwrap();
    let back: Vec<Envelope> = fixtures::parse(Path::new("w"), &out[..], &codec)
        .unwrap()
        .into_iter()
        .map(|l| l.event.unwrap())
        .collect();
    assert_eq!(back, events);
}

#[test]
fn shipped_fixtures_are_valid_except_the_deliberately_malformed_line() {
    let codec = Codec::new(catalog());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    for name in [
        "saga-happy.jsonl",
        "saga-out-of-stock.jsonl",
        "saga-declined.jsonl",
    ] {
        let lines = fixtures::read(&Path::new(dir).join(name), &codec).unwrap();
        assert!(lines.iter().all(|l| l.event.is_ok()), "{name}");
    }
    let demo = fixtures::read(&Path::new(dir).join("demo.jsonl"), &codec).unwrap();
    let bad: Vec<_> = demo.iter().filter(|l| l.event.is_err()).collect();
    assert_eq!(bad.len(), 1, "one malformed message in the story");
}

#[test]
fn an_event_decodes_the_same_read_directly_or_through_a_json_tree() {
    // With every attribute present the codec reads the body straight into
    // the envelope; without `datacontenttype` (which then defaults) it
    // takes the JSON-tree path. Same event, same result.
    let full = valid();
    let mut bare = full.clone();
    bare.as_object_mut().unwrap().remove("datacontenttype");
    let direct = decode(&full).unwrap();
    let tree = decode(&bare).unwrap();
    assert_eq!(
        serde_json::to_value(&direct).unwrap(),
        serde_json::to_value(&tree).unwrap()
    );
    // Both apply the checks after reading: an over-long subject is refused
    // on either path, with the same error.
    for mut v in [full, bare] {
        v["subject"] = json!("s".repeat(300));
        assert!(
            matches!(decode(&v).unwrap_err(), DecodeError::InvalidAttribute { name, .. } if name == "subject"),
            "{v}"
        );
    }
}
