//! Leader election: which of a service's relays is the active one.
//!
//! Only one relay per service publishes: the one holding a PostgreSQL
//! session advisory lock on a dedicated connection, [`Leader`]. The others
//! are standbys that try the lock again every `standby_interval`.
//!
//! The lock is a two-key advisory lock, `(LEADER_LOCK_CLASS,
//! hashtext(schema) & 2147483647)`: the first key spells its role, the
//! second tells the services of one database apart. Advisory keys are one
//! space per database, shared with the application: [the crate
//! root](crate#advisory-locks) lists all of warren's, this one next to the
//! wake-up handshake's writers lock [`crate::wake::WRITERS_LOCK_CLASS`]
//! (`'WW'`), keyed on the schema the same way. `warren status` finds the
//! active relay by this key in `pg_locks`.
//!
//! Losing the lock: it lives as long as the leader's connection. When the
//! active process dies, or its connection breaks, PostgreSQL ends the
//! session and drops the lock with it, and a standby takes over at its
//! next try. The relay never keeps publishing on a connection that failed:
//! any database error ends its session, the [`Leader`] is dropped (closing
//! the connection), and the relay runs for election again like a standby.

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::relay::{bounded, RelayError};

/// First key of the relay's two-key advisory lock (`'WA'`); the second is
/// `hashtext(schema) & 2147483647` (see the module docs). `warren status`
/// reads it from `pg_locks`.
pub const LEADER_LOCK_CLASS: i32 = 0x5741;

/// The active relay of a schema: holds the advisory lock on its own
/// connection, which the relay uses for its claims and settles. Dropping
/// it closes the connection and so gives the lock up.
#[derive(Debug)]
pub struct Leader {
    /// The session holding the lock; detached from the pool, so that the
    /// lock is never handed to another user of the pool with it.
    conn: PgConnection,
}

impl Leader {
    /// Takes the lock for `schema` on a connection of its own, retrying as
    /// a standby every `standby_interval` until it gets it. `None` when
    /// `shutdown` comes first. Every statement is bounded by `db_timeout`.
    pub async fn acquire(
        pool: &PgPool,
        schema: &str,
        standby_interval: Duration,
        db_timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leader>, RelayError> {
        let mut conn = bounded(db_timeout, pool.acquire()).await?.detach();
        let mut announced = false;
        loop {
            let got: bool = bounded(
                db_timeout,
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)")
                    .bind(LEADER_LOCK_CLASS)
                    .bind(schema)
                    .fetch_one(&mut conn),
            )
            .await?;
            if got {
                return Ok(Some(Leader { conn }));
            }
            if !announced {
                tracing::info!(service = schema, "another relay is active; standing by");
                announced = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(standby_interval) => {}
                _ = shutdown.cancelled() => {
                    let _ = conn.close().await;
                    return Ok(None);
                }
            }
        }
    }

    /// The connection holding the lock, for the relay's statements.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
