//! Nothing in `events` may panic on input from the bus or a fixture file:
//! arbitrary bytes, valid documents with one attribute replaced by an
//! arbitrary JSON value, and binary-mode headers with arbitrary values all
//! end in `Ok` or a `DecodeError`. proptest runs each property 256 times
//! per `cargo test` (set `PROPTEST_CASES` for a longer run).

use proptest::prelude::*;
use serde_json::Value;
use testkit::sample::{OrderLine, OrderPlaced};
use uuid::Uuid;
use warren_events::Envelope;

fn valid() -> Envelope {
    let data = OrderPlaced {
        order_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            qty: 2,
            unit_price: 150,
        }],
        total: 300,
        payment_token: "tok_ok".into(),
    };
    let mut e = Envelope::new("orders", data.order_id.to_string(), &data);
    e.sequence = 1;
    e
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const ATTRIBUTES: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "data",
    "dataversion",
    "sequence",
    "correlationid",
    "causationid",
    "traceparent",
];

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let codec = testkit::sample::codec().with_max_body(1024);
        let _ = codec.decode(&body);
        let _ = codec.decode_message(None, std::iter::empty(), &body);
        let _ = warren_events::fixtures::parse(std::path::Path::new("fuzz.jsonl"), &body[..], &codec);
    }

    #[test]
    fn one_attribute_replaced_never_panics(which in 0..ATTRIBUTES.len(), value in json(), remove in any::<bool>()) {
        let codec = testkit::sample::codec();
        let mut doc: serde_json::Map<String, Value> =
            serde_json::from_slice(&codec.encode(&valid())).unwrap();
        if remove {
            doc.remove(ATTRIBUTES[which]);
        } else {
            doc.insert(ATTRIBUTES[which].into(), value);
        }
        let body = serde_json::to_vec(&doc).unwrap();
        let _ = codec.decode(&body);
    }

    #[test]
    fn data_fields_replaced_never_panic(field in "(order_id|customer_id|lines|total|payment_token|qty|sku)", value in json()) {
        let codec = testkit::sample::codec();
        let mut doc: Value = serde_json::from_slice(&codec.encode(&valid())).unwrap();
        if let Some(line) = doc["data"]["lines"].get_mut(0) {
            line[field.as_str()] = value.clone();
        }
        doc["data"][field.as_str()] = value;
        let _ = codec.decode(&serde_json::to_vec(&doc).unwrap());
    }

    #[test]
    fn binary_mode_headers_never_panic(which in 0..ATTRIBUTES.len(), value in json(),
                                       body in prop::collection::vec(any::<u8>(), 0..256),
                                       content_type in proptest::option::of("\\PC{0,30}")) {
        let codec = testkit::sample::codec();
        let e = valid();
        let mut headers: Vec<(String, Value)> = vec![
            ("ce-specversion".into(), "1.0".into()),
            ("ce-id".into(), e.id.to_string().into()),
            ("ce-source".into(), e.source.clone().into()),
            ("ce-type".into(), e.event_type.clone().into()),
            ("ce-subject".into(), e.subject.clone().into()),
            ("ce-sequence".into(), "1".into()),
            ("ce-dataversion".into(), "1".into()),
        ];
        headers.push((format!("ce-{}", ATTRIBUTES[which]), value));
        let _ = codec.decode_message(
            content_type.as_deref(),
            headers.iter().map(|(k, v)| (k.as_str(), v.clone())),
            &body,
        );
    }
}
