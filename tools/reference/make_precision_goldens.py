"""Golden outputs of a D-DiT checkpoint in half precision, for `ddit-export convert --precision`.

    # the tiny fixture: its committed fp32 golden inputs, outputs in fp16 and bf16
    /opt/ddit-venv/bin/python tools/reference/make_precision_goldens.py \
        --checkpoint tests/fixtures/tiny-f32/checkpoint --inputs tests/fixtures/tiny-f32/golden.safetensors \
        --out tests/fixtures/tiny-f32
    # the medium checkpoint (tools/bench/make_medium.py): inputs made here, outputs in fp32, fp16, bf16
    /opt/ddit-venv/bin/python tools/reference/make_precision_goldens.py \
        --checkpoint .ddit/bench/medium --out .ddit/bench/medium --precisions fp32,fp16,bf16

Writes `golden-{precision}.safetensors` (fp32: `golden.safetensors`) with the keys of
make_fixtures.py's goldens, every tensor stored as f32 (a half value widens exactly). The reference
runs in the precision the exporter gives each segment: T5 and the timestep embedding in fp32, their
outputs rounded to the half type where a half-precision segment reads them; the context embedder,
patch embedding, joint blocks, heads, null image and VAE in the half type (PyTorch's CPU kernels
keep f32 accumulators and statistics in LayerNorm, GroupNorm, softmax and matrix products). Each
segment's golden input is the reference's own output of the segment before it, in that precision.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel

from diffusers import AutoencoderKL

from ddit_reference import DualDiffSD3Transformer2DModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(transformer, t5, vae, seed: int) -> dict[str, torch.Tensor]:
    """Inputs at the checkpoint's sizes: 2 x 16 ids, a 2 x C x 8 x 8 latent, a 64 x 64 image."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config.in_channels
    lc = vae.config.latent_channels
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    ids = torch.randint(0, t5.config.vocab_size, (2, 16), generator=g)
    lat = torch.randn(2, c, 8, 8, generator=g)
    return {
        "t5.input_ids": ids,
        "time.t": torch.tensor([0.0, 321.5, 999.0]),
        "patch.latents": lat,
        "full.input_ids": ids,
        "full.latents": lat,
        "full.timestep": torch.tensor([0.0, 700.0]),
        "vae_enc.image": torch.rand(1, 3, 8 * down, 8 * down, generator=g) * 2 - 1,
        "vae_dec.z": torch.randn(1, lc, 8, 8, generator=g),
    }


@torch.no_grad()
def goldens(transformer, t5, vae, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every golden key of make_fixtures.py, with the half-precision segments in `dtype`."""
    half = copy.deepcopy(transformer).to(dtype)
    hvae = copy.deepcopy(vae).to(dtype)
    h = lambda t: t.to(dtype)  # noqa: E731  (a segment's input, rounded to its type)
    gold: dict[str, torch.Tensor] = {}
    ids = inputs["t5.input_ids"]
    gold["t5.input_ids"] = ids
    hidden = t5(input_ids=ids).last_hidden_state  # fp32 segment
    gold["t5.hidden"] = hidden
    gold["ctx.out"] = half.embed_context(h(hidden))
    gold["time.t"] = inputs["time.t"]
    gold["time.temb"] = transformer.embed_time(inputs["time.t"])  # fp32 segment
    lat = inputs["patch.latents"]
    gold["patch.latents"] = lat
    gold["patch.tokens"] = half.embed_image(h(lat))
    gold["null.out"] = half.null_image_embd.detach().clone()
    ts = inputs["full.timestep"]
    gold["full.input_ids"] = inputs["full.input_ids"]
    gold["full.latents"] = inputs["full.latents"]
    gold["full.timestep"] = ts
    temb = h(transformer.embed_time(ts))
    gold["blocks.temb"] = temb
    x = half.embed_image(h(inputs["full.latents"]))
    y = half.embed_context(h(t5(input_ids=inputs["full.input_ids"]).last_hidden_state))
    gold["blocks.x.0"], gold["blocks.y.0"] = x, y
    for i in range(transformer.config.num_layers):
        x, y = half.run_blocks(x, y, temb, i, i + 1)
        gold[f"blocks.x.{i + 1}"], gold[f"blocks.y.{i + 1}"] = x, y
    p = transformer.config.patch_size
    hh, ww = inputs["full.latents"].shape[-2] // p, inputs["full.latents"].shape[-1] // p
    gold["image_head.out"] = half.image_head(x, temb, hh, ww)
    gold["text_head.out"] = half.text_head(y)
    gold["full.velocity"] = gold["image_head.out"]
    gold["full.logits"] = gold["text_head.out"]
    img = inputs["vae_enc.image"]
    gold["vae_enc.image"] = img
    dist = hvae.encode(h(img)).latent_dist
    gold["vae_enc.mean"], gold["vae_enc.logvar"] = dist.mean, dist.logvar
    gold["vae_dec.z"] = inputs["vae_dec.z"]
    gold["vae_dec.image"] = hvae.decode(h(inputs["vae_dec.z"])).sample
    return {k: (v.float() if v.is_floating_point() else v).clone().contiguous() for k, v in gold.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, help="a golden file whose inputs to reuse (else made here)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = args.checkpoint
    transformer = DualDiffSD3Transformer2DModel.from_pretrained(ck / "transformer", torch_dtype=torch.float32).eval()
    t5 = T5EncoderModel.from_pretrained(ck / "text_encoder", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(ck / "vae", torch_dtype=torch.float32).eval()
    inputs = load_file(str(args.inputs)) if args.inputs else make_inputs(transformer, t5, vae, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.precisions.split(","):
        gold = goldens(transformer, t5, vae, inputs, DTYPES[name])
        file = args.out / ("golden.safetensors" if name == "fp32" else f"golden-{name}.safetensors")
        save_file(gold, str(file))
        print(f"{file}: {len(gold)} tensors")


if __name__ == "__main__":
    main()
