#!/usr/bin/env bash
# The test command: set up (idempotent), then run
#   1. the producer parameter tests (params/): plain Rust, no Postgres;
#   2. the end-to-end tests (pg_test/): real Postgres with pg_outbox
#      preloaded, real tansu brokers over TCP, on PostgreSQL 15 and 18;
#   3. the benchmark in its short mode (on 15);
#   4. the #[pg_test] API tests inside Postgres (cargo pgrx test) on 15, 16,
#      17 and 18.
# E2E_VERSIONS / API_VERSIONS narrow the matrix (e.g. E2E_VERSIONS=15).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
. scripts/pg-versions.sh
E2E_VERSIONS="${E2E_VERSIONS:-15 18}"
API_VERSIONS="${API_VERSIONS:-$PG_ALL_VERSIONS}"
bash scripts/setup.sh

# Clusters and brokers live under /tmp: the postgres user must reach them.
# Every part runs even if one before failed; the script fails at the end.
TEST_ROOT=/tmp/pg_outbox/test
trap 'bash scripts/stop-all.sh $TEST_ROOT' EXIT
bash scripts/stop-all.sh $TEST_ROOT
rm -rf $TEST_ROOT
mkdir -p $TEST_ROOT && chmod 755 /tmp/pg_outbox $TEST_ROOT
status=0

LOG=/tmp/pg_outbox/test-output.log
: >"$LOG"

printf '\n== producer parameter tests (params/, no Postgres)\n'
cargo test -p pg_outbox_params 2>&1 | tee -a "$LOG" || status=1

for v in $E2E_VERSIONS; do
    printf '\n== end-to-end tests (pg_test/) on PostgreSQL %s\n' "$v"
    [ "$v" = 15 ] || PG_VERSION="$v" bash scripts/setup.sh
    PG_OUTBOX_TEST_ROOT="$TEST_ROOT/pg$v" PG_OUTBOX_PG_BIN="$(pg_bin_of "$v")" \
        cargo test -p pg_outbox_test --no-fail-fast -- --test-threads=4 --nocapture 2>&1 |
        tee -a "$LOG" | tee /tmp/pg_outbox/test-output-pg$v.log || status=1
    bash scripts/stop-all.sh "$TEST_ROOT/pg$v"
done

printf '\n== benchmark, short mode (proves it runs; asserts nothing about speed)\n'
PG_OUTBOX_TEST_ROOT="$TEST_ROOT/bench" \
    cargo run -q -p pg_outbox_test --bin outbox-bench -- --seconds 1 --rounds 1 --drain 5000 --latency-seconds 2 --steady-seconds 4 --cost 2000 ||
    status=1

PGRX_DATA=/tmp/pg_outbox/pgrx
rm -rf "$PGRX_DATA" && mkdir -p "$PGRX_DATA" && chown postgres "$PGRX_DATA"
for v in $API_VERSIONS; do
    printf '\n== API tests inside PostgreSQL %s (cargo pgrx test)\n' "$v"
    cargo pgrx test "pg$v" --runas postgres --pgdata "$PGRX_DATA/pg$v" 2>&1 | tee -a "$LOG" || status=1
done
# cargo pgrx test installed builds with test functions: put the plain ones back
# where the end-to-end tests and the demo run.
for v in $E2E_VERSIONS; do
    cargo pgrx install --pg-config "$(pg_config_of "$v")" >/dev/null
done

# The guarantee figures (docs/guarantees.md), then one closing line for all runs.
for v in $E2E_VERSIONS; do
    grep -h '^guarantees:' "/tmp/pg_outbox/test-output-pg$v.log" | sed "s/^/PostgreSQL $v: /" || true
done
awk '/^test result:/ { p += $4; f += $6 } END { printf "\npg_outbox tests: %d passed, %d failed\n", p, f }' "$LOG"
exit "$status"
