"""Tests for rewards/shapes.py: accuracy on clean, blurred and shuffled renders of the shapes world, and the
Reward contract (registry, batch = check per image, videos, eval_metrics, errors, determinism)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from rewards.shapes_world import CATEGORIES, all_prompts, render
from rewards import RewardError, load_rewards
from rewards.shapes import check

N = 100  # renders per category
INVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def meta(tag, *objects, relation=None):
    """meta("colors", ("circle", "red")) or meta("counting", ("circle", None, 3))."""
    objs = [{"shape": o[0], "color": o[1], "count": o[2] if len(o) > 2 else 1} for o in objects]
    return {"tag": tag, "objects": objs, "relation": relation and {"type": relation, "a": 0, "b": 1}}


def strict(img_metas):
    return float(np.mean([np.subtract(*check(img, m)) == 0 for img, m in img_metas]))


def to_tensor(imgs):
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def renders():
    """N clean renders per category, cycling through the category's prompts: [(image, meta)]."""
    rng, out = np.random.default_rng(0), []
    for tag in CATEGORIES:
        metas = [m for m in all_prompts() if m["tag"] == tag]
        out += [(render(m, rng), m) for m in (metas[i % len(metas)] for i in range(N))]
    return out


def test_clean_renders_pass(renders):
    rates = {tag: strict([(i, m) for i, m in renders if m["tag"] == tag]) for tag in CATEGORIES}
    print("clean strict per category:", rates)
    assert all(r >= 0.99 for r in rates.values()), rates


def test_blurred_noisy_renders_pass(renders):
    """A proxy for decoded model outputs: 3x3 box blur, then gaussian noise of std 10/255."""
    rng = np.random.default_rng(1)
    noisy = []
    for img, m in renders:
        x = ndimage.uniform_filter(img.astype(np.float32), size=(3, 3, 1), mode="nearest")
        noisy.append((np.clip(np.round(x + rng.normal(0, 10, x.shape)), 0, 255).astype(np.uint8), m))
    rates = {tag: strict([(i, m) for i, m in noisy if m["tag"] == tag]) for tag in CATEGORIES}
    print("blurred+noise strict:", strict(noisy), rates)
    assert strict(noisy) >= 0.97 and min(rates.values()) >= 0.95, rates


def _contradicts(src, other):
    """True when no image rendered for src can satisfy other, so that passing it is a false positive."""
    for o in other["objects"]:
        colors = {s["color"] for s in src["objects"] if s["shape"] == o["shape"]}
        if not colors or (o["color"] and None not in colors and o["color"] not in colors):
            return True  # a shape, or a (colour, shape), the scene cannot have
    if other["tag"] == "counting":
        o = other["objects"][0]
        return sum(s["count"] for s in src["objects"] if s["shape"] == o["shape"]) != o["count"]
    if other["relation"] and src["relation"]:
        def rel(m):
            r = m["relation"]
            return m["objects"][r["a"]]["shape"], m["objects"][r["b"]]["shape"], r["type"]
        (a, b, r), (oa, ob, orel) = rel(src), rel(other)
        return (a, b, INVERSE[r]) == (oa, ob, orel) or (a, b, r) == (ob, oa, orel)  # the opposite relation
    return False


def test_shuffled_pairs_fail(renders):
    """Each image checked against another random prompt. The raw pass rate includes prompts that the scene
    rightly satisfies ("a circle and a square" vs "a circle"), so the sharp figure is the pass rate on prompts
    the scene contradicts."""
    rng, metas = np.random.default_rng(2), all_prompts()
    raw, contradicted = [], []
    for img, src in renders:
        other = src
        while other["prompt"] == src["prompt"]:
            other = metas[int(rng.integers(len(metas)))]
        raw.append((img, other))
        if _contradicts(src, other):
            contradicted.append((img, other))
    print(f"shuffled strict: raw {strict(raw):.4f}, contradicted {strict(contradicted):.4f} "
          f"({len(contradicted)} of {len(raw)} pairs)")
    assert len(contradicted) >= 400 and strict(contradicted) <= 0.01
    assert strict(raw) <= 0.10


def test_noise_fields_fail():
    """Smooth random colour fields (blobs as big as a few pixels) are no shapes: what an untrained model
    draws must not earn reward."""
    rng, metas = np.random.default_rng(4), all_prompts()
    fields = []
    for i in range(100):
        x = ndimage.gaussian_filter(rng.uniform(0, 255, (64, 64, 3)), (2, 2, 0))
        fields.append((np.clip((x - x.mean()) / x.std() * 80 + 150, 0, 255).astype(np.uint8), metas[i % len(metas)]))
    print(f"noise fields strict: {strict(fields):.3f}")
    assert strict(fields) <= 0.05


def test_partial_credit():
    rng = np.random.default_rng(3)
    three = render(meta("counting", ("circle", None, 3)), rng)
    assert check(three, meta("counting", ("circle", None, 2))) == (1, 2)
    assert check(three, meta("counting", ("square", None, 3))) == (0, 2)
    left = render(meta("position", ("circle", None), ("square", None), relation="left_of"), rng)
    assert check(left, meta("position", ("circle", None), ("square", None), relation="right_of")) == (2, 3)
    assert check(left, meta("position", ("square", None), ("circle", None), relation="right_of")) == (3, 3)
    pair = render(meta("color_attr", ("circle", "red"), ("square", "blue")), rng)
    assert check(pair, meta("color_attr", ("circle", "red"), ("square", "green"))) == (1, 2)
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert check(blank, meta("single_object", ("triangle", None))) == (0, 1)


def test_registry_batch_equals_check_and_videos(renders):
    reward = load_rewards(["shapes"]).rewards["shapes"]
    picks = renders[::50]
    imgs = [i for i, _ in picks]
    metas = [dict(m, images=["x.png"]) for _, m in picks[1:] + picks[:1]]  # mismatched; extra keys ignored
    s = reward(to_tensor(imgs), [m["prompt"] for m in metas], metas)
    expected = torch.tensor([met / total for met, total in (check(i, m) for i, m in zip(imgs, metas))])
    assert s.dtype == torch.float32 and s.shape == (len(imgs),) and torch.equal(s, expected)
    assert 0 < s.mean() < 1  # both passes and failures in the batch
    blank = torch.ones(3, 64, 64)
    video = torch.stack([torch.stack([x, blank]) for x in to_tensor(imgs)])  # (B, F=2, 3, H, W)
    assert torch.allclose(reward(video, [m["prompt"] for m in metas], metas), expected / 2)


def test_eval_metrics():
    reward = load_rewards(["shapes"]).rewards["shapes"]
    tags = ["colors", "colors", "position", "counting"]
    out = reward.eval_metrics(torch.tensor([1.0, 0.5, 1.0, 2 / 3]), [{"tag": t} for t in tags])
    assert out == pytest.approx({"strict/all": 0.5, "dense/all": (2.5 + 2 / 3) / 4, "strict/colors": 0.5,
                                 "strict/position": 1.0, "strict/counting": 0.0})


def test_unknown_tag_raises():
    img = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(RewardError, match="'bogus'"):
        check(img, {"tag": "bogus", "objects": [], "relation": None})
    with pytest.raises(RewardError, match="None"):
        load_rewards(["shapes"]).rewards["shapes"](to_tensor([img]), ["a circle"], [{"prompt": "a circle"}])


def test_deterministic(renders):
    reward = load_rewards(["shapes"]).rewards["shapes"]
    x = to_tensor([i for i, _ in renders[::60]])
    metas = [m for _, m in renders[::60]]
    first = reward(x, [m["prompt"] for m in metas], metas)
    assert torch.equal(first, reward(x, [m["prompt"] for m in metas], metas))
    assert torch.equal(first[1:], reward(x[1:], [m["prompt"] for m in metas[1:]], metas[1:]))  # batch-independent
