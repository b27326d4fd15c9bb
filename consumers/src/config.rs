//! The tuning of a subscription, shared by the session that consumes and
//! the lanes that settle deliveries.

use std::time::Duration;

use crate::retry::RetryPolicy;

/// Tuning of a subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    /// Most unacknowledged deliveries the broker sends this consumer.
    pub prefetch: u16,
    /// Deliveries handled concurrently (one per lane; a subject keeps its lane).
    pub lanes: usize,
    /// Most deliveries of a lane applied in one transaction.
    pub batch_size: usize,
    /// When failing and early events are tried again, and when given up.
    pub retry: RetryPolicy,
    /// Longest a handler may run on one event (a batch handler: on one run)
    /// before it counts as a transient failure.
    pub handler_timeout: Duration,
    /// Largest body accepted; larger ones are dead-lettered unread.
    pub max_body: usize,
    /// Inbox rows, and the outcome records `warren trace` reads
    /// ([`crate::trail`]), older than this are pruned (every 5 minutes).
    /// It bounds how long ago a story can be traced, and must exceed the
    /// longest time a redelivery can take (retries plus a dead-letter
    /// redrive), or a late duplicate would apply twice.
    pub inbox_retention: Duration,
    /// Whether to publish outcomes on the live feed for `warren tail`.
    pub live_feed: bool,
    /// 0 (the default): one work queue, `<ns>.<service>`, whose consumers
    /// compete, with per-subject order kept by deferring early events.
    /// P ≥ 1: P ordered partitions, `<ns>.<service>.p<i>`, each with one
    /// active consumer at a time, shared out among the service's
    /// processes (see [`crate::partitions`]).
    pub partitions: u16,
    /// Test-only fault injection: stop dead at this point, as a process
    /// that is about to be killed would.
    #[cfg(feature = "testkit")]
    pub crash_at: Option<CrashPoint>,
}

/// Where a test makes a consumer stop dead (feature `testkit`).
#[cfg(feature = "testkit")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The transaction committed, the ack not sent: the lane never goes
    /// further (it does not return an error, which would let the session
    /// clean up), so the test can kill the process with the delivery
    /// still unacknowledged.
    AfterCommit,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            prefetch: 64,
            lanes: 8,
            batch_size: 64,
            retry: RetryPolicy::default(),
            handler_timeout: Duration::from_secs(10),
            max_body: events::DEFAULT_MAX_BODY,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            live_feed: true,
            partitions: 0,
            #[cfg(feature = "testkit")]
            crash_at: None,
        }
    }
}
