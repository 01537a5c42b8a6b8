-- pg_outbox 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_outbox UPDATE; the library
-- must be the 0.2.0 one, loaded by a restart: README.md, "Upgrading").
-- create_destination's limit of destinations is the setting
-- outbox.max_destinations, not a fixed 128.
\echo Use "ALTER EXTENSION pg_outbox UPDATE" to load this file. \quit

CREATE OR REPLACE FUNCTION outbox.create_destination(id text, topic text, kind text, parameters jsonb,
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
    IF (SELECT count(*) FROM outbox.destination) >= coalesce(current_setting('outbox.max_destinations', true), '128')::int THEN
        PERFORM outbox._fail('54000', format('cannot create destination "%s": at most %s destinations (outbox.max_destinations)',
                id, coalesce(current_setting('outbox.max_destinations', true), '128')),
            'Drop destinations you no longer need, or raise outbox.max_destinations and restart the server.');
    END IF;
    v_params := outbox._check_parameters(id, kind, parameters);
    INSERT INTO outbox.destination (id, topic_url, kind, content, parameters)
    VALUES (create_destination.id, create_destination.topic, create_destination.kind,
            create_destination.content, v_params);
    PERFORM outbox._changed_on_commit();
    RETURN id;
END
$$;
