//! Kafka: the producer, its callbacks and the notification message (the
//! parameters and their librdkafka mapping are in `params`). No Postgres calls here: this code also runs
//! on librdkafka's threads (the context callbacks).

use crate::oauth::TokenSource;
use crate::params::Params;
use crate::types::{Content, Event};
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

/// The destination facts a message needs.
pub struct Target<'a> {
    pub destination_id: &'a str,
    pub topic_url: &'a str,
    pub content: Content,
    /// The event's FHIR resource type, when its table has Aidbox's layout,
    /// and the FHIR base URL (`outbox.fhir_base_url`) for its references.
    pub resource_type: Option<&'a str>,
    pub fhir_base: &'a str,
}

/// The path of a base URL: `/fhir` for `http://aidbox-server/fhir`.
fn url_path(base: &str) -> &str {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    rest.find('/').map_or("", |i| &rest[i..])
}

/// A JSON string made of `parts`, escaped as serde_json and Postgres do
/// (see `rowjson::escape_contents`), written straight into `out`.
fn push_json_str(out: &mut Vec<u8>, parts: &[&str]) {
    out.push(b'"');
    for p in parts {
        crate::rowjson::escape_contents(out, p.as_bytes());
    }
    out.push(b'"');
}

/// The table name used in references and request urls: `orders` for
/// `public.orders`, `schema.table` elsewhere.
pub fn display_table(table: &str) -> &str {
    table.strip_prefix("public.").unwrap_or(table)
}

/// `n` in decimal, written into `buf`: core::fmt's machinery for each id was
/// a fiftieth of the worker's main thread on a single-row drain.
fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// The Kafka message value: Aidbox's notification Bundle (UTF-8 JSON),
/// appended to `out` (the worker reuses its buffers, as librdkafka copies
/// the value), its strings escaped in place.
pub fn bundle(out: &mut Vec<u8>, target: &Target<'_>, ev: &Event) {
    // A FHIR table: `Type/id` references, Aidbox's absolute fullUrl and
    // request urls under the base URL's path. Otherwise `table/key`.
    let (collection, prefix) = match target.resource_type {
        Some(rt) => (rt, url_path(target.fhir_base)),
        None => (display_table(&ev.table), ""),
    };
    // The reference, `collection/key`, and the fullUrl: the base URL and
    // the reference for a FHIR table, else the reference.
    let reference: [&str; 3] = match &ev.key {
        Some(k) => [collection, "/", k],
        None => [collection, "", ""],
    };
    let base: [&str; 2] = match target.resource_type {
        Some(_) => [target.fhir_base, "/"],
        None => ["", ""],
    };
    let full_url = [base[0], base[1], reference[0], reference[1], reference[2]];
    let (method, url) = match &*ev.interaction {
        "create" => ("POST", [prefix, "/", collection, "", ""]),
        "update" => ("PUT", [prefix, "/", reference[0], reference[1], reference[2]]),
        _ => ("DELETE", [prefix, "/", reference[0], reference[1], reference[2]]),
    };
    out.extend_from_slice(br#"{"resourceType":"Bundle","type":"history","timestamp":"#);
    push_json_str(out, &[&*ev.timestamp]);
    out.extend_from_slice(br#","entry":[{"resource":{"resourceType":"AidboxSubscriptionStatus","status":"active","type":"event-notification","notificationEvent":[{"eventNumber":"#);
    out.extend_from_slice(decimal(ev.id, &mut [0; 20]));
    out.extend_from_slice(br#","focus":{"reference":"#);
    push_json_str(out, &reference);
    out.extend_from_slice(br#"}}],"topic":"#);
    push_json_str(out, &[target.topic_url]);
    out.extend_from_slice(br#","topic-destination":{"reference":"#);
    push_json_str(out, &["AidboxTopicDestination/", target.destination_id]);
    out.extend_from_slice(b"}}}");
    let request = |out: &mut Vec<u8>| {
        out.extend_from_slice(br#","request":{"method":"#);
        push_json_str(out, &[method]);
        out.extend_from_slice(br#","url":"#);
        push_json_str(out, &url);
        out.push(b'}');
    };
    // Captured while the destination was id-only or empty (alter_destination
    // switched it since): there is no row to send, only its reference.
    let content = match (target.content, &ev.row) {
        (Content::FullResource, None) => Content::IdOnly,
        (c, _) => c,
    };
    match content {
        Content::FullResource => {
            out.extend_from_slice(br#",{"resource":"#);
            out.extend_from_slice(ev.row.as_deref().unwrap_or("null").as_bytes());
            if target.resource_type.is_some() {
                out.extend_from_slice(br#","fullUrl":"#);
                push_json_str(out, &full_url);
            }
            request(out);
            out.push(b'}');
        }
        Content::IdOnly => {
            out.extend_from_slice(br#",{"fullUrl":"#);
            push_json_str(out, &full_url);
            request(out);
            out.push(b'}');
        }
        Content::Empty => {}
    }
    out.extend_from_slice(b"]}");
}

/// Produce one event (its id the delivery opaque, as rust-rdkafka reads it
/// back); the delivery report comes back through the context. `payload` is
/// the buffer the value is written into.
pub fn send(
    producer: &KafkaProducer,
    kafka_topic: &str,
    target: &Target<'_>,
    ev: &Event,
    payload: &mut Vec<u8>,
) -> Result<(), KafkaError> {
    payload.clear();
    bundle(payload, target, ev);
    let message = Message {
        id: ev.id,
        value: payload,
        key: ev.key.as_deref().map(str::as_bytes),
        interaction: ev.interaction.as_bytes(),
        table: ev.table.as_bytes(),
    };
    produce(producer, kafka_topic, target.topic_url, target.destination_id, &message)
}

/// A Kafka message as produced: its value and what its key and headers hold.
pub(crate) struct Message<'a> {
    pub id: i64,
    pub value: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub interaction: &'a [u8],
    pub table: &'a [u8],
}

/// Produce one message. Kafka headers: enough to deduplicate and route
/// without parsing the value. `kafka_topic` (the producer's) is named only
/// if librdkafka refused it a handle.
pub(crate) fn produce(
    producer: &KafkaProducer,
    kafka_topic: &str,
    topic_url: &str,
    destination_id: &str,
    m: &Message<'_>,
) -> Result<(), KafkaError> {
    use rdkafka::bindings::{rd_kafka_vtype_t as V, rd_kafka_vu_s__bindgen_ty_1 as U, rd_kafka_vu_t};
    let mut digits = [0u8; 20];
    let number = decimal(m.id, &mut digits);
    let topic_name = if producer.topic.0.is_null() {
        Some(std::ffi::CString::new(kafka_topic).map_err(KafkaError::from)?)
    } else {
        None
    };
    let mem = |bytes: &[u8]| U {
        mem: rdkafka::bindings::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
            ptr: bytes.as_ptr() as *mut _,
            size: bytes.len(),
        },
    };
    let header = |name: &std::ffi::CStr, value: &[u8]| rd_kafka_vu_t {
        vtype: V::RD_KAFKA_VTYPE_HEADER,
        u: U {
            header: rdkafka::bindings::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                name: name.as_ptr(),
                val: value.as_ptr().cast(),
                size: value.len() as isize,
            },
        },
    };
    let mut vus = [
        match &topic_name {
            None => rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_RKT, u: U { rkt: producer.topic.0 } },
            Some(name) => rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_TOPIC, u: U { cstr: name.as_ptr() } },
        },
        rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_MSGFLAGS, u: U { i: rdkafka::bindings::RD_KAFKA_MSG_F_COPY } },
        rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_VALUE, u: mem(m.value) },
        rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_OPAQUE, u: U { ptr: m.id as usize as *mut _ } },
        header(c"event-number", number),
        header(c"topic-url", topic_url.as_bytes()),
        header(c"destination-id", destination_id.as_bytes()),
        header(c"interaction", m.interaction),
        header(c"source-table", m.table),
        // The key, if there is one, or nothing (END ends the list).
        rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_END, u: U { i: 0 } },
    ];
    let count = match m.key {
        Some(k) => {
            vus[9] = rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_KEY, u: mem(k) };
            10
        }
        None => 9,
    };
    let error = unsafe { rdkafka::bindings::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), count) };
    if error.is_null() {
        return Ok(());
    }
    let code = unsafe { rdkafka::bindings::rd_kafka_error_code(error) };
    unsafe { rdkafka::bindings::rd_kafka_error_destroy(error) };
    Err(KafkaError::MessageProduction(code.into()))
}
