//! The wire contract of warren: the CloudEvents envelope, the catalog of
//! domain events, the codec that turns bytes into checked envelopes (and
//! back), and JSON Lines fixtures. This crate does no IO besides reading
//! and writing fixture files, so every producer, consumer and tool shares
//! exactly one definition of what a valid event is.
//!
//! # Layout
//! - [`envelope`]: the CloudEvents 1.0 envelope with warren's extensions.
//! - [`catalog`]: every event type, its `data` struct, its `dataversion` and
//!   the service that raises it.
//! - [`codec`]: structured- and binary-mode decoding with bounded size and
//!   errors that name the field at fault; structured-mode encoding.
//! - [`upcast`]: the hook that lifts older `dataversion`s to the current one.
//! - [`fixtures`]: JSON Lines fixture reader/writer with file:line errors.
//! - [`error`]: [`DecodeError`], what can be wrong with an incoming event.

pub mod catalog;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod fixtures;
pub mod upcast;

pub use catalog::{EventData, EventSpec, CATALOG};
pub use codec::{Codec, CONTENT_TYPE_STRUCTURED, DEFAULT_MAX_BODY, MAX_ATTRIBUTE_LEN, MAX_HEADERS};
pub use envelope::Envelope;
pub use error::DecodeError;
