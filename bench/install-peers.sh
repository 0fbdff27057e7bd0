#!/usr/bin/env bash
# Installs the benchmark peers that bench/run_peers.sh measures beside our engines. They are peers only:
# never dependencies of the project, never part of third_party/install-deps.sh or of CI.
#   - Debian 12: python3-torch (PyTorch 1.13.1, which also prepares the shared network's weights, input,
#     reference logits and ONNX files), python3-onnx, python3-numpy, OpenBLAS, python3-venv;
#   - PyPI, into the virtual environment build/peers-venv (ignored by git): OpenVINO, NNCF (OpenVINO's
#     post-training int8 quantization), ONNX Runtime, each at the version pinned below;
#   - with --torch2 also PyTorch 2.x and torchao (their x86 int8 path) into build/peers-venv-torch2: PyPI
#     serves only the CUDA build of torch (5.4 GB installed with its nvidia-* and triton wheels;
#     see docs/peers.md).
#
#   bash bench/install-peers.sh [--torch2]      (as root for the Debian part; rerunning it is cheap)
set -euo pipefail
cd "$(dirname "$0")/.."
OPENVINO=2026.4.1 NNCF=3.4.0 ONNXRUNTIME=1.31.1 ONNX=1.23.2 NUMPY=2.4.6
TORCH2=2.15.0 TORCHAO=0.18.0
torch2=0
for a in "$@"; do
  case "$a" in
    --torch2) torch2=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install-peers: unknown argument '$a' (usage: bash bench/install-peers.sh [--torch2])" >&2; exit 2 ;;
  esac
done
debian=(python3-torch python3-onnx python3-numpy python3-venv libopenblas0-pthread)
missing=()
for p in "${debian[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install-peers: as root: apt-get install ${missing[*]}" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q "${missing[@]}"
fi
# Debian's interpreter, so that the venv does not depend on whichever python3 is first on PATH.
venv() {  # folder, then pip requirements
  local dir="$1"; shift
  [ -x "$dir/bin/python" ] || /usr/bin/python3 -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
venv build/peers-venv "openvino==$OPENVINO" "nncf==$NNCF" "onnxruntime==$ONNXRUNTIME" "onnx==$ONNX" "numpy==$NUMPY"
# OpenVINO's and NNCF's usage telemetry off: nothing but the package registries is reachable here.
build/peers-venv/bin/opt_in_out --opt_out > /dev/null || true
build/peers-venv/bin/python - <<'PY'
import nncf, numpy, onnxruntime, openvino
print("peers-venv: openvino %s, nncf %s, onnxruntime %s, numpy %s" % (
    openvino.get_version().split("-")[0], nncf.__version__, onnxruntime.__version__, numpy.__version__))
PY
/usr/bin/python3 -c 'import torch; print("Debian PyTorch %s" % torch.__version__)'
if [ $torch2 = 1 ]; then
  venv build/peers-venv-torch2 "torch==$TORCH2" "torchao==$TORCHAO" "numpy==$NUMPY"
  build/peers-venv-torch2/bin/python -c 'import torch, torchao; print("peers-venv-torch2: torch %s, torchao %s" % (torch.__version__, torchao.__version__))'
fi
