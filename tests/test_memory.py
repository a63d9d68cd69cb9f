"""Memory levers. Prompts encoded once (`--encode-once`, the default) against encoding every batch: the cached rows assembled into a
batch equal the batch encoded directly, for every model (tiny builds); whole runs give the same numbers; the cache
covers every row a process samples in the remaining epochs and its evaluation rows, and stops in one line before
host memory runs out."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from common import conditioning, models
from common.errors import ConfigError
from common.data import GroupSampler, Item
from tests.test_all_models import MODEL_NAMES
from tests.test_grpo import ENV, ROOT, fresh_accelerator_state, read_metrics  # noqa: F401 (autouse fixture)

PROMPTS = ["a red cube on a table", "a blue ball", "two green dogs playing in the park at noon", "x"]


def _items():
    return [Item(prompt=p, negative_prompt=n, images=[f"img{i}"], source=f"train.jsonl:{i + 1}")
            for i, (p, n) in enumerate(zip(PROMPTS, ["", "blurry", None, "bad"]))]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cached_rows_assemble_into_the_batch(name):
    a = models.load(name, tiny=True, condition_max_pixels=64 * 64)
    images = {f"img{i}": Image.new("RGB", (64, 64), (40 * i, 100, 50)) for i in range(4)}
    state = a.make_state(64, 64, 5 if a.video else 1)

    def encode_now(items, state):
        imgs = None if a.condition_images == "none" else [[images[p] for p in it.images] for it in items]
        return a.encode_prompt([it.prompt for it in items], [it.negative_prompt or "" for it in items], 32, imgs, state)

    items = _items()
    cache = conditioning.ConditionCache(encode_now, chunk=1)
    cache.fill(items, state)
    batch = [items[i] for i in (2, 0, 2, 3, 1, 1)]  # K copies of a few prompts, as a rollout batch holds
    want, got = encode_now(batch, state), cache.get(batch, state, "cpu")
    assert set(got) == set(want)
    for k, v in want.items():
        if not torch.is_tensor(v):
            assert got[k] == v, k
            continue
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        # bitwise, except SD3.5's pooled CLIP projections, which differ in the last bits between batch sizes
        tol = 1e-6 if name == "sd3_5" and "pooled" in k else 0.0
        assert (got[k].float() - v.float()).abs().max() <= tol, (k, (got[k].float() - v.float()).abs().max())


def test_encode_once_run_equals_encode_per_batch(tmp_path, script="grpo"):
    """Two epochs of tiny FLUX.1 (the benchmark setting's model), each way: every logged number is identical."""
    rows = {}
    for flag in ("--encode-once", "--no-encode-once"):
        out = tmp_path / flag
        r = subprocess.run([sys.executable, f"{script}.py", "--model", "flux1", "--tiny", flag, "--log-with", "none",
                            "--negative-prompt", "", "--output-dir", str(out)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rows[flag] = [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in read_metrics(out)]
        if flag == "--encode-once":  # the distinct train rows of the 2 epochs' plans + the 4 evaluation rows
            plans = GroupSampler(64, 4, 4, 1, 2, seed=42)
            n = len({i for e in (0, 1) for b, _ in plans.local_batches(e, 0) for i in b}) + 4
            assert f"encoded {n} prompts once" in r.stdout
    assert rows["--encode-once"] == rows["--no-encode-once"]
    assert "time/encode_s" in read_metrics(tmp_path / "--encode-once")[0]  # the startup cost, in the first record


def test_rows_seen_are_the_plans_rows():
    items = [Item(prompt=f"p{i}", source=f"t:{i}") for i in range(50)]
    gs = GroupSampler(len(items), 4, 4, 2, 2, seed=3)
    for rank in (0, 1):
        seen = {it.source for it in conditioning.rows_seen(gs, items, rank, range(2, 5))}
        want = {f"t:{i}" for e in range(2, 5) for b, _ in gs.local_batches(e, rank) for i in b}
        assert seen == want


def test_a_cache_too_big_for_host_memory_stops_in_one_line(monkeypatch):
    monkeypatch.setattr(conditioning, "_available_bytes", lambda: 10_000)  # 10 kB free
    cache = conditioning.ConditionCache(lambda items, state: {"e": torch.zeros(len(items), 100, 10)}, chunk=2)
    with pytest.raises(ConfigError, match="encoding the 6 prompts this process will see once needs .* --no-encode-once"):
        cache.fill([Item(prompt=str(i), source=f"t:{i}") for i in range(6)], {"height": 64, "width": 64})
    json.dumps(cache.summary(0.1))  # a plain one-line string


@pytest.mark.parametrize("flags", [("--ema-on-cpu",), ("--finetune", "full", "--kl-beta", "0.1", "--ref-device", "cpu")])
def test_cpu_memory_levers_change_no_number(flags, tmp_path):
    """The evaluation EMA on the CPU, the full fine-tuning reference copy on the CPU: the same run, number for number
    (on a CPU machine the moves are no-ops; this guards the plumbing: the EMA updates, swaps and checkpoints)."""
    base = [sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--log-with", "none"]
    extra = [f for f in flags if f not in ("--ema-on-cpu", "--ref-device", "cpu")]
    runs = []
    for argv in (extra, list(flags)):
        out = tmp_path / str(len(runs))
        r = subprocess.run(base + argv + ["--output-dir", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append([{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in read_metrics(out)])
    assert runs[0] == runs[1] and len(runs[0]) == 3


@pytest.mark.parametrize("name", ["flux1", "sd3_5", "wan2_i2v"])
def test_the_encoders_leave_the_accelerator(name, monkeypatch):
    """offload_encoders moves every text and image encoder (and only those) to the CPU: recorded moves, since a
    CPU machine has nothing to move from."""
    a = models.load(name, tiny=True)
    moved = []
    for comp_name, comp in a.pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            monkeypatch.setattr(comp, "to", lambda *args, _n=comp_name, **kw: moved.append((_n, args)) or None)
    a.offload_encoders()
    want = {n for n, c in a.pipe.components.items()
            if isinstance(c, torch.nn.Module) and n.startswith(("text_encoder", "image_encoder"))}
    assert {n for n, _ in moved} == want and all(args == ("cpu",) for _, args in moved) and len(want) >= 1
