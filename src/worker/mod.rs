//! The background worker: one process serving every destination of the
//! database named by `outbox.database`. Each pass of its loop reads the
//! configuration when it changed, sorts librdkafka's delivery reports onto
//! destinations, records their outcomes, claims and produces the next
//! at-least-once batches and drains the best-effort queue, then sleeps until
//! a commit, a report or a deadline wakes it. Every Postgres call happens
//! on this (the main) thread; librdkafka's threads only write to a channel
//! and a pipe. See docs/architecture.md.
//!
//! - `destination`: one destination, in parts, with its kind's state (`Mode`);
//! - `flight`: events in flight and outbox groups; `health`: errors,
//!   back-off, latency;
//! - `outbox`, `claim`, `txn`: the at-least-once side (outcomes recorded in
//!   the outbox, claims, Kafka transactions);
//! - `memory`: the best-effort side;
//! - `reload`: the configuration; `reports`: delivery reports;
//! - `rotate`: the outbox's partitions taking turns; `backfill`: batches
//!   of outbox.backfill().

mod backfill;
mod claim;
mod destination;
mod flight;
mod health;
mod memory;
mod outbox;
mod reload;
mod reports;
mod rotate;
mod txn;

use crate::config;
use crate::kafka::Report;
use crate::status;
use crossbeam_channel::{unbounded, Receiver};
use destination::{Destination, Producers};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// How long SIGTERM waits for in-flight deliveries.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// Pause after a busy pass, in microseconds (bounds wake-ups under load).
const BUSY_PAUSE_US: libc::c_long = 1000;

pub fn register() {
    BackgroundWorkerBuilder::new("pg_outbox worker")
        .set_type("pg_outbox")
        .set_library("pg_outbox")
        .set_function("pg_outbox_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Run `f` in its own transaction. A Postgres ERROR (or a panic) inside is
/// caught, logged, and the transaction rolled back: the worker survives.
fn in_transaction<R>(what: &str, f: impl FnOnce() -> R) -> Option<R> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(AssertUnwindSafe(move || Some(f())))
        .catch_others(|e| {
            let msg = match &e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            };
            pgrx::warning!("pg_outbox worker: {what} failed: {msg}");
            None
        })
        .execute();
    unsafe {
        if result.is_some() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    result
}

struct Worker {
    /// By destination id (a retiring incarnation under another key, see `retire`).
    destinations: BTreeMap<String, Destination>,
    producers: Producers,
    rx: Receiver<Report>,
    wake_read: RawFd,
    seen_generation: u64,
    /// The rescan generation (status::request_rescan) last acted on.
    seen_rescan: u64,
    last_reload: Option<Instant>,
    extension_present: bool,
    /// pg_extension oid of the installation being served.
    extension: Option<pg_sys::Oid>,
    /// Events of dropped destinations were removed since the worker started.
    swept: bool,
    terminating: bool,
    postmaster_died: bool,
    /// The last pass had work to do.
    busy: bool,
    /// The last pass left work it could do at once (a full claim or a full
    /// best-effort batch): the next wait neither pauses nor sleeps.
    more: bool,
    rotation: rotate::Rotation,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_outbox_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = config::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    pgrx::log!("pg_outbox worker started for database \"{database}\"");
    set_session_options();
    let mut worker = Worker::new();
    // Whatever a previous incarnation had in flight is still in the outbox.
    status::worker_started();
    status::publish_worker_latch(unsafe { pg_sys::MyLatch });
    // However the worker exits, commits must stop setting its latch.
    unsafe { pg_sys::before_shmem_exit(Some(withdraw_latch), pg_sys::Datum::from(0)) };

    while !worker.terminating {
        worker.turn();
        worker.wait();
    }
    if worker.postmaster_died {
        // Nothing to flush into: the server is gone.
        unsafe { pg_sys::proc_exit(1) };
    }
    worker.shut_down();
    status::publish_worker_latch(std::ptr::null_mut());
    pgrx::log!("pg_outbox worker stopped");
    // Exit code 1: the postmaster restarts us unless the server is shutting down.
    unsafe { pg_sys::proc_exit(1) };
}

fn set_session_options() {
    // The worker's own commits (deleting acknowledged events, recording
    // failures, moving dead letters) need not wait for the WAL flush: one lost
    // in a crash only means those events are sent again, never lost.
    // Its claims must walk the outbox's (destination_id, id) index in order:
    // before autovacuum first analyzes a fresh outbox the planner would
    // rather collect and sort the whole backlog for every batch. And they are
    // planned for their parameters' values (see store::select_into), whatever
    // plan_cache_mode the server sets. Each statement takes its own snapshot
    // (READ COMMITTED, whatever the server's default): the claims and the
    // rotation (src/worker/rotate.rs) count on it.
    for (name, value) in [
        (c"default_transaction_isolation", c"read committed"),
        (c"synchronous_commit", c"off"),
        (c"enable_sort", c"off"),
        (c"enable_bitmapscan", c"off"),
        (c"plan_cache_mode", c"force_custom_plan"),
    ] {
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn withdraw_latch(_code: i32, _arg: pg_sys::Datum) {
    status::publish_worker_latch(std::ptr::null_mut());
}

impl Worker {
    fn new() -> Worker {
        let mut fds = [0 as libc::c_int; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            pgrx::error!("pg_outbox worker: could not create its wake-up pipe");
        }
        let (tx, rx) = unbounded();
        Worker {
            destinations: BTreeMap::new(),
            producers: Producers { next_epoch: 1, tx, wake_write: fds[1] },
            rx,
            wake_read: fds[0],
            seen_generation: u64::MAX,
            seen_rescan: 0,
            last_reload: None,
            extension_present: false,
            extension: None,
            swept: false,
            terminating: false,
            postmaster_died: false,
            busy: false,
            more: false,
            rotation: Default::default(),
        }
    }

    /// One pass of the loop.
    fn turn(&mut self) {
        match status::take_fault() {
            1 => {
                let _ = in_transaction("an injected fault", || Spi::run("SELECT 1 / 0"));
            }
            2 => panic!("pg_outbox worker: injected panic"),
            _ => {}
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        self.maybe_reload();
        self.take_reports();
        self.expire_unacknowledged();
        let now = Instant::now();
        self.destinations
            .values_mut()
            .filter(|d| d.retiring_until.is_some_and(|until| until <= now))
            .for_each(Destination::break_all_groups);
        self.record_outcomes();
        self.finish_retiring();
        // Again, now that recording may have taken a while: a change that
        // committed meanwhile (a FHIR table renamed, say) is seen before
        // events captured after it are built.
        self.maybe_reload();
        self.claim_and_produce();
        self.backfill();
        self.drain_best_effort();
        self.rotate();
        status::set_in_process(self.destinations.values().map(|d| (d.slot, d.in_process())));
    }

    /// Sleep until a commit sets the latch, a producer has reports, a retry or
    /// an expiry is due, or the poll interval passed.
    fn wait(&mut self) {
        // A background worker flushes its table statistics itself (a client
        // backend does it when idle): without this, autovacuum never learns
        // of the outbox rows the worker deleted. Rate-limited by Postgres.
        unsafe { pg_sys::pgstat_report_stat(false) };
        let more = std::mem::take(&mut self.more);
        if std::mem::take(&mut self.busy) && !more {
            // Under load, let commits accumulate for a moment: one pass then
            // serves many events, and writers find the latch already set.
            unsafe { pg_sys::pg_usleep(BUSY_PAUSE_US) };
        }
        let now = Instant::now();
        // A backlog: look at the latch and the reports, then go on with it
        // (not pause, nor sleep until the first report of the batch just sent).
        let mut timeout =
            if more { Duration::ZERO } else { Duration::from_millis(config::POLL_INTERVAL_MS.get() as u64) };
        for due in self.destinations.values_mut().filter_map(Destination::next_due) {
            timeout = timeout.min(due.saturating_duration_since(now) + Duration::from_millis(1));
        }
        let events =
            pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH | pg_sys::WL_SOCKET_READABLE;
        let rc = unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.wake_read,
                timeout.as_millis() as libc::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        let mut buf = [0u8; 256];
        while unsafe { libc::read(self.wake_read, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        if rc & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 {
            self.postmaster_died = true;
            self.terminating = true;
        }
        if BackgroundWorker::sigterm_received() {
            self.terminating = true;
        }
        // Absorb procsignal barriers and the like even while idle.
        pgrx::check_for_interrupts!();
    }

    /// SIGTERM: give in-flight deliveries a moment, record them, exit.
    fn shut_down(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        self.take_reports();
        while Instant::now() < deadline && self.destinations.values().any(|d| !d.flights.is_empty()) {
            unsafe { pg_sys::pg_usleep(5_000) };
            self.take_reports();
        }
        self.destinations.values_mut().for_each(Destination::break_all_groups);
        self.record_outcomes();
        for d in std::mem::take(&mut self.destinations).into_values() {
            status::mark_stopped(d.slot);
        }
    }
}
