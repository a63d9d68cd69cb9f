"""The denoising loop never waits for the device (issue 20): after a rollout's first step, no step reads a tensor on
the host (.item(), bool(), int(), .tolist(), .cpu(), nonzero: each stalls the CPU until the GPU has drained its queue)
or builds a tensor from Python data or moves one onto the device (a copy, and a stall too, per step); for every tiny
model, with CFG, mixed condition layouts and Wan2.2-A14B's switch of experts. And the rollouts compute what the code
before the change computed: samples and log-probabilities against stored fingerprints.

On a CPU every tensor lives on the host, so the test watches the operations themselves: torch's dispatch for the
syncing and data-building ops, its function layer for host reads and explicit device moves. Each is traced to the
line of this repository that caused it; what diffusers' transformers do inside their forward is listed apart
(INSIDE_MODELS: the reason each is not ours to remove).

`python tests/test_host_sync.py` re-records the fingerprints: only on code known to compute the right numbers."""
import collections
import importlib.util
import json
import math
import os
import sys
import traceback

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script (re-recording)
    sys.path.insert(0, ROOT)

from common import models, sampler  # noqa: E402

REFERENCE = os.path.join(ROOT, "tests", "host_sync_reference.json")
_spec = importlib.util.spec_from_file_location("equal_runs", os.path.join(ROOT, "bench", "equal_runs.py"))
equal_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(equal_runs)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


WIDE, TALL, SQUARE = _image(128, 64, 0), _image(64, 112, 1), _image(64, 64, 2)
PROMPTS = ["a red cube on a wooden table", "a cat", "a red cube on a wooden table"]  # prompts of two lengths
NEGS = ["blurry", "low quality, watermark, extra fingers", "blurry"]
MIXED = [[WIDE], [TALL, SQUARE], [WIDE]]  # two condition layouts, one repeated
EDIT = dict(condition_max_pixels=64 * 64)
# name -> (model, load options, guidance_scale, true_cfg_scale, condition images per row, adapter attributes)
CASES = {
    "flux1": ("flux1", {}, 3.5, 2.0, None, {}),
    "flux1-kontext": ("flux1-kontext", EDIT, 2.5, 2.0, [[WIDE], [TALL], [WIDE]], {}),
    "sd3_5": ("sd3_5", {}, 4.5, 1.0, None, {}),
    "sd3_5:large": ("sd3_5", dict(variant="large"), 4.5, 1.0, None, {}),
    "z-image": ("z-image", {}, 0.0, 1.0, None, {}),
    # CFG cut off where the model time 1 - sigma passes 0.5: guided steps, then positive-only ones
    "z-image:base": ("z-image", dict(variant="base"), 4.0, 1.0, None, dict(cfg_truncation=0.5, cfg_normalization=1.0)),
    "qwen-image": ("qwen-image", {}, 1.0, 4.0, None, {}),
    "qwen-image-edit-plus": ("qwen-image-edit-plus", EDIT, 1.0, 4.0, MIXED, dict(vl_image_pixels=56 * 56)),
    "qwen-image-edit-plus:2509": ("qwen-image-edit-plus", dict(EDIT, variant="2509"), 1.0, 4.0, MIXED,
                                  dict(vl_image_pixels=56 * 56)),
    "flux2": ("flux2", EDIT, 4.0, 1.0, [[WIDE], [], [WIDE]], {}),
    "flux2-klein": ("flux2-klein", {}, 1.0, 1.0, None, {}),
    "flux2-klein:base-4b": ("flux2-klein", dict(EDIT, variant="base-4b"), 4.0, 1.0, MIXED, {}),
    "wan2_t2v": ("wan2_t2v", {}, 5.0, 1.0, None, {}),
    "wan2_t2v:2.2-ti2v-5b": ("wan2_t2v", dict(variant="2.2-ti2v-5b"), 5.0, 1.0, None, {}),
    # the 4-step schedule crosses the boundary: steps 0-1 on the high-noise expert, 2-3 on the low-noise one
    "wan2_t2v:2.2-a14b": ("wan2_t2v", dict(variant="2.2-a14b", guidance_scale_2=3.0), 5.0, 1.0, None, {}),
    "wan2_i2v": ("wan2_i2v", {}, 5.0, 1.0, [[SQUARE], [WIDE], [SQUARE]], {}),
    "wan2_i2v:2.2-ti2v-5b": ("wan2_i2v", dict(variant="2.2-ti2v-5b"), 5.0, 1.0, [[SQUARE], [WIDE], [SQUARE]], {}),
    "wan2_i2v:2.2-a14b": ("wan2_i2v", dict(variant="2.2-a14b", guidance_scale_2=3.0), 5.0, 1.0,
                          [[SQUARE], [WIDE], [SQUARE]], {}),
}
# dynamics -> (SDE window, noise level): Flow-SDE from sigma 1 (its edge case); CPS up to its noiseless last step
DYNAMICS = {"Flow-SDE": ([0, 1, 2], 0.7), "CPS": ([2, 3], 0.8)}
STEPS, SIZE, TEXT_TOKENS = 4, 64, 256  # Qwen-Image's prompts differ in length below 256 tokens

# ops that wait for the device (a value read on the host, or an output size that depends on values) ...
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal",
            "is_nonzero"}
# ... and ops that build a tensor from Python data (on a GPU: a host-to-device copy)
DATA_OPS = {"lift_fresh", "lift_fresh_copy", "scalar_tensor"}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.cuda}
# what diffusers' (0.42.1) transformers do in their forward that an adapter cannot avoid: (file, function) -> what
INSIDE_MODELS = {
    ("transformer_qwenimage.py", "forward"): "Qwen-Image-Edit-2511 (zero_cond_t): modulate_index = torch.tensor(a "
                                             "list from img_shapes, device=...), a copy from the host and a wait",
    ("transformer_qwenimage.py", "compute_text_seq_len_from_mask"): "with a text mask (prompts of different lengths): "
                                                                    "torch.as_tensor(int, device=...), the same",
    ("attention_dispatch.py", "_native_attention"): "SDPA makes a boolean mask additive with scalar fills on the "
                                                    "device: no copy, no wait",
    ("transformer_z_image.py", "_prepare_sequence"): "captions of different lengths: attn_mask[i, :n] = 1, a fill on "
                                                     "the device: no copy, no wait",
    ("transformer_z_image.py", "_build_unified_sequence"): "the same",
}


def _moves_to_device(func, args, kwargs):
    """An explicit `.to(device)` / `.to(device=...)`: a copy per step when the tensor comes from the host."""
    return func is torch.Tensor.to and ("device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:]))


class Watch(TorchDispatchMode):
    """Counts, once `armed`, the syncing and data-building ops (dispatch level) and the host reads and device moves
    (function level, `Functions`) by the line of this repository that caused them, or apart, by the function of a
    model's forward they happen in."""

    def __init__(self):
        super().__init__()
        self.armed, self.ours, self.models = False, collections.Counter(), collections.Counter()

    def record(self, what, ours_only=False):
        """ours_only: not counted inside a model (a model's `.to(its device)` of its own tensors moves nothing)."""
        if not self.armed:
            return
        stack = [f for f in traceback.extract_stack() if f.filename != __file__]
        i = max(i for i, f in enumerate(stack) if f.filename.startswith(ROOT) and "/.venv/" not in f.filename)
        inside = [f for f in stack[i + 1:] if "/torch/" not in f.filename]
        if inside and stack[i + 1].filename.endswith("torch/nn/modules/module.py"):  # inside a model's forward
            if not ours_only:
                self.models[(os.path.basename(inside[-1].filename), inside[-1].name, what)] += 1
        else:  # this repository's line (or a library helper it calls per step)
            self.ours[f"{what} at {os.path.relpath(stack[i].filename, ROOT)}:{stack[i].lineno}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS or name in DATA_OPS:
            self.record(name)
        return func(*args, **(kwargs or {}))


class Functions(TorchFunctionMode):
    def __init__(self, watch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS or _moves_to_device(func, args, kwargs):
            self.watch.record(f"Tensor.{func.__name__}", ours_only=func is torch.Tensor.to)
        return func(*args, **kwargs)


_ADAPTERS = {}


def _setup(name):
    """(adapter, cond, state, sigmas, noise) of a case; the adapter is built once per case."""
    model, options, g, cfg, images, attrs = CASES[name]
    if name not in _ADAPTERS:
        a = models.load(model, tiny=True, **options)
        for k, v in attrs.items():
            setattr(a, k, v)
        _ADAPTERS[name] = a
    a = _ADAPTERS[name]
    frames = 5 if a.video else 1
    state = a.make_state(SIZE, SIZE, frames)
    cond = a.encode_prompt(PROMPTS, NEGS, TEXT_TOKENS, images, state)
    z = a.prepare_noise(len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(0), frames)
    return a, cond, state, a.sigmas(STEPS, state), z


def rollout(name, dynamics, watch=None):
    """The case's rollout (the loop of common.run.Run.rollout: sigmas and cond on the device); `watch` is armed from
    the second step on (the first may read what the loop then keeps)."""
    a, cond, state, sigmas, z = _setup(name)
    _, _, g, cfg, _, _ = CASES[name]
    window, eta = DYNAMICS[dynamics]

    def predict(x, i):
        if watch is not None:
            watch.armed = i > 0
        return a.predict(x, sigmas[i], cond, state, g, cfg)
    return sampler.rollout(predict, z, sigmas, window, eta, dynamics, generator=torch.Generator().manual_seed(1))


def fingerprints(traj) -> dict:
    """float64 sum, absolute sum and first values of the final latents and of each step's log-probabilities."""
    def fp(t):
        t = t.detach().double().flatten()
        return [t.sum().item(), t.abs().sum().item(), *t[:4].tolist()]
    return {"final": fp(traj.final), "log_probs": {str(i): fp(lp) for i, lp in sorted(traj.log_probs.items())}}


@pytest.mark.parametrize("name", list(CASES))
def test_denoising_loop_never_waits_for_the_device(name):
    for dynamics in DYNAMICS:
        watch = Watch()
        with Functions(watch), watch:
            rollout(name, dynamics, watch)
        assert not watch.ours, f"{name} {dynamics}: " + ", ".join(f"{k} ({n}x)" for k, n in watch.ours.items())
        unknown = {k: n for k, n in watch.models.items() if k[:2] not in INSIDE_MODELS}
        assert not unknown, f"{name} {dynamics}: inside the model: {unknown}"


@pytest.fixture(scope="module")
def stored():
    with open(REFERENCE) as f:
        stored = json.load(f)
    here = equal_runs.environment()
    if here != stored["environment"]:
        pytest.skip(f"fingerprints recorded on {stored['environment']}, this machine is {here}")
    return stored["rollouts"]


@pytest.mark.parametrize("name", list(CASES))
def test_rollouts_compute_the_stored_numbers(name, stored):
    for dynamics in DYNAMICS:
        want, got = stored[f"{name} {dynamics}"], fingerprints(rollout(name, dynamics))
        assert got["log_probs"].keys() == want["log_probs"].keys(), (name, dynamics)
        pairs = [("final", got["final"], want["final"])] + [
            (f"log_prob {i}", got["log_probs"][i], want["log_probs"][i]) for i in want["log_probs"]]
        for what, g, w in pairs:
            assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(g, w)), (name, dynamics, what,
                                                                                              g, w)


if __name__ == "__main__":
    out = {"environment": equal_runs.environment(),
           "rollouts": {f"{n} {d}": fingerprints(rollout(n, d)) for n in CASES for d in DYNAMICS}}
    with open(REFERENCE, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(out['rollouts'])} rollouts recorded in {REFERENCE}")
