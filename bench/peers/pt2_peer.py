#!/usr/bin/env python3
"""One PyTorch 2.x row per process (build/peers-venv-torch2: bash bench/install-peers.sh --torch2), on the
network of ../shared/peers/resunet.py (the same seeded weights as the Debian PyTorch rows; fidelity against
their fp32 logits checks that):
  --mode fp32  torch.compile (Inductor) with freezing, in inference mode;
  --mode int8  PyTorch's current x86 int8 path: torch.export, torchao's PT2E prepare/convert with
               X86InductorQuantizer (its default config: static u8 activations, per-channel s8 weights),
               then torch.compile with freezing, which lowers the Q/DQ pattern to oneDNN int8 kernels.
               Calibrated on the images our static int8 row and NNCF calibrate on: input.bin's first 4
               (each repeated 4 times, as the export has a static batch of 16).
Inductor compiles C++ at the first run (a C++ compiler is needed); that time is compile_ms.
usage: pt2_peer.py --work DIR --mode fp32|int8 --input input.bin --reference ref_logits.bin [--threads 2] [--runs 5]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

ap = pc.parser(__doc__)
ap.add_argument("--work", required=True, help="the copy of ../shared/peers (resunet.py, bn_stats.npz)")
ap.add_argument("--mode", required=True, choices=["fp32", "int8"])
ap.add_argument("--calib", type=int, default=4)
args = ap.parse_args()

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

torch.set_num_threads(args.threads)
inductor_config.freezing = True
sys.path.insert(0, args.work)
import resunet as R  # noqa: E402

row = dict(engine="PyTorch", version=torch.__version__.split("+")[0], threads=args.threads, batch=args.batch,
           notes=[], precision="fp32" if args.mode == "fp32" else "int8 static (PT2E, X86InductorQuantizer)")
x, ref = pc.inputs(args)
xt = torch.from_numpy(x)
model = R.build_model().eval()
t = time.time()
with torch.no_grad():
    if args.mode == "fp32":
        graph = model
    else:
        import torchao  # noqa: E402
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq  # noqa: E402
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

        row["version"] += ", torchao " + torchao.__version__
        exported = torch.export.export(model, (xt,)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        calib = xt[:args.calib].repeat_interleave(args.batch // args.calib, dim=0)
        prepared(calib)
        graph = convert_pt2e(prepared)
        row["quantize_ms"] = (time.time() - t) * 1e3
    compiled = torch.compile(graph)
    compiled(xt)  # Inductor compiles here
    row["compile_ms"] = (time.time() - t) * 1e3
    fields, out = pc.time_runs(lambda: compiled(xt), args.runs)
row.update(fields)
row.update(pc.fidelity(ref, out.float().numpy()))
row["peak_rss_mb"] = pc.peak_rss_mb()
row["config"] = "torch.compile, inductor freezing, %d threads" % torch.get_num_threads()
pc.emit(row)
