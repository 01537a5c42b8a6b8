//! The escape hatch: `rdkafka.<property>` sets a librdkafka property verbatim
//! (librdkafka checks it), except one a named parameter decides, or one that
//! would weaken what the destination's kind promises.

use super::reader::type_name;
use super::spec::{self, PASSTHROUGH};
use super::{perr, set, ParamError};
use serde_json::{Map, Value};

/// Set every `rdkafka.<property>` of `obj`, in order, over what is set.
pub(super) fn apply(
    obj: &Map<String, Value>,
    dest: &str,
    best_effort: bool,
    props: &mut Vec<(String, String)>,
) -> Result<(), ParamError> {
    for (name, value) in obj {
        let Some(prop) = name.strip_prefix(PASSTHROUGH) else { continue };
        if prop.is_empty() {
            return Err(perr(
                format!("parameter \"{PASSTHROUGH}\" of destination \"{dest}\" names no property"),
                "E.g. \"rdkafka.linger.ms\": 20.",
            ));
        }
        if let Some(owner) = spec::deciding(prop) {
            return Err(perr(
                format!("parameter \"{name}\" of destination \"{dest}\" sets a property pg_outbox manages"),
                format!("Use the parameter \"{}\" instead.", owner.name),
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
        set(props, prop, text);
    }
    Ok(())
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
