//! `warren migrate`: creates the database if needed and applies the
//! migrations; running it again changes nothing.

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
