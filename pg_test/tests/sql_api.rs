//! The SQL API around the data path: every user mistake's SQLSTATE, message
//! and hint, drop_topic, and the extension itself (CREATE EXTENSION refused
//! outside the served database or without preloading, DROP EXTENSION and
//! creating it again). The tests share one cluster and broker; those that
//! drop the extension or start without it bring their own.

use pg_outbox_test::{keys, unique, Cluster, Env};
use std::collections::BTreeSet;
use std::sync::OnceLock;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("sql_api", &[]))
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
fn drop_extension_removes_triggers_and_recreating_works() {
    let Env { pg, broker } = Env::start(&unique("dropext"), &[]);
    broker.create_topic("things", 1);
    pg.watched_table("things", "id int PRIMARY KEY");
    pg.destination("things", "urn:things", "things").bootstrap(&broker.bootstrap()).content("empty").create();
    pg.sql("INSERT INTO things VALUES (1)");
    assert_eq!(keys(&broker.bootstrap(), "things", 1), BTreeSet::from([1]));
    pg.sql("DROP EXTENSION pg_outbox");
    assert_eq!(pg.count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'things'::regclass"), 0);
    pg.sql("INSERT INTO things VALUES (2)"); // no trigger, no error
    let worker = pg.worker_pid();
    assert!(worker.is_some(), "the worker idles, it does not die");
    pg.sql("CREATE EXTENSION pg_outbox");
    pg.sql("SELECT outbox.create_topic('urn:things', '[{\"table\": \"things\"}]')");
    pg.destination("things", "urn:things", "things").bootstrap(&broker.bootstrap()).content("empty").create();
    pg.sql("INSERT INTO things VALUES (3)");
    assert_eq!(keys(&broker.bootstrap(), "things", 2), BTreeSet::from([1, 3]));
    pg.stop("fast");
}

#[test]
fn create_extension_without_preloading_fails_with_a_hint() {
    let pg = Cluster::start(&unique("nopreload"), &["shared_preload_libraries = ''"]);
    let err = pg.try_sql("CREATE EXTENSION pg_outbox").expect_err("must fail");
    assert_eq!(err.sqlstate, "55000", "{}", err.raw);
    assert!(err.message.contains("shared_preload_libraries"), "{}", err.raw);
    assert!(err.hint.unwrap().contains("shared_preload_libraries"));
    assert_eq!(pg.count("SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'"), 0);
    pg.stop("immediate");
}
