//! What the row trigger (outbox._capture, PL/pgSQL) needs from Rust: wake the
//! worker once when the writing transaction commits, never on abort.

use crate::status;
use pgrx::callbacks::{register_xact_callback, PgXactCallbackEvent};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// A commit callback is registered for the current transaction.
    static WAKE_PENDING: Cell<bool> = const { Cell::new(false) };
    /// The current transaction changed the configuration.
    static CONFIG_CHANGED: Cell<bool> = const { Cell::new(false) };
}

fn arm() {
    if WAKE_PENDING.with(|w| w.replace(true)) {
        return; // already armed in this transaction: coalesce
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_PENDING.with(|w| w.set(false));
        if CONFIG_CHANGED.with(|c| c.replace(false)) {
            status::bump_config_generation();
        }
        status::wake_worker();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_PENDING.with(|w| w.set(false));
        CONFIG_CHANGED.with(|c| c.set(false));
    });
}

/// Called by the trigger after it enqueued events: wake the worker on COMMIT.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_on_commit() {
    if crate::preloaded() {
        arm();
    }
}

/// Called by the configuration functions: tell the worker to reload on COMMIT.
#[pg_extern(volatile, parallel_unsafe)]
fn _changed_on_commit() {
    if crate::preloaded() {
        CONFIG_CHANGED.with(|c| c.set(true));
        arm();
    }
}
