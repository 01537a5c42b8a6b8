//! Benchmarks that print figures (nothing here asserts speed).
//!
//! `outbox-bench [--seconds N] [--rounds R] [--async-commit] [--drain EVENTS]`
//!
//! Write path: pgbench, prepared statements, 2 clients, single-row INSERT
//! transactions per second into identical tables with no destination, a
//! best-effort destination and an at-least-once destination (broker up, worker
//! draining), measured in interleaved rounds in one run; the median of each is
//! reported with its ratio to "no destination".
//!
//! Drain: a backlog of `--drain` events (default 1,000,000) from ~300-byte rows,
//! built while the broker is frozen, delivered once it thaws: events per second,
//! against a bare librdkafka producer with the same settings sending as many
//! messages of the same size in the same run.

use pg_outbox_test::{unique, Broker, Cluster, PG_BIN};
use std::process::Command;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pgbench(pg: &Cluster, script: &str, seconds: u64) -> f64 {
    let file = pg.dir.join(format!("bench-{}.sql", unique("s")));
    std::fs::write(&file, script).unwrap();
    let out = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-n", "-M", "prepared", "-c", "2", "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(&file)
        .arg("-h")
        .arg(&pg.dir)
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
}

/// Wait until the outbox is empty and nothing is in flight, then a moment more.
fn settle(pg: &Cluster) {
    pg_outbox_test::wait_for("the worker to drain", std::time::Duration::from_secs(600), || {
        let busy = pg.count(
            "SELECT (SELECT count(*) FROM outbox.event) + \
                    (SELECT coalesce(sum(messages_in_process), 0) FROM outbox.destination_status)",
        );
        (busy == 0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
}

fn main() {
    let seconds = arg("--seconds", 15);
    let rounds = arg("--rounds", 3) as usize;
    let broker = Broker::start();
    broker.create_topic("bench-be", 3);
    broker.create_topic("bench-alo", 3);
    // Postgres defaults for durability (fsync on, synchronous_commit on).
    let pg = Cluster::start(&unique("bench"), &["fsync = on", "synchronous_commit = on", "shared_buffers = 256MB"]);
    pg.sql("CREATE EXTENSION pg_outbox");
    for (table, kind) in
        [("bench_none", None), ("bench_be", Some("kafka-best-effort")), ("bench_alo", Some("kafka-at-least-once"))]
    {
        pg.sql(&format!("CREATE TABLE {table} (id bigserial PRIMARY KEY, payload text)"));
        if let Some(kind) = kind {
            let suffix = if kind.contains("best") { "be" } else { "alo" };
            pg.sql(&format!("SELECT outbox.create_topic('urn:{table}', '[{{\"table\": \"{table}\"}}]')"));
            let (id, url, kafka_topic) = (table.replace('_', "-"), format!("urn:{table}"), format!("bench-{suffix}"));
            pg.create_destination(&id, &url, kind, &kafka_topic, &broker.bootstrap(), "", "full-resource");
        }
    }
    let sync = std::env::args().any(|a| a == "--async-commit");
    if sync {
        pg.sql("ALTER SYSTEM SET synchronous_commit = off");
        pg.sql("SELECT pg_reload_conf()");
    }
    let variants = ["bench_none", "bench_be", "bench_alo"];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        // Rotate the order, and let the worker finish draining before each run,
        // so no variant pays for the previous one's backlog.
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let table = variants[i];
            settle(&pg);
            let t = pgbench(&pg, &format!("INSERT INTO {table} (payload) VALUES (repeat('x', 200));\n"), seconds);
            eprintln!("round {}: {table}: {t:.0} tps", round + 1);
            tps[i].push(t);
        }
    }
    let base = median(tps[0].clone());
    println!("\nwrite path: single-row INSERT transactions/s, pgbench -M prepared -c 2 -j 2 -T {seconds}, {rounds} interleaved round(s), median");
    println!(
        "fsync = on, synchronous_commit = {}; 2 cores; broker up, worker draining",
        if sync { "off" } else { "on" }
    );
    println!("{:<28} {:>10} {:>8}", "table", "tps", "ratio");
    for (i, name) in ["no destination", "best-effort destination", "at-least-once destination"].iter().enumerate() {
        let m = median(tps[i].clone());
        println!("{name:<28} {m:>10.0} {:>8.3}", m / base);
    }
    // Show that the destinations really got the events.
    settle(&pg);
    println!(
        "\nrows written / events delivered / lost / still queued:\n{}",
        pg.sql(
            "SELECT string_agg(format('%s: %s / %s / %s / %s', d.id, \
                      (SELECT count(*) FROM bench_none) * 0 + CASE d.id WHEN 'bench-be' THEN (SELECT count(*) FROM bench_be) \
                                                                       ELSE (SELECT count(*) FROM bench_alo) END, \
                      s.messages_delivered, s.messages_lost, s.messages_queued), E'\\n' ORDER BY d.id) \
               FROM outbox.destination d JOIN outbox.destination_status s USING (id)"
        )
    );
    drain(&pg, &broker, arg("--drain", 1_000_000));
    pg.stop("fast");
}

/// Deliver a backlog and compare with a bare producer.
fn drain(pg: &Cluster, broker: &Broker, events: u64) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::time::{Duration, Instant};
    broker.create_topic("drain", 3);
    broker.create_topic("bare", 3);
    pg.sql("CREATE TABLE drain_t (id bigint PRIMARY KEY, payload text)");
    pg.sql("SELECT outbox.create_topic('urn:drain', '[{\"table\": \"drain_t\"}]')");
    let (bootstrap, extra) = (broker.bootstrap(), r#", "deliveryTimeoutMs": 600000"#);
    pg.create_destination("drain", "urn:drain", "kafka-at-least-once", "drain", &bootstrap, extra, "full-resource");
    broker.freeze();
    let started = Instant::now();
    let mut from = 1;
    while from <= events {
        let to = (from + 49_999).min(events);
        pg.sql(&format!("INSERT INTO drain_t SELECT g, repeat('x', 280) FROM generate_series({from}, {to}) g"));
        from = to + 1;
    }
    let filled = started.elapsed();
    let size = pg.count("SELECT coalesce(max(length(row_data::text)), 0) FROM outbox.event");
    broker.thaw();
    let started = Instant::now();
    pg_outbox_test::wait_for("the backlog to drain", Duration::from_secs(3600), || {
        (pg.sql("SELECT NOT EXISTS (SELECT 1 FROM outbox.event)") == "t").then_some(())
    });
    let drained = started.elapsed();

    // The same number of messages of the Bundle's size, straight from librdkafka.
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .expect("bare producer");
    let payload = vec![b'x'; size as usize + 400]; // row plus the Bundle around it
    let started = Instant::now();
    for i in 0..events {
        let key = i.to_string();
        let mut record = BaseRecord::to("bare").key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(600)).expect("flush");
    let bare = started.elapsed();
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!(
        "\ndrain: {events} events of ~{} bytes (row {size} bytes), backlog built in {:.1} s",
        size + 400,
        filled.as_secs_f64()
    );
    println!("{:<28} {:>12} {:>8}", "", "events/s", "ratio");
    println!("{:<28} {:>12.0} {:>8.3}", "pg_outbox drain", rate(drained), rate(drained) / rate(bare));
    println!("{:<28} {:>12.0} {:>8.3}", "bare librdkafka producer", rate(bare), 1.0);
}
