#!/usr/bin/env bash
# The main job, end to end, on a fresh machine:
#   set up (idempotent) -> start a tansu broker and a throwaway Postgres with
#   pg_outbox preloaded -> create a table, a topic and an at-least-once
#   destination -> write rows -> print the messages that arrived in Kafka and
#   the destination's status.
# KEEP=1 leaves Postgres and the broker running (stop them with
# scripts/stop-all.sh). Ports: PG_PORT (default 15432), KAFKA_PORT (19092).
# PG_VERSION=16, 17 or 18 runs it on that PostgreSQL (default 15).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
. scripts/pg-versions.sh
export PG_VERSION="${PG_VERSION:-15}"
bash scripts/setup.sh

DEMO=/tmp/pg_outbox/demo   # under /tmp: the postgres user must reach it
PG_PORT="${PG_PORT:-15432}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
BIN="$(pg_bin_of "$PG_VERSION")"
bash scripts/stop-all.sh "$DEMO"
rm -rf "$DEMO" && mkdir -p "$DEMO" && chmod 755 /tmp/pg_outbox && chown postgres "$DEMO"
[ "${KEEP:-0}" = 1 ] || trap 'bash scripts/stop-all.sh "$DEMO"' EXIT

printf '\n== building the Kafka reader (outbox-consume)\n'
cargo build -q -p pg_outbox_test --bin outbox-consume

printf '\n== starting tansu on 127.0.0.1:%s\n' "$KAFKA_PORT"
"$HOME/.cargo/bin/tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" >"$DEMO/tansu.log" 2>&1 &
echo $! >"$DEMO/tansu-$KAFKA_PORT.pid"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null && break; sleep 0.1; done
"$HOME/.cargo/bin/tansu" topic create questionnaire-responses --partitions 3 --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null

printf '\n== starting Postgres %s on 127.0.0.1:%s with shared_preload_libraries = pg_outbox\n' "$PG_VERSION" "$PG_PORT"
sudo -n -u postgres "$BIN/initdb" -D "$DEMO/data" -A trust -U postgres >/dev/null
cat >>"$DEMO/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_outbox'
outbox.database = 'postgres'
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DEMO'
CONF
sudo -n -u postgres env LD_LIBRARY_PATH="$(dirname "$BIN")/lib" "$BIN/pg_ctl" -D "$DEMO/data" -l "$DEMO/postgres.log" -w start >/dev/null
PSQL=("$BIN/psql" -X -v ON_ERROR_STOP=1 -h "$DEMO" -p "$PG_PORT" -U postgres -d postgres)

printf '\n== creating a topic and a destination, writing rows\n'
"${PSQL[@]}" -e <<SQL
CREATE EXTENSION pg_outbox;
CREATE TABLE questionnaire_response (id int PRIMARY KEY, status text, answers jsonb);
SELECT outbox.create_topic(
  url      => 'http://example.org/topics/questionnaire-response',
  triggers => '[{"table": "public.questionnaire_response",
                 "interactions": ["create", "update"],
                 "criteria": "NEW.status IN (''completed'', ''amended'')"}]',
  description => 'finished questionnaires');
SELECT outbox.create_destination(
  id         => 'kafka-destination',
  topic      => 'http://example.org/topics/questionnaire-response',
  kind       => 'kafka-at-least-once',
  parameters => '{"kafkaTopic": "questionnaire-responses", "bootstrapServers": "127.0.0.1:$KAFKA_PORT"}',
  content    => 'full-resource');
INSERT INTO questionnaire_response VALUES
  (1, 'completed', '{"q1": "yes"}'),
  (2, 'in-progress', '{"q1": "no"}'),
  (3, 'amended', '{"q1": "maybe"}');
UPDATE questionnaire_response SET status = 'completed' WHERE id = 2;
BEGIN; INSERT INTO questionnaire_response VALUES (4, 'completed', '{}'); ROLLBACK;
SQL

for _ in $(seq 300); do
    left=$("${PSQL[@]}" -At -c "SELECT count(*) FROM outbox.event")
    [ "$left" = 0 ] && break
    sleep 0.1
done

printf '\n== messages in Kafka topic questionnaire-responses (expect 3: ids 1, 3 created; 2 updated; 4 rolled back)\n'
"$PWD/target/debug/outbox-consume" "127.0.0.1:$KAFKA_PORT" questionnaire-responses 3 30

printf '\n== status\n'
"${PSQL[@]}" -x -c "SELECT * FROM outbox.destination_status"
"${PSQL[@]}" -At -c "SELECT jsonb_pretty(outbox.status('kafka-destination'))"

if [ "${KEEP:-0}" = 1 ]; then
    printf '\nStill running: psql -h %s -p %s -U postgres; broker 127.0.0.1:%s. Stop: bash scripts/stop-all.sh\n' "$DEMO" "$PG_PORT" "$KAFKA_PORT"
fi
