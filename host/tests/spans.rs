//! A handler's own log lines carry the event it handles: a tracing layer
//! of the test's own captures the line a handler logs and the fields of
//! every span around it, over the real broker and database. (One test in
//! this file: it installs the process's global subscriber.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use testkit::TestBus;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;
use warren::{Bus, Catalog, Context, Envelope, Handle, HandleError, Service};

#[derive(Debug, Serialize, Deserialize)]
struct TicketOpened {
    title: String,
}
warren::event_data! {
    TicketOpened = "ticket.opened", version 1, from "helpdesk";
}

/// What the handler logs, to find its line among the others.
const MARK: &str = "triage looked at the ticket";

struct Triage;
#[warren::async_trait]
impl Handle<TicketOpened> for Triage {
    async fn handle(&self, _ctx: &mut Context<'_>, t: TicketOpened) -> Result<(), HandleError> {
        tracing::info!(title = %t.title, "{MARK}");
        Ok(())
    }
}

/// The message of a captured span opening.
const OPENED: &str = "<span opened>";

/// Field values by name.
#[derive(Debug, Default, Clone)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// One captured event: its message, and each enclosing span (innermost
/// first) with its fields.
#[derive(Debug, Clone)]
struct Captured {
    message: String,
    spans: Vec<(String, BTreeMap<String, String>)>,
}

impl Captured {
    fn span(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.spans.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

/// Keeps every span's fields in its extensions and, for each event,
/// records the fields of the spans it happened in.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        // Each span opened is kept too, as a pseudo-event.
        self.0.lock().unwrap().push(Captured {
            message: OPENED.to_owned(),
            spans: vec![(attrs.metadata().name().to_owned(), fields.0.clone())],
        });
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .into_iter()
            .flatten()
            .map(|span| {
                let f = span
                    .extensions()
                    .get::<Fields>()
                    .map(|f| f.0.clone())
                    .unwrap_or_default();
                (span.name().to_owned(), f)
            })
            .collect();
        let message = fields.0.remove("message").unwrap_or_default();
        self.0.lock().unwrap().push(Captured { message, spans });
    }
}

#[sqlx::test(migrations = false)]
async fn a_handlers_own_log_line_carries_the_event_id_and_correlation_it_handles(pool: PgPool) {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .unwrap();

    let test_bus = TestBus::new().await;
    let bus = Bus::new(
        testkit::amqp_url(),
        test_bus.topology.clone(),
        Catalog::new().with::<TicketOpened>(),
    );
    let triage = Service::new("triage", bus.clone())
        .pool(pool.clone())
        .handle::<TicketOpened, _>(Triage);
    test_bus.remember(
        "triage",
        &warren::SubscriptionConfig::default().retry.delays(),
    );
    let helpdesk = Service::new("helpdesk", bus).pool(pool.clone());
    for service in [&triage, &helpdesk] {
        service.install().await.unwrap();
        service.declare().await.unwrap();
    }
    let triage = triage.start().await.unwrap();
    let helpdesk = helpdesk.start().await.unwrap();

    // A subject with a line break in it, as any publisher could send.
    let mut event = Envelope::new(
        "helpdesk",
        "T-1\n# forged",
        &TicketOpened {
            title: "printer on fire".into(),
        },
    );
    let correlation = format!("corr-{}", uuid::Uuid::now_v7());
    event.correlationid = Some(correlation.clone());
    let id = event.id.to_string();
    let mut tx = pool.begin().await.unwrap();
    helpdesk.outbox().append(&mut tx, event).await.unwrap();
    tx.commit().await.unwrap();
    assert!(triage.settled(1, Duration::from_secs(30)).await);
    helpdesk.stop().await;
    triage.stop().await;

    let captured = capture.0.lock().unwrap().clone();
    let line = captured
        .iter()
        .find(|c| c.message == MARK)
        .unwrap_or_else(|| panic!("the handler's line was not captured: {captured:#?}"));
    let handle = line
        .span("warren.handle")
        .unwrap_or_else(|| panic!("the handler's line is in no warren.handle span: {line:?}"));
    assert_eq!(handle["event_id"], id);
    assert_eq!(handle["correlation_id"], correlation);
    assert_eq!(handle["service"], "triage");
    assert_eq!(handle["event_type"], "ticket.opened");
    assert_eq!(handle["attempt"], "1");
    // Wire text is escaped before it becomes a field.
    assert_eq!(handle["subject"], "T-1\\n# forged");
    let batch = line
        .span("warren.batch")
        .unwrap_or_else(|| panic!("the handling is in no warren.batch span: {line:?}"));
    assert_eq!(batch["service"], "triage");

    // The append ran in a span of its own naming the event.
    let appended = captured
        .iter()
        .find(|c| c.message == "appended to outbox")
        .unwrap_or_else(|| panic!("no append line: {captured:#?}"));
    let append = appended.span("warren.outbox.append").unwrap();
    assert_eq!(append["event_id"], id);
    assert_eq!(append["correlation_id"], correlation);
    // The relay published it in a span of its own.
    assert!(
        captured.iter().any(|c| c.message == OPENED
            && c.span("warren.relay.publish")
                .is_some_and(|f| f["service"] == "helpdesk")),
        "{captured:#?}"
    );
}
