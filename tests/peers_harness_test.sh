#!/usr/bin/env bash
# The peers harness without the peers (none is installed for CI): bench/run_peers.sh and
# bench/install-peers.sh refuse bad arguments in one line with exit 2 before doing anything, and
# bench/peers/table.py turns rows, a failed row and a pair into the table and its JSON, and
# bench/peers/layers.py matches OpenVINO's nodes with our layers.
#   bash tests/peers_harness_test.sh PYTHON
set -u
cd "$(dirname "$0")/.."
python="${1:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
refuses() {  # expected message part, then the command
  local want="$1"; shift
  local err rc
  err="$("$@" 2>&1 > /dev/null)"; rc=$?
  [ $rc = 2 ] || fail "'$*' exited $rc, not 2"
  [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || fail "'$*' said more than one line: $err"
  [[ "$err" == *"$want"* ]] || fail "'$*' said '$err', not '$want'"
  [ -z "$(ls -A "$tmp")" ] || fail "'$*' wrote into $tmp"
}
refuses "RUNS must be a positive integer" bash bench/run_peers.sh "$tmp" 0
refuses "RUNS must be a positive integer" bash bench/run_peers.sh "$tmp" x
refuses "OURS is all or core" env OURS=some bash bench/run_peers.sh "$tmp" 1
refuses "THREADS must be a positive integer" env THREADS=0 bash bench/run_peers.sh "$tmp" 1
if [ -x /usr/bin/python3 ]; then
  refuses "unknown row 'nope'" env PEERS=ov_fp32,nope bash bench/run_peers.sh "$tmp" 1
fi
refuses "unknown argument '--bogus'" bash bench/install-peers.sh --bogus

out="$tmp/out"
mkdir -p "$out"
row() {  # file, median ms
  printf '{"latency_median_ms": %s, "latency_min_ms": %s, "latency_max_ms": %s, "peak_rss_mb": 100, "mask_dice_vs_reference": 0.99, "max_abs_diff": 0.1, "precision": "fp32"}\n' "$2" "$2" "$2" > "$out/$1"
}
echo '{"machine": "test CPU", "threads": 2, "runs": 3, "batch": 16, "commit": "abc1234", "date": "2026-01-01 00:00 UTC"}' > "$out/meta.json"
row ours_fp32.json 200
printf '{"key": "ov_fp32", "label": "OpenVINO fp32", "version": "9.9", "latency_median_ms": 300, "latency_min_ms": 290, "latency_max_ms": 310, "peak_rss_mb": 900, "mask_dice_vs_reference": 1.0, "max_abs_diff": 1e-6, "precision": "fp32"}\n' > "$out/peer_ov_fp32.json"
printf '{"key": "ov_int8", "label": "OpenVINO int8", "error": "exit 1: boom"}\n' > "$out/peer_ov_int8.json"
echo "ov_fp32 fp32" > "$out/pairs.txt"
echo "ov_int8 int8-dynamic" >> "$out/pairs.txt"
row "pair_ov_fp32-fp32.json" 300
row "ours_fp32-before-ov_fp32.json" 200
row "ours_fp32-after-ov_fp32.json" 150
"$python" bench/peers/table.py "$out" > "$tmp/table.txt" || fail "table.py exited $?"
grep -q '^| ours fp32 (the default plan: fixed per CPU class) | abc1234 | fp32 | 200 |' "$out/table.md" || fail "our row missing: $(cat "$out/table.md")"
grep -q '^| OpenVINO fp32 | 9.9 | fp32 | 300 | 290 | 310 | 900 | 1.0000 | 1.00e-06 |' "$out/table.md" || fail "peer row missing"
grep -q '^| OpenVINO int8 | .*\*\*not measured\*\*: exit 1: boom |' "$out/table.md" || fail "failed row missing"
grep -q '^| ov_fp32 | 300 (300-300) | fp32 | 200, 150 | 1.50x, 2.00x |' "$out/table.md" || fail "pair ratio wrong"
grep -q '^| ov_int8 | | int8-dynamic | | not measured' "$out/table.md" || fail "incomplete pair not marked"
cmp -s "$out/table.md" "$tmp/table.txt" || [ "$(cat "$out/table.md")" = "$(sed '$d' "$tmp/table.txt")" ] ||
  fail "printed table differs from table.md"
"$python" -c "import json,sys; t=json.load(open(sys.argv[1])); assert len(t['rows']) == 3 and len(t['pairs']) == 2" \
  "$out/table.json" || fail "table.json"
# layers.py: OpenVINO's node names against ours (depth 4: /enc5 is our bridge b, /dec4 our d1, the k-th
# renamed up-convolution /up{k}, i.e. our d{5-k}.up).
cat > "$tmp/ov.json" <<'JSON'
{"layers": [{"name": "/enc5/conv2/Conv/WithoutBiases", "type": "Convolution", "exec_type": "k1", "ms": 30},
 {"name": "/dec4/conv1/Conv/WithoutBiases", "type": "Convolution", "exec_type": "k1", "ms": 10},
 {"name": "ConvolutionBackpropData_30", "type": "ConvolutionBackpropData", "exec_type": "k2", "ms": 4},
 {"name": "ConvolutionBackpropData_7", "type": "ConvolutionBackpropData", "exec_type": "k2", "ms": 6},
 {"name": "/Concat_1", "type": "Concat", "exec_type": "ref", "ms": 1}]}
JSON
cat > "$tmp/ours.json" <<'JSON'
{"rows": [{"precision": "int8", "layers": [{"name": "b.conv_b", "time_ms": 20, "kernel": "x"},
 {"name": "d4.up", "time_ms": 3, "kernel": "y"}, {"name": "d3.up", "time_ms": 2, "kernel": "y"},
 {"name": "d1.concat.quantize", "time_ms": 5, "kernel": "q"}, {"name": "d1.conv_a", "time_ms": 20, "kernel": "x"}]}]}
JSON
"$python" bench/peers/layers.py "$tmp/ov.json" "$tmp/ours.json" > "$tmp/layers.md" || fail "layers.py exited $?"
grep -q '^| b.conv_b | 20.0 | x | 30.0 | k1 | 1.50 |' "$tmp/layers.md" || fail "layers: b.conv_b: $(cat "$tmp/layers.md")"
grep -q '^| d1.conv_a | 20.0 | x | 10.0 | k1 | 0.50 |' "$tmp/layers.md" || fail "layers: d1.conv_a"
grep -q '^| d4.up | 3.0 | y | 6.0 | k2 | 2.00 |' "$tmp/layers.md" || fail "layers: d4.up is the first renamed one"
grep -q '^| d3.up | 2.0 | y | 4.0 | k2 | 2.00 |' "$tmp/layers.md" || fail "layers: d3.up"
grep -q '^| \*\*everything else.* | 5.0 | | 1.0 | | |' "$tmp/layers.md" || fail "layers: the rest"
if [ $failures = 0 ]; then echo "peers harness: all checks passed"; else echo "peers harness: $failures failed"; exit 1; fi
