//! Parameters mapped onto librdkafka properties, and refused with a reason
//! and a hint.

use base64::Engine;
use pg_outbox_params::oauth::TokenSource;
use pg_outbox_params::params::Params;
use serde_json::{json, Value};

const PLAIN: &str = "org.apache.kafka.common.security.plain.PlainLoginModule";
const SCRAM: &str = "org.apache.kafka.common.security.scram.ScramLoginModule";
const OAUTH: &str = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule";

fn parse(kind: &str, p: Value) -> Result<Params, pg_outbox_params::params::ParamError> {
    Params::parse("d1", kind == "best-effort", &p)
}

fn base(extra: Value) -> Value {
    let mut p = json!({"kafkaTopic": "orders", "bootstrapServers": "k1:9092,k2:9093"});
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

fn props(p: &Params) -> std::collections::BTreeMap<String, String> {
    p.properties.iter().cloned().collect()
}

#[test]
fn without_parameters_the_producer_has_javas_defaults() {
    // Java's defaults where librdkafka's differ.
    let p = parse("at-least-once", base(json!({}))).unwrap();
    let c = props(&p);
    for (k, v) in [
        ("bootstrap.servers", "k1:9092,k2:9093"),
        ("client.id", "pg_outbox-d1"),
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("compression.type", "none"),
        ("batch.size", "1000000"),
        ("message.timeout.ms", "120000"),
        ("message.max.bytes", "1048576"),
        ("request.timeout.ms", "30000"),
        ("socket.timeout.ms", "30000"),
        ("queue.buffering.max.kbytes", "32768"),
        ("security.protocol", "plaintext"),
        ("topic.metadata.propagation.max.ms", "60000"),
    ] {
        assert_eq!(c.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!((p.max_block_ms, p.delivery_timeout_ms, p.transactional), (60_000, 120_000, false));
    assert!(p.token.is_none());
}

#[test]
fn every_parameter_reaches_the_librdkafka_configuration() {
    // Each parameter, as valueInteger or (Java parses it) valueString.
    let p = parse(
        "at-least-once",
        base(json!({"compressionType": "ZSTD", "batchSize": "0", "deliveryTimeoutMs": 5000, "maxBlockMs": 250,
                    "maxRequestSize": 2000000, "requestTimeoutMs": 5, "transactionalId": "tx-orders",
                    "rdkafka.linger.ms": 20, "rdkafka.enable.ssl.certificate.verification": false})),
    )
    .unwrap();
    let c = props(&p);
    for (k, v) in [
        ("compression.type", "zstd"),
        ("batch.size", "1"),
        ("message.timeout.ms", "5000"),
        ("message.max.bytes", "2000000"),
        ("request.timeout.ms", "5"),
        ("socket.timeout.ms", "10"),
        ("transactional.id", "tx-orders"),
        ("transaction.timeout.ms", "60000"),
        ("linger.ms", "20"),
        ("enable.ssl.certificate.verification", "false"),
        ("topic.metadata.propagation.max.ms", "250"),
    ] {
        assert_eq!(c.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!((p.max_block_ms, p.transactional), (250, true));
    // A transactional producer's socket timeout stays within transaction.timeout.ms + 100.
    let p = parse("at-least-once", base(json!({"transactionalId": "t", "requestTimeoutMs": 300_000}))).unwrap();
    assert_eq!(
        (props(&p)["transaction.timeout.ms"].as_str(), props(&p)["socket.timeout.ms"].as_str()),
        ("120000", "120100")
    );
    // Best-effort may trade acknowledgements for speed; empty server entries are skipped, as Java does.
    let p = parse("best-effort", base(json!({"rdkafka.acks": 1, "bootstrapServers": " k1:9092, ,k2:9093,"}))).unwrap();
    assert_eq!((props(&p)["acks"].as_str(), props(&p)["bootstrap.servers"].as_str()), ("1", "k1:9092,k2:9093"));
}

#[test]
fn sasl_credentials_become_librdkafka_properties_shown_redacted() {
    // SASL/SCRAM over TLS: the JAAS credentials become sasl.username/password.
    let jaas = format!(r#"{SCRAM} required username="alice" password="hunter2";"#);
    let p = parse(
        "at-least-once",
        base(json!({"securityProtocol": "sasl_ssl", "saslMechanism": "scram-sha-512", "saslJaasConfig": jaas})),
    )
    .unwrap();
    let c = props(&p);
    assert_eq!(c["security.protocol"], "sasl_ssl");
    assert_eq!(c["sasl.mechanism"], "SCRAM-SHA-512");
    assert_eq!((c["sasl.username"].as_str(), c["sasl.password"].as_str()), ("alice", "hunter2"));
    assert_eq!(c["ssl.ca.location"], "probe");
    let shown = p.effective();
    assert_eq!(shown["sasl.password"], "[redacted]");
    assert_eq!(shown["sasl.username"], "alice");
    assert!(!shown.to_string().contains("hunter2"));
    assert_eq!(p.redact("bad value \"hunter2\" given"), "bad value \"[redacted]\" given");

    let plain = format!(r#"{PLAIN} required username="u" password="p";"#);
    let p = parse(
        "best-effort",
        base(json!({"securityProtocol": "SASL_PLAINTEXT", "saslMechanism": "PLAIN", "saslJaasConfig": plain})),
    )
    .unwrap();
    assert_eq!(props(&p)["sasl.mechanism"], "PLAIN");
    assert!(!props(&p).contains_key("ssl.ca.location"));
}

#[test]
fn msk_iam_takes_its_region_from_the_broker_names() {
    // AWS MSK IAM, as Aidbox's documentation writes it.
    let msk = base(json!({
        "bootstrapServers": "b-1.demo.abc.c2.kafka.eu-west-1.amazonaws.com:9098,b-2.demo.abc.c2.kafka.eu-west-1.amazonaws.com:9098",
        "securityProtocol": "SASL_SSL", "saslMechanism": "AWS_MSK_IAM",
        "saslJaasConfig": "software.amazon.msk.auth.iam.IAMLoginModule required;",
        "saslClientCallbackHandlerClass": "software.amazon.msk.auth.iam.IAMClientCallbackHandler"}));
    let p = parse("best-effort", msk).unwrap();
    assert_eq!(props(&p)["sasl.mechanism"], "OAUTHBEARER");
    assert_eq!(p.token, Some(TokenSource::MskIam { region: "eu-west-1".into(), profile: None }));
    assert_eq!(p.effective()["pg_outbox.oauthbearer.token"], "aws-msk-iam region=eu-west-1");
    // The same through OAUTHBEARER and the IAM handler, with a profile.
    let p = parse(
        "at-least-once",
        base(json!({"bootstrapServers": "b-1.x.kafka.us-east-2.amazonaws.com:9098", "securityProtocol": "SASL_SSL",
                    "saslMechanism": "OAUTHBEARER",
                    "saslJaasConfig": format!(r#"{OAUTH} required awsProfileName="prod";"#),
                    "saslClientCallbackHandlerClass": "software.amazon.msk.auth.iam.IAMOAuthBearerLoginCallbackHandler"})),
    )
    .unwrap();
    assert_eq!(p.token, Some(TokenSource::MskIam { region: "us-east-2".into(), profile: Some("prod".into()) }));
}

#[test]
fn unsecured_jwts_carry_the_claims_of_the_jaas_options() {
    // Kafka's unsecured JWT.
    let unsecured = format!(
        r#"{OAUTH} required unsecuredLoginStringClaim_sub="svc" unsecuredLoginNumberClaim_level="3" unsecuredLoginListClaim_scope=",read,write" unsecuredLoginLifetimeSeconds="60";"#
    );
    let p = parse(
        "at-least-once",
        base(
            json!({"securityProtocol": "SASL_PLAINTEXT", "saslMechanism": "OAUTHBEARER", "saslJaasConfig": unsecured}),
        ),
    )
    .unwrap();
    let Some(TokenSource::Unsecured(u)) = &p.token else { panic!("{:?}", p.token) };
    let t = u.token(1000).unwrap();
    assert_eq!((t.principal.as_str(), t.expires_ms), ("svc", 1_060_000));
    let parts: Vec<&str> = t.value.split('.').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[2], "");
    let decode = |s: &str| -> Value {
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap()
    };
    assert_eq!(decode(parts[0]), json!({"alg": "none"}));
    assert_eq!(
        decode(parts[1]),
        json!({"iat": 1000, "exp": 1060, "sub": "svc", "level": 3, "scope": ["read", "write"]})
    );
}

#[test]
fn tls_material_maps_onto_pem_properties() {
    let key = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----";
    let cert = "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----";
    let ca = "-----BEGIN CERTIFICATE-----\nMIIA\n-----END CERTIFICATE-----";
    // Key and chain in one value, as Java's PEM keystore takes them.
    let p = parse(
        "at-least-once",
        base(json!({"securityProtocol": "SSL", "sslKeystoreKey": format!("{key}\n{cert}\n"), "sslTruststoreCertificates": ca})),
    )
    .unwrap();
    let c = props(&p);
    assert_eq!(
        (c["ssl.key.pem"].as_str(), c["ssl.certificate.pem"].as_str(), c["ssl.ca.pem"].as_str()),
        (key, cert, ca)
    );
    assert!(!c.contains_key("ssl.ca.location"));
    assert_eq!(p.effective()["ssl.key.pem"], "[redacted]");
    // Apart, with an encrypted key and its password.
    let enc = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----";
    let p = parse(
        "at-least-once",
        base(json!({"securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN",
                    "saslJaasConfig": format!(r#"{PLAIN} required username="u" password="p";"#),
                    "sslKeystoreKey": enc, "sslKeystoreCertificateChain": cert, "sslKeyPassword": "pw"})),
    )
    .unwrap();
    let c = props(&p);
    assert_eq!(
        (c["ssl.key.pem"].as_str(), c["ssl.certificate.pem"].as_str(), c["ssl.key.password"].as_str()),
        (enc, cert, "pw")
    );
    assert_eq!(p.effective()["ssl.key.password"], "[redacted]");
}

#[test]
fn wrong_parameters_are_refused_with_a_reason_and_a_hint() {
    let plain = format!(r#"{PLAIN} required username="u" password="hunter2";"#);
    let key = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----";
    // (kind, parameters added to the base, unsupported (0A000)?, message)
    let cases: Vec<(&str, Value, bool, &str)> = vec![
        ("at-least-once", json!({"kafkaTopic": 5}), false, "parameter \"kafkaTopic\" of destination \"d1\" must be a string, not a number"),
        ("at-least-once", json!({"kafkaTopic": "a b"}), false, "invalid Kafka topic name"),
        ("at-least-once", json!({"bootstrapServers": "k1"}), false, "invalid bootstrapServers"),
        ("at-least-once", json!({"batchSize": "lots"}), false, "parameter \"batchSize\" of destination \"d1\" must be an integer, not a string"),
        ("at-least-once", json!({"batchSize": true}), false, "must be an integer, not a boolean"),
        ("at-least-once", json!({"batchSize": -1}), false, "must be between 0 and 2147483647, not -1"),
        ("at-least-once", json!({"deliveryTimeoutMs": 50}), false, "must be between 100"),
        ("at-least-once", json!({"maxBlockMs": 1.5}), false, "\"maxBlockMs\" of destination \"d1\" must be an integer"),
        ("at-least-once", json!({"maxRequestSize": 999}), false, "must be between 1000"),
        ("at-least-once", json!({"requestTimeoutMs": 0}), false, "must be between 1"),
        ("at-least-once", json!({"compressionType": "brotli"}), false, "invalid compressionType \"brotli\""),
        ("at-least-once", json!({"securityProtocol": "TLS"}), false, "invalid securityProtocol \"TLS\""),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "KERBEROS"}), false, "invalid saslMechanism"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL"}), true, "saslMechanism GSSAPI (Kerberos)"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "GSSAPI"}), true, "saslMechanism GSSAPI"),
        ("at-least-once", json!({"saslMechanism": "PLAIN", "saslJaasConfig": plain}), false, "needs securityProtocol SASL_SSL or SASL_PLAINTEXT"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN"}), false, "has no saslJaasConfig"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-256", "saslJaasConfig": plain}), false, "uses login module org.apache.kafka.common.security.plain.PlainLoginModule but saslMechanism SCRAM-SHA-256 needs"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN", "saslJaasConfig": format!("{PLAIN} required username=\"u\";")}), false, "needs both username and password"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN", "saslJaasConfig": format!("{PLAIN} required username=\"u\" password=\"hunter2\" realm=\"x\";")}), false, "unknown option (name not shown"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "PLAIN", "saslJaasConfig": format!("{PLAIN} required username=\"u\" password=\"hunter2\"")}), false, "invalid saslJaasConfig for destination \"d1\": JAAS config entry not terminated"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-256", "saslJaasConfig": format!("{SCRAM} required username=\"u\" password=\"hunter2\" tokenauth=\"true\";")}), true, "SCRAM delegation tokens"),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER", "saslJaasConfig": format!("{OAUTH} required clientId=\"c\" clientSecret=\"hunter2\";")}), true, "saslJaasConfig option \"clientId\""),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER", "saslJaasConfig": format!("{OAUTH} required unsecuredLoginStringClaim_iss=\"x\";")}), false, "no string claim \"sub\""),
        ("at-least-once", json!({"securityProtocol": "SASL_SSL", "saslMechanism": "AWS_MSK_IAM", "saslClientCallbackHandlerClass": "com.example.Handler"}), true, "saslClientCallbackHandlerClass \"com.example.Handler\""),
        ("at-least-once", json!({"bootstrapServers": "b-1.x.kafka.us-east-1.amazonaws.com:9098", "securityProtocol": "SASL_SSL", "saslMechanism": "AWS_MSK_IAM", "saslJaasConfig": "software.amazon.msk.auth.iam.IAMLoginModule required awsRoleArn=\"arn:aws:iam::1:role/x\";"}), true, "saslJaasConfig option \"awsRoleArn\""),
        ("at-least-once", json!({"bootstrapServers": "b-1.x.kafka.us-east-1.amazonaws.com:9098", "securityProtocol": "SASL_SSL", "saslMechanism": "AWS_MSK_IAM", "saslJaasConfig": plain}), false, "needs software.amazon.msk.auth.iam.IAMLoginModule"),
        ("at-least-once", json!({"sslTruststoreCertificates": "x"}), false, "needs securityProtocol SSL or SASL_SSL"),
        ("at-least-once", json!({"securityProtocol": "SSL", "sslTruststoreCertificates": "not pem"}), false, "must hold PEM certificates"),
        ("at-least-once", json!({"securityProtocol": "SSL", "sslKeystoreKey": "-----BEGIN RSA PRIVATE KEY-----\nx\n-----END RSA PRIVATE KEY-----"}), false, "is a RSA PRIVATE KEY, not PKCS#8"),
        ("at-least-once", json!({"securityProtocol": "SSL", "sslKeystoreKey": key}), false, "has no certificate chain"),
        ("at-least-once", json!({"securityProtocol": "SSL", "sslKeystoreKey": "-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n-----END ENCRYPTED PRIVATE KEY-----"}), false, "sslKeyPassword is missing"),
        ("at-least-once", json!({"securityProtocol": "SSL", "sslKeyPassword": "hunter2"}), false, "sslKeyPassword of destination \"d1\" has no sslKeystoreKey"),
        ("best-effort", json!({"transactionalId": "t"}), false, "transactionalId is for kafka-at-least-once"),
        ("at-least-once", json!({"transactionalId": " "}), false, "\"transactionalId\" of destination \"d1\" is empty"),
        ("at-least-once", json!({"rdkafka.bootstrap.servers": "x:1"}), false, "sets a property pg_outbox manages"),
        ("at-least-once", json!({"rdkafka.sasl.password": "hunter2"}), false, "sets a property pg_outbox manages"),
        ("at-least-once", json!({"rdkafka.linger.ms": [1]}), false, "must be a string, number or boolean, not an array"),
        ("at-least-once", json!({"batchsize": 1}), false, "unknown parameter \"batchsize\""),
        ("at-least-once", json!({"rdkafka.acks": 1}), false, "at-least-once needs acks=all"),
        ("at-least-once", json!({"rdkafka.request.required.acks": "0"}), false, "at-least-once needs acks=all"),
        ("at-least-once", json!({"rdkafka.enable.idempotence": false}), false, "turn off idempotence"),
        ("best-effort", json!({"rdkafka.delivery.report.only.error": true}), false, "suppress the delivery reports"),
        ("at-least-once", json!({"rdkafka.socket.timeout.ms": 5000}), false, "sets a property pg_outbox manages"),
        ("at-least-once", json!({"rdkafka.topic.metadata.propagation.max.ms": 5}), false, "sets a property pg_outbox manages"),
        ("at-least-once", json!({"transactionalId": "t", "deliveryTimeoutMs": 1_000_000}), false, "is too long for a transactional producer"),
    ];
    for (kind, extra, unsupported, message) in cases {
        let e = parse(kind, base(extra.clone())).expect_err(&extra.to_string());
        assert!(e.message.contains(message), "{extra}: {}", e.message);
        assert_eq!(e.unsupported, unsupported, "{extra}: {}", e.message);
        assert!(!e.hint.is_empty(), "{extra}: no hint");
        assert!(
            !e.message.contains("hunter2") && !e.hint.contains("hunter2"),
            "{extra}: shows a secret: {}",
            e.message
        );
    }
}

#[test]
fn a_wrongly_cased_parameter_name_gets_a_did_you_mean() {
    let e = parse("at-least-once", base(json!({"batchsize": 1}))).unwrap_err();
    assert!(e.hint.contains("Did you mean \"batchSize\""), "{}", e.hint);
}

#[test]
fn aidbox_parameter_arrays_are_read_with_their_value_types() {
    let arr = json!([
        {"name": "kafkaTopic", "valueString": "orders"},
        {"name": "bootstrapServers", "valueString": "k:9092"},
        {"name": "batchSize", "valueInteger": 100},
        {"name": "deliveryTimeoutMs", "valueString": "5000"}
    ]);
    let p = Params::parse("d1", false, &arr).unwrap();
    assert_eq!((props(&p)["batch.size"].as_str(), p.delivery_timeout_ms), ("100", 5000));
    for (bad, message) in [
        (json!([{"name": "kafkaTopic", "valueInteger": "x"}]), "valueInteger has the wrong JSON type"),
        (
            json!([{"name": "kafkaTopic", "valueInteger": 5}, {"name": "bootstrapServers", "valueString": "k:1"}]),
            "must be a string, not a number",
        ),
        (json!([{"name": "kafkaTopic"}]), "needs exactly one of valueString or valueInteger"),
        (json!([{"name": "kafkaTopic", "valueString": "a", "valueInteger": 1}]), "needs exactly one"),
        (json!([{"valueString": "a"}]), "needs a string \"name\""),
        (
            json!([{"name": "kafkaTopic", "valueString": "a"}, {"name": "kafkaTopic", "valueString": "b"}]),
            "is given twice",
        ),
        (json!("x"), "must be a JSON object"),
    ] {
        let e = Params::parse("d1", false, &bad).expect_err(&bad.to_string());
        assert!(e.message.contains(message), "{bad}: {}", e.message);
    }
}
