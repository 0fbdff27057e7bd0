#!/usr/bin/env bash
# Our engines beside OpenVINO, ONNX Runtime and PyTorch on the same network, weights, input and machine, in
# one sitting, and one table of it all (docs/peers.md says what each row is). Every row runs in a process of
# its own with the same thread count, batch 16 at 224x224, width 64 (32,445,185 parameters):
#   peers (bench/peers/run_row.py --list): OpenVINO fp32 (f32 hint), bf16 (where the CPU has it) and NNCF
#     int8; ONNX Runtime fp32 and QDQ int8; PyTorch 1.13 (Debian) TorchScript fp32 and FX static int8;
#     PyTorch 2.x fp32 and int8 where bash bench/install-peers.sh --torch2 installed it;
#   ours (bench/peer_fidelity): the defaults (the plan fixed per CPU class, docs/plan.md): fp32, int8 dynamic,
#     int8 static; with OURS=all (the default) also the measured plans (--tune fast, from a plan cache filled by
#     a cold run first), fp32 untuned,
#     under a lean and under no memory budget, int8 all oneDNN direct, int8 mixed and int8 from an int8 file;
#   then pairs: each peer whose ratio docs/peers.md targets run once more, alone, between two runs of our
#     matching row, so that each ratio compares neighbours in time (this host's speed drifts within minutes).
# Fidelity: every row's logits against PyTorch's fp32 logits (ref_logits.bin) of the same weights and input.
#
#   bash bench/install-peers.sh                 (once: Debian PyTorch 1.13, a venv with OpenVINO, NNCF, ORT)
#   cmake --build build --target peer_fidelity resunet
#   bash bench/run_peers.sh [OUT_DIR] [RUNS]    (OUT_DIR default build/peers; RUNS default 5)
# Environment: OURS=core (our three headline rows only), PEERS=ov_fp32,ort_int8,... (the peer rows),
#   PAIRS=0 (no pairs), PROFILE=N (OpenVINO rows: their N slowest nodes in the JSON), LEAN_MB=230,
#   THREADS=2 (threads per row).
# Prints the table at the end; it is also in OUT_DIR/table.md and OUT_DIR/table.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-build/peers}")"
runs="${2:-5}"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "run_peers: RUNS must be a positive integer, not '$runs'" >&2; exit 2; }
lean_mb="${LEAN_MB:-230}"  # the lean fp32 rows' --memory-budget
ours_rows="${OURS:-all}"
[[ "$ours_rows" =~ ^(all|core)$ ]] || { echo "run_peers: OURS is all or core, not '$ours_rows'" >&2; exit 2; }
venv=build/peers-venv/bin/python
peers_default=ov_fp32,ov_bf16,ov_int8,ort_fp32,ort_int8,pt_fp32,pt_fx_int8
[ -x build/peers-venv-torch2/bin/python ] && peers_default+=,pt2_fp32,pt2_int8
peers="${PEERS:-$peers_default}"
threads="${THREADS:-2}"
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || { echo "run_peers: THREADS must be a positive integer, not '$threads'" >&2; exit 2; }
[ -x /usr/bin/python3 ] || { echo "run_peers: no /usr/bin/python3: bash bench/install-peers.sh" >&2; exit 2; }
known="$(/usr/bin/python3 bench/peers/run_row.py --list | cut -d' ' -f1 | tr '\n' ' ')"
for key in ${peers//,/ }; do
  [[ " $known" == *" $key "* ]] || { echo "run_peers: PEERS: unknown row '$key' (known: $known)" >&2; exit 2; }
done
bin=build/bench/peer_fidelity
[ -x "$bin" ] || { echo "run_peers: build first (cmake --build build --target peer_fidelity resunet)" >&2; exit 2; }
/usr/bin/python3 -c "import torch, numpy" 2> /dev/null ||
  { echo "run_peers: Debian's PyTorch is missing: bash bench/install-peers.sh" >&2; exit 2; }
[ -x "$venv" ] || echo "run_peers: no $venv (bash bench/install-peers.sh): the OpenVINO and ONNX Runtime rows will say so"
mkdir -p "$out"
work="$out/peers"
if [ ! -f "$work/input.bin" ] || [ ! -f "$work/ref_logits.bin" ] || [ ! -f "$work/resunet_int8_qdq_full.onnx" ]; then
  rm -rf "$work" && cp -r ../shared/peers "$work" && chmod -R u+w "$work"
  (cd "$work" && OMP_NUM_THREADS=$threads /usr/bin/python3 prep.py --threads $threads)
fi
[ -f "$out/peer_w64.safetensors" ] || /usr/bin/python3 "$work/export_weights.py" "$out/peer_w64.safetensors"
if [ -x "$venv" ] && [ ! -f "$work/ov/prepare.json" ]; then
  echo "== OpenVINO: the ONNX file as IR, and NNCF int8 calibrated on input.bin's first 4 images"
  OMP_NUM_THREADS=$threads "$venv" bench/peers/ov_prepare.py --onnx "$work/resunet_fp32.onnx" \
    --input "$work/input.bin" --out "$work/ov" --calib 4 --threads $threads > "$out/ov_prepare.log" 2>&1 ||
    echo "   failed: see $out/ov_prepare.log"
fi
machine="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ') model $(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')), $(nproc) cores"
echo "machine: $machine; $threads threads per row"
rm -f "$out"/ours_*.json "$out"/peer_*.json "$out"/pair_*.json "$out/pairs.txt"
/usr/bin/python3 - "$out/meta.json" "$machine" "$threads" "$runs" "$(git rev-parse --short HEAD 2> /dev/null || echo unknown)" \
  "OURS=$ours_rows PEERS=$peers PAIRS=${PAIRS:-1} THREADS=$threads bash bench/run_peers.sh ${1:-build/peers} $runs" <<'PY'
import datetime, json, sys
path, machine, threads, runs, commit, command = sys.argv[1:]
json.dump(dict(machine=machine, threads=int(threads), runs=int(runs), batch=16, commit=commit, command=command,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")), open(path, "w"))
PY
common=(--weights "$out/peer_w64.safetensors" --input "$work/input.bin" --reference "$work/ref_logits.bin"
        --threads $threads)
ours() {  # name, then peer_fidelity flags; row_runs=N before the call: N timed runs instead of RUNS
  local name="$1"; shift
  echo "== ours: $name"
  "$bin" "${common[@]}" --runs "${row_runs:-$runs}" "$@" --json "$out/ours_$name.json" > "$out/ours_$name.log" 2>&1 || { echo "   failed: see $out/ours_$name.log"; return; }
  /usr/bin/python3 - "$out/ours_$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("   median %.0f ms (min %.0f, max %.0f), peak RSS %.0f MB, compile %.1f s, max|diff| %.2e, mask Dice %.4f%s" % (
    r["latency_median_ms"], r["latency_min_ms"], r["latency_max_ms"], r["peak_rss_mb"], r["compile_ms"] / 1e3,
    r["max_abs_diff"], r["mask_dice_vs_reference"], ("; plan: " + r["plan"]) if r.get("plan") else ""))
PY
}
peer() {  # run_row key, JSON name
  echo "== peer: $1"
  /usr/bin/python3 bench/peers/run_row.py --key "$1" --work "$work" --json "$out/$2.json" --runs "$runs" \
    --threads $threads --profile "${PROFILE:-0}" || true
}
cache="$out/plans"
rm -rf "$cache"
# The headline rows run the default plan (nothing measured, nothing cached); the measured plans below run cold
# first, then from the plan cache as a user's second run does (peak RSS then inference's, not the planner's).
ours fp32 --precision fp32
ours int8-dynamic --precision int8
ours int8-static --precision static-int8
if [ "$ours_rows" = all ]; then
  # The measured plans (--tune fast): cold, then from the plan cache as a user's second run.
  ours fp32-tuned-cold --precision fp32 --tune fast --plan-cache "$cache"
  ours fp32-tuned-warm --precision fp32 --tune fast --plan-cache "$cache"
  row_runs=1 ours int8-dynamic-tuned-cold --precision int8 --tune fast --plan-cache "$cache"
  ours int8-dynamic-tuned-warm --precision int8 --tune fast --plan-cache "$cache"
  ours fp32-untuned --precision fp32 --tune off
  # The memory budget at both ends: a lean plan (engine bytes at most $lean_mb MB) and no limit (every
  # layer's measured winner), each tuned cold and then from the plan cache.
  ours fp32-lean-cold --precision fp32 --tune fast --plan-cache "$cache" --memory-budget "$lean_mb"
  ours fp32-lean-warm --precision fp32 --tune fast --plan-cache "$cache" --memory-budget "$lean_mb"
  ours fp32-unlimited-cold --precision fp32 --tune fast --plan-cache "$cache" --memory-budget -1
  ours fp32-unlimited-warm --precision fp32 --tune fast --plan-cache "$cache" --memory-budget -1
  ours int8-dynamic-direct --precision int8 --int8-conv direct
  ours int8-dynamic-mixed --precision int8 --int8-conv mixed
  if build/apps/resunet quantize --help > /dev/null 2>&1; then
    rm -f "$out/peer_w64.int8.safetensors" "$out/peer_w64.int8.report.md" "$out/peer_w64.int8.report.json"
    if build/apps/resunet quantize --model "$out/peer_w64.safetensors" --out "$out/peer_w64.int8.safetensors" \
         --size 224 > "$out/quantize.log" 2>&1; then
      common[1]="$out/peer_w64.int8.safetensors"
      ours int8-file --precision int8  # stored static scales (synthetic calibration set)
      common[1]="$out/peer_w64.safetensors"
    else
      echo "== ours: int8 file: resunet quantize failed (see $out/quantize.log)"
    fi
  fi
fi
IFS=, read -r -a peer_keys <<< "$peers"
for key in "${peer_keys[@]}"; do peer "$key" "peer_$key"; done
pair() {  # peer key, our row name, our peer_fidelity flags
  local key="$1" name="$2"; shift 2
  [[ ",$peers," == *",$key,"* ]] || return 0
  echo "$key $name" >> "$out/pairs.txt"
  ours "$name-before-$key" "$@"
  peer "$key" "pair_$key-$name"
  ours "$name-after-$key" "$@"
}
if [ "${PAIRS:-1}" != 0 ]; then
  echo "== pairs: each peer between two runs of our matching row"
  pair ov_fp32 fp32 --precision fp32
  pair ov_int8 int8-dynamic --precision int8
  pair ov_int8 int8-static --precision static-int8
  pair ov_bf16 int8-dynamic --precision int8
  pair ort_fp32 fp32 --precision fp32
  pair ort_int8 int8-dynamic --precision int8
  pair pt_fx_int8 int8-dynamic --precision int8
  pair pt_fx_int8 int8-static --precision static-int8
  pair pt2_int8 int8-dynamic --precision int8
  if [ "$ours_rows" = all ]; then  # all oneDNN direct (--int8-conv direct), against the same peers
    pair ort_int8 int8-direct --precision int8 --int8-conv direct
    pair pt_fx_int8 int8-direct --precision int8 --int8-conv direct
  fi
fi
echo
/usr/bin/python3 bench/peers/table.py "$out"
