"""GenEval reward: object counts, colours and relative positions, read by a detector and checked against the GenEval
metadata of the prompt's row. The formula is the one Flow-GRPO and DiffusionNFT train with (they agree); GenEval's
own pass/fail rule of the benchmark is here too (`geneval_correct`).

Metadata (a GenEval jsonl row; its keys other than `prompt` reach the reward in `metadata`):
    {"tag": "position", "prompt": "a photo of a dog right of a cat",
     "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}
  include clauses: class, count >= 1, optional colour, optional position [relation, index of an earlier clause];
  exclude clauses: class, count (fewer than `count` of the class must be found).

Scoring (pure functions of the detections, below): detections scoring over 0.3 (0.9 for the `counting` tag), at most
16 per class, the most confident first. Per include clause, a count term 1 - |n_req - n_found| / n_req (negative when
more than twice the count is found, as in the reference code); then, when the count is exact, a colour term
1 - |n_req - n_of_that_colour| / n_req, and when that colour is right too, the position term; a wrong count on a
clause with a colour or a position adds one 0 instead. reward = mean of the terms; strict = every include clause
exactly right (the reward is then exactly 1). Exclude clauses enter GenEval's own rule only, not the reward (as in the
reference code: on GenEval's rows they follow from the exact counts).

The detector and the colour classifier are pluggable (GenevalReward(detector=..., colours=...)); the default is
Mask2Former and CLIP through transformers (rewards/geneval_detector.py).
"""
from dataclasses import dataclass

import numpy as np
import torch

from rewards.base import Reward, RewardError, over_frames, strict_metrics

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's categories
THRESHOLD, COUNTING_THRESHOLD = 0.3, 0.9  # detection score a found object must exceed
MAX_OBJECTS = 16                          # per class, the most confident
POSITION_MARGIN = 0.1                     # of the two boxes' summed width (height) taken off the centres' offset
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Found:
    """One detected object: box (x1, y1, x2, y2) in pixels, its score, and its mask ((H, W) bool or None)."""
    box: tuple
    score: float
    mask: np.ndarray | None = None


def found_objects(detections: dict, tag: str) -> dict[str, list[Found]]:
    """{class: [(box, score, mask), ...]} of one image -> the objects GenEval counts: score over the threshold (0.9
    for the counting tag, else 0.3), the most confident first, at most 16 per class; classes with none left out."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    out = {}
    for name, dets in detections.items():
        kept = sorted((Found(tuple(float(v) for v in d[0][:4]), float(d[1]), d[2] if len(d) > 2 else None)
                       for d in dets if float(d[1]) > threshold), key=lambda f: -f.score)[:MAX_OBJECTS]
        if kept:
            out[name] = kept
    return out


def relations(box_a, box_b, margin: float = POSITION_MARGIN) -> set[str]:
    """Where box a lies relative to box b (GenEval's rule): the centres' offset, shrunk towards 0 on each axis by
    margin x (the two boxes' summed size on that axis), over the length of the unshrunk offset; a component under -0.5
    is "left of" / "above", over 0.5 "right of" / "below" (y grows downwards). No relation when the shrunk offset is
    0 on both axes."""
    a, b = np.asarray(box_a, np.float64)[:4], np.asarray(box_b, np.float64)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    size = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - margin * size, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def _all_placed(objs: list[Found], targets: list[Found], relation: str) -> bool:
    return all(relation in relations(o.box, t.box) for o in objs for t in targets)


def reward_terms(objects: dict[str, list[Found]], meta: dict, colours) -> tuple[list[float], bool]:
    """Flow-GRPO's terms of one image and whether every include clause is exactly right. objects: found_objects();
    colours(class_name, objs) -> one colour name per object."""
    terms, strict, groups = [], True, []  # groups[i]: clause i's objects when it was right, else None
    for req in meta["include"]:
        objs, n = objects.get(req["class"], []), req["count"]
        terms.append(1 - abs(n - len(objs)) / n)
        ok = len(objs) == n
        if not ok:
            if "color" in req or "position" in req:
                terms.append(0.0)  # one 0, even for a clause with both
        else:
            if "color" in req:
                hits = colours(req["class"], objs).count(req["color"])
                terms.append(1 - abs(n - hits) / n)
                ok = hits == n
            if "position" in req and ok:
                relation, target = req["position"]
                if groups[target] is None:
                    ok = False
                    terms.append(0.0)
                elif _all_placed(objs, groups[target], relation):
                    terms.append(1.0)
                else:
                    ok = False
                    terms += [0.0, 1.0]  # the reference code appends a 1 after its check loop, failed or not
        strict &= ok
        groups.append(objs if ok else None)
    return terms, strict


def reward_score(objects: dict[str, list[Found]], meta: dict, colours) -> tuple[float, bool]:
    """(reward = the mean of reward_terms, strict)."""
    terms, strict = reward_terms(objects, meta, colours)
    return sum(terms) / len(terms), strict


def geneval_correct(objects: dict[str, list[Found]], meta: dict, colours) -> bool:
    """GenEval's own benchmark rule: each include clause has at least `count` objects, and its `count` most confident
    ones all have the colour and the relation to every object of the target clause; each exclude clause has fewer
    than `count` objects."""
    correct, groups = True, []
    for req in meta["include"]:
        objs, n = objects.get(req["class"], [])[:req["count"]], req["count"]
        ok = len(objs) >= n
        if ok and "color" in req:
            ok = colours(req["class"], objs).count(req["color"]) >= n
        if ok and "position" in req:
            relation, target = req["position"]
            ok = groups[target] is not None and _all_placed(objs, groups[target], relation)
        correct &= ok
        groups.append(objs if ok else None)
    return correct and all(len(objects.get(req["class"], [])) < req["count"] for req in meta.get("exclude", []))


def check_row(meta: dict | None, prompt: str, classes=None) -> None:
    """RewardError (one line naming the prompt) unless the row holds GenEval metadata this reward can score: a tag,
    include clauses of known classes (`classes`: the detector's, when it says), counts >= 1, GenEval's colours and
    relations, positions pointing at an earlier clause; exclude clauses of known classes with counts >= 1."""
    def bad(why):
        raise RewardError(f"reward 'geneval': prompt {prompt!r}: {why}")

    meta = meta or {}
    include = meta.get("include")
    if not include or not isinstance(include, list):
        bad("its row has no GenEval 'include' clauses; give the row GenEval metadata, e.g. "
            '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}')
    if not isinstance(meta.get("tag"), str):
        bad("its row has no GenEval 'tag' (single_object, two_object, counting, colors, position, color_attr)")
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        bad(f"'exclude' is a {type(exclude).__name__}, expected a list of clauses")
    for kind, clauses in (("include", include), ("exclude", exclude)):
        for i, req in enumerate(clauses):
            where = f"{kind} clause {i} ({req!r})"
            if not isinstance(req, dict) or not isinstance(req.get("class"), str):
                bad(f"{where} has no 'class' name")
            if classes is not None and req["class"] not in classes:
                bad(f"{where}: the detector knows no class {req['class']!r}")
            if type(req.get("count")) is not int or req["count"] < 1:
                bad(f"{where}: 'count' must be an integer >= 1")
            if kind == "include" and "color" in req and req["color"] not in COLORS:
                bad(f"{where}: colour {req['color']!r} is not one of GenEval's ({', '.join(COLORS)})")
            if kind == "include" and "position" in req:
                pos = req["position"]
                if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                        or type(pos[1]) is not int or not 0 <= pos[1] < i):
                    bad(f"{where}: 'position' must be [relation, index of an earlier include clause] with a "
                        f"relation among {', '.join(RELATIONS)}")


class GenevalReward(Reward):
    """The GenEval reward of Flow-GRPO / DiffusionNFT (module docstring). Per image: the detector's objects, the
    colour classifier on demand, the formula of reward_score.

    detector: .detect(list of (H, W, 3) uint8 RGB arrays) -> per image {class: [(box, score, mask), ...]}, and
    optionally .classes (the class names it can return, to check rows against). colours: (image, class, objects) ->
    a colour name per object. Both default to Mask2Former + CLIP (rewards/geneval_detector.py), loaded from the hub
    or from path = a folder with detector/ and clip/ subfolders.
    """

    name = "geneval"

    def eval_metrics(self, scores, metadata) -> dict[str, float]:
        """strict/all, strict/<tag> (a reward of exactly 1: every include clause right), dense/all."""
        return strict_metrics(scores, metadata, TAGS)

    def __init__(self, path=None, device="cpu", dtype=torch.float32, detector=None, colours=None):
        if detector is None or colours is None:
            from rewards.geneval_detector import load_default
            default_detector, default_colours = load_default(path, device, dtype, detector is None, colours is None)
            detector, colours = detector or default_detector, colours or default_colours
        self.detector, self.colours = detector, colours
        self.classes = getattr(detector, "classes", None)

    def _check(self, prompts: list[str], metadata: list[dict] | None) -> list[dict]:
        """Every row checked before any detection; the metadata ([{}] per prompt when None)."""
        metadata = metadata if metadata is not None else [{}] * len(prompts)
        for p, m in zip(prompts, metadata, strict=True):
            check_row(m, p, self.classes)
        return metadata

    def _objects(self, images: torch.Tensor, metadata: list[dict]):
        """(N, 3, H, W) in [0, 1] -> the uint8 (H, W, 3) images and each one's found objects."""
        arr = list((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
                   .numpy())
        detections = self.detector.detect(arr)
        return arr, [found_objects(d, m["tag"]) for d, m in zip(detections, metadata, strict=True)]

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[dict]:
        """Per image (B, 3, H, W): {"score", "strict", "correct" (GenEval's benchmark rule), "tag"}."""
        metadata = self._check(prompts, metadata)
        arr, objects = self._objects(images, metadata)
        out = []
        for img, objs, m in zip(arr, objects, metadata):
            colours = _cached(lambda name, o, img=img: self.colours(img, name, o))
            score, strict = reward_score(objs, m, colours)
            out.append({"score": score, "strict": strict, "correct": geneval_correct(objs, m, colours),
                        "tag": m["tag"]})
        return out

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        metadata = self._check(prompts, metadata)
        if images.dim() == 5:  # over_frames flattens the frames: each frame gets its sample's metadata
            metadata = [m for m in metadata for _ in range(images.shape[1])]

        def score(x, _prompts):
            arr, objects = self._objects(x, metadata)
            return torch.tensor([reward_score(objs, m, lambda name, o, img=img: self.colours(img, name, o))[0]
                                 for img, objs, m in zip(arr, objects, metadata)], dtype=torch.float32)
        return over_frames(score, images, prompts)


def _cached(colours):
    """colours(class, objs), each (class, objects) classified once: GenEval's rule and the reward ask for the same."""
    memo = {}

    def cached(name, objs):
        key = (name, tuple(id(o) for o in objs))
        if key not in memo:
            memo[key] = colours(name, objs)
        return memo[key]
    return cached
