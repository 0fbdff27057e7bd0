#!/usr/bin/env python3
"""Per layer, OpenVINO's profile beside ours: where each spends its time on the same network.
  OV_ROW.json     an OpenVINO row of bench/run_peers.sh run with PROFILE=1000 (every node of its last run)
  OURS.json       bench_resunet --json of the same weights with --layers, e.g.
                  build/bench/bench_resunet --model build/peers/peer_w64.safetensors --size 224 --batch 16
                      --threads 2 --precision int8 --layers --json ours.json
Convolutions are matched by name (the ONNX export's /encK, /decK, /upK, convN, sc_conv against our eK, b,
dK, conv_a, conv_b, shortcut.conv; the up-convolutions OpenVINO renames by their order); everything else is summed per side (ours: pools, concatenations,
range and quantize passes; OpenVINO: pools, concatenations, reorders).
usage: layers.py OV_ROW.json OURS.json [--row PRECISION]      (PRECISION: bench_resunet's row, e.g. int8)
Standard library only; prints Markdown.
"""
import argparse
import json
import re


def our_name(ov_node, depth):
    """'/dec3/conv1/Conv/WithoutBiases' -> 'd2.conv_a' (depth 4); None for what is not a convolution."""
    m = re.match(r"^/(enc|dec|up)(\d+)/(?:(conv1|conv2|sc_conv)/)?(Conv|ConvTranspose)", ov_node)
    if not m:
        return "head" if re.match(r"^/head/Conv", ov_node) else None
    kind, k, conv = m.group(1), int(m.group(2)), m.group(3)
    if kind == "enc":
        stage = "b" if k == depth + 1 else "e%d" % k
    else:  # the decoder counts from the bottom there, from the top here
        stage = "d%d" % (depth + 1 - k)
    if kind == "up":
        return stage + ".up"
    return stage + "." + {"conv1": "conv_a", "conv2": "conv_b", "sc_conv": "shortcut.conv"}[conv]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ov_row")
    ap.add_argument("ours")
    ap.add_argument("--row", default="", help="which bench_resunet row (its precision); default the first")
    args = ap.parse_args()
    ov = json.load(open(args.ov_row))
    if not ov.get("layers"):
        raise SystemExit("%s: no profile (run bench/run_peers.sh with PROFILE=1000)" % args.ov_row)
    report = json.load(open(args.ours))
    rows = [r for r in report.get("rows", []) if r.get("layers") and (not args.row or r.get("precision") == args.row)]
    if not rows:
        raise SystemExit("%s: no row with --layers%s" % (args.ours, " for " + args.row if args.row else ""))
    ours = rows[0]["layers"]
    depth = max(int(m.group(1)) for m in (re.match(r"^/enc(\d+)/", l["name"]) for l in ov["layers"]) if m) - 1
    # The CPU plugin renames the up-convolutions it rebuilds (ConvolutionBackpropData_N, N rising along the
    # graph): the k-th of them is /up{k}.
    ups = sorted((int(re.sub(r"\D", "", n["name"]) or 0), n["name"]) for n in ov["layers"]
                 if n["type"] == "ConvolutionBackpropData" and not n["name"].startswith("/up"))
    renamed = {name: "/up%d/ConvTranspose" % (i + 1) for i, (_, name) in enumerate(ups)}
    theirs, their_other = {}, 0.0
    for node in ov["layers"]:
        name = our_name(renamed.get(node["name"], node["name"]), depth)
        if name:
            theirs[name] = (theirs.get(name, (0.0, ""))[0] + node["ms"], node["exec_type"])
        else:
            their_other += node["ms"]
    print("| layer | ours ms | our kernel | OpenVINO ms | OpenVINO kernel | OpenVINO / ours |")
    print("|---|---|---|---|---|---|")
    our_conv = their_conv = our_other = 0.0
    for layer in ours:
        if layer["name"] in theirs:
            ms, kernel = theirs.pop(layer["name"])
            our_conv += layer["time_ms"]
            their_conv += ms
            print("| %s | %.1f | %s | %.1f | %s | %.2f |" % (layer["name"], layer["time_ms"], layer.get("kernel", ""),
                                                          ms, kernel, ms / layer["time_ms"] if layer["time_ms"] else 0))
        else:
            our_other += layer["time_ms"]
    for name, (ms, kernel) in theirs.items():  # a convolution ours does not name the same way
        their_other += ms
        print("| %s (OpenVINO only) | | | %.1f | %s | |" % (name, ms, kernel))
    print("| **convolutions** | %.1f | | %.1f | | %.2f |" % (our_conv, their_conv, their_conv / our_conv if our_conv else 0))
    print("| **everything else** (ours: pools, concatenations, range and quantize passes) | %.1f | | %.1f | | |" % (
        our_other, their_other))
    print("| **total of the profiled run** | %.1f | | %.1f | | %.2f |" % (
        our_conv + our_other, their_conv + their_other,
        (their_conv + their_other) / (our_conv + our_other) if our_conv + our_other else 0))


if __name__ == "__main__":
    main()
