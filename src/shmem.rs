//! Shared memory whose size a setting decides at server start: the status
//! slots (`outbox.max_destinations`) and the best-effort queue
//! (`outbox.best_effort_queue_size`). Each region is a named struct with a
//! lightweight lock of its own, requested in `shmem_request_hook` and
//! attached in `shmem_startup_hook`. The fixed-size control block uses pgrx's
//! own shared memory (`status::control`). See docs/architecture.md.

use pgrx::pg_sys;
use std::ffi::CStr;

/// A region: its name (also its lock tranche's), its size in bytes, and what
/// to do once it is attached (`found`: another process created it already).
pub struct Region {
    pub name: &'static CStr,
    pub size: fn() -> usize,
    pub attach: unsafe fn(base: *mut u8, lock: *mut pg_sys::LWLock, found: bool),
}

fn regions() -> [Region; 2] {
    [crate::status::slots_region(), crate::ring::region()]
}

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Called from `_PG_init` under shared_preload_libraries, after the settings.
pub fn init() {
    unsafe {
        #[cfg(feature = "pg14")]
        request();
        #[cfg(not(feature = "pg14"))]
        {
            PREV_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(on_request);
        }
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
}

unsafe fn request() {
    for r in regions() {
        unsafe {
            pg_sys::RequestAddinShmemSpace((r.size)());
            pg_sys::RequestNamedLWLockTranche(r.name.as_ptr(), 1);
        }
    }
}

#[cfg(not(feature = "pg14"))]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        request();
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        for r in regions() {
            let mut found = false;
            let base = pg_sys::ShmemInitStruct(r.name.as_ptr(), (r.size)(), &mut found).cast::<u8>();
            let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(r.name.as_ptr())).lock;
            (r.attach)(base, lock, found);
        }
        pg_sys::LWLockRelease(init_lock);
    }
}

/// A region's lock, held until dropped (a null lock: nothing attached).
pub struct Held(*mut pg_sys::LWLock);

impl Held {
    pub fn exclusive(lock: *mut pg_sys::LWLock) -> Held {
        Held::acquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE)
    }

    pub fn shared(lock: *mut pg_sys::LWLock) -> Held {
        Held::acquire(lock, pg_sys::LWLockMode::LW_SHARED)
    }

    fn acquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> Held {
        if !lock.is_null() {
            unsafe { pg_sys::LWLockAcquire(lock, mode) };
        }
        Held(lock)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.0.is_null() {
            unsafe { pg_sys::LWLockRelease(self.0) };
        }
    }
}
