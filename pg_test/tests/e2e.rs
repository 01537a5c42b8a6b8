//! End to end: a real Postgres with pg_outbox preloaded, a real tansu broker
//! over TCP, and assertions on what arrived in Kafka and what stayed in Postgres.
//! Tests share one cluster and broker and use their own tables and topics.

use pg_outbox_test::{consume, unique, unique_id, wait_for, Env, Received, Stream};
use std::sync::OnceLock;
use std::time::Duration;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("e2e", &[]))
}

const WAIT: Duration = Duration::from_secs(30);

fn expected_bundle(s: &Stream, m: &Received, reference: &str, second: Option<String>) -> String {
    pg_outbox_test::expected_bundle(m, &s.url, &s.dest, reference, second.as_deref())
}

#[test]
fn create_update_delete_arrive_as_documented_bundles_keyed_by_primary_key() {
    let s = env().stream("id int PRIMARY KEY, status text", "", "full-resource");
    let pg = &env().pg;
    pg.sql(&format!("INSERT INTO {} VALUES (17, 'draft')", s.table));
    pg.sql(&format!("UPDATE {} SET status = 'completed' WHERE id = 17", s.table));
    pg.sql(&format!("DELETE FROM {} WHERE id = 17", s.table));
    let msgs = s.received(3, WAIT);
    assert_eq!(msgs.len(), 3, "{msgs:#?}");
    let t = &s.table;
    let cases = [
        (
            "create",
            format!(r#"{{"resource":{{"id":17,"status":"draft"}},"request":{{"method":"POST","url":"/{t}"}}}}"#),
        ),
        (
            "update",
            format!(r#"{{"resource":{{"id":17,"status":"completed"}},"request":{{"method":"PUT","url":"/{t}/17"}}}}"#),
        ),
        (
            "delete",
            format!(
                r#"{{"resource":{{"id":17,"status":"completed"}},"request":{{"method":"DELETE","url":"/{t}/17"}}}}"#
            ),
        ),
    ];
    let mut numbers = Vec::new();
    for (m, (interaction, second)) in msgs.iter().zip(cases) {
        assert_eq!(m.key.as_deref(), Some("17"));
        assert_eq!(m.payload, expected_bundle(&s, m, &format!("{t}/17"), Some(second)));
        assert_eq!(m.header("interaction"), Some(interaction));
        assert_eq!(m.header("topic-url"), Some(s.url.as_str()));
        assert_eq!(m.header("destination-id"), Some(s.dest.as_str()));
        assert_eq!(m.header("source-table"), Some(format!("public.{t}").as_str()));
        let n: i64 = m.header("event-number").unwrap().parse().unwrap();
        assert_eq!(m.json()["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"].as_i64(), Some(n));
        let ts = m.json()["timestamp"].as_str().unwrap().to_string();
        assert!(ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "timestamp {ts}");
        numbers.push(n);
    }
    // Same key: same partition, in commit order.
    assert!(msgs.iter().all(|m| m.partition == msgs[0].partition));
    assert!(numbers.windows(2).all(|w| w[0] < w[1]));
    assert!(msgs.windows(2).all(|w| w[0].offset < w[1].offset));
    pg.wait_drained(&s.dest, WAIT);
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
fn two_destinations_on_one_topic_each_receive_every_event() {
    let s = env().stream("id int PRIMARY KEY, v text", "", "full-resource");
    let e = env();
    let second_topic = e.broker.new_topic("k2", 1);
    let second_dest = unique_id("d2");
    e.pg.destination(&second_dest, &s.url, &second_topic).bootstrap(&e.broker.bootstrap()).content("id-only").create();
    e.pg.sql(&format!("INSERT INTO {} SELECT g, 'x' || g FROM generate_series(1, 10) g", s.table));
    let a = s.received(10, WAIT);
    let b = consume(&e.broker.bootstrap(), &second_topic, 10, WAIT, Duration::from_millis(700));
    assert_eq!(a.len(), 10);
    assert_eq!(b.len(), 10);
    for m in &b {
        assert_eq!(m.header("destination-id"), Some(second_dest.as_str()));
        let second = &m.json()["entry"][1];
        assert_eq!(second["fullUrl"], format!("{}/{}", s.table, m.key.as_deref().unwrap()));
        assert!(second.get("resource").is_none(), "id-only carries no resource: {second}");
    }
    e.pg.wait_drained(&s.dest, WAIT);
    e.pg.wait_drained(&second_dest, WAIT);
}

#[test]
fn table_without_primary_key_gets_null_key_and_composite_key_is_a_json_array() {
    let e = env();
    let s = e.stream("a int, b text", "", "full-resource");
    e.pg.sql(&format!("INSERT INTO {} VALUES (1, 'x')", s.table));
    let msgs = s.received(1, WAIT);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].key, None);
    assert_eq!(msgs[0].json()["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"], s.table.as_str());

    let c = e.stream("a int, b text, PRIMARY KEY (b, a)", "", "id-only");
    e.pg.sql(&format!("INSERT INTO {} VALUES (7, 'x')", c.table));
    let msgs = c.received(1, WAIT);
    assert_eq!(msgs[0].key.as_deref(), Some(r#"["x", 7]"#));
}

#[test]
fn status_counts_deliveries_and_empties_the_queue() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    pg.sql(&format!("INSERT INTO {} SELECT generate_series(1, 250)", s.table));
    let keys: std::collections::BTreeSet<i64> =
        s.received(250, WAIT).iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(keys, (1..=250).collect());
    pg.wait_drained(&s.dest, WAIT);
    let row = wait_for("delivered = 250", WAIT, || {
        let r = pg.status_row(&s.dest);
        (r["messages_delivered"] == 250).then_some(r)
    });
    assert_eq!(row["status"], "active");
    assert_eq!(row["messages_queued"], 0);
    assert_eq!(row["messages_in_process"], 0);
    assert_eq!(row["messages_delivery_attempts"], 0);
    assert_eq!(row["topic"], s.url.as_str());
    let status: serde_json::Value =
        serde_json::from_str(&pg.sql(&format!("SELECT outbox.status('{}')", s.dest))).unwrap();
    // Aidbox's at-least-once $status: these parameters, in this order, with these value types.
    let started = status["parameter"][4]["valueDateTime"].as_str().unwrap().to_string();
    assert_eq!(
        status,
        serde_json::json!({"resourceType": "Parameters", "parameter": [
            {"name": "messagesDelivered", "valueDecimal": 250},
            {"name": "messagesDeliveryAttempts", "valueDecimal": 0},
            {"name": "messagesInProcess", "valueDecimal": 0},
            {"name": "messagesQueued", "valueDecimal": 0},
            {"name": "startTimestamp", "valueDateTime": started},
            {"name": "status", "valueString": "active"}]})
    );
    assert!(pg_outbox_test::is_fhir_instant_seconds(&started), "{started}");
}

#[test]
fn status_reports_latency_from_the_change_s_transaction_start_without_commit_timestamps() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    let row = pg.status_row(&s.dest);
    assert!(row["latency_p50_ms"].is_null() && row["latency_max_ms"].is_null(), "nothing delivered yet: {row}");
    let ms = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    // Latency is published within 200 ms of a delivery: wait for what the
    // deliveries so far must show (a timeout is a failure), then check.
    let delivered = |n: i64, shows: &dyn Fn(&serde_json::Value) -> bool| {
        wait_for(&format!("{n} delivered"), WAIT, || {
            let r = pg.status_row(&s.dest);
            (r["messages_delivered"] == n && r["messages_in_process"] == 0).then_some(r)
        });
        wait_for(&format!("the latency of {n} deliveries"), WAIT, || {
            let r = pg.status_row(&s.dest);
            shows(&r).then_some(r)
        })
    };
    // The first event also waits for the producer to connect.
    pg.sql(&format!("INSERT INTO {} VALUES (0)", s.table));
    let warm = delivered(1, &|r| r["latency_max_ms"].as_f64().is_some());
    assert!(ms(&warm, "latency_max_ms") < 3000.0, "the first delivery took that long: {warm}");
    // A change whose transaction commits 3 s after it began (this cluster
    // does not record commit times: latency counts from the transaction start).
    pg.sql(&format!("BEGIN; INSERT INTO {} VALUES (1); SELECT pg_sleep(3); COMMIT", s.table));
    let row = delivered(2, &|r| r["latency_max_ms"].as_f64().is_some_and(|m| m >= 3000.0));
    assert!(ms(&row, "latency_max_ms") < 30_000.0, "{row}");
    // 200 quick ones: the percentiles move down, the slow one stays the maximum.
    pg.sql(&format!("INSERT INTO {} SELECT generate_series(2, 201)", s.table));
    s.received(202, WAIT);
    let row = delivered(202, &|r| r["latency_p99_ms"].as_f64().is_some_and(|m| m < 3000.0));
    assert!(ms(&row, "latency_p50_ms") < 3000.0, "{row}");
    assert!(ms(&row, "latency_max_ms") >= 3000.0, "{row}");
}

#[test]
fn drop_topic_removes_its_triggers_and_refuses_while_destinations_exist() {
    let s = env().stream("id int PRIMARY KEY", "", "empty");
    let pg = &env().pg;
    let triggers = format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.{}'::regclass", s.table);
    assert_eq!(pg.count(&triggers), 3);
    let err = pg.sql_err(&format!("SELECT outbox.drop_topic('{}')", s.url));
    assert_eq!(err.sqlstate, "2BP01");
    assert!(err.hint.unwrap().contains("cascade => true"));
    // cascade drops the destinations too; nothing is captured afterwards.
    pg.sql(&format!("SELECT outbox.drop_topic('{}', cascade => true)", s.url));
    assert_eq!(pg.count(&triggers), 0);
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.destination WHERE id = '{}'", s.dest)), 0);
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.topic WHERE url = '{}'", s.url)), 0);
    pg.sql(&format!("INSERT INTO {} VALUES (1)", s.table));
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.event WHERE table_name = 'public.{}'", s.table)), 0);
}

/// Every user mistake: SQLSTATE, message naming the object, hint; nothing left behind.
#[test]
fn api_errors_have_sqlstate_message_and_hint_and_leave_nothing_behind() {
    let e = env();
    let pg = &e.pg;
    let t = unique("err").replace('_', "x");
    pg.sql(&format!("CREATE TABLE public.{t} (id int PRIMARY KEY, status text)"));
    pg.sql(&format!("SELECT outbox.create_topic('u:{t}', '[{{\"table\": \"public.{t}\"}}]')"));
    let b = e.broker.bootstrap();
    let ok_params = format!(r#"{{"kafkaTopic": "x", "bootstrapServers": "{b}"}}"#);
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("SELECT outbox.create_topic('u:{t}', '[{{\"table\": \"public.{t}\"}}]')"), "42710", "already exists"),
        ("SELECT outbox.create_topic('', '[]')".into(), "22023", "must not be empty"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[]')"), "22023", "non-empty JSON array"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.nope_{t}\"}}]')"), "42P01", "does not exist"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"interactions\": [\"upsert\"]}}]')"), "22023", "unknown interaction \"upsert\""),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"colour\": 1}}]')"), "22023", "unknown key \"colour\""),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"criteria\": \"NEW.nope = 1\"}}]')"), "42P17", "invalid criteria"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"criteria\": \"OLD.status = 1\"}}]')"), "42P17", "invalid criteria"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"criteria\": \"NEW.id\"}}]')"), "42P17", "invalid criteria"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"interactions\": [\"update\"], \"criteria\": \"true) EXECUTE FUNCTION pg_catalog.now(\"}}]')"), "42P17", "invalid criteria"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"interactions\": [\"update\"], \"criteria\": \"NEW.id > 1\"}}, {{\"table\": \"public.{t}\", \"interactions\": [\"update\"], \"fhirpath\": \"status = 1\"}}]')"), "0A000", "mix SQL criteria and FHIRPath criteria"),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"interactions\": [\"truncate\", \"create\"], \"criteria\": \"NEW.id > 1\"}}]')"), "22023", "cannot apply to \"truncate\""),
        (format!("SELECT outbox.create_topic('u2:{t}', '[{{\"table\": \"public.{t}\", \"interactions\": [\"create\"], \"criteria\": \"NEW.id > 1\"}}, {{\"table\": \"public.{t}\", \"criteria\": \"NEW.nope\"}}]')"), "42P17", "invalid criteria"),
        ("SELECT outbox.alter_topic('no-such-topic', NULL, 'x')".into(), "42704", "topic \"no-such-topic\" does not exist"),
        (format!("SELECT outbox.create_destination('d-{t}', 'nope', 'kafka-at-least-once', '{ok_params}')"), "42704", "topic \"nope\" does not exist"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-sometimes', '{ok_params}')"), "22023", "unknown destination kind"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{ok_params}', 'everything')"), "22023", "unknown content"),
        (format!("SELECT outbox.create_destination('bad id!', 'u:{t}', 'kafka-at-least-once', '{ok_params}')"), "22023", "invalid destination id"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"bootstrapServers\": \"{b}\"}}')"), "22023", "needs parameter \"kafkaTopic\""),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\"}}')"), "22023", "needs parameter \"bootstrapServers\""),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"lingerMs\": 5}}')"), "22023", "unknown parameter \"lingerMs\""),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": 7, \"bootstrapServers\": \"{b}\"}}')"), "22023", "must be a string"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"batchSize\": \"many\"}}')"), "22023", "must be an integer"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"a b\", \"bootstrapServers\": \"{b}\"}}')"), "22023", "invalid Kafka topic name"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"nohostport\"}}')"), "22023", "invalid bootstrapServers"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"saslJaasConfig\": \"x\"}}')"), "22023", "needs securityProtocol SASL_SSL or SASL_PLAINTEXT"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"securityProtocol\": \"SASL_SSL\"}}')"), "0A000", "GSSAPI (Kerberos)"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"securityProtocol\": \"SASL_SSL\", \"saslMechanism\": \"PLAIN\", \"saslJaasConfig\": \"org.apache.kafka.common.security.plain.PlainLoginModule required username=u password=hunter2\"}}')"), "22023", "not terminated by a semicolon"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"rdkafka.linger.ms\": \"soon\"}}')"), "22023", "librdkafka refused the configuration"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"rdkafka.no.such.property\": 1}}')"), "22023", "No such configuration property"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-at-least-once', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"securityProtocol\": \"SSL\", \"sslTruststoreCertificates\": \"-----BEGIN CERTIFICATE-----\\nbm90IGEgY2VydA==\\n-----END CERTIFICATE-----\"}}')"), "22023", "librdkafka refused the configuration"),
        (format!("SELECT outbox.create_destination('d-{t}', 'u:{t}', 'kafka-best-effort', '{{\"kafkaTopic\": \"x\", \"bootstrapServers\": \"{b}\", \"transactionalId\": \"x\"}}')"), "22023", "transactionalId is for kafka-at-least-once"),
        ("SELECT outbox.alter_destination('no-such-destination', '{}')".to_string(), "42704", "does not exist"),
        ("SELECT outbox.drop_destination('no-such-destination')".into(), "42704", "destination \"no-such-destination\" does not exist"),
        ("SELECT outbox.drop_topic('no-such-topic')".into(), "42704", "topic \"no-such-topic\" does not exist"),
        ("SELECT outbox.status('no-such-destination')".into(), "42704", "does not exist"),
    ];
    for (sql, code, fragment) in &cases {
        let err = pg.sql_err(sql);
        assert_eq!(&err.sqlstate, code, "{sql}\n{}", err.raw);
        assert!(err.message.contains(fragment), "{sql}: message {:?} lacks {fragment:?}", err.message);
        assert!(err.hint.as_deref().is_some_and(|h| h.len() > 10), "{sql}: no hint\n{}", err.raw);
        assert!(!err.raw.contains("hunter2"), "{sql}: the error shows the password\n{}", err.raw);
    }
    // A failing call's statement (here with a password in it) is not copied into the log.
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(log.contains("not terminated by a semicolon"), "the error itself is logged");
    assert!(!log.contains("hunter2"), "the server log shows the password");
    // Nothing half-created: only the first topic's three triggers, no second topic, no destination.
    assert_eq!(pg.count(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.{t}'::regclass")), 3);
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.topic WHERE url = 'u2:{t}'")), 0);
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.destination WHERE id = 'd-{t}'")), 0);

    // A wrong criteria on create with OLD gets a hint about interactions.
    let err = pg.sql_err(&format!(
        "SELECT outbox.create_topic('u3:{t}', '[{{\"table\": \"public.{t}\", \"criteria\": \"OLD.status <> NEW.status\"}}]')"
    ));
    assert!(err.hint.unwrap().contains("interactions"), "{}", err.raw);
}

#[test]
fn create_extension_is_refused_outside_the_served_database() {
    let pg = &env().pg;
    let db = unique("otherdb");
    pg.sql(&format!("CREATE DATABASE {db}"));
    let err = pg.try_sql_in(&db, "CREATE EXTENSION pg_outbox").expect_err("must be refused");
    assert_eq!(err.sqlstate, "55000", "{}", err.raw);
    assert!(err.message.contains("can only be created in database \"postgres\""), "{}", err.raw);
    assert!(err.hint.unwrap().contains("outbox.database"));
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
