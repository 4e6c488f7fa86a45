"""ShapesEval with the PyTorch reference samplers, to compare with `ddit-worker eval shapes`.
Same scenes, same default settings (captions 64 steps, VQA 32, generation 28 steps at guidance 7);
its own RNG (torch), so scores agree within sampling noise, not bit for bit.

    /opt/ddit-venv/bin/python tools/reference/eval_shapes.py --model models/ddit-shapes \
        --set models/shapes-eval --images .ddit/eval-ref
    target/release/ddit-worker eval shapes-images --set models/shapes-eval --images .ddit/eval-ref

Captioning (after the checkpoint's `caption_prompt` prefix, if model_index.json has one) and VQA
are scored here. Generation: the reference flow-matching sampler (diffusers'
FlowMatchEulerDiscreteScheduler, classifier-free guidance over [negative, positive]) writes
`gen_{id:04}.png` per scene into --images, and `ddit-worker eval shapes-images` scores them with the
very scene checker the Rust evaluation uses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import T5EncoderModel

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from ddit_reference import DualDiffSD3Transformer2DModel

VQA = "Q: {q} Answer the question using a single word or phrase. A: "


def load(model: Path):
    dit = DualDiffSD3Transformer2DModel.from_pretrained(model / "transformer").eval()
    t5 = T5EncoderModel.from_pretrained(model / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    tok = Tokenizer.from_file(str(model / "tokenizer" / "tokenizer.json"))
    return dit, t5, vae, tok


def image_latent(vae, path: Path, size: int, g: torch.Generator) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def masked_sample(dit, t5, z, prefix: list[int], length: int, mask: int, steps: int, g: torch.Generator) -> list[int]:
    x = torch.full((1, length), mask, dtype=torch.long)
    x[0, : len(prefix)] = torch.tensor(prefix)
    times = torch.linspace(1.0, 1e-5, steps + 1, dtype=torch.float64)
    p = None
    for k in range(steps):
        t, s = times[k].item(), times[k + 1].item()
        if p is None:
            logits = dit(z, t5(input_ids=x).last_hidden_state, torch.zeros(1))[1].double()
            logits[..., mask] = float("-inf")
            p = logits.softmax(-1)
        masked = x == mask
        stay = torch.rand(x.shape, generator=g, dtype=torch.float64) < s / t
        e = -torch.log(1 - torch.rand(p.shape, generator=g, dtype=torch.float64))
        draw = (p / e).argmax(-1)
        new = torch.where(masked & ~stay, draw, x)
        if not torch.equal(new, x):
            p = None
        x = new
    if (x == mask).any():
        logits = dit(z, t5(input_ids=x).last_hidden_state, torch.zeros(1))[1]
        logits[..., mask] = float("-inf")
        x = torch.where(x == mask, logits.argmax(-1), x)
    return x[0].tolist()


@torch.no_grad()
def generate(dit, t5, vae, tok, model: Path, prompt: str, prompt_len: int, steps: int, guidance: float,
             g: torch.Generator) -> np.ndarray:
    pad = tok.token_to_id("<pad>")

    def ids(text: str) -> torch.Tensor:
        t = tok.encode(text).ids[:prompt_len]
        return torch.tensor([t + [pad] * (prompt_len - len(t))])

    ctx = t5(input_ids=torch.cat([ids(""), ids(prompt)])).last_hidden_state
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model / "scheduler")
    sched.set_timesteps(steps)
    c, s = dit.config.in_channels, dit.config.sample_size
    x = torch.randn((1, c, s, s), generator=g)
    for t in sched.timesteps:
        v = dit(torch.cat([x, x]), ctx, t.expand(2))[0]
        v = v[:1] + guidance * (v[1:] - v[:1])
        x = sched.step(v, t, x).prev_sample
    img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample[0]
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def decode(tok: Tokenizer, ids: list[int], pad: int, eos: int, mask: int) -> str:
    keep = []
    for t in ids:
        if t == eos:
            if keep:
                break
            continue
        if t in (pad, mask):
            continue
        keep.append(t)
    return tok.decode(keep, skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("models/ddit-shapes"))
    ap.add_argument("--set", type=Path, default=Path("models/shapes-eval"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--caption-len", type=int, default=16)
    ap.add_argument("--vqa-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--images", type=Path, default=None,
                    help="also generate each scene's caption into IMAGES/gen_{id:04}.png")
    ap.add_argument("--only-generation", action="store_true", help="skip captioning and VQA")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dit, t5, vae, tok = load(args.model)
    mask, pad, eos = tok.token_to_id("<extra_id_0>"), tok.token_to_id("<pad>"), tok.token_to_id("</s>")
    size = dit.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    # The caption prompt prefix the model was trained with (model_index.json), as the exporter records it.
    caption_prompt = json.loads((args.model / "model_index.json").read_text()).get("caption_prompt") or ""
    cap_prefix = tok.encode(caption_prompt).ids[:-1] if caption_prompt else []
    scenes = [json.loads(line) for line in open(args.set / "scenes.jsonl")][: args.limit]
    cap_ok = vqa_ok = vqa_n = 0
    for sc in scenes:
        g = torch.Generator().manual_seed(sc["id"])
        z = image_latent(vae, args.set / sc["image"], size, g)
        if args.only_generation:
            sc = dict(sc, qa=[])
        else:
            ids = masked_sample(dit, t5, z, cap_prefix, args.caption_len, mask, 64, g)
            cap = decode(tok, ids[len(cap_prefix):], pad, eos, mask)
            cap_ok += cap == sc["caption"]
        for qa in sc["qa"]:
            prefix = tok.encode(VQA.format(q=qa["question"])).ids[:-1]
            ids = masked_sample(dit, t5, z, prefix, args.vqa_len, mask, 32, g)
            ans = decode(tok, ids[len(prefix):], pad, eos, mask)
            vqa_ok += ans == qa["answer"]
            vqa_n += 1
        if args.images is not None:
            args.images.mkdir(parents=True, exist_ok=True)
            px = generate(dit, t5, vae, tok, args.model, sc["caption"], args.prompt_len, 28, 7.0, g)
            Image.fromarray(px).save(args.images / f"gen_{sc['id']:04d}.png")
    print(f"PyTorch reference on {len(scenes)} scenes ({vqa_n} questions)")
    print(f"caption_exact={cap_ok / len(scenes):.3f} vqa={vqa_ok / max(vqa_n, 1):.3f}")


if __name__ == "__main__":
    main()
