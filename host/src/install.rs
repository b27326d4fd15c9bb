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
    created(database_url_from_env(None)).await
}

/// The database of `service`: `WARREN_<SERVICE>_DATABASE_URL` when set
/// (the service's name upper-cased, `-` as `_`), else as
/// [`database_from_env`]; created when it does not exist yet. Services
/// whose databases live on different servers each find theirs.
///
/// ```no_run
/// # async fn f() -> Result<(), sqlx::Error> {
/// let url = warren::install::database_for_env("billing").await?; // WARREN_BILLING_DATABASE_URL or DATABASE_URL
/// # Ok(())
/// # }
/// ```
pub async fn database_for_env(service: &str) -> Result<String, sqlx::Error> {
    created(database_url_from_env(Some(service))).await
}

/// The variable naming `service`'s own database:
/// `WARREN_<SERVICE>_DATABASE_URL`.
pub fn database_var(service: &str) -> String {
    format!(
        "WARREN_{}_DATABASE_URL",
        service.to_ascii_uppercase().replace('-', "_")
    )
}

/// The URL for `service` (or the shared one), without touching the server.
fn database_url_from_env(service: Option<&str>) -> String {
    let set = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    service
        .and_then(|s| set(&database_var(s)))
        .or_else(|| set("DATABASE_URL"))
        .unwrap_or_else(|| "postgres://postgres:postgres@127.0.0.1:5432/warren".to_owned())
}

async fn created(url: String) -> Result<String, sqlx::Error> {
    use sqlx::migrate::MigrateDatabase as _;
    if !sqlx::Postgres::database_exists(&url).await? {
        sqlx::Postgres::create_database(&url).await?;
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_services_own_database_variable_is_named_after_it() {
        assert_eq!(super::database_var("orders"), "WARREN_ORDERS_DATABASE_URL");
        assert_eq!(
            super::database_var("gift-cards"),
            "WARREN_GIFT_CARDS_DATABASE_URL"
        );
    }
}
