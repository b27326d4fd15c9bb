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
}

impl RelayStats {
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
