"""Train the ddit demo model: a small D-DiT on the world of coloured shapes (see shapes.py).

    /opt/ddit-venv/bin/python tools/train/train.py --out models/ddit-shapes

Order: (1) a tiny AutoencoderKL on 32x32 renders; (2) the T5-style encoder and the D-DiT transformer
with D-DiT's joint loss: flow matching on latents (text -> image, with 10% empty prompts for
classifier-free guidance), masked-diffusion cross-entropy on captions (image -> text, image at
timestep 0), and VQA examples with the question held fixed.

Captions are anchored to a fixed prompt prefix (`shapes.CAPTION_PROMPT`, "Describe the image."), held
fixed like a VQA question. Why: D-DiT's text stream has no absolute positions (T5 relative attention
only, no attention mask), so a fully masked canvas looks the same at every position and a model asked
for a caption on a bare canvas cannot know where "position 0" is; the committed model of the earlier
recipe (captions at position 0, no prefix) scattered its captions (exact match 0.460). With distinct
prefix tokens in front, every caption position has a distinct relative offset to them (T5 buckets 32,
exact up to 8 each way, distinct up to about 13), the same anchoring that makes VQA work. The
checkpoint carries the prefix as `caption_prompt` in model_index.json; `ddit-export` copies it into the
package manifest and a caption job without a `prompt` uses it.

Other settings: 24000 scenes; caption and VQA conditioned on the posterior mean; batches t2i 48 /
caption 16 / VQA 48 (anchored captions are learnt fast, two-object questions slowly); loss weights
flow 1 / caption 0.5 / VQA 0.5 (`--loss-weights`). Recipes tried before, with their logs and
ShapesEval scores, are in tools/train/experiments/ (position-0 captions; shifted captions; a first
prefix run with 64 buckets, 60000 scenes, posterior samples and caption-heavy batches, which solved
captions but lost VQA and generation; VQA answer weighting, `--batches 32,12,32 --vqa-pad-weight 0.1 --vqa-two-object 0.75`,
which did not lift two-object questions). `--vqa-mix`, `--vqa-paired` and `--t5-layers` give part of
each VQA batch to the yes/no relation questions and to training-only questions that split them
(see `training_only_questions`, and tools/train/experiments/vqa-word-order). The flag defaults are the
previous committed recipe (experiments/prefix-baseline), so that the experiments' commands keep their
meaning. The committed model (models/ddit-shapes) is

    train.py --out DIR --vae-from VAE --ddit-minutes 51 --ddit-steps 20000 \
        --vqa-mix 0.125,0.042,0.042,0.042,0.042 --vqa-paired --vqa-two-object 0.75

(7,047 steps at 0.43 s/step on a 2-core Intel Xeon with AVX-512; see experiments/vqa-splits-half).

There is no pretrained T5 here, so the text encoder is trained jointly (the real model freezes
T5-XXL). Wall-clock budgets per phase keep the whole recipe under 60 minutes on 2 CPU cores. Seeds
are fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
import shapes  # noqa: E402
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402

PROMPT_LEN, CAPTION_LEN, VQA_LEN = 16, 16, 32
VAE_SCENES = 24000
PAD_WEIGHT = 1.0  # weight of padding targets in the VQA answer loss (--vqa-pad-weight, see answer_loss)
TWO_OBJECT_VQA: float | None = None  # share of two-object scenes in VQA batches (--vqa-two-object); None: uniform
# Training-only questions about two-object scenes (--vqa-mix): each splits the yes/no relation question
# "is the X left of the Y?" into a part that has a first-order signal (see training_only_questions).
FIRST_WORDS = ["which", "first"]


MIX_KINDS = ("isrel", "first", "place", "first_colour", "place_colour")


def training_only_questions(objs: list, kind: str) -> list[tuple[str, str]]:
    """"first": "is the X left of the Y? which shape is first?" -> X (word order, from the text alone);
    "place": "is the X left?" -> yes/no (a named shape's place in the image, without word order);
    "first_colour" / "place_colour": the same with objects named by colour ("the red object")."""
    f, rel, s = shapes.relation(objs)
    word = "left" if rel == "left of" else "above"
    if kind.endswith("colour"):
        def name(o): return f"{o.colour} object"
        what = "colour"
    else:
        def name(o): return o.shape
        what = "shape"
    if kind.startswith("first"):
        return [(f"is the {name(x)} {rel} the {name(y)}? which {what} is first?", getattr(x, what))
                for x, y in ((f, s), (s, f))]
    return [(f"is the {name(f)} {word}?", "yes"), (f"is the {name(s)} {word}?", "no")]


def build_tokenizer(extra_words: list[str] = ()) -> Tokenizer:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in sorted(set(shapes.vocabulary()) | set(extra_words)) + ["?"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", "<extra_id_0>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


class Data:
    """Pre-rendered training scenes with their token canvases."""

    def __init__(self, n: int, seed: int, tok: Tokenizer):
        rng = random.Random(seed)
        self.images = np.empty((n, 3, shapes.SIZE, shapes.SIZE), np.float32)
        self.prompts, self.captions, self.vqa, n_objects = [], [], [], []
        # Training-only rows per scene (two-object scenes only): yes/no relations, "first", "place".
        self.extra: dict[str, list] = {k: [] for k in MIX_KINDS}
        with_first = tok.token_to_id("first") is not None
        self.pad, self.eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
        self.caption_prefix = tok.encode(shapes.CAPTION_PROMPT).ids[:-1]  # no trailing </s>
        for i in range(n):
            objs = shapes.sample_scene(rng)
            n_objects.append(len(objs))
            self.images[i] = shapes.render(objs).transpose(2, 0, 1) / 127.5 - 1.0
            text = tok.encode(shapes.caption(objs)).ids
            self.prompts.append(self.canvas(text, PROMPT_LEN))
            self.captions.append(self.canvas(self.caption_prefix + text, CAPTION_LEN))
            rows = [self.vqa_row(tok, q, a) for q, a in shapes.qa_pairs(objs)]
            self.vqa.append(rows)
            two = len(objs) == 2
            self.extra["isrel"].append([r for (q, _), r in zip(shapes.qa_pairs(objs), rows) if q.startswith("is the")])
            for kind in MIX_KINDS[1:]:
                qs = training_only_questions(objs, kind) if two and (not kind.startswith("first") or with_first) else []
                self.extra[kind].append([self.vqa_row(tok, q, a) for q, a in qs])
        self.prompts = torch.tensor(np.array(self.prompts))
        self.captions = torch.tensor(np.array(self.captions))
        self.one = torch.tensor([i for i, n in enumerate(n_objects) if n == 1])
        self.two = torch.tensor([i for i, n in enumerate(n_objects) if n == 2])

    def vqa_scenes(self, n: int) -> torch.Tensor:
        """Scene indices for a VQA batch: uniform, or TWO_OBJECT_VQA of them with two objects."""
        if TWO_OBJECT_VQA is None:
            return torch.randint(0, len(self.images), (n,))
        two = torch.rand(n) < TWO_OBJECT_VQA
        pick_two = self.two[torch.randint(0, len(self.two), (n,))]
        pick_one = self.one[torch.randint(0, len(self.one), (n,))]
        return torch.where(two, pick_two, pick_one)

    def vqa_row(self, tok: Tokenizer, question: str, answer: str) -> tuple[list[int], int]:
        """The VQA canvas (question prompt, answer, </s>, padding) and the prompt's length."""
        prompt = tok.encode(shapes.VQA_TEMPLATE.format(question=question)).ids[:-1]  # no trailing </s>
        return self.canvas(prompt + tok.encode(answer).ids, VQA_LEN), len(prompt)

    def vqa_batch(self, n: int, mix: dict[str, float], paired: bool) -> tuple[list, torch.Tensor]:
        """VQA rows and their scenes: a `mix` share of each training-only kind (two-object scenes), the
        rest drawn by vqa_scenes from the ShapesEval question kinds. `paired` puts both rows of a scene
        (both word orders, or both shapes) side by side."""
        rows, idx = [], []
        for kind, share in mix.items():
            want = len(rows) + int(round(share * n))
            while len(rows) < want:
                i = int(self.two[random.randrange(len(self.two))])
                picks = self.extra[kind][i] if paired else [random.choice(self.extra[kind][i])]
                for r in picks[: want - len(rows)]:
                    rows.append(r)
                    idx.append(i)
        for i in self.vqa_scenes(n - len(rows)).tolist():
            rows.append(random.choice(self.vqa[i]))
            idx.append(i)
        return rows, torch.tensor(idx)

    def canvas(self, ids: list[int], n: int) -> list[int]:
        ids = ids[:n]
        return ids + [self.pad] * (n - len(ids))


def flow_loss(t5, dit, z0: torch.Tensor, prompts: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss on latents `z0` for their `prompts`: timesteps logit-normal, 10% of the
    prompts replaced by the `empty` one (for classifier-free guidance)."""
    prompts = torch.where(torch.rand(len(z0), 1) < 0.1, empty, prompts)
    sigma = torch.sigmoid(torch.randn(len(z0)))
    noise = torch.randn_like(z0)
    s = sigma[:, None, None, None]
    vel, _ = dit(s * noise + (1 - s) * z0, t5(input_ids=prompts).last_hidden_state, sigma * 1000)
    return F.mse_loss(vel.float(), noise - z0)


def answer_loss(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, pad: int) -> torch.Tensor:
    """Masked-diffusion cross-entropy over the masked answer zone, padding targets weighted PAD_WEIGHT.

    An answer is one word and `</s>` followed by about ten pads, so an unweighted mean (PAD_WEIGHT 1,
    the committed recipe) gives the answer word about a tenth of the signal. PAD_WEIGHT 0.1 was tried
    (tools/train/experiments/vqa-answer-weighting) and did not lift two-object questions.
    """
    if not masked.any():
        return logits.sum() * 0
    if PAD_WEIGHT == 1.0:
        return F.cross_entropy(logits[masked].float(), ids[masked])
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    w = torch.where(ids[masked] == pad, PAD_WEIGHT, 1.0)
    return (ce * w).sum() / w.sum()


def vae_model() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )


def log(f, **kv):
    line = json.dumps(kv)
    print(line, flush=True)
    f.write(line + "\n")
    f.flush()


def progress(step: int, steps: int, start: float, minutes: float) -> float:
    """Fraction of the budget used: steps, or wall-clock time when the machine is busier."""
    return max(step / steps, (time.time() - start) / (minutes * 60))


def train_vae(data: Data, minutes: float, steps: int, logf) -> AutoencoderKL:
    vae = vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    imgs = torch.from_numpy(data.images[:VAE_SCENES])
    start, step = time.time(), 0
    while progress(step, steps, start, minutes) < 1.0:
        frac = progress(step, steps, start, minutes)
        for g in opt.param_groups:
            g["lr"] = 2e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = imgs[torch.randint(0, len(imgs), (64,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (3 * 32 * 32)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(logf, phase="vae", step=step, t=round(time.time() - start, 1), loss=loss.item(), kl=kl.item())
        step += 1
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(imgs[i:i + 256]).latent_dist.mean for i in range(0, 2048, 256)])
    shift, scale = lat.mean().item(), 1.0 / lat.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    log(logf, phase="vae_done", steps=step, shift_factor=shift, scaling_factor=scale)
    return vae


def copy_vae_log(source: Path, logf) -> None:
    """The reused VAE's own training rows (marked `copied_from`), so the log and plot show phase 1."""
    if not source.exists():
        return
    for line in open(source):
        row = json.loads(line)
        if row.get("phase") in ("vae", "vae_done"):
            row.setdefault("copied_from", str(source))
            log(logf, **row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("models/ddit-shapes"))
    ap.add_argument("--vae-minutes", type=float, default=7.0)
    ap.add_argument("--ddit-minutes", type=float, default=50.0)
    ap.add_argument("--vae-steps", type=int, default=1200, help="about 7 minutes on 2 idle cores")
    ap.add_argument("--ddit-steps", type=int, default=6000, help="about 50 minutes on 2 idle cores")
    ap.add_argument("--scenes", type=int, default=24000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="48,16,48", help="t2i,caption,VQA examples per step")
    ap.add_argument("--vqa-pad-weight", type=float, default=1.0)
    ap.add_argument("--vqa-two-object", type=float, default=None)
    ap.add_argument("--vqa-mix", default="0,0,0",
                    help="shares of a VQA batch for: yes/no relations, 'first', 'place', 'first' by colour, "
                         "'place' by colour (missing trailing shares are 0)")
    ap.add_argument("--vqa-paired", action="store_true", help="both rows of a scene side by side")
    ap.add_argument("--loss-weights", default="1,0.5,0.5", help="flow,caption,VQA weights of the joint loss")
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="reuse a trained VAE folder (skips phase 1; its minutes count towards the budget)")
    args = ap.parse_args()

    def triple(flag: str, kind):
        """The three comma-separated numbers of `flag` (t2i/flow, caption, VQA), or a usage error naming it."""
        text = getattr(args, flag.lstrip("-").replace("-", "_"))
        try:
            values = [kind(x) for x in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 3:
            ap.error(f"{flag} wants three comma-separated numbers, got {text!r}")
        return values

    batches, loss_weights = triple("--batches", int), triple("--loss-weights", float)
    global PAD_WEIGHT, TWO_OBJECT_VQA
    PAD_WEIGHT, TWO_OBJECT_VQA = args.vqa_pad_weight, args.vqa_two_object
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logf = open(args.out / "training_log.jsonl", "w")
    t0 = time.time()
    mix = dict(zip(MIX_KINDS, (float(x) for x in args.vqa_mix.split(","))))
    mix = {k: v for k, v in mix.items() if v > 0}
    tok = build_tokenizer(FIRST_WORDS if any(k.startswith("first") for k in mix) else ())
    data = Data(args.scenes, args.seed + 1, tok)
    log(logf, phase="data", scenes=args.scenes, seconds=round(time.time() - t0, 1), vocab=tok.get_vocab_size(),
        args={k: str(v) for k, v in vars(args).items()})

    if args.vae_from is not None:
        vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
        log(logf, phase="vae_reused", source=str(args.vae_from), shift_factor=vae.config.shift_factor,
            scaling_factor=vae.config.scaling_factor)
        copy_vae_log(args.vae_from.parent / "training_log.jsonl", logf)
    else:
        vae = train_vae(data, args.vae_minutes, args.vae_steps, logf)
    for p in vae.parameters():
        p.requires_grad_(False)
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    with torch.no_grad():
        imgs = torch.from_numpy(data.images)
        post = [vae.encode(imgs[i:i + 512]).latent_dist for i in range(0, len(imgs), 512)]
        lat_mean = torch.cat([p.mean for p in post])
        lat_std = torch.cat([p.std for p in post])

    vocab = tok.get_vocab_size(with_added_tokens=True)
    mask_id = tok.token_to_id("<extra_id_0>")
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=args.t5_layers, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    ))
    dit = DualDiffSD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=128, out_channels=4,
        pos_embed_max_size=16, vocab_size=vocab,
    )
    params = list(t5.parameters()) + list(dit.parameters())
    weights = dict(zip(("flow", "caption", "vqa"), loss_weights))
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    empty = torch.tensor(data.canvas(tok.encode("").ids, PROMPT_LEN))
    bs = dict(zip(("t2i", "cap", "vqa"), batches))
    plen_cap = len(data.caption_prefix)

    def cond_latent(idx: torch.Tensor) -> torch.Tensor:
        """Image latent for captioning and VQA: the posterior mean."""
        return (lat_mean[idx] - sh) * sf

    start, step = time.time(), 0
    while progress(step, args.ddit_steps, start, args.ddit_minutes) < 1.0:
        frac = progress(step, args.ddit_steps, start, args.ddit_minutes)
        lr = 1e-3 * min(1.0, step / 300) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        losses = {}
        # text -> image: flow matching on a posterior sample of each latent.
        idx = torch.randint(0, len(data.images), (bs["t2i"],))
        z0 = ((lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) - sh) * sf
        losses["flow"] = flow_loss(t5, dit, z0, data.prompts[idx], empty)
        # image -> text: masked diffusion on captions, clean image at timestep 0.
        idx = torch.randint(0, len(data.images), (bs["cap"],))
        z0 = cond_latent(idx)
        ids = data.captions[idx]
        ratio = torch.rand(len(idx), 1).clamp(min=0.05)
        masked = (torch.arange(CAPTION_LEN)[None, :] >= plen_cap) & (torch.rand(ids.shape) < ratio)
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        _, logits = dit(z0, t5(input_ids=noisy).last_hidden_state, torch.zeros(len(idx)))
        losses["caption"] = F.cross_entropy(logits[masked].float(), ids[masked]) if masked.any() else logits.sum() * 0
        # VQA: question fixed, answer (and the padding after it) masked.
        rows, idx = data.vqa_batch(bs["vqa"], mix, args.vqa_paired)
        z0 = cond_latent(idx)
        ids = torch.tensor([r[0] for r in rows])
        plen = torch.tensor([r[1] for r in rows])
        answer_zone = torch.arange(VQA_LEN)[None, :] >= plen[:, None]
        ratio = torch.rand(len(idx), 1).clamp(min=0.05)
        masked = answer_zone & (torch.rand(ids.shape) < ratio)
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        _, logits = dit(z0, t5(input_ids=noisy).last_hidden_state, torch.zeros(len(idx)))
        losses["vqa"] = answer_loss(logits, ids, masked, data.pad)
        loss = sum(weights[k] * v for k, v in losses.items())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 50 == 0:
            log(logf, phase="ddit", step=step, t=round(time.time() - start, 1), lr=lr,
                **{k: round(v.item(), 5) for k, v in losses.items()})
        step += 1
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    log(logf, phase="ddit_done", steps=step, total_minutes=round((time.time() - t0) / 60, 2))

    out = args.out
    dit.save_pretrained(out / "transformer")
    t5.save_pretrained(out / "text_encoder")
    vae.save_pretrained(out / "vae")
    tdir = out / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tdir / "tokenizer.json"))
    (tdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5TokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
        "additional_special_tokens": ["<extra_id_0>"], "model_max_length": 512}, indent=2))
    (tdir / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
        "additional_special_tokens": ["<extra_id_0>"]}, indent=2))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DualDiffSD3Pipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "DualDiffSD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        # Not a component: the caption prompt prefix this model was trained with (see the module doc).
        "caption_prompt": shapes.CAPTION_PROMPT,
        # Not a component either: the canvas lengths it was trained at (ddit-export's defaults).
        "text_lengths": {"prompt": PROMPT_LEN, "caption": CAPTION_LEN, "vqa": VQA_LEN},
    }, indent=2))
    plot(out)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(out / "training_log.jsonl")]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    v = [r for r in rows if r.get("phase") == "vae"]
    ax[0].plot([r["step"] for r in v], [r["loss"] for r in v])
    ax[0].set_title("VAE reconstruction loss")
    ax[0].set_yscale("log")
    d = [r for r in rows if r.get("phase") == "ddit"]
    for k in ("flow", "caption", "vqa"):
        ax[1].plot([r["step"] for r in d], [r[k] for r in d], label=k)
    ax[1].set_yscale("log")
    ax[1].legend()
    ax[1].set_title("D-DiT losses")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=90)


if __name__ == "__main__":
    main()
