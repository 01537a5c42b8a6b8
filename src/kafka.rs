//! Kafka: destination parameters, their mapping onto librdkafka, the producer
//! and the notification message. No Postgres calls here: this code also runs
//! on librdkafka's threads (the context callbacks).

use crossbeam_channel::Sender;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use serde_json::{Map, Value};
use std::os::fd::RawFd;
use std::time::Duration;

/// A problem with a destination's parameters, with a hint for the user.
#[derive(Debug)]
pub struct ParamError {
    pub message: String,
    pub hint: String,
    /// The parameter is known but this version does not implement it yet.
    pub unsupported: bool,
}

fn perr(message: String, hint: impl Into<String>) -> ParamError {
    ParamError { message, hint: hint.into(), unsupported: false }
}

/// Parameters this version maps onto librdkafka.
const SUPPORTED: &[&str] = &[
    "kafkaTopic",
    "bootstrapServers",
    "compressionType",
    "batchSize",
    "deliveryTimeoutMs",
    "maxRequestSize",
    "requestTimeoutMs",
    "securityProtocol",
];
/// Aidbox parameters known but not implemented yet (refused, never ignored).
const NOT_YET: &[&str] =
    &["maxBlockMs", "sslKeystoreKey", "saslMechanism", "saslJaasConfig", "saslClientCallbackHandlerClass"];

/// A destination's validated parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub kafka_topic: String,
    pub bootstrap_servers: String,
    pub compression_type: Option<String>,
    pub batch_size: Option<i64>,
    pub delivery_timeout_ms: i64,
    pub max_request_size: Option<i64>,
    pub request_timeout_ms: Option<i64>,
}

/// Java's delivery.timeout.ms default (librdkafka's is 300000).
pub const DEFAULT_DELIVERY_TIMEOUT_MS: i64 = 120_000;

fn get_string(obj: &Map<String, Value>, name: &str, dest: &str) -> Result<Option<String>, ParamError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(perr(
            format!("parameter \"{name}\" of destination \"{dest}\" must be a string, not {other}"),
            format!("Write it as a JSON string, e.g. \"{name}\": \"...\"."),
        )),
    }
}

fn get_int(obj: &Map<String, Value>, name: &str, dest: &str, min: i64, max: i64) -> Result<Option<i64>, ParamError> {
    let v = match obj.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        // Aidbox's valueString for a number, as Java's config parser accepts.
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match v {
        Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
        _ => Err(perr(
            format!(
                "parameter \"{name}\" of destination \"{dest}\" must be an integer between {min} and {max}, not {}",
                obj[name]
            ),
            format!("E.g. \"{name}\": {}.", min.max(1)),
        )),
    }
}

fn valid_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

fn valid_servers(s: &str) -> bool {
    !s.trim().is_empty()
        && s.split(',').all(|hp| {
            let hp = hp.trim();
            match hp.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            }
        })
}

impl Params {
    /// Check a destination's `parameters` object: names, types, values.
    pub fn parse(dest: &str, parameters: &Value) -> Result<Params, ParamError> {
        let obj = parameters.as_object().ok_or_else(|| {
            perr(
                format!("parameters of destination \"{dest}\" must be a JSON object"),
                "E.g. '{\"kafkaTopic\": \"orders\", \"bootstrapServers\": \"localhost:9092\"}'::jsonb.",
            )
        })?;
        for name in obj.keys() {
            if NOT_YET.contains(&name.as_str()) {
                return Err(ParamError {
                    message: format!(
                        "parameter \"{name}\" of destination \"{dest}\" is not supported by this version of pg_outbox"
                    ),
                    hint: format!("Supported parameters: {}.", SUPPORTED.join(", ")),
                    unsupported: true,
                });
            }
            if !SUPPORTED.contains(&name.as_str()) {
                return Err(perr(
                    format!("unknown parameter \"{name}\" for destination \"{dest}\""),
                    format!("Supported parameters: {}.", SUPPORTED.join(", ")),
                ));
            }
        }
        let kafka_topic = get_string(obj, "kafkaTopic", dest)?.ok_or_else(|| {
            perr(
                format!("destination \"{dest}\" needs parameter \"kafkaTopic\""),
                "Name the Kafka topic, e.g. \"kafkaTopic\": \"orders\".",
            )
        })?;
        if !valid_topic_name(&kafka_topic) {
            return Err(perr(
                format!("invalid Kafka topic name \"{kafka_topic}\" for destination \"{dest}\""),
                "Kafka topic names are 1 to 249 characters from [a-zA-Z0-9._-].",
            ));
        }
        let bootstrap_servers = get_string(obj, "bootstrapServers", dest)?.ok_or_else(|| {
            perr(
                format!("destination \"{dest}\" needs parameter \"bootstrapServers\""),
                "List the brokers as host:port, comma-separated, e.g. \"bootstrapServers\": \"localhost:9092\".",
            )
        })?;
        if !valid_servers(&bootstrap_servers) {
            return Err(perr(
                format!("invalid bootstrapServers \"{bootstrap_servers}\" for destination \"{dest}\""),
                "List the brokers as host:port, comma-separated, e.g. \"kafka1:9092,kafka2:9092\".",
            ));
        }
        let compression_type = get_string(obj, "compressionType", dest)?.map(|c| c.to_ascii_lowercase());
        if let Some(c) = &compression_type {
            if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&c.as_str()) {
                return Err(perr(
                    format!("invalid compressionType \"{c}\" for destination \"{dest}\""),
                    "Use one of none, gzip, snappy, lz4, zstd.",
                ));
            }
        }
        if let Some(p) = get_string(obj, "securityProtocol", dest)? {
            if !p.eq_ignore_ascii_case("PLAINTEXT") {
                return Err(ParamError {
                    message: format!(
                        "securityProtocol \"{p}\" of destination \"{dest}\" is not supported by this version of pg_outbox"
                    ),
                    hint: "Only PLAINTEXT is supported so far.".into(),
                    unsupported: true,
                });
            }
        }
        Ok(Params {
            kafka_topic,
            bootstrap_servers,
            compression_type,
            batch_size: get_int(obj, "batchSize", dest, 0, i32::MAX as i64)?,
            // librdkafka needs it above linger.ms (5).
            delivery_timeout_ms: get_int(obj, "deliveryTimeoutMs", dest, 100, i32::MAX as i64)?
                .unwrap_or(DEFAULT_DELIVERY_TIMEOUT_MS),
            max_request_size: get_int(obj, "maxRequestSize", dest, 1000, 1_000_000_000)?,
            request_timeout_ms: get_int(obj, "requestTimeoutMs", dest, 1, 900_000)?,
        })
    }

    /// The librdkafka configuration of this destination's producer.
    pub fn client_config(&self, dest: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", format!("pg_outbox-{dest}"))
            // The at-least-once floor: idempotent, acknowledged by all in-sync replicas.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Java's partitioner, so keys land where Java producers put them.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("message.timeout.ms", self.delivery_timeout_ms.to_string())
            .set("log.connection.close", "false");
        if let Some(v) = &self.compression_type {
            c.set("compression.type", v);
        }
        if let Some(v) = self.batch_size {
            c.set("batch.size", v.max(1).to_string());
        }
        if let Some(v) = self.max_request_size {
            c.set("message.max.bytes", v.to_string());
        }
        if let Some(v) = self.request_timeout_ms {
            c.set("request.timeout.ms", v.to_string());
        }
        c
    }
}

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

/// Producer context: forwards everything to the worker through a channel.
pub struct Context {
    pub epoch: u64,
    pub tx: Sender<Report>,
}

impl ClientContext for Context {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _msg: &str) {
        // Errors arrive through error() and delivery reports; logs stay quiet.
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(error, KafkaError::Global(rdkafka::types::RDKafkaErrorCode::Fatal));
        let _ = self.tx.send(Report::ClientError { epoch: self.epoch, error: format!("{error}: {reason}"), fatal });
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<i64>;

    fn delivery(&self, result: &DeliveryResult<'_>, event_id: Box<i64>) {
        let report = match result {
            Ok(_) => Report::Delivered { epoch: self.epoch, event_id: *event_id },
            Err((e, _)) => Report::Failed {
                epoch: self.epoch,
                event_id: *event_id,
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
    dest: &str,
    epoch: u64,
    tx: Sender<Report>,
    wake_fd: RawFd,
) -> Result<KafkaProducer, KafkaError> {
    let producer: KafkaProducer = params.client_config(dest).create_with_context(Context { epoch, tx })?;
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

/// Validate the librdkafka configuration without connecting anywhere.
pub fn check_client_config(params: &Params, dest: &str) -> Result<(), String> {
    params.client_config(dest).create_native_config().map(|_| ()).map_err(|e| e.to_string())
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
    /// Schema-qualified source table, e.g. `public.orders`.
    pub table: String,
    /// `create`, `update` or `delete`.
    pub interaction: String,
    pub key: Option<String>,
    /// The row as JSON text (full-resource only).
    pub row: Option<String>,
    /// Transaction timestamp of the change, ISO 8601 UTC.
    pub timestamp: String,
}

/// The destination facts a message needs.
pub struct Target<'a> {
    pub destination_id: &'a str,
    pub topic_url: &'a str,
    pub content: Content,
}

fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

/// The table name used in references and request urls: `orders` for
/// `public.orders`, `schema.table` elsewhere.
pub fn display_table(table: &str) -> &str {
    table.strip_prefix("public.").unwrap_or(table)
}

/// The Kafka message value: Aidbox's notification Bundle.
pub fn bundle(target: &Target<'_>, ev: &Event) -> String {
    let table = display_table(&ev.table);
    let reference = match &ev.key {
        Some(k) => format!("{table}/{k}"),
        None => table.to_string(),
    };
    let (method, url) = match ev.interaction.as_str() {
        "create" => ("POST", format!("/{table}")),
        "update" => ("PUT", format!("/{reference}")),
        _ => ("DELETE", format!("/{reference}")),
    };
    let mut out = String::with_capacity(512 + ev.row.as_ref().map_or(0, |r| r.len()));
    out.push_str(r#"{"resourceType":"Bundle","type":"history","timestamp":"#);
    push_json_str(&mut out, &ev.timestamp);
    out.push_str(r#","entry":[{"resource":{"resourceType":"AidboxSubscriptionStatus","status":"active","type":"event-notification","notificationEvent":[{"eventNumber":"#);
    out.push_str(&ev.id.to_string());
    out.push_str(r#","focus":{"reference":"#);
    push_json_str(&mut out, &reference);
    out.push_str(r#"}}],"topic":"#);
    push_json_str(&mut out, target.topic_url);
    out.push_str(r#","topic-destination":{"reference":"#);
    push_json_str(&mut out, &format!("AidboxTopicDestination/{}", target.destination_id));
    out.push_str("}}}");
    let request = {
        let mut r = String::from(r#""request":{"method":"#);
        push_json_str(&mut r, method);
        r.push_str(r#","url":"#);
        push_json_str(&mut r, &url);
        r.push('}');
        r
    };
    match target.content {
        Content::FullResource => {
            out.push_str(r#",{"resource":"#);
            out.push_str(ev.row.as_deref().unwrap_or("null"));
            out.push(',');
            out.push_str(&request);
            out.push('}');
        }
        Content::IdOnly => {
            out.push_str(r#",{"fullUrl":"#);
            push_json_str(&mut out, &reference);
            out.push(',');
            out.push_str(&request);
            out.push('}');
        }
        Content::Empty => {}
    }
    out.push_str("]}");
    out
}

/// Kafka headers: enough to deduplicate and route without parsing the value.
pub fn headers(target: &Target<'_>, ev: &Event) -> OwnedHeaders {
    let number = ev.id.to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header { key: "event-number", value: Some(number.as_str()) })
        .insert(Header { key: "topic-url", value: Some(target.topic_url) })
        .insert(Header { key: "destination-id", value: Some(target.destination_id) })
        .insert(Header { key: "interaction", value: Some(ev.interaction.as_str()) })
        .insert(Header { key: "source-table", value: Some(ev.table.as_str()) })
}

/// Produce one event; the delivery report comes back through the context.
pub fn send(producer: &KafkaProducer, kafka_topic: &str, target: &Target<'_>, ev: &Event) -> Result<(), KafkaError> {
    let payload = bundle(target, ev);
    let mut record =
        BaseRecord::with_opaque_to(kafka_topic, Box::new(ev.id)).payload(payload.as_str()).headers(headers(target, ev));
    if let Some(k) = &ev.key {
        record = record.key(k.as_str());
    }
    producer.send(record).map_err(|(e, _)| e)
}
