//! The shop's database: its own migrations (the domain tables), then
//! warren's messaging tables installed by the library in each service's
//! schema.

use producers::install::InstallError;
use sqlx::PgPool;

use crate::ALL;

/// Migrating the shop's database failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No connection to migrate on.
    #[error("connecting to migrate: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration of the shop's domain tables failed.
    #[error("applying the shop's migrations: {0}")]
    Migrations(#[from] sqlx::migrate::MigrateError),
    /// Installing warren's outbox or inbox in a service's schema failed
    /// (the error names the schema and the part).
    #[error(transparent)]
    Install(#[from] InstallError),
}

impl MigrateError {
    /// The connected role may not change the schema (SQLSTATE 42501): a
    /// service running on its own role from `warren setup`, whose
    /// administrator migrated already.
    pub fn permission_denied(&self) -> bool {
        let source = match self {
            MigrateError::Migrations(sqlx::migrate::MigrateError::Execute(e)) => e,
            MigrateError::Install(InstallError::Database { source, .. }) => source,
            _ => return false,
        };
        matches!(source, sqlx::Error::Database(e) if e.code().as_deref() == Some("42501"))
    }
}

/// Applies the shop's migrations, then installs (or upgrades) warren's
/// outbox and inbox in each service's schema. Idempotent.
///
/// Version rows of migrations that are no longer in `migrations/` (the
/// ones the baseline replaced) are ignored: a database they migrated
/// carries on from the baseline, which changes nothing there, and the
/// installer then upgrades its messaging tables in place.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.set_ignore_missing(true);
    // On a connection of its own, closed afterwards: the migrator takes a
    // session advisory lock and, when a migration step fails (a role
    // without DDL rights fails at once), returns without releasing it. On
    // a pooled connection the lock would outlive the call, and every later
    // migration of this database, from any process, would wait for that
    // connection to be retired.
    let mut conn = pool
        .acquire()
        .await
        .map_err(MigrateError::Connect)?
        .detach();
    let migrated = migrator.run(&mut conn).await;
    // Closing is a courtesy to the server; dropping ends the session too.
    let _ = sqlx::Connection::close(conn).await;
    migrated?;
    for schema in ALL {
        producers::install::install(pool, schema).await?;
        consumers::install::install(pool, schema).await?;
    }
    Ok(())
}
