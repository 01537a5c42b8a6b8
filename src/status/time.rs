//! Time as the status and the messages print it: Postgres timestamps (µs
//! since 2000-01-01) as ISO 8601 UTC, formatted by hand because the worker
//! formats the timestamps of the events it claims. The civil date of a day
//! number comes from `oauth`, whose request signing needs it too. No shared
//! memory here.

use crate::oauth::civil_from_days;
use pgrx::pg_sys;

/// The current time as a Postgres timestamp.
pub fn now_us() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
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
    // Digit by digit: format!() costs a tenth of a claim of single events.
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
