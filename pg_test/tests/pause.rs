//! pause_destination / resume_destination: a paused at-least-once
//! destination keeps its events in the outbox and delivers them in order on
//! resume; a paused best-effort one counts its events lost; the pause is
//! configuration, so it survives the worker's crash.

use pg_outbox_test::{by_event_number, consume, unique, wait_for, Env};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn status(pg: &pg_outbox_test::Cluster, dest: &str) -> String {
    let s: serde_json::Value = serde_json::from_str(&pg.sql(&format!("SELECT outbox.status('{dest}')"))).unwrap();
    let p = s["parameter"].as_array().unwrap();
    p.iter().find(|x| x["name"] == "status").unwrap()["valueString"].as_str().unwrap().to_string()
}

#[test]
fn a_paused_at_least_once_destination_keeps_its_events_and_delivers_them_in_order_on_resume() {
    let Env { pg, broker } = Env::start(&unique("pause_alo"), &[]);
    let url = pg.watched_table("orders", "id int PRIMARY KEY, v int");
    let (dest, topic) = pg.destination_on(&broker, &url).create();
    pg.sql("INSERT INTO orders SELECT g, 0 FROM generate_series(1, 20) g");
    pg.wait_drained(&dest, WAIT);
    assert_eq!(pg.sql(&format!("SELECT outbox.pause_destination('{dest}')")), "t");
    assert_eq!(pg.sql(&format!("SELECT outbox.pause_destination('{dest}')")), "f", "already paused");
    assert_eq!(pg.status_row(&dest)["status"], "paused");
    assert_eq!(status(&pg, &dest), "paused");
    // Changes go on; they wait in the outbox, also through a worker crash.
    pg.sql("INSERT INTO orders SELECT g, 0 FROM generate_series(21, 50) g");
    pg.sql("UPDATE orders SET v = 1 WHERE id <= 10");
    pg.kill_worker();
    // The restarted worker serves the destination (and keeps it paused).
    wait_for("the restarted worker", WAIT, || (!pg.status_row(&dest)["start_timestamp"].is_null()).then_some(()));
    pg.sql("UPDATE orders SET v = 2 WHERE id <= 5");
    let early = consume(&broker.bootstrap(), &topic, 21, Duration::from_secs(4), Duration::from_secs(4));
    assert_eq!(early.len(), 20, "nothing is delivered while paused");
    let row = pg.status_row(&dest);
    assert_eq!(row["messages_queued"], 45, "{row}");
    assert_eq!(row["status"], "paused", "{row}");
    assert!(pg.sql(&format!("SELECT paused_at IS NOT NULL FROM outbox.destination WHERE id = '{dest}'")) == "t");

    assert_eq!(pg.sql(&format!("SELECT outbox.resume_destination('{dest}')")), "t");
    assert_eq!(pg.sql(&format!("SELECT outbox.resume_destination('{dest}')")), "f", "already delivering");
    let all = by_event_number(consume(&broker.bootstrap(), &topic, 65, WAIT, Duration::from_secs(1)));
    assert_eq!(all.len(), 65);
    // Per key, the changes arrive in the order they were made.
    for k in 1..=10 {
        let versions: Vec<i64> = all
            .iter()
            .filter(|m| m.key.as_deref() == Some(&k.to_string()))
            .map(|m| m.json()["entry"][1]["resource"]["v"].as_i64().unwrap())
            .collect();
        let expected: &[i64] = if k <= 5 { &[0, 1, 2] } else { &[0, 1] };
        assert_eq!(versions, expected, "key {k}");
    }
    pg.wait_drained(&dest, WAIT);
    let row = wait_for("active again", WAIT, || {
        let r = pg.status_row(&dest);
        (r["status"] == "active").then_some(r)
    });
    assert_eq!(row["messages_queued"], 0, "{row}");
}

#[test]
fn a_paused_best_effort_destination_counts_its_events_lost_and_delivers_after_resume() {
    let Env { pg, broker } = Env::start(&unique("pause_be"), &[]);
    let url = pg.watched_table("clicks", "id int PRIMARY KEY");
    let (dest, topic) = pg.destination_on(&broker, &url).best_effort().create();
    pg.sql("CREATE SEQUENCE probe START 100");
    pg.sql("INSERT INTO clicks SELECT g FROM generate_series(1, 5) g");
    assert_eq!(consume(&broker.bootstrap(), &topic, 5, WAIT, Duration::from_millis(500)).len(), 5);
    // One event at a time until one is lost: the worker read the pause.
    let probe_until = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        wait_for(what, WAIT, || {
            pg.sql("INSERT INTO clicks VALUES (nextval('probe'))");
            std::thread::sleep(Duration::from_millis(200));
            let r = pg.status_row(&dest);
            done(&r).then_some(r)
        })
    };
    pg.sql(&format!("SELECT outbox.pause_destination('{dest}')"));
    probe_until("the pause to be served", &|r| r["messages_lost"].as_i64().unwrap() > 0);
    // The last probes' outcomes are counted: the counters stay still.
    let mut paused = pg.status_row(&dest);
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = pg.status_row(&dest);
        let same = |c: &str| now[c] == paused[c];
        if same("messages_lost") && same("messages_delivered") {
            break;
        }
        paused = now;
    }
    pg.sql("INSERT INTO clicks SELECT g FROM generate_series(1001, 1010) g");
    let lost = paused["messages_lost"].as_i64().unwrap() + 10;
    let row = wait_for("10 more lost", WAIT, || {
        let r = pg.status_row(&dest);
        (r["messages_lost"] == lost).then_some(r)
    });
    assert_eq!(row["status"], "paused", "{row}");
    assert_eq!(row["messages_delivered"], paused["messages_delivered"], "{row}");
    assert!(row["last_errors"][0]["message"].as_str().unwrap().contains("paused"), "{row}");
    assert_eq!(pg.count("SELECT count(*) FROM outbox.event"), 0, "best-effort events are not stored");

    pg.sql(&format!("SELECT outbox.resume_destination('{dest}')"));
    pg.sql("ALTER SEQUENCE probe RESTART 2000");
    let delivered_before = paused["messages_delivered"].as_i64().unwrap();
    let resumed =
        probe_until("delivery after resume", &|r| r["messages_delivered"].as_i64().unwrap() > delivered_before);
    assert_eq!(resumed["status"], "active", "{resumed}");
    let delivered = resumed["messages_delivered"].as_i64().unwrap() as usize;
    let msgs = consume(&broker.bootstrap(), &topic, delivered, WAIT, Duration::from_millis(1000));
    let keys: Vec<i64> = msgs.iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(keys.len(), delivered, "{keys:?}");
    assert!(!keys.iter().any(|k| (1001..=1010).contains(k)), "what came while paused never arrives: {keys:?}");
    assert!(keys.iter().any(|k| *k >= 2000), "delivery after resume: {keys:?}");
}

#[test]
fn pausing_an_unknown_destination_is_refused_with_a_hint() {
    let Env { pg, .. } = Env::start(&unique("pause_err"), &[]);
    for sql in ["SELECT outbox.pause_destination('nope')", "SELECT outbox.resume_destination(NULL)"] {
        let err = pg.sql_err(sql);
        assert_eq!(err.sqlstate, "42704", "{}", err.raw);
        assert!(err.message.contains("does not exist"), "{}", err.raw);
        assert!(err.hint.as_deref().is_some_and(|h| h.contains("outbox.destination")), "{}", err.raw);
    }
}
