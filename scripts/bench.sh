#!/usr/bin/env bash
# Benchmark evcharge: real servers on loopback driven by concurrent clients; prints a table and
# writes bench/results.json. Arguments go to `python -m tools.bench` (e.g. --quick, --out FILE,
# --scenarios status,reserve, or --scenarios ocpi for the OCPI edge's pages/s and bookings/s).
# See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
exec python -m tools.bench "$@"
