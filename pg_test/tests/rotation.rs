//! The outbox's partitions take turns and are emptied with TRUNCATE
//! (src/worker/rotate.rs): bounded under a snapshot held open, never
//! emptied under a transaction that wrote into it or reads it, and no event
//! is lost across rotations.

use pg_outbox_test::{keys, unique, Cluster, Env};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

/// The relfilenode of each partition: TRUNCATE gives a partition a new one.
fn filenodes(pg: &Cluster) -> Vec<String> {
    (0..3).map(|p| pg.sql(&format!("SELECT pg_relation_filenode('outbox.event_{p}')"))).collect()
}

/// A cluster rotating every second, a table `stream` watched by an
/// at-least-once destination: (the environment, destination, Kafka topic).
fn start(name: &str) -> (Env, String, String) {
    let env = Env::start(&unique(name), &["outbox.rotation_interval = '1s'"]);
    let url = env.pg.watched_table("stream", "id bigint PRIMARY KEY, pad text");
    let (dest, topic) = env.pg.destination_on(&env.broker, &url).create();
    (env, dest, topic)
}

/// Heap bytes of each partition.
fn sizes(pg: &Cluster) -> Vec<i64> {
    (0..3).map(|p| pg.count(&format!("SELECT pg_relation_size('outbox.event_{p}')"))).collect()
}

/// Rows `from..=to` in statements of `per` rows, one every `pause`.
fn write(pg: &Cluster, from: i64, to: i64, per: i64, pause: Duration) {
    let mut k = from;
    while k <= to {
        let hi = (k + per - 1).min(to);
        pg.sql(&format!("INSERT INTO stream SELECT g, repeat('x', 200) FROM generate_series({k}, {hi}) g"));
        k = hi + 1;
        std::thread::sleep(pause);
    }
}

/// A REPEATABLE READ snapshot held open throughout, and a writer whose
/// transaction stays open across several rotations: the other two
/// partitions take turns and are emptied meanwhile, then every partition is
/// emptied (new relfilenode) while the snapshot is held, the outbox ends
/// no larger than one partition's worth, the late writer's event is not
/// truncated away, and every committed key arrives.
#[test]
fn partitions_rotate_and_empty_under_a_held_snapshot_and_lose_nothing() {
    let (Env { pg, broker }, dest, topic) = start("rot_snapshot");
    pg.sql("CREATE TABLE other (x int)");
    let mut holder = pg.session();
    holder.sql("BEGIN ISOLATION LEVEL REPEATABLE READ");
    holder.sql("SELECT count(*) FROM other");
    // Committed after the snapshot: the holder must never see it.
    pg.sql("INSERT INTO other VALUES (1)");
    let mut late = pg.session();
    late.sql("BEGIN");
    late.sql("INSERT INTO stream VALUES (0, 'late')");
    // The partition it wrote into, by the lock it holds (a query of the
    // outbox in its transaction would lock every partition).
    let late_pid = late.sql("SELECT pg_backend_pid()");
    let locked = pg.sql(&format!(
        "SELECT string_agg(c.relname, ',') FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
          WHERE l.pid = {late_pid} AND c.relname ~ '^event_[0-9]$'"
    ));
    let late_part: usize = locked
        .strip_prefix("event_")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the writer should lock exactly the partition it wrote into, locks {locked:?}"));
    let before = filenodes(&pg);

    write(&pg, 1, 6000, 100, Duration::from_millis(50));
    // Until both other partitions were emptied: writers pass over the late
    // writer's, which is never emptied while it is open.
    let emptied = |now: &[String]| -> Vec<bool> { before.iter().zip(now).map(|(a, b)| a != b).collect() };
    let started = Instant::now();
    let mut extra = 100_000;
    loop {
        let now = emptied(&filenodes(&pg));
        assert!(!now[late_part], "the partition a writer still writes into was emptied");
        if (0..3).all(|p| p == late_part || now[p]) {
            break;
        }
        assert!(started.elapsed() < WAIT, "the partitions beside a held one did not take turns: emptied {now:?}");
        write(&pg, extra, extra, 1, Duration::from_millis(200));
        extra += 1;
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(!emptied(&filenodes(&pg))[late_part], "the partition a writer still writes into was emptied");
    late.sql("COMMIT");
    // Then every partition is emptied in turn.
    let started = Instant::now();
    while !emptied(&filenodes(&pg)).iter().all(|e| *e) {
        assert!(started.elapsed() < WAIT, "not every partition was emptied");
        write(&pg, extra, extra, 1, Duration::from_millis(200));
        extra += 1;
    }
    let committed: BTreeSet<i64> = pg.sql("SELECT id FROM stream").lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(committed.len() as i64, 6001 + extra - 100_000);
    assert_eq!(keys(&broker.bootstrap(), &topic, committed.len()), committed);
    pg.wait_drained(&dest, WAIT);

    // With the snapshot still held, delivered events leave no dead rows
    // behind but in the partition writers are on.
    let started = Instant::now();
    loop {
        let s = sizes(&pg);
        if s.iter().filter(|b| **b == 0).count() >= 2 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the outbox was not emptied under a held snapshot: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pg.count("SELECT count(*) FROM other"), 1);
    assert_eq!(holder.count("SELECT count(*) FROM other"), 0, "the snapshot was held throughout");
    holder.sql("COMMIT");
}

/// A transaction that read the outbox holds its partitions: none is emptied
/// until it ends, delivery goes on meanwhile, and they are emptied after.
#[test]
fn a_reader_of_the_outbox_holds_truncation_off_but_not_delivery() {
    let (Env { pg, broker }, dest, topic) = start("rot_reader");
    // The partitions store a group's arrays as the parent says (out of line, uncompressed).
    let external =
        "SELECT count(*) FROM pg_attribute a JOIN pg_partition_tree('outbox.event') p ON p.relid = a.attrelid \
                     WHERE p.isleaf AND a.attname IN ('ids', 'keys', 'rows') AND a.attstorage = 'e'";
    assert_eq!(pg.count(external), 9);
    let mut reader = pg.session();
    reader.sql("BEGIN");
    reader.sql("SELECT count(*) FROM outbox.pending");
    let before = filenodes(&pg);
    write(&pg, 1, 3000, 100, Duration::from_millis(100));
    assert_eq!(keys(&broker.bootstrap(), &topic, 3000), (1..=3000).collect::<BTreeSet<i64>>());
    pg.wait_drained(&dest, WAIT);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(filenodes(&pg), before, "a partition was emptied under a reader's lock");
    assert!(sizes(&pg).iter().filter(|b| **b > 0).count() >= 2, "writers moved across partitions");
    reader.sql("COMMIT");
    let started = Instant::now();
    while sizes(&pg).iter().filter(|b| **b == 0).count() < 2 {
        assert!(started.elapsed() < WAIT, "the partitions were not emptied after the reader ended");
        std::thread::sleep(Duration::from_millis(200));
    }
}
