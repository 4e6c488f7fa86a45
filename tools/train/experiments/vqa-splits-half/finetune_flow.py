"""Diagnostic: text-to-image-only (flow-matching) fine-tune of a checkpoint, saved as a new checkpoint
(run from the repository root). Asks whether the run's low generation score is under-trained image
weights that a little more flow training recovers, or lost capacity. Prints the greedy VQA probe
(first 100 ShapesEval scenes) before and after, to see what the VQA side gives up."""
import argparse
import json
import random
import shutil
import sys
from pathlib import Path

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
ap.add_argument("--init", type=Path, required=True)
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--bs", type=int, default=48)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--steps", type=int, default=400)
a = ap.parse_args()
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(2)
tok = train.build_tokenizer(train.FIRST_WORDS)
data = train.Data(6000, 1, tok)
vae = AutoencoderKL.from_pretrained(a.init / "vae").eval()
lat = vqa_common.scaled_latents(vae, data.images)
t5 = T5EncoderModel.from_pretrained(a.init / "text_encoder").train()
dit = DualDiffSD3Transformer2DModel.from_pretrained(a.init / "transformer").train()
params = list(t5.parameters()) + list(dit.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
empty = torch.tensor(data.canvas(tok.encode("").ids, train.PROMPT_LEN))
probe = vqa_common.build_probe(tok, vae)

print(json.dumps(dict(step=0, **vqa_common.greedy_probe(t5, dit, probe))), flush=True)
for step in range(1, a.steps + 1):
    vqa_common.set_lr(opt, a.lr, step, a.steps, warmup=50)
    idx = torch.randint(0, len(data.images), (a.bs,))
    loss = train.flow_loss(t5, dit, lat[idx], data.prompts[idx], empty)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 100 == 0:
        print(json.dumps(dict(step=step, flow=round(loss.item(), 4))), flush=True)
print(json.dumps(dict(step=a.steps, **vqa_common.greedy_probe(t5, dit, probe))), flush=True)
shutil.copytree(a.init, a.out, dirs_exist_ok=True)
t5.save_pretrained(a.out / "text_encoder")
dit.save_pretrained(a.out / "transformer")
