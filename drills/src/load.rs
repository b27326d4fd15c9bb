//! The traffic of a drill: customers and stock set over HTTP, then a
//! mixed run of orders — captured, declined (`tok_decline`) and out of
//! stock (scarce SKUs run dry, some lines name an unknown SKU) — placed
//! half over HTTP (`POST /orders`, so the orders outbox and relay are in
//! play) and half as `order.placed` events published straight to the
//! exchange, as `warren replay` would. Both placers ride out faults: HTTP
//! retries a refused connection or a 5xx on the next live process, the
//! bus publisher reconnects and republishes the same event (same id, so
//! the inbox absorbs a duplicate).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use events::{Codec, Envelope};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Confirmation;
use lapin::{Channel, Connection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use services::catalog::{OrderLine, OrderPlaced};
use uuid::Uuid;

use crate::cluster::Env;

/// SKUs with stock for every order that asks.
pub const PLENTY: [&str; 6] = ["SKU-A", "SKU-B", "SKU-C", "SKU-D", "SKU-E", "SKU-F"];
/// SKUs that run out during a run.
pub const SCARCE: [&str; 2] = ["SKU-G", "SKU-H"];
/// Units of each scarce SKU.
pub const SCARCE_UNITS: i32 = 120;
/// Units of each plentiful SKU.
pub const PLENTY_UNITS: i32 = 1_000_000;

/// How an order enters the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /orders`.
    Http,
    /// `order.placed` published to the exchange.
    Bus,
}

/// One order of the plan.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Entry path.
    pub via: Via,
    /// Customer.
    pub customer: Uuid,
    /// Lines.
    pub lines: Vec<OrderLine>,
    /// `tok_ok` or `tok_decline`.
    pub token: &'static str,
}

/// What the placers know about the orders they placed.
#[derive(Debug, Default)]
pub struct Placed {
    /// Orders the system acknowledged (202, or a confirmed publish).
    pub ids: HashSet<Uuid>,
    /// Requests whose outcome is unknown (the connection broke after
    /// sending): the order may or may not exist; the audit counts what
    /// the stores hold either way.
    pub in_doubt: usize,
    /// HTTP attempts repeated after a refused connection or a 5xx.
    pub http_retries: usize,
    /// Events published again after a failed or unconfirmed publish.
    pub republished: usize,
    /// HTTP orders refused with a 4xx (a bug in the drill or in warren).
    pub refused: usize,
}

/// Shared between the placers and the drill.
pub type Shared = Arc<Mutex<Placed>>;

/// Locks the shared record; a placer that panicked leaves it usable.
pub fn lock(p: &Shared) -> std::sync::MutexGuard<'_, Placed> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `n` customers and sets the stock over HTTP at `base`, then
/// waits until orders' read model knows every customer. Returns the
/// customers and the stock levels set.
pub async fn seed(
    env: &Env,
    base: &str,
    n: usize,
) -> anyhow::Result<(Vec<Uuid>, BTreeMap<String, i32>)> {
    let http = reqwest::Client::new();
    let mut customers = Vec::with_capacity(n);
    for i in 0..n {
        let r = http
            .post(format!("{base}/customers"))
            .json(&json!({"name": format!("Drill {i}"), "email": format!("drill{i}-{}@example.com", env.namespace)}))
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("POST /customers answered {}", r.status());
        }
        let v: serde_json::Value = r.json().await?;
        customers.push(v["id"].as_str().context("no id")?.parse()?);
    }
    let mut stock = BTreeMap::new();
    for (sku, units) in PLENTY
        .iter()
        .map(|s| (*s, PLENTY_UNITS))
        .chain(SCARCE.iter().map(|s| (*s, SCARCE_UNITS)))
    {
        let r = http
            .put(format!("{base}/stock/{sku}"))
            .json(&json!({ "on_hand": units }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("PUT /stock/{sku} answered {}", r.status());
        }
        stock.insert(sku.to_owned(), units);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let known: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.customers")
            .fetch_one(env.orders())
            .await?;
        if known as usize >= n {
            return Ok((customers, stock));
        }
        if Instant::now() > deadline {
            bail!("orders knows {known} of {n} customers after 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mixed plan of `n` orders: about 80% `tok_ok`, 20% `tok_decline`;
/// about 15% ask for a scarce SKU (most of those end out of stock) and 2%
/// for an unknown one; half over HTTP, half over the bus.
pub fn plan(n: usize, customers: &[Uuid], rng: &mut StdRng) -> Vec<Planned> {
    (0..n)
        .map(|i| {
            let mut lines = Vec::new();
            for _ in 0..rng.gen_range(1..=3) {
                lines.push(OrderLine {
                    sku: PLENTY[rng.gen_range(0..PLENTY.len())].to_owned(),
                    qty: rng.gen_range(1..=3),
                    unit_price: rng.gen_range(100..10_000),
                });
            }
            let roll = rng.gen_range(0..100);
            if roll < 15 {
                lines.push(OrderLine {
                    sku: SCARCE[rng.gen_range(0..SCARCE.len())].to_owned(),
                    qty: rng.gen_range(1..=4),
                    unit_price: 2_500,
                });
            } else if roll < 17 {
                lines.push(OrderLine {
                    sku: "SKU-UNKNOWN".into(),
                    qty: 1,
                    unit_price: 100,
                });
            }
            Planned {
                via: if i % 2 == 0 { Via::Http } else { Via::Bus },
                customer: customers[rng.gen_range(0..customers.len())],
                lines,
                token: if rng.gen_bool(0.2) {
                    "tok_decline"
                } else {
                    "tok_ok"
                },
            }
        })
        .collect()
}

/// Places HTTP orders on whichever of `targets` answers, retrying a
/// refused connection or a 5xx. Returns the id of the accepted order.
pub async fn place_http(
    http: &reqwest::Client,
    targets: &[String],
    order: &Planned,
    placed: &Shared,
    give_up: Instant,
) -> anyhow::Result<Uuid> {
    let body = json!({
        "customer_id": order.customer,
        "lines": order.lines,
        "payment_token": order.token,
    });
    let mut attempt = 0usize;
    loop {
        let base = &targets[attempt % targets.len()];
        attempt += 1;
        let result = http
            .post(format!("{base}/orders"))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match result {
            Ok(r) if r.status().as_u16() == 202 => {
                let v: serde_json::Value = r.json().await?;
                let id: Uuid = v["id"].as_str().context("no id")?.parse()?;
                lock(placed).ids.insert(id);
                return Ok(id);
            }
            Ok(r) if r.status().is_server_error() => lock(placed).http_retries += 1,
            Ok(r) => {
                lock(placed).refused += 1;
                bail!(
                    "POST /orders answered {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
            }
            Err(e) if e.is_connect() => lock(placed).http_retries += 1,
            Err(_) => {
                // Sent, but no answer: it may have committed. Placing it
                // again makes a new order, which the audit counts too.
                let mut p = lock(placed);
                p.in_doubt += 1;
                p.http_retries += 1;
            }
        }
        if Instant::now() > give_up {
            bail!("no warren process accepted an order for too long");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes events to the exchange with confirms, reconnecting and
/// republishing until each is confirmed.
pub struct BusPublisher {
    amqp_url: String,
    exchange: String,
    link: Option<(Connection, Channel)>,
    codec: Codec,
}

impl BusPublisher {
    /// A publisher to `<namespace>.events`.
    pub fn new(env: &Env) -> Self {
        BusPublisher {
            amqp_url: env.servers.amqp_url.clone(),
            exchange: transport::Topology::new(env.namespace.clone()).exchange(),
            link: None,
            codec: Codec::new(services::catalog::catalog()),
        }
    }

    async fn channel(&mut self) -> anyhow::Result<Channel> {
        if let Some((conn, ch)) = &self.link {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let conn = transport::connect(&self.amqp_url, "warren drills publisher").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        self.link = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// One attempt: sent and confirmed (and routed), or an error.
    pub async fn try_publish(
        &mut self,
        key: &str,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> anyhow::Result<()> {
        let ch = self.channel().await?;
        let confirm = ch
            .basic_publish(
                self.exchange.as_str().into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?;
        match tokio::time::timeout(Duration::from_secs(10), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => bail!("unroutable: no queue bound to {key}"),
            Ok(Ok(other)) => bail!("broker refused the message: {other:?}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("no confirm within 10s"),
        }
    }

    /// Publishes `envelope` until confirmed; `republished` counts retries.
    pub async fn publish(
        &mut self,
        envelope: &Envelope,
        placed: &Shared,
        give_up: Instant,
    ) -> anyhow::Result<()> {
        let body = self.codec.encode(envelope);
        loop {
            let props = transport::event_properties(
                &envelope.id.to_string(),
                &envelope.event_type,
                &envelope.subject,
                envelope.correlationid.as_deref(),
                envelope.time.timestamp(),
                "drills",
            );
            match self.try_publish(&envelope.event_type, &body, props).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.link = None;
                    lock(placed).republished += 1;
                    if Instant::now() > give_up {
                        return Err(e.context("publishing an order for too long"));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        if let Some((conn, _)) = self.link {
            transport::close(conn, "done").await;
        }
    }
}

/// The `order.placed` event of a planned order, as the orders service
/// would raise it (sequence 1 of the order's subject), with its order id.
pub fn order_event(order: &Planned) -> (Uuid, Envelope) {
    let id = Uuid::now_v7();
    let total = order
        .lines
        .iter()
        .map(|l| l.qty as i64 * l.unit_price)
        .sum();
    let mut e = Envelope::new(
        services::orders::SERVICE,
        id.to_string(),
        &OrderPlaced {
            order_id: id,
            customer_id: order.customer,
            lines: order.lines.clone(),
            total,
            payment_token: order.token.to_owned(),
        },
    );
    e.sequence = 1;
    (id, e)
}

/// Places the whole plan over `window`, HTTP and bus orders in two
/// concurrent streams, each paced evenly. `targets` returns the HTTP
/// bases to try, live ones first; it is read for every order, so a drill
/// can swap processes underneath.
pub async fn run(
    env: &Env,
    plan: Vec<Planned>,
    window: Duration,
    targets: Arc<Mutex<Vec<String>>>,
    placed: Shared,
) -> anyhow::Result<()> {
    let give_up = Instant::now() + window + Duration::from_secs(120);
    let (http_orders, bus_orders): (Vec<_>, Vec<_>) =
        plan.into_iter().partition(|o| o.via == Via::Http);
    let http_task = {
        let placed = placed.clone();
        let n = http_orders.len().max(1);
        async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(window / n as u32);
            for o in &http_orders {
                tick.tick().await;
                let t = targets.lock().unwrap_or_else(|e| e.into_inner()).clone();
                place_http(&client, &t, o, &placed, give_up).await?;
            }
            anyhow::Ok(())
        }
    };
    let bus_task = {
        let placed = placed.clone();
        let n = bus_orders.len().max(1);
        let mut publisher = BusPublisher::new(env);
        async move {
            let mut tick = tokio::time::interval(window / n as u32);
            for o in &bus_orders {
                tick.tick().await;
                let (id, e) = order_event(o);
                publisher.publish(&e, &placed, give_up).await?;
                lock(&placed).ids.insert(id);
            }
            publisher.close().await;
            anyhow::Ok(())
        }
    };
    let (a, b) = tokio::join!(http_task, bus_task);
    a.context("HTTP placer")?;
    b.context("bus placer")?;
    Ok(())
}

/// A seeded RNG; the seed is printed so a run can be repeated.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Places one `tok_ok` order of a plentiful SKU over HTTP and waits until
/// it is shipped: the end-to-end proof that the system works again.
/// Returns the time it took and the order id.
pub async fn probe(
    env: &Env,
    targets: &[String],
    customer: Uuid,
    placed: &Shared,
    within: Duration,
) -> anyhow::Result<(Duration, Uuid)> {
    let started = Instant::now();
    let order = Planned {
        via: Via::Http,
        customer,
        lines: vec![OrderLine {
            sku: PLENTY[0].into(),
            qty: 1,
            unit_price: 100,
        }],
        token: "tok_ok",
    };
    let client = reqwest::Client::new();
    let id = place_http(&client, targets, &order, placed, started + within).await?;
    loop {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM orders.orders WHERE id = $1")
                .bind(id)
                .fetch_optional(env.orders())
                .await
                .ok()
                .flatten();
        if status.as_deref() == Some("shipped") {
            return Ok((started.elapsed(), id));
        }
        if started.elapsed() > within {
            bail!("probe order {id} not shipped within {within:?} (status {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
