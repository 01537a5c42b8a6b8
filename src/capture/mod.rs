//! Capture: the writer side, what runs in the backend that changes a
//! watched table. The row (and TRUNCATE) trigger `outbox._capture()` turns
//! each change into one event per destination of its topic and keeps it in
//! backend memory until the statement ends (at-least-once) or the
//! transaction commits (best-effort); the worker does the rest.
//!
//! The trigger runs as the writing user: the row becomes JSON (`row_to_json`)
//! with the writer's rights, so a type's cast to json never runs as the
//! extension owner. Only the route query and the outbox INSERT run as the
//! extension owner (`as_owner`; writers have no rights on the outbox tables).
//!
//! - `routes`: each topic's destinations and tables, cached per backend and
//!   reloaded when the configuration generation in shared memory moves.
//! - `target`: the watched table's name and the primary key, read from the
//!   catalog (cached until a relcache or namespace invalidation), not from the
//!   trigger's arguments: they follow renames, and a key added later is used.
//! - `tuple`: the Kafka key and, for tables in Aidbox's layout, the FHIR
//!   resource, from the changed tuple (other rows: `crate::rowjson`).
//! - `criteria`: a topic's FHIRPath criteria, tested per change.
//! - `outbox`: at-least-once events, written to the outbox with one INSERT
//!   when the statement finishes (ExecutorFinish), every 1,000 events or
//!   8 MB, and at COMMIT/PREPARE for what is left (COPY, events of a
//!   subtransaction), in the same transaction: not one INSERT per row.
//! - `best_effort`: best-effort events, handed to the shared queue (`ring`)
//!   on COMMIT only.
//! - `xact`: the transaction callbacks: flush at PRE_COMMIT, hand-over and one
//!   worker wake-up per committing transaction that captured anything; a
//!   rolled-back transaction or savepoint drops its own events, of either kind.
//!
//! This file holds the trigger, the backend's capture state and the SQL
//! functions that mark a transaction for the worker. See
//! docs/architecture.md.

mod best_effort;
mod criteria;
mod outbox;
mod routes;
mod target;
mod tuple;
mod xact;

pub use outbox::install_hooks;

use crate::error::UserError;
use outbox::Queued;
use pgrx::prelude::*;
use routes::{Route, ROW_INTERACTIONS};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use target::Target;

/// What this backend keeps between trigger calls: the cached configuration
/// and the events of the current transaction.
#[derive(Default)]
struct State {
    callbacks_registered: bool,
    /// Routes by topic id, valid for `generation` unless `dirty`.
    routes: Option<HashMap<i32, Rc<Route>>>,
    /// Targets by (topic id, relation), valid while `targets_epoch` is
    /// `target::INVALIDATIONS`.
    targets: HashMap<(i32, pg_sys::Oid), Rc<Target>>,
    targets_epoch: u64,
    generation: u64,
    dirty: bool,
    /// This transaction changed the configuration.
    config_changed: bool,
    /// Wake the worker at COMMIT: this transaction wrote events into the
    /// outbox, or asked for it (`_wake_on_commit`).
    wake: bool,
    /// This transaction put events back with old numbers.
    rescan: bool,
    /// At-least-once events of this transaction not yet in the outbox.
    queued: Vec<Queued>,
    queued_bytes: usize,
    /// The PRE_COMMIT flush ran: a change captured after it (by a commit
    /// callback that runs after ours) is written at once.
    committing: bool,
    /// Best-effort events of this transaction: (subtransaction, destination, encoded).
    pending: Vec<(pg_sys::SubTransactionId, String, Vec<u8>)>,
    pending_bytes: usize,
    /// Best-effort events already dropped in this transaction: (subtransaction, destination).
    dropped: Vec<(pg_sys::SubTransactionId, String)>,
    /// The routes were read with a snapshot that must not outlive this transaction.
    reload_after_transaction: bool,
    /// The extension owner, who writes the outbox.
    owner: pg_sys::Oid,
    /// The outbox INSERTs (single events, groups), prepared once per
    /// backend and configuration.
    insert_plans: [Option<pgrx::spi::OwnedPreparedStatement>; 2],
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Register the transaction and invalidation callbacks, once per backend.
fn ensure_callbacks(s: &mut State) {
    if !s.callbacks_registered {
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact::on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(xact::on_subxact), std::ptr::null_mut());
            pg_sys::CacheRegisterRelcacheCallback(Some(target::on_relcache), pg_sys::Datum::from(0));
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(target::on_namespace),
                pg_sys::Datum::from(0),
            );
        }
        s.callbacks_registered = true;
    }
}

/// Run `f` as the extension owner. On an ERROR, (sub)transaction abort
/// restores the writer's identity.
fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    as_user(owner, f)
}

/// Run `f` as `user`, restricted (no SET ROLE, no temporary objects). On an
/// ERROR, (sub)transaction abort restores the identity.
fn as_user<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
        );
    }
    let r = f();
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    r
}

/// The trigger the API attaches: `outbox._capture(topic id)`, for each row
/// (create, update, delete) or each TRUNCATE statement.
#[pg_trigger]
fn _capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let td = trigger.trigger_data();
    // The first argument, as it is (PgTrigger::extra_args copies them all per row).
    let topic_id = unsafe {
        let t = &*td.tg_trigger;
        (t.tgnargs > 0).then(|| std::ffi::CStr::from_ptr(*t.tgargs)).and_then(|a| a.to_str().ok()?.parse::<i32>().ok())
    };
    let op = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let row_level = td.tg_event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let Some(topic_id) = topic_id.filter(|_| row_level || op == pg_sys::TRIGGER_EVENT_TRUNCATE) else {
        UserError::new(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "outbox._capture() runs only as a topic's trigger",
        )
        .hint("Topics attach their triggers themselves: use outbox.create_topic() or outbox.alter_topic().")
        .raise()
    };
    routes::refresh();
    let Some(route) = STATE.with(|s| s.borrow().routes.as_ref().and_then(|r| r.get(&topic_id).cloned())) else {
        return Ok(None); // no destination (yet)
    };
    let target = target::of(topic_id, &route, td.tg_relation);
    let (tuple, interaction) = match op {
        pg_sys::TRIGGER_EVENT_INSERT => (td.tg_trigtuple, 0),
        pg_sys::TRIGGER_EVENT_UPDATE => (td.tg_newtuple, 1),
        pg_sys::TRIGGER_EVENT_DELETE => (td.tg_trigtuple, 2),
        _ => {
            // TRUNCATE: no row, no key.
            enqueue(&route, topic_id, &target.name, "truncate", None, None, None);
            return Ok(None);
        }
    };
    let old = (op == pg_sys::TRIGGER_EVENT_UPDATE).then_some(td.tg_trigtuple);
    unsafe { capture_row(&route, topic_id, td.tg_relation, &target, interaction, tuple, old, None) };
    Ok(None)
}

/// Capture one row change of `rel` (interaction: index in ROW_INTERACTIONS;
/// `old`: the row before an update): its FHIRPath criteria, its key and
/// resource, then the event for the topic's destinations, or only for
/// destination `only`. False if the FHIRPath criteria left it out.
#[allow(clippy::too_many_arguments)]
unsafe fn capture_row(
    route: &Route,
    topic_id: i32,
    rel: pg_sys::Relation,
    target: &Target,
    interaction: usize,
    tuple: pg_sys::HeapTuple,
    old: Option<pg_sys::HeapTuple>,
    only: Option<&str>,
) -> bool {
    let table = &*target.name;
    let watched = route.tables.get(&target.watched);
    let fhir_type = watched.and_then(|w| w.resource_type.as_deref());
    let (relid, desc) = unsafe { ((*rel).rd_id, (*rel).rd_att) };
    // The changed row as a resource (JSON text): Aidbox's for FHIR tables, else the row.
    let text_of = |t: pg_sys::HeapTuple| -> String {
        match fhir_type {
            Some(rt) => unsafe { tuple::fhir_resource(t, desc, rt) },
            // As row_to_json prints it, with the writer's rights.
            None => unsafe { crate::rowjson::row_json(relid, t, desc) },
        }
    };
    let fhirpath = watched.and_then(|w| w.fhirpath[interaction].needed());
    let mut text = (route.needs_row || fhirpath.is_some()).then(|| text_of(tuple));
    if let Some(fhirpath) = fhirpath {
        let op =
            [pg_sys::TRIGGER_EVENT_INSERT, pg_sys::TRIGGER_EVENT_UPDATE, pg_sys::TRIGGER_EVENT_DELETE][interaction];
        let other = old.map(text_of);
        if !criteria::holds(fhirpath, op, text.as_deref().unwrap_or("{}"), other.as_deref(), topic_id, table) {
            return false;
        }
    }
    let row = if route.needs_row { text.take() } else { None };
    let key = unsafe { tuple::row_key(tuple, desc, &target.key) };
    enqueue(route, topic_id, table, ROW_INTERACTIONS[interaction], key, row, only);
    true
}

/// A batch of a backfill (outbox._backfill_step) from table `tbl` of
/// topic `topic_id`: `bound_sql` ($1 the last key sent) gives the key the
/// batch ends at (NULL: the table's last rows), `rows_sql` ($1, $2 that
/// bound) the rows up to it, locked, each with its key as text, in key
/// order; each becomes the create event of destination `destination` only.
/// Both run as the table's owner, restricted (as a writer's trigger runs
/// with the writer's rights), with the session's own search_path (the
/// criteria and the predicate were written for it; the step's is pinned),
/// and whatever settings the owner's code changes are undone after them:
/// its types' casts, the criteria and the predicate never run as the
/// worker's superuser, nor change what the worker runs next. The events
/// sent, and the key to go on after (NULL: the table is done).
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn _backfill_batch(
    destination: &str,
    topic_id: i32,
    tbl: pg_sys::Oid,
    bound_sql: &str,
    rows_sql: &str,
    last_key: Option<Vec<Option<String>>>,
) -> TableIterator<'static, (name!(sent, i32), name!(next_key, Option<Vec<Option<String>>>))> {
    routes::refresh();
    let route = STATE.with(|s| s.borrow().routes.as_ref().and_then(|r| r.get(&topic_id).cloned()));
    let Some(route) = route.filter(|r| r.tables.contains_key(&tbl) && r.at_least_once.iter().any(|d| d == destination))
    else {
        UserError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the backfill's destination or table is no longer its topic's",
        )
        .raise()
    };
    // Locked before its key and owner are read (the batch's SELECT would
    // lock it only later).
    unsafe { pg_sys::LockRelationOid(tbl, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    let rel = unsafe { pg_sys::RelationIdGetRelation(tbl) };
    if rel.is_null() {
        UserError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "the backfill's table no longer exists").raise()
    }
    let target = target::of(topic_id, &route, rel);
    let owner = unsafe { (*(*rel).rd_rel).relowner };
    // Settings changed from here on (search_path below, and any the owner's
    // code sets) are undone at the end, as a function's SET clause is.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    unsafe {
        let reset = pg_sys::GetConfigOptionResetString(c"search_path".as_ptr());
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            reset,
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
    // An ERROR inside restores the worker's identity and settings with the abort.
    let result = as_user(owner, || {
        Spi::connect_mut(|client| {
            let first = client.select(bound_sql, Some(1), &[last_key.clone().into()])?;
            let bound = if first.is_empty() { None } else { first.first().get_one::<Vec<Option<String>>>()? };
            let mut sent = 0;
            // Not read-only: it locks rows.
            for row in client.update(rows_sql, None, &[last_key.into(), bound.clone().into()])? {
                let Some(new) = row.get::<pgrx::AnyElement>(2)? else { continue };
                // The row as a heap tuple of the table (a composite datum is one).
                let header = unsafe { pg_sys::pg_detoast_datum(new.datum().cast_mut_ptr()) } as pg_sys::HeapTupleHeader;
                let mut tuple = pg_sys::HeapTupleData {
                    t_len: unsafe { pgrx::varlena::varsize_any(header.cast()) } as u32,
                    t_tableOid: tbl,
                    t_data: header,
                    ..Default::default()
                };
                if unsafe { capture_row(&route, topic_id, rel, &target, 0, &mut tuple, None, Some(destination)) } {
                    sent += 1;
                }
            }
            Ok::<_, pgrx::spi::SpiError>((sent, bound))
        })
    });
    unsafe {
        pg_sys::AtEOXact_GUC(false, level);
        pg_sys::RelationClose(rel);
    }
    let (sent, bound) = result.unwrap_or_else(|e| {
        UserError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "a backfill batch failed")
            .detail(e.to_string())
            .raise()
    });
    TableIterator::once((sent, bound))
}

/// Keep the change for the topic's destinations: best-effort ones until
/// COMMIT, at-least-once ones until the statement ends.
fn enqueue(
    route: &Route,
    topic_id: i32,
    table: &str,
    interaction: &'static str,
    key: Option<String>,
    row: Option<String>,
    only: Option<&str>,
) {
    if !route.best_effort.is_empty() && only.is_none() {
        best_effort::buffer(&route.best_effort, table, interaction, key.as_deref(), row.as_deref());
    }
    if !route.at_least_once.is_empty() {
        outbox::queue(route, topic_id, table, interaction, key, row, only);
    }
}

/// Wake the worker when this transaction commits, to claim from the start of
/// the outbox (outbox.retry_dead_letters puts events back with old numbers).
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_on_commit() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        s.wake = true;
        s.rescan = true;
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
