#!/usr/bin/env bash
# Our engines beside PyTorch and ONNX Runtime on the same network, input and machine, in one sitting
# (../shared/peers; its README says what each peer row is). Rows run one after another, each in its own
# process with the same thread count, batch 16 at 224x224, width 64 (32,445,185 parameters):
#   peers: pt_jit_ob (PyTorch fp32), pt_fx_onednn (PyTorch FX static int8), ort_fp32, ort_qdqfull (ORT QDQ int8);
#   ours (bench/peer_fidelity): fp32 tuned (cold: measures and saves its plan; warm: from the plan cache),
#   fp32 untuned (--tune off), fp32 tuned under a lean memory budget and under none (cold and warm each),
#   int8 dynamic (the default --int8-conv measured: our int8 Winograd where measured faster, on CPUs with
#   127-level weights), int8 dynamic all oneDNN direct (--int8-conv direct), int8 dynamic mixed precision
#   (--int8-conv mixed: fp32 where measured faster), int8 static, and int8 from an int8 file (resunet
#   quantize) when the program has that subcommand; then pairs: each peer whose ratio the issue targets run
#   once more between two runs of our matching row (int8 dynamic both as the default and as direct).
# Fidelity: each of our rows against PyTorch's fp32 logits (ref_logits.bin) of the same weights.
#
#   bash bench/run_peers.sh [OUT_DIR] [RUNS]      (OUT_DIR default build/peers; RUNS default 5;
#                                                  LEAN_MB=230: the lean fp32 rows' memory budget)
# Needs the peers installed once: bash ../shared/peers/run.sh --setup (Debian python3-torch, npm ORT).
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-build/peers}")"
runs="${2:-5}"
lean_mb="${LEAN_MB:-230}"  # the lean fp32 rows' --memory-budget
threads=2
mkdir -p "$out"
work="$out/peers"
if [ ! -f "$work/input.bin" ]; then
  rm -rf "$work" && cp -r ../shared/peers "$work" && chmod -R u+w "$work"
  (cd "$work" && OMP_NUM_THREADS=$threads /usr/bin/python3 prep.py --threads $threads)
fi
# onnxruntime-node from npm (the CPU binary ships in the tarball; no install scripts needed)
[ -d "$work/node/node_modules/onnxruntime-node" ] ||
  (cd "$work/node" && npm install --ignore-scripts --no-audit --no-fund > /dev/null 2>&1) ||
  echo "run_peers: npm install of onnxruntime-node failed; the ORT rows will say so"
[ -f "$out/peer_w64.safetensors" ] || /usr/bin/python3 "$work/export_weights.py" "$out/peer_w64.safetensors"
bin=build/bench/peer_fidelity
[ -x "$bin" ] || { echo "run_peers: build first (cmake --build build --target peer_fidelity resunet)"; exit 2; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ') model $(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')), $(nproc) cores; $threads threads per row"
common=(--weights "$out/peer_w64.safetensors" --input "$work/input.bin" --reference "$work/ref_logits.bin"
        --runs "$runs" --threads $threads)
ours() {  # name, then peer_fidelity flags
  local name="$1"; shift
  echo "== ours: $name"
  "$bin" "${common[@]}" "$@" --json "$out/ours_$name.json" > "$out/ours_$name.log" 2>&1 || { echo "   failed: see $out/ours_$name.log"; return; }
  /usr/bin/python3 - "$out/ours_$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("   median %.0f ms (min %.0f, max %.0f), peak RSS %.0f MB, compile %.1f s, max|diff| %.2e, mask Dice %.4f%s" % (
    r["latency_median_ms"], r["latency_min_ms"], r["latency_max_ms"], r["peak_rss_mb"], r["compile_ms"] / 1e3,
    r["max_abs_diff"], r["mask_dice_vs_reference"], ("; plan: " + r["plan"]) if r.get("plan") else ""))
PY
}
cache="$out/plans"
rm -rf "$cache"
ours fp32-tuned-cold --precision fp32 --plan-cache "$cache"
ours fp32-tuned-warm --precision fp32 --plan-cache "$cache"
ours fp32-untuned --precision fp32 --tune off
# The memory budget at both ends: a lean plan (engine bytes at most $lean_mb MB: the issue's 350 MB peak RSS
# class) and no limit (every layer's measured winner), each tuned cold and then from the plan cache.
ours fp32-lean-cold --precision fp32 --plan-cache "$cache" --memory-budget "$lean_mb"
ours fp32-lean-warm --precision fp32 --plan-cache "$cache" --memory-budget "$lean_mb"
ours fp32-unlimited-cold --precision fp32 --plan-cache "$cache" --memory-budget -1
ours fp32-unlimited-warm --precision fp32 --plan-cache "$cache" --memory-budget -1
ours int8-dynamic --precision int8 --plan-cache "$cache"
ours int8-dynamic-direct --precision int8 --int8-conv direct
ours int8-dynamic-mixed --precision int8 --int8-conv mixed
ours int8-static --precision static-int8 --plan-cache "$cache"
if build/apps/resunet quantize --help > /dev/null 2>&1; then
  rm -f "$out/peer_w64.int8.safetensors" "$out/peer_w64.int8.report.md" "$out/peer_w64.int8.report.json"
  if build/apps/resunet quantize --model "$out/peer_w64.safetensors" --out "$out/peer_w64.int8.safetensors" \
       --size 224 > "$out/quantize.log" 2>&1; then
    common[1]="$out/peer_w64.int8.safetensors"
    ours int8-file --precision int8 --plan-cache "$cache"  # stored static scales (synthetic calibration set)
    common[1]="$out/peer_w64.safetensors"
  else
    echo "== ours: int8 file: resunet quantize failed (see $out/quantize.log)"
  fi
fi
echo "== peers (../shared/peers/runner.py)"
(cd "$work" && /usr/bin/python3 runner.py --suite local --skip-prep --only pt_jit_ob,pt_fx_onednn,ort_fp32,ort_qdqfull \
   --out "$out/peers_local") 2>&1 | tail -20
# Pairs: each peer once more, alone, between two runs of our matching row, so that each ratio compares
# neighbours in time (this host's speed drifts by tens of percent within minutes).
echo "== pairs: each peer between two runs of our matching row"
pair() {  # peer key, our row name, our peer_fidelity flags
  local key="$1" name="$2"; shift 2
  ours "$name-before-$key" "$@"
  (cd "$work" && /usr/bin/python3 runner.py --suite local --skip-prep --only "$key" --out "$out/pair_$key") \
    > "$out/pair_$key.log" 2>&1 || echo "   $key failed: see $out/pair_$key.log"
  ours "$name-after-$key" "$@"
  /usr/bin/python3 - "$out/pair_$key.jsonl" "$out/ours_$name-before-$key.json" "$out/ours_$name-after-$key.json" "$key" "$name" <<'PY' || true
import json, sys
peer = [json.loads(line) for line in open(sys.argv[1]) if line.strip()][-1]
before, after = (json.load(open(p))["latency_median_ms"] for p in sys.argv[2:4])
print("   pair: %s %.0f ms (min %.0f, max %.0f) between our %s %.0f ms and %.0f ms: ours %.2fx and %.2fx faster" % (
    sys.argv[4], peer["median_ms"], peer["min_ms"], peer["max_ms"], sys.argv[5], before, after,
    peer["median_ms"] / before, peer["median_ms"] / after))
PY
}
pair ort_fp32 fp32 --precision fp32 --plan-cache "$cache"
pair ort_qdqfull int8-dynamic --precision int8 --plan-cache "$cache"
pair pt_fx_onednn int8-dynamic --precision int8 --plan-cache "$cache"
pair pt_fx_onednn int8-static --precision static-int8 --plan-cache "$cache"
# All oneDNN direct (--int8-conv direct), against the same peers.
pair ort_qdqfull int8-direct --precision int8 --int8-conv direct
pair pt_fx_onednn int8-direct --precision int8 --int8-conv direct
