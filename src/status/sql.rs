//! The status functions SQL calls: `outbox._destination_stats()`, the
//! worker's counters per destination that `outbox.destination_status` and
//! `outbox.status(id)` (sql/finalize.sql) join with the configuration, and
//! `outbox._inject_worker_fault()` for the tests. See docs/architecture.md.

use super::slots::{used_slots, Slot, State, MAX_ERRORS};
use pgrx::prelude::*;

/// Make the worker's next pass fail: `error` (a Postgres ERROR inside a
/// transaction) or `panic` (a Rust panic outside any transaction). For testing
/// that faults are survived; superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn _inject_worker_fault(kind: &str) {
    if !unsafe { pg_sys::superuser() } {
        crate::error::UserError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only superusers may inject worker faults",
        )
        .hint("outbox._inject_worker_fault() exists for pg_outbox's own tests.")
        .raise()
    }
    let code = match kind {
        "error" => 1,
        "panic" => 2,
        _ => crate::error::UserError::invalid(format!("unknown worker fault \"{kind}\""))
            .hint("Use 'error' or 'panic'.")
            .raise(),
    };
    super::control::inject_fault(code);
}

/// The outbox partition an event inserted now goes to: outbox.event's
/// `part` default (sql/finalize.sql).
#[pg_extern(volatile, parallel_safe)]
fn _current_part() -> i16 {
    super::control::current_part() as i16
}

/// The worker's counters per destination, for outbox.destination_status.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn _destination_stats() -> TableIterator<
    'static,
    (
        name!(id, String),
        name!(status, String),
        name!(start_timestamp, Option<TimestampWithTimeZone>),
        name!(messages_delivered, i64),
        name!(messages_delivery_attempts, i64),
        name!(messages_in_process, i64),
        name!(messages_lost, i64),
        name!(latency_p50_ms, Option<f64>),
        name!(latency_p99_ms, Option<f64>),
        name!(latency_max_ms, Option<f64>),
        name!(last_errors, pgrx::JsonB),
    ),
> {
    if !crate::preloaded() {
        return TableIterator::new(Vec::new());
    }
    TableIterator::new(used_slots().iter().map(stats_row).collect::<Vec<_>>())
}

/// One row of `_destination_stats`, in its columns' order.
type StatsRow = (
    String,
    String,
    Option<TimestampWithTimeZone>,
    i64,
    i64,
    i64,
    i64,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    pgrx::JsonB,
);

fn stats_row(s: &Slot) -> StatsRow {
    // Milliseconds to 0.1; a clock step can make one negative.
    let ms = |us: i64| (us != -1).then(|| (us.max(0) / 100) as f64 / 10.0);
    let start = (s.start_us != 0)
        .then(|| TimestampWithTimeZone::try_from(pg_sys::TimestampTz::from(s.start_us)).ok())
        .flatten();
    (
        s.id().to_string(),
        status_name(s).to_string(),
        start,
        s.delivered as i64,
        s.failed_attempts as i64,
        s.in_process as i64,
        s.lost as i64,
        ms(s.latency_us[0]),
        ms(s.latency_us[1]),
        ms(s.latency_us[2]),
        pgrx::JsonB(serde_json::Value::Array(last_errors(s))),
    )
}

/// The `status` column: a client error shows while events are in process.
fn status_name(s: &Slot) -> &'static str {
    match s.state {
        x if x == State::Error as u8 => "error",
        x if x == State::Stopped as u8 => "stopped",
        x if x == State::ClientError as u8 && s.in_process > 0 => "error",
        _ => "active",
    }
}

/// The slot's last errors, newest first, with their times.
fn last_errors(s: &Slot) -> Vec<serde_json::Value> {
    (0..s.n_errors as usize)
        .map(|k| {
            let i = (s.next_error as usize + MAX_ERRORS - 1 - k) % MAX_ERRORS;
            let e = &s.errors[i];
            serde_json::json!({
                "message": e.message(),
                "timestamp": super::time::format_ts(e.at_us),
            })
        })
        .collect()
}
