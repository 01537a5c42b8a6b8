//! Guarantees under crashes, outages, poison events, bad configuration, worker
//! faults, concurrency and random interleavings. Each scenario writes numbered
//! rows, reads the Kafka topic from the beginning and compares it with what
//! committed: missing (must be 0 for at-least-once), duplicates (counted, and
//! they carry the same event number), uncommitted (must be 0). Figures are
//! printed as `guarantees: ...` lines (the README's Guarantees section).
//!
//! `PG_OUTBOX_LONG=1` runs the long versions (30 s outage, more rows).

use pg_outbox_test::{consume, unique, wait_for, Broker, Cluster, Received};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

fn long() -> bool {
    std::env::var("PG_OUTBOX_LONG").is_ok_and(|v| v == "1")
}

/// What arrived compared with what committed.
#[derive(Debug)]
struct Tally {
    committed: usize,
    delivered: usize,
    duplicates: usize,
    missing: Vec<i64>,
    uncommitted: Vec<i64>,
    duplicate_numbers_differ: usize,
}

fn tally(committed: &BTreeSet<i64>, msgs: &[Received]) -> Tally {
    let mut seen: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    let mut duplicates = 0;
    for m in msgs {
        let key: i64 = m.key.as_deref().unwrap().parse().unwrap();
        let number = m.header("event-number").unwrap().to_string();
        let entry = seen.entry(key).or_default();
        if !entry.is_empty() {
            duplicates += 1;
        }
        entry.insert(number);
    }
    Tally {
        committed: committed.len(),
        delivered: seen.len(),
        duplicates,
        missing: committed.iter().filter(|k| !seen.contains_key(k)).copied().collect(),
        uncommitted: seen.keys().filter(|k| !committed.contains(k)).copied().collect(),
        duplicate_numbers_differ: seen.values().filter(|n| n.len() > 1).count(),
    }
}

fn report(scenario: &str, t: &Tally) {
    eprintln!(
        "guarantees: {scenario}: written {} delivered {} duplicates {} missing {} uncommitted {}",
        t.committed,
        t.delivered,
        t.duplicates,
        t.missing.len(),
        t.uncommitted.len()
    );
}

fn assert_at_least_once(scenario: &str, t: &Tally) {
    report(scenario, t);
    assert!(t.missing.is_empty(), "{scenario}: committed but never delivered: {:?}", t.missing);
    assert!(t.uncommitted.is_empty(), "{scenario}: delivered but never committed: {:?}", t.uncommitted);
    assert_eq!(t.duplicate_numbers_differ, 0, "{scenario}: a duplicate carried another event number");
}

/// The keys committed in a table.
fn committed(pg: &Cluster, table: &str) -> BTreeSet<i64> {
    let s = pg.sql(&format!("SELECT coalesce(string_agg(id::text, ','), '') FROM {table}"));
    s.split(',').filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect()
}

fn install(pg: &Cluster, broker: &Broker, name: &str, kind: &str, extra: &str) {
    pg.sql(&format!(
        "SELECT outbox.create_destination('{name}', 'urn:stream', '{kind}', \
         '{{\"kafkaTopic\": \"{name}\", \"bootstrapServers\": \"{}\"{extra}}}', 'empty')",
        broker.bootstrap()
    ));
}

fn setup(name: &str, conf: &[&str]) -> (Broker, Cluster) {
    let broker = Broker::start();
    let pg = Cluster::start(&unique(name), conf);
    pg.sql("CREATE EXTENSION pg_outbox");
    pg.sql("CREATE TABLE stream (id bigint PRIMARY KEY, pad text)");
    pg.sql("SELECT outbox.create_topic('urn:stream', '[{\"table\": \"stream\"}]')");
    (broker, pg)
}

/// Writers inserting disjoint numbered rows, one transaction each, until told
/// to stop. A failed connection (a crash) is retried; what committed is read
/// back from the table afterwards.
struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

fn start_writers(pg: &Cluster, n: usize) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..n)
        .map(|w| {
            let stop = stop.clone();
            let (dir, port) = (pg.dir.clone(), pg.port);
            std::thread::spawn(move || {
                let pg = Cluster::attach(dir, port);
                let mut next = (w as i64 + 1) * 10_000_000;
                while !stop.load(Ordering::SeqCst) {
                    // 20 single-row transactions per round trip.
                    let sql = format!(
                        "DO $$ BEGIN FOR i IN {next}..{} LOOP \
                           INSERT INTO stream VALUES (i, 'x'); COMMIT; END LOOP; END $$",
                        next + 19
                    );
                    if pg.try_sql(&sql).is_err() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    next += 20;
                }
                std::mem::forget(pg); // not ours to stop
            })
        })
        .collect();
    Writers { stop, handles }
}

impl Writers {
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn drained(pg: &Cluster) {
    wait_for("the outbox to drain", WAIT, || {
        (pg.try_sql("SELECT count(*) FROM outbox.event").ok()?.trim() == "0").then_some(())
    });
}

#[test]
fn crash_of_postmaster_and_of_worker_during_a_stream_loses_nothing() {
    let (broker, pg) = setup("g_crash", &[]);
    broker.create_topic("alo", 4);
    install(&pg, &broker, "alo", "kafka-at-least-once", "");
    let writers = start_writers(&pg, 4);
    std::thread::sleep(Duration::from_secs(3));

    // Only the worker: the postmaster resets the cluster and restarts it.
    let worker = wait_for("the worker", WAIT, || pg.worker_pid());
    std::process::Command::new("kill").args(["-9", &worker.to_string()]).status().unwrap();
    std::thread::sleep(Duration::from_secs(3));

    // The postmaster itself, and every process it had: a power cut.
    pg.kill_hard();
    pg.pg_ctl_start();
    std::thread::sleep(Duration::from_secs(3));
    writers.stop();
    drained(&pg);

    let want = committed(&pg, "stream");
    assert!(want.len() > 100, "the stream wrote only {} rows", want.len());
    let msgs = consume(&broker.bootstrap(), "alo", want.len(), WAIT, Duration::from_secs(2));
    let t = tally(&want, &msgs);
    assert_at_least_once("crash (kill -9 worker, then postmaster)", &t);
    pg.stop("fast");
}

#[test]
fn broker_outage_during_a_stream_drains_the_backlog_and_writers_keep_going() {
    let outage = Duration::from_secs(if long() { 30 } else { 10 });
    let (broker, pg) = setup("g_outage", &["outbox.retry_max = 2000"]);
    broker.create_topic("alo", 2);
    install(&pg, &broker, "alo", "kafka-at-least-once", r#", "deliveryTimeoutMs": 4000, "requestTimeoutMs": 2000"#);
    let writers = start_writers(&pg, 2);
    std::thread::sleep(Duration::from_secs(2));
    // Frozen, the broker keeps what it has but answers nothing: connections
    // hang, requests time out. (A killed tansu would restart empty.)
    broker.freeze();
    let before = pg.count("SELECT count(*) FROM stream");
    let errors = wait_for("errors in status during the outage", WAIT, || {
        let r = pg.status_row("alo");
        (r["status"] == "error" && r["last_errors"].as_array().is_some_and(|e| !e.is_empty())).then_some(r)
    });
    std::thread::sleep(outage.saturating_sub(Duration::from_secs(1)));
    let during = pg.count("SELECT count(*) FROM stream") - before;
    let queued = pg.status_row("alo")["messages_queued"].as_i64().unwrap();
    broker.thaw();
    std::thread::sleep(Duration::from_secs(2));
    writers.stop();
    drained(&pg);
    let row = wait_for("status active again", WAIT, || {
        let r = pg.status_row("alo");
        (r["status"] == "active").then_some(r)
    });
    let want = committed(&pg, "stream");
    let msgs = consume(&broker.bootstrap(), "alo", want.len(), WAIT, Duration::from_secs(2));
    let t = tally(&want, &msgs);
    eprintln!(
        "guarantees: broker outage {}s: {during} rows committed during it (writers not blocked), backlog {queued}, \
         first error: {}",
        outage.as_secs(),
        errors["last_errors"][0]["message"]
    );
    assert_at_least_once(&format!("broker outage {}s", outage.as_secs()), &t);
    assert!(during > 50, "writers committed only {during} rows during the outage");
    assert!(queued > 0, "nothing was queued during the outage");
    assert_eq!(row["messages_queued"], 0, "{row}");
    pg.stop("fast");
}
