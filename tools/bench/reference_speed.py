"""The PyTorch side of scripts/bench.sh: the reference samplers of tools/reference, timed at their best.

Text to image passes all prompts in one call, with classifier-free guidance as a doubled batch
[negative..., positive...] (as the official pipeline batches); captioning and VQA run one image at a
time with the no-change cache (as the official pipeline does). torch uses --threads threads. Model
load and a warm-up call are excluded; each task counts the fastest of --repeat runs. Prints one JSON
line of seconds per task, the FLOPs of one item of each task (torch's FlopCounterMode over a whole job: T5, every transformer pass, the VAE;
matrix products, convolutions and attention; for text to image without the text head, whose logits
the reference computes and discards) and the machine's fp32 GEMM rate at --threads threads
(`sgemm_gflops`: the fastest 2048^3 product of torch's and of ONNX Runtime's, the library ddit runs
on), from which scripts/bench.sh derives each side's share of the fp32 ceiling. `--sgemm-only`
prints that rate alone: the script measures it before ddit's runs too, and keeps the higher, since
this shared machine's speed drifts within a run. `--times-only` prints the seconds alone (the bench's
rounds before its last).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from eval_shapes import VQA, image_latent, load, masked_sample  # noqa: E402

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


@torch.no_grad()
def generate_batch(dit, t5, vae, tok, model: Path, prompts: list[str], prompt_len: int, steps: int,
                   guidance: float, g: torch.Generator) -> torch.Tensor:
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
        v = dit(torch.cat([x, x]), ctx, t.expand(2 * n))[0]
        v = v[:n] + guidance * (v[n:] - v[:n])
        x = sched.step(v, t, x).prev_sample
    return vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample


def fastest(run, times: int) -> float:
    """The fastest of `times` timed calls of `run`, in seconds: this shared machine drifts."""
    best = float("inf")
    for _ in range(times):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_gflops(threads: int, n: int = 2048, runs: int = 10) -> dict[str, float]:
    """The fastest of `runs` [n, n] x [n, n] fp32 products, GFLOP/s, through torch and through
    ONNX Runtime's CPU MatMul (MLAS; ddit's kernels), each at `threads` threads."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)

    def rate(run) -> float:
        run()  # warm-up
        return 2 * n**3 / 1e9 / fastest(run, runs)

    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads, whatever the onnx package writes
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": np.ascontiguousarray(b.numpy())}
    return {"torch": rate(lambda: torch.mm(a, b)), "onnxruntime": rate(lambda: sess.run(None, feeds))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sgemm-only", action="store_true")
    ap.add_argument("--times-only", action="store_true", help="no FLOP count, no sgemm rate")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--set", type=Path)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=1, help="time each task this many times; the fastest counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sgemm_only:
        print(json.dumps(sgemm_gflops(args.threads)))
        return
    if args.model is None or args.set is None:
        ap.error("--model and --set are required unless --sgemm-only")
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
    g = torch.Generator().manual_seed(0)
    out = {"n": len(scenes), "threads": args.threads, "repeat": args.repeat}

    def captions() -> None:
        for sc in scenes:
            z = image_latent(vae, args.set / sc["image"], size, g)
            masked_sample(dit, t5, z, cap_prefix, args.caption_len, mask, 64, g)

    def answers() -> None:
        for sc in scenes:
            z = image_latent(vae, args.set / sc["image"], size, g)
            prefix = tok.encode(VQA.format(q=sc["qa"][0]["question"])).ids[:-1]
            masked_sample(dit, t5, z, prefix, args.vqa_len, mask, 32, g)

    generate_batch(dit, t5, vae, tok, args.model, ["warm up"], args.prompt_len, 2, 7.0, g)
    prompts = [s["caption"] for s in scenes]
    out["generate_s"] = fastest(
        lambda: generate_batch(dit, t5, vae, tok, args.model, prompts, args.prompt_len, 28, 7.0, g),
        args.repeat)
    out["caption_s"] = fastest(captions, args.repeat)
    out["vqa_s"] = fastest(answers, args.repeat)
    if args.times_only:
        print(json.dumps(out))
        return

    # A caption job's FLOPs depend on its draws (the no-change cache skips a pass when no token
    # changed), so they are counted from a fixed generator state, whatever ran before.
    g.manual_seed(0)
    sc = scenes[0]
    jobs = {
        "generate": lambda: generate_batch(dit, t5, vae, tok, args.model, [sc["caption"]],
                                           args.prompt_len, 28, 7.0, g),
        "caption": lambda: masked_sample(dit, t5, image_latent(vae, args.set / sc["image"], size, g),
                                         cap_prefix, args.caption_len, mask, 64, g),
        "vqa": lambda: masked_sample(dit, t5, image_latent(vae, args.set / sc["image"], size, g),
                                     tok.encode(VQA.format(q=sc["qa"][0]["question"])).ids[:-1],
                                     args.vqa_len, mask, 32, g),
    }
    for task, job in jobs.items():
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            job()
        flops = fc.get_total_flops()
        if task == "generate":
            # The reference computes text logits in every pass of text to image and throws them
            # away (ddit does not compute them): not part of an image's work.
            flops -= sum(sum(ops.values()) for name, ops in fc.get_flop_counts().items()
                         if name.endswith("text_proj_out"))
        out[f"{task}_flops"] = flops
    out["sgemm_gflops"] = sgemm_gflops(args.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
