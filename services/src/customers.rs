//! Customers: sign-ups and changes. Raises `customer.registered` and
//! `customer.updated`; handles nothing.
//!
//! Customers are changed by people through HTTP, so changes are guarded
//! optimistically: each customer has a `version`, given as the `ETag`; a
//! `PUT` with `If-Match` applies only while the version is unchanged
//! (412 otherwise, nothing changed), one without applies as it comes.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use events::catalog::{CustomerRegistered, CustomerUpdated};
use events::Envelope;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::app::Shared;
use crate::http::{etag, ApiError, IfMatch, Json};

/// The service name: schema, queue and event source.
pub const SERVICE: &str = "customers";

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
        .route("/customers", post(register))
        .route("/customers/{id}", get(show).put(update))
}

async fn register(
    State(shared): State<Shared>,
    Json(req): Json<CustomerRequest>,
) -> Result<impl IntoResponse, ApiError> {
    req.validate()?;
    let id = Uuid::now_v7();
    let (name, email) = (req.name.trim(), req.email.trim().to_lowercase());
    let mut tx = shared.pool.begin().await?;
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
    let mut tx = shared.pool.begin().await?;
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
            .fetch_optional(&shared.pool)
            .await?;
    let (name, email, version) =
        row.ok_or_else(|| ApiError::not_found(format!("customer {id} not found")))?;
    Ok((
        [etag(version)],
        axum::Json(json!({ "id": id, "name": name, "email": email, "version": version })),
    ))
}
