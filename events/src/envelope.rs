//! The CloudEvents 1.0 envelope (structured mode) with warren's extensions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::catalog::EventData;
use crate::Data;

/// The only CloudEvents version warren reads and writes.
pub const SPEC_VERSION: &str = "1.0";
/// `datacontenttype` of every event warren writes.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// One event as it travels on the bus and sits in outboxes and fixtures.
///
/// Field names are the CloudEvents attribute names, so `serde_json` of this
/// struct *is* the structured-mode document any CloudEvents SDK reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `"1.0"`; checked on decode.
    pub specversion: String,
    /// UUID (v7 when warren creates it): the idempotency key of consumers.
    pub id: Uuid,
    /// `/warren/<service>`: who raised the event.
    pub source: String,
    /// Lower-case dotted event type; also the routing key.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the event was raised.
    pub time: DateTime<Utc>,
    /// The aggregate id the event is about; the unit of ordering.
    pub subject: String,
    /// Content type of `data`.
    pub datacontenttype: String,
    /// Schema version of `data`, lifted to the current one on decode.
    #[serde(deserialize_with = "int_or_numeric_string")]
    pub dataversion: u32,
    /// Per-(source, subject) position, strictly increasing from 1.
    #[serde(deserialize_with = "int_or_numeric_string")]
    pub sequence: i64,
    /// Id of the first event (or request) of the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    /// Id of the event that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// W3C trace context of the span that raised the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The event payload, checked against the catalog on decode; read it
    /// with [`Envelope::data_as`].
    pub data: Data,
}

impl Envelope {
    /// Builds a new envelope for `data` with a fresh UUID v7 id and the
    /// current time. `sequence` is 0 until an outbox assigns it, and the
    /// correlation id defaults to the event's own id (it starts a
    /// conversation) until a caller says otherwise.
    pub fn new<E: EventData>(service: &str, subject: impl Into<String>, data: &E) -> Self {
        let id = Uuid::now_v7();
        Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: source_of(service),
            event_type: E::TYPE.to_owned(),
            time: Utc::now(),
            subject: subject.into(),
            datacontenttype: DATA_CONTENT_TYPE.to_owned(),
            dataversion: E::VERSION,
            sequence: 0,
            correlationid: Some(id.to_string()),
            causationid: None,
            // The span raising the event (an HTTP request, a handler), when
            // OpenTelemetry records spans; a new trace otherwise.
            traceparent: Some(crate::trace_context::current().unwrap_or_else(|| traceparent(None))),
            // Serialising a plain data struct of the catalog cannot fail:
            // they hold only strings, numbers, uuids and vecs.
            data: Data::to_json(data).unwrap_or_else(|_| Data::null()),
        }
    }

    /// Marks this envelope as caused by `cause`: same correlation,
    /// `causationid` = the cause's id, and the cause's trace: the current
    /// span's context when it belongs to that trace (the span handling
    /// `cause`, when OpenTelemetry records spans), else a new span id in the
    /// cause's trace.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.correlationid = Some(
            cause
                .correlationid
                .clone()
                .unwrap_or_else(|| cause.id.to_string()),
        );
        self.causationid = Some(cause.id.to_string());
        let cause_trace = cause
            .traceparent
            .as_deref()
            .and_then(crate::trace_context::trace_id);
        self.traceparent = Some(
            crate::trace_context::current()
                .filter(|own| {
                    cause_trace.is_some() && crate::trace_context::trace_id(own) == cause_trace
                })
                .unwrap_or_else(|| traceparent(cause.traceparent.as_deref())),
        );
        self
    }

    /// The service name from `source` (`/warren/orders` → `orders`).
    pub fn service(&self) -> &str {
        self.source.rsplit('/').next().unwrap_or(&self.source)
    }

    /// `data` as the typed struct of the catalog.
    pub fn data_as<E: EventData>(&self) -> Result<E, crate::DecodeError> {
        crate::catalog::typed_data::<E>(&self.event_type, &self.data)
    }
}

/// A W3C `traceparent` for a new span: it continues the trace of `parent`
/// when that is a valid traceparent, and starts a new trace otherwise. This
/// propagates one trace across a whole saga without an OpenTelemetry SDK;
/// with one, [`Envelope::new`] and [`Envelope::caused_by`] take the current
/// span's context instead (see [`crate::trace_context`]).
pub fn traceparent(parent: Option<&str>) -> String {
    let trace_id = parent
        .and_then(|p| {
            let parts: Vec<&str> = p.split('-').collect();
            (parts.len() == 4
                && parts[1].len() == 32
                && parts[1].bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| parts[1].to_owned())
        })
        .unwrap_or_else(|| Uuid::new_v4().simple().to_string());
    let span = Uuid::new_v4().simple().to_string();
    format!("00-{trace_id}-{}-01", &span[..16])
}

/// `source` attribute for a service name.
pub fn source_of(service: &str) -> String {
    format!("/warren/{service}")
}

/// CloudEvents binary mode carries every attribute as a string header, so
/// integer extensions are read from numbers and numeric strings alike.
fn int_or_numeric_string<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + std::str::FromStr,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Str(String),
    }
    let raw = Raw::deserialize(de)
        .map_err(|_| serde::de::Error::custom("expected an integer or a string holding one"))?;
    match raw {
        Raw::Int(n) => {
            T::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range")))
        }
        Raw::Str(s) => s
            .trim()
            .parse::<T>()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an integer"))),
    }
}
