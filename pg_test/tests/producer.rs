//! The producer's configuration end to end: TLS with a private CA and a
//! client certificate, alter_destination under load, transactional batches,
//! secrets that only superusers see, maxBlockMs, and a content switch. The
//! tests share one cluster and broker; a test that needs a broker behind TLS,
//! a mock cluster, or a broker to freeze or to fail brings its own.

use pg_outbox_test::{
    consume, consume_with, free_port, unique, wait_for, Broker, Certificates, Cluster, Env, Received, TlsProxy,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("producer", &["outbox.retry_max = 1000"]))
}

fn keys(msgs: &[Received]) -> BTreeSet<i64> {
    msgs.iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect()
}

/// A JSON string literal for use inside a SQL string literal.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap().replace('\'', "''")
}

fn config(pg: &Cluster, dest: &str) -> Value {
    serde_json::from_str(&pg.sql(&format!("SELECT outbox.destination_config('{dest}')"))).unwrap()
}

fn wait_queued_with_error(pg: &Cluster, dest: &str, queued: i64) -> String {
    wait_for("an error reported while the events stay queued", WAIT, || {
        let row = pg.status_row(dest);
        let errors = row["last_errors"].to_string();
        (row["messages_queued"] == queued && row["status"] == "error" && errors.len() > 2).then_some(errors)
    })
}

#[test]
fn tls_with_a_private_ca_and_a_client_certificate_added_by_alter_destination() {
    let pg = &env().pg;
    let certs = Certificates::generate(&unique("ok"));
    let strangers = Certificates::generate(&unique("other"));
    let tls_port = free_port();
    let broker = Broker::start_advertising(free_port(), tls_port);
    let _proxy = TlsProxy::start(tls_port, broker.port, &certs, true);
    let t = unique("tls");
    let dest = t.replace('_', "-");
    broker.create_topic(&t, 1);
    let bootstrap = format!("127.0.0.1:{tls_port}");
    pg.watched_table(&t, "id int PRIMARY KEY");
    // Trusts the broker's CA but has no client certificate: the handshake fails.
    let trust = |ca: &str| json!({"securityProtocol": "SSL", "sslTruststoreCertificates": ca});
    pg.destination(&dest, &format!("urn:{t}"), &t)
        .bootstrap(&bootstrap)
        .content("id-only")
        .params(trust(&certs.ca))
        .create();
    // Trusts another CA: the broker's certificate is refused.
    let wrong_ca = format!("{dest}-wrong-ca");
    pg.destination(&wrong_ca, &format!("urn:{t}"), &t)
        .bootstrap(&bootstrap)
        .content("id-only")
        .params(trust(&strangers.ca))
        .create();
    pg.sql(&format!("INSERT INTO {t} SELECT generate_series(1, 3)"));
    // (A broker that wants a client certificate closes the connection after
    // the handshake: librdkafka reports the brokers down.)
    wait_queued_with_error(pg, &dest, 3);
    // $status shows the errors as Aidbox does: lastErrorDetail with a message and a timestamp.
    let status: Value = serde_json::from_str(&pg.sql(&format!("SELECT outbox.status('{dest}')"))).unwrap();
    let detail = status["parameter"].as_array().unwrap().iter().find(|p| p["name"] == "lastErrorDetail").unwrap();
    assert_eq!(detail["part"][0]["name"], "message");
    assert!(detail["part"][0]["valueString"].as_str().is_some_and(|m| !m.is_empty()), "{detail}");
    assert_eq!(detail["part"][1]["name"], "timestamp");
    assert!(pg_outbox_test::is_fhir_instant_seconds(detail["part"][1]["valueDateTime"].as_str().unwrap()), "{detail}");
    assert_eq!(status["parameter"][5], serde_json::json!({"name": "status", "valueString": "error"}));
    let errors = wait_queued_with_error(pg, &wrong_ca, 3);
    assert!(errors.contains("certificate verify failed"), "{errors}");

    // Add the client key and its certificate (one PEM value, as Java's PEM keystore).
    let keystore = format!("{}{}", certs.client_key, certs.client_cert);
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', '{{\"sslKeystoreKey\": {}}}')", json_str(&keystore)));
    wait_for("the three events delivered over TLS", WAIT, || {
        (pg.status_row(&dest)["messages_queued"] == 0).then_some(())
    });
    let file = |name: &str| certs.dir.join(name).to_str().unwrap().to_string();
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let tls = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca.as_str()),
        ("ssl.certificate.location", cert.as_str()),
        ("ssl.key.location", key.as_str()),
    ];
    let msgs = consume_with(&bootstrap, &t, 3, WAIT, Duration::from_millis(500), &tls);
    assert_eq!(keys(&msgs), (1..=3).collect());
    assert_eq!(pg.status_row(&wrong_ca)["messages_queued"], 3);

    let c = config(pg, &dest);
    assert_eq!(c["security.protocol"], "ssl");
    assert_eq!(c["ssl.ca.pem"].as_str().unwrap().trim(), certs.ca.trim());
    assert_eq!(c["ssl.certificate.pem"].as_str().unwrap().trim(), certs.client_cert.trim());
    assert_eq!(c["ssl.key.pem"], "[redacted]");
    pg.sql(&format!("SELECT outbox.drop_destination('{wrong_ca}')"));
}

#[test]
fn alter_destination_under_load_moves_the_stream_and_loses_nothing() {
    let Env { pg, broker } = env();
    let t = unique("alter");
    let (before, after) = (format!("{t}_a"), format!("{t}_b"));
    broker.create_topic(&before, 2);
    broker.create_topic(&after, 2);
    let alo = t.replace('_', "-");
    let be = format!("{alo}-be");
    pg.watched_table(&t, "id int PRIMARY KEY");
    pg.destination(&alo, &format!("urn:{t}"), &before).bootstrap(&broker.bootstrap()).content("id-only").create();
    pg.destination(&be, &format!("urn:{t}"), &before)
        .bootstrap(&broker.bootstrap())
        .best_effort()
        .content("id-only")
        .create();
    let writer = {
        let t = t.clone();
        std::thread::spawn(move || {
            for i in 0..40 {
                env().pg.sql(&format!("INSERT INTO {t} SELECT generate_series({}, {})", i * 50 + 1, i * 50 + 50));
                // Deliberately paced: the stream goes on across the alter_destination below.
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    // Both have delivered some of the stream before the change.
    for d in [&alo, &be] {
        wait_for("the first deliveries", WAIT, || {
            (pg.status_row(d)["messages_delivered"].as_i64() >= Some(50)).then_some(())
        });
    }
    let patch = format!(r#"{{"kafkaTopic": "{after}", "compressionType": "zstd", "batchSize": 1000}}"#);
    pg.sql(&format!(
        "SELECT outbox.alter_destination('{alo}', '{patch}'); SELECT outbox.alter_destination('{be}', '{patch}')"
    ));
    writer.join().unwrap();
    wait_for("the outbox drained", WAIT, || {
        (pg.count(&format!("SELECT count(*) FROM outbox.event WHERE destination_id = '{alo}'")) == 0).then_some(())
    });
    let by = |msgs: &[Received], d: &str| -> Vec<i64> {
        msgs.iter()
            .filter(|m| m.header("destination-id") == Some(d))
            .map(|m| m.key.as_deref().unwrap().parse().unwrap())
            .collect()
    };
    // Everything is in Kafka once the outbox drained, but a read that stops
    // after 1.5 s without a new message can end early on a loaded machine:
    // read both topics again (from the start) until every row is there for
    // both destinations, or the time is up (then the assertion below says
    // what is missing).
    let read = || {
        (
            consume(&broker.bootstrap(), &before, 1, WAIT, Duration::from_millis(1500)),
            consume(&broker.bootstrap(), &after, 1, WAIT, Duration::from_millis(1500)),
        )
    };
    let complete = |a: &[Received], b: &[Received]| {
        [&alo, &be].iter().all(|d| by(a, d).into_iter().chain(by(b, d)).collect::<BTreeSet<i64>>().len() == 2000)
    };
    let started = std::time::Instant::now();
    let (mut a, mut b) = read();
    while !complete(&a, &b) && started.elapsed() < WAIT {
        (a, b) = read();
    }
    for d in [&alo, &be] {
        let (old, new) = (by(&a, d), by(&b, d));
        let all: BTreeSet<i64> = old.iter().chain(new.iter()).copied().collect();
        assert_eq!(all, (1..=2000).collect(), "{d}: every row arrived, before or after the change");
        assert!(!old.is_empty() && !new.is_empty(), "{d}: {} before, {} after", old.len(), new.len());
        let duplicates = old.len() + new.len() - 2000;
        eprintln!(
            "alter under load: {d}: {} to the old topic, {} to the new, {duplicates} duplicates",
            old.len(),
            new.len()
        );
    }
    let row = pg.status_row(&be);
    assert_eq!((row["messages_lost"].as_i64(), row["messages_delivered"].as_i64()), (Some(0), Some(2000)), "{row}");
    let c = config(pg, &alo);
    assert_eq!((c["compression.type"].as_str(), c["batch.size"].as_str()), (Some("zstd"), Some("1000")));

    // A patch: null removes a parameter; a bad one changes nothing.
    pg.sql(&format!(r#"SELECT outbox.alter_destination('{alo}', '{{"compressionType": null}}')"#));
    assert_eq!(config(pg, &alo)["compression.type"], "none");
    let stored = pg.sql(&format!("SELECT parameters FROM outbox.destination WHERE id = '{alo}'"));
    let err = pg.sql_err(&format!(
        r#"SELECT outbox.alter_destination('{alo}', '{{"batchSize": "big", "kafkaTopic": "{before}"}}')"#
    ));
    assert_eq!(err.sqlstate, "22023", "{}", err.raw);
    assert_eq!(pg.sql(&format!("SELECT parameters FROM outbox.destination WHERE id = '{alo}'")), stored);
    let err = pg.sql_err(&format!(r#"SELECT outbox.alter_destination('{alo}', content => 'most')"#));
    assert_eq!(err.sqlstate, "22023", "{}", err.raw);
}

/// tansu 0.6.0 refuses EndTxn (librdkafka: "EndTxnRequest (KIP-98) not
/// supported by broker"), so this test runs against librdkafka's own mock
/// cluster, which the worker reaches over TCP like any broker. The mock does
/// not filter aborted transactions for read_committed consumers (before
/// librdkafka 2.15), so the abort is checked through the status counters.
/// An rdkafka mock cluster, a watched table `t` (`id int` key) and a
/// transactional id-only destination for it with `params` besides.
fn transactional_destination(
    pg: &Cluster,
    name: &str,
    params: Value,
) -> (rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String, String) {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let t = unique(name);
    let dest = t.replace('_', "-");
    mock.create_topic(&t, 1, 1).unwrap();
    pg.watched_table(&t, "id int PRIMARY KEY");
    pg.destination(&dest, &format!("urn:{t}"), &t)
        .bootstrap(&mock.bootstrap_servers())
        .content("id-only")
        .params(json!({"transactionalId": format!("pg_outbox-{dest}")}))
        .params(params)
        .create();
    (mock, t, dest)
}

/// A statement's events are one outbox row (a group). A transactional
/// destination whose librdkafka queue takes only part of it commits that
/// part (slowly: each commit takes several of the worker's steps), splits the
/// group and sends the rest in later transactions: every event once, in order.
#[test]
fn transactional_destination_delivers_a_group_larger_than_its_queue_once_in_order() {
    let pg = &env().pg;
    let (mock, t, dest) =
        transactional_destination(pg, "txn_group", json!({"rdkafka.queue.buffering.max.messages": 200}));
    mock.broker_round_trip_time(1, Duration::from_millis(150)).unwrap();
    pg.sql(&format!("INSERT INTO {t} SELECT generate_series(1, 1000)"));
    assert_eq!(pg.count(&format!("SELECT count(*) FROM outbox.event WHERE destination_id = '{dest}'")), 1);
    wait_for("the group delivered", WAIT, || (pg.status_row(&dest)["messages_queued"] == 0).then_some(()));
    let settings = [("isolation.level", "read_committed")];
    let msgs = consume_with(&mock.bootstrap_servers(), &t, 1000, WAIT, Duration::from_millis(500), &settings);
    let got: Vec<i64> = msgs.iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    assert!(got == (1..=1000).collect::<Vec<i64>>(), "{} arrived: {:?}...", got.len(), &got[..got.len().min(20)]);
    let row = pg.status_row(&dest);
    assert_eq!(row["messages_delivered"], 1000, "{row}");
    pg.sql(&format!("SELECT outbox.drop_destination('{dest}')"));
}

/// A transactional destination paused: its events wait, an alter_destination
/// meanwhile (a new producer) keeps the pause, and on resume they go out in
/// order in Kafka transactions, with the writer's trace context as a header.
#[test]
fn a_paused_transactional_destination_keeps_the_pause_through_an_alter_and_delivers_in_order_on_resume() {
    let pg = &env().pg;
    let (mock, t, dest) = transactional_destination(pg, "txn_pause", json!({}));
    pg.sql(&format!("SELECT outbox.pause_destination('{dest}')"));
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    pg.sql(&format!(
        "BEGIN; SET LOCAL outbox.traceparent = '{trace}'; INSERT INTO {t} SELECT generate_series(1, 50); COMMIT"
    ));
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', parameters => '{{\"requestTimeoutMs\": 20000}}')"));
    let settings = [("isolation.level", "read_committed")];
    let early =
        consume_with(&mock.bootstrap_servers(), &t, 1, Duration::from_secs(4), Duration::from_secs(4), &settings);
    assert!(early.is_empty(), "{} delivered while paused", early.len());
    let row = pg.status_row(&dest);
    assert_eq!((row["status"].as_str(), row["messages_queued"].as_i64()), (Some("paused"), Some(50)), "{row}");
    pg.sql(&format!("SELECT outbox.resume_destination('{dest}')"));
    let msgs = consume_with(&mock.bootstrap_servers(), &t, 50, WAIT, Duration::from_millis(500), &settings);
    let got: Vec<i64> = msgs.iter().map(|m| m.key.as_deref().unwrap().parse().unwrap()).collect();
    assert_eq!(got, (1..=50).collect::<Vec<i64>>());
    assert!(msgs.iter().all(|m| m.header("traceparent") == Some(trace)), "{:?}", msgs[0].headers);
    wait_for("delivered", WAIT, || (pg.status_row(&dest)["messages_queued"] == 0).then_some(()));
    pg.sql(&format!("SELECT outbox.drop_destination('{dest}')"));
}

#[test]
fn transactional_destination_delivers_each_batch_as_one_kafka_transaction() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let pg = &env().pg;
    let (mock, t, dest) = transactional_destination(pg, "txn", json!({}));
    for i in 0..3 {
        pg.sql(&format!("INSERT INTO {t} SELECT generate_series({}, {})", i * 100 + 1, i * 100 + 100));
        wait_for("the batch committed", WAIT, || (pg.status_row(&dest)["messages_queued"] == 0).then_some(()));
    }
    let settings = [("isolation.level", "read_committed")];
    let msgs = consume_with(&mock.bootstrap_servers(), &t, 300, WAIT, Duration::from_millis(500), &settings);
    assert_eq!(keys(&msgs), (1..=300).collect());
    assert_eq!(msgs.len(), 300);
    let row = pg.status_row(&dest);
    assert_eq!(
        (row["messages_delivered"].as_i64(), row["messages_delivery_attempts"].as_i64()),
        (Some(300), Some(0)),
        "{row}"
    );

    // The coordinator fails the next commit (EndTxn, which a producer without
    // transactions never sends): the transaction is aborted, the events stay
    // in the outbox and go again in a new transaction. Had the worker deleted
    // them on their delivery reports, before the commit, nothing would be
    // sent again: no failed attempts, no second copies.
    mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION]);
    pg.sql(&format!("INSERT INTO {t} SELECT generate_series(301, 310)"));
    wait_for("the aborted batch sent again and committed", WAIT, || {
        (pg.status_row(&dest)["messages_queued"] == 0).then_some(())
    });
    let row = pg.status_row(&dest);
    assert_eq!(row["messages_delivered"], 310, "{row}");
    assert!(row["messages_delivery_attempts"].as_i64().unwrap() >= 10, "{row}");
    assert!(
        row["last_errors"].to_string().contains("commit_transaction failed: Transaction error: EndTxn commit failed"),
        "{row}"
    );
    // The aborted copies are still there for the mock's consumers.
    let msgs = consume_with(&mock.bootstrap_servers(), &t, 320, WAIT, Duration::from_millis(500), &settings);
    assert_eq!(keys(&msgs), (1..=310).collect());
    assert_eq!(msgs.len(), 320);
    let c = config(pg, &dest);
    assert_eq!(c["transactional.id"], format!("pg_outbox-{dest}"));
    assert_eq!(c["transaction.timeout.ms"], "120000");
}

#[test]
fn secrets_are_shown_to_superusers_only_and_never_logged() {
    let pg = &env().pg;
    let broker = Broker::start();
    let t = unique("sec");
    let dest = t.replace('_', "-");
    let role = unique("monitor");
    pg.watched_table(&t, "id int PRIMARY KEY");
    // SCRAM over TLS against a plaintext broker: it fails, and its errors must not carry the password.
    let jaas =
        r#"org.apache.kafka.common.security.scram.ScramLoginModule required username="svc" password="hunter2-zz9";"#;
    pg.destination(&dest, &format!("urn:{t}"), &t)
        .bootstrap(&broker.bootstrap())
        .params(json!({"securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512", "saslJaasConfig": jaas,
                       "requestTimeoutMs": 2000}))
        .create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1)"));
    wait_queued_with_error(pg, &dest, 1);
    pg.sql(&format!("CREATE ROLE {role} LOGIN"));
    let as_role = |sql: &str| format!("SET ROLE {role}; {sql}");
    for sql in [
        "SELECT * FROM outbox.destination".to_string(),
        "SELECT * FROM outbox.event".to_string(),
        "SELECT * FROM outbox.dead_letter".to_string(),
        "SELECT * FROM outbox.topic".to_string(),
        "SELECT * FROM outbox.destination_status".to_string(),
        format!("SELECT outbox.status('{dest}')"),
        format!("SELECT outbox.destination_config('{dest}')"),
        format!("SELECT outbox.create_destination('x', 'urn:{t}', 'kafka-best-effort', '{{}}')"),
        format!("SELECT outbox.alter_destination('{dest}', '{{}}')"),
    ] {
        let err = pg.sql_err(&as_role(&sql));
        assert_eq!(err.sqlstate, "42501", "{sql}: {}", err.raw);
    }
    // Monitoring, granted as the README says: counters and errors, no secrets.
    pg.sql(&format!(
        "GRANT SELECT ON outbox.destination_status TO {role}; \
         GRANT EXECUTE ON FUNCTION outbox._destination_stats(), outbox.status(text) TO {role}"
    ));
    let view = pg.sql(&as_role(&format!("SELECT row_to_json(s) FROM outbox.destination_status s WHERE id = '{dest}'")));
    let status = pg.sql(&as_role(&format!("SELECT outbox.status('{dest}')")));
    assert!(view.contains("\"messages_queued\":1"), "{view}");
    assert!(status.contains("messagesQueued"), "{status}");
    for shown in [&view, &status] {
        assert!(!shown.contains("hunter2") && !shown.contains("svc"), "{shown}");
    }
    // Still nothing else, even with EXECUTE granted on the configuration function.
    pg.sql(&format!("GRANT EXECUTE ON FUNCTION outbox.destination_config(text), outbox._effective_config(text, text, jsonb) TO {role}"));
    for sql in ["SELECT * FROM outbox.destination".to_string(), format!("SELECT outbox.destination_config('{dest}')")] {
        assert_eq!(pg.sql_err(&as_role(&sql)).sqlstate, "42501", "{sql}");
    }
    let err =
        pg.sql_err(&as_role(&format!("SELECT outbox._effective_config('{dest}', 'kafka-at-least-once', '{{}}')")));
    assert_eq!(err.sqlstate, "42501", "{}", err.raw);
    // The superuser sees the configuration with the password redacted.
    let c = config(pg, &dest);
    assert_eq!((c["sasl.username"].as_str(), c["sasl.password"].as_str()), (Some("svc"), Some("[redacted]")));
    // Nothing in the server log either, also when a call carrying a secret fails.
    let wrong = r#"org.apache.kafka.common.security.plain.PlainLoginModule required username=\"svc\" password=\"hunter2-zz8\";"#;
    let err = pg.sql_err(&format!(r#"SELECT outbox.alter_destination('{dest}', '{{"saslJaasConfig": "{wrong}"}}')"#));
    assert_eq!(err.sqlstate, "22023", "{}", err.raw);
    assert!(err.message.contains("PlainLoginModule but saslMechanism SCRAM-SHA-512"), "{}", err.raw);
    assert!(!err.raw.contains("hunter2"), "{}", err.raw);
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(!log.contains("hunter2"), "the server log shows the password");
    pg.sql(&format!("SELECT outbox.drop_destination('{dest}')"));
}

/// Java's send() blocks up to maxBlockMs for buffer space; librdkafka refuses
/// at once. Best-effort events wait for space that long, then count as lost.
#[test]
fn best_effort_waits_for_buffer_space_up_to_max_block_ms() {
    let pg = &env().pg;
    let broker = Broker::start();
    let t = unique("block");
    broker.create_topic(&t, 1);
    pg.watched_table(&t, "id int PRIMARY KEY");
    let wait = t.replace('_', "-");
    let (nowait, short) = (format!("{wait}-nowait"), format!("{wait}-short"));
    for (dest, block) in [(&wait, 20_000), (&nowait, 0), (&short, 1_000)] {
        pg.destination(dest, &format!("urn:{t}"), &t)
            .bootstrap(&broker.bootstrap())
            .best_effort()
            .content("id-only")
            .params(json!({"rdkafka.queue.buffering.max.messages": 5, "maxBlockMs": block}))
            .create();
    }
    // Producers connected first, then the broker stops answering.
    pg.sql(&format!("INSERT INTO {t} VALUES (0)"));
    for dest in [&wait, &nowait, &short] {
        wait_for("the first event delivered", WAIT, || (pg.status_row(dest)["messages_delivered"] == 1).then_some(()));
    }
    broker.freeze();
    pg.sql(&format!("INSERT INTO {t} SELECT generate_series(1, 20)"));
    wait_for("the queue full", WAIT, || (pg.status_row(&nowait)["messages_lost"] == 15).then_some(()));
    wait_for("maxBlockMs passed", WAIT, || (pg.status_row(&short)["messages_lost"] == 15).then_some(()));
    assert!(pg.status_row(&short)["last_errors"].to_string().contains("stayed full for maxBlockMs (1000 ms)"));
    assert_eq!(pg.status_row(&wait)["messages_lost"], 0);
    broker.thaw();
    wait_for("every waiting event delivered", WAIT, || {
        (pg.status_row(&wait)["messages_delivered"] == 21).then_some(())
    });
    let row = pg.status_row(&nowait);
    assert_eq!((row["messages_delivered"].as_i64(), row["messages_lost"].as_i64()), (Some(6), Some(15)), "{row}");
    assert!(row["last_errors"].to_string().contains("maxBlockMs is 0"), "{row}");
    wait_for("the short wait's five delivered", WAIT, || {
        (pg.status_row(&short)["messages_delivered"] == 6).then_some(())
    });
    assert_eq!(pg.status_row(&wait)["messages_lost"], 0);
}

/// Events keep the shape they were captured in: switching an id-only
/// destination to full-resource does not send its backlog with a null row.
#[test]
fn content_switch_sends_queued_events_in_the_shape_they_were_captured() {
    let Env { pg, broker } = env();
    let t = unique("shape");
    let dest = t.replace('_', "-");
    broker.create_topic(&t, 1);
    pg.watched_table(&t, "id int PRIMARY KEY, v text");
    // Nothing listens here yet: the first rows wait in the outbox.
    let nowhere = format!("127.0.0.1:{}", free_port());
    pg.destination(&dest, &format!("urn:{t}"), &t).bootstrap(&nowhere).content("id-only").create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1, 'a'), (2, 'b')"));
    let patch = format!(r#"{{"bootstrapServers": "{}"}}"#, broker.bootstrap());
    pg.sql(&format!("SELECT outbox.alter_destination('{dest}', '{patch}', content => 'full-resource')"));
    pg.sql(&format!("INSERT INTO {t} VALUES (3, 'c')"));
    let mut msgs = consume(&broker.bootstrap(), &t, 3, WAIT, Duration::from_millis(500));
    msgs.sort_by_key(|m| m.key.clone());
    let second: Vec<Value> = msgs.iter().map(|m| m.json()["entry"][1].clone()).collect();
    assert_eq!(second[0]["fullUrl"], format!("{t}/1"));
    assert_eq!(second[1]["fullUrl"], format!("{t}/2"));
    assert!(second[0].get("resource").is_none(), "{}", second[0]);
    assert_eq!(second[2]["resource"], serde_json::json!({"id": 3, "v": "c"}));
}
