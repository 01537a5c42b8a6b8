//! Capture: the row trigger `outbox._capture()`, in Rust.
//! - It runs as the writing user: the row becomes JSON (`row_to_json`) with the
//!   writer's rights, so a type's cast to json never runs as the extension owner.
//! - Only the outbox INSERT runs as the extension owner (writers have no rights
//!   on the outbox tables).
//! - A per-backend cache of each topic's destinations is invalidated by the
//!   configuration generation in shared memory.
//! - At-least-once events are kept in backend memory and written to the outbox
//!   with one INSERT when the statement finishes (ExecutorFinish), every 1,000
//!   events, and at COMMIT/PREPARE for what is left (COPY, events of a
//!   subtransaction), in the same transaction: not one INSERT per row.
//! - Best-effort events are kept in backend memory and handed to the shared
//!   queue on COMMIT only (a rolled-back savepoint drops its own events, of
//!   either kind).
//! - One worker wake-up per committing transaction that captured anything.

use crate::kafka::Content;
use crate::ring::{self, BestEffortEvent};
use crate::status;
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
    /// Per watched table (schema-qualified), when it is a FHIR table or has
    /// FHIRPath criteria.
    shapes: HashMap<String, Shape>,
}

/// How a watched table's rows become resources, and its FHIRPath criteria.
struct Shape {
    /// Aidbox's layout (id, resource jsonb, ...): the resource type.
    resource_type: Option<String>,
    criteria: Option<crate::fhirpath::Criteria>,
}

#[derive(Default)]
struct State {
    callbacks_registered: bool,
    /// Routes by topic id, valid for `generation` unless `dirty`.
    routes: Option<HashMap<i32, Rc<Route>>>,
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
            let content = Content::parse(&content);
            route.needs_row |= content == Content::FullResource;
            if kind == "kafka-best-effort" {
                route.best_effort.push((id, content));
            } else {
                route.at_least_once.push(id);
                route.at_least_once_rows.push(content == Content::FullResource);
            }
        }
        let shapes = client.select(
            "SELECT topic_id, table_name, resource_type, fhirpath FROM outbox.topic_table \
              WHERE resource_type IS NOT NULL OR fhirpath IS NOT NULL",
            None,
            &[],
        )?;
        for row in shapes {
            let topic: i32 = row.get(1)?.unwrap_or_default();
            let Some(route) = routes.get_mut(&topic) else { continue };
            let table: String = row.get(2)?.unwrap_or_default();
            let resource_type: Option<String> = row.get(3)?;
            let criteria = row.get::<String>(4)?.map(|src| {
                crate::fhirpath::compile(&src)
                    .unwrap_or_else(|e| pgrx::error!("pg_outbox: fhirPathCriteria of topic {topic} on {table}: {e}"))
            });
            route.shapes.insert(table, Shape { resource_type, criteria });
        }
        Ok::<_, pgrx::spi::SpiError>(())
    })
    .unwrap_or_else(|e| pgrx::error!("pg_outbox: reading destinations failed: {e}"));
    routes.into_iter().map(|(topic, route)| (topic, Rc::new(route))).collect()
}

fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_outbox'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| pgrx::error!("pg_outbox: the extension is not installed in this database"))
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
        .unwrap_or_else(|e| pgrx::error!("pg_outbox: writing the outbox failed: {e}"))
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

/// The Kafka key: the primary key's text form; a JSON array for several columns.
unsafe fn row_key(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, columns: &[&std::ffi::CStr]) -> Option<String> {
    let value = |name: &std::ffi::CStr| -> (Option<String>, pg_sys::Oid) {
        let attnum = unsafe { pg_sys::SPI_fnumber(desc, name.as_ptr()) };
        if attnum <= 0 {
            pgrx::error!("pg_outbox: key column \"{}\" is missing", name.to_string_lossy());
        }
        unsafe { crate::rowjson::column_text(tuple, desc, attnum) }
    };
    match columns {
        [] => None,
        [one] => value(one).0,
        many => {
            let parts: Vec<String> = many
                .iter()
                .map(|c| match value(c) {
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

/// The row trigger the API attaches: `outbox._capture(topic_id, table, key columns...)`.
#[pg_trigger]
fn _capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let td = trigger.trigger_data();
    // The arguments as they are (PgTrigger::extra_args copies them per row).
    let args: Vec<&std::ffi::CStr> = unsafe {
        let t = &*td.tg_trigger;
        match usize::try_from(t.tgnargs) {
            Ok(n) if n > 0 => {
                std::slice::from_raw_parts(t.tgargs, n).iter().map(|a| std::ffi::CStr::from_ptr(*a)).collect()
            }
            _ => Vec::new(),
        }
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.to_str().ok());
    let (Some(topic_id), Some(table)) = (arg(0).and_then(|a| a.parse::<i32>().ok()), arg(1)) else {
        pgrx::error!("pg_outbox: outbox._capture() needs a topic id and a table name as trigger arguments");
    };
    refresh();
    let Some(route) = STATE.with(|s| s.borrow().routes.as_ref().and_then(|r| r.get(&topic_id).cloned())) else {
        return Ok(None); // no destination (yet)
    };
    let op = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let (tuple, interaction) = if op == pg_sys::TRIGGER_EVENT_INSERT {
        (td.tg_trigtuple, "create")
    } else if op == pg_sys::TRIGGER_EVENT_UPDATE {
        (td.tg_newtuple, "update")
    } else {
        (td.tg_trigtuple, "delete")
    };
    let shape = route.shapes.get(table);
    let fhir_type = shape.and_then(|s| s.resource_type.as_deref());
    let (relid, desc) = unsafe { ((*td.tg_relation).rd_id, (*td.tg_relation).rd_att) };
    // The changed row as a resource (JSON text): Aidbox's for FHIR tables, else the row.
    let text_of = |t: pg_sys::HeapTuple| -> String {
        match fhir_type {
            Some(rt) => unsafe { fhir_resource(t, desc, rt) },
            // As row_to_json prints it, with the writer's rights.
            None => unsafe { crate::rowjson::row_json(relid, t, desc) },
        }
    };
    let criteria = shape.and_then(|s| s.criteria.as_ref());
    let mut text = (route.needs_row || criteria.is_some()).then(|| text_of(tuple));
    if let Some(criteria) = criteria {
        // %current: the row after the change (none on delete); %previous: before it (none on create).
        let (this, other) =
            (text.as_deref().unwrap_or("{}"), (op == pg_sys::TRIGGER_EVENT_UPDATE).then(|| text_of(td.tg_trigtuple)));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<bool, String> {
            let this: serde_json::Value =
                serde_json::from_str(this).map_err(|e| format!("the resource is not readable JSON: {e}"))?;
            let other: Option<serde_json::Value> = match &other {
                Some(o) => Some(
                    serde_json::from_str(o).map_err(|e| format!("the previous resource is not readable JSON: {e}"))?,
                ),
                None => None,
            };
            let (current, previous) = match op {
                pg_sys::TRIGGER_EVENT_INSERT => (Some(&this), None),
                pg_sys::TRIGGER_EVENT_DELETE => (None, Some(&this)),
                _ => (Some(&this), other.as_ref()),
            };
            criteria.matches(current, previous)
        }))
        .unwrap_or_else(|_| Err("the FHIRPath evaluator panicked".to_string()));
        match outcome {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            // Fail open: an event too many rather than a lost one or a failed write.
            Err(e) => pgrx::warning!(
                "pg_outbox: the fhirPathCriteria of topic {topic_id} on {table} could not be evaluated ({e}); the change is sent as if it matched"
            ),
        }
    }
    let row = if route.needs_row { text.take() } else { None };
    let key = unsafe { row_key(tuple, desc, &args[2..]) };
    if !route.best_effort.is_empty() {
        buffer_best_effort(&route.best_effort, table, interaction, key.as_deref(), row.as_deref());
    }
    if !route.at_least_once.is_empty() {
        queue_at_least_once(&route, topic_id, table, interaction, key, row);
    }
    Ok(None)
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
