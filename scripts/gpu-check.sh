#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU (issue 33, part 6), as one command:
#   scripts/gpu-check.sh
# Without a GPU (no nvidia-smi, or it lists no device) it says so in one line and exits 0.
# With one, it:
# 1. installs onnxruntime-gpu of the version scripts/ort.sh pins, from PyPI, into .ddit/gpu/venv, with
#    the CUDA and cuDNN wheels of the majors its CUDA provider library links against and the
#    TensorRT wheel (tensorrt-cuXX-libs) of the major its TensorRT provider library links against,
#    read from those libraries; ORT_DYLIB_PATH and LD_LIBRARY_PATH point at them;
# 2. builds the release binaries;
# 3. on the tiny fixture (tests/fixtures/tiny-f32) and the medium checkpoint (.ddit/bench/medium, made
#    by tools/bench/make_medium.py as scripts/bench.sh makes it; it needs the reference stack of
#    tools/reference/requirements.txt in DDIT_BENCH_VENV, default /opt/ddit-venv, else .ddit/gpu/ref):
#    for fp32 on CUDA and on TensorRT, and half precision (the exporter's `--precision fp16` where it
#    offers one; else TensorRT's own fp16 engines, `--trt-fp16`, and CUDA half precision skipped):
#    - per-segment parity against the CPU (`ddit-worker parity`: the largest absolute difference of
#      each segment on the same seeded inputs) and the placement (nodes per execution provider);
#    - a 28-step text-to-image job and a caption of its image, each through `ddit-worker batch`,
#      run twice (the first builds TensorRT engines into .ddit/gpu/trt-cache); the second run's
#      seconds, model load excluded, are reported;
# 4. prints one Markdown table. Logs of every command: .ddit/gpu/logs.
# Env: DDIT_GPU_CHECK_MODELS (default "tiny medium").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi is missing or lists no device); nothing to check"
  exit 0
fi
ORT_VERSION="$(sed -n 's/^ORT_VERSION=//p' scripts/ort.sh)"
GPU="$PWD/.ddit/gpu"
VENV="$GPU/venv"
LOGS="$GPU/logs"
WORK="$GPU/work"
rm -rf "$LOGS" "$WORK"
mkdir -p "$LOGS" "$WORK" "$GPU/trt-cache"
say() { echo "gpu-check: $*" >&2; }

# 1. ONNX Runtime for GPUs and the libraries it was built against.
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import onnxruntime" 2>/dev/null; then
  say "installing onnxruntime-gpu==$ORT_VERSION"
  "${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" >"$LOGS/pip.log" 2>&1 ||
    { say "pip failed: $LOGS/pip.log"; exit 1; }
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CAPI="$SITE/onnxruntime/capi"
needed() { # the major version of library $2 that provider library $1 links against
  "$VENV/bin/python" - "$CAPI/libonnxruntime_providers_$1.so" "$2" <<'PY'
import re, sys
try:
    lib = open(sys.argv[1], "rb").read()
except OSError:
    lib = b""
m = re.search(re.escape(sys.argv[2]).encode() + rb"\.so\.(\d+)", lib)
print(m.group(1).decode() if m else "")
PY
}
CUDA_MAJOR="$(needed cuda libcudart)"
CUDNN_MAJOR="$(needed cuda libcudnn)"
TRT_MAJOR="$(needed tensorrt libnvinfer)"
[ -n "$CUDA_MAJOR" ] || { say "cannot read the CUDA major of $CAPI/libonnxruntime_providers_cuda.so"; exit 1; }
if [ -z "$(find "$SITE/nvidia" -name "libcudart.so.$CUDA_MAJOR*" 2>/dev/null | head -1)" ]; then
  # A wheel without the cuda/cudnn extras: the runtime wheels of the same majors.
  say "installing the CUDA $CUDA_MAJOR and cuDNN ${CUDNN_MAJOR:-?} runtime wheels"
  cu="cu$CUDA_MAJOR"
  "${PIP[@]}" "nvidia-cuda-runtime-$cu" "nvidia-cublas-$cu" "nvidia-cufft-$cu" "nvidia-curand-$cu" \
    "nvidia-cuda-nvrtc-$cu" "nvidia-cudnn-$cu${CUDNN_MAJOR:+==$CUDNN_MAJOR.*}" >>"$LOGS/pip.log" 2>&1 ||
    { say "pip failed: $LOGS/pip.log"; exit 1; }
fi
if [ -n "$TRT_MAJOR" ] && ! ls "$SITE"/tensorrt_libs/libnvinfer.so.* >/dev/null 2>&1; then
  say "installing tensorrt-cu$CUDA_MAJOR-libs==$TRT_MAJOR.*"
  "${PIP[@]}" "tensorrt-cu$CUDA_MAJOR-libs==$TRT_MAJOR.*" >>"$LOGS/pip.log" 2>&1 ||
    say "TensorRT $TRT_MAJOR libraries not installed (pip.log); the TensorRT rows will fail"
fi
LIBS="$(find "$SITE/nvidia" -maxdepth 2 -type d -name lib 2>/dev/null | sort | paste -sd: -)"
export LD_LIBRARY_PATH="$CAPI:$SITE/tensorrt_libs:$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ORT_DYLIB_PATH="$(find "$CAPI" -maxdepth 1 -name 'libonnxruntime.so*' | sort | tail -1)"
[ -n "$ORT_DYLIB_PATH" ] || { say "no libonnxruntime.so in $CAPI"; exit 1; }
export ORT_DYLIB_PATH

# 2. The binaries.
cargo build --release --bins >"$LOGS/build.log" 2>&1 || { say "build failed: $LOGS/build.log"; exit 1; }
W=target/release/ddit-worker
E=target/release/ddit-export
HELP="$($E convert --help)"
grep -q -- '--precision' <<<"$HELP" && HAS_PRECISION=1 || HAS_PRECISION=
grep -q -- '--target' <<<"$HELP" && grep -qi 'tensorrt' <<<"$HELP" && HAS_TRT_TARGET=1 || HAS_TRT_TARGET=

# 3. The checks.
checkpoint() { # the checkpoint folder of model $1, made if needed
  case "$1" in
    tiny) echo tests/fixtures/tiny-f32/checkpoint ;;
    medium)
      local out=.ddit/bench/medium py="${DDIT_BENCH_VENV:-/opt/ddit-venv}/bin/python"
      if [ ! -f "$out/model_index.json" ]; then
        if ! "$py" -c "import torch, diffusers, transformers" 2>/dev/null; then
          [ -x "$GPU/ref/bin/python" ] || python3 -m venv "$GPU/ref"
          "$GPU/ref/bin/pip" install --quiet -r tools/reference/requirements.txt >>"$LOGS/pip.log" 2>&1
          py="$GPU/ref/bin/python"
        fi
        "$py" tools/bench/make_medium.py --out "$out" >"$LOGS/make_medium.log" 2>&1 || return 1
      fi
      echo "$out"
      ;;
  esac
}
export_pkg() { # package $2 of checkpoint $1 with export flags $3...
  local ck="$1" out="$2"
  shift 2
  [ -f "$out/manifest.json" ] || $E convert --checkpoint "$ck" --out "$out" "$@" >>"$LOGS/export.log" 2>&1
}
timed() { # seconds `batch` reports for job file $2 on row $1 (package $3, providers $4, flags $5...)
  local id="$1" jobs="$2" pkg="$3" prov="$4" log
  shift 4
  for run in 1 2; do
    rm -rf "$WORK/$id-out"
    log="$($W batch --model "$pkg" --providers "$prov" --jobs "$jobs" --out "$WORK/$id-out" \
      --max-batch 1 --no-progress --trt-cache-dir "$GPU/trt-cache" "$@" 2>&1 >/dev/null)" || {
      echo "$log" >>"$LOGS/$id.log"
      return 1
    }
    echo "$log" >>"$LOGS/$id.log"
    grep -Eq '"status": ?"succeeded"' "$WORK/$id-out/results.jsonl" || return 1
  done
  sed -n 's/^[0-9]* jobs in \([0-9.]*\)s: .*/\1/p' <<<"$log"
}
check() { # one row: id, model, precision, providers, package, extra engine flags...
  local id="$1" model="$2" prec="$3" prov="$4" pkg="$5"
  shift 5
  say "$id: $model $prec on $prov"
  printf '%s\t%s\t%s\t%s\n' "$id" "$model" "$prec" "$prov" >>"$WORK/rows.tsv"
  $W parity --model "$pkg" --providers cpu --against "$prov" --trt-cache-dir "$GPU/trt-cache" \
    "$@" >"$WORK/$id.parity.tsv" 2>>"$LOGS/$id.log" || echo "error	see $LOGS/$id.log" >"$WORK/$id.parity.tsv"
  echo '{"job_id": "g", "task": "generate", "params": {"prompt": "a red circle above a blue square", "steps": 28, "seed": 1}}' \
    >"$WORK/$id-generate.jsonl"
  timed "$id" "$WORK/$id-generate.jsonl" "$pkg" "$prov" "$@" >"$WORK/$id.generate.s" ||
    echo failed >"$WORK/$id.generate.s"
  local png
  png="$(ls "$WORK/$id-out"/g/*.png 2>/dev/null | head -1 || true)"
  if [ -n "$png" ]; then
    cp "$png" "$WORK/$id.png"
    printf '{"job_id": "c", "task": "caption", "params": {"image": "%s", "seed": 1}}\n' \
      "$WORK/$id.png" >"$WORK/$id-caption.jsonl"
    timed "$id" "$WORK/$id-caption.jsonl" "$pkg" "$prov" "$@" >"$WORK/$id.caption.s" ||
      echo failed >"$WORK/$id.caption.s"
  else
    echo "no image" >"$WORK/$id.caption.s"
  fi
}
: >"$WORK/rows.tsv"
SKIPPED=()
for model in ${DDIT_GPU_CHECK_MODELS:-tiny medium}; do
  if ! ck="$(checkpoint "$model")"; then
    SKIPPED+=("$model: no checkpoint (see $LOGS/make_medium.log)")
    continue
  fi
  p32="$WORK/$model-f32" ptrt="$WORK/$model-f32"
  export_pkg "$ck" "$p32" --weights f32 || { SKIPPED+=("$model: export failed ($LOGS/export.log)"); continue; }
  if [ -n "$HAS_TRT_TARGET" ]; then
    ptrt="$WORK/$model-trt"
    export_pkg "$ck" "$ptrt" --weights f32 --target tensorrt || ptrt="$p32"
  fi
  check "$model-fp32-cuda" "$model" fp32 cuda "$p32"
  check "$model-fp32-trt" "$model" fp32 tensorrt,cuda "$ptrt"
  if [ -n "$HAS_PRECISION" ]; then
    p16="$WORK/$model-f16"
    export_pkg "$ck" "$p16" --precision fp16 || { SKIPPED+=("$model f16: export failed"); continue; }
    p16trt="$p16"
    if [ -n "$HAS_TRT_TARGET" ]; then
      p16trt="$WORK/$model-f16-trt"
      export_pkg "$ck" "$p16trt" --precision fp16 --target tensorrt || p16trt="$p16"
    fi
    check "$model-fp16-cuda" "$model" fp16 cuda "$p16"
    # No --trt-fp16: the graphs are fp16 already (and it leaves T5 in fp32 anyway).
    check "$model-fp16-trt" "$model" fp16 tensorrt,cuda "$p16trt"
  else
    SKIPPED+=("$model fp16 on cuda: ddit-export offers no --precision (its --weights f16 stores f16 weights and computes in f32)")
    check "$model-fp16-trt" "$model" "fp16 (TensorRT --trt-fp16)" tensorrt,cuda "$ptrt" --trt-fp16
  fi
done

# 4. The table.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1 |
  sed "s/^/GPU: /; s/\$/; onnxruntime-gpu $ORT_VERSION, CUDA $CUDA_MAJOR, cuDNN ${CUDNN_MAJOR:-?}, TensorRT ${TRT_MAJOR:-?}/"
python3 - "$WORK" <<'PY'
import sys
from pathlib import Path
work = Path(sys.argv[1])
segs = ["text_encoder+context_embedder", "timestep_embed", "patch_embed", "joint_blocks+image_tail",
        "joint_blocks+text_tail", "image_head", "text_head", "vae_decoder", "vae_encoder (mean)",
        "vae_encoder (logvar)"]
short = ["T5+ctx", "temb", "patch", "blocks→img", "blocks→txt", "img head", "txt head", "VAE dec",
         "VAE enc μ", "VAE enc logσ²"]
head = ["model", "precision", "providers", "placement (nodes)"] + [f"{s} Δ" for s in short] + \
       ["generate 28 steps (s)", "caption (s)"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
def read(p):
    return p.read_text().strip() if p.exists() else ""
for line in read(work / "rows.tsv").splitlines():
    rid, model, prec, prov = line.split("\t")
    place, diffs = [], {}
    for l in read(work / f"{rid}.parity.tsv").splitlines():
        f = l.split("\t")
        if f[0] == "placement":
            place.append(f"{f[1].replace('ExecutionProvider', '')} {f[2]}")
        elif f[0] == "parity":  # the reason of an error: work/{row}.parity.tsv
            diffs[f[1]] = "error" if f[2].startswith("error") else f[2]
        elif f[0] == "error":
            place.append("parity failed: " + f[1])
    cells = [model, prec, prov, ", ".join(place) or "–"] + [diffs.get(s, "–") for s in segs]
    cells += [read(work / f"{rid}.generate.s") or "–", read(work / f"{rid}.caption.s") or "–"]
    print("| " + " | ".join(cells) + " |")
PY
for s in ${SKIPPED[@]+"${SKIPPED[@]}"}; do echo "skipped: $s"; done
