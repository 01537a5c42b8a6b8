//! Shared memory: the worker's latch, a configuration generation counter, and
//! per-destination counters and last errors. The worker writes, everyone reads.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub const MAX_DESTINATIONS: usize = 128;
pub const MAX_ERRORS: usize = 5;
const ID_LEN: usize = 64;
const ERR_LEN: usize = 300;

/// Destination state shown as `status`.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum State {
    Active = 1,
    Error = 2,
    /// No running worker serves the destination (yet).
    Stopped = 3,
    /// The client reported an error and nothing was delivered since: an
    /// error while events are in process, else active.
    ClientError = 4,
}

#[derive(Copy, Clone)]
pub struct ErrorEntry {
    at_us: i64, // Postgres timestamp (microseconds since 2000-01-01)
    len: u16,
    msg: [u8; ERR_LEN],
}

#[derive(Copy, Clone)]
pub struct Slot {
    used: bool,
    id_len: u8,
    id: [u8; ID_LEN],
    start_us: i64,
    state: u8,
    delivered: u64,
    failed_attempts: u64,
    in_process: u64,
    lost: u64,
    /// When a writer last counted a loss here (`add_lost`), µs.
    written_us: i64,
    /// Change to acknowledgement over the last events delivered, µs:
    /// p50, p99, max (-1: none yet).
    latency_us: [i64; 3],
    n_errors: u8,
    next_error: u8,
    errors: [ErrorEntry; MAX_ERRORS],
}

#[derive(Copy, Clone)]
pub struct Slots {
    slots: [Slot; MAX_DESTINATIONS],
}

const EMPTY_ERROR: ErrorEntry = ErrorEntry { at_us: 0, len: 0, msg: [0; ERR_LEN] };
const EMPTY_SLOT: Slot = Slot {
    used: false,
    id_len: 0,
    id: [0; ID_LEN],
    start_us: 0,
    state: 0,
    delivered: 0,
    failed_attempts: 0,
    in_process: 0,
    lost: 0,
    written_us: 0,
    latency_us: [-1; 3],
    n_errors: 0,
    next_error: 0,
    errors: [EMPTY_ERROR; MAX_ERRORS],
};

impl Default for Slots {
    fn default() -> Self {
        Slots { slots: [EMPTY_SLOT; MAX_DESTINATIONS] }
    }
}

unsafe impl PGRXSharedMemory for Slots {}

#[derive(Default)]
pub struct Control {
    /// Address of the worker's latch (0: no worker running).
    latch: AtomicUsize,
    /// Bumped on every committed configuration change.
    config_generation: AtomicU64,
    /// Bumped when events were put back into the outbox with old numbers
    /// (outbox.retry_dead_letters): the worker's next claims scan from the start.
    rescan_generation: AtomicU64,
    /// A fault the worker injects into its next pass (tests): 1 error, 2 panic.
    fault: std::sync::atomic::AtomicU32,
}

unsafe impl PGRXSharedMemory for Control {}

static SLOTS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"pg_outbox_slots") };
static CONTROL: PgAtomic<Control> = unsafe { PgAtomic::new(c"pg_outbox_control") };

pub fn init_shmem() {
    pg_shmem_init!(SLOTS);
    pg_shmem_init!(CONTROL);
}

/// Set the worker's latch, if a worker is running. Safe in commit callbacks.
pub fn wake_worker() {
    if !crate::preloaded() {
        return;
    }
    let latch = CONTROL.get().latch.load(Ordering::Acquire);
    if latch != 0 {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

pub fn bump_config_generation() {
    if !crate::preloaded() {
        return;
    }
    CONTROL.get().config_generation.fetch_add(1, Ordering::AcqRel);
}

/// The configuration generation (0 when not preloaded: callers must not cache).
pub fn config_generation() -> u64 {
    if !crate::preloaded() {
        return 0;
    }
    CONTROL.get().config_generation.load(Ordering::Acquire)
}

pub fn request_rescan() {
    if crate::preloaded() {
        CONTROL.get().rescan_generation.fetch_add(1, Ordering::AcqRel);
    }
}

pub fn rescan_generation() -> u64 {
    CONTROL.get().rescan_generation.load(Ordering::Acquire)
}

/// Take the fault the worker should inject into this pass (0: none).
pub fn take_fault() -> u32 {
    CONTROL.get().fault.swap(0, Ordering::AcqRel)
}

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
    if crate::preloaded() {
        CONTROL.get().fault.store(code, Ordering::Release);
        wake_worker();
    }
}

/// Called by the worker: publish (or withdraw, with null) its latch.
pub fn publish_worker_latch(latch: *mut pg_sys::Latch) {
    CONTROL.get().latch.store(latch as usize, Ordering::Release);
}

pub fn now_us() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn copy_str<const N: usize>(dst: &mut [u8; N], s: &str) -> usize {
    // Cut on a char boundary so readers always see valid UTF-8.
    let mut n = s.len().min(N);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    n
}

impl Slot {
    fn id(&self) -> &str {
        std::str::from_utf8(&self.id[..self.id_len as usize]).unwrap_or("")
    }
}

/// The worker's handle on one destination's slot.
#[derive(Clone, Copy, Debug)]
pub struct SlotRef(usize);

fn find_or_take(s: &mut Slots, id: &str) -> Option<usize> {
    if let Some(i) = s.slots.iter().position(|x| x.used && x.id() == id) {
        return Some(i);
    }
    let i = s.slots.iter().position(|x| !x.used)?;
    let slot = &mut s.slots[i];
    *slot = EMPTY_SLOT;
    slot.used = true;
    slot.id_len = copy_str(&mut slot.id, id) as u8;
    slot.state = State::Stopped as u8;
    Some(i)
}

/// The worker starts serving a destination (None: all slots in use). Counters
/// that writers already kept for it (best-effort losses) carry over.
pub fn claim_slot(id: &str) -> Option<SlotRef> {
    let mut s = SLOTS.exclusive();
    let i = find_or_take(&mut s, id)?;
    let slot = &mut s.slots[i];
    // A destination rebuilt after alter_destination keeps its start, like its
    // counters; a new one, or one a new worker takes over, starts now.
    if slot.start_us == 0 || slot.state == State::Stopped as u8 {
        slot.start_us = now_us();
    }
    slot.state = State::Active as u8;
    Some(SlotRef(i))
}

/// The worker stops serving a destination; its counters stay visible.
pub fn mark_stopped(r: SlotRef) {
    let mut s = SLOTS.exclusive();
    let slot = &mut s.slots[r.0];
    slot.state = State::Stopped as u8;
    slot.in_process = 0;
}

/// Worker start: whatever a previous worker had in process is not any more.
pub fn worker_started() {
    let mut s = SLOTS.exclusive();
    for slot in s.slots.iter_mut().filter(|x| x.used) {
        slot.state = State::Stopped as u8;
        slot.in_process = 0;
    }
}

/// Forget the slots of destinations that no longer exist, as a configuration
/// read that began at `read_us` saw them. A slot a writer counted in since
/// stays: the writer may have seen a destination created after that read
/// began, or dropped and created again meanwhile (the next read decides).
pub fn retain_only(ids: &std::collections::HashSet<&str>, read_us: i64) {
    let mut s = SLOTS.exclusive();
    for slot in s.slots.iter_mut().filter(|x| x.used && !ids.contains(x.id())) {
        if slot.written_us < read_us {
            *slot = EMPTY_SLOT;
        } else {
            slot.state = State::Stopped as u8;
            slot.in_process = 0;
        }
    }
}

pub fn record_outcome(r: SlotRef, delivered: u64, failed: u64, in_process: u64) {
    let mut s = SLOTS.exclusive();
    let slot = &mut s.slots[r.0];
    slot.delivered += delivered;
    slot.failed_attempts += failed;
    slot.in_process = in_process;
    if failed > 0 {
        slot.state = State::Error as u8;
    } else if delivered > 0 {
        slot.state = State::Active as u8;
    }
}

/// Publish how many events each destination has in process (one lock for all).
pub fn set_in_process(counts: impl Iterator<Item = (SlotRef, u64)>) {
    let counts: Vec<(SlotRef, u64)> = counts.collect();
    let mut s = SLOTS.exclusive();
    // A reconfigured destination's old producer shares the slot: add up.
    for (r, _) in &counts {
        s.slots[r.0].in_process = 0;
    }
    for (r, n) in counts {
        s.slots[r.0].in_process += n;
    }
}

/// Count best-effort events lost, by destination id (writers, on commit),
/// also while no worker serves the destination.
pub fn add_lost(id: &str, n: u64) {
    if !crate::preloaded() {
        return;
    }
    let mut s = SLOTS.exclusive();
    if let Some(i) = find_or_take(&mut s, id) {
        s.slots[i].lost += n;
        s.slots[i].written_us = now_us();
    }
}

/// Count best-effort events lost (the worker: expired or refused).
pub fn add_lost_slot(r: SlotRef, n: u64) {
    SLOTS.exclusive().slots[r.0].lost += n;
}

pub fn set_latency(r: SlotRef, p50_us: i64, p99_us: i64, max_us: i64) {
    SLOTS.exclusive().slots[r.0].latency_us = [p50_us, p99_us, max_us];
}

/// A client error does not hide an error of an attempt: only a delivery
/// clears that (`record_outcome`).
pub fn set_state(r: SlotRef, state: State) {
    let mut s = SLOTS.exclusive();
    let slot = &mut s.slots[r.0];
    if !(state == State::ClientError && slot.state == State::Error as u8) {
        slot.state = state as u8;
    }
}

pub fn record_error(r: SlotRef, message: &str) {
    let mut s = SLOTS.exclusive();
    let slot = &mut s.slots[r.0];
    if slot.n_errors > 0 {
        // The same error again (a broker that stays down): refresh its time only.
        let newest = &mut slot.errors[(slot.next_error as usize + MAX_ERRORS - 1) % MAX_ERRORS];
        let mut probe = [0u8; ERR_LEN];
        let n = copy_str(&mut probe, message);
        if newest.msg[..newest.len as usize] == probe[..n] {
            newest.at_us = now_us();
            return;
        }
    }
    let i = slot.next_error as usize;
    let e = &mut slot.errors[i];
    e.at_us = now_us();
    e.len = copy_str(&mut e.msg, message) as u16;
    slot.next_error = ((i + 1) % MAX_ERRORS) as u8;
    slot.n_errors = (slot.n_errors + 1).min(MAX_ERRORS as u8);
}

/// Postgres timestamp (µs since 2000-01-01) as ISO 8601 UTC with milliseconds.
pub fn format_ts(us: i64) -> String {
    format_ts_digits(us, 3)
}

/// A Postgres timestamp (µs since 2000-01-01) as ISO 8601 UTC with
/// `digits` (3 or 6) fractional digits.
pub fn format_ts_digits(us: i64, digits: u32) -> String {
    // Postgres epoch is 2000-01-01; 946684800 s after the Unix epoch.
    let unix_us = us + 946_684_800_000_000;
    let secs = unix_us.div_euclid(1_000_000);
    let fraction = unix_us.rem_euclid(1_000_000) / 10_i64.pow(6 - digits);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        let width = digits as usize;
        return format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{fraction:0width$}Z",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        );
    }
    // Digit by digit: format!() was a tenth of a claim of single events.
    let mut out = [0u8; 27];
    let mut at = 0;
    let mut put = |value: i64, width: u32, then: u8| {
        for i in (0..width).rev() {
            out[at] = b'0' + (value / 10_i64.pow(i) % 10) as u8;
            at += 1;
        }
        out[at] = then;
        at += 1;
    };
    put(y, 4, b'-');
    put(m, 2, b'-');
    put(d, 2, b'T');
    put(sod / 3600, 2, b':');
    put(sod % 3600 / 60, 2, b':');
    put(sod % 60, 2, b'.');
    put(fraction, digits, b'Z');
    String::from_utf8(out[..at].to_vec()).unwrap_or_default()
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
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
    let copy: Vec<Slot> = SLOTS.share().slots.iter().filter(|s| s.used).copied().collect();
    let rows: Vec<_> = copy
        .iter()
        .map(|s| {
            // newest first
            let errors: Vec<serde_json::Value> = (0..s.n_errors as usize)
                .map(|k| {
                    let i = (s.next_error as usize + MAX_ERRORS - 1 - k) % MAX_ERRORS;
                    let e = &s.errors[i];
                    serde_json::json!({
                        "message": String::from_utf8_lossy(&e.msg[..e.len as usize]),
                        "timestamp": format_ts(e.at_us),
                    })
                })
                .collect();
            let state = match s.state {
                x if x == State::Error as u8 => "error",
                x if x == State::Stopped as u8 => "stopped",
                x if x == State::ClientError as u8 && s.in_process > 0 => "error",
                _ => "active",
            };
            // Milliseconds to 0.1; a clock step can make one negative.
            let ms = |us: i64| (us != -1).then(|| (us.max(0) / 100) as f64 / 10.0);
            let start = (s.start_us != 0)
                .then(|| TimestampWithTimeZone::try_from(pg_sys::TimestampTz::from(s.start_us)).ok())
                .flatten();
            (
                s.id().to_string(),
                state.to_string(),
                start,
                s.delivered as i64,
                s.failed_attempts as i64,
                s.in_process as i64,
                s.lost as i64,
                ms(s.latency_us[0]),
                ms(s.latency_us[1]),
                ms(s.latency_us[2]),
                pgrx::JsonB(serde_json::Value::Array(errors)),
            )
        })
        .collect();
    TableIterator::new(rows)
}
