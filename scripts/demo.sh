#!/usr/bin/env bash
# evcharge demo: sets up .venv, starts operator A with its charge points, and walks a
# vehicle through nearest -> reserve -> conflict -> charge -> release -> history.
# Everything it starts is stopped on exit or Ctrl-C.  --quick: shorter pauses (for tests).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,4p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
source scripts/_venv.sh

WORK="$(mktemp -d -t evcharge-demo.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1;36m==> %s\033[0m\n' "$*"; }
pause() { if [ "$QUICK" = 1 ]; then sleep "${2:-0.5}"; else sleep "$1"; fi; }
json_field() { python -c "import json, sys; print(json.load(sys.stdin)$1)"; }

wait_for_file() {
  for _ in $(seq 1 200); do
    [ -s "$1" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1; server log:" >&2
  cat "$WORK"/*.log >&2
  return 1
}

say "Starting operator A (Potiguar Energia) at 60x simulated time: 1 real second = 1 minute"
evcharge server --operator A --data-dir "$WORK/data" --time-scale 60 --port 0 \
  --ready-file "$WORK/A.ready" --log-level info 2>"$WORK/A.log" &
PIDS+=($!)
wait_for_file "$WORK/A.ready"
ADDR="127.0.0.1:$(json_field "['port']" <"$WORK/A.ready")"
echo "listening on $ADDR"

say "Connecting A's simulated charge points"
evcharge station --operator A --server "$ADDR" 2>"$WORK/stations.log" &
PIDS+=($!)
v01() { evcharge vehicle --id V01 --server "$ADDR" "$@"; }
v04() { evcharge vehicle --id V04 --server "$ADDR" "$@"; }
for _ in $(seq 1 100); do
  v01 --json nearest --near Natal --min-kw 100 >/dev/null 2>&1 && break
  sleep 0.2
done

say "V01 is in Natal and asks for the nearest fast charger (at least 100 kW)"
v01 nearest --near Natal --min-kw 100
pause 2

say "V01 reserves NAT-PN-1 for 30 minutes, starting now"
RID="$(v01 --json reserve NAT-PN-1 --minutes 30 | json_field "['reservation']['id']")"
v01 reservations
pause 2

say "V04 wants the same charger at the same time: a clear conflict, with the next free start"
v04 reserve NAT-PN-1 --minutes 30 || true
pause 2

say "Live status of the station: reserved, and when it is free again"
v01 status NAT-PN
pause 2

say "V01 plugs in and charges at 150 kW (watch the kWh grow)"
v01 charge "$RID"
for _ in 1 2 3; do
  pause 1.5 0.4
  v01 --json reservations | python -c "
import json, sys
r = json.load(sys.stdin)['reservations'][0]
print(f\"  {r['state']}: {r['kwh']:.2f} kWh, R\$ {r['cost']:.2f}\")"
done

say "V01 releases the charger"
v01 release "$RID"
pause 1

say "V01's history and costs"
v01 history

say "The operator's view of A (inspect, with the operator's secret)"
evcharge inspect --operator A --server "$ADDR" | sed -n '/Reservations/,$p'

say "What the server logged about state changes"
grep -E " by (vehicle|operator|station) " "$WORK/A.log" | sed -e 's/^[^ ]* [^ ]* //' | tail -n 8

say "Done. Everything started by this demo is being stopped."
