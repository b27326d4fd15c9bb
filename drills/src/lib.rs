//! Fault drills and bad input at volume for warren, run on purpose
//! (`scripts/drills`), never by `cargo test`: they restart processes and,
//! in the outage drill, the shared RabbitMQ and PostgreSQL themselves.
//!
//! Every drill drives the release `warren` binary as an operator would —
//! `warren migrate`, `warren run`, HTTP and events on the exchange — in a
//! database and namespace of its own, created fresh, and ends with an
//! exact audit of every store (see [`check`]).
//!
//! # Layout
//! - [`cluster`]: the drill's database and namespace; `warren run`
//!   processes (spawn, SIGKILL, RSS from `/proc`, relay roles from `/metrics`).
//! - [`load`]: seeding, the mixed order plan, the HTTP and bus placers, probes.
//! - [`check`]: the SQL audit and the wait for the system to settle.
//! - [`servers`]: restarting RabbitMQ and PostgreSQL and waiting for them;
//!   the second PostgreSQL cluster.
//! - [`scenarios`]: the `kill`, `outage` and `twins` drills.
//! - [`rabbit_cluster`]: the three-node RabbitMQ cluster of
//!   `scripts/rabbitmq-cluster`: start, kill, stop, queue leaders, rejoin.
//! - [`cluster_drill`]: the `cluster` drill: node faults under load.
//! - [`leftovers`]: what is running or created, removed on SIGINT/SIGTERM.
//! - [`badinput`]: 10,000 messages, good and malformed, and the dead-letter check.
//! - [`tls`]: `warren demo` over `amqps://` against a TLS listener started
//!   on the running broker for the drill's length.

pub mod badinput;
pub mod check;
pub mod cluster;
pub mod cluster_drill;
pub mod leftovers;
pub mod load;
pub mod rabbit_cluster;
pub mod scenarios;
pub mod servers;
pub mod tls;
