//! The Kafka message of an event: its value (Aidbox's notification Bundle,
//! written straight into a reused buffer) and its key and headers, produced
//! with one librdkafka call.

use super::KafkaProducer;
use crate::types::{Content, Event};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;

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
fn display_table(table: &str) -> &str {
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
    entry(out, target, ev, &full_url, method, &url);
    out.extend_from_slice(b"]}");
}

/// The bundle's second entry, as the destination's content asks: the
/// resource with its fullUrl (FHIR tables) and request, only the fullUrl and
/// request (id-only), or nothing (empty).
fn entry(out: &mut Vec<u8>, target: &Target<'_>, ev: &Event, full_url: &[&str], method: &str, url: &[&str]) {
    let request = |out: &mut Vec<u8>| {
        out.extend_from_slice(br#","request":{"method":"#);
        push_json_str(out, &[method]);
        out.extend_from_slice(br#","url":"#);
        push_json_str(out, url);
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
                push_json_str(out, full_url);
            }
            request(out);
            out.push(b'}');
        }
        Content::IdOnly => {
            out.extend_from_slice(br#",{"fullUrl":"#);
            push_json_str(out, full_url);
            request(out);
            out.push(b'}');
        }
        Content::Empty => {}
    }
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
        traceparent: ev.traceparent.as_deref().map(str::as_bytes),
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
    /// W3C trace context, the header `traceparent` (if the writer set one).
    pub traceparent: Option<&'a [u8]>,
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
        // The trace context and the key, if there are (END ends the list).
        rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_END, u: U { i: 0 } },
        rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_END, u: U { i: 0 } },
    ];
    let mut count = 9;
    if let Some(t) = m.traceparent {
        vus[count] = header(c"traceparent", t);
        count += 1;
    }
    if let Some(k) = m.key {
        vus[count] = rd_kafka_vu_t { vtype: V::RD_KAFKA_VTYPE_KEY, u: mem(k) };
        count += 1;
    }
    let error = unsafe { rdkafka::bindings::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), count) };
    if error.is_null() {
        return Ok(());
    }
    let code = unsafe { rdkafka::bindings::rd_kafka_error_code(error) };
    unsafe { rdkafka::bindings::rd_kafka_error_destroy(error) };
    Err(KafkaError::MessageProduction(code.into()))
}
