// API tests that run inside Postgres (`cargo pgrx test`). Each test runs in a
// transaction that is rolled back; Kafka is not involved (see pg_test/ for
// end-to-end tests against a broker).

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// Run `sql` in a subtransaction that is always rolled back; return the error
/// it raised as (SQLSTATE, message, hint), or None if it succeeded.
fn error_of(sql: &str) -> Option<(PgSqlErrorCode, String, Option<String>)> {
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let result = PgTryBuilder::new(|| {
            Spi::run(sql).expect("SPI");
            None
        })
        .catch_others(|e| match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                Some((r.sql_error_code(), r.message().to_string(), r.hint().map(str::to_string)))
            }
            CaughtError::RustPanic { ereport, .. } => Some((
                ereport.sql_error_code(),
                ereport.message().to_string(),
                ereport.hint().map(str::to_string),
            )),
        })
        .execute();
        pg_sys::RollbackAndReleaseCurrentSubTransaction();
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

fn setup_orders() {
    Spi::run(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text);
         SELECT outbox.create_topic('urn:orders',
           '[{\"table\": \"public.orders\", \"interactions\": [\"create\", \"update\"],
              \"criteria\": \"NEW.status = ''paid''\"}]', 'paid orders');
         SELECT outbox.create_destination('orders-a', 'urn:orders', 'kafka-at-least-once',
           '{\"kafkaTopic\": \"orders\", \"bootstrapServers\": \"127.0.0.1:9\"}');
         SELECT outbox.create_destination('orders-b', 'urn:orders', 'kafka-at-least-once',
           '{\"kafkaTopic\": \"orders\", \"bootstrapServers\": \"127.0.0.1:9\"}', 'id-only');",
    )
    .expect("setup");
}

fn count(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).expect("SPI").unwrap_or(0)
}

#[pg_test]
fn create_topic_attaches_one_trigger_per_interaction_with_the_criteria() {
    setup_orders();
    let defs = Spi::get_one::<String>(
        "SELECT string_agg(pg_get_triggerdef(oid), E'\\n' ORDER BY tgname) FROM pg_trigger
          WHERE tgrelid = 'public.orders'::regclass AND NOT tgisinternal",
    )
    .unwrap()
    .unwrap();
    assert!(defs.contains("AFTER INSERT ON public.orders FOR EACH ROW WHEN ((new.status = 'paid'::text))"), "{defs}");
    assert!(defs.contains("AFTER UPDATE ON public.orders"), "{defs}");
    assert!(!defs.contains("DELETE"), "{defs}");
    let topic_id = count("SELECT id FROM outbox.topic WHERE url = 'urn:orders'");
    // Only the topic id: the table's name and key are read at run time.
    assert!(defs.contains(&format!("EXECUTE FUNCTION outbox._capture('{topic_id}')")), "{defs}");
}

#[pg_test]
fn a_change_writes_one_event_per_destination_with_content_as_configured() {
    setup_orders();
    Spi::run("INSERT INTO public.orders VALUES (1, 'new'), (2, 'paid')").unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.pending"), 2);
    let (key, interaction) = Spi::get_two::<String, String>(
        "SELECT key, interaction FROM outbox.pending WHERE destination_id = 'orders-a'",
    )
    .unwrap();
    assert_eq!(key.as_deref(), Some("2"));
    assert_eq!(interaction.as_deref(), Some("create"));
    let full = Spi::get_one::<String>("SELECT row_data::text FROM outbox.pending WHERE destination_id = 'orders-a'")
        .unwrap()
        .unwrap();
    assert_eq!(full, r#"{"id":2,"status":"paid"}"#);
    // id-only destinations do not store the row.
    assert_eq!(count("SELECT count(*) FROM outbox.pending WHERE destination_id = 'orders-b' AND row_data IS NULL"), 1);
}

#[pg_test]
fn a_rolled_back_savepoint_leaves_no_event() {
    setup_orders();
    Spi::run("INSERT INTO public.orders VALUES (1, 'paid')").unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.pending"), 2); // both destinations
    let (code, _, _) = error_of("INSERT INTO public.orders VALUES (3, 'paid'); SELECT 1/0").expect("an error");
    assert_eq!(code, PgSqlErrorCode::ERRCODE_DIVISION_BY_ZERO);
    assert_eq!(count("SELECT count(*) FROM outbox.pending"), 2);
    assert_eq!(count("SELECT count(*) FROM outbox.pending WHERE key = '3'"), 0);
}

#[pg_test]
fn drop_destination_reports_the_events_it_discarded() {
    setup_orders();
    Spi::run("INSERT INTO public.orders SELECT g, 'paid' FROM generate_series(1, 7) g").unwrap();
    // One outbox row per destination holds the statement's seven events.
    assert_eq!(count("SELECT count(*) FROM outbox.event WHERE destination_id = 'orders-a' AND events = 7"), 1);
    assert_eq!(count("SELECT outbox.drop_destination('orders-a')"), 7);
    assert_eq!(count("SELECT count(*) FROM outbox.pending"), 7); // orders-b keeps its own
    assert_eq!(count("SELECT count(*) FROM outbox.event"), 1);
}

#[pg_test]
fn user_errors_carry_sqlstate_message_and_hint() {
    setup_orders();
    use PgSqlErrorCode::*;
    let p = r#"'{"kafkaTopic": "t", "bootstrapServers": "h:1"}'"#;
    let cases = [
        ("SELECT outbox.create_topic('urn:orders', '[{\"table\": \"public.orders\"}]')", ERRCODE_DUPLICATE_OBJECT, "topic \"urn:orders\" already exists"),
        ("SELECT outbox.create_topic('urn:x', '[{\"table\": \"public.nope\"}]')", ERRCODE_UNDEFINED_TABLE, "table \"public.nope\" does not exist"),
        ("SELECT outbox.create_topic('urn:x', '[{\"table\": \"public.orders\", \"criteria\": \"NEW.nope\"}]')", ERRCODE_INVALID_OBJECT_DEFINITION, "invalid criteria for table \"public.orders\""),
        ("SELECT outbox.create_topic('urn:x', '[{\"table\": \"public.orders\", \"criteria\": \"(SELECT true)\"}]')", ERRCODE_INVALID_OBJECT_DEFINITION, "invalid criteria"),
        ("SELECT outbox.create_topic('urn:x', '[{\"table\": \"public.orders\", \"criteria\": \" \"}]')", ERRCODE_INVALID_PARAMETER_VALUE, "\"criteria\" for table \"public.orders\" must be a non-empty string"),
        ("SELECT outbox.create_topic('urn:x', '[{\"table\": \"public.orders\", \"fhirpath\": 7}]')", ERRCODE_INVALID_PARAMETER_VALUE, "\"fhirpath\" for table \"public.orders\" must be a non-empty string"),
        (&format!("SELECT outbox.create_destination('orders-a', 'urn:orders', 'kafka-at-least-once', {p})"), ERRCODE_DUPLICATE_OBJECT, "destination \"orders-a\" already exists"),
        (&format!("SELECT outbox.create_destination('x', 'urn:nope', 'kafka-at-least-once', {p})"), ERRCODE_UNDEFINED_OBJECT, "topic \"urn:nope\" does not exist"),
        (&format!("SELECT outbox.create_destination('x', 'urn:orders', 'webhook', {p})"), ERRCODE_INVALID_PARAMETER_VALUE, "unknown destination kind \"webhook\""),
        (&format!("SELECT outbox.create_destination('x', 'urn:orders', 'kafka-at-least-once', {p}, 'all')"), ERRCODE_INVALID_PARAMETER_VALUE, "unknown content \"all\""),
        ("SELECT outbox.create_destination('x', 'urn:orders', 'kafka-at-least-once', '{\"kafkaTopic\": \"t\", \"bootstrapServers\": \"h:1\", \"acks\": 1}')", ERRCODE_INVALID_PARAMETER_VALUE, "unknown parameter \"acks\""),
        ("SELECT outbox.create_destination('x', 'urn:orders', 'kafka-at-least-once', '{\"bootstrapServers\": \"h:1\"}')", ERRCODE_INVALID_PARAMETER_VALUE, "destination \"x\" needs parameter \"kafkaTopic\""),
        ("SELECT outbox.drop_topic('urn:orders')", ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST, "topic \"urn:orders\" still has destinations"),
        ("SELECT outbox.drop_topic('urn:nope')", ERRCODE_UNDEFINED_OBJECT, "topic \"urn:nope\" does not exist"),
        ("SELECT outbox.drop_destination('nope')", ERRCODE_UNDEFINED_OBJECT, "destination \"nope\" does not exist"),
    ];
    for (sql, code, message) in cases {
        let (got_code, got_message, hint) = error_of(sql).unwrap_or_else(|| panic!("no error from {sql}"));
        assert_eq!(got_code, code, "{sql}: {got_message}");
        assert!(got_message.starts_with(message), "{sql}: {got_message:?}");
        assert!(hint.is_some_and(|h| !h.is_empty()), "{sql}: no hint");
    }
    // Nothing half-created by the failures above.
    assert_eq!(count("SELECT count(*) FROM outbox.topic"), 1);
    assert_eq!(count("SELECT count(*) FROM outbox.destination"), 2);
}

#[pg_test]
fn best_effort_destinations_write_nothing_to_the_outbox() {
    setup_orders();
    Spi::run(
        "SELECT outbox.create_destination('orders-be', 'urn:orders', 'kafka-best-effort',
           '{\"kafkaTopic\": \"orders\", \"bootstrapServers\": \"127.0.0.1:9\"}')",
    )
    .unwrap();
    Spi::run("INSERT INTO public.orders VALUES (5, 'paid')").unwrap();
    assert_eq!(count("SELECT count(*) FROM outbox.pending"), 2); // the two at-least-once destinations
    assert_eq!(count("SELECT count(*) FROM outbox.pending WHERE destination_id = 'orders-be'"), 0);
}

/// A publication of all tables takes in the outbox: the worker's deletes and
/// updates need a replica identity, which (destination_id, id) provides.
#[pg_test]
fn outbox_changes_work_under_a_publication_for_all_tables() {
    Spi::run("CREATE PUBLICATION everything FOR ALL TABLES").unwrap();
    for sql in [
        "DELETE FROM outbox.event WHERE destination_id = 'd' AND id BETWEEN 1 AND 2 AND id = ANY('{1,2}')",
        "UPDATE outbox.event SET attempts = attempts + 1, last_error = 'x' WHERE destination_id = 'd' AND id = 1",
    ] {
        assert_eq!(error_of(sql), None, "{sql}");
    }
}

/// Event timestamps are formatted in Rust, digit by digit: they match
/// Postgres's own formatting, at both precisions, across the years.
#[pg_test]
fn timestamps_are_formatted_as_postgres_formats_them() {
    let rows = Spi::connect(|client| {
        let query = "SELECT t, \
                            to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                            to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
                       FROM unnest(ARRAY['2000-01-01 00:00:00+00', '1999-12-31 23:59:59.999999+00', \
                                         '0001-01-01 00:00:00+00', '1970-01-01 00:00:00.000001+00', \
                                         '2024-02-29 12:34:56.789012+00', '2026-11-27 02:06:21.5+00', \
                                         '9999-12-31 23:59:59.999999+00']::timestamptz[]) t";
        let mut out = Vec::new();
        for row in client.select(query, None, &[]).expect("select") {
            let t: pgrx::datum::TimestampWithTimeZone = row.get(1).expect("t").expect("t");
            let us = pg_sys::TimestampTz::from(t);
            let ms: String = row.get(2).expect("ms").expect("ms");
            let micro: String = row.get(3).expect("micro").expect("micro");
            out.push((us, ms, micro));
        }
        out
    });
    assert_eq!(rows.len(), 7);
    for (us, ms, micro) in rows {
        assert_eq!(crate::status::format_ts(us), ms, "{us}");
        assert_eq!(crate::status::format_ts_digits(us, 6), micro, "{us}");
    }
}

/// The captured rows of `public.kinds` (keys in `keys`) whose JSON differs
/// from `expected` (an SQL expression over the row `kr`).
fn json_mismatches(keys: &str, interaction: &str, from: &str, expected: &str) -> Vec<String> {
    let sql = format!(
        "SELECT coalesce(string_agg(format('%s: captured %s, expected %s', p.key, p.row_data, {expected}), E'\\n'), '') \
           FROM outbox.pending p JOIN {from} ON p.key = kr.k::text \
          WHERE p.interaction = '{interaction}' AND kr.k IN ({keys}) \
            AND p.row_data::text IS DISTINCT FROM {expected}"
    );
    let n = count(&format!(
        "SELECT count(*) FROM outbox.pending WHERE interaction = '{interaction}' AND key::int IN ({keys})"
    ));
    assert_eq!(n, keys.split(',').count() as i64, "events captured for {keys}");
    let text = Spi::get_one::<String>(&sql).expect("SPI").unwrap_or_default();
    text.lines().map(str::to_string).collect()
}

/// The trigger prints rows itself (a plan per table, kept per backend): byte
/// for byte what row_to_json prints, for every kind of column, special
/// numbers and characters, dropped and later-added columns, and again after
/// the table's columns change (the plan is made again).
#[pg_test]
fn captured_rows_are_printed_as_row_to_json_prints_them() {
    Spi::run(
        r#"CREATE DOMAIN public.short_text AS text;
           CREATE DOMAIN public.json_domain AS json;
           CREATE TABLE public.kinds (k int PRIMARY KEY, b bool, i2 int2, i4 int, i8 int8, f4 float4, f8 float8,
               n numeric, t text, v varchar(20), c char(5), j json, jb jsonb, u uuid, by bytea, ip inet,
               iv interval, nm name, o oid, d public.short_text, gone int, "we""ird ключ	" text, r int4range,
               dj public.json_domain, ch "char", m money);
           ALTER TABLE public.kinds DROP COLUMN gone;
           SELECT outbox.create_topic('urn:kinds', '[{"table": "public.kinds"}]');
           SELECT outbox.create_destination('kinds', 'urn:kinds', 'kafka-at-least-once',
             '{"kafkaTopic": "kinds", "bootstrapServers": "127.0.0.1:9"}');
           INSERT INTO public.kinds (k) VALUES (1);
           INSERT INTO public.kinds VALUES
             (2, false, -32768, -2147483648, -9223372036854775808, 'NaN', '-Infinity', 'NaN',
              (SELECT string_agg(chr(c), '') FROM generate_series(1, 31) c) || E'"\\/ é 𝄞 \x7f',
              'tab	"q"', 'ab', '{"a" : [1, 2.50]}', '{"b": 1, "a": "x\"y"}',
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff', '10.0.0.1/8', '1 day 02:03:04.5',
              'name"1', 4294967295, E'dom\\ain', '', '[1,5)', '{"d" : 1}', 'q', 12.5),
             (3, true, 32767, 2147483647, 9223372036854775807, 1.5, '1e300', 'Infinity',
              repeat('p', 37) || '"' || repeat('q', 16) || E'\\n', 'v', 'c', 'null', '[]', '00000000-0000-0000-0000-000000000000', '', '::1',
              '-1 mon', '', 0, 'x', 'z', 'empty', '[]', '"', -3),
             (4, true, 0, 0, 0, '-0', '-0', '-1.50', '', '', '', '"s"', '"s"', null, null, null,
              '0', 'n', 1, '', null, '(,3]', null, null, null),
             (5, null, null, null, null, '3.4e38', '1.5e-7', '0.000001', null, null, null, '1e5', '1e5',
              null, null, null, null, null, null, null, null, null, null, null, null);"#,
    )
    .expect("setup");
    let bad = json_mismatches("1,2,3,4,5", "create", "public.kinds kr", "row_to_json(kr)::text");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let relid = || Spi::get_one::<pg_sys::Oid>("SELECT 'public.kinds'::regclass::oid").unwrap().unwrap();
    assert_eq!(crate::rowjson::printed_here(relid()), Some(true), "rows of public.kinds are printed by pg_outbox");
    // Output functions run for every value: settings apply as they do to row_to_json.
    Spi::run(
        "SET LOCAL extra_float_digits = 0; SET LOCAL bytea_output = 'escape'; SET LOCAL IntervalStyle = 'iso_8601';
         INSERT INTO public.kinds (k, f8, by, iv) VALUES (8, 0.1::float8 + 0.2, '\\x00ff', '1 day 02:03:04.5')",
    )
    .unwrap();
    let bad = json_mismatches("8", "create", "public.kinds kr", "row_to_json(kr)::text");
    Spi::run("RESET extra_float_digits; RESET bytea_output; RESET IntervalStyle").unwrap();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // A renamed column: the plan is made again.
    Spi::run(
        "ALTER TABLE public.kinds RENAME COLUMN t TO renamed;
         INSERT INTO public.kinds (k, renamed, i4) VALUES (6, 'after rename', 6)",
    )
    .unwrap();
    let bad = json_mismatches("6", "create", "public.kinds kr", "row_to_json(kr)::text");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // A column added with a default: old rows lack it (their DELETE prints
    // it from the default); a timestamptz column sends rows through row_to_json.
    Spi::run(
        "ALTER TABLE public.kinds ADD COLUMN added int DEFAULT 7;
         CREATE TEMP TABLE before_delete AS SELECT k, row_to_json(t)::text AS j FROM public.kinds t;
         DELETE FROM public.kinds WHERE k IN (1, 2, 3);
         ALTER TABLE public.kinds ADD COLUMN at timestamptz DEFAULT '2026-11-27 05:00:00+00';
         INSERT INTO public.kinds (k, f8) VALUES (7, 2.5)",
    )
    .unwrap();
    let bad = json_mismatches("1,2,3", "delete", "before_delete kr", "kr.j");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let bad = json_mismatches("7", "create", "public.kinds kr", "row_to_json(kr)::text");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(crate::rowjson::printed_here(relid()), Some(false), "a timestamptz column: rows go through row_to_json");
}

#[pg_test]
fn fhirpath_criteria_match_as_aidbox_describes() {
    use crate::fhirpath::compile;
    use serde_json::{json, Value};
    let draft = json!({"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"}});
    let done = json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}});
    // (criteria, current, previous, expected)
    let cases: Vec<(&str, Option<&Value>, Option<&Value>, bool)> = vec![
        ("status = 'finished'", Some(&done), None, true),
        ("status = 'finished'", Some(&draft), None, false),
        ("status = 'finished'", None, Some(&done), false), // delete: no current resource
        ("%previous.empty()", Some(&done), None, true),     // create: no previous resource
        ("%previous.empty()", Some(&done), Some(&draft), false),
        ("%current.status = 'finished' and %previous.status = 'planned'", Some(&done), Some(&draft), true),
        ("%current.status != %previous.status", Some(&done), Some(&done), false),
        ("class.code in ('AMB' | 'EMER')", Some(&done), None, true),
        ("status.exists() and status in ('finished' | 'cancelled')", Some(&done), None, true),
        ("status", Some(&done), None, false), // not a boolean: no match
        ("{}", Some(&done), None, false),
    ];
    for (source, current, previous, expected) in cases {
        let c = compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(c.matches(current, previous), Ok(expected), "{source}");
    }
    for (source, message) in [
        ("status = = 'x'", "invalid FHIRPath"),
        ("subject.resolve().exists()", "resolve() needs a FHIR server"),
        ("code.memberOf('http://x')", "memberOf() needs a FHIR server"),
        ("status.twinkle()", "unknown FHIRPath function twinkle()"),
        ("%resourceNow.exists()", "unknown FHIRPath variable %resourceNow"),
    ] {
        let e = compile(source).expect_err(source);
        assert!(e.contains(message), "{source}: {e}");
    }
}
