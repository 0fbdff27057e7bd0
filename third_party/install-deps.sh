#!/usr/bin/env bash
# Installs the Debian 12 packages this project builds and runs with, then oneDNN 3.x from PyPI into
# third_party/onednn3/ (the second oneDNN tests/run_all.sh builds against; ignored by git). Idempotent;
# run as root. RESUNET_SKIP_ONEDNN3=1 leaves oneDNN 3.x out.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# oneDNN 3.x: the wheels of onednn3-requirements.txt (exact versions and hashes), unpacked rather than
# pip-installed: a wheel is a zip whose <name>.data/data/ folder is the prefix (include/, lib/, lib/cmake/),
# and unpacking puts it in one known place whatever pip's install scheme on this Python. The three
# identical copies of the library become one file and two links.
install_onednn3() {
  local prefix="$here/onednn3"
  if cmp -s "$here/onednn3-requirements.txt" "$prefix/requirements.txt" && [ -f "$prefix/lib/libdnnl.so" ]; then
    echo "install-deps: oneDNN 3.x already in third_party/onednn3"
    return 0
  fi
  onednn3_work="$(mktemp -d)"
  trap 'rm -rf "$onednn3_work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$onednn3_work/wheels" \
    -r "$here/onednn3-requirements.txt"
  for wheel in "$onednn3_work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$onednn3_work/unpacked"
  done
  rm -rf "$prefix.partial"
  mkdir -p "$prefix.partial"
  cp -a "$onednn3_work"/unpacked/*.data/data/. "$prefix.partial/"
  (cd "$prefix.partial/lib" && ln -sf libdnnl.so.3.* libdnnl.so.3 && ln -sf libdnnl.so.3 libdnnl.so)
  cp "$here/onednn3-requirements.txt" "$prefix.partial/requirements.txt"  # what is installed, for the check above
  rm -rf "$prefix"
  mv "$prefix.partial" "$prefix"
  echo "install-deps: oneDNN $(awk '/define DNNL_VERSION_(MAJOR|MINOR|PATCH) / {printf "%s%s", sep, $3; sep="."}' \
    "$prefix/include/oneapi/dnnl/dnnl_version.h") in third_party/onednn3"
}
mapfile -t packages < <(grep -v '^\s*#' "$here/packages.txt" | awk 'NF {print $1}')
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
else
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[ "${RESUNET_SKIP_ONEDNN3:-0}" = 1 ] || install_onednn3
