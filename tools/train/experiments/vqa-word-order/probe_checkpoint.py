"""Greedy VQA probe of a checkpoint folder (run from the repository root): one forward pass per question
with the whole answer zone masked, answer = argmax at the first answer slot; accuracy per question kind
on the first --scenes ShapesEval scenes. Loads the checkpoint's own tokenizer, so it works for any vocabulary.

    /opt/ddit-venv/bin/python tools/train/experiments/vqa-word-order/probe_checkpoint.py --model DIR
"""
import argparse
import collections
import json
import sys

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

sys.path.insert(0, "tools/train")
sys.path.insert(0, "tools/reference")
import shapes  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402
from transformers import T5EncoderModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--set", default="models/shapes-eval")
ap.add_argument("--scenes", type=int, default=300)
ap.add_argument("--vqa-len", type=int, default=32)
a = ap.parse_args()
torch.set_num_threads(2)
tok = Tokenizer.from_file(f"{a.model}/tokenizer/tokenizer.json")
mask_id = tok.token_to_id("<extra_id_0>")
t5 = T5EncoderModel.from_pretrained(f"{a.model}/text_encoder").eval()
dit = DualDiffSD3Transformer2DModel.from_pretrained(f"{a.model}/transformer").eval()
vae = AutoencoderKL.from_pretrained(f"{a.model}/vae").eval()
sf, sh = vae.config.scaling_factor, vae.config.shift_factor
right, asked = collections.Counter(), collections.Counter()
scenes = [json.loads(line) for line in open(f"{a.set}/scenes.jsonl")][: a.scenes]
with torch.no_grad():
    for s in scenes:
        im = np.asarray(Image.open(f"{a.set}/{s['image']}").convert("RGB"), np.float32) / 127.5 - 1
        z = (vae.encode(torch.from_numpy(im).permute(2, 0, 1)[None]).latent_dist.mean - sh) * sf
        rows = []
        for qa in s["qa"]:
            p = tok.encode(shapes.VQA_TEMPLATE.format(question=qa["question"])).ids[:-1]
            rows.append((p + [mask_id] * (a.vqa_len - len(p)), len(p), tok.token_to_id(qa["answer"]), qa["question"]))
        ids = torch.tensor([r[0] for r in rows])
        logits = dit(z.expand(len(rows), -1, -1, -1), t5(input_ids=ids).last_hidden_state, torch.zeros(len(rows)))[1]
        for (_, plen, ans, q), lg in zip(rows, logits):
            words = ["<shape>" if w.strip("?") in shapes.SHAPES else "<colour>" if w in shapes.COLOURS else w
                     for w in q.split()]
            k = " ".join(words) + f" ({len(s['objects'])} objects)"
            asked[k] += 1
            right[k] += int(lg[plen].argmax()) == ans
for k in sorted(asked):
    print(f"{k:<48} {right[k]:>4}/{asked[k]:<4} {right[k] / asked[k]:.3f}")
print(f"all {sum(right.values()) / sum(asked.values()):.3f} ({sum(asked.values())} questions)")
