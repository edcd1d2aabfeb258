# shellcheck shell=bash
# Shared helpers for scripts/up, scripts/down and scripts/test. Sourced, not run; the
# caller has already cd-ed to the repository root and set `set -euo pipefail`.

# Tools live in sbin (nginx, pg_ctlcluster helpers) and ~/.cargo/bin for a rustup install.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if [[ -d "${HOME:-/nonexistent}/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/assetd-target}"

# Paths relative to the repository root, used by the scripts that source this file.
# shellcheck disable=SC2034
ENV_FILE=.env.local RUN_DIR=var/run LOG_DIR=var/log NGINX_DIR=var/nginx

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
heading() {
    if [[ -t 1 ]]; then
        printf '\n\033[1m######## %s\033[0m\n' "$*"
    else
        printf '\n######## %s\n' "$*"
    fi
}
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [[ "$(id -u)" == 0 ]]; }

# Is the Debian package that provides what we need already there? Checked by the
# commands we use rather than dpkg, so a tool installed some other way counts too.
package_present() {
    case "$1" in
        nginx) have nginx ;;
        postgresql) have pg_ctlcluster && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null ;;
        postgresql-client) have psql && have pg_isready && have createdb ;;
        rabbitmq-server) have rabbitmq-server && have rabbitmq-diagnostics ;;
        curl) have curl ;;
        chromium) have chromium || have chromium-browser ;;
        build-essential) have cc ;;
        python3) have python3 ;;
        python3-venv) have python3 && python3 -c 'import ensurepip, venv' 2>/dev/null ;;
        wrk) have wrk ;;
        redis-server) have redis-server ;;
        redis-tools) have redis-cli ;;
        *) dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' ;;
    esac
}

# require_packages PKG...: installs the missing ones with apt when root (one
# `apt-get update`, only if something is missing); otherwise says what to install.
require_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        package_present "$pkg" || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    if ! is_root; then
        die "missing packages: ${missing[*]}
    install them with: sudo apt-get install -y ${missing[*]}   (or run this script as root)"
    fi
    say "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    for pkg in "${missing[@]}"; do
        package_present "$pkg" || die "package $pkg installed but its commands are still missing"
    done
}

require_cargo() {
    have cargo || die "cargo not found: install Rust (https://rustup.rs) and make sure cargo is on PATH"
}

# wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND every half second.
wait_for() {
    local seconds=$1 what=$2 tries
    shift 2
    for ((tries = seconds * 2; tries > 0; tries--)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    warn "$what did not answer within ${seconds}s"
    return 1
}

# The local cluster assetd and the tests use (Debian's first cluster).
PG_CLUSTER=${PG_CLUSTER:-main} PG_PORT=${PG_PORT:-5432}

pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

# The newest PostgreSQL version that has our cluster (empty when there is none).
pg_cluster_version() {
    find /etc/postgresql -mindepth 2 -maxdepth 2 -name "$PG_CLUSTER" -printf '%h\n' 2>/dev/null | xargs -r -n1 basename | sort -V | tail -n1
}

ensure_postgres() {
    if pg_up; then return 0; fi
    is_root || die "PostgreSQL is not answering on 127.0.0.1:$PG_PORT; start it (e.g. sudo pg_ctlcluster <version> $PG_CLUSTER start)"
    local version
    version=$(pg_cluster_version)
    if [[ -z "$version" ]]; then
        version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
        say "creating PostgreSQL $version cluster '$PG_CLUSTER'"
        pg_createcluster -p "$PG_PORT" "$version" "$PG_CLUSTER"
    fi
    say "starting PostgreSQL $version/$PG_CLUSTER"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" start
    wait_for 30 PostgreSQL pg_up || die "PostgreSQL did not start; see /var/log/postgresql/"
}

pg_trusts_postgres() { psql -w -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }

# Local development and the tests connect as `postgres` over 127.0.0.1 without a
# password. A fresh Debian cluster asks for one, so (as root) allow it for that role
# on loopback only, at the top of pg_hba.conf, and reload.
ensure_postgres_access() {
    if pg_trusts_postgres; then return 0; fi
    is_root || die "cannot connect as postgres@127.0.0.1 without a password; add 'host all postgres 127.0.0.1/32 trust' to pg_hba.conf"
    local version hba
    version=$(pg_cluster_version)
    hba=/etc/postgresql/$version/$PG_CLUSTER/pg_hba.conf
    [[ -f "$hba" ]] || die "cannot connect as postgres@127.0.0.1 and $hba does not exist"
    say "allowing passwordless loopback connections as postgres in $hba"
    local tmp
    tmp=$(mktemp)
    {
        echo '# added by assetd scripts/up: local development and tests connect without a password'
        echo 'host all postgres 127.0.0.1/32 trust'
        echo 'host all postgres ::1/128 trust'
        cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba"
    rm -f "$tmp"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" reload
    wait_for 10 "PostgreSQL (as postgres)" pg_trusts_postgres || die "still cannot connect as postgres@127.0.0.1"
}

rabbit_up() {
    if is_root; then
        timeout 20 rabbitmq-diagnostics -q ping
    else
        # rabbitmq-diagnostics only works for root or rabbitmq: check the AMQP port.
        timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672'
    fi
}

ensure_rabbitmq() {
    if rabbit_up >/dev/null 2>&1; then return 0; fi
    is_root || die "RabbitMQ is not answering on 127.0.0.1:5672; start it (sudo rabbitmq-server -detached)"
    say "starting RabbitMQ"
    rabbitmq-server -detached
    wait_for 60 RabbitMQ rabbit_up || die "RabbitMQ did not start; see /var/log/rabbitmq/"
}

random_hex() {
    if have openssl; then
        openssl rand -hex 32
    else
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'
        echo
    fi
}

# Creates .env.local with fresh secrets when absent; when present, keeps every value
# and only appends settings it lacks (secrets are never regenerated).
ensure_env_file() {
    local created=0
    if [[ ! -f "$ENV_FILE" ]]; then
        say "creating $ENV_FILE with new secrets"
        (
            umask 077
            echo "# assetd local settings, written by scripts/up (git-ignored). Edit freely." >"$ENV_FILE"
        )
        created=1
    fi
    env_default ASSETD_JWT_SECRET "$(random_hex)"
    env_default ASSETD_URL_SIGNING_KEY "$(random_hex)"
    env_default ASSETD_DATABASE_URL "postgres://postgres@127.0.0.1:5432/assetd"
    env_default ASSETD_AMQP_URL "amqp://guest:guest@127.0.0.1:5672/%2f"
    env_default ASSETD_LISTEN "127.0.0.1:4042"
    # One local instance per machine: every checkout shares the database `assetd`, so
    # they share one data directory too (a per-checkout one would hold other bytes).
    if is_root; then
        env_default ASSETD_DATA_DIR "/var/lib/assetd"
    else
        env_default ASSETD_DATA_DIR "${XDG_DATA_HOME:-$HOME/.local/share}/assetd"
    fi
    env_default ASSETD_ACCEL_REDIRECT_PREFIX "/_assetd_blobs/"
    env_default ASSETD_NGINX_LISTEN "127.0.0.1:8080"
    ((created)) || say "using existing $ENV_FILE"
}

env_default() {
    grep -q "^$1=" "$ENV_FILE" || printf '%s=%s\n' "$1" "$2" >>"$ENV_FILE"
}

load_env_file() {
    set -a
    # shellcheck disable=SC1090
    . "./$ENV_FILE"
    set +a
}

# Creates the database named by ASSETD_DATABASE_URL (postgres://…/<name>) if missing.
ensure_database() {
    local url=${ASSETD_DATABASE_URL%%\?*}
    local server=${url%/*} db=${url##*/}
    if [[ ! "$db" =~ ^[A-Za-z_][A-Za-z0-9_]*$ || "$server" != postgres*://* ]]; then
        warn "cannot tell the database name from ASSETD_DATABASE_URL; not creating it"
        return 0
    fi
    if [[ -z "$(psql -w "$server/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname='$db'")" ]]; then
        say "creating database $db"
        psql -w "$server/postgres" -qc "CREATE DATABASE \"$db\""
    fi
}

# pid_alive PIDFILE NAME: the pid in PIDFILE is running and is NAME (not a reused pid).
pid_alive() {
    local pid
    [[ -f "$1" ]] || return 1
    pid=$(<"$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -qa "$2" "/proc/$pid/cmdline" 2>/dev/null
}

stop_assetd() {
    local pidfile=$RUN_DIR/assetd.pid pid tries
    if pid_alive "$pidfile" assetd; then
        pid=$(<"$pidfile")
        say "stopping assetd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        # In-flight transfers get ASSETD_SHUTDOWN_GRACE seconds (30 by default).
        for ((tries = (${ASSETD_SHUTDOWN_GRACE:-30} + 5) * 5; tries > 0; tries--)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "assetd did not stop in time; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop_nginx() {
    local pidfile=$NGINX_DIR/nginx.pid pid tries
    if pid_alive "$pidfile" nginx; then
        pid=$(<"$pidfile")
        say "stopping nginx (pid $pid)"
        if [[ -f "$NGINX_DIR/nginx.conf" ]]; then
            nginx -p "$PWD/$NGINX_DIR/" -c "$PWD/$NGINX_DIR/nginx.conf" -e "$PWD/$NGINX_DIR/logs/error.log" -s quit 2>/dev/null \
                || kill -QUIT "$pid" 2>/dev/null || true
        else
            kill -QUIT "$pid" 2>/dev/null || true
        fi
        for ((tries = 100; tries > 0; tries--)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "nginx did not stop in time; terminating it"
            kill -TERM "$pid" 2>/dev/null || true
            sleep 1
        fi
    fi
    rm -f "$pidfile"
}

# sed replacement text: escape \, & and the | delimiter.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

# on_exit COMMAND: runs COMMAND when the script exits, before the EXIT trap already set
# (which may end in `exit "$status"`), so one trap never clobbers another. The trap runs
# without errexit, and whatever COMMAND returns, the old trap still sees the script's $?.
on_exit() {
    local command=$1 current
    current=$(trap -p EXIT) # `trap -- 'COMMANDS' EXIT`, or nothing
    if [[ -n "$current" ]]; then
        eval "set -- $current"
        current=$3
    fi
    # shellcheck disable=SC2016 # $? and $_exit_status expand when the trap runs
    trap -- '_exit_status=$?; set +e; '"$command"'; (exit "$_exit_status"); '"$current" EXIT
}

# --- moto: a local S3 for the tests of the S3 blob backend ----------------------------
MOTO_REQUIREMENTS=scripts/moto-requirements.txt
MOTO_VENV='' MOTO_PID=''

# Installs moto's server from PyPI, pinned (scripts/moto-requirements.txt, the whole
# dependency tree, installed with --no-deps so every machine runs the same server), into a
# venv kept between runs and clones, as scripts/schemathesis does; sets MOTO_VENV.
ensure_moto() {
    require_packages python3 python3-venv
    local requirements_hash
    requirements_hash=$(sha256sum "$MOTO_REQUIREMENTS" | cut -c1-16)
    MOTO_VENV=${ASSETD_MOTO_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/assetd/moto-$requirements_hash}
    mkdir -p "$(dirname "$MOTO_VENV")"
    (
        # Two runs at once (two clones) must not build the same venv together.
        flock 9
        if [[ ! -f "$MOTO_VENV/.installed" ]]; then
            say "installing moto into $MOTO_VENV"
            rm -rf "$MOTO_VENV"
            python3 -m venv "$MOTO_VENV"
            "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-virtualenv -r "$MOTO_REQUIREMENTS"
            "$MOTO_VENV/bin/pip" check >/dev/null
            touch "$MOTO_VENV/.installed"
        fi
    ) 9>"$MOTO_VENV.lock"
}

# Starts moto's server (after ensure_moto) on a free loopback port for as long as the
# script runs, and exports ASSETD_TEST_S3_ENDPOINT for the tests. It keeps every bucket in
# its own process (objects over ~5 MiB spill to temporary files), so each run starts empty
# and its buckets go with it. Log: $LOG_DIR/moto.log.
start_moto() {
    [[ -x "$MOTO_VENV/bin/moto_server" ]] || die "moto is not installed: call ensure_moto first"
    local port log=$LOG_DIR/moto.log tries
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$LOG_DIR"
    "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" </dev/null >"$log" 2>&1 &
    MOTO_PID=$!
    on_exit stop_moto
    # Not wait_for: a moto that exited (its port taken meanwhile) fails at once.
    for ((tries = 60; tries > 0; tries--)); do
        curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null && break
        if ! kill -0 "$MOTO_PID" 2>/dev/null || ((tries == 1)); then
            tail -n 30 "$log" >&2
            die "moto did not start on 127.0.0.1:$port (log: $log)"
        fi
        sleep 0.5
    done
    export ASSETD_TEST_S3_ENDPOINT=http://127.0.0.1:$port
    say "moto (S3) on $ASSETD_TEST_S3_ENDPOINT (pid $MOTO_PID)"
}

stop_moto() {
    local tries
    [[ -n "$MOTO_PID" ]] || return 0
    kill -TERM "$MOTO_PID" 2>/dev/null || true
    for ((tries = 50; tries > 0; tries--)); do
        kill -0 "$MOTO_PID" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
    MOTO_PID=
    return 0
}
