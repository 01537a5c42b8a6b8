-- pg_outbox: topics. The SQL functions that create, change and drop them, and
-- the DDL event trigger that keeps their record of the watched tables true.
--
-- A topic's entries (outbox.topic_entry) name tables, interactions and
-- criteria; a table may appear in several. The API attaches one trigger per
-- (topic, table, interaction), `outbox_<topic id>_ins|upd|del|trunc`, running
-- outbox._capture(topic id): its WHEN clause is the OR of the SQL criteria of
-- the entries that cover it (none if one of them has none), so a change that
-- matches two entries is still one event. The trigger finds the table's name
-- and primary key itself, at run time: both follow renames.

-- The topic id a capture trigger was created for (its first argument; NULL
-- if that is not a number).
CREATE FUNCTION outbox._trigger_topic(tgargs bytea)
RETURNS integer LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN a OPERATOR(pg_catalog.~) '^[0-9]{1,9}$' THEN a::integer END
      FROM pg_catalog.split_part(pg_catalog.encode(tgargs, 'escape'), E'\\000', 1) AS a
$$;

-- The capture triggers of a topic, on any table (partitions' clones left
-- out: they go with their parent's).
CREATE FUNCTION outbox._topic_triggers(p_topic_id integer)
RETURNS TABLE (table_oid oid, trigger_name name)
LANGUAGE sql STABLE AS $$
    SELECT g.tgrelid, g.tgname FROM pg_catalog.pg_trigger g
     WHERE g.tgfoid = 'outbox._capture()'::pg_catalog.regprocedure AND g.tgparentid = 0
       AND outbox._trigger_topic(g.tgargs) = p_topic_id
$$;

-- The trigger event of an interaction.
CREATE FUNCTION outbox._interaction_event(interaction text)
RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE interaction WHEN 'create' THEN 'INSERT' WHEN 'update' THEN 'UPDATE' WHEN 'delete' THEN 'DELETE'
                            WHEN 'truncate' THEN 'TRUNCATE' END
$$;

-- The bit of pg_trigger.tgtype for an interaction.
CREATE FUNCTION outbox._interaction_bit(interaction text)
RETURNS integer LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE interaction WHEN 'create' THEN 4 WHEN 'delete' THEN 8 WHEN 'update' THEN 16 WHEN 'truncate' THEN 32 END
$$;

-- Check an entry's criteria for one interaction with a trigger that is
-- created and rolled back at once: a wrong expression is an error now
-- (42P17, with a hint about NEW and OLD), never a silent drop later.
CREATE FUNCTION outbox._check_criteria(p_oid oid, p_table text, p_url text, p_topic_id integer,
                                        p_interaction text, p_criteria text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_event   text := outbox._interaction_event(p_interaction);
    v_name    text := format('outbox_%s_check', p_topic_id);
    v_outcome text;
    v_error   text;
BEGIN
    BEGIN
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION outbox._capture(%L)',
            v_name, v_event, p_oid::regclass, p_criteria, p_topic_id::text);
        -- The criteria went into DDL text: it must not have smuggled in
        -- another function or other arguments.
        SELECT CASE WHEN count(*) = 1 THEN 'ok' ELSE 'smuggled' END INTO v_outcome
          FROM pg_trigger g
         WHERE g.tgrelid = p_oid AND g.tgname = v_name
           AND g.tgfoid = 'outbox._capture()'::regprocedure AND g.tgnargs = 1
           AND outbox._trigger_topic(g.tgargs) = p_topic_id;
        -- Undo the trigger: this block's subtransaction rolls back.
        RAISE EXCEPTION USING ERRCODE = 'OBX00', MESSAGE = v_outcome;
    EXCEPTION
        WHEN SQLSTATE 'OBX00' THEN
            v_outcome := SQLERRM;
        WHEN OTHERS THEN
            v_error := SQLERRM;
    END;
    IF v_error IS NOT NULL THEN
        PERFORM outbox._fail('42P17',
            format('invalid criteria for table "%s" in topic "%s": %s', p_table, p_url, v_error),
            CASE
              WHEN p_interaction = 'create' AND v_error LIKE '%OLD%' THEN
                'A create (INSERT) has no OLD row: drop "create" from "interactions" or do not use OLD.'
              WHEN p_interaction = 'delete' AND v_error LIKE '%NEW%' THEN
                'A delete has no NEW row: drop "delete" from "interactions" or do not use NEW.'
              ELSE 'The criteria must be a boolean SQL expression over NEW and OLD without subqueries.'
            END,
            format('Interaction "%s" (%s trigger).', p_interaction, v_event));
    END IF;
    IF v_outcome <> 'ok' THEN
        PERFORM outbox._fail('42P17', format('invalid criteria for table "%s" in topic "%s"', p_table, p_url),
            'The criteria must be a single boolean SQL expression.');
    END IF;
END
$$;

-- Validate one trigger entry and record it (and its table, the first time)
-- in outbox.topic_entry / outbox.topic_table. No trigger yet.
CREATE FUNCTION outbox._add_entry(p_topic_id integer, p_url text, p_position integer, p_entry jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_table     text;
    v_oid       oid;
    v_kind      "char";
    v_inter     text[];
    v_criteria  text;
    v_i         text;
    v_qualified text;
    v_resource  text;
    v_rtype     text;
    v_fhirpath  text;
    v_known     outbox.topic_table;
    v_other     text;
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

    IF p_entry ? 'interactions' THEN
        IF jsonb_typeof(p_entry -> 'interactions') IS DISTINCT FROM 'array'
           OR jsonb_array_length(p_entry -> 'interactions') = 0 THEN
            PERFORM outbox._fail('22023', format('"interactions" for table "%s" must be a non-empty array', v_table),
                'Use any of "create", "update", "delete" (and "truncate"), e.g. ["create", "update"].');
        END IF;
        SELECT array_agg(DISTINCT x ORDER BY x) INTO v_inter
          FROM jsonb_array_elements_text(p_entry -> 'interactions') AS x;
        FOREACH v_i IN ARRAY v_inter LOOP
            IF v_i IS NULL OR v_i NOT IN ('create', 'update', 'delete', 'truncate') THEN
                PERFORM outbox._fail('22023', format('unknown interaction "%s" for table "%s"', coalesce(v_i, 'null'), v_table),
                    'Interactions are "create" (INSERT), "update" (UPDATE), "delete" (DELETE) and "truncate" (TRUNCATE).');
            END IF;
        END LOOP;
    ELSE
        v_inter := ARRAY['create', 'delete', 'update'];
    END IF;

    v_criteria := outbox._entry_text(p_entry, 'criteria', v_table,
        'Write a boolean SQL expression over NEW and OLD, e.g. "NEW.status = ''done''".');
    IF 'truncate' = ANY (v_inter) AND (v_criteria IS NOT NULL OR v_fhirpath IS NOT NULL) THEN
        PERFORM outbox._fail('22023', format('criteria for table "%s" in topic "%s" cannot apply to "truncate"', v_table, p_url),
            'A TRUNCATE has no row to test: give "truncate" an entry of its own, without "criteria" or "fhirpath".');
    END IF;

    SELECT n.nspname || '.' || c.relname INTO v_qualified
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_oid;
    SELECT * INTO v_known FROM outbox.topic_table tt WHERE tt.topic_id = p_topic_id AND tt.table_oid = v_oid AND tt.watched;
    IF FOUND THEN
        IF v_known.resource_type IS DISTINCT FROM v_rtype THEN
            PERFORM outbox._fail('22023', format('table "%s" is named as a FHIR resource type in one entry of topic "%s" and not in another', v_table, p_url),
                'Events of one table have one shape: name it the same way ("resource" or "table") in every entry.');
        END IF;
    ELSE
        -- A partitioned table covers its partitions: watching both would
        -- capture each change twice.
        SELECT tt.table_name INTO v_other FROM outbox.topic_table tt
         WHERE tt.topic_id = p_topic_id AND tt.watched
           AND (tt.table_oid IN (SELECT a.relid FROM pg_partition_ancestors(v_oid) a)
                OR v_oid IN (SELECT a.relid FROM pg_partition_ancestors(tt.table_oid) a));
        IF v_other IS NOT NULL THEN
            PERFORM outbox._fail('22023', format('topic "%s" watches both "%s" and "%s", one a partition of the other', p_url, v_qualified, v_other),
                'A partitioned table''s triggers cover its partitions: watch the partitioned table, or its partitions.');
        END IF;
        -- A table it watched before (alter_topic) keeps the names it had.
        INSERT INTO outbox.topic_table AS tt (topic_id, table_oid, table_name, resource_type)
        VALUES (p_topic_id, v_oid, v_qualified, v_rtype)
        ON CONFLICT (topic_id, table_oid) DO UPDATE
           SET watched = true, table_name = excluded.table_name, resource_type = excluded.resource_type,
               former_names = CASE WHEN tt.table_name = excluded.table_name THEN tt.former_names
                                   ELSE array_remove(tt.former_names, excluded.table_name) || tt.table_name END;
        IF NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = v_oid AND i.indisprimary) THEN
            RAISE NOTICE 'table "%" has no primary key: its events get a NULL Kafka key', v_table
                USING HINT = 'Add a primary key to keep each row''s changes in one partition, in order; it is used from then on.';
        END IF;
    END IF;

    IF v_criteria IS NOT NULL THEN
        FOREACH v_i IN ARRAY v_inter LOOP
            PERFORM outbox._check_criteria(v_oid, v_table, p_url, p_topic_id, v_i, v_criteria);
        END LOOP;
    END IF;
    INSERT INTO outbox.topic_entry (topic_id, position, table_oid, interactions, criteria, fhirpath, spec)
    VALUES (p_topic_id, p_position, v_oid, v_inter, v_criteria, v_fhirpath, p_entry);
END
$$;

-- Attach the topic's triggers, one per table and interaction its entries
-- cover, with the entries' SQL criteria joined by OR in the WHEN clause.
CREATE FUNCTION outbox._create_triggers(p_topic_id integer, p_url text)
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

-- Drop the topic's capture triggers (their configuration rows go first, so
-- outbox._after_ddl() does not report them as lost).
CREATE FUNCTION outbox._drop_triggers(p_topic_id integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM outbox._topic_triggers(p_topic_id) LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', r.trigger_name, r.table_oid::regclass);
    END LOOP;
END
$$;

-- Record the entries of a topic and attach their triggers.
CREATE FUNCTION outbox._set_entries(p_topic_id integer, p_url text, p_triggers jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_entry jsonb;
    v_n     bigint;
BEGIN
    IF p_triggers IS NULL OR jsonb_typeof(p_triggers) <> 'array' OR jsonb_array_length(p_triggers) = 0 THEN
        PERFORM outbox._fail('22023', format('triggers of topic "%s" must be a non-empty JSON array', p_url),
            'E.g. ''[{"table": "public.orders", "interactions": ["create"]}]''::jsonb.');
    END IF;
    FOR v_entry, v_n IN SELECT * FROM jsonb_array_elements(p_triggers) WITH ORDINALITY LOOP
        PERFORM outbox._add_entry(p_topic_id, p_url, v_n::integer, v_entry);
    END LOOP;
    PERFORM outbox._create_triggers(p_topic_id, p_url);
    PERFORM outbox._entries_changed(p_topic_id);
END
$$;

-- outbox.topic.triggers shows the entries as they are now.
CREATE FUNCTION outbox._entries_changed(p_topic_id integer)
RETURNS void LANGUAGE sql AS $$
    UPDATE outbox.topic t
       SET triggers = coalesce((SELECT jsonb_agg(e.spec ORDER BY e.position) FROM outbox.topic_entry e
                                 WHERE e.topic_id = p_topic_id), '[]')
     WHERE t.id = p_topic_id;
$$;

CREATE FUNCTION outbox.create_topic(url text, triggers jsonb, description text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_id integer;
BEGIN
    IF url IS NULL OR btrim(url) = '' THEN
        PERFORM outbox._fail('22023', 'topic url must not be empty', 'Give the topic a url, e.g. ''http://example.org/topics/orders''.');
    END IF;
    IF EXISTS (SELECT 1 FROM outbox.topic t WHERE t.url = create_topic.url) THEN
        PERFORM outbox._fail('42710', format('topic "%s" already exists', url),
            'Drop it first with outbox.drop_topic(), change it with outbox.alter_topic(), or choose another url.');
    END IF;
    INSERT INTO outbox.topic (url, description, triggers)
    VALUES (create_topic.url, create_topic.description, '[]')
    RETURNING id INTO v_id;
    PERFORM outbox._set_entries(v_id, url, triggers);
    PERFORM outbox._changed_on_commit();
    RETURN url;
END
$$;

-- Replace a topic's entries (tables, interactions, criteria) and/or its
-- description (NULL keeps them). Its id, destinations and their pending
-- events stay; writers use the new triggers from the commit on.
CREATE FUNCTION outbox.alter_topic(url text, triggers jsonb, description text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_id integer;
BEGIN
    SELECT t.id INTO v_id FROM outbox.topic t WHERE t.url = alter_topic.url FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM outbox._fail('42704', format('topic "%s" does not exist', coalesce(url, '')),
            'SELECT url FROM outbox.topic lists the topics; outbox.create_topic() makes one.');
    END IF;
    IF triggers IS NOT NULL THEN
        DELETE FROM outbox.topic_entry e WHERE e.topic_id = v_id;
        UPDATE outbox.topic_table tt SET watched = false WHERE tt.topic_id = v_id;
        PERFORM outbox._drop_triggers(v_id);
        PERFORM outbox._set_entries(v_id, url, triggers);
        -- A pasted AidboxSubscriptionTopic no longer describes it.
        UPDATE outbox.topic t SET resource = NULL WHERE t.id = v_id;
    END IF;
    IF description IS NOT NULL THEN
        UPDATE outbox.topic t SET description = alter_topic.description WHERE t.id = v_id;
    END IF;
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

-- An AidboxSubscriptionTopic as a topic's url, entries and description:
-- each trigger's resource type names a table (outbox.resource_table, else
-- the lower-cased type), supportedInteraction its interactions,
-- fhirPathCriteria its criteria. A resource may appear in several triggers.
CREATE FUNCTION outbox._aidbox_topic(resource jsonb, OUT url text, OUT triggers jsonb, OUT description text)
LANGUAGE plpgsql AS $$
DECLARE
    v_t     jsonb;
    v_entry jsonb;
BEGIN
    PERFORM outbox._require_resource(resource, 'AidboxSubscriptionTopic',
        '{"resourceType": "AidboxSubscriptionTopic", "url": "...", "status": "active", "trigger": [...]}');
    url := resource ->> 'url';
    IF jsonb_typeof(resource -> 'url') IS DISTINCT FROM 'string' THEN
        PERFORM outbox._fail('22023', 'the AidboxSubscriptionTopic has no url', 'Give it a "url", e.g. "http://example.org/topics/forms".');
    END IF;
    IF resource ? 'status' AND resource ->> 'status' IS DISTINCT FROM 'active' THEN
        PERFORM outbox._fail('22023', format('topic "%s" has status %s: only active topics are served', url, resource -> 'status'),
            'Set "status": "active".');
    END IF;
    IF jsonb_typeof(resource -> 'trigger') IS DISTINCT FROM 'array' OR jsonb_array_length(resource -> 'trigger') = 0 THEN
        PERFORM outbox._fail('22023', format('topic "%s" has no trigger', url),
            'Add "trigger": [{"resource": "QuestionnaireResponse", "supportedInteraction": ["create", "update"]}].');
    END IF;
    triggers := '[]';
    FOR v_t IN SELECT jsonb_array_elements(resource -> 'trigger') LOOP
        IF jsonb_typeof(v_t) IS DISTINCT FROM 'object' THEN
            PERFORM outbox._fail('22023', format('invalid trigger %s in topic "%s"', v_t, url), 'Each trigger is an object with a "resource".');
        END IF;
        -- canFilterBy declares what subscribers may filter on: nothing to do here.
        PERFORM outbox._only_keys(v_t, ARRAY['resource', 'supportedInteraction', 'fhirPathCriteria', 'description', 'canFilterBy'],
            '0A000', 'trigger element ', format(' in topic "%s" is not supported', url),
            'Triggers take resource, supportedInteraction, fhirPathCriteria, description (and canFilterBy, which needs nothing here).');
        IF jsonb_typeof(v_t -> 'resource') IS DISTINCT FROM 'string' THEN
            PERFORM outbox._fail('22023', format('a trigger of topic "%s" has no resource', url),
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
        triggers := triggers || jsonb_build_array(v_entry);
    END LOOP;
    description := coalesce(resource ->> 'description', resource ->> 'title');
END
$$;

-- An AidboxSubscriptionTopic, as Aidbox takes it.
CREATE FUNCTION outbox.create_topic(resource jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM outbox._aidbox_topic(resource);
    PERFORM outbox.create_topic(v.url, v.triggers, v.description);
    UPDATE outbox.topic t SET resource = create_topic.resource WHERE t.url = v.url;
    RETURN v.url;
END
$$;

-- The topic of an AidboxSubscriptionTopic's url, changed to what it says now.
CREATE FUNCTION outbox.alter_topic(resource jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM outbox._aidbox_topic(resource);
    PERFORM outbox.alter_topic(v.url, v.triggers, v.description);
    UPDATE outbox.topic t SET resource = alter_topic.resource WHERE t.url = v.url;
    RETURN v.url;
END
$$;

CREATE FUNCTION outbox.drop_topic(url text, "cascade" boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_id        integer;
    v_dests     text[];
    v_discarded bigint := 0;
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
    DELETE FROM outbox.topic t WHERE t.id = v_id;
    PERFORM outbox._drop_triggers(v_id);
    PERFORM outbox._changed_on_commit();
    RETURN v_discarded;
END
$$;

-- After DDL that may touch a watched table (the event triggers in
-- sql/finalize.sql: sql_drop for every command that drops something, and
-- ddl_command_end for the commands that rename):
-- - a renamed table (or schema) keeps its topics under its new name;
-- - a dropped table leaves its topics, with a WARNING (events already
--   captured from it are still delivered, in its shape);
-- - a capture trigger dropped by hand or with what it depends on (DROP
--   COLUMN ... CASCADE, DROP FUNCTION ... CASCADE) takes its interaction out
--   of the entries, with a WARNING;
-- - a watched table whose primary key was dropped gets a WARNING (NULL keys).
-- Runs as the extension owner: the DDL may come from a table owner who
-- cannot read outbox's tables. Never fails the DDL: a problem is a WARNING.
CREATE FUNCTION outbox._after_ddl()
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

-- The topic no longer watches the table: its entries go, its row stays (for
-- the shape of events captured before).
CREATE FUNCTION outbox._unwatch(p_topic_id integer, p_table_oid oid)
RETURNS void LANGUAGE sql AS $$
    DELETE FROM outbox.topic_entry e WHERE e.topic_id = p_topic_id AND e.table_oid = p_table_oid;
    UPDATE outbox.topic_table tt SET watched = false WHERE tt.topic_id = p_topic_id AND tt.table_oid = p_table_oid;
    SELECT outbox._entries_changed(p_topic_id);
$$;
