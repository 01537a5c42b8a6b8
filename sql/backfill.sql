-- pg_outbox: backfill. outbox.backfill() sends the rows a topic's tables
-- hold now to one at-least-once destination, as the `create` events the
-- topic would have captured had each row just been inserted; the worker
-- does it in batches (outbox._backfill_step), each its own short
-- transaction, between its deliveries. See docs/architecture.md.
--
-- Per key, a live change is never overtaken by an older copy: a batch reads
-- its rows FOR SHARE, so a change to one of them commits either before the
-- batch read it (the batch then sends the changed row, numbered after the
-- change's event) or after the batch committed (numbered after the copy).
-- A row inserted while a batch runs is not in it: its own event sends it.
-- The batch's rows are read as the table's owner (outbox._backfill_batch),
-- never as the worker's superuser, with the server's default search_path
-- (the criteria and `where` were written for one); the worker's own SQL
-- here runs with search_path = pg_catalog, pg_temp.

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
