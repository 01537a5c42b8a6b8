//! The at-least-once side: what a destination claimed from the outbox and
//! what became of it. An event leaves the outbox only once Kafka has it
//! (deleted with its group when the group is whole); a failed one stays,
//! with its error, for the next claim; poison goes to outbox.dead_letter.

use super::destination::{Destination, Mode};
use super::flight::{Group, IdMap};
use super::in_transaction;
use crate::config;
use crate::status;
use crate::store;
use std::time::Instant;

use super::txn::Txn;

/// At-least-once batches a destination may have in flight at once.
const PIPELINE: usize = 3;
/// A destination with a producing thread claims its next batch only while
/// the thread holds fewer bytes of messages than this not yet produced.
const PIPE_PENDING_MAX: usize = 16 << 20;

#[derive(Default)]
pub(super) struct Outbox {
    /// Groups (outbox rows holding several events) being delivered, by id.
    pub groups: IdMap<Group>,
    pub outcomes: Outcomes,
    pub cursor: Cursor,
    /// A broker refused a batch as poison: send one event at a time up to this
    /// event id, so only the culprit goes to the dead letters.
    pub isolate_until: i64,
    /// Events in flight when the last batch was produced, and the highest
    /// event id in flight since the pipeline was last empty.
    pub batch_len: usize,
    pub batch_last: i64,
    /// Some event of the batch in flight failed.
    pub batch_failed: bool,
    pub txn: Txn,
}

/// Outcomes waiting to be recorded in the outbox.
#[derive(Default)]
pub(super) struct Outcomes {
    /// Single events Kafka has.
    acked: Vec<i64>,
    /// (event, its group or 0, error)
    failed: Vec<(i64, i64, String)>,
    /// Events Kafka will never take, bound for outbox.dead_letter, with
    /// their group (or 0).
    pub poisoned: Vec<(i64, i64, String)>,
    /// Groups Kafka has whole, and how many events they hold (not listed in
    /// `acked`: the outbox deletes a group by its own id).
    whole: Vec<i64>,
    whole_events: usize,
}

impl Outcomes {
    pub fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    pub fn waiting(&self) -> bool {
        !(self.acked.is_empty() && self.whole.is_empty() && self.failed.is_empty() && self.poisoned.is_empty())
    }
}

/// Where the next claim starts.
pub(super) struct Cursor {
    /// Pipelined claims: the highest event id claimed, and the transactions
    /// in progress when it was claimed (they alone may still commit events
    /// numbered below it). None: the next claim scans from the start.
    pub claimed_up_to: i64,
    pub watch: Option<Vec<u64>>,
    /// When a claim last scanned from the start (which finds events put back
    /// with old numbers, e.g. by outbox.retry_dead_letters).
    pub full_scan_at: Option<Instant>,
    /// Events per outbox row in the last claim (groups hold several).
    pub events_per_row: f64,
}

impl Default for Cursor {
    fn default() -> Cursor {
        Cursor { claimed_up_to: 0, watch: None, full_scan_at: None, events_per_row: 1.0 }
    }
}

impl Outbox {
    /// Events that Kafka has but the outbox still holds (a transaction's,
    /// a group's not yet whole).
    pub fn waiting(&self) -> usize {
        let in_groups: usize = self.groups.values().map(|g| g.acked.len()).sum();
        self.txn.held.len() + in_groups
    }

    /// An event of this group (0: none) has its delivery report.
    pub fn reported(&mut self, group: i64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.outstanding = g.outstanding.saturating_sub(1);
        }
    }

    /// This group (0: none) will not be acknowledged whole.
    pub fn break_group(&mut self, group: i64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.broken = true;
        }
    }

    /// Kafka has the event: acknowledged now, or with the rest of its group.
    pub fn delivered(&mut self, id: i64, group: i64) {
        if group == 0 {
            self.outcomes.acked.push(id);
            return;
        }
        // A group no longer tracked is split rather than trusted whole.
        let g = self.groups.entry(group).or_insert_with(|| Group { broken: true, ..Group::default() });
        g.acked.push(id);
        if !g.broken && g.acked.len() == g.len {
            let g = self.groups.remove(&group).expect("looked up above");
            self.outcomes.whole_events += g.acked.len();
            self.outcomes.whole.push(group);
        }
    }

    /// The event failed; it stays in the outbox for the next attempt.
    pub fn fail(&mut self, id: i64, group: i64, error: String) {
        self.break_group(group);
        self.outcomes.failed.push((id, group, error));
    }

    /// Kafka will never take the event: bound for outbox.dead_letter.
    pub fn poison(&mut self, id: i64, group: i64, error: String) {
        self.break_group(group);
        self.outcomes.poisoned.push((id, group, error));
    }

    /// These events (event, group), and those a transaction holds, failed.
    pub fn fail_all(&mut self, in_flight: Vec<(i64, i64)>, error: &str) {
        let held = std::mem::take(&mut self.txn.held);
        for (id, group) in in_flight.into_iter().chain(held) {
            self.reported(group);
            self.fail(id, group, error.to_string());
        }
    }

    /// A delivery report: Kafka has the event (a transaction's only once it commits).
    pub fn on_delivered(&mut self, id: i64, group: i64) {
        if self.txn.open {
            // Still outstanding: the transaction may yet abort.
            self.txn.held.push((id, group));
        } else {
            self.reported(group);
            self.delivered(id, group);
        }
    }

    /// A delivery report: the event failed, `poison` if Kafka will never
    /// take it as it is, `refused` if librdkafka refused this very event.
    pub fn on_failed(&mut self, id: i64, group: i64, error: String, poison: bool, refused: bool) {
        self.reported(group);
        if poison && (refused || self.batch_len == 1) {
            // Refused by librdkafka, or sent alone: it is the culprit.
            self.poison(id, group, error);
        } else if poison {
            // Somewhere in this batch: retry one at a time.
            self.isolate_until = self.isolate_until.max(self.batch_last);
            self.fail(id, group, error);
        } else {
            self.fail(id, group, error);
        }
    }

    /// Take the outcomes to record. A broken group's delivered events are
    /// recorded by splitting it into single events without them; the group
    /// is forgotten once nothing of it is in flight.
    fn take_outcomes(&mut self) -> Option<Recorded> {
        let (mut split, mut split_acked) = (Vec::new(), Vec::new());
        self.groups.retain(|id, g| {
            if g.broken && !g.acked.is_empty() {
                split.push(*id);
                split_acked.append(&mut g.acked);
            }
            !(g.broken && g.outstanding == 0)
        });
        if !self.outcomes.waiting() && split.is_empty() {
            return None;
        }
        let mut o = std::mem::take(&mut self.outcomes);
        o.acked.extend_from_slice(&split_acked);
        Some(Recorded { split, split_acked, o })
    }
}

/// Outcomes taken for recording, and the groups split for them.
struct Recorded {
    split: Vec<i64>,
    split_acked: Vec<i64>,
    o: Outcomes,
}

impl Recorded {
    fn first_error(&self) -> String {
        self.o.failed.first().map(|(_, _, e)| e.clone()).unwrap_or_default()
    }

    /// Write them: acknowledgements and failures in one transaction, dead
    /// letters in another (a dead letter that cannot be recorded must not
    /// undo the acknowledgements). Whether each committed. `retain`: the
    /// destination keeps what was delivered (outbox.delivered), so a split
    /// group's delivered events are split out too, to be kept with the rest.
    fn store(&self, id: &str, retain: bool) -> (bool, bool) {
        let failed_ids: Vec<i64> = self.o.failed.iter().map(|(id, _, _)| *id).collect();
        let failed_groups: Vec<i64> = self.o.failed.iter().map(|(_, group, _)| *group).filter(|g| *g != 0).collect();
        let done = in_transaction("recording deliveries", || -> pgrx::spi::SpiResult<()> {
            store::split(id, &self.split, if retain { &[] } else { &self.split_acked })?;
            store::acknowledge(id, &self.o.acked, &self.o.whole, retain)?;
            store::record_failure(id, &failed_ids, &failed_groups, &self.first_error())
        });
        let moved = self.o.poisoned.is_empty()
            || matches!(
                in_transaction("moving events to outbox.dead_letter", || -> pgrx::spi::SpiResult<()> {
                    self.o.poisoned.iter().try_for_each(|(ev, group, error)| store::dead_letter(id, *ev, *group, error))
                }),
                Some(Ok(()))
            );
        (matches!(done, Some(Ok(()))), moved)
    }
}

impl Destination {
    /// An at-least-once destination may claim its next batch: while earlier
    /// batches are in flight too, up to `PIPELINE` of them (not while a
    /// transaction or the search for a poison event needs one at a time).
    pub fn ready(&self, now: Instant) -> bool {
        let Mode::AtLeastOnce(o) = &self.mode else { return false };
        let room = self.flights.is_empty()
            || (!self.params.transactional
                && o.isolate_until == 0
                && self.flights.len() < (PIPELINE - 1) * config::BATCH_SIZE.get() as usize);
        self.retiring_until.is_none()
            && room
            // Messages the producing thread has yet to produce (behind a full
            // librdkafka buffer) are not followed by more.
            && self.link.pipe.as_ref().is_none_or(|p| p.pending() < PIPE_PENDING_MAX)
            && !o.txn.open
            && o.txn.held.is_empty()
            && !o.outcomes.waiting()
            // What a broken group still has in flight decides what of it is
            // claimed again, before anything after it.
            && !o.groups.values().any(|g| g.broken && g.outstanding > 0)
            && self.health.may_try(now)
    }

    /// Delete what Kafka acknowledged, keep failed events with their error,
    /// move poison to the dead letters.
    pub(super) fn record_in_outbox(&mut self) {
        let Mode::AtLeastOnce(o) = &mut self.mode else { return };
        let Some(r) = o.take_outcomes() else { return };
        if !r.o.failed.is_empty() || !r.o.poisoned.is_empty() {
            // Events left behind: the next claim scans from the start.
            o.cursor.watch = None;
        }
        let (recorded, moved) = r.store(&self.id, self.retain);
        if !moved {
            self.health.back_off();
        }
        if !recorded {
            // Not recorded: the events are still in the outbox and will be
            // sent again (a duplicate, never a loss).
            o.cursor.watch = None;
            self.health.back_off();
            return;
        }
        if !r.o.failed.is_empty() {
            o.batch_failed = true;
        }
        let batch_failed = o.batch_failed;
        let delivered = (r.o.acked.len() + r.o.whole_events) as u64;
        let failed = (r.o.failed.len() + r.o.poisoned.len()) as u64;
        status::record_outcome(self.slot, delivered, failed, self.in_process());
        if let Some((_, _, error)) = r.o.poisoned.first() {
            self.health.error(&format!("{} event(s) moved to outbox.dead_letter: {error}", r.o.poisoned.len()));
        }
        if !r.o.failed.is_empty() {
            self.health.error(&format!("delivery of {} event(s) failed: {}", r.o.failed.len(), r.first_error()));
            self.health.back_off();
        } else if !batch_failed {
            // What was claimed since the last failure went through: the
            // next claim need not wait.
            self.health.recovered();
        }
    }
}
