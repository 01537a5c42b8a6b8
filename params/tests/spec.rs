//! The spec table is consistent, and parsing does what it says for every
//! parameter in it.

use pg_outbox_params::params::spec::{Kind, Needs, PASSTHROUGH, SPECS};
use pg_outbox_params::params::{is_secret_property, ParamError, Params};
use serde_json::{json, Value};

fn parse(extra: Value) -> Result<Params, ParamError> {
    let mut p = json!({"kafkaTopic": "orders", "bootstrapServers": "k1:9092"});
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    Params::parse("d1", false, &p)
}

#[test]
fn names_are_unique_and_no_property_is_decided_twice() {
    let mut names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
    let mut properties: Vec<&str> = SPECS.iter().flat_map(|s| s.properties()).collect();
    let (n, p) = (names.len(), properties.len());
    names.sort();
    names.dedup();
    properties.sort();
    properties.dedup();
    assert_eq!((names.len(), properties.len()), (n, p));
    assert!(names.iter().all(|n| !n.starts_with(PASSTHROUGH)));
}

#[test]
fn defaults_are_allowed_values_and_secrets_are_text() {
    for s in SPECS {
        match s.kind {
            Kind::Integer { min, max, default } => assert!(min <= default && default <= max, "{}", s.name),
            Kind::OneOf { values, default } => assert!(values.contains(&default), "{}", s.name),
            Kind::Text | Kind::Required { .. } => {}
        }
        // Messages quote only integer and enum values.
        assert!(!s.secret || s.kind == Kind::Text, "{}", s.name);
        if let (true, Some(p)) = (s.secret, s.property) {
            assert!(is_secret_property(p), "{}: {p} is not redacted", s.name);
        }
    }
}

#[test]
fn required_parameters_are_refused_when_missing() {
    for s in SPECS.iter().filter(|s| matches!(s.kind, Kind::Required { .. })) {
        let p = json!({"kafkaTopic": "orders", "bootstrapServers": "k1:9092"});
        let mut p = p.as_object().unwrap().clone();
        p.remove(s.name);
        let e = Params::parse("d1", false, &Value::Object(p)).unwrap_err();
        assert_eq!(e.message, format!("destination \"d1\" needs parameter \"{}\"", s.name));
    }
}

#[test]
fn integers_are_taken_within_their_range_and_default_to_theirs() {
    for s in SPECS {
        let Kind::Integer { min, max, default } = s.kind else { continue };
        for v in [min, max] {
            parse(json!({ s.name: v })).unwrap_or_else(|e| panic!("{}: {v}: {}", s.name, e.message));
        }
        for v in [min - 1, max + 1] {
            let e = parse(json!({ s.name: v })).unwrap_err();
            let range = format!("must be between {min} and {max}, not {v}");
            assert!(e.message.contains(&range), "{}: {}", s.name, e.message);
        }
        if let Some(p) = s.property {
            let props = parse(json!({})).unwrap().properties;
            assert!(props.contains(&(p.to_string(), default.to_string())), "{}: {p} not {default}", s.name);
        }
    }
}

#[test]
fn an_unknown_enum_value_is_refused_with_the_allowed_ones() {
    for s in SPECS {
        let Kind::OneOf { values, .. } = s.kind else { continue };
        let e = parse(json!({ s.name: "nonsense" })).unwrap_err();
        assert_eq!(e.message, format!("invalid {} \"nonsense\" for destination \"d1\"", s.name));
        assert_eq!(e.hint, format!("Use one of {}.", values.join(", ")));
    }
}

#[test]
fn parameters_that_need_a_protocol_are_refused_without_it() {
    for s in SPECS {
        let value = match s.kind {
            Kind::OneOf { values, .. } => values[0],
            _ => "x",
        };
        let result = parse(json!({ s.name: value, "securityProtocol": "PLAINTEXT" }));
        let needs = match s.needs {
            Needs::Any => continue,
            Needs::Sasl => "SASL_SSL or SASL_PLAINTEXT",
            Needs::Tls => "SSL or SASL_SSL",
        };
        let e = result.unwrap_err();
        let expected = format!("parameter \"{}\" of destination \"d1\" needs securityProtocol {needs}", s.name);
        assert_eq!(e.message, expected);
    }
}

#[test]
fn rdkafka_may_not_set_a_property_a_parameter_decides() {
    for s in SPECS {
        for p in s.properties() {
            let e = parse(json!({ format!("{PASSTHROUGH}{p}"): "1" })).unwrap_err();
            assert!(e.message.ends_with("sets a property pg_outbox manages"), "{p}: {}", e.message);
            assert_eq!(e.hint, format!("Use the parameter \"{}\" instead.", s.name), "{p}");
        }
    }
}

#[test]
fn an_unknown_name_gets_the_list_of_parameters() {
    let e = parse(json!({"lingerMs": 5})).unwrap_err();
    assert_eq!(e.message, "unknown parameter \"lingerMs\" for destination \"d1\"");
    assert_eq!(
        e.hint,
        "Parameters: kafkaTopic, bootstrapServers, compressionType, batchSize, deliveryTimeoutMs, maxBlockMs, \
         maxRequestSize, requestTimeoutMs, securityProtocol, saslMechanism, saslJaasConfig, \
         saslClientCallbackHandlerClass, sslKeystoreKey, sslKeystoreCertificateChain, sslTruststoreCertificates, \
         sslKeyPassword, transactionalId, and rdkafka.<property> for any librdkafka property."
    );
}
