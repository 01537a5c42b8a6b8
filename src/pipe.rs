//! The producing thread of an at-least-once destination. The worker's main
//! thread claims events and writes their messages into a `Batch`; this
//! thread produces them and reads their delivery reports, which reach the
//! main thread as `Report`s through the worker's channel. Why a thread:
//! producing and reading reports (librdkafka allocating and freeing each
//! message and its five headers) are about a third of the main thread's
//! work on a single-row drain, where the main thread is the bottleneck. The
//! thread allocates and frees those messages itself, so no other thread
//! contends for its malloc arena. No Postgres call here; see
//! docs/architecture.md.

use crate::kafka::{bundle, produce, KafkaProducer, Message, Refused, Target};
use crate::types::Event;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use rdkafka::bindings as rd;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// How long the thread waits for a delivery report before it looks for a
/// batch again (the main thread wakes it when it hands one over, and when
/// it stops it).
const IDLE_POLL_MS: i32 = 1000;
/// How long it waits for room in librdkafka's buffer before trying again.
const FULL_POLL_MS: i32 = 10;
/// Producer events (delivery reports carry many messages) served per look.
const EVENTS_PER_LOOK: usize = 64;

/// Messages written by the main thread, produced by the thread: their bytes
/// in one buffer (given back for reuse once produced).
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    messages: Vec<Entry>,
}

struct Entry {
    id: i64,
    value: Range<usize>,
    key: Option<Range<usize>>,
    interaction: Range<usize>,
    table: Range<usize>,
    traceparent: Option<Range<usize>>,
}

impl Batch {
    /// Write the event's message into the batch.
    pub fn push(&mut self, target: &Target<'_>, ev: &Event) {
        let start = self.bytes.len();
        bundle(&mut self.bytes, target, ev);
        let value = start..self.bytes.len();
        let key = ev.key.as_deref().map(|k| self.put(k.as_bytes()));
        let interaction = self.put(ev.interaction.as_bytes());
        let table = self.put(ev.table.as_bytes());
        let traceparent = ev.traceparent.as_deref().map(|t| self.put(t.as_bytes()));
        self.messages.push(Entry { id: ev.id, value, key, interaction, table, traceparent });
    }

    fn put(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    fn message(&self, e: &Entry) -> Message<'_> {
        Message {
            id: e.id,
            value: &self.bytes[e.value.clone()],
            key: e.key.clone().map(|k| &self.bytes[k]),
            interaction: &self.bytes[e.interaction.clone()],
            table: &self.bytes[e.table.clone()],
            traceparent: e.traceparent.clone().map(|t| &self.bytes[t]),
        }
    }
}

/// The producer's main queue (delivery reports, errors), held by the thread
/// and woken by the main thread.
struct Queue(*mut rd::rd_kafka_queue_t);
// librdkafka queues may be used and yielded from any thread.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

impl Drop for Queue {
    fn drop(&mut self) {
        unsafe { rd::rd_kafka_queue_destroy(self.0) };
    }
}

/// What the main thread and the producing thread share.
struct Shared {
    /// The producer's main queue.
    queue: Queue,
    stop: AtomicBool,
    /// Bytes handed over and not yet produced.
    pending: AtomicUsize,
}

/// A destination's producing thread. Dropping it stops the thread (what it
/// had not yet produced is not produced; its events stay in the outbox) and
/// waits for it; the producer itself may then be dropped.
pub struct Pipe {
    batches: Option<Sender<Batch>>,
    spare: Receiver<Batch>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipe {
    /// Start the thread for this producer (None if it could not be started).
    /// It writes a byte to `wake` when it has put reports on the channel.
    pub fn start(
        producer: Arc<KafkaProducer>,
        kafka_topic: &str,
        topic_url: &str,
        destination_id: &str,
        wake: RawFd,
    ) -> Option<Pipe> {
        let (batches, inbox) = crossbeam_channel::unbounded::<Batch>();
        let (give_back, spare) = crossbeam_channel::bounded::<Batch>(4);
        let shared = Arc::new(Shared {
            queue: Queue(unsafe { rd::rd_kafka_queue_get_main(producer.client().native_ptr()) }),
            stop: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
        });
        let thread = Thread {
            producer,
            kafka_topic: kafka_topic.to_string(),
            topic_url: topic_url.to_string(),
            destination_id: destination_id.to_string(),
            shared: shared.clone(),
            wake,
        };
        // Every signal blocked, as in librdkafka's own threads: Postgres's
        // handlers belong to the backend's main thread.
        let thread = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let thread =
                std::thread::Builder::new().name("pg_outbox:send".into()).spawn(move || thread.run(&inbox, &give_back));
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            thread
        };
        Some(Pipe { batches: Some(batches), spare, shared, thread: Some(thread.ok()?) })
    }

    /// An empty batch to fill (one the thread gave back, if any).
    pub fn batch(&self) -> Batch {
        self.spare.try_recv().unwrap_or_default()
    }

    /// Hand a batch to the thread.
    pub fn send(&self, batch: Batch) {
        if let Some(batches) = &self.batches {
            self.shared.pending.fetch_add(batch.bytes.len(), Ordering::Relaxed);
            let _ = batches.send(batch);
            unsafe { rd::rd_kafka_queue_yield(self.shared.queue.0) };
        }
    }

    /// Bytes of messages handed over that the thread has not produced yet
    /// (waiting behind a full librdkafka buffer, or not reached).
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// The thread has ended (it does only when stopped, or if it panicked):
    /// what was handed to it may never be produced.
    pub fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(std::thread::JoinHandle::is_finished)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.batches = None;
        unsafe { rd::rd_kafka_queue_yield(self.shared.queue.0) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The producing thread: its producer and what it names in every message.
struct Thread {
    producer: Arc<KafkaProducer>,
    kafka_topic: String,
    topic_url: String,
    destination_id: String,
    shared: Arc<Shared>,
    wake: RawFd,
}

impl Thread {
    fn run(&self, inbox: &Receiver<Batch>, give_back: &Sender<Batch>) {
        while !self.stopped() {
            match inbox.try_recv() {
                Ok(mut batch) => {
                    self.produce_batch(&batch);
                    self.shared.pending.fetch_sub(batch.bytes.len(), Ordering::Relaxed);
                    batch.bytes.clear();
                    batch.messages.clear();
                    // Kept for reuse unless large (or enough are kept already).
                    if batch.bytes.capacity() <= 16 << 20 {
                        let _ = give_back.try_send(batch);
                    }
                    self.serve(0);
                }
                Err(TryRecvError::Empty) => self.serve(IDLE_POLL_MS),
                Err(TryRecvError::Disconnected) => break,
            }
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// Produce a batch's messages in order. A message librdkafka refuses is
    /// reported failed; if it is not poison, so is every message after it
    /// (none may overtake it). While librdkafka's buffer is full, delivery
    /// reports are served until there is room (or the thread is stopped).
    /// The caller serves the queue next, which wakes the main thread for
    /// the refusals too.
    fn produce_batch(&self, batch: &Batch) {
        let context = self.producer.context();
        for (i, entry) in batch.messages.iter().enumerate() {
            let message = batch.message(entry);
            loop {
                let produced =
                    produce(&self.producer, &self.kafka_topic, &self.topic_url, &self.destination_id, &message);
                match produced.map_err(|e| Refused::of(&e)) {
                    Ok(()) => break,
                    Err(Refused::Full) if self.stopped() => return,
                    Err(Refused::Full) => self.serve(FULL_POLL_MS),
                    Err(Refused::Poison(e)) => {
                        context.refused(entry.id, format!("produce refused: {e}"), true);
                        break;
                    }
                    Err(Refused::Other(e)) => {
                        for rest in &batch.messages[i..] {
                            context.refused(rest.id, format!("produce refused: {e}"), false);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Serve the producer's events (delivery reports, errors), waiting up to
    /// `timeout_ms` for the first, then wake the main thread if it has reports.
    fn serve(&self, timeout_ms: i32) {
        let context = self.producer.context();
        let mut timeout = timeout_ms;
        for _ in 0..EVENTS_PER_LOOK {
            let event = unsafe { rd::rd_kafka_queue_poll(self.shared.queue.0, timeout) };
            if event.is_null() {
                break;
            }
            timeout = 0;
            unsafe {
                match rd::rd_kafka_event_type(event) {
                    rd::RD_KAFKA_EVENT_DR => loop {
                        let message = rd::rd_kafka_event_message_next(event);
                        if message.is_null() {
                            break;
                        }
                        let error = (*message).err;
                        let error = (error != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
                            .then(|| KafkaError::MessageProduction(error.into()));
                        context.delivered((*message)._private as usize as i64, error.as_ref());
                    },
                    rd::RD_KAFKA_EVENT_ERROR => {
                        let reason = std::ffi::CStr::from_ptr(rd::rd_kafka_event_error_string(event)).to_string_lossy();
                        let error = KafkaError::Global(rd::rd_kafka_event_error(event).into());
                        rdkafka::ClientContext::error(&**context, error, reason.trim());
                    }
                    _ => {}
                }
                rd::rd_kafka_event_destroy(event);
            }
        }
        self.wake_up();
    }

    /// Wake the main thread if reports wait for it on the channel.
    fn wake_up(&self) {
        if !self.producer.context().tx.is_empty() {
            unsafe { libc::write(self.wake, c"!".as_ptr().cast(), 1) };
        }
    }
}
