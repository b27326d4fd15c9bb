//! The `warren` command line: run the services, publish and replay events,
//! watch the bus, inspect status and dead letters, run the demo and the
//! benchmark. The binary (`main.rs`) only parses arguments and maps errors
//! to exit codes; everything else is here, so tests can call it.
//!
//! # Layout
//! - [`config`]: the typed settings (flags with environment variables), database connection, migrations.
//! - [`telemetry`]: the tracing subscriber (pretty on a terminal, JSON on request).
//! - [`bus`]: publishing events and raw messages with confirms.
//! - [`commands`]: one module per command.
//! - [`mod@bench`]: the benchmark behind `warren bench`.
//! - [`scaling`]: `warren bench --scaling`, the consumer layouts with 1 to 3 consumers.
//! - [`error`]: errors that choose the exit code.
//! - [`output`]: standard output as tools are expected to write it (colour choice, closed pipes, escaping).
//! - [`rabbitmqctl`]: RabbitMQ's own CLI, for what AMQP cannot ask (users, listings, alarms).
//! - [`placement`]: which node of a RabbitMQ cluster each connection and queue leader is on.

pub mod bench;
pub mod bus;
pub mod commands;
pub mod config;
pub mod error;
pub mod output;
pub mod placement;
pub mod rabbitmqctl;
pub mod scaling;
pub mod telemetry;
