//! A destination's parameters (Aidbox's names, after Java's producer configs)
//! checked and mapped onto librdkafka properties. No Postgres calls here.
//!
//! Secrets (passwords, private keys, JAAS strings) never appear in an error
//! message or in the effective configuration shown to users.

use crate::jaas;
use crate::oauth::{TokenSource, Unsecured};
use serde_json::{Map, Value};

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

/// Every parameter a destination takes (Aidbox's, Java's names for the TLS
/// extras, ours for transactions), plus `rdkafka.<property>`.
pub const NAMES: &[&str] = &[
    "kafkaTopic",
    "bootstrapServers",
    "compressionType",
    "batchSize",
    "deliveryTimeoutMs",
    "maxBlockMs",
    "maxRequestSize",
    "requestTimeoutMs",
    "securityProtocol",
    "saslMechanism",
    "saslJaasConfig",
    "saslClientCallbackHandlerClass",
    "sslKeystoreKey",
    "sslKeystoreCertificateChain",
    "sslTruststoreCertificates",
    "sslKeyPassword",
    "transactionalId",
];

/// Java's defaults (Kafka 3.8 ProducerConfig), where they differ from librdkafka's.
pub const DEFAULT_DELIVERY_TIMEOUT_MS: i64 = 120_000;
pub const DEFAULT_MAX_BLOCK_MS: i64 = 60_000;
const DEFAULT_MAX_REQUEST_SIZE: i64 = 1_048_576;
const DEFAULT_REQUEST_TIMEOUT_MS: i64 = 30_000;
/// batch.size when batchSize is not given: librdkafka's own default, not
/// Java's 16384. With 16 KB batches librdkafka's threads took 3.5-5.2
/// us of CPU per ~700-byte event against 0.9-1.0 with these (100-row
/// statements delivered, see docs/performance.md): the
/// idempotent producer has at most 5 requests in flight and keeps waking to
/// find them full. Batching only what is queued (linger.ms 0), it adds no
/// latency.
const DEFAULT_BATCH_SIZE: i64 = 1_000_000;
/// buffer.memory (32 MiB) as queue.buffering.max.kbytes.
const BUFFER_KBYTES: i64 = 32_768;
/// librdkafka's minimum transaction.timeout.ms we use (Java's default).
const DEFAULT_TRANSACTION_TIMEOUT_MS: i64 = 60_000;
/// Brokers' default transaction.max.timeout.ms.
const MAX_TRANSACTION_TIMEOUT_MS: i64 = 900_000;

/// The MSK IAM callback handlers (Java class names) we implement.
const MSK_HANDLERS: &[&str] = &[
    "software.amazon.msk.auth.iam.IAMClientCallbackHandler",
    "software.amazon.msk.auth.iam.IAMOAuthBearerLoginCallbackHandler",
];
const MSK_LOGIN_MODULE: &str = "software.amazon.msk.auth.iam.IAMLoginModule";
const PLAIN_MODULE: &str = "org.apache.kafka.common.security.plain.PlainLoginModule";
const SCRAM_MODULE: &str = "org.apache.kafka.common.security.scram.ScramLoginModule";
const OAUTH_MODULE: &str = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule";

/// librdkafka properties set from named parameters (or managed by the
/// worker): `rdkafka.<property>` may not set them.
const MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "bootstrapServers"),
    ("metadata.broker.list", "bootstrapServers"),
    ("compression.type", "compressionType"),
    ("compression.codec", "compressionType"),
    ("batch.size", "batchSize"),
    ("message.timeout.ms", "deliveryTimeoutMs"),
    ("delivery.timeout.ms", "deliveryTimeoutMs"),
    ("message.max.bytes", "maxRequestSize"),
    ("request.timeout.ms", "requestTimeoutMs"),
    ("security.protocol", "securityProtocol"),
    ("sasl.mechanism", "saslMechanism"),
    ("sasl.mechanisms", "saslMechanism"),
    ("sasl.username", "saslJaasConfig"),
    ("sasl.password", "saslJaasConfig"),
    ("ssl.key.pem", "sslKeystoreKey"),
    ("ssl.certificate.pem", "sslKeystoreCertificateChain"),
    ("ssl.ca.pem", "sslTruststoreCertificates"),
    ("ssl.key.password", "sslKeyPassword"),
    ("transactional.id", "transactionalId"),
    ("transaction.timeout.ms", "deliveryTimeoutMs"),
    ("socket.timeout.ms", "requestTimeoutMs"),
    ("topic.metadata.propagation.max.ms", "maxBlockMs"),
    ("enable.sasl.oauthbearer.unsecure.jwt", "saslJaasConfig"),
    ("sasl.oauthbearer.method", "saslJaasConfig"),
];

/// A librdkafka property whose value is a secret.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password")
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

/// The JSON type of a value, for messages that must not show it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
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
                let name = item.get("name").and_then(Value::as_str).ok_or_else(|| {
                    perr(
                        format!("every entry of the parameters of destination \"{dest}\" needs a string \"name\""),
                        "E.g. {\"name\": \"kafkaTopic\", \"valueString\": \"orders\"}.",
                    )
                })?;
                let values: Vec<(&String, &Value)> =
                    item.as_object().into_iter().flatten().filter(|(k, _)| k.starts_with("value")).collect();
                let value = match values.as_slice() {
                    [(k, v)] if k.as_str() == "valueString" && v.is_string() => (*v).clone(),
                    [(k, v)] if k.as_str() == "valueInteger" && (v.is_i64() || v.is_u64()) => (*v).clone(),
                    [(k, _)] if k.as_str() == "valueString" || k.as_str() == "valueInteger" => {
                        return Err(perr(
                            format!("parameter \"{name}\" of destination \"{dest}\": {k} has the wrong JSON type"),
                            "valueString takes a JSON string, valueInteger a JSON integer.",
                        ))
                    }
                    _ => {
                        return Err(perr(
                            format!("parameter \"{name}\" of destination \"{dest}\" needs exactly one of valueString or valueInteger"),
                            "E.g. {\"name\": \"batchSize\", \"valueInteger\": 16384}.",
                        ))
                    }
                };
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

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    dest: &'a str,
}

impl Reader<'_> {
    /// A string parameter (valueString).
    fn string(&self, name: &str) -> Result<Option<String>, ParamError> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(perr(
                format!(
                    "parameter \"{name}\" of destination \"{}\" must be a string, not {}",
                    self.dest,
                    type_name(other)
                ),
                format!("Write it as a JSON string (valueString), e.g. \"{name}\": \"...\"."),
            )),
        }
    }

    /// An integer parameter (valueInteger; a string of digits is accepted as
    /// Java's config parser accepts it).
    fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ParamError> {
        let raw = match self.obj.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        let v = match raw {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        match v {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            Some(v) => Err(perr(
                format!(
                    "parameter \"{name}\" of destination \"{}\" must be between {min} and {max}, not {v}",
                    self.dest
                ),
                format!("E.g. \"{name}\": {}.", min.max(1)),
            )),
            None => Err(perr(
                format!(
                    "parameter \"{name}\" of destination \"{}\" must be an integer, not {}",
                    self.dest,
                    type_name(raw)
                ),
                format!("Write it as a JSON integer (valueInteger), e.g. \"{name}\": {}.", min.max(1)),
            )),
        }
    }

    /// One of `allowed` (case-insensitive); returns the canonical spelling.
    fn choice(&self, name: &str, allowed: &[&'static str]) -> Result<Option<&'static str>, ParamError> {
        let Some(v) = self.string(name)? else { return Ok(None) };
        allowed.iter().find(|a| a.eq_ignore_ascii_case(v.trim())).map(|a| Some(*a)).ok_or_else(|| {
            perr(
                format!("invalid {name} \"{v}\" for destination \"{}\"", self.dest),
                format!("Use one of {}.", allowed.join(", ")),
            )
        })
    }
}

fn valid_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
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

/// The PEM blocks of a value: (label, whole block text).
fn pem_blocks(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else { break };
        let label = after[..label_end].to_string();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = after.find(&end_marker) else { break };
        let block_end = start + 11 + end + end_marker.len();
        out.push((label, rest[start..block_end].to_string()));
        rest = &rest[block_end..];
    }
    out
}

fn certificates(dest: &str, name: &str, value: &str) -> Result<String, ParamError> {
    let blocks = pem_blocks(value);
    if blocks.is_empty() || blocks.iter().any(|(l, _)| l != "CERTIFICATE") {
        return Err(perr(
            format!("parameter \"{name}\" of destination \"{dest}\" must hold PEM certificates"),
            "Paste one or more -----BEGIN CERTIFICATE----- blocks.",
        ));
    }
    Ok(blocks.into_iter().map(|(_, b)| b).collect::<Vec<_>>().join("\n"))
}

/// A librdkafka property value that would let the worker delete events Kafka
/// may not have: refused for at-least-once destinations (delivery reports
/// for every event are needed by both kinds).
fn lowers_the_floor(prop: &str, value: &str, best_effort: bool) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    match prop {
        "delivery.report.only.error" if v == "true" => Some("suppress the delivery reports the worker counts on"),
        _ if best_effort => None,
        "acks" | "request.required.acks" if v != "all" && v != "-1" => {
            Some("acknowledge events before every in-sync replica has them (at-least-once needs acks=all)")
        }
        "enable.idempotence" if v == "false" => Some("turn off idempotence (duplicates and reordering on retries)"),
        _ => None,
    }
}

/// Put a property (a later one replaces an earlier one of the same name).
fn set(props: &mut Vec<(String, String)>, name: &str, value: impl Into<String>) {
    props.retain(|(k, _)| k != name);
    props.push((name.to_string(), value.into()));
}

impl Params {
    /// Check a destination's parameters: names, types, values, and how they
    /// fit together. `best_effort`: the destination's kind.
    pub fn parse(dest: &str, best_effort: bool, parameters: &Value) -> Result<Params, ParamError> {
        let obj = normalize(dest, parameters)?;
        for name in obj.keys() {
            if name.starts_with("rdkafka.") {
                continue;
            }
            if !NAMES.contains(&name.as_str()) {
                let near = NAMES.iter().find(|n| n.eq_ignore_ascii_case(name));
                return Err(perr(
                    format!("unknown parameter \"{name}\" for destination \"{dest}\""),
                    match near {
                        Some(n) => format!("Did you mean \"{n}\"? Parameter names are case-sensitive."),
                        None => format!(
                            "Parameters: {}, and rdkafka.<property> for any librdkafka property.",
                            NAMES.join(", ")
                        ),
                    },
                ));
            }
        }
        let r = Reader { obj: &obj, dest };
        let mut props: Vec<(String, String)> = Vec::new();

        let kafka_topic = r.string("kafkaTopic")?.ok_or_else(|| {
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
        let bootstrap = r.string("bootstrapServers")?.ok_or_else(|| {
            perr(
                format!("destination \"{dest}\" needs parameter \"bootstrapServers\""),
                "List the brokers as host:port, comma-separated, e.g. \"bootstrapServers\": \"localhost:9092\".",
            )
        })?;
        let Some(hosts) = servers(&bootstrap) else {
            return Err(perr(
                format!("invalid bootstrapServers \"{bootstrap}\" for destination \"{dest}\""),
                "List the brokers as host:port, comma-separated, e.g. \"kafka1:9092,kafka2:9092\".",
            ));
        };
        let list: Vec<String> = hosts
            .iter()
            .map(|(h, p)| if h.contains(':') { format!("[{h}]:{p}") } else { format!("{h}:{p}") })
            .collect();
        set(&mut props, "bootstrap.servers", list.join(","));
        set(&mut props, "client.id", format!("pg_outbox-{dest}"));
        // The at-least-once floor, as Java's producer defaults: idempotent,
        // acknowledged by all in-sync replicas, keys placed by murmur2.
        set(&mut props, "enable.idempotence", "true");
        set(&mut props, "acks", "all");
        set(&mut props, "partitioner", "murmur2_random");
        // No lingering: the worker hands librdkafka whole batches at once,
        // and commit-to-broker latency is what an outbox is judged by.
        set(&mut props, "linger.ms", "0");
        set(&mut props, "log.connection.close", "false");
        set(&mut props, "queue.buffering.max.kbytes", BUFFER_KBYTES.to_string());

        let compression = r.choice("compressionType", &["none", "gzip", "snappy", "lz4", "zstd"])?;
        set(&mut props, "compression.type", compression.unwrap_or("none"));
        let batch_size = r.int("batchSize", 0, i32::MAX as i64)?.unwrap_or(DEFAULT_BATCH_SIZE);
        // Java's 0 (no batching) is one message per batch here.
        set(&mut props, "batch.size", batch_size.max(1).to_string());
        // librdkafka needs it above linger.ms.
        let delivery_timeout_ms =
            r.int("deliveryTimeoutMs", 100, i32::MAX as i64)?.unwrap_or(DEFAULT_DELIVERY_TIMEOUT_MS);
        set(&mut props, "message.timeout.ms", delivery_timeout_ms.to_string());
        let max_block_ms = r.int("maxBlockMs", 0, i32::MAX as i64)?.unwrap_or(DEFAULT_MAX_BLOCK_MS);
        // Java's send() waits up to max.block.ms for a topic's metadata.
        set(&mut props, "topic.metadata.propagation.max.ms", max_block_ms.min(3_600_000).to_string());
        let max_request = r.int("maxRequestSize", 1000, 1_000_000_000)?.unwrap_or(DEFAULT_MAX_REQUEST_SIZE);
        set(&mut props, "message.max.bytes", max_request.to_string());
        let request_timeout = r.int("requestTimeoutMs", 1, 900_000)?.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS);
        set(&mut props, "request.timeout.ms", request_timeout.to_string());
        // Java's request.timeout.ms is the client's wait for any response.
        set(&mut props, "socket.timeout.ms", request_timeout.clamp(10, 300_000).to_string());

        let protocol =
            r.choice("securityProtocol", &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])?.unwrap_or("PLAINTEXT");
        set(&mut props, "security.protocol", protocol.to_ascii_lowercase());
        let tls = protocol.ends_with("SSL");
        let sasl = protocol.starts_with("SASL");

        let token = Self::sasl(&r, dest, sasl, &hosts, &mut props)?;
        Self::tls(&r, dest, tls, &mut props)?;

        let transactional = match r.string("transactionalId")? {
            None => false,
            Some(id) if id.trim().is_empty() => {
                return Err(perr(
                    format!("parameter \"transactionalId\" of destination \"{dest}\" is empty"),
                    "Give a transactional id unique to this destination, e.g. \"pg_outbox-orders\".",
                ))
            }
            Some(_) if best_effort => {
                return Err(perr(
                    format!("destination \"{dest}\" is kafka-best-effort: transactionalId is for kafka-at-least-once"),
                    "Remove transactionalId, or make the destination kafka-at-least-once.",
                ))
            }
            Some(_) if delivery_timeout_ms > MAX_TRANSACTION_TIMEOUT_MS => {
                return Err(perr(
                    format!(
                        "deliveryTimeoutMs {delivery_timeout_ms} of destination \"{dest}\" is too long for a transactional producer"
                    ),
                    format!(
                        "librdkafka needs transaction.timeout.ms >= deliveryTimeoutMs, and brokers refuse transaction timeouts above transaction.max.timeout.ms ({MAX_TRANSACTION_TIMEOUT_MS} by default): use at most {MAX_TRANSACTION_TIMEOUT_MS}."
                    ),
                ))
            }
            Some(id) => {
                set(&mut props, "transactional.id", id);
                // librdkafka refuses message.timeout.ms above transaction.timeout.ms,
                // and socket.timeout.ms above transaction.timeout.ms + 100.
                let t = delivery_timeout_ms.max(DEFAULT_TRANSACTION_TIMEOUT_MS);
                set(&mut props, "transaction.timeout.ms", t.to_string());
                let socket = request_timeout.clamp(10, 300_000).min(t + 100);
                set(&mut props, "socket.timeout.ms", socket.to_string());
                true
            }
        };

        // The escape hatch: librdkafka properties verbatim (librdkafka checks them).
        for (name, value) in &obj {
            let Some(prop) = name.strip_prefix("rdkafka.") else { continue };
            if prop.is_empty() {
                return Err(perr(
                    format!("parameter \"rdkafka.\" of destination \"{dest}\" names no property"),
                    "E.g. \"rdkafka.linger.ms\": 20.",
                ));
            }
            if let Some((_, owner)) = MANAGED.iter().find(|(p, _)| *p == prop) {
                return Err(perr(
                    format!("parameter \"{name}\" of destination \"{dest}\" sets a property pg_outbox manages"),
                    format!("Use the parameter \"{owner}\" instead."),
                ));
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(perr(
                        format!(
                        "parameter \"{name}\" of destination \"{dest}\" must be a string, number or boolean, not {}",
                        type_name(other)
                    ),
                        "librdkafka properties take scalar values, e.g. \"rdkafka.linger.ms\": 20.",
                    ))
                }
            };
            if let Some(why) = lowers_the_floor(prop, &text, best_effort) {
                return Err(perr(
                    format!("parameter \"{name}\" of destination \"{dest}\" would {why}"),
                    "At-least-once needs acks=all, idempotence and delivery reports for every event; use a kafka-best-effort destination to trade them away.",
                ));
            }
            set(&mut props, prop, text);
        }
        Ok(Params { kafka_topic, delivery_timeout_ms, max_block_ms, transactional, token, properties: props })
    }

    /// saslMechanism, saslJaasConfig, saslClientCallbackHandlerClass.
    fn sasl(
        r: &Reader<'_>,
        dest: &str,
        sasl: bool,
        hosts: &[(String, u16)],
        props: &mut Vec<(String, String)>,
    ) -> Result<Option<TokenSource>, ParamError> {
        let mechanism = r.choice(
            "saslMechanism",
            &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM", "GSSAPI"],
        )?;
        let jaas_text = r.string("saslJaasConfig")?;
        let handler = r.string("saslClientCallbackHandlerClass")?;
        if !sasl {
            if let Some(name) = ["saslMechanism", "saslJaasConfig", "saslClientCallbackHandlerClass"]
                .into_iter()
                .find(|n| r.obj.get(*n).is_some_and(|v| !v.is_null()))
            {
                return Err(perr(
                    format!("parameter \"{name}\" of destination \"{dest}\" needs securityProtocol SASL_SSL or SASL_PLAINTEXT"),
                    "Set \"securityProtocol\": \"SASL_SSL\" (Java would ignore the SASL settings; pg_outbox refuses to).",
                ));
            }
            return Ok(None);
        }
        // Java's default mechanism is GSSAPI.
        let mechanism = mechanism.unwrap_or("GSSAPI");
        if mechanism == "GSSAPI" {
            return Err(unsupported(
                format!("saslMechanism GSSAPI (Kerberos) of destination \"{dest}\" is not built into pg_outbox"),
                "Set saslMechanism to PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or AWS_MSK_IAM (Java's default is GSSAPI).",
            ));
        }
        let jaas = match &jaas_text {
            None => None,
            Some(text) => Some(jaas::parse(text).map_err(|e| {
                perr(
                    format!("invalid saslJaasConfig for destination \"{dest}\": {e}"),
                    "Kafka's JAAS syntax: LoginModuleClass required key=\"value\" ...; with a terminating semicolon.",
                )
            })?),
        };
        let is_msk_handler = handler.as_deref().is_some_and(|h| MSK_HANDLERS.contains(&h));
        if let Some(h) = &handler {
            if !is_msk_handler {
                return Err(unsupported(
                    format!("saslClientCallbackHandlerClass \"{h}\" of destination \"{dest}\" is not supported"),
                    format!("There is no Java here; the handlers pg_outbox implements: {}.", MSK_HANDLERS.join(", ")),
                ));
            }
        }
        let module = jaas.as_ref().map(|j| j.module.as_str());
        let wrong_module = |expected: &str| {
            perr(
                format!(
                    "saslJaasConfig of destination \"{dest}\" uses login module {} but saslMechanism {mechanism} needs {expected}",
                    module.unwrap_or("(none)")
                ),
                format!("Use {expected} required ...; in saslJaasConfig."),
            )
        };
        let msk = mechanism == "AWS_MSK_IAM"
            || (mechanism == "OAUTHBEARER" && (is_msk_handler || module == Some(MSK_LOGIN_MODULE)));
        if msk {
            if jaas.is_some() && module != Some(MSK_LOGIN_MODULE) && module != Some(OAUTH_MODULE) {
                return Err(wrong_module(MSK_LOGIN_MODULE));
            }
            let mut profile = None;
            for (k, v) in jaas.iter().flat_map(|j| j.options.iter()) {
                match k.as_str() {
                    "awsProfileName" => profile = Some(v.clone()),
                    "awsDebugCreds" | "awsMaxRetries" | "awsMaxBackOffTimeMs" => {}
                    "awsRoleArn" | "awsRoleSessionName" | "awsStsRegion" | "awsRoleAccessKeyId"
                    | "awsRoleSecretAccessKey" | "awsRoleSessionToken" => {
                        return Err(unsupported(
                            format!("saslJaasConfig option {} of destination \"{dest}\" is not supported", jaas::shown(k)),
                            "Assuming a role needs a call to AWS STS, which pg_outbox does not make: give the server the role's credentials in its environment or a profile.",
                        ))
                    }
                    _ => {
                        return Err(perr(
                            format!("unknown option {} for {MSK_LOGIN_MODULE} in saslJaasConfig of destination \"{dest}\"", jaas::shown(k)),
                            "IAMLoginModule takes awsProfileName (awsDebugCreds, awsMaxRetries and awsMaxBackOffTimeMs are accepted and ignored).",
                        ))
                    }
                }
            }
            let region = hosts
                .iter()
                .find_map(|(h, _)| crate::oauth::region_of_host(h))
                .or_else(|| std::env::var("AWS_REGION").ok().filter(|s| !s.is_empty()))
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok().filter(|s| !s.is_empty()))
                .ok_or_else(|| {
                    perr(
                        format!("no AWS region for the MSK IAM destination \"{dest}\""),
                        "Use the brokers' MSK host names (…kafka.<region>.amazonaws.com), or set AWS_REGION in the server's environment.",
                    )
                })?;
            set(props, "sasl.mechanism", "OAUTHBEARER");
            return Ok(Some(TokenSource::MskIam { region, profile }));
        }
        set(props, "sasl.mechanism", mechanism);
        // The JAAS entry this mechanism needs, naming `expected` as its module.
        let require = |expected: &str, example: &str| match &jaas {
            None => Err(perr(
                format!("destination \"{dest}\" uses saslMechanism {mechanism} but has no saslJaasConfig"),
                format!("Add \"saslJaasConfig\": \"{expected} required {example};\"."),
            )),
            Some(j) if j.module != expected => Err(wrong_module(expected)),
            Some(j) => Ok(j),
        };
        match mechanism {
            "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
                let expected = if mechanism == "PLAIN" { PLAIN_MODULE } else { SCRAM_MODULE };
                let j = require(expected, r#"username=\"...\" password=\"...\""#)?;
                for (k, v) in &j.options {
                    match k.as_str() {
                        "username" => set(props, "sasl.username", v.clone()),
                        "password" => set(props, "sasl.password", v.clone()),
                        "tokenauth" if v.eq_ignore_ascii_case("false") => {}
                        "tokenauth" => {
                            return Err(unsupported(
                                format!(
                                    "SCRAM delegation tokens (tokenauth) of destination \"{dest}\" are not supported"
                                ),
                                "librdkafka has no delegation-token support: use a user's credentials.",
                            ))
                        }
                        _ => {
                            return Err(perr(
                                format!(
                                    "unknown option {} for {expected} in saslJaasConfig of destination \"{dest}\"",
                                    jaas::shown(k)
                                ),
                                "It takes username and password.",
                            ))
                        }
                    }
                }
                if j.option("username").is_none() || j.option("password").is_none() {
                    return Err(perr(
                        format!("saslJaasConfig of destination \"{dest}\" needs both username and password"),
                        format!("{expected} required username=\"...\" password=\"...\";"),
                    ));
                }
                Ok(None)
            }
            _ => {
                // OAUTHBEARER: Kafka's unsecured JWTs (OIDC needs libcurl, not built).
                let j = require(OAUTH_MODULE, r#"unsecuredLoginStringClaim_sub=\"...\""#)?;
                let mut u = Unsecured {
                    principal_claim: "sub".into(),
                    scope_claim: "scope".into(),
                    lifetime_seconds: 3600,
                    claims: Vec::new(),
                };
                for (k, v) in &j.options {
                    let claim = |prefix: &str| k.strip_prefix(prefix).filter(|c| !c.is_empty()).map(str::to_string);
                    if let Some(c) = claim("unsecuredLoginStringClaim_") {
                        u.claims.push((c, Value::String(v.clone())));
                    } else if let Some(c) = claim("unsecuredLoginNumberClaim_") {
                        let n: serde_json::Number = v.trim().parse().map_err(|_| {
                            perr(
                                format!(
                                    "{} in saslJaasConfig of destination \"{dest}\" must be a number",
                                    jaas::shown(k)
                                ),
                                "E.g. unsecuredLoginNumberClaim_level=\"3\".",
                            )
                        })?;
                        u.claims.push((c, Value::Number(n)));
                    } else if let Some(c) = claim("unsecuredLoginListClaim_") {
                        // Java: the first character is the delimiter.
                        let mut chars = v.chars();
                        let items: Vec<Value> = match chars.next() {
                            Some(d) => chars
                                .as_str()
                                .split(d)
                                .filter(|s| !s.is_empty())
                                .map(|s| Value::String(s.into()))
                                .collect(),
                            None => Vec::new(),
                        };
                        u.claims.push((c, Value::Array(items)));
                    } else if k == "unsecuredLoginPrincipalClaimName" {
                        u.principal_claim = v.clone();
                    } else if k == "unsecuredLoginScopeClaimName" {
                        u.scope_claim = v.clone();
                    } else if k == "unsecuredLoginLifetimeSeconds" {
                        u.lifetime_seconds = v.trim().parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
                            perr(
                                format!(
                                    "{} in saslJaasConfig of destination \"{dest}\" must be a positive integer",
                                    jaas::shown(k)
                                ),
                                "E.g. unsecuredLoginLifetimeSeconds=\"3600\".",
                            )
                        })?;
                    } else if k.starts_with("unsecuredLoginExtension_")
                        || ["clientId", "clientSecret", "scope"].contains(&k.as_str())
                    {
                        return Err(unsupported(
                            format!("saslJaasConfig option {} of destination \"{dest}\" is not supported", jaas::shown(k)),
                            "OAUTHBEARER here makes Kafka's unsecured JWTs (unsecuredLogin*Claim_*), or MSK IAM tokens; OIDC client credentials and SASL extensions are not built in.",
                        ));
                    } else {
                        return Err(perr(
                            format!("unknown option {} for {OAUTH_MODULE} in saslJaasConfig of destination \"{dest}\"", jaas::shown(k)),
                            "It takes unsecuredLoginStringClaim_<name>, unsecuredLoginNumberClaim_<name>, unsecuredLoginListClaim_<name>, unsecuredLoginPrincipalClaimName, unsecuredLoginScopeClaimName, unsecuredLoginLifetimeSeconds.",
                        ));
                    }
                }
                // The token must name its principal: fail now, not at connect time.
                u.token(0).map_err(|e| {
                    perr(
                        format!("saslJaasConfig of destination \"{dest}\": {e}"),
                        "E.g. unsecuredLoginStringClaim_sub=\"pg_outbox\".",
                    )
                })?;
                Ok(Some(TokenSource::Unsecured(u)))
            }
        }
    }

    /// sslKeystoreKey, sslKeystoreCertificateChain, sslTruststoreCertificates, sslKeyPassword.
    fn tls(r: &Reader<'_>, dest: &str, tls: bool, props: &mut Vec<(String, String)>) -> Result<(), ParamError> {
        let key = r.string("sslKeystoreKey")?;
        let chain = r.string("sslKeystoreCertificateChain")?;
        let trust = r.string("sslTruststoreCertificates")?;
        let password = r.string("sslKeyPassword")?;
        if !tls {
            if let Some(name) =
                ["sslKeystoreKey", "sslKeystoreCertificateChain", "sslTruststoreCertificates", "sslKeyPassword"]
                    .into_iter()
                    .find(|n| r.obj.get(*n).is_some_and(|v| !v.is_null()))
            {
                return Err(perr(
                    format!("parameter \"{name}\" of destination \"{dest}\" needs securityProtocol SSL or SASL_SSL"),
                    "Set \"securityProtocol\": \"SSL\" (or SASL_SSL).",
                ));
            }
            return Ok(());
        }
        match trust {
            Some(t) => set(props, "ssl.ca.pem", certificates(dest, "sslTruststoreCertificates", &t)?),
            // Java trusts the JVM's CAs; here the system's.
            None => set(props, "ssl.ca.location", "probe"),
        }
        let mut certs_in_key = None;
        if let Some(k) = &key {
            let blocks = pem_blocks(k);
            let keys: Vec<&(String, String)> = blocks.iter().filter(|(l, _)| l.ends_with("PRIVATE KEY")).collect();
            let [(label, block)] = keys.as_slice() else {
                return Err(perr(
                    format!("sslKeystoreKey of destination \"{dest}\" must hold exactly one PEM private key"),
                    "Paste the key as -----BEGIN PRIVATE KEY----- (PKCS#8), optionally followed by its certificate chain.",
                ));
            };
            if label != "PRIVATE KEY" && label != "ENCRYPTED PRIVATE KEY" {
                return Err(perr(
                    format!("sslKeystoreKey of destination \"{dest}\" is a {label}, not PKCS#8"),
                    "Java takes PKCS#8 keys: convert with openssl pkcs8 -topk8 -in key.pem (add -nocrypt for no password).",
                ));
            }
            if label == "ENCRYPTED PRIVATE KEY" && password.is_none() {
                return Err(perr(
                    format!("sslKeystoreKey of destination \"{dest}\" is encrypted but sslKeyPassword is missing"),
                    "Add \"sslKeyPassword\".",
                ));
            }
            if blocks.iter().any(|(l, _)| l != "CERTIFICATE" && !l.ends_with("PRIVATE KEY")) {
                return Err(perr(
                    format!(
                        "sslKeystoreKey of destination \"{dest}\" holds PEM blocks other than a key and certificates"
                    ),
                    "Paste the private key, optionally followed by its certificate chain.",
                ));
            }
            set(props, "ssl.key.pem", block.clone());
            let certs: Vec<String> =
                blocks.iter().filter(|(l, _)| l == "CERTIFICATE").map(|(_, b)| b.clone()).collect();
            if !certs.is_empty() {
                certs_in_key = Some(certs.join("\n"));
            }
        }
        let chain = match (chain, certs_in_key) {
            (Some(_), Some(_)) => {
                return Err(perr(
                    format!("destination \"{dest}\" gives a certificate chain both in sslKeystoreKey and in sslKeystoreCertificateChain"),
                    "Give it once.",
                ))
            }
            (Some(c), None) => Some(certificates(dest, "sslKeystoreCertificateChain", &c)?),
            (None, c) => c,
        };
        match (&key, chain) {
            (Some(_), Some(c)) => set(props, "ssl.certificate.pem", c),
            (Some(_), None) => {
                return Err(perr(
                    format!("sslKeystoreKey of destination \"{dest}\" has no certificate chain"),
                    "Append the client certificate to sslKeystoreKey, or give it as sslKeystoreCertificateChain.",
                ))
            }
            (None, Some(_)) => {
                return Err(perr(
                    format!("sslKeystoreCertificateChain of destination \"{dest}\" has no sslKeystoreKey"),
                    "Client certificates need their private key in sslKeystoreKey.",
                ))
            }
            (None, None) => {}
        }
        if let Some(p) = password {
            if key.is_none() {
                return Err(perr(
                    format!("sslKeyPassword of destination \"{dest}\" has no sslKeystoreKey"),
                    "Remove sslKeyPassword, or add the key.",
                ));
            }
            set(props, "ssl.key.password", p);
        }
        Ok(())
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
