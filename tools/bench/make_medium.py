"""A random "medium" D-DiT checkpoint at realistic width, for scripts/bench.sh (timing only: its
outputs mean nothing). Hidden 768, 12 heads, 4 joint blocks, 16 latent channels, a x8 VAE at 256 px
(patch 2: 256 image tokens), a T5-style encoder (d_model 512, 4 layers, gated GELU) with a
vocabulary of 32 128. Canvas lengths: prompt 128, caption 64, VQA 64.

    /opt/ddit-venv/bin/python tools/bench/make_medium.py --out .ddit/bench/medium

`--layout real` writes a random checkpoint in the real D-DiT layout instead (for the 2 GB split
check, docs/model-package.md#no-file-over-2-gb): the transformer of SD3 medium as D-DiT changes it
(hidden 1536 = 24 heads x 64, 24 joint blocks, patch 2, 16 channels, `pos_embed_max_size` 192,
text head over 32 100 tokens), a T5 v1.1 XXL encoder at its real width (d_model 4096, 64 heads
x 64, d_ff 10 240, gated GELU, 32 relative buckets up to 128, vocabulary 32 128) but only
`--t5-layers` layers (XXL has 24), and SD3's VAE layout (128/256/512/512 channels, 2 layers per
block, 16 latent channels). 8.64 GB of f32 transformer weights (2.16 B parameters): every module
(the transformer without blocks, each joint block, T5's embedding, each T5 block) is built with
its constructor's initialisation (PyTorch's defaults; T5's `_init_weights` is not applied) and
saved one at a time into safetensors shards of at most `--shard-bytes`, with diffusers' /
transformers' `*.safetensors.index.json`, so the peak memory is about one shard (3.1 GB RSS with
3 T5 layers), not the model. Seeded; the outputs mean nothing.

    /opt/ddit-venv/bin/python tools/bench/make_medium.py --layout real --t5-layers 3 \
        --out .ddit/realwidth/checkpoint
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402
from make_fixtures import WORDS, write_tokenizer  # noqa: E402

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.models.attention import JointTransformerBlock  # noqa: E402

VOCAB = 32128
MASK_ID = 32099


def tokenizer() -> Tokenizer:
    """A word-level tokenizer with T5's id layout: 32 099 words, then `<extra_id_0>` at 32 099."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < MASK_ID:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", "<extra_id_0>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    assert tok.token_to_id("<extra_id_0>") == MASK_ID
    return tok


class ShardWriter:
    """Writes tensors into safetensors shards of at most `limit` bytes (a larger tensor gets a shard
    of its own) and the `{stem}.safetensors.index.json` that diffusers and transformers read."""

    def __init__(self, folder: Path, stem: str, limit: int):
        self.folder, self.stem, self.limit = folder, stem, limit
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add_module(self, prefix: str, module: torch.nn.Module) -> None:
        for key, t in module.state_dict().items():
            self.add(prefix + key, t)

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.limit:
            self.flush()
        self.pending[key] = t.detach().contiguous()
        self.pending_bytes += n
        self.total += n

    def flush(self) -> None:
        i = len(self.shards)
        save_file(self.pending, str(self.folder / f"{self.stem}.part{i}"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"{self.stem}.part{i}").rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def config_json(model) -> str:
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    return json.dumps({"_class_name": type(model).__name__, "_diffusers_version": "0.42.1", **cfg},
                      indent=2, default=list)


def write_real(out: Path, t5_layers: int, shard_bytes: int) -> None:
    """The real layout, one module at a time (see the module docstring)."""
    torch.manual_seed(0)
    d, heads, blocks = 1536, 24, 24
    # The non-block parts: the model with no blocks (a constructor's own initialisation).
    head = DualDiffSD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=0, attention_head_dim=d // heads,
        num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=d,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, vocab_size=MASK_ID + 1,
    ).eval()
    cfg = json.loads(config_json(head))
    cfg["num_layers"] = blocks
    (out / "transformer").mkdir(parents=True)
    (out / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2))
    w = ShardWriter(out / "transformer", "diffusion_pytorch_model", shard_bytes)
    w.add_module("", head)
    del head
    for i in range(blocks):
        block = JointTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=d // heads,
                                      context_pre_only=False, qk_norm=None, use_dual_attention=False)
        w.add_module(f"transformer_blocks.{i}.", block)
        del block
    w.close()
    print(f"transformer: {w.total / 1e9:.2f} GB in {len(w.shards)} shards", flush=True)

    t5cfg = T5Config(
        vocab_size=VOCAB, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        architectures=["T5EncoderModel"],
    )
    t5cfg.save_pretrained(out / "text_encoder")
    w = ShardWriter(out / "text_encoder", "model", shard_bytes)
    # Tied to `encoder.embed_tokens.weight`, saved once, as transformers does.
    w.add("shared.weight", torch.nn.Embedding(VOCAB, 4096).weight)
    for i in range(t5_layers):
        block = T5Block(t5cfg, has_relative_attention_bias=i == 0, layer_idx=i)
        w.add_module(f"encoder.block.{i}.", block)
        del block
    w.add_module("encoder.final_layer_norm.", T5LayerNorm(4096, eps=1e-6))
    w.close()
    print(f"text_encoder: {w.total / 1e9:.2f} GB in {len(w.shards)} shards", flush=True)

    AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
        norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval().save_pretrained(out / "vae")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layout", choices=("medium", "real"), default="medium")
    ap.add_argument("--t5-layers", type=int, default=2, help="real layout: T5 layers (XXL has 24)")
    ap.add_argument("--shard-bytes", type=int, default=2_000_000_000, help="real layout: shard size")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    if args.layout == "real":
        write_real(args.out, args.t5_layers, args.shard_bytes)
        lengths = {"prompt": 256, "caption": 128, "vqa": 128}
    else:
        write_medium(args.out)
        lengths = {"prompt": 128, "caption": 64, "vqa": 64}
    write_tokenizer(tokenizer(), args.out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(
        args.out / "scheduler")
    (args.out / "model_index.json").write_text(json.dumps({
        "_class_name": "DualDiffSD3Pipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "DualDiffSD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "caption_prompt": "Describe the image.",
        "text_lengths": lengths,
    }, indent=2))
    print(f"{args.layout} checkpoint in {args.out}")


def write_medium(out: Path) -> None:
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(
        vocab_size=VOCAB, d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )).eval()
    dit = DualDiffSD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
        num_attention_heads=12, joint_attention_dim=512, caption_projection_dim=768,
        pooled_projection_dim=768, out_channels=16, pos_embed_max_size=32, vocab_size=VOCAB,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 256, 256), layers_per_block=1, latent_channels=16,
        norm_num_groups=32, sample_size=256, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    dit.save_pretrained(out / "transformer")
    t5.save_pretrained(out / "text_encoder")
    vae.save_pretrained(out / "vae")


if __name__ == "__main__":
    main()
