//! warren: event-driven services over RabbitMQ and PostgreSQL, with **no
//! lost event and no double effect**.
//!
//! A service changes its own PostgreSQL store and records the events it
//! raises in the same transaction (the outbox); a relay publishes them to
//! RabbitMQ with publisher confirms; other services consume them with
//! handlers that run inside the transaction that records the event in their
//! inbox, in per-subject order, with delayed retries and dead letters.
//!
//! This crate is the one a service depends on: it re-exports the parts
//! (each usable alone) and adds the [`Service`] host, which asks for three
//! things — the bus, the handlers, the database — and runs the rest.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use warren::{Bus, Catalog, Context, EventData, Handle, HandleError, Service, Topology};
//!
//! #[derive(Serialize, Deserialize)]
//! struct TicketOpened { ticket_id: String, title: String }
//! impl EventData for TicketOpened {
//!     const TYPE: &'static str = "ticket.opened";
//!     const VERSION: u32 = 1;
//!     const SOURCE: &'static str = "helpdesk";
//! }
//!
//! struct Count;
//! #[warren::async_trait]
//! impl Handle<TicketOpened> for Count {
//!     async fn handle(&self, ctx: &mut Context<'_>, t: TicketOpened) -> Result<(), HandleError> {
//!         sqlx::query("INSERT INTO triage.seen (ticket_id) VALUES ($1)")
//!             .bind(&t.ticket_id)
//!             .execute(&mut *ctx.tx)
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), warren::ServiceError> {
//! let bus = Bus::new(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     Topology::new("warren"),
//!     Catalog::new().with::<TicketOpened>(),
//! );
//! let service = Service::new("triage", bus)
//!     .database_url("postgres://postgres@127.0.0.1/warren")
//!     .handle::<TicketOpened, _>(Count);
//! service.install().await?; // the outbox, inbox and progress tables of schema `triage`
//! service.start().await?.until_signal().await; // Ctrl-C / SIGTERM: drains, then stops
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`service`]: the service host: declare, register handlers, install,
//!   run, shut down cleanly.
//! - [`install`]: the library's own tables, in any schema.
//! - Re-exported crates: [`events`] (the contract: envelope, catalog,
//!   codec), [`transport`] (RabbitMQ: connect, reconnect, topology, the
//!   publisher), [`producers`] (outbox, relay, eager publishing),
//!   [`consumers`] (subscription, router, inbox, retries, dead letters).

#![warn(missing_docs)]

pub mod install;
pub mod service;

pub use async_trait::async_trait;
pub use consumers;
pub use consumers::{
    Batch, Context, Handle, HandleBatch, HandleError, Outcome, OutcomeRecord, Router, Stats,
    SubscriptionConfig,
};
pub use events;
pub use events::{event_data, Catalog, Codec, Envelope, EventData};
pub use producers;
pub use producers::{Eager, EagerConfig, Outbox, RelayConfig};
pub use service::{Bus, Running, Service, ServiceError};
pub use transport;
pub use transport::Topology;
