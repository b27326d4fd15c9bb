//! A `tracing` layer that keeps what a test needs to check spans: every
//! event with the fields of each span it happened in, and every span with
//! its fields as they were when it closed. Install it as the process's
//! global subscriber (one test per file, then).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Field values by name, as text (`Debug` of non-strings).
pub type Fields = BTreeMap<String, String>;

#[derive(Default)]
struct Recorder(Fields);

impl Visit for Recorder {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// One event: its message, its own fields and each enclosing span (innermost
/// first) with the span's fields.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The event's message.
    pub message: String,
    /// Its other fields.
    pub fields: Fields,
    /// (name, fields) of each span it happened in, innermost first.
    pub spans: Vec<(String, Fields)>,
}

impl Captured {
    /// The fields of the enclosing span called `name`.
    pub fn span(&self, name: &str) -> Option<&Fields> {
        self.spans.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

#[derive(Default)]
struct State {
    events: Vec<Captured>,
    closed: Vec<(String, Fields)>,
}

/// The layer, and the handle a test reads from.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<State>>);

impl Capture {
    /// Installs a capture as the global subscriber (everything enabled).
    pub fn install() -> Capture {
        let capture = Capture::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(capture.clone()),
        )
        .expect("one global subscriber per test binary");
        capture
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().events.clone()
    }

    /// The spans closed so far, with their final fields.
    pub fn closed(&self) -> Vec<(String, Fields)> {
        self.0.lock().unwrap().closed.clone()
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Recorder::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Recorder>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Recorder::default();
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .into_iter()
            .flatten()
            .map(|span| {
                let f = span
                    .extensions()
                    .get::<Recorder>()
                    .map(|f| f.0.clone())
                    .unwrap_or_default();
                (span.name().to_owned(), f)
            })
            .collect();
        let mut fields = fields.0;
        let message = fields.remove("message").unwrap_or_default();
        self.0.lock().unwrap().events.push(Captured {
            message,
            fields,
            spans,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<Recorder>()
                .map(|f| f.0.clone())
                .unwrap_or_default();
            self.0
                .lock()
                .unwrap()
                .closed
                .push((span.name().to_owned(), fields));
        }
    }
}
