//! Customers: sign-ups and changes. Raises `customer.registered` and
//! `customer.updated`; handles nothing.
//!
//! Customers are changed by people through HTTP, so changes are guarded
//! optimistically: each customer has a `version`, given as the `ETag`; a
//! `PUT` with `If-Match` applies only while the version is unchanged
//! (412 otherwise, nothing changed), one without applies as it comes.

use crate::catalog::{CustomerRegistered, CustomerUpdated};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use events::Envelope;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::http::Shared;
use crate::http::{etag, ApiError, IfMatch, Json};

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "customers";

/// Page size of `GET /customers` when none is asked for.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest page `GET /customers` serves; a larger `limit` is refused (422)
/// rather than clamped, so a client never mistakes a short page for the
/// end of the list.
pub const MAX_LIMIT: i64 = 200;

/// `POST /customers` and `PUT /customers/{id}` body.
#[derive(Debug, Deserialize)]
pub struct CustomerRequest {
    name: String,
    email: String,
}

impl CustomerRequest {
    fn validate(&self) -> Result<(), ApiError> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(ApiError::invalid("name: must be 1 to 200 characters"));
        }
        let email = self.email.trim();
        if email.len() > 320
            || !email.contains('@')
            || email.starts_with('@')
            || email.ends_with('@')
        {
            return Err(ApiError::invalid(
                "email: must be an address like name@example.com",
            ));
        }
        Ok(())
    }
}

/// The HTTP routes of this service.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/customers", post(register).get(list))
        .route("/customers/{id}", get(show).put(update))
}

async fn register(
    State(shared): State<Shared>,
    Json(req): Json<CustomerRequest>,
) -> Result<impl IntoResponse, ApiError> {
    req.validate()?;
    let id = Uuid::now_v7();
    let (name, email) = (req.name.trim(), req.email.trim().to_lowercase());
    let mut tx = shared.stores.of(SERVICE).begin().await?;
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO customers.customers (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (email) DO NOTHING RETURNING version",
    )
    .bind(id)
    .bind(name)
    .bind(&email)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(version) = inserted else {
        return Err(ApiError::conflict(format!(
            "email: {email} is already registered"
        )));
    };
    let data = CustomerRegistered {
        customer_id: id,
        name: name.to_owned(),
        email: email.clone(),
    };
    shared
        .outboxes
        .customers
        .append(&mut tx, Envelope::new(SERVICE, id.to_string(), &data))
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        [etag(version)],
        axum::Json(json!({ "id": id, "version": version })),
    ))
}

/// `PUT /customers/{id}`: replaces name and email, moves the version and
/// raises customer.updated carrying it, in one transaction. With
/// `If-Match`, only if the current version is one it names.
async fn update(
    State(shared): State<Shared>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Json(req): Json<CustomerRequest>,
) -> Result<impl IntoResponse, ApiError> {
    req.validate()?;
    let condition = IfMatch::from_headers(&headers);
    let versions: Option<&[i64]> = match &condition {
        IfMatch::Versions(v) => Some(v),
        IfMatch::Absent | IfMatch::Any => None,
    };
    let (name, email) = (req.name.trim(), req.email.trim().to_lowercase());
    let mut tx = shared.stores.of(SERVICE).begin().await?;
    // Compare-and-set in one statement: of two writers naming the same
    // version, the second's UPDATE waits for the first's row lock, then
    // finds the version moved and changes nothing.
    let updated: Option<i64> = sqlx::query_scalar(
        "UPDATE customers.customers SET name = $2, email = $3, updated_at = now(), version = version + 1 \
         WHERE id = $1 AND ($4::int8[] IS NULL OR version = ANY($4)) RETURNING version",
    )
    .bind(id)
    .bind(name)
    .bind(&email)
    .bind(versions)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(version) = updated else {
        let current: Option<i64> =
            sqlx::query_scalar("SELECT version FROM customers.customers WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        // An unknown id is 404 whatever If-Match says (RFC 9110 13.2.1:
        // preconditions are ignored when the answer would be an error
        // anyway).
        return Err(match current {
            None => ApiError::not_found(format!("customer {id} not found")),
            Some(v) => ApiError::precondition_failed(format!(
                "customer {id} is at version {v}, not one If-Match names; GET it and try again"
            )),
        });
    };
    let data = CustomerUpdated {
        customer_id: id,
        name: name.to_owned(),
        email: email.clone(),
        version: Some(version),
    };
    shared
        .outboxes
        .customers
        .append(&mut tx, Envelope::new(SERVICE, id.to_string(), &data))
        .await?;
    tx.commit().await?;
    Ok((
        [etag(version)],
        axum::Json(json!({ "id": id, "name": name, "email": email, "version": version })),
    ))
}

/// `GET /customers/{id}`: the customer with its version as `ETag`; 404
/// for an unknown id.
async fn show(
    State(shared): State<Shared>,
    Path(id): Path<Uuid>,
) -> Result<impl IntoResponse, ApiError> {
    let row: Option<(String, String, i64)> =
        sqlx::query_as("SELECT name, email, version FROM customers.customers WHERE id = $1")
            .bind(id)
            .fetch_optional(shared.stores.of(SERVICE))
            .await?;
    let (name, email, version) =
        row.ok_or_else(|| ApiError::not_found(format!("customer {id} not found")))?;
    Ok((
        [etag(version)],
        axum::Json(json!({ "id": id, "name": name, "email": email, "version": version })),
    ))
}

/// `GET /customers` query. Strings, so a bad value gets our JSON error
/// naming the field instead of the extractor's plain-text one.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// Where a page ends: the (created_at, id) of its last customer. Opaque to
/// clients: URL-safe base64 of `<microseconds since the epoch>:<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    created_at: DateTime<Utc>,
    id: Uuid,
}

impl Cursor {
    fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{}:{}",
            self.created_at.timestamp_micros(),
            self.id
        ))
    }

    fn decode(text: &str) -> Option<Cursor> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let (micros, id) = text.split_once(':')?;
        Some(Cursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.parse().ok()?,
        })
    }
}

/// `GET /customers?limit=&cursor=`: customers newest first, `limit` per
/// page (default [`DEFAULT_LIMIT`], 1 to [`MAX_LIMIT`], else 422), and the
/// `next_cursor` to pass for the page after (null on the last page).
///
/// Keyset pagination: a page resumes strictly after the previous page's
/// last (created_at, id), so rows added meanwhile neither shift nor repeat
/// what follows. `created_at` is the registering transaction's start, so a
/// registration that commits after a page was read but started before
/// that page's last row lands on an earlier page and is not seen by that
/// walk; a fresh walk sees it.
async fn list(
    State(shared): State<Shared>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = match q.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!("limit: must be an integer from 1 to {MAX_LIMIT}"))
            })?,
    };
    let after = match q.cursor.as_deref() {
        None => None,
        Some(text) => Some(Cursor::decode(text).ok_or_else(|| {
            ApiError::invalid("cursor: not a cursor this API gave; pass next_cursor as it came")
        })?),
    };
    // One row more than asked tells whether another page follows.
    // Two statements rather than one with `$1 IS NULL OR …`: a generic
    // plan of that would filter instead of starting the index scan at the
    // cursor.
    const COLUMNS: &str = "SELECT id, name, email, version, created_at FROM customers.customers";
    const ORDER: &str = "ORDER BY created_at DESC, id DESC LIMIT";
    let rows: Vec<(Uuid, String, String, i64, DateTime<Utc>)> = match after {
        None => {
            sqlx::query_as(&format!("{COLUMNS} {ORDER} $1"))
                .bind(limit + 1)
                .fetch_all(shared.stores.of(SERVICE))
                .await?
        }
        Some(c) => {
            sqlx::query_as(&format!(
                "{COLUMNS} WHERE (created_at, id) < ($1, $2) {ORDER} $3"
            ))
            .bind(c.created_at)
            .bind(c.id)
            .bind(limit + 1)
            .fetch_all(shared.stores.of(SERVICE))
            .await?
        }
    };
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let next_cursor = page
        .last()
        .filter(|_| more)
        .map(|(id, _, _, _, created_at)| {
            Cursor {
                created_at: *created_at,
                id: *id,
            }
            .encode()
        });
    let items: Vec<serde_json::Value> = page
        .iter()
        .map(|(id, name, email, version, created_at)| {
            json!({ "id": id, "name": name, "email": email, "version": version, "created_at": created_at })
        })
        .collect();
    Ok(axum::Json(
        json!({ "items": items, "next_cursor": next_cursor }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_what_it_holds_and_garbage_is_refused() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "!!", "bm90IGEgY3Vyc29y", "MTIzOm5vdC1hLXV1aWQ"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
