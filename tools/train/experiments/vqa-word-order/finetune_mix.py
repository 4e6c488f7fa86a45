"""VQA-only fine-tune of a checkpoint trained with the "first" words, under a --vqa-mix as in train.py
(run from the repository root). Probes the first 100 ShapesEval scenes greedily every --every steps.
Used to ask, cheaply, whether colour-named split questions bring back "what shape is the <colour> object?"."""
import argparse
import collections
import json
import math
import random
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, "tools/train")
sys.path.insert(0, "tools/reference")
import shapes  # noqa: E402
import train  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402
from transformers import T5EncoderModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--init", required=True)
ap.add_argument("--vqa-mix", default="0.25,0.083,0.083")
ap.add_argument("--bs", type=int, default=48)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--steps", type=int, default=400)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--tag", default="")
a = ap.parse_args()
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(2)
train.TWO_OBJECT_VQA = 0.75
tok = train.build_tokenizer(train.FIRST_WORDS)
saved = json.load(open(f"{a.init}/tokenizer/tokenizer.json"))["model"]["vocab"]
assert saved == tok.get_vocab(with_added_tokens=False) or saved == json.loads(tok.to_str())["model"]["vocab"]
data = train.Data(6000, 1, tok)
mix = {k: v for k, v in zip(train.MIX_KINDS, (float(x) for x in a.vqa_mix.split(","))) if v > 0}
vae = AutoencoderKL.from_pretrained(f"{a.init}/vae").eval()
sf, sh = vae.config.scaling_factor, vae.config.shift_factor
with torch.no_grad():
    imgs = torch.from_numpy(data.images)
    lat = (torch.cat([vae.encode(imgs[i:i + 512]).latent_dist.mean for i in range(0, len(imgs), 512)]) - sh) * sf
t5 = T5EncoderModel.from_pretrained(f"{a.init}/text_encoder").train()
dit = DualDiffSD3Transformer2DModel.from_pretrained(f"{a.init}/transformer").train()
params = list(t5.parameters()) + list(dit.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
mask_id = tok.token_to_id("<extra_id_0>")
probe = []
with torch.no_grad():
    for s in [json.loads(line) for line in open("models/shapes-eval/scenes.jsonl")][:100]:
        im = np.asarray(Image.open("models/shapes-eval/" + s["image"]).convert("RGB"), np.float32) / 127.5 - 1
        z = (vae.encode(torch.from_numpy(im).permute(2, 0, 1)[None]).latent_dist.mean - sh) * sf
        for qa in s["qa"]:
            p = tok.encode(shapes.VQA_TEMPLATE.format(question=qa["question"])).ids[:-1]
            k = ("isrel" if qa["question"].startswith("is the") else "colour2" if "colour is" in qa["question"]
                 else "shape2" if "shape is" in qa["question"] else "other")
            if len(s["objects"]) == 1:
                k = "other"
            probe.append((z, p + [mask_id] * (train.VQA_LEN - len(p)), len(p), tok.token_to_id(qa["answer"]), k))


def run_probe() -> dict:
    t5.eval()
    dit.eval()
    right, asked = collections.Counter(), collections.Counter()
    with torch.no_grad():
        for i in range(0, len(probe), 64):
            b = probe[i:i + 64]
            lg = dit(torch.cat([x[0] for x in b]), t5(input_ids=torch.tensor([x[1] for x in b])).last_hidden_state,
                     torch.zeros(len(b)))[1]
            for (_, _, plen, ans, k), logit in zip(b, lg):
                asked[k] += 1
                right[k] += int(logit[plen].argmax()) == ans
    t5.train()
    dit.train()
    out = {k: round(right[k] / asked[k], 3) for k in ("isrel", "colour2", "shape2")}
    out["all"] = round(sum(right.values()) / sum(asked.values()), 3)
    return out


print(json.dumps(dict(tag=a.tag, step=0, **run_probe())), flush=True)
for step in range(1, a.steps + 1):
    for g in opt.param_groups:
        g["lr"] = a.lr * min(1.0, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
    rows, idx = data.vqa_batch(a.bs, mix, True)
    ids = torch.tensor([r[0] for r in rows])
    plen = torch.tensor([r[1] for r in rows])
    zone = torch.arange(train.VQA_LEN)[None, :] >= plen[:, None]
    masked = zone & (torch.rand(ids.shape) < torch.rand(len(rows), 1).clamp(min=0.05))
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    _, logits = dit(lat[idx], t5(input_ids=noisy).last_hidden_state, torch.zeros(len(rows)))
    loss = train.answer_loss(logits, ids, masked, data.pad)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % a.every == 0:
        print(json.dumps(dict(tag=a.tag, step=step, loss=round(loss.item(), 4), **run_probe())), flush=True)
