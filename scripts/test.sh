#!/usr/bin/env bash
# Install (scripts/install.sh), make sure a headless Chromium is there for the report
# tests, and run the whole test suite. This is the command README and .ci/run give.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "Chromium could not be installed: the browser tests will be skipped."
fi
exec .venv/bin/python -m pytest "$@"
