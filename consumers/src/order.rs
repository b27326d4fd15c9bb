//! Per-subject order: which events of a batch apply now, which are
//! duplicates, early or stale, and in which runs their handlers get them.
//! Pure functions over the inbox's admissions; the transaction around them
//! is in [`crate::delivery`].
//!
//! Events of one (source, subject) apply in `sequence` order. Inside a
//! process, a subject always maps to the same lane, so deliveries of one
//! subject are handled one after another in queue order. Across processes
//! and after retries, the progress row decides: its row lock serialises
//! handlers of the subject, and an event whose predecessor has not been
//! applied is *deferred* (sent through the short retry queue) instead of
//! applied. Limits: a predecessor that never comes (dead-lettered, or
//! never published) holds its successors back `max_deferrals` times (see
//! [`crate::retry`]), then they are dead-lettered with reason
//! `sequence_gap`; redriving the predecessor first and then them restores
//! the order. An event at or below the applied sequence with a new id is
//! dead-lettered as `stale_sequence`, never applied out of order.

use std::collections::{HashMap, HashSet};

use events::Envelope;
use uuid::Uuid;

use crate::inbox::Admission;

/// What the transaction did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Its handler ran and committed.
    Handled,
    /// No handler for its type; only the progress moved.
    Skipped,
    /// Applied before (the inbox knows its id, or the batch holds it twice).
    Duplicate,
    /// Its predecessor is not applied yet: `expected` is the next sequence.
    Early { expected: i64 },
    /// At or below the applied sequence `last`, under an id never seen.
    Stale { last: i64 },
}

/// Each event's fate in a batch, as far as the admission tells it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per event: decided, or `None` while it waits for its handler.
    fates: Vec<Option<Applied>>,
    /// The events to apply: indexes into the batch, in delivery order.
    pub candidates: Vec<usize>,
    /// Ids of the events marked stale: the inbox is asked whether it holds
    /// them (then they are duplicates).
    pub behind: Vec<Uuid>,
}

/// The plan of a batch (`events` in delivery order) from the inbox's
/// `admissions`. An admitted event whose id an earlier event of this batch
/// already took is a duplicate, whatever the inbox said.
pub(crate) fn plan(events: &[&Envelope], admissions: &[Admission]) -> Plan {
    let mut plan = Plan {
        fates: Vec::with_capacity(events.len()),
        candidates: Vec::new(),
        behind: Vec::new(),
    };
    let mut taken: HashSet<Uuid> = HashSet::new();
    for (i, (e, a)) in events.iter().zip(admissions).enumerate() {
        let fate = if a.admitted {
            if a.new && taken.insert(e.id) {
                plan.candidates.push(i);
                None
            } else {
                Some(Applied::Duplicate)
            }
        } else if e.sequence <= a.last {
            if taken.contains(&e.id) {
                Some(Applied::Duplicate)
            } else {
                plan.behind.push(e.id);
                Some(Applied::Stale { last: a.last })
            }
        } else {
            Some(Applied::Early {
                expected: a.last + 1,
            })
        };
        plan.fates.push(fate);
    }
    plan
}

impl Plan {
    /// Turns the stale events whose ids are in `seen` (the inbox holds
    /// them: another consumer applied a copy) into duplicates.
    pub(crate) fn mark_seen(&mut self, events: &[&Envelope], seen: &HashSet<Uuid>) {
        for (e, fate) in events.iter().zip(self.fates.iter_mut()) {
            if matches!(fate, Some(Applied::Stale { .. })) && seen.contains(&e.id) {
                *fate = Some(Applied::Duplicate);
            }
        }
    }

    /// Records what the handler of `run` did.
    pub(crate) fn ran(&mut self, run: &Run, outcome: Applied) {
        for &i in &run.events {
            self.fates[i] = Some(outcome);
        }
    }

    /// Each event's fate; a candidate no run reached counts as a duplicate
    /// (cannot happen: every candidate is in a run).
    pub(crate) fn fates(self) -> Vec<Applied> {
        self.fates
            .into_iter()
            .map(|a| a.unwrap_or(Applied::Duplicate))
            .collect()
    }
}

/// Events given to one handler call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// Indexes into the batch, in the order they apply.
    pub events: Vec<usize>,
    /// An event of this service's own source (come back, or replayed from
    /// elsewhere): it goes alone, after the outbox's sequence counter is
    /// kept past it.
    pub own: bool,
}

/// The runs handlers get the `candidates` in: consecutive events (in
/// stream order) of one type, so a batch handler writes a run in one
/// statement; an event from `own_source` goes alone.
pub(crate) fn runs(events: &[&Envelope], candidates: &[usize], own_source: &str) -> Vec<Run> {
    let order = in_stream_order(events, candidates);
    let mut runs = Vec::new();
    let mut rest = &order[..];
    while let Some(&first) = rest.first() {
        let head = events[first];
        let own = head.source == own_source;
        let len = if own {
            1
        } else {
            rest.iter()
                .take_while(|&&i| {
                    events[i].event_type == head.event_type && events[i].source != own_source
                })
                .count()
        };
        let (run, tail) = rest.split_at(len);
        rest = tail;
        runs.push(Run {
            events: run.to_vec(),
            own,
        });
    }
    runs
}

/// The order to run the admitted events (`candidates`, indexes into
/// `events` in delivery order) in: delivery order, except that within a
/// stream the sequences go up. A batch may bring 7 before 6; both are
/// admitted, and 6 must apply first; other streams keep their places.
fn in_stream_order(events: &[&Envelope], candidates: &[usize]) -> Vec<usize> {
    let mut by_stream: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for &i in candidates {
        by_stream
            .entry((events[i].source.as_str(), events[i].subject.as_str()))
            .or_default()
            .push(i);
    }
    let mut order = candidates.to_vec();
    for slots in by_stream.values() {
        let mut sorted = slots.clone();
        sorted.sort_by_key(|&i| events[i].sequence);
        // `slots` are in delivery order, so are the places in `order`.
        for (slot, i) in slots.iter().zip(sorted) {
            if let Ok(place) = candidates.binary_search(slot) {
                order[place] = i;
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Noted {}
    impl events::EventData for Noted {
        const TYPE: &'static str = "thing.noted";
        const VERSION: u32 = 1;
        const SOURCE: &'static str = "t";
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Other {}
    impl events::EventData for Other {
        const TYPE: &'static str = "thing.other";
        const VERSION: u32 = 1;
        const SOURCE: &'static str = "t";
    }

    fn event(subject: &str, sequence: i64) -> Envelope {
        let mut e = Envelope::new("t", subject.to_owned(), &Noted {});
        e.sequence = sequence;
        e
    }

    fn admission(last: i64, admitted: bool, new: bool) -> Admission {
        Admission {
            last,
            admitted,
            new,
        }
    }

    #[test]
    fn in_stream_order_sorts_sequences_within_a_stream_and_keeps_other_places() {
        let evs = [
            event("a", 7),
            event("b", 1),
            event("a", 6),
            event("c", 3),
            event("a", 8),
        ];
        let refs: Vec<&Envelope> = evs.iter().collect();
        // Every event admitted: a's slots 0, 2, 4 take 6, 7, 8 (indexes
        // 2, 0, 4); b and c stay where they were.
        assert_eq!(
            in_stream_order(&refs, &[0, 1, 2, 3, 4]),
            vec![2, 1, 0, 3, 4]
        );
        // Only some admitted.
        assert_eq!(in_stream_order(&refs, &[0, 2, 3]), vec![2, 0, 3]);
        assert!(in_stream_order(&refs, &[]).is_empty());
    }

    #[test]
    fn the_plan_tells_new_duplicate_stale_and_early_events_apart() {
        let a1 = event("a", 1);
        let copy = a1.clone();
        let (stale, early) = (event("b", 2), event("c", 5));
        let refs = [&a1, &copy, &stale, &early];
        let mut p = plan(
            &refs,
            &[
                admission(1, true, true),
                // The same id again in the batch: a duplicate, whatever
                // the inbox said.
                admission(1, true, true),
                admission(3, false, false),
                admission(3, false, false),
            ],
        );
        assert_eq!(p.candidates, vec![0]);
        assert_eq!(p.behind, vec![stale.id]);
        p.ran(
            &Run {
                events: vec![0],
                own: false,
            },
            Applied::Handled,
        );
        assert_eq!(
            p.fates(),
            vec![
                Applied::Handled,
                Applied::Duplicate,
                Applied::Stale { last: 3 },
                Applied::Early { expected: 4 },
            ]
        );
    }

    #[test]
    fn a_stale_event_the_inbox_holds_is_a_duplicate() {
        let stale = event("b", 2);
        let refs = [&stale];
        let mut p = plan(&refs, &[admission(3, false, false)]);
        p.mark_seen(&refs, &HashSet::from([stale.id]));
        assert_eq!(p.fates(), vec![Applied::Duplicate]);
    }

    #[test]
    fn runs_group_consecutive_events_of_a_type_and_own_events_go_alone() {
        let mut own = event("c", 1);
        own.source = "/warren/me".into();
        let other = {
            let mut e = Envelope::new("t", "d".to_owned(), &Other {});
            e.sequence = 1;
            e
        };
        let (a, b, e) = (event("a", 1), event("b", 1), event("e", 1));
        let refs = [&a, &b, &own, &other, &e];
        let got = runs(&refs, &[0, 1, 2, 3, 4], "/warren/me");
        let want = [
            (vec![0, 1], false),
            (vec![2], true),
            (vec![3], false),
            (vec![4], false),
        ];
        assert_eq!(
            got,
            Vec::from(want.map(|(events, own)| Run { events, own }))
        );
    }
}
