//! The shop's events: their `data` structs, their versions and the services
//! that raise them, and [`catalog`], the [`Catalog`] every shop process
//! hands to warren (codec, topology, permissions).
//!
//! Readers are tolerant: unknown fields in `data` are ignored (a producer
//! may add optional fields without a version bump).

use events::{Catalog, EventData};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

macro_rules! event_data {
    ($( $ty:ident = $name:literal, version $ver:literal, from $src:literal ),+ $(,)?) => {
        $(
            impl EventData for $ty {
                const TYPE: &'static str = $name;
                const VERSION: u32 = $ver;
                const SOURCE: &'static str = $src;
            }
        )+
        /// The shop's catalog: every event type, in the order of the domain
        /// table, and the upcasters of older versions.
        pub fn catalog() -> Catalog {
            Catalog::new()
                $( .with::<$ty>() )+
                .upcast::<CustomerRegistered>(1, customer_registered_v1_to_v2)
        }
    };
}

event_data! {
    CustomerRegistered = "customer.registered", version 2, from "customers",
    CustomerUpdated = "customer.updated", version 1, from "customers",
    OrderPlaced = "order.placed", version 1, from "orders",
    OrderConfirmed = "order.confirmed", version 1, from "orders",
    OrderCancelled = "order.cancelled", version 1, from "orders",
    OrderShipped = "order.shipped", version 1, from "orders",
    StockReserved = "stock.reserved", version 1, from "inventory",
    StockRejected = "stock.rejected", version 1, from "inventory",
    StockReleased = "stock.released", version 1, from "inventory",
    PaymentCaptured = "payment.captured", version 1, from "payments",
    PaymentFailed = "payment.failed", version 1, from "payments",
    PaymentRefunded = "payment.refunded", version 1, from "payments",
    ShipmentDispatched = "shipment.dispatched", version 1, from "shipping",
}

/// v1 named the customer's name `full_name`.
fn customer_registered_v1_to_v2(mut data: Value) -> Result<Value, String> {
    let obj = data.as_object_mut().ok_or("data is not an object")?;
    let name = obj.remove("full_name").ok_or("missing field `full_name`")?;
    obj.insert("name".to_owned(), name);
    Ok(data)
}

/// A customer signed up. v1 called `name` `full_name` (upcast on decoding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRegistered {
    pub customer_id: Uuid,
    pub name: String,
    pub email: String,
}

/// A customer's details changed; carries the full new state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerUpdated {
    pub customer_id: Uuid,
    pub name: String,
    pub email: String,
    /// The customer's version after this change (its `ETag` over HTTP).
    /// Optional, so events written before it existed still read, and
    /// readers that do not know it ignore it: no new schema version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

/// One line of an order. Amounts are integer cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub qty: i32,
    pub unit_price: i64,
}

/// An order was accepted as `pending`; starts the saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub lines: Vec<OrderLine>,
    /// Sum of qty × unit_price, in cents.
    pub total: i64,
    /// Payment gateway token (`tok_ok`, `tok_decline`, …).
    pub payment_token: String,
}

/// Stock reserved and payment captured: the order will ship.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub customer_id: Uuid,
}

/// The order will not complete; holders of stock or money compensate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub reason: String,
}

/// The order left the warehouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
}

/// A reserved quantity of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    pub sku: String,
    pub qty: i32,
}

/// Every line of an order is held. Carries what payments needs to charge,
/// so payments does not have to keep a copy of orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReserved {
    pub order_id: Uuid,
    pub lines: Vec<StockLine>,
    pub total: i64,
    pub payment_token: String,
}

/// The order cannot be served from stock; nothing was reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockRejected {
    pub order_id: Uuid,
    pub reason: String,
}

/// A reservation went back to `on_hand` after a cancellation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReleased {
    pub order_id: Uuid,
    pub lines: Vec<StockLine>,
}

/// The gateway captured the order's amount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount: i64,
}

/// The gateway declined the charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentFailed {
    pub order_id: Uuid,
    pub reason: String,
}

/// A captured payment was given back after a cancellation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount: i64,
}

/// The order's shipment left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
}
