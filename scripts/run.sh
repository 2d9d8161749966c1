#!/usr/bin/env bash
# Builds polydev and runs the controller: web UI and API at
# http://127.0.0.1:4000, data in ./.polydev (embedded SQLite).
# Extra arguments go to `polydev serve`, e.g. --listen 0.0.0.0:4000.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
need_node
need_packages bwrap bubblewrap debootstrap debootstrap
./scripts/build-web.sh
cargo build --release --locked -p polydev -p polydev-agent
exec target/release/polydev serve "$@"
