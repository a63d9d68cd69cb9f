"""A full disk, for real: each test mounts a small tmpfs, fills it (a filler file, or the tmpfs's own size) and has the
real writers (safetensors, json, PNG through PIL, mp4 through PyAV) run out of space part-way. Each write must fail
as one OutputError line "cannot write <what> <path>: No space left on device" and leave nothing half-written: no
temporary file or folder, no truncated file or torn metrics line, the earlier checkpoint or export intact. Needs root
to mount (skipped otherwise); bench/faults.py runs the same through the real command line for every kind of write."""
import gc
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from bench import faults
from common import checkpoint, models, tracking, video
from common.errors import OutputError
from tests.helpers import tiny_args
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)

PAGE = faults.PAGE


@pytest.fixture
def disk(tmp_path):
    """mount(size) -> the folder of a fresh tmpfs of `size` bytes (unmounted after the test)."""
    mounted = []

    def mount(size=2**20):
        d = str(tmp_path / f"disk{len(mounted)}")
        why = faults.mount(d, size)
        if why:
            pytest.skip(why)
        mounted.append(d)
        return d
    yield mount
    gc.collect()  # tensors that safetensors mapped from the disk's files (held in cycles) keep it busy
    for d in mounted:
        faults.umount(d)


def one_line(e, what, path):
    assert re.fullmatch(f"cannot write {what} {re.escape(str(path))}: No space left on device", str(e.value)), e.value


def _trained(seed):
    """A parameter and its AdamW after one step (the optimizer state holds tensors)."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([w])
    w.grad = torch.randn(64, 64)
    opt.step()
    return {"w": w}, opt


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")  # in the order save writes them


@pytest.mark.parametrize("at", CHECKPOINT_FILES)
def test_a_checkpoint_that_does_not_fit_leaves_the_earlier_one(disk, at):
    d = disk()
    root = os.path.join(d, "checkpoints")
    params, opt = _trained(0)
    first = checkpoint.save(root, 2, params, opt, meta={"epoch": 0})
    files = CHECKPOINT_FILES[:CHECKPOINT_FILES.index(at) + 1]
    # the files before `at` fit, `at` itself does not (one page short: cut part-way when it is longer)
    faults.fill(d, sum(faults.allocated(os.path.join(first, f)) for f in files) - PAGE)
    with pytest.raises(OutputError) as e:
        checkpoint.save(root, 4, *_trained(1), meta={"epoch": 1})
    one_line(e, "the checkpoint", os.path.join(root, "checkpoint-4"))
    assert os.listdir(root) == ["checkpoint-2"] and checkpoint.problem(first) is None
    loaded, loaded_opt = _trained(2)
    checkpoint.load(first, loaded, loaded_opt)
    assert torch.equal(loaded["w"], params["w"])
    saved, restored = opt.state[params["w"]], loaded_opt.state[loaded["w"]]
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)


@pytest.fixture(scope="module")
def tiny_lora():
    adapter = models.load("flux1", tiny=True)
    adapter.add_lora(4, 8)
    return adapter


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-an-earlier-export"])
def test_an_export_that_does_not_fit_leaves_no_half_lora(disk, tiny_lora, earlier):
    d = disk()
    out = os.path.join(d, "run")
    os.makedirs(out)
    if earlier:
        checkpoint.export(tiny_lora, "lora", out)
        before = open(os.path.join(out, "lora/pytorch_lora_weights.safetensors"), "rb").read()
        with torch.no_grad():  # other weights to export: the earlier export must stay as it was
            next(p for p in tiny_lora.trained_module().parameters() if p.requires_grad).add_(1)
    faults.fill(d, PAGE)
    with pytest.raises(OutputError) as e:
        checkpoint.export(tiny_lora, "lora", out)
    one_line(e, "the export", os.path.join(out, "lora"))
    assert os.listdir(out) == (["lora"] if earlier else []) and faults.half_written(out) == []
    if earlier:
        assert open(os.path.join(out, "lora/pytorch_lora_weights.safetensors"), "rb").read() == before


def test_a_metrics_line_that_does_not_fit_is_not_left_torn(disk):
    d = disk(64 * 1024)
    path = os.path.join(d, "metrics.jsonl")
    tracking.append_jsonl(path, {"epoch": 0, "reward/mean": 0.5})
    before = open(path, "rb").read()
    faults.fill(d)  # no page left: the next line fits only its start into the first line's page, a short write
    with pytest.raises(OutputError) as e:
        tracking.append_jsonl(path, {"epoch": 1, "note": "x" * 2 * PAGE})
    one_line(e, "the metrics", path)
    assert open(path, "rb").read() == before and tracking.read_jsonl(path) == [{"epoch": 0, "reward/mean": 0.5}]


SAMPLES = {"image": torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
           "video": torch.rand(2, 6, 3, 32, 48, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("kind,at,tag", [("image", "png", "second"), ("image", "png", "first"),
                                         ("video", "mp4", "second"), ("video", "png", "second")])
def test_samples_that_do_not_fit_leave_no_truncated_file(disk, kind, at, tag):
    """A new PNG or mp4 does not fit, or a PNG over an earlier one of the same tag (which must stay)."""
    root = disk()
    out = os.path.join(root, "samples")
    acc, images = SimpleNamespace(trackers=[]), SAMPLES[kind]
    tracking.save_samples(acc, out, "first", images, ["a"] * len(images), 0)
    first = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    size = {x: faults.allocated(os.path.join(out, f"first.{x}")) for x in ("png", "mp4") if f"first.{x}" in first}
    # the files written before `at` fit (the mp4 comes first), `at` itself does not
    faults.fill(root, (size["mp4"] if kind == "video" and at == "png" else 0) + size[at] - PAGE)
    with pytest.raises(OutputError) as e:
        tracking.save_samples(acc, out, tag, images, ["a"] * len(images), 1)
    one_line(e, "the sample video" if at == "mp4" else "the samples", os.path.join(out, f"{tag}.{at}"))
    assert {f: open(os.path.join(out, f), "rb").read() for f in first} == first
    assert sorted(set(os.listdir(out)) - set(first)) == (["second.mp4"] if kind == "video" and at == "png" else [])
    assert faults.half_written(out) == []
    if kind == "video" and at == "png":  # the complete video stays, whole
        assert video.read_video(os.path.join(out, "second.mp4"))[0].shape == (6, 3, 32, 96)
    with Image.open(os.path.join(out, "first.png")) as im:
        im.load()


def test_a_per_prompt_evaluation_that_does_not_fit(disk):
    from common.run import Run
    d = disk(4 * 2**20)
    out = os.path.join(d, "run")
    run = Run(tiny_args("grpo", out, "--eval-every", "1"), "grpo.py", trained_steps=range(0, 4))
    run.evaluate(-1)
    samples = os.path.join(out, "samples")
    # the next evaluation draws the same grid: its PNG and captions fit, its per-prompt json does not
    faults.fill(d, sum(faults.allocated(os.path.join(samples, f"eval_base.{x}")) for x in ("png", "txt")))
    with pytest.raises(OutputError) as e:
        run.evaluate(0)
    one_line(e, "the per-prompt evaluation", os.path.join(samples, "eval_epoch0000_prompts.json"))
    assert sorted(os.listdir(samples)) == sorted([f"{t}.{x}" for t in ("eval_base", "eval_epoch0000")
                                                  for x in ("png", "txt")] + ["eval_base_prompts.json"])
    assert faults.half_written(out) == []


def test_a_run_whose_checkpoint_does_not_fit_is_one_error_line(disk):
    """The command line: the tmpfs holds the lock, config.json and metrics.jsonl (a page each) and 2 pages more, so
    the run trains an epoch and its first checkpoint runs out of space."""
    out = os.path.join(disk(5 * PAGE), "run")
    r = subprocess.run([sys.executable, *faults.QUIET, "--num-epochs", "2", "--output-dir", out], cwd=faults.ROOT,
                       env=faults.ENV, capture_output=True, text=True, timeout=120)
    lines = faults.user_lines(r.stderr)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert lines[0] == f"error: cannot write the checkpoint {out}/checkpoints/checkpoint-2: No space left on device"
    assert sorted(os.listdir(out)) == [".run.lock", "checkpoints", "config.json", "metrics.jsonl"]
    assert os.listdir(os.path.join(out, "checkpoints")) == [] and faults.half_written(out) == []
