//! Faults, each test with its own cluster and broker: a broker outage beside a
//! healthy destination, a killed and a terminated worker, fast and immediate
//! shutdowns mid-stream.

use pg_outbox_test::{keys, unique, wait_for, Broker, Env};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn broker_outage_keeps_events_queued_reports_errors_and_delivers_all_after() {
    let Env { pg, mut broker } = Env::start(&unique("outage"), &["outbox.retry_max = 2000"]);
    broker.create_topic("orders", 2);
    pg.watched_table("orders", "id int PRIMARY KEY, note text");
    pg.destination("orders", "urn:orders", "orders")
        .bootstrap(&broker.bootstrap())
        .params(json!({"deliveryTimeoutMs": 5000}))
        .create();
    // A second destination of the same topic on another broker that stays up.
    let healthy = Broker::start();
    healthy.create_topic("orders", 1);
    pg.destination("mirror", "urn:orders", "orders").bootstrap(&healthy.bootstrap()).content("id-only").create();
    pg.sql("INSERT INTO orders SELECT g, 'before' FROM generate_series(1, 20) g");
    assert_eq!(keys(&broker.bootstrap(), "orders", 20), (1..=20).collect());
    wait_for("the first 20 acknowledged", WAIT, || {
        (pg.count("SELECT count(*) FROM outbox.event WHERE destination_id = 'orders'") == 0).then_some(())
    });

    broker.stop();
    // Writers are not blocked while the broker is down.
    let started = Instant::now();
    for g in 21..=60 {
        pg.sql(&format!("INSERT INTO orders VALUES ({g}, 'during')"));
    }
    let write_time = started.elapsed();
    let row = wait_for("an error in status while the broker is down", WAIT, || {
        let r = pg.status_row("orders");
        (r["last_errors"].as_array().is_some_and(|a| !a.is_empty()) && r["messages_queued"] == 40).then_some(r)
    });
    assert_eq!(row["status"], "error", "{row}");
    // The other destination is not held up by the broken one.
    assert_eq!(keys(&healthy.bootstrap(), "orders", 60), (1..=60).collect());
    // Past the delivery timeout (5 s) the attempt counts as failed; the events
    // stay in the outbox and are retried, never dropped.
    let row = wait_for("a failed delivery attempt", WAIT, || {
        let r = pg.status_row("orders");
        (r["messages_delivery_attempts"].as_i64().unwrap() >= 1).then_some(r)
    });
    assert_eq!(row["messages_queued"], 40, "{row}");
    let why = pg.sql("SELECT DISTINCT last_error FROM outbox.event WHERE attempts > 0");
    assert!(!why.is_empty(), "failed attempts are recorded on the events");
    eprintln!("outage: events failed with: {why}");
    let status = pg.sql("SELECT outbox.status('orders')");
    assert!(status.contains("lastErrorDetail"), "{status}");

    // tansu keeps topics in memory: a restarted broker starts empty.
    broker.resume();
    broker.create_topic("orders", 2);
    let got = keys(&broker.bootstrap(), "orders", 40);
    let want: BTreeSet<i64> = (21..=60).collect();
    assert!(want.is_subset(&got), "missing after the outage: {:?}", want.difference(&got).collect::<Vec<_>>());
    wait_for("the backlog to drain", WAIT, || (pg.count("SELECT count(*) FROM outbox.event") == 0).then_some(()));
    let row = wait_for("status active again", WAIT, || {
        let r = pg.status_row("orders");
        (r["status"] == "active").then_some(r)
    });
    assert!(row["messages_delivered"].as_i64().unwrap() >= 60, "{row}");
    assert!(write_time < Duration::from_secs(20), "40 single-row inserts took {write_time:?} during the outage");
    pg.stop("fast");
}

#[test]
fn killed_worker_is_restarted_and_delivers_what_was_committed() {
    let Env { pg, broker } = Env::start(&unique("crash"), &[]);
    broker.create_topic("items", 1);
    pg.watched_table("items", "id int PRIMARY KEY");
    pg.destination("items", "urn:items", "items").bootstrap(&broker.bootstrap()).content("empty").create();
    pg.sql("INSERT INTO items SELECT generate_series(1, 500)");
    // The postmaster resets the cluster after a crashed child and restarts the worker.
    let pid = pg.kill_worker();
    pg.sql("INSERT INTO items SELECT generate_series(501, 1000)");
    let got = keys(&broker.bootstrap(), "items", 1000);
    assert_eq!(got, (1..=1000).collect::<BTreeSet<i64>>());
    let new_pid = wait_for("a new worker", WAIT, || pg.worker_pid().filter(|p| *p != pid));
    assert_ne!(new_pid, pid);
    wait_for("the outbox to drain", WAIT, || (pg.count("SELECT count(*) FROM outbox.event") == 0).then_some(()));

    // A terminated worker (SIGTERM, no crash) is restarted within seconds too.
    pg.sql(&format!("SELECT pg_terminate_backend({new_pid})"));
    pg.sql("INSERT INTO items SELECT generate_series(1001, 1100)");
    let third = wait_for("the worker back after pg_terminate_backend", Duration::from_secs(20), || {
        pg.worker_pid().filter(|p| *p != new_pid)
    });
    assert_ne!(third, new_pid);
    assert_eq!(keys(&broker.bootstrap(), "items", 1100), (1..=1100).collect::<BTreeSet<i64>>());
    pg.stop("fast");
}

#[test]
fn fast_and_immediate_shutdowns_mid_stream_lose_nothing() {
    let Env { pg, broker } = Env::start(&unique("shutdown"), &[]);
    broker.create_topic("stream", 2);
    pg.watched_table("stream", "id int PRIMARY KEY");
    pg.destination("stream", "urn:stream", "stream").bootstrap(&broker.bootstrap()).content("empty").create();
    pg.sql("INSERT INTO stream SELECT generate_series(1, 3000)");
    pg.stop("fast"); // SIGTERM: the worker flushes what it can and exits
    pg.pg_ctl_start();
    pg.sql("INSERT INTO stream SELECT generate_series(3001, 6000)");
    pg.stop("immediate"); // like kill -9 of the postmaster: crash recovery
    pg.pg_ctl_start();
    let got = keys(&broker.bootstrap(), "stream", 6000);
    assert_eq!(got, (1..=6000).collect::<BTreeSet<i64>>());
    wait_for("the outbox to drain", WAIT, || (pg.count("SELECT count(*) FROM outbox.event") == 0).then_some(()));
    pg.stop("fast");
}
