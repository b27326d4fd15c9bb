//! A lane's database connection, with the transaction of its next batch
//! begun while the lane waits for deliveries.
//!
//! Why: `BEGIN` is a round trip of its own (sqlx waits for the server's
//! answer before the first statement), one of the four of a consumer
//! transaction: BEGIN, admission, handlers, COMMIT. Sent as soon as a
//! batch is settled and nothing else is waiting, it is done by the time the
//! next delivery arrives, so an event waits for three round trips instead
//! of four, and the lane is free that much sooner.
//!
//! How: the lane keeps one sqlx [`Transaction`] for as long as it holds
//! the connection, and ends each batch's transaction with a plain `COMMIT`
//! followed (when the lane would only wait) by a plain `BEGIN`. sqlx
//! therefore always sees the connection inside a transaction, which is
//! what keeps handlers' own `begin()` a savepoint, and what makes a
//! dropped lane (error, shutdown, abort) roll back before the connection
//! goes back to the pool: sqlx's rollback-on-drop does that, as before.
//!
//! What it costs: `now()` is a transaction's start, so in a handler it may
//! precede the batch by up to the lane's idle hold (`HOLD_IDLE`, 100 ms);
//! the inbox stamps its rows with `statement_timestamp()` for that reason,
//! and handlers that need the moment of handling should too. A transaction
//! that has only begun holds no snapshot, no transaction id and no lock,
//! so it holds nothing back (vacuum included); `pg_stat_activity` shows it
//! as `idle in transaction` for those moments.

use std::time::Duration;

use sqlx::{Executor, PgConnection, PgPool, Postgres, Transaction};

/// Longest wait for the statements a lane sends while idle (the `BEGIN`
/// ahead, the `ROLLBACK` before release): past it the connection is given
/// up to sqlx's cleanup on drop, so a database gone quiet cannot hold up
/// the lane.
const IDLE_STATEMENT: Duration = Duration::from_secs(5);

/// A lane's connection, kept from one batch to the next while deliveries
/// keep coming: a connection given back to the pool costs a round trip
/// (sqlx checks it on release), one per batch under a trickle.
#[derive(Default)]
pub(crate) struct Held {
    /// The lane's connection, inside sqlx's transaction bookkeeping.
    tx: Option<Transaction<'static, Postgres>>,
    /// The server has a transaction open on it (sqlx's `BEGIN`, or ours
    /// since the last `COMMIT`).
    open: bool,
}

impl Held {
    /// Whether the lane holds a connection.
    pub(crate) fn is_some(&self) -> bool {
        self.tx.is_some()
    }

    /// The connection inside an open transaction: the one begun ahead, or
    /// one begun now.
    pub(crate) async fn begin(&mut self, pool: &PgPool) -> Result<&mut PgConnection, sqlx::Error> {
        let tx = match self.tx.take() {
            Some(tx) => tx,
            None => {
                let tx = pool.begin().await?;
                self.open = true;
                tx
            }
        };
        let tx = self.tx.insert(tx);
        if !self.open {
            tx.execute("BEGIN").await?;
            self.open = true;
        }
        Ok(&mut **tx)
    }

    /// Begins the next batch's transaction now, while the lane waits. On
    /// failure the connection is given up; the batch then gets a new one,
    /// and reports the error if there is one.
    pub(crate) async fn begin_ahead(&mut self, pool: &PgPool) {
        match tokio::time::timeout(IDLE_STATEMENT, self.begin(pool)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "could not begin the next batch's transaction ahead");
                self.abandon();
            }
            Err(_) => {
                tracing::debug!("no answer to the next batch's BEGIN within {IDLE_STATEMENT:?}");
                self.abandon();
            }
        }
    }

    /// Commits the open transaction; the connection stays with the lane.
    pub(crate) async fn commit(&mut self) -> Result<(), sqlx::Error> {
        if let (Some(tx), true) = (self.tx.as_mut(), self.open) {
            tx.execute("COMMIT").await?;
            self.open = false;
        }
        Ok(())
    }

    /// Gives up the connection after a failed batch: sqlx rolls it back and
    /// returns it to the pool behind the lane's back, after whatever a
    /// failed or timed-out statement left behind (or closes it).
    pub(crate) fn abandon(&mut self) {
        self.tx = None;
        self.open = false;
    }

    /// Returns the connection to the pool, rolling back the transaction
    /// begun ahead: the lane has been idle.
    pub(crate) async fn release(&mut self) {
        let open = std::mem::take(&mut self.open);
        let Some(mut tx) = self.tx.take() else {
            return;
        };
        let _ = tokio::time::timeout(IDLE_STATEMENT, async move {
            // sqlx's rollback needs a transaction to end, or the server
            // logs a warning for each idle lane.
            if open || tx.execute("BEGIN").await.is_ok() {
                let _ = tx.rollback().await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgPoolOptions;

    /// A table `t` in `pool`'s database, and a pool of one connection to
    /// it, so the next acquire shows what the last user left behind.
    async fn single_with_table(pool: &PgPool) -> PgPool {
        sqlx::query("CREATE TABLE t (x int)")
            .execute(pool)
            .await
            .unwrap();
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap()
    }

    async fn insert(conn: &mut PgConnection, x: i32) {
        sqlx::query("INSERT INTO t VALUES ($1)")
            .bind(x)
            .execute(conn)
            .await
            .unwrap();
    }

    async fn pid(conn: &mut PgConnection) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    /// The pool's one connection, once it is back: its backend, the rows
    /// of `t`, and the transaction id it is in, if any.
    async fn next_user_sees(pool: &PgPool) -> (i32, i64, Option<i64>) {
        let mut conn = tokio::time::timeout(Duration::from_secs(5), pool.acquire())
            .await
            .unwrap()
            .unwrap();
        sqlx::query_as(
            "SELECT pg_backend_pid(), (SELECT count(*) FROM t), txid_current_if_assigned()",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap()
    }

    #[sqlx::test]
    async fn the_batch_runs_in_the_transaction_begun_ahead(pool: PgPool) {
        let pool = single_with_table(&pool).await;
        let mut held = Held::default();
        held.begin_ahead(&pool).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let tx = held.begin(&pool).await.unwrap();
        // now() is the transaction's start: the BEGIN sent ahead.
        let ahead: bool =
            sqlx::query_scalar("SELECT statement_timestamp() - now() >= interval '50 ms'")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert!(ahead, "the transaction began before the batch");
        held.commit().await.unwrap();
        let tx = held.begin(&pool).await.unwrap();
        let fresh: bool =
            sqlx::query_scalar("SELECT statement_timestamp() - now() < interval '50 ms'")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert!(fresh, "after a commit, a new transaction");
        held.release().await;
    }

    #[sqlx::test]
    async fn an_idle_lane_rolls_back_before_the_connection_returns_to_the_pool(pool: PgPool) {
        let pool = single_with_table(&pool).await;
        let mut held = Held::default();
        let tx = held.begin(&pool).await.unwrap();
        let before = pid(tx).await;
        insert(tx, 1).await;
        held.release().await;
        assert!(!held.is_some());
        assert_eq!(
            next_user_sees(&pool).await,
            (before, 0, None),
            "the same connection, pooled, rolled back, outside any transaction"
        );
    }

    #[sqlx::test]
    async fn a_lane_dropped_with_a_transaction_open_rolls_it_back(pool: PgPool) {
        let pool = single_with_table(&pool).await;
        let mut held = Held::default();
        let tx = held.begin(&pool).await.unwrap();
        insert(tx, 1).await;
        drop(held);
        let (_, rows, xid) = next_user_sees(&pool).await;
        assert_eq!(
            (rows, xid),
            (0, None),
            "rolled back, outside any transaction"
        );
    }

    #[sqlx::test]
    async fn a_failed_batch_is_rolled_back_behind_the_lane(pool: PgPool) {
        let pool = single_with_table(&pool).await;
        let mut held = Held::default();
        let tx = held.begin(&pool).await.unwrap();
        let before = pid(tx).await;
        insert(tx, 1).await;
        assert!(sqlx::query("SELECT 1/0").execute(&mut *tx).await.is_err());
        held.abandon();
        assert!(!held.is_some());
        assert_eq!(next_user_sees(&pool).await, (before, 0, None));
    }

    /// A handler's own `begin()` is a savepoint inside the batch's
    /// transaction, whether that was begun by sqlx or ahead by the lane.
    #[sqlx::test]
    async fn a_handlers_begin_is_a_savepoint_in_the_batch(pool: PgPool) {
        let pool = single_with_table(&pool).await;
        let mut held = Held::default();
        for round in 0..2 {
            let tx = held.begin(&pool).await.unwrap();
            insert(tx, 1).await;
            let mut sp = sqlx::Connection::begin(&mut *tx).await.unwrap();
            insert(&mut sp, 2).await;
            sp.rollback().await.unwrap();
            let mut sp = sqlx::Connection::begin(&mut *tx).await.unwrap();
            insert(&mut sp, 3).await;
            sp.commit().await.unwrap();
            // Still inside the batch: a rollback now takes everything.
            let xid: Option<i64> = sqlx::query_scalar("SELECT txid_current_if_assigned()")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert!(
                xid.is_some(),
                "round {round}: the batch's transaction is still open"
            );
            held.commit().await.unwrap();
            held.begin_ahead(&pool).await;
        }
        held.release().await;
        let rows: Vec<i32> = sqlx::query_scalar("SELECT x FROM t ORDER BY x")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows, vec![1, 1, 3, 3]);
    }
}
