//! The outbox table as the worker sees it: claim a batch, acknowledge what
//! Kafka accepted, record failed attempts, load the configuration. Callers run
//! these inside a worker transaction (see `worker::in_transaction`). The
//! enqueue side is the row trigger's, in src/capture/outbox.rs.

use crate::types::{share, Content, Event, Kind};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;
use std::rc::Rc;

/// A destination as configured in `outbox.destination`.
pub struct DestinationRow {
    pub id: String,
    pub kind: Kind,
    pub topic_url: String,
    pub content: Content,
    pub parameters: String,
    /// pause_destination(): nothing is delivered until resume_destination().
    pub paused: bool,
    /// It has a retention: delivered events go to outbox.delivered.
    pub retain: bool,
    /// The backfill under way (outbox.backfill), if any.
    pub backfill: Option<i64>,
    /// FHIR resource type by watched table (schema-qualified), for the
    /// topic's tables in Aidbox's layout.
    pub resource_types: std::collections::HashMap<String, String>,
}

/// The extension's pg_extension oid, if it is installed in this database.
pub fn extension_oid() -> SpiResult<Option<pg_sys::Oid>> {
    Spi::get_one::<pg_sys::Oid>("SELECT (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'pg_outbox')")
}

/// Remove events whose destination no longer exists.
pub fn delete_orphans() -> SpiResult<()> {
    Spi::run(
        "DELETE FROM outbox.event e WHERE NOT EXISTS \
           (SELECT 1 FROM outbox.destination d WHERE d.id = e.destination_id)",
    )
}

/// The outbox's partitions, `outbox.event_0` .. (sql/schema.sql).
pub const PARTS: u32 = 3;

/// Each outbox partition's size in bytes (its heap: 0 once emptied); None
/// before `ALTER EXTENSION pg_outbox UPDATE` made the outbox partitioned.
pub fn part_sizes() -> SpiResult<Option<[i64; PARTS as usize]>> {
    Spi::connect(|client| {
        let row = client
            .select(
                "SELECT pg_catalog.pg_relation_size(pg_catalog.to_regclass('outbox.event_0')), \
                        pg_catalog.pg_relation_size(pg_catalog.to_regclass('outbox.event_1')), \
                        pg_catalog.pg_relation_size(pg_catalog.to_regclass('outbox.event_2'))",
                None,
                &[],
            )?
            .first();
        match (row.get(1)?, row.get(2)?, row.get(3)?) {
            (Some(a), Some(b), Some(c)) => Ok(Some([a, b, c])),
            _ => Ok(None),
        }
    })
}

/// Empty outbox partition `part` with TRUNCATE if no event in it waits for
/// delivery; true if it is empty now. Never waits: a transaction writing
/// into it, or reading it, holds a lock on it until it ends, and then the
/// partition is left for the next try.
pub fn truncate_if_empty(part: u32) -> SpiResult<bool> {
    let name = format!("outbox.event_{part}");
    let Some(relid) = Spi::get_one::<pg_sys::Oid>(&format!("SELECT '{name}'::pg_catalog.regclass::pg_catalog.oid"))?
    else {
        return Ok(false);
    };
    if !unsafe { pg_sys::ConditionalLockRelationOid(relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) } {
        return Ok(false);
    }
    Spi::connect_mut(|client| {
        // Not read-only: the statement takes a snapshot after the lock
        // (the worker runs in READ COMMITTED), so it sees every event
        // committed into the partition; none can be in progress.
        let waiting: Option<bool> =
            client.update(&format!("SELECT EXISTS (SELECT 1 FROM {name})"), None, &[])?.first().get(1)?;
        if waiting != Some(false) {
            return Ok(false);
        }
        client.update(&format!("TRUNCATE {name}"), None, &[])?;
        Ok(true)
    })
}

/// What of 0.4.0's SQL is installed: the library serves 0.3.0's until
/// ALTER EXTENSION UPDATE. Read with the configuration.
#[derive(Clone, Copy, Default)]
pub struct Layout {
    /// `outbox.event.traceparent` and `outbox.dead_letter.traceparent`.
    pub traceparent: bool,
    /// `outbox.destination.paused_at`.
    pub paused_at: bool,
    /// `outbox.backfill`.
    pub backfill: bool,
    /// `outbox.destination.retention` (and `outbox.delivered`).
    pub retention: bool,
}

thread_local! {
    static LAYOUT: std::cell::Cell<Layout> = const {
        std::cell::Cell::new(Layout { traceparent: false, paused_at: false, backfill: false, retention: false })
    };
}

/// Look which of 0.4.0's columns and tables are there.
pub fn read_layout() -> SpiResult<Layout> {
    let column = |table: &str, column: &str| {
        format!(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass('{table}') \
                       AND attname = '{column}' AND NOT attisdropped)"
        )
    };
    let found = Spi::get_one::<Vec<bool>>(&format!(
        "SELECT ARRAY[{}, {}, pg_catalog.to_regclass('outbox.backfill') IS NOT NULL, {}]",
        column("outbox.event", "traceparent"),
        column("outbox.destination", "paused_at"),
        column("outbox.destination", "retention"),
    ))?
    .unwrap_or_default();
    let has = |i: usize| found.get(i).copied().unwrap_or(false);
    let layout = Layout { traceparent: has(0), paused_at: has(1), backfill: has(2), retention: has(3) };
    LAYOUT.with(|l| l.set(layout));
    Ok(layout)
}

fn traceparent_stored() -> bool {
    LAYOUT.with(|l| l.get().traceparent)
}

/// The backfills under way: (destination, backfill id), oldest first.
fn backfills_in(client: &pgrx::spi::SpiClient<'_>) -> SpiResult<Vec<(String, i64)>> {
    if !LAYOUT.with(|l| l.get().backfill) {
        return Ok(Vec::new());
    }
    client
        .select("SELECT destination_id, id FROM outbox.backfill WHERE status = 'running' ORDER BY id", None, &[])?
        .map(|row| Ok((row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or_default())))
        .collect()
}

/// One batch of backfill `id` (outbox._backfill_step): rows sent, 0 when
/// it is over, -1 when its destination has a batch's worth waiting.
pub fn backfill_step(id: i64) -> SpiResult<i32> {
    Ok(Spi::get_one_with_args::<i32>("SELECT outbox._backfill_step($1)", &[id.into()])?.unwrap_or(0))
}

/// Every destination (but one whose kind or content the SQL API would have
/// refused, with a WARNING: its events wait in the outbox).
pub fn destinations() -> SpiResult<Vec<DestinationRow>> {
    let layout = LAYOUT.with(std::cell::Cell::get);
    Spi::connect(|client| {
        let rows = client.select(
            &format!(
                "SELECT id, topic_url, content, parameters::text, kind, {}, {} FROM outbox.destination d ORDER BY id",
                if layout.paused_at { "paused_at IS NOT NULL" } else { "false" },
                if layout.retention { "retention IS NOT NULL" } else { "false" }
            ),
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            let id: String = row.get(1)?.unwrap_or_default();
            let content: String = row.get(3)?.unwrap_or_default();
            let kind: String = row.get(5)?.unwrap_or_default();
            let (Some(kind), Some(content)) = (Kind::parse(&kind), Content::parse(&content)) else {
                pgrx::warning!(
                    "pg_outbox: destination \"{id}\" skipped: unknown kind \"{kind}\" or content \"{content}\""
                );
                continue;
            };
            out.push(DestinationRow {
                id,
                topic_url: row.get(2)?.unwrap_or_default(),
                content,
                parameters: row.get(4)?.unwrap_or_default(),
                kind,
                paused: row.get(6)?.unwrap_or(false),
                retain: row.get(7)?.unwrap_or(false),
                backfill: None,
                resource_types: Default::default(),
            });
        }
        for (destination, id) in backfills_in(client)? {
            if let Some(d) = out.iter_mut().find(|d| d.id == destination) {
                d.backfill = Some(id);
            }
        }
        for (url, table, resource_type) in resource_types_in(client)? {
            for d in out.iter_mut().filter(|d| d.topic_url == url) {
                d.resource_types.insert(table.clone(), resource_type.clone());
            }
        }
        Ok(out)
    })
}

/// The FHIR resource type of each table name events may carry, per topic url:
/// (url, table name, resource type).
pub fn resource_types() -> SpiResult<Vec<(String, String, String)>> {
    Spi::connect(resource_types_in)
}

fn resource_types_in(client: &pgrx::spi::SpiClient<'_>) -> SpiResult<Vec<(String, String, String)>> {
    let rows = client.select(
        // Events carry the name their table had when they were captured:
        // its name now (also if no event trigger recorded a rename), the
        // ones it had before, and those of tables no longer watched.
        "SELECT t.url, n.name, tt.resource_type FROM outbox.topic_table tt \
           JOIN outbox.topic t ON t.id = tt.topic_id \
           CROSS JOIN LATERAL unnest(tt.table_name || tt.former_names || \
             (SELECT s.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace \
           WHERE tt.watched AND c.oid = tt.table_oid)) AS n (name) \
          WHERE tt.resource_type IS NOT NULL AND n.name IS NOT NULL \
          ORDER BY tt.watched, n.name = tt.table_name", // a name's current table last: it wins
        None,
        &[],
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push((row.get(1)?.unwrap_or_default(), row.get(2)?.unwrap_or_default(), row.get(3)?.unwrap_or_default()));
    }
    Ok(out)
}

/// What a claim saw: its events, and the transactions in progress then,
/// which alone may still commit events numbered below the claimed ones.
pub struct Claimed {
    pub events: Vec<Event>,
    /// Outbox rows they came from.
    pub rows: usize,
    /// The snapshot's xmax and xip: a transaction is running in it if listed
    /// in xip or not below xmax (nothing at or above xmax has completed).
    xmax: u64,
    xip: Vec<u64>,
    /// The next transaction id, read after the claim.
    next_xid: u64,
}

impl Claimed {
    /// Whether `xid` was still running when this claim's snapshot was taken.
    pub fn running(&self, xid: u64) -> bool {
        // An unreadable snapshot (xmax 0) vouches for nothing.
        (self.xmax > 0 && xid >= self.xmax) || self.xip.contains(&xid)
    }

    /// The transactions that were running in the snapshot: the xip list and
    /// those at or above xmax (pg_snapshot_xip leaves those out), up to the
    /// next id read afterwards (later ones number their events higher).
    /// None when there are too many to watch (many subtransaction ids): the
    /// next claim then scans from the start.
    pub fn in_progress(&self) -> Option<Vec<u64>> {
        let above = self.next_xid.saturating_sub(self.xmax);
        if self.xmax == 0 || self.xip.len() as u64 + above > 10_000 {
            return None;
        }
        let mut all = self.xip.clone();
        all.extend(self.xmax..self.xmax + above);
        Some(all)
    }
}

/// The oldest outbox rows of a destination numbered above `after`, in id
/// order, leaving out `skip` (outbox rows already in flight: groups, and
/// events that may be rows of their own), up to
/// `limit` events (a group is taken whole, the first row even if larger)
/// among the first `rows` rows: their events, groups unfolded in order. With `limit` 1 (isolating a
/// poison event) a group is first split into single events, and only its
/// first is taken.
pub fn claim(destination_id: &str, after: i64, skip: &[i64], limit: i64, rows: i64) -> SpiResult<Claimed> {
    // When the last claim's rows were single events (`rows` reaches `limit`),
    // one pass reads them: the window over them cost a quarter of the claim.
    // That pass leaves groups' arrays unread: if it reaches a group it would
    // take, the claim is made again in two passes.
    let mut claimed = match claim_rows(destination_id, after, skip, limit, rows, rows >= limit)? {
        Some(c) => c,
        None => claim_rows(destination_id, after, skip, limit, rows, false)?.expect("a two-pass claim"),
    };
    if limit == 1 && claimed.events.len() > 1 {
        let group = claimed.events[0].group;
        split(destination_id, &[group], &[])?;
        claimed.events.truncate(1);
        claimed.events[0].group = 0;
    }
    Ok(claimed)
}

/// The types of the claim's columns, in the order its SELECT lists them.
const CLAIM_COLUMNS: [pg_sys::Oid; 13] = {
    use pg_sys::{BOOLOID, INT8ARRAYOID, INT8OID, TEXTARRAYOID, TEXTOID, TIMESTAMPTZOID};
    [
        INT8OID,
        TEXTOID,
        TEXTOID,
        TEXTOID,
        TEXTOID,
        TIMESTAMPTZOID,
        TEXTOID,
        INT8ARRAYOID,
        TEXTARRAYOID,
        TEXTARRAYOID,
        TIMESTAMPTZOID,
        BOOLOID,
        TEXTOID,
    ]
};

/// Column `c` (1-based) of a claim row as a `T` (of the type
/// `CLAIM_COLUMNS` gives it).
fn get<T: FromDatum>(values: &[pg_sys::Datum], nulls: &[bool], c: usize) -> Option<T> {
    unsafe { T::from_datum(values[c - 1], nulls[c - 1]) }
}

/// A row handed over by the executor (its values and nulls); false when no
/// more rows are wanted.
type Take<'a> = dyn FnMut(&[pg_sys::Datum], &[bool]) -> bool + 'a;

/// Run the query `sql` (its columns `CLAIM_COLUMNS`) with `params` (type,
/// value or NULL), planned for their values, and hand each row to `take` as
/// the executor makes it. SPI's own receiver copied every row into its tuple
/// table first (a twentieth of the worker's main thread on a single-row
/// drain), to be read back from there.
fn select_into(sql: &str, params: &[(pg_sys::Oid, Option<pg_sys::Datum>)], take: &mut Take<'_>) {
    let src = std::ffi::CString::new(sql).expect("the claim's SQL has no NUL");
    let mut types: Vec<pg_sys::Oid> = params.iter().map(|(t, _)| *t).collect();
    unsafe {
        // A custom plan, as SPI_execute_with_args makes (the worker also sets
        // plan_cache_mode, which comes first): Postgres (15 and later) hashes
        // the skip list only when it plans for its value.
        let plan = pg_sys::SPI_prepare_cursor(
            src.as_ptr(),
            params.len() as i32,
            types.as_mut_ptr(),
            (pg_sys::CURSOR_OPT_CUSTOM_PLAN | pg_sys::CURSOR_OPT_PARALLEL_OK) as i32,
        );
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            pgrx::error!("pg_outbox: preparing the claim failed (SPI code {code})");
        }
        let mut receiver = Receiver {
            base: pg_sys::DestReceiver {
                receiveSlot: Some(receive),
                rStartup: Some(startup),
                rShutdown: Some(nothing),
                rDestroy: Some(nothing),
                mydest: pg_sys::CommandDest::DestNone,
            },
            take,
        };
        let options = pg_sys::SPIExecuteOptions {
            params: param_list(params),
            // As pgrx's queries: read-only until the transaction writes.
            read_only: pg_sys::GetCurrentTransactionIdIfAny() == pg_sys::InvalidTransactionId,
            // A pointer to the whole receiver: `receive` reads past `base`.
            dest: (&raw mut receiver).cast(),
            ..Default::default()
        };
        let code = pg_sys::SPI_execute_plan_extended(plan, &options);
        if code < 0 {
            pgrx::error!("pg_outbox: the claim failed (SPI code {code})");
        }
        pg_sys::SPI_freeplan(plan);
    }
}

/// The parameters as constants, for a plan made for their values.
unsafe fn param_list(params: &[(pg_sys::Oid, Option<pg_sys::Datum>)]) -> pg_sys::ParamListInfo {
    unsafe {
        let list = pg_sys::makeParamList(params.len() as i32);
        for (slot, (ptype, value)) in (*list).params.as_mut_slice(params.len()).iter_mut().zip(params) {
            *slot = pg_sys::ParamExternData {
                value: value.unwrap_or(pg_sys::Datum::from(0)),
                isnull: value.is_none(),
                pflags: pg_sys::PARAM_FLAG_CONST as u16,
                ptype: *ptype,
            };
        }
        list
    }
}

/// The executor's receiver for `select_into`.
#[repr(C)]
struct Receiver<'a, 'b> {
    // First: the executor sees a DestReceiver.
    base: pg_sys::DestReceiver,
    take: &'a mut Take<'b>,
}

#[pg_guard]
unsafe extern "C-unwind" fn receive(slot: *mut pg_sys::TupleTableSlot, me: *mut pg_sys::DestReceiver) -> bool {
    unsafe {
        let natts = (*(*slot).tts_tupleDescriptor).natts;
        if ((*slot).tts_nvalid as i32) < natts {
            pg_sys::slot_getsomeattrs_int(slot, natts);
        }
        let values = std::slice::from_raw_parts((*slot).tts_values, natts as usize);
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts as usize);
        ((*(me as *mut Receiver)).take)(values, nulls)
    }
}

/// The columns' types are checked once per query.
#[pg_guard]
unsafe extern "C-unwind" fn startup(
    _me: *mut pg_sys::DestReceiver,
    _operation: std::ffi::c_int,
    desc: pg_sys::TupleDesc,
) {
    unsafe {
        assert!((*desc).natts as usize == CLAIM_COLUMNS.len(), "the claim's columns");
        for (c, expected) in CLAIM_COLUMNS.into_iter().enumerate() {
            assert!(pg_sys::SPI_gettypeid(desc, c as i32 + 1) == expected, "claim column {}", c + 1);
        }
    }
}

unsafe extern "C-unwind" fn nothing(_me: *mut pg_sys::DestReceiver) {}

/// `claim` in one pass (None if it reached a group to take) or two.
fn claim_rows(
    destination_id: &str,
    after: i64,
    skip: &[i64],
    limit: i64,
    rows: i64,
    one_pass: bool,
) -> SpiResult<Option<Claimed>> {
    let sql = claim_sql(one_pass);
    let mut reader = ClaimReader::new(destination_id, limit, one_pass);
    Spi::connect(|_| {
        use pg_sys::{BOOLOID, INT8ARRAYOID, INT8OID, TEXTOID};
        select_into(
            &sql,
            &[
                (TEXTOID, destination_id.into_datum()),
                (INT8OID, after.into_datum()),
                (INT8ARRAYOID, skip.to_vec().into_datum()),
                (INT8OID, limit.into_datum()),
                (INT8OID, rows.max(1).into_datum()),
                // Latency counts from the commit when Postgres records it.
                (BOOLOID, unsafe { pg_sys::track_commit_timestamp }.into_datum()),
            ],
            &mut |values, nulls| reader.take(values, nulls),
        )
    });
    if reader.reached_group {
        return Ok(None);
    }
    let mut out = reader.out;
    out.next_xid = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    Ok(Some(out))
}

/// The claim's statement: the rows, then one row with the snapshot they
/// were read with (one statement, so the snapshot reported is that one).
/// Two passes find the last row to take from ids and event counts alone,
/// among `rows` rows (the window over whole rows copied up to `limit` rows
/// of up to 8 kB each, and reading `limit` rows to take a few hundred
/// groups was a third of a large statements' drain); one pass leaves the
/// groups' arrays unread.
fn claim_sql(one_pass: bool) -> String {
    let (last, arrays) = if one_pass {
        ("ORDER BY e.id LIMIT $5", "NULL::bigint[], NULL::text[], NULL::text[]")
    } else {
        (
            "AND e.id <= (SELECT max(w.id) \
                            FROM (SELECT v.id, sum(v.events) OVER (ORDER BY v.id ROWS UNBOUNDED PRECEDING) \
                                               - v.events AS before \
                                    FROM (SELECT id, events FROM outbox.event \
                                           WHERE destination_id = $1 AND id > $2 AND id <> ALL($3) \
                                           ORDER BY id LIMIT $5) v) w \
                           WHERE w.before < $4) \
             ORDER BY e.id",
            "e.ids, e.keys, e.rows::text[]",
        )
    };
    format!(
        "(SELECT e.id, e.table_name, e.interaction, e.key, e.row_data::text, e.created_at, \
                 NULL::text, {arrays}, \
                 CASE WHEN $6 THEN pg_catalog.pg_xact_commit_timestamp(e.xmin) END, e.ids IS NOT NULL, {trace} \
            FROM outbox.event e \
           WHERE e.destination_id = $1 AND e.id > $2 AND e.id <> ALL($3) {last}) \
         UNION ALL \
         SELECT NULL, NULL, NULL, NULL, NULL, NULL, pg_catalog.pg_current_snapshot()::text, NULL, NULL, \
                NULL, NULL, NULL, NULL",
        trace = if traceparent_stored() { "e.traceparent" } else { "NULL::text" }
    )
}

/// Turns the claim's rows into events as the executor makes them.
struct ClaimReader<'a> {
    destination_id: &'a str,
    limit: i64,
    one_pass: bool,
    out: Claimed,
    /// The last table and interaction, shared by the events that have them.
    shared: [Option<Rc<str>>; 2],
    /// The last timestamp and its millisecond: rows of the same millisecond
    /// share it without formatting theirs.
    stamp: Option<(i64, Rc<str>)>,
    /// A one-pass claim stops at the first group it would take.
    reached_group: bool,
}

impl<'a> ClaimReader<'a> {
    fn new(destination_id: &'a str, limit: i64, one_pass: bool) -> ClaimReader<'a> {
        ClaimReader {
            destination_id,
            limit,
            one_pass,
            out: Claimed { events: Vec::new(), rows: 0, xmax: 0, xip: Vec::new(), next_xid: 0 },
            shared: [None, None],
            stamp: None,
            reached_group: false,
        }
    }

    /// One row of the claim; false: no more are wanted.
    fn take(&mut self, values: &[pg_sys::Datum], nulls: &[bool]) -> bool {
        let Some(id) = get::<i64>(values, nulls, 1) else {
            self.snapshot(get(values, nulls, 7).unwrap_or_default());
            return true;
        };
        // A row is taken while fewer than `limit` events are (a group whole).
        if self.out.events.len() as i64 >= self.limit {
            return true;
        }
        if self.one_pass && get::<bool>(values, nulls, 12).unwrap_or(false) {
            self.reached_group = true;
            return false;
        }
        self.out.rows += 1;
        self.push_events(id, values, nulls);
        true
    }

    /// The snapshot's text: xmin:xmax:xip,xip,...
    fn snapshot(&mut self, snapshot: String) {
        let mut parts = snapshot.split(':');
        let _xmin = parts.next();
        self.out.xmax = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        self.out.xip = parts.next().unwrap_or("").split(',').filter_map(|x| x.parse().ok()).collect();
    }

    /// The events of outbox row `id`: itself, or its group's, in order.
    fn push_events(&mut self, id: i64, values: &[pg_sys::Datum], nulls: &[bool]) {
        let get_ts = |c: usize| (!nulls[c - 1]).then(|| values[c - 1].value() as i64);
        let table = share(&mut self.shared[0], get::<&str>(values, nulls, 2).unwrap_or_default());
        let interaction = share(&mut self.shared[1], get::<&str>(values, nulls, 3).unwrap_or_default());
        // Formatted here: to_char() was a tenth of the claim's time.
        let created_us = get_ts(6).unwrap_or(0);
        let ms = created_us.div_euclid(1000);
        let timestamp = match &self.stamp {
            Some((shown, t)) if *shown == ms => t.clone(),
            _ => self.stamp.insert((ms, Rc::from(crate::status::format_ts(created_us)))).1.clone(),
        };
        let born_us = get_ts(11).unwrap_or(created_us);
        let traceparent: Option<Rc<str>> = get::<&str>(values, nulls, 13).map(Rc::from);
        let event = |id, group, key, row| Event {
            id,
            group,
            table: table.clone(),
            interaction: interaction.clone(),
            key,
            row,
            timestamp: timestamp.clone(),
            born_us,
            traceparent: traceparent.clone(),
        };
        let Some(ids) = get::<Vec<i64>>(values, nulls, 8) else {
            self.out.events.push(event(id, 0, get(values, nulls, 4), get(values, nulls, 5)));
            return;
        };
        let keys: Vec<Option<String>> = get(values, nulls, 9).unwrap_or_default();
        let rows: Vec<Option<String>> = get(values, nulls, 10).unwrap_or_default();
        if keys.len() != ids.len() || rows.len() != ids.len() {
            pgrx::error!("pg_outbox: outbox row {id} of destination \"{}\" is malformed", self.destination_id);
        }
        for ((ev, key), data) in ids.into_iter().zip(keys).zip(rows) {
            self.out.events.push(event(ev, id, key, data));
        }
    }
}

/// Replace these groups by single events, leaving out the events in `drop`
/// (acknowledged already). Rows that are single events already are left
/// alone, so a group split before is not split again.
pub fn split(destination_id: &str, groups: &[i64], drop: &[i64]) -> SpiResult<()> {
    if groups.is_empty() {
        return Ok(());
    }
    // The group's trace context goes with its events (else the column's
    // default would give them the worker's, none).
    let (column, value) = if traceparent_stored() { (", traceparent", ", g.traceparent") } else { ("", "") };
    Spi::connect_mut(|client| {
        client.update(
            &format!(
                "WITH g AS (DELETE FROM outbox.event WHERE destination_id = $1 AND id = ANY($2) AND ids IS NOT NULL \
                            RETURNING *) \
                 INSERT INTO outbox.event (id, destination_id, topic_id, table_name, interaction, key, row_data, \
                                           created_at, attempts, last_error{column}) \
                 OVERRIDING SYSTEM VALUE \
                 SELECT u.id, g.destination_id, g.topic_id, g.table_name, g.interaction, u.key, u.row_data, \
                        g.created_at, g.attempts, g.last_error{value} \
                   FROM g, unnest(g.ids, g.keys, g.rows) AS u (id, key, row_data) \
                  WHERE u.id <> ALL($3)"
            ),
            None,
            &[destination_id.into(), groups.to_vec().into(), drop.to_vec().into()],
        )?;
        Ok(())
    })
}

/// The lowest and highest of `ids` (not empty): bounds the index scan, which
/// then checks each entry against the hashed list.
fn span(ids: &[i64]) -> (i64, i64) {
    (ids.iter().copied().min().unwrap_or(0), ids.iter().copied().max().unwrap_or(0))
}

/// Kafka acknowledged these events (`ids`, rows of their own) and groups
/// (`whole`, by the group's id): they leave the outbox. The lists hold row
/// ids only, not the events of whole groups: Postgres estimates every
/// element of them when it plans the DELETE, which with a group's events
/// listed was a tenth of the worker's time on 100-row statements.
///
/// `retain`: the destination has a retention, they move to outbox.delivered
/// (unless it was just turned off: alter_destination deleted what was kept).
pub fn acknowledge(destination_id: &str, ids: &[i64], whole: &[i64], retain: bool) -> SpiResult<()> {
    if ids.is_empty() && whole.is_empty() {
        return Ok(());
    }
    let rows: Vec<i64> = ids.iter().chain(whole).copied().collect();
    const DELETE: &str = "DELETE FROM outbox.event WHERE destination_id = $1 AND id BETWEEN $3 AND $4 \
                            AND CASE WHEN ids IS NULL THEN id = ANY($2) ELSE id = ANY($5) END";
    let keep;
    let statement = if retain {
        keep = format!(
            "WITH gone AS ({DELETE} RETURNING *) \
             INSERT INTO outbox.delivered (id, destination_id, topic_id, table_name, interaction, key, row_data, \
                                           created_at, events, ids, keys, rows, traceparent) \
             SELECT id, destination_id, topic_id, table_name, interaction, key, row_data, created_at, events, ids, \
                    keys, rows, traceparent FROM gone \
              WHERE EXISTS (SELECT 1 FROM outbox.destination d WHERE d.id = $1 AND d.retention IS NOT NULL)"
        );
        keep.as_str()
    } else {
        DELETE
    };
    Spi::connect_mut(|client| {
        client.update(
            statement,
            None,
            &[
                destination_id.into(),
                ids.to_vec().into(),
                span(&rows).0.into(),
                span(&rows).1.into(),
                whole.to_vec().into(),
            ],
        )?;
        Ok(())
    })
}

/// Delete the delivered events kept longer than their destination's
/// retention (and those of destinations that keep none).
pub fn prune_delivered() -> SpiResult<()> {
    if !LAYOUT.with(|l| l.get().retention) {
        return Ok(());
    }
    Spi::run(
        "DELETE FROM outbox.delivered r USING outbox.destination d \
          WHERE d.id = r.destination_id AND r.created_at < now() - coalesce(d.retention, interval '0')",
    )
}

/// Kafka will never take this event: move it to outbox.dead_letter (out of
/// its group, if it is in one: `group` is the group's id, or 0).
pub fn dead_letter(destination_id: &str, id: i64, group: i64, error: &str) -> SpiResult<()> {
    if group != 0 {
        split(destination_id, &[group], &[])?;
    }
    let column = if traceparent_stored() { ", traceparent" } else { "" };
    Spi::connect_mut(|client| {
        client.update(
            &format!(
                "WITH moved AS (DELETE FROM outbox.event WHERE destination_id = $1 AND id = $2 RETURNING *) \
                 INSERT INTO outbox.dead_letter (id, destination_id, topic_id, table_name, interaction, key, \
                                                 row_data, created_at, attempts, error{column}) \
                 SELECT id, destination_id, topic_id, table_name, interaction, key, row_data, created_at, \
                        attempts + 1, $3{column} \
                   FROM moved"
            ),
            None,
            &[destination_id.into(), id.into(), error.into()],
        )?;
        Ok(())
    })
}

/// A delivery attempt of these events failed: they stay, with the error,
/// on the event or, when it is still in one, on its group (of `groups`).
pub fn record_failure(destination_id: &str, ids: &[i64], groups: &[i64], error: &str) -> SpiResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let rows: Vec<i64> = ids.iter().chain(groups).copied().collect();
    Spi::connect_mut(|client| {
        client.update(
            "UPDATE outbox.event SET attempts = attempts + 1, last_error = $3 \
              WHERE destination_id = $1 AND id BETWEEN $4 AND $5 AND id = ANY($6) \
                AND CASE WHEN ids IS NULL THEN id = ANY($2) ELSE id = ANY($7) END",
            None,
            &[
                destination_id.into(),
                ids.to_vec().into(),
                error.into(),
                span(&rows).0.into(),
                span(&rows).1.into(),
                rows.clone().into(),
                groups.to_vec().into(),
            ],
        )?;
        Ok(())
    })
}
