//! The background worker: wait, reload, take reports, acknowledge, claim,
//! produce, record. Every Postgres call happens on this (the main) thread;
//! librdkafka's threads only write to a channel and a pipe.

use crate::config;
use crate::kafka::{self, KafkaProducer, Refused, Report, Target};
use crate::params::Params;
use crate::pipe::{Batch, Pipe};
use crate::ring;
use crate::status::{self, SlotRef, State};
use crate::store;
use crate::types::{self, Content, Kind};
use crossbeam_channel::{unbounded, Receiver, Sender};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use rdkafka::producer::Producer;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the configuration is re-read even without a change signal.
const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How long SIGTERM waits for in-flight deliveries.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// How long a reconfigured destination's old producer may finish its work.
const RETIRE_GRACE: Duration = Duration::from_secs(3);
/// How long past deliveryTimeoutMs a batch may stay unacknowledged.
const STUCK_GRACE: Duration = Duration::from_millis(1000);
/// Pause after a busy pass, in microseconds (bounds wake-ups under load).
const BUSY_PAUSE_US: libc::c_long = 1000;
/// Best-effort events (and bytes) taken from the shared queue per pass.
const BEST_EFFORT_PER_TURN: usize = 10_000;
const BEST_EFFORT_BYTES_PER_TURN: usize = 4 << 20;
/// A destination writes at most one error line to the server log this often.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// How long one transaction call (init, commit, abort) may block a pass; the
/// call is resumed on later passes until maxBlockMs.
const TXN_STEP: Duration = Duration::from_millis(100);
/// Best-effort events one destination may hold back while librdkafka's
/// buffer is full (Java's send() would block up to maxBlockMs instead).
const BLOCKED_MAX: usize = 100_000;
const BLOCKED_MAX_BYTES: usize = 64 << 20;
/// A claim scans the outbox from the start at least this often.
const FULL_SCAN_MAX: Duration = Duration::from_secs(30);
/// At-least-once batches a destination may have in flight at once.
const PIPELINE: usize = 3;
/// A destination with a producing thread claims its next batch only while
/// the thread holds fewer bytes of messages than this not yet produced.
const PIPE_PENDING_MAX: usize = 16 << 20;
/// The status reports latency over this many events delivered last,
/// published this long after the first delivery not yet in it (the worker
/// wakes for it): at most five sorts of the window a second.
const LATENCY_WINDOW: usize = 10_000;
const LATENCY_EVERY: Duration = Duration::from_millis(200);

/// An event in flight: the id of its group (see `Group`) or 0, and its
/// change's commit, or its transaction start when unknown (Postgres µs).
#[derive(Clone, Copy)]
struct Flight {
    group: i64,
    born_us: i64,
}

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

/// One destination the worker serves.
struct Destination {
    id: String,
    topic_url: String,
    content: Content,
    /// Best-effort: events come from the shared queue, failures are lost
    /// (`best_effort()`).
    kind: Kind,
    parameters_text: String,
    params: Params,
    /// FHIR resource type by table, for the topic's tables in Aidbox's layout.
    resource_types: std::collections::HashMap<String, String>,
    slot: SlotRef,
    /// The producing thread of a non-transactional at-least-once
    /// destination (see `pipe`; declared before the producer: it is
    /// stopped first), and the batch being written for it.
    pipe: Option<Pipe>,
    batch: Option<Batch>,
    producer: Option<Arc<KafkaProducer>>,
    /// The message value being produced (librdkafka copies it): one buffer
    /// for all, not an allocation per event (given back after a large one).
    payload: Vec<u8>,
    epoch: u64,
    /// Event id -> its group and when its change's transaction began.
    in_flight: IdMap<Flight>,
    /// Latency of the last LATENCY_WINDOW events delivered (µs, change to
    /// acknowledgement), whether any came since it was last published, and when.
    latencies: VecDeque<i64>,
    /// Events per outbox row in the last claim (groups hold several).
    events_per_row: f64,
    latency_new: bool,
    latency_published: Option<Instant>,
    /// Groups (outbox rows holding several events) being delivered, by id.
    groups: IdMap<Group>,
    /// (produced at, event) in produce order, to expire what is never acknowledged.
    produced: VecDeque<(Instant, i64)>,
    /// At-least-once outcomes waiting to be recorded in the outbox.
    acked: Vec<i64>,
    /// (event, its group or 0, error)
    failed: Vec<(i64, i64, String)>,
    /// Events Kafka will never take, bound for outbox.dead_letter, with
    /// their group (or 0).
    poisoned: Vec<(i64, i64, String)>,
    /// Groups Kafka has whole, and how many events they hold (not listed in
    /// `acked`: the outbox deletes a group by its own id).
    whole: Vec<i64>,
    whole_events: usize,
    /// The producer must be replaced (fatal, fenced, or its messages time
    /// out), and why.
    replace_producer: Option<&'static str>,
    /// A broker refused a batch as poison: send one event at a time up to this
    /// event id, so only the culprit goes to the dead letters.
    isolate_until: i64,
    /// Events in flight when the last batch was produced, and the highest
    /// event id in flight since the pipeline was last empty.
    batch_len: usize,
    batch_last: i64,
    /// Pipelined claims: the highest event id claimed, and the transactions
    /// in progress when it was claimed (they alone may still commit events
    /// numbered below it). None: the next claim scans from the start.
    claimed_up_to: i64,
    watch: Option<Vec<u64>>,
    /// When a claim last scanned from the start (which finds events put back
    /// with old numbers, e.g. by outbox.retry_dead_letters).
    full_scan_at: Option<Instant>,
    /// Best-effort outcomes waiting to be counted.
    delivered_best_effort: u64,
    lost_best_effort: u64,
    lost_reason: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Some event of the batch in flight failed.
    batch_failed: bool,
    /// Transactional producing: init_transactions done for this producer, a
    /// transaction is open, events delivered in it (acknowledged at commit),
    /// and when the pending init/commit/abort must give up (maxBlockMs).
    txn_ready: bool,
    txn_open: bool,
    held: Vec<(i64, i64)>,
    txn_deadline: Option<Instant>,
    /// Best-effort events waiting for buffer space, with when they first did.
    blocked: VecDeque<(Instant, types::Event)>,
    blocked_bytes: usize,
    /// Reconfigured: this old incarnation only finishes what it has in flight.
    retiring_until: Option<Instant>,
    /// (messages suppressed since, time of the last log line)
    last_logged: Option<(u64, Instant)>,
}

/// Maps keyed by event or group id, updated for every event delivered.
type IdMap<V> = HashMap<i64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes an id with a multiplication and a rotation (as rustc's FxHash) instead of
/// SipHash: the keys are sequence numbers, not chosen by anyone.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The table picks buckets by the low bits, which a product takes from
        // the id's low bits alone (ids spaced by 2 or 4, destinations sharing
        // the sequence, would use part of the buckets): bring the high ones down.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// An outbox row holding several events of one statement (see
/// `outbox.event`), being delivered. Deleted whole once Kafka has all of its
/// events; if some fail, are never sent or go to the dead letters, it is
/// split into single events without those Kafka has (`store::split`).
#[derive(Default)]
struct Group {
    /// Its events in the claim.
    len: usize,
    /// Sent and without a delivery report yet.
    outstanding: usize,
    /// Delivered, not yet recorded.
    acked: Vec<i64>,
    /// Will not be acknowledged whole.
    broken: bool,
}

impl Destination {
    fn best_effort(&self) -> bool {
        self.kind == Kind::BestEffort
    }

    fn new(row: store::DestinationRow, params: Params, slot: SlotRef) -> Destination {
        Destination {
            content: row.content,
            kind: row.kind,
            id: row.id,
            topic_url: row.topic_url,
            parameters_text: row.parameters,
            resource_types: row.resource_types,
            params,
            slot,
            pipe: None,
            batch: None,
            producer: None,
            payload: Vec::new(),
            epoch: 0,
            in_flight: IdMap::default(),
            latencies: VecDeque::new(),
            events_per_row: 1.0,
            latency_new: false,
            latency_published: None,
            groups: IdMap::default(),
            produced: VecDeque::new(),
            acked: Vec::new(),
            failed: Vec::new(),
            poisoned: Vec::new(),
            whole: Vec::new(),
            whole_events: 0,
            replace_producer: None,
            isolate_until: 0,
            batch_len: 0,
            batch_last: 0,
            claimed_up_to: 0,
            watch: None,
            full_scan_at: None,
            delivered_best_effort: 0,
            lost_best_effort: 0,
            lost_reason: None,
            retry_at: None,
            backoff: Duration::ZERO,
            batch_failed: false,
            txn_ready: false,
            txn_open: false,
            held: Vec::new(),
            txn_deadline: None,
            blocked: VecDeque::new(),
            blocked_bytes: 0,
            retiring_until: None,
            last_logged: None,
        }
    }

    /// Note an error of an attempt: in status always, in the server log
    /// when it is new.
    fn error(&mut self, message: &str) {
        self.note_error(message, State::Error);
    }

    /// Note an error the client reported on its own (a broker connection
    /// lost, say): status says `error` only while events are in process.
    fn client_error(&mut self, message: &str) {
        self.note_error(message, State::ClientError);
    }

    fn note_error(&mut self, message: &str, state: State) {
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

    fn back_off(&mut self) {
        let min = Duration::from_millis(config::RETRY_MIN_MS.get() as u64);
        let max = Duration::from_millis(config::RETRY_MAX_MS.get() as u64);
        self.backoff = if self.backoff.is_zero() { min } else { (self.backoff * 2).min(max) };
        self.retry_at = Some(Instant::now() + self.backoff);
    }

    /// An at-least-once destination may claim its next batch: while earlier
    /// batches are in flight too, up to `PIPELINE` of them (not while a
    /// transaction or the search for a poison event needs one at a time).
    fn ready(&self, now: Instant) -> bool {
        let room = self.in_flight.is_empty()
            || (!self.params.transactional
                && self.isolate_until == 0
                && self.in_flight.len() < (PIPELINE - 1) * config::BATCH_SIZE.get() as usize);
        !self.best_effort()
            && self.retiring_until.is_none()
            && room
            // Messages the producing thread has yet to produce (behind a full
            // librdkafka buffer) are not followed by more.
            && self.pipe.as_ref().is_none_or(|p| p.pending() < PIPE_PENDING_MAX)
            && !self.txn_open
            && self.held.is_empty()
            && !self.outcomes_waiting()
            // What a broken group still has in flight decides what of it is
            // claimed again, before anything after it.
            && !self.groups.values().any(|g| g.broken && g.outstanding > 0)
            && self.retry_at.is_none_or(|t| t <= now)
    }

    /// Longest an event may wait for its acknowledgement.
    fn ack_limit(&self) -> Duration {
        Duration::from_millis(self.params.delivery_timeout_ms as u64) + STUCK_GRACE
    }

    /// When the oldest event in flight expires (forgetting acknowledged ones).
    fn oldest_deadline(&mut self) -> Option<Instant> {
        while let Some((at, id)) = self.produced.front() {
            if self.in_flight.contains_key(id) {
                return Some(*at + self.ack_limit());
            }
            self.produced.pop_front();
        }
        None
    }

    /// Everything in flight failed with `error`: at-least-once events are
    /// retried from the outbox, best-effort events are lost.
    fn fail_in_flight(&mut self, error: &str) {
        let in_flight: Vec<(i64, i64)> = self.in_flight.drain().map(|(id, f)| (id, f.group)).collect();
        self.produced.clear();
        if self.best_effort() {
            self.lost_best_effort += in_flight.len() as u64;
            self.lost_reason = Some(error.to_string());
            return;
        }
        for (id, group) in in_flight {
            self.reported(group);
            self.fail(id, group, error.to_string());
        }
        for (id, group) in std::mem::take(&mut self.held) {
            self.reported(group);
            self.fail(id, group, error.to_string());
        }
    }

    /// An event whose change committed (or began) at `born_us` is acknowledged now.
    fn latency(&mut self, born_us: i64) {
        if self.latencies.len() == LATENCY_WINDOW {
            self.latencies.pop_front();
        }
        self.latencies.push_back(unsafe { pg_sys::GetCurrentTimestamp() } - born_us);
        self.latency_new = true;
    }

    /// When the latency percentiles are due to be published, if there is news.
    fn latency_due(&self) -> Option<Instant> {
        self.latency_new.then(|| self.latency_published.map_or_else(Instant::now, |t| t + LATENCY_EVERY))
    }

    /// Publish the latency percentiles when due.
    fn publish_latency(&mut self) {
        if self.latency_due().is_none_or(|due| due > Instant::now()) {
            return;
        }
        let mut sorted: Vec<i64> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        status::set_latency(self.slot, at(0.5), at(0.99), sorted[sorted.len() - 1]);
        self.latency_new = false;
        self.latency_published = Some(Instant::now());
    }

    /// An event of this group (0: none) has its delivery report.
    fn reported(&mut self, group: i64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.outstanding = g.outstanding.saturating_sub(1);
        }
    }

    /// This group (0: none) will not be acknowledged whole.
    fn break_group(&mut self, group: i64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.broken = true;
        }
    }

    /// Kafka has the event: acknowledged now, or with the rest of its group.
    fn delivered(&mut self, id: i64, group: i64) {
        if group == 0 {
            self.acked.push(id);
            return;
        }
        // A group no longer tracked is split rather than trusted whole.
        let g = self.groups.entry(group).or_insert_with(|| Group { broken: true, ..Group::default() });
        g.acked.push(id);
        if !g.broken && g.acked.len() == g.len {
            let g = self.groups.remove(&group).expect("looked up above");
            self.whole_events += g.acked.len();
            self.whole.push(group);
        }
    }

    /// Stop waiting for groups to complete (shutting down, retiring): what
    /// Kafka has of them is recorded by splitting them.
    fn break_all_groups(&mut self) {
        self.groups.values_mut().for_each(|g| g.broken = true);
    }

    /// The event failed; it stays in the outbox for the next attempt.
    fn fail(&mut self, id: i64, group: i64, error: String) {
        self.break_group(group);
        self.failed.push((id, group, error));
    }

    /// Kafka will never take the event: bound for outbox.dead_letter.
    fn poison(&mut self, id: i64, group: i64, error: String) {
        self.break_group(group);
        self.poisoned.push((id, group, error));
    }

    /// Drop the producer (what it has in flight is purged); the next batch
    /// gets a new one.
    fn drop_producer(&mut self) {
        self.pipe = None;
        self.producer = None;
        self.txn_ready = false;
        self.txn_open = false;
        self.txn_deadline = None;
    }

    /// Nothing in flight, no transaction open, no outcome left to record.
    fn idle(&self) -> bool {
        self.in_process() == 0
            && !self.txn_open
            && !self.outcomes_waiting()
            && self.delivered_best_effort == 0
            && self.lost_best_effort == 0
    }

    /// At-least-once outcomes not yet recorded in the outbox.
    fn outcomes_waiting(&self) -> bool {
        !(self.acked.is_empty() && self.whole.is_empty() && self.failed.is_empty() && self.poisoned.is_empty())
    }

    /// Events in process: produced and not yet acknowledged (or committed).
    fn in_process(&self) -> u64 {
        let waiting: usize = self.groups.values().map(|g| g.acked.len()).sum();
        (self.in_flight.len() + self.held.len() + self.blocked.len() + waiting) as u64
    }

    /// Make sure a producer exists; on failure note the error and back off.
    fn ensure_producer(&mut self, next_epoch: &mut u64, tx: &Sender<Report>, wake_write: RawFd) -> bool {
        if self.producer.is_some() {
            return true;
        }
        match kafka::create_producer(&self.params, *next_epoch, tx.clone()) {
            Ok(p) => {
                let p = Arc::new(p);
                // A thread of its own produces and reads the reports, except
                // for transactions (each call in order with the produces) and
                // OAUTHBEARER tokens (rust-rdkafka's poll makes them).
                let threaded = !self.best_effort() && !self.params.transactional && self.params.token.is_none();
                self.pipe = threaded
                    .then(|| Pipe::start(p.clone(), &self.params.kafka_topic, &self.topic_url, &self.id, wake_write))
                    .flatten();
                if self.pipe.is_none() {
                    kafka::wake_on_reports(&p, wake_write);
                }
                self.producer = Some(p);
                self.epoch = *next_epoch;
                *next_epoch += 1;
                true
            }
            Err(e) => {
                let e = self.params.redact(&e.to_string());
                self.error(&format!("could not create the Kafka producer: {e}"));
                self.back_off();
                false
            }
        }
    }

    /// Transactional producing: run one step of init_transactions (resumed
    /// on later passes) and begin a transaction. False: not this pass.
    fn begin_transaction(&mut self) -> bool {
        let Some(p) = &self.producer else { return false };
        if !self.txn_ready {
            let deadline = *self
                .txn_deadline
                .get_or_insert(Instant::now() + Duration::from_millis(self.params.max_block_ms as u64));
            match p.init_transactions(TXN_STEP) {
                Ok(()) => {
                    self.txn_ready = true;
                    self.txn_deadline = None;
                }
                Err(e) if kafka::is_retriable(&e) && Instant::now() < deadline => {
                    if !kafka::is_timeout(&e) {
                        self.error(&format!("init_transactions: {e} (retried until maxBlockMs)"));
                    }
                    return false;
                }
                Err(e) => {
                    let e = if kafka::is_retriable(&e) {
                        format!(
                            "init_transactions did not complete within maxBlockMs ({} ms): {e}",
                            self.params.max_block_ms
                        )
                    } else {
                        format!("init_transactions failed: {e}")
                    };
                    self.error(&e);
                    self.drop_producer();
                    self.back_off();
                    return false;
                }
            }
        }
        let Some(p) = &self.producer else { return false };
        if let Err(e) = p.begin_transaction() {
            self.error(&format!("begin_transaction failed: {e}"));
            self.drop_producer();
            self.back_off();
            return false;
        }
        self.txn_open = true;
        true
    }

    /// Transactional producing: once every event of the open transaction has
    /// its report, commit it (or abort it when some failed), one bounded step
    /// per pass. Events are acknowledged only when the commit succeeded.
    fn finish_transaction(&mut self) {
        if !self.txn_open || !self.in_flight.is_empty() {
            return;
        }
        let Some(p) = &self.producer else { return };
        let abort = !self.failed.is_empty() || self.batch_failed;
        let deadline =
            *self.txn_deadline.get_or_insert(Instant::now() + Duration::from_millis(self.params.max_block_ms as u64));
        let result = if abort { p.abort_transaction(TXN_STEP) } else { p.commit_transaction(TXN_STEP) };
        let what = if abort { "abort_transaction" } else { "commit_transaction" };
        match result {
            Ok(()) => {
                self.txn_open = false;
                self.txn_deadline = None;
                for (id, group) in std::mem::take(&mut self.held) {
                    self.reported(group);
                    if abort {
                        self.fail(id, group, "the transaction was aborted".to_string());
                    } else {
                        self.delivered(id, group);
                    }
                }
            }
            Err(e) if kafka::is_retriable(&e) && Instant::now() < deadline => {
                if !kafka::is_timeout(&e) {
                    self.error(&format!("{what}: {e} (retried until maxBlockMs)"));
                }
            }
            Err(e) if !abort && kafka::txn_requires_abort(&e) => {
                // Resolved by aborting: the next steps do that.
                self.error(&format!("{what} failed: {e}"));
                self.batch_failed = true;
                self.txn_deadline = None;
            }
            Err(e) => {
                self.error(&format!("{what} failed: {e}"));
                let error = format!("{what} failed: {e}");
                self.fail_in_flight(&error);
                self.drop_producer();
            }
        }
    }

    /// Produce one event; librdkafka may refuse it at once.
    fn send(&mut self, ev: &types::Event) -> Result<(), Refused> {
        let resource_type = self.resource_types.get(&*ev.table).map(String::as_str);
        let fhir_base = if resource_type.is_some() { config::fhir_base_url() } else { String::new() };
        let target = Target {
            destination_id: &self.id,
            topic_url: &self.topic_url,
            content: self.content,
            resource_type,
            fhir_base: &fhir_base,
        };
        let producer = self.producer.as_ref().ok_or(Refused::Other("no producer".to_string()))?;
        if let Some(pipe) = &self.pipe {
            // Produced by the thread (`hand_over`); refusals come as reports.
            self.batch.get_or_insert_with(|| pipe.batch()).push(&target, ev);
        } else {
            if self.payload.capacity() > 1 << 20 {
                self.payload = Vec::new();
            }
            kafka::send(producer, &self.params.kafka_topic, &target, ev, &mut self.payload)
                .map_err(|e| Refused::of(&e))?;
        }
        self.in_flight.insert(ev.id, Flight { group: ev.group, born_us: ev.born_us });
        if let Some(g) = self.groups.get_mut(&ev.group) {
            g.outstanding += 1;
        }
        self.produced.push_back((Instant::now(), ev.id));
        Ok(())
    }

    /// The producer whose reports the main thread serves (it has no
    /// producing thread).
    fn served_here(&self) -> Option<&KafkaProducer> {
        self.producer.as_deref().filter(|_| self.pipe.is_none())
    }

    /// The events written since the last call go to the producing thread.
    fn hand_over(&mut self) {
        if let (Some(pipe), Some(batch)) = (&self.pipe, self.batch.take()) {
            pipe.send(batch);
        }
    }

    /// Best-effort: send what waited for buffer space, in order; what waited
    /// longer than maxBlockMs is lost (Java's send() would have thrown).
    /// Without a producer (replaced meanwhile, backing off) they keep waiting.
    fn send_blocked(&mut self) {
        let max_block = Duration::from_millis(self.params.max_block_ms as u64);
        if let Some(p) = &self.producer {
            kafka::serve(p);
        }
        while let Some((since, ev)) = self.blocked.pop_front() {
            self.blocked_bytes -= event_bytes(&ev);
            if since.elapsed() > max_block {
                self.lose(format!("librdkafka's buffer stayed full for maxBlockMs ({} ms)", self.params.max_block_ms));
                continue;
            }
            let result = if self.producer.is_some() { self.send(&ev) } else { Err(Refused::Full) };
            match result {
                Ok(()) => {}
                Err(Refused::Full) => {
                    self.hold(since, ev);
                    break;
                }
                Err(Refused::Poison(e) | Refused::Other(e)) => self.lose(format!("produce refused: {e}")),
            }
        }
    }

    /// Put an event at the head of the wait (it was just taken from there).
    fn hold(&mut self, since: Instant, ev: types::Event) {
        self.blocked_bytes += event_bytes(&ev);
        self.blocked.push_front((since, ev));
    }

    /// Queue an event behind those waiting for buffer space, if there is room.
    fn wait_for_space(&mut self, ev: types::Event) {
        let bytes = event_bytes(&ev);
        if self.params.max_block_ms == 0 {
            self.lose("librdkafka's buffer is full (maxBlockMs is 0)".to_string());
        } else if self.blocked.len() >= BLOCKED_MAX || self.blocked_bytes + bytes > BLOCKED_MAX_BYTES {
            self.lose("librdkafka's buffer is full and too many events wait for it".to_string());
        } else {
            self.blocked_bytes += bytes;
            self.blocked.push_back((Instant::now(), ev));
        }
    }

    /// Best-effort: send one event, or hold it while the buffer is full.
    fn send_best_effort(&mut self, ev: types::Event) {
        if !self.blocked.is_empty() {
            // Keep the order: behind those already waiting.
            self.wait_for_space(ev);
            return;
        }
        match self.send(&ev) {
            Ok(()) => {}
            Err(Refused::Full) => self.wait_for_space(ev),
            Err(Refused::Poison(e) | Refused::Other(e)) => self.lose(format!("produce refused: {e}")),
        }
    }

    fn lose(&mut self, reason: String) {
        self.lost_best_effort += 1;
        self.lost_reason = Some(reason);
    }
}

/// Memory an event waiting in the worker takes, roughly.
fn event_bytes(ev: &types::Event) -> usize {
    128 + ev.table.len() + ev.key.as_ref().map_or(0, String::len) + ev.row.as_ref().map_or(0, String::len)
}

struct Worker {
    destinations: BTreeMap<String, Destination>,
    tx: Sender<Report>,
    rx: Receiver<Report>,
    wake_read: RawFd,
    wake_write: RawFd,
    next_epoch: u64,
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
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_outbox_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = config::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    pgrx::log!("pg_outbox worker started for database \"{database}\"");
    // The worker's own commits (deleting acknowledged events, recording
    // failures, moving dead letters) need not wait for the WAL flush: one lost
    // in a crash only means those events are sent again, never lost.
    // Its claims must walk the outbox's (destination_id, id) index in order:
    // before autovacuum first analyzes a fresh outbox the planner would
    // rather collect and sort the whole backlog for every batch. And they are
    // planned for their parameters' values (see store::select_into), whatever
    // plan_cache_mode the server sets.
    for (name, value) in [
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

    let mut fds = [0 as libc::c_int; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        pgrx::error!("pg_outbox worker: could not create its wake-up pipe");
    }
    let (tx, rx) = unbounded();
    let mut worker = Worker {
        destinations: BTreeMap::new(),
        tx,
        rx,
        wake_read: fds[0],
        wake_write: fds[1],
        next_epoch: 1,
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
    };
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

#[pg_guard]
unsafe extern "C-unwind" fn withdraw_latch(_code: i32, _arg: pg_sys::Datum) {
    status::publish_worker_latch(std::ptr::null_mut());
}

impl Worker {
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
        self.drain_best_effort();
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
        for d in self.destinations.values_mut() {
            let retry = d.retry_at.filter(|_| d.in_flight.is_empty());
            let blocked =
                d.blocked.front().map(|(since, _)| *since + Duration::from_millis(d.params.max_block_ms as u64));
            for due in [d.oldest_deadline(), retry, blocked, d.retiring_until, d.latency_due()].into_iter().flatten() {
                timeout = timeout.min(due.saturating_duration_since(now) + Duration::from_millis(1));
            }
            // A transaction call (init, commit, abort) is resumed step by step.
            let txn_step_due = d.params.transactional
                && d.producer.is_some()
                && (!d.txn_ready || (d.txn_open && d.in_flight.is_empty()));
            if txn_step_due {
                timeout = timeout.min(TXN_STEP);
            }
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

    fn maybe_reload(&mut self) {
        let generation = status::config_generation();
        let due = self.last_reload.is_none_or(|t| t.elapsed() >= RELOAD_EVERY);
        if generation == self.seen_generation && !due {
            return;
        }
        let read_us = status::now_us();
        let loaded = in_transaction("reading the configuration", || {
            let Some(extension) = store::extension_oid()? else {
                return Ok(None);
            };
            store::destinations().map(|rows| Some((extension, rows)))
        });
        self.last_reload = Some(Instant::now());
        match loaded {
            Some(Ok(Some((extension, rows)))) => {
                self.seen_generation = generation;
                if self.extension != Some(extension) {
                    // Created (again): nothing of a former incarnation carries over,
                    // event ids start anew.
                    self.apply_configuration(Vec::new(), read_us);
                    self.extension = Some(extension);
                    pgrx::log!("pg_outbox worker: serving {} destination(s)", rows.len());
                }
                self.extension_present = true;
                let before = self.destinations.len();
                self.apply_configuration(rows, read_us);
                if self.destinations.len() < before || !self.swept {
                    // A writer that read a destination just before it was dropped
                    // may have left events for it: remove them.
                    self.swept = in_transaction("removing events of dropped destinations", store::delete_orphans)
                        .is_some_and(|r| r.is_ok());
                }
            }
            Some(Ok(None)) => {
                self.seen_generation = generation;
                if self.extension_present {
                    pgrx::log!("pg_outbox worker: extension dropped, idle until it is created again");
                }
                self.extension_present = false;
                self.extension = None;
                self.apply_configuration(Vec::new(), read_us);
            }
            Some(Err(e)) => pgrx::warning!("pg_outbox worker: reading the configuration failed: {e}"),
            None => {}
        }
    }

    /// `read_us`: when the read of `rows` began (see `status::retain_only`).
    fn apply_configuration(&mut self, rows: Vec<store::DestinationRow>, read_us: i64) {
        let wanted: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let gone: Vec<String> =
            self.destinations.iter().filter(|(_, d)| !wanted.contains(d.id.as_str())).map(|(k, _)| k.clone()).collect();
        for key in gone {
            self.destinations.remove(&key);
        }
        // Their slots go too (see retain_only for the exception).
        status::retain_only(&wanted, read_us);
        let changed: Vec<String> = rows
            .iter()
            .filter(|row| {
                self.destinations.get(&row.id).is_some_and(|d| {
                    d.parameters_text != row.parameters
                        || d.topic_url != row.topic_url
                        || d.content != row.content
                        || d.kind != row.kind
                })
            })
            .map(|row| row.id.clone())
            .collect();
        // FHIR tables renamed, or a topic's tables changed: only how
        // messages are built changes, the producer stays.
        for row in &rows {
            if let Some(d) = self.destinations.get_mut(&row.id) {
                d.resource_types = row.resource_types.clone();
            }
        }
        self.retire(&changed);
        for row in rows {
            if self.destinations.contains_key(&row.id) {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&row.parameters).unwrap_or(serde_json::Value::Null);
            let params = match Params::parse(&row.id, row.kind == Kind::BestEffort, &value) {
                Ok(p) => p,
                Err(e) => {
                    pgrx::warning!("pg_outbox: destination \"{}\" skipped: {}", row.id, e.message);
                    continue;
                }
            };
            let Some(slot) = status::claim_slot(&row.id) else {
                pgrx::warning!(
                    "pg_outbox: destination \"{}\" skipped: more than {} destinations",
                    row.id,
                    status::MAX_DESTINATIONS
                );
                continue;
            };
            self.destinations.insert(row.id.clone(), Destination::new(row, params, slot));
        }
    }

    /// Destinations whose configuration changed keep their producer for a
    /// while under another key (`retiring_until`): it finishes what it has in
    /// flight (reports are matched by producer epoch), its outcomes are
    /// recorded as usual, an open Kafka transaction is aborted; the rebuilt
    /// destination starts at once but claims at-least-once events only once
    /// the old one is gone, so nothing is sent twice needlessly. Nothing here
    /// blocks the worker.
    fn retire(&mut self, ids: &[String]) {
        let until = Instant::now() + RETIRE_GRACE;
        for id in ids {
            let Some(mut d) = self.destinations.remove(id) else { continue };
            if d.idle() {
                continue; // nothing to finish: dropped now
            }
            d.retiring_until = Some(until);
            // An open transaction is aborted once its reports are in.
            d.batch_failed = true;
            let key = format!("{id}\u{0}retiring-{}", d.epoch);
            self.destinations.insert(key, d);
        }
    }

    /// Drop retiring destinations that are done or out of time. What an
    /// at-least-once one leaves is still in the outbox (the new producer sends
    /// it); what a best-effort one leaves counts as lost.
    fn finish_retiring(&mut self) {
        let now = Instant::now();
        let done: Vec<String> = self
            .destinations
            .iter()
            .filter(|(_, d)| d.retiring_until.is_some_and(|until| until <= now || d.idle()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            let Some(d) = self.destinations.remove(&key) else { continue };
            if d.best_effort() && d.in_process() > 0 {
                status::add_lost_slot(d.slot, d.in_process());
                status::record_error(d.slot, "events in flight when the destination was reconfigured were lost");
            }
        }
    }

    /// An at-least-once destination whose previous configuration still has
    /// events in flight waits for them before it claims.
    fn has_retiring(&self, id: &str) -> bool {
        self.destinations.values().any(|d| d.retiring_until.is_some() && d.id == id)
    }

    /// Serve the producers and sort their reports onto destinations.
    fn take_reports(&mut self) {
        for p in self.destinations.values().filter_map(Destination::served_here) {
            kafka::serve(p);
        }
        let reports: Vec<Report> = self.rx.try_iter().collect();
        for report in reports {
            let epoch = match &report {
                Report::Delivered { epoch, .. } | Report::Failed { epoch, .. } | Report::ClientError { epoch, .. } => {
                    *epoch
                }
            };
            // Reports from a producer we already replaced are stale.
            let Some(d) = self.destinations.values_mut().find(|d| d.epoch == epoch && d.producer.is_some()) else {
                continue;
            };
            match report {
                Report::Delivered { event_id, .. } => {
                    if let Some(Flight { group, born_us }) = d.in_flight.remove(&event_id) {
                        d.latency(born_us);
                        if d.best_effort() {
                            d.delivered_best_effort += 1;
                        } else if d.txn_open {
                            // Still outstanding: the transaction may yet abort.
                            d.held.push((event_id, group));
                        } else {
                            d.reported(group);
                            d.delivered(event_id, group);
                        }
                    }
                }
                Report::Failed { event_id, error, poison, stale, timed_out, refused, .. } => {
                    if stale {
                        d.replace_producer = Some("the producer was fenced or lost its idempotence state");
                    } else if timed_out && !d.best_effort() {
                        // A broker that forgot this idempotent producer (restarted
                        // without its state) answers UNKNOWN_PRODUCER_ID, which
                        // librdkafka retries until each message times out, again
                        // and again: a new producer gets a new id.
                        d.replace_producer = Some("its messages timed out");
                    }
                    if let Some(Flight { group, .. }) = d.in_flight.remove(&event_id) {
                        d.reported(group);
                        if d.best_effort() {
                            d.lost_best_effort += 1;
                            d.lost_reason = Some(error);
                        } else if poison && (refused || d.batch_len == 1) {
                            // Refused by librdkafka, or sent alone: it is the culprit.
                            d.poison(event_id, group, error);
                        } else if poison {
                            // Somewhere in this batch: retry one at a time.
                            d.isolate_until = d.isolate_until.max(d.batch_last);
                            d.fail(event_id, group, error);
                        } else {
                            d.fail(event_id, group, error);
                        }
                    }
                }
                Report::ClientError { error, fatal, .. } => {
                    d.client_error(&error);
                    if fatal {
                        d.replace_producer = Some("the producer reported a fatal error");
                    }
                }
            }
        }
        for d in self.destinations.values_mut() {
            let fatal = d.producer.as_ref().and_then(|p| p.client().fatal_error());
            let ended = d.pipe.as_ref().is_some_and(Pipe::ended);
            let replace = d.replace_producer.take();
            if replace.is_some() || fatal.is_some() || ended {
                // This producer is done (fatal or fenced, its messages time
                // out, or its producing thread ended): what it has in flight
                // failed, a new producer takes over.
                let reason = match (fatal, replace) {
                    (Some((_, m)), _) => m,
                    _ if ended => "the destination's producing thread ended".to_string(),
                    (None, r) => r.unwrap_or_default().to_string(),
                };
                d.fail_in_flight(&reason);
                d.drop_producer();
            }
        }
        for d in self.destinations.values_mut() {
            d.finish_transaction();
        }
    }

    /// Events still unacknowledged past the delivery timeout (librdkafka does
    /// not expire messages while no broker is reachable): count them as failed
    /// and start over with a new producer, which drops the old one's queue.
    fn expire_unacknowledged(&mut self) {
        let now = Instant::now();
        for d in self.destinations.values_mut() {
            if d.oldest_deadline().is_some_and(|due| due <= now) {
                let error =
                    format!("no acknowledgement within deliveryTimeoutMs ({} ms)", d.params.delivery_timeout_ms);
                d.fail_in_flight(&error);
                d.drop_producer();
            }
        }
    }

    /// At-least-once: delete what Kafka acknowledged, keep failed events with
    /// their error. Best-effort: count delivered and lost.
    fn record_outcomes(&mut self) {
        for d in self.destinations.values_mut() {
            d.publish_latency();
            if d.best_effort() {
                let (delivered, lost) = (d.delivered_best_effort, d.lost_best_effort);
                if delivered == 0 && lost == 0 {
                    continue;
                }
                d.delivered_best_effort = 0;
                d.lost_best_effort = 0;
                status::record_outcome(d.slot, delivered, 0, d.in_process());
                status::add_lost_slot(d.slot, lost);
                if let Some(reason) = d.lost_reason.take() {
                    d.error(&format!("{lost} event(s) lost: {reason}"));
                }
                continue;
            }
            // A broken group's delivered events are recorded by splitting it
            // into single events without them; the group is forgotten once
            // nothing of it is in flight.
            let (mut split, mut split_acked) = (Vec::new(), Vec::new());
            d.groups.retain(|id, g| {
                if g.broken && !g.acked.is_empty() {
                    split.push(*id);
                    split_acked.append(&mut g.acked);
                }
                !(g.broken && g.outstanding == 0)
            });
            if !d.outcomes_waiting() && split.is_empty() {
                continue;
            }
            let mut acked = std::mem::take(&mut d.acked);
            acked.extend_from_slice(&split_acked);
            let failed = std::mem::take(&mut d.failed);
            let whole = std::mem::take(&mut d.whole);
            let whole_events = std::mem::take(&mut d.whole_events);
            let poisoned = std::mem::take(&mut d.poisoned);
            if !failed.is_empty() || !poisoned.is_empty() {
                // Events left behind: the next claim scans from the start.
                d.watch = None;
            }
            let failed_ids: Vec<i64> = failed.iter().map(|(id, _, _)| *id).collect();
            let failed_groups: Vec<i64> = failed.iter().map(|(_, group, _)| *group).filter(|g| *g != 0).collect();
            let first_error = failed.first().map(|(_, _, e)| e.clone()).unwrap_or_default();
            let done = in_transaction("recording deliveries", || -> pgrx::spi::SpiResult<()> {
                store::split(&d.id, &split, &split_acked)?;
                store::acknowledge(&d.id, &acked, &whole)?;
                store::record_failure(&d.id, &failed_ids, &failed_groups, &first_error)
            });
            // Separately: a dead letter that cannot be recorded must not undo the acks.
            if !poisoned.is_empty() {
                let moved = in_transaction("moving events to outbox.dead_letter", || -> pgrx::spi::SpiResult<()> {
                    poisoned.iter().try_for_each(|(id, group, error)| store::dead_letter(&d.id, *id, *group, error))
                });
                if !matches!(moved, Some(Ok(()))) {
                    d.back_off();
                }
            }
            if !matches!(done, Some(Ok(()))) {
                // Not recorded: the events are still in the outbox and will be
                // sent again (a duplicate, never a loss).
                d.watch = None;
                d.back_off();
                continue;
            }
            status::record_outcome(
                d.slot,
                (acked.len() + whole_events) as u64,
                (failed_ids.len() + poisoned.len()) as u64,
                d.in_process(),
            );
            if let Some((_, _, error)) = poisoned.first() {
                d.error(&format!("{} event(s) moved to outbox.dead_letter: {error}", poisoned.len()));
            }
            if !failed_ids.is_empty() {
                d.batch_failed = true;
                d.error(&format!("delivery of {} event(s) failed: {first_error}", failed_ids.len()));
                d.back_off();
            } else if !d.batch_failed {
                // What was claimed since the last failure went through: the
                // next claim need not wait.
                d.backoff = Duration::ZERO;
                d.retry_at = None;
            }
        }
    }

    /// At-least-once: claim the next batch of each ready destination and produce it.
    fn claim_and_produce(&mut self) {
        if !self.extension_present {
            return;
        }
        let now = Instant::now();
        let batch = config::BATCH_SIZE.get() as i64;
        // Events were put back with old numbers: every claim starts over.
        let rescan = status::rescan_generation();
        if rescan != self.seen_rescan {
            self.seen_rescan = rescan;
            self.destinations.values_mut().for_each(|d| d.watch = None);
        }
        let ids: Vec<String> = self
            .destinations
            .values()
            .filter(|d| d.ready(now) && !self.has_retiring(&d.id))
            .map(|d| d.id.clone())
            .collect();
        for id in ids {
            let limit = match self.destinations.get(&id) {
                Some(d) if d.isolate_until > 0 => 1,
                _ => batch,
            };
            let Some(d) = self.destinations.get(&id) else { continue };
            // Claim above the last claim if no transaction that was running
            // then has finished since (only those can commit events numbered
            // lower); else scan from the start, leaving out what is in flight.
            // Scan from the start anyway now and then (a safety net).
            let full_due = d.full_scan_at.is_none_or(|t| now.saturating_duration_since(t) >= FULL_SCAN_MAX);
            let fast = d.watch.as_ref().filter(|_| !full_due);
            let (after, in_flight, groups) = (d.claimed_up_to, &d.in_flight, &d.groups);
            // Rows to look through for `limit` events: as many as the last
            // claim's rows held, a quarter more (a claim cut short by it is
            // merely smaller; the next one adapts).
            let rows = ((limit as f64 / d.events_per_row).ceil() * 1.25) as i64 + 1;
            let rows = rows.min(limit);
            let mut full_scan = false;
            let claim = || -> pgrx::spi::SpiResult<store::Claimed> {
                // Outbox rows in flight: the groups, and the events that may be
                // rows of their own (single events, members of a broken group,
                // which may have been split). Members of other groups are not
                // rows; listing them made the list a whole batch long, and
                // Postgres estimates each element when it plans the claim.
                let skip = |above: i64| -> Vec<i64> {
                    let row_of_its_own = |f: &Flight| f.group == 0 || groups.get(&f.group).is_none_or(|g| g.broken);
                    let in_groups: HashSet<i64> = in_flight.values().map(|f| f.group).filter(|g| *g > above).collect();
                    in_flight
                        .iter()
                        .filter(|(id, f)| **id > above && row_of_its_own(f))
                        .map(|(id, _)| *id)
                        .chain(in_groups)
                        .collect()
                };
                if let Some(watch) = fast {
                    let c = store::claim(&id, after, &skip(after), limit, rows)?;
                    if watch.iter().all(|x| c.running(*x)) {
                        return Ok(c);
                    }
                }
                full_scan = true;
                store::claim(&id, 0, &skip(0), limit, rows)
            };
            let Some(claimed) = in_transaction("claiming events", claim) else {
                self.last_reload = None; // maybe the extension went away: look again
                return;
            };
            let mut claimed = match claimed {
                Ok(c) => c,
                Err(e) => {
                    pgrx::warning!("pg_outbox worker: claiming events failed: {e}");
                    continue;
                }
            };
            let events = std::mem::take(&mut claimed.events);
            let Some(d) = self.destinations.get_mut(&id) else { continue };
            if full_scan {
                d.full_scan_at = Some(now);
            }
            if claimed.rows > 0 {
                d.events_per_row = (events.len() as f64 / claimed.rows as f64).max(1.0);
            }
            // Set again below once the whole claim is on its way.
            d.watch = if events.is_empty() { claimed.in_progress() } else { None };
            if events.first().is_some_and(|e| e.id > d.isolate_until) {
                d.isolate_until = 0; // past the batch that held the culprit
            }
            if events.is_empty() || !d.ensure_producer(&mut self.next_epoch, &self.tx, self.wake_write) {
                continue;
            }
            if d.params.transactional && !d.begin_transaction() {
                // Not yet initialised (resumed next pass) or failed (backing off).
                let now = Instant::now();
                if d.retry_at.is_none_or(|t| t <= now) {
                    d.retry_at = Some(now + TXN_STEP);
                }
                continue;
            }
            self.busy = true;
            d.retry_at = None;
            d.batch_failed = false;
            if d.in_flight.is_empty() {
                d.batch_last = 0;
            }
            d.batch_last = d.batch_last.max(events.iter().map(|e| e.id).max().unwrap_or(0));
            let mut sizes: HashMap<i64, usize> = HashMap::new();
            for ev in events.iter().filter(|e| e.group != 0) {
                *sizes.entry(ev.group).or_default() += 1;
            }
            for (group, len) in sizes {
                d.groups.insert(group, Group { len, ..Group::default() });
            }
            let mut all_sent = true;
            for (i, ev) in events.iter().enumerate() {
                match d.send(ev) {
                    // Claims go by outbox row: a group counts once it is all sent.
                    Ok(()) if ev.group == 0 => d.claimed_up_to = ev.id,
                    Ok(()) => {
                        if events.get(i + 1).is_none_or(|next| next.group != ev.group) {
                            d.claimed_up_to = ev.group;
                        }
                    }
                    // The rest stays in the outbox for the next batch.
                    Err(Refused::Full) => {
                        d.break_group(ev.group);
                        all_sent = false;
                        break;
                    }
                    // Never acceptable: set it aside, the others go on.
                    Err(Refused::Poison(error)) => d.poison(ev.id, ev.group, format!("produce refused: {error}")),
                    Err(Refused::Other(error)) => {
                        // Stop here: what follows must not overtake this event.
                        d.fail(ev.id, ev.group, format!("produce refused: {error}"));
                        all_sent = false;
                        break;
                    }
                }
            }
            d.hand_over();
            // Groups not reached stay in the outbox whole.
            d.groups.retain(|_, g| g.broken || g.outstanding > 0 || !g.acked.is_empty());
            // The claim took the lowest events its snapshot saw: all of them up
            // to `claimed_up_to` are now in flight or gone, unless a transaction
            // then in progress commits more (watched by the next claim).
            d.batch_len = d.in_flight.len();
            if all_sent && d.poisoned.is_empty() {
                d.watch = claimed.in_progress();
                // A full claim: more may be waiting behind it.
                self.more |= events.len() as i64 >= limit || claimed.rows as i64 >= rows;
            }
            if let Some(p) = d.served_here() {
                p.poll(Duration::ZERO);
            }
        }
    }

    /// Best-effort: produce what writers handed to the shared queue.
    fn drain_best_effort(&mut self) {
        // Delivery reports wake the worker (the producer's pipe) when space frees up.
        for d in self.destinations.values_mut().filter(|d| !d.blocked.is_empty()) {
            let backing_off = d.retry_at.is_some_and(|t| t > Instant::now());
            if d.producer.is_none() && !backing_off {
                d.ensure_producer(&mut self.next_epoch, &self.tx, self.wake_write);
            }
            d.send_blocked();
        }
        let mut reloaded = false;
        // One bounded batch per pass, so nothing else waits behind a busy queue.
        {
            let (records, left) = ring::pop(BEST_EFFORT_PER_TURN, BEST_EFFORT_BYTES_PER_TURN);
            if records.is_empty() {
                return;
            }
            self.busy = true;
            // Not while events wait for librdkafka's buffer: those wait for reports.
            self.more |= left && self.destinations.values().all(|d| d.blocked.is_empty());
            // The last table, interaction and timestamp, shared by the events that have them.
            let mut shared: [Option<std::rc::Rc<str>>; 3] = [None, None, None];
            for record in records {
                let Some(ev) = ring::BestEffortEvent::decode(&record) else { continue };
                if !self.destinations.contains_key(&ev.destination_id) && !reloaded {
                    // Created moments ago: look at the configuration once more.
                    self.last_reload = None;
                    self.maybe_reload();
                    reloaded = true;
                }
                // Unknown here means dropped since: the event goes with it.
                let Some(d) = self.destinations.get_mut(&ev.destination_id).filter(|d| d.best_effort()) else {
                    continue;
                };
                let waiting = d.producer.is_none() && d.retry_at.is_some_and(|t| t > Instant::now());
                if waiting || !d.ensure_producer(&mut self.next_epoch, &self.tx, self.wake_write) {
                    d.lose("no Kafka producer".into());
                    continue;
                }
                let event = types::Event {
                    group: 0,
                    id: ev.number as i64,
                    table: types::share(&mut shared[0], &ev.table),
                    interaction: types::share(&mut shared[1], &ev.interaction),
                    key: ev.key,
                    row: ev.row,
                    timestamp: types::share(&mut shared[2], &status::format_ts(ev.timestamp_us)),
                    born_us: ev.committed_us,
                };
                d.send_best_effort(event);
            }
            self.take_reports();
            self.record_outcomes();
        }
    }

    /// SIGTERM: give in-flight deliveries a moment, record them, exit.
    fn shut_down(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        self.take_reports();
        while Instant::now() < deadline && self.destinations.values().any(|d| !d.in_flight.is_empty()) {
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
