//! Ordered partitions: a service whose work is split over P queues
//! `<ns>.<service>.p<i>` (see `transport::topology`), each fed by the
//! broker's consistent-hash exchange with every event of some subjects,
//! each with one active consumer at a time (RabbitMQ's single active
//! consumer), shared out among the service's processes.
//!
//! Why a share-out on top of single active consumer: RabbitMQ makes the
//! *first* consumer registered on a queue the active one, so if every
//! process consumed every partition, the first process started would
//! take them all and the others would only stand by. Instead each
//! process joins the service's members (a shared advisory lock on a
//! PostgreSQL connection of its own, as the relay's election does), and
//! every second works out its share: with n members, P/n partitions, one
//! more for the first P mod n members in backend-pid order. It consumes a
//! partition only while it holds that partition's advisory lock, takes free
//! ones up to its share and hands surplus ones over.
//!
//! Handing a partition over keeps its order: the process stops taking
//! deliveries off the consumer, waits until every delivery it dispatched
//! is handled and acknowledged, closes the channel, and only then gives
//! the partition's lock back. It does not `basic.cancel` first: RabbitMQ
//! (3.10) makes the next consumer active as soon as the active one is
//! cancelled, while a delivery that was on its way to the cancelled
//! consumer is handed back to the queue later, by the channel, after the
//! fact, so the next owner could get a subject's later events before that
//! one (seen once in CI as a deferral). Closing the channel instead ends
//! the consumer in one step of the queue's state machine: what it still
//! held (sent but never dispatched) goes back to the head of the queue,
//! in order, and only then is the next consumer made active; a consumer
//! that registers earlier waits. The price: up to the prefetch of
//! deliveries come again, flagged redelivered, to the next owner (they
//! were never handled, so they are not duplicates). A process that dies hands
//! its partitions over without that care: its broker connection closes,
//! so the broker puts its unacknowledged deliveries back at the head of
//! their queues (redelivered first), and its database session ends, so
//! its locks are free for the others' next round, a second later. Single
//! active consumer is the broker-side guard under all of it: should two
//! processes ever consume one partition (a database session lost while
//! the broker connection lives), only one of them gets deliveries.
//!
//! Deliveries of every partition a process holds go to the same lanes
//! (a subject keeps its lane, as in the competing layout), each channel's
//! acks kept apart. A subject's events arrive in order, so the inbox's
//! sequence check finds nothing early and defers nothing; it still guards
//! the cases partitions do not cover (a changed partition count, an event
//! retried after a failure, events republished out of order).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use events::Codec;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acks::Acks;
use crate::delivery::decode;
use crate::lanes::Dispatcher;
use crate::subscription::SubscriptionError;

/// First key of the members' shared advisory lock (`'WM'`); the second is
/// `hashtext(service) & 2147483647`, as for warren's other locks (see
/// `producers`' crate docs).
pub const MEMBER_LOCK_CLASS: i32 = 0x574D;

/// Partition `i`'s advisory lock has the first key `PARTITION_LOCK_BASE |
/// i` (`'WP'` in the high half) and the same second key.
pub const PARTITION_LOCK_BASE: i32 = 0x5750_0000;

/// How often a process works out its share again: the longest a dead
/// process's partitions wait for a new owner, once its database session
/// is gone.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// Bound on each membership statement.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// The partitions a process should hold: `partitions / members`, plus one
/// for the first `partitions % members` ranks, so the shares add up to
/// `partitions` exactly.
pub fn share(partitions: u16, members: usize, rank: usize) -> usize {
    let (p, n) = (partitions as usize, members.max(1));
    p / n + usize::from(rank < p % n)
}

/// This process among a partitioned service's processes: the database
/// session that holds its member lock and its partitions' locks. Dropping
/// it closes the session, which gives every lock up.
pub(crate) struct Membership {
    /// Detached from the pool, so that the locks never go back to the
    /// pool with it.
    conn: PgConnection,
    service: String,
    /// This session's backend pid: its place in the members' order.
    pid: i32,
}

impl Membership {
    /// Joins the members of `service`.
    pub(crate) async fn join(pool: &PgPool, service: &str) -> Result<Self, SubscriptionError> {
        let mut conn = bounded(pool.acquire()).await?.detach();
        bounded(
            sqlx::query("SELECT pg_advisory_lock_shared($1, hashtext($2) & 2147483647)")
                .bind(MEMBER_LOCK_CLASS)
                .bind(service)
                .execute(&mut conn),
        )
        .await?;
        let pid: i32 =
            bounded(sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn)).await?;
        Ok(Membership {
            conn,
            service: service.to_owned(),
            pid,
        })
    }

    /// How many members there are, and this one's rank among them.
    async fn members(&mut self) -> Result<(usize, usize), SubscriptionError> {
        let pids: Vec<i32> = bounded(
            sqlx::query_scalar(
                "SELECT pid FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND classid::bigint = $1 AND objid::bigint = (hashtext($2) & 2147483647) \
                 ORDER BY pid",
            )
            .bind(i64::from(MEMBER_LOCK_CLASS))
            .bind(&self.service)
            .fetch_all(&mut self.conn),
        )
        .await?;
        match pids.iter().position(|&p| p == self.pid) {
            Some(rank) => Ok((pids.len(), rank)),
            // Our session holds the lock for as long as it lives; not
            // seeing it means we are not who we think we are.
            None => Err(SubscriptionError::MembershipLost),
        }
    }

    /// Takes partition `k`'s lock if it is free.
    async fn try_take(&mut self, k: u16) -> Result<bool, SubscriptionError> {
        bounded(
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)")
                .bind(PARTITION_LOCK_BASE | i32::from(k))
                .bind(&self.service)
                .fetch_one(&mut self.conn),
        )
        .await
    }

    /// Gives partition `k`'s lock back.
    async fn give_back(&mut self, k: u16) -> Result<(), SubscriptionError> {
        bounded(
            sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2) & 2147483647)")
                .bind(PARTITION_LOCK_BASE | i32::from(k))
                .bind(&self.service)
                .execute(&mut self.conn),
        )
        .await?;
        Ok(())
    }

    /// Leaves: closes the session (every lock with it).
    pub(crate) async fn leave(self) {
        let _ = tokio::time::timeout(DB_TIMEOUT, self.conn.close()).await;
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, SubscriptionError> {
    match tokio::time::timeout(DB_TIMEOUT, f).await {
        Ok(r) => r.map_err(SubscriptionError::Membership),
        Err(_) => Err(SubscriptionError::Membership(sqlx::Error::PoolTimedOut)),
    }
}

/// What a partitioned session needs to open a partition's consumer.
pub(crate) struct PartitionSource<'a> {
    pub conn: &'a Connection,
    pub service: &'a str,
    pub topology: &'a transport::Topology,
    pub partitions: u16,
    pub prefetch: u16,
    pub codec: Codec,
    pub dispatcher: Dispatcher,
    /// Longest a handed-over partition waits for its deliveries' acks.
    pub drain: Duration,
}

/// A partition this process consumes. Dropped (its session's future
/// dropped, say), it aborts its consumer task, which would otherwise
/// outlive the session.
pub(crate) struct Owned {
    /// Cancelled to hand the partition over.
    release: CancellationToken,
    /// Its consumer: ends after a hand-over, or with the error that ended it.
    task: JoinHandle<Result<(), SubscriptionError>>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The partitions a session holds, by number.
#[derive(Default)]
pub(crate) struct Held {
    owned: BTreeMap<u16, Owned>,
}

impl Held {
    /// One round: checks that every held consumer is still running, then
    /// hands surplus partitions over or takes free ones up to this
    /// process's share.
    pub(crate) async fn rebalance(
        &mut self,
        source: &PartitionSource<'_>,
        membership: &mut Membership,
    ) -> Result<(), SubscriptionError> {
        if let Some(&k) = self
            .owned
            .iter()
            .find(|(_, o)| o.task.is_finished())
            .map(|(k, _)| k)
        {
            // A consumer that ended by itself (its channel failed, or the
            // broker cancelled it): the session restarts.
            let ended = self.owned.remove(&k);
            return match ended {
                Some(mut owned) => match (&mut owned.task).await {
                    Ok(Ok(())) => Err(SubscriptionError::ConsumerEnded),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(SubscriptionError::ConsumerEnded),
                },
                None => Err(SubscriptionError::ConsumerEnded),
            };
        }
        let (members, rank) = membership.members().await?;
        let target = share(source.partitions, members, rank);
        while self.owned.len() > target {
            let Some((k, owned)) = self.owned.pop_last() else {
                break;
            };
            hand_over(source, k, owned).await?;
            membership.give_back(k).await?;
            tracing::info!(
                service = source.service,
                partition = k,
                members,
                "handed partition over"
            );
        }
        let p = source.partitions as usize;
        // Start the search at this rank's place, so members do not all
        // race for the same free partition.
        let start = rank * p / members.max(1);
        for i in 0..p {
            if self.owned.len() >= target {
                break;
            }
            let k = ((start + i) % p) as u16;
            if self.owned.contains_key(&k) || !membership.try_take(k).await? {
                continue;
            }
            let owned = start_partition(source, k).await?;
            self.owned.insert(k, owned);
            tracing::info!(
                service = source.service,
                partition = k,
                members,
                share = target,
                "consuming partition"
            );
        }
        Ok(())
    }

    /// Hands every partition over (a clean stop), or drops them at once
    /// after a failure: the session's connection closes next, which
    /// returns their unacknowledged deliveries to their queues.
    pub(crate) async fn release_all(self, source: &PartitionSource<'_>, clean: bool) {
        for (k, owned) in self.owned {
            if clean {
                if let Err(e) = hand_over(source, k, owned).await {
                    tracing::warn!(service = source.service, partition = k, error = %e, "partition not handed over cleanly; the broker redelivers what was not acknowledged");
                }
            } else {
                drop(owned);
            }
        }
    }
}

/// Opens partition `k`'s consumer on a channel of its own.
async fn start_partition(source: &PartitionSource<'_>, k: u16) -> Result<Owned, SubscriptionError> {
    let ch = source.conn.create_channel().await?;
    ch.basic_qos(source.prefetch, BasicQosOptions::default())
        .await?;
    let queue = source.topology.partition_queue(source.service, k);
    let tag = format!("warren-{}-p{k}-{}", source.service, uuid::Uuid::now_v7());
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let release = CancellationToken::new();
    let task = tokio::spawn(consume_partition(
        ch,
        consumer,
        tag,
        source.codec.clone(),
        source.dispatcher.clone(),
        release.clone(),
        source.drain,
    ));
    Ok(Owned { release, task })
}

/// Releases partition `k`'s consumer and waits until it has settled what
/// it dispatched and closed its channel.
async fn hand_over(
    source: &PartitionSource<'_>,
    k: u16,
    mut owned: Owned,
) -> Result<(), SubscriptionError> {
    owned.release.cancel();
    // The task bounds its own wait for acks; this bound is for a lane
    // stuck in a dispatch.
    match tokio::time::timeout(source.drain + Duration::from_secs(5), &mut owned.task).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(SubscriptionError::ConsumerEnded),
        Err(_) => {
            tracing::warn!(
                service = source.service,
                partition = k,
                "partition hand-over timed out"
            );
            Err(SubscriptionError::ConsumerEnded)
        }
    }
}

/// Feeds one partition's deliveries to the lanes until released, then
/// waits until all it dispatched is acknowledged (bounded by `drain`) and
/// closes the channel, which returns what the broker sent beyond that to
/// the head of the queue (see the module's docs for why not
/// `basic.cancel`).
async fn consume_partition(
    ch: Channel,
    mut consumer: Consumer,
    tag: String,
    codec: Codec,
    dispatcher: Dispatcher,
    release: CancellationToken,
    drain: Duration,
) -> Result<(), SubscriptionError> {
    let acks = Arc::new(Acks::new(ch.clone()));
    let mut last = 0;
    loop {
        tokio::select! {
            // A release wins over a delivery that is ready at the same
            // time: what is not dispatched goes back to the queue.
            biased;
            _ = release.cancelled() => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    last = delivery.delivery_tag;
                    let decoded = decode(&codec, &delivery);
                    dispatcher.dispatch((delivery, decoded, acks.clone())).await;
                }
                Some(Err(e)) => return Err(e.into()),
                // The broker cancelled the consumer (the queue was
                // deleted, say): the session restarts.
                None => return Err(SubscriptionError::ConsumerEnded),
            },
        }
    }
    let deadline = tokio::time::Instant::now() + drain;
    while acks.floor().await < last {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(%tag, "handing a partition over with deliveries unacknowledged; the broker redelivers them");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Should the close not finish in time, the lock still goes back:
    // while this channel lives its consumer stays the active one, and a
    // next owner's consumer waits behind it.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        ch.close(200, ("partition handed over").into()),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_partitions_and_differ_by_one_at_most() {
        for p in 1..=16u16 {
            for n in 1..=7usize {
                let shares: Vec<usize> = (0..n).map(|r| share(p, n, r)).collect();
                assert_eq!(shares.iter().sum::<usize>(), p as usize, "p={p} n={n}");
                let (lo, hi) = (shares.iter().min(), shares.iter().max());
                assert!(hi.unwrap() - lo.unwrap() <= 1, "p={p} n={n}: {shares:?}");
            }
        }
        assert_eq!(share(4, 3, 0), 2);
        assert_eq!(share(4, 3, 2), 1);
        assert_eq!(
            share(2, 3, 2),
            0,
            "a third member of two partitions stands by"
        );
    }
}
