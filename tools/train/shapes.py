"""The synthetic world of coloured shapes: scenes, renders, captions and question-answer pairs.

A scene has one or two objects, each a (shape, colour, centre, size), on a plain white background.
Two objects always differ in shape and in colour, and are placed so that exactly one relation
(left of / above) describes them, so every caption and answer is unambiguous.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SIZE = 32
SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUND = (255, 255, 255)
COUNT_WORDS = {1: "one", 2: "two"}
VQA_TEMPLATE = "Q: {question} Answer the question using a single word or phrase. A: "
# The prefix a caption is written after (D-DiT's captioning canvas: "the prompt prefix (if any) fixed").
CAPTION_PROMPT = "Describe the image."


@dataclass
class Obj:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    r: float  # half extent, pixels


def sample_scene(rng: random.Random) -> list[Obj]:
    n = rng.choice([1, 2])
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    while True:
        objs = []
        for s, c in zip(shapes, colours):
            r = rng.uniform(4.5, 6.0)
            objs.append(Obj(s, c, rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1), r))
        if n == 1:
            return objs
        a, b = objs
        dx, dy = abs(a.x - b.x), abs(a.y - b.y)
        # Far enough apart not to touch, and one axis clearly dominant.
        if max(dx, dy) > a.r + b.r + 2 and abs(dx - dy) > 4:
            return objs


def render(objs: list[Obj], ss: int = 4) -> np.ndarray:
    """RGB uint8 [SIZE, SIZE, 3], anti-aliased by supersampling."""
    n = SIZE * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xx = (xx + 0.5) / ss
    yy = (yy + 0.5) / ss
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for o in objs:
        if o.shape == "circle":
            m = (xx - o.x) ** 2 + (yy - o.y) ** 2 <= o.r**2
        elif o.shape == "square":
            h = o.r * 0.88
            m = (np.abs(xx - o.x) <= h) & (np.abs(yy - o.y) <= h)
        else:  # upward triangle inscribed in the circle of radius r
            top, bottom = o.y - o.r, o.y + o.r * 0.8
            t = (yy - top) / (bottom - top)
            half = t * o.r * 1.05
            m = (t >= 0) & (t <= 1) & (np.abs(xx - o.x) <= half)
        img[m] = COLOURS[o.colour]
    img = img.reshape(SIZE, ss, SIZE, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def relation(objs: list[Obj]) -> tuple[Obj, str, Obj]:
    """(first, relation, second) in canonical order: left object first, or upper object first."""
    a, b = objs
    if abs(a.x - b.x) > abs(a.y - b.y):
        first, second = (a, b) if a.x < b.x else (b, a)
        return first, "left of", second
    first, second = (a, b) if a.y < b.y else (b, a)
    return first, "above", second


def name(o: Obj) -> str:
    return f"a {o.colour} {o.shape}"


def caption(objs: list[Obj]) -> str:
    if len(objs) == 1:
        return name(objs[0])
    f, rel, s = relation(objs)
    return f"{name(f)} {rel} {name(s)}"


def qa_pairs(objs: list[Obj]) -> list[tuple[str, str]]:
    qs = [("how many objects are there?", COUNT_WORDS[len(objs)])]
    for o in objs:
        qs.append((f"what colour is the {o.shape}?", o.colour))
        qs.append((f"what shape is the {o.colour} object?", o.shape))
    if len(objs) == 2:
        f, rel, s = relation(objs)
        if rel == "left of":
            qs.append((f"is the {f.shape} left of the {s.shape}?", "yes"))
            qs.append((f"is the {s.shape} left of the {f.shape}?", "no"))
            qs.append((f"what is left of the {s.shape}?", f.shape))
        else:
            qs.append((f"is the {f.shape} above the {s.shape}?", "yes"))
            qs.append((f"is the {s.shape} above the {f.shape}?", "no"))
            qs.append((f"what is above the {s.shape}?", f.shape))
    return qs


def vocabulary() -> list[str]:
    words = set()
    for text in [VQA_TEMPLATE.format(question=""), CAPTION_PROMPT] + [
        "a an the of is what how many objects object are there colour shape left above yes no one two"
    ]:
        words.update(split_words(text))
    words.update(SHAPES)
    words.update(COLOURS)
    return sorted(words)


def split_words(text: str) -> list[str]:
    for p in "?:.,":
        text = text.replace(p, f" {p} ")
    return text.lower().split()


def write_eval_set(out: Path, n: int, seed: int) -> None:
    from PIL import Image

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scenes.jsonl", "w") as f:
        for i in range(n):
            objs = sample_scene(rng)
            img = render(objs)
            fname = f"scene_{i:04d}.png"
            Image.fromarray(img).save(out / fname)
            rec = {
                "id": i,
                "image": fname,
                "caption": caption(objs),
                "qa": [{"question": q, "answer": a} for q, a in qa_pairs(objs)],
                "objects": [asdict(o) for o in objs],
            }
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write the ShapesEval set")
    ap.add_argument("--out", type=Path, default=Path("models/shapes-eval"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=424242)
    a = ap.parse_args()
    write_eval_set(a.out, a.n, a.seed)
