#!/usr/bin/env python3
"""The peers table of one bench/run_peers.sh sitting, as Markdown (printed, and OUT/table.md) and JSON
(OUT/table.json): our rows (OUT/ours_NAME.json, bench/peer_fidelity), the peer rows (OUT/peer_KEY.json,
bench/peers/run_row.py) and the pairs (OUT/pairs.txt: 'PEER_KEY OUR_NAME' per line; each peer run once
more between two runs of our row). Standard library only.
usage: table.py OUT_DIR
"""
import json
import os
import sys

OURS = [  # name in run_peers.sh, label; the first three are the headline rows
    ("fp32", "ours fp32 (the default plan: fixed per CPU class)"),
    ("int8-dynamic", "ours int8 dynamic (the default: --int8-conv auto)"),
    ("int8-static", "ours int8 static (calibrated on the batch's first 4 images)"),
    ("fp32-tuned-cold", "ours fp32 (--tune fast, measured cold)"),
    ("fp32-tuned-warm", "ours fp32 (--tune fast, from the plan cache)"),
    ("int8-dynamic-tuned-cold", "ours int8 dynamic (--tune fast, measured cold, 1 run)"),
    ("int8-dynamic-tuned-warm", "ours int8 dynamic (--tune fast, from the plan cache)"),
    ("fp32-untuned", "ours fp32 (--tune off)"),
    ("fp32-lean-cold", "ours fp32 (lean memory budget, cold)"),
    ("fp32-lean-warm", "ours fp32 (lean memory budget, from the cache)"),
    ("fp32-unlimited-cold", "ours fp32 (no memory budget, cold)"),
    ("fp32-unlimited-warm", "ours fp32 (no memory budget, from the cache)"),
    ("int8-dynamic-direct", "ours int8 dynamic (--int8-conv direct)"),
    ("int8-dynamic-mixed", "ours int8 dynamic (--int8-conv mixed)"),
    ("int8-file", "ours int8 from an int8 file (resunet quantize)"),
]
PEERS = ["ov_fp32", "ov_bf16", "ov_int8", "ort_fp32", "ort_int8", "pt_fp32", "pt_fx_int8", "pt2_fp32", "pt2_int8"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def num(v, fmt="%.0f"):
    return fmt % v if isinstance(v, (int, float)) else "-"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: table.py OUT_DIR")
    out = sys.argv[1]
    meta = load(os.path.join(out, "meta.json")) or {}
    ours = []
    for name, label in OURS:
        r = load(os.path.join(out, "ours_%s.json" % name))
        if r:
            r.update(key="ours:" + name, label=label, engine="ours", version=meta.get("commit", ""))
            ours.append(r)
    peers = [r for r in (load(os.path.join(out, "peer_%s.json" % key)) for key in PEERS) if r]
    headline = [r for r in ours if r["key"] in ("ours:" + n for n, _ in OURS[:3])]
    others = [r for r in ours if r not in headline]
    rows = headline + peers + others
    pairs = []
    if os.path.exists(os.path.join(out, "pairs.txt")):
        for line in open(os.path.join(out, "pairs.txt")):
            if not line.split():
                continue
            key, name = line.split()
            peer = load(os.path.join(out, "pair_%s-%s.json" % (key, name)))
            before = load(os.path.join(out, "ours_%s-before-%s.json" % (name, key)))
            after = load(os.path.join(out, "ours_%s-after-%s.json" % (name, key)))
            p = dict(peer=key, ours=name)
            if peer and before and after and not peer.get("error"):
                pm = peer["latency_median_ms"]
                p.update(peer_median_ms=pm, peer_min_ms=peer["latency_min_ms"], peer_max_ms=peer["latency_max_ms"],
                         ours_before_ms=before["latency_median_ms"], ours_after_ms=after["latency_median_ms"],
                         speedup_before=pm / before["latency_median_ms"], speedup_after=pm / after["latency_median_ms"])
            else:
                p["error"] = (peer or {}).get("error", "a run of the pair is missing")
            pairs.append(p)
    md = ["# Peers, one sitting: %s" % meta.get("date", "?"), "",
          "%s; threads per row: %s; batch %s, 224 x 224, width 64 (32,445,185 parameters); timed runs per row "
          "after one warm-up: %s; every row in a process of its own. Command: `%s`." % (
              meta.get("machine", "?"), meta.get("threads", "?"), meta.get("batch", 16), meta.get("runs", "?"),
              meta.get("command", "bash bench/run_peers.sh")), "",
          "| row | version | precision | median ms per batch | min | max | peak RSS MB | mask Dice vs PyTorch fp32 "
          "| max abs diff | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        if others and i == len(headline) + len(peers):
            md.append("| **our other rows** | | | | | | | | | |")
        if r.get("error"):
            md.append("| %s | %s | | | | | | | | **not measured**: %s |" % (
                r.get("label", r["key"]), r.get("version", ""), r["error"].replace("|", "/")))
            continue
        notes = list(r.get("notes", []))
        if r.get("plan") and r["key"].startswith("ours:"):
            notes.append("plan: " + r["plan"])
        if r.get("config"):
            notes.insert(0, r["config"])
        md.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.get("label", r["key"]), r.get("version", ""), r.get("precision", ""), num(r.get("latency_median_ms")),
            num(r.get("latency_min_ms")), num(r.get("latency_max_ms")), num(r.get("peak_rss_mb")),
            num(r.get("mask_dice_vs_reference"), "%.4f"), num(r.get("max_abs_diff"), "%.2e"),
            "; ".join(notes).replace("|", "/")))
    if pairs:
        md += ["", "Pairs: each peer run once more, alone, between two runs of our matching row; the speed-up is "
               "the peer's median over ours (before / after).", "",
               "| peer | peer median (min-max) ms | our row | ours before, after ms | ours faster by |",
               "|---|---|---|---|---|"]
        for p in pairs:
            if p.get("error"):
                md.append("| %s | | %s | | not measured: %s |" % (p["peer"], p["ours"], p["error"].replace("|", "/")))
            else:
                md.append("| %s | %.0f (%.0f-%.0f) | %s | %.0f, %.0f | %.2fx, %.2fx |" % (
                    p["peer"], p["peer_median_ms"], p["peer_min_ms"], p["peer_max_ms"], p["ours"],
                    p["ours_before_ms"], p["ours_after_ms"], p["speedup_before"], p["speedup_after"]))
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, pairs=pairs), f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
