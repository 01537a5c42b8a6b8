#!/usr/bin/env bash
# The test command: set up (idempotent), then run
#   1. the producer parameter tests (params/): plain Rust, no Postgres;
#   2. the end-to-end tests (pg_test/): real Postgres 15 with pg_outbox
#      preloaded, real tansu brokers over TCP;
#   3. the #[pg_test] API tests inside Postgres (cargo pgrx test).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh

# Clusters and brokers live under /tmp: the postgres user must reach them.
export PG_OUTBOX_TEST_ROOT=/tmp/pg_outbox/test
trap 'bash scripts/stop-all.sh "$PG_OUTBOX_TEST_ROOT"' EXIT
bash scripts/stop-all.sh "$PG_OUTBOX_TEST_ROOT"
rm -rf "$PG_OUTBOX_TEST_ROOT"
mkdir -p /tmp/pg_outbox && chmod 755 /tmp/pg_outbox

LOG=/tmp/pg_outbox/test-output.log
: >"$LOG"

printf '\n== producer parameter tests (params/, no Postgres)\n'
cargo test -p pg_outbox_params 2>&1 | tee -a "$LOG"

printf '\n== end-to-end tests (pg_test/)\n'
cargo test -p pg_outbox_test -- --test-threads=4 --nocapture 2>&1 | tee -a "$LOG"

printf '\n== benchmark, short mode (proves it runs; asserts nothing about speed)\n'
cargo run -q -p pg_outbox_test --bin outbox-bench -- --seconds 1 --rounds 1 --drain 5000 --latency-seconds 2 --steady-seconds 4

printf '\n== API tests inside Postgres (cargo pgrx test)\n'
PGRX_DATA=/tmp/pg_outbox/pgrx
rm -rf "$PGRX_DATA" && mkdir -p "$PGRX_DATA" && chown postgres "$PGRX_DATA"
cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DATA/pg15" 2>&1 | tee -a "$LOG"
# cargo pgrx test installed a build with test functions: put the plain one back.
cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null

# The guarantee figures (docs/guarantees.md), then one closing line for all runs.
grep -h '^guarantees:' "$LOG" || true
awk '/^test result:/ { p += $4; f += $6 } END { printf "\npg_outbox tests: %d passed, %d failed\n", p, f }' "$LOG"
