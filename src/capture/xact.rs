//! The transaction callbacks of a backend that captured changes: they
//! write the outbox before COMMIT or PREPARE, hand best-effort events over
//! and publish configuration changes after COMMIT (one worker wake-up per
//! committing transaction that captured anything), and drop what a
//! rolled-back transaction or savepoint captured. Registered once per
//! backend (`super::ensure_callbacks`). See docs/architecture.md.

use super::outbox::{self, Queued};
use super::{best_effort, State, STATE};
use crate::status;
use pgrx::prelude::*;

/// Forget the transaction: its events, and what it asked for at commit.
fn reset(s: &mut State) {
    if std::mem::take(&mut s.reload_after_transaction) {
        s.dirty = true;
    }
    s.config_changed = false;
    s.wake = false;
    s.rescan = false;
    s.queued.clear();
    s.queued_bytes = 0;
    s.committing = false;
    s.pending.clear();
    s.pending_bytes = 0;
    s.dropped.clear();
}

/// PRE_COMMIT/PRE_PREPARE: write what is still queued, while an error can
/// still abort the transaction (PREPARE with best-effort events is refused).
/// COMMIT: hand over, publish, wake the worker. ABORT/PREPARE: forget.
#[pg_guard]
pub(super) unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    // Still inside the transaction (an error aborts it): the queued
    // at-least-once events go into the outbox with the changes.
    if matches!(event, XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE) {
        if STATE.with(|s| s.try_borrow().is_ok_and(|s| !s.queued.is_empty())) {
            outbox::flush(true);
        }
        STATE.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                s.committing = true;
            }
        });
    }
    STATE.with(|cell| {
        let Ok(mut s) = cell.try_borrow_mut() else { return };
        match event {
            // Before the change is visible, and again after: a writer that
            // reloads in between sees the second bump too.
            XACT_EVENT_PRE_COMMIT if s.config_changed => status::bump_config_generation(),
            XACT_EVENT_COMMIT => after_commit(&mut s),
            XACT_EVENT_PRE_PREPARE if !s.pending.is_empty() => {
                drop(s);
                crate::error::UserError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that captured changes for best-effort destinations",
                )
                .hint(
                    "Best-effort events are handed over on COMMIT; use a plain COMMIT, or at-least-once destinations.",
                )
                .raise();
            }
            XACT_EVENT_ABORT | XACT_EVENT_PREPARE => {
                if s.config_changed {
                    s.dirty = true; // the cache may hold configuration that never committed
                }
                reset(&mut s);
            }
            _ => {}
        }
    });
}

/// After COMMIT: hand the best-effort events over, publish a configuration
/// change or a rescan, and wake the worker if there is anything for it.
fn after_commit(s: &mut State) {
    // After the commit an ERROR would be a PANIC: contain any panic.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pushed = best_effort::hand_over(s);
        if s.config_changed {
            status::bump_config_generation();
        }
        if s.rescan {
            status::request_rescan();
        }
        if pushed || s.wake || s.config_changed {
            status::wake_worker();
        }
    }));
    reset(s);
    if outcome.is_err() {
        pgrx::warning!("pg_outbox: handing over this transaction's best-effort events failed");
    }
}

/// A rolled-back subtransaction drops its own events, of either kind.
#[pg_guard]
pub(super) unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event != pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        return;
    }
    STATE.with(|cell| {
        let Ok(mut s) = cell.try_borrow_mut() else { return };
        // Subtransaction ids grow: the aborted one and its children are >= my_subid.
        let queued = s.queued.len();
        s.queued.retain(|q| q.subid < my_subid);
        if s.queued.len() != queued {
            s.queued_bytes = s.queued.iter().map(Queued::size).sum();
        }
        let before = s.pending.len();
        s.pending.retain(|(subid, _, _)| *subid < my_subid);
        s.dropped.retain(|(subid, _)| *subid < my_subid);
        if s.pending.len() != before {
            s.pending_bytes = s.pending.iter().map(|(_, _, ev)| ev.len() + 4).sum();
        }
        if s.config_changed {
            s.dirty = true;
        }
    });
}
