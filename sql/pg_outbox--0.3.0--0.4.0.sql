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
-- What was granted on the relations re-created here (to a monitoring role,
-- say), to grant again once they are.
CREATE TABLE outbox.acl_0_3_0 AS
SELECT c.relname::text AS relname, a.grantee, a.privilege_type, a.is_grantable
  FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
 WHERE c.oid IN ('outbox.event'::regclass, 'outbox.pending'::regclass, 'outbox.destination_status'::regclass)
   AND a.grantee <> c.relowner;
DROP VIEW outbox.destination_status;
DROP VIEW outbox.pending;
-- The events and the identity's position are held aside while the old table
-- goes first (PostgreSQL 18 names NOT NULL constraints after the table, and
-- the new table's names must be a fresh install's).
CREATE TABLE outbox.event_0_3_0 AS SELECT * FROM outbox.event;
CREATE TABLE outbox.event_0_3_0_id AS SELECT s.last_value, s.is_called FROM outbox.event_id_seq s;
ALTER EXTENSION pg_outbox DROP SEQUENCE outbox.event_id_seq;
ALTER EXTENSION pg_outbox DROP TABLE outbox.event;
DROP TABLE outbox.event;

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
    part           smallint NOT NULL DEFAULT 0
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
                          attempts, last_error, events, ids, keys, rows, part)
OVERRIDING SYSTEM VALUE
SELECT id, destination_id, topic_id, table_name, interaction, key, row_data, created_at,
       attempts, last_error, events, ids, keys, rows, 0
  FROM outbox.event_0_3_0;
SELECT pg_catalog.setval('outbox.event_id_seq', s.last_value, s.is_called) FROM outbox.event_0_3_0_id s;
ALTER EXTENSION pg_outbox DROP TABLE outbox.event_0_3_0;
ALTER EXTENSION pg_outbox DROP TABLE outbox.event_0_3_0_id;
DROP TABLE outbox.event_0_3_0, outbox.event_0_3_0_id;

CREATE FUNCTION outbox._current_part() RETURNS smallint
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_current_part_wrapper';
REVOKE ALL ON FUNCTION outbox._current_part() FROM PUBLIC;
ALTER TABLE outbox.event ALTER part SET DEFAULT outbox._current_part();
SELECT pg_catalog.pg_extension_config_dump('outbox.event_0', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_1', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_2', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.event_id_seq', '');

-- Pausing a destination (pause_destination, resume_destination).
ALTER TABLE outbox.destination ADD COLUMN paused_at timestamptz;
-- Stop delivering to a destination until resume_destination(): its
-- at-least-once events wait in the outbox, best-effort ones count as lost.
-- What was handed to Kafka already finishes. True if it was delivering,
-- false if it was paused already.
CREATE FUNCTION outbox.pause_destination(id text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox._require_destination(id);
    UPDATE outbox.destination d SET paused_at = now() WHERE d.id = pause_destination.id AND d.paused_at IS NULL;
    RETURN FOUND;
END
$$;

-- Deliver again, from the oldest event waiting. True if it was paused.
CREATE FUNCTION outbox.resume_destination(id text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox._require_destination(id);
    UPDATE outbox.destination d SET paused_at = NULL WHERE d.id = resume_destination.id AND d.paused_at IS NOT NULL;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION outbox.pause_destination(text), outbox.resume_destination(text) FROM PUBLIC;

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

-- One row per destination: configuration joined with the worker's counters
-- (shared memory) and the number of events still in the outbox.
CREATE VIEW outbox.destination_status AS
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

REVOKE ALL ON outbox.event, outbox.event_0, outbox.event_1, outbox.event_2, outbox.pending,
    outbox.destination_status FROM PUBLIC;

-- The grants carried over. They are the user's, not the extension's: the
-- initial privileges pg_dump compares with (pg_init_privs, which a GRANT in
-- an extension script changes) stay a fresh install's, so a dump still
-- carries them.
DO $$
DECLARE
    r regclass;
    v_init aclitem[];
    g record;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox.event', 'outbox.pending', 'outbox.destination_status']::regclass[] LOOP
        SELECT i.initprivs INTO v_init FROM pg_catalog.pg_init_privs i
         WHERE i.classoid = 'pg_catalog.pg_class'::regclass AND i.objoid = r AND i.objsubid = 0;
        FOR g IN SELECT * FROM outbox.acl_0_3_0 a WHERE pg_catalog.format('outbox.%I', a.relname)::regclass = r LOOP
            EXECUTE pg_catalog.format('GRANT %s ON %s TO %s%s', g.privilege_type, r,
                CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        UPDATE pg_catalog.pg_init_privs i SET initprivs = v_init
         WHERE i.classoid = 'pg_catalog.pg_class'::regclass AND i.objoid = r AND i.objsubid = 0;
    END LOOP;
END
$$;
ALTER EXTENSION pg_outbox DROP TABLE outbox.acl_0_3_0;
DROP TABLE outbox.acl_0_3_0;
