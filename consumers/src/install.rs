//! The inbox's part of what warren installs in a service's schema, run by
//! the outbox's versioned installer ([`producers::install::apply`]: one
//! transaction under the schema's install lock, only the missing steps).

use producers::install::{apply, InstallError, Part, Schema};
use sqlx::PgPool;

/// The inbox: `inbox` (the idempotency record, with the index retention
/// prunes by) and `subject_progress` (how far each stream was applied, and
/// where it stood before the batch that last moved it, which is how a batch
/// reads back what it admitted; see [`crate::inbox`]).
pub const INBOX: Part = Part {
    name: "inbox",
    steps: &[inbox_v1],
};

/// Installs (or upgrades) the inbox in `schema`, creating the schema if
/// needed. Harmless to run again; safe to run from several processes at
/// once.
pub async fn install(pool: &PgPool, schema: &str) -> Result<(), InstallError> {
    apply(pool, schema, &INBOX).await
}

/// Inbox version 1: the layout of the old migrations up to
/// `20261125000002_progress_prev.sql`, which it also upgrades in place.
fn inbox_v1(schema: &Schema) -> String {
    let s = schema.ident();
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.inbox (
           event_id   uuid PRIMARY KEY,
           event_type text NOT NULL,
           source     text NOT NULL,
           subject    text NOT NULL,
           sequence   bigint NOT NULL,
           handled_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE INDEX IF NOT EXISTS inbox_handled_at ON {s}.inbox (handled_at);
         CREATE TABLE IF NOT EXISTS {s}.subject_progress (
           source        text NOT NULL,
           subject       text NOT NULL,
           last_sequence bigint NOT NULL,
           updated_at    timestamptz NOT NULL DEFAULT now(),
           prev_sequence bigint NOT NULL DEFAULT 0,
           PRIMARY KEY (source, subject)
         );
         ALTER TABLE {s}.subject_progress ADD COLUMN IF NOT EXISTS prev_sequence bigint NOT NULL DEFAULT 0;"
    )
}
