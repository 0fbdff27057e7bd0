"""What every peer runner shares: the input batch and PyTorch's fp32 reference logits (made by
../shared/peers/prep.py), the timing loop, mask fidelity and peak RSS, and the one 'RESULT {json}' line
that bench/peers/run_row.py reads. Standard library and numpy only."""
import argparse
import json
import resource
import sys
import time

import numpy as np

SIZE = 224


def parser(doc):
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--input", required=True, help="input.bin: batch x 3 x 224 x 224 float32")
    ap.add_argument("--reference", required=True, help="ref_logits.bin: PyTorch fp32 logits, batch x 1 x 224 x 224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of the whole batch, after one warm-up")
    return ap


def load_floats(path, shape):
    data = np.fromfile(path, dtype=np.float32)
    if data.size < int(np.prod(shape)):
        raise SystemExit("%s: holds %d floats, fewer than %s" % (path, data.size, "x".join(map(str, shape))))
    return data[:int(np.prod(shape))].reshape(shape).copy()


def inputs(args):
    x = load_floats(args.input, (args.batch, 3, SIZE, SIZE))
    ref = load_floats(args.reference, (args.batch, 1, SIZE, SIZE))
    return x, ref


def fidelity(ref, out):
    """Max and mean abs difference of the logits, and the Dice of the masks at logit > 0."""
    ref = np.asarray(ref, dtype=np.float32).ravel()
    out = np.asarray(out, dtype=np.float32).ravel()
    if ref.size != out.size:
        raise SystemExit("output has %d values, the reference %d" % (out.size, ref.size))
    d = np.abs(ref.astype(np.float64) - out)
    a, b = ref > 0, out > 0
    den = int(a.sum() + b.sum())
    return dict(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()),
                mask_dice_vs_reference=float(2.0 * np.logical_and(a, b).sum() / den) if den else 1.0)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def time_runs(run, runs):
    """One warm-up, then `runs` timed calls of run(); -> (fields, last output)."""
    t = time.perf_counter()
    out = run()
    warmup_ms = (time.perf_counter() - t) * 1e3
    ms = []
    for i in range(runs):
        t = time.perf_counter()
        out = run()
        ms.append((time.perf_counter() - t) * 1e3)
        sys.stderr.write("\r  run %d/%d: %.0f ms   " % (i + 1, runs, ms[-1]))
    sys.stderr.write("\n")
    s = sorted(ms)
    return dict(latency_median_ms=float(np.median(s)), latency_min_ms=s[0], latency_max_ms=s[-1],
                runs_ms=[round(v, 1) for v in ms], warmup_ms=round(warmup_ms, 1)), out


def emit(row):
    print("RESULT " + json.dumps(row), flush=True)
