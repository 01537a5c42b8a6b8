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
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (topic, table): the triggers the API attached to that table.
CREATE TABLE outbox.topic_table (
    topic_id      integer NOT NULL REFERENCES outbox.topic (id) ON DELETE CASCADE,
    table_oid     oid NOT NULL,
    table_name    text NOT NULL,
    interactions  text[] NOT NULL,
    criteria      text,
    key_columns   text[] NOT NULL,
    trigger_names text[] NOT NULL,
    PRIMARY KEY (topic_id, table_oid)
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

-- The outbox: one row per (change, at-least-once destination), written in the
-- writer's transaction, deleted by the worker once Kafka acknowledged it.
-- Only src/store.rs (the worker side) and src/capture.rs (the row trigger
-- outbox._capture(), the enqueue side) know this layout. row_data is the row
-- as row_to_json() gives it (columns in table order), only for full-resource.
CREATE TABLE outbox.event (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination_id text NOT NULL,
    topic_id       integer NOT NULL,
    table_name     text NOT NULL,
    interaction    text NOT NULL,
    key            text,
    row_data       json,
    created_at     timestamptz NOT NULL DEFAULT now(),
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text
);
CREATE INDEX event_destination_idx ON outbox.event (destination_id, id);

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
    v_key       text;
    v_qualified text;
    v_tgargs    text[];
BEGIN
    IF jsonb_typeof(p_entry) IS DISTINCT FROM 'object' THEN
        PERFORM outbox._fail('22023', format('invalid trigger entry for topic "%s": %s', p_url, p_entry),
            'Each entry is an object such as {"table": "public.t", "interactions": ["create"], "criteria": "NEW.x > 0"}.');
    END IF;
    FOR v_key IN SELECT jsonb_object_keys(p_entry) LOOP
        IF v_key NOT IN ('table', 'interactions', 'criteria') THEN
            PERFORM outbox._fail('22023', format('unknown key "%s" in trigger entry for topic "%s"', v_key, p_url),
                'Allowed keys are "table", "interactions" and "criteria".');
        END IF;
    END LOOP;
    IF jsonb_typeof(p_entry -> 'table') IS DISTINCT FROM 'string' THEN
        PERFORM outbox._fail('22023', format('trigger entry for topic "%s" has no "table"', p_url),
            'Name the table as a string, e.g. {"table": "public.orders"}.');
    END IF;
    v_table := p_entry ->> 'table';
    BEGIN
        v_oid := to_regclass(v_table);
    EXCEPTION WHEN OTHERS THEN
        v_oid := NULL;
    END;
    IF v_oid IS NULL THEN
        PERFORM outbox._fail('42P01', format('table "%s" does not exist', v_table),
            'Create the table first, or schema-qualify its name (e.g. "public.orders").');
    END IF;
    SELECT c.relkind INTO v_kind FROM pg_class c WHERE c.oid = v_oid;
    IF v_kind NOT IN ('r', 'p') THEN
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

    IF p_entry ? 'criteria' AND jsonb_typeof(p_entry -> 'criteria') <> 'null' THEN
        IF jsonb_typeof(p_entry -> 'criteria') <> 'string' OR btrim(p_entry ->> 'criteria') = '' THEN
            PERFORM outbox._fail('22023', format('"criteria" for table "%s" must be a non-empty string', v_table),
                'Write a boolean SQL expression over NEW and OLD, e.g. "NEW.status = ''done''".');
        END IF;
        v_criteria := p_entry ->> 'criteria';
    END IF;

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

    INSERT INTO outbox.topic_table (topic_id, table_oid, table_name, interactions, criteria, key_columns, trigger_names)
    VALUES (p_topic_id, v_oid, v_oid::regclass::text, v_inter, v_criteria, v_keys, v_names);
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
    DELETE FROM outbox.event e WHERE e.destination_id = drop_destination.id;
    GET DIAGNOSTICS v_discarded = ROW_COUNT;
    DELETE FROM outbox.dead_letter l WHERE l.destination_id = drop_destination.id;
    GET DIAGNOSTICS v_dead = ROW_COUNT;
    v_discarded := v_discarded + v_dead;
    PERFORM outbox._changed_on_commit();
    RETURN v_discarded;
END
$$;
