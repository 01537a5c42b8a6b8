//! Benchmarks that print figures (nothing here asserts speed).
//!
//! `outbox-bench [--seconds N] [--rounds R] [--async-commit] [--drain EVENTS]
//!               [--latency-seconds S] [--steady-seconds S] [--batch-size N]
//!               [--cost EVENTS]`
//! (a part given 0 is skipped)
//!
//! Write path: pgbench, prepared statements, 2 clients, INSERT transactions per
//! second into identical tables with no destination, a best-effort destination,
//! an at-least-once destination and a hand-written PL/pgSQL outbox trigger (the
//! common alternative), for single-row and for 100-row INSERT statements
//! (broker up, worker draining), and the at-least-once and best-effort tables
//! again with the broker frozen (no delivery; librdkafka's broker thread spins
//! while a frozen broker holds its requests, so this is capture plus that spin;
//! best-effort events then wait in librdkafka's buffer or are lost) and with
//! a destination whose broker is down (connection refused: no delivery and no
//! spin; capture plus the worker claiming and producing into librdkafka until
//! its buffer is full), a floor for any outbox written in the writer's
//! transaction (a statement trigger copying the new rows as they are into an
//! unindexed table), and no destination beside two busy loops at nice 19 in
//! the bench's session (what a CPU-bound neighbour in another session costs
//! these fsync-bound writers on this machine), in interleaved rounds in one
//! run, every table emptied before each; the median of each is reported with
//! its ratio to "no destination", and with the writers' own CPU per inserted
//! row (their backends' user + system time, middle 60% of each run).
//!
//! Drain: a backlog of `--drain` events (default 1,000,000) from ~300-byte rows,
//! built while the broker is frozen, delivered once it thaws: events per second,
//! against a bare librdkafka producer with the destination's own librdkafka
//! configuration sending as many messages of the same size in the same run;
//! then the same drain while another session holds a snapshot open throughout,
//! compared with the mean of the drains before it and after it (and the bare
//! producer again). Each drain starts on an empty broker (tansu keeps every
//! message in memory and slows down as it fills), timed until pg_outbox's
//! delivered counter reaches the backlog (polled in one open session). Beside
//! each rate, CPU per event in microseconds: the worker process's (its main
//! thread and librdkafka's) for a drain, the bench's own for the bare
//! producer; steadier between runs than the rates, which move with whatever
//! else the two cores are doing.
//!
//! Latency: pgbench at a steady 1,000 single-row transactions/s for
//! `--latency-seconds` (default 20) into an at-least-once destination; per row,
//! its commit time (track_commit_timestamp) to the moment a consumer polling
//! the topic received it (an upper bound of commit to acknowledgement), and to
//! the create time librdkafka gave the message (commit to produce); the
//! destination's own latency from `outbox.destination_status` (commit to
//! acknowledgement, the last 10,000 events); beside them a bare
//! producer's send to receipt through the same broker and consumer, and its
//! send to acknowledgement.
//!
//! Steady state: pgbench at a steady 1,000 transactions/s for
//! `--steady-seconds` (default 180), with a snapshot held open throughout; the
//! outbox table's size and tuples over time.
//!
//! Cost: `--cost EVENTS` (default 200,000), CPU per delivered event of
//! pg_outbox, a PL/pgSQL outbox with a poller and logical decoding, in a
//! cluster of its own (see cost.rs).

#[path = "bench/cost.rs"]
mod cost;

use pg_outbox_test::{unique, Broker, Cluster, NewDestination, PG_BIN};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The median, of the values that were measured (NaN if none was).
fn median(v: Vec<f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// pgbench with a script, 2 clients; `rate`: a fixed transaction rate.
fn pgbench_cmd(pg: &Cluster, script: &str, seconds: u64, rate: Option<u64>) -> Command {
    let file = pg.dir.join(format!("bench-{}.sql", unique("s")));
    std::fs::write(&file, script).unwrap();
    let mut c = Command::new(format!("{PG_BIN}/pgbench"));
    c.args(["-n", "-M", "prepared", "-c", "2", "-j", "2", "-T", &seconds.to_string()]);
    if let Some(r) = rate {
        c.args(["-R", &r.to_string()]);
    }
    c.arg("-f").arg(&file).arg("-h").arg(&pg.dir).args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"]);
    c
}

/// CPU time (user + system) of these processes so far, in seconds.
fn cpu_seconds(pids: &[String]) -> f64 {
    // /proc counts in USER_HZ, 100 on Linux whatever the kernel's own tick.
    let ticks = 100.0;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which may hold spaces): state is
            // the 3rd field, utime and stime the 14th and 15th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
            (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / ticks
        })
        .sum()
}

/// pgbench into `table`: transactions per second, and the writers' own CPU
/// (their backends' user + system time) per inserted row over the middle
/// 60% of the run, in microseconds: what capture costs the writing
/// sessions themselves, whatever else competes for the cores.
fn pgbench(pg: &Cluster, script: &str, seconds: u64, table: &str) -> (f64, f64) {
    let started = Instant::now();
    let child =
        pgbench_cmd(pg, script, seconds, None).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("pgbench");
    let at = |fraction: f64| {
        let wait = Duration::from_secs_f64(seconds as f64 * fraction).saturating_sub(started.elapsed());
        std::thread::sleep(wait);
        let pids: Vec<String> = pg
            .sql("SELECT string_agg(pid::text, ' ' ORDER BY pid) FROM pg_stat_activity WHERE application_name = 'pgbench'")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let rows: f64 = pg.sql(&format!("SELECT {}", written(table))).trim().parse().unwrap_or(0.0);
        (cpu_seconds(&pids), rows, pids)
    };
    let (cpu0, rows0, pids) = at(0.2);
    let (cpu1, rows1, later) = at(0.8);
    let cpu_per_row = if pids == later && rows1 > rows0 { (cpu1 - cpu0) * 1e6 / (rows1 - rows0) } else { f64::NAN };
    let out = child.wait_with_output().expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"));
    (tps, cpu_per_row)
}

/// pgbench at a fixed rate, in the background.
fn pgbench_at_rate(pg: &Cluster, script: &str, rate: u64, seconds: u64) -> Child {
    pgbench_cmd(pg, script, seconds, Some(rate)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("pgbench")
}

/// Wait until the outbox is empty and nothing is in flight, then a moment more.
fn settle(pg: &Cluster) {
    pg_outbox_test::wait_for("the worker to drain", Duration::from_secs(600), || {
        let busy = pg.count(
            "SELECT (SELECT count(*) FROM outbox.event) + \
                    (SELECT coalesce(sum(messages_in_process), 0) FROM outbox.destination_status)",
        );
        (busy == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
}

/// A table `name` (bigserial id, text payload), a topic over it and a
/// destination producing to the Kafka topic `name`.
fn watched(pg: &Cluster, broker: &Broker, name: &str, kind: &str, content: &str, params: serde_json::Value) {
    broker.create_topic(name, 3);
    table_with_topic(pg, name);
    destination(pg, name, &broker.bootstrap()).kind(kind).content(content).params(params).create();
}

/// The table `name` and a topic `urn:name` over it, no destination yet.
fn table_with_topic(pg: &Cluster, name: &str) {
    pg.watched_table(name, "id bigserial PRIMARY KEY, payload text");
}

/// The destination `name` (dashed) on topic `urn:name`, to the Kafka topic `name`.
fn destination<'a>(pg: &'a Cluster, name: &str, bootstrap: &str) -> NewDestination<'a> {
    pg.destination(&name.replace('_', "-"), &format!("urn:{name}"), name).bootstrap(bootstrap)
}

/// Rows written into `table` so far (its id sequence; the tables are emptied
/// between runs, the ids go on), as SQL.
fn written(table: &str) -> String {
    format!("(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {table}_id_seq)")
}

fn main() {
    let seconds = arg("--seconds", 15);
    let rounds = arg("--rounds", 3) as usize;
    let mut broker = Broker::start();
    // Postgres defaults for durability (fsync on, synchronous_commit on).
    let pg = Cluster::start(
        &unique("bench"),
        &["fsync = on", "synchronous_commit = on", "shared_buffers = 256MB", "track_commit_timestamp = on"],
    );
    pg.sql("CREATE EXTENSION pg_outbox");
    pg.sql("CREATE TABLE bench_none (id bigserial PRIMARY KEY, payload text)");
    watched(&pg, &broker, "bench_be", "kafka-best-effort", "full-resource", json!({}));
    watched(&pg, &broker, "bench_alo", "kafka-at-least-once", "full-resource", json!({}));
    // The same, with a destination only while measured, to a broker that is down.
    table_with_topic(&pg, "bench_alo_down");
    table_with_topic(&pg, "bench_be_down");
    // The common alternative: a PL/pgSQL trigger writing each row to an outbox table.
    pg.sql(
        "CREATE TABLE plain_outbox (id bigserial PRIMARY KEY, topic text NOT NULL, payload jsonb NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now());
         CREATE FUNCTION plain_outbox_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO plain_outbox (topic, payload) VALUES (TG_TABLE_NAME, row_to_json(NEW)::jsonb);
             RETURN NULL;
         END $$;
         CREATE TABLE bench_plpgsql (id bigserial PRIMARY KEY, payload text);
         CREATE TRIGGER plain_outbox AFTER INSERT OR UPDATE ON bench_plpgsql
           FOR EACH ROW EXECUTE FUNCTION plain_outbox_capture();",
    );
    // A floor for any outbox written in the writer's transaction: a statement
    // trigger copying the new rows as they are into an unindexed table (no
    // JSON, no routing, nothing to deliver).
    pg.sql(
        "CREATE TABLE copy_sink (id bigint, payload text);
         CREATE FUNCTION copy_rows() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO copy_sink SELECT * FROM new_rows;
             RETURN NULL;
         END $$;
         CREATE TABLE bench_copy (id bigserial PRIMARY KEY, payload text);
         CREATE TRIGGER copy_rows AFTER INSERT ON bench_copy REFERENCING NEW TABLE AS new_rows
           FOR EACH STATEMENT EXECUTE FUNCTION copy_rows();",
    );
    // outbox.batch_size (events per claim), if given; else the default.
    let batch_size = arg("--batch-size", 0);
    if batch_size > 0 {
        pg.sql(&format!("ALTER SYSTEM SET outbox.batch_size = {batch_size}"));
        pg.sql("SELECT pg_reload_conf()");
    }
    let sync = std::env::args().any(|a| a == "--async-commit");
    if sync {
        pg.sql("ALTER SYSTEM SET synchronous_commit = off");
        pg.sql("SELECT pg_reload_conf()");
    }
    if seconds > 0 {
        write_path(&pg, &broker, seconds, rounds, sync);
    }
    let events = arg("--drain", 1_000_000);
    if events > 0 {
        quiesce(&pg);
        drains(&pg, &mut broker, events);
    }
    let latency_seconds = arg("--latency-seconds", 20);
    if latency_seconds > 0 {
        quiesce(&pg);
        fresh(&mut broker);
        latency(&pg, &broker, latency_seconds);
    }
    let steady_seconds = arg("--steady-seconds", 180);
    if steady_seconds > 0 {
        fresh(&mut broker);
        steady(&pg, &broker, steady_seconds);
    }
    pg.stop("fast");
    // A full run leaves gigabytes of WAL and tables behind.
    let _ = std::fs::remove_dir_all(&pg.dir);
    drop(broker);
    let cost_events = arg("--cost", 200_000);
    if cost_events > 0 {
        cost::run(cost_events);
    }
}

/// Not while autovacuum works through what the parts before left behind.
fn quiesce(pg: &Cluster) {
    pg.sql("VACUUM outbox.event");
    pg.sql("CHECKPOINT");
}

/// What else is going on while a variant's writers run.
#[derive(Clone, Copy, PartialEq)]
enum Beside {
    /// The broker up and the worker draining.
    Delivery,
    /// The broker frozen (SIGSTOP): nothing delivered, but librdkafka's
    /// broker thread spins while the frozen broker holds its requests.
    Frozen,
    /// A destination whose broker is down (connection refused), on a table
    /// of its own: nothing delivered and nothing spinning; capture plus the
    /// worker claiming and producing into librdkafka until its buffer is full.
    Down(&'static str),
    /// Two busy loops at nice 19 in the bench's session, nothing of
    /// pg_outbox: what a CPU-bound neighbour in another session costs these
    /// writers on this machine.
    BusyLoops,
}

/// A destination on `table` (a copy of the others, with a topic but no
/// destination until now) whose broker is down: nothing listens on its port,
/// so librdkafka gets connection refused and retries now and then.
fn destination_down(pg: &Cluster, table: &str, kind: &str) {
    destination(pg, table, &format!("127.0.0.1:{}", pg_outbox_test::free_port())).kind(kind).create();
}

/// Drop it again, with what it never delivered.
fn drop_destination_down(pg: &Cluster, table: &str) {
    pg.sql(&format!("SELECT outbox.drop_destination('{}')", table.replace('_', "-")));
}

/// Two busy loops at the lowest priority, until dropped (also when the
/// bench panics meanwhile).
struct BusyLoops(Vec<Child>);

impl BusyLoops {
    fn start() -> BusyLoops {
        // `nice` and `sh` exec in place: the child's pid is the loop's.
        BusyLoops(
            (0..2)
                .map(|_| {
                    Command::new("nice")
                        .args(["-n", "19", "sh", "-c", "while :; do :; done"])
                        .spawn()
                        .expect("a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for l in &mut self.0 {
            let _ = l.kill();
            let _ = l.wait();
        }
    }
}

/// pgbench into each variant, single-row and 100-row statements.
fn write_path(pg: &Cluster, broker: &Broker, seconds: u64, rounds: usize, sync: bool) {
    let variants = [
        ("bench_none", "no destination", Beside::Delivery),
        ("bench_be", "best-effort destination", Beside::Delivery),
        ("bench_alo", "at-least-once destination", Beside::Delivery),
        ("bench_plpgsql", "PL/pgSQL outbox trigger", Beside::Delivery),
        ("bench_alo", "at-least-once, broker frozen", Beside::Frozen),
        ("bench_be", "best-effort, broker frozen", Beside::Frozen),
        ("bench_copy", "copy of the rows (floor)", Beside::Delivery),
        ("bench_alo_down", "at-least-once, broker down", Beside::Down("kafka-at-least-once")),
        ("bench_be_down", "best-effort, broker down", Beside::Down("kafka-best-effort")),
        ("bench_none", "none, 2 busy loops nice 19", Beside::BusyLoops),
    ];
    for (rows, statement) in [
        (1, "INSERT INTO {t} (payload) VALUES (repeat('x', 200));\n"),
        (100, "INSERT INTO {t} (payload) SELECT repeat('x', 200) FROM generate_series(1, 100);\n"),
    ] {
        let mut tps: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            // Rotate the order, and let the worker finish draining before each run,
            // so no variant pays for the previous one's backlog.
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                let (table, name, beside) = variants[i];
                // Every table emptied before each run (the ids go on): ten
                // variants of 100-row runs would otherwise fill a small disk.
                // Pending events stay in the outbox and are drained first.
                pg.sql(
                    "TRUNCATE bench_none, bench_be, bench_alo, bench_plpgsql, bench_copy, bench_alo_down, \
                     bench_be_down, plain_outbox, copy_sink",
                );
                settle(pg);
                match beside {
                    Beside::Delivery | Beside::BusyLoops => {}
                    Beside::Frozen => broker.freeze(),
                    Beside::Down(kind) => destination_down(pg, table, kind),
                }
                let loops = (beside == Beside::BusyLoops).then(BusyLoops::start);
                let (t, c) = pgbench(pg, &statement.replace("{t}", table), seconds, table);
                drop(loops);
                match beside {
                    Beside::Delivery | Beside::BusyLoops => {}
                    Beside::Frozen => broker.thaw(),
                    Beside::Down(_) => drop_destination_down(pg, table),
                }
                eprintln!("round {}: {rows}-row INSERT, {name}: {t:.0} tps, {c:.2} us writer CPU/row", round + 1);
                tps[i].push(t);
                cpu[i].push(c);
            }
        }
        let base = median(tps[0].clone());
        println!("\nwrite path: {rows}-row INSERT transactions/s, pgbench -M prepared -c 2 -j 2 -T {seconds}, {rounds} interleaved round(s), median");
        println!(
            "fsync = on, synchronous_commit = {}; 2 cores; broker up and the worker draining unless frozen or down",
            if sync { "off" } else { "on" }
        );
        println!("(writer CPU: the two backends' own CPU per inserted row, middle 60% of each run)");
        let cpu_base = median(cpu[0].clone());
        println!("{:<28} {:>10} {:>8} {:>16} {:>12}", "table", "tps", "ratio", "writer CPU/row", "over none");
        for (i, (_, name, _)) in variants.iter().enumerate() {
            let m = median(tps[i].clone());
            let c = median(cpu[i].clone());
            println!("{name:<28} {m:>10.0} {:>8.3} {c:>13.2} us {:>9.2} us", m / base, c - cpu_base);
        }
    }
    // Show that the destinations really got the events.
    settle(pg);
    println!(
        "\nrows written / events delivered / lost / still queued:\n{}",
        pg.sql(&format!(
            "SELECT string_agg(format('%s: %s / %s / %s / %s', d.id, \
                          CASE d.id WHEN 'bench-be' THEN {} ELSE {} END, \
                          s.messages_delivered, s.messages_lost, s.messages_queued), E'\\n' ORDER BY d.id) \
                   FROM outbox.destination d JOIN outbox.destination_status s USING (id)",
            written("bench_be"),
            written("bench_alo")
        ))
    );
}

/// The drain of a backlog written by large statements and of one written by
/// single-row transactions, against a bare producer; then both again with a
/// snapshot held open.
/// Restart the broker empty. tansu keeps every message in memory and slows
/// down as it fills: a bare producer sending 1,000,000 messages after six
/// such drains ran at 70k/s where it had run at 149k/s (same run). Each drain,
/// bare producer and the latency part start on an empty broker.
fn fresh(broker: &mut Broker) {
    broker.stop();
    broker.resume();
}

/// The drain of `name` (50,000-row statements) and of `name`_single
/// (single-row transactions), each on an empty broker: events per second
/// and the worker's CPU per event.
fn drain_both(pg: &Cluster, broker: &mut Broker, events: u64, name: &str) -> ((f64, f64), (f64, f64)) {
    fresh(broker);
    let statements = drain(pg, broker, events, name, false);
    fresh(broker);
    (statements, drain(pg, broker, events, &format!("{name}_single"), true))
}

/// A row of the drain table: rate, ratio, CPU per event in microseconds.
fn drain_line(label: &str, (rate, cpu_us): (f64, f64), ratio: f64, note: &str) {
    println!("{label:<44} {rate:>12.0} {ratio:>8.3} {cpu_us:>8.2}{note}");
}

fn drains(pg: &Cluster, broker: &mut Broker, events: u64) {
    let (free, free_single) = drain_both(pg, broker, events, "drain");
    fresh(broker);
    let bare = bare_producer(pg, broker, events, "bare");
    drain_line("pg_outbox drain, 50,000-row statements", free, free.0 / bare.0, "");
    drain_line("pg_outbox drain, single-row transactions", free_single, free_single.0 / bare.0, "");
    drain_line("bare librdkafka producer", bare, 1.0, "");
    // Again, while another session holds a snapshot from before the backlog on.
    let mut holder = Command::new(format!("{PG_BIN}/psql"))
        .args(["-X", "-q", "-h"])
        .arg(&pg.dir)
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
        .arg("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class; SELECT pg_sleep(86400);")
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    pg_outbox_test::wait_for("the snapshot holder", Duration::from_secs(30), || {
        let n = pg.count(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(86400)%' \
                AND backend_xmin IS NOT NULL AND pid <> pg_backend_pid()",
        );
        (n == 1).then_some(())
    });
    let (held, held_single) = drain_both(pg, broker, events, "drain_held");
    // The server does not notice a killed client while it sleeps: end it.
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(86400)%' AND pid <> pg_backend_pid()");
    let _ = holder.kill();
    let _ = holder.wait();
    // The same drains again without the snapshot: a held drain is compared
    // with the mean of the drains around it (Postgres's own state drifts over
    // a run too: the outbox's dead rows, WAL, checkpoints).
    let (after, after_single) = drain_both(pg, broker, events, "drain_after");
    fresh(broker);
    let bare_after = bare_producer(pg, broker, events, "bare_after");
    let before_after = "  (ratio to the mean of the same drain before and after)";
    drain_line("snapshot held open, 50,000-row statements", held, held.0 / ((free.0 + after.0) / 2.0), before_after);
    drain_line(
        "snapshot held open, single-row transactions",
        held_single,
        held_single.0 / ((free_single.0 + after_single.0) / 2.0),
        before_after,
    );
    drain_line("drain after the snapshot, 50,000-row statements", after, after.0 / bare_after.0, "");
    drain_line("drain after the snapshot, single-row transactions", after_single, after_single.0 / bare_after.0, "");
    drain_line("bare librdkafka producer, again", bare_after, 1.0, "");
}

/// Build a backlog of `events` rows while the broker is frozen, with 50,000-row
/// INSERTs or (`singles`) one transaction per row, then time its delivery;
/// returns events per second and the worker process's CPU (its main thread
/// and librdkafka's, user + system) per event in microseconds.
fn drain(pg: &Cluster, broker: &Broker, events: u64, name: &str, singles: bool) -> (f64, f64) {
    watched(pg, broker, name, "kafka-at-least-once", "full-resource", json!({"deliveryTimeoutMs": 600000}));
    let dest = name.replace('_', "-");
    broker.freeze();
    let started = Instant::now();
    let mut from = 1;
    while from <= events {
        let to = (from + 49_999).min(events);
        pg.sql(&if singles {
            format!(
                "DO $$ BEGIN PERFORM set_config('synchronous_commit', 'off', false); \
                   FOR g IN {from}..{to} LOOP INSERT INTO {name} VALUES (g, repeat('x', 280)); COMMIT; END LOOP; END $$"
            )
        } else {
            format!("INSERT INTO {name} SELECT g, repeat('x', 280) FROM generate_series({from}, {to}) g")
        });
        from = to + 1;
    }
    let filled = started.elapsed();
    // Polled from one open session, off the table: a psql and a count(*) of
    // the outbox every 50 ms took a third of a core from the drain, and under a
    // held snapshot the count walked every deleted row again.
    let mut session = pg.session();
    let delivered =
        format!("SELECT coalesce((SELECT messages_delivered FROM outbox._destination_stats() WHERE id = '{dest}'), 0)");
    session.sql("SELECT 1");
    let worker = [pg.worker_pid().expect("the pg_outbox worker runs").to_string()];
    let cpu = cpu_seconds(&worker);
    broker.thaw();
    let started = Instant::now();
    while session.count(&delivered) < events as i64 {
        assert!(started.elapsed() < Duration::from_secs(3600), "timed out waiting for the backlog to drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds(&worker) - cpu) / events as f64 * 1e6;
    // Delivered counts what the worker deleted and committed: nothing is left.
    let left = session.count(&format!("SELECT count(*) FROM outbox.event WHERE destination_id = '{dest}'"));
    assert_eq!(left, 0, "events left in the outbox after {events} were delivered");
    if name == "drain" {
        let size = pg.count(&format!("SELECT length(row_to_json(t)::text) FROM {name} t LIMIT 1"));
        println!(
            "\ndrain: {events} events of ~{} bytes (row {size} bytes), backlog built in {:.1} s",
            size + 400,
            filled.as_secs_f64()
        );
        println!("{:<44} {:>12} {:>8} {:>8}", "", "events/s", "ratio", "CPU µs");
    }
    pg.sql(&format!("SELECT outbox.drop_destination('{dest}'); SELECT outbox.drop_topic('urn:{name}')"));
    (rate, cpu_us)
}

/// A bare librdkafka producer with destination `id`'s effective configuration.
fn producer_like(pg: &Cluster, id: &str) -> rdkafka::producer::BaseProducer {
    producer_like_with(pg, id, rdkafka::producer::DefaultProducerContext)
}

fn producer_like_with<C: rdkafka::producer::ProducerContext>(
    pg: &Cluster,
    id: &str,
    context: C,
) -> rdkafka::producer::BaseProducer<C> {
    let config: serde_json::Value =
        serde_json::from_str(&pg.sql(&format!("SELECT outbox.destination_config('{id}')"))).unwrap();
    let mut client = rdkafka::ClientConfig::new();
    for (k, v) in config.as_object().unwrap() {
        if !k.starts_with("pg_outbox.") {
            client.set(k, v.as_str().unwrap());
        }
    }
    client.create_with_context(context).expect("bare producer")
}

/// Notes when the broker acknowledged each message (numeric key, epoch seconds).
struct Acks(std::sync::Mutex<Vec<(i64, f64)>>);

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        use rdkafka::message::Message;
        let at = epoch_seconds();
        if let Some(id) =
            result.as_ref().ok().and_then(|m| m.key()).and_then(|k| std::str::from_utf8(k).ok()?.parse().ok())
        {
            self.0.lock().unwrap().push((id, at));
        }
    }
}

/// The same number of messages of the Bundle's size, straight from librdkafka
/// with the drain destination's own configuration: messages per second and
/// this process's CPU per message in microseconds (nothing else of it runs
/// meanwhile).
fn bare_producer(pg: &Cluster, broker: &Broker, events: u64, name: &str) -> (f64, f64) {
    use rdkafka::producer::Producer;
    watched(pg, broker, name, "kafka-at-least-once", "full-resource", json!({}));
    let producer = producer_like(pg, &name.replace('_', "-"));
    let payload = vec![b'x'; 707];
    let me = [std::process::id().to_string()];
    let cpu = cpu_seconds(&me);
    let started = Instant::now();
    for i in 0..events {
        cost::send(&producer, name, &i.to_string(), &payload);
    }
    producer.flush(Duration::from_secs(600)).expect("flush");
    let rate = events as f64 / started.elapsed().as_secs_f64();
    (rate, (cpu_seconds(&me) - cpu) / events as f64 * 1e6)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A consumer of `topic` (3 partitions, from the beginning) on its own
/// thread, noting (numeric key, receipt time, the message's create time set
/// by the producer when it was handed the message; epoch seconds) until `stop`.
fn receipts(
    broker: &Broker,
    topic: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(i64, f64, f64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "outbox-bench")
        .set("enable.auto.commit", "false")
        // tansu answers a fetch with nothing to return when fetch.wait.max.ms
        // runs out, not when a message arrives: the receipt waits for that
        // (5 ms gave a bare producer's messages p50 9.5 ms, 1 ms 3.3 ms, while
        // their acknowledgement took 0.2 ms).
        .set("fetch.wait.max.ms", "1")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                let now = epoch_seconds();
                let created = m.timestamp().to_millis().unwrap_or(0) as f64 / 1000.0;
                if let Some(id) = m.key().and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| k.parse().ok()) {
                    seen.push((id, now, created));
                }
            }
        }
        seen
    })
}

fn epoch_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Milliseconds from `sent` (by key) to receipt (or to the create time the
/// producer gave the message), sorted; printed as p50/p99/max.
fn report_latency(label: &str, seen: &[(i64, f64, f64)], sent: &std::collections::HashMap<i64, f64>, produced: bool) {
    let mut ms: Vec<f64> = seen
        .iter()
        .filter_map(|(id, at, created)| sent.get(id).map(|c| ((if produced { created } else { at }) - c) * 1000.0))
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if ms.is_empty() {
        println!("{label}: no events received");
        return;
    }
    println!(
        "{label:<38} {:>6} of {:>6}  p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
        ms.len(),
        sent.len(),
        percentile(&ms, 0.50),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    );
}

/// Commit to receipt by a consumer, at a steady 1,000 events/s; beside it the
/// same path without Postgres: a bare producer with the destination's
/// configuration sending 1,000 messages/s, send to receipt.
fn latency(pg: &Cluster, broker: &Broker, seconds: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    watched(pg, broker, "lat", "kafka-at-least-once", "id-only", json!({}));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = receipts(broker, "lat", stop.clone());
    // Warm up: the producer connected, the consumer fetching, before measuring.
    pg.sql("INSERT INTO lat (payload) VALUES ('warm-up')");
    pg_outbox_test::wait_for("the warm-up event", Duration::from_secs(60), || {
        (pg.status_row("lat")["messages_delivered"] == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut run = pgbench_at_rate(pg, "INSERT INTO lat (payload) VALUES (repeat('x', 200));\n", 1000, seconds);
    run.wait().expect("pgbench");
    settle(pg);
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    let committed: std::collections::HashMap<i64, f64> = pg
        .sql("SELECT string_agg(id || ' ' || extract(epoch FROM pg_xact_commit_timestamp(xmin)), E'\\n') FROM lat WHERE id > 1")
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))))
        .collect();
    println!(
        "\nlatency at 1,000 events/s for {seconds} s (pgbench -R 1000 -c 2), received by a consumer polling the topic"
    );
    report_latency("pg_outbox, commit to receipt", &seen, &committed, false);
    report_latency("pg_outbox, commit to produce", &seen, &committed, true);
    let row = pg.status_row("lat");
    println!(
        "{:<38} {:>6} last {:>6}  p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
        "pg_outbox's status, commit to ack",
        "",
        row["messages_delivered"].as_i64().unwrap_or(0).min(10_000),
        row["latency_p50_ms"].as_f64().unwrap_or(f64::NAN),
        row["latency_p99_ms"].as_f64().unwrap_or(f64::NAN),
        row["latency_max_ms"].as_f64().unwrap_or(f64::NAN)
    );
    bare_latency(pg, broker, seconds);
}

/// The baseline: the broker and consumer path alone.
fn bare_latency(pg: &Cluster, broker: &Broker, seconds: u64) {
    use rdkafka::producer::{BaseRecord, Producer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    broker.create_topic("lat_bare", 3);
    let producer = producer_like_with(pg, "lat", Acks(Default::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = receipts(broker, "lat_bare", stop.clone());
    let payload = vec![b'x'; 400];
    let mut sent = std::collections::HashMap::new();
    let started = Instant::now();
    for i in 0..(seconds * 1000) as i64 {
        // Warm-up message first, then one per millisecond.
        let due = started + Duration::from_secs(1) + Duration::from_millis(i as u64);
        while Instant::now() < due {
            producer.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_micros(100));
        }
        let key = i.to_string();
        if i > 0 {
            sent.insert(i, epoch_seconds());
        }
        producer.send(BaseRecord::to("lat_bare").key(&key).payload(&payload)).map_err(|(e, _)| e).expect("send");
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    report_latency("bare producer, send to receipt", &seen, &sent, false);
    let acked: Vec<(i64, f64, f64)> =
        producer.context().0.lock().unwrap().iter().map(|&(id, at)| (id, at, at)).collect();
    report_latency("bare producer, send to acknowledgement", &acked, &sent, false);
}

/// The outbox table over time at a steady 1,000 events/s.
fn steady(pg: &Cluster, broker: &Broker, seconds: u64) {
    watched(pg, broker, "steady", "kafka-at-least-once", "full-resource", json!({}));
    settle(pg);
    // A snapshot held for the whole run (a long report, a pg_dump): vacuum
    // can remove no row deleted meanwhile.
    let mut holder = pg.session();
    holder.sql("BEGIN ISOLATION LEVEL REPEATABLE READ");
    holder.sql("SELECT count(*) FROM outbox.destination");
    let mut run = pgbench_at_rate(pg, "INSERT INTO steady (payload) VALUES (repeat('x', 200));\n", 1000, seconds);
    println!(
        "\nsteady state: pgbench -R 1000 -c 2 -T {seconds} into an at-least-once destination, a snapshot held open \
         throughout (REPEATABLE READ); outbox.event over time (its partitions: tables, indexes, TOAST)"
    );
    println!("{:>8} {:>12} {:>12} {:>12} {:>10}", "seconds", "size bytes", "live tuples", "dead tuples", "queued");
    let started = Instant::now();
    let every = Duration::from_secs((seconds / 10).max(1));
    loop {
        let sample = pg.sql(
            "SELECT sum(pg_total_relation_size(s.relid)) || ' ' || sum(s.n_live_tup) || ' ' || sum(s.n_dead_tup) \
                    || ' ' || (SELECT count(*) FROM outbox.event) \
               FROM pg_stat_user_tables s \
              WHERE s.relid IN (SELECT p.relid FROM pg_partition_tree('outbox.event') p WHERE p.isleaf)",
        );
        let v: Vec<&str> = sample.split_whitespace().collect();
        println!("{:>8} {:>12} {:>12} {:>12} {:>10}", started.elapsed().as_secs(), v[0], v[1], v[2], v[3]);
        if run.try_wait().expect("pgbench").is_some() {
            break;
        }
        std::thread::sleep(every);
    }
    holder.sql("COMMIT");
}
