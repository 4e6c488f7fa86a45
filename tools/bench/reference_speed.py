"""The PyTorch side of scripts/bench.sh: the reference model of tools/reference, timed on the work
each task's result needs and nothing else.

The model is tools/reference's (same checkpoint, same weights, same steps, guidance and canvas
lengths); the samplers are eval_shapes.py's with the work whose result is thrown away taken out,
as ddit takes it out:
- text to image: all prompts in one call, classifier-free guidance as a doubled batch [negative...,
  positive...] (as the official pipeline batches it); each pass runs the blocks, the last block
  computes only the image stream (its text stream is never read), and no text head (the logits
  are never read);
- captioning and VQA: one image at a time with the no-change cache (as the official pipeline runs
  them); each pass's last block computes only the text stream, no image head; the text head runs on
  the masked positions only (the only logits a draw reads); the sampler works in float32 (the
  official one does; eval_shapes.py's built its noise and softmax over canvas x vocabulary in
  float64) and draws the exponential race only for the positions that unmask this step (the same
  distribution as a race over the whole canvas, whose other rows were discarded).
Everything runs under torch.inference_mode().

  --task T  times the N items of task T (generate, caption, vqa) in this process, from the loaded
            model to the last result, with no warm-up call: the same treatment as ddit's side,
            whose `batch` times from the loaded model too. Prints {"task", "n", "threads", "s"}.
  --flops   counts the FLOPs of one job of each task (torch's FlopCounterMode: matrix products,
            convolutions, attention; T5, every transformer pass, the VAE) from a fixed generator
            state, untimed. Prints {"generate": F, "caption": F, "vqa": F}.
  --sgemm-only  the fastest 2048^3 fp32 product through torch and through ONNX Runtime, GFLOP/s at
            --threads threads: a load indicator of this shared machine, not a ceiling.
  --check   compares the changed samplers with eval_shapes.py's on the first N items at the same
            seeds (latents and images of text to image; logits of the same canvas; caption and
            VQA tokens): the correctness check of this file's rewrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from eval_shapes import VQA, image_latent, load  # noqa: E402

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def last_block(block, x: torch.Tensor, y: torch.Tensor, temb: torch.Tensor, keep: str) -> torch.Tensor:
    """diffusers' JointTransformerBlock (context_pre_only=False, no dual attention, no qk norm), as
    its forward and JointAttnProcessor2_0 compute it, but only the stream `keep` ("image" or
    "text"): the other stream's query, attention output projection and MLP are not computed (both
    streams still give keys and values)."""
    nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    ny, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(y, emb=temb)
    attn = block.attn
    b, heads = x.shape[0], attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    k = torch.cat([split(attn.to_k(nx)), split(attn.add_k_proj(ny))], dim=2)
    v = torch.cat([split(attn.to_v(nx)), split(attn.add_v_proj(ny))], dim=2)
    q = split(attn.to_q(nx) if keep == "image" else attn.add_q_proj(ny))
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(b, -1, o.shape[1] * o.shape[3]).to(q.dtype)
    if keep == "image":
        x = x + gate_msa.unsqueeze(1) * attn.to_out[1](attn.to_out[0](o))
        n = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * block.ff(n)
    y = y + c_gate_msa.unsqueeze(1) * attn.to_add_out(o)
    n = block.norm2_context(y) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    return y + c_gate_mlp.unsqueeze(1) * block.ff_context(n)


def velocity(dit, latents: torch.Tensor, t5_hidden: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The image output of dit.forward without the text head and the last block's text stream."""
    temb = dit.embed_time(timestep)
    y = dit.embed_context(t5_hidden)
    p = dit.config.patch_size
    h, w = latents.shape[-2] // p, latents.shape[-1] // p
    x, y = dit.run_blocks(dit.embed_image(latents), y, temb, 0, -1)
    return dit.image_head(last_block(dit.transformer_blocks[-1], x, y, temb, "image"), temb, h, w)


def text_states(dit, z: torch.Tensor, t5_hidden: torch.Tensor) -> torch.Tensor:
    """The text stream of dit.forward before text_proj_out (clean image, t = 0), without the image
    head and the last block's image stream. [1, L, D]."""
    temb = dit.embed_time(torch.zeros(1))
    x, y = dit.run_blocks(dit.embed_image(z), dit.embed_context(t5_hidden), temb, 0, -1)
    return dit.text_norm_out(last_block(dit.transformer_blocks[-1], x, y, temb, "text"))


def generate_batch(dit, t5, vae, tok, model: Path, prompts: list[str], prompt_len: int, steps: int,
                   guidance: float, g: torch.Generator, latents_only: bool = False) -> torch.Tensor:
    pad = tok.token_to_id("<pad>")

    def ids(text: str) -> list[int]:
        t = tok.encode(text).ids[:prompt_len]
        return t + [pad] * (prompt_len - len(t))

    n = len(prompts)
    ctx = t5(input_ids=torch.tensor([ids("")] * n + [ids(p) for p in prompts])).last_hidden_state
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(model / "scheduler")
    sched.set_timesteps(steps)
    c, s = dit.config.in_channels, dit.config.sample_size
    x = torch.randn((n, c, s, s), generator=g)
    for t in sched.timesteps:
        v = velocity(dit, torch.cat([x, x]), ctx, t.expand(2 * n))
        v = v[:n] + guidance * (v[n:] - v[:n])
        x = sched.step(v, t, x).prev_sample
    if latents_only:
        return x
    return vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample


def masked_sample(dit, t5, z, prefix: list[int], length: int, mask: int, steps: int,
                  g: torch.Generator) -> list[int]:
    """eval_shapes.masked_sample with the discarded work taken out (see the module's note)."""
    x = torch.full((1, length), mask, dtype=torch.long)
    x[0, : len(prefix)] = torch.tensor(prefix)
    times = torch.linspace(1.0, 1e-5, steps + 1, dtype=torch.float64)
    p = None
    for k in range(steps):
        t, s = times[k].item(), times[k + 1].item()
        masked = x[0] == mask
        if p is None:  # the no-change cache: rows of the masked positions, in order
            logits = dit.text_proj_out(text_states(dit, z, t5(input_ids=x).last_hidden_state)[0, masked])
            logits[:, mask] = float("-inf")
            p = logits.softmax(-1)
        stay = torch.rand(length, generator=g) < s / t
        unmask = masked & ~stay
        if unmask.any():
            rows = p[unmask[masked]]
            e = -torch.log(1 - torch.rand(rows.shape, generator=g))
            x[0, unmask] = (rows / e).argmax(-1)
            p = None
    masked = x[0] == mask
    if masked.any():
        logits = dit.text_proj_out(text_states(dit, z, t5(input_ids=x).last_hidden_state)[0, masked])
        logits[:, mask] = float("-inf")
        x[0, masked] = logits.argmax(-1)
    return x[0].tolist()


def sgemm_gflops(threads: int, n: int = 2048, runs: int = 10) -> dict[str, float]:
    """The fastest of `runs` [n, n] x [n, n] fp32 products, GFLOP/s, through torch and through
    ONNX Runtime's CPU MatMul (MLAS; ddit's kernels), each at `threads` threads."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)

    def rate(run) -> float:
        run()  # warm-up
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / 1e9 / best

    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads, whatever the onnx package writes
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": np.ascontiguousarray(b.numpy())}
    return {"torch": rate(lambda: torch.mm(a, b)), "onnxruntime": rate(lambda: sess.run(None, feeds))}


def check(args, dit, t5, vae, tok, jobs, scenes) -> None:
    """The changed samplers against eval_shapes.py's (unchanged) on the same items and seeds."""
    import eval_shapes as ref
    import numpy as np

    from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: F401

    out = {}
    # Text to image: the same noise (one randn per call), so latents and images compare directly.
    prompts = [s["caption"] for s in scenes]

    def ref_generate(g):  # eval_shapes' loop, batched as generate_batch batches it, full forward
        pad = tok.token_to_id("<pad>")
        ids = lambda text: (lambda t: t + [pad] * (args.prompt_len - len(t)))(tok.encode(text).ids[: args.prompt_len])
        n = len(prompts)
        ctx = t5(input_ids=torch.tensor([ids("")] * n + [ids(p) for p in prompts])).last_hidden_state
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(args.model / "scheduler")
        sched.set_timesteps(28)
        c, s = dit.config.in_channels, dit.config.sample_size
        x = torch.randn((n, c, s, s), generator=g)
        for t in sched.timesteps:
            v = dit(torch.cat([x, x]), ctx, t.expand(2 * n))[0]
            v = v[:n] + 7.0 * (v[n:] - v[:n])
            x = sched.step(v, t, x).prev_sample
        return x

    a = ref_generate(torch.Generator().manual_seed(0))
    b = generate_batch(dit, t5, vae, tok, args.model, prompts, args.prompt_len, 28, 7.0,
                       torch.Generator().manual_seed(0), latents_only=True)
    dec = lambda x: vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    px = lambda im: ((im.clamp(-1, 1) + 1) * 127.5).round().byte()
    ia, ib = px(dec(a)), px(dec(b))
    out["generate"] = {"latent_max_abs_diff": (a - b).abs().max().item(),
                       "latent_max_abs": a.abs().max().item(),
                       "image_pixels_differing": int((ia != ib).sum()), "image_pixels": ia.numel(),
                       "image_max_pixel_diff": int((ia.int() - ib.int()).abs().max())}
    # The model part of a caption pass: the masked rows' logits of the same canvas, both ways.
    mask = tok.token_to_id("<extra_id_0>")
    size = dit.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    diffs = []
    for sc in scenes:
        g = torch.Generator().manual_seed(sc["id"])
        z = image_latent(vae, args.set / sc["image"], size, g)
        x = torch.full((1, args.caption_len), mask, dtype=torch.long)
        x[0, : len(jobs["prefix"])] = torch.tensor(jobs["prefix"])
        x[0, -1] = tok.token_to_id("</s>")  # a canvas with masked and unmasked positions
        h = t5(input_ids=x).last_hidden_state
        full = dit(z, h, torch.zeros(1))[1][0, x[0] == mask]
        mine = dit.text_proj_out(text_states(dit, z, h)[0, x[0] == mask])
        diffs.append(((full - mine).abs().max() / full.abs().max()).item())
    out["caption_logits_max_rel_diff"] = max(diffs)
    # Whole captions and answers: the sampler's draws differ (float32 instead of float64 uniforms,
    # the race drawn only for the rows that unmask), so the tokens agree where the model is sure.
    same = {"caption": 0, "vqa": 0}
    for sc in scenes:
        for task, (prefix, length, steps) in (("caption", (jobs["prefix"], args.caption_len, 64)),
                                              ("vqa", (tok.encode(VQA.format(q=sc["qa"][0]["question"])).ids[:-1],
                                                       args.vqa_len, 32))):
            toks = []
            for fn in (ref.masked_sample, masked_sample):
                g = torch.Generator().manual_seed(sc["id"])
                z = image_latent(vae, args.set / sc["image"], size, g)
                toks.append(fn(dit, t5, z, prefix, length, mask, steps, g))
            same[task] += toks[0] == toks[1]
            if toks[0] != toks[1]:
                print(f"{task} {sc['id']}: {tok.decode(toks[0], skip_special_tokens=True)!r} vs "
                      f"{tok.decode(toks[1], skip_special_tokens=True)!r}", file=sys.stderr)
    out["tokens_equal"] = {k: f"{v}/{len(scenes)}" for k, v in same.items()}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sgemm-only", action="store_true")
    ap.add_argument("--task", choices=["generate", "caption", "vqa"])
    ap.add_argument("--flops", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--set", type=Path)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sgemm_only:
        print(json.dumps(sgemm_gflops(args.threads)))
        return
    if args.model is None or args.set is None or not (args.task or args.flops or args.check):
        ap.error("--model, --set and one of --task, --flops, --check are required unless --sgemm-only")
    # The canvas lengths the checkpoint carries (model_index.json), as ddit-export uses them.
    index = json.loads((args.model / "model_index.json").read_text())
    lengths = {"prompt": 256, "caption": 128, "vqa": 128, **index.get("text_lengths", {})}
    args.prompt_len, args.caption_len, args.vqa_len = lengths["prompt"], lengths["caption"], lengths["vqa"]
    dit, t5, vae, tok = load(args.model)
    mask = tok.token_to_id("<extra_id_0>")
    size = dit.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    prompt = index.get("caption_prompt") or ""
    cap_prefix = tok.encode(prompt).ids[:-1] if prompt else []
    scenes = [json.loads(line) for line in open(args.set / "scenes.jsonl")][: args.n]

    def caption(sc, g) -> list[int]:
        z = image_latent(vae, args.set / sc["image"], size, g)
        return masked_sample(dit, t5, z, cap_prefix, args.caption_len, mask, 64, g)

    def answer(sc, g) -> list[int]:
        z = image_latent(vae, args.set / sc["image"], size, g)
        prefix = tok.encode(VQA.format(q=sc["qa"][0]["question"])).ids[:-1]
        return masked_sample(dit, t5, z, prefix, args.vqa_len, mask, 32, g)

    def generate(items, g) -> torch.Tensor:
        return generate_batch(dit, t5, vae, tok, args.model, [s["caption"] for s in items],
                              args.prompt_len, 28, 7.0, g)

    with torch.inference_mode():
        if args.check:
            check(args, dit, t5, vae, tok, {"prefix": cap_prefix}, scenes)
            return
        if args.flops:
            # A caption job's FLOPs depend on its draws (the no-change cache skips a pass when no
            # token changed), so they are counted from a fixed generator state.
            sc, out = scenes[0], {}
            for task, job in (("generate", lambda g: generate([sc], g)), ("caption", lambda g: caption(sc, g)),
                              ("vqa", lambda g: answer(sc, g))):
                with FlopCounterMode(display=False) as fc:
                    job(torch.Generator().manual_seed(sc["id"]))
                out[task] = fc.get_total_flops()
            print(json.dumps(out))
            return
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        if args.task == "generate":
            generate(scenes, g)
        else:
            for sc in scenes:
                (caption if args.task == "caption" else answer)(sc, g)
        s = time.perf_counter() - t0
    print(json.dumps({"task": args.task, "n": len(scenes), "threads": args.threads, "s": s}))


if __name__ == "__main__":
    main()
