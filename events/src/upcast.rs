//! Upcasting: older `dataversion`s of an event are lifted, one version at a
//! time, to the current one before anyone sees them, so handlers only ever
//! deal with the current shape. Adding a version means adding one step here.

use serde_json::Value;

use crate::{DecodeError, EventSpec};

/// One step `from` → `from + 1` for an event type.
type Step = fn(Value) -> Result<Value, String>;

/// The steps that exist: (type, from version, step).
const STEPS: &[(&str, u32, Step)] = &[("customer.registered", 1, customer_registered_v1_to_v2)];

/// Lifts `data` at `version` to the current version of `spec`.
pub fn upcast(spec: &EventSpec, version: u32, mut data: Value) -> Result<Value, DecodeError> {
    if version > spec.version || version < spec.oldest_version {
        return Err(DecodeError::UnsupportedDataVersion {
            event_type: spec.event_type.to_owned(),
            version,
            oldest: spec.oldest_version,
            current: spec.version,
        });
    }
    for from in version..spec.version {
        let step = STEPS
            .iter()
            .find(|(t, f, _)| *t == spec.event_type && *f == from)
            .map(|(_, _, s)| *s)
            .ok_or_else(|| DecodeError::UnsupportedDataVersion {
                event_type: spec.event_type.to_owned(),
                version,
                oldest: spec.oldest_version,
                current: spec.version,
            })?;
        data = step(data).map_err(|reason| DecodeError::WrongData {
            event_type: spec.event_type.to_owned(),
            path: "data".to_owned(),
            reason: format!("cannot upcast from dataversion {from}: {reason}"),
        })?;
    }
    Ok(data)
}

/// v1 named the customer's name `full_name`.
fn customer_registered_v1_to_v2(mut data: Value) -> Result<Value, String> {
    let obj = data.as_object_mut().ok_or("data is not an object")?;
    let name = obj.remove("full_name").ok_or("missing field `full_name`")?;
    obj.insert("name".to_owned(), name);
    Ok(data)
}
