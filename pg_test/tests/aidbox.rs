//! Aidbox compatibility end to end: AidboxSubscriptionTopic and
//! AidboxTopicDestination resources pasted as Aidbox documents them, tables in
//! Aidbox's layout, FHIRPath criteria, and the notification compared field by
//! field with Aidbox's documented one.

use pg_outbox_test::{consume, unique, wait_for, Env, Received};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const TOPIC_URL: &str = "http://example.org/FHIR/R5/SubscriptionTopic/QuestionnaireResponse-topic";

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let e = Env::start("aidbox", &["outbox.fhir_base_url = 'http://aidbox-server/fhir'"]);
        let pg = &e.pg;
        // Aidbox's storage: one table per resource type, named in lower case.
        pg.sql(
            "CREATE TYPE resource_status AS ENUM ('created', 'updated', 'deleted', 'recreated');
             CREATE SEQUENCE transaction_id_seq;",
        );
        for table in ["questionnaireresponse", "encounter"] {
            pg.sql(&format!(
                "CREATE TABLE {table} (id text PRIMARY KEY, txid bigint NOT NULL DEFAULT nextval('transaction_id_seq'),
                   ts timestamptz DEFAULT now(), cts timestamptz DEFAULT now(), resource_type text,
                   status resource_status NOT NULL DEFAULT 'created', resource jsonb NOT NULL)"
            ));
        }
        e
    })
}

/// Aidbox's documented topic, verbatim.
fn aidbox_topic() -> Value {
    json!({"resourceType": "AidboxSubscriptionTopic",
           "url": TOPIC_URL,
           "status": "active",
           "trigger": [{"resource": "QuestionnaireResponse",
                        "fhirPathCriteria": "status = 'completed' or status = 'amended'"}]})
}

fn sql_json(v: &Value) -> String {
    format!("'{}'::jsonb", v.to_string().replace('\'', "''"))
}

fn by_key(msgs: &[Received], key: &str) -> Value {
    msgs.iter().find(|m| m.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("no message for {key}")).json()
}

#[test]
fn aidbox_resources_pasted_verbatim_deliver_aidbox_notifications() {
    let e = env();
    let pg = &e.pg;
    e.broker.create_topic("aidbox-forms", 1);
    assert_eq!(pg.sql(&format!("SELECT outbox.create_topic({})", sql_json(&aidbox_topic()))), TOPIC_URL);

    // The AWS MSK IAM example (best-effort), host names changed: accepted as it is.
    let msk = json!({"resourceType": "AidboxTopicDestination",
        "meta": {"profile": ["http://aidbox.app/StructureDefinition/aidboxtopicdestination-kafka-best-effort"]},
        "kind": "kafka-best-effort", "id": "kafka-destination", "topic": TOPIC_URL,
        "parameter": [
            {"name": "kafkaTopic", "valueString": "aidbox-forms"},
            {"name": "bootstrapServers", "valueString": "b-1.forms.abc123.c2.kafka.eu-west-1.amazonaws.com:9098,b-2.forms.abc123.c2.kafka.eu-west-1.amazonaws.com:9098"},
            {"name": "securityProtocol", "valueString": "SASL_SSL"},
            {"name": "saslMechanism", "valueString": "AWS_MSK_IAM"},
            {"name": "saslJaasConfig", "valueString": "software.amazon.msk.auth.iam.IAMLoginModule required;"},
            {"name": "saslClientCallbackHandlerClass", "valueString": "software.amazon.msk.auth.iam.IAMClientCallbackHandler"}]});
    pg.sql(&format!("SELECT outbox.create_destination({})", sql_json(&msk)));
    let config: Value = serde_json::from_str(&pg.sql("SELECT outbox.destination_config('kafka-destination')")).unwrap();
    assert_eq!(config["sasl.mechanism"], "OAUTHBEARER");
    assert_eq!(config["security.protocol"], "sasl_ssl");
    assert_eq!(config["pg_outbox.oauthbearer.token"], "aws-msk-iam region=eu-west-1");
    pg.sql("SELECT outbox.drop_destination('kafka-destination')");

    // The standalone Kafka example (at-least-once), host name changed.
    let kafka = json!({"resourceType": "AidboxTopicDestination",
        "meta": {"profile": ["http://aidbox.app/StructureDefinition/aidboxtopicdestination-kafka-at-least-once"]},
        "kind": "kafka-at-least-once", "id": "kafka-destination", "topic": TOPIC_URL,
        "parameter": [{"name": "kafkaTopic", "valueString": "aidbox-forms"},
                      {"name": "bootstrapServers", "valueString": e.broker.bootstrap()}]});
    pg.sql(&format!("SELECT outbox.create_destination({})", sql_json(&kafka)));

    // Written as Aidbox writes them: resource without id and resourceType.
    pg.sql(
        "INSERT INTO questionnaireresponse (id, resource_type, resource) VALUES
           ('qr-1', 'QuestionnaireResponse', '{\"status\": \"completed\", \"questionnaire\": \"http://loinc.org/q/100109-8\",
              \"item\": [{\"linkId\": \"128852\", \"answer\": [{\"valueString\": \"123\"}]}]}'),
           ('qr-2', 'QuestionnaireResponse', '{\"status\": \"in-progress\"}'),
           ('qr-3', 'QuestionnaireResponse', '{\"status\": \"amended\", \"meta\": {\"extension\": [{\"url\": \"ex:createdAt\", \"valueInstant\": \"2024-10-03T10:07:42Z\"}]}}')",
    );
    let msgs = consume(&e.broker.bootstrap(), "aidbox-forms", 2, WAIT, Duration::from_millis(700));
    let mut keys: Vec<&str> = msgs.iter().map(|m| m.key.as_deref().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["qr-1", "qr-3"], "the FHIRPath criteria let through completed and amended only");

    // Field by field against Aidbox's documented full-resource notification.
    let (txid, ts): (String, String) = {
        let row = pg.sql(
            "SELECT txid || ' ' || to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM questionnaireresponse WHERE id = 'qr-1'",
        );
        let (a, b) = row.split_once(' ').unwrap();
        (a.to_string(), b.to_string())
    };
    let m = by_key(&msgs, "qr-1");
    let number = m["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"].clone();
    assert!(number.is_u64());
    let timestamp = m["timestamp"].clone();
    assert_eq!(
        m,
        json!({"resourceType": "Bundle", "type": "history", "timestamp": timestamp,
               "entry": [
                 {"resource": {"resourceType": "AidboxSubscriptionStatus", "status": "active", "type": "event-notification",
                               "notificationEvent": [{"eventNumber": number, "focus": {"reference": "QuestionnaireResponse/qr-1"}}],
                               "topic": TOPIC_URL,
                               "topic-destination": {"reference": "AidboxTopicDestination/kafka-destination"}}},
                 {"resource": {"resourceType": "QuestionnaireResponse", "id": "qr-1",
                               "meta": {"versionId": txid, "lastUpdated": ts},
                               "status": "completed", "questionnaire": "http://loinc.org/q/100109-8",
                               "item": [{"linkId": "128852", "answer": [{"valueString": "123"}]}]},
                  "fullUrl": "http://aidbox-server/fhir/QuestionnaireResponse/qr-1",
                  "request": {"method": "POST", "url": "/fhir/QuestionnaireResponse"}}]})
    );
    // The resource's own meta is kept, versionId and lastUpdated added.
    let qr3 = by_key(&msgs, "qr-3");
    assert_eq!(qr3["entry"][1]["resource"]["meta"]["extension"][0]["url"], "ex:createdAt");
    assert!(qr3["entry"][1]["resource"]["meta"]["versionId"].is_string());

    // id-only: the entry without the resource, as Aidbox documents it; an update is a PUT.
    pg.sql("SELECT outbox.alter_destination('kafka-destination', content => 'id-only')");
    pg.sql("UPDATE questionnaireresponse SET resource = resource || '{\"status\": \"amended\"}', status = 'updated' WHERE id = 'qr-1'");
    let msgs = consume(&e.broker.bootstrap(), "aidbox-forms", 3, WAIT, Duration::from_millis(700));
    let update =
        msgs.iter().map(Received::json).find(|m| m["entry"][1]["request"]["method"] == "PUT").expect("the update");
    assert_eq!(
        update["entry"][1],
        json!({"fullUrl": "http://aidbox-server/fhir/QuestionnaireResponse/qr-1",
               "request": {"method": "PUT", "url": "/fhir/QuestionnaireResponse/qr-1"}})
    );
    assert_eq!(
        update["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"],
        "QuestionnaireResponse/qr-1"
    );
    pg.sql("SELECT outbox.drop_topic(url => 'http://example.org/FHIR/R5/SubscriptionTopic/QuestionnaireResponse-topic', cascade => true)");
}

#[test]
fn fhirpath_sees_current_and_previous_state() {
    let e = env();
    let pg = &e.pg;
    let kafka_topic = e.broker.new_topic("enc", 1);
    let url = format!("urn:{kafka_topic}");
    let topic = json!({"resourceType": "AidboxSubscriptionTopic", "url": url, "status": "active",
        "trigger": [{"resource": "Encounter", "supportedInteraction": ["update"],
                     "fhirPathCriteria": "%current.status = 'finished' and %previous.status = 'in-progress'"}]});
    pg.sql(&format!("SELECT outbox.create_topic({})", sql_json(&topic)));
    let dest = json!({"resourceType": "AidboxTopicDestination",
        "meta": {"profile": ["http://health-samurai.io/fhir/core/StructureDefinition/aidboxtopicdestination-kafkaAtLeastOnceProfile"]},
        "kind": "kafka-at-least-once", "id": "encounters", "topic": url, "content": "id-only",
        "parameter": [{"name": "kafkaTopic", "valueString": kafka_topic}, {"name": "bootstrapServers", "valueString": e.broker.bootstrap()}]});
    pg.sql(&format!("SELECT outbox.create_destination({})", sql_json(&dest)));
    pg.sql(
        "INSERT INTO encounter (id, resource_type, resource) VALUES
           ('e-1', 'Encounter', '{\"status\": \"in-progress\"}'), ('e-2', 'Encounter', '{\"status\": \"planned\"}');
         UPDATE encounter SET resource = '{\"status\": \"finished\"}' WHERE id IN ('e-1', 'e-2');
         UPDATE encounter SET resource = '{\"status\": \"finished\", \"length\": {\"value\": 1}}' WHERE id = 'e-1';
         INSERT INTO encounter (id, resource_type, resource) VALUES ('e-3', 'Encounter', '{\"status\": \"finished\"}');",
    );
    wait_for("the outbox drained", WAIT, || {
        (pg.count("SELECT count(*) FROM outbox.event WHERE destination_id = 'encounters'") == 0).then_some(())
    });
    let msgs = consume(&e.broker.bootstrap(), &kafka_topic, 1, WAIT, Duration::from_millis(1500));
    let keys: Vec<&str> = msgs.iter().map(|m| m.key.as_deref().unwrap()).collect();
    assert_eq!(keys, ["e-1"], "only in-progress -> finished");
    assert_eq!(pg.status_row("encounters")["messages_delivered"], 1);
    pg.sql(&format!("SELECT outbox.drop_topic(url => '{url}', cascade => true)"));
}

#[test]
fn wrong_resources_and_criteria_are_refused_when_created() {
    let e = env();
    let pg = &e.pg;
    let t = |trigger: Value| json!({"resourceType": "AidboxSubscriptionTopic", "url": "urn:bad", "status": "active", "trigger": [trigger]});
    let qr = |criteria: &str| t(json!({"resource": "QuestionnaireResponse", "fhirPathCriteria": criteria}));
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            qr("status = = 'completed'"),
            "42P17",
            "invalid fhirPathCriteria for table \"questionnaireresponse\" in topic \"urn:bad\": invalid FHIRPath",
        ),
        (qr("subject.resolve().active = true"), "0A000", "resolve() needs a FHIR server"),
        (qr("status.sparkle()"), "42P17", "unknown FHIRPath function sparkle()"),
        (qr("%subject.status = 'x'"), "42P17", "unknown FHIRPath variable %subject"),
        (t(json!({"resource": "Hedgehog"})), "42P01", "no table for resource type \"Hedgehog\" in topic \"urn:bad\""),
        (
            t(json!({"resource": "QuestionnaireResponse", "supportedInteraction": ["upsert"]})),
            "22023",
            "unknown interaction \"upsert\"",
        ),
        (t(json!({"resource": "QuestionnaireResponse", "filter": "x"})), "0A000", "trigger element \"filter\""),
        (
            json!({"resourceType": "AidboxTopicDestination", "url": "urn:bad"}),
            "22023",
            "resourceType \"AidboxTopicDestination\" is not AidboxSubscriptionTopic",
        ),
        (
            json!({"resourceType": "AidboxSubscriptionTopic", "url": "urn:bad", "status": "draft", "trigger": [{"resource": "Encounter"}]}),
            "22023",
            "only active topics are served",
        ),
    ];
    for (resource, code, message) in &cases {
        let err = pg.sql_err(&format!("SELECT outbox.create_topic({})", sql_json(resource)));
        assert_eq!(&err.sqlstate, code, "{resource}: {}", err.raw);
        assert!(err.message.contains(message), "{resource}: {}", err.raw);
        assert!(err.hint.as_deref().is_some_and(|h| !h.is_empty()), "{resource}: no hint");
    }
    let err = pg.sql_err(&format!("SELECT outbox.create_topic({})", sql_json(&t(json!({"resource": "Hedgehog"})))));
    assert!(err.hint.unwrap().contains("a table named \"hedgehog\""));

    pg.sql(&format!("SELECT outbox.create_topic({})", sql_json(&qr("status = 'completed'"))));
    let d = |profile: &str, kind: &str| {
        json!({"resourceType": "AidboxTopicDestination", "meta": {"profile": [profile]}, "kind": kind, "id": "bad-dest",
               "topic": "urn:bad", "parameter": [{"name": "kafkaTopic", "valueString": "x"}, {"name": "bootstrapServers", "valueString": "k:9092"}]})
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            d("http://aidbox.app/StructureDefinition/aidboxtopicdestination-kafka-best-effort", "kafka-at-least-once"),
            "22023",
            "has kind \"kafka-at-least-once\" but profile",
        ),
        (
            d(
                "http://aidbox.app/StructureDefinition/aidboxtopicdestination-webhook-at-least-once",
                "webhook-at-least-once",
            ),
            "0A000",
            "is not a Kafka destination profile",
        ),
        (
            json!({"resourceType": "AidboxTopicDestination", "id": "bad-dest", "topic": "urn:bad", "kind": "kafka-best-effort",
                "parameter": [{"name": "kafkaTopic", "valueInteger": 5}]}),
            "22023",
            "must be a string, not a number",
        ),
        (
            json!({"resourceType": "AidboxTopicDestination", "id": "bad-dest", "topic": "urn:bad", "kind": "kafka-best-effort", "channel": {}}),
            "0A000",
            "element \"channel\"",
        ),
    ];
    for (resource, code, message) in &cases {
        let err = pg.sql_err(&format!("SELECT outbox.create_destination({})", sql_json(resource)));
        assert_eq!(&err.sqlstate, code, "{resource}: {}", err.raw);
        assert!(err.message.contains(message), "{resource}: {}", err.raw);
    }
    // The profile alone gives the kind.
    let mut ok = d("http://aidbox.app/StructureDefinition/aidboxtopicdestination-kafka-best-effort", "");
    ok.as_object_mut().unwrap().remove("kind");
    pg.sql(&format!("SELECT outbox.create_destination({})", sql_json(&ok)));
    assert_eq!(pg.sql("SELECT kind FROM outbox.destination WHERE id = 'bad-dest'"), "kafka-best-effort");
    assert_eq!(pg.count("SELECT count(*) FROM outbox.topic WHERE url = 'urn:bad'"), 1);
    pg.sql("SELECT outbox.drop_topic(url => 'urn:bad', cascade => true)");
}

#[test]
fn resource_types_map_to_tables_the_admin_names() {
    let e = env();
    let pg = &e.pg;
    let t = unique("obs_store");
    let kafka_topic = e.broker.new_topic("obs", 1);
    pg.sql(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, code text); SELECT outbox.map_resource('Observation', '{t}')"
    ));
    let url = format!("urn:{kafka_topic}");
    let topic = json!({"resourceType": "AidboxSubscriptionTopic", "url": url, "status": "active",
                       "trigger": [{"resource": "Observation", "fhirPathCriteria": "code = 'bp'"}]});
    pg.sql(&format!("SELECT outbox.create_topic({})", sql_json(&topic)));
    assert_eq!(pg.sql(&format!("SELECT table_name FROM outbox.topic_table tt JOIN outbox.topic t ON t.id = tt.topic_id WHERE t.url = '{url}'")), format!("public.{t}"));
    pg.destination("observations", &url, &kafka_topic).bootstrap(&e.broker.bootstrap()).create();
    pg.sql(&format!("INSERT INTO {t} VALUES (1, 'bp'), (2, 'hr')"));
    // Not Aidbox's layout: the row is the resource, the reference names the table.
    let msgs = consume(&e.broker.bootstrap(), &kafka_topic, 1, WAIT, Duration::from_millis(1000));
    assert_eq!(msgs.len(), 1);
    let m = msgs[0].json();
    assert_eq!(m["entry"][1]["resource"], json!({"id": 1, "code": "bp"}));
    assert_eq!(m["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"], format!("{t}/1"));
    assert!(pg.sql("SELECT outbox.unmap_resource('Observation')") == "t");
    pg.sql(&format!("SELECT outbox.drop_topic(url => '{url}', cascade => true)"));
    // A mapped table dropped takes its mapping along (no topic watches it).
    pg.sql(&format!("SELECT outbox.map_resource('Observation', '{t}'); DROP TABLE {t}"));
    assert_eq!(pg.count("SELECT count(*) FROM outbox.resource_table WHERE resource_type = 'Observation'"), 0);
}

/// A criteria the evaluator fails on at run time (rh-fhirpath 0.3.0 refuses
/// string functions on coded elements) lets the change through with a
/// WARNING naming the topic: an extra event rather than a lost one or a
/// failed write. Evaluated, `startsWith('zzz')` would be false.
#[test]
fn criteria_that_cannot_be_evaluated_fail_open() {
    let e = env();
    let pg = &e.pg;
    let kafka_topic = e.broker.new_topic("open", 1);
    pg.sql(
        "CREATE TABLE task (id text PRIMARY KEY, txid bigint, ts timestamptz DEFAULT now(), resource jsonb NOT NULL)",
    );
    let url = format!("urn:{kafka_topic}");
    let topic = json!({"resourceType": "AidboxSubscriptionTopic", "url": url, "status": "active",
        "trigger": [{"resource": "Task", "supportedInteraction": ["create"], "fhirPathCriteria": "status.startsWith('zzz')"}]});
    pg.sql(&format!("SELECT outbox.create_topic({})", sql_json(&topic)));
    let topic_id = pg.sql(&format!("SELECT id FROM outbox.topic WHERE url = '{url}'"));
    pg.destination("open", &url, &kafka_topic).bootstrap(&e.broker.bootstrap()).content("id-only").create();
    pg.sql("INSERT INTO task (id, resource) VALUES ('t-1', '{\"status\": \"completed\"}')");
    let msgs = consume(&e.broker.bootstrap(), &kafka_topic, 1, WAIT, Duration::from_millis(500));
    assert_eq!(msgs.len(), 1);
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    let warning = format!("the fhirPathCriteria of topic {topic_id} on public.task could not be evaluated");
    assert!(log.contains(&warning) && log.contains("the change is sent as if it matched"), "no warning: {warning}");
    pg.sql(&format!("SELECT outbox.drop_topic(url => '{url}', cascade => true)"));
}

/// Deletes from a FHIR table, best-effort: the old resource, DELETE on its url.
#[test]
fn deletes_from_a_fhir_table_carry_the_old_resource() {
    let e = env();
    let pg = &e.pg;
    let kafka_topic = e.broker.new_topic("del", 1);
    pg.sql(
        "CREATE TABLE \"Odd Table\" (id text PRIMARY KEY, txid bigint, resource jsonb NOT NULL);
         SELECT outbox.map_resource('Flag', '\"Odd Table\"');
         INSERT INTO \"Odd Table\" VALUES ('f-1', 7, '{\"status\": \"active\", \"code\": {\"text\": \"x\"}}')",
    );
    let url = format!("urn:{kafka_topic}");
    let topic = json!({"resourceType": "AidboxSubscriptionTopic", "url": url, "status": "active",
        "trigger": [{"resource": "Flag", "supportedInteraction": ["delete"], "fhirPathCriteria": "%previous.status = 'active'"}]});
    pg.sql(&format!("SELECT outbox.create_topic({})", sql_json(&topic)));
    pg.destination("flags", &url, &kafka_topic).bootstrap(&e.broker.bootstrap()).best_effort().create();
    pg.sql("DELETE FROM \"Odd Table\" WHERE id = 'f-1'");
    let msgs = consume(&e.broker.bootstrap(), &kafka_topic, 1, WAIT, Duration::from_millis(500));
    assert_eq!(msgs.len(), 1);
    let m = msgs[0].json();
    assert_eq!(m["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"], "Flag/f-1");
    assert_eq!(
        m["entry"][1],
        json!({"resource": {"resourceType": "Flag", "id": "f-1", "meta": {"versionId": "7"}, "status": "active", "code": {"text": "x"}},
               "fullUrl": "http://aidbox-server/fhir/Flag/f-1",
               "request": {"method": "DELETE", "url": "/fhir/Flag/f-1"}})
    );
    pg.sql(&format!("SELECT outbox.drop_topic(url => '{url}', cascade => true); SELECT outbox.unmap_resource('Flag')"));
}
