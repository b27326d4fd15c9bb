//! `warren migrate`: creates the database if needed, applies the shop's
//! migrations and installs warren's tables in each service's schema;
//! running it again changes nothing.

use crate::config::{connect_db, migrate, Settings};

/// Runs the command.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect_db(settings, true, 2).await?;
    migrate(&pool).await?;
    println!(
        "migrations applied to {}",
        transport::redact(&settings.database_url)
    );
    Ok(())
}
