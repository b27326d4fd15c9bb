//! Shipping: one shipment per confirmed order, dispatched at once.

use crate::catalog::{OrderConfirmed, ShipmentDispatched};
use consumers::{Context, Handle, HandleError, Router};
use uuid::Uuid;

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "shipping";

/// The consumer side of shipping.
#[derive(Clone, Default)]
pub struct Shipping;

/// Its handlers, by event type.
pub fn router() -> Router {
    Router::new(SERVICE).on::<OrderConfirmed, _>(Shipping)
}

#[async_trait::async_trait]
impl Handle<OrderConfirmed> for Shipping {
    async fn handle(&self, ctx: &mut Context<'_>, d: OrderConfirmed) -> Result<(), HandleError> {
        let shipment_id = Uuid::now_v7();
        // The unique order_id is the business rule "one shipment per
        // order", enforced by the store itself.
        let created = sqlx::query("INSERT INTO shipping.shipments (id, order_id) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING")
            .bind(shipment_id)
            .bind(d.order_id)
            .execute(&mut *ctx.tx)
            .await?;
        if created.rows_affected() == 1 {
            ctx.emit(
                d.order_id.to_string(),
                &ShipmentDispatched {
                    order_id: d.order_id,
                    shipment_id,
                },
            )
            .await?;
        }
        Ok(())
    }
}
