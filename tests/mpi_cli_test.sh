#!/usr/bin/env bash
# `resunet predict`, `eval` and `cv` under mpirun against one process, on loopback, with a small model
# (width 16, depth 2, 32x32: wide enough for our fp32 and int8 Winograds) trained here on a few Kvasir-SEG pairs:
#   predict  9 inputs (8 images and one unreadable .jpg), batch 2: 5 batches, uneven over the ranks; with the
#            default flags (the int8 engine, its plan by rule) every mask, metrics.csv and summary.json
#            byte-identical to one process at its default thread count, to one process at 1 thread, with a
#            busy process beside, and with the plan cache cold and warm; the bad image reported; exit
#            status 1 on every rank; the fp32 engine's masks likewise;
#   eval     the --json report identical except "seconds"; with -np 3 one rank gets no batch at all;
#   cv       3 folds, 1 epoch, one thread per fold: cv_summary.json identical except its timings;
#   usage    a missing input under mpirun: exit status 2 and the message printed once.
#
# Usage: mpi_cli_test.sh RESUNET MPIEXEC SHARED_DIR RANKS
# Registered by tests/mpi_cli_tests.cmake (label mpi) at -np 2 and -np 3.
set -u
resunet=$1 mpiexec=$2 shared=$3 ranks=$4
kvasir="$shared/data/kvasir-seg"
[[ -d "$kvasir/images" ]] || { echo "skipped: no Kvasir-SEG at $kvasir"; exit 0; }

work=$(mktemp -d "${TMPDIR:-/tmp}/resunet_mpi_cli.XXXXXX")
[[ -n "${RESUNET_KEEP_TEST_DIR:-}" ]] && echo "work folder: $work" || trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
mpi() { "$mpiexec" --allow-run-as-root --oversubscribe -np "$ranks" "$@"; }
# A JSON report without the lines that carry timings.
untimed() { grep -v -E '"(seconds|train_seconds|loader_wait_share)"' "$1"; }
export OMP_WAIT_POLICY=passive
# The plans (fp32, and int8's measured choices) in a cache of the test's own, cold at the start: the first
# run measures and saves them, every later run and rank reads them (under mpirun rank 0 compiles first).
export XDG_CACHE_HOME="$work/cache"

# ---- data: 15 image/mask pairs; a predict input folder with one unreadable image ----
mkdir -p "$work/data/images" "$work/data/masks" "$work/inputs" "$work/truth"
for image in $(ls "$kvasir/images" | sort | head -n 15); do
  stem=${image%.*}
  ln -s "$kvasir/images/$image" "$work/data/images/$image"
  ln -s "$kvasir/masks/$stem".* "$work/data/masks/"
done
for image in $(ls "$work/data/images" | head -n 8); do
  ln -s "$kvasir/images/$image" "$work/inputs/$image"
done
ln -s "$kvasir/masks/"* "$work/truth/" 2>/dev/null
printf 'not a JPEG at all' > "$work/inputs/zz_unreadable.jpg"
cp "$(ls "$work/truth/"* | head -n 1)" "$work/truth_zz.tmp" && mv "$work/truth_zz.tmp" "$work/truth/zz_unreadable.jpg"

tiny=(--width 16 --depth 2 --size 32 --batch 2 --epochs 1 --threads 1 --loader-threads 1)
"$resunet" train --data "$work/data" --out "$work/model" "${tiny[@]}" > /dev/null 2>&1 ||
  { echo "FAIL: training the tiny model"; exit 1; }
model="$work/model/best.safetensors"

# ---- predict: default flags (no --threads: one process runs all cores, each rank 1 thread) ----
predict=(predict "$work/inputs" --model "$model" --masks "$work/truth" --batch 2)
"$resunet" "${predict[@]}" --out "$work/p1" > /dev/null 2> "$work/p1.err"; code1=$?
mpi "$resunet" "${predict[@]}" --out "$work/pn" > /dev/null 2> "$work/pn.err"; coden=$?
# The same job at 1 thread, with a busy process beside (a loaded machine), and again with the cache warm.
"$resunet" "${predict[@]}" --threads 1 --out "$work/pt1" > /dev/null 2>&1
( end=$((SECONDS + 60)); while [[ $SECONDS -lt $end ]]; do :; done ) & busy=$!
"$resunet" "${predict[@]}" --out "$work/pbusy" > /dev/null 2>&1
kill "$busy" 2> /dev/null; wait "$busy" 2> /dev/null
"$resunet" "${predict[@]}" --out "$work/pwarm" > /dev/null 2>&1
"$resunet" "${predict[@]}" --precision fp32 --out "$work/f1" > /dev/null 2>&1
mpi "$resunet" "${predict[@]}" --precision fp32 --out "$work/fn" > /dev/null 2>&1
for variant in pt1 pbusy pwarm; do
  for file in $(ls "$work/p1"); do
    cmp -s "$work/p1/$file" "$work/$variant/$file" || fail "predict: $file differs between the default run and $variant"
  done
done
for file in $(ls "$work/f1"); do
  cmp -s "$work/f1/$file" "$work/fn/$file" || fail "predict --precision fp32: $file differs between 1 process and $ranks ranks"
done
grep -q '"plan": "p[0-9a-f]\{8\}"' "$work/p1/summary.json" || fail "predict: summary.json names no plan id"
[[ $code1 == 1 && $coden == 1 ]] || fail "predict exit status: 1 process $code1, $ranks ranks $coden (want 1 and 1)"
# Proves the ranks shared the work (not $ranks whole runs writing the same files).
[[ $ranks == 1 ]] || grep -q "on each of $ranks ranks" "$work/pn.err" || fail "predict under mpirun did not run as one job of $ranks ranks"
grep -q "zz_unreadable.jpg" "$work/pn.err" || fail "predict under mpirun did not report the unreadable image"
masks=$(ls "$work/p1" | grep -c '\.png$')
[[ $masks == 8 ]] || fail "one process wrote $masks masks, want 8"
for file in $(ls "$work/p1"); do
  cmp -s "$work/p1/$file" "$work/pn/$file" || fail "predict: $file differs between 1 process and $ranks ranks"
done
[[ $(ls "$work/pn" | wc -l) == $(ls "$work/p1" | wc -l) ]] || fail "predict: $ranks ranks wrote other files than 1 process"

# ---- eval ----
evaluate=(eval --model "$model" --data "$work/data" --batch 2 --threads 1)
"$resunet" "${evaluate[@]}" --json "$work/e1.json" > "$work/e1.md" 2> /dev/null || fail "eval (1 process) failed"
mpi "$resunet" "${evaluate[@]}" --json "$work/en.json" > "$work/en.md" 2> "$work/en.err" || fail "eval ($ranks ranks) failed"
[[ $ranks == 1 ]] || grep -q "on each of $ranks ranks" "$work/en.err" || fail "eval under mpirun did not run as one job of $ranks ranks"
cmp -s <(untimed "$work/e1.json") <(untimed "$work/en.json") || fail "eval: the JSON reports differ beyond seconds"
cmp -s "$work/e1.md" "$work/en.md" || fail "eval: the Markdown tables differ"

# ---- cv ----
# Direct kernels: fold k is compared across arrangements, and measured ones could differ by rounding.
cv=(cv --data "$work/data" --folds 3 --width 4 --depth 2 --size 32 --batch 2 --epochs 1 --threads-per-fold 1 --loader-threads 1
    --conv-algorithm direct)
"$resunet" "${cv[@]}" --out "$work/c1" > /dev/null 2>&1 || fail "cv (1 process) failed"
mpi "$resunet" "${cv[@]}" --out "$work/cn" > /dev/null 2> "$work/cn.err" || fail "cv ($ranks ranks) failed"
[[ $ranks == 1 ]] || grep -q "resunet cv: $ranks ranks" "$work/cn.err" || fail "cv under mpirun did not run as one job of $ranks ranks"
cmp -s <(untimed "$work/c1/cv_summary.json") <(untimed "$work/cn/cv_summary.json") ||
  fail "cv: cv_summary.json differs beyond timings"

# ---- a usage error: every rank exits 2, the message is printed once ----
mpi "$resunet" predict "$work/no_such_folder" --model "$model" --out "$work/pu" > /dev/null 2> "$work/pu.err"; code=$?
[[ $code == 2 ]] || fail "usage error under mpirun: exit status $code, want 2"
count=$(grep -c "no_such_folder" "$work/pu.err")
[[ $count == 1 ]] || fail "usage error under mpirun printed $count times, want once"

if [[ $failures -gt 0 ]]; then
  echo "$failures check(s) failed at -np $ranks"
  exit 1
fi
echo "all checks passed at -np $ranks"
