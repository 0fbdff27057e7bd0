#!/usr/bin/env python3
"""One ONNX Runtime (Python package, CPU execution provider) row per process: all graph optimizations,
intra-op threads as asked, one inter-op thread, sequential execution. Prints 'RESULT {json}': latency,
peak RSS, fidelity against PyTorch's fp32 logits, and the convolution ops of ORT's optimized graph
(a QDQ file whose Q/DQ pairs ORT fused shows QLinearConv), counted after the timed session is done.
usage: ort_peer.py --model X.onnx --input input.bin --reference ref_logits.bin [--threads 2] [--runs 5]
"""
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

ap = pc.parser(__doc__)
ap.add_argument("--model", required=True)
args = ap.parse_args()

import onnxruntime as ort  # noqa: E402


def session(path, threads, optimized_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


row = dict(engine="ONNX Runtime", version=ort.__version__, model=os.path.basename(args.model),
           threads=args.threads, batch=args.batch, notes=[],
           precision="int8 (QDQ)" if "int8" in args.model else "fp32")
x, ref = pc.inputs(args)
t = time.time()
sess = session(args.model, args.threads)
row["compile_ms"] = (time.time() - t) * 1e3
name = sess.get_inputs()[0].name
fields, out = pc.time_runs(lambda: sess.run(None, {name: x})[0], args.runs)
row.update(fields)
row.update(pc.fidelity(ref, out))
row["peak_rss_mb"] = pc.peak_rss_mb()
del sess
try:
    import onnx  # noqa: E402
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(args.model, 1, optimized)
        ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    row["notes"].append("optimized graph: " + ", ".join(
        "%s x%d" % kv for kv in sorted(ops.items()) if any(s in kv[0] for s in ("Conv", "QLinear", "Integer"))))
except Exception as e:  # noqa: BLE001  the row stands without the op count
    row["notes"].append("optimized graph not inspected: %s" % (e,))
pc.emit(row)
