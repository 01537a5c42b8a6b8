//! Kafka: the producer and its callbacks, how librdkafka's errors are
//! classified, and (`message`) the notification message and its headers.
//! The parameters and their librdkafka mapping are in `params`. No Postgres
//! calls here: this code also runs on librdkafka's threads (the context
//! callbacks) and on the producing threads (`pipe`). See docs/architecture.md.

mod message;

pub use message::{bundle, send, Target};
pub(crate) use message::{produce, Message};

use crate::oauth::TokenSource;
use crate::params::Params;
use crossbeam_channel::Sender;
use rdkafka::client::OAuthToken;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::os::fd::RawFd;
use std::time::Duration;

/// What the producer's callbacks report to the worker's main thread.
#[derive(Debug)]
pub enum Report {
    Delivered {
        epoch: u64,
        event_id: i64,
    },
    /// `poison`: Kafka will never take this event as it is (see `is_poison`).
    /// `stale`: the producer's idempotence state is refused (see `is_stale_producer`).
    /// `timed_out`: librdkafka gave up on it (`deliveryTimeoutMs`) although a
    /// broker may be reachable.
    /// `refused`: librdkafka refused to take it (a producing thread's `produce`
    /// call, not a delivery report): this very event is the culprit.
    Failed {
        epoch: u64,
        event_id: i64,
        error: String,
        poison: bool,
        stale: bool,
        timed_out: bool,
        refused: bool,
    },
    ClientError {
        epoch: u64,
        error: String,
        fatal: bool,
    },
}

/// Producer context: forwards everything to the worker through a channel,
/// and makes the OAUTHBEARER tokens (MSK IAM, unsecured JWT) when asked.
pub struct Context {
    pub epoch: u64,
    pub tx: Sender<Report>,
    pub token: Option<TokenSource>,
}

impl ClientContext for Context {
    // librdkafka asks only producers whose sasl.mechanism is OAUTHBEARER.
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(&self, _config: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        let source = self.token.as_ref().ok_or("this destination has no OAUTHBEARER token source")?;
        let t = source.token()?;
        Ok(OAuthToken { token: t.value, principal_name: t.principal, lifetime_ms: t.expires_ms })
    }

    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _msg: &str) {
        // Errors arrive through error() and delivery reports; logs stay quiet.
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(error, KafkaError::Global(rdkafka::types::RDKafkaErrorCode::Fatal));
        let _ = self.tx.send(Report::ClientError { epoch: self.epoch, error: format!("{error}: {reason}"), fatal });
    }
}

impl ProducerContext for Context {
    /// The event's id (ids are positive `bigint`s): no allocation per message.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, event_id: usize) {
        self.delivered(event_id as i64, result.as_ref().err().map(|(e, _)| e));
    }
}

impl Context {
    /// Kafka has this event, or refused it with `error`.
    pub(crate) fn delivered(&self, event_id: i64, error: Option<&KafkaError>) {
        let report = match error {
            None => Report::Delivered { epoch: self.epoch, event_id },
            Some(e) => Report::Failed {
                epoch: self.epoch,
                event_id,
                error: e.to_string(),
                poison: is_poison(e),
                stale: is_stale_producer(e),
                timed_out: e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageTimedOut),
                refused: false,
            },
        };
        let _ = self.tx.send(report);
    }

    /// librdkafka would not take this event (`error` as the worker words it).
    pub(crate) fn refused(&self, event_id: i64, error: String, poison: bool) {
        let report = Report::Failed {
            epoch: self.epoch,
            event_id,
            error,
            poison,
            stale: false,
            timed_out: false,
            refused: true,
        };
        let _ = self.tx.send(report);
    }
}

/// A producer and a handle on its Kafka topic. Producing through the handle
/// spares librdkafka finding the topic by name under its client-wide write
/// lock for every message (rust-rdkafka's `send` names the topic each time),
/// which librdkafka's broker thread holds for reading: most of the times the
/// worker went to sleep on a single-row drain, it waited for that lock.
pub struct KafkaProducer {
    /// Null if librdkafka refused the topic name: messages then name it.
    topic: TopicHandle,
    inner: BaseProducer<Context>,
}

struct TopicHandle(*mut rdkafka::bindings::rd_kafka_topic_t);
// A topic handle may be used from any thread, as its producer may.
unsafe impl Send for TopicHandle {}
unsafe impl Sync for TopicHandle {}

impl std::ops::Deref for KafkaProducer {
    type Target = BaseProducer<Context>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Drop for KafkaProducer {
    // The handle goes before the producer it belongs to.
    fn drop(&mut self) {
        if !self.topic.0.is_null() {
            unsafe { rdkafka::bindings::rd_kafka_topic_destroy(self.topic.0) };
        }
    }
}

/// Errors after which this producer's idempotence state is refused (fenced by
/// a newer one, sequence lost after a broker restart): only a new producer helps.
pub fn is_stale_producer(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Fatal
                | ProducerFenced
                | OutOfOrderSequenceNumber
                | UnknownProducerId
                | InvalidProducerEpoch
                | InvalidProducerIdMapping
        )
    )
}

/// librdkafka's buffer is full (queue.buffering.max.messages / .kbytes).
pub fn is_queue_full(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
}

/// A transaction call that may be made again (it timed out, say).
pub fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

/// A call that merely ran out of the time it was given.
pub fn is_timeout(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::OperationTimedOut)
}

/// A transaction call failed in a way an abort resolves.
pub fn txn_requires_abort(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.txn_requires_abort())
}

/// Errors that resending the same event can never fix: the event itself is
/// refused (too large, invalid). A broker reports them for a whole batch, so
/// the worker isolates the culprit before anything goes to the dead letters.
pub fn is_poison(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(e.rdkafka_error_code(), Some(InvalidMessageSize | MessageSizeTooLarge | InvalidRecord))
}

/// Why librdkafka did not take an event.
pub enum Refused {
    /// Its buffer is full (queue.buffering.max.*): wait, as Java's send() blocks.
    Full,
    /// Kafka will never take this event as it is.
    Poison(String),
    Other(String),
}

impl Refused {
    pub fn of(e: &KafkaError) -> Refused {
        if is_queue_full(e) {
            Refused::Full
        } else if is_poison(e) {
            Refused::Poison(e.to_string())
        } else {
            Refused::Other(e.to_string())
        }
    }
}

/// Create a producer (its reports go to `tx`).
pub fn create_producer(params: &Params, epoch: u64, tx: Sender<Report>) -> Result<KafkaProducer, KafkaError> {
    let context = Context { epoch, tx, token: params.token.clone() };
    let inner: BaseProducer<Context> = params.client_config().create_with_context(context)?;
    let rk = inner.client().native_ptr();
    // With no configuration of its own the topic takes the producer's, as a
    // topic named in a message does.
    let topic = match std::ffi::CString::new(params.kafka_topic.as_str()) {
        Ok(name) => unsafe { rdkafka::bindings::rd_kafka_topic_new(rk, name.as_ptr(), std::ptr::null_mut()) },
        Err(_) => std::ptr::null_mut(),
    };
    Ok(KafkaProducer { topic: TopicHandle(topic), inner })
}

/// Have the producer's main queue write a byte to `wake_fd` whenever it goes
/// from empty to non-empty, so the worker can sleep on its latch and that
/// descriptor together (a producer whose queue the worker's main thread serves).
pub fn wake_on_reports(producer: &KafkaProducer, wake_fd: RawFd) {
    unsafe {
        let q = rdkafka::bindings::rd_kafka_queue_get_main(producer.client().native_ptr());
        rdkafka::bindings::rd_kafka_queue_io_event_enable(q, wake_fd, c"!".as_ptr().cast(), 1);
        rdkafka::bindings::rd_kafka_queue_destroy(q);
    }
}

/// Serve every event ready on the producer's queue (delivery reports, errors).
pub fn serve(producer: &KafkaProducer) {
    unsafe {
        let queue = rdkafka::bindings::rd_kafka_queue_get_main(producer.client().native_ptr());
        for _ in 0..10_000 {
            if rdkafka::bindings::rd_kafka_queue_length(queue) == 0 {
                break;
            }
            producer.poll(Duration::ZERO);
        }
        rdkafka::bindings::rd_kafka_queue_destroy(queue);
    }
}

/// Validate the configuration the way the worker will use it: librdkafka
/// checks every property and how they fit together (TLS material included)
/// when a client is created. The client is destroyed at once; errors have
/// secret values blanked out.
pub fn check_client_config(params: &Params) -> Result<(), String> {
    let (tx, _rx) = crossbeam_channel::bounded(1);
    let context = Context { epoch: 0, tx, token: params.token.clone() };
    match params.client_config().create_with_context::<_, BaseProducer<Context>>(context) {
        Ok(producer) => {
            drop(producer);
            Ok(())
        }
        Err(e) => Err(params.redact(&e.to_string())),
    }
}
