//! Getting events in: the subscription runtime that consumes a service's
//! queue and runs its handlers exactly once per event, in per-subject
//! order, with delayed retries and dead letters.
//!
//! The contract, in the manner of Watermill's router: handlers change their
//! own store inside the transaction the runtime opens, may append follow-up
//! events through [`Context::emit`], and return a [`HandleError`] to say
//! what went wrong. They never acknowledge anything; the runtime owns acks,
//! and sends one only after the transaction committed.
//!
//! # Layout
//! - [`handler`]: the [`Handle`], [`HandleBatch`] and [`Prepare`] traits, the [`Context`] and [`Batch`]
//!   a handler gets, [`HandleError`].
//! - [`router`]: registration of typed handlers (one event or a run of them) per event type.
//! - [`config`]: [`SubscriptionConfig`], the tuning of a subscription.
//! - [`subscription`]: a session's steps: connect, declare, consume, feed the lanes, drain,
//!   reconnect.
//! - `lanes`: the per-subject workers a session fans deliveries out to, with their bounded
//!   queues and held database connections.
//! - [`delivery`]: what happens to a lane's batch: decode, one transaction (inbox, order,
//!   handlers), then settle each delivery and acknowledge.
//! - `order`: per-subject order: which events of a batch apply now, which are duplicate,
//!   early or stale, and the runs handlers get.
//! - [`retry`]: the [`RetryPolicy`]: retry delays, attempts, deferrals and when to give up,
//!   as a [`Decision`].
//! - [`deadletter`]: carrying decisions out through the broker (retry queues, dead-letter
//!   queue) and the headers they set.
//! - [`inbox`]: idempotency records, per-subject progress, retention.
//! - [`trail`]: the deliveries that ended otherwise than applied (duplicate, deferred,
//!   retried, dead-lettered), kept for `warren trace`.
//! - [`install`]: the inbox's tables, installed by the library's versioned installer.
//! - [`partitions`]: ordered partitions: which of a partitioned service's partitions this
//!   process consumes, and how they change hands (single active consumer, advisory locks).
//! - `acks`: acknowledgements with `multiple`, safe across lanes.
//! - [`outcome`]: outcomes, their log lines, counters and the live feed for `warren tail`.
//! - `spans`: the spans a batch and each event's handling run in (`warren.batch`,
//!   `warren.handle`), so a handler's own log lines carry the event's id and correlation.
//! - `testkit` (feature): fault injection for the integration tests
//!   (`config::CrashPoint`), inert unless a test sets it.

#![warn(missing_docs)]

mod acks;
pub mod config;
pub mod deadletter;
pub mod delivery;
pub mod handler;
pub mod inbox;
pub mod install;
mod lanes;
mod order;
pub mod outcome;
pub mod partitions;
pub mod retry;
pub mod router;
mod spans;
pub mod subscription;
pub mod trail;

#[cfg(feature = "testkit")]
pub use config::CrashPoint;
pub use config::SubscriptionConfig;
pub use handler::{Batch, Context, Handle, HandleBatch, HandleError, Prepare};
pub use outcome::{Outcome, OutcomeRecord, Stats};
pub use retry::{Decision, RetryPolicy};
pub use router::Router;
pub use subscription::{Subscription, SubscriptionError};
