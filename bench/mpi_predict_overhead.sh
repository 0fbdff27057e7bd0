#!/usr/bin/env bash
# The 2-core overhead figure of docs/mpi.md: `resunet predict` on the 1000 Kvasir-SEG images with one process
# of 2 threads against `mpirun -np 2` with 1 thread each, alternating, ROUNDS rounds (default 3); checks that
# the two runs wrote identical masks, metrics.csv and summary.json.
#   bash bench/mpi_predict_overhead.sh [MODEL] [ROUNDS]     (MODEL default models/resunet-w16-s192/best.safetensors)
set -uo pipefail
cd "$(dirname "$0")/.."
bin=./build/apps/resunet
model="${1:-models/resunet-w16-s192/best.safetensors}"
rounds="${2:-3}"
data=../shared/data/kvasir-seg
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
seconds() { local s e; s=$(date +%s.%N); "$@" > "$out/log" 2>&1; local rc=$?; e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) rc=$rc"; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores; model $model"
for round in $(seq "$rounds"); do
  rm -rf "$out/one" "$out/two"
  one=$(seconds "$bin" predict "$data/images" --model "$model" --out "$out/one" --masks "$data/masks" --threads 2)
  two=$(seconds mpirun --allow-run-as-root -np 2 "$bin" predict "$data/images" --model "$model" --out "$out/two" \
        --masks "$data/masks" --threads 1)
  same=$(diff -rq "$out/one" "$out/two" > /dev/null && echo identical || echo DIFFERENT)
  echo "round $round: 1 rank x 2 threads ${one} s; 2 ranks x 1 thread ${two} s; outputs $same"
done
