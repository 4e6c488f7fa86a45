"""bf16 parity where ONNX Runtime cannot compute it: ONNX Runtime 1.31's CPU provider has no bf16
kernels (Add, Mul, Sigmoid, ReduceMax), so the bf16 package's half segments run here in onnx's
reference evaluator (numpy with ml_dtypes' bfloat16) against PyTorch's own bf16 outputs
(tests/fixtures/tiny-f32/golden-bf16.safetensors, from make_precision_goldens.py). Each segment
gets the reference's input to it. The bound is counted in bf16 steps at the reference output's
largest magnitude: three for the transformer's segments (the worst measured is two), five for the
VAE (measured: 2.9 for the encoder's mean, 3.75 for its log-variance; the evaluator's convolutions
accumulate in bf16 where PyTorch's accumulate in f32). A NaN fails. bf16 has 8 significant bits,
so these bounds catch a wrong operator or a gross error, not a small one: a weight of the first
block's MLP 20% off fails (5.5e-2 against 4.7e-2), the attention output projection 20% off passes.

    ddit-export convert --checkpoint tests/fixtures/tiny-f32/checkpoint --out PKG --precision bf16
    python tools/reference/check_bf16.py PKG

Needs numpy, onnx, ml_dtypes and safetensors (no PyTorch); scripts/test.sh runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from safetensors.numpy import load_file

GOLDEN = Path(__file__).resolve().parents[2] / "tests/fixtures/tiny-f32/golden-bf16.safetensors"


def bf16_step(x: float) -> float:
    """The spacing of bf16 numbers at magnitude x (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(max(x, 2.0**-126))) - 7)


def cases(g: dict) -> list[tuple[str, dict, list]]:
    bf = lambda k: g[k].astype(ml_dtypes.bfloat16)  # noqa: E731
    blocks = {"image_tokens": bf("blocks.x.0"), "text_tokens": bf("blocks.y.0"), "temb": bf("blocks.temb")}
    tails = {"image_tokens": bf("blocks.x.3"), "text_tokens": bf("blocks.y.3"), "temb": bf("blocks.temb")}
    return [
        ("patch_embed", {"latents": bf("patch.latents")}, ["patch.tokens"]),
        ("context_embedder", {"hidden_states": bf("t5.hidden")}, ["ctx.out"]),
        ("joint_blocks_0_3", blocks, ["blocks.x.3", "blocks.y.3"]),
        ("image_tail_3_4", tails, ["blocks.x.4"]),
        ("text_tail_3_4", tails, ["blocks.y.4"]),
        ("text_head", {"text_tokens": bf("blocks.y.4")}, ["text_head.out"]),
        ("vae_encoder", {"image": bf("vae_enc.image")}, ["vae_enc.mean", "vae_enc.logvar"]),
        ("vae_decoder", {"latent": bf("vae_dec.z")}, ["vae_dec.image"]),
    ]


def main(pkg: Path) -> int:
    g = load_file(str(GOLDEN))
    failed = 0
    for name, feeds, wants in cases(g):
        model = onnx.load(str(pkg / f"{name}.onnx"))
        outs = ReferenceEvaluator(model).run(None, feeds)
        for out, key in zip(outs, wants):
            got, want = np.asarray(out).astype(np.float32), g[key]
            err = float(np.max(np.abs(got - want)))
            steps = 5 if name.startswith("vae_") else 3
            bound = steps * bf16_step(float(np.max(np.abs(want))))
            ok = got.shape == want.shape and not np.isnan(got).any() and err <= bound
            failed += not ok
            print(f"check_bf16: {name} -> {key}: max abs {err:.3g} (bound {bound:.3g}) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
