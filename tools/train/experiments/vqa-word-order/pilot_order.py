"""VQA-only pilot for the yes/no relation questions (run from the repository root).

"is the X left of the Y?" is the only question kind whose answer depends on word order: each scene
asks it in both orders, with opposite answers. This pilot trains on VQA only, with a chosen share of
those questions (--isrel), optionally both orders of the same scene side by side in a batch
(--paired), from a checkpoint (--init) or from scratch with a chosen text encoder (--t5-layers,
--buckets), and probes 100 held-out ShapesEval scenes greedily (answer-slot argmax) every --every steps.
"""
import argparse
import json
import random
import sys
import time

import torch

sys.path.insert(0, "tools/train")
sys.path.insert(0, "tools/reference")
sys.path.insert(0, "tools/train/experiments/vqa-word-order")
import shapes  # noqa: E402
import train  # noqa: E402
import vqa_common  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from ddit_reference import DualDiffSD3Transformer2DModel  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--init", default=None, help="fine-tune this checkpoint (else from scratch)")
ap.add_argument("--t5-layers", type=int, default=2)
ap.add_argument("--buckets", type=int, default=32)
ap.add_argument("--max-distance", type=int, default=32)
ap.add_argument("--isrel", type=float, default=0.0, help="share of yes/no relation questions in a batch")
ap.add_argument("--paired", action="store_true", help="both orders of one scene in the same batch")
ap.add_argument("--first", type=float, default=0.0,
                help="share of training-only questions 'is the X left of the Y? which shape is first?' (answer X)")
ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--scenes", type=int, default=6000)
ap.add_argument("--tag", default="")
a = ap.parse_args()
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(2)
train.TWO_OBJECT_VQA, train.PAD_WEIGHT = 0.75, 1.0
old_tok = train.build_tokenizer()
if a.first:  # two more words; ids shift, so a fine-tune remaps its embedding rows below
    base_vocabulary = shapes.vocabulary
    shapes.vocabulary = lambda: sorted(set(base_vocabulary()) | {"which", "first"})
tok = train.build_tokenizer()
data = train.Data(a.scenes, 1, tok)
first_rows = [[] for _ in range(a.scenes)]
if a.first:
    rng = random.Random(1)  # the same scenes as Data(…, seed 1)
    for i in range(a.scenes):
        objs = shapes.sample_scene(rng)
        if len(objs) == 2:
            f, rel, s2 = shapes.relation(objs)
            for x, y in ((f, s2), (s2, f)):
                q = f"is the {x.shape} {rel} the {y.shape}? which shape is first?"
                pr = tok.encode(shapes.VQA_TEMPLATE.format(question=q)).ids[:-1]
                first_rows[i].append((data.canvas(pr + tok.encode(x.shape).ids, train.VQA_LEN), len(pr)))
vae = AutoencoderKL.from_pretrained("models/ddit-shapes/vae").eval()
lat = vqa_common.scaled_latents(vae, data.images)
vocab = tok.get_vocab_size(with_added_tokens=True)
mask_id = tok.token_to_id("<extra_id_0>")
if a.init:
    t5 = T5EncoderModel.from_pretrained(a.init + "/text_encoder")
    dit = DualDiffSD3Transformer2DModel.from_pretrained(a.init + "/transformer")
    if a.first:  # new vocabulary: copy each known token's rows to its new id
        old = old_tok.get_vocab(with_added_tokens=True)
        rows = torch.tensor([old.get(w, old["<unk>"]) for w, _ in sorted(tok.get_vocab(with_added_tokens=True).items(),
                                                                          key=lambda kv: kv[1])])
        with torch.no_grad():
            emb = t5.get_input_embeddings().weight[rows].clone()
            t5.resize_token_embeddings(vocab)
            t5.get_input_embeddings().weight.copy_(emb)
            head = dit.text_proj_out
            new_head = torch.nn.Linear(head.in_features, vocab)
            new_head.weight.copy_(head.weight[rows])
            new_head.bias.copy_(head.bias[rows])
            dit.text_proj_out = new_head
else:
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=a.t5_layers, num_heads=4,
        relative_attention_num_buckets=a.buckets, relative_attention_max_distance=a.max_distance,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))
    dit = DualDiffSD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=128, out_channels=4,
        pos_embed_max_size=16, vocab_size=vocab)
t5.train()
dit.train()
params = list(t5.parameters()) + list(dit.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))


probe = vqa_common.build_probe(tok, vae)


def batch_rows() -> tuple[list, torch.Tensor]:
    """VQA rows and their scenes: an --isrel share of yes/no relation questions, the rest as train.py draws."""
    n_rel = int(round(a.isrel * a.bs))
    rows, idx = [], []
    for _ in range(int(round(a.first * a.bs))):
        i = int(data.two[random.randrange(len(data.two))])
        rows.append(random.choice(first_rows[i]))
        idx.append(i)
    n_rel += len(rows)
    while len(rows) < n_rel:
        i = int(data.two[random.randrange(len(data.two))])
        yes_no = data.vqa[i][5:7]  # qa_pairs order: count, (colour, shape) x 2, yes, no, what
        picks = yes_no if a.paired else [random.choice(yes_no)]
        for r in picks[: n_rel - len(rows)]:
            rows.append(r)
            idx.append(i)
    for i in data.vqa_scenes(a.bs - n_rel).tolist():
        rows.append(random.choice(data.vqa[i]))
        idx.append(i)
    return rows, torch.tensor(idx)


print(json.dumps(dict(tag=a.tag, step=0, **vqa_common.greedy_probe(t5, dit, probe))), flush=True)
start = time.time()
for step in range(1, a.steps + 1):
    vqa_common.set_lr(opt, a.lr, step, a.steps, warmup=100)
    rows, idx = batch_rows()
    loss = vqa_common.vqa_step(t5, dit, opt, params, rows, lat[idx], mask_id, data.pad)
    if step % a.every == 0 or step == a.steps:
        print(json.dumps(dict(tag=a.tag, step=step, t=round(time.time() - start), loss=round(loss.item(), 4),
                              **vqa_common.greedy_probe(t5, dit, probe))), flush=True)
