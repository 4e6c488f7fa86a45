"""VQA-only pilot (run from the repository root): how fast do two-object questions get learnt under a variant? Probes held-out
ShapesEval scenes greedily every --every steps and prints accuracy per question kind."""
import argparse, collections, json, math, random, sys, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "tools/train"); sys.path.insert(0, "tools/reference")
import shapes, train
from transformers import T5Config, T5EncoderModel
from diffusers import AutoencoderKL
from ddit_reference import DualDiffSD3Transformer2DModel
from PIL import Image
ap = argparse.ArgumentParser()
ap.add_argument("--minutes", type=float, default=10); ap.add_argument("--t5-layers", type=int, default=2)
ap.add_argument("--dit-layers", type=int, default=4); ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--two", type=float, default=0.75); ap.add_argument("--pad-weight", type=float, default=0.1)
ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--every", type=int, default=300)
ap.add_argument("--scenes", type=int, default=6000); ap.add_argument("--tag", default="")
ap.add_argument("--aux", action="store_true"); ap.add_argument("--init", default=None); ap.add_argument("--ratio-min", type=float, default=0.05); ap.add_argument("--steps", type=int, default=10**9)
a = ap.parse_args()
torch.manual_seed(0); random.seed(0); torch.set_num_threads(2)
train.TWO_OBJECT_VQA = a.two; train.PAD_WEIGHT = a.pad_weight
tok = train.build_tokenizer(); data = train.Data(a.scenes, 1, tok)
if a.aux:  # training-only questions: "is the <shape> left?" / "is the <shape> above?" (first-order given binding)
    rng = random.Random(1)
    for i in range(a.scenes):
        objs = shapes.sample_scene(rng)
        if len(objs) == 2:
            f, rel, s2 = shapes.relation(objs)
            w = "left" if rel == "left of" else "above"
            for o, ans in ((f, "yes"), (s2, "no")):
                pr = tok.encode(shapes.VQA_TEMPLATE.format(question=f"is the {o.shape} {w}?")).ids[:-1]
                data.vqa[i].append((data.canvas(pr + tok.encode(ans).ids, train.VQA_LEN), len(pr)))
vae = AutoencoderKL.from_pretrained("models/ddit-shapes/vae").eval()
sf, sh = vae.config.scaling_factor, vae.config.shift_factor
with torch.no_grad():
    imgs = torch.from_numpy(data.images)
    lat = torch.cat([vae.encode(imgs[i:i + 512]).latent_dist.mean for i in range(0, len(imgs), 512)])
    lat = (lat - sh) * sf
vocab = tok.get_vocab_size(with_added_tokens=True); mask_id = tok.token_to_id("<extra_id_0>")
t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=a.t5_layers, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))
dit = DualDiffSD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=a.dit_layers, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=128, out_channels=4,
    pos_embed_max_size=16, vocab_size=vocab)
if a.init:  # fine-tune a trained checkpoint instead of starting from scratch
    t5 = T5EncoderModel.from_pretrained(a.init + "/text_encoder"); dit = DualDiffSD3Transformer2DModel.from_pretrained(a.init + "/transformer")
    t5.train(); dit.train()
params = list(t5.parameters()) + list(dit.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
# held-out probe set
scenes = [json.loads(l) for l in open("models/shapes-eval/scenes.jsonl")][:100]
probe = []
with torch.no_grad():
    for s in scenes:
        im = np.asarray(Image.open("models/shapes-eval/" + s["image"]).convert("RGB"), np.float32) / 127.5 - 1
        z = (vae.encode(torch.from_numpy(im).permute(2, 0, 1)[None]).latent_dist.mean - sh) * sf
        for qa in s["qa"]:
            p = tok.encode(shapes.VQA_TEMPLATE.format(question=qa["question"])).ids[:-1]
            kind = " ".join("<s>" if w.strip("?") in shapes.SHAPES else "<c>" if w in shapes.COLOURS else w for w in qa["question"].split()) + f" ({len(s['objects'])})"
            probe.append((z, p + [mask_id] * (train.VQA_LEN - len(p)), len(p), tok.token_to_id(qa["answer"]), kind))
def run_probe():
    t5.eval(); dit.eval(); res = collections.Counter(); tot = collections.Counter()
    with torch.no_grad():
        for i in range(0, len(probe), 64):
            b = probe[i:i + 64]
            z = torch.cat([x[0] for x in b]); ids = torch.tensor([x[1] for x in b])
            lg = dit(z, t5(input_ids=ids).last_hidden_state, torch.zeros(len(b)))[1]
            for (zz, _, pl, ans, kind), l in zip(b, lg):
                tot[kind] += 1; res[kind] += int(l[pl].argmax()) == ans
    t5.train(); dit.train()
    pick = lambda f: sum(res[k] for k in tot if f(k)) / max(1, sum(tot[k] for k in tot if f(k)))
    return dict(isrel=round(pick(lambda k: k.startswith("is the")), 3), colour2=round(pick(lambda k: "colour is" in k and "(2)" in k), 3),
                shape2=round(pick(lambda k: "shape is" in k and "(2)" in k), 3), all=round(sum(res.values()) / sum(tot.values()), 3))
start, step = time.time(), 0
while time.time() - start < a.minutes * 60 and step < a.steps:
    frac = max(step / a.steps, (time.time() - start) / (a.minutes * 60))
    for g in opt.param_groups: g["lr"] = a.lr * min(1.0, step / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
    idx = data.vqa_scenes(a.bs)
    rows = [random.choice(data.vqa[i]) for i in idx.tolist()]
    ids = torch.tensor([r[0] for r in rows]); plen = torch.tensor([r[1] for r in rows])
    zone = torch.arange(train.VQA_LEN)[None, :] >= plen[:, None]
    ratio = torch.rand(len(idx), 1).clamp(min=a.ratio_min)
    masked = zone & (torch.rand(ids.shape) < ratio)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    _, logits = dit(lat[idx], t5(input_ids=noisy).last_hidden_state, torch.zeros(len(idx)))
    loss = train.answer_loss(logits, ids, masked, data.pad)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    step += 1
    if step % a.every == 0:
        print(json.dumps(dict(tag=a.tag, step=step, t=round(time.time() - start), loss=round(loss.item(), 4), **run_probe())), flush=True)
print(json.dumps(dict(tag=a.tag, step=step, final=True, **run_probe())), flush=True)
