//! What the database pays per delivered event, against the real alternatives
//! (`--cost EVENTS`, default 200,000; 0 skips it).
//!
//! The same workload for each: `EVENTS` rows of ~300 bytes inserted by
//! pgbench (2 clients), as single-row transactions and as 100-row
//! statements, each row delivered to the local broker as one Kafka message:
//! - pg_outbox at-least-once and best-effort (the worker delivers);
//! - a PL/pgSQL trigger writing each row to an outbox table, and a poller
//!   here (one psql session: claim 1,000 with `FOR UPDATE SKIP LOCKED`,
//!   produce with librdkafka, wait for the acknowledgements, delete, commit);
//! - logical decoding: `wal_level = logical`, a publication, `pgoutput`
//!   streamed by `pg_recvlogical` to this process, which parses the inserts and
//!   produces one message per row.
//!
//! Database CPU is every server process's user + system time over the run
//! (from the first insert to the last acknowledgement): the live ones from
//! /proc, the ones that ended (pgbench's backends) from the postmaster's
//! children's times. Of it, the delivering process's own (the pg_outbox
//! worker, the poller's backend, the walsender). Client CPU (this process, its
//! psql or pg_recvlogical) and the broker's are reported apart: in production
//! they run elsewhere. `wal_level = logical` also costs the writers: the
//! inserts without capture are measured at both levels.
//!
//! synchronous_commit = off in this cluster: CPU per event is the figure, and
//! waiting for fsync costs none (it only makes the run longer). The
//! best-effort queue is 256MB and librdkafka's buffer 1GB, so that bursts are
//! delivered rather than lost (any loss is printed, and the figures are then
//! per delivered event).

use super::cpu_seconds;
use pg_outbox_test::{unique, wait_for, Broker, Cluster, PG_BIN};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(1800);

/// CPU seconds so far of every server process, by pid, and of those that
/// ended (the postmaster's own time and its reaped children's) under "0".
fn server_cpu(pg: &Cluster) -> HashMap<String, f64> {
    let postmaster = pg.postmaster_pid().to_string();
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
        // After the name: state, ppid, ...; utime, stime, cutime, cstime are
        // the 12th to 15th (in USER_HZ, 100 per second).
        if pid == postmaster {
            out.insert("0".to_string(), (f[11] + f[12] + f[13] + f[14]) / 100.0);
        } else if f.get(1).map(|p| p.to_string()) == Some(postmaster.clone()) {
            out.insert(pid, (f[11] + f[12]) / 100.0);
        }
    }
    out
}

fn total(cpu: &HashMap<String, f64>) -> f64 {
    cpu.values().sum()
}

/// One approach's figures, in µs of CPU per event.
struct Cost {
    database: f64,
    delivering: f64,
    client: f64,
    broker: f64,
    note: String,
}

/// What runs and what is sampled for one measurement.
struct Run<'a> {
    pg: &'a Cluster,
    broker: &'a Broker,
    events: u64,
    started_db: HashMap<String, f64>,
    /// Backends of the bench's own status polling (not the approach's cost).
    observers: Vec<String>,
    started_observers: f64,
    delivering: Vec<String>,
    started_delivering: f64,
    client: Vec<String>,
    started_client: f64,
    started_broker: f64,
}

impl<'a> Run<'a> {
    /// Start counting; `client` are the client-side processes besides this one.
    fn start(
        pg: &'a Cluster,
        broker: &'a Broker,
        events: u64,
        delivering: Vec<String>,
        client: Vec<String>,
    ) -> Run<'a> {
        let mut client = client;
        client.push(std::process::id().to_string());
        Run {
            pg,
            broker,
            events,
            started_db: server_cpu(pg),
            observers: Vec::new(),
            started_observers: 0.0,
            started_delivering: cpu_seconds(&delivering),
            delivering,
            started_client: cpu_seconds(&client),
            client,
            started_broker: cpu_seconds(&[broker.pid().to_string()]),
        }
    }

    /// Leave the CPU of backend `pid` (the bench's polling) out.
    fn observed_by(mut self, pid: String) -> Self {
        self.observers = vec![pid];
        self.started_observers = cpu_seconds(&self.observers);
        self
    }

    fn finish(self, note: String) -> Cost {
        let per_event = |seconds: f64| seconds * 1e6 / self.events as f64;
        Cost {
            database: per_event(
                total(&server_cpu(self.pg))
                    - total(&self.started_db)
                    - (cpu_seconds(&self.observers) - self.started_observers),
            ),
            delivering: per_event(cpu_seconds(&self.delivering) - self.started_delivering),
            client: per_event(cpu_seconds(&self.client) - self.started_client),
            broker: per_event(cpu_seconds(&[self.broker.pid().to_string()]) - self.started_broker),
            note,
        }
    }
}

/// The writers: `EVENTS` rows into `table`, single-row transactions or
/// 100-row statements, 2 pgbench clients; in the background.
fn writers(pg: &Cluster, table: &str, events: u64, rows: u64) -> Child {
    let statement = if rows == 1 {
        format!("INSERT INTO {table} (payload) VALUES (repeat('x', 280));\n")
    } else {
        format!("INSERT INTO {table} (payload) SELECT repeat('x', 280) FROM generate_series(1, {rows});\n")
    };
    let file = pg.dir.join(format!("cost-{}.sql", unique("s")));
    std::fs::write(&file, statement).unwrap();
    Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-n", "-M", "prepared", "-c", "2", "-j", "2", "-t", &(events / rows / 2).to_string(), "-f"])
        .arg(&file)
        .arg("-h")
        .arg(&pg.dir)
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench")
}

fn finished(writers: &mut Child) -> bool {
    match writers.try_wait().expect("pgbench") {
        Some(status) => {
            assert!(status.success(), "pgbench failed");
            true
        }
        None => false,
    }
}

fn table(pg: &Cluster, name: &str) {
    pg.sql(&format!("CREATE TABLE {name} (id bigserial PRIMARY KEY, payload text)"));
}

/// The inserts alone (no capture): what every approach starts from.
fn no_capture(pg: &Cluster, broker: &Broker, events: u64, rows: u64, name: &str) -> Cost {
    table(pg, name);
    let run = Run::start(pg, broker, events, Vec::new(), Vec::new());
    let mut w = writers(pg, name, events, rows);
    wait_for("the writers", TIMEOUT, || finished(&mut w).then_some(()));
    run.finish(String::new())
}

/// pg_outbox: a topic over the table and one destination of `kind`.
fn pg_outbox(pg: &Cluster, broker: &Broker, events: u64, rows: u64, name: &str, kind: &str) -> Cost {
    table(pg, name);
    broker.create_topic(name, 3);
    pg.sql(&format!("SELECT outbox.create_topic('urn:{name}', '[{{\"table\": \"{name}\"}}]')"));
    let dest = name.replace('_', "-");
    // Best-effort events that find librdkafka's buffer full wait in the
    // worker (a bounded number, for maxBlockMs) and are lost after that: a
    // buffer for the whole run, so that they are delivered and measured.
    // The same for both kinds.
    let params = serde_json::json!({"maxBlockMs": 600000, "rdkafka.queue.buffering.max.kbytes": 1048576,
                                    "rdkafka.queue.buffering.max.messages": 1000000});
    pg.destination(&dest, &format!("urn:{name}"), name)
        .bootstrap(&broker.bootstrap())
        .kind(kind)
        .params(params)
        .create();
    let worker = pg.worker_pid().expect("the pg_outbox worker runs").to_string();
    let mut session = pg.session();
    let observer = session.sql("SELECT pg_backend_pid()");
    let done = format!(
        "SELECT coalesce((SELECT messages_delivered + messages_lost FROM outbox._destination_stats() WHERE id = '{dest}'), 0)"
    );
    let run = Run::start(pg, broker, events, vec![worker], Vec::new()).observed_by(observer);
    eprintln!("cost: {name} ({kind}), worker {}", run.delivering[0]);
    let mut w = writers(pg, name, events, rows);
    wait_for("pg_outbox to deliver", TIMEOUT, || {
        std::thread::sleep(Duration::from_millis(100));
        (finished(&mut w) && session.count(&done) >= events as i64).then_some(())
    });
    let cost = run.finish(String::new());
    let lost = session.count(&format!("SELECT messages_lost FROM outbox._destination_stats() WHERE id = '{dest}'"));
    drop(session);
    pg.sql(&format!("SELECT outbox.drop_destination('{dest}'); SELECT outbox.drop_topic('urn:{name}')"));
    if lost == 0 {
        return cost;
    }
    // Per delivered event.
    let scale = events as f64 / (events as f64 - lost as f64);
    Cost {
        database: cost.database * scale,
        delivering: cost.delivering * scale,
        client: cost.client * scale,
        broker: cost.broker * scale,
        note: format!("{lost} lost (figures per delivered event)"),
    }
}

/// Counts the messages the broker acknowledged, and the failures.
#[derive(Default)]
struct Counted {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl rdkafka::ClientContext for Counted {}

impl ProducerContext for Counted {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() { &self.acked } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn producer(broker: &Broker) -> BaseProducer<Counted> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "5")
        .create_with_context(Counted::default())
        .expect("producer")
}

/// Send, waiting for room in librdkafka's queue.
pub(super) fn send<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    topic: &str,
    key: &str,
    payload: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
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

/// A hand-written outbox: a PL/pgSQL trigger, and a poller in this process.
fn plpgsql_and_poller(pg: &Cluster, broker: &Broker, events: u64, rows: u64, name: &str) -> Cost {
    table(pg, name);
    broker.create_topic(name, 3);
    pg.sql(&format!(
        "CREATE TABLE {name}_outbox (id bigserial PRIMARY KEY, topic text NOT NULL, key text, payload jsonb NOT NULL,
                                     created_at timestamptz NOT NULL DEFAULT now());
         CREATE FUNCTION {name}_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {name}_outbox (topic, key, payload) VALUES (TG_TABLE_NAME, NEW.id, row_to_json(NEW)::jsonb);
             RETURN NULL;
         END $$;
         CREATE TRIGGER capture AFTER INSERT OR UPDATE OR DELETE ON {name} FOR EACH ROW EXECUTE FUNCTION {name}_capture();"
    ));
    let mut session = pg.session();
    let backend = session.sql("SELECT pg_backend_pid()");
    let producer = producer(broker);
    let run = Run::start(pg, broker, events, vec![backend], vec![session.pid().to_string()]);
    let mut w = writers(pg, name, events, rows);
    let started = Instant::now();
    let mut deleted = 0;
    while deleted < events {
        assert!(started.elapsed() < TIMEOUT, "the poller timed out");
        session.sql("BEGIN");
        let claimed = session
            .sql(&format!("SELECT id, key, payload FROM {name}_outbox ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED"));
        if claimed.is_empty() {
            session.sql("COMMIT");
            if finished(&mut w) {
                assert_eq!(session.count(&format!("SELECT count(*) FROM {name}_outbox")), 0);
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut ids = Vec::new();
        for line in claimed.lines() {
            let mut parts = line.splitn(3, '|');
            let (id, key, payload) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            send(&producer, name, key, payload.as_bytes());
            ids.push(id);
        }
        producer.flush(Duration::from_secs(60)).expect("flush");
        assert_eq!(producer.context().failed.load(Ordering::Relaxed), 0, "the poller's messages failed");
        session.sql(&format!("DELETE FROM {name}_outbox WHERE id = ANY ('{{{}}}'::bigint[])", ids.join(",")));
        session.sql("COMMIT");
        deleted += ids.len() as u64;
    }
    wait_for("the writers", TIMEOUT, || finished(&mut w).then_some(()));
    let cost = run.finish(String::new());
    assert_eq!(producer.context().acked.load(Ordering::Relaxed), events);
    cost
}

/// pgoutput (protocol 1) as pg_recvlogical writes it: each message, then a
/// newline.
struct Pgoutput<R: Read> {
    r: BufReader<R>,
}

impl<R: Read> Pgoutput<R> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.r.read_exact(&mut b).expect("pg_recvlogical's output");
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn cstring(&mut self) {
        while self.u8() != 0 {}
    }

    /// The next message; for an insert, its columns' text (None: NULL).
    fn next(&mut self) -> (u8, Vec<Option<Vec<u8>>>) {
        let kind = self.u8();
        let mut columns = Vec::new();
        match kind {
            b'B' => drop(self.bytes(20)),
            b'C' => drop(self.bytes(25)),
            b'R' => {
                self.bytes(4);
                self.cstring();
                self.cstring();
                self.u8();
                for _ in 0..self.i16() {
                    self.u8();
                    self.cstring();
                    self.bytes(8);
                }
            }
            b'I' => {
                self.bytes(4);
                assert_eq!(self.u8(), b'N');
                for _ in 0..self.i16() {
                    columns.push(match self.u8() {
                        b't' => {
                            let n = self.i32() as usize;
                            Some(self.bytes(n))
                        }
                        _ => None,
                    });
                }
            }
            other => panic!("unexpected pgoutput message {:?}", other as char),
        }
        assert_eq!(self.u8(), b'\n', "pg_recvlogical ends each message with a newline");
        (kind, columns)
    }
}

/// Logical decoding: a publication, a pgoutput slot streamed by
/// pg_recvlogical; this process turns each insert into a message.
fn logical_decoding(pg: &Cluster, broker: &Broker, events: u64, rows: u64, name: &str) -> Cost {
    table(pg, name);
    broker.create_topic(name, 3);
    pg.sql(&format!("CREATE PUBLICATION {name} FOR TABLE {name}"));
    pg.sql(&format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"));
    let mut recv = Command::new(format!("{PG_BIN}/pg_recvlogical"))
        .arg("-h")
        .arg(&pg.dir)
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "-d", "postgres", "--slot", name, "--start"])
        .args(["-o", "proto_version=1", "-o", &format!("publication_names={name}"), "-F", "0", "-f", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("pg_recvlogical");
    let mut stream = Pgoutput { r: BufReader::with_capacity(1 << 20, recv.stdout.take().unwrap()) };
    let walsender = wait_for("the walsender", Duration::from_secs(30), || {
        let pid = pg.sql(&format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{name}'"));
        (!pid.is_empty()).then_some(pid)
    });
    let producer = producer(broker);
    let run = Run::start(pg, broker, events, vec![walsender], vec![recv.id().to_string()]);
    let mut w = writers(pg, name, events, rows);
    let mut inserts = 0;
    while inserts < events {
        let (kind, columns) = stream.next();
        if kind == b'I' {
            let id = String::from_utf8(columns[0].clone().unwrap()).unwrap();
            let payload = columns[1].as_deref().map(String::from_utf8_lossy);
            let message = serde_json::json!({"id": id.parse::<i64>().unwrap(), "payload": payload}).to_string();
            send(&producer, name, &id, message.as_bytes());
            inserts += 1;
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    wait_for("the writers", TIMEOUT, || finished(&mut w).then_some(()));
    let cost = run.finish(String::new());
    assert_eq!(producer.context().acked.load(Ordering::Relaxed), events);
    let _ = recv.kill();
    let _ = recv.wait();
    pg.sql(&format!("SELECT pg_drop_replication_slot('{name}'); DROP PUBLICATION {name}"));
    cost
}

fn line(label: &str, c: &Cost, logical: f64) {
    println!(
        "{label:<36} {:>9.1} {:>9.1} {:>9.3} {:>9.1} {:>9.1}  {}",
        c.database,
        c.delivering,
        c.database / logical,
        c.client,
        c.broker,
        c.note
    );
}

pub fn run(events: u64) {
    let broker = Broker::start();
    let pg = Cluster::start(
        &unique("cost"),
        &[
            "shared_buffers = 256MB",
            "synchronous_commit = off",
            "max_wal_senders = 4",
            "max_replication_slots = 4",
            // Room for a burst of 100-row statements: best-effort events are
            // measured delivered, not lost (with the producer settings below).
            "outbox.best_effort_queue_size = '256MB'",
        ],
    );
    pg.sql("CREATE EXTENSION pg_outbox");
    for rows in [1, 100] {
        let w = if rows == 1 { "single" } else { "multi" };
        pg.sql("ALTER SYSTEM SET wal_level = replica");
        restart(&pg);
        let none = no_capture(&pg, &broker, events, rows, &format!("none_{w}"));
        let alo = pg_outbox(&pg, &broker, events, rows, &format!("alo_{w}"), "kafka-at-least-once");
        let be = pg_outbox(&pg, &broker, events, rows, &format!("be_{w}"), "kafka-best-effort");
        let poller = plpgsql_and_poller(&pg, &broker, events, rows, &format!("poll_{w}"));
        pg.sql("ALTER SYSTEM SET wal_level = logical");
        restart(&pg);
        let none_logical = no_capture(&pg, &broker, events, rows, &format!("nonel_{w}"));
        let logical = logical_decoding(&pg, &broker, events, rows, &format!("logical_{w}"));
        let l = logical.database;
        println!(
            "\ncost per delivered event: {events} rows of ~300 bytes, {}, pgbench -c 2, µs of CPU per event",
            if rows == 1 {
                "single-row INSERT transactions".to_string()
            } else {
                format!("{rows}-row INSERT statements")
            }
        );
        println!("{:<36} {:>9} {:>9} {:>9} {:>9} {:>9}", "", "database", "delivery", "ratio", "client", "broker");
        line("inserts alone, wal_level = replica", &none, l);
        line("inserts alone, wal_level = logical", &none_logical, l);
        line("pg_outbox at-least-once", &alo, l);
        line("pg_outbox best-effort", &be, l);
        line("PL/pgSQL trigger + poller", &poller, l);
        line("logical decoding (pgoutput)", &logical, l);
        println!(
            "targets: at-least-once <= 0.7 of trigger + poller (measured {:.2}) and <= 1.0 of logical decoding \
             (measured {:.2}); best-effort <= 0.5 of logical decoding (measured {:.2})",
            alo.database / poller.database,
            alo.database / l,
            be.database / l
        );
    }
    pg.stop("fast");
    let _ = std::fs::remove_dir_all(&pg.dir);
}

fn restart(pg: &Cluster) {
    pg.stop("fast");
    pg.pg_ctl_start();
    wait_for("the pg_outbox worker", Duration::from_secs(30), || pg.worker_pid());
    pg.sql("CHECKPOINT");
}
