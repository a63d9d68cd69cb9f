"""The shapes world: small images of flat coloured shapes with GenEval-style prompts and metadata.

A scene is drawn from a prompt's metadata, so the same metadata renders many images (seeds) and the
checker (rewards/shapes.py) can verify any image against it. Categories follow GenEval:
  single_object  "a circle"                         the shape exists (any colour)
  colors         "a blue circle"                    the shape exists in that colour
  two_object     "a circle and a square"            both shapes exist
  counting       "three triangles"                  exactly that many of the shape
  position       "a circle to the left of a square" both exist, centroid relation holds
  color_attr     "a red circle and a blue square"   both (colour, shape) pairs exist
Metadata: {"tag": category, "objects": [{"shape", "color" (or None), "count"}], "relation": None or
{"type": "left_of"|"right_of"|"above"|"below", "a": 0, "b": 1}} (object a is <relation> object b).
"""
import itertools
import json
import os

import numpy as np

SIZE = 64
BACKGROUND = (255, 255, 255)
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 195, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
CATEGORIES = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
MIN_SIDE, MAX_SIDE = 14, 22   # shape bounding-box side in pixels
GAP = 3                       # minimum empty pixels between shapes' bounding boxes


def _phrase(obj):
    return " ".join(w for w in ("a", obj["color"], obj["shape"]) if w)


def prompt_of(meta) -> str:
    objs, tag = meta["objects"], meta["tag"]
    if tag == "counting":
        return f"{NUMBERS[objs[0]['count']]} {objs[0]['shape']}s"
    if tag == "position":
        return f"{_phrase(objs[0])} {RELATIONS[meta['relation']['type']]} {_phrase(objs[1])}"
    return " and ".join(_phrase(o) for o in objs)


def all_prompts() -> list[dict]:
    """Every metadata of the world (each is one distinct prompt)."""
    def obj(shape, color=None, count=1):
        return {"shape": shape, "color": color, "count": count}
    metas = [{"tag": "single_object", "objects": [obj(s)], "relation": None} for s in SHAPES]
    metas += [{"tag": "colors", "objects": [obj(s, c)], "relation": None} for s in SHAPES for c in PALETTE]
    metas += [{"tag": "two_object", "objects": [obj(a), obj(b)], "relation": None}
              for a, b in itertools.combinations(SHAPES, 2)]
    metas += [{"tag": "counting", "objects": [obj(s, count=n)], "relation": None} for s in SHAPES for n in NUMBERS]
    metas += [{"tag": "position", "objects": [obj(a), obj(b)], "relation": {"type": r, "a": 0, "b": 1}}
              for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS]
    pairs = [(c, s) for s in SHAPES for c in PALETTE]
    metas += [{"tag": "color_attr", "objects": [obj(s1, c1), obj(s2, c2)], "relation": None}
              for (c1, s1), (c2, s2) in itertools.combinations(pairs, 2) if c1 != c2 and s1 != s2]
    for m in metas:
        m["prompt"] = prompt_of(m)
    return metas



def vocabulary() -> list[str]:
    """The words of the world's prompts (22), sorted: the shipped model's tokenizers hold each as one token."""
    return sorted({w for m in all_prompts() for w in m["prompt"].split()})

def _mask(shape, side):
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        r = side / 2
        return (yy - r) ** 2 + (xx - r) ** 2 <= r * r
    # upward isosceles triangle: apex at the top centre, base along the bottom row
    half = (yy / side) * side / 2
    return np.abs(xx - side / 2) <= half


def _relation_ok(rel, ca, cb, margin=6):
    (ya, xa), (yb, xb) = ca, cb
    return {"left_of": xb - xa >= margin, "right_of": xa - xb >= margin,
            "above": yb - ya >= margin, "below": ya - yb >= margin}[rel]


def render(meta, rng: np.random.Generator, max_tries=200) -> np.ndarray:
    """An (SIZE, SIZE, 3) uint8 image showing exactly what `meta` asks for (unnamed colours random)."""
    objects = []
    for o in meta["objects"]:
        color = o["color"] or rng.choice(list(PALETTE))
        objects += [(o["shape"], color)] * o["count"]
    for _ in range(max_tries):
        n = len(objects)
        hi = MAX_SIDE if n <= 2 else MAX_SIDE - 4
        boxes = []
        for _shape, _ in objects:
            side = int(rng.integers(MIN_SIDE, hi + 1))
            for _t in range(50):
                y, x = (int(v) for v in rng.integers(1, SIZE - side, size=2))
                if all(y + side + GAP <= by or by + bs + GAP <= y or x + side + GAP <= bx or bx + bs + GAP <= x
                       for by, bx, bs in boxes):
                    boxes.append((y, x, side))
                    break
            else:
                break
        if len(boxes) < n:
            continue
        rel = meta.get("relation")
        if rel:
            centre = [(y + s / 2, x + s / 2) for y, x, s in boxes]
            if not _relation_ok(rel["type"], centre[rel["a"]], centre[rel["b"]]):
                continue
        img = np.empty((SIZE, SIZE, 3), np.uint8)
        img[:] = BACKGROUND
        for (shape, color), (y, x, side) in zip(objects, boxes):
            img[y:y + side, x:x + side][_mask(shape, side)] = PALETTE[color]
        return img
    raise RuntimeError(f"could not place the scene of {meta['prompt']!r}")


def split_prompts(test_fraction=0.25, seed=0):
    """Hold out whole prompts (combinations) per category for the test split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for tag in CATEGORIES:
        metas = [m for m in all_prompts() if m["tag"] == tag]
        order = rng.permutation(len(metas))
        n_test = max(1, round(len(metas) * test_fraction))
        test += [metas[i] for i in order[:n_test]]
        train += [metas[i] for i in order[n_test:]]
    return train, test


def write_dataset(folder, num_test=480, seed=0):
    """train.jsonl (each held-in prompt once) and test.jsonl (num_test rows, balanced over categories,
    drawn from held-out prompts), in the project's dataset layout."""
    train, test = split_prompts(seed=seed)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for tag in CATEGORIES:
        pool = [m for m in test if m["tag"] == tag]
        rows += [pool[i % len(pool)] for i in rng.permutation(num_test // len(CATEGORIES))]
    for name, metas in (("train", train), ("test", rows)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            for m in metas:
                f.write(json.dumps({"prompt": m["prompt"], **{k: v for k, v in m.items() if k != "prompt"}}) + "\n")
    return train, rows
