//! What arrives in Kafka: the documented Bundle with its headers, keyed by
//! primary key (none, simple or composite), one copy per destination of a
//! topic. The tests share one cluster and broker and use their own tables and
//! topics.

use pg_outbox_test::{consume, unique_id, Env, Received, Stream};
use std::sync::OnceLock;
use std::time::Duration;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env::start("messages", &[]))
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
