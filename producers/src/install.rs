//! The library installs its own tables: a small versioned installer, and
//! the outbox's part of what it installs.
//!
//! What warren keeps in a service's schema comes in *parts* (the outbox
//! here, the inbox in `consumers::install`), each a list of steps: step
//! `i` brings the part from version `i` to `i + 1`. The schema's
//! `warren_installed` table records each part's version, so [`apply`] runs
//! only the steps a schema is missing, and refuses a schema that a newer
//! warren installed (its layout may not be what this code expects).
//!
//! Everything happens in one transaction that first takes a
//! transaction-scoped advisory lock on the schema ([`INSTALL_LOCK_CLASS`]):
//! two processes installing at once (several copies of a service starting
//! together) run one after the other, and the second finds nothing to do.
//! A step that fails rolls the whole part back.
//!
//! Steps are written so that a schema laid out by warren's old migrations
//! (which created the same tables before the installer existed, and have no
//! `warren_installed`) upgrades in place with its rows: `IF NOT EXISTS`,
//! `ADD COLUMN IF NOT EXISTS`, `CREATE OR REPLACE`, `DROP TRIGGER IF
//! EXISTS`. A new layout is a new step appended to its part, never an edit
//! of a step that databases have already run.
//!
//! ```no_run
//! # async fn f(pool: sqlx::PgPool) -> Result<(), warren_producers::install::InstallError> {
//! // At start-up, with a role that may create tables in the schema:
//! warren_producers::install::install(&pool, "orders").await?;
//! # Ok(()) }
//! ```

use sqlx::{PgConnection, PgPool};

use crate::outbox::{valid_schema, MAX_SCHEMA_LEN};
use crate::wake::{channel, WRITERS_LOCK_CLASS};

/// First key of the installer's advisory lock (`'WI'`); the second is
/// derived from the schema name, as for the relay's and the writers'
/// locks (see the crate's list of advisory locks).
pub const INSTALL_LOCK_CLASS: i32 = 0x5749;

/// How long an install waits for a lock (another installer, or the outbox
/// table that a step alters) before it gives up. An upgrade that alters a
/// busy table queues every later writer behind its own request, so it must
/// not wait for ever; a fresh install takes milliseconds.
const LOCK_TIMEOUT: &str = "30s";

/// Installing warren's tables failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The schema name is not a plain identifier.
    #[error(
        "cannot install warren's tables in schema {0:?}: use 1 to {MAX_SCHEMA_LEN} lower-case letters, digits and _"
    )]
    BadSchema(String),
    /// A newer warren installed this part; this code may not know its
    /// layout.
    #[error(
        "schema {schema} has warren's {part} tables at version {installed}, but this warren knows versions up to {known}: run a warren at least as new as the one that installed them"
    )]
    TooNew {
        /// The schema installed in.
        schema: String,
        /// Which part's tables (`outbox`, `inbox`).
        part: &'static str,
        /// The version the schema's tables are at.
        installed: i32,
        /// The newest version this code knows.
        known: i32,
    },
    /// The database refused a statement (or could not be reached).
    #[error("installing warren's {part} tables in schema {schema}: {what}: {source}")]
    Database {
        /// The schema installed in.
        schema: String,
        /// Which part's tables (`outbox`, `inbox`).
        part: &'static str,
        /// What the installer was doing, e.g. `step 2 of 3`.
        what: String,
        /// What the database said.
        #[source]
        source: sqlx::Error,
    },
}

/// A validated schema name, as the steps put it into SQL.
#[derive(Debug, Clone)]
pub struct Schema {
    name: String,
}

impl Schema {
    /// `name`, if it may be a warren schema (the outbox's rule).
    pub fn new(name: &str) -> Result<Schema, InstallError> {
        if valid_schema(name) {
            Ok(Schema {
                name: name.to_owned(),
            })
        } else {
            Err(InstallError::BadSchema(name.to_owned()))
        }
    }

    /// The name itself (for a literal, a lock key or a channel name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted as an identifier, for DDL: a schema called `order`
    /// or `user` (reserved words) works too.
    pub fn ident(&self) -> String {
        format!("\"{}\"", self.name.replace('"', "\"\""))
    }
}

/// `s` as an SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One versioned part of what warren installs in a schema.
#[derive(Debug)]
pub struct Part {
    /// Its key in `warren_installed`: part of the stored layout, never
    /// renamed.
    pub name: &'static str,
    /// Step `i` brings the part from version `i` to `i + 1`; each builds
    /// its SQL (one or more statements) for the schema.
    pub steps: &'static [fn(&Schema) -> String],
}

impl Part {
    /// The version this code installs: the number of steps.
    pub fn version(&self) -> i32 {
        // A part has a handful of steps, far from i32::MAX.
        i32::try_from(self.steps.len()).unwrap_or(i32::MAX)
    }
}

/// The outbox: the `outbox` table (with the lease column and the indexes
/// the relay's claim and retention walk), `outbox_sequences`, the relay's
/// busy flag `outbox_relay_busy`, and the `outbox_notify` trigger that
/// wakes the relay (see [`crate::wake`]).
pub const OUTBOX: Part = Part {
    name: "outbox",
    steps: &[outbox_v1],
};

/// Installs (or upgrades) the outbox in `schema`, creating the schema if
/// needed. Harmless to run again; safe to run from several processes at
/// once.
pub async fn install(pool: &PgPool, schema: &str) -> Result<(), InstallError> {
    apply(pool, schema, &OUTBOX).await
}

/// Brings `part` in `schema` to the version this code knows: creates the
/// schema and its `warren_installed` table if needed, runs the missing
/// steps and records the new version, all in one transaction under the
/// schema's install lock. Nothing runs when the part is up to date, so a
/// role without DDL rights may call it once an administrator installed.
pub async fn apply(pool: &PgPool, schema: &str, part: &Part) -> Result<(), InstallError> {
    let schema = Schema::new(schema)?;
    let fail = |what: &str| {
        let (schema, what) = (schema.name.clone(), what.to_owned());
        move |source| InstallError::Database {
            schema,
            part: part.name,
            what,
            source,
        }
    };
    let mut tx = pool.begin().await.map_err(fail("opening a transaction"))?;
    lock(&mut tx, &schema)
        .await
        .map_err(fail("taking the install lock"))?;
    let installed = installed(&mut tx, &schema, part.name)
        .await
        .map_err(fail("reading warren_installed"))?;
    let known = part.version();
    if installed > known {
        return Err(InstallError::TooNew {
            schema: schema.name.clone(),
            part: part.name,
            installed,
            known,
        });
    }
    if installed == known {
        tracing::debug!(schema = %schema.name, part = part.name, version = known, "up to date");
        return Ok(());
    }
    // `installed` is in 0..known here, so the conversion holds.
    let from = usize::try_from(installed).unwrap_or(0);
    for (i, step) in part.steps.iter().enumerate().skip(from) {
        sqlx::raw_sql(&step(&schema))
            .execute(&mut *tx)
            .await
            .map_err(fail(&format!("step {} of {known}", i + 1)))?;
    }
    sqlx::query(&format!(
        "INSERT INTO {}.warren_installed (part, version) VALUES ($1, $2) \
         ON CONFLICT (part) DO UPDATE SET version = excluded.version, installed_at = now()",
        schema.ident()
    ))
    .bind(part.name)
    .bind(known)
    .execute(&mut *tx)
    .await
    .map_err(fail("recording the version"))?;
    tx.commit().await.map_err(fail("committing"))?;
    tracing::info!(schema = %schema.name, part = part.name, from = installed, to = known, "installed warren tables");
    Ok(())
}

/// Takes the schema's install lock until the transaction ends, and bounds
/// every lock wait of the transaction.
async fn lock(conn: &mut PgConnection, schema: &Schema) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = {}",
        literal(LOCK_TIMEOUT)
    ))
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2) & 2147483647)")
        .bind(INSTALL_LOCK_CLASS)
        .bind(schema.name())
        .execute(conn)
        .await
        .map(|_| ())
}

/// The installed version of `part` (0: none), creating the schema and
/// `warren_installed` first if they are missing. Only then: an up-to-date
/// schema costs a role without DDL rights nothing it may not do.
async fn installed(
    conn: &mut PgConnection,
    schema: &Schema,
    part: &str,
) -> Result<i32, sqlx::Error> {
    let table = format!("{}.warren_installed", schema.ident());
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {table} (
               part         text PRIMARY KEY,
               version      integer NOT NULL,
               installed_at timestamptz NOT NULL DEFAULT now()
             );",
            s = schema.ident()
        ))
        .execute(&mut *conn)
        .await?;
    }
    let version: Option<i32> =
        sqlx::query_scalar(&format!("SELECT version FROM {table} WHERE part = $1"))
            .bind(part)
            .fetch_optional(conn)
            .await?;
    Ok(version.unwrap_or(0))
}

/// Outbox version 1: the layout of the old migrations up to
/// `20261202000001_outbox_lease.sql`, which it also upgrades in place.
///
/// The trigger wakes the relay with a `NOTIFY` at commit, and skips it
/// when every row the statement inserted is leased (the eager publisher
/// publishes those itself) or while the relay says it is busy; see
/// [`crate::wake`] for the handshake that keeps a skipped wake-up from
/// being lost. A statement-level trigger costs no round trip per append,
/// and PostgreSQL folds a transaction's equal notifications into one.
fn outbox_v1(schema: &Schema) -> String {
    let s = schema.ident();
    let flag = literal(&format!("{s}.outbox_relay_busy"));
    let channel = literal(&channel(schema.name()));
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.outbox (
           position       bigserial PRIMARY KEY,
           event_id       uuid NOT NULL UNIQUE,
           aggregate      text NOT NULL,
           sequence       bigint NOT NULL,
           event_type     text NOT NULL,
           version        integer NOT NULL,
           correlation_id text,
           payload        json NOT NULL,
           created_at     timestamptz NOT NULL DEFAULT now(),
           published_at   timestamptz,
           leased_until   timestamptz,
           UNIQUE (aggregate, sequence)
         );
         ALTER TABLE {s}.outbox ADD COLUMN IF NOT EXISTS leased_until timestamptz;
         CREATE INDEX IF NOT EXISTS outbox_unpublished ON {s}.outbox (position)
           WHERE published_at IS NULL;
         CREATE INDEX IF NOT EXISTS outbox_published_at ON {s}.outbox (published_at)
           WHERE published_at IS NOT NULL;
         CREATE TABLE IF NOT EXISTS {s}.outbox_sequences (
           aggregate     text PRIMARY KEY,
           last_sequence bigint NOT NULL
         );
         CREATE SEQUENCE IF NOT EXISTS {s}.outbox_relay_busy MINVALUE 0 MAXVALUE 1 START 0;
         CREATE OR REPLACE FUNCTION {s}.outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $body$
         BEGIN
           IF NOT EXISTS (SELECT 1 FROM added WHERE leased_until IS NULL) THEN
             RETURN NULL;
           END IF;
           PERFORM pg_advisory_xact_lock_shared({WRITERS_LOCK_CLASS}, hashtext(TG_TABLE_SCHEMA) & 2147483647);
           IF pg_sequence_last_value({flag}::regclass) IS DISTINCT FROM 1 THEN
             PERFORM pg_notify({channel}, '');
           END IF;
           RETURN NULL;
         END
         $body$;
         DROP TRIGGER IF EXISTS outbox_notify ON {s}.outbox;
         CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
           REFERENCING NEW TABLE AS added
           FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_wake();"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked_before_any_sql() {
        for bad in [
            "",
            "Orders",
            "a-b",
            "x\"; DROP TABLE y; --",
            "o'clock",
            &"a".repeat(50),
        ] {
            assert!(
                matches!(Schema::new(bad), Err(InstallError::BadSchema(_))),
                "{bad:?}"
            );
        }
        let longest = "a".repeat(MAX_SCHEMA_LEN);
        assert_eq!(Schema::new(&longest).unwrap().name(), longest);
        assert_eq!(Schema::new("order").unwrap().ident(), "\"order\"");
        // Escaped in the message: a control character cannot reach a
        // terminal raw.
        let e = Schema::new("a\u{1b}[31m").unwrap_err().to_string();
        assert!(e.contains("\\u{1b}"), "{e}");
    }

    #[test]
    fn the_trigger_uses_the_wake_protocols_lock_and_channel() {
        let sql = outbox_v1(&Schema::new("shop").unwrap());
        assert!(sql.contains(&format!(
            "pg_advisory_xact_lock_shared({WRITERS_LOCK_CLASS}, "
        )));
        assert!(sql.contains("pg_notify('warren_outbox_shop', '')"));
        assert!(sql.contains("'\"shop\".outbox_relay_busy'::regclass"));
    }
}
