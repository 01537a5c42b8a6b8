-- pg_outbox 0.3.0 -> 0.4.0 (ALTER EXTENSION pg_outbox UPDATE; the library
-- must be the 0.4.0 one, loaded by a restart: README.md, "Upgrading").
-- The outbox becomes three partitions that take turns, emptied with
-- TRUNCATE once delivered (sql/schema.sql): it stays bounded while a
-- snapshot is held open. The events waiting move into the first partition,
-- with their numbers; the identity goes on after the last one. Destinations
-- can be paused.
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
       coalesce(s.last_errors, '[]'::jsonb) AS last_errors
  FROM outbox.destination d
  LEFT JOIN outbox._destination_stats() s ON s.id = d.id
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
