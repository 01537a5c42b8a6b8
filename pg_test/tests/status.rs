//! The destinations' status: outbox.destination_status and outbox.status()
//! (Aidbox's $status) counting deliveries, latency from the change's
//! transaction start, and the status after a transient client error. The
//! tests share one cluster and broker; a test that stops a broker brings its own.

use pg_outbox_test::{by_event_number, consume, unique, wait_for, Broker, Env, Received};
use serde_json::json;
use std::sync::OnceLock;
use std::time::Duration;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("status", &[]))
}

const WAIT: Duration = Duration::from_secs(60);

/// What arrived in `kafka_topic`, at least `n` messages, in event-number order.
fn arrived(broker: &Broker, kafka_topic: &str, n: usize) -> Vec<Received> {
    by_event_number(consume(&broker.bootstrap(), kafka_topic, n, WAIT, Duration::from_millis(1500)))
}

#[test]
fn status_counts_deliveries_and_empties_the_queue() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    pg.sql(&format!("INSERT INTO {} SELECT generate_series(1, 250)", s.table));
    let keys: std::collections::BTreeSet<i64> =
        s.received(250, WAIT).iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(keys, (1..=250).collect());
    pg.wait_drained(&s.dest, WAIT);
    let row = wait_for("delivered = 250", WAIT, || {
        let r = pg.status_row(&s.dest);
        (r["messages_delivered"] == 250).then_some(r)
    });
    assert_eq!(row["status"], "active");
    assert_eq!(row["messages_queued"], 0);
    assert_eq!(row["messages_in_process"], 0);
    assert_eq!(row["messages_delivery_attempts"], 0);
    assert_eq!(row["topic"], s.url.as_str());
    let status: serde_json::Value =
        serde_json::from_str(&pg.sql(&format!("SELECT outbox.status('{}')", s.dest))).unwrap();
    // Aidbox's at-least-once $status: these parameters, in this order, with these value types.
    let started = status["parameter"][4]["valueDateTime"].as_str().unwrap().to_string();
    assert_eq!(
        status,
        serde_json::json!({"resourceType": "Parameters", "parameter": [
            {"name": "messagesDelivered", "valueDecimal": 250},
            {"name": "messagesDeliveryAttempts", "valueDecimal": 0},
            {"name": "messagesInProcess", "valueDecimal": 0},
            {"name": "messagesQueued", "valueDecimal": 0},
            {"name": "startTimestamp", "valueDateTime": started},
            {"name": "status", "valueString": "active"}]})
    );
    assert!(pg_outbox_test::is_fhir_instant_seconds(&started), "{started}");
}

#[test]
fn status_reports_latency_from_the_change_s_transaction_start_without_commit_timestamps() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    let row = pg.status_row(&s.dest);
    assert!(row["latency_p50_ms"].is_null() && row["latency_max_ms"].is_null(), "nothing delivered yet: {row}");
    let ms = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    // Latency is published within 200 ms of a delivery: wait for what the
    // deliveries so far must show (a timeout is a failure), then check.
    let delivered = |n: i64, shows: &dyn Fn(&serde_json::Value) -> bool| {
        wait_for(&format!("{n} delivered"), WAIT, || {
            let r = pg.status_row(&s.dest);
            (r["messages_delivered"] == n && r["messages_in_process"] == 0).then_some(r)
        });
        wait_for(&format!("the latency of {n} deliveries"), WAIT, || {
            let r = pg.status_row(&s.dest);
            shows(&r).then_some(r)
        })
    };
    // The first event also waits for the producer to connect.
    pg.sql(&format!("INSERT INTO {} VALUES (0)", s.table));
    let warm = delivered(1, &|r| r["latency_max_ms"].as_f64().is_some());
    assert!(ms(&warm, "latency_max_ms") < 3000.0, "the first delivery took that long: {warm}");
    // A change whose transaction commits 3 s after it began (this cluster
    // does not record commit times: latency counts from the transaction start).
    pg.sql(&format!("BEGIN; INSERT INTO {} VALUES (1); SELECT pg_sleep(3); COMMIT", s.table));
    let row = delivered(2, &|r| r["latency_max_ms"].as_f64().is_some_and(|m| m >= 3000.0));
    assert!(ms(&row, "latency_max_ms") < 30_000.0, "{row}");
    // 200 quick ones: the percentiles move down, the slow one stays the maximum.
    pg.sql(&format!("INSERT INTO {} SELECT generate_series(2, 201)", s.table));
    s.received(202, WAIT);
    let row = delivered(202, &|r| r["latency_p99_ms"].as_f64().is_some_and(|m| m < 3000.0));
    assert!(ms(&row, "latency_p50_ms") < 3000.0, "{row}");
    assert!(ms(&row, "latency_max_ms") >= 3000.0, "{row}");
}

#[test]
fn status_is_active_after_a_transient_client_error_once_nothing_waits() {
    let e = env();
    let pg = &e.pg;
    let mut broker = Broker::start();
    let t = unique("st");
    let url = format!("urn:{t}");
    pg.watched_table(&t, "id int PRIMARY KEY");
    // The restarted broker has lost the producer's idempotence state: librdkafka
    // retries until the delivery timeout, then the worker replaces the producer.
    let (dest, kafka_topic) =
        pg.destination_on(&broker, &url).content("empty").params(json!({"deliveryTimeoutMs": 3000})).create();
    pg.sql(&format!("INSERT INTO {t} SELECT generate_series(1, 5)"));
    arrived(&broker, &kafka_topic, 5);
    pg.wait_drained(&dest, WAIT);
    // The broker goes away while nothing is to be sent: the client reports it...
    broker.stop();
    let row = wait_for("a client error in status", WAIT, || {
        let r = pg.status_row(&dest);
        r["last_errors"].as_array().is_some_and(|a| !a.is_empty()).then_some(r)
    });
    // ...and the destination, which has nothing waiting, is not in error.
    assert_eq!(row["status"], "active", "{row}");
    assert_eq!(row["messages_in_process"], 0, "{row}");
    // With events to send it is, and a failed attempt stays an error until a
    // delivery succeeds: later client errors (a new producer failing to
    // connect) do not hide it, also while nothing is in process.
    pg.sql(&format!("INSERT INTO {t} SELECT generate_series(6, 10)"));
    wait_for("status error with events in process", WAIT, || (pg.status_row(&dest)["status"] == "error").then_some(()));
    wait_for("a failed attempt", WAIT, || {
        (pg.status_row(&dest)["messages_delivery_attempts"].as_i64() >= Some(1)).then_some(())
    });
    // Deliberately 4 s of polling: the status must not leave 'error' meanwhile.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        let r = pg.status_row(&dest);
        assert_eq!(r["status"], "error", "{r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    broker.resume();
    broker.create_topic(&kafka_topic, 1);
    let row = wait_for("10 delivered", WAIT, || {
        let r = pg.status_row(&dest);
        (r["messages_delivered"] == 10).then_some(r)
    });
    assert_eq!(row["status"], "active", "{row}");
    assert_eq!(arrived(&broker, &kafka_topic, 5).len(), 5);
}
