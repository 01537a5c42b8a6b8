#!/usr/bin/env bash
# Stop every Postgres cluster and tansu broker that the tests or the demo
# started under the given directories (default: /tmp/pg_outbox/test /tmp/pg_outbox/demo).
roots=("$@")
[ ${#roots[@]} -gt 0 ] || roots=(/tmp/pg_outbox/test /tmp/pg_outbox/demo)
for root in "${roots[@]}"; do
    [ -d "$root" ] || continue
    for pidfile in "$root"/*/data/postmaster.pid "$root"/data/postmaster.pid; do
        [ -f "$pidfile" ] || continue
        sudo -n -u postgres /usr/lib/postgresql/15/bin/pg_ctl -D "$(dirname "$pidfile")" -m immediate stop >/dev/null 2>&1 || true
    done
    for pidfile in "$root"/tansu-*.pid "$root"/tls-proxy-*.pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
done
