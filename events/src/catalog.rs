//! The catalog: the event types an application knows, built by the
//! application as a value and handed to the codec, the topology and the
//! permissions. warren itself knows no event type.
//!
//! Each type says its CloudEvents `type` (also the routing key), the current
//! `dataversion` of its `data` and the service that raises it; older
//! versions are accepted when the catalog holds upcasters that lift them,
//! one version at a time, to the current shape (see [`crate::upcast`]).
//!
//! Readers are tolerant: unknown fields in `data` are ignored (a producer
//! may add optional fields without a version bump); a missing field or a
//! wrong type is an error that names the JSON path.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use warren_events::{Catalog, EventData};
//!
//! #[derive(Serialize, Deserialize)]
//! struct TicketOpened { ticket_id: String, title: String }
//!
//! impl EventData for TicketOpened {
//!     const TYPE: &'static str = "ticket.opened";
//!     const VERSION: u32 = 2;
//!     const SOURCE: &'static str = "helpdesk";
//! }
//!
//! let catalog = Catalog::new()
//!     .with::<TicketOpened>()
//!     // v1 called the title `subject`.
//!     .upcast::<TicketOpened>(1, |mut data| {
//!         let obj = data.as_object_mut().ok_or("data is not an object")?;
//!         let title = obj.remove("subject").ok_or("missing field `subject`")?;
//!         obj.insert("title".into(), title);
//!         Ok(data)
//!     });
//! assert_eq!(catalog.find("ticket.opened").map(|s| s.oldest_version), Some(1));
//! assert!(catalog.find("ticket.closed").is_none());
//! ```

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use crate::{Data, DecodeError};

/// A typed `data` payload of one event type.
pub trait EventData: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`, also the routing key.
    const TYPE: &'static str;
    /// The current schema version of this payload.
    const VERSION: u32;
    /// The service that raises this event.
    const SOURCE: &'static str;
}

/// What the catalog knows about one event type, without its Rust type.
#[derive(Debug, Clone, Copy)]
pub struct EventSpec {
    /// The CloudEvents `type`.
    pub event_type: &'static str,
    /// Current `dataversion`.
    pub version: u32,
    /// Oldest `dataversion` that can still be upcast to `version`.
    pub oldest_version: u32,
    /// Service that raises it.
    pub source: &'static str,
    /// Checks that a (current-version) `data` has this type's shape.
    pub validate: fn(&Data) -> Result<(), DecodeError>,
}

/// One upcasting step of `data`, from one version to the next; its error
/// says what in the old shape was wrong.
pub type Upcaster = fn(Value) -> Result<Value, String>;

/// The event types of an application, with their upcasters.
///
/// Built once at start-up and shared (the codec holds it in an `Arc`); two
/// applications in one process each hold their own.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// In registration order, which is the order tools list them in.
    specs: Vec<EventSpec>,
    /// (type, from version, step): `from` → `from + 1`.
    steps: Vec<(&'static str, u32, Upcaster)>,
}

impl Catalog {
    /// An empty catalog: every type is unknown.
    pub fn new() -> Self {
        Catalog::default()
    }

    /// Adds `E`. Registering a type again replaces what was known of it.
    pub fn with<E: EventData>(mut self) -> Self {
        let spec = EventSpec {
            event_type: E::TYPE,
            version: E::VERSION,
            oldest_version: E::VERSION,
            source: E::SOURCE,
            validate: |v| typed_data::<E>(E::TYPE, v).map(|_| ()),
        };
        match self.specs.iter_mut().find(|s| s.event_type == E::TYPE) {
            Some(known) => *known = spec,
            None => self.specs.push(spec),
        }
        self
    }

    /// Adds the step that lifts `E`'s `data` from version `from` to
    /// `from + 1`, so events as old as `from` are accepted (when the steps
    /// from there to the current version all exist). Register `E` first.
    pub fn upcast<E: EventData>(mut self, from: u32, step: Upcaster) -> Self {
        self.steps
            .retain(|(t, f, _)| !(*t == E::TYPE && *f == from));
        self.steps.push((E::TYPE, from, step));
        if let Some(spec) = self.specs.iter_mut().find(|s| s.event_type == E::TYPE) {
            spec.oldest_version = spec.oldest_version.min(from);
        }
        self
    }

    /// The spec of a type, if the catalog holds it.
    pub fn find(&self, event_type: &str) -> Option<&EventSpec> {
        self.specs.iter().find(|s| s.event_type == event_type)
    }

    /// Every type, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &EventSpec> {
        self.specs.iter()
    }

    /// Whether the catalog holds no type.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The types `source` raises.
    pub fn raised_by<'a>(&'a self, source: &'a str) -> impl Iterator<Item = &'static str> + 'a {
        self.specs
            .iter()
            .filter(move |s| s.source == source)
            .map(|s| s.event_type)
    }

    /// The routing keys a queue handling `handled` must be bound to: every
    /// type raised by the sources of those types. `sequence` counts all
    /// events of a (source, subject), so a consumer must see them all to
    /// know that none is missing before applying the next.
    pub fn bindings(&self, handled: &[&str]) -> Vec<&'static str> {
        let sources: Vec<&str> = self
            .specs
            .iter()
            .filter(|s| handled.contains(&s.event_type))
            .map(|s| s.source)
            .collect();
        self.specs
            .iter()
            .filter(|s| sources.contains(&s.source))
            .map(|s| s.event_type)
            .collect()
    }

    /// The step from `from` to `from + 1` of `event_type`, if registered.
    pub(crate) fn step(&self, event_type: &str, from: u32) -> Option<Upcaster> {
        self.steps
            .iter()
            .find(|(t, f, _)| *t == event_type && *f == from)
            .map(|(_, _, s)| *s)
    }
}

/// Deserialises `data` into `E`, naming the JSON path of the first error.
pub fn typed_data<E: DeserializeOwned>(event_type: &str, data: &Data) -> Result<E, DecodeError> {
    // Straight from the text first: that is every well-formed event. Only
    // a failure pays for a JSON tree, read the way a tree always was (a
    // repeated key keeps its last value) and, when that fails too, with the
    // path tracking that names where it went wrong.
    if let Ok(typed) = data.parse::<E>() {
        return Ok(typed);
    }
    let wrong = |path: String, reason: String| DecodeError::WrongData {
        event_type: event_type.to_owned(),
        path,
        reason,
    };
    let tree: Value = data
        .to_value()
        .map_err(|e| wrong("data".to_owned(), e.to_string()))?;
    if let Ok(typed) = E::deserialize(&tree) {
        return Ok(typed);
    }
    serde_path_to_error::deserialize(&tree).map_err(|e| {
        wrong(
            match e.path().to_string().as_str() {
                "." => "data".to_owned(),
                p => format!("data.{p}"),
            },
            e.inner().to_string(),
        )
    })
}

/// Implements [`EventData`] for payload types: their CloudEvents `type`,
/// current `dataversion` and source service, one line each.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct TicketOpened { title: String }
/// warren_events::event_data! {
///     TicketOpened = "ticket.opened", version 1, from "helpdesk";
/// }
/// # use warren_events::EventData;
/// assert_eq!(TicketOpened::TYPE, "ticket.opened");
/// ```
#[macro_export]
macro_rules! event_data {
    ($( $ty:ty = $name:literal, version $ver:literal, from $src:literal );+ $(;)?) => {
        $(
            impl $crate::EventData for $ty {
                const TYPE: &'static str = $name;
                const VERSION: u32 = $ver;
                const SOURCE: &'static str = $src;
            }
        )+
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Thing {
        n: u32,
    }

    fn data(text: &str) -> Data {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_as_a_json_tree_read_it() {
        // Straight from the text serde refuses a duplicate field; `data`
        // was read as a tree before it was kept as text, and still is then.
        assert_eq!(
            typed_data::<Thing>("thing", &data(r#"{"n":1,"n":2}"#)),
            Ok(Thing { n: 2 })
        );
    }

    #[test]
    fn wrong_data_names_the_path_without_a_line_and_column() {
        let err = typed_data::<Thing>("thing", &data(r#"{ "n": "one" }"#)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::WrongData {
                event_type: "thing".into(),
                path: "data.n".into(),
                reason: "invalid type: string \"one\", expected u32".into(),
            }
        );
    }
}
