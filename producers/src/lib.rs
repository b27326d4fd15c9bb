//! Getting events out: the transactional outbox, the relay that publishes
//! it to RabbitMQ with publisher confirms, and the broker topology.
//!
//! A service appends events to its outbox inside the same `sqlx`
//! transaction that changes its store; the relay, one active per service,
//! publishes committed rows in order and deletes (or marks) exactly the
//! confirmed ones.
//! A crash anywhere between commit and mark re-publishes, never loses;
//! consumers absorb the duplicates with their inbox.
//!
//! # Layout
//! - [`access`]: least privilege: per-service PostgreSQL roles and RabbitMQ permissions.
//! - [`outbox`]: appending events in the caller's transaction; backlog and retention.
//! - [`relay`]: the worker that publishes the outbox, with leader election.
//! - [`eager`]: a producer publishing its own events right after its commit, the relay as safety net.
//! - [`wake`]: how the relay is woken: `NOTIFY` while idle, none while busy.
//! - `testkit` (feature): fault points for the integration tests.

pub mod access;
pub mod eager;
pub mod outbox;
pub mod relay;
pub mod wake;

pub use eager::{Appended, Eager, EagerConfig, EagerWorker};
pub use outbox::{Outbox, OutboxError};
pub use relay::{Relay, RelayConfig, RelayError};
