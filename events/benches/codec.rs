//! Cost of the contract on the hot path: encoding an `order.placed`
//! envelope and decoding (with full validation) what comes off the bus;
//! and what each side does per event: a producer builds and encodes the
//! envelope, a consumer decodes it and reads the typed `data`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use testkit::sample::{OrderLine, OrderPlaced};
use uuid::Uuid;
use warren_events::Envelope;

fn order_placed() -> Envelope {
    let data = OrderPlaced {
        order_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        lines: (0..3)
            .map(|i| OrderLine {
                sku: format!("SKU-{i}"),
                qty: i + 1,
                unit_price: 1999,
            })
            .collect(),
        total: 11994,
        payment_token: "tok_ok".into(),
    };
    let mut e = Envelope::new("orders", data.order_id.to_string(), &data);
    e.sequence = 1;
    e
}

fn codec(c: &mut Criterion) {
    let codec = testkit::sample::codec();
    let e = order_placed();
    let body = codec.encode(&e);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("encode order.placed", |b| b.iter(|| codec.encode(&e)));
    g.bench_function("decode order.placed", |b| b.iter(|| codec.decode(&body)));
    g.bench_function("produce order.placed (new + encode)", |b| {
        b.iter(|| codec.encode(&order_placed()))
    });
    g.bench_function("consume order.placed (decode + data_as)", |b| {
        b.iter(|| codec.decode(&body).and_then(|e| e.data_as::<OrderPlaced>()))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
