#!/usr/bin/env bash
# Puts ONNX Runtime's shared library (from the PyPI wheel onnxruntime==1.31.1) at
#   .ddit/ort/libonnxruntime.so.1.31.1
# and prints its path. Idempotent: does nothing when the library is already there.
# ddit loads it at run time (ort `load-dynamic`); ORT_DYLIB_PATH overrides the location.
# DDIT_ORT_PACKAGE=onnxruntime-gpu (with DDIT_ORT_VERSION) takes the GPU wheel's libraries instead,
# the CUDA and TensorRT providers' included (deploy/docker/Dockerfile.gpu).
set -euo pipefail
ORT_VERSION="${DDIT_ORT_VERSION:-1.31.1}"
PACKAGE="${DDIT_ORT_PACKAGE:-onnxruntime}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${DDIT_ORT_DIR:-$ROOT/.ddit/ort}"
LIB="$DEST/libonnxruntime.so.$ORT_VERSION"
# The GPU wheel's own library has the same name: it counts as there only with its CUDA provider.
MARK="$LIB"
[[ "$PACKAGE" = onnxruntime-gpu ]] && MARK="$DEST/libonnxruntime_providers_cuda.so"
if [[ -f "$LIB" && -f "$MARK" ]]; then
  echo "$LIB"
  exit 0
fi
mkdir -p "$DEST"
PY="$(command -v python3 || true)"
if [[ -z "$PY" ]]; then
  echo "scripts/ort.sh: python3 with pip is needed to download the onnxruntime wheel" >&2
  exit 1
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "$PACKAGE==$ORT_VERSION" >&2
WHEEL="$(ls "$TMP"/"${PACKAGE//-/_}"-*.whl)"
"$PY" - "$WHEEL" "$DEST" <<'PYEOF'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as dst:
                dst.write(src.read())
PYEOF
test -f "$LIB"
echo "$LIB"
