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
echo "==> pytest"
exec python -m pytest "$@"
