"""Speed and quality of the generate job's speed options (docs/fast-modes.md).

For each mode (a set of job params on top of the scene's prompt and seed) it runs the same
generate jobs through `ddit-worker batch` and reports: the seconds `batch` took (model load
excluded; every job must succeed), the speed-up over the exact mode measured in the same run
(modes in alternating order over the rounds, median round), the PSNR of each image against the
exact mode's at the same seed, the block cache's share of skipped rows and, with --score, the
ShapesEval generation score (`ddit-worker eval shapes-images`, the scene checker of
`eval shapes`). Bounded: N scenes, R rounds, then it stops.

  python tools/fastmodes/measure.py --worker target/release/ddit-worker --package PKG \
      --set models/shapes-eval --n 300 --rounds 1 --score --out .ddit/fastmodes/demo
"""
import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# name -> params. "exact" is the baseline every ratio and PSNR is taken against.
MODES = {
    "exact": {},
    "euler-18": {"steps": 18},
    "euler-16": {"steps": 16},
    "euler-14": {"steps": 14},
    "euler-12": {"steps": 12},
    "euler-10": {"steps": 10},
    "dpm-14": {"solver": "dpmpp2m", "steps": 14},
    "dpm-10": {"solver": "dpmpp2m", "steps": 10},
    "interval-0.75": {"guidance_interval": [0.0, 0.75]},
    "interval-0.9": {"guidance_interval": [0.0, 0.9]},
    "cache-0.05": {"block_cache": 0.05},
    "cache-0.1": {"block_cache": 0.1},
    "cache-0.2": {"block_cache": 0.2},
    "euler-18+cache-0.1": {"steps": 18, "block_cache": 0.1},
    "euler-16+cache-0.1": {"steps": 16, "block_cache": 0.1},
    "euler-14+cache-0.1": {"steps": 14, "block_cache": 0.1},
    "euler-18+cache-0.15": {"steps": 18, "block_cache": 0.15},
    "euler-16+cache-0.1+interval-0.9": {"steps": 16, "block_cache": 0.1, "guidance_interval": [0.0, 0.9]},
    "fast": {"speed": "fast"},
}


def jobs_file(path, scenes, params):
    with open(path, "w") as f:
        for s in scenes:
            p = {"prompt": s["caption"], "seed": s["id"], **params}
            f.write(json.dumps({"job_id": f"gen-{s['id']}", "task": "generate", "params": p}) + "\n")


def run_batch(a, jobs, out):
    shutil.rmtree(out, ignore_errors=True)
    cmd = [a.worker, "batch", "--model", a.package, "--jobs", str(jobs), "--out", str(out),
           "--threads", str(a.threads), "--max-batch", str(a.max_batch), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"batch failed on {jobs}: {p.stderr[-2000:]}")
    m = re.search(r"^(\d+) jobs in ([0-9.]+)s", p.stderr, re.M)
    if not m:
        sys.exit(f"batch printed no time: {p.stderr[-2000:]}")
    results = [json.loads(l) for l in open(out / "results.jsonl")]
    bad = [r["job_id"] for r in results if r["status"] != "succeeded" or len(r.get("outputs", [])) != 1]
    if bad or len(results) != int(m.group(1)):
        sys.exit(f"{len(bad)} jobs of {jobs} did not succeed: {bad[:4]}")
    return float(m.group(2)), results


def image_of(out, r):
    # `batch` writes <out>/<job_id>/<n>.png; the result's URI is relative to <out>.
    path = out / r["outputs"][0]["uri"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64), path


def psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def score(a, out, results, scenes):
    imgs = out / "scored"
    imgs.mkdir()
    for r in results:
        sid = int(r["job_id"].split("-")[1])
        shutil.copy(image_of(out, r)[1], imgs / f"gen_{sid:04}.png")
    p = subprocess.run([a.worker, "eval", "shapes-images", "--set", a.set, "--images", str(imgs),
                        "--limit", str(len(scenes))], capture_output=True, text=True, check=True)
    return float(re.search(r"generation=([0-9.]+)", p.stdout).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--set", default="models/shapes-eval")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated names of MODES")
    ap.add_argument("--score", action="store_true", help="ShapesEval generation (demo model only)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = a.modes.split(",")
    if names[0] != "exact":
        names = ["exact"] + [n for n in names if n != "exact"]
    scenes = [json.loads(l) for l in open(Path(a.set) / "scenes.jsonl")][: a.n]
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    secs = {n: [] for n in names}
    last = {}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            jobs = root / f"{n}.jsonl"
            jobs_file(jobs, scenes, MODES[n])
            s, results = run_batch(a, jobs, root / n)
            secs[n].append(s)
            last[n] = sorted(results, key=lambda x: x["job_id"])
            print(f"round {r + 1} {n}: {s:.1f}s", file=sys.stderr, flush=True)
    exact = {x["job_id"]: image_of(root / "exact", x)[0] for x in last["exact"]}
    rows = []
    for n in names:
        ratio = statistics.median(e / s for e, s in zip(secs["exact"], secs[n]))
        ps = [psnr(exact[x["job_id"]], image_of(root / n, x)[0]) for x in last[n]]
        rows_total = sum(x["metrics"]["steps"] for x in last[n])
        cached = sum(x["metrics"].get("cached_rows", 0) for x in last[n])
        row = {"mode": n, "params": MODES[n], "seconds": statistics.median(secs[n]),
               "seconds_all": secs[n], "speedup": ratio, "psnr_db": statistics.mean(ps),
               "psnr_min_db": min(ps), "cached_rows_per_image": cached / len(last[n]),
               "steps_per_image": rows_total / len(last[n])}
        if a.score:
            row["generation"] = score(a, root / n, last[n], scenes)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (root / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
