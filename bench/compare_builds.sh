#!/usr/bin/env bash
# Two builds' defaults side by side, alternating (A B A B ...), on the peers' width-64 network: each build's
# bench/peer_fidelity (copied out of its build folder, so a later build does not replace it), fp32 and int8
# dynamic rows, batch 16 at 224x224. A's plan cache starts cold and is warmed once first, so a build whose
# default measures its plan runs from its cache, as a user's second run does. docs/plan.md has a run of it.
#
#   bash bench/compare_builds.sh OLD_PEER_FIDELITY NEW_PEER_FIDELITY PEERS_DIR [OUT_DIR] [PAIRS]
# PEERS_DIR holds peer_w64.safetensors, input.bin and ref_logits.bin (bench/run_peers.sh prepares them).
# Environment: THREADS (default 2), RUNS (timed runs per row, default 5); ONEDNN_MAX_CPU_ISA applies to both.
set -u
if [ $# -lt 3 ] || [ ! -x "$1" ] || [ ! -x "$2" ] || [ ! -f "$3/input.bin" ]; then
  echo "usage: bash bench/compare_builds.sh OLD_PEER_FIDELITY NEW_PEER_FIDELITY PEERS_DIR [OUT_DIR] [PAIRS]" >&2
  exit 2
fi
old=$1 new=$2 peers=$3 out=${4:-build/compare} pairs=${5:-2}
mkdir -p "$out"
args=(--weights "$peers/peer_w64.safetensors" --input "$peers/input.bin" --reference "$peers/ref_logits.bin"
      --threads "${THREADS:-2}")
export XDG_CACHE_HOME="$out/cache" OMP_WAIT_POLICY=passive
"$old" "${args[@]}" --precision fp32 --runs 1 > /dev/null 2>&1
"$old" "${args[@]}" --precision int8 --runs 1 > /dev/null 2>&1
for i in $(seq 1 "$pairs"); do
  for precision in fp32 int8; do
    for side in old new; do
      binary=$old
      [ "$side" = new ] && binary=$new
      "$binary" "${args[@]}" --precision "$precision" --runs "${RUNS:-5}" --json "$out/${side}_${precision}_$i.json" \
        > /dev/null 2>&1 || { echo "$side $precision $i: failed"; continue; }
      /usr/bin/python3 - "$out/${side}_${precision}_$i.json" "$side $precision $i" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("%s: median %.0f ms (min %.0f, max %.0f), mask Dice %.4f, peak RSS %.0f MB, plan %s %s" % (
    sys.argv[2], r["latency_median_ms"], r["latency_min_ms"], r["latency_max_ms"], r["mask_dice_vs_reference"],
    r["peak_rss_mb"], r.get("plan_id", "-"), r["plan"][:120]))
PY
    done
  done
done
