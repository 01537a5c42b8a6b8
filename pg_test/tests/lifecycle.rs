//! The extension's life on a server: the `outbox.max_destinations` limit and
//! `ALTER EXTENSION pg_outbox UPDATE` from the previous release with events
//! waiting. Each test brings its own cluster (their settings and extension
//! versions differ).

use pg_outbox_test::{keys, wait_for, Broker, Cluster, Env, PG_BIN};
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
/// by column, indexes, constraints, views, event triggers, privileges, the
/// tables pg_dump carries): an upgraded installation must print what a fresh
/// one prints.
const CATALOG: &str = "SELECT replace(x, E'\\n', ' | ') FROM ( \
    SELECT 'function ' || p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '') \
      FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace \
    UNION ALL SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' acl ' || coalesce(c.relacl::text, '') || ' ' || \
           coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull \
                         || ' ' || a.attstorage::text || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ', ' ORDER BY a.attname) \
                       FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '') \
      FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind <> 'i' \
    UNION ALL SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
     WHERE c.relnamespace = 'outbox'::regnamespace \
    UNION ALL SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
      FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace \
    UNION ALL SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid) FROM pg_class c \
     WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind = 'v' \
    UNION ALL SELECT 'event trigger ' || evtname || ' ' || evtevent || ' ' || evtfoid::regproc || ' ' || coalesce(evttags::text, '') \
      FROM pg_event_trigger \
    UNION ALL SELECT 'dumped ' || coalesce(extconfig::regclass[]::text, '') || ' ' || coalesce(extcondition::text, '') \
      FROM pg_extension WHERE extname = 'pg_outbox' \
    UNION ALL SELECT 'schema acl ' || coalesce(nspacl::text, '') FROM pg_namespace WHERE nspname = 'outbox' \
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

#[test]
fn alter_extension_update_from_0_1_0_keeps_pending_events_and_delivery_goes_on() {
    install_release("0.1.0");
    let broker = Broker::start();
    let pg = Cluster::start("upgrade", &[]);
    pg.sql("CREATE EXTENSION pg_outbox VERSION '0.1.0'");
    let version = "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'";
    assert_eq!(pg.sql(version), "0.1.0");
    let url = pg.watched_table("orders", "id int PRIMARY KEY, v text");
    let (dest, topic) = pg.destination_on(&broker, &url).create();
    pg.sql("INSERT INTO orders SELECT g, 'a' FROM generate_series(1, 50) g");
    pg.wait_drained(&dest, WAIT);
    // The broker freezes: these stay pending through the update.
    broker.freeze();
    pg.sql("INSERT INTO orders SELECT g, 'b' FROM generate_series(51, 100) g");
    let pending = "SELECT count(*) FROM outbox.pending";
    assert_eq!(pg.count(pending), 50);

    pg.sql("ALTER EXTENSION pg_outbox UPDATE");
    assert_eq!(pg.sql(version), "0.2.0");
    assert_eq!(pg.count(pending), 50);
    broker.thaw();
    pg.sql("INSERT INTO orders SELECT g, 'c' FROM generate_series(101, 120) g");
    assert_eq!(keys(&broker.bootstrap(), &topic, 120), (1..=120).collect::<BTreeSet<i64>>());
    pg.wait_drained(&dest, WAIT);

    // The update leaves what a fresh install of 0.2.0 has.
    let fresh = Cluster::start("upgrade_fresh", &[]);
    fresh.sql("CREATE EXTENSION pg_outbox");
    let (upgraded, fresh) = (catalog(&pg), catalog(&fresh));
    let only_upgraded: Vec<_> = upgraded.difference(&fresh).collect();
    let only_fresh: Vec<_> = fresh.difference(&upgraded).collect();
    assert!(
        only_upgraded.is_empty() && only_fresh.is_empty(),
        "upgraded and fresh installs differ:\nonly upgraded: {only_upgraded:#?}\nonly fresh: {only_fresh:#?}"
    );
}
