//! Claiming at-least-once events from the outbox and producing them. A
//! destination claims the lowest events its snapshot sees, in id order,
//! leaving out what it has in flight; while earlier batches are still in
//! flight it claims above the last claim (`Cursor`), which is safe as long
//! as no transaction that was running then has finished since.

use super::destination::{Destination, Mode, Producers};
use super::flight::Flights;
use super::in_transaction;
use super::outbox::Outbox;
use super::Worker;
use crate::config;
use crate::kafka::Refused;
use crate::status;
use crate::store;
use crate::types;
use pgrx::spi::SpiResult;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A claim scans the outbox from the start at least this often.
const FULL_SCAN_MAX: Duration = Duration::from_secs(30);

/// A claim's result and what it asked for.
struct Claim {
    claimed: store::Claimed,
    /// Most events, and outbox rows, it could have returned.
    limit: i64,
    rows: i64,
    /// It scanned from the start.
    full_scan: bool,
}

impl Claim {
    /// It returned all it could: more may be waiting behind it.
    fn full(&self, events: usize) -> bool {
        events as i64 >= self.limit || self.claimed.rows as i64 >= self.rows
    }
}

impl Worker {
    /// Claim the next batch of each ready destination and produce it.
    pub(super) fn claim_and_produce(&mut self) {
        if !self.extension_present {
            return;
        }
        let now = Instant::now();
        // Events were put back with old numbers: every claim starts over.
        let rescan = status::rescan_generation();
        if rescan != self.seen_rescan {
            self.seen_rescan = rescan;
            self.destinations.values_mut().filter_map(Destination::outbox).for_each(|o| o.cursor.watch = None);
        }
        let ids: Vec<String> = self
            .destinations
            .values()
            .filter(|d| !d.paused && d.ready(now) && !self.has_retiring(&d.id))
            .map(|d| d.id.clone())
            .collect();
        let seen_generation = self.seen_generation;
        for id in ids {
            let Some(d) = self.destinations.get_mut(&id) else { continue };
            let Mode::AtLeastOnce(o) = &d.mode else { continue };
            let Some(claim) = o.claim(&id, &d.flights, now) else {
                self.last_reload = None; // maybe the extension went away: look again
                return;
            };
            match claim {
                Ok(claim) => {
                    if status::config_generation() != seen_generation {
                        // A change committed since the last reload (a FHIR
                        // table renamed, say) may be older than events of this
                        // claim: their tables' resource types are read again.
                        if let Some(Ok(types)) = in_transaction("reading resource types", store::resource_types) {
                            d.resource_types = types
                                .into_iter()
                                .filter(|(url, _, _)| *url == d.topic_url)
                                .map(|(_, table, resource_type)| (table, resource_type))
                                .collect();
                        }
                    }
                    if let Some(more) = d.produce_claim(claim, now, &mut self.producers) {
                        self.busy = true;
                        self.more |= more;
                    }
                }
                Err(e) => pgrx::warning!("pg_outbox worker: claiming events failed: {e}"),
            }
        }
    }
}

impl Outbox {
    /// Claim above the last claim if no transaction that was running then
    /// has finished since (only those can commit events numbered lower);
    /// else scan from the start, leaving out what is in flight. Scan from
    /// the start anyway now and then (a safety net). None: the claim's
    /// transaction failed.
    fn claim(&self, id: &str, flights: &Flights, now: Instant) -> Option<SpiResult<Claim>> {
        let limit = if self.isolate_until > 0 { 1 } else { config::BATCH_SIZE.get() as i64 };
        let full_due = self.cursor.full_scan_at.is_none_or(|t| now.saturating_duration_since(t) >= FULL_SCAN_MAX);
        let fast = self.cursor.watch.as_ref().filter(|_| !full_due);
        let after = self.cursor.claimed_up_to;
        // Rows to look through for `limit` events: as many as the last
        // claim's rows held, a quarter more (a claim cut short by it is
        // merely smaller; the next one adapts).
        let rows = (((limit as f64 / self.cursor.events_per_row).ceil() * 1.25) as i64 + 1).min(limit);
        let mut full_scan = false;
        let claimed = in_transaction("claiming events", || -> SpiResult<store::Claimed> {
            if let Some(watch) = fast {
                let c = store::claim(id, after, &self.skip(flights, after), limit, rows)?;
                if watch.iter().all(|x| c.running(*x)) {
                    return Ok(c);
                }
            }
            full_scan = true;
            store::claim(id, 0, &self.skip(flights, 0), limit, rows)
        })?;
        Some(claimed.map(|claimed| Claim { claimed, limit, rows, full_scan }))
    }

    /// Outbox rows above `above` in flight: the groups, and the events that
    /// may be rows of their own (single events, members of a broken group,
    /// which may have been split). Members of other groups are not rows;
    /// listing them made the list a whole batch long, and Postgres
    /// estimates each element when it plans the claim.
    fn skip(&self, flights: &Flights, above: i64) -> Vec<i64> {
        let own_row = |group: i64| group == 0 || self.groups.get(&group).is_none_or(|g| g.broken);
        let groups: HashSet<i64> = flights.iter().map(|(_, f)| f.group).filter(|g| *g > above).collect();
        flights.iter().filter(|(id, f)| **id > above && own_row(f.group)).map(|(id, _)| *id).chain(groups).collect()
    }

    /// Note what a claim found: the cursor is set again once the whole
    /// claim is on its way.
    fn note_claim(&mut self, claim: &Claim, events: &[types::Event], now: Instant) {
        if claim.full_scan {
            self.cursor.full_scan_at = Some(now);
        }
        if claim.claimed.rows > 0 {
            self.cursor.events_per_row = (events.len() as f64 / claim.claimed.rows as f64).max(1.0);
        }
        self.cursor.watch = if events.is_empty() { claim.claimed.in_progress() } else { None };
        if events.first().is_some_and(|e| e.id > self.isolate_until) {
            self.isolate_until = 0; // past the batch that held the culprit
        }
    }

    /// A batch begins: its groups are tracked from here.
    fn start_batch(&mut self, events: &[types::Event], pipeline_empty: bool) {
        self.batch_failed = false;
        if pipeline_empty {
            self.batch_last = 0;
        }
        self.batch_last = self.batch_last.max(events.iter().map(|e| e.id).max().unwrap_or(0));
        let mut sizes: HashMap<i64, usize> = HashMap::new();
        for ev in events.iter().filter(|e| e.group != 0) {
            *sizes.entry(ev.group).or_default() += 1;
        }
        for (group, len) in sizes {
            self.groups.insert(group, super::flight::Group { len, ..Default::default() });
        }
    }

    /// The event is on its way. Claims go by outbox row: a group counts
    /// once it is all sent.
    fn sent(&mut self, ev: &types::Event, next: Option<&types::Event>) {
        if let Some(g) = self.groups.get_mut(&ev.group) {
            g.outstanding += 1;
        }
        if ev.group == 0 {
            self.cursor.claimed_up_to = ev.id;
        } else if next.is_none_or(|n| n.group != ev.group) {
            self.cursor.claimed_up_to = ev.group;
        }
    }
}

impl Destination {
    /// Produce what a claim returned. None: nothing was produced; else
    /// whether more may be waiting behind it.
    fn produce_claim(&mut self, mut claim: Claim, now: Instant, producers: &mut Producers) -> Option<bool> {
        let events = std::mem::take(&mut claim.claimed.events);
        self.outbox()?.note_claim(&claim, &events, now);
        if events.is_empty() || !self.ensure_producer(producers) || !self.open_transaction() {
            return None;
        }
        self.health.retry_at = None;
        let pipeline_empty = self.flights.is_empty();
        self.outbox()?.start_batch(&events, pipeline_empty);
        let all_sent = self.send_claimed(&events);
        self.hand_over();
        let in_flight = self.flights.len();
        let o = self.outbox()?;
        // Groups not reached stay in the outbox whole.
        o.groups.retain(|_, g| g.broken || g.outstanding > 0 || !g.acked.is_empty());
        o.batch_len = in_flight;
        let mut more = false;
        if all_sent && o.outcomes.poisoned.is_empty() {
            // The claim took the lowest events its snapshot saw: all of them
            // up to `claimed_up_to` are now in flight or gone, unless a
            // transaction then in progress commits more (watched next time).
            o.cursor.watch = claim.claimed.in_progress();
            more = claim.full(events.len());
        }
        if let Some(p) = self.served_here() {
            p.poll(Duration::ZERO);
        }
        Some(more)
    }

    /// Send a claim's events in order; false if some stay in the outbox for
    /// the next batch.
    fn send_claimed(&mut self, events: &[types::Event]) -> bool {
        for (i, ev) in events.iter().enumerate() {
            let sent = self.send(ev);
            let Some(o) = self.outbox() else { return false };
            match sent {
                Ok(()) => o.sent(ev, events.get(i + 1)),
                // The rest stays in the outbox for the next batch.
                Err(Refused::Full) => {
                    o.break_group(ev.group);
                    return false;
                }
                // Never acceptable: set it aside, the others go on.
                Err(Refused::Poison(error)) => o.poison(ev.id, ev.group, format!("produce refused: {error}")),
                Err(Refused::Other(error)) => {
                    // Stop here: what follows must not overtake this event.
                    o.fail(ev.id, ev.group, format!("produce refused: {error}"));
                    return false;
                }
            }
        }
        true
    }
}
