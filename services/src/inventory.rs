//! Inventory: stock levels and reservations.
//!
//! `on_hand` counts units free to sell, `reserved` units held for live
//! orders. A reservation moves units from on_hand to reserved (all lines of
//! an order or none), a release moves them back, a dispatch removes them
//! from reserved. Reservations use optimistic locking on `version`: read
//! the levels, then update each row only if its version is unchanged; a
//! conflict rolls the attempt back to a savepoint and tries again, and the
//! `on_hand >= 0` check constraint backs the rule up. Stock is never
//! oversold, whatever the concurrency.

use std::collections::BTreeMap;

use crate::catalog::*;
use axum::extract::{Path, State};
use axum::routing::put;
use axum::Router as HttpRouter;
use consumers::{Context, Handle, HandleError, Router};
use serde::Deserialize;
use serde_json::json;
use sqlx::{Acquire, PgConnection};

use crate::app::Shared;
use crate::http::{ApiError, Json};

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "inventory";
/// Optimistic-lock attempts inside one delivery before it becomes a
/// broker retry.
pub const LOCK_ATTEMPTS: u32 = 8;
/// Key of the transaction-level advisory lock that serialises inventory's
/// stock-changing handlers (`'WARRSTCK'`; the relay's locks use two-key
/// form, a different key space).
pub const STOCK_LOCK: i64 = 0x5741_5252_5354_434B;

/// Takes the stock lock until the end of the handler's transaction.
///
/// A lane applies a batch of deliveries in one transaction, and the events
/// of one batch touch SKUs in no common order, so two lanes' batches could
/// each hold a stock row the other wants: a deadlock that PostgreSQL
/// breaks only after `deadlock_timeout` (1 s), aborting one batch into a
/// broker retry. The kill drill found them (7 deadlocks, 93 one-second lock
/// waits in a run of 300 orders), and an event that deadlocks `max_attempts` times is dead-lettered, leaving
/// stock reserved for good. Every order touches the same few hot rows
/// anyway, so one stock writer at a time costs little, while batching
/// keeps commits cheap.
async fn lock_stock(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(STOCK_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

/// The consumer side of inventory.
#[derive(Clone, Default)]
pub struct Inventory;

/// Its handlers, by event type.
pub fn router() -> Router {
    Router::new(SERVICE)
        .on::<OrderPlaced, _>(Inventory)
        .on::<OrderCancelled, _>(Inventory)
        .on::<ShipmentDispatched, _>(Inventory)
}

/// The HTTP routes of this service.
pub fn routes() -> HttpRouter<Shared> {
    HttpRouter::new().route("/stock/{sku}", put(set_stock).get(show_stock))
}

/// Quantities per SKU, lines of one SKU merged.
fn merge(lines: impl IntoIterator<Item = (String, i32)>) -> BTreeMap<String, i32> {
    let mut m = BTreeMap::new();
    for (sku, qty) in lines {
        *m.entry(sku).or_insert(0) += qty;
    }
    m
}

enum Reservation {
    Reserved,
    Rejected(String),
    Conflict,
}

/// One optimistic attempt to reserve every line.
async fn try_reserve(
    conn: &mut PgConnection,
    wanted: &BTreeMap<String, i32>,
) -> Result<Reservation, sqlx::Error> {
    let skus: Vec<&String> = wanted.keys().collect();
    let rows: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT sku, on_hand, version FROM inventory.stock WHERE sku = ANY($1)")
            .bind(&skus)
            .fetch_all(&mut *conn)
            .await?;
    let levels: BTreeMap<String, (i32, i64)> =
        rows.into_iter().map(|(s, o, v)| (s, (o, v))).collect();
    for (sku, qty) in wanted {
        match levels.get(sku) {
            None => return Ok(Reservation::Rejected(format!("{sku}: unknown SKU"))),
            Some((on_hand, _)) if on_hand < qty => {
                return Ok(Reservation::Rejected(format!(
                    "{sku}: {qty} wanted, {on_hand} on hand"
                )))
            }
            Some(_) => {}
        }
    }
    for (sku, qty) in wanted {
        let (_, version) = levels[sku];
        let updated = sqlx::query(
            "UPDATE inventory.stock SET on_hand = on_hand - $2, reserved = reserved + $2, version = version + 1 \
             WHERE sku = $1 AND version = $3",
        )
        .bind(sku)
        .bind(qty)
        .bind(version)
        .execute(&mut *conn)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(Reservation::Conflict);
        }
    }
    Ok(Reservation::Reserved)
}

#[async_trait::async_trait]
impl Handle<OrderPlaced> for Inventory {
    async fn handle(&self, ctx: &mut Context<'_>, d: OrderPlaced) -> Result<(), HandleError> {
        let wanted = merge(d.lines.iter().map(|l| (l.sku.clone(), l.qty)));
        lock_stock(ctx.tx).await?;
        let mut outcome = Reservation::Conflict;
        for _ in 0..LOCK_ATTEMPTS {
            let mut sp = ctx.tx.begin().await?;
            outcome = try_reserve(&mut sp, &wanted).await?;
            match outcome {
                Reservation::Reserved => {
                    sp.commit().await?;
                    break;
                }
                _ => sp.rollback().await?,
            }
            if matches!(outcome, Reservation::Rejected(_)) {
                break;
            }
        }
        match outcome {
            Reservation::Conflict => Err(HandleError::transient(format!(
                "stock changed under {LOCK_ATTEMPTS} reservation attempts"
            ))),
            Reservation::Rejected(reason) => {
                ctx.emit(
                    d.order_id.to_string(),
                    &StockRejected {
                        order_id: d.order_id,
                        reason,
                    },
                )
                .await?;
                Ok(())
            }
            Reservation::Reserved => {
                let lines: Vec<StockLine> = wanted
                    .into_iter()
                    .map(|(sku, qty)| StockLine { sku, qty })
                    .collect();
                sqlx::query("INSERT INTO inventory.reservations (order_id, lines, status) VALUES ($1, $2, 'held')")
                    .bind(d.order_id)
                    .bind(sqlx::types::Json(&lines))
                    .execute(&mut *ctx.tx)
                    .await?;
                ctx.emit(
                    d.order_id.to_string(),
                    &StockReserved {
                        order_id: d.order_id,
                        lines,
                        total: d.total,
                        payment_token: d.payment_token,
                    },
                )
                .await?;
                Ok(())
            }
        }
    }
}

/// Moves a held reservation to `to`, returning its lines; `None` when
/// there is none held (rejected order, or already released/shipped).
async fn settle(
    conn: &mut PgConnection,
    order_id: uuid::Uuid,
    to: &str,
) -> Result<Option<Vec<StockLine>>, sqlx::Error> {
    let row: Option<sqlx::types::Json<Vec<StockLine>>> = sqlx::query_scalar(
        "UPDATE inventory.reservations SET status = $2, updated_at = now() \
         WHERE order_id = $1 AND status = 'held' RETURNING lines",
    )
    .bind(order_id)
    .bind(to)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|j| j.0))
}

#[async_trait::async_trait]
impl Handle<OrderCancelled> for Inventory {
    async fn handle(&self, ctx: &mut Context<'_>, d: OrderCancelled) -> Result<(), HandleError> {
        lock_stock(ctx.tx).await?;
        let Some(lines) = settle(ctx.tx, d.order_id, "released").await? else {
            return Ok(());
        };
        for l in &lines {
            // Relative updates commute, so no version check is needed to
            // stay correct; the version still moves so reservations racing
            // with this one retry.
            sqlx::query(
                "UPDATE inventory.stock SET on_hand = on_hand + $2, reserved = reserved - $2, version = version + 1 WHERE sku = $1",
            )
            .bind(&l.sku)
            .bind(l.qty)
            .execute(&mut *ctx.tx)
            .await?;
        }
        ctx.emit(
            d.order_id.to_string(),
            &StockReleased {
                order_id: d.order_id,
                lines,
            },
        )
        .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handle<ShipmentDispatched> for Inventory {
    async fn handle(
        &self,
        ctx: &mut Context<'_>,
        d: ShipmentDispatched,
    ) -> Result<(), HandleError> {
        lock_stock(ctx.tx).await?;
        let Some(lines) = settle(ctx.tx, d.order_id, "shipped").await? else {
            return Ok(());
        };
        for l in &lines {
            sqlx::query("UPDATE inventory.stock SET reserved = reserved - $2, version = version + 1 WHERE sku = $1")
                .bind(&l.sku)
                .bind(l.qty)
                .execute(&mut *ctx.tx)
                .await?;
        }
        Ok(())
    }
}

/// `PUT /stock/{sku}` body.
#[derive(Debug, Deserialize)]
pub struct SetStock {
    on_hand: i32,
}

async fn set_stock(
    State(shared): State<Shared>,
    Path(sku): Path<String>,
    Json(req): Json<SetStock>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if sku.trim().is_empty() || sku.len() > 64 {
        return Err(ApiError::invalid("sku: must be 1 to 64 characters"));
    }
    if req.on_hand < 0 {
        return Err(ApiError::invalid("on_hand: must be 0 or more"));
    }
    let (on_hand, reserved, version) = set_level(&shared.pool, &sku, req.on_hand).await?;
    Ok(axum::Json(
        json!({ "sku": sku, "on_hand": on_hand, "reserved": reserved, "version": version }),
    ))
}

/// Sets the free level of a SKU (creating it), as `PUT /stock/{sku}`
/// does; returns (on_hand, reserved, version).
pub async fn set_level(
    pool: &sqlx::PgPool,
    sku: &str,
    on_hand: i32,
) -> Result<(i32, i32, i64), sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO inventory.stock (sku, on_hand) VALUES ($1, $2) \
         ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, version = inventory.stock.version + 1 \
         RETURNING on_hand, reserved, version",
    )
    .bind(sku)
    .bind(on_hand)
    .fetch_one(pool)
    .await
}

async fn show_stock(
    State(shared): State<Shared>,
    Path(sku): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let row: Option<(i32, i32, i64)> =
        sqlx::query_as("SELECT on_hand, reserved, version FROM inventory.stock WHERE sku = $1")
            .bind(&sku)
            .fetch_optional(&shared.pool)
            .await?;
    let (on_hand, reserved, version) =
        row.ok_or_else(|| ApiError::not_found(format!("sku {sku} not found")))?;
    Ok(axum::Json(
        json!({ "sku": sku, "on_hand": on_hand, "reserved": reserved, "version": version }),
    ))
}
