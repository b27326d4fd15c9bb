//! The lanes of a session: the workers its deliveries fan out to. A subject
//! always goes to the same lane and a lane settles one batch at a time, so
//! the deliveries of a subject are handled one after another in queue
//! order while other subjects go on in parallel.
//!
//! Flow control: each lane's queue is bounded, so a slow lane makes the
//! session wait before it takes the next delivery from the broker, and the
//! broker sends no more than the prefetch allows.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::SubscriptionConfig;
use crate::delivery::{Held, Item, Processor, SettleError};

/// How long a lane keeps its database connection with no delivery to
/// handle. Long enough to span the gaps of a steady stream, short enough
/// that lanes of a quiet service leave the pool to others.
const HOLD_IDLE: Duration = Duration::from_millis(100);

/// The running lanes of one session.
pub(crate) struct Lanes {
    /// Each lane's bounded queue; a lane ends when its sender is dropped.
    senders: Vec<mpsc::Sender<Item>>,
    tasks: JoinSet<Result<(), SettleError>>,
    /// Set when the session fails: lanes finish the delivery they hold
    /// (its commit stands; a lost ack only means a redelivery that the
    /// inbox absorbs) and drop the ones queued behind it unhandled.
    abandon: CancellationToken,
}

impl Lanes {
    /// Starts `config.lanes` lanes (at least one) that settle deliveries
    /// through `processor`; `shutdown` ends their waits for the database.
    /// Each lane has room for its share of the prefetch, so the deliveries
    /// waiting in lanes never exceed what the broker sent.
    pub(crate) fn start(
        config: &SubscriptionConfig,
        processor: &Processor,
        shutdown: &CancellationToken,
    ) -> Self {
        let count = config.lanes.max(1);
        let capacity = (config.prefetch as usize / count).max(1);
        let max_batch = config.batch_size.max(1);
        let abandon = CancellationToken::new();
        let mut senders = Vec::with_capacity(count);
        let mut tasks = JoinSet::new();
        for _ in 0..count {
            let (tx, rx) = mpsc::channel::<Item>(capacity);
            senders.push(tx);
            tasks.spawn(run_lane(
                rx,
                processor.clone(),
                max_batch,
                shutdown.clone(),
                abandon.clone(),
            ));
        }
        Lanes {
            senders,
            tasks,
            abandon,
        }
    }

    /// Hands a delivery to its lane, waiting while that lane is full. An
    /// undecodable delivery has no subject and no order to keep: its tag
    /// spreads those over the lanes.
    pub(crate) async fn dispatch(&self, item: Item) {
        dispatch(&self.senders, item).await;
    }

    /// A handle that dispatches to these lanes from another task (a
    /// partition's consumer). The lanes end only once every handle is
    /// dropped too.
    pub(crate) fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            senders: self.senders.clone(),
        }
    }

    /// Waits until a lane ends, which while the lanes are open only a
    /// failure does: the error it could not settle, `None` if it panicked.
    /// Cancel-safe.
    pub(crate) async fn failure(&mut self) -> Option<SettleError> {
        match self.tasks.join_next().await {
            Some(Ok(Err(e))) => Some(e),
            Some(_) => None,
            // No lane left to fail.
            None => std::future::pending().await,
        }
    }

    /// Closes the lanes and waits up to `timeout` for them to end. After a
    /// clean stop they settle everything queued; after a failure
    /// (`clean` false) they drop what is queued unhandled. Past the
    /// timeout they are aborted: open transactions roll back and
    /// unacknowledged deliveries are redelivered.
    pub(crate) async fn stop(self, clean: bool, timeout: Duration, service: &str) {
        let Lanes {
            senders,
            mut tasks,
            abandon,
        } = self;
        if !clean {
            abandon.cancel();
        }
        drop(senders);
        let drained = tokio::time::timeout(timeout, async {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(e)) = done {
                    tracing::warn!(service, error = %e, "lane ended with an unsettled delivery; the broker will redeliver it");
                }
            }
        });
        // Past the timeout, dropping the JoinSet aborts the lanes.
        let _ = drained.await;
    }
}

/// Dispatches deliveries to a session's lanes (see [`Lanes::dispatcher`]).
#[derive(Clone)]
pub(crate) struct Dispatcher {
    senders: Vec<mpsc::Sender<Item>>,
}

impl Dispatcher {
    /// As [`Lanes::dispatch`].
    pub(crate) async fn dispatch(&self, item: Item) {
        dispatch(&self.senders, item).await;
    }
}

async fn dispatch(senders: &[mpsc::Sender<Item>], item: Item) {
    let lane = match &item.1 {
        Ok(e) => lane_of(&e.subject, senders.len()),
        Err(_) => item.0.delivery_tag as usize % senders.len(),
    };
    // A closed lane ended with an error, which `failure` reports; the
    // delivery stays unacknowledged and the broker redelivers it.
    let _ = senders[lane].send(item).await;
}

/// One lane: settles batches from `rx` until the session closes it, or
/// ends on a delivery it cannot settle.
async fn run_lane(
    mut rx: mpsc::Receiver<Item>,
    processor: Processor,
    max_batch: usize,
    shutdown: CancellationToken,
    abandoned: CancellationToken,
) -> Result<(), SettleError> {
    let mut conn: Held = None;
    while let Some(batch) = next_batch(&mut rx, &mut conn, max_batch).await {
        if abandoned.is_cancelled() {
            continue;
        }
        processor.process(batch, &mut conn, &shutdown).await?;
    }
    Ok(())
}

/// Waits for a delivery, then takes whatever else is already waiting, up to
/// `max_batch`: no waiting for a batch to fill, so latency stays low when
/// traffic is light. `None` once the lane is closed and empty.
///
/// The connection stays with the lane while deliveries keep coming, and
/// goes back to the pool after `HOLD_IDLE` without any, so idle lanes hold
/// none.
async fn next_batch(
    rx: &mut mpsc::Receiver<Item>,
    conn: &mut Held,
    max_batch: usize,
) -> Option<Vec<Item>> {
    let first = loop {
        if conn.is_none() {
            break rx.recv().await?;
        }
        match tokio::time::timeout(HOLD_IDLE, rx.recv()).await {
            Ok(next) => break next?,
            Err(_) => *conn = None,
        }
    };
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The lane of a subject: stable for the life of the process.
fn lane_of(subject: &str, lanes: usize) -> usize {
    let mut h = DefaultHasher::new();
    subject.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}
