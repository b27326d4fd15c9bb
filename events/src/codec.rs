//! Turning bytes into checked envelopes and back.
//!
//! Decoding is strict about the envelope (every attribute of the wire
//! contract present and well-formed, a known type, a supported
//! `dataversion`, `data` of the right shape) and bounded in size, and
//! upcasts `data` to the current version. It reads structured mode
//! (`application/cloudevents+json`) and binary mode (`ce-*` headers,
//! `data` as the body).

use serde_json::{Map, Value};

use crate::envelope::SPEC_VERSION;
use std::sync::Arc;

use crate::{upcast, Catalog, DecodeError, Envelope, EventSpec};

/// Default maximum body size: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Most AMQP headers a message may carry. Binary mode needs about a dozen
/// and warren's retries add six; more is a malformed or hostile message,
/// rejected before its headers are converted.
pub const MAX_HEADERS: usize = 64;
/// Longest string attribute (`source`, `type`, `subject`, `correlationid`,
/// `causationid`, `traceparent`), in bytes. They become log fields,
/// database keys and dead-letter headers, so they stay short.
pub const MAX_ATTRIBUTE_LEN: usize = 256;
/// AMQP `content_type` of structured-mode messages.
pub const CONTENT_TYPE_STRUCTURED: &str = "application/cloudevents+json";

/// Attributes a warren event must carry (besides `specversion`).
pub const REQUIRED: &[&str] = &[
    "id",
    "source",
    "type",
    "time",
    "subject",
    "dataversion",
    "sequence",
    "data",
];

/// Header prefixes of binary mode: `ce-` (RabbitMQ/Knative binding) and the
/// AMQP binding's `cloudEvents:`/`cloudEvents_`.
const BINARY_PREFIXES: &[&str] = &["ce-", "ce_", "cloudEvents:", "cloudEvents_"];

/// Whether a message with this content type is a structured-mode event
/// (the whole event in the body, headers not read).
pub fn is_structured(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| c.starts_with("application/cloudevents"))
}

/// Encoder/decoder of one application's events, with a size limit.
///
/// Decoding needs the application's [`Catalog`] (an unknown type is an
/// error); encoding does not (see [`encode`]). Cloning is cheap: the
/// catalog is shared.
#[derive(Debug, Clone)]
pub struct Codec {
    /// Largest body accepted, in bytes; larger ones are rejected unread.
    pub max_body: usize,
    /// The types this codec accepts.
    catalog: Arc<Catalog>,
}

impl Codec {
    /// A codec for `catalog`'s types, with the default body limit.
    pub fn new(catalog: impl Into<Arc<Catalog>>) -> Self {
        Codec {
            max_body: DEFAULT_MAX_BODY,
            catalog: catalog.into(),
        }
    }

    /// The same codec with another maximum body size.
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// The catalog it decodes with.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Structured mode: the body is the whole CloudEvents JSON document.
    pub fn encode(&self, envelope: &Envelope) -> Vec<u8> {
        encode(envelope)
    }

    /// Decodes a structured-mode body.
    pub fn decode(&self, body: &[u8]) -> Result<Envelope, DecodeError> {
        self.check_size(body.len())?;
        // The common case, a well-formed event, is read straight into the
        // envelope; anything that path does not accept as it stands (an
        // error of any kind, or a defaulted `datacontenttype`) is decoded
        // again through a JSON tree, which names the first problem
        // precisely. Both end in the same checks, so the result is the same.
        if let Ok(envelope) = serde_json::from_slice::<Envelope>(body) {
            if envelope.specversion == SPEC_VERSION && is_json(&envelope.datacontenttype) {
                if let Some(spec) = self.catalog.find(&envelope.event_type) {
                    return self.finish(envelope, spec);
                }
            }
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
        match value {
            Value::Object(map) => self.decode_object(map),
            other => Err(DecodeError::NotAnObject(json_kind(&other))),
        }
    }

    /// Decodes an AMQP message in either mode: structured when the content
    /// type says `application/cloudevents…` or no `ce-specversion` header is
    /// present; binary otherwise. `headers` are the AMQP headers, already
    /// converted to JSON values.
    pub fn decode_message<'a>(
        &self,
        content_type: Option<&str>,
        headers: impl IntoIterator<Item = (&'a str, Value)>,
        body: &[u8],
    ) -> Result<Envelope, DecodeError> {
        let structured = is_structured(content_type);
        let mut attrs = Map::new();
        let mut count = 0;
        for (name, value) in headers {
            count += 1;
            if count > MAX_HEADERS {
                return Err(DecodeError::TooManyHeaders { max: MAX_HEADERS });
            }
            if structured {
                continue;
            }
            if let Some(attr) = BINARY_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
                attrs.insert(attr.to_ascii_lowercase(), value);
            }
        }
        if structured || !attrs.contains_key("specversion") {
            return self.decode(body);
        }
        self.check_size(body.len())?;
        let ct = content_type.unwrap_or("application/json");
        if !is_json(ct) {
            return Err(DecodeError::UnsupportedContentType(ct.to_owned()));
        }
        let data: Value =
            serde_json::from_slice(body).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
        attrs.insert("datacontenttype".into(), Value::String(ct.to_owned()));
        attrs.insert("data".into(), data);
        self.decode_object(attrs)
    }

    fn check_size(&self, size: usize) -> Result<(), DecodeError> {
        if size > self.max_body {
            return Err(DecodeError::TooLarge {
                size,
                max: self.max_body,
            });
        }
        Ok(())
    }

    fn decode_object(&self, mut map: Map<String, Value>) -> Result<Envelope, DecodeError> {
        match map.get("specversion") {
            None => return Err(DecodeError::MissingAttribute("specversion")),
            Some(Value::String(v)) if v == SPEC_VERSION => {}
            Some(Value::String(v)) => return Err(DecodeError::WrongSpecVersion(v.clone())),
            Some(other) => return Err(DecodeError::WrongSpecVersion(other.to_string())),
        }
        if let Some(missing) = REQUIRED.iter().find(|a| !map.contains_key(**a)) {
            return Err(DecodeError::MissingAttribute(missing));
        }
        match map.get("datacontenttype") {
            None => {
                map.insert(
                    "datacontenttype".into(),
                    Value::String(crate::envelope::DATA_CONTENT_TYPE.into()),
                );
            }
            Some(Value::String(ct)) if is_json(ct) => {}
            Some(other) => {
                return Err(DecodeError::UnsupportedContentType(
                    other
                        .as_str()
                        .map_or_else(|| other.to_string(), str::to_owned),
                ))
            }
        }
        let event_type = match map.get("type") {
            Some(Value::String(t)) => t.clone(),
            _ => {
                return Err(DecodeError::InvalidAttribute {
                    name: "type".into(),
                    reason: "must be a string".into(),
                })
            }
        };
        let spec = *self
            .catalog
            .find(&event_type)
            .ok_or(DecodeError::UnknownType(event_type))?;
        let envelope: Envelope =
            serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
                DecodeError::InvalidAttribute {
                    name: e.path().to_string(),
                    reason: e.inner().to_string(),
                }
            })?;
        self.finish(envelope, &spec)
    }

    /// The checks every decoded envelope passes, whichever way it was read:
    /// attribute limits, subject and sequence, upcast and data shape.
    fn finish(&self, mut envelope: Envelope, spec: &EventSpec) -> Result<Envelope, DecodeError> {
        for (name, value) in [
            ("source", Some(&envelope.source)),
            ("type", Some(&envelope.event_type)),
            ("subject", Some(&envelope.subject)),
            ("correlationid", envelope.correlationid.as_ref()),
            ("causationid", envelope.causationid.as_ref()),
            ("traceparent", envelope.traceparent.as_ref()),
        ] {
            if let Some(v) = value.filter(|v| v.len() > MAX_ATTRIBUTE_LEN) {
                return Err(DecodeError::InvalidAttribute {
                    name: name.into(),
                    reason: format!("{} bytes long; the maximum is {MAX_ATTRIBUTE_LEN}", v.len()),
                });
            }
        }
        if envelope.subject.is_empty() {
            return Err(DecodeError::InvalidAttribute {
                name: "subject".into(),
                reason: "must not be empty".into(),
            });
        }
        if envelope.sequence < 1 {
            return Err(DecodeError::InvalidAttribute {
                name: "sequence".into(),
                reason: format!("must be 1 or more, got {}", envelope.sequence),
            });
        }
        if envelope.dataversion != spec.version {
            envelope.data =
                upcast::upcast(&self.catalog, spec, envelope.dataversion, &envelope.data)?;
            envelope.dataversion = spec.version;
        }
        (spec.validate)(&envelope.data)?;
        Ok(envelope)
    }
}

/// Structured mode: the body is the whole CloudEvents JSON document.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    // An Envelope holds only JSON-representable values, so this cannot fail.
    serde_json::to_vec(envelope).unwrap_or_default()
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence == "application/json" || essence.ends_with("+json") || essence == "text/json"
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
