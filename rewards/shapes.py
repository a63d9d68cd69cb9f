"""Rule-based checker of the shapes world (rewards/shapes_world.py), GenEval style, from the pixels alone.

Blurry edges mix a colour with the white background, so each pixel is matched to the nearest white-to-colour
line: it takes that colour when at least half way along (the unbiased edge of a blurred shape), else it is
background, or "unknown" when far from every line (off-palette colours). Each colour's connected components
are the objects; a component's shape comes from its bounding box: the fill ratio (square ~1, circle ~0.8,
triangle ~0.55) and how low its centroid sits (2/3 down for an upward triangle, 1/2 for circle or square).
"""
import numpy as np
import torch
from scipy import ndimage

from rewards.shapes_world import BACKGROUND, PALETTE
from rewards.base import Reward, RewardError, over_frames, strict_metrics

COLORS = list(PALETTE)
WHITE = np.array(BACKGROUND, np.float32)
LINES = np.array([PALETTE[c] for c in COLORS], np.float32) - WHITE  # (4, 3) white -> colour
MAX_DIST = 50.0    # RGB distance from a line past which a pixel is unknown; other colours lie >= 117 off it
MIN_AREA = 50      # pixels at 64x64 (scaled with the image): half the smallest shape (14 px triangle, ~100)
MARGIN = 2.0       # px by which a position relation must hold between centroids
TAGS = ("single_object", "colors", "two_object", "counting", "position", "color_attr")


def _shape(fill, aspect, low):
    """Shape from the fill ratio of the bounding box, its h/w and the centroid's height in it (0 top, 1 bottom).
    Thresholds sit midway between the clean values and survive blur up to sigma ~1.5 px."""
    if not 0.75 <= aspect <= 1.33:
        return "unknown"
    if 0.56 <= low <= 0.75 and 0.4 <= fill <= 0.8:  # bottom-heavy (clean 0.64-0.67), about half full
        return "triangle"
    if abs(low - 0.5) < 0.06:  # symmetric top to bottom: the corners tell square (1.0) from circle (~0.8)
        if fill >= 0.87:
            return "square"
        if fill >= 0.65:
            return "circle"
    return "unknown"


def find_objects(img: np.ndarray) -> list[dict]:
    """(H, W, 3) uint8 RGB -> [{"color", "shape", "area", "centroid": (y, x)}], one per component."""
    H, W = img.shape[:2]
    q = img.reshape(-1, 3).astype(np.float32) - WHITE
    alpha = np.clip(q @ LINES.T / (LINES ** 2).sum(1), 0, 1)  # (N, 4) how far along each line
    d2 = ((q[:, None] - alpha[..., None] * LINES) ** 2).sum(-1)  # squared distance to each line
    idx, px = d2.argmin(1), np.arange(len(q))
    idx[(alpha[px, idx] < 0.5) | (d2[px, idx] > MAX_DIST ** 2)] = -1  # background or unknown
    idx = idx.reshape(H, W)
    yy, xx = np.mgrid[0:H, 0:W]
    objs = []
    for ci, color in enumerate(COLORS):
        lab, n = ndimage.label(idx == ci)
        if n == 0:
            continue
        flat = lab.ravel()
        area = np.bincount(flat, minlength=n + 1)[1:]
        cy = np.bincount(flat, yy.ravel(), n + 1)[1:] / np.maximum(area, 1)
        cx = np.bincount(flat, xx.ravel(), n + 1)[1:] / np.maximum(area, 1)
        for k, (sy, sx) in enumerate(ndimage.find_objects(lab)):
            if area[k] < MIN_AREA * H * W / 4096:
                continue  # speckle noise, not an object
            h, w = sy.stop - sy.start, sx.stop - sx.start
            low = (cy[k] - sy.start + 0.5) / h
            objs.append({"color": color, "shape": _shape(area[k] / (h * w), h / w, low),
                         "area": int(area[k]), "centroid": (float(cy[k]), float(cx[k]))})
    return objs


def _relation_ok(rel, a, b):
    (ya, xa), (yb, xb) = a["centroid"], b["centroid"]
    return {"left_of": xb - xa, "right_of": xa - xb, "above": yb - ya, "below": ya - yb}[rel] > MARGIN


def check(img: np.ndarray, meta: dict) -> tuple[int, int]:
    """(requirements met, requirements in total) of one (H, W, 3) uint8 image against its metadata."""
    tag = meta.get("tag")
    if tag not in TAGS:
        raise RewardError(f"shapes reward: unknown metadata tag {tag!r}; expected one of {', '.join(TAGS)}")
    objs = find_objects(img)
    found = [[x for x in objs if x["shape"] == o["shape"] and o.get("color") in (None, x["color"])]
             for o in meta["objects"]]
    exists = [int(bool(f)) for f in found]
    if tag == "counting":
        return exists[0] + int(len(found[0]) == meta["objects"][0]["count"]), 2
    if tag == "position":
        rel = meta["relation"]  # between the largest a and the largest other b
        a = max(found[rel["a"]], key=lambda x: x["area"], default=None)
        b = max([x for x in found[rel["b"]] if x is not a], key=lambda x: x["area"], default=None)
        ok = a is not None and b is not None and _relation_ok(rel["type"], a, b)
        return exists[rel["a"]] + exists[rel["b"]] + int(ok), 3
    return sum(exists), len(exists)


class ShapesReward(Reward):
    """Fraction of the shapes prompt's requirements met by each image, read from metadata (not prompts)."""

    name = "shapes"

    def __init__(self, path=None, device="cpu", dtype=None):
        pass  # no weights; the arguments exist so that the registry can build every reward alike

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        if images.dim() == 5:  # over_frames flattens frames, so repeat each sample's metadata per frame
            metadata = [m for m in metadata for _ in range(images.shape[1])]

        def score(x, _prompts):
            imgs = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            met_total = [check(img, m) for img, m in zip(imgs, metadata, strict=True)]
            return torch.tensor([met / total for met, total in met_total], dtype=torch.float32)
        return over_frames(score, images, prompts)

    def eval_metrics(self, scores, metadata) -> dict[str, float]:
        """strict/all and strict/<tag>: fraction of samples meeting every requirement; dense/all: mean score."""
        return strict_metrics(scores, metadata, TAGS)
