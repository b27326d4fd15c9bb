//! What can be wrong with an incoming event. Every variant names the field
//! at fault and why, because the message ends up in a dead-letter header
//! that an operator reads.

/// An event body or its headers could not be turned into a valid event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than the configured maximum.
    #[error("body of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The body's size, in bytes.
        size: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The message carries more AMQP headers than [`crate::codec::MAX_HEADERS`].
    #[error("more than {max} AMQP headers")]
    TooManyHeaders {
        /// The limit.
        max: usize,
    },
    /// The body is not JSON at all.
    #[error("body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but not an object.
    #[error("body is JSON but not an object (found {0})")]
    NotAnObject(&'static str),
    /// A required CloudEvents attribute is absent.
    #[error("missing required attribute `{0}`")]
    MissingAttribute(&'static str),
    /// An attribute is present with a wrong value.
    #[error("attribute `{name}` is invalid: {reason}")]
    InvalidAttribute {
        /// The attribute (or its JSON path).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Not a CloudEvents 1.0 document.
    #[error("unsupported specversion {0:?}: only \"1.0\" is accepted")]
    WrongSpecVersion(String),
    /// `datacontenttype` is not JSON.
    #[error("unsupported datacontenttype {0:?}: data must be JSON")]
    UnsupportedContentType(String),
    /// The type is not in the catalog.
    #[error("unknown event type {0:?}: not in the catalog")]
    UnknownType(String),
    /// `dataversion` is newer than we know or older than we can upcast.
    #[error(
        "{event_type} dataversion {version} is not supported (supported: {oldest}..={current})"
    )]
    UnsupportedDataVersion {
        /// The event's type.
        event_type: String,
        /// The version it arrived with.
        version: u32,
        /// The oldest version the catalog can upcast.
        oldest: u32,
        /// The current version.
        current: u32,
    },
    /// `data` does not have the shape the catalog defines.
    #[error("{event_type}: `{path}` is invalid: {reason}")]
    WrongData {
        /// The event's type.
        event_type: String,
        /// The JSON path at fault (`data.lines[0].qty`).
        path: String,
        /// What is wrong there.
        reason: String,
    },
}

impl DecodeError {
    /// A short stable code, used as the dead-letter `reason` header.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } | DecodeError::TooManyHeaders { .. } => "too_large",
            DecodeError::MalformedJson(_) | DecodeError::NotAnObject(_) => "malformed_json",
            DecodeError::MissingAttribute(_)
            | DecodeError::InvalidAttribute { .. }
            | DecodeError::WrongSpecVersion(_)
            | DecodeError::UnsupportedContentType(_) => "invalid_envelope",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::UnsupportedDataVersion { .. } => "unsupported_version",
            DecodeError::WrongData { .. } => "invalid_data",
        }
    }
}
