//! Capture: the row trigger `outbox._capture()`, in Rust.
//! - It runs as the writing user: the row becomes JSON (`row_to_json`) with the
//!   writer's rights, so a type's cast to json never runs as the extension owner.
//! - Only the outbox INSERT runs as the extension owner (writers have no rights
//!   on the outbox tables).
//! - A per-backend cache of each topic's destinations and tables is
//!   invalidated by the configuration generation in shared memory.
//! - The watched table's name and the primary key are read from the catalog
//!   (cached until a relcache or namespace invalidation), not from the
//!   trigger's arguments: they follow renames, and a key added later is used.
//! - At-least-once events are kept in backend memory and written to the outbox
//!   with one INSERT when the statement finishes (ExecutorFinish), every 1,000
//!   events, and at COMMIT/PREPARE for what is left (COPY, events of a
//!   subtransaction), in the same transaction: not one INSERT per row.
//! - Best-effort events are kept in backend memory and handed to the shared
//!   queue on COMMIT only (a rolled-back savepoint drops its own events, of
//!   either kind).
//! - One worker wake-up per committing transaction that captured anything.

use crate::error::UserError;
use crate::ring::{self, BestEffortEvent};
use crate::status;
use crate::types::{Content, Kind};
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// What a topic's trigger must do.
#[derive(Default)]
struct Route {
    /// At-least-once destinations: ids, and whether each carries the row.
    at_least_once: Vec<String>,
    at_least_once_rows: Vec<bool>,
    /// Some destination carries the row (full-resource): only then is it turned into JSON.
    needs_row: bool,
    best_effort: Vec<(String, Content)>,
    /// The topic's tables, by oid.
    tables: HashMap<pg_sys::Oid, Watched>,
}

/// A watched table: how its rows become resources, and the FHIRPath test
/// of each row interaction.
#[derive(Default)]
struct Watched {
    /// Aidbox's layout (id, resource jsonb, ...): the resource type.
    resource_type: Option<String>,
    /// Create, update, delete (ROW_INTERACTIONS): the FHIRPath test of the
    /// entries that cover it.
    fhirpath: [FhirpathTest; 3],
}

const ROW_INTERACTIONS: [&str; 3] = ["create", "update", "delete"];

/// A compiled FHIRPath criteria, or why it did not compile (checked when
/// the topic was created, so only after an evaluator change): such a
/// criteria lets every change through with a WARNING, as one that fails at
/// run time does.
type Fhirpath = Result<crate::fhirpath::Criteria, String>;

/// The FHIRPath test of one table and interaction: a change passes when an
/// entry for it has no FHIRPath criteria, or when one of theirs holds.
#[derive(Default)]
struct FhirpathTest {
    unconditional: bool,
    any: Vec<Rc<Fhirpath>>,
}

impl FhirpathTest {
    /// The criteria to evaluate, if any.
    fn needed(&self) -> Option<&[Rc<Fhirpath>]> {
        (!self.unconditional && !self.any.is_empty()).then_some(&self.any)
    }
}

/// Where a changed relation's events come from: the watched table (for a
/// partition, its partitioned table) by its current name, and the
/// relation's current primary key. Cached per (topic, relation) until a
/// relcache or namespace invalidation.
struct Target {
    watched: pg_sys::Oid,
    name: Rc<str>,
    /// The primary key's columns, in index order (empty: no primary key).
    key: Vec<i32>,
}

#[derive(Default)]
struct State {
    callbacks_registered: bool,
    /// Routes by topic id, valid for `generation` unless `dirty`.
    routes: Option<HashMap<i32, Rc<Route>>>,
    /// Targets by (topic id, relation), valid while `targets_epoch` is
    /// `INVALIDATIONS`.
    targets: HashMap<(i32, pg_sys::Oid), Rc<Target>>,
    targets_epoch: u64,
    generation: u64,
    dirty: bool,
    /// This transaction changed the configuration.
    config_changed: bool,
    /// This transaction enqueued at-least-once events.
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

/// An at-least-once event waiting for the next flush into the outbox.
struct Queued {
    subid: pg_sys::SubTransactionId,
    destination: String,
    topic_id: i32,
    table: String,
    interaction: &'static str,
    key: Option<String>,
    row: Option<String>,
}

impl Queued {
    /// Bytes counted against FLUSH_BYTES.
    fn size(&self) -> usize {
        self.table.len() + self.key.as_ref().map_or(0, String::len) + self.row.as_ref().map_or(0, String::len) + 64
    }
}

/// A flush is due at this many queued events or bytes (rows and keys).
const FLUSH_EVENTS: usize = 1000;
const FLUSH_BYTES: usize = 8 << 20;

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn ensure_callbacks(s: &mut State) {
    if !s.callbacks_registered {
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
            pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0));
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(on_namespace),
                pg_sys::Datum::from(0),
            );
        }
        s.callbacks_registered = true;
    }
}

fn load_routes() -> HashMap<i32, Rc<Route>> {
    let mut routes: HashMap<i32, Route> = HashMap::new();
    Spi::connect(|client| {
        let rows = client.select(
            // Runs as the extension owner with the writer's search_path:
            // operators are schema-qualified so none of the writer's can run.
            "SELECT t.id, d.id, d.kind, d.content \
               FROM outbox.destination d JOIN outbox.topic t ON t.url OPERATOR(pg_catalog.=) d.topic_url",
            None,
            &[],
        )?;
        for row in rows {
            let topic: i32 = row.get(1)?.unwrap_or_default();
            let id: String = row.get(2)?.unwrap_or_default();
            let kind: String = row.get(3)?.unwrap_or_default();
            let content: String = row.get(4)?.unwrap_or_default();
            let route = routes.entry(topic).or_default();
            // Names create_destination would refuse (a row edited by hand):
            // keep the whole event in the outbox, where it waits (the worker
            // does not serve such a destination) rather than being lost.
            let content = Content::parse(&content).unwrap_or(Content::FullResource);
            route.needs_row |= content == Content::FullResource;
            if Kind::parse(&kind) == Some(Kind::BestEffort) {
                route.best_effort.push((id, content));
            } else {
                route.at_least_once.push(id);
                route.at_least_once_rows.push(content == Content::FullResource);
            }
        }
        // Every entry of a topic with destinations, with its table.
        let entries = client.select(
            "SELECT e.topic_id, e.table_oid, tt.resource_type, e.interactions, e.fhirpath \
               FROM outbox.topic_entry e JOIN outbox.topic_table tt \
                 ON tt.topic_id OPERATOR(pg_catalog.=) e.topic_id AND tt.table_oid OPERATOR(pg_catalog.=) e.table_oid",
            None,
            &[],
        )?;
        for row in entries {
            let topic: i32 = row.get(1)?.unwrap_or_default();
            let Some(route) = routes.get_mut(&topic) else { continue };
            let table: pg_sys::Oid = row.get(2)?.unwrap_or(pg_sys::Oid::INVALID);
            let watched = route.tables.entry(table).or_default();
            watched.resource_type = row.get(3)?;
            let interactions: Vec<String> = row.get(4)?.unwrap_or_default();
            let criteria = row.get::<String>(5)?.map(|src| Rc::new(crate::fhirpath::compile(&src)));
            for i in interactions.iter().filter_map(|i| ROW_INTERACTIONS.iter().position(|r| r == i)) {
                let test = &mut watched.fhirpath[i];
                match &criteria {
                    Some(c) => test.any.push(c.clone()),
                    None => test.unconditional = true,
                }
            }
        }
        Ok::<_, pgrx::spi::SpiError>(())
    })
    .unwrap_or_else(|e| {
        UserError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "pg_outbox could not read its topics")
            .detail(e.to_string())
            .raise()
    });
    routes.into_iter().map(|(topic, route)| (topic, Rc::new(route))).collect()
}

fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_outbox'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        UserError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_outbox is not installed in this database",
        )
        .raise()
    })
}

/// Run `f` as the extension owner. On an ERROR, (sub)transaction abort
/// restores the writer's identity.
fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
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

/// Make sure the cached routes (and the extension owner) are current.
fn refresh() {
    let generation = status::config_generation();
    let cached = STATE.with(|s| {
        let s = s.borrow();
        s.routes.is_some() && s.generation == generation && !s.dirty
    });
    if cached {
        return;
    }
    let owner = extension_owner();
    let routes = as_owner(owner, load_routes);
    // Under REPEATABLE READ and SERIALIZABLE the query saw the transaction's
    // snapshot, which may predate the generation read above: trust it for this
    // transaction only. Without shared memory (not preloaded) never trust it.
    let this_transaction_only =
        unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 || !crate::preloaded();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        s.routes = Some(routes);
        s.generation = generation;
        s.dirty = false;
        s.reload_after_transaction = this_transaction_only;
        s.owner = owner;
        s.insert_plans = Default::default();
        s.targets.clear();
    });
}

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

/// Queue one event per at-least-once destination of the topic; write the
/// queue out when it is large enough.
fn queue_at_least_once(
    route: &Route,
    topic_id: i32,
    table: &str,
    interaction: &'static str,
    key: Option<String>,
    row: Option<String>,
) {
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let (due, committing) = STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        for (destination, with_row) in route.at_least_once.iter().zip(&route.at_least_once_rows) {
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
fn flush_if_own() {
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
fn flush(at_commit: bool) {
    let (queued, owner, mut plans) = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.queued_bytes = 0;
        (std::mem::take(&mut s.queued), s.owner, std::mem::take(&mut s.insert_plans))
    });
    if queued.is_empty() {
        STATE.with(|s| s.borrow_mut().insert_plans = plans);
        return;
    }
    // Singles keep the plain INSERT; with groups the arrays also say where
    // each group's events lie in the keys and rows.
    let groups = groups(&queued);
    let grouped = groups.len() < queued.len();
    let n = groups.len();
    let (mut destinations, mut topics, mut tables, mut interactions) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut sizes, mut los, mut his, mut singles) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut keys, mut rows) = (Vec::with_capacity(queued.len()), Vec::with_capacity(queued.len()));
    let mut queued: Vec<Option<Queued>> = queued.into_iter().map(Some).collect();
    for members in groups {
        sizes.push(members.len() as i32);
        singles.push(members.len() == 1);
        los.push(keys.len() as i32 + 1);
        for (k, i) in members.into_iter().enumerate() {
            let q = queued[i].take().expect("each event is in one group");
            if k == 0 {
                destinations.push(q.destination);
                topics.push(q.topic_id);
                tables.push(q.table);
                interactions.push(q.interaction);
            }
            keys.push(q.key);
            rows.push(q.row.map(pgrx::datum::JsonString));
        }
        his.push(keys.len() as i32);
    }
    use PgBuiltInOids as T;
    let mut types = vec![T::TEXTARRAYOID, T::INT4ARRAYOID, T::TEXTARRAYOID, T::TEXTARRAYOID];
    let mut args: Vec<pgrx::datum::DatumWithOid> =
        vec![destinations.into(), topics.into(), tables.into(), interactions.into()];
    if grouped {
        types.extend([T::INT4ARRAYOID, T::INT4ARRAYOID, T::INT4ARRAYOID, T::BOOLARRAYOID]);
        args.extend([sizes.into(), los.into(), his.into(), singles.into()]);
    }
    types.extend([T::TEXTARRAYOID, T::JSONARRAYOID]);
    args.extend([keys.into(), rows.into()]);
    let (which, statement) = if grouped { (1, INSERT_EVENTS) } else { (0, INSERT_SINGLE_EVENTS) };
    // At COMMIT no statement is running: SPI needs a snapshot of its own.
    let push = unsafe { !pg_sys::ActiveSnapshotSet() };
    if push {
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    }
    let read_only =
        at_commit && unsafe { std::mem::replace(&mut *std::ptr::addr_of_mut!(pg_sys::XactReadOnly), false) };
    let (written, plan) = as_owner(owner, || {
        Spi::connect_mut(|client| {
            let plan = match plans[which].take() {
                Some(p) => p,
                None => {
                    let types: Vec<PgOid> = types.into_iter().map(PgOid::BuiltIn).collect();
                    client.prepare_mut(statement, &types)?.keep()
                }
            };
            let _generic = GenericPlans::force();
            client.update(&plan, None, &args)?;
            Ok::<_, pgrx::spi::SpiError>((unsafe { pg_sys::SPI_processed }, plan))
        })
        .unwrap_or_else(|e| {
            UserError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_outbox could not write the outbox",
            )
            .detail(e.to_string())
            .raise()
        })
    });
    plans[which] = Some(plan);
    if read_only {
        unsafe { pg_sys::XactReadOnly = true };
    }
    if push {
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.insert_plans = plans;
        if written > 0 {
            s.wake = true;
        }
    });
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

/// Keep a change for the topic's best-effort destinations until COMMIT.
fn buffer_best_effort(
    destinations: &[(String, Content)],
    table: &str,
    interaction: &str,
    key: Option<&str>,
    row: Option<&str>,
) {
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let timestamp_us = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let limit = ring::max_event_bytes();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        for (dest, content) in destinations {
            let row = if *content == Content::FullResource { row } else { None };
            let ev = BestEffortEvent::encode(timestamp_us, dest, table, interaction, key, row);
            // More than the whole queue could take: drop now rather than hold it.
            if s.pending_bytes + ev.len() + 4 > limit {
                s.dropped.push((subid, dest.clone()));
                continue;
            }
            s.pending_bytes += ev.len() + 4;
            s.pending.push((subid, dest.clone(), ev));
        }
    });
}

/// Types whose text form is a JSON number or boolean as it is.
fn json_bare(type_oid: pg_sys::Oid) -> bool {
    [
        pg_sys::INT2OID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::NUMERICOID,
        pg_sys::FLOAT4OID,
        pg_sys::FLOAT8OID,
        pg_sys::OIDOID,
    ]
    .contains(&type_oid)
}

/// The Kafka key: the primary key's text form; a JSON array for several
/// columns (`key`: their attribute numbers).
unsafe fn row_key(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, key: &[i32]) -> Option<String> {
    let value = |attnum: i32| unsafe { crate::rowjson::column_text(tuple, desc, attnum) };
    match key {
        [] => None,
        [one] => value(*one).0,
        many => {
            let parts: Vec<String> = many
                .iter()
                .map(|c| match value(*c) {
                    (None, _) => "null".to_string(),
                    (Some(t), oid) if json_bare(oid) => t,
                    (Some(t), oid) if oid == pg_sys::BOOLOID => (t == "t").to_string(),
                    (Some(t), _) => serde_json::to_string(&t).expect("string"),
                })
                .collect();
            Some(format!("[{}]", parts.join(", ")))
        }
    }
}

/// A column's text form, by name (None if NULL or absent).
unsafe fn column_text(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, name: &std::ffi::CStr) -> Option<String> {
    let attnum = unsafe { pg_sys::SPI_fnumber(desc, name.as_ptr()) };
    if attnum <= 0 {
        return None;
    }
    unsafe { crate::rowjson::column_text(tuple, desc, attnum) }.0
}

/// A timestamp column as ISO 8601 UTC with microseconds, like Aidbox's
/// meta.lastUpdated.
unsafe fn column_instant(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, name: &std::ffi::CStr) -> Option<String> {
    let attnum = unsafe { pg_sys::SPI_fnumber(desc, name.as_ptr()) };
    if attnum <= 0 {
        return None;
    }
    let type_oid = unsafe { pg_sys::SPI_gettypeid(desc, attnum) };
    if type_oid != pg_sys::TIMESTAMPTZOID && type_oid != pg_sys::TIMESTAMPOID {
        return None;
    }
    let mut is_null = false;
    let datum = unsafe { pg_sys::SPI_getbinval(tuple, desc, attnum, &mut is_null) };
    let us = datum.value() as i64;
    // 'infinity' and '-infinity' have no instant.
    (!is_null && us != i64::MAX && us != i64::MIN).then(|| status::format_ts_digits(us, 6))
}

/// A row of a table in Aidbox's layout as the FHIR resource Aidbox would
/// send: `resource` with `resourceType`, `id` and `meta.versionId` (txid) /
/// `meta.lastUpdated` (ts) merged into its own `meta`. Every other value is
/// kept byte for byte as jsonb prints it (numbers are not re-encoded).
unsafe fn fhir_resource(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, resource_type: &str) -> String {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    type Raw = Box<RawValue>;
    let raw = |v: &str| RawValue::from_string(serde_json::to_string(v).expect("a string serializes")).expect("JSON");
    let body = unsafe { column_text(tuple, desc, c"resource") }.unwrap_or_else(|| "{}".into());
    let id = unsafe { column_text(tuple, desc, c"id") };
    let Ok(mut resource) = serde_json::from_str::<BTreeMap<String, Raw>>(&body) else {
        // Not an object we can read (too deeply nested, say): send it as stored.
        return body;
    };
    resource.insert("resourceType".into(), raw(resource_type));
    if let Some(id) = &id {
        resource.insert("id".into(), raw(id));
    }
    let mut meta: BTreeMap<String, Raw> = match resource.remove("meta") {
        Some(m) => match serde_json::from_str(m.get()) {
            Ok(m) => m,
            Err(_) => {
                resource.insert("meta".into(), m); // not an object: leave it
                return serde_json::to_string(&resource).expect("raw values serialize");
            }
        },
        None => BTreeMap::new(),
    };
    if let Some(txid) = unsafe { column_text(tuple, desc, c"txid") } {
        meta.insert("versionId".into(), raw(&txid));
    }
    if let Some(ts) = unsafe { column_instant(tuple, desc, c"ts") } {
        meta.insert("lastUpdated".into(), raw(&ts));
    }
    if !meta.is_empty() {
        let meta = serde_json::to_string(&meta).expect("raw values serialize");
        resource.insert("meta".into(), RawValue::from_string(meta).expect("JSON"));
    }
    serde_json::to_string(&resource).expect("raw values serialize")
}

thread_local! {
    /// Relcache and namespace invalidations this backend has seen: targets
    /// cached before the last one may name a table or key that changed.
    static INVALIDATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    INVALIDATIONS.with(|n| n.set(n.get() + 1));
}

#[pg_guard]
unsafe extern "C-unwind" fn on_namespace(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    INVALIDATIONS.with(|n| n.set(n.get() + 1));
}

/// The target of a change of `rel` for `topic`, cached until an invalidation.
fn target(topic: i32, route: &Route, rel: pg_sys::Relation) -> Rc<Target> {
    let relid = unsafe { (*rel).rd_id };
    let epoch = INVALIDATIONS.with(std::cell::Cell::get);
    let cached = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.targets_epoch != epoch {
            s.targets.clear();
            s.targets_epoch = epoch;
        }
        s.targets.get(&(topic, relid)).cloned()
    });
    if let Some(t) = cached {
        return t;
    }
    // A partition reports the partitioned table the topic watches.
    let watched = if route.tables.contains_key(&relid) {
        relid
    } else {
        unsafe { partition_ancestors(relid) }.into_iter().find(|a| route.tables.contains_key(a)).unwrap_or(relid)
    };
    let t =
        Rc::new(Target { watched, name: unsafe { qualified_name(watched) }.into(), key: unsafe { primary_key(rel) } });
    // Not if the lookups above took in an invalidation: it may be about them.
    if INVALIDATIONS.with(std::cell::Cell::get) == epoch {
        STATE.with(|s| s.borrow_mut().targets.insert((topic, relid), t.clone()));
    }
    t
}

unsafe extern "C-unwind" {
    // catalog/partition.h, which pgrx does not bind.
    fn get_partition_ancestors(relid: pg_sys::Oid) -> *mut pg_sys::List;
}

/// The partitioned tables above `relid`, nearest first.
unsafe fn partition_ancestors(relid: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    unsafe {
        let list = pg_sys::ffi::pg_guard_ffi_boundary(|| get_partition_ancestors(relid));
        let oids = oid_list(list);
        pg_sys::list_free(list);
        oids
    }
}

unsafe fn oid_list(list: *mut pg_sys::List) -> Vec<pg_sys::Oid> {
    if list.is_null() {
        return Vec::new();
    }
    unsafe { (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).oid_value).collect() }
}

/// `schema.table`, unquoted, as the catalog has it now.
unsafe fn qualified_name(relid: pg_sys::Oid) -> String {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            "?".into()
        } else {
            unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    unsafe {
        let schema = text(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid)));
        format!("{schema}.{}", text(pg_sys::get_rel_name(relid)))
    }
}

/// The relation's primary-key columns, in index order (empty without one).
unsafe fn primary_key(rel: pg_sys::Relation) -> Vec<i32> {
    unsafe {
        let indexes = pg_sys::RelationGetIndexList(rel);
        let mut key = Vec::new();
        for index in oid_list(indexes) {
            let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::INDEXRELID as i32, index.into());
            if tuple.is_null() {
                continue;
            }
            let form = &*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_index);
            if form.indisprimary {
                key = form.indkey.values.as_slice(form.indnkeyatts as usize).iter().map(|&a| i32::from(a)).collect();
            }
            pg_sys::ReleaseSysCache(tuple);
            if !key.is_empty() {
                break;
            }
        }
        pg_sys::list_free(indexes);
        key
    }
}

/// Whether a change passes the FHIRPath test; one that cannot be evaluated
/// passes, with a WARNING (an event too many rather than a lost one or a
/// failed write).
fn fhirpath_holds(
    criteria: &[Rc<Fhirpath>],
    op: u32,
    this: &str,
    other: Option<&str>,
    topic: i32,
    table: &str,
) -> bool {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<bool, String> {
        let this: serde_json::Value =
            serde_json::from_str(this).map_err(|e| format!("the resource is not readable JSON: {e}"))?;
        let other: Option<serde_json::Value> = match other {
            Some(o) => {
                Some(serde_json::from_str(o).map_err(|e| format!("the previous resource is not readable JSON: {e}"))?)
            }
            None => None,
        };
        // %current: the row after the change (none on delete); %previous: before it (none on create).
        let (current, previous) = match op {
            pg_sys::TRIGGER_EVENT_INSERT => (Some(&this), None),
            pg_sys::TRIGGER_EVENT_DELETE => (None, Some(&this)),
            _ => (Some(&this), other.as_ref()),
        };
        for c in criteria {
            if c.as_ref().as_ref().map_err(String::clone)?.matches(current, previous)? {
                return Ok(true);
            }
        }
        Ok(false)
    }))
    .unwrap_or_else(|_| Err("the FHIRPath evaluator panicked".to_string()));
    outcome.unwrap_or_else(|e| {
        pgrx::warning!(
            "pg_outbox: the fhirPathCriteria of topic {topic} on {table} could not be evaluated ({e}); the change is sent as if it matched"
        );
        true
    })
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
    refresh();
    let Some(route) = STATE.with(|s| s.borrow().routes.as_ref().and_then(|r| r.get(&topic_id).cloned())) else {
        return Ok(None); // no destination (yet)
    };
    let target = target(topic_id, &route, td.tg_relation);
    let table = &*target.name;
    let (tuple, interaction) = match op {
        pg_sys::TRIGGER_EVENT_INSERT => (td.tg_trigtuple, 0),
        pg_sys::TRIGGER_EVENT_UPDATE => (td.tg_newtuple, 1),
        pg_sys::TRIGGER_EVENT_DELETE => (td.tg_trigtuple, 2),
        _ => {
            // TRUNCATE: no row, no key.
            enqueue(&route, topic_id, table, "truncate", None, None);
            return Ok(None);
        }
    };
    let watched = route.tables.get(&target.watched);
    let fhir_type = watched.and_then(|w| w.resource_type.as_deref());
    let (relid, desc) = unsafe { ((*td.tg_relation).rd_id, (*td.tg_relation).rd_att) };
    // The changed row as a resource (JSON text): Aidbox's for FHIR tables, else the row.
    let text_of = |t: pg_sys::HeapTuple| -> String {
        match fhir_type {
            Some(rt) => unsafe { fhir_resource(t, desc, rt) },
            // As row_to_json prints it, with the writer's rights.
            None => unsafe { crate::rowjson::row_json(relid, t, desc) },
        }
    };
    let criteria = watched.and_then(|w| w.fhirpath[interaction].needed());
    let mut text = (route.needs_row || criteria.is_some()).then(|| text_of(tuple));
    if let Some(criteria) = criteria {
        let other = (op == pg_sys::TRIGGER_EVENT_UPDATE).then(|| text_of(td.tg_trigtuple));
        if !fhirpath_holds(criteria, op, text.as_deref().unwrap_or("{}"), other.as_deref(), topic_id, table) {
            return Ok(None);
        }
    }
    let row = if route.needs_row { text.take() } else { None };
    let key = unsafe { row_key(tuple, desc, &target.key) };
    enqueue(&route, topic_id, table, ROW_INTERACTIONS[interaction], key, row);
    Ok(None)
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
) {
    if !route.best_effort.is_empty() {
        buffer_best_effort(&route.best_effort, table, interaction, key.as_deref(), row.as_deref());
    }
    if !route.at_least_once.is_empty() {
        queue_at_least_once(route, topic_id, table, interaction, key, row);
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

/// Hand the transaction's best-effort events to the shared queue. Runs after
/// the commit is durable: must not fail.
fn hand_over(s: &mut State) -> bool {
    if s.pending.is_empty() && s.dropped.is_empty() {
        return false;
    }
    let committed_us = unsafe { pg_sys::GetCurrentTimestamp() };
    let mut encoded: Vec<Vec<u8>> = s
        .pending
        .iter_mut()
        .map(|(_, _, ev)| {
            ring::stamp_commit(ev, committed_us);
            std::mem::take(ev)
        })
        .collect();
    let accepted = ring::push(&mut encoded);
    let mut lost: HashMap<&str, u64> = HashMap::new();
    for ((_, dest, _), ok) in s.pending.iter().zip(&accepted) {
        if !ok {
            *lost.entry(dest.as_str()).or_default() += 1;
        }
    }
    for (_, dest) in &s.dropped {
        *lost.entry(dest.as_str()).or_default() += 1;
    }
    for (dest, n) in lost {
        status::add_lost(dest, n);
    }
    accepted.iter().any(|ok| *ok)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    // Still inside the transaction (an error aborts it): the queued
    // at-least-once events go into the outbox with the changes.
    if matches!(event, XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE) {
        if STATE.with(|s| s.try_borrow().is_ok_and(|s| !s.queued.is_empty())) {
            flush(true);
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
            XACT_EVENT_COMMIT => {
                // After the commit an ERROR would be a PANIC: contain any panic.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let pushed = hand_over(&mut s);
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
                reset(&mut s);
                if outcome.is_err() {
                    pgrx::warning!("pg_outbox: handing over this transaction's best-effort events failed");
                }
            }
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
