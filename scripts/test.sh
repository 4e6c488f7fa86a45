#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Installs what it needs (ONNX Runtime's library and the Python client example's packages from
# PyPI, the deploy validators from PyPI/npm/Debian, podman from Debian), then: deploy validation,
# fmt, clippy, tests, the container image and its test.
# No test needs the PyTorch reference stack, a GPU or a network beyond the package registries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A clean CI build gains nothing from incremental caches, and they cost disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

echo "== onnxruntime"
ORT_DYLIB_PATH="$(scripts/ort.sh)"
export ORT_DYLIB_PATH
echo "$ORT_DYLIB_PATH"

echo "== services (RabbitMQ, Redis, SeaweedFS S3 on loopback)"
scripts/services.sh up
# shellcheck disable=SC1091
source .ddit/services/env

echo "== python client example (examples/python/requirements.txt into .ddit/pyclient)"
if ! .ddit/pyclient/bin/python -c "import pika, redis, boto3, pyarrow" 2>/dev/null; then
  python3 -m venv .ddit/pyclient
  .ddit/pyclient/bin/pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
fi

echo "== gateway test tools (curl and Chromium from Debian, playwright-core from npm)"
missing=()
command -v curl >/dev/null || missing+=(curl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi

echo "== deploy/ (Kubernetes + KEDA schemas, compose, dashboard)"
scripts/validate-deploy.sh

echo "== GPU check (one line and exit 0 without an NVIDIA GPU)"
scripts/gpu-check.sh

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The service without dataset shards (no tar, arrow, parquet: the `datasets` feature off).
cargo clippy -p ddit-worker --no-default-features --features service --all-targets -- -D warnings
# Local mode alone: no lapin, redis, aws-sdk or OpenTelemetry (the `service` feature off).
cargo clippy -p ddit-worker --no-default-features --all-targets -- -D warnings
# The test-only fault hooks (the chaos soak and the panic-isolation test build with them).
cargo clippy -p ddit-worker --features fault-injection --all-targets -- -D warnings
if cargo tree -p ddit-worker --no-default-features -e normal --prefix none |
  grep -E '^(lapin|redis|aws-sdk-s3|aws-config|opentelemetry[a-z_-]*|tokio) '; then
  echo "the local-only build pulls in a service dependency (above)" >&2
  exit 1
fi

echo "== cargo test"
# The end-to-end tests start the real ddit-worker binary: build it first, and once with the
# test-only fault-injection feature (the panic-isolation test), under another name.
cargo build -p ddit-worker --features fault-injection
cp target/debug/ddit-worker target/debug/ddit-worker-fault-injection
cargo build --workspace --bins
cargo test --workspace

echo "== bf16 graphs (ONNX Runtime's CPU provider has none of their kernels): onnx's reference evaluator against PyTorch's bf16 goldens"
if ! .ddit/onnxref/bin/python -c "import onnx, ml_dtypes, safetensors" 2>/dev/null; then
  python3 -m venv .ddit/onnxref
  .ddit/onnxref/bin/pip install --quiet --disable-pip-version-check \
    numpy==2.4.6 onnx==1.23.2 ml_dtypes==0.7.0 safetensors==0.8.0
fi
rm -rf .ddit/bf16-check
target/debug/ddit-export convert --checkpoint tests/fixtures/tiny-f32/checkpoint \
  --out .ddit/bf16-check --name tiny --precision bf16 >/dev/null
.ddit/onnxref/bin/python tools/reference/check_bf16.py .ddit/bf16-check

echo "== container image (podman, local Debian bases) and the container test"
# Builds deploy/docker/Dockerfile.cpu, then runs it as deploy/k8s/base says: the fetch-model init
# container, the worker and the gateway, jobs through the gateway, a SIGTERM drain.
# Also the GPU Dockerfile on a Debian stand-in for NVIDIA's base: it must build, run the CPU
# provider, and refuse a GPU provider whose libraries are missing with a clear error.
scripts/images.sh gpu
cargo test -p ddit-e2e --test container -- --ignored --test-threads=1
echo "== disk: target/ $(du -sh target | cut -f1), $(df -h --output=avail . | tail -1 | tr -d ' ') free"
