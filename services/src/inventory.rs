//! Inventory: stock levels and reservations.
//!
//! `on_hand` counts units free to sell, `reserved` units held for live
//! orders. A reservation moves units from on_hand to reserved (all lines of
//! an order or none), a release moves them back, a dispatch removes them
//! from reserved.
//!
//! Two kinds of locking, each where it fits:
//! - Handlers (reserve, release, dispatch) lock **pessimistically**: they
//!   lock exactly the stock rows they touch, `FOR UPDATE`, sorted by SKU,
//!   before reading the levels. Orders for disjoint SKUs go ahead side by
//!   side; orders for the same SKU wait for each other instead of failing
//!   and retrying, so a hot SKU is never oversold and never costs a retry.
//!   A lane applies a batch of events in one transaction, so the
//!   [`StockLock`] preparer first locks every SKU of the whole batch,
//!   sorted, once: two batches then take their rows in one global order
//!   and cannot deadlock.
//! - `PUT /stock/{sku}` from a person or a tool is **optimistic**: it may
//!   carry `If-Match` with the `ETag` (the row's `version`) it last read,
//!   and answers 412 if someone changed the level since. Every write moves
//!   `version`, the handlers' too, so a stale read is always caught. The
//!   `on_hand >= 0` check constraint backs both up.

use std::collections::{BTreeMap, BTreeSet};

use crate::catalog::*;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::put;
use axum::Router as HttpRouter;
use consumers::{Context, Handle, HandleError, Prepare, Router};
use events::{Envelope, EventData};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgConnection;

use crate::http::Shared;
use crate::http::{etag, ApiError, IfMatch, Json};

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "inventory";

/// Locks the stock rows of `skus` until the end of the transaction, in
/// SKU order, and returns their free levels. Unknown SKUs are simply
/// absent. Rows already locked by this transaction are taken again at no
/// cost, so a handler may lock what the preparer locked before it.
///
/// `ORDER BY … FOR UPDATE` locks rows as the sorted scan returns them, so
/// every caller takes overlapping rows in the same order: a transaction
/// waits for another, never for one that waits for it.
pub async fn lock_stock(
    conn: &mut PgConnection,
    skus: &[&str],
) -> Result<BTreeMap<String, i32>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT sku, on_hand FROM inventory.stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(skus)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Locks, ahead of the handlers, every stock row a transaction's events
/// will touch: the lines of each order.placed, the held reservation's
/// lines of each order.cancelled and shipment.dispatched.
#[derive(Clone, Default)]
pub struct StockLock;

#[async_trait::async_trait]
impl Prepare for StockLock {
    async fn prepare(
        &self,
        tx: &mut PgConnection,
        events: &[&Envelope],
    ) -> Result<(), HandleError> {
        let mut skus: BTreeSet<String> = BTreeSet::new();
        let mut settling: Vec<uuid::Uuid> = Vec::new();
        for e in events {
            // A payload that does not decode fails in its handler, with a
            // clear error for that event alone; nothing to lock for it.
            if e.event_type == OrderPlaced::TYPE {
                if let Ok(d) = e.data_as::<OrderPlaced>() {
                    skus.extend(d.lines.into_iter().map(|l| l.sku));
                }
            } else if e.event_type == OrderCancelled::TYPE {
                if let Ok(d) = e.data_as::<OrderCancelled>() {
                    settling.push(d.order_id);
                }
            } else if e.event_type == ShipmentDispatched::TYPE {
                if let Ok(d) = e.data_as::<ShipmentDispatched>() {
                    settling.push(d.order_id);
                }
            }
        }
        if !settling.is_empty() {
            // Lines of a reservation never change once written, so reading
            // them unlocked is safe; the handler locks its own lines again.
            let held: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT l->>'sku' FROM inventory.reservations r, jsonb_array_elements(r.lines) l \
                 WHERE r.order_id = ANY($1) AND r.status = 'held'",
            )
            .bind(&settling)
            .fetch_all(&mut *tx)
            .await?;
            skus.extend(held);
        }
        if !skus.is_empty() {
            let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
            lock_stock(tx, &skus).await?;
        }
        Ok(())
    }
}

/// The consumer side of inventory.
#[derive(Clone, Default)]
pub struct Inventory;

/// Its handlers, by event type.
pub fn router() -> Router {
    Router::new(SERVICE)
        .prepare(StockLock)
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

/// What became of a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Every line's units moved from on_hand to reserved.
    Reserved,
    /// Nothing changed: a SKU is unknown or short (the reason says which).
    Rejected(String),
}

/// Reserves every line of `wanted` (quantity per SKU) or none, inside the
/// caller's transaction: locks the SKUs' rows (sorted), checks the levels,
/// moves the units. The row locks are held until the caller's commit, so
/// nothing can change the levels between the check and the write.
pub async fn reserve(
    conn: &mut PgConnection,
    wanted: &BTreeMap<String, i32>,
) -> Result<Reservation, sqlx::Error> {
    let skus: Vec<&str> = wanted.keys().map(String::as_str).collect();
    let levels = lock_stock(&mut *conn, &skus).await?;
    for (sku, qty) in wanted {
        match levels.get(sku) {
            None => return Ok(Reservation::Rejected(format!("{sku}: unknown SKU"))),
            Some(on_hand) if on_hand < qty => {
                return Ok(Reservation::Rejected(format!(
                    "{sku}: {qty} wanted, {on_hand} on hand"
                )))
            }
            Some(_) => {}
        }
    }
    let (skus, qtys): (Vec<&str>, Vec<i32>) = wanted.iter().map(|(s, q)| (s.as_str(), *q)).unzip();
    sqlx::query(
        "UPDATE inventory.stock s SET on_hand = s.on_hand - w.qty, reserved = s.reserved + w.qty, version = s.version + 1 \
         FROM unnest($1::text[], $2::int4[]) AS w(sku, qty) WHERE s.sku = w.sku",
    )
    .bind(&skus)
    .bind(&qtys)
    .execute(conn)
    .await?;
    Ok(Reservation::Reserved)
}

/// Applies `lines` to the reserved units: `back_on_hand` returns them to
/// on_hand (a release), otherwise they leave the store (a dispatch). Locks
/// the rows first, sorted, like every stock writer.
async fn unreserve(
    conn: &mut PgConnection,
    lines: &[StockLine],
    back_on_hand: bool,
) -> Result<(), sqlx::Error> {
    let merged = merge(lines.iter().map(|l| (l.sku.clone(), l.qty)));
    let skus: Vec<&str> = merged.keys().map(String::as_str).collect();
    lock_stock(&mut *conn, &skus).await?;
    let qtys: Vec<i32> = merged.values().copied().collect();
    sqlx::query(
        "UPDATE inventory.stock s SET on_hand = s.on_hand + CASE WHEN $3 THEN w.qty ELSE 0 END, \
         reserved = s.reserved - w.qty, version = s.version + 1 \
         FROM unnest($1::text[], $2::int4[]) AS w(sku, qty) WHERE s.sku = w.sku",
    )
    .bind(&skus)
    .bind(&qtys)
    .bind(back_on_hand)
    .execute(conn)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Handle<OrderPlaced> for Inventory {
    async fn handle(&self, ctx: &mut Context<'_>, d: OrderPlaced) -> Result<(), HandleError> {
        let wanted = merge(d.lines.iter().map(|l| (l.sku.clone(), l.qty)));
        match reserve(ctx.tx, &wanted).await? {
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
        let Some(lines) = settle(ctx.tx, d.order_id, "released").await? else {
            return Ok(());
        };
        unreserve(ctx.tx, &lines, true).await?;
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
        let Some(lines) = settle(ctx.tx, d.order_id, "shipped").await? else {
            return Ok(());
        };
        unreserve(ctx.tx, &lines, false).await?;
        Ok(())
    }
}

/// `PUT /stock/{sku}` body.
#[derive(Debug, Deserialize)]
pub struct SetStock {
    on_hand: i32,
}

/// `PUT /stock/{sku}`: sets the free level. With `If-Match`, only if the
/// row's version is one named (412 otherwise, nothing changed); without,
/// unconditionally, creating the SKU if new. Answers the new state with
/// its `ETag`.
async fn set_stock(
    State(shared): State<Shared>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    Json(req): Json<SetStock>,
) -> Result<impl IntoResponse, ApiError> {
    if sku.trim().is_empty() || sku.len() > 64 {
        return Err(ApiError::invalid("sku: must be 1 to 64 characters"));
    }
    if req.on_hand < 0 {
        return Err(ApiError::invalid("on_hand: must be 0 or more"));
    }
    let (on_hand, reserved, version) = match IfMatch::from_headers(&headers) {
        IfMatch::Absent => set_level(shared.stores.of(SERVICE), &sku, req.on_hand).await?,
        condition => set_level_if(shared.stores.of(SERVICE), &sku, req.on_hand, &condition)
            .await?
            .ok_or_else(|| {
                ApiError::precondition_failed(format!(
                    "stock of {sku} is not at the version If-Match names (or does not exist); GET it and try again"
                ))
            })?,
    };
    Ok((
        [etag(version)],
        axum::Json(
            json!({ "sku": sku, "on_hand": on_hand, "reserved": reserved, "version": version }),
        ),
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

/// Sets the free level of an existing SKU only if `condition` allows its
/// current version: the compare-and-set of optimistic locking, one
/// statement, so two writers holding the same version cannot both win
/// (the second one's `UPDATE` waits for the first's row lock, then sees
/// the new version and changes nothing). `None` when it did not apply.
pub async fn set_level_if(
    pool: &sqlx::PgPool,
    sku: &str,
    on_hand: i32,
    condition: &IfMatch,
) -> Result<Option<(i32, i32, i64)>, sqlx::Error> {
    let versions: Option<&[i64]> = match condition {
        IfMatch::Versions(v) => Some(v),
        IfMatch::Absent | IfMatch::Any => None,
    };
    sqlx::query_as(
        "UPDATE inventory.stock SET on_hand = $2, version = version + 1 \
         WHERE sku = $1 AND ($3::int8[] IS NULL OR version = ANY($3)) \
         RETURNING on_hand, reserved, version",
    )
    .bind(sku)
    .bind(on_hand)
    .bind(versions)
    .fetch_optional(pool)
    .await
}

async fn show_stock(
    State(shared): State<Shared>,
    Path(sku): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let row: Option<(i32, i32, i64)> =
        sqlx::query_as("SELECT on_hand, reserved, version FROM inventory.stock WHERE sku = $1")
            .bind(&sku)
            .fetch_optional(shared.stores.of(SERVICE))
            .await?;
    let (on_hand, reserved, version) =
        row.ok_or_else(|| ApiError::not_found(format!("sku {sku} not found")))?;
    Ok((
        [etag(version)],
        axum::Json(
            json!({ "sku": sku, "on_hand": on_hand, "reserved": reserved, "version": version }),
        ),
    ))
}
