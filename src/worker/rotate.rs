//! The outbox's partitions take turns (PgQ's rotation, sql/schema.sql):
//! writers insert into the current one, named in shared memory. Every
//! `outbox.rotation_interval` the worker moves them on to the next empty
//! one (passing over one a long transaction holds); a former one is emptied with TRUNCATE as soon as
//! every event in it was delivered (deleted) and no transaction holds it
//! (`store::truncate_if_empty`). Deleted events leave dead rows that VACUUM
//! may not reclaim while any snapshot is older than them; TRUNCATE takes
//! them regardless, so the outbox stays bounded: about three intervals of
//! events, plus what a destination that cannot deliver keeps waiting.
//!
//! Correctness rests on locks, not on timing: a writer that read the
//! former partition's number just before the switch inserts into it under
//! a lock that makes the TRUNCATE wait for the next try (or, if it comes
//! after the TRUNCATE, its events are simply in that partition, which then
//! is not empty).
//!
//! Delivered events kept for replay (outbox.delivered, a destination's
//! retention) are pruned here too, every PRUNE_EVERY.

use super::{in_transaction, Worker};
use crate::config;
use crate::status;
use crate::store::{self, PARTS};
use std::time::{Duration, Instant};

/// How often the worker looks at the partitions.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often delivered events past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Rotation {
    /// When writers were last moved on (or the worker started).
    switched_at: Instant,
    next_check: Instant,
    next_prune: Instant,
}

impl Default for Rotation {
    fn default() -> Rotation {
        let now = Instant::now();
        Rotation { switched_at: now, next_check: now, next_prune: now }
    }
}

impl Worker {
    /// Empty the former partitions that are done with and, when the
    /// interval has passed, move writers on to the next partition.
    pub(super) fn rotate(&mut self) {
        let now = Instant::now();
        if self.extension_present && now >= self.rotation.next_prune {
            self.rotation.next_prune = now + PRUNE_EVERY;
            let _ = in_transaction("deleting delivered events past their retention", store::prune_delivered);
        }
        if !self.extension_present || now < self.rotation.next_check {
            return;
        }
        self.rotation.next_check = now + CHECK_EVERY;
        let interval = Duration::from_millis(config::ROTATION_INTERVAL_MS.get() as u64);
        let due = now.saturating_duration_since(self.rotation.switched_at) >= interval;
        let current = status::current_part() % PARTS;
        let next = in_transaction("rotating the outbox", || -> pgrx::spi::SpiResult<Option<u32>> {
            // Delivery waits while this does: it never waits long for a lock.
            pgrx::Spi::run("SET LOCAL lock_timeout = '1s'")?;
            let Some(mut sizes) = store::part_sizes()? else { return Ok(None) };
            for part in (0..PARTS).filter(|p| *p != current) {
                if sizes[part as usize] > 0 && store::truncate_if_empty(part)? {
                    sizes[part as usize] = 0;
                }
            }
            // The first empty one after the current: a partition held by a
            // long transaction is passed over, the other two take turns.
            let next = (1..PARTS).map(|step| (current + step) % PARTS).find(|p| sizes[*p as usize] == 0);
            Ok(next.filter(|_| due && sizes[current as usize] > 0))
        });
        match next {
            // After the commit: writers find the partition emptied.
            Some(Ok(Some(next))) => {
                status::set_current_part(next);
                self.rotation.switched_at = now;
            }
            Some(Ok(None)) | None => {}
            Some(Err(e)) => pgrx::warning!("pg_outbox worker: rotating the outbox failed: {e}"),
        }
    }
}
