//! The spans a delivery's handling runs in, so that every line a handler
//! logs carries the event it is about (README "Spans"):
//!
//! - `warren.batch` (`service`, `size`): a lane settling one batch, from
//!   decoding to the ack (the outcome lines follow, outside it: they carry
//!   every field of their own);
//! - `warren.handle` (`service`, `event_id`, `event_type`, `subject`,
//!   `correlation_id`, `attempt`): one event's handler call, inside the
//!   transaction that records it in the inbox;
//! - `warren.handle_run` (`service`, `event_type`, `size`): a batch
//!   handler's call on a run of events, which follows from each event's
//!   `warren.handle` span (a span has one parent; a run has many events).
//!
//! Field values that come from the wire (`subject`, `correlation_id`) go
//! through [`events::printable`]: escaped and bounded, whatever the
//! subscriber does with them. `event_type` is a catalog type (the event
//! decoded) and `event_id` a UUID.

use events::Envelope;
use tracing::Span;

/// The span of a lane's batch of `size` deliveries.
pub(crate) fn batch(service: &str, size: usize) -> Span {
    tracing::info_span!("warren.batch", service, size)
}

/// The span of one event's handling, on its `attempt`th delivery.
pub(crate) fn handle(service: &str, event: &Envelope, attempt: u32) -> Span {
    let span = tracing::info_span!(
        "warren.handle",
        otel.name = %format_args!("process {}", event.event_type),
        otel.kind = "consumer",
        service,
        event_id = %event.id,
        event_type = event.event_type.as_str(),
        subject = &*events::printable(&event.subject),
        correlation_id = event
            .correlationid
            .as_deref()
            .map(events::printable)
            .as_deref()
            .unwrap_or(""),
        attempt,
    );
    // A child of the span that raised the event, when OpenTelemetry
    // records spans: one order's saga is one trace.
    events::trace_context::continue_trace(&span, event.traceparent.as_deref());
    span
}

/// The span of a batch handler's call on a run of events, linked to the
/// span of each.
pub(crate) fn handle_run(service: &str, event_type: &str, spans: &[Span]) -> Span {
    let span = tracing::info_span!("warren.handle_run", service, event_type, size = spans.len());
    for event in spans {
        span.follows_from(event);
    }
    span
}

/// The `i`th of `spans`, which hold one span per event; a missing one (a
/// bug, never a reason to skip an event) is the disabled span.
pub(crate) fn nth(spans: &[Span], i: usize) -> Span {
    spans.get(i).cloned().unwrap_or_else(Span::none)
}
