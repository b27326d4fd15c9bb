//! Orders: takes orders over HTTP, keeps a read model of customers fed by
//! their events, and follows the saga's outcome: `pending` → `confirmed`
//! (payment captured) → `shipped` (shipment dispatched), or → `cancelled`
//! (stock rejected, payment declined, or cancelled by the customer while
//! not yet shipped).
//!
//! A status never moves backwards: every transition is an `UPDATE … WHERE
//! status = ANY(allowed sources)`, so a late or repeated event finds the
//! order past it and changes nothing.
//!
//! Orders also handles `order.placed` itself: its own events come back as
//! no-ops, and orders placed elsewhere (a replayed fixture, another
//! storefront) are imported, so the saga's later events find them.

use crate::catalog::*;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router as HttpRouter;
use consumers::{Context, Handle, HandleError, Router};
use events::Envelope;
use serde::Deserialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::http::Shared;
use crate::http::{ApiError, Json};

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "orders";
/// Most lines in one order.
pub const MAX_LINES: usize = 100;

/// The consumer side of orders.
#[derive(Clone, Default)]
pub struct Orders;

/// Its handlers, by event type.
pub fn router() -> Router {
    Router::new(SERVICE)
        .on::<CustomerRegistered, _>(Orders)
        .on::<CustomerUpdated, _>(Orders)
        .on::<OrderPlaced, _>(Orders)
        .on::<PaymentCaptured, _>(Orders)
        .on::<PaymentFailed, _>(Orders)
        .on::<StockRejected, _>(Orders)
        .on::<ShipmentDispatched, _>(Orders)
}

/// The HTTP routes of this service.
pub fn routes() -> HttpRouter<Shared> {
    HttpRouter::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
        .route("/orders/{id}/cancel", post(cancel))
}

async fn upsert_customer(
    tx: &mut PgConnection,
    id: Uuid,
    name: &str,
    email: &str,
) -> Result<(), HandleError> {
    sqlx::query(
        "INSERT INTO orders.customers (id, name, email) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, updated_at = now()",
    )
    .bind(id)
    .bind(name)
    .bind(email)
    .execute(tx)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Handle<CustomerRegistered> for Orders {
    async fn handle(
        &self,
        ctx: &mut Context<'_>,
        d: CustomerRegistered,
    ) -> Result<(), HandleError> {
        upsert_customer(ctx.tx, d.customer_id, &d.name, &d.email).await
    }
}

#[async_trait::async_trait]
impl Handle<CustomerUpdated> for Orders {
    async fn handle(&self, ctx: &mut Context<'_>, d: CustomerUpdated) -> Result<(), HandleError> {
        upsert_customer(ctx.tx, d.customer_id, &d.name, &d.email).await
    }
}

#[async_trait::async_trait]
impl Handle<OrderPlaced> for Orders {
    async fn handle(&self, ctx: &mut Context<'_>, d: OrderPlaced) -> Result<(), HandleError> {
        insert_order(ctx.tx, &d).await?;
        Ok(())
    }
}

/// Moves an order to `to` if its status is one of `from`. Returns the
/// customer id when it moved, `None` when the order was already past it.
/// An order this service has not heard of yet is a transient condition:
/// its `order.placed` may still be on the way.
async fn transition(
    tx: &mut PgConnection,
    order_id: Uuid,
    from: &[&str],
    to: &str,
    reason: Option<&str>,
) -> Result<Option<Uuid>, HandleError> {
    let current: Option<(String, Uuid)> =
        sqlx::query_as("SELECT status, customer_id FROM orders.orders WHERE id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status, customer)) = current else {
        return Err(HandleError::transient(format!(
            "order {order_id} is not known (yet)"
        )));
    };
    if !from.contains(&status.as_str()) {
        tracing::info!(order_id = %order_id, status, wanted = to, "order already past this step; unchanged");
        return Ok(None);
    }
    sqlx::query("UPDATE orders.orders SET status = $2, reason = COALESCE($3, reason), updated_at = now() WHERE id = $1")
        .bind(order_id)
        .bind(to)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    Ok(Some(customer))
}

#[async_trait::async_trait]
impl Handle<PaymentCaptured> for Orders {
    async fn handle(&self, ctx: &mut Context<'_>, d: PaymentCaptured) -> Result<(), HandleError> {
        if let Some(customer_id) =
            transition(ctx.tx, d.order_id, &["pending"], "confirmed", None).await?
        {
            ctx.emit(
                d.order_id.to_string(),
                &OrderConfirmed {
                    order_id: d.order_id,
                    customer_id,
                },
            )
            .await?;
        }
        Ok(())
    }
}

async fn cancel_pending(
    ctx: &mut Context<'_>,
    order_id: Uuid,
    reason: &str,
) -> Result<(), HandleError> {
    if transition(ctx.tx, order_id, &["pending"], "cancelled", Some(reason))
        .await?
        .is_some()
    {
        ctx.emit(
            order_id.to_string(),
            &OrderCancelled {
                order_id,
                reason: reason.to_owned(),
            },
        )
        .await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Handle<PaymentFailed> for Orders {
    async fn handle(&self, ctx: &mut Context<'_>, d: PaymentFailed) -> Result<(), HandleError> {
        cancel_pending(ctx, d.order_id, &format!("payment failed: {}", d.reason)).await
    }
}

#[async_trait::async_trait]
impl Handle<StockRejected> for Orders {
    async fn handle(&self, ctx: &mut Context<'_>, d: StockRejected) -> Result<(), HandleError> {
        cancel_pending(ctx, d.order_id, &format!("out of stock: {}", d.reason)).await
    }
}

#[async_trait::async_trait]
impl Handle<ShipmentDispatched> for Orders {
    async fn handle(
        &self,
        ctx: &mut Context<'_>,
        d: ShipmentDispatched,
    ) -> Result<(), HandleError> {
        if transition(ctx.tx, d.order_id, &["confirmed"], "shipped", None)
            .await?
            .is_some()
        {
            ctx.emit(
                d.order_id.to_string(),
                &OrderShipped {
                    order_id: d.order_id,
                    shipment_id: d.shipment_id,
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// Inserts an order and its lines; `false` when it already existed.
async fn insert_order(tx: &mut PgConnection, d: &OrderPlaced) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO orders.orders (id, customer_id, status, total, payment_token) VALUES ($1, $2, 'pending', $3, $4) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(d.order_id)
    .bind(d.customer_id)
    .bind(d.total)
    .bind(&d.payment_token)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    for (i, l) in d.lines.iter().enumerate() {
        sqlx::query("INSERT INTO orders.order_lines (order_id, line_no, sku, qty, unit_price) VALUES ($1, $2, $3, $4, $5)")
            .bind(d.order_id)
            .bind(i as i32 + 1)
            .bind(&l.sku)
            .bind(l.qty)
            .bind(l.unit_price)
            .execute(&mut *tx)
            .await?;
    }
    Ok(true)
}

/// `POST /orders` body.
#[derive(Debug, Deserialize)]
pub struct PlaceOrder {
    customer_id: Uuid,
    lines: Vec<OrderLine>,
    payment_token: String,
}

impl PlaceOrder {
    /// Checks the request and computes the total.
    fn validate(&self) -> Result<i64, ApiError> {
        if self.lines.is_empty() {
            return Err(ApiError::invalid("lines: an order needs at least one line"));
        }
        if self.lines.len() > MAX_LINES {
            return Err(ApiError::invalid(format!(
                "lines: at most {MAX_LINES} lines"
            )));
        }
        let mut total: i64 = 0;
        for (i, l) in self.lines.iter().enumerate() {
            if l.sku.trim().is_empty() || l.sku.len() > 64 {
                return Err(ApiError::invalid(format!(
                    "lines[{i}].sku: must be 1 to 64 characters"
                )));
            }
            if l.qty <= 0 {
                return Err(ApiError::invalid(format!(
                    "lines[{i}].qty: must be greater than 0"
                )));
            }
            if l.unit_price < 0 {
                return Err(ApiError::invalid(format!(
                    "lines[{i}].unit_price: must be 0 or more"
                )));
            }
            total = (l.qty as i64)
                .checked_mul(l.unit_price)
                .and_then(|t| t.checked_add(total))
                .ok_or_else(|| ApiError::invalid("total: too large"))?;
        }
        if self.payment_token.trim().is_empty() || self.payment_token.len() > 128 {
            return Err(ApiError::invalid(
                "payment_token: must be 1 to 128 characters",
            ));
        }
        Ok(total)
    }
}

async fn place(
    State(shared): State<Shared>,
    Json(req): Json<PlaceOrder>,
) -> Result<(StatusCode, axum::Json<serde_json::Value>), ApiError> {
    let total = req.validate()?;
    let mut tx = shared.stores.of(SERVICE).begin().await?;
    let known: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orders.customers WHERE id = $1")
        .bind(req.customer_id)
        .fetch_optional(&mut *tx)
        .await?;
    if known.is_none() {
        return Err(ApiError::invalid(format!(
            "customer_id: customer {} is not known to orders (no customer.registered received)",
            req.customer_id
        )));
    }
    let order_id = Uuid::now_v7();
    let data = OrderPlaced {
        order_id,
        customer_id: req.customer_id,
        lines: req.lines,
        total,
        payment_token: req.payment_token,
    };
    insert_order(&mut tx, &data).await?;
    shared
        .outboxes
        .orders
        .append(&mut tx, Envelope::new(SERVICE, order_id.to_string(), &data))
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "id": order_id, "status": "pending" })),
    ))
}

async fn show(
    State(shared): State<Shared>,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let row: Option<(Uuid, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT customer_id, status, total, reason FROM orders.orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(shared.stores.of(SERVICE))
    .await?;
    let (customer_id, status, total, reason) =
        row.ok_or_else(|| ApiError::not_found(format!("order {id} not found")))?;
    let lines: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT sku, qty, unit_price FROM orders.order_lines WHERE order_id = $1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(shared.stores.of(SERVICE))
    .await?;
    let lines: Vec<_> = lines
        .into_iter()
        .map(|(sku, qty, unit_price)| json!({ "sku": sku, "qty": qty, "unit_price": unit_price }))
        .collect();
    Ok(axum::Json(json!({
        "id": id, "customer_id": customer_id, "status": status, "total": total,
        "reason": reason, "lines": lines,
    })))
}

/// `POST /orders/{id}/cancel`: the customer withdraws an order that has
/// not shipped; inventory releases its stock and payments refunds.
async fn cancel(
    State(shared): State<Shared>,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let mut tx = shared.stores.of(SERVICE).begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM orders.orders WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match status.as_deref() {
        None => return Err(ApiError::not_found(format!("order {id} not found"))),
        Some("pending") | Some("confirmed") => {}
        Some(other) => {
            return Err(ApiError::conflict(format!(
                "order {id} is {other} and cannot be cancelled"
            )))
        }
    }
    let reason = "cancelled by the customer";
    sqlx::query("UPDATE orders.orders SET status = 'cancelled', reason = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    shared
        .outboxes
        .orders
        .append(
            &mut tx,
            Envelope::new(
                SERVICE,
                id.to_string(),
                &OrderCancelled {
                    order_id: id,
                    reason: reason.into(),
                },
            ),
        )
        .await?;
    tx.commit().await?;
    Ok(axum::Json(json!({ "id": id, "status": "cancelled" })))
}
