//! What the row trigger (`outbox._capture`, PL/pgSQL) needs from Rust:
//! - a per-backend cache of each topic's destinations, invalidated by the
//!   configuration generation in shared memory;
//! - best-effort events kept in backend memory and handed to the shared queue
//!   on COMMIT only (a rolled-back savepoint drops its own events);
//! - one worker wake-up per committing transaction that captured anything.

use crate::kafka::Content;
use crate::ring::{self, BestEffortEvent};
use crate::status;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// What a topic's trigger must do.
#[derive(Default, Clone)]
struct Route {
    at_least_once: bool,
    best_effort: Vec<(String, Content)>,
}

#[derive(Default)]
struct State {
    callbacks_registered: bool,
    /// Routes by topic id, valid for `generation` unless `dirty`.
    routes: Option<HashMap<i32, Route>>,
    generation: u64,
    dirty: bool,
    /// This transaction changed the configuration.
    config_changed: bool,
    /// This transaction enqueued at-least-once events.
    wake: bool,
    /// Best-effort events of this transaction: (subtransaction, destination, encoded).
    pending: Vec<(pg_sys::SubTransactionId, String, Vec<u8>)>,
    pending_bytes: usize,
    /// Best-effort events already dropped in this transaction, by destination.
    dropped: HashMap<String, u64>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn ensure_callbacks(s: &mut State) {
    if !s.callbacks_registered {
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        }
        s.callbacks_registered = true;
    }
}

fn load_routes() -> HashMap<i32, Route> {
    let mut routes: HashMap<i32, Route> = HashMap::new();
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT t.id, d.id, d.kind, d.content FROM outbox.destination d JOIN outbox.topic t ON t.url = d.topic_url",
            None,
            &[],
        )?;
        for row in rows {
            let topic: i32 = row.get(1)?.unwrap_or_default();
            let id: String = row.get(2)?.unwrap_or_default();
            let kind: String = row.get(3)?.unwrap_or_default();
            let content: String = row.get(4)?.unwrap_or_default();
            let route = routes.entry(topic).or_default();
            if kind == "kafka-best-effort" {
                route.best_effort.push((id, Content::parse(&content)));
            } else {
                route.at_least_once = true;
            }
        }
        Ok::<_, pgrx::spi::SpiError>(())
    })
    .unwrap_or_else(|e| pgrx::error!("pg_outbox: reading destinations failed: {e}"));
    routes
}

fn route(topic_id: i32) -> Route {
    let generation = status::config_generation();
    let fresh = STATE.with(|s| {
        let s = s.borrow();
        s.routes.is_some() && s.generation == generation && !s.dirty
    });
    if !fresh {
        let routes = load_routes();
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.routes = Some(routes);
            s.generation = generation;
            s.dirty = false;
        });
    }
    STATE.with(|s| s.borrow().routes.as_ref().and_then(|r| r.get(&topic_id).cloned()).unwrap_or_default())
}

/// Bit 1: the topic has at-least-once destinations; bit 2: best-effort ones.
#[pg_extern(volatile, parallel_unsafe)]
fn _topic_mask(topic_id: i32) -> i32 {
    let r = route(topic_id);
    i32::from(r.at_least_once) | (i32::from(!r.best_effort.is_empty()) << 1)
}

/// Keep a change for the topic's best-effort destinations until COMMIT.
#[pg_extern(volatile, parallel_unsafe)]
fn _buffer_best_effort(topic_id: i32, table: &str, interaction: &str, key: Option<&str>, row: Option<&str>) {
    let r = route(topic_id);
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let timestamp_us = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let limit = ring::max_event_bytes();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        for (dest, content) in &r.best_effort {
            let ev = BestEffortEvent {
                number: 0,
                destination_id: dest.clone(),
                table: table.to_string(),
                interaction: interaction.to_string(),
                key: key.map(str::to_string),
                row: if *content == Content::FullResource { row.map(str::to_string) } else { None },
                timestamp_us,
            }
            .encode();
            // More than the whole queue could take: drop now rather than hold it.
            if s.pending_bytes + ev.len() + 4 > limit {
                *s.dropped.entry(dest.clone()).or_default() += 1;
                continue;
            }
            s.pending_bytes += ev.len() + 4;
            s.pending.push((subid, dest.clone(), ev));
        }
    });
}

/// Called by the trigger after it enqueued at-least-once events.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_on_commit() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        s.wake = true;
    });
}

/// Called by the configuration functions: writers and the worker reload.
#[pg_extern(volatile, parallel_unsafe)]
fn _changed_on_commit() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        s.config_changed = true;
        s.dirty = true; // this backend sees its own change at once
    });
}

fn reset(s: &mut State) {
    s.config_changed = false;
    s.wake = false;
    s.pending.clear();
    s.pending_bytes = 0;
    s.dropped.clear();
}

/// Hand the transaction's best-effort events to the shared queue. Runs after
/// the commit is durable: must not fail.
fn hand_over(s: &mut State) -> bool {
    if s.pending.is_empty() && s.dropped.is_empty() {
        return false;
    }
    let mut encoded: Vec<Vec<u8>> = s.pending.iter_mut().map(|(_, _, ev)| std::mem::take(ev)).collect();
    let accepted = ring::push(&mut encoded);
    for ((_, dest, _), ok) in s.pending.iter().zip(&accepted) {
        if !ok {
            *s.dropped.entry(dest.clone()).or_default() += 1;
        }
    }
    for (dest, n) in &s.dropped {
        status::add_lost(dest, *n);
    }
    accepted.iter().any(|ok| *ok)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    STATE.with(|cell| {
        let Ok(mut s) = cell.try_borrow_mut() else { return };
        match event {
            XACT_EVENT_PRE_COMMIT => {
                if s.config_changed {
                    // Before the change is visible, and again after: a writer
                    // that reloads in between sees the second bump too.
                    status::bump_config_generation();
                }
            }
            XACT_EVENT_COMMIT => {
                let pushed = hand_over(&mut s);
                if s.config_changed {
                    status::bump_config_generation();
                }
                if pushed || s.wake || s.config_changed {
                    status::wake_worker();
                }
                reset(&mut s);
            }
            XACT_EVENT_PRE_PREPARE => {
                if !s.pending.is_empty() {
                    drop(s);
                    crate::error::UserError::new(
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        "cannot PREPARE a transaction that captured changes for best-effort destinations",
                    )
                    .hint("Best-effort events are handed over on COMMIT; use a plain COMMIT, or at-least-once destinations.")
                    .raise();
                }
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

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
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
        let before = s.pending.len();
        s.pending.retain(|(subid, _, _)| *subid < my_subid);
        if s.pending.len() != before {
            s.pending_bytes = s.pending.iter().map(|(_, _, ev)| ev.len() + 4).sum();
        }
        if s.config_changed {
            s.dirty = true;
        }
    });
}
