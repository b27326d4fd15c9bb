//! The shop's databases: its own migrations (the domain tables), then
//! warren's messaging tables installed by the library in each service's
//! schema; and [`Stores`], the database of each service when they do not
//! all share one.

use std::collections::BTreeMap;

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

/// Each service's database: one shared by default, and a pool of its own
/// for a service whose database lives elsewhere (`WARREN_<SERVICE>_DATABASE_URL`).
/// Services never query each other's schemas, so nothing needs them
/// together; only operators' audits that join across schemas (the drills)
/// read each part from where it lives.
#[derive(Debug, Clone)]
pub struct Stores {
    /// The database of every service not named in `own`.
    shared: Database,
    /// Services with a database of their own.
    own: BTreeMap<String, Database>,
}

/// A pool and the URL it was opened on, the URL telling two databases
/// apart (two pools on one URL are one database).
#[derive(Clone)]
struct Database {
    url: String,
    pool: PgPool,
}

/// The URL's password never prints.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&transport::redact(&self.url))
    }
}

impl From<PgPool> for Stores {
    /// Every service on one database.
    fn from(pool: PgPool) -> Self {
        Stores::new(String::new(), pool)
    }
}

impl Stores {
    /// Every service on the database at `url` (the URL only tells
    /// databases apart and names them in reports; `pool` is used).
    pub fn new(url: impl Into<String>, pool: PgPool) -> Self {
        Stores {
            shared: Database {
                url: url.into(),
                pool,
            },
            own: BTreeMap::new(),
        }
    }

    /// `service` on a database of its own. A `url` equal to the shared
    /// one keeps the service there.
    pub fn with(mut self, service: &str, url: impl Into<String>, pool: PgPool) -> Self {
        let url = url.into();
        if url.is_empty() || url != self.shared.url {
            self.own.insert(service.to_owned(), Database { url, pool });
        }
        self
    }

    /// The pool of `service`'s database.
    pub fn of(&self, service: &str) -> &PgPool {
        &self.database(service).pool
    }

    /// The URL of `service`'s database, password masked.
    pub fn shown(&self, service: &str) -> String {
        transport::redact(&self.database(service).url)
    }

    fn database(&self, service: &str) -> &Database {
        self.own.get(service).unwrap_or(&self.shared)
    }

    /// Each distinct database once, with the services of [`ALL`] that
    /// live there (the shared one first, also when no service is left on
    /// it).
    pub fn databases(&self) -> Vec<(&PgPool, Vec<&'static str>)> {
        let mut out: Vec<(&Database, Vec<&'static str>)> = vec![(&self.shared, Vec::new())];
        for s in ALL {
            let db = self.database(s);
            let same =
                |d: &Database| std::ptr::eq(d, db) || (!db.url.is_empty() && d.url == db.url);
            match out.iter_mut().find(|(d, _)| same(d)) {
                Some((_, services)) => services.push(s),
                None => out.push((db, vec![s])),
            }
        }
        out.into_iter().map(|(d, s)| (&d.pool, s)).collect()
    }

    /// Closes every pool.
    pub async fn close(&self) {
        self.shared.pool.close().await;
        for db in self.own.values() {
            db.pool.close().await;
        }
    }
}

/// Migrates every database of `stores` (see [`migrate_for`]).
pub async fn migrate_stores(stores: &Stores) -> Result<(), MigrateError> {
    for (pool, services) in stores.databases() {
        migrate_for(pool, &services).await?;
    }
    Ok(())
}

/// Applies the shop's migrations, then installs (or upgrades) warren's
/// outbox and inbox in each service's schema. Idempotent.
///
/// Version rows of migrations that are no longer in `migrations/` (the
/// ones the baseline replaced) are ignored: a database they migrated
/// carries on from the baseline, which changes nothing there, and the
/// installer then upgrades its messaging tables in place.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    migrate_for(pool, &ALL).await
}

/// As [`migrate`], installing warren's tables only in the schemas of
/// `services` (those that live in this database). The shop's own
/// migrations are one set for all services, so every database gets every
/// domain schema; those of services living elsewhere stay empty.
pub async fn migrate_for(pool: &PgPool, services: &[&str]) -> Result<(), MigrateError> {
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
    for schema in services {
        producers::install::install(pool, schema).await?;
        consumers::install::install(pool, schema).await?;
    }
    Ok(())
}
