//! A destination's parameters (Aidbox's names, after Java's producer configs)
//! checked and mapped onto librdkafka properties. No Postgres calls here.
//! What each parameter may be is defined once, in `spec::SPECS`.
//!
//! Secrets (passwords, private keys, JAAS strings) never appear in an error
//! message or in the effective configuration shown to users.

mod passthrough;
mod reader;
mod sasl;
pub mod spec;
mod tls;

use crate::oauth::TokenSource;
use reader::Reader;
use serde_json::{Map, Value};
use spec::{PASSTHROUGH, SPECS};

/// A problem with a destination's parameters, with a hint for the user.
#[derive(Debug)]
pub struct ParamError {
    pub message: String,
    pub hint: String,
    /// Valid, but not something this build can do (SQLSTATE 0A000).
    pub unsupported: bool,
}

fn perr(message: String, hint: impl Into<String>) -> ParamError {
    ParamError { message, hint: hint.into(), unsupported: false }
}

fn unsupported(message: String, hint: impl Into<String>) -> ParamError {
    ParamError { message, hint: hint.into(), unsupported: true }
}

/// buffer.memory (32 MiB) as queue.buffering.max.kbytes.
const BUFFER_KBYTES: i64 = 32_768;
/// librdkafka's minimum transaction.timeout.ms we use (Java's default).
const DEFAULT_TRANSACTION_TIMEOUT_MS: i64 = 60_000;
/// Brokers' default transaction.max.timeout.ms.
const MAX_TRANSACTION_TIMEOUT_MS: i64 = 900_000;

/// A librdkafka property whose value is a secret: one a secret parameter
/// maps to, or one whose name says so (for `rdkafka.<property>`).
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SPECS.iter().any(|s| s.secret && s.property == Some(name))
        || n.contains("password")
        || n.contains("secret")
        || n.contains("key.pem")
        || n == "ssl_key"
        || n.contains("oauthbearer.config")
        || n.contains("jaas")
}

/// A destination's validated parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub kafka_topic: String,
    pub delivery_timeout_ms: i64,
    /// Java's max.block.ms: how long the worker waits for buffer space and
    /// for transaction calls before it gives up (librdkafka never blocks).
    pub max_block_ms: i64,
    /// transactionalId given: each batch is one Kafka transaction.
    pub transactional: bool,
    /// OAUTHBEARER tokens the worker makes (MSK IAM, unsecured JWT).
    pub token: Option<TokenSource>,
    /// librdkafka properties in the order they are set.
    pub properties: Vec<(String, String)>,
}

/// Aidbox's `parameter` array (`[{"name": ..., "valueString" | "valueInteger": ...}]`)
/// as an object; an object is taken as it is.
pub fn normalize(dest: &str, parameters: &Value) -> Result<Map<String, Value>, ParamError> {
    let example = "E.g. '{\"kafkaTopic\": \"orders\", \"bootstrapServers\": \"localhost:9092\"}'::jsonb.";
    match parameters {
        Value::Object(o) => Ok(o.clone()),
        Value::Array(items) => {
            let mut out = Map::new();
            for item in items {
                let (name, value) = array_entry(dest, item)?;
                if out.insert(name.to_string(), value).is_some() {
                    return Err(perr(
                        format!("parameter \"{name}\" of destination \"{dest}\" is given twice"),
                        "Give each parameter once.",
                    ));
                }
            }
            Ok(out)
        }
        _ => Err(perr(format!("parameters of destination \"{dest}\" must be a JSON object"), example)),
    }
}

/// One entry of Aidbox's `parameter` array: its name and its one value.
fn array_entry<'a>(dest: &str, item: &'a Value) -> Result<(&'a str, Value), ParamError> {
    let name = item.get("name").and_then(Value::as_str).ok_or_else(|| {
        perr(
            format!("every entry of the parameters of destination \"{dest}\" needs a string \"name\""),
            "E.g. {\"name\": \"kafkaTopic\", \"valueString\": \"orders\"}.",
        )
    })?;
    let values: Vec<(&String, &Value)> =
        item.as_object().into_iter().flatten().filter(|(k, _)| k.starts_with("value")).collect();
    match values.as_slice() {
        [(k, v)] if k.as_str() == "valueString" && v.is_string() => Ok((name, (*v).clone())),
        [(k, v)] if k.as_str() == "valueInteger" && (v.is_i64() || v.is_u64()) => Ok((name, (*v).clone())),
        [(k, _)] if k.as_str() == "valueString" || k.as_str() == "valueInteger" => Err(perr(
            format!("parameter \"{name}\" of destination \"{dest}\": {k} has the wrong JSON type"),
            "valueString takes a JSON string, valueInteger a JSON integer.",
        )),
        _ => Err(perr(
            format!("parameter \"{name}\" of destination \"{dest}\" needs exactly one of valueString or valueInteger"),
            "E.g. {\"name\": \"batchSize\", \"valueInteger\": 16384}.",
        )),
    }
}

/// Refuse a name that is neither a parameter nor `rdkafka.<property>`.
fn check_names(dest: &str, obj: &Map<String, Value>) -> Result<(), ParamError> {
    let Some(name) = obj.keys().find(|n| !n.starts_with(PASSTHROUGH) && !SPECS.iter().any(|s| s.name == *n)) else {
        return Ok(());
    };
    let hint = match SPECS.iter().find(|s| s.name.eq_ignore_ascii_case(name)) {
        Some(s) => format!("Did you mean \"{}\"? Parameter names are case-sensitive.", s.name),
        None => {
            let names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
            format!("Parameters: {}, and {PASSTHROUGH}<property> for any librdkafka property.", names.join(", "))
        }
    };
    Err(perr(format!("unknown parameter \"{name}\" for destination \"{dest}\""), hint))
}

fn valid_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

/// kafkaTopic: a name Kafka accepts.
fn topic(r: &Reader<'_>) -> Result<String, ParamError> {
    let topic = r.required("kafkaTopic")?;
    if !valid_topic_name(&topic) {
        return Err(perr(
            format!("invalid Kafka topic name \"{topic}\" for destination \"{}\"", r.dest),
            "Kafka topic names are 1 to 249 characters from [a-zA-Z0-9._-].",
        ));
    }
    Ok(topic)
}

/// host:port pairs of a bootstrapServers value (empty entries are skipped,
/// as Java does).
fn servers(s: &str) -> Option<Vec<(String, u16)>> {
    let entries: Vec<&str> = s.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    if entries.is_empty() {
        return None;
    }
    entries
        .into_iter()
        .map(|hp| {
            let (host, port) = hp.trim().rsplit_once(':')?;
            let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
            (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_string(), port))
        })
        .collect()
}

/// bootstrapServers: sets bootstrap.servers, returns the (host, port) pairs.
fn bootstrap(r: &Reader<'_>, props: &mut Vec<(String, String)>) -> Result<Vec<(String, u16)>, ParamError> {
    let bootstrap = r.required("bootstrapServers")?;
    let Some(hosts) = servers(&bootstrap) else {
        return Err(perr(
            format!("invalid bootstrapServers \"{bootstrap}\" for destination \"{}\"", r.dest),
            "List the brokers as host:port, comma-separated, e.g. \"kafka1:9092,kafka2:9092\".",
        ));
    };
    let list: Vec<String> =
        hosts.iter().map(|(h, p)| if h.contains(':') { format!("[{h}]:{p}") } else { format!("{h}:{p}") }).collect();
    set(props, "bootstrap.servers", list.join(","));
    Ok(hosts)
}

/// What every producer gets, whatever its parameters (`rdkafka.<property>`
/// may still override these).
fn fixed(dest: &str, props: &mut Vec<(String, String)>) {
    set(props, "client.id", format!("pg_outbox-{dest}"));
    // The at-least-once floor, as Java's producer defaults: idempotent,
    // acknowledged by all in-sync replicas, keys placed by murmur2.
    set(props, "enable.idempotence", "true");
    set(props, "acks", "all");
    set(props, "partitioner", "murmur2_random");
    // No lingering: the worker hands librdkafka whole batches at once,
    // and commit-to-broker latency is what an outbox is judged by.
    set(props, "linger.ms", "0");
    set(props, "log.connection.close", "false");
    set(props, "queue.buffering.max.kbytes", BUFFER_KBYTES.to_string());
}

/// The timeouts the worker and the transaction settings need too.
struct Timeouts {
    delivery_ms: i64,
    max_block_ms: i64,
    request_ms: i64,
}

/// compressionType, batchSize, deliveryTimeoutMs, maxBlockMs,
/// maxRequestSize, requestTimeoutMs.
fn limits(r: &Reader<'_>, props: &mut Vec<(String, String)>) -> Result<Timeouts, ParamError> {
    set(props, "compression.type", r.one_of("compressionType")?);
    // Java's 0 (no batching) is one message per batch here.
    set(props, "batch.size", r.integer("batchSize")?.max(1).to_string());
    let delivery_ms = r.integer("deliveryTimeoutMs")?;
    set(props, "message.timeout.ms", delivery_ms.to_string());
    let max_block_ms = r.integer("maxBlockMs")?;
    // Java's send() waits up to max.block.ms for a topic's metadata
    // (librdkafka takes at most an hour).
    set(props, "topic.metadata.propagation.max.ms", max_block_ms.min(3_600_000).to_string());
    set(props, "message.max.bytes", r.integer("maxRequestSize")?.to_string());
    let request_ms = r.integer("requestTimeoutMs")?;
    set(props, "request.timeout.ms", request_ms.to_string());
    // Java's request.timeout.ms is the client's wait for any response
    // (librdkafka's socket.timeout.ms takes 10 to 300000).
    set(props, "socket.timeout.ms", request_ms.clamp(10, 300_000).to_string());
    Ok(Timeouts { delivery_ms, max_block_ms, request_ms })
}

/// transactionalId: whether each batch is one Kafka transaction.
fn transaction(
    r: &Reader<'_>,
    best_effort: bool,
    t: &Timeouts,
    props: &mut Vec<(String, String)>,
) -> Result<bool, ParamError> {
    let dest = r.dest;
    match r.text("transactionalId")? {
        None => Ok(false),
        Some(id) if id.trim().is_empty() => Err(perr(
            format!("parameter \"transactionalId\" of destination \"{dest}\" is empty"),
            "Give a transactional id unique to this destination, e.g. \"pg_outbox-orders\".",
        )),
        Some(_) if best_effort => Err(perr(
            format!("destination \"{dest}\" is kafka-best-effort: transactionalId is for kafka-at-least-once"),
            "Remove transactionalId, or make the destination kafka-at-least-once.",
        )),
        Some(_) if t.delivery_ms > MAX_TRANSACTION_TIMEOUT_MS => Err(perr(
            format!(
                "deliveryTimeoutMs {} of destination \"{dest}\" is too long for a transactional producer",
                t.delivery_ms
            ),
            format!(
                "librdkafka needs transaction.timeout.ms >= deliveryTimeoutMs, and brokers refuse transaction timeouts above transaction.max.timeout.ms ({MAX_TRANSACTION_TIMEOUT_MS} by default): use at most {MAX_TRANSACTION_TIMEOUT_MS}."
            ),
        )),
        Some(id) => {
            set(props, "transactional.id", id);
            // librdkafka refuses message.timeout.ms above transaction.timeout.ms,
            // and socket.timeout.ms above transaction.timeout.ms + 100.
            let timeout = t.delivery_ms.max(DEFAULT_TRANSACTION_TIMEOUT_MS);
            set(props, "transaction.timeout.ms", timeout.to_string());
            set(props, "socket.timeout.ms", t.request_ms.clamp(10, 300_000).min(timeout + 100).to_string());
            Ok(true)
        }
    }
}

/// Put a property (a later one replaces an earlier one of the same name).
fn set(props: &mut Vec<(String, String)>, name: &str, value: impl Into<String>) {
    props.retain(|(k, _)| k != name);
    props.push((name.to_string(), value.into()));
}

impl Params {
    /// Check a destination's parameters: names, types, values, and how they
    /// fit together. `best_effort`: the destination's kind. Checked in the
    /// order of `SPECS`, so the first problem is the one reported.
    pub fn parse(dest: &str, best_effort: bool, parameters: &Value) -> Result<Params, ParamError> {
        let obj = normalize(dest, parameters)?;
        check_names(dest, &obj)?;
        let r = Reader { obj: &obj, dest };
        let mut props: Vec<(String, String)> = Vec::new();
        let kafka_topic = topic(&r)?;
        let hosts = bootstrap(&r, &mut props)?;
        fixed(dest, &mut props);
        let timeouts = limits(&r, &mut props)?;
        let protocol = r.one_of("securityProtocol")?;
        set(&mut props, "security.protocol", protocol.to_ascii_lowercase());
        let token = sasl::configure(&r, protocol.starts_with("SASL"), &hosts, &mut props)?;
        tls::configure(&r, protocol.ends_with("SSL"), &mut props)?;
        let transactional = transaction(&r, best_effort, &timeouts, &mut props)?;
        passthrough::apply(&obj, dest, best_effort, &mut props)?;
        Ok(Params {
            kafka_topic,
            delivery_timeout_ms: timeouts.delivery_ms,
            max_block_ms: timeouts.max_block_ms,
            transactional,
            token,
            properties: props,
        })
    }

    /// The librdkafka configuration of this destination's producer.
    pub fn client_config(&self) -> rdkafka::config::ClientConfig {
        let mut c = rdkafka::config::ClientConfig::new();
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// What the producer is configured with, secrets redacted.
    pub fn effective(&self) -> Value {
        let mut out = Map::new();
        for (k, v) in &self.properties {
            let shown = if is_secret_property(k) { "[redacted]".to_string() } else { v.clone() };
            out.insert(k.clone(), Value::String(shown));
        }
        if let Some(t) = &self.token {
            out.insert("pg_outbox.oauthbearer.token".into(), Value::String(t.describe()));
        }
        out.insert("pg_outbox.max.block.ms".into(), Value::String(self.max_block_ms.to_string()));
        Value::Object(out)
    }

    /// `message` with every secret value of this configuration blanked out.
    pub fn redact(&self, message: &str) -> String {
        let mut out = message.to_string();
        for (k, v) in &self.properties {
            if is_secret_property(k) && !v.is_empty() {
                out = out.replace(v.as_str(), "[redacted]");
            }
        }
        out
    }
}
