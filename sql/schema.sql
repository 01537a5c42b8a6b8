-- pg_outbox: configuration tables, the outbox, and the SQL half of the API.
-- Loaded first (bootstrap); the Rust functions are created after it and
-- sql/finalize.sql last. PL/pgSQL bodies bind late, so they may call the
-- Rust helpers (outbox._check_parameters, outbox._changed_on_commit, ...).

-- A topic: which tables and interactions matter (Aidbox: AidboxSubscriptionTopic).
-- Its functions and the DDL event trigger that keeps it true are in sql/topics.sql.
CREATE TABLE outbox.topic (
    id          integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    url         text PRIMARY KEY,
    description text,
    -- The entries as given (outbox.topic_entry.spec, in order): a renamed
    -- table shows its new name, a dropped one is gone.
    triggers    jsonb NOT NULL,
    -- The AidboxSubscriptionTopic it was created from, if any.
    resource    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (topic, table it watches or watched). The capture triggers on
-- the table are found in pg_trigger (function outbox._capture, first
-- argument the topic id). A table the topic no longer watches (dropped, or
-- left out by alter_topic) keeps its row, unwatched, so that events captured
-- from it before still go out in its shape (FHIR resources). Tables are
-- regclass, not oid: pg_dump writes them as names and a restore reads them
-- back as the restored tables.
CREATE TABLE outbox.topic_table (
    topic_id      integer NOT NULL REFERENCES outbox.topic (id) ON DELETE CASCADE,
    table_oid     regclass NOT NULL,
    watched       boolean NOT NULL DEFAULT true,
    -- Schema-qualified, kept current by outbox._after_ddl(); the names it had
    -- before, which events captured earlier still carry.
    table_name    text NOT NULL,
    former_names  text[] NOT NULL DEFAULT '{}',
    -- The FHIR resource type when the table has Aidbox's layout (id, resource
    -- jsonb): events then carry the resource and FHIR references.
    resource_type text,
    PRIMARY KEY (topic_id, table_oid)
);

-- One row per trigger entry of a topic, in the order given. A table may have
-- several; a change is one event when any entry for its table and
-- interaction matches.
CREATE TABLE outbox.topic_entry (
    topic_id     integer NOT NULL,
    position     integer NOT NULL,
    table_oid    regclass NOT NULL,
    interactions text[] NOT NULL,
    criteria     text,
    -- FHIRPath criteria (Aidbox's fhirPathCriteria), evaluated by the trigger.
    fhirpath     text,
    -- The entry as given (its "table" renamed with the table).
    spec         jsonb NOT NULL,
    PRIMARY KEY (topic_id, position),
    FOREIGN KEY (topic_id, table_oid) REFERENCES outbox.topic_table ON DELETE CASCADE
);

-- FHIR resource types mapped to tables by the admin (outbox.map_resource);
-- without a mapping a type's table is its lower-cased name (Aidbox's rule).
CREATE TABLE outbox.resource_table (
    resource_type text PRIMARY KEY,
    table_oid     regclass NOT NULL,
    table_name    text NOT NULL
);

-- A destination: where a topic's events go and how (Aidbox: AidboxTopicDestination).
CREATE TABLE outbox.destination (
    id         text PRIMARY KEY,
    topic_url  text NOT NULL REFERENCES outbox.topic (url),
    kind       text NOT NULL,
    content    text NOT NULL,
    parameters jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set by pause_destination(), cleared by resume_destination().
    paused_at  timestamptz,
    -- Delivered events are kept this long (outbox.delivered) for replay();
    -- NULL: deleted once delivered.
    retention  interval
);
CREATE INDEX destination_topic_url_idx ON outbox.destination (topic_url);

-- The outbox, written in the writer's transaction, deleted by the worker once
-- Kafka acknowledged it. A row is one event (key, row_data) or, for a
-- statement that made several changes with the same destination, table and
-- interaction, a group of them (ids, keys, rows: one element per event, in
-- change order; id is ids[1], the lowest; events counts them; no CHECK says
-- so: it cost single-row transactions 4 us each, and the worker refuses a
-- malformed group): one row instead of hundreds is what
-- makes multi-row statements cheap to capture and to delete. outbox.pending
-- shows one row per event either way.
-- Only src/store.rs (the worker side) and src/capture/outbox.rs (the row
-- trigger outbox._capture()'s enqueue side) know this layout. row_data is the row
-- as row_to_json() gives it (columns in table order), only for full-resource.
-- No primary key on id: ids come from the identity and every query goes by
-- (destination_id, id), unique in each partition and its replica identity
-- (a FOR ALL TABLES publication would otherwise refuse the worker's deletes):
-- one index per row, not two.
--
-- Partitioned by `part` into three tables that take turns (PgQ's rotation):
-- writers insert into the current one (outbox._current_part(), in shared
-- memory); the worker moves writers on to the next, empty one every
-- outbox.rotation_interval, and empties a former one with TRUNCATE once
-- every event in it was delivered. Delivered events are still deleted, but
-- their dead rows (and index entries) go with the TRUNCATE, which no open
-- snapshot holds back: the outbox stays bounded where VACUUM could not
-- reclaim anything. See src/worker/rotate.rs.
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
    part           smallint NOT NULL DEFAULT 0, -- outbox._current_part(): sql/finalize.sql
    -- The writer's outbox.traceparent when its statement's events were
    -- written (the Kafka header traceparent); a group's events share it.
    traceparent    text DEFAULT NULLIF(pg_catalog.current_setting('outbox.traceparent', true), '')
) PARTITION BY LIST (part);
-- Groups live until delivered, typically seconds, and are read whole:
-- stored out of line, not compressed (which would spend the writer's CPU).
ALTER TABLE outbox.event ALTER ids SET STORAGE EXTERNAL, ALTER keys SET STORAGE EXTERNAL,
    ALTER rows SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX event_destination_idx ON outbox.event (destination_id, id, part);
CREATE TABLE outbox.event_0 PARTITION OF outbox.event FOR VALUES IN (0);
CREATE TABLE outbox.event_1 PARTITION OF outbox.event FOR VALUES IN (1);
CREATE TABLE outbox.event_2 PARTITION OF outbox.event FOR VALUES IN (2);
ALTER TABLE outbox.event_0 REPLICA IDENTITY USING INDEX event_0_destination_id_id_part_idx;
ALTER TABLE outbox.event_1 REPLICA IDENTITY USING INDEX event_1_destination_id_id_part_idx;
ALTER TABLE outbox.event_2 REPLICA IDENTITY USING INDEX event_2_destination_id_id_part_idx;

-- The events waiting for delivery, one row per event (groups unfolded).
CREATE VIEW outbox.pending AS
SELECT e.id, e.destination_id, e.topic_id, e.table_name, e.interaction, e.key, e.row_data,
       e.created_at, e.attempts, e.last_error
  FROM outbox.event e WHERE e.ids IS NULL
UNION ALL
SELECT g.id, e.destination_id, e.topic_id, e.table_name, e.interaction, g.key, g.row_data,
       e.created_at, e.attempts, e.last_error
  FROM outbox.event e, unnest(e.ids, e.keys, e.rows) AS g (id, key, row_data)
 WHERE e.ids IS NOT NULL;

-- Events Kafka will never accept as they are (too large, invalid): moved here by
-- the worker so they do not hold back the events behind them.
CREATE TABLE outbox.dead_letter (
    id             bigint PRIMARY KEY,
    destination_id text NOT NULL,
    topic_id       integer NOT NULL,
    table_name     text NOT NULL,
    interaction    text NOT NULL,
    key            text,
    row_data       json,
    created_at     timestamptz NOT NULL,
    attempts       integer NOT NULL,
    error          text NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now(),
    traceparent    text
);
CREATE INDEX dead_letter_destination_idx ON outbox.dead_letter (destination_id, id);

-- Delivered events of destinations with a retention, for outbox.replay():
-- moved here from the outbox by the worker when Kafka acknowledged them
-- (groups stay groups), deleted by the worker once older than the
-- destination's retention (by created_at, the change's time). Not dumped:
-- a replay buffer, not state.
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
SELECT pg_catalog.pg_extension_config_dump('outbox.event_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_1', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_2', '');
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

CREATE FUNCTION outbox._fail(code text, message text, hint text DEFAULT NULL, detail text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF detail IS NULL AND hint IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
    ELSIF detail IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, HINT = hint;
    ELSIF hint IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail;
    END IF;
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, HINT = hint, DETAIL = detail;
END
$$;

-- Refuse (with `code`) the first key of `obj` not in `allowed`: the message
-- is `before` "key" `after` (no format(): they may hold user text).
CREATE FUNCTION outbox._only_keys(obj jsonb, allowed text[], code text, before text, after text, hint text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_key text;
BEGIN
    SELECT k INTO v_key FROM jsonb_object_keys(obj) AS k WHERE k <> ALL (allowed) LIMIT 1;
    IF v_key IS NOT NULL THEN
        PERFORM outbox._fail(code, before || '"' || v_key || '"' || after, hint);
    END IF;
END
$$;

-- An entry's optional text option `key` for `tbl`: NULL when absent or null,
-- refused (22023, with `hint`) unless a non-empty string.
CREATE FUNCTION outbox._entry_text(entry jsonb, key text, tbl text, hint text)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT entry ? key OR jsonb_typeof(entry -> key) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(entry -> key) <> 'string' OR btrim(entry ->> key) = '' THEN
        PERFORM outbox._fail('22023', format('"%s" for table "%s" must be a non-empty string', key, tbl), hint);
    END IF;
    RETURN entry ->> key;
END
$$;

-- Map a FHIR resource type to the table that stores it (for topics created
-- afterwards); without a mapping the type's table is its lower-cased name.
CREATE FUNCTION outbox.map_resource(resource_type text, table_name regclass)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF resource_type IS NULL OR resource_type !~ '^[A-Z][A-Za-z0-9]{0,63}$' THEN
        PERFORM outbox._fail('22023', format('invalid resource type "%s"', coalesce(resource_type, '')),
            'A FHIR resource type such as "QuestionnaireResponse".');
    END IF;
    INSERT INTO outbox.resource_table (resource_type, table_oid, table_name)
    VALUES (map_resource.resource_type, map_resource.table_name, map_resource.table_name::text)
    ON CONFLICT ON CONSTRAINT resource_table_pkey
    DO UPDATE SET table_oid = excluded.table_oid, table_name = excluded.table_name;
END
$$;

CREATE FUNCTION outbox.unmap_resource(resource_type text)
RETURNS boolean LANGUAGE sql AS $$
    WITH d AS (DELETE FROM outbox.resource_table r WHERE r.resource_type = unmap_resource.resource_type RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM d)
$$;

-- log_min_error_statement = panic: a failing call's statement text (which may
-- hold a password or a key) is not copied into the server log.
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

-- An AidboxTopicDestination, as Aidbox takes it (Kafka kinds only). Its
-- meta.profile, old or new URL, must agree with its kind.
CREATE FUNCTION outbox.create_destination(resource jsonb)
RETURNS text LANGUAGE plpgsql SET log_min_error_statement = panic AS $$
DECLARE
    v_kind    text := resource ->> 'kind';
    v_profile text;
    v_pkind   text;
BEGIN
    PERFORM outbox._require_resource(resource, 'AidboxTopicDestination',
        '{"resourceType": "AidboxTopicDestination", "id": "...", "topic": "...", "kind": "kafka-at-least-once", "parameter": [...]}');
    PERFORM outbox._only_keys(resource, ARRAY['resourceType', 'id', 'meta', 'topic', 'kind', 'content', 'parameter', 'status'],
        '0A000', 'element ', format(' of AidboxTopicDestination "%s" is not supported', resource ->> 'id'),
        'A destination takes id, topic, kind, content, parameter, status and meta.profile.');
    IF resource ? 'status' AND resource ->> 'status' IS DISTINCT FROM 'active' THEN
        PERFORM outbox._fail('22023', format('destination "%s" has status %s: only active destinations are served', resource ->> 'id', resource -> 'status'),
            'Set "status": "active".');
    END IF;
    FOR v_profile IN SELECT jsonb_array_elements_text(coalesce(resource #> '{meta,profile}', '[]')) LOOP
        v_pkind := CASE v_profile
            WHEN 'http://aidbox.app/StructureDefinition/aidboxtopicdestination-kafka-at-least-once' THEN 'kafka-at-least-once'
            WHEN 'http://aidbox.app/StructureDefinition/aidboxtopicdestination-kafka-best-effort' THEN 'kafka-best-effort'
            WHEN 'http://health-samurai.io/fhir/core/StructureDefinition/aidboxtopicdestination-kafkaAtLeastOnceProfile' THEN 'kafka-at-least-once'
            WHEN 'http://health-samurai.io/fhir/core/StructureDefinition/aidboxtopicdestination-kafkaBestEffortProfile' THEN 'kafka-best-effort'
        END;
        IF v_pkind IS NULL THEN
            PERFORM outbox._fail('0A000', format('profile "%s" of destination "%s" is not a Kafka destination profile', v_profile, resource ->> 'id'),
                'pg_outbox serves Kafka destinations: profiles aidboxtopicdestination-kafka-at-least-once and -kafka-best-effort (old and new URLs).');
        END IF;
        IF v_kind IS NULL THEN
            v_kind := v_pkind;
        ELSIF v_kind <> v_pkind THEN
            PERFORM outbox._fail('22023', format('destination "%s" has kind "%s" but profile "%s"', resource ->> 'id', v_kind, v_profile),
                'The profile and the kind must name the same delivery: fix one of them.');
        END IF;
    END LOOP;
    RETURN outbox.create_destination(resource ->> 'id', resource ->> 'topic', v_kind,
                                     coalesce(resource -> 'parameter', '[]'), coalesce(resource ->> 'content', 'full-resource'));
END
$$;

-- Change a destination's parameters (a JSON merge patch: given keys replace,
-- null removes), its content and/or its retention ('0': none, which
-- deletes what it kept). The worker rebuilds that producer.
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

-- 22023 unless `retention` is NULL, '0' (none) or positive; 0A000 for a
-- best-effort destination, which stores nothing.
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

-- Send again the delivered events kept (retention) of the destination
-- whose change happened at `since` or later, with their event numbers, as
-- the outbox sends any event. How many.
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

-- What the destination's producer is configured with (librdkafka
-- properties), secrets redacted. Superusers only.
CREATE FUNCTION outbox.destination_config(destination_id text)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM outbox._require_destination(destination_id);
    RETURN (SELECT outbox._effective_config(d.id, d.kind, d.parameters)
              FROM outbox.destination d WHERE d.id = destination_config.destination_id);
END
$$;

-- 42704 unless the destination exists.
CREATE FUNCTION outbox._require_destination(destination_id text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox.destination d WHERE d.id = _require_destination.destination_id) THEN
        PERFORM outbox._fail('42704', format('destination "%s" does not exist', coalesce(destination_id, '')),
            'SELECT id FROM outbox.destination lists the destinations.');
    END IF;
END
$$;

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


-- Put dead letters back into the outbox (same event numbers); all of the
-- destination's, or those listed. Returns how many.
CREATE FUNCTION outbox.retry_dead_letters(destination_id text, ids bigint[] DEFAULT NULL)
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

-- Delete dead letters; all of the destination's, or those listed. Returns how many.
CREATE FUNCTION outbox.discard_dead_letters(destination_id text, ids bigint[] DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM outbox._require_destination(destination_id);
    DELETE FROM outbox.dead_letter l
     WHERE l.destination_id = discard_dead_letters.destination_id
       AND (ids IS NULL OR l.id = ANY (ids));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION outbox.drop_destination(id text)
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
