//! Trace context: a writer's `outbox.traceparent` (W3C) arrives as the
//! Kafka header `traceparent` on the events of its changes, for both kinds;
//! invalid values are refused when set.

use pg_outbox_test::{by_event_number, consume, unique, unique_id, wait_for, Env, Received};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const T1: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const T2: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const T3: &str = "00-11111111111111111111111111111111-2222222222222222-00";

/// (key, interaction, traceparent header) of each message, in event order.
fn traces(msgs: Vec<Received>) -> Vec<(String, String, Option<String>)> {
    by_event_number(msgs)
        .iter()
        .map(|m| {
            let h = |n: &str| m.header(n).map(str::to_string);
            (m.key.clone().unwrap_or_default(), h("interaction").unwrap_or_default(), h("traceparent"))
        })
        .collect()
}

#[test]
fn the_writers_traceparent_arrives_as_a_kafka_header_for_both_kinds() {
    let Env { pg, broker } = Env::start(&unique("trace"), &[]);
    let url = pg.watched_table("orders", "id int PRIMARY KEY, v int");
    let (alo, alo_topic) = pg.destination_on(&broker, &url).create();
    let (_be, be_topic) = pg.destination_on(&broker, &url).best_effort().create();
    let mut s = pg.session();
    s.sql("INSERT INTO orders VALUES (1, 0)");
    s.sql(&format!("SET outbox.traceparent = '{T1}'"));
    s.sql("INSERT INTO orders VALUES (2, 0)");
    // SET LOCAL per statement: a group (three rows of one statement) shares
    // its statement's context; the session's comes back after COMMIT.
    s.sql("BEGIN");
    s.sql(&format!("SET LOCAL outbox.traceparent = '{T2}'"));
    s.sql("INSERT INTO orders SELECT g, 0 FROM generate_series(3, 5) g");
    s.sql(&format!("SET LOCAL outbox.traceparent = '{T3}'"));
    s.sql("UPDATE orders SET v = 1 WHERE id = 1");
    s.sql("COMMIT");
    s.sql("DELETE FROM orders WHERE id = 2");
    s.sql("RESET outbox.traceparent");
    s.sql("INSERT INTO orders VALUES (6, 0)");
    let t = |v: &str| Some(v.to_string());
    let expected = vec![
        ("1".to_string(), "create".to_string(), None),
        ("2".into(), "create".into(), t(T1)),
        ("3".into(), "create".into(), t(T2)),
        ("4".into(), "create".into(), t(T2)),
        ("5".into(), "create".into(), t(T2)),
        ("1".into(), "update".into(), t(T3)),
        ("2".into(), "delete".into(), t(T1)),
        ("6".into(), "create".into(), None),
    ];
    for topic in [&alo_topic, &be_topic] {
        let got = traces(consume(&broker.bootstrap(), topic, 8, WAIT, Duration::from_millis(700)));
        assert_eq!(got, expected, "topic {topic}");
    }
    pg.wait_drained(&alo, WAIT);
}

#[test]
fn an_invalid_traceparent_is_refused_when_set() {
    let Env { pg, .. } = Env::start(&unique("trace_err"), &[]);
    for bad in [
        "nope",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ] {
        let err = pg.sql_err(&format!("SET outbox.traceparent = '{bad}'"));
        assert_eq!(err.sqlstate, "22023", "{bad}: {}", err.raw);
        assert!(err.message.contains("outbox.traceparent"), "{bad}: {}", err.raw);
        assert!(err.hint.as_deref().is_some_and(|h| h.contains("00-")), "{bad}: {}", err.raw);
    }
    // Valid: version 00, and a later version with more fields.
    pg.sql(&format!("SET outbox.traceparent = '{T1}'"));
    pg.sql("SET outbox.traceparent = 'cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes'");
    pg.sql("SET outbox.traceparent = ''");
}

#[test]
fn a_dead_letter_keeps_its_trace_context_and_takes_it_back_out() {
    let Env { pg, broker } = Env::start(&unique("trace_dead"), &[]);
    let url = pg.watched_table("docs", "id int PRIMARY KEY, body text");
    let topic = broker.new_topic("dead", 1);
    let dest = unique_id("d");
    pg.destination(&dest, &url, &topic).bootstrap(&broker.bootstrap()).params(json!({"maxRequestSize": 1000})).create();
    let mut s = pg.session();
    s.sql(&format!("SET outbox.traceparent = '{T1}'"));
    // One statement, one group: split when its middle event is refused.
    s.sql("INSERT INTO docs VALUES (1, 'small'), (2, repeat('x', 5000)), (3, 'small')");
    let t1 = Some(T1.to_string());
    let first = traces(consume(&broker.bootstrap(), &topic, 2, WAIT, Duration::from_secs(1)));
    assert_eq!(first, [("1".to_string(), "create".to_string(), t1.clone()), ("3".into(), "create".into(), t1.clone())]);
    let dead = wait_for("the dead letter", WAIT, || {
        let t = pg.sql("SELECT traceparent FROM outbox.dead_letter WHERE key = '2'");
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(dead, T1);
    // Put back by a session without a trace context of its own.
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', '{{\"maxRequestSize\": 1048576}}')"));
    assert_eq!(pg.count(&format!("SELECT outbox.retry_dead_letters('{dest}')")), 1);
    let all = traces(consume(&broker.bootstrap(), &topic, 3, WAIT, Duration::from_secs(1)));
    assert!(all.contains(&("2".into(), "create".into(), t1)), "{all:?}");
    assert_eq!(all.len(), 3, "{all:?}");
}
