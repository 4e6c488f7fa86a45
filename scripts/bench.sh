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
# Env: DDIT_BENCH_THREADS (default: the machine's cores), DDIT_BENCH_REPEAT (default 3: timed rounds;
# each round runs both sides, the first side alternating from round to round; the table gives each
# side's median round and its spread), DDIT_BENCH_VENV (default /opt/ddit-venv: the reference stack
# of tools/reference/requirements.txt, installed from PyPI when missing).
# ddit: `ddit-worker batch --max-batch 8` on the f32 package and on the `--weights int8` one, timed by
# batch itself from the loaded model to the last result written (its "N jobs in S s" line); every
# job must have succeeded with its image or text (results.jsonl), or the bench fails. The int8 ratio
# is against the same fp32 reference.
# PyTorch: tools/bench/reference_speed.py --task T, one process per task as ddit's side, timed from
# the loaded model to the last result: the reference model computing only what the result needs (no
# text head or last-block text stream in text to image, no image head or last-block image stream in
# captioning and VQA, a float32 sampler), under torch.inference_mode.
# Warm-up, alike: before the timed rounds each side loads its model once untimed (ddit: a batch of no
# jobs per package; the reference: its FLOP count, one job per task); in a timed run neither side
# makes a warm-up call.
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
REPEAT="${DDIT_BENCH_REPEAT:-3}"
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
    "fast": [{"task": "generate", "params": {"prompt": s["caption"], "seed": s["id"], "speed": "fast"}} for s in scenes],
    "caption": [{"task": "caption", "params": {"image": f"{set_}/{s['image']}", "seed": s["id"]}} for s in scenes],
    "vqa": [{"task": "vqa", "params": {"image": f"{set_}/{s['image']}", "question": s["qa"][0]["question"], "seed": s["id"]}} for s in scenes],
}
for task, js in jobs.items():
    with open(f"{work}/{task}.jsonl", "w") as f:
        for i, j in enumerate(js):
            f.write(json.dumps({"job_id": f"{task}-{i}", **j}) + "\n")
open(f"{work}/none.jsonl", "w").close()
PY

secs() { # the seconds `batch` reports for the jobs of file $2 on package $1 (model load excluded);
  # fails unless every job succeeded with its output (an image per generate job, text otherwise)
  rm -rf "$WORK/out"
  local log
  log=$(target/release/ddit-worker batch --model "$WORK/pkg-$1" --jobs "$2" --out "$WORK/out" \
    --threads "$THREADS" --max-batch 8 --no-progress 2>&1 >/dev/null) ||
    { echo "bench: batch failed on $1 $2: $log" >&2; return 1; }
  python3 - "$2" "$WORK/out/results.jsonl" <<'PY' || { echo "bench: $log" >&2; return 1; }
import json, sys
jobs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
try:
    res = {r["job_id"]: r for r in map(json.loads, open(sys.argv[2]))}
except FileNotFoundError:
    res = {}
bad = []
for j in jobs:
    r = res.get(j["job_id"])
    if r is None or r["status"] != "succeeded":
        bad.append(f'{j["job_id"]}: {r and (r["status"], r.get("error"))}')
    elif (len(r.get("outputs", [])) != 1) if j["task"] == "generate" else (r.get("text") is None):
        bad.append(f'{j["job_id"]}: no output')
if bad:
    sys.exit(f"bench: {len(bad)} of {len(jobs)} jobs of {sys.argv[1]} did not succeed: " + "; ".join(bad[:4]))
PY
  sed -n 's/^[0-9]* jobs in \([0-9.]*\)s: .*/\1/p' <<<"$log"
}
ref() { # the reference's seconds for task $1
  "$VENV/bin/python" tools/bench/reference_speed.py --model "$MODEL" --set "$SET" --n "$N" \
    --threads "$THREADS" --task "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["s"])'
}
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
# The machine's 2048^3 sgemm rate (torch, ONNX Runtime) before and after the rounds: a load
# indicator of this shared machine, not a ceiling.
SGEMM0=$("$VENV/bin/python" tools/bench/reference_speed.py --sgemm-only --threads "$THREADS")
# The untimed warm-up of both sides; the reference's is its FLOP count of one job per task.
for w in f32 int8; do secs "$w" "$WORK/none.jsonl" >/dev/null; done
FLOPS=$("$VENV/bin/python" tools/bench/reference_speed.py --model "$MODEL" --set "$SET" --n "$N" \
  --threads "$THREADS" --flops)
TIMES="$WORK/times.jsonl"
: >"$TIMES"
ddit_round() {
  local w task s
  for w in f32 int8; do
    for task in generate caption vqa fast; do
      s=$(secs "$w" "$WORK/$task.jsonl") || exit 1
      [ -n "$s" ] || { echo "bench: batch printed no time for $w $task" >&2; exit 1; }
      echo "{\"round\": $1, \"side\": \"$w\", \"task\": \"$task\", \"s\": $s}" >>"$TIMES"
    done
  done
}
ref_round() {
  local task s
  for task in generate caption vqa; do
    s=$(ref "$task") || exit 1
    echo "{\"round\": $1, \"side\": \"ref\", \"task\": \"$task\", \"s\": $s}" >>"$TIMES"
  done
}
for round in $(seq "$REPEAT"); do
  echo "{\"round\": $round, \"side\": \"load\", \"loadavg\": \"$(cut -d' ' -f1 /proc/loadavg)\"}" >>"$TIMES"
  if [ $((round % 2)) = 1 ]; then ddit_round "$round"; ref_round "$round"
  else ref_round "$round"; ddit_round "$round"; fi
done
SGEMM1=$("$VENV/bin/python" tools/bench/reference_speed.py --sgemm-only --threads "$THREADS")
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$N" "$THREADS" "$MODEL" "$TIMES" "$FLOPS" "$SGEMM0" "$SGEMM1" "$LOAD0" "$LOAD1" <<'PY'
import json, platform, statistics, sys
n, threads, model, times = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
flops, sg0, sg1 = (json.loads(a) for a in sys.argv[5:8])
rows = [json.loads(l) for l in open(times)]
loads = [r["loadavg"] for r in rows if r["side"] == "load"]
rows = [r for r in rows if r["side"] != "load"]
rounds = max(r["round"] for r in rows)
tasks = ["generate", "caption", "vqa"]
ips = {(s, t): [n / r["s"] for r in rows if r["side"] == s and r["task"] == t]
       for s in ("ref", "f32", "int8") for t in tasks + (["fast"] if s != "ref" else [])}
med = {k: statistics.median(v) for k, v in ips.items()}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
print(f"\n{n} items per task, {threads} threads each side, {rounds} rounds (first side alternating), "
      f"median round (min-max); {cpu}; checkpoint {model}")
print(f"load: sgemm 2048^3 GFLOP/s before torch {sg0['torch']:.1f} / ORT {sg0['onnxruntime']:.1f}, after torch "
      f"{sg1['torch']:.1f} / ORT {sg1['onnxruntime']:.1f}; loadavg before {sys.argv[8]}, "
      f"at each round's start {', '.join(loads)}, after {sys.argv[9]}")
print("GFLOP/item: one job's work as the reference computes it (FlopCounterMode; nothing discarded, ddit computes the "
      "same); GFLOP/s = items/s x GFLOP/item")
print(f"{'task':<9} {'GFLOP/item':>10} {'PyTorch items/s':>22} {'GFLOP/s':>7} {'ddit items/s':>22} {'GFLOP/s':>7}"
      f" {'ratio':>6} {'int8 items/s':>22} {'ratio':>6}")
cell = lambda k: f"{med[k]:.3f} ({min(ips[k]):.3f}-{max(ips[k]):.3f})"
for t in tasks:
    g = flops[t] / 1e9
    r, d, q = ("ref", t), ("f32", t), ("int8", t)
    print(f"{t:<9} {g:>10.2f} {cell(r):>22} {med[r] * g:>7.1f} {cell(d):>22} {med[d] * g:>7.1f}"
          f" {med[d] / med[r]:>5.2f}x {cell(q):>22} {med[q] / med[r]:>5.2f}x")
fast = lambda s: [a / b for a, b in zip(ips[(s, "fast")], ips[("ref", "generate")])]
print(f"generate with \"speed\": \"fast\" (docs/fast-modes.md) against the same reference: "
      f"{statistics.median(fast('f32')):.2f}x ({min(fast('f32')):.2f}-{max(fast('f32')):.2f}), "
      f"int8 {statistics.median(fast('int8')):.2f}x ({min(fast('int8')):.2f}-{max(fast('int8')):.2f})")
busy = [l for l in loads + [sys.argv[9].split()[0]] if float(l) > threads + 0.5]
# Each library's rate before against after (torch and ONNX Runtime differ by design on some CPUs).
drift = min(min(sg0[k], sg1[k]) / max(sg0[k], sg1[k]) for k in sg0)
if busy or drift < 0.8:
    print(f"WARNING: the machine was busy (loadavg over {threads} at a round's start or after: "
          f"{', '.join(busy) or 'no'}; sgemm after/before, the worse library {drift:.2f}): torch's thread pool "
          "slows far more than ONNX Runtime's when its cores are shared, so the ratios can overstate ddit")
rat = lambda s, t: [a / b for a, b in zip(ips[(s, t)], ips[("ref", t)])]
print("ratio per round: " + "; ".join(f"{t} " + ", ".join(f"{x:.2f}" for x in rat("f32", t)) +
                                      " (int8 " + ", ".join(f"{x:.2f}" for x in rat("int8", t)) + ")" for t in tasks))
PY
