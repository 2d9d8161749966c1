#!/usr/bin/env bash
# Runs every test on a fresh Debian machine: installs and starts what the
# tests need (PostgreSQL, Chromium, TigerVNC's Xvnc, nginx, websockify,
# promtool, curl, bubblewrap, debootstrap, the web UI's npm packages), then runs the repository rules (fmt, clippy),
# the browser tests, the Rust suite (unit, store on SQLite and PostgreSQL,
# sandboxes on the real kernel, the binary end to end), a short load test,
# and builds and boots the real golden images (base, runtime, browser).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust

# --- what the tests need -----------------------------------------------------
need_node
need_packages psql postgresql /usr/bin/chromium chromium promtool prometheus curl curl \
  bwrap bubblewrap debootstrap debootstrap /usr/sbin/sshd openssh-server ssh-keygen openssh-client \
  Xtigervnc tigervnc-standalone-server /usr/sbin/nginx nginx websockify websockify \
  openssl openssl
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

# Python clients from PyPI, pinned, in a virtualenv of their own (Debian's
# python3 takes no pip installs): `mcp`, the MCP client a Python agent
# would use; openapi-spec-validator and openapi-python-client, which check
# the OpenAPI document and generate a client from it; hypothesis-jsonschema,
# the schema-driven fuzzer (with a hypothesis release its 0.23 works with).
need_packages python3 python3
python3 -c 'import ensurepip, venv' 2>/dev/null || install_packages python3-venv
[ -x target/py/bin/pip ] || python3 -m venv --clear target/py
py_pins=("mcp==2.3.0" "openapi-spec-validator==0.9.0" "openapi-python-client==0.29.1"
  "hypothesis==6.100.0" "hypothesis-jsonschema==0.23.1")
target/py/bin/python - "${py_pins[@]}" <<'PY' 2>/dev/null \
  || target/py/bin/python -m pip install --quiet --disable-pip-version-check "${py_pins[@]}"
import importlib.metadata as m, sys
sys.exit(any(m.version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
export POLYDEV_TEST_PYTHON="$PWD/target/py/bin/python"

# The AI CLIs at the pinned versions (crates/polydev-sessions/cli-packages.txt),
# for the end-to-end test that runs them in a sandbox against local stubs.
# POLYDEV_CLI_VERSION=latest tries the newest releases instead (on the host
# only: the images keep the pins); scripts/cli-drift.sh is the drift check.
pin='s/@[^@]*$/&/'
[ "${POLYDEV_CLI_VERSION:-}" = latest ] && pin='s/@[^@]*$/@latest/'
mapfile -t clis < <(grep -v '^#' crates/polydev-sessions/cli-packages.txt | sed "/^$/d; $pin")
echo "==> AI CLIs: ${clis[*]}"
as_root npm install -g --prefix /usr/local --no-audit --no-fund --loglevel=error "${clis[@]}"
unpack_copilot

# --- repository rules --------------------------------------------------------
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

# --- tests -------------------------------------------------------------------
echo "==> browser tests (headless Chromium)"
cargo build --locked -p polydev -p polydev-agent
node --test --test-concurrency=1 web/tests/

profile=default
[ -n "${CI:-}" ] && profile=ci
# The real images, built the way a new user's first start builds them: a
# test starts `polydev serve` on an empty images directory, watches it
# prepare `runtime` and `browser` (debootstrap, apt, npm; each build booted
# and checked), then runs the three CLIs and a login on them. The rest of
# the suite finds the images there. The debootstrap base is kept between
# local runs; everything else is made anew.
export POLYDEV_TEST_IMAGES="$PWD/target/test-images"
mkdir -p "$POLYDEV_TEST_IMAGES"
find "$POLYDEV_TEST_IMAGES" -mindepth 1 -maxdepth 1 ! -name .cache -exec rm -rf {} +
echo "==> first start: polydev prepares the real images, then runs and logs in on them"
cargo nextest run --locked --workspace --profile "$profile" -E 'test(first_start_prepares)'

echo "==> Rust tests"
cargo nextest run --locked --workspace --profile "$profile" -E 'not test(first_start_prepares)'

# A short load test (the full one: `polydev-bench load --duration-secs 300`): API
# clients, runs in flight on the real CLIs, login sessions; it fails on a
# 5xx, an overload answer without Retry-After, a timeout or a leak.
echo "==> load test (30 s)"
cargo build --locked -p polydev-bench
target/debug/polydev-bench load --duration-secs 30 --load-clients 50 --load-runs 8 --load-logins 3

echo "==> the base template (from the cached debootstrap base)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
target/debug/polydev image build base --images-dir "$POLYDEV_TEST_IMAGES" --data-dir "$scratch"
