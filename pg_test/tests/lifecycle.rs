//! The extension's life on a server: the `outbox.max_destinations` limit,
//! `ALTER EXTENSION pg_outbox UPDATE` from each earlier release with events
//! waiting, and pg_dump / pg_restore into a fresh cluster. Each test brings
//! its own cluster (their settings and extension versions differ).

use pg_outbox_test::{consume, keys, wait_for, Broker, Cluster, Env, PG_BIN};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

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
    let log = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
    let (skipped, served) = if log.contains(&format!("destination \"{a}\" skipped")) { (a, b) } else { (b, a) };
    assert!(log.contains(&format!("destination \"{skipped}\" skipped: all 1 status slots")), "{log}");
    pg.sql("INSERT INTO limited VALUES (2)");
    pg.wait_drained(&served, WAIT);
    let waiting = format!("SELECT count(*) FROM outbox.event WHERE destination_id = '{skipped}'");
    assert_eq!(pg.count(&waiting), 1, "the destination without a slot is not served");
}

/// The extension's objects, one line each (functions by definition, tables
/// by column, indexes, constraints, views, triggers, event triggers,
/// privileges, replica identities, the tables pg_dump carries, the
/// extension's members with their initial privileges): an upgraded installation must
/// print what a fresh one prints.
const CATALOG: &str = "SELECT replace(x, E'\\n', ' | ') FROM ( \
    SELECT 'function ' || p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '') \
      FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace \
    UNION ALL SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' identity ' || c.relreplident::text || \
           ' acl ' || coalesce(c.relacl::text, '') || ' ' || \
           coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull \
                         || ' ' || a.attstorage::text || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ', ' ORDER BY a.attname) \
                       FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '') \
      FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind <> 'i' \
    UNION ALL SELECT 'index ' || pg_get_indexdef(i.indexrelid) || ' identity ' || i.indisreplident \
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
     WHERE c.relnamespace = 'outbox'::regnamespace \
    UNION ALL SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
      FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace \
    UNION ALL SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid) FROM pg_class c \
     WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'v' \
    UNION ALL SELECT 'trigger ' || pg_get_triggerdef(g.oid) FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid \
     WHERE c.relnamespace = 'outbox'::regnamespace AND NOT g.tgisinternal \
    UNION ALL SELECT 'event trigger ' || evtname || ' ' || evtevent || ' ' || evtfoid::regproc || ' ' || coalesce(evttags::text, '') \
      FROM pg_event_trigger \
    UNION ALL SELECT 'dumped ' || u.t::regclass::text || ' ' || quote_literal(u.c) \
      FROM pg_extension x, unnest(x.extconfig, x.extcondition) u (t, c) WHERE x.extname = 'pg_outbox' \
    UNION ALL SELECT 'schema acl ' || coalesce(nspacl::text, '') FROM pg_namespace WHERE nspname = 'outbox' \
    UNION ALL SELECT 'member ' || pg_describe_object(m.classid, m.objid, m.objsubid) || ' initial acl ' || \
           coalesce((SELECT string_agg(i.objsubid || ' ' || i.initprivs::text, ', ' ORDER BY i.objsubid) FROM pg_init_privs i \
                      WHERE i.classoid = m.classid AND i.objoid = m.objid), '') \
      FROM pg_depend m WHERE m.refclassid = 'pg_extension'::regclass AND m.deptype = 'e' \
       AND m.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_outbox') \
  ) s (x) ORDER BY x";

fn catalog(pg: &Cluster) -> BTreeSet<String> {
    pg.sql(CATALOG).lines().map(str::to_string).collect()
}

/// The previous release's install script (sql/releases/), beside the
/// current one in the server's extension directory.
fn install_release(version: &str) {
    let out = std::process::Command::new(format!("{}/pg_config", PG_BIN.path())).arg("--sharedir").output().unwrap();
    let sharedir = String::from_utf8(out.stdout).unwrap();
    let name = format!("pg_outbox--{version}.sql");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/releases").join(&name);
    std::fs::copy(&script, std::path::Path::new(sharedir.trim()).join("extension").join(&name))
        .unwrap_or_else(|e| panic!("copy {}: {e}", script.display()));
}

/// The version this build installs (the extension's Cargo.toml).
fn current_version() -> &'static str {
    let manifest = include_str!("../../Cargo.toml");
    manifest.lines().find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"')).expect("version in Cargo.toml")
}

/// Install release `from`, leave 50 events pending (the broker frozen),
/// `ALTER EXTENSION pg_outbox UPDATE`: nothing is lost, delivery goes on, and
/// the catalog is a fresh install's.
fn update_from(from: &str) {
    install_release(from);
    let name = format!("upgrade_{}", from.replace('.', "_"));
    let broker = Broker::start();
    let pg = Cluster::start(&name, &[]);
    pg.sql(&format!("CREATE EXTENSION pg_outbox VERSION '{from}'"));
    let version = "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'";
    assert_eq!(pg.sql(version), from);
    let url = pg.watched_table("orders", "id int PRIMARY KEY, v text");
    let (dest, topic) = pg.destination_on(&broker, &url).create();
    pg.sql("INSERT INTO orders SELECT g, 'a' FROM generate_series(1, 50) g");
    pg.wait_drained(&dest, WAIT);
    // The broker freezes: these stay pending through the update.
    broker.freeze();
    pg.sql("INSERT INTO orders SELECT g, 'b' FROM generate_series(51, 100) g");
    let pending = "SELECT count(*) FROM outbox.pending";
    assert_eq!(pg.count(pending), 50);
    // A monitoring role, as the README grants it, in a session that asked
    // for the status before the update and asks again after it; and a grant
    // on the outbox table itself, which the update names in a warning.
    pg.sql(MONITOR);
    pg.sql("GRANT SELECT ON outbox.event TO monitor");
    let mut monitor = pg.session();
    monitor.sql("SET ROLE monitor");
    let status = format!("SELECT outbox.status('{dest}')->>'resourceType'");
    assert_eq!(monitor.sql(&status), "Parameters");
    let watched = "SELECT count(*) FROM outbox.destination_status WHERE status <> 'stopped'";
    assert_eq!(monitor.count(watched), 1);

    let (_, notices) = pg.sql_with_notices("ALTER EXTENSION pg_outbox UPDATE");
    assert!(
        notices.contains("without what was granted on it: GRANT SELECT ON outbox.event TO monitor"),
        "the update warns of the grant it could not carry: {notices}"
    );
    assert_eq!(pg.sql(version), current_version());
    assert_eq!(pg.count(pending), 50);
    assert_eq!(monitor.sql(&status), "Parameters", "the grants on status() and the view stay");
    assert_eq!(monitor.count(watched), 1);
    assert_eq!(pg.sql("SELECT has_table_privilege('monitor', 'outbox.event', 'SELECT')"), "f");
    monitor.sql("RESET ROLE");
    broker.thaw();
    pg.sql("INSERT INTO orders SELECT g, 'c' FROM generate_series(101, 120) g");
    assert_eq!(keys(&broker.bootstrap(), &topic, 120), (1..=120).collect::<BTreeSet<i64>>());
    pg.wait_drained(&dest, WAIT);
    // The capture triggers the old release made go with the extension.
    assert_eq!(pg.count(TIED_TRIGGERS), 3);
    assert_eq!(pg.count(&TIED_TRIGGERS.replace("'x'", "'a'")), 0, "the old dependency is gone");

    // The update leaves what a fresh install has.
    let fresh = Cluster::start(&format!("{name}_fresh"), &[]);
    fresh.sql("CREATE EXTENSION pg_outbox");
    fresh.sql(MONITOR);
    let (upgraded, fresh) = (catalog(&pg), catalog(&fresh));
    let only_upgraded: Vec<_> = upgraded.difference(&fresh).collect();
    let only_fresh: Vec<_> = fresh.difference(&upgraded).collect();
    assert!(
        only_upgraded.is_empty() && only_fresh.is_empty(),
        "upgraded and fresh installs differ:\nonly upgraded: {only_upgraded:#?}\nonly fresh: {only_fresh:#?}"
    );
    // The grants are the user's: nothing of the extension holds the role.
    drop(monitor);
    pg.sql(
        "REVOKE ALL ON outbox.destination_status, outbox.pending FROM monitor; \
         REVOKE ALL ON FUNCTION outbox._destination_stats(), outbox.status(text) FROM monitor; DROP ROLE monitor",
    );
}

/// A role that reads the status and the outbox (granted after the install,
/// so the grants are the user's: not the extension's initial privileges).
const MONITOR: &str = "CREATE ROLE monitor; \
    GRANT SELECT ON outbox.destination_status, outbox.pending TO monitor; \
    GRANT EXECUTE ON FUNCTION outbox._destination_stats(), outbox.status(text) TO monitor";

/// Capture triggers that `DROP EXTENSION` drops and pg_dump ties again
/// (`ALTER TRIGGER ... DEPENDS ON EXTENSION`).
const TIED_TRIGGERS: &str = "SELECT count(*) FROM pg_trigger g JOIN pg_depend d \
    ON d.classid = 'pg_trigger'::regclass AND d.objid = g.oid AND d.deptype = 'x' \
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_outbox') \
 WHERE g.tgfoid = 'outbox._capture()'::regprocedure";

#[test]
fn alter_extension_update_from_0_1_0_keeps_pending_events_and_delivery_goes_on() {
    update_from("0.1.0");
}

#[test]
fn alter_extension_update_from_0_2_0_keeps_pending_events_and_delivery_goes_on() {
    update_from("0.2.0");
}

#[test]
fn alter_extension_update_from_0_3_0_keeps_pending_events_and_delivery_goes_on() {
    update_from("0.3.0");
}

/// pg_dump of a cluster with topics (SQL and FHIRPath criteria, a mapped
/// FHIR resource table), an at-least-once and a best-effort destination and
/// 20 events not yet delivered; pg_restore into a fresh cluster, without
/// errors or warnings. The restored cluster delivers the pending events,
/// captures new changes with the same criteria and shapes, ties the
/// restored capture triggers to its extension, and hands out new topic and
/// event ids after the restored ones.
#[test]
fn pg_dump_and_pg_restore_into_a_fresh_cluster_carry_topics_destinations_and_pending_events() {
    let broker = Broker::start();
    let a = Cluster::start("dump_source", &[]);
    a.sql("CREATE EXTENSION pg_outbox");
    // A topic made and dropped first: the restored topics are 2 and 3.
    let _ = a.watched_table("scratch", "id int PRIMARY KEY");
    a.sql("SELECT outbox.drop_topic('urn:scratch')");
    a.sql("CREATE TABLE orders (id int PRIMARY KEY, v text)");
    let entries = r#"[{"table": "orders", "interactions": ["create", "update"], "criteria": "NEW.v <> 'skip'"},
                      {"table": "orders", "interactions": ["delete"]}]"#;
    a.sql(&format!("SELECT outbox.create_topic('urn:orders', '{}')", entries.replace('\'', "''")));
    let orders_topic = broker.new_topic("orders", 1);
    a.destination("orders", "urn:orders", &orders_topic).bootstrap(&broker.bootstrap()).create();
    let loose_topic = broker.new_topic("loose", 1);
    a.destination("loose", "urn:orders", &loose_topic).bootstrap(&broker.bootstrap()).best_effort().create();
    a.sql("CREATE TABLE obs_store (id int PRIMARY KEY, code text); SELECT outbox.map_resource('Observation', 'obs_store')");
    let topic = json!({"resourceType": "AidboxSubscriptionTopic", "url": "urn:obs", "status": "active",
                       "trigger": [{"resource": "Observation", "fhirPathCriteria": "code = 'bp'"}]});
    a.sql(&format!("SELECT outbox.create_topic('{}'::jsonb)", topic.to_string().replace('\'', "''")));
    let obs_topic = broker.new_topic("obs", 1);
    a.destination("observations", "urn:obs", &obs_topic).bootstrap(&broker.bootstrap()).create();

    a.sql("INSERT INTO orders SELECT g, 'a' FROM generate_series(1, 20) g; INSERT INTO orders VALUES (21, 'skip')");
    // A dead letter (as the worker leaves one: an event Kafka refused).
    a.sql(
        "INSERT INTO outbox.dead_letter (id, destination_id, topic_id, table_name, interaction, key, row_data, \
                                         created_at, attempts, error) \
         SELECT nextval(pg_get_serial_sequence('outbox.event', 'id')), 'orders', t.id, 'public.orders', 'create', \
                '99', '{\"id\": 99, \"v\": \"dead\"}', now(), 1, 'Broker: Message size too large' \
           FROM outbox.topic t WHERE t.url = 'urn:orders'",
    );
    a.sql("INSERT INTO obs_store VALUES (1, 'bp'), (2, 'hr')");
    a.wait_drained("orders", WAIT);
    a.wait_drained("observations", WAIT);
    assert_eq!(keys(&broker.bootstrap(), &loose_topic, 20), (1..=20).collect::<BTreeSet<i64>>());
    // The broker freezes: 19 orders and one observation stay pending.
    broker.freeze();
    a.sql("INSERT INTO orders SELECT g, 'b' FROM generate_series(22, 40) g; INSERT INTO obs_store VALUES (3, 'bp')");
    assert_eq!(a.count("SELECT count(*) FROM outbox.pending"), 20);
    let last_event = a.count("SELECT max(id) FROM outbox.pending");
    let topic_ids = a.sql("SELECT string_agg(id || ' ' || url, ',' ORDER BY id) FROM outbox.topic");
    let configuration = |pg: &Cluster| {
        pg.sql(
            "SELECT (SELECT jsonb_agg(d ORDER BY d.id) FROM outbox.destination d) || \
                    (SELECT jsonb_agg(to_jsonb(e) - 'table_oid' ORDER BY topic_id, position) FROM outbox.topic_entry e) || \
                    (SELECT jsonb_agg(to_jsonb(r) - 'table_oid' ORDER BY resource_type) FROM outbox.resource_table r) || \
                    (SELECT jsonb_agg(l ORDER BY l.id) FROM outbox.dead_letter l) || \
                    (SELECT jsonb_agg(p ORDER BY p.id) FROM outbox.pending p) || \
                    jsonb_build_array((SELECT last_value FROM outbox.event_id_seq), \
                                      (SELECT last_value FROM outbox.topic_id_seq))",
        )
    };
    let source_configuration = configuration(&a);
    let dump = a.dir.join("pg_outbox.dump");
    a.client_program("pg_dump", &["-Fc", "-f", dump.to_str().unwrap(), "postgres"]);
    a.stop("immediate");

    let b = Cluster::start("dump_target", &[]);
    // As the README says (one transaction: the worker sees all of it at
    // once); --verbose: pg_restore prints the server's warnings only then.
    let restore = b.client_program(
        "pg_restore",
        &["--single-transaction", "--exit-on-error", "--verbose", "-d", "postgres", dump.to_str().unwrap()],
    );
    let warnings: Vec<&str> = restore.lines().filter(|l| l.contains("WARNING")).collect();
    assert!(warnings.is_empty(), "pg_restore printed: {warnings:#?}");
    assert_eq!(b.sql("SELECT string_agg(id || ' ' || url, ',' ORDER BY id) FROM outbox.topic"), topic_ids);
    assert_eq!(
        b.sql("SELECT string_agg(table_name, ',' ORDER BY table_name) FROM outbox.topic_table WHERE watched"),
        "public.obs_store,public.orders"
    );
    assert_eq!(b.count("SELECT count(*) FROM outbox.pending"), 20);
    // Destinations, entries, mappings, dead letters, pending events and the
    // sequences as they were (the tables' OIDs are checked by use, below).
    assert_eq!(configuration(&b), source_configuration);
    let capture_triggers = "SELECT count(*) FROM pg_trigger WHERE tgfoid = 'outbox._capture()'::regprocedure";
    assert_eq!(b.count(capture_triggers), 6, "insert, update and delete triggers on orders and obs_store");
    assert_eq!(b.count(TIED_TRIGGERS), 6);
    assert_eq!(b.count("SELECT count(*) FROM outbox.destination"), 3);

    broker.thaw();
    b.sql("INSERT INTO orders VALUES (41, 'c'), (42, 'skip'); INSERT INTO obs_store VALUES (4, 'hr'), (5, 'bp')");
    // The dead letter, retried, goes out from the restored cluster.
    assert_eq!(b.count("SELECT outbox.retry_dead_letters('orders')"), 1);
    let mut expected: BTreeSet<i64> = (1..=41).chain([99]).collect();
    expected.remove(&21);
    assert_eq!(keys(&broker.bootstrap(), &orders_topic, 41), expected);
    assert!(keys(&broker.bootstrap(), &loose_topic, 21).contains(&41), "the best-effort destination serves again");
    b.wait_drained("orders", WAIT);
    // The mapped resource table keeps its FHIR shape: the reference names it.
    let obs = consume(&broker.bootstrap(), &obs_topic, 3, WAIT, Duration::from_millis(1000));
    // (The frozen broker may still hold the source's copy of the pending one:
    // at-least-once.)
    let references: BTreeSet<String> = obs
        .iter()
        .map(|m| {
            m.json()["entry"][0]["resource"]["notificationEvent"][0]["focus"]["reference"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(references, BTreeSet::from(["obs_store/1", "obs_store/3", "obs_store/5"].map(String::from)));
    b.wait_drained("observations", WAIT);

    // New topics and events take ids after the restored ones.
    let _ = b.watched_table("later", "id int PRIMARY KEY");
    let restored_max: i64 =
        topic_ids.split(',').map(|t| t.split(' ').next().unwrap().parse::<i64>().unwrap()).max().unwrap();
    assert_eq!(b.count("SELECT id FROM outbox.topic WHERE url = 'urn:later'"), restored_max + 1);
    assert!(b.count("SELECT last_value FROM outbox.event_id_seq") > last_event);

    // The restored triggers go with the extension; the tables stay.
    b.sql("DROP EXTENSION pg_outbox");
    assert_eq!(b.count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'outbox\\_%'"), 0);
    assert_eq!(b.count("SELECT count(*) FROM orders"), 42);
}
