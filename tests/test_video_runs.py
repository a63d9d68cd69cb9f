"""Wan video through the algorithm scripts (tiny builds, CPU): every non-default tiny Wan architecture runs one
epoch of one script (the default variants run all four in tests/test_all_models.py) and writes LoRA files the stock
pipeline loads, both Wan2.2-A14B experts included; video data reaches the rewards decoded; image rewards score a
video as the mean over its strided frames; bad video input stops in one line before any model loads."""
import json
import subprocess
import sys

import pytest
import torch

from common import models
from common.cli import parse_with_presets
from common.errors import ConfigError, DataError
from common.video import read_video, write_video
from tests.helpers import checks_only
from tests.test_grpo import ENV, ROOT, fresh_accelerator_state, read_metrics  # noqa: F401 (autouse fixture)

# (script, model, variant): each distinct tiny architecture that the default-variant runs do not cover
RUNS = [("grpo", "wan2_t2v", "2.2-a14b"), ("nft", "wan2_t2v", "2.2-ti2v-5b"), ("awm", "wan2_i2v", "2.2-a14b"),
        ("grpo_guard", "wan2_i2v", "2.2-ti2v-5b")]


def test_every_wan_architecture_runs_and_exports_loadable_lora(tmp_path):
    procs = {}
    for script, model, variant in RUNS:
        out = tmp_path / f"{script}-{model}-{variant}"
        procs[out] = (subprocess.Popen([sys.executable, f"{script}.py", "--model", model, "--tiny", "--variant", variant,
                                        "--num-epochs", "1", "--log-with", "none", "--output-dir", str(out)],
                                       cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                      model, variant)
    for out, (p, model, variant) in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{out.name}: {err[-3000:]}"
        rows = read_metrics(out)
        assert [r["epoch"] for r in rows] == [-1, 0]
        assert all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN
        frames, _ = read_video(str(out / "samples/eval_base.mp4"))
        assert frames.shape[0] == 5
        # the stock pipeline loads what the run exported: both experts of Wan2.2-A14B
        pipe = models.adapter_class(model).build_tiny(variant)
        pipe.load_lora_weights(str(out / "lora"))
        if variant == "2.2-a14b":
            pipe.load_lora_weights(str(out / "lora/transformer_2"), load_into_transformer_2=True)
            assert any("lora_A" in n for n, _ in pipe.transformer_2.named_parameters())
        assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())


def _args(script, *argv):
    mod = __import__(script)
    return mod, parse_with_presets(mod.Args, mod.PRESETS, mod.TINY, list(argv))


@pytest.mark.parametrize("argv,error,match", [
    (["--model", "wan2_t2v", "--tiny", "--num-frames", "4"], ConfigError, "training size: .*4k\\+1.*got 4"),
    (["--model", "wan2_t2v", "--tiny", "--eval-num-frames", "6"], ConfigError, "evaluation size: .*got 6"),
    (["--model", "wan2_t2v", "--tiny", "--variant", "2.2-ti2v-5b", "--resolution", "48"], ConfigError,
     "multiples of 32"),
    (["--model", "wan2_t2v", "--tiny", "--variant", "2.2-a14b", "--train-experts", "low", "--sde-window-range", "0",
      "2"], ConfigError, "never reach transformer_2; with 4 steps, steps 0-1 are the high-noise expert's"),
    (["--model", "wan2_t2v", "--tiny", "--variant", "2.2-a14b", "--train-experts", "high"], ConfigError,
     "reach transformer_2, which does not train"),
    (["--model", "wan2_t2v", "--tiny", "--guidance-scale-2", "3"], ConfigError, "has one transformer"),
    (["--model", "flux1", "--tiny", "--num-frames", "5"], ConfigError, "generates images"),
])
def test_bad_video_flags_stop_before_loading(argv, error, match):
    grpo, args = _args("grpo", *argv)
    with pytest.raises(error, match=match):
        checks_only("grpo", args)


def test_training_sigmas_outside_the_trained_expert_stop_nft_and_awm():
    # tiny A14B, 4 steps: sigmas [1, 0.9, 0.75, 0.5]; steps 0-1 high-noise (>= 0.875), 2-3 low-noise
    base = ["--model", "wan2_t2v", "--tiny", "--variant", "2.2-a14b", "--train-experts", "high"]
    for script in ("nft", "awm"):
        mod, args = _args(script, *base, "--time-sampler", "uniform", "--timestep-range", "0.5", "0.9")  # 0.1-0.5
        with pytest.raises(ConfigError, match="training sigmas \\(0.1, 0.5\\) never reach transformer;"):
            checks_only(script, args)
        mod, args = _args(script, *base, "--time-sampler", "discrete")  # range 0-0.7 draws steps 0-2
        with pytest.raises(ConfigError, match="steps \\[0, 1, 2\\] reach transformer_2, which does not train"):
            checks_only(script, args)
        mod, args = _args(script, *base, "--time-sampler", "discrete", "--timestep-range", "0", "0.2")  # step 0
        checks_only(script, args)


def _video_dataset(tmp_path, rows, make=("clip.mp4",)):
    (tmp_path / "videos").mkdir()
    for i, name in enumerate(make):
        t = torch.linspace(0, 1, 9).view(9, 1, 1, 1)
        write_video(str(tmp_path / "videos" / name), (t * torch.rand(1, 3, 32, 48) + 0.1 * i).clamp(0, 1), fps=12)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path)


@pytest.mark.parametrize("problem", ["missing", "undecodable"])
def test_bad_video_file_names_the_row(tmp_path, problem):
    rows = [{"prompt": "a cat", "video": "clip.mp4"}, {"prompt": "a dog", "videos": ["clip.mp4", "bad.mp4"]}]
    ds = _video_dataset(tmp_path, rows)
    if problem == "undecodable":
        (tmp_path / "videos/bad.mp4").write_text("not a video")
    grpo, args = _args("grpo", "--model", "wan2_t2v", "--tiny", "--dataset", ds)
    want = "train.jsonl:2: video not found: .*bad.mp4" if problem == "missing" else \
        "train.jsonl:2: unreadable video .*bad.mp4"
    with pytest.raises(DataError, match=want):
        checks_only("grpo", args)


def test_image_to_video_row_without_image_names_the_row(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a cat walks"}) + "\n")
    grpo, args = _args("grpo", "--model", "wan2_i2v", "--tiny", "--dataset", str(tmp_path))
    with pytest.raises(DataError, match="train.jsonl:1: wan2_i2v needs exactly one condition image"):
        checks_only("grpo", args)


SEEN = []


def record_videos(images, prompts, metadata):
    """A custom reward (dotted path): records the generated videos' shape and the decoded data videos."""
    SEEN.append((tuple(images.shape), [[(tuple(f.shape), fps) for f, fps in m["video_frames"]] for m in metadata]))
    return images.mean(dim=(1, 2, 3, 4))


def test_data_videos_reach_the_rewards_decoded(tmp_path):
    ds = _video_dataset(tmp_path, [{"prompt": "a cat", "video": "a.mp4"}, {"prompt": "a dog", "videos": ["a.mp4", "b.mp4"]}],
                        make=("a.mp4", "b.mp4"))
    grpo, args = _args("grpo", "--model", "wan2_t2v", "--tiny", "--dataset", ds, "--num-epochs", "1", "--eval-every",
                       "0", "--reward", "tests.test_video_runs.record_videos", "--output-dir", str(tmp_path / "run"))
    grpo.main(args)
    assert SEEN and all(shape[1:] == (5, 3, 64, 64) for shape, _ in SEEN)  # custom rewards get every frame
    decoded = {len(v): v for _, batch in SEEN for v in batch}
    assert decoded[1] == [((9, 3, 32, 48), 12.0)] and decoded[2] == [((9, 3, 32, 48), 12.0)] * 2
    frames, fps = read_video(str(tmp_path / "videos/a.mp4"))
    assert frames.shape == (9, 3, 32, 48) and fps == 12.0


def test_image_rewards_score_the_mean_over_strided_frames():
    import rewards
    from rewards.jpeg import jpeg_kb
    video = torch.rand(2, 7, 3, 32, 32)
    video[:, 1::2] = 0.5  # odd frames flat (tiny JPEGs): a stride of 2 skips them
    for stride in (1, 2, 3):
        rs = rewards.load_rewards(["jpeg_incompressibility", "tests.test_video_runs.record_videos"], frame_stride=stride)
        SEEN.clear()
        got = rs.score(video, ["a", "b"], [{"video_frames": []}] * 2)
        want = torch.stack([jpeg_kb(v[::stride]).mean() for v in video])  # independent: per frame, then the mean
        assert torch.allclose(got["jpeg_incompressibility"], want)
        assert SEEN[0][0] == (2, 7, 3, 32, 32)  # the custom reward still sees all 7 frames


def test_offloaded_samples_change_no_number(tmp_path):
    """--offload-samples keeps the stored latents and conditioning on the CPU between rollout and training: the same
    run, number for number (on a CPU machine the move itself is a no-op; this guards the plumbing)."""
    rows = {}
    from accelerate.state import AcceleratorState
    for flag in ((), ("--offload-samples",)):
        AcceleratorState._reset_state(reset_partial_state=True)
        grpo, args = _args("grpo", "--model", "wan2_t2v", "--tiny", "--num-epochs", "1", "--eval-every", "0",
                           "--output-dir", str(tmp_path / str(len(flag))), *flag)
        grpo.main(args)
        rows[flag] = [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))}
                      for r in read_metrics(tmp_path / str(len(flag)))]
    assert rows[()] == rows[("--offload-samples",)]
