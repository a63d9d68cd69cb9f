"""The ocr reward for real: RapidOCR's bundled PP-OCR models on ONNX Runtime (requirements-extras.txt), on images with
text drawn by PIL. Scores are checked against values worked out here with an independent edit distance; the target
text's rules, the one-line errors, videos, and a reward server serving it with the same scores."""
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards import REGISTRY, RewardError, load_rewards
from rewards.ocr import OcrReward, target_text
from tests.helpers import reward_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, written here independently of the reward's: a memoised recursion on suffixes."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def d(i, j):
        if i == len(a) or j == len(b):
            return (len(a) - i) + (len(b) - j)
        return min(d(i + 1, j) + 1, d(i, j + 1) + 1, d(i + 1, j + 1) + (a[i] != b[j]))

    return d(0, 0)


def expected(drawn: str, target: str) -> float:
    """The formula by hand: both sides without spaces, lower-cased; 0 if the target is inside what was read, else
    the edit distance capped at the target's length."""
    read, want = drawn.replace(" ", "").lower(), target.replace(" ", "").lower()
    d = 0 if want in read else min(edit_distance(read, want), len(want))
    return 1 - d / len(want)


def render(text: str, size=512, font_size=64, width=None) -> torch.Tensor:
    """(3, size, width or size) in [0, 1]: `text` in black on white, centred, in PIL's own scalable font (no system
    font needed)."""
    width = width or size
    im = Image.new("RGB", (width, size), (255, 255, 255))
    if text:
        font = ImageFont.load_default(size=font_size)
        ImageDraw.Draw(im).text((width // 2, size // 2), text, fill=(0, 0, 0), font=font, anchor="mm")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr_set():
    return load_rewards(["ocr"])


# (drawn text, prompt, metadata); each drawn text is one the engine reads exactly (checked in the test)
CASES = [
    ("OPEN 24H", 'a shop sign that says "Open 24h" at night', {}),  # exact, case and spaces aside: 1
    ("FLOW 42", 'a poster reading "flow"', {}),  # the target inside what was read: 1
    ("OPFN 24H", 'a shop sign that says "open 24h"', {}),  # one letter wrong: 1 - 1/7
    ("HELO WORD", 'a banner, "hello world"', {}),  # two letters missing: 1 - 2/10
    ("ZZZZZZZZ", 'the letters "ab"', {}),  # distance 8 capped at len("ab"): 0
    ("", 'an empty wall with a sign saying "EXIT"', {}),  # nothing read: 0
    ("EXIT", "a green sign over a door", {"text": "exit"}),  # the row's text key, no quotes needed: 1
    ("EXIT", 'a sign that says "ENTRANCE"', {"text": "EX IT"}),  # the text key wins over the quotes: 1
]


def test_registered_and_target_rules():
    assert REGISTRY["ocr"] == "rewards.ocr:OcrReward"
    assert target_text('a sign "Hello World" and "second"') == "helloworld"  # the first pair only
    assert target_text('a sign "Line one\n two"') == "lineonetwo"  # whitespace of any kind removed
    assert target_text("no quotes", {"text": "  Big Sale "}) == "bigsale"
    assert target_text('has "quotes"', {"text": "key"}) == "key"
    assert target_text('has "quotes"', {"text": None}) == "quotes"  # a null text key is no text key


def one_line(fn, *args, match):
    with pytest.raises(RewardError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_prompt_without_target_is_one_line_naming_it(ocr_set):
    x = torch.stack([render("A"), render("B")])
    msg = one_line(ocr_set.score, x, ['a sign "A"', "a red bus at dawn"], [{}, {}],
                   match=r"reward 'ocr': prompt 'a red bus at dawn' has no text in double quotes")
    assert "'text' key" in msg
    one_line(target_text, 'a sign saying ""', match=r"prompt 'a sign saying \"\"': its quoted text is empty")
    one_line(target_text, 'only one " quote', match="no text in double quotes")
    one_line(target_text, "x", {"text": 42}, match="'text' key of prompt 'x' is a int")


def test_scores_equal_the_formula_by_hand(ocr_set):
    reward = ocr_set.rewards["ocr"]
    drawn, prompts, metadata = zip(*CASES)
    x = torch.stack([render(t) for t in drawn])
    for t, img in zip(drawn, x):  # the premise: the engine reads what was drawn, exactly
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert reward.read(arr).replace(" ", "") == t.replace(" ", ""), t
    t0 = time.perf_counter()
    s = ocr_set.score(x, list(prompts), list(metadata))["ocr"]
    per_image = (time.perf_counter() - t0) / len(x)
    want = [expected(t, m.get("text") or p.split('"')[1]) for t, p, m in CASES]
    assert want == [1, 1, 1 - 1 / 7, 1 - 2 / 10, 0, 0, 1, 1]
    assert s.dtype == torch.float32 and torch.equal(s, torch.tensor(want, dtype=torch.float32))
    print(f"ocr: {per_image:.2f} s per 512x512 image, {torch.get_num_threads()} thread(s)")


def test_video_is_the_frame_mean_and_sizes_vary(ocr_set):
    frames = torch.stack([torch.stack([render("OPEN", 256, 48), render("", 256)]),  # read, blank: 0.5
                          torch.stack([render("OPEN", 256, 48), render("OPEN", 256, 48)])])
    s = ocr_set.score(frames, ['a sign "open"'] * 2, [{}, {}])["ocr"]
    assert torch.equal(s, torch.tensor([0.5, 1.0]))
    wide = render("SALE", 320, 72, width=640)  # 640 wide, 320 high
    assert wide.shape == (3, 320, 640) and ocr_set.score(wide[None], ['"sale"'], [{}])["ocr"].tolist() == [1.0]


def test_missing_extra_and_path_override_are_one_line(monkeypatch):
    one_line(OcrReward, "/some/folder", match="takes no path override")
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # as if not installed: import raises ImportError
    msg = one_line(load_rewards, ["ocr"], match="reward 'ocr' needs optional packages")
    assert "pip install -r requirements-extras.txt" in msg


def test_server_gives_the_same_scores(ocr_set, tmp_path):
    with reward_server("ocr", tmp_path / "server.log") as url:
        remote = load_rewards([f"ocr={url}"])
        drawn, prompts, metadata = zip(*CASES[:4], CASES[6])
        x = torch.stack([render(t) for t in drawn])
        s = remote.score(x, list(prompts), list(metadata))["ocr"]
        assert torch.equal(s, ocr_set.score(x, list(prompts), list(metadata))["ocr"])
        one_line(remote.score, x[:1], ["no quotes here"], [{}],
                 match=r"reward 'ocr': .*422.*prompt 'no quotes here' has no text in double quotes")


def test_score_command_prints_one_for_the_drawn_sign(tmp_path):
    """`python -m rewards score --reward ocr` on a PIL-drawn "FLOW 42" sign: 1.0 for a prompt asking for it."""
    from tests.test_score_command import printed, run
    path = str(tmp_path / "sign.png")
    Image.fromarray((render("FLOW 42") * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    r = run("--reward", "ocr", "--prompt", 'a sign that says "FLOW 42"', path)
    assert r.returncode == 0, r.stderr[-2000:]
    scores, mean = printed(r.stdout)
    assert scores == {path: 1.0} and mean.startswith("1.000000\t")


def test_tiny_flux1_run_reads_every_sample(tmp_path, monkeypatch):
    """A tiny FLUX.1 GRPO run with --reward ocr on a dataset in the reference project's OCR layout (train.txt and
    test.txt, one prompt per line, the text to render in double quotes): every generated sample is read by the
    engine, and the reward is logged."""
    from tests.helpers import tiny_run
    words = ["OPEN", "EXIT", "FLOW 42", "HELLO", "SALE", "CAFE", "STOP", "NO ENTRY"]
    data = tmp_path / "ocr"
    data.mkdir()
    (data / "train.txt").write_text("".join(f'A shop sign that says "{w}"\n' for w in words))
    (data / "test.txt").write_text('A banner reading "WELCOME"\n')
    reads = []
    real_read = OcrReward.read
    monkeypatch.setattr(OcrReward, "read", lambda self, image: reads.append(image.shape) or real_read(self, image))
    rows = tiny_run("grpo", tmp_path / "run", "--dataset", str(data), "--reward", "ocr")
    trained = next(r for r in rows if r["epoch"] == 0)
    n = trained["samples"]
    assert n == 16 and 0.0 <= trained["reward/ocr_mean"] <= 1.0  # 4 prompts x 4 images of the tiny model's noise
    # the engine's warm-up read when the reward loads, the start-up probe's 2 images, then every sample of the epoch
    assert len(reads) == 1 + 2 + n and all(shape == (64, 64, 3) for shape in reads[1:]), reads
