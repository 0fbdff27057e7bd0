#!/usr/bin/env python3
"""OpenVINO's own files for the peer rows, made once beside the shared ONNX file (in its own process, so
that the timed rows' peak RSS is inference's alone, as a user who deploys an IR sees it):
  OUT/resunet_fp32.xml        the fp32 ONNX file converted to OpenVINO IR, weights kept fp32
                              (ov.save_model would store them fp16 by default);
  OUT/resunet_int8_nncf.xml   NNCF 3.x post-training quantization (nncf.quantize, default preset:
                              symmetric int8 activations, per-channel weights) of that IR, calibrated on
                              the images our static int8 row calibrates on: the first CALIB images of
                              input.bin, one image per calibration sample;
  OUT/prepare.json            versions and how long each step took.
usage: ov_prepare.py --onnx resunet_fp32.onnx --input input.bin --out DIR [--calib 4] [--threads 2]
"""
import argparse
import json
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("--onnx", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--calib", type=int, default=4, help="calibration images: the first N of input.bin")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402

os.makedirs(args.out, exist_ok=True)
info = dict(openvino=ov.get_version().split("-")[0], calibration_images=args.calib)
core = ov.Core()
core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
t = time.time()
model = core.read_model(args.onnx)
fp32_xml = os.path.join(args.out, "resunet_fp32.xml")
ov.save_model(model, fp32_xml, compress_to_fp16=False)
info["convert_s"] = round(time.time() - t, 1)

import nncf  # noqa: E402

info["nncf"] = nncf.__version__
x = np.fromfile(args.input, dtype=np.float32)
per_image = 3 * 224 * 224
if x.size < args.calib * per_image:
    raise SystemExit("%s: fewer than %d images" % (args.input, args.calib))
images = [x[i * per_image:(i + 1) * per_image].reshape(1, 3, 224, 224) for i in range(args.calib)]
t = time.time()
quantized = nncf.quantize(core.read_model(fp32_xml), nncf.Dataset(images), subset_size=args.calib)
info["nncf_quantize_s"] = round(time.time() - t, 1)
ov.save_model(quantized, os.path.join(args.out, "resunet_int8_nncf.xml"), compress_to_fp16=False)
with open(os.path.join(args.out, "prepare.json"), "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
