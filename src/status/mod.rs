//! Status: what the worker and the writers publish in shared memory for
//! everyone to read, and the SQL functions that show it.
//! - `control`: the worker's latch, the configuration and rescan generations
//!   and an injected fault: how writers and SQL functions reach the worker.
//! - `slots`: one slot per destination with its counters, latencies and last
//!   errors; the worker writes them, writers count best-effort losses.
//! - `time`: Postgres timestamps as ISO 8601 text (the status, the messages).
//! - `sql`: `outbox._destination_stats()` (the rows of
//!   `outbox.destination_status` and `outbox.status(id)`) and
//!   `outbox._inject_worker_fault()`.
//!
//! Everything other modules use is re-exported here as `status::name`.
//! The best-effort queue, also in shared memory, is `ring`. See
//! docs/architecture.md.

mod control;
mod slots;
mod sql;
mod time;

pub use control::{
    bump_config_generation, config_generation, current_part, publish_worker_latch, request_rescan, rescan_generation,
    set_current_part, take_fault, wake_worker,
};
pub use slots::{
    add_lost, add_lost_slot, claim_slot, mark_stopped, record_error, record_outcome, retain_only, set_in_process,
    set_latency, set_state, worker_started, SlotRef, State,
};
pub use time::{format_ts, format_ts_digits, now_us};

pub use slots::region as slots_region;

/// Reserve and attach the control block (`_PG_init`, preloaded only); the
/// slots are a `shmem` region.
pub fn init_shmem() {
    control::init_shmem();
}
