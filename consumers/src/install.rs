//! The inbox's part of what warren installs in a service's schema, run by
//! the outbox's versioned installer ([`producers::install::apply`]: one
//! transaction under the schema's install lock, only the missing steps).

use producers::install::{apply, InstallError, Part, Schema};
use sqlx::PgPool;

/// The inbox: `inbox` (the idempotency record, with the index retention
/// prunes by, and since version 2 what `warren trace` reads: the event's
/// correlation, causation and time, whether it was skipped), `subject_progress`
/// (how far each stream was applied, and where it stood before the batch
/// that last moved it, which is how a batch reads back what it admitted;
/// see [`crate::inbox`]) and, since version 2, `inbox_outcomes` (the
/// deliveries that ended otherwise than applied: duplicates, deferrals,
/// retries, dead letters, with their reasons; see [`crate::trail`]).
/// Version 3 stops indexing the correlation of the events that start
/// their own story.
pub const INBOX: Part = Part {
    name: "inbox",
    steps: &[inbox_v1, inbox_v2, inbox_v3],
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

/// Inbox version 2: what a story across services needs (`warren trace`).
///
/// The inbox row of an applied event also keeps its correlation and
/// causation ids, its `time` and whether the service had no handler for
/// it (`skipped`), with an index on the correlation and one on the subject
/// (an order's id), the two ways a story is looked up. Existing rows keep
/// NULLs and count as handled. `inbox_outcomes` has one row per delivery
/// that ended as a duplicate, a deferral, a retry or a dead letter (the
/// rare outcomes; an applied event is its inbox row). It has no key: the
/// same event may be retried several times, and an undecodable message
/// may have no id at all. Both are pruned by the same retention.
fn inbox_v2(schema: &Schema) -> String {
    let s = schema.ident();
    format!(
        "ALTER TABLE {s}.inbox ADD COLUMN IF NOT EXISTS correlation_id text;
         ALTER TABLE {s}.inbox ADD COLUMN IF NOT EXISTS causation_id text;
         ALTER TABLE {s}.inbox ADD COLUMN IF NOT EXISTS event_time timestamptz;
         ALTER TABLE {s}.inbox ADD COLUMN IF NOT EXISTS skipped boolean NOT NULL DEFAULT false;
         CREATE INDEX IF NOT EXISTS inbox_correlation ON {s}.inbox (correlation_id);
         CREATE INDEX IF NOT EXISTS inbox_subject ON {s}.inbox (subject);
         CREATE TABLE IF NOT EXISTS {s}.inbox_outcomes (
           event_id       uuid,
           event_type     text NOT NULL,
           source         text,
           subject        text,
           correlation_id text,
           causation_id   text,
           event_time     timestamptz,
           outcome        text NOT NULL,
           attempt        integer NOT NULL,
           reason         text,
           error          text,
           recorded_at    timestamptz NOT NULL DEFAULT now()
         );
         CREATE INDEX IF NOT EXISTS inbox_outcomes_event ON {s}.inbox_outcomes (event_id);
         CREATE INDEX IF NOT EXISTS inbox_outcomes_correlation ON {s}.inbox_outcomes (correlation_id);
         CREATE INDEX IF NOT EXISTS inbox_outcomes_subject ON {s}.inbox_outcomes (subject);
         CREATE INDEX IF NOT EXISTS inbox_outcomes_recorded_at ON {s}.inbox_outcomes (recorded_at);"
    )
}

/// Inbox version 3: an event that starts its own story (its correlation id
/// is its own id, as [`events::Envelope::new`] makes it: every command
/// from outside, every `order.placed`) is recorded with a NULL
/// `correlation_id` (the id says it; readers take
/// `coalesce(correlation_id, event_id::text)`), and the correlation index
/// holds only the events caused by another. A story is then still found by
/// its correlation id: its root through the primary key, the rest through
/// the index. Rows written before keep their correlation and stay found
/// both ways. Building the smaller index reads the table once, under the
/// installer's lock (like any index the installer adds).
fn inbox_v3(schema: &Schema) -> String {
    let s = schema.ident();
    format!(
        "DROP INDEX IF EXISTS {s}.inbox_correlation;
         CREATE INDEX IF NOT EXISTS inbox_correlation_caused ON {s}.inbox (correlation_id)
           WHERE correlation_id IS NOT NULL;"
    )
}
