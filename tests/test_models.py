"""The flux1 adapter against the stock diffusers FluxPipeline (tiny random weights, no download)."""
import pytest
import torch

from common import models, sampler
from common.models.base import ModelError

PROMPTS, NEG = ["a red cat on a mat", "a dog"], ["", "blurry"]


@pytest.fixture(scope="module")
def flux():
    return models.load("flux1", tiny=True)


def _adapter_rollout(a, true_cfg, steps=4, size=64):
    state = a.make_state(size, size)
    cond = a.encode_prompt(PROMPTS, NEG if true_cfg > 1 else None, max_sequence_length=32)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(PROMPTS), size, size, torch.Generator().manual_seed(0))
    traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, 3.5, true_cfg), z, sig)
    return a.decode(traj.final, state), sig


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_ode_rollout_equals_pipeline(flux, true_cfg):
    ours, sig = _adapter_rollout(flux, true_cfg)
    kw = dict(negative_prompt=NEG, true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    ref = flux.pipe(prompt=PROMPTS, height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=32,
                    **kw).images
    assert ours.shape == (2, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5
    # the schedule is the pipeline scheduler's own (decision 1)
    torch.testing.assert_close(sig, flux.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)


def test_non_multiple_resolution_is_an_error(flux):
    with pytest.raises(ValueError, match="multiples of 16"):
        flux.make_state(72, 64)


def test_lora_targets_checked():
    a = models.load("flux1", tiny=True)
    assert a.add_lora(4, 8) == 15  # 1 double + 1 single block (docs/models.md section 4)
    b = models.load("flux1", tiny=True)
    with pytest.raises(ModelError, match="matches no module"):
        b.add_lora(4, 8, ["attn.to_q", "attn.not_a_layer"])


def test_unknown_model_and_bad_path():
    with pytest.raises(ModelError, match="unknown model 'sdxl'"):
        models.load("sdxl")
    with pytest.raises(ModelError, match="not a folder"):
        models.load("flux1", path="/nonexistent/flux")


def test_hub_ids_reach_from_pretrained_and_missing_folders_are_one_line(monkeypatch):
    from common.models.base import is_local_path
    assert not is_local_path("black-forest-labs/FLUX.1-dev") and not is_local_path("Qwen/Qwen-Image")
    assert all(is_local_path(p) for p in ("/data/flux", "./flux", "../flux", "~/flux", "runs/a/b", "flux"))
    seen = []

    def from_pretrained(path, **kw):  # stands in for the download: record what the loader asked for
        seen.append(path)
        raise OSError("offline")

    cls = models.adapter_class("flux1")
    monkeypatch.setattr(cls.pipeline_cls, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError, match="cannot load flux1 from 'black-forest-labs/FLUX.1-dev': offline"):
        models.load("flux1")
    assert seen == ["black-forest-labs/FLUX.1-dev"]
    with pytest.raises(ModelError, match="--model-path /no/such/folder is not a folder"):
        models.load("flux1", "/no/such/folder")
