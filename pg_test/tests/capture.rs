//! What a change becomes in the outbox and then in Kafka: a topic's criteria
//! and interactions, rollbacks and savepoints, statements, COPY and read-only
//! commits in change order, writers without rights on the outbox, and
//! partitions attached after the topic was created. The tests share one
//! cluster and broker and use their own tables and topics.

use pg_outbox_test::{consume, unique, Env, Received, Stream};
use std::sync::OnceLock;
use std::time::Duration;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("capture", &[]))
}

const WAIT: Duration = Duration::from_secs(30);

fn expected_bundle(s: &Stream, m: &Received, reference: &str, second: Option<String>) -> String {
    pg_outbox_test::expected_bundle(m, &s.url, &s.dest, reference, second.as_deref())
}

#[test]
fn criteria_filter_rows_and_interactions_filter_operations() {
    let s = env().stream(
        "id int PRIMARY KEY, status text",
        r#""interactions": ["create", "update"], "criteria": "NEW.status IN (''completed'', ''amended'')""#,
        "id-only",
    );
    let pg = &env().pg;
    pg.sql(&format!(
        "INSERT INTO {t} VALUES (1, 'draft'), (2, 'completed'), (3, 'amended'), (4, 'in-progress'); \
         UPDATE {t} SET status = 'completed' WHERE id = 1; \
         UPDATE {t} SET status = 'draft' WHERE id = 2; \
         DELETE FROM {t} WHERE id = 3",
        t = s.table
    ));
    let msgs = s.received(3, WAIT);
    let got: Vec<(String, String)> =
        msgs.iter().map(|m| (m.key.clone().unwrap(), m.header("interaction").unwrap().to_string())).collect();
    assert_eq!(got, vec![("2".into(), "create".into()), ("3".into(), "create".into()), ("1".into(), "update".into())]);
    pg.wait_drained(&s.dest, WAIT);
}

#[test]
fn rollback_and_rolled_back_savepoint_send_nothing() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    let t = &s.table;
    pg.sql(&format!("BEGIN; INSERT INTO {t} VALUES (1); ROLLBACK;"));
    pg.sql(&format!(
        "BEGIN; INSERT INTO {t} VALUES (2); SAVEPOINT a; INSERT INTO {t} VALUES (3); \
         ROLLBACK TO SAVEPOINT a; INSERT INTO {t} VALUES (4); COMMIT;"
    ));
    let _ = pg.try_sql(&format!("BEGIN; INSERT INTO {t} VALUES (5); INSERT INTO {t} VALUES (5); COMMIT;"));
    let msgs = s.received(2, WAIT);
    let keys: Vec<&str> = msgs.iter().map(|m| m.key.as_deref().unwrap()).collect();
    assert_eq!(keys, vec!["2", "4"]);
    // content "empty": only the notification entry.
    for m in &msgs {
        assert_eq!(m.payload, expected_bundle(&s, m, &format!("{t}/{}", m.key.as_deref().unwrap()), None));
    }
    pg.wait_drained(&s.dest, WAIT);
}

/// Events are written per statement (and every 1,000), COPY's at COMMIT even
/// when the transaction was made read-only after it, and a rolled-back inner
/// block drops only its own: all in the order of the changes.
#[test]
fn statements_copy_read_only_commits_and_inner_rollbacks_enqueue_in_change_order() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    let t = &s.table;
    pg.sql(&format!("INSERT INTO {t} SELECT g FROM generate_series(1, 2500) g"));
    pg.sql(&format!(
        "BEGIN; COPY {t} FROM PROGRAM 'seq 2501 2600'; SET transaction_read_only = on; \
         SELECT count(*) FROM outbox.event; COMMIT;"
    ));
    pg.sql(&format!(
        "DO $$ BEGIN INSERT INTO {t} VALUES (2601); \
           BEGIN INSERT INTO {t} VALUES (2602); RAISE EXCEPTION 'undo'; EXCEPTION WHEN others THEN NULL; END; \
           INSERT INTO {t} VALUES (2603); END $$"
    ));
    let msgs = s.received(2602, WAIT);
    let keys: Vec<i64> = msgs.iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    let want: Vec<i64> = (1..=2601).chain([2603]).collect();
    assert_eq!(keys, want);
    pg.wait_drained(&s.dest, WAIT);
}

#[test]
fn writers_need_no_rights_on_the_outbox_and_their_casts_run_as_themselves() {
    let e = env();
    let pg = &e.pg;
    let t = unique("w");
    let role = unique("writer");
    let kafka_topic = e.broker.new_topic("kw", 1);
    pg.sql(&format!(
        "CREATE ROLE {role} LOGIN; CREATE TYPE {t}_mood AS ENUM ('ok'); CREATE TABLE {t}_seen (who text); \
         GRANT INSERT ON {t}_seen TO PUBLIC; \
         CREATE FUNCTION {t}_json({t}_mood) RETURNS json LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO {t}_seen VALUES (current_user); RETURN '\"cast\"'::json; END $$; \
         CREATE CAST ({t}_mood AS json) WITH FUNCTION {t}_json({t}_mood); \
         CREATE TABLE {t} (id int PRIMARY KEY, m {t}_mood); GRANT INSERT ON {t} TO {role}; \
         SELECT outbox.create_topic('urn:{t}', '[{{\"table\": \"{t}\"}}]'); \
         SELECT outbox.create_destination('{}', 'urn:{t}', 'kafka-at-least-once', \
           '{{\"kafkaTopic\": \"{kafka_topic}\", \"bootstrapServers\": \"{}\"}}');",
        t.replace('_', "-"),
        e.broker.bootstrap()
    ));
    // The writer also plants an `=` operator for text ahead of pg_catalog's.
    pg.sql(&format!(
        "CREATE SCHEMA {t}_evil AUTHORIZATION {role}; SET ROLE {role}; \
         CREATE FUNCTION {t}_evil.eq(text, text) RETURNS boolean LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO public.{t}_seen VALUES ('operator as ' || current_user); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$; \
         CREATE OPERATOR {t}_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {t}_evil.eq);"
    ));
    pg.sql(&format!(
        "SET ROLE {role}; SET search_path = {t}_evil, pg_catalog, public; INSERT INTO {t} VALUES (1, 'ok');"
    ));
    // The cast to json ran as the writer, and the planted operator never ran
    // (the outbox is written as the extension owner with qualified operators).
    assert_eq!(pg.sql(&format!("SELECT string_agg(who, ',') FROM {t}_seen")), role);
    let msgs = consume(&e.broker.bootstrap(), &kafka_topic, 1, WAIT, Duration::from_millis(500));
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].json()["entry"][1]["resource"], serde_json::json!({"id": 1, "m": "cast"}));
    // And the writer cannot reach the outbox or the trigger function itself.
    let err = pg.sql_err(&format!("SET ROLE {role}; SELECT count(*) FROM outbox.event"));
    assert_eq!(err.sqlstate, "42501", "{}", err.raw);
}

#[test]
fn partitioned_table_events_name_the_partitioned_table() {
    let e = env();
    let pg = &e.pg;
    let t = unique("part");
    let kafka_topic = e.broker.new_topic("kp", 1);
    pg.sql(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, v text) PARTITION BY RANGE (id); \
         CREATE TABLE {t}_low PARTITION OF {t} FOR VALUES FROM (0) TO (100); \
         SELECT outbox.create_topic('urn:{t}', '[{{\"table\": \"{t}\"}}]'); \
         SELECT outbox.create_destination('{}', 'urn:{t}', 'kafka-at-least-once', \
           '{{\"kafkaTopic\": \"{kafka_topic}\", \"bootstrapServers\": \"{}\"}}', 'id-only'); \
         CREATE TABLE {t}_high PARTITION OF {t} FOR VALUES FROM (100) TO (200); \
         INSERT INTO {t} VALUES (1, 'a'), (150, 'b');",
        t.replace('_', "-"),
        e.broker.bootstrap()
    ));
    let msgs = consume(&e.broker.bootstrap(), &kafka_topic, 2, WAIT, Duration::from_millis(500));
    let mut refs: Vec<String> = msgs
        .iter()
        .map(|m| {
            assert_eq!(m.header("source-table"), Some(format!("public.{t}").as_str()));
            m.json()["entry"][1]["fullUrl"].as_str().unwrap().to_string()
        })
        .collect();
    refs.sort();
    assert_eq!(refs, vec![format!("{t}/1"), format!("{t}/150")]);
}
