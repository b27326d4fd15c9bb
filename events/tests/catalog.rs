//! The catalog is the application's: types it registers decode, others are
//! refused with the same errors as ever, and its upcasters lift old data.

use serde::{Deserialize, Serialize};
use serde_json::json;
use warren_events::{Catalog, Codec, DecodeError, Envelope, EventData};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct TicketOpened {
    ticket_id: String,
    title: String,
}
impl EventData for TicketOpened {
    const TYPE: &'static str = "ticket.opened";
    const VERSION: u32 = 2;
    const SOURCE: &'static str = "helpdesk";
}

#[derive(Debug, Serialize, Deserialize)]
struct TicketClosed {
    ticket_id: String,
}
impl EventData for TicketClosed {
    const TYPE: &'static str = "ticket.closed";
    const VERSION: u32 = 1;
    const SOURCE: &'static str = "helpdesk";
}

#[derive(Debug, Serialize, Deserialize)]
struct InvoiceSent {
    invoice_id: String,
}
impl EventData for InvoiceSent {
    const TYPE: &'static str = "invoice.sent";
    const VERSION: u32 = 1;
    const SOURCE: &'static str = "billing";
}

fn catalog() -> Catalog {
    Catalog::new()
        .with::<TicketOpened>()
        .with::<TicketClosed>()
        .with::<InvoiceSent>()
        .upcast::<TicketOpened>(1, |mut data| {
            let obj = data.as_object_mut().ok_or("data is not an object")?;
            let title = obj.remove("subject").ok_or("missing field `subject`")?;
            obj.insert("title".into(), title);
            Ok(data)
        })
}

fn opened() -> Envelope {
    let mut e = Envelope::new(
        "helpdesk",
        "T-1",
        &TicketOpened {
            ticket_id: "T-1".into(),
            title: "printer on fire".into(),
        },
    );
    e.sequence = 1;
    e
}

#[test]
fn a_registered_type_round_trips_and_an_unknown_one_is_refused() {
    let codec = Codec::new(catalog());
    let e = opened();
    let back = codec.decode(&codec.encode(&e)).unwrap();
    assert_eq!(back, e);

    let other = Codec::new(Catalog::new().with::<InvoiceSent>());
    let err = other.decode(&codec.encode(&e)).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnknownType(ref t) if t == "ticket.opened"),
        "{err:?}"
    );
    assert_eq!(err.kind(), "unknown_type");
}

#[test]
fn old_versions_are_upcast_with_the_catalogs_steps_and_others_refused() {
    let codec = Codec::new(catalog());
    let mut v: serde_json::Value = serde_json::from_slice(&codec.encode(&opened())).unwrap();
    v["dataversion"] = json!(1);
    v["data"] = json!({"ticket_id": "T-1", "subject": "printer on fire"});
    let back = codec.decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(back.dataversion, 2);
    assert_eq!(back.data.to_value().unwrap()["title"], "printer on fire");

    // Without the step, version 1 is not supported.
    let strict = Codec::new(Catalog::new().with::<TicketOpened>());
    let err = strict.decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert_eq!(err.kind(), "unsupported_version", "{err}");
    v["dataversion"] = json!(3);
    let err = codec.decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert_eq!(err.kind(), "unsupported_version", "{err}");
}

#[test]
fn bindings_cover_every_type_of_the_handled_sources_and_raised_by_lists_a_source() {
    let c = catalog();
    assert_eq!(
        c.bindings(&["ticket.closed"]),
        vec!["ticket.opened", "ticket.closed"]
    );
    assert_eq!(c.bindings(&["invoice.sent"]), vec!["invoice.sent"]);
    assert!(c.bindings(&["nobody.knows"]).is_empty());
    assert_eq!(
        c.raised_by("billing").collect::<Vec<_>>(),
        vec!["invoice.sent"]
    );
    assert!(Catalog::new().is_empty());
}

#[test]
fn a_pretty_printed_event_is_written_back_on_one_line() {
    // Another publisher's pretty-printed body: `data` is kept as text, so
    // it must not carry the line breaks into a JSON Lines fixture.
    let codec = Codec::new(catalog());
    let v: serde_json::Value = serde_json::from_slice(&codec.encode(&opened())).unwrap();
    let pretty = serde_json::to_vec_pretty(&v).unwrap();
    assert!(pretty.contains(&b'\n'));
    let back = codec.decode(&pretty).unwrap();
    let line = codec.encode(&back);
    assert!(!line.contains(&b'\n'), "{}", String::from_utf8_lossy(&line));
    assert_eq!(back, codec.decode(&line).unwrap());
}
