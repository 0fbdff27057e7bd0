#!/usr/bin/env python3
"""One OpenVINO (CPU plugin) row per process: an IR from ov_prepare.py, the batch reshaped to a static
shape, compiled with the latency hint, INFERENCE_NUM_THREADS and an explicit INFERENCE_PRECISION_HINT
(without one the CPU plugin runs bf16 wherever the CPU has it). Prints 'RESULT {json}': latency, peak
RSS, fidelity against PyTorch's fp32 logits, and which precision the plugin ran its convolutions in.
--profile N also adds the N slowest nodes of the last run (PERF_COUNT, get_profiling_info()).
usage: ov_peer.py --model X.xml --precision f32|bf16 --input input.bin --reference ref_logits.bin
                  [--threads 2] [--runs 5] [--profile 0]
"""
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

ap = pc.parser(__doc__)
ap.add_argument("--model", required=True)
ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
ap.add_argument("--profile", type=int, default=0, help="report the N slowest nodes of the last run")
args = ap.parse_args()

import openvino as ov  # noqa: E402

row = dict(engine="OpenVINO", version=ov.get_version().split("-")[0], model=os.path.basename(args.model),
           threads=args.threads, batch=args.batch, notes=[])
core = ov.Core()
caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
if args.precision == "bf16" and "BF16" not in caps:
    row["error"] = "this CPU has no bf16 (OPTIMIZATION_CAPABILITIES %s)" % " ".join(caps)
    pc.emit(row)
    sys.exit(0)
x, ref = pc.inputs(args)
t = time.time()
model = core.read_model(args.model)
model.reshape([args.batch, 3, pc.SIZE, pc.SIZE])
config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads,
          "INFERENCE_PRECISION_HINT": args.precision}
if args.profile:
    config["PERF_COUNT"] = True
compiled = core.compile_model(model, "CPU", config)
row["compile_ms"] = (time.time() - t) * 1e3
def text(value):  # ov.Type prints as <Type: 'float32'>; its own name is f32
    return value.to_string() if hasattr(value, "to_string") else str(value)


row["config"] = "; ".join("%s=%s" % (k, text(compiled.get_property(k))) for k in
                          ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS"))
request = compiled.create_infer_request()
fields, _ = pc.time_runs(lambda: request.infer({0: x}), args.runs)
row.update(fields)
row.update(pc.fidelity(ref, request.get_output_tensor(0).data))
row["peak_rss_mb"] = pc.peak_rss_mb()
# What the plugin ran: layer type, runtime precision (int8 convolutions show as u8) and kernel of each
# convolution in its executable graph, counted.
kinds = collections.Counter()
for op in compiled.get_runtime_model().get_ordered_ops():
    info = op.get_rt_info()
    field = lambda k: info[k].astype(str) if k in info else "?"  # noqa: E731
    if "onvolution" in field("layerType"):  # Convolution, Deconvolution
        kinds["%s %s %s" % (field("layerType"), field("runtimePrecision"), field("primitiveType"))] += 1
row["notes"].append("executable graph: " + ", ".join("%s x%d" % kv for kv in sorted(kinds.items())))
row["precision"] = ("int8 (NNCF)" if "int8" in args.model else "fp32") + ", hint " + args.precision
if args.profile:
    nodes = [p for p in request.get_profiling_info() if p.real_time.total_seconds() > 0]
    total = sum(p.real_time.total_seconds() for p in nodes) * 1e3
    nodes.sort(key=lambda p: -p.real_time.total_seconds())
    row["profile_total_ms"] = total
    row["layers"] = [dict(name=p.node_name, type=p.node_type, exec_type=p.exec_type,
                          ms=p.real_time.total_seconds() * 1e3) for p in nodes[:args.profile]]
    by_type = collections.Counter()
    for p in nodes:
        by_type["%s (%s)" % (p.node_type, p.exec_type)] += p.real_time.total_seconds() * 1e3
    row["profile_by_type"] = {k: round(v, 1) for k, v in by_type.most_common()}
pc.emit(row)
