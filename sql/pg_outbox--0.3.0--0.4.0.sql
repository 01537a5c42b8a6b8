-- pg_outbox 0.3.0 -> 0.4.0 (ALTER EXTENSION pg_outbox UPDATE; the library
-- must be the 0.4.0 one, loaded by a restart: README.md, "Upgrading").
-- The outbox becomes three partitions that take turns, emptied with
-- TRUNCATE once delivered (sql/schema.sql): it stays bounded while a
-- snapshot is held open. The events waiting move into the first partition,
-- with their numbers; the identity goes on after the last one. Destinations
-- can be paused, and a topic's rows backfilled to one.
\echo Use "ALTER EXTENSION pg_outbox UPDATE" to load this file. \quit

-- Writers wait on the lock until the update commits, then insert into the
-- new table (their cached plans are invalidated).
LOCK TABLE outbox.event IN ACCESS EXCLUSIVE MODE;
-- The old table steps aside with everything it names, so that the new one
-- gets a fresh install's names (PostgreSQL 18 also names NOT NULL
-- constraints, unique in the schema). The views follow it until they are
-- pointed at the new one: they are replaced, not re-created, so what was
-- granted on them stays as it was.
ALTER TABLE outbox.event RENAME TO event_0_3_0;
ALTER INDEX outbox.event_destination_idx RENAME TO event_0_3_0_destination_idx;
ALTER SEQUENCE outbox.event_id_seq RENAME TO event_0_3_0_id_seq;
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT k.conname FROM pg_catalog.pg_constraint k
              WHERE k.conrelid = 'outbox.event_0_3_0'::regclass AND k.contype = 'n' LOOP
        EXECUTE pg_catalog.format('ALTER TABLE outbox.event_0_3_0 RENAME CONSTRAINT %I TO %I',
                                  c.conname, 'old_' || c.conname);
    END LOOP;
END
$$;

CREATE TABLE outbox.event (
    id             bigint GENERATED ALWAYS AS IDENTITY,
    destination_id text NOT NULL,
    topic_id       integer NOT NULL,
    table_name     text NOT NULL,
    interaction    text NOT NULL,
    key            text,
    row_data       json,
    created_at     timestamptz NOT NULL DEFAULT now(),
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    events         integer NOT NULL DEFAULT 1,
    ids            bigint[],
    keys           text[],
    rows           json[],
    part           smallint NOT NULL DEFAULT 0,
    traceparent    text DEFAULT NULLIF(pg_catalog.current_setting('outbox.traceparent', true), '')
) PARTITION BY LIST (part);
ALTER TABLE outbox.event ALTER ids SET STORAGE EXTERNAL, ALTER keys SET STORAGE EXTERNAL,
    ALTER rows SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX event_destination_idx ON outbox.event (destination_id, id, part);
CREATE TABLE outbox.event_0 PARTITION OF outbox.event FOR VALUES IN (0);
CREATE TABLE outbox.event_1 PARTITION OF outbox.event FOR VALUES IN (1);
CREATE TABLE outbox.event_2 PARTITION OF outbox.event FOR VALUES IN (2);
ALTER TABLE outbox.event_0 REPLICA IDENTITY USING INDEX event_0_destination_id_id_part_idx;
ALTER TABLE outbox.event_1 REPLICA IDENTITY USING INDEX event_1_destination_id_id_part_idx;
ALTER TABLE outbox.event_2 REPLICA IDENTITY USING INDEX event_2_destination_id_id_part_idx;

INSERT INTO outbox.event (id, destination_id, topic_id, table_name, interaction, key, row_data, created_at,
                          attempts, last_error, events, ids, keys, rows, part, traceparent)
OVERRIDING SYSTEM VALUE
SELECT id, destination_id, topic_id, table_name, interaction, key, row_data, created_at,
       attempts, last_error, events, ids, keys, rows, 0, NULL
  FROM outbox.event_0_3_0;
SELECT pg_catalog.setval('outbox.event_id_seq', s.last_value, s.is_called) FROM outbox.event_0_3_0_id_seq s;

CREATE FUNCTION outbox._current_part() RETURNS smallint
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_current_part_wrapper';
REVOKE ALL ON FUNCTION outbox._current_part() FROM PUBLIC;
ALTER TABLE outbox.event ALTER part SET DEFAULT outbox._current_part();
SELECT pg_catalog.pg_extension_config_dump('outbox.event_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_1', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_2', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_id_seq', '');

-- Trace context (outbox.traceparent) kept with dead letters, and put back
-- with them.
ALTER TABLE outbox.dead_letter ADD COLUMN traceparent text;
CREATE OR REPLACE FUNCTION outbox.retry_dead_letters(destination_id text, ids bigint[] DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM outbox._require_destination(destination_id);
    WITH moved AS (
        DELETE FROM outbox.dead_letter l
         WHERE l.destination_id = retry_dead_letters.destination_id
           AND (ids IS NULL OR l.id = ANY (ids))
        RETURNING l.*)
    INSERT INTO outbox.event (id, destination_id, topic_id, table_name, interaction, key, row_data, created_at, attempts,
                              last_error, traceparent)
    OVERRIDING SYSTEM VALUE
    SELECT m.id, m.destination_id, m.topic_id, m.table_name, m.interaction, m.key, m.row_data, m.created_at, m.attempts,
           m.error, m.traceparent
      FROM moved m;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM outbox._wake_on_commit();
    RETURN n;
END
$$;

-- Pausing a destination (pause_destination, resume_destination).
ALTER TABLE outbox.destination ADD COLUMN paused_at timestamptz;
-- Pause or resume (below). Only a change is written: the write signals
-- writers and the worker.
CREATE FUNCTION outbox._set_paused(id text, paused boolean)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox._require_destination(id);
    PERFORM 1 FROM outbox.destination d
      WHERE d.id = _set_paused.id AND (d.paused_at IS NOT NULL) <> _set_paused.paused FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE outbox.destination d SET paused_at = CASE WHEN _set_paused.paused THEN now() END
     WHERE d.id = _set_paused.id;
    RETURN true;
END
$$;

-- Stop delivering to a destination until resume_destination(): its
-- at-least-once events wait in the outbox, best-effort ones count as lost.
-- What was handed to Kafka already finishes. True if it was delivering,
-- false if it was paused already.
CREATE FUNCTION outbox.pause_destination(id text)
RETURNS boolean LANGUAGE sql AS $$ SELECT outbox._set_paused(id, true) $$;

-- Deliver again, from the oldest event waiting. True if it was paused.
CREATE FUNCTION outbox.resume_destination(id text)
RETURNS boolean LANGUAGE sql AS $$ SELECT outbox._set_paused(id, false) $$;

REVOKE ALL ON FUNCTION outbox.pause_destination(text), outbox.resume_destination(text),
    outbox._set_paused(text, boolean) FROM PUBLIC;

-- The events waiting for delivery, one row per event (groups unfolded).
CREATE OR REPLACE VIEW outbox.pending AS
SELECT e.id, e.destination_id, e.topic_id, e.table_name, e.interaction, e.key, e.row_data,
       e.created_at, e.attempts, e.last_error
  FROM outbox.event e WHERE e.ids IS NULL
UNION ALL
SELECT g.id, e.destination_id, e.topic_id, e.table_name, e.interaction, g.key, g.row_data,
       e.created_at, e.attempts, e.last_error
  FROM outbox.event e, unnest(e.ids, e.keys, e.rows) AS g (id, key, row_data)
 WHERE e.ids IS NOT NULL;

-- One row per destination: configuration joined with the worker's counters
-- (shared memory) and the number of events still in the outbox.
-- Retention and replay (outbox.delivered, outbox.replay()).
ALTER TABLE outbox.destination ADD COLUMN retention interval;
CREATE TABLE outbox.delivered (
    id             bigint NOT NULL,
    destination_id text NOT NULL,
    topic_id       integer NOT NULL,
    table_name     text NOT NULL,
    interaction    text NOT NULL,
    key            text,
    row_data       json,
    created_at     timestamptz NOT NULL,
    events         integer NOT NULL,
    ids            bigint[],
    keys           text[],
    rows           json[],
    traceparent    text,
    delivered_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivered_destination_idx ON outbox.delivered (destination_id, created_at);

DROP FUNCTION outbox.create_destination(text, text, text, jsonb, text);
CREATE FUNCTION outbox.create_destination(id text, topic text, kind text, parameters jsonb,
                                          content text DEFAULT 'full-resource', retention interval DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SET log_min_error_statement = panic AS $$
DECLARE
    v_params jsonb;
BEGIN
    IF id IS NULL OR id !~ '^[A-Za-z0-9.-]{1,64}$' THEN
        PERFORM outbox._fail('22023', format('invalid destination id "%s"', coalesce(id, '')),
            'An id is 1 to 64 letters, digits, "-" or "." (a FHIR id), e.g. ''orders-kafka''.');
    END IF;
    IF EXISTS (SELECT 1 FROM outbox.destination d WHERE d.id = create_destination.id) THEN
        PERFORM outbox._fail('42710', format('destination "%s" already exists', id),
            'Drop it first with outbox.drop_destination(), or choose another id.');
    END IF;
    IF topic IS NULL OR NOT EXISTS (SELECT 1 FROM outbox.topic t WHERE t.url = create_destination.topic) THEN
        PERFORM outbox._fail('42704', format('topic "%s" does not exist', coalesce(topic, '')),
            'Create it first with outbox.create_topic(); SELECT url FROM outbox.topic lists the topics.');
    END IF;
    IF kind IS NULL OR kind NOT IN ('kafka-at-least-once', 'kafka-best-effort') THEN
        PERFORM outbox._fail('22023', format('unknown destination kind "%s" for destination "%s"', coalesce(kind, ''), id),
            'Use ''kafka-at-least-once'' (stored with the change, never lost) or ''kafka-best-effort'' (in memory, cheaper, may be lost).');
    END IF;
    IF content IS NULL OR content NOT IN ('full-resource', 'id-only', 'empty') THEN
        PERFORM outbox._fail('22023', format('unknown content "%s" for destination "%s"', coalesce(content, ''), id),
            'Use ''full-resource'', ''id-only'' or ''empty''.');
    END IF;
    IF (SELECT count(*) FROM outbox.destination) >= coalesce(current_setting('outbox.max_destinations', true), '128')::int THEN
        PERFORM outbox._fail('54000', format('cannot create destination "%s": at most %s destinations (outbox.max_destinations)',
                id, coalesce(current_setting('outbox.max_destinations', true), '128')),
            'Drop destinations you no longer need, or raise outbox.max_destinations and restart the server.');
    END IF;
    v_params := outbox._check_parameters(id, kind, parameters);
    PERFORM outbox._check_retention(id, kind, retention);
    INSERT INTO outbox.destination (id, topic_url, kind, content, parameters, retention)
    VALUES (create_destination.id, create_destination.topic, create_destination.kind,
            create_destination.content, v_params, nullif(retention, interval '0'));
    PERFORM outbox._changed_on_commit();
    RETURN id;
END
$$;

DROP FUNCTION outbox.alter_destination(text, jsonb, text);
CREATE FUNCTION outbox.alter_destination(id text, parameters jsonb DEFAULT NULL, content text DEFAULT NULL,
                                         retention interval DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SET log_min_error_statement = panic AS $$
DECLARE
    d outbox.destination;
    v_patch jsonb;
    v_params jsonb;
BEGIN
    PERFORM outbox._require_destination(id);
    SELECT * INTO d FROM outbox.destination x WHERE x.id = alter_destination.id FOR UPDATE;
    IF content IS NOT NULL AND content NOT IN ('full-resource', 'id-only', 'empty') THEN
        PERFORM outbox._fail('22023', format('unknown content "%s" for destination "%s"', content, id),
            'Use ''full-resource'', ''id-only'' or ''empty''.');
    END IF;
    v_params := d.parameters;
    IF parameters IS NOT NULL THEN
        IF jsonb_typeof(parameters) = 'array' THEN
            v_patch := outbox._normalize_parameters(id, parameters);
        ELSIF jsonb_typeof(parameters) = 'object' THEN
            v_patch := parameters;
        ELSE
            PERFORM outbox._fail('22023', format('parameters of destination "%s" must be a JSON object', id),
                'Give the parameters to change, e.g. ''{"compressionType": "zstd"}''; null removes one.');
        END IF;
        v_params := v_params || v_patch;
        v_params := v_params - ARRAY(SELECT k FROM jsonb_each(v_patch) AS p(k, v) WHERE v = 'null'::jsonb);
    END IF;
    v_params := outbox._check_parameters(id, d.kind, v_params);
    PERFORM outbox._check_retention(id, d.kind, retention);
    UPDATE outbox.destination x
       SET parameters = v_params, content = coalesce(alter_destination.content, x.content),
           retention = CASE WHEN alter_destination.retention IS NULL THEN x.retention
                            ELSE nullif(alter_destination.retention, interval '0') END
     WHERE x.id = alter_destination.id;
    IF retention = interval '0' THEN
        DELETE FROM outbox.delivered r WHERE r.destination_id = alter_destination.id;
    END IF;
    PERFORM outbox._changed_on_commit();
    RETURN id;
END
$$;

CREATE FUNCTION outbox._check_retention(id text, kind text, retention interval)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF retention IS NULL OR retention = interval '0' THEN
        RETURN;
    END IF;
    IF retention < interval '0' THEN
        PERFORM outbox._fail('22023', format('retention of destination "%s" must be positive, not %s', id, retention),
            'How long delivered events are kept for outbox.replay(), e.g. ''7 days''; ''0'' keeps none.');
    END IF;
    IF kind <> 'kafka-at-least-once' THEN
        PERFORM outbox._fail('0A000', format('destination "%s" is best-effort: it keeps no events to replay', id),
            'Retention keeps delivered events of an at-least-once destination, which stores them in the outbox; a best-effort destination keeps them in memory only.');
    END IF;
END
$$;

CREATE FUNCTION outbox.replay(destination text, since timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM outbox._require_destination(destination);
    IF since IS NULL THEN
        PERFORM outbox._fail('22004', 'replay needs a time to start from',
            'Events whose change happened at "since" or later are sent again, e.g. since => now() - interval ''1 hour''.');
    END IF;
    IF (SELECT d.retention FROM outbox.destination d WHERE d.id = replay.destination) IS NULL THEN
        PERFORM outbox._fail('55000', format('destination "%s" keeps no delivered events', destination),
            'Give it a retention first: outbox.alter_destination(''' || destination || ''', retention => ''7 days''); events delivered from then on can be replayed.');
    END IF;
    WITH moved AS (
        DELETE FROM outbox.delivered r
         WHERE r.destination_id = replay.destination AND r.created_at >= since
        RETURNING r.*),
    back AS (
        INSERT INTO outbox.event (id, destination_id, topic_id, table_name, interaction, key, row_data, created_at,
                                  events, ids, keys, rows, traceparent)
        OVERRIDING SYSTEM VALUE
        SELECT m.id, m.destination_id, m.topic_id, m.table_name, m.interaction, m.key, m.row_data, m.created_at,
               m.events, m.ids, m.keys, m.rows, m.traceparent
          FROM moved m
        RETURNING events)
    SELECT coalesce(sum(b.events), 0) INTO n FROM back b;
    PERFORM outbox._wake_on_commit();
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION outbox.drop_destination(id text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_discarded bigint;
    v_dead      bigint;
BEGIN
    DELETE FROM outbox.destination d WHERE d.id = drop_destination.id;
    IF NOT FOUND THEN
        PERFORM outbox._fail('42704', format('destination "%s" does not exist', coalesce(id, '')),
            'SELECT id FROM outbox.destination lists the destinations.');
    END IF;
    WITH gone AS (DELETE FROM outbox.event e WHERE e.destination_id = drop_destination.id RETURNING e.events)
    SELECT coalesce(sum(g.events), 0) INTO v_discarded FROM gone g;
    DELETE FROM outbox.dead_letter l WHERE l.destination_id = drop_destination.id;
    GET DIAGNOSTICS v_dead = ROW_COUNT;
    DELETE FROM outbox.delivered r WHERE r.destination_id = drop_destination.id;
    v_discarded := v_discarded + v_dead;
    PERFORM outbox._changed_on_commit();
    RETURN v_discarded;
END
$$;

REVOKE ALL ON outbox.delivered FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.create_destination(text, text, text, jsonb, text, interval),
    outbox.alter_destination(text, jsonb, text, interval), outbox._check_retention(text, text, interval),
    outbox.replay(text, timestamptz) FROM PUBLIC;

-- Backfill (sql/backfill.sql): outbox.backfill() and its batches.
-- One row per backfill. Its progress is committed with the events of each
-- batch: after a crash the worker goes on from last_key, sending nothing
-- twice.
CREATE TABLE outbox.backfill (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination_id text NOT NULL REFERENCES outbox.destination (id) ON DELETE CASCADE,
    -- The caller's `where`: a boolean SQL expression over each row (NEW).
    predicate      text,
    batch          integer NOT NULL,
    -- The topic's tables that cover create, in the order they are sent, and
    -- the one under way (1-based); last_key: the primary key of the last row
    -- sent from it, as text, in key order (NULL: none yet).
    tables         regclass[] NOT NULL,
    position       integer NOT NULL DEFAULT 1,
    last_key       text[],
    -- Rows matching when the backfill began; rows sent so far (a row
    -- deleted meanwhile is not sent, one inserted meanwhile may be).
    rows_total     bigint NOT NULL,
    rows_done      bigint NOT NULL DEFAULT 0,
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'cancelled', 'failed')),
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX backfill_destination_idx ON outbox.backfill (destination_id, id);
-- A dump carries a backfill under way: the restored server goes on with it.
SELECT pg_catalog.pg_extension_config_dump('outbox.backfill', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.backfill_id_seq', '');

-- The primary key of `tbl`: quoted column names and types, in index order
-- (INCLUDE columns left out); NULL without one.
CREATE FUNCTION outbox._backfill_key(tbl regclass, OUT columns text[], OUT types text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(quote_ident(a.attname) ORDER BY k.n), array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.n)
      FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k (attnum, n), pg_attribute a
     WHERE i.indrelid = tbl AND i.indisprimary AND k.n <= i.indnkeyatts AND a.attrelid = tbl AND a.attnum = k.attnum
$$;

-- The SQL criteria of the topic's create entries for `tbl`, joined by OR
-- (as its capture trigger's WHEN clause), 'true' when one entry has none;
-- NULL when no entry covers create.
CREATE FUNCTION outbox._backfill_criteria(p_topic_id integer, tbl regclass)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN count(*) = 0 THEN NULL
                WHEN count(*) FILTER (WHERE e.criteria IS NULL) > 0 THEN 'true'
                ELSE string_agg('(' || e.criteria || E'\n)', ' OR ' ORDER BY e.position) END
      FROM outbox.topic_entry e
     WHERE e.topic_id = p_topic_id AND e.table_oid = tbl AND 'create' = ANY (e.interactions)
$$;

-- The rows of `tbl` to send, aliased NEW (the criteria and the predicate
-- name it so): what follows SELECT ... FROM. The table's own rows, as its
-- trigger sees them (a partitioned table's partitions' rows are its own,
-- an inheritance child's are not). The predicate on lines of its own (a
-- comment in it ends there) inside CASE WHEN: one expression whatever its
-- parentheses, so "a) OR (b" cannot take it out of the AND.
CREATE FUNCTION outbox._backfill_source(tbl regclass, criteria text, predicate text)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('%s%s AS new WHERE (%s) AND %s',
                  CASE WHEN (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) = 'p' THEN '' ELSE 'ONLY ' END,
                  tbl, criteria,
                  coalesce('CASE WHEN (' || E'\n' || predicate || E'\n' || ') THEN true ELSE false END', 'true'))
$$;

-- Start sending the rows of the destination's topic to it (superusers
-- only, as all configuration). The backfill's id; its progress shows in
-- outbox.destination_status and outbox.backfill. The rows are counted
-- (and `where` checked) here, as the caller.
CREATE FUNCTION outbox.backfill(destination text, "where" text DEFAULT NULL, batch integer DEFAULT 1000)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    d        outbox.destination;
    v_topic  integer;
    v_tables regclass[] := '{}';
    v_total  bigint := 0;
    v_n      bigint;
    v_crit   text;
    tt       outbox.topic_table;
    v_id     bigint;
    c        refcursor;
BEGIN
    -- First, and without the extension's functions: a role granted EXECUTE
    -- on this one may have no right to them.
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'only superusers may start a backfill',
            HINT = 'Configuring pg_outbox is for superusers: a backfill sends any table''s rows to Kafka.';
    END IF;
    PERFORM outbox._require_destination(destination);
    SELECT * INTO d FROM outbox.destination x WHERE x.id = backfill.destination FOR UPDATE;
    IF d.kind <> 'kafka-at-least-once' THEN
        PERFORM outbox._fail('0A000', format('destination "%s" is best-effort: a backfill needs an at-least-once destination', destination),
            'A backfill goes through the outbox, batch by batch as the destination keeps up; a best-effort destination keeps events in memory only and would lose them under that load. Create an at-least-once destination on the same topic and Kafka topic for it.');
    END IF;
    IF batch IS NULL OR batch < 1 OR batch > 10000 THEN
        PERFORM outbox._fail('22023', format('batch must be between 1 and 10000, not %s', coalesce(batch::text, 'NULL')),
            'Rows per batch: each batch is one short transaction that holds its rows FOR SHARE.');
    END IF;
    IF "where" IS NOT NULL AND btrim("where") = '' THEN
        PERFORM outbox._fail('22023', 'the backfill predicate is empty', 'Pass NULL to send every row, or a boolean SQL expression over NEW.');
    END IF;
    IF EXISTS (SELECT 1 FROM outbox.backfill b WHERE b.destination_id = backfill.destination AND b.status = 'running') THEN
        PERFORM outbox._fail('55006', format('destination "%s" has a backfill under way', destination),
            'Wait for it to finish (outbox.destination_status shows its progress) or cancel it with outbox.cancel_backfill().');
    END IF;
    SELECT t.id INTO v_topic FROM outbox.topic t WHERE t.url = d.topic_url;
    FOR tt IN SELECT * FROM outbox.topic_table x WHERE x.topic_id = v_topic AND x.watched ORDER BY x.table_name LOOP
        v_crit := outbox._backfill_criteria(v_topic, tt.table_oid);
        CONTINUE WHEN v_crit IS NULL;
        IF (outbox._backfill_key(tt.table_oid)).columns IS NULL THEN
            PERFORM outbox._fail('0A000', format('table "%s" has no primary key: it cannot be backfilled', tt.table_name),
                'A backfill sends rows in key order and resumes after the last key it sent: add a primary key to the table.');
        END IF;
        BEGIN
            -- A cursor: one statement only (EXECUTE would run them all).
            OPEN c FOR EXECUTE 'SELECT count(*) FROM ' || outbox._backfill_source(tt.table_oid, v_crit, "where");
            FETCH c INTO v_n;
            CLOSE c;
        EXCEPTION
            WHEN query_canceled THEN
                RAISE;
            WHEN OTHERS THEN
                PERFORM outbox._fail(SQLSTATE, format('invalid backfill predicate for table "%s": %s', tt.table_name, SQLERRM),
                    'The predicate is one boolean SQL expression over each row of every table of the topic, named NEW, e.g. ''NEW.id > 100''.');
        END;
        v_tables := v_tables || tt.table_oid;
        v_total := v_total + v_n;
    END LOOP;
    IF cardinality(v_tables) = 0 THEN
        PERFORM outbox._fail('0A000', format('topic "%s" has no table it watches for create', d.topic_url),
            'A backfill sends rows as create events; the topic must cover create on the tables to send.');
    END IF;
    INSERT INTO outbox.backfill (destination_id, predicate, batch, tables, rows_total)
    VALUES (destination, "where", batch, v_tables, v_total)
    RETURNING id INTO v_id;
    -- The worker learns of it with the configuration.
    PERFORM outbox._changed_on_commit();
    RETURN v_id;
END
$$;

-- Stop the destination's backfill under way (events of the batches already
-- sent to the outbox still go). True if one was under way.
CREATE FUNCTION outbox.cancel_backfill(destination text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox._require_destination(destination);
    UPDATE outbox.backfill b SET status = 'cancelled', finished_at = now()
     WHERE b.destination_id = cancel_backfill.destination AND b.status = 'running';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM outbox._changed_on_commit();
    RETURN true;
END
$$;

-- One batch of backfill `p_id`, run by the worker in a transaction of its
-- own: the rows sent (at least 1 while it goes on, 0 when it is over), or
-- -1 when the destination's outbox still holds a batch's worth, so that
-- live changes never queue behind more than that (checked first, without
-- writing: the worker asks every 20 ms). The batch ends at a key read
-- first, without locks, and locks the rows up to it: the next one starts
-- after that key, whatever a locked row's key became meanwhile. An error
-- of the rows (a key dropped, a predicate no longer valid) ends it as
-- failed; a lock held by a writer for more than 100 ms is retried.
CREATE FUNCTION outbox._backfill_step(p_id bigint)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    b       outbox.backfill;
    v_topic integer;
    v_tbl   regclass;
    v_crit  text;
    v_key   record;
    v_cols  text;
    v_text  text;
    v_after text := '';
    v_upto  text;
    v_src   text;
    v_n     integer;
    v_next  text[];
BEGIN
    SELECT * INTO b FROM outbox.backfill x WHERE x.id = p_id AND x.status = 'running';
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF (SELECT coalesce(sum(e.events), 0) FROM (SELECT e.events FROM outbox.event e
          WHERE e.destination_id = b.destination_id LIMIT b.batch) e) >= b.batch THEN
        RETURN -1;
    END IF;
    -- Never wait long for a writer's row (nor make it wait); durable before
    -- its events can go out (else a crash could undo a batch Kafka has, and
    -- the rows would go again with other numbers); keys as text in one form.
    PERFORM set_config('lock_timeout', '100ms', true);
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM set_config('DateStyle', 'ISO, YMD', true);
    PERFORM set_config('IntervalStyle', 'postgres', true);
    SELECT * INTO b FROM outbox.backfill x WHERE x.id = p_id AND x.status = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT t.id INTO v_topic FROM outbox.destination d JOIN outbox.topic t ON t.url = d.topic_url
     WHERE d.id = b.destination_id;
    BEGIN
        LOOP
            IF b.position > cardinality(b.tables) THEN
                UPDATE outbox.backfill x SET status = 'done', finished_at = now(), position = b.position, last_key = NULL
                 WHERE x.id = p_id;
                RETURN 0;
            END IF;
            v_tbl := b.tables[b.position];
            -- A table dropped or no longer watched for create since: passed over.
            v_crit := CASE WHEN EXISTS (SELECT 1 FROM outbox.topic_table tt JOIN pg_class c ON c.oid = tt.table_oid
                                         WHERE tt.topic_id = v_topic AND tt.table_oid = v_tbl AND tt.watched)
                           THEN outbox._backfill_criteria(v_topic, v_tbl) END;
            EXIT WHEN v_crit IS NOT NULL;
            b.position := b.position + 1;
            b.last_key := NULL;
        END LOOP;
        v_key := outbox._backfill_key(v_tbl);
        IF v_key.columns IS NULL THEN
            PERFORM outbox._fail('0A000', format('table "%s" has no primary key any more', v_tbl));
        END IF;
        IF b.last_key IS NOT NULL AND cardinality(b.last_key) <> cardinality(v_key.columns) THEN
            PERFORM outbox._fail('0A000', format('the primary key of table "%s" changed during the backfill', v_tbl));
        END IF;
        -- (k1, k2) in key order; the key as text[]; rows after $1, up to $2.
        v_cols := (SELECT string_agg('new.' || c, ', ' ORDER BY n) FROM unnest(v_key.columns) WITH ORDINALITY AS k (c, n));
        v_text := (SELECT 'ARRAY[' || string_agg('new.' || c || '::text', ', ' ORDER BY n) || ']'
                     FROM unnest(v_key.columns) WITH ORDINALITY AS k (c, n));
        IF b.last_key IS NOT NULL THEN
            v_after := format(' AND (%s) > (%s)', v_cols, (SELECT string_agg(format('$1[%s]::%s', n, v_key.types[n::integer]), ', ' ORDER BY n)
                                                              FROM generate_subscripts(v_key.columns, 1) AS n));
        END IF;
        v_upto := format(' AND ($2 IS NULL OR (%s) <= (%s))', v_cols,
                         (SELECT string_agg(format('$2[%s]::%s', n, v_key.types[n::integer]), ', ' ORDER BY n)
                            FROM generate_subscripts(v_key.columns, 1) AS n));
        v_src := outbox._backfill_source(v_tbl, v_crit, b.predicate);
        SELECT r.sent, r.next_key INTO v_n, v_next
          FROM outbox._backfill_batch(b.destination_id, v_topic, v_tbl,
                 format('SELECT %s FROM %s%s ORDER BY %s OFFSET %s LIMIT 1', v_text, v_src, v_after, v_cols, b.batch - 1),
                 format('SELECT %s, new FROM %s%s%s ORDER BY %s FOR SHARE OF new', v_text, v_src, v_after, v_upto, v_cols),
                 b.last_key) r;
    EXCEPTION
        WHEN deadlock_detected OR lock_not_available OR serialization_failure OR query_canceled THEN
            RAISE;
        WHEN OTHERS THEN
            UPDATE outbox.backfill x SET status = 'failed', finished_at = now(), error = SQLERRM WHERE x.id = p_id;
            RETURN 0;
    END;
    -- NULL: that was the table's last batch; the next table from its first key.
    UPDATE outbox.backfill x
       SET position = b.position + CASE WHEN v_next IS NULL THEN 1 ELSE 0 END, last_key = v_next,
           rows_done = x.rows_done + v_n
     WHERE x.id = p_id;
    RETURN greatest(v_n, 1);
END
$$;

CREATE FUNCTION outbox._backfill_batch(destination text, topic_id integer, tbl oid, bound_sql text, rows_sql text,
                                       last_key text[])
RETURNS TABLE (sent integer, next_key text[])
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_backfill_batch_wrapper';
REVOKE ALL ON outbox.backfill FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox._backfill_key(regclass), outbox._backfill_criteria(integer, regclass),
    outbox._backfill_source(regclass, text, text), outbox.backfill(text, text, integer),
    outbox.cancel_backfill(text), outbox._backfill_step(bigint),
    outbox._backfill_batch(text, integer, oid, text, text, text[]) FROM PUBLIC;

CREATE OR REPLACE VIEW outbox.destination_status AS
SELECT d.id,
       d.topic_url AS topic,
       d.kind,
       CASE WHEN d.paused_at IS NOT NULL THEN 'paused' ELSE coalesce(s.status, 'stopped') END AS status,
       s.start_timestamp,
       coalesce(s.messages_delivered, 0) AS messages_delivered,
       coalesce(s.messages_delivery_attempts, 0) AS messages_delivery_attempts,
       coalesce(s.messages_in_process, 0) AS messages_in_process,
       coalesce(q.queued, 0) AS messages_queued,
       coalesce(s.messages_lost, 0) AS messages_lost,
       coalesce(dl.dead, 0) AS messages_dead_lettered,
       s.latency_p50_ms,
       s.latency_p99_ms,
       s.latency_max_ms,
       coalesce(s.last_errors, '[]'::jsonb) AS last_errors,
       b.status AS backfill_status,
       b.rows_done AS backfill_rows_done,
       b.rows_total AS backfill_rows_total
  FROM outbox.destination d
  LEFT JOIN outbox._destination_stats() s ON s.id = d.id
  LEFT JOIN LATERAL (SELECT x.status, x.rows_done, x.rows_total FROM outbox.backfill x
                      WHERE x.destination_id = d.id ORDER BY x.id DESC LIMIT 1) b ON true
  LEFT JOIN (SELECT e.destination_id, sum(e.events)::bigint AS queued
               FROM outbox.event e GROUP BY e.destination_id) q ON q.destination_id = d.id
  LEFT JOIN (SELECT l.destination_id, count(*) AS dead
               FROM outbox.dead_letter l GROUP BY l.destination_id) dl ON dl.destination_id = d.id;

-- Not the views: a GRANT or REVOKE here would make what was granted on them
-- the extension's initial privileges, which pg_dump leaves out.
REVOKE ALL ON outbox.event, outbox.event_0, outbox.event_1, outbox.event_2 FROM PUBLIC;

-- What was granted on the old table itself is not carried over (granted
-- here, it would count as the extension's, see above): say what to grant again.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT a.privilege_type, a.is_grantable,
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                         ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END AS grantee
               FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.oid = 'outbox.event_0_3_0'::regclass AND a.grantee <> c.relowner LOOP
        RAISE WARNING '%', pg_catalog.format(
            'pg_outbox 0.4.0 re-created outbox.event without what was granted on it: GRANT %s ON outbox.event TO %s%s',
            g.privilege_type, g.grantee, CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;
ALTER EXTENSION pg_outbox DROP SEQUENCE outbox.event_0_3_0_id_seq;
ALTER EXTENSION pg_outbox DROP TABLE outbox.event_0_3_0;
DROP TABLE outbox.event_0_3_0;
