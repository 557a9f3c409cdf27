#!/usr/bin/env bash
# Every benchmark of issue 7 in sequence, each printing its table; a copy of all output goes to
# bench-results/<timestamp>.txt. Run from anywhere: `bash bench/run_all.sh [--quick]`.
# --quick: smaller sizes (a smoke run, not figures to report).
# The engine-utilisation benchmark (bench/bench_engine.py) is run too when it is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUICK=${1:-}
mkdir -p bench-results
OUT="bench-results/$(date -u +%Y%m%dT%H%M%SZ).txt"
run() {
  echo "=== $* ($(date -u +%H:%M:%S), $(uptime | sed 's/.*load/load/'))" | tee -a "$OUT"
  "$@" 2>&1 | tee -a "$OUT"
}
if [ "$QUICK" = "--quick" ]; then
  run "$PY" bench/bench_footprint.py --idle 10 --repeats 1
  run "$PY" bench/bench_discovery.py --n 3
  run "$PY" bench/bench_freshness.py --n 2 --arc-n 5
  run "$PY" bench/bench_arc_vs_lmeval.py --n 50
  run "$PY" bench/bench_trainer_pause.py --steps 4 --save-steps 2 --arc-n 5
  run "$PY" bench/bench_root.py --checkpoints 2 --arc-n 5
else
  run "$PY" bench/bench_footprint.py
  run "$PY" bench/bench_discovery.py
  run "$PY" bench/bench_freshness.py
  run "$PY" bench/bench_arc_vs_lmeval.py
  run "$PY" bench/bench_trainer_pause.py --repeats 2
  run "$PY" bench/bench_root.py --repeats 2
fi
if [ -f bench/bench_engine.py ]; then
  run "$PY" bench/bench_engine.py
fi
echo "all output: $OUT"
