//! At-least-once events on the writer side: queued in backend memory per
//! change and written into `outbox.event` in the writer's transaction, as
//! the extension owner, with one prepared INSERT for many events: when the
//! statement finishes (the ExecutorFinish hook, after its AFTER ROW
//! triggers), every 1,000 events or 8 MB, and at COMMIT or PREPARE for what
//! is left. Each destination's run of events with the same table and
//! interaction becomes one outbox row (a group), so a 100-row statement
//! writes one row per destination. The worker's side of the table is
//! `crate::store`. See docs/architecture.md.

use super::routes::Route;
use super::{as_owner, ensure_callbacks, STATE};
use crate::error::UserError;
use pgrx::datum::{DatumWithOid, JsonString};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};
use std::collections::HashMap;

/// An at-least-once event waiting for the next flush into the outbox.
pub(super) struct Queued {
    pub(super) subid: pg_sys::SubTransactionId,
    destination: String,
    topic_id: i32,
    table: String,
    interaction: &'static str,
    key: Option<String>,
    row: Option<String>,
}

impl Queued {
    /// Bytes counted against FLUSH_BYTES.
    pub(super) fn size(&self) -> usize {
        self.table.len() + self.key.as_ref().map_or(0, String::len) + self.row.as_ref().map_or(0, String::len) + 64
    }
}

/// A flush is due at this many queued events or bytes (rows and keys).
const FLUSH_EVENTS: usize = 1000;
const FLUSH_BYTES: usize = 8 << 20;

/// Runs as the extension owner with the writer's search_path: no operator is
/// used, so none of the writer's can run as the owner. The destinations come
/// from the cached route (reloaded when the configuration generation moves;
/// events of a destination dropped meanwhile are swept by the worker).
/// Every event a row of its own, in the arrays' order.
const INSERT_SINGLE_EVENTS: &str =
    "INSERT INTO outbox.event (destination_id, topic_id, table_name, interaction, key, row_data) \
     SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), \
                              pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6))";

/// One row per group (see `groups`): $1-$4 its destination, topic, table and
/// interaction, $5 its size, $6/$7 the bounds of its events in $9 (keys) and
/// $10 (rows), $8 whether it is a single event. Event numbers are taken in
/// the rows' order and, within a group, in the order of its events.
const INSERT_EVENTS: &str =
    "INSERT INTO outbox.event (id, destination_id, topic_id, table_name, interaction, key, row_data, events, ids, keys, rows) \
     OVERRIDING SYSTEM VALUE \
     SELECT g.ids[1], g.d, g.t, g.tb, g.i, \
            CASE WHEN g.single THEN $9[g.lo] END, CASE WHEN g.single THEN $10[g.lo] END, g.n, \
            CASE WHEN g.single THEN NULL ELSE g.ids END, \
            CASE WHEN g.single THEN NULL ELSE $9[g.lo:g.hi] END, \
            CASE WHEN g.single THEN NULL ELSE $10[g.lo:g.hi] END \
       FROM (SELECT u.*, ARRAY(SELECT pg_catalog.nextval('outbox.event_id_seq'::pg_catalog.regclass) \
                                 FROM pg_catalog.generate_series(1, u.n)) AS ids \
               FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), \
                               pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6), \
                               pg_catalog.unnest($7), pg_catalog.unnest($8)) AS u (d, t, tb, i, n, lo, hi, single)) g";

/// The outbox rows for these events: per destination, each run of events
/// with the same topic, table and interaction becomes one row (a group when
/// it has more than one event), the rows in the order their runs began.
/// Each destination's events keep their order.
fn groups(queued: &[Queued]) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut open: HashMap<&str, usize> = HashMap::new();
    for (i, q) in queued.iter().enumerate() {
        let same = |r: &Vec<usize>| {
            let first = &queued[r[0]];
            first.topic_id == q.topic_id && first.table == q.table && first.interaction == q.interaction
        };
        match open.get(q.destination.as_str()) {
            Some(&r) if same(&rows[r]) => rows[r].push(i),
            _ => {
                open.insert(&q.destination, rows.len());
                rows.push(vec![i]);
            }
        }
    }
    rows
}

/// Queue one event per at-least-once destination of the topic (or for
/// `only` of them); write the queue out when it is large enough.
pub(super) fn queue(
    route: &Route,
    topic_id: i32,
    table: &str,
    interaction: &'static str,
    key: Option<String>,
    row: Option<String>,
    only: Option<&str>,
) {
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let (due, committing) = STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        for (destination, with_row) in route.at_least_once.iter().zip(&route.at_least_once_rows) {
            if only.is_some_and(|o| o != destination) {
                continue;
            }
            let q = Queued {
                subid,
                destination: destination.clone(),
                topic_id,
                table: table.to_string(),
                interaction,
                key: key.clone(),
                row: if *with_row { row.clone() } else { None },
            };
            s.queued_bytes += q.size();
            s.queued.push(q);
        }
        (s.queued.len() >= FLUSH_EVENTS || s.queued_bytes >= FLUSH_BYTES, s.committing)
    });
    if committing {
        flush(true);
    } else if due {
        flush_if_own();
    }
}

/// Write the queued events when a statement has finished (its AFTER ROW
/// triggers have run). Not when some belong to an enclosing subtransaction:
/// written here they would be undone by a rollback of this one, and written
/// later they would be numbered after changes made after them. Not in
/// parallel mode or a transaction made read-only since (no INSERT there):
/// COMMIT writes them.
pub(super) fn flush_if_own() {
    if unsafe { pg_sys::IsInParallelMode() || pg_sys::XactReadOnly } {
        return;
    }
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let due = STATE.with(|s| s.try_borrow().is_ok_and(|s| s.queued.first().is_some_and(|q| q.subid >= subid)));
    if due {
        flush(false);
    }
}

static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;

/// Installed by _PG_init: each statement's at-least-once events enter the
/// outbox with one INSERT when it finishes, not one per row.
pub fn install_hooks() {
    unsafe {
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query_desc: *mut pg_sys::QueryDesc) {
    unsafe {
        match PREV_EXECUTOR_FINISH {
            Some(prev) => pg_sys::ffi::pg_guard_ffi_boundary(|| prev(query_desc)),
            None => pg_sys::standard_ExecutorFinish(query_desc),
        }
    }
    flush_if_own();
}

/// Write the queued at-least-once events into the outbox, in this
/// transaction, as the extension owner, with one INSERT. At COMMIT even if
/// the transaction was made read-only after its changes.
pub(super) fn flush(at_commit: bool) {
    let (queued, owner, mut plans) = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.queued_bytes = 0;
        (std::mem::take(&mut s.queued), s.owner, std::mem::take(&mut s.insert_plans))
    });
    if queued.is_empty() {
        STATE.with(|s| s.borrow_mut().insert_plans = plans);
        return;
    }
    let insert = Insert::new(queued);
    let written = write(insert, &mut plans, owner, at_commit);
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.insert_plans = plans;
        if written > 0 {
            s.wake = true;
        }
    });
}

type Plans = [Option<OwnedPreparedStatement>; 2];

/// One INSERT of queued events: which statement, and its arguments.
struct Insert {
    /// The statement's place in `State::insert_plans`.
    which: usize,
    statement: &'static str,
    types: Vec<PgBuiltInOids>,
    args: Vec<DatumWithOid<'static>>,
}

impl Insert {
    fn new(queued: Vec<Queued>) -> Insert {
        // Singles keep the plain INSERT; with groups the arrays also say where
        // each group's events lie in the keys and rows.
        let groups = groups(&queued);
        let grouped = groups.len() < queued.len();
        let c = Columns::of(queued, groups);
        use PgBuiltInOids as T;
        let mut types = vec![T::TEXTARRAYOID, T::INT4ARRAYOID, T::TEXTARRAYOID, T::TEXTARRAYOID];
        let mut args: Vec<DatumWithOid> =
            vec![c.destinations.into(), c.topics.into(), c.tables.into(), c.interactions.into()];
        if grouped {
            types.extend([T::INT4ARRAYOID, T::INT4ARRAYOID, T::INT4ARRAYOID, T::BOOLARRAYOID]);
            args.extend([c.sizes.into(), c.los.into(), c.his.into(), c.singles.into()]);
        }
        types.extend([T::TEXTARRAYOID, T::JSONARRAYOID]);
        args.extend([c.keys.into(), c.rows.into()]);
        let (which, statement) = if grouped { (1, INSERT_EVENTS) } else { (0, INSERT_SINGLE_EVENTS) };
        Insert { which, statement, types, args }
    }
}

/// The INSERT's arrays: one element per outbox row (`destinations` to
/// `singles`, see INSERT_EVENTS) or per event (`keys`, `rows`).
struct Columns {
    destinations: Vec<String>,
    topics: Vec<i32>,
    tables: Vec<String>,
    interactions: Vec<&'static str>,
    sizes: Vec<i32>,
    los: Vec<i32>,
    his: Vec<i32>,
    singles: Vec<bool>,
    keys: Vec<Option<String>>,
    rows: Vec<Option<JsonString>>,
}

impl Columns {
    /// The arrays for `queued` in outbox rows `groups` (see `groups`).
    fn of(queued: Vec<Queued>, groups: Vec<Vec<usize>>) -> Columns {
        let (n, events) = (groups.len(), queued.len());
        let mut c = Columns {
            destinations: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            tables: Vec::with_capacity(n),
            interactions: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            los: Vec::with_capacity(n),
            his: Vec::with_capacity(n),
            singles: Vec::with_capacity(n),
            keys: Vec::with_capacity(events),
            rows: Vec::with_capacity(events),
        };
        let mut queued: Vec<Option<Queued>> = queued.into_iter().map(Some).collect();
        for members in groups {
            c.sizes.push(members.len() as i32);
            c.singles.push(members.len() == 1);
            c.los.push(c.keys.len() as i32 + 1);
            for (k, i) in members.into_iter().enumerate() {
                let q = queued[i].take().expect("each event is in one group");
                if k == 0 {
                    c.destinations.push(q.destination);
                    c.topics.push(q.topic_id);
                    c.tables.push(q.table);
                    c.interactions.push(q.interaction);
                }
                c.keys.push(q.key);
                c.rows.push(q.row.map(JsonString));
            }
            c.his.push(c.keys.len() as i32);
        }
        c
    }
}

/// Run the INSERT as `owner` with a snapshot and, at COMMIT, in a
/// transaction that is not read-only; its plan is taken from `plans` (or
/// prepared) and kept there. How many rows it wrote.
fn write(insert: Insert, plans: &mut Plans, owner: pg_sys::Oid, at_commit: bool) -> u64 {
    // At COMMIT no statement is running: SPI needs a snapshot of its own.
    let push = unsafe { !pg_sys::ActiveSnapshotSet() };
    if push {
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    }
    let read_only =
        at_commit && unsafe { std::mem::replace(&mut *std::ptr::addr_of_mut!(pg_sys::XactReadOnly), false) };
    let which = insert.which;
    let (written, plan) = as_owner(owner, || execute(insert, &mut plans[which]));
    plans[which] = Some(plan);
    if read_only {
        unsafe { pg_sys::XactReadOnly = true };
    }
    if push {
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    written
}

/// Execute the INSERT through SPI with generic plans, preparing it unless
/// `plan` holds it; the rows written, and the plan to keep.
fn execute(insert: Insert, plan: &mut Option<OwnedPreparedStatement>) -> (u64, OwnedPreparedStatement) {
    Spi::connect_mut(|client| {
        let plan = match plan.take() {
            Some(p) => p,
            None => {
                let types: Vec<PgOid> = insert.types.into_iter().map(PgOid::BuiltIn).collect();
                client.prepare_mut(insert.statement, &types)?.keep()
            }
        };
        let _generic = GenericPlans::force();
        client.update(&plan, None, &insert.args)?;
        Ok::<_, pgrx::spi::SpiError>((unsafe { pg_sys::SPI_processed }, plan))
    })
    .unwrap_or_else(|e| {
        UserError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "pg_outbox could not write the outbox")
            .detail(e.to_string())
            .raise()
    })
}

/// Plans are generic while this lives: a custom plan for each execution
/// (what the plan cache picks for these statements, their array arguments
/// being known only then) costs more to plan than the INSERT itself.
struct GenericPlans(i32);

impl GenericPlans {
    fn force() -> GenericPlans {
        let mode = unsafe { std::mem::replace(&mut *std::ptr::addr_of_mut!(pg_sys::plan_cache_mode), 1) };
        GenericPlans(mode)
    }
}

impl Drop for GenericPlans {
    fn drop(&mut self) {
        unsafe { pg_sys::plan_cache_mode = self.0 };
    }
}
