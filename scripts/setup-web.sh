#!/usr/bin/env bash
# The browser runtime's pieces, for `qlora-rt web` and its tests: the npm packages that qlora_rt/web's lockfile
# pins (onnxruntime-web, tokenizers.js, jinja; puppeteer-core drives the tests), and Debian's Chromium, the
# headless browser the tests run the page in. Needs Node.js >= 18 with npm.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1; then
  echo "setup-web: npm not found: install Node.js 18 or newer (with npm) for the browser runtime" >&2
  exit 1
fi
# --ignore-scripts: none of these needs an install script, and none may fetch a browser or binaries
npm ci --prefix qlora_rt/web --ignore-scripts --no-audit --no-fund --loglevel=error
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "setup-web: no Chromium at $CHROMIUM: install Debian's chromium package (or set CHROMIUM to a" \
         "Chromium or Chrome binary) for the browser tests" >&2
    exit 1
  fi
fi
touch qlora_rt/web/node_modules/.installed
