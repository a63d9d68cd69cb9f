"""`python -m rewards score`: the printed scores of image and video files are the in-process scores (a subprocess,
the jpeg reward), a dataset's rows reach the reward in order (a custom reward reading prompts and metadata), and bad
input is one line with exit code 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common.video import read_video, write_video
from rewards import load_rewards
from rewards.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RowProbe:
    """score = len(prompt) + the row's `value` + 1000 * the number of the row's condition images + brightness."""

    def __call__(self, images, prompts, metadata):
        return torch.tensor([len(p) + m.get("value", 0) + 1000 * len(m["images"]) for p, m in zip(prompts, metadata)],
                            dtype=torch.float32) + images.flatten(1).mean(1)


def run(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "rewards", "score", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def printed(out: str) -> tuple[dict[str, float], str]:
    """{file: score} and the mean line."""
    lines = out.strip().splitlines()
    return {f: float(s) for s, f in (ln.split("\t") for ln in lines[:-1])}, lines[-1]


def write_images(folder, n, seed=0):
    """PNG files (lossless) of various sizes: flat, noisy, gradients."""
    rng, paths = np.random.default_rng(seed), []
    for i in range(n):
        h, w = 48 + 8 * i, 64 - 4 * i
        a = rng.integers(0, 256, (h, w, 3), np.uint8) if i % 2 else np.full((h, w, 3), 30 * i, np.uint8)
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return paths


def as_tensor(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_printed_scores_are_the_in_process_scores(tmp_path):
    images = write_images(tmp_path, 3)
    torch.manual_seed(0)
    video = str(tmp_path / "clip.mp4")
    write_video(video, torch.rand(5, 3, 32, 48), fps=8)
    r = run("--reward", "jpeg_compressibility", "--prompt", "anything", "--reward-frame-stride", "2", *images, video)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    scores, mean = printed(r.stdout)
    rs = load_rewards(["jpeg_compressibility"], frame_stride=2)
    want = {p: rs.score(as_tensor(p)[None], ["anything"], [{}])["jpeg_compressibility"].item() for p in images}
    frames = read_video(video)[0]
    want[video] = rs.score(frames[None], ["anything"], [{}])["jpeg_compressibility"].item()  # frames 0, 2, 4
    assert want[video] == pytest.approx(rs.rewards["jpeg_compressibility"](frames[::2][None], ["x"], [{}]).item())
    assert list(scores) == images + [video]
    for p in want:
        assert scores[p] == pytest.approx(want[p], abs=1e-6), p
    assert mean == f"{sum(scores.values()) / 4:.6f}\tmean of 4 file(s)"


def write_dataset(folder, rows):
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "images" / "cond.png")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_dataset_rows_in_order_and_per_row(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data", [{"prompt": "a", "value": 10}, {"prompt": "bbb", "image": "cond.png"},
                                                {"prompt": "cc", "value": -5}])
    files = write_images(tmp_path, 6, seed=1)
    probe = RowProbe()
    for per_row, used in ((1, files[:3]), (2, files)):
        assert main(["score", "--reward", "tests.test_score_command.RowProbe", "--dataset", dataset,
                     "--per-row", str(per_row), *used]) == 0
        scores, mean = printed(capsys.readouterr().out)
        rows = [("a", {"value": 10, "images": []}), ("bbb", {"images": ["x"]}), ("cc", {"value": -5, "images": []})]
        for i, p in enumerate(used):
            prompt, meta = rows[i // per_row]
            assert scores[p] == pytest.approx(probe(as_tensor(p)[None], [prompt], [meta]).item(), abs=1e-6)
        assert mean.endswith(f"mean of {len(used)} file(s)")


def error_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(["score", *argv])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code  # sys.exit(message): printed, exit code 1
    assert capsys.readouterr().out == ""
    return e.value.code


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    images = write_images(tmp_path, 2)
    r = run("--reward", "jpeg_compressibility", images[0], str(tmp_path / "nope.png"))
    assert r.returncode == 1 and r.stdout == "" and r.stderr == f"error: file not found: {tmp_path / 'nope.png'}\n"
    assert error_line(capsys, "--reward", "no_such_reward", *images).startswith(
        "error: unknown reward 'no_such_reward'; known: ")
    dataset = write_dataset(tmp_path / "data", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    assert error_line(capsys, "--reward", "jpeg_compressibility", "--dataset", dataset, *images) == (
        f"error: 2 file(s) for the 3 row(s) of {dataset} (train); expected 3 (one per row, in row order)")
    assert error_line(capsys, "--reward", "jpeg_compressibility", "--dataset", dataset, "--per-row", "2",
                      *images) == (f"error: 2 file(s) for the 3 row(s) of {dataset} (train); expected 6 "
                                   "(2 per row, in row order)")
    assert error_line(capsys, "--reward", "jpeg_compressibility", "--dataset", str(tmp_path / "none"),
                      *images) == f"error: dataset folder not found: {tmp_path / 'none'}"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert error_line(capsys, "--reward", "jpeg_compressibility", str(bad)).startswith(
        f"error: cannot read image {bad}: ")
