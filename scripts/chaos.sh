#!/usr/bin/env bash
# evcharge chaos run: three operators on loopback behind fault-injecting proxies, kill -9 and
# restarts, a disk that refuses writes, a stream of bookings and cancels; then every invariant is
# checked against what the servers acknowledged. Prints operations, faults and violations (exit 1
# if any). Arguments go to `python -m tools.chaos` (--quick, --seed N, --duration S, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec python -m tools.chaos "$@"
