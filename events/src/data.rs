//! An event's `data`, kept as the JSON text it arrived as (or was
//! serialised to) and read into the catalog's typed struct only when asked.
//!
//! Why text and not a `serde_json::Value`: a consumer would otherwise build
//! a JSON tree for every event, read the typed struct out of it twice (the
//! codec's shape check and the handler's [`crate::Envelope::data_as`]) and
//! drop it. Kept as text, the payload is copied once out of the body and
//! parsed straight into the typed struct, and encoding writes it back as
//! it is (what that saves is in BENCHMARKS.md).

use std::fmt;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// The `data` of an event: well-formed JSON text (guaranteed by
/// [`RawValue`]), written to the wire exactly as held.
///
/// Two `Data` are equal when they hold the same JSON value, whatever their
/// spacing or key order.
///
/// Always on one line: a line break read in it (only ever whitespace
/// between tokens, since JSON strings escape theirs) is read as a space,
/// so an event written as a JSON Lines fixture (`warren tail --format
/// fixture`, fixture files) stays one line.
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct Data(Box<RawValue>);

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(de)?;
        if !raw.get().contains(['\n', '\r']) {
            return Ok(Data(raw));
        }
        // Whitespace for whitespace: still the same, well-formed JSON.
        RawValue::from_string(raw.get().replace(['\n', '\r'], " "))
            .map(Data)
            .map_err(serde::de::Error::custom)
    }
}

impl Data {
    /// `data` serialised to JSON text.
    pub fn to_json<T: Serialize + ?Sized>(data: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(data).map(Data)
    }

    /// The JSON `null`.
    pub fn null() -> Self {
        Data(RawValue::NULL.to_owned())
    }

    /// The JSON text, as it will be written.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Reads the text into `T`. Errors carry serde_json's line and column;
    /// [`crate::catalog::typed_data`] names the JSON path instead.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The payload as a JSON tree, for code that inspects it without a
    /// typed struct (upcasters, tools, tests).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        self.parse()
    }
}

impl From<&Value> for Data {
    fn from(value: &Value) -> Self {
        // A `Value` always serialises: its map keys are strings and its
        // numbers finite, the two things that can make serde_json fail.
        Data::to_json(value).unwrap_or_else(|_| Data::null())
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        match (self.to_value(), other.to_value()) {
            (Ok(a), Ok(b)) => a == b,
            // Too deep to read as a tree: compare the text.
            _ => self.get() == other.get(),
        }
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_values_are_equal_whatever_the_spacing_and_key_order() {
        let a: Data = serde_json::from_str(r#"{ "a": 1, "b": [true] }"#).unwrap();
        let b: Data = serde_json::from_str(r#"{"b":[true],"a":1}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, Data::from(&json!({"a": 2, "b": [true]})));
    }

    #[test]
    fn the_text_is_written_back_as_it_was_read() {
        let body = r#"{"data":{ "x" : "é\u00e9" }}"#;
        #[derive(Deserialize, Serialize)]
        struct Doc {
            data: Data,
        }
        let doc: Doc = serde_json::from_str(body).unwrap();
        assert_eq!(doc.data.get(), r#"{ "x" : "é\u00e9" }"#);
        assert_eq!(serde_json::to_string(&doc).unwrap(), body);
        assert_eq!(doc.data.to_value().unwrap(), json!({"x": "éé"}));
    }

    #[test]
    fn a_payload_read_over_several_lines_is_kept_on_one() {
        let data: Data = serde_json::from_str("{\r\n  \"a\": \"x\\ny\",\n  \"b\": 1\n}").unwrap();
        assert!(!data.get().contains(['\n', '\r']), "{data}");
        assert_eq!(data, Data::from(&json!({"a": "x\ny", "b": 1})));
    }

    #[test]
    fn null_and_values_convert() {
        assert_eq!(Data::null().get(), "null");
        assert_eq!(Data::from(&json!([1, "two"])).get(), r#"[1,"two"]"#);
        assert_eq!(
            Data::to_json(&vec![3u8])
                .unwrap()
                .parse::<Vec<u8>>()
                .unwrap(),
            vec![3]
        );
    }
}
