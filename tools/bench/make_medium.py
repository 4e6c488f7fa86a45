"""A random "medium" D-DiT checkpoint at realistic width, for scripts/bench.sh (timing only: its
outputs mean nothing). Hidden 768, 12 heads, 4 joint blocks, 16 latent channels, a x8 VAE at 256 px
(patch 2: 256 image tokens), a T5-style encoder (d_model 512, 4 layers, gated GELU) with a
vocabulary of 32 128. Canvas lengths: prompt 128, caption 64, VQA 64.

    /opt/ddit-venv/bin/python tools/bench/make_medium.py --out .ddit/bench/medium
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402
from make_fixtures import WORDS, write_tokenizer  # noqa: E402

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
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
    if args.out.exists():
        shutil.rmtree(args.out)
    dit.save_pretrained(args.out / "transformer")
    t5.save_pretrained(args.out / "text_encoder")
    vae.save_pretrained(args.out / "vae")
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
        "text_lengths": {"prompt": 128, "caption": 64, "vqa": 64},
    }, indent=2))
    print(f"medium checkpoint in {args.out}")


if __name__ == "__main__":
    main()
