//! The transport: everything warren does with RabbitMQ that producers and
//! consumers share, so both stand on one room as siblings.
//!
//! # Layout
//! - [`mod@connect`]: connecting with a timeout, TLS trust from the URL
//!   (`amqps://…?cacertfile=`), errors without the password.
//! - [`nodes`]: several broker URLs of one cluster (`AMQP_URL` with
//!   commas): [`connect()`] tries them shuffled and takes the first that
//!   answers.
//! - [`reconnect`]: the loop long-running workers run their sessions in.
//! - [`backoff`]: capped exponential backoff with jitter.
//! - [`topology`]: names and idempotent declaration of exchanges and queues.
//! - [`publisher`]: the one publisher with confirms, and the reading of a
//!   confirm.

#![warn(missing_docs)]

pub mod backoff;
pub mod connect;
pub mod nodes;
pub mod publisher;
pub mod reconnect;
pub mod topology;

pub use backoff::Backoff;
pub use connect::{close, close_within, redact, ConnectError, CONNECT_TIMEOUT};
pub use nodes::{connect, connect_any};
pub use publisher::{confirm_problem, event_properties, Outgoing, PublishError, Publisher};
pub use reconnect::Reconnect;
pub use topology::{Topology, TopologyError, SUBJECT_HEADER};
