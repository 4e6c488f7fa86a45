"""Build tiny random D-DiT pipelines in the real diffusers layout and their golden outputs.

    /opt/ddit-venv/bin/python tools/reference/make_fixtures.py --out tests/fixtures

Writes, for each variant, `<variant>/checkpoint/` (model_index.json, transformer/, text_encoder/, vae/,
tokenizer/, scheduler/) and `<variant>/golden.safetensors`, plus `scheduler.json` (flow-match sigmas and
timesteps from diffusers) and `t5_buckets.safetensors`. Seeds are fixed: running it twice gives the same
files. The Rust tests read these files and never run Python.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from ddit_reference import DualDiffSD3Transformer2DModel, flow_match_sigmas, t5_bucket_table

WORDS = (
    "a an the of and is what colour color shape how many objects object left right above below "
    "red green blue yellow purple orange white black circle square triangle star "
    "one two three q: a: answer question using single word or phrase ."
).split()


def make_tokenizer() -> Tokenizer:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", "<extra_id_0>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def write_tokenizer(tok: Tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5TokenizerFast",
                "pad_token": "<pad>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "additional_special_tokens": ["<extra_id_0>"],
                "model_max_length": 512,
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "additional_special_tokens": ["<extra_id_0>"]}, indent=2)
    )


def round_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(b.to(dtype).to(torch.float32))


def build(variant: str, out: Path, num_layers: int, dtype: torch.dtype, shard: bool, seed: int) -> None:
    torch.manual_seed(seed)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    d, heads = 16, 2
    t5_cfg = T5Config(
        vocab_size=vocab, d_model=12, d_kv=6, d_ff=24, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=8,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )
    t5 = T5EncoderModel(t5_cfg).eval()
    transformer = DualDiffSD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=d // heads,
        num_attention_heads=heads, joint_attention_dim=12, caption_projection_dim=d,
        pooled_projection_dim=d, out_channels=4, pos_embed_max_size=8, vocab_size=vocab,
    ).eval()
    # Random init of the zero-initialised parts so that every weight matters in the comparison.
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.abs().sum() == 0 or "norm" in name or "null" in name or "proj_out" in name:
                p.normal_(0.0, 0.2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype != torch.float32:
        for m in (t5, transformer, vae):
            round_weights(m, dtype)

    folder = out / variant
    if folder.exists():
        shutil.rmtree(folder)
    ckpt = folder / "checkpoint"
    shard_size = "40KB" if shard else "10GB"
    transformer.to(dtype).save_pretrained(ckpt / "transformer", max_shard_size=shard_size)
    t5.to(dtype).save_pretrained(ckpt / "text_encoder", max_shard_size=shard_size)
    vae.to(dtype).save_pretrained(ckpt / "vae")
    for m in (t5, transformer, vae):
        m.to(torch.float32)
    write_tokenizer(tok, ckpt / "tokenizer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(ckpt / "scheduler")
    (ckpt / "model_index.json").write_text(json.dumps({
        "_class_name": "DualDiffSD3Pipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "DualDiffSD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))

    # ---- golden inputs and outputs ------------------------------------------------------
    g = torch.Generator().manual_seed(seed + 1)
    gold: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        gold["t5.input_ids"] = ids
        hidden = t5(input_ids=ids).last_hidden_state
        gold["t5.hidden"] = hidden
        gold["ctx.out"] = transformer.embed_context(hidden)
        t = torch.tensor([0.0, 321.5, 999.0])
        gold["time.t"] = t
        gold["time.temb"] = transformer.embed_time(t)
        lat = torch.randn(2, 4, 6, 10, generator=g)
        gold["patch.latents"] = lat
        gold["patch.tokens"] = transformer.embed_image(lat)
        gold["null.out"] = transformer.null_image_embd.detach().clone()
        # The whole transformer, on a batch whose rows have different timesteps.
        ts = torch.tensor([0.0, 700.0])
        gold["full.input_ids"] = ids
        gold["full.latents"] = lat
        gold["full.timestep"] = ts
        vel, logits = transformer(lat, hidden, ts)
        gold["full.velocity"] = vel
        gold["full.logits"] = logits
        temb = transformer.embed_time(ts)
        gold["blocks.temb"] = temb
        x = transformer.embed_image(lat)
        y = transformer.embed_context(hidden)
        gold["blocks.x.0"], gold["blocks.y.0"] = x, y
        for i in range(num_layers):
            x, y = transformer.run_blocks(x, y, temb, i, i + 1)
            gold[f"blocks.x.{i + 1}"], gold[f"blocks.y.{i + 1}"] = x, y
        gold["image_head.out"] = transformer.image_head(x, temb, 3, 5)
        gold["text_head.out"] = transformer.text_head(y)
        assert torch.allclose(gold["image_head.out"], vel) and torch.allclose(gold["text_head.out"], logits)
        img = torch.rand(2, 3, 12, 20, generator=g) * 2 - 1
        gold["vae_enc.image"] = img
        dist = vae.encode(img).latent_dist
        gold["vae_enc.mean"], gold["vae_enc.logvar"] = dist.mean, dist.logvar
        z = torch.randn(2, 4, 6, 10, generator=g)
        gold["vae_dec.z"] = z
        gold["vae_dec.image"] = vae.decode(z).sample
    save_file({k: v.clone().contiguous() for k, v in gold.items()}, str(folder / "golden.safetensors"))
    print(f"{variant}: vocab {vocab}, layers {num_layers}, dtype {dtype}, shard {shard}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    build("tiny-f32", args.out, 4, torch.float32, False, 10)
    build("tiny-f16", args.out, 4, torch.float16, False, 20)
    build("tiny-bf16", args.out, 2, torch.bfloat16, False, 30)
    build("tiny-sharded", args.out, 4, torch.float32, True, 40)
    build("tiny-odd", args.out, 3, torch.float32, False, 50)

    sched = {}
    for steps, shift in ((28, 3.0), (10, 3.0), (4, 1.0), (50, 3.0)):
        sigmas, timesteps = flow_match_sigmas(steps, shift, 1000)
        sched[f"{steps}_{shift}"] = {"steps": steps, "shift": shift, "num_train_timesteps": 1000,
                                    "sigmas": sigmas, "timesteps": timesteps}
    (args.out / "scheduler.json").write_text(json.dumps(sched, indent=1))
    save_file({"buckets_32_128": t5_bucket_table(32, 128).contiguous(),
               "buckets_8_8": t5_bucket_table(8, 8).contiguous()}, str(args.out / "t5_buckets.safetensors"))


if __name__ == "__main__":
    main()
