//! What a destination reports about itself: errors (in its status slot, and
//! rate-limited in the server log), the back-off after a failure, and the
//! latency percentiles of its last deliveries.

use crate::config;
use crate::status::{self, SlotRef, State};
use pgrx::pg_sys;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A destination writes at most one error line to the server log this often.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// The status reports latency over this many events delivered last,
/// published this long after the first delivery not yet in it (the worker
/// wakes for it): at most five sorts of the window a second.
const LATENCY_WINDOW: usize = 10_000;
const LATENCY_EVERY: Duration = Duration::from_millis(200);

/// Errors and back-off of one destination.
pub(super) struct Health {
    id: String,
    slot: SlotRef,
    /// No new attempt before this (backing off after a failure).
    pub retry_at: Option<Instant>,
    backoff: Duration,
    /// (messages suppressed since, time of the last log line)
    last_logged: Option<(u64, Instant)>,
}

impl Health {
    pub fn new(id: &str, slot: SlotRef) -> Health {
        Health { id: id.to_string(), slot, retry_at: None, backoff: Duration::ZERO, last_logged: None }
    }

    /// Note an error of an attempt: in status always, in the server log
    /// when it is new.
    pub fn error(&mut self, message: &str) {
        self.note(message, State::Error);
    }

    /// Note an error the client reported on its own (a broker connection
    /// lost, say): status says `error` only while events are in process.
    pub fn client_error(&mut self, message: &str) {
        self.note(message, State::ClientError);
    }

    fn note(&mut self, message: &str, state: State) {
        status::record_error(self.slot, message);
        status::set_state(self.slot, state);
        let now = Instant::now();
        match &mut self.last_logged {
            Some((suppressed, at)) if now.duration_since(*at) < LOG_EVERY => *suppressed += 1,
            _ => {
                let suppressed = self.last_logged.map_or(0, |(n, _)| n);
                pgrx::log!(
                    "pg_outbox: destination \"{}\": {} ({} similar message(s) suppressed)",
                    self.id,
                    message,
                    suppressed
                );
                self.last_logged = Some((0, now));
            }
        }
    }

    /// Wait before the next attempt, twice as long as last time (between
    /// outbox.retry_min and outbox.retry_max).
    pub fn back_off(&mut self) {
        let min = Duration::from_millis(config::RETRY_MIN_MS.get() as u64);
        let max = Duration::from_millis(config::RETRY_MAX_MS.get() as u64);
        self.backoff = if self.backoff.is_zero() { min } else { (self.backoff * 2).min(max) };
        self.retry_at = Some(Instant::now() + self.backoff);
    }

    /// Attempts succeed again: the next one need not wait.
    pub fn recovered(&mut self) {
        self.backoff = Duration::ZERO;
        self.retry_at = None;
    }

    /// No back-off keeps the destination from trying now.
    pub fn may_try(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }
}

/// Latency of the last LATENCY_WINDOW events delivered (µs, change to
/// acknowledgement), whether any came since it was last published, and when.
#[derive(Default)]
pub(super) struct Latency {
    window: VecDeque<i64>,
    news: bool,
    published: Option<Instant>,
}

impl Latency {
    /// An event whose change committed (or began) at `born_us` is acknowledged now.
    pub fn record(&mut self, born_us: i64) {
        if self.window.len() == LATENCY_WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(unsafe { pg_sys::GetCurrentTimestamp() } - born_us);
        self.news = true;
    }

    /// When the percentiles are due to be published, if there is news.
    pub fn due(&self) -> Option<Instant> {
        self.news.then(|| self.published.map_or_else(Instant::now, |t| t + LATENCY_EVERY))
    }

    /// Publish the percentiles to the status slot when due.
    pub fn publish(&mut self, slot: SlotRef) {
        if self.due().is_none_or(|due| due > Instant::now()) {
            return;
        }
        let mut sorted: Vec<i64> = self.window.iter().copied().collect();
        sorted.sort_unstable();
        let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        status::set_latency(slot, at(0.5), at(0.99), sorted[sorted.len() - 1]);
        self.news = false;
        self.published = Some(Instant::now());
    }
}
