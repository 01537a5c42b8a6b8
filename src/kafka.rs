//! Kafka: the producer, its callbacks and the notification message (the
//! parameters and their librdkafka mapping are in `params`). No Postgres calls here: this code also runs
//! on librdkafka's threads (the context callbacks).

use crate::oauth::TokenSource;
use crate::params::Params;
use crossbeam_channel::Sender;
use rdkafka::client::OAuthToken;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::io::Write;
use std::os::fd::RawFd;
use std::rc::Rc;
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
    Failed {
        epoch: u64,
        event_id: i64,
        error: String,
        poison: bool,
        stale: bool,
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
        let event_id = event_id as i64;
        let report = match result {
            Ok(_) => Report::Delivered { epoch: self.epoch, event_id },
            Err((e, _)) => Report::Failed {
                epoch: self.epoch,
                event_id,
                error: e.to_string(),
                poison: is_poison(e),
                stale: is_stale_producer(e),
            },
        };
        let _ = self.tx.send(report);
    }
}

pub type KafkaProducer = BaseProducer<Context>;

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

/// Create a producer whose main queue writes a byte to `wake_fd` whenever it
/// goes from empty to non-empty, so the worker can sleep on its latch and that
/// descriptor together.
pub fn create_producer(
    params: &Params,
    epoch: u64,
    tx: Sender<Report>,
    wake_fd: RawFd,
) -> Result<KafkaProducer, KafkaError> {
    let context = Context { epoch, tx, token: params.token.clone() };
    let producer: KafkaProducer = params.client_config().create_with_context(context)?;
    unsafe {
        let rk = producer.client().native_ptr();
        let q = rdkafka::bindings::rd_kafka_queue_get_main(rk);
        rdkafka::bindings::rd_kafka_queue_io_event_enable(q, wake_fd, c"!".as_ptr().cast(), 1);
        rdkafka::bindings::rd_kafka_queue_destroy(q);
    }
    Ok(producer)
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
    match params.client_config().create_with_context::<_, KafkaProducer>(context) {
        Ok(producer) => {
            drop(producer);
            Ok(())
        }
        Err(e) => Err(params.redact(&e.to_string())),
    }
}

/// How the second entry of the Bundle carries the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    FullResource,
    IdOnly,
    Empty,
}

impl Content {
    pub fn parse(s: &str) -> Content {
        match s {
            "id-only" => Content::IdOnly,
            "empty" => Content::Empty,
            _ => Content::FullResource,
        }
    }
}

/// One outbox event as the worker read it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    /// The id of the outbox row holding this event with others of its
    /// statement (see `outbox.event`), or 0 for a row of its own.
    pub group: i64,
    /// Schema-qualified source table, e.g. `public.orders`. (This, the
    /// interaction and the timestamp are shared between events, see `share`.)
    pub table: Rc<str>,
    /// `create`, `update` or `delete`.
    pub interaction: Rc<str>,
    pub key: Option<String>,
    /// The row as JSON text (full-resource only).
    pub row: Option<String>,
    /// Transaction timestamp of the change, ISO 8601 UTC.
    pub timestamp: Rc<str>,
    /// Where the latency the status reports starts (Postgres µs): the commit
    /// when known, else the transaction start.
    pub born_us: i64,
}

/// `s` as a shared string: `last` again if it holds the same text (the
/// events of a claim or of the best-effort queue mostly share their table,
/// interaction and timestamp), else a new one, kept in `last`.
pub fn share(last: &mut Option<Rc<str>>, s: &str) -> Rc<str> {
    match last {
        Some(l) if **l == *s => l.clone(),
        _ => last.insert(Rc::from(s)).clone(),
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

/// The Kafka message value: Aidbox's notification Bundle (UTF-8 JSON).
/// Written into one buffer, its strings escaped in place: one allocation
/// per message, on the worker's path for every event.
pub fn bundle(target: &Target<'_>, ev: &Event) -> Vec<u8> {
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
    let mut out = Vec::with_capacity(640 + ev.row.as_ref().map_or(0, |r| r.len()) + target.topic_url.len());
    out.extend_from_slice(br#"{"resourceType":"Bundle","type":"history","timestamp":"#);
    push_json_str(&mut out, &[&*ev.timestamp]);
    out.extend_from_slice(br#","entry":[{"resource":{"resourceType":"AidboxSubscriptionStatus","status":"active","type":"event-notification","notificationEvent":[{"eventNumber":"#);
    let _ = write!(out, "{}", ev.id);
    out.extend_from_slice(br#","focus":{"reference":"#);
    push_json_str(&mut out, &reference);
    out.extend_from_slice(br#"}}],"topic":"#);
    push_json_str(&mut out, &[target.topic_url]);
    out.extend_from_slice(br#","topic-destination":{"reference":"#);
    push_json_str(&mut out, &["AidboxTopicDestination/", target.destination_id]);
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
                push_json_str(&mut out, &full_url);
            }
            request(&mut out);
            out.push(b'}');
        }
        Content::IdOnly => {
            out.extend_from_slice(br#",{"fullUrl":"#);
            push_json_str(&mut out, &full_url);
            request(&mut out);
            out.push(b'}');
        }
        Content::Empty => {}
    }
    out.extend_from_slice(b"]}");
    out
}

/// Kafka headers: enough to deduplicate and route without parsing the value.
pub fn headers(target: &Target<'_>, ev: &Event) -> OwnedHeaders {
    let number = ev.id.to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header { key: "event-number", value: Some(number.as_str()) })
        .insert(Header { key: "topic-url", value: Some(target.topic_url) })
        .insert(Header { key: "destination-id", value: Some(target.destination_id) })
        .insert(Header { key: "interaction", value: Some(&*ev.interaction) })
        .insert(Header { key: "source-table", value: Some(&*ev.table) })
}

/// Produce one event; the delivery report comes back through the context.
pub fn send(producer: &KafkaProducer, kafka_topic: &str, target: &Target<'_>, ev: &Event) -> Result<(), KafkaError> {
    let payload = bundle(target, ev);
    let mut record = BaseRecord::with_opaque_to(kafka_topic, ev.id as usize)
        .payload(payload.as_slice())
        .headers(headers(target, ev));
    if let Some(k) = &ev.key {
        record = record.key(k.as_str());
    }
    producer.send(record).map_err(|(e, _)| e)
}
