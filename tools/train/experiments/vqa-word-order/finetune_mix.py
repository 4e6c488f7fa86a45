"""VQA-only fine-tune of a checkpoint trained with the "first" words, under a --vqa-mix as in train.py
(run from the repository root). Probes the first 100 ShapesEval scenes greedily every --every steps.
Used to ask, cheaply, whether colour-named split questions bring back "what shape is the <colour> object?"."""
import argparse
import json
import random
import sys

import torch

sys.path.insert(0, "tools/train")
sys.path.insert(0, "tools/reference")
sys.path.insert(0, "tools/train/experiments/vqa-word-order")
import train  # noqa: E402
import vqa_common  # noqa: E402
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
lat = vqa_common.scaled_latents(vae, data.images)
t5 = T5EncoderModel.from_pretrained(f"{a.init}/text_encoder").train()
dit = DualDiffSD3Transformer2DModel.from_pretrained(f"{a.init}/transformer").train()
params = list(t5.parameters()) + list(dit.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
mask_id = tok.token_to_id("<extra_id_0>")
probe = vqa_common.build_probe(tok, vae)

print(json.dumps(dict(tag=a.tag, step=0, **vqa_common.greedy_probe(t5, dit, probe))), flush=True)
for step in range(1, a.steps + 1):
    vqa_common.set_lr(opt, a.lr, step, a.steps, warmup=50)
    rows, idx = data.vqa_batch(a.bs, mix, True)
    loss = vqa_common.vqa_step(t5, dit, opt, params, rows, lat[idx], mask_id, data.pad)
    if step % a.every == 0:
        print(json.dumps(dict(tag=a.tag, step=step, loss=round(loss.item(), 4),
                              **vqa_common.greedy_probe(t5, dit, probe))), flush=True)
