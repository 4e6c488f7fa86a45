"""Greedy one-pass VQA probe per question kind: answer slot argmax with the whole answer zone masked."""
import json, sys, collections
from pathlib import Path
import numpy as np, torch
from PIL import Image
sys.path.insert(0, "tools/reference"); sys.path.insert(0, "tools/train")
from eval_shapes import load, VQA
torch.set_num_threads(2)
model = Path(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 150
dit, t5, vae, tok = load(model)
mask = tok.token_to_id("<extra_id_0>"); pad = tok.token_to_id("<pad>")
scenes = [json.loads(l) for l in open("models/shapes-eval/scenes.jsonl")][:n]
def kind(q, nobj):
    w = [("<shape>" if x.strip("?") in ("circle","square","triangle") else "<colour>" if x in ("red","green","blue","yellow","purple","orange") else x) for x in q.split()]
    return " ".join(w) + f" ({nobj})"
g = torch.Generator().manual_seed(0)
res = {m: collections.Counter() for m in ("mean", "sample")}
tot = collections.Counter()
with torch.no_grad():
    for s in scenes:
        img = np.asarray(Image.open("models/shapes-eval/" + s["image"]).convert("RGB"), np.float32) / 127.5 - 1
        d = vae.encode(torch.from_numpy(img).permute(2, 0, 1)[None]).latent_dist
        zs = {"mean": d.mean, "sample": d.mean + d.std * torch.randn(d.mean.shape, generator=g)}
        rows, plens = [], []
        for qa in s["qa"]:
            p = tok.encode(VQA.format(q=qa["question"])).ids[:-1]
            rows.append(p + [mask] * (32 - len(p))); plens.append(len(p))
        ids = torch.tensor(rows)
        h = t5(input_ids=ids).last_hidden_state
        for m, z in zs.items():
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            lg = dit(z.expand(len(rows), -1, -1, -1), h, torch.zeros(len(rows)))[1]
            lg[..., mask] = -1e9
            for qa, pl, l in zip(s["qa"], plens, lg):
                pred = tok.id_to_token(int(l[pl].argmax()))
                res[m][kind(qa["question"], len(s["objects"]))] += pred == qa["answer"]
        for qa in s["qa"]:
            tot[kind(qa["question"], len(s["objects"]))] += 1
        stdr = (d.std / d.mean.std()).mean().item()
print("posterior std / latent std (last scene):", round(stdr, 3))
for k in sorted(tot):
    print(f"{k:<45} mean {res['mean'][k]/tot[k]:.3f} sample {res['sample'][k]/tot[k]:.3f}  n={tot[k]}")
for m in res:
    print(m, "overall", round(sum(res[m].values()) / sum(tot.values()), 3))
