//! Upcasting: older `dataversion`s of an event are lifted, one version at a
//! time, to the current one before anyone sees them, so handlers only ever
//! deal with the current shape. The steps are the application's, registered
//! in its [`Catalog`] with [`Catalog::upcast`].

use serde_json::Value;

use crate::{Catalog, Data, DecodeError, EventSpec};

/// Lifts `data` at `version` to the current version of `spec`, with the
/// steps `catalog` holds. Only an older version is read as a JSON tree (the
/// steps work on trees); the current one is returned as it is.
pub fn upcast(
    catalog: &Catalog,
    spec: &EventSpec,
    version: u32,
    data: &Data,
) -> Result<Data, DecodeError> {
    let unsupported = || DecodeError::UnsupportedDataVersion {
        event_type: spec.event_type.to_owned(),
        version,
        oldest: spec.oldest_version,
        current: spec.version,
    };
    if version > spec.version || version < spec.oldest_version {
        return Err(unsupported());
    }
    if version == spec.version {
        return Ok(data.clone());
    }
    let mut data: Value = data.to_value().map_err(|e| DecodeError::WrongData {
        event_type: spec.event_type.to_owned(),
        path: "data".to_owned(),
        reason: e.to_string(),
    })?;
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
    Ok(Data::from(&data))
}
