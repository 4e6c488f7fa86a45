#!/usr/bin/env bash
# ddit against the PyTorch reference on the same checkpoint, steps, canvas lengths and threads, in one
# run (docs/performance.md). Bounded: N items per task (default 16), then it stops.
#   scripts/bench.sh [N] [demo|medium]
#   scripts/bench.sh N gateway: the HTTP gateway's median submit-to-queued latency over N jobs
#   against publishing directly with confirms (tests/e2e/gateway_bench.rs), on the loopback services.
#   scripts/bench.sh N service: `serve` with one worker against `batch` on the same N generate jobs
#   and flags (tests/e2e/service_bench.rs; rounds: DDIT_BENCH_ROUNDS, default 6), on the loopback
#   services: the service tax.
# demo: models/ddit-shapes. medium: a random checkpoint at realistic width that
# tools/bench/make_medium.py writes into .ddit/bench/medium (hidden 768, 4 blocks, x8 VAE at 256 px,
# vocabulary 32 128); timing only.
# Env: DDIT_BENCH_THREADS (default: the machine's cores), DDIT_BENCH_REPEAT (default 2: rounds of
# both sides in turn, each side's time for a task its fastest round; the machine is shared and drifts),
# DDIT_BENCH_VENV (default /opt/ddit-venv: the reference stack of tools/reference/requirements.txt,
# installed from PyPI when missing).
# ddit: `ddit-worker batch --max-batch 8` on the f32 package and on the `--weights int8` one, timed by
# batch itself from the loaded model to the last result written (its "N jobs in S s" line); the int8
# ratio is against the same fp32 reference.
# PyTorch: tools/bench/reference_speed.py (all prompts in one CFG-doubled call; captions and VQA one
# image at a time with the no-change cache), model load and a warm-up excluded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N="${1:-16}"
WHICH="${2:-demo}"
if [ "$WHICH" = gateway ] || [ "$WHICH" = service ]; then
  scripts/services.sh up
  # shellcheck disable=SC1091
  source .ddit/services/env
  ORT_DYLIB_PATH="$(scripts/ort.sh)"
  export ORT_DYLIB_PATH
  cargo build --release -p ddit-worker --bin ddit-worker
  DDIT_WORKER_BIN="$PWD/target/release/ddit-worker" DDIT_BENCH_JOBS="$N" \
    exec cargo test --release -p ddit-e2e --test "${WHICH}_bench" -- --ignored --nocapture
fi
THREADS="${DDIT_BENCH_THREADS:-$(nproc)}"
REPEAT="${DDIT_BENCH_REPEAT:-2}"
VENV="${DDIT_BENCH_VENV:-/opt/ddit-venv}"
SET=models/shapes-eval
ORT_DYLIB_PATH="$(scripts/ort.sh)"
export ORT_DYLIB_PATH
if ! "$VENV/bin/python" -c "import torch, diffusers, transformers, onnx, onnxruntime" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tools/reference/requirements.txt
fi
case "$WHICH" in
  demo) MODEL=models/ddit-shapes ;;
  medium)
    MODEL=.ddit/bench/medium
    [ -f "$MODEL/model_index.json" ] || "$VENV/bin/python" tools/bench/make_medium.py --out "$MODEL"
    ;;
  *) echo "usage: scripts/bench.sh [N] [demo|medium|gateway|service]" >&2; exit 2 ;;
esac
cargo build --release --bins
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for w in f32 int8; do
  target/release/ddit-export convert --checkpoint "$MODEL" --out "$WORK/pkg-$w" --name ddit-shapes \
    --weights "$w" >/dev/null
done

# The same items on both sides: scene captions as prompts, scene images, each scene's first question.
python3 - "$SET" "$N" "$WORK" <<'PY'
import json, sys
set_, n, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
scenes = [json.loads(l) for l in open(f"{set_}/scenes.jsonl")][:n]
jobs = {
    "generate": [{"task": "generate", "params": {"prompt": s["caption"], "seed": s["id"]}} for s in scenes],
    "caption": [{"task": "caption", "params": {"image": f"{set_}/{s['image']}", "seed": s["id"]}} for s in scenes],
    "vqa": [{"task": "vqa", "params": {"image": f"{set_}/{s['image']}", "question": s["qa"][0]["question"], "seed": s["id"]}} for s in scenes],
}
for task, js in jobs.items():
    with open(f"{work}/{task}.jsonl", "w") as f:
        for i, j in enumerate(js):
            f.write(json.dumps({"job_id": f"{task}-{i}", **j}) + "\n")
open(f"{work}/none.jsonl", "w").close()
PY

secs() { # the seconds `batch` reports for the jobs of file $2 on package $1 (model load excluded)
  rm -rf "$WORK/out"
  target/release/ddit-worker batch --model "$WORK/pkg-$1" --jobs "$2" --out "$WORK/out" \
    --threads "$THREADS" --max-batch 8 --no-progress 2>&1 >/dev/null |
    sed -n 's/^[0-9]* jobs in \([0-9.]*\)s: .*/\1/p'
}
# The machine's sgemm rate before ddit's runs; the reference measures it again after its own, and
# the ceiling is the highest of the four (torch and ONNX Runtime, before and after).
SGEMM=$("$VENV/bin/python" tools/bench/reference_speed.py --sgemm-only --threads "$THREADS")
# $REPEAT rounds, each of ddit's runs then the reference's, so that both sides see the same drifts
# of the machine; each side's time for a task is its fastest round. The last reference round also
# counts the FLOPs and the sgemm rate.
declare -A DDIT
REFS=()
for w in f32 int8; do secs "$w" "$WORK/none.jsonl" >/dev/null; done # warm the page cache
for round in $(seq "$REPEAT"); do
  for w in f32 int8; do
    for task in generate caption vqa; do
      s=$(secs "$w" "$WORK/$task.jsonl") || true
      [ -n "$s" ] || { echo "bench: batch printed no time for $w $task" >&2; exit 1; }
      DDIT[$w-$task]=$(python3 -c "print(min($s, float('${DDIT[$w-$task]:-inf}')))")
    done
  done
  count=()
  [ "$round" = "$REPEAT" ] || count=(--times-only)
  REFS+=("$("$VENV/bin/python" tools/bench/reference_speed.py --model "$MODEL" --set "$SET" \
    --n "$N" --threads "$THREADS" "${count[@]}")")
done
REF=$(python3 -c 'import json, sys
runs = [json.loads(a) for a in sys.argv[1:]]
out = {**runs[-1], "repeat": len(runs)}
for k in ("generate_s", "caption_s", "vqa_s"):
    out[k] = min(r[k] for r in runs)
print(json.dumps(out))' "${REFS[@]}")

python3 - "$N" "$THREADS" "$REF" "$MODEL" "$SGEMM" \
  "${DDIT[f32-generate]}" "${DDIT[f32-caption]}" "${DDIT[f32-vqa]}" \
  "${DDIT[int8-generate]}" "${DDIT[int8-caption]}" "${DDIT[int8-vqa]}" <<'PY'
import json, platform, sys
n, threads, ref, model = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
rates = {f"{lib} {when}": r for when, rs in (("before", json.loads(sys.argv[5])), ("after", ref["sgemm_gflops"]))
         for lib, r in rs.items()}
tasks = ["generate", "caption", "vqa"]
ddit = {"f32": dict(zip(tasks, map(float, sys.argv[6:9]))), "int8": dict(zip(tasks, map(float, sys.argv[9:12])))}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
best = max(rates, key=rates.get)
peak = rates[best] * 1e9
print(f"\n{n} items per task, {threads} threads each side, each side's fastest of {ref['repeat']} rounds taken in turn; {cpu}; "
      f"checkpoint {model}")
print(f"fp32 ceiling: sgemm {rates[best]:.1f} GFLOP/s at {threads} threads ({best} the runs; "
      + ", ".join(f"{k} {v:.1f}" for k, v in rates.items() if k != best)
      + "); a task's ceiling is that over its FLOPs per item (torch's count of one reference job); "
      "share = items/s over the ceiling")
print(f"{'task':<9} {'GFLOP/item':>10} {'PyTorch/s':>10} {'share':>6} {'ddit/s':>9} {'share':>6} {'ratio':>7}"
      f" {'int8/s':>9} {'ratio':>7}")
for t in tasks:
    flops = ref[f"{t}_flops"]
    r, d, q = n / ref[f"{t}_s"], n / ddit["f32"][t], n / ddit["int8"][t]
    share = lambda ips: ips * flops / peak
    print(f"{t:<9} {flops / 1e9:>10.2f} {r:>10.3f} {share(r):>6.2f} {d:>9.3f} {share(d):>6.2f} {d / r:>6.2f}x"
          f" {q:>9.3f} {q / r:>6.2f}x")
PY
