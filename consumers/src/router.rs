//! Which handler runs for which event type.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use events::{Envelope, EventData};
use producers::Outbox;
use sqlx::PgConnection;
use tracing::Instrument;

use crate::handler::{Batch, HandleBatch, Prepare};
use crate::{Context, Handle, HandleError};

/// A handler with its event type erased, so one map holds them all.
#[async_trait::async_trait]
pub(crate) trait ErasedHandler: Send + Sync {
    /// Applies `events` (all of the handler's type, in the order they must
    /// apply) in the open transaction `tx`; each handler call that takes
    /// longer than `timeout` (one per event, or one per run for a batch
    /// handler) fails as transient.
    async fn call(
        &self,
        tx: &mut PgConnection,
        outbox: &Outbox,
        events: &[&Envelope],
        timeout: Duration,
    ) -> Result<(), HandleError>;
}

/// `call` within `timeout`, or a transient error.
pub(crate) async fn bounded<F: std::future::Future<Output = Result<(), HandleError>>>(
    timeout: Duration,
    call: F,
) -> Result<(), HandleError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| HandleError::Transient(format!("handler timed out after {timeout:?}")))?
}

/// The payload of `event` as `E`. The codec validated it against E's shape
/// already; a failure here means the catalog and the handler disagree:
/// permanent.
fn data_of<E: EventData>(event: &Envelope) -> Result<E, HandleError> {
    event.data_as::<E>().map_err(HandleError::permanent)
}

/// The span a handler runs in: a child of the span that raised the event
/// (its `traceparent`), so the saga of one order is one trace when
/// OpenTelemetry records spans. A batch handler's span continues its first
/// event's trace and links to the others'.
fn handling_span(service: &str, events: &[&Envelope]) -> tracing::Span {
    let Some(head) = events.first() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "warren.handle",
        otel.name = %format_args!("process {}", head.event_type),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.message.id = %head.id,
        service,
        event_type = %head.event_type,
        subject = %head.subject,
        correlation_id = head.correlationid.as_deref(),
        events = events.len(),
    );
    events::trace_context::continue_trace(&span, head.traceparent.as_deref());
    for other in &events[1..] {
        events::trace_context::link(&span, other.traceparent.as_deref());
    }
    span
}

struct Typed<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

#[async_trait::async_trait]
impl<E: EventData, H: Handle<E>> ErasedHandler for Typed<E, H> {
    async fn call(
        &self,
        tx: &mut PgConnection,
        outbox: &Outbox,
        events: &[&Envelope],
        timeout: Duration,
    ) -> Result<(), HandleError> {
        for event in events {
            let data = data_of::<E>(event)?;
            let span = handling_span(outbox.service(), &[*event]);
            let mut ctx = Context::new(tx, event, outbox);
            bounded(timeout, self.handler.handle(&mut ctx, data))
                .instrument(span)
                .await?;
        }
        Ok(())
    }
}

struct TypedBatch<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

#[async_trait::async_trait]
impl<E: EventData, H: HandleBatch<E>> ErasedHandler for TypedBatch<E, H> {
    async fn call(
        &self,
        tx: &mut PgConnection,
        outbox: &Outbox,
        events: &[&Envelope],
        timeout: Duration,
    ) -> Result<(), HandleError> {
        let items = events
            .iter()
            .map(|e| Ok((*e, data_of::<E>(e)?)))
            .collect::<Result<Vec<_>, HandleError>>()?;
        let span = handling_span(outbox.service(), events);
        let mut batch = Batch::new(tx, outbox);
        bounded(timeout, self.handler.handle_batch(&mut batch, items))
            .instrument(span)
            .await
    }
}

/// The handlers of one service, by event type.
#[derive(Clone)]
pub struct Router {
    service: String,
    handlers: HashMap<&'static str, Arc<dyn ErasedHandler>>,
    /// Runs before the handlers of each transaction (see [`Prepare`]).
    preparer: Option<Arc<dyn Prepare>>,
}

impl Router {
    /// An empty router for `service` (its queue, schema and source name).
    pub fn new(service: impl Into<String>) -> Self {
        Router {
            service: service.into(),
            handlers: HashMap::new(),
            preparer: None,
        }
    }

    /// Registers `handler` for events of type `E`; one handler per type.
    pub fn on<E: EventData, H: Handle<E>>(mut self, handler: H) -> Self {
        self.handlers.insert(
            E::TYPE,
            Arc::new(Typed {
                handler,
                _event: PhantomData,
            }),
        );
        self
    }

    /// Registers a batch handler for events of type `E` (see
    /// [`HandleBatch`]); it replaces any handler of that type.
    pub fn on_batch<E: EventData, H: HandleBatch<E>>(mut self, handler: H) -> Self {
        self.handlers.insert(
            E::TYPE,
            Arc::new(TypedBatch {
                handler,
                _event: PhantomData,
            }),
        );
        self
    }

    /// Registers `preparer` to run once per transaction before its
    /// handlers (see [`Prepare`]); one per router.
    pub fn prepare<P: Prepare>(mut self, preparer: P) -> Self {
        self.preparer = Some(Arc::new(preparer));
        self
    }

    /// The service this router belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The event types with a handler.
    pub fn handled_types(&self) -> Vec<&'static str> {
        let mut t: Vec<_> = self.handlers.keys().copied().collect();
        t.sort();
        t
    }

    pub(crate) fn preparer(&self) -> Option<&Arc<dyn Prepare>> {
        self.preparer.as_ref()
    }

    pub(crate) fn handler(&self, event_type: &str) -> Option<&Arc<dyn ErasedHandler>> {
        self.handlers.get(event_type)
    }
}
