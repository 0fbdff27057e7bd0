#!/usr/bin/env python3
"""Runs one peer row in a process of its own and writes it as JSON in the field names of our rows
(bench/peer_fidelity --json): latency_median_ms, latency_min_ms, latency_max_ms, runs_ms, peak_rss_mb,
mask_dice_vs_reference, max_abs_diff, mean_abs_diff. A row that fails or times out is written with an
'error' instead, so the table says why it is missing. Standard library only.

usage: run_row.py --key KEY --work DIR --json OUT.json [--runs 5] [--threads 2] [--profile 0]
       run_row.py --list
  DIR: the copy of ../shared/peers that prep.py filled (input.bin, ref_logits.bin, the ONNX files) and
  ov_prepare.py's IR files in DIR/ov.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VENV = os.path.join(ROOT, "build", "peers-venv", "bin", "python")
VENV_TORCH2 = os.path.join(ROOT, "build", "peers-venv-torch2", "bin", "python")
DEBIAN_PY = "/usr/bin/python3"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread"
REF_BLAS = "/usr/lib/x86_64-linux-gnu/blas"

# key: (label, interpreter, script, arguments after the common ones, extra environment)
ROWS = {
    "pt_fp32": ("PyTorch (Debian) fp32: TorchScript trace+freeze+optimize_for_inference, OpenBLAS",
                DEBIAN_PY, "{work}/bench_torch.py", ["--mode", "jit"], {"LD_LIBRARY_PATH": OPENBLAS}),
    "pt_fx_int8": ("PyTorch (Debian) int8 static: FX prepare/convert, oneDNN engine",
                   DEBIAN_PY, "{work}/bench_torch.py", ["--mode", "fx", "--engine", "onednn"],
                   {"LD_LIBRARY_PATH": REF_BLAS}),
    "ort_fp32": ("ONNX Runtime fp32", VENV, "{here}/ort_peer.py", ["--model", "{work}/resunet_fp32.onnx"], {}),
    "ort_int8": ("ONNX Runtime int8 static: QDQ (ORT quantize_static style)", VENV, "{here}/ort_peer.py",
                 ["--model", "{work}/resunet_int8_qdq_full.onnx"], {}),
    "ov_fp32": ("OpenVINO fp32 (precision hint f32, latency hint)", VENV, "{here}/ov_peer.py",
                ["--model", "{work}/ov/resunet_fp32.xml", "--precision", "f32"], {}),
    "ov_bf16": ("OpenVINO bf16 (precision hint bf16, latency hint)", VENV, "{here}/ov_peer.py",
                ["--model", "{work}/ov/resunet_fp32.xml", "--precision", "bf16"], {}),
    "ov_int8": ("OpenVINO int8: NNCF post-training quantization (precision hint f32)", VENV, "{here}/ov_peer.py",
                ["--model", "{work}/ov/resunet_int8_nncf.xml", "--precision", "f32"], {}),
    "pt2_fp32": ("PyTorch 2.x fp32: torch.compile (Inductor, freezing)", VENV_TORCH2, "{here}/pt2_peer.py",
                 ["--work", "{work}", "--mode", "fp32"], {}),
    "pt2_int8": ("PyTorch 2.x int8 static: torchao PT2E X86InductorQuantizer, torch.compile", VENV_TORCH2,
                 "{here}/pt2_peer.py", ["--work", "{work}", "--mode", "int8"], {}),
}


def command(key, work, runs, threads, profile):
    label, python, script, extra, env = ROWS[key]
    fill = lambda s: s.format(work=work, here=HERE)  # noqa: E731
    cmd = [python, fill(script), "--threads", str(threads)]
    if python == DEBIAN_PY:  # ../shared/peers/bench_torch.py: its own flags, its own input and reference
        cmd += ["--runs", str(runs), "--min-runs", str(runs), "--budget", "1e9", "--warmup", "1", "--no-isa"]
    else:
        cmd += ["--runs", str(runs), "--input", os.path.join(work, "input.bin"),
                "--reference", os.path.join(work, "ref_logits.bin")]
        if profile and key.startswith("ov_"):
            cmd += ["--profile", str(profile)]
    env = dict(env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return label, python, cmd + [fill(a) for a in extra], env


def normalized(raw):
    """bench_torch.py's fields (../shared/peers) under our names; the project's runners already use them."""
    if "median_ms" in raw:
        fd = raw.pop("fidelity", {}) or {}
        raw.update(latency_median_ms=raw.pop("median_ms"), latency_min_ms=raw.pop("min_ms"),
                   latency_max_ms=raw.pop("max_ms"), runs_ms=raw.pop("times_ms", []),
                   mask_dice_vs_reference=fd.get("dice"), max_abs_diff=fd.get("max_abs"),
                   mean_abs_diff=fd.get("mean_abs"))
        peer = raw.pop("peer", "")
        raw["engine"], _, raw["version"] = peer.partition(" ")
        if raw.get("setup_s") is not None:
            raw["compile_ms"] = raw.pop("setup_s") * 1e3
    return raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", choices=sorted(ROWS))
    ap.add_argument("--work")
    ap.add_argument("--json")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, help="OpenVINO rows: the N slowest nodes")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--list", action="store_true", help="print the row keys and what each row is")
    args = ap.parse_args()
    if args.list:
        for k, v in ROWS.items():
            print("%-11s %s" % (k, v[0]))
        return 0
    if not (args.key and args.work and args.json):
        ap.error("--key, --work and --json are needed")
    label, python, cmd, env = command(args.key, os.path.abspath(args.work), args.runs, args.threads, args.profile)
    row = dict(key=args.key, label=label, threads=args.threads)
    log = os.path.splitext(args.json)[0] + ".log"
    if not os.access(python, os.X_OK):
        row["error"] = "not installed: %s (bash bench/install-peers.sh%s)" % (
            python, " --torch2" if python == VENV_TORCH2 else "")
    else:
        start = time.time()
        with open(log, "w") as lf:
            lf.write("$ %s\n" % " ".join(cmd))
            lf.flush()
            try:
                p = subprocess.run(cmd, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=lf,
                                   timeout=args.timeout, cwd=args.work)
                out, rc = p.stdout.decode(errors="replace"), p.returncode
            except subprocess.TimeoutExpired as e:
                out, rc = (e.stdout or b"").decode(errors="replace"), "timeout after %.0f s" % args.timeout
            lf.write(out)
        results = [ln[7:] for ln in out.splitlines() if ln.startswith("RESULT ")]
        if results:
            raw = normalized(json.loads(results[-1]))
            raw.pop("label", None)  # bench_torch.py's own, empty
            row.update(raw)
        else:
            with open(log) as lf:
                tail = [ln.strip() for ln in lf if ln.strip()][-3:]
            row["error"] = "exit %s: %s" % (rc, " | ".join(tail)[-400:])
        row["wall_s"] = round(time.time() - start, 1)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, args.json)
    if row.get("error"):
        print("   %s: not measured: %s" % (args.key, row["error"]))
        return 1
    print("   %s: median %.0f ms (min %.0f, max %.0f), peak RSS %.0f MB, max|diff| %.2e, mask Dice %.4f" % (
        args.key, row["latency_median_ms"], row["latency_min_ms"], row["latency_max_ms"], row["peak_rss_mb"],
        row["max_abs_diff"], row["mask_dice_vs_reference"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
