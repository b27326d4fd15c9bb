//! The library's own tables, installed from the library into any schema
//! the application names: the outbox (with its lease and wake-up trigger),
//! the inbox and the per-subject progress. Versioned, so a later warren
//! upgrades them in place; installing twice changes nothing; two processes
//! installing at once are serialised by an advisory lock.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), warren::install::InstallError> {
//! warren::install::install(&pool, "billing").await?;
//! # Ok(())
//! # }
//! ```

pub use producers::install::InstallError;

/// Installs (or upgrades) everything a service needs in `schema`: the
/// outbox part and the inbox part.
pub async fn install(pool: &sqlx::PgPool, schema: &str) -> Result<(), InstallError> {
    producers::install::install(pool, schema).await?;
    consumers::install::install(pool, schema).await
}
