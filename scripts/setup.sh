#!/usr/bin/env bash
# Install what a fresh machine lacks (skip what is there), then build and
# install the extension into Debian's PostgreSQL 15. Idempotent; used by
# scripts/demo.sh, scripts/test.sh and .ci/run.
#
#   PROFILE=release bash scripts/setup.sh   # optimised build (default: debug)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

step() { printf '\n== %s\n' "$*"; }

# 1. Debian packages: PostgreSQL 15 server and headers, libclang (bindgen),
#    build tools, OpenSSL headers (librdkafka), sudo (Postgres refuses root);
#    the openssl command and python3 for the TLS tests (certificates, and a TLS
#    terminator in front of tansu, which has no TLS listener).
missing=()
for p in postgresql-15 postgresql-server-dev-15 libclang-dev clang build-essential libssl-dev pkg-config sudo openssl python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
else
    step "Debian packages: present"
fi

# 2. cargo-pgrx, exactly the version of the pgrx crate.
if cargo pgrx --version 2>/dev/null | grep -q '^cargo-pgrx 0\.18\.1$'; then
    step "cargo-pgrx 0.18.1: present"
else
    step "installing cargo-pgrx 0.18.1 (about 8 minutes)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

# 3. pgrx against Debian's PostgreSQL 15.
if grep -qs "pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml"; then
    step "pgrx init: present"
else
    step "cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# 4. The tansu broker (Kafka-compatible, written in Rust).
if "$HOME/.cargo/bin/tansu" --version 2>/dev/null | grep -q '^tansu 0\.6\.0$'; then
    step "tansu 0.6.0: present"
else
    step "installing tansu 0.6.0 (about 15 minutes)"
    cargo install tansu --version 0.6.0 --locked --features dynostore
fi

# 5. Build and install pg_outbox into $PG_CONFIG's directories.
step "building and installing pg_outbox (${PROFILE:-debug})"
if [ "${PROFILE:-debug}" = release ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG"
else
    cargo pgrx install --pg-config "$PG_CONFIG"
fi
