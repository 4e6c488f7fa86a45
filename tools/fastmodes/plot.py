"""docs/fast-modes.png from tools/fastmodes/measure.py's summaries: speed-up over the exact
sampler against ShapesEval generation (demo model) and against PSNR to the exact image (768-wide
model), one point per mode.

  python tools/fastmodes/plot.py --demo .ddit/fm/demo/summary.json \
      --medium .ddit/fm/medium/summary.json --out docs/fast-modes.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True)
    ap.add_argument("--medium", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    demo, medium = json.load(open(a.demo)), json.load(open(a.medium))
    fig, (l, r) = plt.subplots(1, 2, figsize=(12, 5))
    for ax, rows, key, label in [
        (l, demo, "generation", "ShapesEval generation (demo model, 300 scenes)"),
        (r, [m for m in medium if m["psnr_db"] < 99], "psnr_db", "PSNR to the exact image, dB (768-wide model)"),
    ]:
        for m in rows:
            ax.scatter(m["speedup"], m[key], color="C3" if m["mode"] == "fast" else "C0")
            ax.annotate(m["mode"], (m["speedup"], m[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("speed-up over the exact sampler (same run, batch --max-batch 8)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    same = [m["mode"] for m in medium if m["psnr_db"] >= 99 and m["mode"] != "exact"]
    if same:
        r.set_title(f"identical to exact (no rows cached): {', '.join(same)}", fontsize=8)
    l.axhline(0.80, color="grey", linestyle="--", linewidth=1)
    l.annotate("target 0.80", (l.get_xlim()[0], 0.80), fontsize=7, xytext=(2, -10), textcoords="offset points")
    fig.suptitle("Generate-job speed options: speed against quality (tools/fastmodes/measure.py)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)


if __name__ == "__main__":
    main()
