-- pg_outbox: status view and final checks. Loaded after the Rust functions.

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

-- Writers insert into the current partition of the outbox (sql/schema.sql),
-- which the worker publishes in shared memory.
ALTER TABLE outbox.event ALTER part SET DEFAULT outbox._current_part();

-- Aidbox's $status, as FHIR Parameters. SECURITY DEFINER so a monitoring
-- role granted EXECUTE needs no access to the configuration tables (which
-- hold secrets); it shows counters and errors only.
CREATE FUNCTION outbox.status(destination_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s outbox.destination_status;
    v_params jsonb;
BEGIN
    PERFORM outbox._require_destination(destination_id);
    SELECT * INTO s FROM outbox.destination_status ds WHERE ds.id = destination_id;
    -- Aidbox's parameters, order and value types, per kind; timestamps to the second.
    v_params := jsonb_build_array(jsonb_build_object('name', 'messagesDelivered', 'valueDecimal', s.messages_delivered));
    IF s.kind = 'kafka-best-effort' THEN
        v_params := v_params
            || jsonb_build_object('name', 'messagesInProcess', 'valueDecimal', s.messages_in_process)
            || jsonb_build_object('name', 'messagesLost', 'valueDecimal', s.messages_lost);
    ELSE
        v_params := v_params
            || jsonb_build_object('name', 'messagesDeliveryAttempts', 'valueDecimal', s.messages_delivery_attempts)
            || jsonb_build_object('name', 'messagesInProcess', 'valueDecimal', s.messages_in_process)
            || jsonb_build_object('name', 'messagesQueued', 'valueDecimal', s.messages_queued);
    END IF;
    -- Not served yet (no worker, just created): when it was created.
    v_params := v_params || jsonb_build_object('name', 'startTimestamp',
        'valueDateTime', to_char(coalesce(s.start_timestamp,
                                          (SELECT d.created_at FROM outbox.destination d WHERE d.id = s.id))
                                 AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
    v_params := v_params || jsonb_build_object('name', 'status', 'valueString', s.status);
    v_params := v_params || coalesce((
        SELECT jsonb_agg(jsonb_build_object('name', 'lastErrorDetail', 'part', jsonb_build_array(
                   jsonb_build_object('name', 'message', 'valueString', e ->> 'message'),
                   jsonb_build_object('name', 'timestamp', 'valueDateTime',
                       to_char((e ->> 'timestamp')::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))))
                   ORDER BY o)
          FROM jsonb_array_elements(s.last_errors) WITH ORDINALITY AS x(e, o)), '[]'::jsonb);
    RETURN jsonb_build_object('resourceType', 'Parameters', 'parameter', v_params);
END
$$;

-- Keep the topics true after DDL on their tables (outbox._after_ddl() in
-- sql/topics.sql): after every command that drops something (a table, a
-- trigger, a key, or what a trigger depends on, by CASCADE), and after the
-- commands that can rename a table. CREATE TABLE and the like pay nothing.
CREATE EVENT TRIGGER outbox_after_drop ON sql_drop
    EXECUTE FUNCTION outbox._after_ddl();
CREATE EVENT TRIGGER outbox_after_rename ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA', 'ALTER EXTENSION')
    EXECUTE FUNCTION outbox._after_ddl();

-- Only superusers configure (the configuration tables hold secrets); writers
-- reach the outbox through the trigger, which writes it as the extension
-- owner. Monitoring can be granted without exposing secrets:
--   GRANT SELECT ON outbox.destination_status TO r;
--   GRANT EXECUTE ON FUNCTION outbox._destination_stats(), outbox.status(text) TO r;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
GRANT USAGE ON SCHEMA outbox TO PUBLIC;

-- Refuse to install where the worker cannot serve us.
SELECT outbox._require_preload_and_database();
