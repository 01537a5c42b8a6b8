//! The best-effort side: events writers handed to the shared queue
//! (`ring`) on commit are produced as they come; while librdkafka's buffer
//! is full they wait (as Java's send() blocks up to maxBlockMs), and what
//! fails is counted as lost, never retried.

use super::destination::{Destination, Mode};
use super::Worker;
use crate::kafka::{self, Refused};
use crate::ring;
use crate::status;
use crate::types;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Best-effort events (and bytes) taken from the shared queue per pass.
const PER_TURN: usize = 10_000;
const BYTES_PER_TURN: usize = 4 << 20;
/// Best-effort events one destination may hold back while librdkafka's
/// buffer is full.
const BLOCKED_MAX: usize = 100_000;
const BLOCKED_MAX_BYTES: usize = 64 << 20;

/// A best-effort destination's events waiting for buffer space and its
/// outcomes not yet counted in status.
#[derive(Default)]
pub(super) struct Memory {
    /// Events waiting for buffer space, with when they first did.
    blocked: VecDeque<(Instant, types::Event)>,
    blocked_bytes: usize,
    pub delivered: u64,
    lost: u64,
    lost_reason: Option<String>,
}

impl Memory {
    pub fn lose(&mut self, reason: String) {
        self.lost += 1;
        self.lost_reason = Some(reason);
    }

    pub fn lose_many(&mut self, n: u64, reason: &str) {
        if n > 0 {
            self.lost += n;
            self.lost_reason = Some(reason.to_string());
        }
    }

    /// Drop what waits for buffer space, counted lost.
    fn lose_waiting(&mut self, reason: &str) {
        let n = self.blocked.len() as u64;
        self.blocked.clear();
        self.blocked_bytes = 0;
        self.lose_many(n, reason);
    }

    /// Events waiting for buffer space.
    pub fn waiting(&self) -> usize {
        self.blocked.len()
    }

    pub fn outcomes_waiting(&self) -> bool {
        self.delivered != 0 || self.lost != 0
    }

    /// When the event waiting longest began to wait.
    pub fn oldest(&self) -> Option<Instant> {
        self.blocked.front().map(|(since, _)| *since)
    }

    fn pop(&mut self) -> Option<(Instant, types::Event)> {
        let (since, ev) = self.blocked.pop_front()?;
        self.blocked_bytes -= event_bytes(&ev);
        Some((since, ev))
    }

    /// Put an event back at the head of the wait (it was just taken from there).
    fn hold(&mut self, since: Instant, ev: types::Event) {
        self.blocked_bytes += event_bytes(&ev);
        self.blocked.push_front((since, ev));
    }

    /// Queue an event behind those waiting for buffer space, if there is room.
    fn wait_for_space(&mut self, ev: types::Event, max_block_ms: i64) {
        let bytes = event_bytes(&ev);
        if max_block_ms == 0 {
            self.lose("librdkafka's buffer is full (maxBlockMs is 0)".to_string());
        } else if self.blocked.len() >= BLOCKED_MAX || self.blocked_bytes + bytes > BLOCKED_MAX_BYTES {
            self.lose("librdkafka's buffer is full and too many events wait for it".to_string());
        } else {
            self.blocked_bytes += bytes;
            self.blocked.push_back((Instant::now(), ev));
        }
    }
}

/// Memory an event waiting in the worker takes, roughly.
fn event_bytes(ev: &types::Event) -> usize {
    128 + ev.table.len() + ev.key.as_ref().map_or(0, String::len) + ev.row.as_ref().map_or(0, String::len)
}

impl Destination {
    /// Send what waited for buffer space, in order; what waited longer than
    /// maxBlockMs is lost (Java's send() would have thrown). Without a
    /// producer (replaced meanwhile, backing off) they keep waiting.
    fn send_blocked(&mut self) {
        let max_block_ms = self.params.max_block_ms;
        if let Some(p) = &self.link.producer {
            kafka::serve(p);
        }
        while let Some((since, ev)) = self.memory().and_then(Memory::pop) {
            if since.elapsed() > Duration::from_millis(max_block_ms as u64) {
                let reason = format!("librdkafka's buffer stayed full for maxBlockMs ({max_block_ms} ms)");
                if let Some(m) = self.memory() {
                    m.lose(reason);
                }
                continue;
            }
            let result = if self.link.producer.is_some() { self.send(&ev) } else { Err(Refused::Full) };
            let Some(m) = self.memory() else { return };
            match result {
                Ok(()) => {}
                Err(Refused::Full) => {
                    m.hold(since, ev);
                    break;
                }
                Err(Refused::Poison(e) | Refused::Other(e)) => m.lose(format!("produce refused: {e}")),
            }
        }
    }

    /// Send one event, or hold it while the buffer is full.
    fn send_best_effort(&mut self, ev: types::Event) {
        let max_block_ms = self.params.max_block_ms;
        let Some(m) = self.memory() else { return };
        if m.waiting() > 0 {
            // Keep the order: behind those already waiting.
            m.wait_for_space(ev, max_block_ms);
            return;
        }
        let result = self.send(&ev);
        let Some(m) = self.memory() else { return };
        match result {
            Ok(()) => {}
            Err(Refused::Full) => m.wait_for_space(ev, max_block_ms),
            Err(Refused::Poison(e) | Refused::Other(e)) => m.lose(format!("produce refused: {e}")),
        }
    }

    /// Count delivered and lost events in status.
    pub(super) fn count_best_effort(&mut self) {
        let Some(m) = self.memory() else { return };
        if !m.outcomes_waiting() {
            return;
        }
        let (delivered, lost, reason) = (m.delivered, m.lost, m.lost_reason.take());
        m.delivered = 0;
        m.lost = 0;
        status::record_outcome(self.slot, delivered, 0, self.in_process());
        status::add_lost_slot(self.slot, lost);
        if let Some(reason) = reason {
            self.health.error(&format!("{lost} event(s) lost: {reason}"));
        }
    }
}

impl Worker {
    /// Produce what writers handed to the shared queue: one bounded batch per
    /// pass, so nothing else waits behind a busy queue.
    pub(super) fn drain_best_effort(&mut self) {
        self.send_blocked();
        let (records, left) = ring::pop(PER_TURN, BYTES_PER_TURN);
        if records.is_empty() {
            return;
        }
        self.busy = true;
        // Not while events wait for librdkafka's buffer: those wait for reports.
        self.more |= left && self.destinations.values().all(|d| d.mode.memory().is_none_or(|m| m.waiting() == 0));
        // The last table, interaction and timestamp, shared by the events that have them.
        let mut shared: [Option<Rc<str>>; 3] = [None, None, None];
        let mut reloaded = false;
        for record in records {
            let Some(ev) = ring::BestEffortEvent::decode(&record) else { continue };
            if !self.destinations.contains_key(&ev.destination_id) && !reloaded {
                // Created moments ago: look at the configuration once more.
                self.last_reload = None;
                self.maybe_reload();
                reloaded = true;
            }
            self.send_from_queue(ev, &mut shared);
        }
        self.take_reports();
        self.record_outcomes();
    }

    /// Send what waits for buffer space (delivery reports wake the worker,
    /// through the producer's pipe, when space frees up).
    fn send_blocked(&mut self) {
        let now = Instant::now();
        for d in self.destinations.values_mut().filter(|d| d.mode.memory().is_some_and(|m| m.waiting() > 0)) {
            if d.paused {
                // Not handed to librdkafka yet: lost, as what comes now.
                if let Some(m) = d.memory() {
                    m.lose_waiting("the destination is paused");
                }
                continue;
            }
            let backing_off = d.health.retry_at.is_some_and(|t| t > now);
            if d.link.producer.is_none() && !backing_off {
                d.ensure_producer(&mut self.producers);
            }
            d.send_blocked();
        }
    }

    fn send_from_queue(&mut self, ev: ring::BestEffortEvent, shared: &mut [Option<Rc<str>>; 3]) {
        // Unknown here means dropped since: the event goes with it.
        let Some(d) = self.destinations.get_mut(&ev.destination_id) else { return };
        if !matches!(d.mode, Mode::BestEffort(_)) {
            return;
        }
        if d.paused {
            if let Some(m) = d.memory() {
                m.lose("the destination is paused".into());
            }
            return;
        }
        let waiting = d.link.producer.is_none() && d.health.retry_at.is_some_and(|t| t > Instant::now());
        if waiting || !d.ensure_producer(&mut self.producers) {
            if let Some(m) = d.memory() {
                m.lose("no Kafka producer".into());
            }
            return;
        }
        let event = types::Event {
            group: 0,
            id: ev.number as i64,
            table: types::share(&mut shared[0], &ev.table),
            interaction: types::share(&mut shared[1], &ev.interaction),
            key: ev.key,
            row: ev.row,
            timestamp: types::share(&mut shared[2], &status::format_ts(ev.timestamp_us)),
            born_us: ev.committed_us,
            traceparent: ev.traceparent.as_deref().map(Rc::from),
        };
        d.send_best_effort(event);
    }
}
