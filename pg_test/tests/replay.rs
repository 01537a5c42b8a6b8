//! Retention and outbox.replay(): a destination with a retention keeps what
//! it delivered (outbox.delivered) and sends it again on request, with the
//! same event numbers and bytes; what is older than the retention goes.

use pg_outbox_test::{by_event_number, consume, unique, wait_for, Env};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn kept_events_are_replayed_since_a_time_as_they_were_and_go_once_past_the_retention() {
    let Env { pg, broker } = Env::start(&unique("replay"), &[]);
    let url = pg.watched_table("orders", "id int PRIMARY KEY, v int");
    let (dest, topic) = pg.destination_on(&broker, &url).create();
    assert_eq!(pg.sql(&format!("SELECT outbox.alter_destination('{dest}', retention => '1 hour')")), dest);
    for k in 1..=5 {
        pg.sql(&format!("INSERT INTO orders VALUES ({k}, 0)"));
    }
    pg.wait_drained(&dest, WAIT);
    std::thread::sleep(Duration::from_millis(50));
    let since = pg.sql("SELECT now()");
    std::thread::sleep(Duration::from_millis(50));
    pg.sql("INSERT INTO orders SELECT g, 0 FROM generate_series(6, 10) g"); // one group of 5
    pg.sql("UPDATE orders SET v = 1 WHERE id IN (1, 7)");
    pg.wait_drained(&dest, WAIT);
    let first = by_event_number(consume(&broker.bootstrap(), &topic, 12, WAIT, Duration::from_secs(1)));
    assert_eq!(first.len(), 12);
    let kept = |sql: &str| pg.count(&format!("SELECT {sql} FROM outbox.delivered WHERE destination_id = '{dest}'"));
    wait_for("the deliveries kept", WAIT, || (kept("coalesce(sum(events), 0)") == 12).then_some(()));
    assert_eq!(kept("count(*)"), 5 + 1 + 1, "a group (the INSERT's, the UPDATE's) is kept as one row");

    assert_eq!(pg.sql(&format!("SELECT outbox.replay('{dest}', since => '{since}')")), "7");
    let all = consume(&broker.bootstrap(), &topic, 19, WAIT, Duration::from_secs(2));
    assert_eq!(all.len(), 19, "7 sent again");
    // The replayed ones are the events since `since`, as they were sent.
    let again = &all[12..];
    for m in again {
        let original = first.iter().find(|o| o.header("event-number") == m.header("event-number")).unwrap();
        assert!(original.header("event-number").unwrap().parse::<i64>().unwrap() > 5);
        assert_eq!(m.payload, original.payload);
        assert_eq!(m.key, original.key);
        assert_eq!(m.headers, original.headers);
    }
    pg.wait_drained(&dest, WAIT);
    wait_for("kept again once delivered", WAIT, || (kept("coalesce(sum(events), 0)") == 12).then_some(()));
    assert_eq!(pg.sql(&format!("SELECT outbox.replay('{dest}', since => now())")), "0");

    // Past the retention: pruned by the worker.
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', retention => '1 second')"));
    wait_for("the kept events to expire", Duration::from_secs(30), || (kept("count(*)") == 0).then_some(()));
    // '0': nothing is kept any more, replay says so.
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', retention => '0')"));
    pg.sql("INSERT INTO orders VALUES (11, 0)");
    pg.wait_drained(&dest, WAIT);
    assert_eq!(kept("count(*)"), 0);
    let e = pg.sql_err(&format!("SELECT outbox.replay('{dest}', since => now() - interval '1 day')"));
    assert_eq!(e.sqlstate, "55000", "{e:?}");
    assert!(e.hint.unwrap_or_default().contains("retention =>"));
}

/// A group with a poison event is split (librdkafka refuses the event at
/// once, before any of the group is acknowledged): its other events are
/// delivered and kept one by one; the poison one is a dead letter, not kept.
#[test]
fn a_split_group_keeps_what_was_delivered_of_it() {
    let Env { pg, broker } = Env::start(&unique("replay_split"), &[]);
    let url = pg.watched_table("docs", "id int PRIMARY KEY, body text");
    let (dest, topic) = pg.destination_on(&broker, &url).params(serde_json::json!({"maxRequestSize": 1000})).create();
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', retention => '1 day')"));
    pg.sql(
        "INSERT INTO docs SELECT g, CASE WHEN g = 5 THEN repeat('x', 5000) ELSE 'ok' END FROM generate_series(1, 10) g",
    );
    wait_for("the dead letter", WAIT, || (pg.count("SELECT count(*) FROM outbox.dead_letter") == 1).then_some(()));
    pg.wait_drained(&dest, WAIT);
    assert_eq!(consume(&broker.bootstrap(), &topic, 9, WAIT, Duration::from_secs(1)).len(), 9);
    let kept = pg.sql(&format!(
        "SELECT string_agg(k, ',' ORDER BY k::int) FROM outbox.delivered d, \
                LATERAL unnest(coalesce(d.keys, ARRAY[d.key])) k WHERE d.destination_id = '{dest}'"
    ));
    assert_eq!(kept, "1,2,3,4,6,7,8,9,10");
    assert_eq!(pg.sql(&format!("SELECT outbox.replay('{dest}', now() - interval '1 hour')")), "9");
    assert_eq!(consume(&broker.bootstrap(), &topic, 18, WAIT, Duration::from_secs(1)).len(), 18);
}

#[test]
fn bad_retentions_and_replays_are_refused_with_a_hint() {
    let Env { pg, broker } = Env::start(&unique("replay_bad"), &[]);
    let url = pg.watched_table("t", "id int PRIMARY KEY");
    let (dest, _) = pg.destination_on(&broker, &url).create();
    let (be, _) = pg.destination_on(&broker, &url).best_effort().create();
    let cases = [
        (format!("SELECT outbox.alter_destination('{be}', retention => '1 day')"), "0A000", "best-effort"),
        (format!("SELECT outbox.alter_destination('{dest}', retention => '-1 day')"), "22023", "positive"),
        (
            format!(
                "SELECT outbox.create_destination('x1', '{url}', 'kafka-best-effort', \
                 '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"127.0.0.1:1\"}}', retention => '1 day')"
            ),
            "0A000",
            "best-effort",
        ),
        ("SELECT outbox.replay('nope', now())".to_string(), "42704", "does not exist"),
        (format!("SELECT outbox.replay('{dest}', NULL)"), "22004", "time"),
        (format!("SELECT outbox.replay('{dest}', now())"), "55000", "keeps no delivered events"),
    ];
    for (sql, code, words) in cases {
        let e = pg.sql_err(&sql);
        assert_eq!(e.sqlstate, code, "{sql}: {e:?}");
        assert!(e.message.contains(words), "{sql}: {e:?}");
        assert!(e.hint.as_deref().is_some_and(|h| !h.is_empty()), "{sql}: no hint: {e:?}");
    }
    assert_eq!(pg.count("SELECT count(*) FROM outbox.destination WHERE id = 'x1' OR retention IS NOT NULL"), 0);
}
