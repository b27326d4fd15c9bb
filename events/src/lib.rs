//! The wire contract of warren: the CloudEvents envelope, the catalog an
//! application builds from its own event types, the codec that turns bytes into checked envelopes (and
//! back), and JSON Lines fixtures. This crate does no IO besides reading
//! and writing fixture files, so every producer, consumer and tool shares
//! exactly one definition of what a valid event is.
//!
//! # Layout
//! - [`envelope`]: the CloudEvents 1.0 envelope with warren's extensions.
//! - [`data`]: [`Data`], an event's payload kept as its JSON text.
//! - [`catalog`]: [`Catalog`], the application's event types (their
//!   `dataversion`, the service that raises them) and upcasters, as a value.
//! - [`codec`]: structured- and binary-mode decoding with bounded size and
//!   errors that name the field at fault; structured-mode encoding.
//! - [`upcast`]: lifting older `dataversion`s to the current one with the catalog's steps.
//! - [`fixtures`]: JSON Lines fixture reader/writer with file:line errors.
//! - [`mod@printable`]: wire text escaped and bounded for logs, spans and metrics.
//! - [`error`]: [`DecodeError`], what can be wrong with an incoming event.
//! - [`trace_context`]: an event's `traceparent` from the current span, and
//!   a handling span's parent from an event's `traceparent` (OpenTelemetry).

#![warn(missing_docs)]

pub mod catalog;
pub mod codec;
pub mod data;
pub mod envelope;
pub mod error;
pub mod fixtures;
pub mod printable;
pub mod trace_context;
pub mod upcast;

pub use catalog::{Catalog, EventData, EventSpec, Upcaster};
pub use codec::{
    encode, is_structured, Codec, CONTENT_TYPE_STRUCTURED, DEFAULT_MAX_BODY, MAX_ATTRIBUTE_LEN,
    MAX_HEADERS,
};
pub use data::Data;
pub use envelope::Envelope;
pub use error::DecodeError;
pub use printable::printable;
