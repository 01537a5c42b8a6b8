//! Backfills (sql/backfill.sql): for each at-least-once destination with a
//! backfill under way, one batch per pass, in a transaction of its own,
//! between the claims. A batch runs only while the destination's outbox
//! holds less than a batch (outbox._backfill_step checks), so live changes
//! queue behind one batch at most. The progress is in the table: a crash
//! or restart goes on where the last committed batch ended.

use super::{in_transaction, Worker};
use crate::store;
use std::time::{Duration, Instant};

/// How long to wait while the destination's outbox still holds a batch.
const BACKLOG_WAIT: Duration = Duration::from_millis(20);
/// How long to wait after a batch failed (a lock conflict, say: logged).
const ERROR_WAIT: Duration = Duration::from_secs(1);

/// A backfill under way and when its next batch is due.
#[derive(Clone, Copy)]
pub(super) struct Backfill {
    pub id: i64,
    pub due: Instant,
}

impl Backfill {
    pub fn new(id: i64) -> Backfill {
        Backfill { id, due: Instant::now() }
    }
}

impl Worker {
    pub(super) fn backfill(&mut self) {
        if !self.extension_present {
            return;
        }
        let now = Instant::now();
        for d in self.destinations.values_mut() {
            let Some(b) = d.backfill.filter(|b| b.due <= now) else { continue };
            if d.paused || d.retiring_until.is_some() || d.outbox().is_none() {
                continue;
            }
            match in_transaction("a backfill batch", || store::backfill_step(b.id)) {
                Some(Ok(n)) if n > 0 => {
                    self.busy = true;
                    self.more = true;
                }
                Some(Ok(0)) => d.backfill = None,
                Some(Ok(_)) => d.backfill = Some(Backfill { due: now + BACKLOG_WAIT, ..b }),
                Some(Err(e)) => {
                    pgrx::warning!("pg_outbox worker: backfill {} of \"{}\" failed: {e}", b.id, d.id);
                    d.backfill = Some(Backfill { due: now + ERROR_WAIT, ..b });
                }
                None => d.backfill = Some(Backfill { due: now + ERROR_WAIT, ..b }),
            }
        }
    }
}
