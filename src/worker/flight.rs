//! What a destination has in flight: events produced and not yet reported
//! on, in produce order, and the outbox groups being delivered.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// An event in flight: the id of its group (see `Group`) or 0, and its
/// change's commit, or its transaction start when unknown (Postgres µs).
#[derive(Clone, Copy)]
pub(super) struct Flight {
    pub group: i64,
    pub born_us: i64,
}

/// Events produced and without a delivery report yet.
#[derive(Default)]
pub(super) struct Flights {
    map: IdMap<Flight>,
    /// (produced at, event) in produce order, to expire what is never
    /// acknowledged; acknowledged entries are dropped lazily (`oldest`).
    produced: VecDeque<(Instant, i64)>,
}

impl Flights {
    pub fn insert(&mut self, id: i64, flight: Flight) {
        self.map.insert(id, flight);
        self.produced.push_back((Instant::now(), id));
    }

    pub fn remove(&mut self, id: i64) -> Option<Flight> {
        self.map.remove(&id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&i64, &Flight)> {
        self.map.iter()
    }

    /// Forget everything in flight: (event, group) of each.
    pub fn drain(&mut self) -> Vec<(i64, i64)> {
        self.produced.clear();
        self.map.drain().map(|(id, f)| (id, f.group)).collect()
    }

    /// When the oldest event still in flight was produced.
    pub fn oldest(&mut self) -> Option<Instant> {
        while let Some((at, id)) = self.produced.front() {
            if self.map.contains_key(id) {
                return Some(*at);
            }
            self.produced.pop_front();
        }
        None
    }
}

/// An outbox row holding several events of one statement (see
/// `outbox.event`), being delivered. Deleted whole once Kafka has all of its
/// events; if some fail, are never sent or go to the dead letters, it is
/// split into single events without those Kafka has (`store::split`).
#[derive(Default)]
pub(super) struct Group {
    /// Its events in the claim.
    pub len: usize,
    /// Sent and without a delivery report yet.
    pub outstanding: usize,
    /// Delivered, not yet recorded.
    pub acked: Vec<i64>,
    /// Will not be acknowledged whole.
    pub broken: bool,
}

/// Maps keyed by event or group id, updated for every event delivered.
pub(super) type IdMap<V> = HashMap<i64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes an id with a multiplication and a rotation (as rustc's FxHash) instead of
/// SipHash: the keys are sequence numbers, not chosen by anyone.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The table picks buckets by the low bits, which a product takes from
        // the id's low bits alone (ids spaced by 2 or 4, destinations sharing
        // the sequence, would use part of the buckets): bring the high ones down.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}
