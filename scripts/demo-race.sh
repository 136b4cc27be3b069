#!/usr/bin/env bash
# evcharge race demo: N vehicles (homes at A, B and C) book the same trip at the same moment.
# Prints who got what, then proves from every operator's books that no slot was given twice.
# Usage: scripts/demo-race.sh [--vehicles N] [--from CITY] [--to CITY] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
N=12
FROM="Natal"
TO="Feira de Santana"
while [ $# -gt 0 ]; do
  case "$1" in
    --vehicles) N="$2"; shift 2 ;;
    --from) FROM="$2"; shift 2 ;;
    --to) TO="$2"; shift 2 ;;
    --quick) N=6; shift ;;
    -h | --help) sed -n '2,4p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
[ "$N" -ge 1 ] && [ "$N" -le 30 ] || { echo "--vehicles must be 1..30 (the world has 30)" >&2; exit 2; }
source scripts/_venv.sh
source scripts/_cluster.sh

say "Three operators, their charge points, and $N vehicles at the start line"
for op in A B C; do start_operator "$op"; done
start_stations A B C
wait_linked

say "All $N book $FROM -> $TO, departing at the same moment"
RACERS=()
for i in $(seq 1 "$N"); do
  v="$(printf 'V%02d' "$i")"
  evcharge vehicle --id "$v" --json book --from "$FROM" --to "$TO" --soc 80 >"$WORK/race-$v.json" 2>&1 &
  RACERS+=($!)
done
for pid in "${RACERS[@]}"; do wait "$pid" || true; done

python - "$WORK" "$N" <<'PY'
import json, sys
from pathlib import Path
work, n = Path(sys.argv[1]), int(sys.argv[2])
got = replanned = 0
for i in range(1, n + 1):
    v = f"V{i:02d}"
    answer = json.loads((work / f"race-{v}.json").read_text())
    if "error" in answer:
        print(f"  {v}: no trip: {answer['error']['message']}")
        continue
    got += 1
    trip = answer["trip"]
    again = answer["attempts"] - 1
    replanned += again > 0
    note = f" (re-planned {again}x)" if again else ""
    stops = " -> ".join(f"{s['charge_point_id']}@{s['slot_start'][11:16]}" for s in trip["stops"])
    print(f"  {v} via {trip['home_operator_id']}: {trip['id']}{note}: {stops}")
print(f"\n  {got} of {n} vehicles got a trip; {replanned} of them after being re-planned around lost slots")
PY

say "Checking every operator's books: no charge point has overlapping reservations, every trip is whole"
evcharge check
