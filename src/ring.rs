//! The best-effort queue: a bounded byte ring in shared memory, sized by
//! `outbox.best_effort_queue_size`. Writers push their transaction's events on
//! COMMIT (never waiting: what does not fit is refused and counted lost); the
//! worker pops them. Nothing here touches a table or the WAL.
//!
//! Record layout: `u32 length`, then the encoded event (see `BestEffortEvent`).

use crate::config;
use crate::shmem::{Held, Region};
use pgrx::pg_sys;
use std::ffi::CStr;

const NAME: &CStr = c"pg_outbox_best_effort_queue";

#[repr(C)]
struct Header {
    lock: *mut pg_sys::LWLock,
    capacity: u64,
    /// Bytes ever written / read; `head - tail` bytes are in use.
    head: u64,
    tail: u64,
    /// Next event number handed out on push.
    next_number: u64,
}

static mut RING: *mut Header = std::ptr::null_mut();

fn capacity_bytes() -> usize {
    config::BEST_EFFORT_QUEUE_KB.get() as usize * 1024
}

/// The queue's shared memory: a header, then the ring's bytes.
pub fn region() -> Region {
    Region { name: NAME, size: || std::mem::size_of::<Header>() + capacity_bytes(), attach }
}

unsafe fn attach(base: *mut u8, lock: *mut pg_sys::LWLock, found: bool) {
    let header = base.cast::<Header>();
    unsafe {
        if !found {
            header.write(Header {
                lock,
                capacity: capacity_bytes() as u64,
                head: 0,
                tail: 0,
                // Start numbering at the server's start time in microseconds, so
                // numbers keep increasing across restarts.
                next_number: (pg_sys::GetCurrentTimestamp() as u64).max(1),
            });
        }
        RING = header;
    }
}

/// The ring, locked for this scope (None when not preloaded).
fn locked() -> Option<(&'static mut Header, &'static mut [u8], Held)> {
    unsafe {
        let h = RING;
        if h.is_null() {
            return None;
        }
        let held = Held::exclusive((*h).lock);
        let data = std::slice::from_raw_parts_mut(h.add(1).cast::<u8>(), (*h).capacity as usize);
        Some((&mut *h, data, held))
    }
}

fn write_at(data: &mut [u8], pos: u64, bytes: &[u8]) {
    let cap = data.len();
    let start = (pos % cap as u64) as usize;
    let first = bytes.len().min(cap - start);
    data[start..start + first].copy_from_slice(&bytes[..first]);
    data[..bytes.len() - first].copy_from_slice(&bytes[first..]);
}

fn read_at(data: &[u8], pos: u64, out: &mut [u8]) {
    let cap = data.len();
    let start = (pos % cap as u64) as usize;
    let first = out.len().min(cap - start);
    let n = out.len();
    out[..first].copy_from_slice(&data[start..start + first]);
    out[first..].copy_from_slice(&data[..n - first]);
}

/// Largest event the queue can take at all.
pub fn max_event_bytes() -> usize {
    capacity_bytes().saturating_sub(4)
}

/// Push encoded events (their first 8 bytes are overwritten with the event
/// number). Returns, per event, whether it was queued. Never waits for space.
pub fn push(events: &mut [Vec<u8>]) -> Vec<bool> {
    let Some((h, data, _guard)) = locked() else {
        return vec![false; events.len()];
    };
    events
        .iter_mut()
        .map(|ev| {
            let need = 4 + ev.len() as u64;
            if need > h.capacity - (h.head - h.tail) {
                return false;
            }
            ev[..8].copy_from_slice(&h.next_number.to_le_bytes());
            h.next_number += 1;
            write_at(data, h.head, &(ev.len() as u32).to_le_bytes());
            write_at(data, h.head + 4, ev);
            h.head += need;
            true
        })
        .collect()
}

/// Take up to `max` events (and about `max_bytes`), oldest first, and
/// whether more are left. Under the lock only one copy of the bytes is made;
/// the records are split after it.
pub fn pop(max: usize, max_bytes: usize) -> (Vec<Vec<u8>>, bool) {
    let (raw, count, left) = {
        let Some((h, data, _guard)) = locked() else {
            return (Vec::new(), false);
        };
        let mut end = h.tail;
        let mut count = 0;
        while end < h.head && count < max {
            let mut len = [0u8; 4];
            read_at(data, end, &mut len);
            let next = end + 4 + u32::from_le_bytes(len) as u64;
            if count > 0 && next - h.tail > max_bytes as u64 {
                break;
            }
            end = next;
            count += 1;
        }
        let mut raw = vec![0u8; (end - h.tail) as usize];
        read_at(data, h.tail, &mut raw);
        h.tail = end;
        (raw, count, end < h.head)
    };
    let mut out = Vec::with_capacity(count);
    let mut at = 0;
    while at + 4 <= raw.len() {
        let len = u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes")) as usize;
        out.push(raw[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    (out, left)
}

/// One best-effort event as it travels through the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct BestEffortEvent {
    pub number: u64,
    pub destination_id: String,
    pub table: String,
    pub interaction: String,
    pub key: Option<String>,
    pub row: Option<String>,
    /// The writing session's `outbox.traceparent`.
    pub traceparent: Option<String>,
    /// Transaction start, microseconds since 2000-01-01 (Postgres epoch).
    pub timestamp_us: i64,
    /// When the transaction committed (0: not yet), set by `stamp_commit`.
    pub committed_us: i64,
}

/// Note the commit time in an encoded event (handed over after the commit).
pub fn stamp_commit(encoded: &mut [u8], committed_us: i64) {
    encoded[16..24].copy_from_slice(&committed_us.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn get_str(buf: &[u8], pos: &mut usize) -> Option<Option<String>> {
    let len = u32::from_le_bytes(buf.get(*pos..*pos + 4)?.try_into().ok()?);
    *pos += 4;
    if len == u32::MAX {
        return Some(None);
    }
    let s = std::str::from_utf8(buf.get(*pos..*pos + len as usize)?).ok()?.to_string();
    *pos += len as usize;
    Some(Some(s))
}

impl BestEffortEvent {
    /// Encode an event from borrowed parts (the trigger's own strings, not
    /// copies); the first 8 bytes (the number) are filled in by `push`, the
    /// commit time by `stamp_commit`.
    pub fn encode(
        timestamp_us: i64,
        destination_id: &str,
        table: &str,
        interaction: &str,
        key: Option<&str>,
        row: Option<&str>,
        traceparent: Option<&str>,
    ) -> Vec<u8> {
        let strs = [Some(destination_id), Some(table), Some(interaction), key, row, traceparent];
        let mut out = Vec::with_capacity(24 + strs.iter().map(|s| 4 + s.map_or(0, str::len)).sum::<usize>());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&timestamp_us.to_le_bytes());
        out.extend_from_slice(&0i64.to_le_bytes());
        for s in strs {
            put_str(&mut out, s);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Option<BestEffortEvent> {
        let number = u64::from_le_bytes(buf.get(0..8)?.try_into().ok()?);
        let timestamp_us = i64::from_le_bytes(buf.get(8..16)?.try_into().ok()?);
        let committed_us = i64::from_le_bytes(buf.get(16..24)?.try_into().ok()?);
        let mut pos = 24;
        Some(BestEffortEvent {
            number,
            timestamp_us,
            committed_us,
            destination_id: get_str(buf, &mut pos)??,
            table: get_str(buf, &mut pos)??,
            interaction: get_str(buf, &mut pos)??,
            key: get_str(buf, &mut pos)?,
            row: get_str(buf, &mut pos)?,
            traceparent: get_str(buf, &mut pos)?,
        })
    }
}
