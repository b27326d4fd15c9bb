//! The event catalog: every domain event, its `data` struct, its current
//! `dataversion` and the service that raises it.
//!
//! Readers are tolerant: unknown fields in `data` are ignored (a producer
//! may add optional fields without a version bump); a missing field or a
//! wrong type is an error that names the JSON path.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::DecodeError;

/// A typed `data` payload of one event type.
pub trait EventData: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`, also the routing key.
    const TYPE: &'static str;
    /// The current schema version of this payload.
    const VERSION: u32;
    /// The service that raises this event.
    const SOURCE: &'static str;
}

/// What the catalog knows about one event type, without its Rust type.
#[derive(Debug, Clone, Copy)]
pub struct EventSpec {
    /// The CloudEvents `type`.
    pub event_type: &'static str,
    /// Current `dataversion`.
    pub version: u32,
    /// Oldest `dataversion` that can still be upcast to `version`.
    pub oldest_version: u32,
    /// Service that raises it.
    pub source: &'static str,
    /// Checks that a (current-version) `data` has this type's shape.
    pub validate: fn(&serde_json::Value) -> Result<(), DecodeError>,
}

impl EventSpec {
    /// Looks up a type in the catalog.
    pub fn find(event_type: &str) -> Option<&'static EventSpec> {
        CATALOG.iter().find(|s| s.event_type == event_type)
    }
}

/// Deserialises `data` into `E`, naming the JSON path of the first error.
pub fn typed_data<E: DeserializeOwned>(
    event_type: &str,
    data: &serde_json::Value,
) -> Result<E, DecodeError> {
    // A plain pass first; only a failure pays for the path tracking that
    // names where it went wrong.
    if let Ok(typed) = E::deserialize(data) {
        return Ok(typed);
    }
    serde_path_to_error::deserialize(data).map_err(|e| DecodeError::WrongData {
        event_type: event_type.to_owned(),
        path: match e.path().to_string().as_str() {
            "." => "data".to_owned(),
            p => format!("data.{p}"),
        },
        reason: e.inner().to_string(),
    })
}

macro_rules! catalog {
    ($( $ty:ident = $name:literal, version $ver:literal, oldest $old:literal, from $src:literal ),+ $(,)?) => {
        $(
            impl EventData for $ty {
                const TYPE: &'static str = $name;
                const VERSION: u32 = $ver;
                const SOURCE: &'static str = $src;
            }
        )+
        /// Every event type warren knows, in the order of the domain table.
        pub static CATALOG: &[EventSpec] = &[
            $(
                EventSpec {
                    event_type: $name,
                    version: $ver,
                    oldest_version: $old,
                    source: $src,
                    validate: |v| typed_data::<$ty>($name, v).map(|_| ()),
                },
            )+
        ];
    };
}

catalog! {
    CustomerRegistered = "customer.registered", version 2, oldest 1, from "customers",
    CustomerUpdated = "customer.updated", version 1, oldest 1, from "customers",
    OrderPlaced = "order.placed", version 1, oldest 1, from "orders",
    OrderConfirmed = "order.confirmed", version 1, oldest 1, from "orders",
    OrderCancelled = "order.cancelled", version 1, oldest 1, from "orders",
    OrderShipped = "order.shipped", version 1, oldest 1, from "orders",
    StockReserved = "stock.reserved", version 1, oldest 1, from "inventory",
    StockRejected = "stock.rejected", version 1, oldest 1, from "inventory",
    StockReleased = "stock.released", version 1, oldest 1, from "inventory",
    PaymentCaptured = "payment.captured", version 1, oldest 1, from "payments",
    PaymentFailed = "payment.failed", version 1, oldest 1, from "payments",
    PaymentRefunded = "payment.refunded", version 1, oldest 1, from "payments",
    ShipmentDispatched = "shipment.dispatched", version 1, oldest 1, from "shipping",
}

/// A customer signed up. v1 called `name` `full_name` (see [`crate::upcast`]).
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
