//! Acknowledgements of one consumer channel, sent with `multiple`.
//!
//! Lanes settle deliveries out of order: a channel's deliveries are spread
//! over the lanes by subject, so a lane's batch holds tags 3, 8 and 11
//! while tags 4 to 7 are still with another lane. An ack with `multiple`
//! acknowledges *every* outstanding tag up to its own, so it may only name
//! a tag below which everything is settled (committed, or forwarded to a
//! retry or dead-letter queue). [`Acks`] keeps that floor: each settled
//! batch adds its tags, and when the floor moves, one `basic.ack` with
//! `multiple` covers all of it.
//!
//! Why: a quorum queue turns each ack frame into a settle command in its
//! Raft log, so one ack per batch instead of one per message is work the
//! broker does not do. A tag held back by a slow lane holds back the acks
//! of later tags, never their handling; they stay unacknowledged (and
//! count against the prefetch) until it is settled, and if the channel
//! dies first the broker redelivers them and the inbox absorbs the copies.

use std::collections::BTreeSet;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::Mutex;

/// The settled tags of a channel and the floor below which all are acked.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// Every tag up to this one is settled and acknowledged.
    floor: u64,
    /// Settled tags above `floor + 1`, waiting for the gap below them.
    settled: BTreeSet<u64>,
}

impl Window {
    /// Adds settled tags; returns the new floor when it moved, which is the
    /// tag to acknowledge with `multiple`.
    pub(crate) fn settle(&mut self, tags: impl IntoIterator<Item = u64>) -> Option<u64> {
        self.settled
            .extend(tags.into_iter().filter(|&t| t > self.floor));
        let before = self.floor;
        while self.settled.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        (self.floor > before).then_some(self.floor)
    }

    /// Tags settled but not acknowledged yet.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.settled.len()
    }
}

/// Acknowledges the deliveries of one channel, in `multiple` steps.
pub(crate) struct Acks {
    channel: Channel,
    window: Mutex<Window>,
}

impl Acks {
    /// The acks of `channel`, whose delivery tags start at 1.
    pub(crate) fn new(channel: Channel) -> Self {
        Acks {
            channel,
            window: Mutex::new(Window::default()),
        }
    }

    /// Every delivery tag up to this one is settled and acknowledged: a
    /// partition handed over waits until it covers the last tag delivered.
    pub(crate) async fn floor(&self) -> u64 {
        self.window.lock().await.floor
    }

    /// Records `tags` as settled and acknowledges whatever that makes
    /// contiguous. The ack is written under the lock: two lanes' acks
    /// crossing on the wire would acknowledge a tag twice, which the broker
    /// answers by closing the channel.
    pub(crate) async fn settle(
        &self,
        tags: impl IntoIterator<Item = u64>,
    ) -> Result<(), lapin::Error> {
        let mut window = self.window.lock().await;
        if let Some(upto) = window.settle(tags) {
            self.channel
                .basic_ack(upto, BasicAckOptions { multiple: true })
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contiguous_run_is_acknowledged_up_to_its_last_tag() {
        let mut w = Window::default();
        assert_eq!(w.settle([1, 2, 3]), Some(3));
        assert_eq!(w.settle([4]), Some(4));
        assert_eq!(w.waiting(), 0);
    }

    #[test]
    fn tags_above_a_gap_wait_until_the_gap_is_settled() {
        let mut w = Window::default();
        // Lane A settles 1, 3, 5; lane B still holds 2 and 4.
        assert_eq!(w.settle([1, 3, 5]), Some(1));
        assert_eq!(w.waiting(), 2);
        assert_eq!(w.settle([4]), None);
        // 2 arrives: 2..5 are all settled now.
        assert_eq!(w.settle([2]), Some(5));
        assert_eq!(w.waiting(), 0);
    }

    #[test]
    fn nothing_is_acknowledged_while_the_first_tag_is_out() {
        let mut w = Window::default();
        assert_eq!(w.settle([2, 3]), None);
        assert_eq!(w.settle([1]), Some(3));
    }

    #[test]
    fn a_tag_settled_twice_is_not_acknowledged_twice() {
        let mut w = Window::default();
        assert_eq!(w.settle([1, 2]), Some(2));
        assert_eq!(w.settle([2]), None);
        assert_eq!(w.settle([1, 3]), Some(3));
        assert_eq!(w.waiting(), 0);
    }
}
