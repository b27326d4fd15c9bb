//! Inventory's pessimistic locks, seen from PostgreSQL itself: which stock
//! rows a reservation holds, who waits for whom (`pg_locks`,
//! `pg_blocking_pids`), and that the batch preparer locks a whole batch's
//! rows ahead of its handlers. No timing: every wait is observed, not
//! slept through.

use std::collections::BTreeMap;

use consumers::Prepare;
use events::Envelope;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;
use warren_shop::catalog::{OrderCancelled, OrderLine, OrderPlaced, ShipmentDispatched, StockLine};
use warren_shop::inventory::{reserve, Reservation, StockLock};

async fn stock(pool: &PgPool, levels: &[(&str, i32)]) {
    for (sku, on_hand) in levels {
        warren_shop::inventory::set_level(pool, sku, *on_hand)
            .await
            .unwrap();
    }
}

fn wanted(lines: &[(&str, i32)]) -> BTreeMap<String, i32> {
    lines.iter().map(|(s, q)| (s.to_string(), *q)).collect()
}

/// A connection of its own with a transaction open on it, and its backend
/// pid. A lock timeout turns a wait that should not happen into an error
/// instead of a hung test.
async fn open_tx(pool: &PgPool) -> (PgConnection, i32) {
    let mut conn = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '20s'")
        .execute(&mut conn)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    (conn, pid)
}

/// The stock rows among `skus` that some transaction holds locked, seen
/// from outside: `SKIP LOCKED` passes over exactly those.
async fn locked_rows(pool: &PgPool, skus: &[&str]) -> Vec<String> {
    let mut tx = pool.begin().await.unwrap();
    let free: Vec<String> = sqlx::query_scalar(
        "SELECT sku FROM inventory.stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE SKIP LOCKED",
    )
    .bind(skus)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let mut held: Vec<String> = skus
        .iter()
        .filter(|s| !free.iter().any(|f| f == *s))
        .map(|s| s.to_string())
        .collect();
    held.sort();
    held
}

/// (granted, waiting) locks of backend `pid` on `inventory.stock`.
async fn stock_locks(pool: &PgPool, pid: i32) -> (Vec<String>, Vec<String>) {
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT mode, granted FROM pg_locks WHERE pid = $1 AND relation = 'inventory.stock'::regclass",
    )
    .bind(pid)
    .fetch_all(pool)
    .await
    .unwrap();
    let granted = rows.iter().filter(|r| r.1).map(|r| r.0.clone()).collect();
    let waiting = rows.iter().filter(|r| !r.1).map(|r| r.0.clone()).collect();
    (granted, waiting)
}

async fn blocking_pids(pool: &PgPool, pid: i32) -> Vec<i32> {
    sqlx::query_scalar("SELECT unnest(pg_blocking_pids($1))")
        .bind(pid)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn reservations_of_disjoint_skus_hold_their_row_locks_at_the_same_time(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    stock(&pool, &[("A", 5), ("B", 5), ("C", 5), ("D", 5), ("E", 5)]).await;
    let (mut one, pid_one) = open_tx(&pool).await;
    let (mut two, pid_two) = open_tx(&pool).await;

    // Both reserve while neither has committed: the second does not wait
    // for the first (it would hit the lock timeout if it did).
    assert_eq!(
        reserve(&mut one, &wanted(&[("B", 1), ("A", 2)]))
            .await
            .unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        reserve(&mut two, &wanted(&[("D", 1), ("C", 3)]))
            .await
            .unwrap(),
        Reservation::Reserved
    );

    // Both hold their locks on the table at once, neither waits...
    for pid in [pid_one, pid_two] {
        let (granted, waiting) = stock_locks(&pool, pid).await;
        assert!(
            granted.iter().any(|m| m == "RowShareLock")
                && granted.iter().any(|m| m == "RowExclusiveLock"),
            "backend {pid} holds row locks on inventory.stock: {granted:?}"
        );
        assert!(waiting.is_empty(), "backend {pid} waits for {waiting:?}");
        assert!(blocking_pids(&pool, pid).await.is_empty());
    }
    // ...and exactly the rows they reserved are locked, no other: not the
    // whole table, not a service-wide lock.
    assert_eq!(
        locked_rows(&pool, &["A", "B", "C", "D", "E"]).await,
        ["A", "B", "C", "D"]
    );
    let advisory: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = ANY($1)",
    )
    .bind([pid_one, pid_two])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(advisory, 0, "no advisory lock serialises stock writers");

    sqlx::query("COMMIT").execute(&mut one).await.unwrap();
    sqlx::query("COMMIT").execute(&mut two).await.unwrap();
    assert!(locked_rows(&pool, &["A", "B", "C", "D"]).await.is_empty());
    let levels: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT sku, on_hand, reserved FROM inventory.stock ORDER BY sku")
            .fetch_all(&pool)
            .await
            .unwrap();
    let levels: Vec<(&str, i32, i32)> = levels
        .iter()
        .map(|(s, o, r)| (s.as_str(), *o, *r))
        .collect();
    assert_eq!(
        levels,
        [
            ("A", 3, 2),
            ("B", 4, 1),
            ("C", 2, 3),
            ("D", 4, 1),
            ("E", 5, 0)
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn a_reservation_of_an_overlapping_sku_waits_for_the_holder_and_never_oversells(
    pool: PgPool,
) {
    warren_shop::migrate(&pool).await.unwrap();
    stock(&pool, &[("HOT", 1), ("X", 5), ("Y", 5)]).await;
    let (mut one, pid_one) = open_tx(&pool).await;
    assert_eq!(
        reserve(&mut one, &wanted(&[("HOT", 1), ("X", 1)]))
            .await
            .unwrap(),
        Reservation::Reserved
    );

    // The second wants HOT too (listed after Y, locked in SKU order).
    let (mut two, pid_two) = open_tx(&pool).await;
    let second = tokio::spawn(async move {
        let r = reserve(&mut two, &wanted(&[("Y", 1), ("HOT", 1)]))
            .await
            .unwrap();
        sqlx::query("COMMIT").execute(&mut two).await.unwrap();
        r
    });
    // It waits, on the first and only on it.
    loop {
        let blockers = blocking_pids(&pool, pid_two).await;
        if !blockers.is_empty() {
            assert_eq!(blockers, [pid_one]);
            break;
        }
        assert!(!second.is_finished(), "the second reservation did not wait");
        tokio::task::yield_now().await;
    }
    sqlx::query("COMMIT").execute(&mut one).await.unwrap();
    assert_eq!(
        second.await.unwrap(),
        Reservation::Rejected("HOT: 1 wanted, 0 on hand".into()),
        "it read the level the first left, not the one before"
    );
    let levels: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT sku, on_hand, reserved FROM inventory.stock ORDER BY sku")
            .fetch_all(&pool)
            .await
            .unwrap();
    let levels: Vec<(&str, i32, i32)> = levels
        .iter()
        .map(|(s, o, r)| (s.as_str(), *o, *r))
        .collect();
    assert_eq!(
        levels,
        [("HOT", 0, 1), ("X", 4, 1), ("Y", 5, 0)],
        "all or nothing: the rejected order reserved no Y"
    );
}

#[sqlx::test(migrations = false)]
async fn the_preparer_locks_every_sku_of_a_batch_sorted_before_any_handler(pool: PgPool) {
    warren_shop::migrate(&pool).await.unwrap();
    stock(&pool, &[("A", 5), ("B", 5), ("C", 5), ("D", 5), ("E", 5)]).await;
    // An order already holding C, whose cancellation is in the batch, and
    // one holding E, whose dispatch is.
    let (held, shipped) = (Uuid::now_v7(), Uuid::now_v7());
    for (order, sku) in [(held, "C"), (shipped, "E")] {
        sqlx::query(
            "INSERT INTO inventory.reservations (order_id, lines, status) VALUES ($1, $2, 'held')",
        )
        .bind(order)
        .bind(sqlx::types::Json(vec![StockLine {
            sku: sku.into(),
            qty: 1,
        }]))
        .execute(&pool)
        .await
        .unwrap();
    }
    let placed = |skus: &[&str]| {
        let order = Uuid::now_v7();
        Envelope::new(
            "orders",
            order.to_string(),
            &OrderPlaced {
                order_id: order,
                customer_id: Uuid::now_v7(),
                lines: skus
                    .iter()
                    .map(|s| OrderLine {
                        sku: s.to_string(),
                        qty: 1,
                        unit_price: 100,
                    })
                    .collect(),
                total: 100,
                payment_token: "tok_ok".into(),
            },
        )
    };
    let batch = [
        placed(&["B"]),
        Envelope::new(
            "orders",
            held.to_string(),
            &OrderCancelled {
                order_id: held,
                reason: "test".into(),
            },
        ),
        placed(&["A"]),
        Envelope::new(
            "shipping",
            shipped.to_string(),
            &ShipmentDispatched {
                order_id: shipped,
                shipment_id: Uuid::now_v7(),
            },
        ),
    ];
    let refs: Vec<&Envelope> = batch.iter().collect();
    let (mut tx, _) = open_tx(&pool).await;
    StockLock.prepare(&mut tx, &refs).await.unwrap();
    assert_eq!(
        locked_rows(&pool, &["A", "B", "C", "D", "E"]).await,
        ["A", "B", "C", "E"],
        "the placed orders' SKUs, the cancelled and the dispatched reservations', not D"
    );
    sqlx::query("ROLLBACK").execute(&mut tx).await.unwrap();
}
