-- pg_outbox 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_outbox UPDATE; the library
-- must be the 0.3.0 one, loaded by a restart: README.md, "Upgrading").
-- pg_dump carries the configuration and the pending events, and a restore
-- into another cluster gives working topics: tables are stored as regclass
-- (dumped by name), the capture triggers depend on the extension in the way
-- pg_dump writes out, and the DDL event trigger no longer takes a restored
-- topic's interactions away before pg_restore has created its triggers.
\echo Use "ALTER EXTENSION pg_outbox UPDATE" to load this file. \quit

ALTER TABLE outbox.topic_entry ALTER table_oid TYPE regclass;
ALTER TABLE outbox.topic_table ALTER table_oid TYPE regclass;
ALTER TABLE outbox.resource_table ALTER table_oid TYPE regclass;

-- pg_dump carries the configuration, the events not yet delivered (a restore
-- sends them: at-least-once) and the dead letters; the capture triggers of
-- the watched tables are the tables' own (dumped with them, and dropped with
-- the extension: ALTER TRIGGER ... DEPENDS ON EXTENSION). Shared memory (the
-- best-effort queue, the counters) is not carried.
SELECT pg_catalog.pg_extension_config_dump('outbox.topic', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.topic_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.topic_table', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.topic_entry', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.resource_table', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.destination', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letter', '');

-- Any write to the configuration reaches the worker and the writers at
-- commit, also one that does not go through the API (a restore's COPY, a
-- hand-made UPDATE); the API functions say so themselves as well.
CREATE FUNCTION outbox._config_written()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox._changed_on_commit();
    RETURN NULL;
END
$$;
CREATE TRIGGER config_written AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox.topic
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._config_written();
CREATE TRIGGER config_written AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox.topic_table
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._config_written();
CREATE TRIGGER config_written AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox.topic_entry
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._config_written();
CREATE TRIGGER config_written AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox.resource_table
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._config_written();
CREATE TRIGGER config_written AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox.destination
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._config_written();
REVOKE ALL ON FUNCTION outbox._config_written() FROM PUBLIC;

CREATE OR REPLACE FUNCTION outbox._create_triggers(p_topic_id integer, p_url text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_tt       outbox.topic_table;
    v_i        text;
    v_entries  integer;
    v_plain    integer;
    v_sql      integer;
    v_fhirpath integer;
    v_when     text;
    v_name     text;
BEGIN
    FOR v_tt IN SELECT * FROM outbox.topic_table tt WHERE tt.topic_id = p_topic_id AND tt.watched ORDER BY tt.table_oid LOOP
        FOREACH v_i IN ARRAY ARRAY['create', 'update', 'delete', 'truncate'] LOOP
            SELECT count(*), count(*) FILTER (WHERE e.criteria IS NULL AND e.fhirpath IS NULL),
                   count(*) FILTER (WHERE e.criteria IS NOT NULL), count(*) FILTER (WHERE e.fhirpath IS NOT NULL),
                   string_agg('(' || e.criteria || E'\n)', ' OR ' ORDER BY e.position)
              INTO v_entries, v_plain, v_sql, v_fhirpath, v_when
              FROM outbox.topic_entry e
             WHERE e.topic_id = p_topic_id AND e.table_oid = v_tt.table_oid AND v_i = ANY (e.interactions);
            CONTINUE WHEN v_entries = 0;
            -- The trigger tests the SQL criteria (WHEN), then any of the
            -- FHIRPath ones: exact for one entry, for entries without SQL
            -- criteria or without FHIRPath ones, and when one entry has neither.
            IF v_entries > 1 AND v_plain = 0 AND v_sql > 0 AND v_fhirpath > 0 THEN
                PERFORM outbox._fail('0A000',
                    format('entries for table "%s" in topic "%s" mix SQL criteria and FHIRPath criteria for interaction "%s"',
                           v_tt.table_name, p_url, v_i),
                    'Entries that share a table and an interaction are matched together (a change is sent once when any of them matches): give them all SQL criteria or all FHIRPath criteria, or watch the table from a second topic.');
            END IF;
            -- An entry without SQL criteria matches every row.
            IF v_sql < v_entries THEN
                v_when := NULL;
            END IF;
            v_name := format('outbox_%s_%s', p_topic_id,
                             CASE v_i WHEN 'create' THEN 'ins' WHEN 'update' THEN 'upd' WHEN 'delete' THEN 'del' ELSE 'trunc' END);
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH %s %s EXECUTE FUNCTION outbox._capture(%L)',
                v_name, outbox._interaction_event(v_i), v_tt.table_oid::regclass, CASE v_i WHEN 'truncate' THEN 'STATEMENT' ELSE 'ROW' END,
                CASE WHEN v_when IS NULL THEN '' ELSE 'WHEN (' || v_when || ')' END, p_topic_id::text);
            PERFORM 1 FROM pg_trigger g
             WHERE g.tgrelid = v_tt.table_oid AND g.tgname = v_name
               AND g.tgfoid = 'outbox._capture()'::regprocedure AND g.tgnargs = 1
               AND outbox._trigger_topic(g.tgargs) = p_topic_id;
            IF NOT FOUND THEN
                PERFORM outbox._fail('42P17', format('invalid criteria for table "%s" in topic "%s"', v_tt.table_name, p_url),
                    'The criteria must be single boolean SQL expressions.');
            END IF;
            -- Dropped with the extension; pg_dump carries the tie.
            EXECUTE format('ALTER TRIGGER %I ON %s DEPENDS ON EXTENSION pg_outbox', v_name, v_tt.table_oid);
        END LOOP;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION outbox._after_ddl()
RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r         record;
    v_changed boolean := false;
BEGIN
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM outbox.topic_table tt WHERE tt.watched)
           AND NOT EXISTS (SELECT 1 FROM outbox.resource_table) THEN
            RETURN;
        END IF;
        FOR r IN SELECT tt.topic_id, tt.table_oid, tt.table_name, t.url
                   FROM outbox.topic_table tt JOIN outbox.topic t ON t.id = tt.topic_id
                  WHERE tt.watched AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tt.table_oid) LOOP
            RAISE WARNING 'table "%" was dropped: topic "%" no longer watches it', r.table_name, r.url
                USING DETAIL = 'Events already captured from it are still delivered.',
                      HINT = 'outbox.alter_topic() changes the tables of a topic.';
            PERFORM outbox._unwatch(r.topic_id, r.table_oid);
            v_changed := true;
        END LOOP;
        -- A resource type mapped to a dropped table is mapped no more (its
        -- number could name another relation after a restore).
        IF TG_EVENT = 'sql_drop' THEN
            DELETE FROM outbox.resource_table m WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = m.table_oid);
        END IF;
        FOR r IN SELECT tt.topic_id, tt.table_oid, tt.table_name, n.nspname || '.' || c.relname AS name,
                        format('%I.%I', n.nspname, c.relname) AS quoted
                   FROM outbox.topic_table tt JOIN pg_class c ON c.oid = tt.table_oid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE tt.watched AND tt.table_name <> n.nspname || '.' || c.relname LOOP
            UPDATE outbox.topic_table tt
               SET table_name = r.name,
                   former_names = array_remove(array_remove(tt.former_names, r.table_name), r.name) || r.table_name
             WHERE tt.topic_id = r.topic_id AND tt.table_oid = r.table_oid;
            UPDATE outbox.topic_entry e SET spec = jsonb_set(e.spec, '{table}', to_jsonb(r.quoted))
             WHERE e.topic_id = r.topic_id AND e.table_oid = r.table_oid AND e.spec ? 'table';
            PERFORM outbox._entries_changed(r.topic_id);
            v_changed := true;
        END LOOP;
        -- Only a drop removes a trigger. (pg_restore creates the capture
        -- triggers last, after ALTER TABLE commands that find the restored
        -- topics without them.)
        FOR r IN SELECT e.topic_id, e.table_oid, tt.table_name, t.url, i.interaction
                   FROM outbox.topic_entry e JOIN outbox.topic_table tt USING (topic_id, table_oid)
                   JOIN outbox.topic t ON t.id = e.topic_id, unnest(e.interactions) AS i (interaction)
                  WHERE TG_EVENT = 'sql_drop' AND NOT EXISTS (SELECT 1 FROM pg_trigger g
                                     WHERE g.tgrelid = e.table_oid AND g.tgparentid = 0
                                       AND g.tgfoid = 'outbox._capture()'::regprocedure
                                       AND outbox._trigger_topic(g.tgargs) = e.topic_id
                                       AND g.tgtype & outbox._interaction_bit(i.interaction) <> 0)
                  GROUP BY 1, 2, 3, 4, 5 LOOP
            RAISE WARNING 'the capture trigger for "%" on table "%" was dropped: topic "%" no longer captures it',
                r.interaction, r.table_name, r.url
                USING HINT = 'outbox.alter_topic() attaches it again (with criteria over the table''s current columns).';
            UPDATE outbox.topic_entry e
               SET interactions = array_remove(e.interactions, r.interaction),
                   spec = jsonb_set(e.spec, '{interactions}', to_jsonb(array_remove(e.interactions, r.interaction)))
             WHERE e.topic_id = r.topic_id AND e.table_oid = r.table_oid;
            DELETE FROM outbox.topic_entry e WHERE e.topic_id = r.topic_id AND e.table_oid = r.table_oid AND e.interactions = '{}';
            IF NOT EXISTS (SELECT 1 FROM outbox.topic_entry e WHERE e.topic_id = r.topic_id AND e.table_oid = r.table_oid) THEN
                PERFORM outbox._unwatch(r.topic_id, r.table_oid);
            END IF;
            PERFORM outbox._entries_changed(r.topic_id);
            v_changed := true;
        END LOOP;
        -- A primary key dropped (DROP CONSTRAINT, or with a key column).
        IF TG_EVENT = 'sql_drop' THEN
            FOR r IN SELECT DISTINCT tt.table_name FROM pg_event_trigger_dropped_objects() d
                       JOIN outbox.topic_table tt
                         ON tt.watched AND tt.table_oid = to_regclass(format('%I.%I', d.address_names[1], d.address_names[2]))
                      WHERE d.object_type IN ('table constraint', 'table column')
                        AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = tt.table_oid AND i.indisprimary) LOOP
                RAISE WARNING 'watched table "%" has no primary key now: its events get a NULL Kafka key', r.table_name
                    USING HINT = 'Add a primary key to keep each row''s changes in one partition, in order; it is used from then on.';
            END LOOP;
        END IF;
        IF v_changed THEN
            PERFORM outbox._changed_on_commit();
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_outbox could not update its topics after this command: %', SQLERRM;
    END;
END
$$;

-- The capture triggers 0.2.0 made go with the extension by a dependency
-- pg_dump does not write out; this one it does.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.tgname, g.tgrelid::regclass AS rel FROM pg_catalog.pg_trigger g
              WHERE g.tgfoid = 'outbox._capture()'::pg_catalog.regprocedure AND g.tgparentid = 0 LOOP
        EXECUTE format('ALTER TRIGGER %I ON %s DEPENDS ON EXTENSION pg_outbox', r.tgname, r.rel);
    END LOOP;
END
$$;
DROP FUNCTION outbox._trigger_depends_on_extension(oid);
-- ... and the dependency that function recorded goes: a capture trigger of
-- 0.3.0 has the one above only.
DELETE FROM pg_catalog.pg_depend d
 WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass AND d.deptype = 'a'
   AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
   AND d.refobjid = (SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_outbox')
   AND d.objid IN (SELECT g.oid FROM pg_catalog.pg_trigger g WHERE g.tgfoid = 'outbox._capture()'::pg_catalog.regprocedure);
-- Mappings to tables dropped before (0.3.0 removes them at the drop).
DELETE FROM outbox.resource_table r WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = r.table_oid);
