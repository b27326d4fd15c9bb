//! Property: for any valid event, decode(encode(e)) == e.

use proptest::prelude::*;
use testkit::sample::{CustomerRegistered, OrderLine, OrderPlaced};
use uuid::Uuid;
use warren_events::Envelope;

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn line() -> impl Strategy<Value = OrderLine> {
    ("[A-Z0-9-]{1,20}", 1..1000i32, 0..1_000_000i64).prop_map(|(sku, qty, unit_price)| OrderLine {
        sku,
        qty,
        unit_price,
    })
}

fn order() -> impl Strategy<Value = OrderPlaced> {
    (
        uuid(),
        uuid(),
        prop::collection::vec(line(), 1..8),
        any::<i64>(),
        "\\PC{1,30}",
    )
        .prop_map(
            |(order_id, customer_id, lines, total, payment_token)| OrderPlaced {
                order_id,
                customer_id,
                lines,
                total,
                payment_token,
            },
        )
}

fn customer() -> impl Strategy<Value = CustomerRegistered> {
    (uuid(), "\\PC{0,40}", "\\PC{0,40}").prop_map(|(customer_id, name, email)| CustomerRegistered {
        customer_id,
        name,
        email,
    })
}

fn dress(
    mut e: Envelope,
    subject: String,
    seq: i64,
    corr: Option<String>,
    cause: Option<String>,
) -> Envelope {
    e.subject = subject;
    e.sequence = seq;
    e.correlationid = corr;
    e.causationid = cause;
    e
}

proptest! {
    #[test]
    fn order_placed_round_trips(data in order(), subject in "[a-z0-9-]{1,40}", seq in 1..i64::MAX,
                                corr in proptest::option::of("[a-z0-9-]{1,36}"), cause in proptest::option::of("[a-z0-9-]{1,36}")) {
        let codec = testkit::sample::codec();
        let e = dress(Envelope::new("orders", "x", &data), subject, seq, corr, cause);
        let back = codec.decode(&codec.encode(&e)).unwrap();
        prop_assert_eq!(back.data_as::<OrderPlaced>().unwrap(), data);
        prop_assert_eq!(back, e);
    }

    #[test]
    fn customer_registered_round_trips(data in customer(), subject in "\\PC{1,40}", seq in 1..i64::MAX) {
        let codec = testkit::sample::codec();
        let e = dress(Envelope::new("customers", "x", &data), subject, seq, None, None);
        prop_assert_eq!(codec.decode(&codec.encode(&e)).unwrap(), e);
    }
}
