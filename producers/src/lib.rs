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
//! - [`install`]: the versioned installer of warren's tables, and the outbox's part.
//! - [`outbox`]: appending events in the caller's transaction; backlog and retention.
//! - [`relay`]: the worker that publishes the outbox: its loop, batches and counters.
//! - [`leader`]: which relay of a service is active: the advisory lock, standing by.
//! - [`eager`]: a producer publishing its own events right after its commit, the relay as safety net.
//! - [`wake`]: how the relay is woken: `NOTIFY` while idle, none while busy.
//! - `testkit` (feature): fault points for the integration tests.
//!
//! # Advisory locks
//! PostgreSQL advisory lock keys are one space per database, shared with
//! the application; warren's are two-key locks whose first key spells its
//! role and whose second is `hashtext(schema) & 2147483647`:
//! - `0x5741` (`'WA'`, [`leader::LEADER_LOCK_CLASS`]): the active relay of a schema (session lock).
//! - `0x5757` (`'WW'`, [`wake::WRITERS_LOCK_CLASS`]): the outbox writers, shared, against the relay's
//!   handshake before it sleeps (transaction lock in the trigger; tried by the relay).
//! - `0x5749` (`'WI'`, [`install::INSTALL_LOCK_CLASS`]): one installer at a time per schema
//!   (transaction lock).
//! - `0x574D` (`'WM'`): the processes of a partitioned consumer, shared (session lock), and
//!   `0x5750_0000 | i` (`'WP'` and the partition): who consumes partition `i` (session lock);
//!   both in `warren-consumers`' `partitions` module.
//!
//! [`access`] serialises its grants on the one-key `hashtext('warren access setup')`.

#![warn(missing_docs)]

pub mod access;
pub mod eager;
pub mod install;
pub mod leader;
pub mod outbox;
pub mod relay;
pub mod wake;

pub use eager::{Appended, Eager, EagerConfig, EagerWorker};
pub use install::InstallError;
pub use outbox::{Outbox, OutboxError};
pub use relay::{Relay, RelayConfig, RelayError};
