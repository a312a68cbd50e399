#!/usr/bin/env bash
# Retrieval benchmarks with fixed pytest-benchmark flags (results: bench/results/retrieval.md).
#   bench/run.sh                 # 1M rows (builds bench/data/ on first use: ~1.5 GB per set)
#   BENCH_N=100000 bench/run.sh  # smaller
# Extra arguments go to pytest, e.g. -k "one_query". Raw JSON: bench/data/results/ (git-ignored);
# tables: python -m bench.bench_retrieve bench/data/results/retrieval-1000000.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/data/results
uptime
exec "$PY" -m pytest bench/bench_retrieve.py -p no:cacheprovider -o python_files='bench_*.py' \
  --benchmark-only --benchmark-disable-gc --benchmark-warmup=off --benchmark-sort=fullname \
  --benchmark-columns=median,min,max,rounds --benchmark-group-by=group \
  --benchmark-json="bench/data/results/retrieval-${BENCH_N:-1000000}.json" -q "$@"
