//! The `outbox.*` settings. One definition each: name, default, context, meaning.
//! The README's settings table lists the same names and defaults.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Database the worker serves (postmaster start).
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Safety-net poll interval of the worker, in milliseconds (reload).
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Events claimed and produced per batch and destination (reload).
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// First retry delay after a failed delivery, doubled up to `RETRY_MAX_MS` (reload).
pub static RETRY_MIN_MS: GucSetting<i32> = GucSetting::<i32>::new(500);
/// Longest retry delay, in milliseconds (reload).
pub static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);

/// Base URL of FHIR references in messages from FHIR tables (reload).
pub static FHIR_BASE_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"http://localhost/fhir"));

/// Shared memory for the best-effort queue, in kB (postmaster start).
pub static BEST_EFFORT_QUEUE_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
/// How often writers move on to the next outbox partition (src/worker/rotate.rs).
pub static ROTATION_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Status slots in shared memory, one per destination (about 1.7 kB each).
pub static MAX_DESTINATIONS: GucSetting<i32> = GucSetting::<i32>::new(128);

/// W3C trace context of the writing session's changes, sent as the Kafka
/// header `traceparent` (user, per session or transaction; empty: none).
pub static TRACEPARENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub const DATABASE_DEFAULT: &str = "postgres";

pub fn register() {
    // SAFETY: the check hook is guarded and does not panic.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.traceparent",
            c"W3C trace context (traceparent) that the changes of this session carry to Kafka.",
            c"Format 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>; empty for none.",
            &TRACEPARENT,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_traceparent),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"outbox.database",
        c"Database whose outbox the pg_outbox worker serves.",
        c"CREATE EXTENSION pg_outbox is only allowed in this database.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"outbox.fhir_base_url",
        c"FHIR base URL for fullUrl and request.url in messages from FHIR resource tables.",
        c"Aidbox uses its own base URL, e.g. http://aidbox-server/fhir.",
        &FHIR_BASE_URL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.best_effort_queue_size",
        c"Shared memory for events of best-effort destinations waiting for the worker.",
        c"Events that do not fit are dropped and counted in messages_lost.",
        &BEST_EFFORT_QUEUE_KB,
        64,
        1024 * 1024,
        GucContext::Postmaster,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_destinations",
        c"Most destinations the server can have (status slots in shared memory).",
        c"create_destination refuses more; changing it needs a restart.",
        &MAX_DESTINATIONS,
        1,
        10_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.poll_interval",
        c"Longest time the worker sleeps without being woken by a commit.",
        c"Commits wake the worker at once; this is the safety net.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.batch_size",
        c"Events the worker claims and produces per batch and destination.",
        c"",
        &BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.rotation_interval",
        c"How often writers move on to the next of the outbox's three partitions.",
        c"A former partition is emptied with TRUNCATE once all its events were delivered.",
        &ROTATION_INTERVAL_MS,
        100,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retry_min",
        c"First delay before retrying events whose delivery failed.",
        c"Doubles after each failed attempt, up to outbox.retry_max.",
        &RETRY_MIN_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retry_max",
        c"Longest delay before retrying events whose delivery failed.",
        c"",
        &RETRY_MAX_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// The FHIR base URL, without a trailing slash.
pub fn fhir_base_url() -> String {
    FHIR_BASE_URL.get().and_then(|c| c.into_string().ok()).unwrap_or_default().trim_end_matches('/').to_string()
}

/// The database name the worker serves.
pub fn database() -> String {
    DATABASE.get().and_then(|c| c.into_string().ok()).unwrap_or_else(|| DATABASE_DEFAULT.to_string())
}

/// The session's `outbox.traceparent`, if set (validated when it was).
pub fn traceparent() -> Option<String> {
    TRACEPARENT.get().and_then(|c| c.into_string().ok()).filter(|t| !t.is_empty())
}

/// Whether `value` is a W3C traceparent a consumer can continue: version
/// 00 (55 characters) or a later version (at least that long, followed by
/// `-`), lowercase hex, trace id and parent id not all zeros, version not ff.
pub fn valid_traceparent(value: &str) -> bool {
    let b = value.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    b.len() >= 55
        && (b.len() == 55 || (&b[0..2] != b"00" && b[55] == b'-'))
        && hex(0..2)
        && &b[0..2] != b"ff"
        && b[2] == b'-'
        && hex(3..35)
        && !zeros(3..35)
        && b[35] == b'-'
        && hex(36..52)
        && !zeros(36..52)
        && b[52] == b'-'
        && hex(53..55)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_traceparent(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    let value = unsafe { newval.as_ref().filter(|p| !p.is_null()).map(|p| std::ffi::CStr::from_ptr(*p)) };
    let Some(value) = value.and_then(|v| v.to_str().ok()) else { return value.is_none() };
    if value.is_empty() || valid_traceparent(value) {
        return true;
    }
    unsafe {
        let detail = std::ffi::CString::new(format!("\"{}\" is not a W3C traceparent.", value.escape_default()))
            .unwrap_or_default();
        pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(detail.as_ptr());
        let hint = c"Use 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, e.g. \
                     00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 (lowercase, ids not all zeros).";
        pgrx::pg_sys::GUC_check_errhint_string = pgrx::pg_sys::pstrdup(hint.as_ptr());
    }
    false
}
