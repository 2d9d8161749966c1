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
# HPKE (RFC 9180) for the vault, bundled into one ES module with esbuild.
npx --no-install esbuild src/hpke-entry.js --bundle --format=esm --minify --log-level=warning --outfile=public/vendor/hpke.js
cp node_modules/@hpke/core/LICENSE public/vendor/hpke.LICENSE
# noVNC's RFB client for the login viewer, bundled the same way.
npx --no-install esbuild src/novnc-entry.js --bundle --format=esm --minify --log-level=warning --outfile=public/vendor/novnc.js
cp node_modules/@novnc/novnc/LICENSE.txt public/vendor/novnc.LICENSE
# Answers as Markdown: marked, DOMPurify and highlight.js, bundled the same
# way; highlight.js's light theme beside it.
npx --no-install esbuild src/markdown-entry.js --bundle --format=esm --minify --log-level=warning --outfile=public/vendor/markdown.js
cp node_modules/highlight.js/styles/github.min.css public/vendor/highlight.css
cp node_modules/marked/LICENSE public/vendor/marked.LICENSE
cp node_modules/dompurify/LICENSE public/vendor/dompurify.LICENSE
cp node_modules/highlight.js/LICENSE public/vendor/highlight.LICENSE
