//! The one definition of every parameter a destination takes: its name, what
//! its value may be, its default, the librdkafka properties it decides,
//! whether it is a secret. Parsing, the list of known names, the refusal of
//! `rdkafka.<property>` for decided properties and redaction read it;
//! docs/parameters.md's table is checked against it (params/tests/docs.rs).

/// What a parameter's value may be, and what it is when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A JSON string, checked where it is used; not given: nothing is set.
    Text,
    /// A JSON string that must be given; `hint` says what to give.
    Required { hint: &'static str },
    /// A JSON integer, or a string of digits as Java's config parser takes it.
    Integer { min: i64, max: i64, default: i64 },
    /// One of `values`, in any case; read as spelled here.
    OneOf { values: &'static [&'static str], default: &'static str },
}

/// The security protocol a parameter needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Any,
    /// `SASL_PLAINTEXT` or `SASL_SSL`.
    Sasl,
    /// `SSL` or `SASL_SSL`.
    Tls,
}

/// One parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Aidbox's name (Java's producer config in camelCase).
    pub name: &'static str,
    pub kind: Kind,
    /// The librdkafka property it maps to, if one.
    pub property: Option<&'static str>,
    /// Other librdkafka properties it decides: `property`'s aliases and
    /// those set from its value. Neither these nor `property` may be given
    /// as `rdkafka.<property>`: the hint names this parameter instead.
    pub decides: &'static [&'static str],
    pub needs: Needs,
    /// Its value is never shown: not in messages, not in the effective
    /// configuration.
    pub secret: bool,
}

/// The prefix of the escape hatch: `rdkafka.<property>` sets a librdkafka
/// property verbatim.
pub const PASSTHROUGH: &str = "rdkafka.";

/// Largest Java int, the limit of Java's integer configs.
const INT_MAX: i64 = i32::MAX as i64;

const fn spec(name: &'static str, kind: Kind, property: Option<&'static str>) -> Spec {
    Spec { name, kind, property, decides: &[], needs: Needs::Any, secret: false }
}

impl Spec {
    const fn deciding(self, decides: &'static [&'static str]) -> Spec {
        Spec { decides, ..self }
    }

    const fn needing(self, needs: Needs) -> Spec {
        Spec { needs, ..self }
    }

    const fn kept_secret(self) -> Spec {
        Spec { secret: true, ..self }
    }

    /// `property` and then `decides`.
    pub fn properties(&self) -> impl Iterator<Item = &'static str> {
        self.property.into_iter().chain(self.decides.iter().copied())
    }
}

/// Every parameter (Aidbox's, Java's names for the TLS extras, ours for
/// transactions), in the order the hints and docs list them. Defaults are
/// Java's (Kafka 3.8 ProducerConfig) where they differ from librdkafka's,
/// except batchSize.
pub const SPECS: &[Spec] = &[
    spec("kafkaTopic", Kind::Required { hint: "Name the Kafka topic, e.g. \"kafkaTopic\": \"orders\"." }, None),
    spec(
        "bootstrapServers",
        Kind::Required {
            hint: "List the brokers as host:port, comma-separated, e.g. \"bootstrapServers\": \"localhost:9092\".",
        },
        Some("bootstrap.servers"),
    )
    .deciding(&["metadata.broker.list"]),
    spec(
        "compressionType",
        Kind::OneOf { values: &["none", "gzip", "snappy", "lz4", "zstd"], default: "none" },
        Some("compression.type"),
    )
    .deciding(&["compression.codec"]),
    // Not Java's 16384 but librdkafka's own default: with 16 KB batches
    // librdkafka's threads took 3.5-5.2 us of CPU per ~700-byte event against
    // 0.9-1.0 with these (100-row statements delivered, see
    // docs/performance.md): the idempotent producer has at most 5 requests in
    // flight and keeps waking to find them full. Batching only what is
    // queued (linger.ms 0), it adds no latency.
    spec("batchSize", Kind::Integer { min: 0, max: INT_MAX, default: 1_000_000 }, Some("batch.size")),
    // librdkafka needs message.timeout.ms above linger.ms. A transactional
    // producer's transaction.timeout.ms is derived from it.
    spec("deliveryTimeoutMs", Kind::Integer { min: 100, max: INT_MAX, default: 120_000 }, Some("message.timeout.ms"))
        .deciding(&["delivery.timeout.ms", "transaction.timeout.ms"]),
    // Emulated by the worker; librdkafka never blocks.
    spec("maxBlockMs", Kind::Integer { min: 0, max: INT_MAX, default: 60_000 }, None)
        .deciding(&["topic.metadata.propagation.max.ms"]),
    spec(
        "maxRequestSize",
        Kind::Integer { min: 1000, max: 1_000_000_000, default: 1_048_576 },
        Some("message.max.bytes"),
    ),
    spec("requestTimeoutMs", Kind::Integer { min: 1, max: 900_000, default: 30_000 }, Some("request.timeout.ms"))
        .deciding(&["socket.timeout.ms"]),
    spec(
        "securityProtocol",
        Kind::OneOf { values: &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], default: "PLAINTEXT" },
        Some("security.protocol"),
    ),
    // Java's default, GSSAPI (Kerberos), is known but refused: not built in.
    spec(
        "saslMechanism",
        Kind::OneOf {
            values: &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM", "GSSAPI"],
            default: "GSSAPI",
        },
        Some("sasl.mechanism"),
    )
    .deciding(&["sasl.mechanisms"])
    .needing(Needs::Sasl),
    // Parsed into credentials or the worker's OAUTHBEARER tokens.
    spec("saslJaasConfig", Kind::Text, None)
        .deciding(&[
            "sasl.username",
            "sasl.password",
            "enable.sasl.oauthbearer.unsecure.jwt",
            "sasl.oauthbearer.method",
        ])
        .needing(Needs::Sasl)
        .kept_secret(),
    spec("saslClientCallbackHandlerClass", Kind::Text, None).needing(Needs::Sasl),
    spec("sslKeystoreKey", Kind::Text, Some("ssl.key.pem")).needing(Needs::Tls).kept_secret(),
    spec("sslKeystoreCertificateChain", Kind::Text, Some("ssl.certificate.pem")).needing(Needs::Tls),
    spec("sslTruststoreCertificates", Kind::Text, Some("ssl.ca.pem")).needing(Needs::Tls),
    spec("sslKeyPassword", Kind::Text, Some("ssl.key.password")).needing(Needs::Tls).kept_secret(),
    spec("transactionalId", Kind::Text, Some("transactional.id")),
];

/// The spec of a parameter the code reads by name.
pub(super) fn get(name: &str) -> &'static Spec {
    SPECS.iter().find(|s| s.name == name).unwrap_or_else(|| unreachable!("\"{name}\" is not in SPECS"))
}

/// The parameter that decides a librdkafka property, if one does.
pub(super) fn deciding(property: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.properties().any(|p| p == property))
}
