//! The control block in shared memory: how writers and SQL functions reach
//! the worker. The worker publishes its latch here; a committed
//! configuration change bumps a generation that writers and the worker
//! compare with what they cached; `outbox.retry_dead_letters` bumps another
//! that makes the worker's next claims scan from the start; the worker
//! names the outbox partition writers insert into; tests leave a fault for
//! the worker's next pass. See docs/architecture.md.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

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
    fault: AtomicU32,
    /// The outbox partition writers insert into (see src/worker/rotate.rs).
    part: AtomicU32,
}

unsafe impl PGRXSharedMemory for Control {}

static CONTROL: PgAtomic<Control> = unsafe { PgAtomic::new(c"pg_outbox_control") };

pub(super) fn init_shmem() {
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

/// The outbox partition writers insert into now (0 when not preloaded).
pub fn current_part() -> u32 {
    if !crate::preloaded() {
        return 0;
    }
    CONTROL.get().part.load(Ordering::SeqCst)
}

/// Move writers on to outbox partition `part` (the worker).
pub fn set_current_part(part: u32) {
    CONTROL.get().part.store(part, Ordering::SeqCst);
}

/// Take the fault the worker should inject into this pass (0: none).
pub fn take_fault() -> u32 {
    CONTROL.get().fault.swap(0, Ordering::AcqRel)
}

/// Leave a fault for the worker's next pass and wake it (preloaded only).
pub(super) fn inject_fault(code: u32) {
    if crate::preloaded() {
        CONTROL.get().fault.store(code, Ordering::Release);
        wake_worker();
    }
}

/// Called by the worker: publish (or withdraw, with null) its latch.
pub fn publish_worker_latch(latch: *mut pg_sys::Latch) {
    CONTROL.get().latch.store(latch as usize, Ordering::Release);
}
