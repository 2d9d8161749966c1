#!/usr/bin/env bash
# Drift: the CLI tests on the vendors' latest releases instead of the pins
# (crates/polydev-sessions/cli-packages.txt), so a release that breaks a
# run or a sign-in is seen before the pins move. Runs after scripts/test.sh
# (it reuses its build, database and virtualenv); puts the pinned CLIs back
# when it ends, passing or not. Exit status: the tests'.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

pins=()
mapfile -t pins < <(grep -v '^#' crates/polydev-sessions/cli-packages.txt | sed '/^$/d')
latest=()
for p in "${pins[@]}"; do latest+=("${p%@*}@latest"); done
restore() {
  as_root npm install -g --prefix /usr/local --no-audit --no-fund --loglevel=error "${pins[@]}" >/dev/null
  unpack_copilot
}
trap restore EXIT
echo "==> CLI drift: installing ${latest[*]}"
as_root npm install -g --prefix /usr/local --no-audit --no-fund --loglevel=error "${latest[@]}"
unpack_copilot
for p in "${pins[@]}"; do
  name=${p%@*}
  echo "    $name: pinned ${p##*@}, latest $(npm ls -g --prefix /usr/local --depth=0 --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['dependencies']['$name']['version'])")"
done
export POLYDEV_TEST_PG_URL="${POLYDEV_TEST_PG_URL:-postgres://polydev_test:polydev_test@127.0.0.1:${POLYDEV_TEST_PG_PORT:-5432}/postgres}"
export POLYDEV_TEST_IMAGES="$PWD/target/test-images" POLYDEV_TEST_PYTHON="$PWD/target/py/bin/python"
# The tests that run the CLIs themselves on the host-borrowing template:
# each answers its stub through the proxy; a run across all five as users
# start one; each real login opens its sign-in page on an allowed host.
cargo nextest run --locked -p polydev --test it \
  -E 'test(each_cli_answers_from_its_stub_through_the_proxy_only) | test(a_run_streams_every_provider_and_one_failure_stays_its_own) | test(each_real_cli_login_opens_its_sign_in_page_in_the_remote_browser)'
