# Sourced by the scripts: make sure .venv exists and has evcharge installed
# (with the extras named in EVCHARGE_EXTRAS), reinstalling only when setup.cfg changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
extras="${EVCHARGE_EXTRAS:-}"

pick_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "evcharge needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  py="$(pick_python)"
  echo "==> creating $VENV with $($py --version)"
  "$py" -m venv "$VENV"
fi

spec=""
[ -n "$extras" ] && spec="[$extras]"
stamp="$VENV/.evcharge-installed"
hash="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
installed="$(cat "$stamp" 2>/dev/null || true)"
# Up to date when the package metadata is unchanged and the extras asked for are in.
if [ "${installed%% *}" != "$hash" ] || { [ -n "$extras" ] && [ "${installed#* }" != "$extras" ]; }; then
  echo "==> installing evcharge${extras:+ with [$extras]} into .venv"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT$spec"
  echo "$hash $extras" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
