//! One destination the worker serves: what it is (identity, parameters,
//! message shape), its producer (`Link`), its events in flight, its health,
//! and what its kind keeps apart (`Mode`: the outbox side of an
//! at-least-once destination, the memory side of a best-effort one).

use super::backfill::Backfill;
use super::flight::{Flight, Flights};
use super::health::{Health, Latency};
use super::memory::Memory;
use super::outbox::Outbox;
use crate::config;
use crate::kafka::{self, KafkaProducer, Refused, Report, Target};
use crate::params::Params;
use crate::pipe::{Batch, Pipe};
use crate::status::SlotRef;
use crate::store;
use crate::types::{self, Content, Kind};
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long past deliveryTimeoutMs a batch may stay unacknowledged.
const STUCK_GRACE: Duration = Duration::from_millis(1000);

pub(super) struct Destination {
    pub id: String,
    pub topic_url: String,
    pub content: Content,
    /// The parameters as stored, to notice a change.
    pub parameters_text: String,
    pub params: Params,
    /// FHIR resource type by table, for the topic's tables in Aidbox's layout.
    pub resource_types: HashMap<String, String>,
    /// Paused (pause_destination): at-least-once events are not claimed,
    /// best-effort ones are counted lost; what is in flight finishes.
    pub paused: bool,
    /// Delivered events are kept (a retention, for outbox.replay).
    pub retain: bool,
    /// A backfill under way (at-least-once only).
    pub backfill: Option<Backfill>,
    pub slot: SlotRef,
    pub link: Link,
    pub flights: Flights,
    pub health: Health,
    pub latency: Latency,
    /// Reconfigured: this old incarnation only finishes what it has in flight.
    pub retiring_until: Option<Instant>,
    pub mode: Mode,
}

/// The state one kind keeps that the other has no use for.
pub(super) enum Mode {
    AtLeastOnce(Outbox),
    BestEffort(Memory),
}

impl Mode {
    pub fn kind(&self) -> Kind {
        match self {
            Mode::AtLeastOnce(_) => Kind::AtLeastOnce,
            Mode::BestEffort(_) => Kind::BestEffort,
        }
    }

    pub fn memory(&self) -> Option<&Memory> {
        match self {
            Mode::BestEffort(m) => Some(m),
            Mode::AtLeastOnce(_) => None,
        }
    }
}

/// A destination's producer and what goes with it.
#[derive(Default)]
pub(super) struct Link {
    /// The producing thread of a non-transactional at-least-once
    /// destination (see `pipe`; declared before the producer: it is
    /// stopped first), and the batch being written for it.
    pub pipe: Option<Pipe>,
    batch: Option<Batch>,
    pub producer: Option<Arc<KafkaProducer>>,
    /// The message value being produced (librdkafka copies it): one buffer
    /// for all, not an allocation per event (given back after a large one).
    payload: Vec<u8>,
    /// The producer's epoch: its reports carry it, so a replaced producer's
    /// are told apart.
    pub epoch: u64,
    /// The producer must be replaced (fatal, fenced, or its messages time
    /// out), and why.
    pub replace: Option<&'static str>,
}

/// What making a producer takes: the next epoch to give out, the channel
/// every producer reports to, and the pipe that wakes the worker.
pub(super) struct Producers {
    pub next_epoch: u64,
    pub tx: Sender<Report>,
    pub wake_write: RawFd,
}

impl Destination {
    pub fn new(row: store::DestinationRow, params: Params, slot: SlotRef) -> Destination {
        let mode = match row.kind {
            Kind::AtLeastOnce => Mode::AtLeastOnce(Outbox::default()),
            Kind::BestEffort => Mode::BestEffort(Memory::default()),
        };
        Destination {
            health: Health::new(&row.id, slot),
            id: row.id,
            topic_url: row.topic_url,
            content: row.content,
            parameters_text: row.parameters,
            params,
            resource_types: row.resource_types,
            paused: row.paused,
            retain: row.retain,
            backfill: row.backfill.map(Backfill::new),
            slot,
            link: Link::default(),
            flights: Flights::default(),
            latency: Latency::default(),
            retiring_until: None,
            mode,
        }
    }

    pub fn outbox(&mut self) -> Option<&mut Outbox> {
        match &mut self.mode {
            Mode::AtLeastOnce(o) => Some(o),
            Mode::BestEffort(_) => None,
        }
    }

    pub fn memory(&mut self) -> Option<&mut Memory> {
        match &mut self.mode {
            Mode::BestEffort(m) => Some(m),
            Mode::AtLeastOnce(_) => None,
        }
    }

    /// Make sure a producer exists; on failure note the error and back off.
    pub fn ensure_producer(&mut self, producers: &mut Producers) -> bool {
        if self.link.producer.is_some() {
            return true;
        }
        let epoch = producers.next_epoch;
        match kafka::create_producer(&self.params, epoch, producers.tx.clone()) {
            Ok(p) => {
                let p = Arc::new(p);
                // A thread of its own produces and reads the reports for an
                // at-least-once destination, except for transactions (each
                // call in order with the produces) and OAUTHBEARER tokens
                // (rust-rdkafka's poll makes them).
                let threaded =
                    self.mode.kind() == Kind::AtLeastOnce && !self.params.transactional && self.params.token.is_none();
                self.link.pipe = threaded
                    .then(|| {
                        Pipe::start(
                            p.clone(),
                            &self.params.kafka_topic,
                            &self.topic_url,
                            &self.id,
                            producers.wake_write,
                        )
                    })
                    .flatten();
                if self.link.pipe.is_none() {
                    kafka::wake_on_reports(&p, producers.wake_write);
                }
                self.link.producer = Some(p);
                self.link.epoch = epoch;
                producers.next_epoch += 1;
                true
            }
            Err(e) => {
                let e = self.params.redact(&e.to_string());
                self.health.error(&format!("could not create the Kafka producer: {e}"));
                self.health.back_off();
                false
            }
        }
    }

    /// Drop the producer (what it has in flight is purged); the next batch
    /// gets a new one.
    pub fn drop_producer(&mut self) {
        self.link.pipe = None;
        self.link.producer = None;
        if let Some(o) = self.outbox() {
            o.txn.reset();
        }
    }

    /// Produce one event; librdkafka may refuse it at once.
    pub fn send(&mut self, ev: &types::Event) -> Result<(), Refused> {
        let resource_type = self.resource_types.get(&*ev.table).map(String::as_str);
        let fhir_base = if resource_type.is_some() { config::fhir_base_url() } else { String::new() };
        let target = Target {
            destination_id: &self.id,
            topic_url: &self.topic_url,
            content: self.content,
            resource_type,
            fhir_base: &fhir_base,
        };
        let link = &mut self.link;
        let producer = link.producer.as_ref().ok_or(Refused::Other("no producer".to_string()))?;
        if let Some(pipe) = &link.pipe {
            // Produced by the thread (`hand_over`); refusals come as reports.
            link.batch.get_or_insert_with(|| pipe.batch()).push(&target, ev);
        } else {
            if link.payload.capacity() > 1 << 20 {
                link.payload = Vec::new();
            }
            kafka::send(producer, &self.params.kafka_topic, &target, ev, &mut link.payload)
                .map_err(|e| Refused::of(&e))?;
        }
        self.flights.insert(ev.id, Flight { group: ev.group, born_us: ev.born_us });
        Ok(())
    }

    /// The events written since the last call go to the producing thread.
    pub fn hand_over(&mut self) {
        if let (Some(pipe), Some(batch)) = (&self.link.pipe, self.link.batch.take()) {
            pipe.send(batch);
        }
    }

    /// The producer whose reports the main thread serves (it has no
    /// producing thread).
    pub fn served_here(&self) -> Option<&KafkaProducer> {
        self.link.producer.as_deref().filter(|_| self.link.pipe.is_none())
    }

    /// Everything in flight failed with `error`: at-least-once events are
    /// retried from the outbox, best-effort events are lost.
    pub fn fail_in_flight(&mut self, error: &str) {
        let in_flight = self.flights.drain();
        match &mut self.mode {
            Mode::AtLeastOnce(o) => o.fail_all(in_flight, error),
            Mode::BestEffort(m) => m.lose_many(in_flight.len() as u64, error),
        }
    }

    /// When the oldest event in flight expires: deliveryTimeoutMs, and a
    /// grace for librdkafka's own expiry to come first.
    pub fn oldest_deadline(&mut self) -> Option<Instant> {
        let limit = Duration::from_millis(self.params.delivery_timeout_ms as u64) + STUCK_GRACE;
        self.flights.oldest().map(|at| at + limit)
    }

    /// The earliest moment this destination needs the worker awake.
    pub fn next_due(&mut self) -> Option<Instant> {
        // A paused destination retries nothing: it claims nothing.
        let retry = self.health.retry_at.filter(|_| self.flights.is_empty() && !self.paused);
        let max_block = Duration::from_millis(self.params.max_block_ms as u64);
        let blocked = self.mode.memory().and_then(Memory::oldest).map(|since| since + max_block);
        let step = match &self.mode {
            Mode::AtLeastOnce(o) => o.txn.step_due(&self.params, &self.link, &self.flights),
            Mode::BestEffort(_) => None,
        };
        let backfill = self.backfill.filter(|_| !self.paused).map(|b| b.due);
        [self.oldest_deadline(), retry, blocked, self.retiring_until, self.latency.due(), step, backfill]
            .into_iter()
            .flatten()
            .min()
    }

    /// Events in process: produced and not yet acknowledged (or committed),
    /// or waiting for buffer space.
    pub fn in_process(&self) -> u64 {
        let waiting = match &self.mode {
            Mode::AtLeastOnce(o) => o.waiting(),
            Mode::BestEffort(m) => m.waiting(),
        };
        (self.flights.len() + waiting) as u64
    }

    /// Nothing in flight, no transaction open, no outcome left to record.
    pub fn idle(&self) -> bool {
        let settled = match &self.mode {
            Mode::AtLeastOnce(o) => !o.txn.open && !o.outcomes.waiting(),
            Mode::BestEffort(m) => !m.outcomes_waiting(),
        };
        self.in_process() == 0 && settled
    }

    /// Stop waiting for groups to complete (shutting down, retiring): what
    /// Kafka has of them is recorded by splitting them.
    pub fn break_all_groups(&mut self) {
        if let Some(o) = self.outbox() {
            o.groups.values_mut().for_each(|g| g.broken = true);
        }
    }

    /// Record what came back since the last call: in the outbox, or as counts.
    pub fn record_outcomes(&mut self) {
        self.latency.publish(self.slot);
        match self.mode {
            Mode::AtLeastOnce(_) => self.record_in_outbox(),
            Mode::BestEffort(_) => self.count_best_effort(),
        }
    }
}
