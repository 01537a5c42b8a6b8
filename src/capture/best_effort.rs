//! Best-effort events on the writer side: each change is encoded for the
//! shared queue (`crate::ring`) at once but kept in backend memory, tagged
//! with its subtransaction, until COMMIT; then the transaction's events are
//! handed over in one push. Events the queue cannot take are counted lost
//! in the destination's status slot; a rollback leaves nothing. See
//! docs/architecture.md.

use super::{ensure_callbacks, State, STATE};
use crate::ring::{self, BestEffortEvent};
use crate::status;
use crate::types::Content;
use pgrx::pg_sys;
use std::collections::HashMap;

/// Keep a change for the topic's best-effort destinations until COMMIT.
pub(super) fn buffer(
    destinations: &[(String, Content)],
    table: &str,
    interaction: &str,
    key: Option<&str>,
    row: Option<&str>,
) {
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let timestamp_us = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let limit = ring::max_event_bytes();
    let traceparent = crate::config::traceparent();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        ensure_callbacks(&mut s);
        for (dest, content) in destinations {
            let row = if *content == Content::FullResource { row } else { None };
            let ev = BestEffortEvent::encode(timestamp_us, dest, table, interaction, key, row, traceparent.as_deref());
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

/// Hand the transaction's best-effort events to the shared queue. Runs after
/// the commit is durable: must not fail. Whether the queue took any.
pub(super) fn hand_over(s: &mut State) -> bool {
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
