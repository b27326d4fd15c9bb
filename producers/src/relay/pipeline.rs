//! The active relay's state between passes: the batches in flight, the
//! subjects held back, the settles deferred to the next claim, and whether
//! a claim is due. [`super::Relay`]'s publish loop is a sequence of the
//! steps here; each step says what it decides and why.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use transport::{Backoff, Publisher};

use super::batch::InFlight;
use super::{Relay, RelayError};
use crate::wake::{Idle, Wake};

/// One session's publishing pipeline, on the leader's connection.
pub(super) struct Pipeline<'a> {
    relay: &'a Relay,
    /// The connection holding the leader lock: claims and settles.
    leader: &'a mut PgConnection,
    /// The channel with confirms that every batch is published on.
    publisher: Publisher,
    /// The outbox's `NOTIFY` channel, heard while the relay waits.
    listener: PgListener,
    /// The relay's side of the wake-up handshake (see [`crate::wake`]).
    wake: Wake,
    /// Published batches awaiting their confirms, oldest first; they are
    /// settled in this order.
    in_flight: VecDeque<InFlight>,
    /// Most batches in flight (`batches_in_flight`, at least one).
    depth: usize,
    /// Subjects with an event that was nacked or returned: their later
    /// events in flight are not settled either, so they go out again
    /// after it. Cleared once everything in flight is settled.
    held_back: HashSet<String>,
    /// Confirmed rows not deleted (or marked) yet: under a trickle (one
    /// claim after every batch) the next claim does it in the same
    /// statement, which saves a round trip per batch; they are settled on
    /// their own before anything waits. A crash meanwhile republishes
    /// them, as a crash between confirm and settle always has.
    settled: Vec<i64>,
    /// A claim is due: the last one came back full, a notification came,
    /// the relay is busy (writers may not notify), a batch failed, or the
    /// idle wait ended.
    claim_due: bool,
    /// The last claim came back full: more rows are waiting, so claims go
    /// out back to back, pipelined. Otherwise (a trickle) a new claim
    /// waits until nothing is in flight: the rows committed meanwhile go
    /// out together, one claim, one publish burst and one mark for all of
    /// them, instead of one each (it costs them at most one confirm round
    /// trip of waiting).
    backlog: bool,
    /// Pause before claiming again after a batch with failures.
    failures: Backoff,
    /// When retention last ran; `None` before the first time.
    last_prune: Option<Instant>,
}

impl<'a> Pipeline<'a> {
    /// Opens the publishing channel, declares the exchange, listens for the
    /// outbox's notifications and starts the wake-up handshake: from here
    /// on the relay is active. The first claim is due at once.
    pub(super) async fn open(
        relay: &'a Relay,
        leader: &'a mut PgConnection,
        conn: &lapin::Connection,
    ) -> Result<Pipeline<'a>, RelayError> {
        let service = relay.outbox.service();
        let publisher = Publisher::open(conn).await?;
        relay.topology.declare_exchange(publisher.channel()).await?;
        let mut listener = PgListener::connect_with(&relay.pool).await?;
        listener.listen(&crate::wake::channel(service)).await?;
        let wake = relay
            .db_timeout(Wake::start(leader, service, relay.config.poll_interval))
            .await?;
        relay.stats.active.store(true, Ordering::Relaxed);
        tracing::info!(service, "relay active");
        Ok(Pipeline {
            relay,
            leader,
            publisher,
            listener,
            wake,
            in_flight: VecDeque::with_capacity(relay.config.batches_in_flight.max(1)),
            depth: relay.config.batches_in_flight.max(1),
            held_back: HashSet::new(),
            settled: Vec::new(),
            claim_due: true,
            backlog: false,
            failures: Backoff::new(relay.config.retry_initial, relay.config.retry_max),
            last_prune: None,
        })
    }

    /// Whether to claim now: one is due, there is room in flight, and
    /// either a backlog is draining (claims run ahead of the confirms) or
    /// nothing is in flight (a trickle gathers while the confirms come).
    pub(super) fn wants_claim(&self) -> bool {
        self.claim_due && self.has_room() && (self.backlog || self.in_flight.is_empty())
    }

    /// Claims the next batch (settling the deferred rows in the same
    /// statement) and publishes it. `true` when it found rows.
    pub(super) async fn claim(&mut self) -> Result<bool, RelayError> {
        let exclude: Vec<i64> = self
            .in_flight
            .iter()
            .flat_map(|b| b.rows.iter().map(|r| r.position))
            .collect();
        let limit = (self.relay.config.batch_size as usize).min(self.free_rows()) as i64;
        let batch = self
            .relay
            .claim_and_publish(
                self.leader,
                &self.publisher,
                &exclude,
                limit,
                &mut self.settled,
            )
            .await?;
        let Some(batch) = batch else {
            self.claim_due = false;
            self.backlog = false;
            return Ok(false);
        };
        // A full batch means more is waiting: claim again at once, while
        // this one's confirms are on their way.
        self.claim_due = batch.full;
        self.backlog = batch.full;
        // Rows to publish: busy until a claim comes back empty, so writers
        // need not notify meanwhile.
        self.relay
            .db_timeout(self.wake.mark_busy(self.leader))
            .await?;
        self.in_flight.push_back(batch);
        Ok(true)
    }

    /// Runs retention when it is due. Time-gated, and checked on busy
    /// passes too: under steady traffic the pipeline may never run empty.
    pub(super) async fn prune_if_due(&mut self) {
        let config = &self.relay.config;
        if !config.retention.is_zero()
            && self
                .last_prune
                .is_none_or(|t| t.elapsed() >= config.retention_every)
        {
            self.last_prune = Some(Instant::now());
            self.relay.prune().await;
        }
    }

    /// Settles the deferred rows on their own, before the relay waits.
    pub(super) async fn flush(&mut self) -> Result<(), RelayError> {
        self.relay.flush(self.leader, &mut self.settled).await
    }

    /// Whether a batch awaits its confirms.
    pub(super) fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Waits for the oldest batch's confirms and settles it; or for a
    /// notification (only with room for another batch), which makes a
    /// claim due; or for `shutdown`.
    pub(super) async fn await_oldest(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let room = self.has_room();
        let Some(oldest) = self.in_flight.front_mut() else {
            return Ok(());
        };
        tokio::select! {
            confirms = tokio::time::timeout_at(oldest.deadline, &mut oldest.confirms) => {
                let confirms = confirms
                    .map_err(|_| RelayError::ConfirmTimeout(self.relay.config.confirm_timeout))?;
                self.settle_oldest(confirms, shutdown).await?;
            }
            n = self.listener.recv(), if room => { n?; self.claim_due = true; }
            _ = shutdown.cancelled() => {}
        }
        Ok(())
    }

    /// Settles the oldest batch, whose `confirms` are in. After a failure
    /// everything in flight is settled and the relay pauses before the
    /// retry; otherwise a claim follows only when the relay is busy.
    async fn settle_oldest(
        &mut self,
        confirms: Vec<Result<lapin::Confirmation, lapin::Error>>,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let Some(batch) = self.in_flight.pop_front() else {
            return Ok(());
        };
        // In a backlog the claims run ahead of the settles: a claim that
        // settled rows would walk past them in the index once more (its
        // snapshot still sees them), so they are deleted on their own
        // there, and seen dead by the claim after.
        let defer = (!self.backlog).then_some(&mut self.settled);
        let (_, failed) = self
            .relay
            .settle(self.leader, batch, confirms, &mut self.held_back, defer)
            .await?;
        // No claim just because a batch came back: `claim_due` is still
        // set if the last claim was full, and commits since then have
        // notified. Under a trickle this halves the claims (each event used
        // to cost a second, empty one).
        if failed > 0 || !self.held_back.is_empty() {
            self.claim_due = true;
            self.pause_after_failure(shutdown).await
        } else {
            self.failures.reset();
            // Busy: writers may not notify, so every batch that comes back
            // is followed by a claim.
            self.claim_due |= self.wake.busy();
            Ok(())
        }
    }

    /// Settles everything in flight before anything is claimed again, so a
    /// row to retry is never republished while a later row of its subject
    /// is still on its way: the bus keeps each subject's order. Then waits
    /// out the failure backoff (or `shutdown`).
    async fn pause_after_failure(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        self.settle_all().await?;
        self.held_back.clear();
        let delay = self.failures.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {}
        }
        Ok(())
    }

    /// Nothing in flight and nothing claimed: the wake-up handshake decides
    /// whether a notification is sure to come. Then sleeps on `LISTEN` (or
    /// polls) unless a last claim is due at once; a claim is due after.
    pub(super) async fn idle(&mut self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let sleep = match self.relay.db_timeout(self.wake.idle(self.leader)).await? {
            Idle::ClaimAgain => {
                self.claim_due = true;
                return Ok(());
            }
            Idle::Listen => self.relay.config.poll_interval,
            Idle::Poll(delay) => delay,
        };
        tokio::select! {
            n = self.listener.recv() => { n?; }
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.cancelled() => {}
        }
        self.claim_due = true;
        Ok(())
    }

    /// Ends the session cleanly: every batch in flight is confirmed and
    /// settled first, then the channel is closed.
    pub(super) async fn stop(mut self) -> Result<(), RelayError> {
        self.settle_all().await?;
        // Closed here, before the connection: a channel dropped while its
        // connection closes makes lapin log a spurious "invalid channel
        // state: Closing" error.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.publisher
                .channel()
                .close(200, ("relay stopping").into()),
        )
        .await;
        Ok(())
    }

    /// Settles the deferred rows, then awaits and settles every batch in
    /// flight, oldest first.
    async fn settle_all(&mut self) -> Result<(), RelayError> {
        self.flush().await?;
        while let Some(batch) = self.in_flight.pop_front() {
            self.relay
                .await_and_settle(self.leader, batch, &mut self.held_back)
                .await?;
        }
        Ok(())
    }

    /// Rows the in-flight bound still has room for.
    fn free_rows(&self) -> usize {
        let in_flight: usize = self.in_flight.iter().map(|b| b.rows.len()).sum();
        self.relay.config.max_in_flight.saturating_sub(in_flight)
    }

    /// Whether another batch may go out before the oldest is confirmed.
    fn has_room(&self) -> bool {
        self.in_flight.len() < self.depth && self.free_rows() > 0
    }
}
