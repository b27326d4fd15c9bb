//! Sample events for the library's own tests: a small order-and-shipping
//! domain of the tests' own (the library knows no domain; the shop in
//! `services/` has its own catalog). Shaped like events a real service
//! raises, so the tests read like a user's code.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use events::{Catalog, Codec, EventData};

macro_rules! sample {
    ($( $ty:ident = $name:literal, version $ver:literal, from $src:literal ),+ $(,)?) => {
        $(
            impl EventData for $ty {
                const TYPE: &'static str = $name;
                const VERSION: u32 = $ver;
                const SOURCE: &'static str = $src;
            }
        )+
        /// The sample catalog, with one upcaster (registered v1 → v2).
        pub fn catalog() -> Catalog {
            Catalog::new()
                $( .with::<$ty>() )+
                .upcast::<CustomerRegistered>(1, |mut data: Value| {
                    let obj = data.as_object_mut().ok_or("data is not an object")?;
                    let name = obj.remove("full_name").ok_or("missing field `full_name`")?;
                    obj.insert("name".to_owned(), name);
                    Ok(data)
                })
        }
    };
}

sample! {
    CustomerRegistered = "customer.registered", version 2, from "customers",
    CustomerUpdated = "customer.updated", version 1, from "customers",
    OrderPlaced = "order.placed", version 1, from "orders",
    OrderConfirmed = "order.confirmed", version 1, from "orders",
    OrderCancelled = "order.cancelled", version 1, from "orders",
    OrderShipped = "order.shipped", version 1, from "orders",
    PaymentCaptured = "payment.captured", version 1, from "payments",
    ShipmentDispatched = "shipment.dispatched", version 1, from "shipping",
}

/// A codec of the sample catalog.
pub fn codec() -> Codec {
    Codec::new(catalog())
}

/// A customer signed up (v1 called `name` `full_name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRegistered {
    pub customer_id: Uuid,
    pub name: String,
    pub email: String,
}

/// A customer's details changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerUpdated {
    pub customer_id: Uuid,
    pub name: String,
    pub email: String,
    /// The customer's version after the change, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub qty: i32,
    pub unit_price: i64,
}

/// An order was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub lines: Vec<OrderLine>,
    pub total: i64,
    pub payment_token: String,
}

/// An order was confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub customer_id: Uuid,
}

/// An order was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub reason: String,
}

/// An order left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
}

/// A payment was captured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount: i64,
}

/// A shipment left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
}
