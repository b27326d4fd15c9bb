//! `warren migrate`: creates the database if needed, applies the shop's
//! migrations and installs warren's tables in each service's schema;
//! running it again changes nothing.

use crate::config::{connect_db, migrate, Settings};
use crate::output;

/// Runs the command; with `json`, says what it did as one JSON object.
pub async fn run(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let pool = connect_db(settings, true, 2).await?;
    let migrated = migrate(&pool).await;
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&pool)
            .await
            .ok()
            .flatten();
    pool.close().await;
    migrated?;
    let database = transport::redact(&settings.database_url);
    if json {
        output::line(
            &serde_json::json!({ "database": database, "migrated": true, "latest_version": applied })
                .to_string(),
        )
    } else {
        output::line(&format!("migrations applied to {database}"))
    }
}
