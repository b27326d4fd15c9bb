//! The worked example: an e-commerce platform of five services that talk
//! only through events. Orders run a choreographed saga — stock is
//! reserved, payment captured, the order confirmed and shipped — and
//! compensate (release stock, refund) when a step fails.
//!
//! # Layout
//! - [`catalog`]: the shop's event types, their versions and upcaster: the [`events::Catalog`] it hands warren.
//! - [`customers`]: sign-ups and changes (`POST /customers`); raises customer.*.
//! - [`orders`]: orders and a read model of customers; `POST /orders`, `GET /orders/{id}`.
//! - [`inventory`]: stock (row locks for reservations, `If-Match` for `PUT /stock/{sku}`), reservations.
//! - [`payments`]: charges and refunds through [`gateway`].
//! - [`gateway`]: the simulated payment gateway behind a timeout and a circuit breaker.
//! - [`shipping`]: one shipment per confirmed order.
//! - [`http`]: the API's error type, JSON extraction, health and readiness.
//! - [`metrics`]: `/metrics`, the counters of the services in this process (prometheus-client).
//! - [`store`]: the shop's migrations and warren's tables in each service's schema ([`migrate`]);
//!   [`Stores`], each service's database when they do not all share one.
//! - [`app`]: starting chosen services (relays, consumers, HTTP) and stopping them cleanly.

pub mod app;
pub mod catalog;
pub mod customers;
pub mod gateway;
pub mod http;
pub mod inventory;
pub mod metrics;
pub mod orders;
pub mod payments;
pub mod shipping;
pub mod store;

pub use app::{App, AppConfig, AppError};
pub use store::{migrate, migrate_for, migrate_stores, MigrateError, Stores};

/// Every service, in the order of the saga.
pub const ALL: [&str; 5] = ["customers", "orders", "inventory", "payments", "shipping"];
