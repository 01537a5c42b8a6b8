#!/usr/bin/env bash
# Stop every Postgres cluster and tansu broker that the tests or the demo
# started under the given directories (default: /tmp/pg_outbox/test /tmp/pg_outbox/demo).
. "$(dirname "$0")/pg-versions.sh"
roots=("$@")
[ ${#roots[@]} -gt 0 ] || roots=(/tmp/pg_outbox/test /tmp/pg_outbox/demo)
for root in "${roots[@]}"; do
    [ -d "$root" ] || continue
    for pidfile in "$root"/*/*/data/postmaster.pid "$root"/*/data/postmaster.pid "$root"/data/postmaster.pid; do
        [ -f "$pidfile" ] || continue
        data="$(dirname "$pidfile")"
        bin="$(pg_bin_of "$(cat "$data/PG_VERSION" 2>/dev/null)" 2>/dev/null || pg_bin_of 15)"
        sudo -n -u postgres "$bin/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
    done
    for pidfile in "$root"/tansu-*.pid "$root"/tls-proxy-*.pid "$root"/*/tansu-*.pid "$root"/*/tls-proxy-*.pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
done
