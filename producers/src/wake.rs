//! How the relay is woken: by the outbox trigger's `NOTIFY` while it is
//! idle, by nothing while it is busy.
//!
//! A notifying transaction holds a database-wide lock through its commit's
//! WAL flush, so notifying commits cannot share a flush; at 1,000
//! single-event transactions per second they queue behind one another
//! (pgbench on this project's machine, 16 clients: ~1,200 against ~5,000
//! commits/s without the NOTIFY). A busy relay claims again after every
//! batch and needs no wake-up, so it sets the schema's flag
//! (`<schema>.outbox_relay_busy` = 1) and the trigger skips the NOTIFY.
//!
//! The handshake (the trigger is installed by [`crate::install`], which
//! formats [`WRITERS_LOCK_CLASS`] and [`channel`] into its SQL): the
//! trigger takes the schema's writers lock in shared mode until its
//! transaction ends, then reads the flag. Before sleeping, the relay clears
//! the flag and then tries the writers lock exclusively (and lets go at
//! once): once it gets it, every writer that read 1 has ended, so a last
//! claim sees their rows, and every later writer notifies. While the lock
//! is taken the relay polls, from 1 ms up to [`MAX_POLL`] (or its poll
//! interval if shorter), and from 1 ms again after any claim that finds
//! rows: a row of a writer that skipped waits at most that long, or less
//! when a later writer's NOTIFY comes first.
//!
//! A relay starts a session as if busy: the flag may have been left at 1 by
//! a relay that died, so it never sleeps before a handshake. A schema
//! whose outbox has no flag (the always-notifying trigger) is never marked
//! busy.

use std::time::Duration;

use sqlx::PgConnection;

use transport::Backoff;

/// Longest wait between polls while a writer that may have skipped the
/// NOTIFY is open. Under steady traffic the writers lock is seldom free,
/// so this bounds what a skipped row can wait; a poll is a claim and a try
/// of the lock, so even a writer open for minutes costs little.
pub const MAX_POLL: Duration = Duration::from_millis(20);

/// First key of the writers lock (`'WW'`, 22359); the second is derived
/// from the schema name, as for the relay's leader lock. The outbox trigger
/// takes it shared, the relay tries it exclusively.
pub const WRITERS_LOCK_CLASS: i32 = 0x5757;

/// What every outbox `NOTIFY` channel name starts with; the schema name
/// follows (see [`channel`]).
pub const CHANNEL_PREFIX: &str = "warren_outbox_";

/// The `NOTIFY` channel of `schema`'s outbox: the trigger notifies it, the
/// relay listens on it.
pub fn channel(schema: &str) -> String {
    format!("{CHANNEL_PREFIX}{schema}")
}

/// What the relay does once nothing is in flight and a claim came back
/// empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idle {
    /// Sleep on `LISTEN` (with the poll interval as fallback).
    Listen,
    /// Writers that skipped the NOTIFY have all ended: claim once more,
    /// then sleep on `LISTEN`.
    ClaimAgain,
    /// A writer that may have skipped the NOTIFY is still open: claim
    /// again after this long (or at a notification) and retry.
    Poll(Duration),
}

/// The relay's side of the handshake, for one session.
#[derive(Debug)]
pub(crate) struct Wake {
    /// The schema has the flag and the skipping trigger.
    supported: bool,
    /// Claims follow every batch, and the handshake comes before sleeping.
    busy: bool,
    /// The flag is (or may be) 1, so writers skip the NOTIFY.
    flag_set: bool,
    /// Delays of the polls while writers may still be open.
    polls: Backoff,
    busy_sql: String,
    quiesce_sql: String,
}

impl Wake {
    /// Checks whether `schema` has the flag; starts busy if it does.
    pub async fn start(
        conn: &mut PgConnection,
        schema: &str,
        poll_interval: Duration,
    ) -> Result<Wake, sqlx::Error> {
        let flag = format!("{schema}.outbox_relay_busy");
        let supported: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&flag)
            .fetch_one(conn)
            .await?;
        let key = format!("{WRITERS_LOCK_CLASS}, hashtext('{schema}') & 2147483647");
        Ok(Wake {
            supported,
            busy: supported,
            flag_set: supported,
            polls: Backoff::new(Duration::from_millis(1), poll_interval.min(MAX_POLL)),
            busy_sql: format!("SELECT setval('{flag}', 1, true)"),
            // One round trip, in this order: the flag is cleared before
            // the lock is tried (CASE evaluates its branches in order, and
            // these functions are volatile, so none is folded early).
            quiesce_sql: format!(
                "SELECT CASE WHEN setval('{flag}', 0, true) = 0 THEN \
                   CASE WHEN pg_try_advisory_lock({key}) THEN pg_advisory_unlock({key}) ELSE false END \
                 END"
            ),
        })
    }

    /// Whether the relay must claim after every batch (writers may not
    /// notify).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// A claim found rows: until one finds none, the relay claims after
    /// every batch, so writers need not notify. Costs a statement only
    /// when the flag is not set already.
    pub async fn mark_busy(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if !self.supported {
            return Ok(());
        }
        self.busy = true;
        self.polls.reset();
        if !self.flag_set {
            sqlx::query(&self.busy_sql).execute(conn).await?;
            self.flag_set = true;
        }
        Ok(())
    }

    /// Nothing in flight and the last claim was empty: what to do before
    /// sleeping.
    pub async fn idle(&mut self, conn: &mut PgConnection) -> Result<Idle, sqlx::Error> {
        if !self.busy {
            return Ok(Idle::Listen);
        }
        let quiet: Option<bool> = sqlx::query_scalar(&self.quiesce_sql)
            .fetch_one(conn)
            .await?;
        self.flag_set = false;
        if quiet == Some(true) {
            self.busy = false;
            self.polls.reset();
            Ok(Idle::ClaimAgain)
        } else {
            Ok(Idle::Poll(self.polls.next_delay()))
        }
    }
}
