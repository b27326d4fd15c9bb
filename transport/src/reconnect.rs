//! The reconnect loop every long-running worker (relay, eager publisher,
//! subscription) runs its sessions in: a session ends with `Ok` when it is
//! done (shut down) or with an error, after which the worker waits a
//! capped exponential backoff and starts a new one, unless shut down
//! meanwhile. A session resets the backoff once it is up (see
//! [`Reconnect::backoff`]), so a long-lived session that fails starts over
//! from the initial delay.
//!
//! ```no_run
//! # async fn session(_b: &mut warren_transport::Backoff) -> Result<(), std::io::Error> { Ok(()) }
//! # async fn run(shutdown: tokio_util::sync::CancellationToken) {
//! use std::time::Duration;
//! use warren_transport::Reconnect;
//!
//! let mut reconnect = Reconnect::new("relay", "orders", Duration::from_millis(100), Duration::from_secs(10));
//! while reconnect.should_start(&shutdown) {
//!     let result = session(reconnect.backoff()).await;
//!     if !reconnect.ended(result, &shutdown).await {
//!         break;
//!     }
//! }
//! # }
//! ```

use std::fmt::Display;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Backoff;

/// The state of one worker's reconnect loop.
#[derive(Debug)]
pub struct Reconnect {
    /// What reconnects (`relay`, `consumer`, …), for the log line.
    worker: &'static str,
    /// Whose it is, for the log line.
    service: String,
    backoff: Backoff,
    /// Whether a first session starts even when already shut down (the
    /// eager publisher must hand over what it was given).
    first_even_if_stopped: bool,
    started: bool,
}

impl Reconnect {
    /// A loop whose delays double from `initial` up to `max`.
    pub fn new(
        worker: &'static str,
        service: impl Into<String>,
        initial: Duration,
        max: Duration,
    ) -> Self {
        Reconnect {
            worker,
            service: service.into(),
            backoff: Backoff::new(initial, max),
            first_even_if_stopped: false,
            started: false,
        }
    }

    /// Runs the first session even when shut down already (then none
    /// after a failure).
    pub fn first_even_if_stopped(mut self) -> Self {
        self.first_even_if_stopped = true;
        self
    }

    /// Whether to start a (new) session now.
    pub fn should_start(&mut self, shutdown: &CancellationToken) -> bool {
        let first = !self.started;
        self.started = true;
        !shutdown.is_cancelled() || (first && self.first_even_if_stopped)
    }

    /// The backoff, for the session to reset once it is up.
    pub fn backoff(&mut self) -> &mut Backoff {
        &mut self.backoff
    }

    /// After a session: `false` when the loop is over (the session ended
    /// cleanly, or shutdown came), else `true` once the backoff delay has
    /// passed. Logs why it reconnects.
    pub async fn ended<E: Display>(
        &mut self,
        result: Result<(), E>,
        shutdown: &CancellationToken,
    ) -> bool {
        let error = match result {
            Ok(()) => return false,
            Err(e) => e,
        };
        let service = self.service.as_str();
        let worker = self.worker;
        if shutdown.is_cancelled() {
            tracing::warn!(service, worker, error = %error, "stopped on an error");
            return false;
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(service, worker, error = %error, retry_in = ?delay, "interrupted; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failed_session_waits_and_a_clean_one_or_shutdown_ends_the_loop() {
        let shutdown = CancellationToken::new();
        let mut r = Reconnect::new("test", "s", Duration::from_secs(1), Duration::from_secs(8));
        assert!(r.should_start(&shutdown));
        let before = tokio::time::Instant::now();
        assert!(r.ended(Err("boom"), &shutdown).await);
        assert!(before.elapsed() >= Duration::from_millis(800));
        assert!(!r.ended(Ok::<(), &str>(()), &shutdown).await);
        shutdown.cancel();
        assert!(!r.should_start(&shutdown));
        assert!(!r.ended(Err("boom"), &shutdown).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_session_may_run_after_shutdown_but_no_second() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut r = Reconnect::new("test", "s", Duration::from_secs(1), Duration::from_secs(8))
            .first_even_if_stopped();
        assert!(r.should_start(&shutdown));
        assert!(!r.should_start(&shutdown));
    }
}
