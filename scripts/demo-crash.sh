#!/usr/bin/env bash
# evcharge crash demo: kill -9 a server in the middle of a trip booking, restart it, and show
# that the trip is whole at every operator or absent at all of them.
# Usage: scripts/demo-crash.sh [--kill participant|coordinator] [--quick]
#   participant: operator B dies right after voting YES (it held its stops and said so)
#   coordinator: operator A dies right after storing its COMMIT record, before telling anyone
set -euo pipefail
cd "$(dirname "$0")/.."
WHO=both
while [ $# -gt 0 ]; do
  case "$1" in
    --kill) WHO="$2"; shift 2 ;;
    --quick) shift ;;
    -h | --help) sed -n '2,6p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
case "$WHO" in participant | coordinator | both) ;; *) echo "--kill participant|coordinator" >&2; exit 2 ;; esac
source scripts/_venv.sh
source scripts/_cluster.sh

crash_round() { # crash_round VICTIM CRASH_POINT VEHICLE
  local victim="$1" point="$2" vehicle="$3"
  say "Round: operator $victim will kill -9 itself at '$point'"
  for op in A B C; do
    if [ "$op" = "$victim" ]; then start_operator "$op" EVCHARGE_CRASH_AT="$point"; else start_operator "$op"; fi
  done
  wait_linked
  say "$vehicle books Natal -> Feira de Santana through its home operator A"
  evcharge vehicle --id "$vehicle" book --from Natal --to "Feira de Santana" --soc 80 || true
  { wait "${SERVER_PID[$victim]}"; } 2>/dev/null || true
  echo "operator $victim is gone (killed with SIGKILL mid-booking)"
  say "What the survivors hold right now (held = voted YES, waiting for the decision)"
  for op in A B C; do
    [ "$op" = "$victim" ] && continue
    evcharge inspect --operator "$op" --json | python -c "
import collections, json, sys
states = collections.Counter(r['state'] for r in json.load(sys.stdin)['reservations'])
print('  operator $op:', dict(states) or 'nothing')"
  done
  say "Restarting operator $victim on the same data directory"
  start_operator "$victim"
  wait_linked
  for _ in $(seq 1 100); do evcharge check >/dev/null 2>&1 && break; sleep 0.2; done
  say "After recovery: every stop booked or free, and all stops of the trip agree"
  evcharge check
  for op in A B C; do kill "${SERVER_PID[$op]}" 2>/dev/null || true; { wait "${SERVER_PID[$op]}"; } 2>/dev/null || true; done
  rm -rf "$WORK/data"
}

if [ "$WHO" != coordinator ]; then crash_round B participant-voted V01; fi
if [ "$WHO" != participant ]; then crash_round A coordinator-committed V04; fi
say "Done: no partial trip survived a crash."
