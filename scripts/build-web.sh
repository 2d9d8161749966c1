#!/usr/bin/env bash
# Installs the web UI's npm packages (pinned in web/package-lock.json) and
# copies the runtime libraries the pages import into web/public/vendor,
# which the binary embeds. Run before `cargo build`.
set -euo pipefail
cd "$(dirname "$0")/../web"
npm ci --no-audit --no-fund --loglevel=error
mkdir -p public/vendor
cp node_modules/uplot/dist/uPlot.esm.js node_modules/uplot/dist/uPlot.min.css public/vendor/
cp node_modules/uplot/LICENSE public/vendor/uPlot.LICENSE
