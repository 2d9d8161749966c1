#!/usr/bin/env bash
# Runs every test on a fresh Debian machine: installs and starts what the
# tests need (PostgreSQL, Chromium, TigerVNC's Xvnc, nginx, websockify,
# promtool, curl, bubblewrap, debootstrap, the web UI's npm packages), then runs the repository rules (fmt, clippy),
# the browser tests, the Rust suite (unit, store on SQLite and PostgreSQL,
# sandboxes on the real kernel, the binary end to end), and builds and boots
# the real golden images (base, runtime, browser).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust

# --- what the tests need -----------------------------------------------------
need_packages psql postgresql /usr/bin/chromium chromium node nodejs npm npm promtool prometheus curl curl \
  bwrap bubblewrap debootstrap debootstrap /usr/sbin/sshd openssh-server ssh-keygen openssh-client \
  Xtigervnc tigervnc-standalone-server /usr/sbin/nginx nginx websockify websockify
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

# PostgreSQL: start the Debian cluster when nothing answers, and make a
# role that may create the per-test databases.
PG_PORT=${POLYDEV_TEST_PG_PORT:-5432}
if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
    as_root pg_createcluster "$version" main -p "$PG_PORT" >/dev/null
  fi
  echo "==> starting PostgreSQL $version"
  as_root pg_ctlcluster "$version" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.2; done
  pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || { echo "error: PostgreSQL did not start" >&2; exit 1; }
fi
as_root su postgres -c "psql -q -p $PG_PORT -v ON_ERROR_STOP=1" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'polydev_test') THEN
    CREATE ROLE polydev_test LOGIN CREATEDB PASSWORD 'polydev_test';
  END IF;
END $$;
SQL
# Databases left by an interrupted earlier run.
for db in $(as_root su postgres -c "psql -p $PG_PORT -Atc \"SELECT datname FROM pg_database WHERE datname LIKE 'polydev\_test\_%'\""); do
  as_root su postgres -c "psql -p $PG_PORT -qc 'DROP DATABASE IF EXISTS $db WITH (FORCE)'"
done
export POLYDEV_TEST_PG_URL="postgres://polydev_test:polydev_test@127.0.0.1:$PG_PORT/postgres"

./scripts/build-web.sh

# The three AI CLIs at the pinned versions (crates/polydev/cli-packages.txt),
# for the end-to-end test that runs them in a sandbox against local stubs.
# POLYDEV_CLI_VERSION=latest tries the newest releases instead.
pin='s/@[^@]*$/&/'
[ "${POLYDEV_CLI_VERSION:-}" = latest ] && pin='s/@[^@]*$/@latest/'
mapfile -t clis < <(grep -v '^#' crates/polydev/cli-packages.txt | sed "/^$/d; $pin")
echo "==> AI CLIs: ${clis[*]}"
as_root npm install -g --prefix /usr/local --no-audit --no-fund --loglevel=error "${clis[@]}"

# --- repository rules --------------------------------------------------------
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

# --- tests -------------------------------------------------------------------
echo "==> browser tests (headless Chromium)"
cargo build --locked -p polydev -p polydev-agent
node --test --test-concurrency=1 web/tests/

echo "==> Rust tests"
profile=default
[ -n "${CI:-}" ] && profile=ci
cargo nextest run --locked --workspace --profile "$profile"

echo "==> golden images: build, boot and check the real templates"
images=$(mktemp -d)
trap 'rm -rf "$images"' EXIT
cargo build --locked -p polydev -p polydev-agent
# One debootstrap base, cached in the image store, serves all three.
for template in base runtime browser; do
  target/debug/polydev image build "$template" --data-dir "$images"
done
