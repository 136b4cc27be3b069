#!/usr/bin/env bash
# evcharge demo: sets up .venv, starts three operators (A, B, C) with their charge points,
# walks a vehicle through nearest -> reserve -> conflict -> charge -> release -> history,
# then charges it at another company's charger through its home operator (one bill),
# books a trip Natal -> Feira de Santana atomically across all three, and races two more.
# Everything it starts is stopped on exit or Ctrl-C.  --quick: shorter pauses (for tests).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,5p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
source scripts/_venv.sh

source scripts/_cluster.sh
pause() { if [ "$QUICK" = 1 ]; then sleep "${2:-0.5}"; else sleep "$1"; fi; }

say "Starting three operators at 60x simulated time (1 real second = 1 minute)"
for op in A B C; do start_operator "$op"; done
echo "A Potiguar Energia (Natal...), B Frevo Eletropostos (Recife...), C Baía Carga Rápida (Aracaju...): up"

say "Connecting every operator's simulated charge points"
start_stations A B C
wait_linked
v01() { evcharge vehicle --id V01 "$@"; }
v04() { evcharge vehicle --id V04 "$@"; }
v07() { evcharge vehicle --id V07 "$@"; }
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

say "V01 drives to Feira de Santana: operator C's chargers, found and reserved through its home operator A"
v01 nearest --near "Feira de Santana" --min-kw 100
FRID="$(v01 --json reserve FEC-1-2 --minutes 30 | json_field "['reservation']['id']")"
v01 status FEC-1
pause 2

say "V01 charges at C's FEC-1-2: A forwards, C's charger meters, C's price applies"
v01 charge "$FRID"
pause 3 1.5
v01 release "$FRID"
pause 1

say "One history and one bill, whoever owned the chargers (C's charge record reached A)"
for _ in $(seq 1 50); do
  [ "$(v01 --json history | json_field "['sessions'].__len__()")" -ge 2 ] && break
  sleep 0.2
done
v01 history
v01 costs
evcharge settlement --operator C

say "Now the trip: V01 plans Natal -> Feira de Santana over every operator's chargers"
v01 plan --from Natal --to "Feira de Santana" --soc 80
pause 3

say "V01 books it: every stop at A, B and C is reserved atomically (two-phase commit), or none"
TRIP="$(v01 --json book --from Natal --to "Feira de Santana" --soc 80 | json_field "['trip']['id']")"
v01 trips
pause 3

say "Each operator sees exactly its own stops of trip $TRIP"
for op in A B C; do
  evcharge inspect --operator "$op" --json | python -c "
import json, sys
state = json.load(sys.stdin)
stops = [r for r in state['reservations'] if r.get('trip_id') == '$TRIP']
print(f\"  operator $op: \" + ', '.join(f\"{r['charge_point_id']} {r['start'][11:16]}-{r['end'][11:16]} {r['state']}\" for r in stops))"
done
pause 3

say "V04 and V07 race for the same route at the same moment: no slot is given twice"
v04 --json book --from Natal --to "Feira de Santana" --soc 80 >"$WORK/v04.json" 2>&1 &
RACE1=$!
v07 --json book --from Natal --to "Feira de Santana" --soc 80 >"$WORK/v07.json" 2>&1 &
RACE2=$!
wait "$RACE1" "$RACE2" || true
for v in v04 v07; do
  python - "$WORK/$v.json" "${v^^}" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
if "error" in answer:
    print(f"  {sys.argv[2]}: no trip ({answer['error']['message']})")
else:
    trip = answer["trip"]
    replanned = f", re-planned {answer['attempts'] - 1}x after losing slots" if answer["attempts"] > 1 else ""
    stops = " -> ".join(f"{s['city']} {s['charge_point_id']} {s['slot_start'][11:16]}" for s in trip["stops"])
    print(f"  {sys.argv[2]}: trip {trip['id']}{replanned}: {stops}")
PY
done
pause 3

say "V01 cancels its trip: every stop is released at every operator"
v01 cancel-trip "$TRIP"

say "What operator A logged about state changes"
grep -E " by (vehicle|operator|station|peer) " "$WORK/A.log" | sed -e 's/^[^ ]* [^ ]* //' | tail -n 10

say "Done. Everything started by this demo is being stopped."
