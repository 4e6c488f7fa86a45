#!/usr/bin/env bash
# Local mode on the bundled demo model, no external services:
#   1. fetch ONNX Runtime's library (PyPI wheel), 2. build the release binaries,
#   3. export models/ddit-shapes into a model package, 4. run examples/demo-jobs.jsonl.
# Results: .ddit/demo/results.jsonl and the generated PNGs beside it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ORT_DYLIB_PATH="$(scripts/ort.sh)"
export ORT_DYLIB_PATH
cargo build --release --bins
PKG=.ddit/packages/ddit-shapes
if ! target/release/ddit-export inspect "$PKG" >/dev/null 2>&1; then
  # The canvas lengths (16 / 16 / 32) and the caption prompt come from the checkpoint's model_index.json.
  target/release/ddit-export convert --checkpoint models/ddit-shapes --out "$PKG" --name ddit-shapes --force
fi
target/release/ddit-export inspect "$PKG"
OUT=.ddit/demo
mkdir -p "$OUT"
# The demo's caption and VQA jobs read the ShapesEval renders.
target/release/ddit-worker batch --model "$PKG" --jobs examples/demo-jobs.jsonl --out "$OUT" "$@"
echo
echo "== results ($OUT/results.jsonl)"
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    what = r.get("text") or ", ".join(o["uri"] for o in r.get("outputs", [])) or (r.get("error") or {}).get("message", "")
    print(f'{r["job_id"]:<12} {r["status"]:<10} {what}')
PY
