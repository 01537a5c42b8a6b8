//! outbox.backfill(): the rows a topic's tables hold go to one destination
//! as create events, in key order, in batches between live changes, and a
//! live change is never followed by an older copy of its row; progress in
//! destination_status; a crash of the worker resumes it without sending a
//! row twice; cancel stops it; bad input is refused, leaving nothing.

use pg_outbox_test::{consume, expected_bundle, unique, wait_for, Cluster, Env, Received};
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// The destination's last backfill, once its status is `status`.
fn backfill_when(pg: &Cluster, dest: &str, status: &str) -> serde_json::Value {
    wait_for(&format!("the backfill to be {status}"), WAIT, || {
        let r = pg.status_row(dest);
        (r["backfill_status"] == status).then_some(r)
    })
}

/// Per key, the messages in the order they arrived (one partition).
fn by_key(msgs: &[Received]) -> BTreeMap<i64, Vec<&Received>> {
    let mut out: BTreeMap<i64, Vec<&Received>> = BTreeMap::new();
    for m in msgs {
        out.entry(m.key.as_deref().unwrap().parse().unwrap()).or_default().push(m);
    }
    out
}

fn v_of(m: &Received) -> Option<i64> {
    m.json()["entry"][1]["resource"]["v"].as_i64()
}

#[test]
fn a_backfill_sends_the_rows_in_key_order_between_live_changes_and_never_an_older_copy_after_one() {
    let Env { pg, broker } = Env::start(&unique("backfill"), &[]);
    let url = pg.watched_table("items", "id int PRIMARY KEY, v int NOT NULL, note text");
    // 4,000 rows before there is a destination: no event for them.
    pg.sql("INSERT INTO items SELECT g, 0, repeat('x', 200) FROM generate_series(1, 4000) g");
    let (dest, topic) = pg.destination_on(&broker, &url).create();
    let id = pg.sql(&format!("SELECT outbox.backfill('{dest}', batch => 100)"));
    assert!(id.parse::<i64>().is_ok(), "{id}");
    // Live changes while it runs: updates (v only grows), deletes, inserts
    // above the last key.
    let writer = {
        let pg = Cluster::attach(pg.dir.clone(), pg.port);
        std::thread::spawn(move || {
            let mut s = pg.session();
            for round in 0..60 {
                let k = (round * 67) % 4000 + 1;
                s.sql(&format!("UPDATE items SET v = v + 1 WHERE id BETWEEN {k} AND {} ", k + 20));
                s.sql(&format!("DELETE FROM items WHERE id = {}", (round * 131) % 4000 + 1));
                s.sql(&format!("INSERT INTO items VALUES ({}, 0, 'new')", 5000 + round));
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    let mid = wait_for("the backfill under way", WAIT, || {
        let r = pg.status_row(&dest);
        (r["backfill_rows_done"].as_i64().unwrap_or(0) > 0).then_some(r)
    });
    assert_eq!(mid["backfill_status"], "running", "{mid}");
    assert_eq!(mid["backfill_rows_total"], 4000, "{mid}");
    writer.join().unwrap();
    let done = backfill_when(&pg, &dest, "done");
    pg.wait_drained(&dest, WAIT);

    let rows: BTreeMap<i64, i64> = pg
        .sql("SELECT id || ' ' || v FROM items ORDER BY id")
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.parse().unwrap(), v.parse().unwrap())
        })
        .collect();
    let live = 60 * 3; // at most: each update touches up to 21 rows
    let msgs = consume(&broker.bootstrap(), &topic, rows.len(), WAIT, Duration::from_secs(2));
    let keys = by_key(&msgs);
    let creates = |k: &i64| keys[k].iter().filter(|m| m.header("interaction") == Some("create")).count();
    for (k, v) in &rows {
        let ms = keys.get(k).unwrap_or_else(|| panic!("nothing arrived for key {k}"));
        // The last message has the row as it is; no message after a newer one is older.
        assert_eq!(v_of(ms.last().unwrap()), Some(*v), "key {k}");
        let vs: Vec<i64> = ms.iter().filter_map(|m| v_of(m)).collect();
        assert!(vs.windows(2).all(|w| w[0] <= w[1]), "key {k}: an older copy came after a newer one: {vs:?}");
        if *k <= 4000 {
            assert_eq!(creates(k), 1, "key {k}: one backfilled copy");
        } else {
            assert!((1..=2).contains(&creates(k)), "key {k}: its own create, and maybe a backfilled copy");
        }
    }
    // A deleted row: nothing after its delete.
    for (k, ms) in &keys {
        if let Some(p) = ms.iter().position(|m| m.header("interaction") == Some("delete")) {
            assert!(!rows.contains_key(k), "key {k} is deleted once");
            assert_eq!(p, ms.len() - 1, "key {k}: a message after its delete");
        }
    }
    // In key order: the backfilled copies of the first rows arrive by key.
    let first: Vec<i64> = msgs
        .iter()
        .filter(|m| m.header("interaction") == Some("create"))
        .map(|m| m.key.as_deref().unwrap().parse().unwrap())
        .filter(|k| *k <= 4000)
        .collect();
    assert!(first.windows(2).all(|w| w[0] < w[1]), "backfilled rows out of key order");
    let sent = done["backfill_rows_done"].as_i64().unwrap();
    let backfilled_old = first.len() as i64;
    assert!(sent >= backfilled_old && sent <= backfilled_old + live, "{done}: {backfilled_old} old rows sent");
    assert_eq!(done["backfill_rows_total"], 4000, "{done}");
    // A backfilled message is the create event the row's insert would have sent.
    let m = keys[&4000].iter().find(|m| m.header("interaction") == Some("create")).unwrap();
    let second = format!(
        r#"{{"resource":{{"id":4000,"v":{},"note":"{}"}},"request":{{"method":"POST","url":"/items"}}}}"#,
        v_of(m).unwrap(),
        "x".repeat(200)
    );
    assert_eq!(m.payload, expected_bundle(m, &url, &dest, "items/4000", Some(&second)));
    assert_eq!(m.header("source-table"), Some("public.items"));
    // $status keeps Aidbox's parameters: the backfill is in the view only.
    let status = pg.sql(&format!("SELECT outbox.status('{dest}')"));
    assert!(!status.contains("backfill"), "{status}");
}

/// The race FOR SHARE closes: a change commits after the batch's snapshot
/// but before the batch commits, numbered before the copy. The predicate
/// sleeps at that row in the batch's locking read so the change can commit
/// meanwhile; without the row lock the batch would send the row as it was
/// before the change, after it.
#[test]
fn a_change_committed_while_a_batch_reads_its_row_is_not_followed_by_the_older_row() {
    let Env { pg, broker } = Env::start(&unique("backfill_race"), &[]);
    let url = pg.watched_table("items", "id int PRIMARY KEY, v int NOT NULL");
    pg.sql("INSERT INTO items SELECT g, 0 FROM generate_series(1, 20) g");
    let (dest, topic) = pg.destination_on(&broker, &url).create();
    let mut change = pg.session();
    change.sql("BEGIN");
    change.sql("UPDATE items SET v = 1 WHERE id = 7"); // its event is numbered now
                                                       // The predicate's third look at row 7 sleeps: backfill()'s count, the
                                                       // batch's bound, then its locking read.
    pg.sql("CREATE SEQUENCE probe");
    pg.sql(&format!(
        "SELECT outbox.backfill('{dest}', \"where\" => \
           'NEW.id <> 7 OR pg_sleep(CASE nextval(''public.probe'') WHEN 3 THEN 2 ELSE 0 END) IS NOT NULL')"
    ));
    // Sleeping at row 7 in the batch's locking read; or, had the sleep
    // passed unseen, waiting for the change's row lock: commit either way.
    wait_for("the batch to read row 7", WAIT, || {
        (pg.count(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_outbox' \
               AND (wait_event = 'PgSleep' OR wait_event_type = 'Lock')",
        ) == 1)
            .then_some(())
    });
    change.sql("COMMIT");
    backfill_when(&pg, &dest, "done");
    let msgs = consume(&broker.bootstrap(), &topic, 21, WAIT, Duration::from_secs(2));
    let seven: Vec<(Option<&str>, Option<i64>)> =
        by_key(&msgs)[&7].iter().map(|m| (m.header("interaction"), v_of(m))).collect();
    assert_eq!(seven, [(Some("update"), Some(1)), (Some("create"), Some(1))], "row 7");
    assert_eq!(msgs.len(), 21, "20 copies and the update");
}

#[test]
fn a_killed_worker_resumes_the_backfill_without_sending_a_row_twice_and_cancel_stops_one() {
    let Env { pg, broker } = Env::start(&unique("backfill_crash"), &[]);
    // Two tables, one with a composite key and criteria, one with a predicate.
    pg.sql("CREATE TABLE a (g int, n int, v text, PRIMARY KEY (g, n)); CREATE TABLE b (id bigint PRIMARY KEY, v text)");
    pg.sql(
        "INSERT INTO a SELECT g % 7, g, 'a' || g FROM generate_series(1, 3000) g; \
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 3000) g",
    );
    let url = "urn:backfill-two";
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('{url}', '[{{"table": "a", "interactions": ["create", "update"], "criteria": "NEW.n % 2 = 0"}}, {{"table": "b"}}]')"#
    ));
    let (dest, topic) = pg.destination_on(&broker, url).content("id-only").create();
    pg.sql(&format!("SELECT outbox.backfill('{dest}', batch => 20, \"where\" => 'NEW.v NOT LIKE ''%5''')"));
    // Crash the worker twice while it runs (or once, if it is that quick).
    let mut last = 0;
    for _ in 0..2 {
        let running = wait_for("more rows sent", WAIT, || {
            let r = pg.status_row(&dest);
            let done = r["backfill_rows_done"].as_i64().unwrap_or(0);
            match r["backfill_status"].as_str() {
                Some("running") if done > last => Some(Some(done)),
                Some("done") => Some(None),
                _ => None,
            }
        });
        let Some(done) = running else { break };
        last = done;
        pg.kill_worker();
    }
    assert!(last > 0, "the worker was killed during the backfill");
    let done = backfill_when(&pg, &dest, "done");
    // a: even n, v not ending in 5 (n ending in 5 is odd anyway): 1,500; b: 2,700.
    assert_eq!(done["backfill_rows_total"], 4200, "{done}");
    assert_eq!(done["backfill_rows_done"], 4200, "{done}");
    pg.wait_drained(&dest, WAIT);
    let msgs = consume(&broker.bootstrap(), &topic, 4200, WAIT, Duration::from_secs(2));
    // At least once across the crashes; each row's event is in the outbox once.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in &msgs {
        let focus = m.json()["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"]
            .as_str()
            .unwrap()
            .to_string();
        *seen.entry(focus).or_default() += 1;
    }
    assert_eq!(seen.len(), 4200, "every row arrived");
    let numbers: std::collections::BTreeSet<&str> = msgs.iter().filter_map(|m| m.header("event-number")).collect();
    assert_eq!(numbers.len(), 4200, "one event per row: resends after a crash carry the same number");
    // Tables in name order, each in key order: a's (g, n) keys, then b's.
    let refs: Vec<&str> = msgs.iter().map(|m| m.header("source-table").unwrap()).collect();
    let switch = refs.iter().position(|t| *t == "public.b").unwrap();
    assert!(refs[..switch].iter().all(|t| *t == "public.a"));

    // Cancel: a big batch count and a slow destination do not matter.
    pg.sql(&format!("SELECT outbox.pause_destination('{dest}')"));
    let id2 = pg.sql(&format!("SELECT outbox.backfill('{dest}', batch => 10)"));
    let row = pg.status_row(&dest);
    assert_eq!(row["backfill_status"], "running", "{row}");
    assert_eq!(row["backfill_rows_done"], 0, "paused: nothing sent");
    let busy = pg.sql_err(&format!("SELECT outbox.backfill('{dest}')"));
    assert_eq!(busy.sqlstate, "55006", "{busy:?}");
    assert_eq!(pg.sql(&format!("SELECT outbox.cancel_backfill('{dest}')")), "t");
    assert_eq!(pg.sql(&format!("SELECT outbox.cancel_backfill('{dest}')")), "f");
    assert_eq!(
        pg.sql(&format!("SELECT status || ' ' || (finished_at IS NOT NULL) FROM outbox.backfill WHERE id = {id2}")),
        "cancelled true"
    );
    pg.sql(&format!("SELECT outbox.resume_destination('{dest}')"));
    let after = consume(&broker.bootstrap(), &topic, msgs.len() + 1, Duration::from_secs(6), Duration::from_secs(6));
    assert_eq!(after.len(), msgs.len(), "nothing sent after the cancel");
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.event WHERE destination_id = '{dest}'")), 0);
    let row = pg.status_row(&dest);
    assert_eq!((row["backfill_status"].as_str(), row["backfill_rows_done"].as_i64()), (Some("cancelled"), Some(0)));
}

/// The batches read the rows as the table's owner (here the predicate
/// holds only for it: the caller's count saw 10 rows, the batches send all
/// 30), and `where` stays one expression whatever its parentheses: written
/// into the WHERE clause as it is, "a) OR (b" would leave the key range out
/// and send the first rows again and again.
#[test]
fn a_backfill_reads_as_the_table_owner_and_its_where_stays_one_expression() {
    let Env { pg, broker } = Env::start(&unique("backfill_owner"), &[]);
    pg.sql(
        "CREATE ROLE bf_owner; CREATE TABLE owned (id int PRIMARY KEY, v int); ALTER TABLE owned OWNER TO bf_owner; \
         INSERT INTO owned SELECT g, 0 FROM generate_series(1, 30) g",
    );
    pg.sql("SELECT outbox.create_topic('urn:owned', '[{\"table\": \"owned\"}]')");
    let (dest, topic) = pg.destination_on(&broker, "urn:owned").create();
    pg.sql(&format!(
        "SELECT outbox.backfill('{dest}', batch => 5, \"where\" => 'current_user = ''bf_owner'') OR (NEW.id <= 10')"
    ));
    let done = backfill_when(&pg, &dest, "done");
    assert_eq!((done["backfill_rows_total"].as_i64(), done["backfill_rows_done"].as_i64()), (Some(10), Some(30)));
    pg.wait_drained(&dest, WAIT);
    let msgs = consume(&broker.bootstrap(), &topic, 30, WAIT, Duration::from_secs(1));
    let keys: Vec<i64> = msgs.iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(keys, (1..=30).collect::<Vec<i64>>());
}

#[test]
fn bad_backfills_are_refused_with_a_hint_and_leave_nothing() {
    let Env { pg, broker } = Env::start(&unique("backfill_bad"), &[]);
    let url = pg.watched_table("t", "id int PRIMARY KEY, v int");
    pg.sql("INSERT INTO t VALUES (1, 1)");
    let (dest, _) = pg.destination_on(&broker, &url).create();
    let (be, _) = pg.destination_on(&broker, &url).best_effort().create();
    pg.sql("CREATE TABLE nokey (v int); SELECT outbox.create_topic('urn:nokey', '[{\"table\": \"nokey\"}]')");
    let (nokey, _) = pg.destination_on(&broker, "urn:nokey").create();
    pg.sql("CREATE TABLE upd (id int PRIMARY KEY); SELECT outbox.create_topic('urn:upd', '[{\"table\": \"upd\", \"interactions\": [\"update\"]}]')");
    let (upd, _) = pg.destination_on(&broker, "urn:upd").create();
    pg.sql("CREATE ROLE plain LOGIN; GRANT EXECUTE ON FUNCTION outbox.backfill(text, text, integer) TO plain");
    let cases: Vec<(String, &str, &str)> = vec![
        ("SELECT outbox.backfill('nope')".into(), "42704", "does not exist"),
        (format!("SELECT outbox.backfill('{be}')"), "0A000", "best-effort"),
        (
            format!("SELECT outbox.backfill('{dest}', \"where\" => 'NEW.missing > 1')"),
            "42703",
            "invalid backfill predicate",
        ),
        (format!("SELECT outbox.backfill('{dest}', \"where\" => '1')"), "42804", "invalid backfill predicate"),
        (
            format!("SELECT outbox.backfill('{dest}', \"where\" => 'true; DROP TABLE t')"),
            "42601",
            "invalid backfill predicate",
        ),
        (
            format!("SELECT outbox.backfill('{dest}', \"where\" => 'true); DROP TABLE t; SELECT (true')"),
            "42601",
            "invalid backfill predicate",
        ),
        (format!("SELECT outbox.backfill('{dest}', \"where\" => ' ')"), "22023", "empty"),
        (format!("SELECT outbox.backfill('{dest}', batch => 0)"), "22023", "batch"),
        (format!("SELECT outbox.backfill('{dest}', batch => 10001)"), "22023", "batch"),
        (format!("SELECT outbox.backfill('{nokey}')"), "0A000", "no primary key"),
        (format!("SELECT outbox.backfill('{upd}')"), "0A000", "create"),
        (format!("SET ROLE plain; SELECT outbox.backfill('{dest}')"), "42501", "superusers"),
    ];
    for (sql, code, words) in cases {
        let e = pg.sql_err(&sql);
        assert_eq!(e.sqlstate, code, "{sql}: {e:?}");
        assert!(e.message.contains(words), "{sql}: {e:?}");
        assert!(e.hint.as_deref().is_some_and(|h| !h.is_empty()) || code == "42704", "{sql}: no hint: {e:?}");
    }
    assert_eq!(pg.count("SELECT count(*) FROM outbox.backfill"), 0);
    assert_eq!(pg.count("SELECT count(*) FROM t"), 1, "the table is still there");
    assert!(pg.status_row(&dest)["backfill_status"].is_null());
    assert_eq!(pg.sql(&format!("SELECT outbox.cancel_backfill('{dest}')")), "f");
    pg.sql("REVOKE ALL ON FUNCTION outbox.backfill(text, text, integer) FROM plain; DROP ROLE plain");
}
