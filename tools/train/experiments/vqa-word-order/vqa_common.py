"""What the VQA-only scripts of this experiment share (pilot_order.py, finetune_mix.py): latents, the
greedy ShapesEval probe, and one VQA training step as train.py takes it."""
import collections
import json
import math

import numpy as np
import torch
from PIL import Image

import shapes
import train


def scaled_latents(vae, images: np.ndarray) -> torch.Tensor:
    """Posterior means of the renders, shifted and scaled as the transformer sees them."""
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    with torch.no_grad():
        imgs = torch.from_numpy(images)
        return (torch.cat([vae.encode(imgs[i:i + 512]).latent_dist.mean for i in range(0, len(imgs), 512)]) - sh) * sf


def probe_label(question: str, objects: int) -> str:
    if objects == 1:
        return "other"
    if question.startswith("is the"):
        return "isrel"
    return "colour2" if "colour is" in question else "shape2" if "shape is" in question else "other"


def build_probe(tok, vae, scenes: int = 100) -> list:
    """The first `scenes` ShapesEval scenes: one row per question, the whole answer zone masked."""
    mask_id = tok.token_to_id("<extra_id_0>")
    rows = []
    with torch.no_grad():
        for s in [json.loads(line) for line in open("models/shapes-eval/scenes.jsonl")][:scenes]:
            im = np.asarray(Image.open("models/shapes-eval/" + s["image"]).convert("RGB"), np.float32) / 127.5 - 1
            z = scaled_latents(vae, im.transpose(2, 0, 1)[None])
            for qa in s["qa"]:
                p = tok.encode(shapes.VQA_TEMPLATE.format(question=qa["question"])).ids[:-1]
                rows.append((z, p + [mask_id] * (train.VQA_LEN - len(p)), len(p), tok.token_to_id(qa["answer"]),
                             probe_label(qa["question"], len(s["objects"]))))
    return rows


def greedy_probe(t5, dit, probe: list) -> dict:
    """Answer-slot argmax accuracy: yes/no relations, two-object colour and shape questions, all."""
    t5.eval()
    dit.eval()
    right, asked = collections.Counter(), collections.Counter()
    with torch.no_grad():
        for i in range(0, len(probe), 64):
            b = probe[i:i + 64]
            logits = dit(torch.cat([x[0] for x in b]), t5(input_ids=torch.tensor([x[1] for x in b])).last_hidden_state,
                         torch.zeros(len(b)))[1]
            for (_, _, plen, ans, k), lg in zip(b, logits):
                asked[k] += 1
                right[k] += int(lg[plen].argmax()) == ans
    t5.train()
    dit.train()
    out = {k: round(right[k] / max(1, asked[k]), 3) for k in ("isrel", "colour2", "shape2")}
    out["all"] = round(sum(right.values()) / sum(asked.values()), 3)
    return out


def set_lr(opt, base: float, step: int, steps: int, warmup: int) -> None:
    for g in opt.param_groups:
        g["lr"] = base * min(1.0, step / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def vqa_step(t5, dit, opt, params, rows: list, lat: torch.Tensor, mask_id: int, pad: int) -> torch.Tensor:
    """One optimiser step on VQA rows (answer zone masked at a random ratio), as train.py's VQA loss."""
    ids = torch.tensor([r[0] for r in rows])
    plen = torch.tensor([r[1] for r in rows])
    zone = torch.arange(train.VQA_LEN)[None, :] >= plen[:, None]
    masked = zone & (torch.rand(ids.shape) < torch.rand(len(rows), 1).clamp(min=0.05))
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    _, logits = dit(lat, t5(input_ids=noisy).last_hidden_state, torch.zeros(len(rows)))
    loss = train.answer_loss(logits, ids, masked, pad)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss
