//! The extension's life on a server: the `outbox.max_destinations` limit,
//! `ALTER EXTENSION pg_outbox UPDATE` from the previous release with events
//! waiting, and `pg_dump` / `pg_restore` into a fresh cluster. Each test
//! brings its own cluster (their settings and extension versions differ).

use pg_outbox_test::{consume, wait_for, Env};
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn keys(bootstrap: &str, topic: &str, min: usize) -> BTreeSet<i64> {
    consume(bootstrap, topic, min, WAIT, Duration::from_millis(1000))
        .iter()
        .map(|m| m.key.as_deref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn max_destinations_sizes_the_slots_and_its_limit_names_the_setting() {
    let env = Env::start("max_destinations", &["outbox.max_destinations = 2"]);
    let pg = &env.pg;
    assert_eq!(pg.sql("SHOW outbox.max_destinations"), "2");
    let url = pg.watched_table("limited", "id int PRIMARY KEY");
    let (a, topic_a) = pg.destination_on(&env.broker, &url).create();
    let (b, topic_b) = pg.destination_on(&env.broker, &url).create();
    let err = pg.sql_err(&format!(
        "SELECT outbox.create_destination('third', '{url}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"t\"}}')"
    ));
    assert_eq!(err.sqlstate, "54000");
    assert_eq!(err.message, "cannot create destination \"third\": at most 2 destinations (outbox.max_destinations)");
    assert!(err.hint.unwrap().contains("raise outbox.max_destinations and restart"));
    assert_eq!(pg.count("SELECT count(*) FROM outbox.destination"), 2);
    pg.sql("INSERT INTO limited VALUES (1)");
    assert_eq!(keys(&env.broker.bootstrap(), &topic_a, 1), BTreeSet::from([1]));
    assert_eq!(keys(&env.broker.bootstrap(), &topic_b, 1), BTreeSet::from([1]));

    // Fewer slots than destinations after a restart: the worker serves what
    // fits and says which setting holds the rest back.
    pg.sql("ALTER SYSTEM SET outbox.max_destinations = 1");
    pg.stop("fast");
    pg.pg_ctl_start();
    assert_eq!(pg.sql("SHOW outbox.max_destinations"), "1");
    let warning = "status slots (outbox.max_destinations) are in use";
    wait_for("the worker's warning", WAIT, || {
        std::fs::read_to_string(pg.log_path()).unwrap_or_default().contains(warning).then_some(())
    });
    pg.sql("INSERT INTO limited VALUES (2)");
    let waiting = format!("SELECT count(*) FROM outbox.event WHERE destination_id IN ('{a}', '{b}')");
    wait_for("one destination to deliver", WAIT, || (pg.count(&waiting) == 1).then_some(()));
}
