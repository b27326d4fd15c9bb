//! Payments: charges an order once its stock is reserved, refunds it when
//! it is cancelled after capture.
//!
//! One `payments` row per order decides everything: a charge happens only
//! when there is none, a refund only when it says `captured`. When
//! `order.cancelled` arrives before `stock.reserved` (they come from
//! different services, so nothing orders them), a `failed` row records
//! that the order must not be charged.

use std::sync::Arc;

use crate::catalog::*;
use consumers::{Context, Handle, HandleError, Router};
use uuid::Uuid;

use crate::gateway::{ChargeOutcome, Gateway, GatewayError};

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "payments";

/// The consumer side of payments.
#[derive(Clone)]
pub struct Payments {
    /// The (simulated) payment gateway behind its breaker.
    pub gateway: Arc<Gateway>,
}

/// Its handlers, by event type.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let p = Payments { gateway };
    Router::new(SERVICE)
        .on::<StockReserved, _>(p.clone())
        .on::<OrderCancelled, _>(p)
}

fn unavailable(e: GatewayError) -> HandleError {
    // Either way a delayed retry through the broker, never a hot loop
    // against the gateway. A failed call spends an attempt; a call the
    // open breaker refused does not, so a long outage parks payments in
    // delayed retry instead of dead-lettering them once the attempts run
    // out (the breaker's probes still spend attempts, one per cool-down).
    match e {
        GatewayError::Open => HandleError::Throttled(e.to_string()),
        GatewayError::Unavailable(_) => HandleError::transient(e),
    }
}

#[async_trait::async_trait]
impl Handle<StockReserved> for Payments {
    async fn handle(&self, ctx: &mut Context<'_>, d: StockReserved) -> Result<(), HandleError> {
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT status FROM payments.payments WHERE order_id = $1 FOR UPDATE",
        )
        .bind(d.order_id)
        .fetch_optional(&mut *ctx.tx)
        .await?;
        if let Some(status) = existing {
            tracing::info!(order_id = %d.order_id, status, "order already has a payment record; not charging");
            return Ok(());
        }
        // The call is bounded by the gateway's timeout, so the transaction
        // never waits on it without limit.
        match self
            .gateway
            .charge(d.order_id, d.total, &d.payment_token)
            .await
            .map_err(unavailable)?
        {
            ChargeOutcome::Captured { payment_id } => {
                sqlx::query("INSERT INTO payments.payments (order_id, payment_id, status, amount) VALUES ($1, $2, 'captured', $3)")
                    .bind(d.order_id)
                    .bind(payment_id)
                    .bind(d.total)
                    .execute(&mut *ctx.tx)
                    .await?;
                ctx.emit(
                    d.order_id.to_string(),
                    &PaymentCaptured {
                        order_id: d.order_id,
                        payment_id,
                        amount: d.total,
                    },
                )
                .await?;
            }
            ChargeOutcome::Declined { reason } => {
                sqlx::query(
                    "INSERT INTO payments.payments (order_id, payment_id, status, amount, reason) VALUES ($1, $2, 'failed', $3, $4)",
                )
                .bind(d.order_id)
                .bind(Uuid::now_v7())
                .bind(d.total)
                .bind(&reason)
                .execute(&mut *ctx.tx)
                .await?;
                ctx.emit(
                    d.order_id.to_string(),
                    &PaymentFailed {
                        order_id: d.order_id,
                        reason,
                    },
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handle<OrderCancelled> for Payments {
    async fn handle(&self, ctx: &mut Context<'_>, d: OrderCancelled) -> Result<(), HandleError> {
        let existing: Option<(String, Uuid, i64)> = sqlx::query_as(
            "SELECT status, payment_id, amount FROM payments.payments WHERE order_id = $1 FOR UPDATE",
        )
        .bind(d.order_id)
        .fetch_optional(&mut *ctx.tx)
        .await?;
        match existing {
            None => {
                sqlx::query(
                    "INSERT INTO payments.payments (order_id, payment_id, status, amount, reason) \
                     VALUES ($1, $2, 'failed', 0, 'order cancelled before payment')",
                )
                .bind(d.order_id)
                .bind(Uuid::now_v7())
                .execute(&mut *ctx.tx)
                .await?;
            }
            Some((status, payment_id, amount)) if status == "captured" => {
                self.gateway
                    .refund(d.order_id, amount)
                    .await
                    .map_err(unavailable)?;
                sqlx::query("UPDATE payments.payments SET status = 'refunded', updated_at = now() WHERE order_id = $1")
                    .bind(d.order_id)
                    .execute(&mut *ctx.tx)
                    .await?;
                sqlx::query("INSERT INTO payments.refunds (payment_id, order_id, amount) VALUES ($1, $2, $3)")
                    .bind(payment_id)
                    .bind(d.order_id)
                    .bind(amount)
                    .execute(&mut *ctx.tx)
                    .await?;
                ctx.emit(
                    d.order_id.to_string(),
                    &PaymentRefunded {
                        order_id: d.order_id,
                        payment_id,
                        amount,
                    },
                )
                .await?;
            }
            Some(_) => {}
        }
        Ok(())
    }
}
