//! pg_outbox: stream Postgres row changes to Kafka, Aidbox-style.
//!
//! Modules, by what they do:
//! - `config`: the `outbox.*` settings (GUCs);
//! - `api`: the Rust half of the SQL API (parameter checks, preload check);
//! - `error`: errors for the user, with SQLSTATE, hint and detail;
//! - `capture`: the writer side, the row trigger `outbox._capture()`: `routes`
//!   (each topic's destinations and tables, cached per backend), `target`
//!   (watched table and primary key from the catalog), `tuple` (Kafka key,
//!   FHIR resource), `criteria` (FHIRPath), `outbox` (the at-least-once write
//!   at statement end), `best_effort` (kept until COMMIT, then handed to the
//!   ring), `xact` (commit and savepoint callbacks);
//! - `status`: shared memory between writers, SQL functions and the worker:
//!   `control` (the worker's latch, configuration and rescan generations),
//!   `slots` (per-destination counters, latencies and last errors), `time`
//!   (timestamps as ISO 8601), `sql` (`_destination_stats()`, which the status
//!   view reads);
//! - `ring`: the best-effort queue in shared memory;
//! - `rowjson`: rows as JSON, as `row_to_json` prints them, for the trigger;
//! - `store`: the outbox table as the worker sees it (claim, acknowledge, fail);
//! - `kafka`: the producer and its callbacks; `message`, the notification
//!   Bundle and its headers (no Postgres calls);
//! - `pipe`: an at-least-once destination's producing thread;
//! - `params`, `oauth`: Aidbox's producer parameters (with their JAAS strings),
//!   OAUTHBEARER tokens (AWS MSK IAM), from the crate `pg_outbox_params` (params/);
//! - `fhirpath`: FHIRPath criteria;
//! - `types`: types several modules share: a destination's kind and content,
//!   an outbox event as the worker reads it;
//! - `worker`: the background worker: its loop, reload, each destination
//!   (the at-least-once outbox side, the best-effort memory side), claims,
//!   delivery reports, Kafka transactions.
//!
//! The SQL half of the API lives in `sql/schema.sql` (tables, destinations),
//! `sql/topics.sql` (topics and the DDL event triggers) and `sql/finalize.sql`.
//! How the parts fit together: docs/architecture.md.

use pgrx::prelude::*;

mod api;
mod capture;
mod config;
mod error;
mod fhirpath;
mod kafka;
mod pipe;
mod ring;
mod rowjson;
mod shmem;
mod status;
mod store;
mod types;
mod worker;

// The producer parameters are a crate of their own (params/: plain Rust, tested
// without Postgres); the other modules name them as modules of this one. (Its
// `jaas` module is used only by its `params`.)
use pg_outbox_params::{oauth, params};

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/topics.sql", name = "topics");
extension_sql_file!("../sql/backfill.sql", name = "backfill");
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// True when this library was loaded through `shared_preload_libraries`.
static PRELOADED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn preloaded() -> bool {
    PRELOADED.load(std::sync::atomic::Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        // Loaded into one backend only (CREATE EXTENSION without preloading):
        // no settings, no shared memory, no worker. The install script refuses
        // with a hint.
        return;
    }
    config::register();
    PRELOADED.store(true, std::sync::atomic::Ordering::Relaxed);
    status::init_shmem();
    shmem::init();
    worker::register();
    capture::install_hooks();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// This module is required by `cargo pgrx test` invocations.
/// It must be visible at the root of your extension crate.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_outbox'", "outbox.database = 'pgrx_tests'"]
    }
}
