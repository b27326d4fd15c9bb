//! `warren migrate`: creates the database if needed, applies the shop's
//! migrations and installs warren's tables in each service's schema;
//! running it again changes nothing.

use crate::config::{connect_stores, migrate_stores, Settings};
use crate::output;
use secrecy::ExposeSecret as _;

/// Runs the command; with `json`, says what it did as one JSON object.
/// Each database (DATABASE_URL, and each service's own database) is
/// migrated with the services that live there.
pub async fn run(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let stores = connect_stores(settings, true, 2).await?;
    let migrated = migrate_stores(&stores).await;
    let mut databases = Vec::new();
    for (pool, services) in stores.databases() {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(pool)
                .await
                .ok()
                .flatten();
        // Named by a service living there; the shared one by DATABASE_URL.
        let shown = match services.first() {
            Some(s) => stores.shown(s),
            None => transport::redact(settings.database_url.expose_secret()),
        };
        databases.push((shown, services, applied));
    }
    stores.close().await;
    migrated?;
    if json {
        let each: Vec<serde_json::Value> = databases
            .iter()
            .map(|(db, services, applied)| serde_json::json!({ "database": db, "services": services, "latest_version": applied }))
            .collect();
        // The first keys as before, for the single-database case.
        output::line(
            &serde_json::json!({
                "database": databases[0].0,
                "migrated": true,
                "latest_version": databases[0].2,
                "databases": each,
            })
            .to_string(),
        )
    } else {
        for (db, services, _) in &databases {
            if databases.len() == 1 {
                output::line(&format!("migrations applied to {db}"))?;
            } else {
                output::line(&format!(
                    "migrations applied to {db} ({})",
                    services.join(", ")
                ))?;
            }
        }
        Ok(())
    }
}
