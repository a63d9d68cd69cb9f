"""The wan2_t2v and wan2_i2v adapters against the stock diffusers pipelines (tiny random weights, no download):
one tiny build per distinct architecture (T2V 2.1, TI2V-5B, A14B; I2V 2.1, A14B, TI2V-5B)."""
import copy
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from PIL import Image

from common import models, sampler
from common.models.base import ModelError
from common.models.wan import ExpertPair, WanI2VAdapter, WanT2VAdapter

PROMPTS, NEG = ["a red cat on a mat", "a dog"], ["blurry", ""]
G2 = 3.0  # the low-noise expert's scale in the A14B tests, unlike guidance_scale
# one variant per distinct tiny architecture (the others share it: 1.3b/14b, 480p/720p)
ARCHS = [(WanT2VAdapter, "2.1-1.3b"), (WanT2VAdapter, "2.2-ti2v-5b"), (WanT2VAdapter, "2.2-a14b"),
         (WanI2VAdapter, "2.1-14b-480p"), (WanI2VAdapter, "2.2-a14b"), (WanI2VAdapter, "2.2-ti2v-5b")]
IDS = [f"{c.name}-{v}" for c, v in ARCHS]


def _image(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _load(cls, variant, **kw):
    if variant == "2.2-a14b":
        kw.setdefault("guidance_scale_2", G2)
    return cls.load(tiny=True, variant=variant, **kw)


@pytest.fixture(scope="module", params=ARCHS, ids=IDS)
def wan(request):
    return _load(*request.param)


def _inputs(a, n=2, frames=5, size=64, negative=NEG, images=None):
    state = a.make_state(size, size, frames)
    if a.condition_images == "one" and images is None:
        images = [[_image(0)]] * n  # the pipeline takes one image for its whole batch
    cond = a.encode_prompt(PROMPTS[:n], negative[:n] if negative else None, max_sequence_length=32, images=images,
                           state=state)
    return state, cond


def _euler_pipeline(a, sig):
    """The adapter's pipeline with a FlowMatchEuler scheduler (shift 1) on our sigma grid: its loop is then our
    ODE rollout (diffusers' own Wan tests use FlowMatchEuler)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    set_timesteps = sched.set_timesteps
    grid = sig[:-1].tolist()
    sched.set_timesteps = lambda n=None, device=None, **kw: set_timesteps(len(grid), device=device, sigmas=grid)
    comps = dict(a.pipe.components, scheduler=sched)
    return type(a.pipe)(**comps, boundary_ratio=a.pipe.config.boundary_ratio,
                        expand_timesteps=a.pipe.config.expand_timesteps)


class _Calls:
    """Counts forward calls (and rows) per expert."""

    def __init__(self, a):
        self.rows = {n: 0 for n in ("transformer", "transformer_2")}
        self.handles = [getattr(a.pipe, n).register_forward_hook(self._hook(n), with_kwargs=True)
                        for n in self.rows if getattr(a.pipe, n, None) is not None]
        self.calls = {n: 0 for n in self.rows}

    def _hook(self, name):
        def hook(module, args, kwargs, out):
            self.calls[name] += 1
            self.rows[name] += kwargs["hidden_states"].shape[0]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_every_variant_builds():
    for cls in (WanT2VAdapter, WanI2VAdapter):
        assert models.adapter_class(cls.name) is cls
        for variant, (arch, shift, boundary, multiple) in cls.specs.items():
            a = _load(cls, variant)
            assert list(cls.variants) == list(cls.specs) and a.variant == variant
            assert a.pipe.scheduler.config.flow_shift == shift and a.pipe.config.boundary_ratio == boundary
            assert a.two_experts == (arch == "a14b") and a.expand_timesteps == (arch == "5b")
            assert a.pipe.vae_scale_factor_spatial * 2 == multiple
            assert isinstance(a.transformer, ExpertPair) == a.two_experts
            assert a.trained_module() is (a.pipe_experts if a.two_experts else a.pipe.transformer)
    assert WanT2VAdapter.condition_images == "none" and WanI2VAdapter.condition_images == "one"
    assert next(iter(WanT2VAdapter.variants)) == "2.1-1.3b" and next(iter(WanI2VAdapter.variants)) == "2.1-14b-480p"


def test_sigmas_are_the_unipc_grid(wan):
    state = wan.make_state(64, 64, 5)
    shift = wan.pipe.scheduler.config.flow_shift
    for n in (2, 4, 10):
        sig = wan.sigmas(n, state)
        ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      num_train_timesteps=1000, flow_shift=shift)
        ref.set_timesteps(n)
        # the stock grid, but sigma_0 exactly 1: UniPC lowers it by 1e-6 for its own multistep update only
        assert float(ref.sigmas[0]) == np.float32(1 - 1e-6) and float(sig[0]) == 1.0
        torch.testing.assert_close(sig[1:], ref.sigmas[1:].float(), rtol=0, atol=0)
        s = np.linspace(1, 1 / 1000, n + 1)[:-1]  # independent formula
        want = np.append(shift * s / (1 + (shift - 1) * s), 0.0)
        np.testing.assert_allclose(sig.numpy(), want, rtol=0, atol=1e-7)
    if shift == 3.0:  # docs/models.md 3.9: S=3, N=4
        np.testing.assert_allclose(wan.sigmas(4, state).numpy(), [1, 0.900, 0.750, 0.501, 0], atol=1e-3)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_rollout_equals_pipeline(wan, guidance):
    a, steps = wan, 2  # 2 steps: sigma 1 (high-noise expert) then 0.75 / 0.83 (A14B: low-noise expert)
    state, cond = _inputs(a)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(2, 64, 64, torch.Generator().manual_seed(0), num_frames=5)
    calls = _Calls(a)
    try:
        traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, guidance), z, sig)
    finally:
        calls.remove()
    ours = a.decode(traj.final, state, cond)
    extra = {"image": _image(0)} if a.condition_images == "one" else {}
    if a.two_experts:
        extra["guidance_scale_2"] = G2
        assert calls.calls == {"transformer": 1, "transformer_2": 1}  # the switch happens inside the run
    ref = _euler_pipeline(a, sig)(
        prompt=PROMPTS, negative_prompt=NEG if guidance > 1 else None, height=64, width=64, num_frames=5,
        num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
        output_type="pt", max_sequence_length=32, **extra).frames
    assert ours.shape == (2, 5, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5


def test_latent_shapes_and_noise(wan):
    z = wan.prepare_noise(2, 64, 64, torch.Generator().manual_seed(0), num_frames=9)
    s, c = wan.pipe.vae_scale_factor_spatial, wan.pipe.vae.config.z_dim
    full = torch.randn((2, c, 3, 64 // s, 64 // s), generator=torch.Generator().manual_seed(0))
    # TI2V-5B image-to-video: latent frame 0 is the condition, not part of z
    want = full[:, :, 1:] if wan.condition_images == "one" and wan.expand_timesteps else full
    assert z.dtype == torch.float32 and torch.equal(z, want)


def test_i2v_encodes_each_image_once_and_needs_state_and_images():
    a = _load(WanI2VAdapter, "2.1-14b-480p")
    state = a.make_state(64, 64, 5)
    imgs = [[_image(0)], [_image(1)], [_image(0)]]
    cond = a.encode_prompt(["a", "b", "a"], images=imgs, state=state, max_sequence_length=16)
    assert cond["condition"].shape == (3, 20, 2, 8, 8) and cond["image_embeds"].shape[0] == 3
    assert torch.equal(cond["condition"][0], cond["condition"][2])
    assert not torch.equal(cond["condition"][0], cond["condition"][1])
    assert torch.equal(cond["neg_prompt_embeds"][0], cond["neg_prompt_embeds"][1])  # "" for every row
    with pytest.raises(ModelError, match="needs `state`"):
        a.encode_prompt(["a"], images=[[_image(0)]])
    with pytest.raises(ModelError, match="exactly one condition image"):
        a.encode_prompt(["a"], state=state)
    five = _load(WanI2VAdapter, "2.2-ti2v-5b")
    state5 = five.make_state(64, 64, 5)
    cond5 = five.encode_prompt(["a"], images=[[_image(0)]], state=state5)
    with pytest.raises(ModelError, match="decode needs `cond`"):
        five.decode(five.prepare_noise(1, 64, 64, num_frames=5), state5)
    assert five.decode(five.prepare_noise(1, 64, 64, num_frames=5), state5, cond5).shape == (1, 5, 3, 64, 64)


def _perturbed_lora(a):
    n = a.add_lora(4, 8)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the predictions
        for m in a.trained_components().values():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    return n


# the stock loader pads a LoRA without Wan2.1-I2V's image cross-attention targets (attn2.add_k_proj/add_v_proj)
# with zero LoRAs there (_maybe_expand_t2v_lora_for_i2v) and peft warns about the extra keys: harmless
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("cls,variant", ARCHS, ids=IDS)
def test_saved_lora_loads_into_the_stock_pipeline(cls, variant, tmp_path):
    trained = _load(cls, variant)
    experts = 2 if trained.two_experts else 1
    assert _perturbed_lora(trained) == 20 * experts  # docs/models.md 4: 20 per expert
    trained.save_lora(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "transformer_2/pytorch_lora_weights.safetensors").is_file() == trained.two_experts
    fresh = _load(cls, variant)
    state, cond = _inputs(fresh)
    z = fresh.prepare_noise(2, 64, 64, torch.Generator().manual_seed(3), num_frames=5)
    with torch.no_grad():
        for sigma in (0.95, 0.5):  # A14B: both experts
            before = fresh.predict(z, sigma, cond, state, 4.0)
            assert (trained.predict(z, sigma, cond, state, 4.0) - before).abs().max() > 1e-3
        fresh.pipe.load_lora_weights(str(tmp_path))  # the pipeline's own loaders, diffusers format
        if fresh.two_experts:
            fresh.pipe.load_lora_weights(str(tmp_path / "transformer_2"), load_into_transformer_2=True)
        for sigma in (0.95, 0.5):
            after, want = fresh.predict(z, sigma, cond, state, 4.0), trained.predict(z, sigma, cond, state, 4.0)
            assert (after - want).abs().max() < 1e-5
        with trained.lora_disabled():  # the reference policy: adapters off on every trained expert
            assert (trained.predict(z, 0.5, cond, state, 4.0) - before).abs().max() < 1e-6


@pytest.mark.parametrize("which", ["high", "low", "both"])
def test_train_experts_picks_the_trained_experts(which, tmp_path):
    a = _load(WanT2VAdapter, "2.2-a14b", train_experts=which)
    want = {"high": ["transformer"], "low": ["transformer_2"], "both": ["transformer", "transformer_2"]}[which]
    assert list(a.trained_components()) == want
    assert a.add_lora(4, 8) == 20 * len(want)
    for name in ("transformer", "transformer_2"):
        module = getattr(a.pipe, name)
        has_lora = any(hasattr(m, "lora_A") for m in module.modules())
        assert has_lora == (name in want) and any(p.requires_grad for p in module.parameters()) == (name in want)
    pair = a.trained_module()
    assert isinstance(pair, ExpertPair) and a.transformer is pair and list(pair.experts) == ["transformer",
                                                                                             "transformer_2"]
    assert [n for n, _ in pair.named_children()] == want  # only trained experts are registered
    trained_ids = {id(p) for n in want for p in getattr(a.pipe, n).parameters()}
    assert {id(p) for p in pair.parameters()} == trained_ids
    assert all(k.split(".")[0] in want for k in pair.state_dict())
    a.save_lora(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() == ("transformer" in want)
    assert (tmp_path / "transformer_2/pytorch_lora_weights.safetensors").is_file() == ("transformer_2" in want)
    ref = copy.deepcopy(pair)  # e.g. a reference model: the trained experts are copied, the frozen one shared
    for n in ("transformer", "transformer_2"):
        assert (ref.experts[n] is pair.experts[n]) == (n not in want)
    pair.to(torch.float64)  # .to() moves the frozen expert too: it runs on the same inputs
    assert all(m.dtype == torch.float64 for m in pair.experts.values())


def test_one_transformer_rejects_expert_options():
    with pytest.raises(ModelError, match="has one transformer; --train-experts applies to Wan2.2-A14B"):
        _load(WanT2VAdapter, "2.1-1.3b", train_experts="high")
    with pytest.raises(ModelError, match="has one transformer"):
        _load(WanI2VAdapter, "2.2-ti2v-5b", guidance_scale_2=2.0)
    with pytest.raises(ModelError, match="matches no module"):
        _load(WanT2VAdapter, "2.2-a14b").add_lora(4, 8, ["attn1.to_q", "attn2.add_k_proj"])


@pytest.mark.parametrize("cls", [WanT2VAdapter, WanI2VAdapter], ids=["t2v", "i2v"])
def test_expert_pair_routes_rows_in_one_forward(cls):
    a = _load(cls, "2.2-a14b")
    boundary = a.pipe.config.boundary_ratio
    _perturbed_lora(a)
    n = 4
    images = [[_image(0)], [_image(1)], [_image(0)], [_image(1)]]
    state = a.make_state(64, 64, 5)
    cond = a.encode_prompt(["a", "b", "a", "b"], ["blurry", None, None, "x"], max_sequence_length=16,
                           images=images if cls.condition_images == "one" else None, state=state)
    z = a.prepare_noise(n, 64, 64, torch.Generator().manual_seed(1), num_frames=5)
    sig = torch.tensor([0.95, 0.3, 0.99, boundary - 0.01])  # rows on both sides of the boundary
    calls = _Calls(a)
    v = a.predict(z, sig, cond, state, 5.0)
    assert calls.calls == {"transformer": 1, "transformer_2": 1}  # one call per expert, CFG batched
    assert calls.rows == {"transformer": 4, "transformer_2": 4}  # 2 rows each, x2 for [negative, positive]
    calls.remove()
    for i in range(n):
        row = a.predict(z[i:i + 1], float(sig[i]), a.select(cond, [i]), state, 5.0)
        assert (v[i:i + 1] - row).abs().max() < 1e-5
    # train_experts="both": the mixed batch's one backward reaches both experts' LoRA
    a.predict(z, sig, cond, state, 5.0).square().mean().backward()
    for name in ("transformer", "transformer_2"):
        lora = [p for p in getattr(a.pipe, name).parameters() if p.requires_grad]
        assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    # one expert for the whole batch: one call, no split
    calls = _Calls(a)
    a.predict(z, torch.tensor([0.95, 0.99, 0.97, 0.96]), cond, state, 1.0)
    assert calls.calls == {"transformer": 1, "transformer_2": 0} and calls.rows["transformer"] == 4
    calls.remove()
    # gradients reach exactly the trained expert (train_experts="high": transformer_2 is frozen)
    high = _load(cls, "2.2-a14b", train_experts="high")
    _perturbed_lora(high)  # B != 0, so every LoRA matrix gets a gradient
    high.trained_module().enable_gradient_checkpointing()
    trainable = [n for n, p in high.trained_module().named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n and n.startswith("transformer.") for n in trainable)
    high.predict(z, sig, cond, state, 5.0).square().mean().backward()
    grads = {name: [p.grad for p in getattr(high.pipe, name).parameters() if p.requires_grad]
             for name in ("transformer", "transformer_2")}
    assert grads["transformer"] and all(g is not None and g.abs().sum() > 0 for g in grads["transformer"])
    assert grads["transformer_2"] == []  # frozen: no trainable parameters, no gradients
    assert all(p.grad is None for p in high.pipe.transformer_2.parameters())


def test_check_size_and_expert_steps_without_loading(tmp_path):
    WanT2VAdapter.check_size(64, 64, 5, "2.1-1.3b")
    WanT2VAdapter.check_size(240, 416, 1, None)
    with pytest.raises(ModelError, match="num_frames must be 4k\\+1"):
        WanT2VAdapter.check_size(64, 64, 4, "2.1-1.3b")
    with pytest.raises(ModelError, match="multiples of 16"):
        WanT2VAdapter.check_size(72, 64, 5, "2.2-a14b")
    with pytest.raises(ModelError, match="multiples of 32"):
        WanT2VAdapter.check_size(240, 416, 5, "2.2-ti2v-5b")
    with pytest.raises(ModelError, match="at least 5"):
        WanI2VAdapter.check_size(64, 64, 1, "2.2-ti2v-5b")
    WanI2VAdapter.check_size(64, 64, 1, "2.1-14b-480p")
    with pytest.raises(ModelError, match="no variant"):
        WanT2VAdapter.check_size(64, 64, 5, "2.2-i2v")
    # docs/video.md: shift 3, boundary 0.875, 10 steps -> steps 0-3 high noise; I2V boundary 0.9, 8 steps -> 0-2
    assert WanT2VAdapter.expert_steps("2.2-a14b", 10) == {"transformer": [0, 1, 2, 3],
                                                          "transformer_2": [4, 5, 6, 7, 8, 9]}
    assert WanI2VAdapter.expert_steps("2.2-a14b", 8)["transformer"] == [0, 1, 2]
    assert WanT2VAdapter.expert_steps("2.2-a14b", 1) == {"transformer": [0], "transformer_2": []}
    assert WanT2VAdapter.expert_steps("2.1-14b", 4) == {"transformer": [0, 1, 2, 3]}
    assert WanT2VAdapter.expert_of_sigma("2.2-a14b", 0.875) == "transformer"
    assert WanT2VAdapter.expert_of_sigma("2.2-a14b", 0.8749) == "transformer_2"
    assert WanT2VAdapter.expert_of_sigma("2.2-ti2v-5b", 0.1) == "transformer"
    # the run-time routing agrees with expert_steps
    a = _load(WanT2VAdapter, "2.2-a14b")
    sig = a.sigmas(10, a.make_state(64, 64, 5))
    high = [i for i in range(10) if WanT2VAdapter.expert_of_sigma("2.2-a14b", float(sig[i])) == "transformer"]
    assert high == [0, 1, 2, 3]
    # a local folder's own scheduler and boundary win (the official A14B sampler's shift 12: steps 0-6 of 10)
    a.pipe.save_pretrained(tmp_path)
    cfg_path = tmp_path / "scheduler/scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, flow_shift=12.0)))
    assert WanT2VAdapter.expert_steps("2.2-a14b", 10, str(tmp_path))["transformer"] == [0, 1, 2, 3, 4, 5, 6]
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, boundary_ratio=0.95)))
    assert WanT2VAdapter.expert_steps("2.2-a14b", 10, str(tmp_path))["transformer"] == [0, 1, 2, 3]
    loaded = WanT2VAdapter.load(str(tmp_path), variant="2.2-a14b", train_experts="low")
    assert loaded.boundary == 0.95 and list(loaded.trained_components()) == ["transformer_2"]


def test_make_state_checks_the_loaded_pipeline(wan):
    multiple = 32 if wan.expand_timesteps else 16
    with pytest.raises(ModelError, match=f"multiples of {multiple}"):
        wan.make_state(64 + multiple // 2, 64, 5)
    with pytest.raises(ModelError, match="4k\\+1"):
        wan.make_state(64, 64, 6)
    assert wan.make_state(64, 64, 9)["latent_grid"] == (3, 64 // (multiple // 2), 64 // (multiple // 2))


def test_presets():
    for cls in (WanT2VAdapter, WanI2VAdapter):
        p = cls.preset
        cls.check_size(*p["resolution"], p["num_frames"], None)
        cls.check_size(*p["eval_resolution"], p["eval_num_frames"], None)
    assert WanI2VAdapter.preset["guidance_scale"] == 5.0


def test_ti2v_5b_checkpoint_loads_as_image_to_video(tmp_path):
    # Wan2.2-TI2V-5B is one WanPipeline checkpoint; wan2_i2v loads it with WanImageToVideoPipeline
    WanT2VAdapter.build_tiny("2.2-ti2v-5b").save_pretrained(tmp_path)
    a = WanI2VAdapter.load(str(tmp_path), variant="2.2-ti2v-5b")
    assert type(a.pipe).__name__ == "WanImageToVideoPipeline" and a.expand_timesteps
    state = a.make_state(64, 64, 5)
    cond = a.encode_prompt(["a cat"], images=[[_image(0)]], state=state)
    assert a.decode(a.prepare_noise(1, 64, 64, num_frames=5), state, cond).shape == (1, 5, 3, 64, 64)
