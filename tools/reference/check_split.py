"""Parity of a split fp32 package against the PyTorch reference, at any width (the 2 GB split check
at the real model's width: docs/model-package.md#no-file-over-2-gb).

    /opt/ddit-venv/bin/python tools/bench/make_medium.py --layout real --t5-layers 3 \\
        --out .ddit/realwidth/checkpoint
    target/release/ddit-export convert --checkpoint .ddit/realwidth/checkpoint --out .ddit/realwidth/pkg
    /opt/ddit-venv/bin/python tools/reference/check_split.py \\
        --checkpoint .ddit/realwidth/checkpoint --package .ddit/realwidth/pkg

Small inputs (2 x 8 token ids, a 2 x C x 8 x 8 latent, timesteps 0 and 700). Each segment is run
through ONNX Runtime (CPU) twice: on the reference's own input to it (its error alone), and on the
output of the ONNX segments before it (the chain: T5 pieces end to end, then context embedder,
patch and timestep embedding, every joint-block file, both tails and both heads), against the
unsplit PyTorch computation. The PyTorch side holds one module at a time (T5 whole, then the
transformer's blocks one by one, read from the checkpoint's shards), ONNX Runtime one segment at a
time, so the peak memory is about the largest of T5 and one segment. `--save`/`--compare`: the
chained outputs of two packages of one checkpoint (split and less split) against each other. Exits
non-zero when any error exceeds `--tol` (1e-4, the fp32 parity bound) or is NaN.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors import safe_open
from transformers import T5EncoderModel

from diffusers.models.attention import JointTransformerBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402


class Weights:
    """The tensors of a (maybe sharded) safetensors folder, read one key at a time."""

    def __init__(self, folder: Path, stem: str):
        index = folder / f"{stem}.safetensors.index.json"
        if index.exists():
            self.where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            f = folder / f"{stem}.safetensors"
            with safe_open(str(f), "pt") as s:
                self.where = {k: f for k in s.keys()}

    def load(self, prefix: str, strip: bool = True) -> dict[str, torch.Tensor]:
        out = {}
        for k, f in self.where.items():
            if k.startswith(prefix):
                with safe_open(str(f), "pt") as s:
                    out[k[len(prefix):] if strip else k] = s.get_tensor(k).float()
        return out


class Report:
    def __init__(self, tol: float):
        self.tol, self.rows, self.failed = tol, [], False

    def check(self, what: str, got: np.ndarray, want: torch.Tensor) -> None:
        want = want.detach().numpy()
        assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
        err = float(np.abs(got.astype(np.float64) - want).max())
        bad = not err <= self.tol  # NaN fails
        self.failed |= bad
        self.rows.append((what, err, float(np.abs(want).max())))
        print(f"{'FAIL' if bad else 'ok  '} {what:<46} max|diff| {err:.3e}   max|ref| "
              f"{np.abs(want).max():.3e}", flush=True)


def session(pkg: Path, seg: dict) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.enable_cpu_mem_arena = False
    t = time.time()
    s = ort.InferenceSession(str(pkg / seg["files"][0]["path"]), opts, providers=["CPUExecutionProvider"])
    print(f"     loaded {seg['name']} ({sum(f['bytes'] for f in seg['files']) / 1e9:.2f} GB) in "
          f"{time.time() - t:.1f} s", flush=True)
    return s


def run(s: ort.InferenceSession, feeds: dict[str, object]) -> list[np.ndarray]:
    names = [i.name for i in s.get_inputs()]
    return s.run(None, {n: np.ascontiguousarray(np.asarray(feeds[n])) for n in names})


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--package", type=Path, required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--save", type=Path, help="write the chained ONNX outputs here (.npz), to compare "
                    "two packages of one checkpoint (--compare)")
    ap.add_argument("--compare", type=Path, help="a --save file of another package of this checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pkg = args.package
    segs = json.loads((pkg / "manifest.json").read_text())["segments"]
    by_role = lambda role: [s for s in segs if s["role"] == role]  # noqa: E731
    rep = Report(args.tol)

    g = torch.Generator().manual_seed(7)
    tcfg = json.loads((args.checkpoint / "transformer" / "config.json").read_text())
    c = tcfg["in_channels"]
    ids = torch.randint(0, 32000, (2, 8), generator=g)
    lat = torch.randn(2, c, 8, 8, generator=g)
    ts = torch.tensor([0.0, 700.0])

    # ---- T5: each piece alone, then chained ----------------------------------------------
    t5 = T5EncoderModel.from_pretrained(args.checkpoint / "text_encoder", torch_dtype=torch.float32).eval()
    out = t5(input_ids=ids, output_hidden_states=True)
    states = out.hidden_states  # [i]: the input to layer i (0: the embedding); [-1]: after the final norm
    hidden = out.last_hidden_state
    del t5, out
    gc.collect()
    chained = None
    for seg in by_role("text_encoder"):
        start, end = seg.get("blocks", [0, len(states) - 1])
        s = session(pkg, seg)
        want = hidden if end == len(states) - 1 else states[end]
        alone = run(s, {"input_ids": ids.numpy(), "hidden_states_in": states[start].numpy()})[0]
        rep.check(f"{seg['name']} (layers {start}..{end})", alone, want)
        if chained is not None:
            chained = run(s, {"input_ids": ids.numpy(), "hidden_states_in": chained})[0]
        else:
            chained = alone
        del s
        gc.collect()
    rep.check("T5 pieces chained", chained, hidden)
    t5_chained = chained

    # ---- transformer: reference by block, ONNX by segment --------------------------------
    tw = Weights(args.checkpoint / "transformer", "diffusion_pytorch_model")
    cfg = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    n = cfg["num_layers"]
    model = DualDiffSD3Transformer2DModel(**{**cfg, "num_layers": 0}).eval()
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in tw.load("").items() if not k.startswith("transformer_blocks.")}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    temb = model.embed_time(ts)
    xs, ys = [model.embed_image(lat)], [model.embed_context(hidden)]
    d, heads = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"]
    t = time.time()
    for i in range(n):
        block = JointTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=d // heads,
                                      context_pre_only=False, qk_norm=None, use_dual_attention=False)
        block.load_state_dict(tw.load(f"transformer_blocks.{i}."))
        y, x = block(hidden_states=xs[-1], encoder_hidden_states=ys[-1], temb=temb)
        xs.append(x)
        ys.append(y)
        del block
    print(f"     reference: {n} blocks in {time.time() - t:.1f} s", flush=True)
    ph, pw = lat.shape[-2] // cfg["patch_size"], lat.shape[-1] // cfg["patch_size"]
    velocity, logits = model.image_head(xs[-1], temb, ph, pw), model.text_head(ys[-1])

    def one(role: str) -> ort.InferenceSession:
        (seg,) = by_role(role)
        return session(pkg, seg)

    s = one("timestep_embed")
    o_temb = run(s, {"timestep": ts.numpy()})[0]
    rep.check("timestep_embed", o_temb, temb)
    s = one("context_embedder")
    rep.check("context_embedder", run(s, {"hidden_states": hidden.numpy()})[0], ys[0])
    o_y = run(s, {"hidden_states": t5_chained})[0]
    s = one("patch_embed")
    o_x = run(s, {"latents": lat.numpy()})[0]
    rep.check("patch_embed", o_x, xs[0])
    del s
    for seg in by_role("joint_blocks"):
        a, b = seg["blocks"]
        s = session(pkg, seg)
        x, y = run(s, {"image_tokens": xs[a].numpy(), "text_tokens": ys[a].numpy(), "temb": temb.numpy()})
        rep.check(f"{seg['name']} image stream", x, xs[b])
        rep.check(f"{seg['name']} text stream", y, ys[b])
        o_x, o_y = run(s, {"image_tokens": o_x, "text_tokens": o_y, "temb": o_temb})
        del s
        gc.collect()
    rep.check(f"chained to block {n - 1}: image stream", o_x, xs[n - 1])
    rep.check(f"chained to block {n - 1}: text stream", o_y, ys[n - 1])
    ref_in = {"image_tokens": xs[n - 1].numpy(), "text_tokens": ys[n - 1].numpy(), "temb": temb.numpy()}
    chain_in = {"image_tokens": o_x, "text_tokens": o_y, "temb": o_temb}
    s = one("image_tail")
    rep.check("image_tail", run(s, ref_in)[0], xs[n])
    c_x = run(s, chain_in)[0]
    s = one("text_tail")
    rep.check("text_tail", run(s, ref_in)[0], ys[n])
    c_y = run(s, chain_in)[0]
    s = one("image_head")
    rep.check("image_head", run(s, {"image_tokens": xs[n].numpy(), "temb": temb.numpy(),
                                    "latents": lat.numpy()})[0], velocity)
    rep.check("chained velocity (T5 -> image head)",
              run(s, {"image_tokens": c_x, "temb": o_temb, "latents": lat.numpy()})[0], velocity)
    s = one("text_head")
    rep.check("text_head", run(s, {"text_tokens": ys[n].numpy()})[0], logits)
    c_logits = run(s, {"text_tokens": c_y})[0]
    rep.check("chained logits (T5 -> text head)", c_logits, logits)
    c_velocity = run(one("image_head"), {"image_tokens": c_x, "temb": o_temb, "latents": lat.numpy()})[0]
    mine = {"t5": t5_chained, "velocity": c_velocity, "logits": c_logits}
    if args.save:
        np.savez(args.save, **mine)
    if args.compare:
        other = np.load(args.compare)
        for k, v in mine.items():
            print(f"     against {args.compare.name}: chained {k} max|diff| "
                  f"{float(np.abs(v - other[k]).max()):.3e}")
    worst = max(r[1] for r in rep.rows)
    print(f"worst max|diff| {worst:.3e} (tolerance {args.tol:g}); {'FAILED' if rep.failed else 'passed'}")
    sys.exit(1 if rep.failed else 0)


if __name__ == "__main__":
    main()
