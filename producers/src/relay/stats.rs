//! The relay's counters, shared with metrics and the benchmark: events
//! settled and failed, whether it is the active relay, and the confirm
//! round trips.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Counters of a relay, shared with metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events confirmed and marked.
    pub published: AtomicU64,
    /// Events nacked, returned or unconfirmed (they are retried).
    pub failed: AtomicU64,
    /// Whether this relay holds the lock.
    pub active: AtomicBool,
    /// Batches whose confirms came back (settled or not).
    pub confirmed_batches: AtomicU64,
    /// Events in those batches.
    pub confirmed_events: AtomicU64,
    /// Their total wait, in microseconds, from their publishes written to
    /// the relay holding all their confirms: mostly the broker's share of
    /// an event's trip (for a quorum queue, its log's fsync); in a backlog
    /// also the claims the relay makes meanwhile.
    pub confirm_wait_us: AtomicU64,
    /// The same waits as a histogram: batches per bucket of
    /// [`CONFIRM_BUCKETS`] (not cumulative; the last slot counts those
    /// above every bound).
    pub confirm_wait_buckets: [AtomicU64; CONFIRM_BUCKETS.len() + 1],
}

/// Upper bounds of the confirm-wait histogram, in seconds: a quorum queue
/// confirms after its log's fsync (a millisecond or a few on a local
/// disk); a busy or failing-over broker, seconds.
pub const CONFIRM_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl RelayStats {
    /// Records one batch of `events` whose confirms all came back
    /// `waited` after its publishes were written.
    pub fn record_confirms(&self, waited: Duration, events: usize) {
        self.confirm_wait_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.confirmed_batches.fetch_add(1, Ordering::Relaxed);
        self.confirmed_events
            .fetch_add(events as u64, Ordering::Relaxed);
        let secs = waited.as_secs_f64();
        let slot = CONFIRM_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(CONFIRM_BUCKETS.len());
        self.confirm_wait_buckets[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The confirm-wait histogram now: (upper bound s, batches in that
    /// bucket alone), `f64::INFINITY` last.
    pub fn confirm_histogram(&self) -> Vec<(f64, u64)> {
        CONFIRM_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.confirm_wait_buckets)
            .map(|(le, n)| (le, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The confirm counters now; two readings' difference describes the
    /// batches in between.
    pub fn confirms(&self) -> Confirms {
        Confirms {
            batches: self.confirmed_batches.load(Ordering::Relaxed),
            events: self.confirmed_events.load(Ordering::Relaxed),
            wait_us: self.confirm_wait_us.load(Ordering::Relaxed),
        }
    }
}

/// A reading of a relay's confirm counters (see [`RelayStats::confirms`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confirms {
    /// Batches confirmed.
    pub batches: u64,
    /// Events in them.
    pub events: u64,
    /// Total publish-to-confirms wait, microseconds.
    pub wait_us: u64,
}

impl Confirms {
    /// What happened between `earlier` and this reading.
    pub fn since(self, earlier: Confirms) -> Confirms {
        Confirms {
            batches: self.batches.saturating_sub(earlier.batches),
            events: self.events.saturating_sub(earlier.events),
            wait_us: self.wait_us.saturating_sub(earlier.wait_us),
        }
    }

    /// Mean wait of a batch for its confirms; `None` without batches.
    pub fn mean_wait(&self) -> Option<Duration> {
        (self.batches > 0).then(|| Duration::from_micros(self.wait_us / self.batches))
    }

    /// Mean events per batch; `None` without batches.
    pub fn events_per_batch(&self) -> Option<f64> {
        (self.batches > 0).then(|| self.events as f64 / self.batches as f64)
    }
}
