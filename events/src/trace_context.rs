//! An event's `traceparent` and the `tracing` spans around it: the current
//! span's W3C trace context as a `traceparent` for the events it raises, and
//! an incoming event's `traceparent` as the parent of the span that handles
//! it, so that one order's saga is one trace.
//!
//! Only the OpenTelemetry API and the `tracing` bridge are used here: the
//! application decides whether anything is recorded and exported (the
//! `warren` binary installs an OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set). Without a `tracing-opentelemetry` layer, [`current`] finds no
//! span context and returns `None` (the envelope then carries a traceparent
//! built by hand, as before), and [`continue_trace`] does nothing.
//!
//! The attribute is always W3C Trace Context (the CloudEvents distributed
//! tracing extension names it), whatever propagator an application installs
//! for HTTP, so it is written and read here rather than through
//! `opentelemetry::global`'s propagator.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of the current `tracing` span, when an OpenTelemetry
/// layer records it (and it is part of a valid trace); `None` otherwise.
pub fn current() -> Option<String> {
    of_span(&tracing::Span::current())
}

/// The `traceparent` of `span`, when an OpenTelemetry layer records it.
pub fn of_span(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    sc.is_valid().then(|| format(sc))
}

/// `sc` as a W3C `traceparent` (version 00).
pub fn format(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Reads a W3C `traceparent` (version 00, or a later version's first four
/// fields as the recommendation says) into a remote span context; `None`
/// when it is not one (wrong shape, upper-case hex, all-zero ids, version
/// `ff`).
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && rest.is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// The context whose (remote) parent span is the one `traceparent` names.
pub fn remote_parent(traceparent: &str) -> Option<Context> {
    parse(traceparent).map(|sc| Context::new().with_remote_span_context(sc))
}

/// Makes `span` a child of the span `traceparent` names, so its trace
/// continues the sender's. Call it right after creating the span, before
/// it is entered: OpenTelemetry fixes a span's parent when it starts.
/// Returns whether the parent was set (false without a valid traceparent or
/// without an OpenTelemetry layer).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) -> bool {
    if span.is_disabled() {
        return false;
    }
    match traceparent.and_then(remote_parent) {
        Some(parent) => span.set_parent(parent).is_ok(),
        None => false,
    }
}

/// Links `span` to the span `traceparent` names (for a span that handles
/// several events, of which only one can be its parent).
pub fn link(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(parse) {
        span.add_link(sc);
    }
}

/// The trace id (32 hex digits) of a `traceparent`, when it is one.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let t = traceparent.trim();
    parse(t).map(|_| &t[3..35])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_reads_back_as_it_was_written() {
        let sc = parse(TP).unwrap();
        assert!(sc.is_remote());
        assert!(sc.is_sampled());
        assert_eq!(format(&sc), TP);
        assert_eq!(trace_id(TP), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // A later version may carry more fields; its first four count.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz").is_some());
    }

    #[test]
    fn what_is_not_a_traceparent_is_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_recorded_or_changed() {
        let span = tracing::info_span!("t");
        assert!(!continue_trace(&span, Some(TP)));
        assert_eq!(of_span(&span), None);
        assert_eq!(current(), None);
    }
}

#[cfg(test)]
mod with_opentelemetry {
    use super::*;
    use crate::catalog::EventData;
    use crate::Envelope;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Noted {}
    impl EventData for Noted {
        const TYPE: &'static str = "thing.noted";
        const VERSION: u32 = 1;
        const SOURCE: &'static str = "orders";
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const OTHER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// Runs `f` under a subscriber with an OpenTelemetry layer (an SDK
    /// provider without exporter: spans get real ids, nothing leaves).
    fn recorded<T>(f: impl FnOnce() -> T) -> T {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn an_event_raised_in_a_span_carries_that_span_and_its_trace() {
        recorded(|| {
            let span = tracing::info_span!("http.request");
            assert!(continue_trace(&span, Some(TP)));
            let _in = span.enter();
            let own = of_span(&span).unwrap();
            let e = Envelope::new("orders", "s", &Noted {});
            assert_eq!(e.traceparent.as_deref(), Some(own.as_str()));
            assert_eq!(trace_id(&own), trace_id(TP), "the sender's trace goes on");
            assert_ne!(own, TP, "with a span of its own");
        });
    }

    #[test]
    fn a_caused_event_keeps_its_causes_trace_even_in_a_span_of_another() {
        recorded(|| {
            let mut cause = Envelope::new("orders", "s", &Noted {});
            cause.traceparent = Some(OTHER.to_owned());
            let span = tracing::info_span!("warren.handle");
            continue_trace(&span, Some(TP));
            let _in = span.enter();
            let caused = Envelope::new("inventory", "s", &Noted {}).caused_by(&cause);
            let tp = caused.traceparent.unwrap();
            assert_eq!(trace_id(&tp), trace_id(OTHER));
            // In its cause's trace, the handling span is the parent.
            cause.traceparent = Some(TP.to_owned());
            let caused = Envelope::new("inventory", "s", &Noted {}).caused_by(&cause);
            assert_eq!(caused.traceparent, of_span(&span));
        });
    }
}
