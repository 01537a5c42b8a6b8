//! Benchmarks that print figures (nothing here asserts speed).
//!
//! `outbox-bench [--seconds N] [--rounds R] [--async-commit]`
//!
//! Write path: pgbench, prepared statements, 2 clients, single-row INSERT
//! transactions per second into identical tables with no destination, a
//! best-effort destination and an at-least-once destination (broker up, worker
//! draining), measured in interleaved rounds in one run; the median of each is
//! reported with its ratio to "no destination".

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
            pg.sql(&format!(
                "SELECT outbox.create_destination('{}', 'urn:{table}', '{kind}', \
                 '{{\"kafkaTopic\": \"bench-{suffix}\", \"bootstrapServers\": \"{}\"}}')",
                table.replace('_', "-"),
                broker.bootstrap()
            ));
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
    pg.stop("fast");
}
