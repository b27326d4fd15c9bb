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

/// `DATABASE_URL` (default
/// `postgres://postgres:postgres@127.0.0.1:5432/warren`, as `warren`
/// uses), with the database created when it does not exist yet.
pub async fn database_from_env() -> Result<String, sqlx::Error> {
    use sqlx::migrate::MigrateDatabase as _;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/warren".to_owned());
    if !sqlx::Postgres::database_exists(&url).await? {
        sqlx::Postgres::create_database(&url).await?;
    }
    Ok(url)
}
