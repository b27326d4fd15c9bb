//! The audit that ends every drill: exact checks of every store in SQL,
//! plus the broker's queues. A drill passes only when every count of
//! [`Audit::violations`] is zero.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use crate::cluster::{Env, SCHEMAS};

/// What the stores say after a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Orders in `orders.orders`.
    pub orders: i64,
    /// Orders by status.
    pub by_status: BTreeMap<String, i64>,
    /// Orders the placers had acknowledged.
    pub acknowledged: usize,
    /// Acknowledged orders missing from the store: lost.
    pub missing: usize,
    /// Orders still `pending` or `confirmed` (not settled).
    pub unsettled: i64,
    /// Units shipped, over all SKUs.
    pub units_shipped: i64,
    /// Shipments in `shipping.shipments`.
    pub shipments: i64,
    /// Charges the gateway captured.
    pub captures: i64,
    /// Refunds the gateway made.
    pub refunds: i64,
    /// Each violated rule with the number of rows breaking it.
    pub violations: BTreeMap<String, i64>,
    /// Events lost: acknowledged orders missing, orders stuck unsettled,
    /// units never moved back (on_hand below expectation is "doubled").
    pub lost: i64,
    /// Effects applied twice: second shipments, charges or refunds, units
    /// taken from stock twice, captures left on cancelled orders.
    pub doubled: i64,
    /// Messages in dead-letter queues.
    pub dead_letters: u32,
    /// Messages still in work and retry queues.
    pub in_queues: u32,
    /// Unpublished outbox rows.
    pub outbox_backlog: i64,
}

impl Audit {
    /// Whether everything settled and no rule is broken.
    pub fn passed(&self) -> bool {
        self.violations.values().all(|n| *n == 0)
    }
}

/// With orders on a database of its own, copies its tables the audit
/// reads (customers, orders, lines) into the drill database's `orders`
/// schema, which the migrations created and nothing else writes, so the
/// checks that join orders with stock, payments and shipments run as they
/// do on one database. Taken after the system settled, it is a consistent
/// snapshot for the audit that follows.
async fn snapshot_orders(env: &Env) -> anyhow::Result<()> {
    let Some((_, orders)) = &env.orders_database else {
        return Ok(());
    };
    let mut tx = env.pool.begin().await?;
    sqlx::query("TRUNCATE orders.order_lines, orders.orders, orders.customers CASCADE")
        .execute(&mut *tx)
        .await?;
    for table in ["customers", "orders", "order_lines"] {
        let rows: Option<serde_json::Value> =
            sqlx::query_scalar(&format!("SELECT jsonb_agg(t) FROM orders.{table} t"))
                .fetch_one(orders)
                .await?;
        sqlx::query(&format!(
            "INSERT INTO orders.{table} SELECT * FROM jsonb_populate_recordset(NULL::orders.{table}, $1)"
        ))
        .bind(rows.unwrap_or_else(|| serde_json::json!([])))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn count(env: &Env, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(&env.pool).await?)
}

/// Runs every check once. `stock_set` is the level each SKU was set to.
pub async fn audit(
    env: &Env,
    acknowledged: &HashSet<Uuid>,
    stock_set: &BTreeMap<String, i32>,
    expect_dead_letters: bool,
) -> anyhow::Result<Audit> {
    snapshot_orders(env).await?;
    let mut a = Audit {
        acknowledged: acknowledged.len(),
        ..Default::default()
    };
    let ids: Vec<Uuid> = acknowledged.iter().copied().collect();
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(&env.pool)
        .await?;
    a.missing = acknowledged.len() - found as usize;
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders.orders GROUP BY status")
            .fetch_all(&env.pool)
            .await?;
    a.by_status = statuses.into_iter().collect();
    a.orders = a.by_status.values().sum();
    a.unsettled = a.by_status.get("pending").copied().unwrap_or(0)
        + a.by_status.get("confirmed").copied().unwrap_or(0);

    let mut v = BTreeMap::new();
    v.insert("acknowledged order missing".into(), a.missing as i64);
    v.insert("order not settled (pending/confirmed)".into(), a.unsettled);

    // Stock: reserved back to 0, on_hand = set - shipped, never negative.
    let rows: Vec<(String, i32, i32, i64)> = sqlx::query_as(
        "SELECT s.sku, s.on_hand, s.reserved, COALESCE(sh.units, 0)::bigint FROM inventory.stock s \
         LEFT JOIN (SELECT l.sku, sum(l.qty) AS units FROM orders.order_lines l \
                    JOIN orders.orders o ON o.id = l.order_id WHERE o.status = 'shipped' GROUP BY l.sku) sh \
         USING (sku)",
    )
    .fetch_all(&env.pool)
    .await?;
    let (mut reserved, mut over, mut under, mut negative) = (0i64, 0i64, 0i64, 0i64);
    for (sku, on_hand, res, shipped) in &rows {
        a.units_shipped += shipped;
        reserved += *res as i64;
        let expected = stock_set.get(sku).copied().unwrap_or(0) as i64 - shipped;
        if (*on_hand as i64) < expected {
            over += expected - *on_hand as i64;
        } else {
            under += *on_hand as i64 - expected;
        }
        if *on_hand < 0 || expected < 0 {
            negative += 1;
        }
    }
    v.insert("units still reserved".into(), reserved);
    v.insert(
        "units taken from stock twice (on_hand below set - shipped)".into(),
        over,
    );
    v.insert(
        "units missing their move (on_hand above set - shipped)".into(),
        under,
    );
    v.insert("SKU oversold (negative level)".into(), negative);
    v.insert(
        "reservation still held".into(),
        count(
            env,
            "SELECT count(*) FROM inventory.reservations WHERE status = 'held'",
        )
        .await?,
    );
    v.insert(
        "shipped order without a shipped reservation".into(),
        count(
            env,
            "SELECT count(*) FROM orders.orders o LEFT JOIN inventory.reservations r ON r.order_id = o.id \
             WHERE o.status = 'shipped' AND r.status IS DISTINCT FROM 'shipped'",
        )
        .await?,
    );
    v.insert(
        "cancelled order with a shipped reservation".into(),
        count(
            env,
            "SELECT count(*) FROM orders.orders o JOIN inventory.reservations r ON r.order_id = o.id \
             WHERE o.status = 'cancelled' AND r.status = 'shipped'",
        )
        .await?,
    );

    // Shipping: exactly one shipment per shipped order, none for others.
    a.shipments = count(env, "SELECT count(*) FROM shipping.shipments").await?;
    v.insert(
        "shipped order without a shipment".into(),
        count(
            env,
            "SELECT count(*) FROM orders.orders o WHERE o.status = 'shipped' \
             AND NOT EXISTS (SELECT 1 FROM shipping.shipments s WHERE s.order_id = o.id)",
        )
        .await?,
    );
    let second_shipments = count(
        env,
        "SELECT COALESCE(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM shipping.shipments GROUP BY order_id) x",
    )
    .await?;
    v.insert("second shipment of an order".into(), second_shipments);
    v.insert(
        "shipment of an order that is not shipped".into(),
        count(
            env,
            "SELECT count(*) FROM shipping.shipments s LEFT JOIN orders.orders o ON o.id = s.order_id \
             WHERE o.status IS DISTINCT FROM 'shipped'",
        )
        .await?,
    );

    // Payments: the gateway's ledger is the money that really moved.
    a.captures = count(
        env,
        "SELECT count(*) FROM payments.gateway_ledger WHERE kind = 'charge' AND outcome = 'captured'",
    )
    .await?;
    a.refunds = count(
        env,
        "SELECT count(*) FROM payments.gateway_ledger WHERE kind = 'refund'",
    )
    .await?;
    let double_charges = count(
        env,
        "SELECT COALESCE(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM payments.gateway_ledger \
         WHERE kind = 'charge' GROUP BY order_id) x",
    )
    .await?;
    let double_refunds = count(
        env,
        "SELECT COALESCE(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM payments.gateway_ledger \
         WHERE kind = 'refund' GROUP BY order_id) x",
    )
    .await?;
    v.insert("second charge of an order".into(), double_charges);
    v.insert("second refund of an order".into(), double_refunds);
    v.insert(
        "shipped order not captured for its total".into(),
        count(
            env,
            "SELECT count(*) FROM orders.orders o WHERE o.status = 'shipped' AND NOT EXISTS \
             (SELECT 1 FROM payments.payments p JOIN payments.gateway_ledger g \
                ON g.order_id = p.order_id AND g.kind = 'charge' AND g.outcome = 'captured' AND g.payment_id = p.payment_id \
              WHERE p.order_id = o.id AND p.status = 'captured' AND p.amount = o.total)",
        )
        .await?,
    );
    let cancelled_captured = count(
        env,
        "SELECT count(*) FROM orders.orders o WHERE o.status = 'cancelled' AND (\
           EXISTS (SELECT 1 FROM payments.payments p WHERE p.order_id = o.id AND p.status = 'captured') \
           OR (EXISTS (SELECT 1 FROM payments.gateway_ledger g WHERE g.order_id = o.id AND g.kind = 'charge' AND g.outcome = 'captured') \
               AND NOT EXISTS (SELECT 1 FROM payments.gateway_ledger g WHERE g.order_id = o.id AND g.kind = 'refund')))",
    )
    .await?;
    v.insert("cancelled order left captured".into(), cancelled_captured);
    v.insert(
        "captured payment the gateway never charged".into(),
        count(
            env,
            "SELECT count(*) FROM payments.payments p WHERE p.status IN ('captured', 'refunded') AND NOT EXISTS \
             (SELECT 1 FROM payments.gateway_ledger g WHERE g.kind = 'charge' AND g.outcome = 'captured' AND g.payment_id = p.payment_id)",
        )
        .await?,
    );
    v.insert(
        "settled order without a payment record".into(),
        count(
            env,
            "SELECT count(*) FROM orders.orders o WHERE o.status IN ('shipped', 'cancelled') \
             AND NOT EXISTS (SELECT 1 FROM payments.payments p WHERE p.order_id = o.id)",
        )
        .await?,
    );

    // The saga's rules by token.
    v.insert(
        "tok_decline order not cancelled".into(),
        count(
            env,
            "SELECT count(*) FROM orders.orders WHERE payment_token = 'tok_decline' AND status <> 'cancelled'",
        )
        .await?,
    );

    // Messaging: outboxes published, queues drained.
    for s in SCHEMAS {
        // Each outbox where its service lives.
        let pool = if s == "orders" {
            env.orders()
        } else {
            &env.pool
        };
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {s}.outbox WHERE published_at IS NULL"
        ))
        .fetch_one(pool)
        .await?;
        a.outbox_backlog += n;
    }
    v.insert("unpublished outbox row".into(), a.outbox_backlog);
    for (_, work, dlq) in env.queue_depths().await? {
        a.in_queues += work;
        a.dead_letters += dlq;
    }
    v.insert(
        "message left in a work or retry queue".into(),
        a.in_queues as i64,
    );
    if !expect_dead_letters {
        v.insert("dead letter".into(), a.dead_letters as i64);
    }

    a.lost = a.missing as i64 + a.unsettled + under + reserved;
    a.doubled = second_shipments + double_charges + double_refunds + over + cancelled_captured;
    a.violations = v;
    Ok(a)
}

/// Audits until everything passes twice in a row (one poll apart, so a
/// message in flight between two queues is not mistaken for quiet), or
/// until `within` passes; returns the last audit and the time it took.
pub async fn settle(
    env: &Env,
    acknowledged: &HashSet<Uuid>,
    stock_set: &BTreeMap<String, i32>,
    expect_dead_letters: bool,
    within: Duration,
) -> anyhow::Result<(Audit, Duration)> {
    let started = Instant::now();
    let mut passes = 0;
    loop {
        let a = match audit(env, acknowledged, stock_set, expect_dead_letters).await {
            Ok(a) => a,
            Err(e) if started.elapsed() < within => {
                eprintln!("  audit failed ({e:#}); trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        passes = if a.passed() { passes + 1 } else { 0 };
        if passes >= 2 || started.elapsed() > within {
            return Ok((a, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The audit as report lines.
pub fn render(a: &Audit) -> String {
    let mut out = format!(
        "  orders {} ({}), acknowledged {}, shipments {}, captures {}, refunds {}, units shipped {}\n  lost {}, doubled {}, dead letters {}, left in queues {}, outbox backlog {}\n",
        a.orders,
        a.by_status.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        a.acknowledged,
        a.shipments,
        a.captures,
        a.refunds,
        a.units_shipped,
        a.lost,
        a.doubled,
        a.dead_letters,
        a.in_queues,
        a.outbox_backlog,
    );
    for (rule, n) in &a.violations {
        if *n != 0 {
            out.push_str(&format!("  VIOLATION: {rule}: {n}\n"));
        }
    }
    out.push_str(if a.passed() {
        "  audit: PASS\n"
    } else {
        "  audit: FAIL\n"
    });
    out
}
