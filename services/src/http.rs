//! The HTTP API's shared pieces: JSON errors, a JSON extractor whose
//! rejections are JSON too, `ETag`/`If-Match` for versioned resources,
//! health and readiness, the `http.request` span (continuing a caller's
//! `traceparent`), and the state the handlers share.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::Instrument;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::store::Stores;
use consumers::Stats;
use producers::relay::RelayStats;
use producers::Outbox;

use crate::gateway::Gateway;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// An API error: a status and a message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
}

impl ApiError {
    /// 422 with a message naming the field at fault.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: message.into(),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// 412: an `If-Match` named a version that is not the current one.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::PRECONDITION_FAILED,
            message: message.into(),
        }
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

/// Database failures are the server's fault (503 when unreachable): they
/// are logged, and the client gets a message without internals.
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return ApiError::conflict("already exists");
            }
        }
        tracing::error!(error = %e, "database error in HTTP handler");
        let status = match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: "database error; try again".into(),
        }
    }
}

impl From<producers::OutboxError> for ApiError {
    fn from(e: producers::OutboxError) -> Self {
        match e {
            producers::OutboxError::Database { source, .. } => source.into(),
            other => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: other.to_string(),
            },
        }
    }
}

/// The `ETag` of a versioned resource: its version as a strong tag,
/// `"7"`. Versions only grow, so a tag never comes back for other content.
pub fn etag(version: i64) -> (header::HeaderName, HeaderValue) {
    // Digits and quotes only: always a valid header value.
    let value = HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    (header::ETAG, value)
}

/// What a request's `If-Match` asks for (RFC 9110, 13.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// No `If-Match`: apply unconditionally.
    Absent,
    /// `*`: apply if the resource exists, whatever its version.
    Any,
    /// Apply only if the current version is one of these. Tags this API
    /// never gave (weak ones, which `If-Match` never matches, or foreign
    /// ones) are left out, so an `If-Match` of only such tags matches
    /// nothing: 412.
    Versions(Vec<i64>),
}

impl IfMatch {
    /// Reads every `If-Match` header of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> IfMatch {
        let mut present = false;
        let mut versions = Vec::new();
        for value in headers.get_all(header::IF_MATCH) {
            present = true;
            // Not visible ASCII: matches nothing.
            let Ok(text) = value.to_str() else { continue };
            for tag in text.split(',').map(str::trim) {
                if tag == "*" {
                    return IfMatch::Any;
                }
                if let Some(v) = tag
                    .strip_prefix('"')
                    .and_then(|t| t.strip_suffix('"'))
                    .and_then(|t| t.parse::<i64>().ok())
                {
                    versions.push(v);
                }
            }
        }
        if present {
            IfMatch::Versions(versions)
        } else {
            IfMatch::Absent
        }
    }

    /// Whether a resource currently at `version` may be changed.
    pub fn allows(&self, version: i64) -> bool {
        match self {
            IfMatch::Absent | IfMatch::Any => true,
            IfMatch::Versions(vs) => vs.contains(&version),
        }
    }
}

/// `axum::Json`, but a bad body gets a JSON error naming the problem:
/// 400 for broken JSON, 415 for a wrong content type, 413 for too large,
/// 422 for a wrong shape.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(ApiError {
                status: match &rejection {
                    JsonRejection::JsonDataError(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    JsonRejection::JsonSyntaxError(_) => StatusCode::BAD_REQUEST,
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    _ => rejection.status(),
                },
                message: rejection.body_text(),
            }),
        }
    }
}

/// Runs each request in an `http.request` span, so the lines its handler
/// logs (and the outbox appends it makes) carry it. Fields follow
/// OpenTelemetry's HTTP conventions: `http.request.method` (a method
/// outside the standard ones is `_OTHER`), `http.route` (the matched
/// route, `/orders/{id}`, never the raw path: bounded, and free of ids),
/// `http.response.status_code` once answered.
pub async fn trace(request: Request, next: Next) -> Response {
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
        | "PATCH") => m,
        _ => "_OTHER",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    continue_callers_trace(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// Makes `span` a child of the caller's span when the application installed
/// a propagator (the `warren` binary installs W3C Trace Context when it
/// exports traces) and the request carries its header (`traceparent`), so
/// the events the request raises, and everything they cause, are one trace
/// with the caller's. Without one, `extract` finds nothing.
fn continue_callers_trace(span: &tracing::Span, headers: &HeaderMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if span.is_disabled() {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Request headers as an OpenTelemetry propagation carrier.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Liveness: the process answers.
pub async fn health() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Readiness: the database and the broker answer.
pub async fn ready(State(shared): State<Shared>) -> Response {
    let mut db = true;
    for (pool, _) in shared.stores.databases() {
        db &= tokio::time::timeout(
            std::time::Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(pool),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    }
    let broker = match transport::connect(&shared.amqp_url, "warren readiness").await {
        Ok(conn) => {
            let _ = conn.close(200, ("ready check").into()).await;
            true
        }
        Err(_) => false,
    };
    let status = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({ "database": db, "broker": broker })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::IF_MATCH, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn if_match_reads_strong_tags_star_and_lists() {
        assert_eq!(IfMatch::from_headers(&headers(&[])), IfMatch::Absent);
        assert_eq!(IfMatch::from_headers(&headers(&["*"])), IfMatch::Any);
        assert_eq!(
            IfMatch::from_headers(&headers(&["\"3\", \"5\"", "\"9\""])),
            IfMatch::Versions(vec![3, 5, 9])
        );
        // Weak and foreign tags never match.
        let weak = IfMatch::from_headers(&headers(&["W/\"3\"", "3", "\"abc\""]));
        assert_eq!(weak, IfMatch::Versions(vec![]));
        assert!(!weak.allows(3));
        assert!(IfMatch::Absent.allows(1));
        assert!(IfMatch::Versions(vec![2]).allows(2));
        assert!(!IfMatch::Versions(vec![2]).allows(3));
    }

    #[test]
    fn etag_is_the_quoted_version() {
        assert_eq!(etag(7).1, "\"7\"");
    }
}

/// Each service's outbox, built once.
#[derive(Debug)]
pub struct Outboxes {
    /// customers schema
    pub customers: Outbox,
    /// orders schema
    pub orders: Outbox,
}

/// State shared by the HTTP handlers.
#[derive(Clone)]
pub struct Shared {
    /// Each service's database.
    pub stores: Stores,
    /// For readiness checks.
    pub amqp_url: String,
    /// Outboxes of the services that take HTTP commands.
    pub outboxes: Arc<Outboxes>,
    /// Consumer counters per service.
    pub consumer_stats: Arc<BTreeMap<String, Arc<Stats>>>,
    /// Relay counters per service.
    pub relay_stats: Arc<BTreeMap<String, Arc<RelayStats>>>,
    /// The gateway, when payments runs here.
    pub gateway: Option<Arc<Gateway>>,
}
