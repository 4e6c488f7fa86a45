#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# Installs what it needs (ONNX Runtime's library from PyPI), then: fmt, clippy, tests.
# No test needs Python, a GPU or a network beyond the package registries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== onnxruntime"
ORT_DYLIB_PATH="$(scripts/ort.sh)"
export ORT_DYLIB_PATH
echo "$ORT_DYLIB_PATH"

echo "== services (RabbitMQ, Redis, Garage S3 on loopback)"
scripts/services.sh up
# shellcheck disable=SC1091
source .ddit/services/env

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
# The end-to-end tests start the real ddit-worker binary: build it first.
cargo build --workspace --bins
cargo test --workspace
