//! Per-destination slots in shared memory: state, start, counters,
//! latency percentiles and the last errors, under one lightweight lock. The
//! worker claims a slot per destination it serves and writes it; writers
//! count best-effort events lost at commit (also while no worker serves the
//! destination); `outbox._destination_stats()` reads them all. Fixed-size
//! records, `outbox.max_destinations` of them, since shared memory is sized
//! once at server start. See docs/architecture.md.

use super::time::now_us;
use crate::config;
use crate::shmem::{Held, Region};
use pgrx::pg_sys;

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
    pub(super) at_us: i64, // Postgres timestamp (microseconds since 2000-01-01)
    len: u16,
    msg: [u8; ERR_LEN],
}

#[derive(Copy, Clone)]
pub struct Slot {
    used: bool,
    id_len: u8,
    id: [u8; ID_LEN],
    pub(super) start_us: i64,
    pub(super) state: u8,
    pub(super) delivered: u64,
    pub(super) failed_attempts: u64,
    pub(super) in_process: u64,
    pub(super) lost: u64,
    /// When a writer last counted a loss here (`add_lost`), µs.
    written_us: i64,
    /// Change to acknowledgement over the last events delivered, µs:
    /// p50, p99, max (-1: none yet).
    pub(super) latency_us: [i64; 3],
    pub(super) n_errors: u8,
    pub(super) next_error: u8,
    pub(super) errors: [ErrorEntry; MAX_ERRORS],
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

#[repr(C)]
struct Header {
    lock: *mut pg_sys::LWLock,
    len: usize,
}

static mut HEADER: *mut Header = std::ptr::null_mut();

fn count() -> usize {
    config::MAX_DESTINATIONS.get() as usize
}

/// The slots' shared memory: a header, then `outbox.max_destinations` slots.
pub fn region() -> Region {
    Region {
        name: c"pg_outbox_slots",
        size: || std::mem::size_of::<Header>() + count() * std::mem::size_of::<Slot>(),
        attach,
    }
}

unsafe fn attach(base: *mut u8, lock: *mut pg_sys::LWLock, found: bool) {
    let header = base.cast::<Header>();
    unsafe {
        if !found {
            header.write(Header { lock, len: count() });
            let first = header.add(1).cast::<Slot>();
            for i in 0..count() {
                first.add(i).write(EMPTY_SLOT);
            }
        }
        HEADER = header;
    }
}

/// The slots, locked until dropped (none when not preloaded).
struct Slots {
    slots: &'static mut [Slot],
    _held: Held,
}

fn lock(exclusive: bool) -> Slots {
    unsafe {
        let h = HEADER;
        if h.is_null() {
            return Slots { slots: &mut [], _held: Held::shared(std::ptr::null_mut()) };
        }
        let held = if exclusive { Held::exclusive((*h).lock) } else { Held::shared((*h).lock) };
        Slots { slots: std::slice::from_raw_parts_mut(h.add(1).cast::<Slot>(), (*h).len), _held: held }
    }
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
    pub(super) fn id(&self) -> &str {
        std::str::from_utf8(&self.id[..self.id_len as usize]).unwrap_or("")
    }
}

impl ErrorEntry {
    pub(super) fn message(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.msg[..self.len as usize])
    }
}

/// A copy of the slots in use (readers: one shared lock, held briefly).
pub(super) fn used_slots() -> Vec<Slot> {
    lock(false).slots.iter().filter(|s| s.used).copied().collect()
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
    let mut s = lock(true);
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
    let s = lock(true);
    let slot = &mut s.slots[r.0];
    slot.state = State::Stopped as u8;
    slot.in_process = 0;
}

/// Worker start: every slot in use is stopped, with nothing in process,
/// whatever a previous worker left there.
pub fn worker_started() {
    let s = lock(true);
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
    let s = lock(true);
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
    let s = lock(true);
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
    let s = lock(true);
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
    let mut s = lock(true);
    if let Some(i) = find_or_take(&mut s, id) {
        s.slots[i].lost += n;
        s.slots[i].written_us = now_us();
    }
}

/// Count best-effort events lost (the worker: expired or refused).
pub fn add_lost_slot(r: SlotRef, n: u64) {
    lock(true).slots[r.0].lost += n;
}

pub fn set_latency(r: SlotRef, p50_us: i64, p99_us: i64, max_us: i64) {
    lock(true).slots[r.0].latency_us = [p50_us, p99_us, max_us];
}

/// A client error does not hide an error of an attempt: only a delivery
/// clears that (`record_outcome`).
pub fn set_state(r: SlotRef, state: State) {
    let s = lock(true);
    let slot = &mut s.slots[r.0];
    if !(state == State::ClientError && slot.state == State::Error as u8) {
        slot.state = state as u8;
    }
}

pub fn record_error(r: SlotRef, message: &str) {
    let s = lock(true);
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
