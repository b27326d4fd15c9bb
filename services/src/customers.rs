//! Customers: sign-ups and changes. Raises `customer.registered` and
//! `customer.updated`; handles nothing.

use crate::catalog::{CustomerRegistered, CustomerUpdated};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use events::Envelope;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::app::Shared;
use crate::http::{ApiError, Json};

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
) -> Result<(StatusCode, axum::Json<serde_json::Value>), ApiError> {
    req.validate()?;
    let id = Uuid::now_v7();
    let (name, email) = (req.name.trim(), req.email.trim().to_lowercase());
    let mut tx = shared.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO customers.customers (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (email) DO NOTHING",
    )
    .bind(id)
    .bind(name)
    .bind(&email)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::conflict(format!(
            "email: {email} is already registered"
        )));
    }
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
    Ok((StatusCode::CREATED, axum::Json(json!({ "id": id }))))
}

async fn update(
    State(shared): State<Shared>,
    Path(id): Path<Uuid>,
    Json(req): Json<CustomerRequest>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    req.validate()?;
    let (name, email) = (req.name.trim(), req.email.trim().to_lowercase());
    let mut tx = shared.pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE customers.customers SET name = $2, email = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(name)
    .bind(&email)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("customer {id} not found")));
    }
    let data = CustomerUpdated {
        customer_id: id,
        name: name.to_owned(),
        email,
    };
    shared
        .outboxes
        .customers
        .append(&mut tx, Envelope::new(SERVICE, id.to_string(), &data))
        .await?;
    tx.commit().await?;
    Ok(axum::Json(json!({ "id": id })))
}

async fn show(
    State(shared): State<Shared>,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT name, email FROM customers.customers WHERE id = $1")
            .bind(id)
            .fetch_optional(&shared.pool)
            .await?;
    let (name, email) =
        row.ok_or_else(|| ApiError::not_found(format!("customer {id} not found")))?;
    Ok(axum::Json(
        json!({ "id": id, "name": name, "email": email }),
    ))
}
