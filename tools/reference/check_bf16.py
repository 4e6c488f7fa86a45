"""bf16 parity where ONNX Runtime cannot compute it: ONNX Runtime 1.31's CPU provider has no bf16
kernels (Add, Mul, Sigmoid, ReduceMax), so the bf16 package's half segments run here in onnx's
reference evaluator (numpy with ml_dtypes' bfloat16) against PyTorch's own bf16 outputs
(make_precision_goldens.py). MatMul, Conv and LayerNormalization are computed from f32 copies of
their inputs and rounded back, as a bf16 kernel and PyTorch accumulate (numpy would sum 768 terms
in bf16: the medium text head was then 17 bf16 steps off, 1 step with f32 sums). Each segment gets
the reference's input to it. The bound is counted in bf16 steps at the reference output's largest
magnitude: three for the transformer's segments (worst measured: 2, tiny and medium), five for the
VAE (worst: 3.75, the encoder's log-variance). A NaN fails. bf16 has 8 significant bits, so these
bounds catch a wrong operator or a gross error, not a small one: a weight of the first block's MLP
20% off fails (5.5e-2 against 4.7e-2), the attention output projection 20% off passes.

    ddit-export convert --checkpoint tests/fixtures/tiny-f32/checkpoint --out PKG --precision bf16
    python tools/reference/check_bf16.py PKG [GOLDEN]   # default: the tiny fixture's bf16 goldens

Needs numpy, onnx, ml_dtypes and safetensors (no PyTorch); scripts/test.sh runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_conv import Conv as _Conv
from onnx.reference.ops.op_layer_normalization import LayerNormalization as _LayerNorm
from onnx.reference.ops.op_matmul import MatMul as _MatMul
from safetensors.numpy import load_file

GOLDEN = Path(__file__).resolve().parents[2] / "tests/fixtures/tiny-f32/golden-bf16.safetensors"


def _f32_accumulating(base):
    """`base` computed from f32 copies of its inputs, its outputs rounded back to the inputs' type:
    a bf16 kernel (and PyTorch) accumulates matrix products and convolutions in f32, and the
    exporter asks LayerNormalization for f32 statistics (`stash_type` 1, held by
    exporter/tests/islands.rs); numpy on ml_dtypes' bfloat16 would do all of it in bf16."""

    class Op(base):
        def _run(self, *args, **kw):
            dtype = args[0].dtype
            wide = [a.astype(np.float32) if a is not None and a.dtype == dtype else a for a in args]
            return tuple(o.astype(dtype) for o in super()._run(*wide, **kw))

    Op.__name__ = base.__name__
    return Op


F32_ACCUMULATING = [_f32_accumulating(op) for op in (_MatMul, _Conv, _LayerNorm)]


def bf16_step(x: float) -> float:
    """The spacing of bf16 numbers at magnitude x (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(max(x, 2.0**-126))) - 7)


def cases(g: dict, manifest: dict) -> list[tuple[str, dict, list]]:
    bf = lambda k: g[k].astype(ml_dtypes.bfloat16)  # noqa: E731
    temb = bf("blocks.temb")
    out = [
        ("patch_embed", {"latents": bf("patch.latents")}, ["patch.tokens"]),
        ("context_embedder", {"hidden_states": bf("t5.hidden")}, ["ctx.out"]),
    ]
    last = 0
    for seg in manifest["segments"]:
        if seg["role"] in ("joint_blocks", "image_tail", "text_tail"):
            a, b = seg["blocks"]
            last = max(last, b)
            feeds = {"image_tokens": bf(f"blocks.x.{a}"), "text_tokens": bf(f"blocks.y.{a}"), "temb": temb}
            wants = {"joint_blocks": [f"blocks.x.{b}", f"blocks.y.{b}"],
                     "image_tail": [f"blocks.x.{b}"], "text_tail": [f"blocks.y.{b}"]}[seg["role"]]
            out.append((seg["name"], feeds, wants))
    return out + [
        ("text_head", {"text_tokens": bf(f"blocks.y.{last}")}, ["text_head.out"]),
        ("vae_encoder", {"image": bf("vae_enc.image")}, ["vae_enc.mean", "vae_enc.logvar"]),
        ("vae_decoder", {"latent": bf("vae_dec.z")}, ["vae_dec.image"]),
    ]


def main(pkg: Path, golden: Path) -> int:
    g = load_file(str(golden))
    manifest = json.loads((pkg / "manifest.json").read_text())
    failed = 0
    for name, feeds, wants in cases(g, manifest):
        model = onnx.load(str(pkg / f"{name}.onnx"))
        outs = ReferenceEvaluator(model, new_ops=F32_ACCUMULATING).run(None, feeds)
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
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else GOLDEN))
