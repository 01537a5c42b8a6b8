-- pg_outbox: configuration tables, the outbox, and the SQL half of the API.
-- Loaded first (bootstrap); the Rust functions are created after it and
-- sql/finalize.sql last. PL/pgSQL bodies bind late, so they may call the
-- Rust helpers (outbox._check_parameters, outbox._changed_on_commit, ...).

-- A topic: which tables and interactions matter (Aidbox: AidboxSubscriptionTopic).
CREATE TABLE outbox.topic (
    id          integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    url         text PRIMARY KEY,
    description text,
    triggers    jsonb NOT NULL,
    -- The AidboxSubscriptionTopic it was created from, if any.
    resource    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (topic, table): the triggers the API attached to that table.
CREATE TABLE outbox.topic_table (
    topic_id      integer NOT NULL REFERENCES outbox.topic (id) ON DELETE CASCADE,
    table_oid     oid NOT NULL,
    table_name    text NOT NULL,
    interactions  text[] NOT NULL,
    criteria      text,
    -- FHIRPath criteria (Aidbox's fhirPathCriteria), evaluated by the trigger.
    fhirpath      text,
    -- The FHIR resource type when the table has Aidbox's layout (id, resource
    -- jsonb): events then carry the resource and FHIR references.
    resource_type text,
    key_columns   text[] NOT NULL,
    trigger_names text[] NOT NULL,
    PRIMARY KEY (topic_id, table_oid)
);

-- FHIR resource types mapped to tables by the admin (outbox.map_resource);
-- without a mapping a type's table is its lower-cased name (Aidbox's rule).
CREATE TABLE outbox.resource_table (
    resource_type text PRIMARY KEY,
    table_oid     oid NOT NULL,
    table_name    text NOT NULL
);

-- A destination: where a topic's events go and how (Aidbox: AidboxTopicDestination).
CREATE TABLE outbox.destination (
    id         text PRIMARY KEY,
    topic_url  text NOT NULL REFERENCES outbox.topic (url),
    kind       text NOT NULL,
    content    text NOT NULL,
    parameters jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
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
-- Only src/store.rs (the worker side) and src/capture.rs (the row trigger
-- outbox._capture(), the enqueue side) know this layout. row_data is the row
-- as row_to_json() gives it (columns in table order), only for full-resource.
-- No primary key on id: ids come from the identity and every query goes by
-- (destination_id, id), which is unique and the replica identity (a FOR ALL
-- TABLES publication would otherwise refuse the worker's deletes): one index
-- per row, not two.
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
    rows           json[]
);
-- Groups live until delivered, typically seconds, and are read whole:
-- stored out of line, not compressed (which would spend the writer's CPU).
ALTER TABLE outbox.event ALTER ids SET STORAGE EXTERNAL, ALTER keys SET STORAGE EXTERNAL,
    ALTER rows SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX event_destination_idx ON outbox.event (destination_id, id);
ALTER TABLE outbox.event REPLICA IDENTITY USING INDEX event_destination_idx;

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
    dead_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letter_destination_idx ON outbox.dead_letter (destination_id, id);

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

-- Validate one topic entry, attach its row triggers (one per interaction, the
-- criteria in the WHEN clause) and record them in outbox.topic_table.
CREATE FUNCTION outbox._attach(p_topic_id integer, p_url text, p_entry jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_table     text;
    v_oid       oid;
    v_kind      "char";
    v_inter     text[];
    v_criteria  text;
    v_keys      text[];
    v_names     text[] := '{}';
    v_i         text;
    v_event     text;
    v_suffix    text;
    v_name      text;
    v_args      text;
    v_tgoid     oid;
    v_qualified text;
    v_tgargs    text[];
    v_resource  text;
    v_rtype     text;
    v_fhirpath  text;
BEGIN
    IF jsonb_typeof(p_entry) IS DISTINCT FROM 'object' THEN
        PERFORM outbox._fail('22023', format('invalid trigger entry for topic "%s": %s', p_url, p_entry),
            'Each entry is an object such as {"table": "public.t", "interactions": ["create"], "criteria": "NEW.x > 0"}.');
    END IF;
    PERFORM outbox._only_keys(p_entry, ARRAY['table', 'resource', 'interactions', 'criteria', 'fhirpath'], '22023',
        'unknown key ', format(' in trigger entry for topic "%s"', p_url),
        'Allowed keys are "table", "resource", "interactions", "criteria" and "fhirpath".');
    IF p_entry ? 'resource' THEN
        v_resource := p_entry ->> 'resource';
        IF jsonb_typeof(p_entry -> 'resource') IS DISTINCT FROM 'string' OR v_resource !~ '^[A-Z][A-Za-z0-9]{0,63}$' THEN
            PERFORM outbox._fail('22023', format('invalid resource type %s in topic "%s"', p_entry -> 'resource', p_url),
                'A FHIR resource type such as "QuestionnaireResponse".');
        END IF;
    END IF;
    IF p_entry ? 'table' THEN
        IF jsonb_typeof(p_entry -> 'table') IS DISTINCT FROM 'string' THEN
            PERFORM outbox._fail('22023', format('"table" in a trigger entry of topic "%s" must be a string', p_url),
                'Name the table as a string, e.g. {"table": "public.orders"}.');
        END IF;
        v_table := p_entry ->> 'table';
    ELSIF v_resource IS NOT NULL THEN
        -- The admin's mapping, else Aidbox's rule: the lower-cased type.
        SELECT r.table_oid::regclass::text INTO v_table
          FROM outbox.resource_table r JOIN pg_class c ON c.oid = r.table_oid
         WHERE r.resource_type = v_resource;
        IF v_table IS NULL AND to_regclass(quote_ident(lower(v_resource))) IS NULL THEN
            PERFORM outbox._fail('42P01', format('no table for resource type "%s" in topic "%s"', v_resource, p_url),
                format('Looked for a mapping in outbox.resource_table and for a table named "%s" on the search_path; map one with outbox.map_resource(''%s'', ''schema.table'').',
                       lower(v_resource), v_resource));
        END IF;
        v_table := coalesce(v_table, quote_ident(lower(v_resource)));
    ELSE
        PERFORM outbox._fail('22023', format('trigger entry for topic "%s" has no "table"', p_url),
            'Name the table as a string, e.g. {"table": "public.orders"}, or a FHIR resource type, e.g. {"resource": "Patient"}.');
    END IF;
    BEGIN
        v_oid := to_regclass(v_table);
    EXCEPTION WHEN OTHERS THEN
        v_oid := NULL;
    END;
    IF v_oid IS NULL THEN
        PERFORM outbox._fail('42P01', format('table "%s" does not exist', v_table),
            'Create the table first, or schema-qualify its name (e.g. "public.orders").');
    END IF;
    -- Aidbox's layout (id, resource jsonb): events carry the FHIR resource.
    IF v_resource IS NOT NULL AND EXISTS (
           SELECT 1 FROM pg_attribute a
            WHERE a.attrelid = v_oid AND a.attname = 'resource' AND a.atttypid = 'jsonb'::regtype AND NOT a.attisdropped)
       AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = v_oid AND a.attname = 'id' AND NOT a.attisdropped) THEN
        v_rtype := v_resource;
    END IF;
    v_fhirpath := outbox._entry_text(p_entry, 'fhirpath', v_table,
        'Write a FHIRPath boolean expression, e.g. "status = ''completed''" or "%current.status != %previous.status".');
    IF v_fhirpath IS NOT NULL THEN
        PERFORM outbox._check_fhirpath(v_fhirpath, format('table "%s" in topic "%s"', v_table, p_url));
    END IF;
    SELECT c.relkind INTO v_kind FROM pg_class c WHERE c.oid = v_oid;
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p') THEN
        PERFORM outbox._fail('42809', format('"%s" is not a table', v_table),
            'Topics can watch ordinary and partitioned tables only.');
    END IF;
    IF EXISTS (SELECT 1 FROM outbox.topic_table WHERE topic_id = p_topic_id AND table_oid = v_oid) THEN
        PERFORM outbox._fail('22023', format('table "%s" appears twice in topic "%s"', v_table, p_url),
            'Merge the entries: one entry per table, listing all its interactions.');
    END IF;

    IF p_entry ? 'interactions' THEN
        IF jsonb_typeof(p_entry -> 'interactions') IS DISTINCT FROM 'array'
           OR jsonb_array_length(p_entry -> 'interactions') = 0 THEN
            PERFORM outbox._fail('22023', format('"interactions" for table "%s" must be a non-empty array', v_table),
                'Use any of "create", "update", "delete", e.g. ["create", "update"].');
        END IF;
        SELECT array_agg(DISTINCT x ORDER BY x) INTO v_inter
          FROM jsonb_array_elements_text(p_entry -> 'interactions') AS x;
        FOREACH v_i IN ARRAY v_inter LOOP
            IF v_i IS NULL OR v_i NOT IN ('create', 'update', 'delete') THEN
                PERFORM outbox._fail('22023', format('unknown interaction "%s" for table "%s"', coalesce(v_i, 'null'), v_table),
                    'Interactions are "create" (INSERT), "update" (UPDATE) and "delete" (DELETE).');
            END IF;
        END LOOP;
    ELSE
        v_inter := ARRAY['create', 'delete', 'update'];
    END IF;

    v_criteria := outbox._entry_text(p_entry, 'criteria', v_table,
        'Write a boolean SQL expression over NEW and OLD, e.g. "NEW.status = ''done''".');

    SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}') INTO v_keys
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = v_oid AND i.indisprimary;
    IF cardinality(v_keys) = 0 THEN
        RAISE NOTICE 'table "%" has no primary key: its events get a NULL Kafka key', v_table
            USING HINT = 'Add a primary key to keep each row''s changes in one partition, in order.';
    END IF;
    SELECT n.nspname || '.' || c.relname INTO v_qualified
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_oid;
    -- Trigger arguments: topic id, the watched table (partitions inherit the
    -- trigger and report their parent), then the primary-key columns.
    v_tgargs := ARRAY[p_topic_id::text, v_qualified] || v_keys;
    v_args := (SELECT string_agg(quote_literal(x), ', ') FROM unnest(v_tgargs) AS x);

    FOREACH v_i IN ARRAY v_inter LOOP
        v_event := CASE v_i WHEN 'create' THEN 'INSERT' WHEN 'update' THEN 'UPDATE' ELSE 'DELETE' END;
        v_suffix := CASE v_i WHEN 'create' THEN 'ins' WHEN 'update' THEN 'upd' ELSE 'del' END;
        v_name := format('outbox_%s_%s', p_topic_id, v_suffix);
        BEGIN
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW %s EXECUTE FUNCTION outbox._capture(%s)',
                v_name, v_event, v_oid::regclass,
                CASE WHEN v_criteria IS NULL THEN '' ELSE 'WHEN (' || v_criteria || ')' END,
                v_args);
        EXCEPTION WHEN OTHERS THEN
            PERFORM outbox._fail('42P17',
                format('invalid criteria for table "%s" in topic "%s": %s', v_table, p_url, SQLERRM),
                CASE
                  WHEN v_i = 'create' AND SQLERRM LIKE '%OLD%' THEN
                    'A create (INSERT) has no OLD row: drop "create" from "interactions" or do not use OLD.'
                  WHEN v_i = 'delete' AND SQLERRM LIKE '%NEW%' THEN
                    'A delete has no NEW row: drop "delete" from "interactions" or do not use NEW.'
                  ELSE 'The criteria must be a boolean SQL expression over NEW and OLD without subqueries.'
                END,
                format('Interaction "%s" (%s trigger).', v_i, v_event));
        END;
        SELECT t.oid INTO v_tgoid FROM pg_trigger t WHERE t.tgrelid = v_oid AND t.tgname = v_name;
        -- The criteria went into DDL text: make sure it did not smuggle in
        -- another function or other arguments.
        IF NOT FOUND OR (SELECT tgfoid FROM pg_trigger WHERE oid = v_tgoid) <> 'outbox._capture()'::regprocedure
           OR (SELECT tgnargs FROM pg_trigger WHERE oid = v_tgoid) <> cardinality(v_tgargs)
           OR (SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE oid = v_tgoid)
              <> array_to_string(v_tgargs, E'\\000') || E'\\000' THEN
            PERFORM outbox._fail('42P17', format('invalid criteria for table "%s" in topic "%s"', v_table, p_url),
                'The criteria must be a single boolean SQL expression.');
        END IF;
        PERFORM outbox._trigger_depends_on_extension(v_tgoid);
        v_names := v_names || v_name;
    END LOOP;

    INSERT INTO outbox.topic_table (topic_id, table_oid, table_name, interactions, criteria, fhirpath, resource_type,
                                    key_columns, trigger_names)
    VALUES (p_topic_id, v_oid, v_qualified, v_inter, v_criteria, v_fhirpath, v_rtype, v_keys, v_names);
END
$$;

CREATE FUNCTION outbox.create_topic(url text, triggers jsonb, description text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_id    integer;
    v_entry jsonb;
BEGIN
    IF url IS NULL OR btrim(url) = '' THEN
        PERFORM outbox._fail('22023', 'topic url must not be empty', 'Give the topic a url, e.g. ''http://example.org/topics/orders''.');
    END IF;
    IF EXISTS (SELECT 1 FROM outbox.topic t WHERE t.url = create_topic.url) THEN
        PERFORM outbox._fail('42710', format('topic "%s" already exists', url),
            'Drop it first with outbox.drop_topic(), or choose another url.');
    END IF;
    IF triggers IS NULL OR jsonb_typeof(triggers) <> 'array' OR jsonb_array_length(triggers) = 0 THEN
        PERFORM outbox._fail('22023', format('triggers of topic "%s" must be a non-empty JSON array', url),
            'E.g. ''[{"table": "public.orders", "interactions": ["create"]}]''::jsonb.');
    END IF;
    INSERT INTO outbox.topic (url, description, triggers)
    VALUES (create_topic.url, create_topic.description, create_topic.triggers)
    RETURNING id INTO v_id;
    FOR v_entry IN SELECT jsonb_array_elements(triggers) LOOP
        PERFORM outbox._attach(v_id, url, v_entry);
    END LOOP;
    PERFORM outbox._changed_on_commit();
    RETURN url;
END
$$;

-- 22023 unless `resource` is a JSON object of `resource_type` (or without
-- a resourceType); `example` shows one.
CREATE FUNCTION outbox._require_resource(resource jsonb, resource_type text, example text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(resource) IS DISTINCT FROM 'object' THEN
        PERFORM outbox._fail('22023', format('an %s must be a JSON object', resource_type),
            format('Paste the resource, e.g. ''%s''.', example));
    END IF;
    IF resource ? 'resourceType' AND resource ->> 'resourceType' IS DISTINCT FROM resource_type THEN
        PERFORM outbox._fail('22023', format('resourceType %s is not %s', resource -> 'resourceType', resource_type),
            'outbox.create_topic(resource) takes an AidboxSubscriptionTopic, outbox.create_destination(resource) an AidboxTopicDestination.');
    END IF;
END
$$;

-- An AidboxSubscriptionTopic, as Aidbox takes it: each trigger's resource
-- type names a table (outbox.resource_table, else the lower-cased type),
-- supportedInteraction its interactions, fhirPathCriteria its criteria.
CREATE FUNCTION outbox.create_topic(resource jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_url      text := resource ->> 'url';
    v_triggers jsonb := '[]';
    v_t        jsonb;
    v_entry    jsonb;
BEGIN
    PERFORM outbox._require_resource(resource, 'AidboxSubscriptionTopic',
        '{"resourceType": "AidboxSubscriptionTopic", "url": "...", "status": "active", "trigger": [...]}');
    IF jsonb_typeof(resource -> 'url') IS DISTINCT FROM 'string' THEN
        PERFORM outbox._fail('22023', 'the AidboxSubscriptionTopic has no url', 'Give it a "url", e.g. "http://example.org/topics/forms".');
    END IF;
    IF resource ? 'status' AND resource ->> 'status' IS DISTINCT FROM 'active' THEN
        PERFORM outbox._fail('22023', format('topic "%s" has status %s: only active topics are served', v_url, resource -> 'status'),
            'Set "status": "active".');
    END IF;
    IF jsonb_typeof(resource -> 'trigger') IS DISTINCT FROM 'array' OR jsonb_array_length(resource -> 'trigger') = 0 THEN
        PERFORM outbox._fail('22023', format('topic "%s" has no trigger', v_url),
            'Add "trigger": [{"resource": "QuestionnaireResponse", "supportedInteraction": ["create", "update"]}].');
    END IF;
    FOR v_t IN SELECT jsonb_array_elements(resource -> 'trigger') LOOP
        IF jsonb_typeof(v_t) IS DISTINCT FROM 'object' THEN
            PERFORM outbox._fail('22023', format('invalid trigger %s in topic "%s"', v_t, v_url), 'Each trigger is an object with a "resource".');
        END IF;
        -- canFilterBy declares what subscribers may filter on: nothing to do here.
        PERFORM outbox._only_keys(v_t, ARRAY['resource', 'supportedInteraction', 'fhirPathCriteria', 'description', 'canFilterBy'],
            '0A000', 'trigger element ', format(' in topic "%s" is not supported', v_url),
            'Triggers take resource, supportedInteraction, fhirPathCriteria, description (and canFilterBy, which needs nothing here).');
        IF jsonb_typeof(v_t -> 'resource') IS DISTINCT FROM 'string' THEN
            PERFORM outbox._fail('22023', format('a trigger of topic "%s" has no resource', v_url),
                'Name the resource type, e.g. "resource": "QuestionnaireResponse".');
        END IF;
        -- A full URL names the type by its last segment (http://hl7.org/fhir/StructureDefinition/Patient).
        v_entry := jsonb_build_object('resource', regexp_replace(v_t ->> 'resource', '^.*/', ''));
        IF v_t ? 'supportedInteraction' THEN
            v_entry := v_entry || jsonb_build_object('interactions',
                CASE jsonb_typeof(v_t -> 'supportedInteraction') WHEN 'array' THEN v_t -> 'supportedInteraction'
                     ELSE jsonb_build_array(v_t -> 'supportedInteraction') END);
        END IF;
        -- An empty criteria fires on every change of the resource, as in Aidbox.
        IF coalesce(btrim(v_t ->> 'fhirPathCriteria'), '') <> '' THEN
            v_entry := v_entry || jsonb_build_object('fhirpath', v_t -> 'fhirPathCriteria');
        END IF;
        v_triggers := v_triggers || jsonb_build_array(v_entry);
    END LOOP;
    PERFORM outbox.create_topic(v_url, v_triggers, coalesce(resource ->> 'description', resource ->> 'title'));
    UPDATE outbox.topic t SET resource = create_topic.resource WHERE t.url = v_url;
    RETURN v_url;
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

CREATE FUNCTION outbox.drop_topic(url text, "cascade" boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_id        integer;
    v_dests     text[];
    v_discarded bigint := 0;
    v_tt        record;
    v_name      text;
BEGIN
    SELECT t.id INTO v_id FROM outbox.topic t WHERE t.url = drop_topic.url FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM outbox._fail('42704', format('topic "%s" does not exist', url),
            'SELECT url FROM outbox.topic lists the topics.');
    END IF;
    SELECT array_agg(d.id ORDER BY d.id) INTO v_dests FROM outbox.destination d WHERE d.topic_url = drop_topic.url;
    IF v_dests IS NOT NULL THEN
        IF NOT "cascade" THEN
            PERFORM outbox._fail('2BP01', format('topic "%s" still has destinations', url),
                'Drop them first with outbox.drop_destination(), or call outbox.drop_topic(url, cascade => true).',
                format('Destinations: %s.', array_to_string(v_dests, ', ')));
        END IF;
        SELECT coalesce(sum(outbox.drop_destination(x)), 0) INTO v_discarded FROM unnest(v_dests) AS x;
    END IF;
    FOR v_tt IN SELECT * FROM outbox.topic_table WHERE topic_id = v_id LOOP
        -- The table may have been dropped (and its triggers with it).
        IF EXISTS (SELECT 1 FROM pg_class WHERE oid = v_tt.table_oid) THEN
            FOREACH v_name IN ARRAY v_tt.trigger_names LOOP
                EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_name, v_tt.table_oid::regclass);
            END LOOP;
        END IF;
    END LOOP;
    DELETE FROM outbox.topic t WHERE t.id = v_id;
    PERFORM outbox._changed_on_commit();
    RETURN v_discarded;
END
$$;

-- log_min_error_statement = panic: a failing call's statement text (which may
-- hold a password or a key) is not copied into the server log.
CREATE FUNCTION outbox.create_destination(id text, topic text, kind text, parameters jsonb,
                                          content text DEFAULT 'full-resource')
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
    IF (SELECT count(*) FROM outbox.destination) >= 128 THEN
        PERFORM outbox._fail('54000', format('cannot create destination "%s": at most 128 destinations', id),
            'Drop destinations you no longer need; the worker keeps their counters in 128 shared-memory slots.');
    END IF;
    v_params := outbox._check_parameters(id, kind, parameters);
    INSERT INTO outbox.destination (id, topic_url, kind, content, parameters)
    VALUES (create_destination.id, create_destination.topic, create_destination.kind,
            create_destination.content, v_params);
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
-- null removes) and/or its content. The worker rebuilds that producer.
CREATE FUNCTION outbox.alter_destination(id text, parameters jsonb DEFAULT NULL, content text DEFAULT NULL)
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
    UPDATE outbox.destination x
       SET parameters = v_params, content = coalesce(alter_destination.content, x.content)
     WHERE x.id = alter_destination.id;
    PERFORM outbox._changed_on_commit();
    RETURN id;
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
    INSERT INTO outbox.event (id, destination_id, topic_id, table_name, interaction, key, row_data, created_at, attempts, last_error)
    OVERRIDING SYSTEM VALUE
    SELECT m.id, m.destination_id, m.topic_id, m.table_name, m.interaction, m.key, m.row_data, m.created_at, m.attempts, m.error
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
    v_discarded := v_discarded + v_dead;
    PERFORM outbox._changed_on_commit();
    RETURN v_discarded;
END
$$;
