//! Upcasting: older `dataversion`s of an event are lifted, one version at a
//! time, to the current one before anyone sees them, so handlers only ever
//! deal with the current shape. The steps are the application's, registered
//! in its [`Catalog`] with [`Catalog::upcast`].

use serde_json::Value;

use crate::{Catalog, DecodeError, EventSpec};

/// Lifts `data` at `version` to the current version of `spec`, with the
/// steps `catalog` holds.
pub fn upcast(
    catalog: &Catalog,
    spec: &EventSpec,
    version: u32,
    mut data: Value,
) -> Result<Value, DecodeError> {
    let unsupported = || DecodeError::UnsupportedDataVersion {
        event_type: spec.event_type.to_owned(),
        version,
        oldest: spec.oldest_version,
        current: spec.version,
    };
    if version > spec.version || version < spec.oldest_version {
        return Err(unsupported());
    }
    for from in version..spec.version {
        let step = catalog
            .step(spec.event_type, from)
            .ok_or_else(unsupported)?;
        data = step(data).map_err(|reason| DecodeError::WrongData {
            event_type: spec.event_type.to_owned(),
            path: "data".to_owned(),
            reason: format!("cannot upcast from dataversion {from}: {reason}"),
        })?;
    }
    Ok(data)
}
