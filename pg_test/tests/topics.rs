//! Topics end to end: a table in several entries of one topic (SQL and
//! FHIRPath criteria, pasted Aidbox topics), DDL on watched tables (renames,
//! primary keys added and dropped, dropped tables and columns), alter_topic,
//! TRUNCATE and partitions. Every writer statement here must succeed: DDL
//! never breaks the application's writes. The tests share one cluster and
//! broker; a test that freezes the broker brings its own.

use pg_outbox_test::{by_event_number, consume, expected_bundle, unique, Broker, Env, Received};
use serde_json::json;
use std::sync::OnceLock;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("topics", &[]))
}

/// What arrived in `kafka_topic`, at least `n` messages, in event-number order.
fn arrived(broker: &Broker, kafka_topic: &str, n: usize) -> Vec<Received> {
    by_event_number(consume(&broker.bootstrap(), kafka_topic, n, WAIT, Duration::from_millis(1500)))
}

/// (key, interaction) of each message.
fn changes(msgs: &[Received]) -> Vec<(Option<String>, String)> {
    msgs.iter().map(|m| (m.key.clone(), m.header("interaction").unwrap_or_default().to_string())).collect()
}

fn change(key: &str, interaction: &str) -> (Option<String>, String) {
    (Some(key.to_string()), interaction.to_string())
}

/// Run API SQL that must succeed without a WARNING (the DDL event trigger
/// must not report the API's own trigger changes as lost).
fn quietly(sql: &str) {
    let (_, notices) = env().pg.sql_with_notices(sql);
    assert!(!notices.contains("WARNING"), "{sql}\n{notices}");
}

fn triggers_on(table: &str) -> i64 {
    env().pg.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal"))
}

#[test]
fn a_table_in_several_entries_sends_each_change_once_per_destination() {
    let e = env();
    let pg = &e.pg;
    let t = unique("qr");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, status text)"));
    // The issue's topic (create/update with a criteria over NEW, delete with
    // none), plus an entry whose update criteria overlaps the first one's.
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('{url}', '[
             {{"table": "public.{t}", "interactions": ["create", "update"], "criteria": "NEW.status IN (''completed'', ''amended'')"}},
             {{"table": "public.{t}", "interactions": ["delete"]}},
             {{"table": "{t}", "interactions": ["update"], "criteria": "OLD.status = ''completed''"}}]')"#
    ));
    assert_eq!(triggers_on(&t), 3, "one trigger per interaction, not per entry");
    let (alo, alo_topic) = pg.destination_on(&e.broker, &url).create();
    let (be, be_topic) = pg.destination_on(&e.broker, &url).best_effort().create();
    for sql in [
        format!("INSERT INTO {t} VALUES (1, 'draft')"),
        format!("INSERT INTO {t} VALUES (2, 'completed')"),
        // Matches the first entry (NEW amended) and the third (OLD completed): one event.
        format!("UPDATE {t} SET status = 'amended' WHERE id = 2"),
        format!("UPDATE {t} SET status = 'draft 2' WHERE id = 1"),
        format!("DELETE FROM {t} WHERE id = 1"),
        format!("DELETE FROM {t} WHERE id = 2"),
        // Not an interaction of the topic: nothing.
        format!("TRUNCATE {t}"),
    ] {
        pg.sql(&sql);
    }
    let expected = vec![change("2", "create"), change("2", "update"), change("1", "delete"), change("2", "delete")];
    let msgs = arrived(&e.broker, &alo_topic, 4);
    assert_eq!(changes(&msgs), expected, "{msgs:#?}");
    assert_eq!(
        msgs[1].payload,
        expected_bundle(
            &msgs[1],
            &url,
            &alo,
            &format!("{t}/2"),
            Some(&format!(
                r#"{{"resource":{{"id":2,"status":"amended"}},"request":{{"method":"PUT","url":"/{t}/2"}}}}"#
            ))
        )
    );
    assert_eq!(changes(&arrived(&e.broker, &be_topic, 4)), expected);
    pg.wait_drained(&alo, WAIT);
    let row = pg.status_row(&alo);
    assert_eq!(row["messages_delivered"], 4, "{row}");
    assert_eq!(pg.status_row(&be)["messages_delivered"], 4);
    // The topic shows the entries as given.
    let entries: serde_json::Value =
        serde_json::from_str(&pg.sql(&format!("SELECT triggers FROM outbox.topic WHERE url = '{url}'"))).unwrap();
    assert_eq!(entries.as_array().map(Vec::len), Some(3), "{entries}");
}

#[test]
fn fhirpath_entries_and_pasted_aidbox_topics_may_name_a_resource_twice() {
    let e = env();
    let pg = &e.pg;
    // A table in Aidbox's layout, mapped to a resource type of its own.
    let t = unique("fr");
    let resource_type = format!("Form{}", t.replace('_', ""));
    pg.sql(&format!(
        "CREATE TABLE {t} (id text PRIMARY KEY, txid bigint NOT NULL DEFAULT 1, ts timestamptz, resource jsonb NOT NULL)"
    ));
    pg.sql(&format!("SELECT outbox.map_resource('{resource_type}', '{t}')"));
    let url = format!("http://example.org/topics/{t}");
    let topic = json!({"resourceType": "AidboxSubscriptionTopic", "url": url, "status": "active",
        "trigger": [
            {"resource": resource_type, "supportedInteraction": ["create", "update"], "fhirPathCriteria": "status = 'completed'"},
            {"resource": resource_type, "supportedInteraction": ["update"], "fhirPathCriteria": "%previous.status = 'completed'"},
            {"resource": resource_type, "supportedInteraction": ["delete"]}]});
    pg.sql(&format!("SELECT outbox.create_topic('{}'::jsonb)", topic.to_string().replace('\'', "''")));
    assert_eq!(triggers_on(&t), 3);
    let (dest, kafka_topic) = pg.destination_on(&e.broker, &url).content("id-only").create();
    let write = |sql: String| pg.sql(&sql);
    write(format!(r#"INSERT INTO {t} (id, resource) VALUES ('a', '{{"status": "in-progress"}}')"#));
    write(format!(r#"INSERT INTO {t} (id, resource) VALUES ('b', '{{"status": "completed"}}')"#));
    // Previous completed: the second trigger.
    write(format!(r#"UPDATE {t} SET resource = '{{"status": "amended"}}' WHERE id = 'b'"#));
    // Neither now completed nor before: nothing.
    write(format!(r#"UPDATE {t} SET resource = '{{"status": "amended", "n": 2}}' WHERE id = 'b'"#));
    // Completed now and not before: the first; both would hold for a second identical update.
    write(format!(r#"UPDATE {t} SET resource = '{{"status": "completed"}}' WHERE id = 'a'"#));
    write(format!(r#"UPDATE {t} SET resource = '{{"status": "completed", "n": 2}}' WHERE id = 'a'"#));
    write(format!("DELETE FROM {t} WHERE id = 'a'"));
    let msgs = arrived(&e.broker, &kafka_topic, 5);
    assert_eq!(
        changes(&msgs),
        vec![
            change("b", "create"),
            change("b", "update"),
            change("a", "update"),
            change("a", "update"),
            change("a", "delete")
        ]
    );
    let focus = msgs[1].json()["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"].clone();
    assert_eq!(focus, json!(format!("{resource_type}/b")));
    pg.wait_drained(&dest, WAIT);

    // The resource changed and pasted again: alter_topic(resource) keeps the destination.
    let only_deletes = json!({"resourceType": "AidboxSubscriptionTopic", "url": url, "status": "active",
        "trigger": [{"resource": resource_type, "supportedInteraction": ["delete"]}]});
    quietly(&format!("SELECT outbox.alter_topic('{}'::jsonb)", only_deletes.to_string().replace('\'', "''")));
    assert_eq!(triggers_on(&t), 1);
    let stored: serde_json::Value =
        serde_json::from_str(&pg.sql(&format!("SELECT resource FROM outbox.topic WHERE url = '{url}'"))).unwrap();
    assert_eq!(stored, only_deletes);
    write(format!(r#"INSERT INTO {t} (id, resource) VALUES ('c', '{{"status": "completed"}}')"#));
    write(format!("DELETE FROM {t} WHERE id = 'b'"));
    let msgs = arrived(&e.broker, &kafka_topic, 6);
    assert_eq!(changes(&msgs[5..]), vec![change("b", "delete")]);
    assert_eq!(pg.status_row(&dest)["messages_delivered"], 6);
}

#[test]
fn an_entry_with_sql_and_fhirpath_criteria_needs_both_and_a_plain_entry_beside_it_takes_all() {
    let e = env();
    let pg = &e.pg;
    let t = unique("bc");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, status text)"));
    // Alone, an entry with both criteria sends a change only when both hold.
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('urn:{t}:both', '[{{"table": "{t}", "interactions": ["create"],
             "criteria": "NEW.id > 1", "fhirpath": "status = ''x''"}}]')"#
    ));
    // Beside an entry without criteria for the same interaction, every change goes.
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('urn:{t}:any', '[{{"table": "{t}", "interactions": ["update"],
             "criteria": "NEW.id > 100", "fhirpath": "status = ''x''"}}, {{"table": "{t}", "interactions": ["update"]}}]')"#
    ));
    let (_, both) = pg.destination_on(&e.broker, &format!("urn:{t}:both")).content("empty").create();
    let (_, any) = pg.destination_on(&e.broker, &format!("urn:{t}:any")).content("empty").create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1, 'x'), (2, 'y'), (3, 'x')"));
    pg.sql(&format!("UPDATE {t} SET status = 'z'"));
    assert_eq!(changes(&arrived(&e.broker, &both, 1)), vec![change("3", "create")]);
    let mut updated: Vec<Option<String>> = arrived(&e.broker, &any, 3).into_iter().map(|m| m.key).collect();
    updated.sort();
    assert_eq!(updated, vec![Some("1".into()), Some("2".into()), Some("3".into())]);
}

#[test]
fn fhir_events_captured_before_their_table_left_the_topic_keep_their_shape() {
    let e = env();
    let pg = &e.pg;
    let broker = Broker::start();
    let t = unique("fs");
    let (a, b) = (format!("{t}_a"), format!("{t}_b"));
    let (type_a, type_b) = (format!("A{}", t.replace('_', "")), format!("B{}", t.replace('_', "")));
    for (table, rt) in [(&a, &type_a), (&b, &type_b)] {
        pg.sql(&format!(
            "CREATE TABLE {table} (id text PRIMARY KEY, txid bigint NOT NULL DEFAULT 1, resource jsonb NOT NULL)"
        ));
        pg.sql(&format!("SELECT outbox.map_resource('{rt}', '{table}')"));
    }
    let url = format!("urn:{t}");
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('{url}', '[{{"resource": "{type_a}"}}, {{"resource": "{type_b}"}}]')"#
    ));
    let (dest, kafka_topic) = pg.destination_on(&broker, &url).content("id-only").create();
    broker.freeze();
    pg.sql(&format!(r#"INSERT INTO {a} VALUES ('1', 1, '{{}}')"#));
    // Renamed, then left out of the topic, then (the other) dropped: what was
    // captured meanwhile still goes out as FHIR resources.
    pg.sql(&format!("ALTER TABLE {a} RENAME TO {a}_2"));
    pg.sql(&format!(r#"INSERT INTO {a}_2 VALUES ('2', 1, '{{}}')"#));
    quietly(&format!(r#"SELECT outbox.alter_topic('{url}', '[{{"resource": "{type_b}"}}]')"#));
    pg.sql(&format!(r#"INSERT INTO {a}_2 VALUES ('3', 1, '{{}}'); INSERT INTO {b} VALUES ('1', 1, '{{}}')"#));
    pg.sql(&format!("DROP TABLE {b}"));
    broker.thaw();
    let msgs = arrived(&broker, &kafka_topic, 3);
    let urls: Vec<String> =
        msgs.iter().map(|m| m.json()["entry"][1]["fullUrl"].as_str().unwrap_or_default().to_string()).collect();
    let base = "http://localhost/fhir";
    assert_eq!(
        urls,
        [format!("{base}/{type_a}/1"), format!("{base}/{type_a}/2"), format!("{base}/{type_b}/1")],
        "{msgs:#?}"
    );
    pg.wait_drained(&dest, WAIT);
}

#[test]
fn key_columns_and_tables_follow_renames_and_events_captured_before_are_delivered() {
    let e = env();
    let pg = &e.pg;
    let broker = Broker::start();
    let t = unique("rn");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text)"));
    pg.sql(&format!(r#"SELECT outbox.create_topic('{url}', '[{{"table": "{t}"}}]')"#));
    let (dest, kafka_topic) = pg.destination_on(&broker, &url).create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1, 'a')"));
    arrived(&broker, &kafka_topic, 1);
    pg.wait_drained(&dest, WAIT);
    // The broker answers nothing: what follows stays in the outbox meanwhile.
    broker.freeze();
    let s1 = format!("{t}_s1");
    let s2 = format!("{t}_s2");
    for sql in [
        format!("INSERT INTO {t} VALUES (2, 'b')"),
        format!("ALTER TABLE {t} RENAME COLUMN id TO rid"),
        format!("INSERT INTO {t} VALUES (3, 'c')"),
        format!("ALTER TABLE {t} RENAME TO {t}_2"),
        format!("INSERT INTO {t}_2 VALUES (4, 'd')"),
        format!("CREATE SCHEMA {s1}; ALTER TABLE {t}_2 SET SCHEMA {s1}"),
        format!("INSERT INTO {s1}.{t}_2 VALUES (5, 'e')"),
        format!("ALTER SCHEMA {s1} RENAME TO {s2}"),
        format!("INSERT INTO {s2}.{t}_2 VALUES (6, 'f')"),
        format!("UPDATE {s2}.{t}_2 SET v = 'g' WHERE rid = 6"),
    ] {
        pg.sql(&sql);
    }
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.pending WHERE destination_id = '{dest}'")), 6);
    broker.thaw();
    let msgs = arrived(&broker, &kafka_topic, 7);
    let seen: Vec<(String, String, String)> = msgs
        .iter()
        .map(|m| {
            let v = m.json();
            (
                m.key.clone().unwrap_or_default(),
                m.header("source-table").unwrap_or_default().to_string(),
                v["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = |k: &str, table: &str, reference: &str| (k.to_string(), table.to_string(), reference.to_string());
    assert_eq!(
        seen,
        vec![
            want("1", &format!("public.{t}"), &format!("{t}/1")),
            want("2", &format!("public.{t}"), &format!("{t}/2")),
            want("3", &format!("public.{t}"), &format!("{t}/3")),
            want("4", &format!("public.{t}_2"), &format!("{t}_2/4")),
            want("5", &format!("{s1}.{t}_2"), &format!("{s1}.{t}_2/5")),
            want("6", &format!("{s2}.{t}_2"), &format!("{s2}.{t}_2/6")),
            want("6", &format!("{s2}.{t}_2"), &format!("{s2}.{t}_2/6")),
        ]
    );
    // The row carries the renamed column.
    assert_eq!(msgs[2].json()["entry"][1]["resource"], json!({"rid": 3, "v": "c"}));
    // The topic records the table under its name now, and the names it had.
    assert_eq!(
        pg.sql(&format!(
            "SELECT tt.table_name || ' ' || array_to_string(tt.former_names, ',') FROM outbox.topic_table tt \
               JOIN outbox.topic t ON t.id = tt.topic_id WHERE t.url = '{url}'"
        )),
        format!("{s2}.{t}_2 public.{t},public.{t}_2,{s1}.{t}_2")
    );
    assert_eq!(
        pg.sql(&format!("SELECT triggers::text FROM outbox.topic WHERE url = '{url}'")),
        format!(r#"[{{"table": "{s2}.{t}_2"}}]"#)
    );
    pg.wait_drained(&dest, WAIT);
}

#[test]
fn a_primary_key_added_later_is_used_and_a_dropped_one_gives_null_keys_with_a_warning() {
    let e = env();
    let pg = &e.pg;
    let t = unique("nk");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int, v text)"));
    let (_, notices) = pg.sql_with_notices(&format!(r#"SELECT outbox.create_topic('{url}', '[{{"table": "{t}"}}]')"#));
    assert!(notices.contains("has no primary key"), "{notices}");
    let (_, kafka_topic) = pg.destination_on(&e.broker, &url).content("empty").create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1, 'a')"));
    pg.sql(&format!("ALTER TABLE {t} ADD PRIMARY KEY (id)"));
    pg.sql(&format!("INSERT INTO {t} VALUES (2, 'b')"));
    let (_, notices) = pg.sql_with_notices(&format!("ALTER TABLE {t} DROP CONSTRAINT {t}_pkey"));
    assert!(notices.contains(&format!("watched table \"public.{t}\" has no primary key")), "{notices}");
    pg.sql(&format!("INSERT INTO {t} VALUES (3, 'c')"));
    pg.sql(&format!("ALTER TABLE {t} ADD PRIMARY KEY (v, id)"));
    pg.sql(&format!("INSERT INTO {t} VALUES (4, 'd')"));
    // Dropping a key column drops the key.
    let (_, notices) = pg.sql_with_notices(&format!("ALTER TABLE {t} DROP COLUMN v"));
    assert!(notices.contains("has no primary key"), "{notices}");
    pg.sql(&format!("INSERT INTO {t} VALUES (5)"));
    let keys: Vec<Option<String>> = arrived(&e.broker, &kafka_topic, 5).into_iter().map(|m| m.key).collect();
    assert_eq!(keys, vec![None, Some("2".into()), None, Some(r#"["d", 4]"#.into()), None]);
}

#[test]
fn a_dropped_table_leaves_its_topic_and_its_captured_events_are_delivered() {
    let e = env();
    let pg = &e.pg;
    let broker = Broker::start();
    let t = unique("dt");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY); CREATE TABLE {t}_kept (id int PRIMARY KEY)"));
    pg.sql(&format!(r#"SELECT outbox.create_topic('{url}', '[{{"table": "{t}"}}, {{"table": "{t}_kept"}}]')"#));
    let (dest, kafka_topic) = pg.destination_on(&broker, &url).content("id-only").create();
    broker.freeze();
    pg.sql(&format!("INSERT INTO {t} VALUES (1), (2); INSERT INTO {t}_kept VALUES (1)"));
    let (_, notices) = pg.sql_with_notices(&format!("DROP TABLE {t}"));
    assert!(
        notices.contains(&format!("table \"public.{t}\" was dropped: topic \"{url}\" no longer watches it")),
        "{notices}"
    );
    assert_eq!(
        pg.sql(&format!("SELECT triggers::text FROM outbox.topic WHERE url = '{url}'")),
        format!(r#"[{{"table": "{t}_kept"}}]"#)
    );
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM outbox.topic_table tt JOIN outbox.topic t ON t.id = tt.topic_id \
              WHERE t.url = '{url}' AND tt.watched"
        )),
        1
    );
    broker.thaw();
    pg.sql(&format!("INSERT INTO {t}_kept VALUES (2)"));
    // A new table of the old name is not watched.
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY); INSERT INTO {t} VALUES (3)"));
    let msgs = arrived(&broker, &kafka_topic, 4);
    let refs: Vec<String> =
        msgs.iter().map(|m| m.json()["entry"][1]["fullUrl"].as_str().unwrap().to_string()).collect();
    assert_eq!(refs, [format!("{t}/1"), format!("{t}/2"), format!("{t}_kept/1"), format!("{t}_kept/2")]);
    pg.wait_drained(&dest, WAIT);
    // The topic and its destination go without a WARNING.
    quietly(&format!("SELECT outbox.drop_topic('{url}', cascade => true)"));
    assert_eq!(triggers_on(&format!("{t}_kept")), 0);
}

#[test]
fn a_capture_trigger_dropped_with_its_column_leaves_the_other_interactions() {
    let e = env();
    let pg = &e.pg;
    let t = unique("cc");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, status text)"));
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('{url}', '[{{"table": "{t}", "interactions": ["create"], "criteria": "NEW.status = ''x''"}},
                                                {{"table": "{t}", "interactions": ["delete"]}}]')"#
    ));
    let (_, kafka_topic) = pg.destination_on(&e.broker, &url).content("empty").create();
    // Postgres refuses to drop a column a criteria uses...
    let err = pg.sql_err(&format!("ALTER TABLE {t} DROP COLUMN status"));
    assert_eq!(err.sqlstate, "2BP01", "{}", err.raw);
    // ...unless told to drop the trigger with it.
    let (_, notices) = pg.sql_with_notices(&format!("ALTER TABLE {t} DROP COLUMN status CASCADE"));
    assert!(
        notices.contains(&format!(
            "the capture trigger for \"create\" on table \"public.{t}\" was dropped: topic \"{url}\" no longer captures it"
        )),
        "{notices}"
    );
    assert_eq!(
        pg.sql(&format!("SELECT triggers::text FROM outbox.topic WHERE url = '{url}'")),
        format!(r#"[{{"table": "{t}", "interactions": ["delete"]}}]"#)
    );
    pg.sql(&format!("INSERT INTO {t} VALUES (1); DELETE FROM {t} WHERE id = 1"));
    // A trigger dropped by hand: the same.
    let topic_id = pg.count(&format!("SELECT id FROM outbox.topic WHERE url = '{url}'"));
    let (_, notices) = pg.sql_with_notices(&format!("DROP TRIGGER outbox_{topic_id}_del ON {t}"));
    assert!(notices.contains("no longer captures it"), "{notices}");
    assert_eq!(pg.sql(&format!("SELECT triggers::text FROM outbox.topic WHERE url = '{url}'")), "[]");
    pg.sql(&format!("INSERT INTO {t} VALUES (2); DELETE FROM {t} WHERE id = 2"));
    // alter_topic attaches triggers again.
    quietly(&format!(r#"SELECT outbox.alter_topic('{url}', '[{{"table": "{t}", "interactions": ["create"]}}]')"#));
    pg.sql(&format!("INSERT INTO {t} VALUES (3)"));
    assert_eq!(changes(&arrived(&e.broker, &kafka_topic, 2)), vec![change("1", "delete"), change("3", "create")]);
}

#[test]
fn alter_topic_changes_tables_and_criteria_and_keeps_destinations_and_pending_events() {
    let e = env();
    let pg = &e.pg;
    let broker = Broker::start();
    let t = unique("at");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY, status text); CREATE TABLE {t}_b (id int PRIMARY KEY)"));
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('{url}', '[{{"table": "{t}", "interactions": ["create"], "criteria": "NEW.status = ''a''"}}]', 'before')"#
    ));
    let topic_id = pg.count(&format!("SELECT id FROM outbox.topic WHERE url = '{url}'"));
    let (dest, kafka_topic) = pg.destination_on(&broker, &url).content("empty").create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1, 'a')"));
    arrived(&broker, &kafka_topic, 1);
    broker.freeze();
    pg.sql(&format!("INSERT INTO {t} VALUES (2, 'a'), (3, 'b')"));
    let new_entries = format!(
        r#"[{{"table": "{t}", "interactions": ["create"], "criteria": "NEW.status = 'b'"}}, {{"table": "{t}_b"}}]"#
    );
    quietly(&format!("SELECT outbox.alter_topic('{url}', '{}', 'after')", new_entries.replace('\'', "''")));
    pg.sql(&format!("INSERT INTO {t} VALUES (4, 'a'), (5, 'b'); INSERT INTO {t}_b VALUES (1)"));
    broker.thaw();
    let msgs = arrived(&broker, &kafka_topic, 4);
    let seen: Vec<(String, String)> =
        msgs.iter().map(|m| (m.header("source-table").unwrap().to_string(), m.key.clone().unwrap())).collect();
    let tb = |name: &str, k: &str| (format!("public.{name}"), k.to_string());
    assert_eq!(seen, vec![tb(&t, "1"), tb(&t, "2"), tb(&t, "5"), tb(&format!("{t}_b"), "1")]);
    pg.wait_drained(&dest, WAIT);
    assert_eq!(pg.status_row(&dest)["messages_delivered"], 4);
    assert_eq!(
        pg.sql(&format!(
            "SELECT id || ' ' || description || ' ' || triggers::text FROM outbox.topic WHERE url = '{url}'"
        )),
        format!(
            r#"{topic_id} after [{{"table": "{t}", "criteria": "NEW.status = 'b'", "interactions": ["create"]}}, {{"table": "{t}_b"}}]"#
        )
    );
    // A bad change changes nothing.
    let err =
        pg.sql_err(&format!(r#"SELECT outbox.alter_topic('{url}', '[{{"table": "{t}", "criteria": "NEW.nope"}}]')"#));
    assert_eq!(err.sqlstate, "42P17", "{}", err.raw);
    assert_eq!(triggers_on(&t), 1);
    assert_eq!(triggers_on(&format!("{t}_b")), 3);
}

#[test]
fn truncate_is_captured_when_a_topic_asks_for_it() {
    let e = env();
    let pg = &e.pg;
    let t = unique("tr");
    let url = format!("urn:{t}");
    pg.sql(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"));
    pg.sql(&format!(
        r#"SELECT outbox.create_topic('{url}', '[{{"table": "{t}", "interactions": ["create"]}}, {{"table": "{t}", "interactions": ["truncate"]}}]')"#
    ));
    let (alo, alo_topic) = pg.destination_on(&e.broker, &url).create();
    let (_, be_topic) = pg.destination_on(&e.broker, &url).best_effort().content("id-only").create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1); TRUNCATE {t}; INSERT INTO {t} VALUES (2)"));
    let expected = vec![change("1", "create"), (None, "truncate".to_string()), change("2", "create")];
    let msgs = arrived(&e.broker, &alo_topic, 3);
    assert_eq!(changes(&msgs), expected);
    assert_eq!(
        msgs[1].payload,
        expected_bundle(
            &msgs[1],
            &url,
            &alo,
            &t,
            Some(&format!(r#"{{"fullUrl":"{t}","request":{{"method":"DELETE","url":"/{t}"}}}}"#))
        )
    );
    assert_eq!(msgs[1].header("source-table"), Some(format!("public.{t}").as_str()));
    assert_eq!(changes(&arrived(&e.broker, &be_topic, 3)), expected);
}

#[test]
fn a_table_and_its_partition_cannot_share_a_topic_and_partitions_follow_renames() {
    let e = env();
    let pg = &e.pg;
    let t = unique("pt");
    pg.sql(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY) PARTITION BY RANGE (id); \
         CREATE TABLE {t}_1 PARTITION OF {t} FOR VALUES FROM (0) TO (100)"
    ));
    let err =
        pg.sql_err(&format!(r#"SELECT outbox.create_topic('urn:{t}', '[{{"table": "{t}"}}, {{"table": "{t}_1"}}]')"#));
    assert_eq!(err.sqlstate, "22023", "{}", err.raw);
    assert!(err.message.contains("one a partition of the other"), "{}", err.raw);
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.topic WHERE url = 'urn:{t}'")), 0);
    pg.sql(&format!(r#"SELECT outbox.create_topic('urn:{t}', '[{{"table": "{t}"}}]')"#));
    let (_, kafka_topic) = pg.destination_on(&e.broker, &format!("urn:{t}")).content("empty").create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1)"));
    pg.sql(&format!("ALTER TABLE {t} RENAME TO {t}_r; INSERT INTO {t}_r VALUES (2)"));
    let tables: Vec<String> =
        arrived(&e.broker, &kafka_topic, 2).iter().map(|m| m.header("source-table").unwrap().to_string()).collect();
    assert_eq!(tables, [format!("public.{t}"), format!("public.{t}_r")]);
}
