#!/usr/bin/env bash
# Set up .venv with the test extra and run the whole suite: lint, format, layer contracts, types, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k race -x).
set -euo pipefail
cd "$(dirname "$0")/.."
EVCHARGE_EXTRAS=test source scripts/_venv.sh

echo "==> ruff check"
ruff check .
echo "==> ruff format --check"
ruff format --check .
echo "==> lint-imports (the layer arrows, .importlinter)"
lint-imports
echo "==> mypy (strict for wire, domain, operator, links; pyproject.toml)"
mypy
# The web dashboard is tested in a real headless Chromium (tests/test_web.py), Debian's with its driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> apt-get install chromium chromium-driver (for the browser tests)"
    apt_log="$(mktemp)"
    install='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver'
    if ! timeout 900 sh -c "$install" >"$apt_log" 2>&1; then
      echo "    could not install them ($(tail -n 1 "$apt_log")): the browser tests say why they skip (CI=true fails them)"
    fi
    rm -f "$apt_log"
  else
    echo "==> no chromium/chromedriver, and no root apt-get to install them: the browser tests say why they skip"
  fi
fi
echo "==> pytest"
exec python -m pytest "$@"
