# Sourced by the demo scripts: run the three operators of the shipped world (and their
# simulated charge points) as local processes on free ports, and stop all of them on exit.
# Needs: scripts/_venv.sh sourced first.

WORK="$(mktemp -d -t evcharge-demo.XXXXXX)"
PIDS=()
declare -A SERVER_PID=()
cleanup() {
  for pid in "${PIDS[@]}" "${SERVER_PID[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}" "${SERVER_PID[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1;36m==> %s\033[0m\n' "$*"; }
json_field() { python -c "import json, sys; print(json.load(sys.stdin)$1)"; }

# The shipped world, with each operator on a free port of this machine.
python - "$WORK/world.toml" <<'PY'
import socket, sys
from evcharge.domain.world import resolve_world_path
text = resolve_world_path("northeast").read_text(encoding="utf-8")
for default in (7401, 7402, 7403):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        text = text.replace(f"port = {default}\n", f"port = {s.getsockname()[1]}\n")
open(sys.argv[1], "w", encoding="utf-8").write(text)
PY
export EVCHARGE_WORLD="$WORK/world.toml"
ANCHOR="$(date +%s)" # one simulated clock for all three operators

# start_operator OP [ENV=VALUE ...]: start (or restart) an operator's server; wait until it listens.
start_operator() {
  local op="$1"
  shift
  rm -f "$WORK/$op.ready"
  env "$@" evcharge server --operator "$op" --data-dir "$WORK/data" --time-scale 60 \
    --clock-anchor "$ANCHOR" --ready-file "$WORK/$op.ready" --log-level info 2>>"$WORK/$op.log" &
  SERVER_PID[$op]=$!
  for _ in $(seq 1 200); do
    [ -s "$WORK/$op.ready" ] && return 0
    if ! kill -0 "${SERVER_PID[$op]}" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "operator $op did not start; its log:" >&2
  cat "$WORK/$op.log" >&2
  return 1
}

start_stations() {
  for op in "$@"; do
    evcharge station --operator "$op" 2>>"$WORK/stations-$op.log" &
    PIDS+=($!)
  done
}

# wait_linked: until every operator sees its peers up (and has their catalogs).
wait_linked() {
  for _ in $(seq 1 150); do
    if python - <<'PY'
import asyncio, sys
from evcharge.links.client import connect
from evcharge.domain.world import load_world
async def main() -> bool:
    world = load_world(__import__("os").environ["EVCHARGE_WORLD"])
    for op in world.operators:
        try:
            async with connect(op.host, op.port, role="operator", ident=op.id, secret=op.secret, timeout=2) as c:
                if not all(peer.up for peer in (await c.inspect()).peers):
                    return False
        except Exception:
            return False
    return True
sys.exit(0 if asyncio.run(main()) else 1)
PY
    then return 0; fi
    sleep 0.2
  done
  echo "operators did not link up" >&2
  return 1
}
