"""The geneval reward: Flow-GRPO's formula over hand-made detections against values worked out by hand here (counts,
colours, positions on both sides of GenEval's margin, the counting threshold, exclude clauses, strict accuracy);
GenEval's jsonl rows through the project's dataset loader; the default Mask2Former + CLIP detector on tiny random
models built here (the interface's structure, end to end); a reward server giving the in-process scores."""
import json
import os

import numpy as np
import pytest
import torch

from common.data import load_split, reward_metadata
from rewards import REGISTRY, load_rewards
from rewards.geneval import (COLORS, GenevalReward, check_row, found_objects, geneval_correct, relations,
                             reward_score)
from tests.test_rewards import one_line_error, tiny_clip_dir  # noqa: F401  (tiny_clip_dir: a fixture)
from tests.helpers import reward_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def box(x, y, size=10):
    return (x, y, x + size, y + size)


def det(x, y, score=0.95, size=10):
    return (box(x, y, size), score, None)


def paint(colours: dict):
    """A colour classifier reading each object's colour from `colours` {box: colour} (default "none")."""
    return lambda _name, objs: [colours.get(o.box, "none") for o in objs]


def test_registered():
    assert REGISTRY["geneval"] == "rewards.geneval:GenevalReward"


def test_relations_margin_both_sides():
    # a (0,0,10,10) against b 10x10 on the same row at x: centre offset -x, shrunk by 0.1 * (10 + 10) = 2,
    # over |offset| x: (x - 2) / x must exceed 0.5, i.e. x > 4
    assert relations(box(0, 0), box(5, 0)) == {"left of"}  # 3/5 = 0.6
    assert relations(box(0, 0), box(4, 0)) == set()  # 2/4 = 0.5: not over it
    assert relations(box(0, 0), box(2, 0)) == set()  # inside the margin: shrunk to 0
    assert relations(box(5, 0), box(0, 0)) == {"right of"}
    assert relations(box(20, 0), box(0, 0)) == {"right of"}  # 18/20
    assert relations(box(0, 0), box(0, 5)) == {"above"}  # y grows downwards
    assert relations(box(0, 5), box(0, 0)) == {"below"}
    # offset (-10, -10) shrunk to (-8, -8), over 14.142: -0.566 on both axes
    assert relations(box(0, 0), box(10, 10)) == {"left of", "above"}
    # offset (-10, -3) shrunk to (-8, -1), over sqrt(109) = 10.44: (-0.766, -0.096)
    assert relations(box(0, 0), box(10, 3)) == {"left of"}
    # a 4x4 at (0,0) (centre 2,2), b 20x20 at (6,0) (centre 16,10): offset (-14, -8), margin 0.1 * 24 = 2.4,
    # shrunk (-11.6, -5.6) over sqrt(260) = 16.125: (-0.719, -0.347)
    assert relations((0, 0, 4, 4), (6, 0, 26, 20)) == {"left of"}


def test_found_objects_thresholds_order_and_cap():
    dets = {"clock": [det(0, 0, 0.91), det(20, 0, 0.95), det(40, 0, 0.9), det(60, 0, 0.5)], "cat": [det(0, 0, 0.3)]}
    counting = found_objects(dets, "counting")  # over 0.9 only; 0.9 itself is not over it
    assert list(counting) == ["clock"] and [o.score for o in counting["clock"]] == [0.95, 0.91]
    other = found_objects(dets, "two_object")  # over 0.3: the 0.3 cat is not
    assert list(other) == ["clock"] and [o.score for o in other["clock"]] == [0.95, 0.91, 0.9, 0.5]
    many = found_objects({"dog": [det(i, 0, 0.5 + i / 100) for i in range(20)]}, "single_object")["dog"]
    assert len(many) == 16 and [o.score for o in many] == [0.5 + i / 100 for i in range(19, 3, -1)]


CAT_DOG = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                          {"class": "dog", "count": 1, "position": ["right of", 0]}]}
RED_DOG_RIGHT = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                                {"class": "dog", "count": 1, "color": "red",
                                                 "position": ["right of", 0]}]}
COUNT3 = {"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}]}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
DOG = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}

# (metadata, detections, colours {box: colour}, reward worked out by hand, strict, GenEval's benchmark rule)
CASES = [
    (DOG, {"dog": [det(0, 0)]}, {}, 1.0, True, True),
    (DOG, {}, {}, 0.0, False, False),  # 1 - 1/1
    (DOG, {"dog": [det(0, 0), det(20, 0), det(40, 0)]}, {}, -1.0, False, True),  # 1 - 2/1; GenEval: at least one
    ({"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
     {"dog": [det(0, 0)], "cat": [det(20, 0), det(40, 0)]}, {}, 0.5, False, True),  # [1, 1 - 1/1]
    # counting: only scores over 0.9 count
    (COUNT3, {"clock": [det(0, 0, 0.95), det(20, 0, 0.92), det(40, 0, 0.91), det(60, 0, 0.9), det(80, 0, 0.5)]},
     {}, 1.0, True, True),
    (COUNT3, {"clock": [det(0, 0, 0.95), det(20, 0, 0.92), det(40, 0, 0.91), det(60, 0, 0.91)]},
     {}, 2 / 3, False, False),  # 1 - 1/3; GenEval: 4 clocks break the exclude clause (fewer than 4)
    (RED_CAR, {"car": [det(0, 0)]}, {box(0, 0): "red"}, 1.0, True, True),  # [1, 1]
    (RED_CAR, {"car": [det(0, 0)]}, {box(0, 0): "blue"}, 0.5, False, False),  # [1, 1 - 1/1]
    # two red cars: [1 - 1/1, 0]; GenEval looks at the most confident one only: red
    (RED_CAR, {"car": [det(0, 0), det(20, 0, 0.5)]}, {box(0, 0): "red", box(20, 0): "red"}, 0.0, False, True),
    # two yellow buses asked, one found yellow: [1, 1 - 1/2]; the white bed: [1, 1]
    ({"tag": "color_attr", "include": [{"class": "bus", "count": 2, "color": "yellow"},
                                       {"class": "bed", "count": 1, "color": "white"}]},
     {"bus": [det(0, 0), det(20, 0)], "bed": [det(40, 0)]},
     {box(0, 0): "yellow", box(20, 0): "blue", box(40, 0): "white"}, (1 + 0.5 + 1 + 1) / 4, False, False),
    # position: the dog 10x10 at x right of the cat at 0 needs x > 4 (test_relations_margin_both_sides)
    (CAT_DOG, {"cat": [det(0, 0)], "dog": [det(20, 0)]}, {}, 1.0, True, True),  # [1, 1, 1]
    (CAT_DOG, {"cat": [det(0, 0)], "dog": [det(5, 0)]}, {}, 1.0, True, True),  # 0.6: just outside the margin
    # 0.5: on the margin, no relation; the reference code appends a 0 then a 1: [1, 1, 0, 1]
    (CAT_DOG, {"cat": [det(0, 0)], "dog": [det(4, 0)]}, {}, 0.75, False, False),
    (CAT_DOG, {"cat": [det(20, 0)], "dog": [det(0, 0)]}, {}, 0.75, False, False),  # left of, not right of
    (CAT_DOG, {"dog": [det(20, 0)]}, {}, 1 / 3, False, False),  # no cat: [0], then no target: [1, 0]
    (CAT_DOG, {"cat": [det(0, 0)]}, {}, 1 / 3, False, False),  # no dog: [1], then [0, 0]
    # a blue dog: [1], then [1, 1 - 1/1] and no position term
    (RED_DOG_RIGHT, {"cat": [det(0, 0)], "dog": [det(20, 0)]}, {box(20, 0): "blue"}, 2 / 3, False, False),
    (RED_DOG_RIGHT, {"cat": [det(0, 0)], "dog": [det(20, 0)]}, {box(20, 0): "red"}, 1.0, True, True),  # [1, 1, 1, 1]
    # two red dogs right of the cat: [1], then [1 - 1/1, 0] (one 0 for colour and position); GenEval: the first one
    (RED_DOG_RIGHT, {"cat": [det(0, 0)], "dog": [det(20, 0), det(40, 0, 0.5)]},
     {box(20, 0): "red", box(40, 0): "red"}, 1 / 3, False, True),
    # an exclude clause of another class: the reward (and strict) ignore it, GenEval's rule does not
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": 1}]},
     {"dog": [det(0, 0)], "cat": [det(20, 0)]}, {}, 1.0, True, False),
]


@pytest.mark.parametrize("meta, dets, colours, want, strict, correct", CASES)
def test_scores_by_hand(meta, dets, colours, want, strict, correct):
    objects = found_objects(dets, meta["tag"])
    score, is_strict = reward_score(objects, meta, paint(colours))
    assert score == pytest.approx(want, abs=1e-12) and is_strict is strict
    assert (score == 1) is strict  # what eval_metrics reads strict accuracy from
    assert geneval_correct(objects, meta, paint(colours)) is correct


def test_eval_metrics_strict_per_tag():
    reward = GenevalReward(detector=object(), colours=lambda *a: [])
    metadata = [m for m, *_ in CASES]
    scores = torch.tensor([want for _, _, _, want, _, _ in CASES], dtype=torch.float32)
    out = reward.eval_metrics(scores, metadata)
    # strict rows by hand (CASES numbered from 0): single_object 2 of 4 (0 and 19), two_object 0 of 1, counting 1 of 2
    # (4), colors 1 of 3 (6), color_attr 0 of 1, position 3 of 9 (10, 11, 17): 7 of 20
    assert out == pytest.approx({"strict/all": 7 / 20, "dense/all": float(scores.mean()),
                                 "strict/single_object": 2 / 4, "strict/two_object": 0.0, "strict/counting": 0.5,
                                 "strict/colors": 1 / 3, "strict/color_attr": 0.0, "strict/position": 3 / 9})


# ---- the reward class on GenEval's jsonl rows, with a detector whose answers are set here ----

GENEVAL_ROWS = [  # GenEval's evaluation_metadata.jsonl format
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}],
     "prompt": "a photo of a toilet and a bicycle"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "cat", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a cat"},
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"},
                                      {"class": "bed", "count": 1, "color": "white"}],
     "prompt": "a photo of a yellow bus and a white bed"},
]
# what the detector finds in image k (an image filled with the value k), and the colours it reads
FOUND = {
    0: {"bench": [det(0, 0)]},  # 1
    1: {"toilet": [det(0, 0)]},  # [1, 0]: 0.5
    2: {"clock": [det(0, 0, 0.95), det(20, 0, 0.8)]},  # counting: one over 0.9, [1 - 1/2]: 0.5
    3: {"car": [det(0, 0)]},  # a red car: 1
    4: {"cat": [det(20, 0)], "dog": [det(0, 0)]},  # the dog left of the cat: [1, 1, 0, 1] 0.75
    5: {"bus": [det(0, 0)], "bed": [det(20, 0)]},  # a yellow bus, a black bed: [1, 1, 1, 0] 0.75
    6: {},
}
COLOURS = {(3, box(0, 0)): "red", (5, box(0, 0)): "yellow", (5, box(20, 0)): "black"}
BY_HAND = [1.0, 0.5, 0.5, 1.0, 0.75, 0.75]


class SetDetector:
    classes = {"bench", "toilet", "bicycle", "clock", "car", "cat", "dog", "bus", "bed"}

    def __init__(self):
        self.calls = 0

    def detect(self, images):
        self.calls += 1
        return [FOUND[int(im[0, 0, 0])] for im in images]


def set_colours(image, _name, objs):
    return [COLOURS.get((int(image[0, 0, 0]), o.box), "none") for o in objs]


def filled(values, size=32):
    return torch.stack([torch.full((3, size, size), v / 255) for v in values])


@pytest.fixture()
def geneval_rows(tmp_path):
    folder = tmp_path / "geneval"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in GENEVAL_ROWS)
    items = load_split(str(folder), "train")
    return [it.prompt for it in items], reward_metadata(items)


def test_geneval_rows_score_by_hand(geneval_rows):
    prompts, metadata = geneval_rows
    assert prompts == [r["prompt"] for r in GENEVAL_ROWS]
    for row, meta in zip(GENEVAL_ROWS, metadata):  # every key but the prompt reaches the reward as it was
        assert {k: meta[k] for k in row} == row
    reward = GenevalReward(detector=SetDetector(), colours=set_colours)
    s = reward(filled(range(6)), prompts, metadata)
    assert s.dtype == torch.float32 and torch.equal(s, torch.tensor(BY_HAND))
    verdicts = reward.evaluate(filled(range(6)), prompts, metadata)
    assert [v["score"] for v in verdicts] == BY_HAND
    assert [v["tag"] for v in verdicts] == [r["tag"] for r in GENEVAL_ROWS]
    assert [v["strict"] for v in verdicts] == [True, False, False, True, False, False]
    assert [v["correct"] for v in verdicts] == [True, False, False, True, False, False]
    # a video: its frames (image 0, then 6: nothing found) score 1 and 0
    video = torch.stack([filled([0, 6]), filled([3, 3])])
    assert torch.equal(reward(video, prompts[0:4:3], metadata[0:4:3]), torch.tensor([0.5, 1.0]))


def test_bad_rows_are_one_line_naming_the_prompt():
    reward = GenevalReward(detector=SetDetector(), colours=set_colours)
    x = filled([0, 0])
    good = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    msg = one_line_error(reward, x, ["a photo of a dog", "a red bus at dawn"], [good, {"prompt": "a red bus at dawn"}],
                         match=r"reward 'geneval': prompt 'a red bus at dawn': its row has no GenEval 'include'")
    assert '"include": [{"class": "dog", "count": 1}]' in msg
    assert reward.detector.calls == 0  # every row is checked before any detection
    for meta, match in [
        ({"include": [{"class": "dog", "count": 1}]}, "no GenEval 'tag'"),
        ({"tag": "x", "include": [{"class": "unicorn", "count": 1}]}, "the detector knows no class 'unicorn'"),
        ({"tag": "x", "include": [{"class": "dog", "count": 0}]}, "'count' must be an integer >= 1"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "colour 'teal' is not one of"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}]},
         r"'position' must be \[relation, index of an earlier include clause\]"),
        ({"tag": "x", "include": [{"class": "cat", "count": 1},
                                  {"class": "dog", "count": 1, "position": ["beside", 0]}]}, "'position' must be"),
        ({"tag": "x", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog"}]},
         r"exclude clause 0 .*'count' must be"),
    ]:
        one_line_error(check_row, meta, "p", SetDetector.classes, match=r"reward 'geneval': prompt 'p': .*" + match)


# ---- the default detector (Mask2Former + CLIP through transformers) on tiny random models ----

LABELS = ["dog", "cat", "mouse", "tv"]  # COCO's "mouse" is GenEval's "computer mouse"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_clip_dir):  # noqa: F811
    """FOLDER/detector: a tiny random Mask2Former whose class head always says "dog" (so that it detects something),
    FOLDER/clip: the tiny random CLIP of tests/test_rewards.py."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil,
                              SwinConfig)

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=6, id2label=dict(enumerate(LABELS)),
                               label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():  # class logits: "dog" 10, the others (and no-object) 0
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[0] = 10
    folder = tmp_path_factory.mktemp("geneval_weights")
    model.save_pretrained(folder / "detector")
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder / "detector")
    os.symlink(tiny_clip_dir, folder / "clip")
    return str(folder)


def noise(n=4, h=80, w=96):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def dogs(detections) -> list[int]:
    """How many dogs score over 0.3 in each image (at most 16: the tiny model has 6 queries)."""
    return [sum(score > 0.3 for _, score, _ in d.get("dog", [])) for d in detections]


def rows_for(n):
    """Rows for the 4 noise images whose counts match what the tiny detector finds (n: dogs()), so that the colour
    and position checks run too."""
    return [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
            {"tag": "colors", "include": [{"class": "dog", "count": n[1], "color": "red"}]},
            {"tag": "position", "include": [{"class": "dog", "count": n[2]},  # each dog against itself too: none
                                            {"class": "dog", "count": n[2], "position": ["left of", 0]}]},
            {"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
             "exclude": [{"class": "computer mouse", "count": 3}]}]


@pytest.fixture(scope="module")
def tiny_set(tiny_folder):
    return load_rewards(["geneval"], {"geneval": tiny_folder})


def test_default_detector_structure_and_end_to_end(tiny_set):
    reward = tiny_set.rewards["geneval"]
    assert reward.classes == {"dog", "cat", "computer mouse", "tv"}
    x = noise()
    arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    detections = reward.detector.detect(list(arr))
    assert len(detections) == 4 and all(set(d) == {"dog"} for d in detections)  # its class head always says dog
    for d in detections:
        for b, score, mask in d["dog"]:
            assert mask.dtype == bool and mask.shape == (80, 96) and mask.any()
            ys, xs = np.nonzero(mask)  # the box is the mask's extent, x2 and y2 one past the last pixel
            assert b.dtype == np.float64 and b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert 0.3 <= score <= 1
    n = dogs(detections)
    assert all(1 <= k <= 6 for k in n)
    found = found_objects(detections[1], "colors")["dog"]
    colours = reward.colours(arr[1], "dog", found)
    assert len(colours) == n[1] and set(colours) <= set(COLORS)
    reds = colours.count("red")
    s = tiny_set.score(x, ["p"] * 4, rows_for(n))["geneval"]
    # one dog asked, n[0] found: 1 - |1 - n[0]|; n[1] dogs, `reds` of them red: [1, 1 - |n[1] - reds| / n[1]];
    # no dog is left of itself: [1, 1, 0, 1]; no mouse: [1 - 2/2]
    want = [1 - abs(1 - n[0]), (1 + 1 - abs(n[1] - reds) / n[1]) / 2, 0.75, 0.0]
    assert s.tolist() == pytest.approx(want, abs=1e-6)


def test_own_detector_loads_only_clip(tmp_path, tiny_clip_dir):  # noqa: F811
    """A reward wrapping another detector (mmdet, say) with the default colours needs only FOLDER/clip."""
    from rewards.geneval_detector import ClipColours

    os.symlink(tiny_clip_dir, tmp_path / "clip")
    reward = GenevalReward(path=str(tmp_path), detector=SetDetector())
    assert isinstance(reward.colours, ClipColours)
    # image 3: one car; red (score [1, 1]) or any other colour ([1, 0])
    red = reward.colours(np.full((32, 32, 3), 3, np.uint8), "car", found_objects(FOUND[3], "colors")["car"]) == ["red"]
    assert reward(filled([3]), [GENEVAL_ROWS[3]["prompt"]], [GENEVAL_ROWS[3]]).tolist() == [1.0 if red else 0.5]


def test_path_override_layout_and_hub_failure_are_one_line(tmp_path, monkeypatch):
    import transformers

    msg = one_line_error(load_rewards, ["geneval"], {"geneval": str(tmp_path)},
                         match=r"reward 'geneval': path override .* must hold detector/ .* and clip/")
    assert msg.endswith("missing: detector, clip")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.Mask2FormerImageProcessorPil, "from_pretrained", offline)
    msg = one_line_error(load_rewards, ["geneval"], match="reward 'geneval': cannot load "
                         "'facebook/mask2former-swin-small-coco-instance'")
    assert "path override for 'geneval'" in msg and msg.endswith("in its detector/ and clip/ subfolders")


def test_server_gives_the_same_scores(tiny_folder, tiny_set, tmp_path):
    with reward_server("geneval", tmp_path / "server.log", "--reward-path", tiny_folder) as url:
        remote = load_rewards([f"geneval={url}"])
        x = noise()
        arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        rows = rows_for(dogs(tiny_set.rewards["geneval"].detector.detect(list(arr))))
        s = remote.score(x, ["p"] * 4, rows)["geneval"]
        assert torch.equal(s, tiny_set.score(x, ["p"] * 4, rows)["geneval"])
        one_line_error(remote.score, x[:1], ["a red bus at dawn"], [{}],
                       match=r"reward 'geneval': .*422.*prompt 'a red bus at dawn': its row has no GenEval 'include'")
