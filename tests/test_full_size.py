"""Full-size readiness (issue 13), on the meta device (no weights, no download): every model's published parameter
counts, its default LoRA targets at full depth, the latent and token shapes at its preset size, the memory plan
(`--plan`). bench/gpu.py's own tests: tests/test_gpu_bench.py."""
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import grpo
from common import models, plan
from common.cli import parse_with_presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [(m, v) for m in models.MODELS if m != "shapes"  # shapes is FLUX.1's architecture at 2.3M parameters
            for v in (models.adapter_class(m).variants or [None])]


@functools.lru_cache(maxsize=None)
def meta_adapter(model, variant):
    """The adapter over the full-size pipeline on the meta device (built once per variant)."""
    return plan.full_adapter(model, variant)


def checkpoint_count(module):
    """What a published count counts: the tensors of the checkpoint (parameters + persistent buffers)."""
    return plan.tensor_count(module, persistent_only=True)


# ---- parameter counts -----------------------------------------------------------------------------------------------
# (model, variant) -> (figure compared within 1%, where the figure comes from). Figures are the list (issue 13,
# from the model cards / Hub pages; not re-checked here: no network). Where a model's published figure is only its
# rounded name, the figure is an explicit count with the reason beside it, and NAME_FIGURES checks the rounding.
B = 1e9
WAN_14B = 14_288_491_584  # explicit: the "14B" of the name is 2% below the count of the conversion-script config
TRANSFORMERS = {
    ("flux1", None): (11.9 * B, "FLUX.1-dev, 11.9B (Hub count; the card rounds to 12B)"),
    ("flux1-kontext", None): (11.9 * B, "FLUX.1-Kontext-dev: FLUX.1-dev's transformer"),
    # SD3.5 checkpoints store the transformer's 2-D sincos position table (a persistent buffer, pos_embed_max_size^2
    # x width): 0.09B of large's 8.15B, 0.23B of medium's 2.47B; the published figures count it
    ("sd3_5", "large"): (8.1 * B, "SD3.5-Large, 8.1B"),
    # explicit: "2.5B" is a two-digit rounding of 2.47B (1.2% away); test_sd35_medium_counts_its_position_table
    # derives 2.47B = parameters + the 384 x 384 x 1536 table
    ("sd3_5", "medium"): (2_469_663_936, "SD3.5-Medium, published 2.5B (rounded)"),
    ("z-image", "turbo"): (6.15 * B, "Z-Image, 6.15B (the card's '6B')"),
    ("z-image", "base"): (6.15 * B, "Z-Image base: Turbo's architecture"),
    ("qwen-image", "2512"): (20.4 * B, "Qwen-Image, 20.4B (the card's '20B MMDiT')"),
    ("qwen-image", "original"): (20.4 * B, "Qwen-Image, 20.4B"),
    ("qwen-image-edit-plus", "2511"): (20.4 * B, "Qwen-Image-Edit: Qwen-Image's transformer (zero_cond_t adds none)"),
    ("qwen-image-edit-plus", "2509"): (20.4 * B, "Qwen-Image-Edit: Qwen-Image's transformer"),
    # explicit: QwenImage21Transformer2DModel's defaults (docs/models.md 3.11), named 7B; derived by hand in
    # tests/test_model_qwen_image21.py::test_full_size_architecture
    ("qwen-image-2.1", None): (7_115_124_736, "Qwen-Image-2.1, named 7B (the 32 x 4096 single-stream DiT)"),
    ("flux2", None): (32 * B, "FLUX.2-dev, ~32B (card)"),
    # explicit: the "4B" of the name is 3.1% above the count of the docs/models.md 3.8 config (5 double + 20 single
    # blocks of 3072); no exact published count on disk. 9B: the name is within 1% (9.08B)
    ("flux2-klein", "4b"): (3_875_544_576, "FLUX.2-klein-4B, named 4B (rounded; exact count not published here)"),
    ("flux2-klein", "base-4b"): (3_875_544_576, "FLUX.2-klein-base-4B: 4B's architecture"),
    ("flux2-klein", "9b"): (9 * B, "FLUX.2-klein-9B, named 9B"),
    ("flux2-klein", "base-9b"): (9 * B, "FLUX.2-klein-base-9B: 9B's architecture"),
    # the name "1.3B" counts roughly the 30 blocks (1.39B); with the embeddings and head the diffusers model has 1.42B
    ("wan2_t2v", "2.1-1.3b"): (1.42 * B, "Wan2.1-T2V-1.3B, ~1.42B with embeddings (issue 13)"),
    ("wan2_t2v", "2.1-14b"): (WAN_14B, "Wan2.1-T2V-14B, named 14B"),
    ("wan2_t2v", "2.2-ti2v-5b"): (5 * B, "Wan2.2-TI2V-5B, 5B"),
    ("wan2_t2v", "2.2-a14b"): (WAN_14B, "Wan2.2-T2V-A14B: each expert Wan2.1-14B's architecture"),
    # explicit: image-to-video adds the image cross-attention (test_wan_i2v_counts_from_the_t2v_backbone derives it)
    ("wan2_i2v", "2.1-14b-480p"): (16_394_878_784, "Wan2.1-I2V-14B: the 14B backbone + image branch"),
    ("wan2_i2v", "2.1-14b-720p"): (16_394_878_784, "Wan2.1-I2V-14B-720P: 480P's architecture"),
    ("wan2_i2v", "2.2-a14b"): (WAN_14B + 20 * 4 * 5120, "Wan2.2-I2V-A14B: 14B experts with 36 input channels"),
    ("wan2_i2v", "2.2-ti2v-5b"): (5 * B, "Wan2.2-TI2V-5B"),
    # explicit: the count of the conversion-script config, which the name "19B" rounds (test_model_ltx2.py)
    ("ltx2", "2.0"): (18_876_174_592, "LTX-2: the 19B audio-video transformer"),
    ("ltx2_i2v", "2.0"): (18_876_174_592, "LTX-2 image-to-video: the same transformer"),
    # LTX-2.3: the name's 22B counts its per-modality text connectors (3.17B) too
    ("ltx2", "2.3"): (18_988_838_144, "LTX-2.3: the transformer with gated attention and prompt modulation"),
    ("ltx2_i2v", "2.3"): (18_988_838_144, "LTX-2.3 image-to-video: the same transformer"),
}
# rounded names: (figure, significant digits as written); the count must round to it ("4B": 3.5-4.5B)
NAME_FIGURES = {("sd3_5", "medium"): (2.5 * B, 2), ("flux2-klein", "4b"): (4 * B, 1),
                ("wan2_t2v", "2.1-14b"): (14 * B, 2), ("wan2_t2v", "2.2-a14b"): (14 * B, 2),
                ("wan2_i2v", "2.2-a14b"): (14 * B, 2), ("ltx2", "2.0"): (19 * B, 2),
                ("ltx2_i2v", "2.0"): (19 * B, 2), ("qwen-image-2.1", None): (7 * B, 1)}
# text / image encoders: (component, figure, source); the same published checkpoints reappear across models
T5_XXL = ("T5-XXL encoder", 4.76 * B)
UMT5_XXL = ("UMT5-XXL encoder", 5.68 * B)  # "~5.7B"; 5.68B is the encoder of google/umt5-xxl (the figure used)
QWEN25_VL = ("Qwen2.5-VL-7B incl. vision", 8.29 * B)  # "8.3B" (Hub: 8.29B)
# OpenCLIP's table [recalled]; FLUX.1's CLIPTextModel lacks the 0.59M projection (123.06M, 0.5% off)
CLIP_L = ("CLIP ViT-L/14 text", 123.65e6)
CLIP_G = ("OpenCLIP ViT-bigG/14 text", 694.66e6)  # OpenCLIP's table [recalled]
QWEN3_VL_8B = ("Qwen3-VL-8B incl. vision", 8.77 * B)  # Hub: 8.77B [recalled]
QWEN3_4B, QWEN3_8B = ("Qwen3-4B", 4.0 * B), ("Qwen3-8B", 8.2 * B)  # model cards: 4.0B, 8.2B
MISTRAL = ("Mistral-Small-3.1-24B", 24.0 * B)  # model card: 24B
CLIP_H = ("CLIP ViT-H/14 vision", 632.08e6)  # OpenCLIP's table [recalled] (incl. its 1.3M projection)
GEMMA3_12B = ("Gemma-3-12B incl. vision", 12.2 * B)  # model card: 12B; the Hub count 12.2B [recalled]
ENCODERS = {
    "flux1": {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "flux1-kontext": {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "sd3_5": {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL},
    "z-image": {"text_encoder": QWEN3_4B},
    "qwen-image": {"text_encoder": QWEN25_VL},
    "qwen-image-edit-plus": {"text_encoder": QWEN25_VL},
    "qwen-image-2.1": {"text_encoder": QWEN3_VL_8B},
    "flux2": {"text_encoder": MISTRAL},
    "flux2-klein": {"text_encoder": QWEN3_4B},  # 9B: Qwen3-8B (below)
    "wan2_t2v": {"text_encoder": UMT5_XXL},
    "wan2_i2v": {"text_encoder": UMT5_XXL, "image_encoder": CLIP_H},
    "ltx2": {"text_encoder": GEMMA3_12B}, "ltx2_i2v": {"text_encoder": GEMMA3_12B},
}


def within(count, figure, tol=0.01):
    return abs(count - figure) <= tol * figure


@pytest.mark.parametrize("model,variant", VARIANTS)
def test_transformer_matches_its_published_size(model, variant):
    figure, source = TRANSFORMERS[(model, variant)]
    pipe = meta_adapter(model, variant).pipe
    for comp in ("transformer", "transformer_2"):
        net = getattr(pipe, comp, None)
        if net is None:
            continue
        n = checkpoint_count(net)
        assert within(n, figure), f"{model} {variant} {comp}: {n:,} vs {figure:,.0f} ({source})"
        if (model, variant) in NAME_FIGURES:
            name, sig = NAME_FIGURES[(model, variant)]
            digits = sig - int(math.floor(math.log10(name))) - 1
            assert round(n, digits) == round(name, digits), f"{n:,} does not round to the name's {name:,.0f}"
    assert (getattr(pipe, "transformer_2", None) is not None) == (variant == "2.2-a14b")  # two experts


@pytest.mark.parametrize("model,variant", VARIANTS)
def test_encoders_match_their_published_sizes(model, variant):
    pipe = meta_adapter(model, variant).pipe
    expected = dict(ENCODERS[model])
    if variant in ("9b", "base-9b"):
        expected["text_encoder"] = QWEN3_8B
    if model == "wan2_i2v" and not variant.startswith("2.1"):
        expected.pop("image_encoder")  # only Wan2.1 I2V cross-attends to CLIP image tokens
    have = {c for c, m in pipe.components.items() if c.startswith(("text_encoder", "image_encoder")) and m is not None}
    assert have == set(expected)
    for comp, (what, figure) in expected.items():
        n = checkpoint_count(getattr(pipe, comp))
        assert within(n, figure), f"{model} {variant} {comp} ({what}): {n:,} vs {figure:,.0f}"


def test_sd35_medium_counts_its_position_table():
    net = meta_adapter("sd3_5", "medium").pipe.transformer
    params = plan.tensor_count(net, buffers=False)
    assert checkpoint_count(net) - params == 384 * 384 * 1536  # pos_embed_max_size^2 x hidden, stored as a buffer
    assert round(checkpoint_count(net) / B, 1) == 2.5


def test_wan_i2v_counts_from_the_t2v_backbone():
    """The explicit I2V figure, derived by hand from the 14B text-to-video count: per block an image key/value
    projection (5120 -> 5120, bias) and its key norm; the CLIP image embedder (LayerNorm 1280, 1280 -> 1280 -> 5120,
    LayerNorm 5120); 20 more input channels of the (1, 2, 2) patch embedding."""
    t2v = checkpoint_count(meta_adapter("wan2_t2v", "2.1-14b").pipe.transformer)
    d, e = 5120, 1280
    blocks = 40 * (2 * (d * d + d) + d)
    embedder = 2 * e + (e * e + e) + (e * d + d) + 2 * d
    patch = 20 * 4 * d
    assert t2v == WAN_14B
    i2v = checkpoint_count(meta_adapter("wan2_i2v", "2.1-14b-480p").pipe.transformer)
    assert i2v == t2v + blocks + embedder + patch


# ---- LoRA targets at full depth -------------------------------------------------------------------------------------
# modules per block x blocks, counted from the architectures (docs/models.md 4), not from the matching code
LORA = {
    # 19 double blocks: q, k, v, out, add_q, add_k, add_v, add_out, 2 x 2 FFN layers; 38 single blocks: q, k, v
    "flux1": 19 * 12 + 38 * 3, "flux1-kontext": 19 * 12 + 38 * 3,
    # joint attention (8 each); the last block is context_pre_only: no to_add_out
    ("sd3_5", "medium"): 24 * 8 - 1, ("sd3_5", "large"): 38 * 8 - 1,
    # 30 main + 2 noise-refiner + 2 context-refiner blocks: q, k, v, out, w1, w2, w3
    "z-image": (30 + 2 + 2) * 7,
    # 60 blocks: 8 attention projections + 2 x 2 MLP layers
    "qwen-image": 60 * 12, "qwen-image-edit-plus": 60 * 12,
    # 32 single-stream blocks: q, k, v, out and the SwiGLU's proj, gate_layer, out
    "qwen-image-2.1": 32 * 7,
    # double blocks: 8 attention + linear_in/out of ff and ff_context; single blocks: to_qkv_mlp_proj, to_out
    "flux2": 8 * 12 + 48 * 2, ("flux2-klein", "4b"): 5 * 12 + 20 * 2, ("flux2-klein", "base-4b"): 5 * 12 + 20 * 2,
    ("flux2-klein", "9b"): 8 * 12 + 24 * 2, ("flux2-klein", "base-9b"): 8 * 12 + 24 * 2,
    # per block: self-attention q, k, v, out; cross-attention q, k, v, out; the FFN's 2 layers (per expert)
    ("wan2_t2v", "2.1-1.3b"): 30 * 10, ("wan2_t2v", "2.2-ti2v-5b"): 30 * 10, ("wan2_i2v", "2.2-ti2v-5b"): 30 * 10,
    "wan2_t2v": 40 * 10, "wan2_i2v": 40 * 10,
    # q, k, v, out of six attentions (video/audio self, video/audio text, audio->video, video->audio) + 2 x 2 FFN layers
    "ltx2": 48 * 28, "ltx2_i2v": 48 * 28,
}


def matched(net, targets):
    """Adapter.add_lora's rule, written out: suffixes (n == t or n.endswith("." + t)) or one full-name regex."""
    import re
    if isinstance(targets, str):
        return [n for n, _ in net.named_modules() if re.fullmatch(targets, n)]
    return [n for n, _ in net.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


@pytest.mark.parametrize("model,variant", VARIANTS)
def test_default_lora_targets_at_full_depth(model, variant):
    ad = meta_adapter(model, variant)
    expected = LORA.get((model, variant), LORA.get(model))
    targets = ad.default_target_modules
    for comp, net in ad.trained_components().items():  # Wan2.2-A14B: both experts (--train-experts both)
        names = matched(net, targets)
        assert len(names) == expected, f"{model} {variant} {comp}: {len(names)} modules, expected {expected}"
        assert [n for n, _ in plan.lora_modules(net, targets)] == names  # the plan counts the same modules
        mods = dict(net.named_modules())
        assert all(isinstance(mods[n], torch.nn.Linear) for n in names)
        if not isinstance(targets, str):  # every target matches (add_lora refuses an unmatched one)
            assert all(any(n == t or n.endswith("." + t) for n in names) for t in targets)
    assert len(ad.trained_components()) == (2 if variant == "2.2-a14b" else 1)


@pytest.mark.parametrize("model", ["flux1", "flux2"])  # a suffix list and a regex
def test_plan_matches_add_lora_on_the_tiny_build(model):
    ad = models.load(model, tiny=True)
    targets = ad.default_target_modules
    assert ad.add_lora(4, 8) == len(plan.lora_modules(models.load(model, tiny=True).transformer, targets))


# ---- latent and token shapes at the preset size ---------------------------------------------------------------------
def preset_size(model, variant):
    a = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", model] +
                           (["--variant", variant] if variant else []))
    h, w = a.resolution[0], a.resolution[-1]
    if variant == "2.2-ti2v-5b":  # the Wan preset is the default variant's; TI2V-5B needs multiples of 32 (wan.py)
        h, w = 256, 416
    return h, w, a.num_frames


# (model, variant) -> (the size, the stored latent of one sample, transformer tokens), computed from the VAE factors
# (x8, or x16 for FLUX.2's patchified and Wan2.2's VAE), 2x2 packing / patching and Wan's 1 + (F - 1) / 4 frames
SHAPES = {
    "flux1": ((512, 512, 1), (32 * 32, 64), 1024), "flux1-kontext": ((384, 384, 1), (24 * 24, 64), 576),
    "sd3_5": ((512, 512, 1), (16, 64, 64), 1024), "z-image": ((512, 512, 1), (16, 64, 64), 1024),
    "qwen-image": ((512, 512, 1), (1024, 64), 1024), "qwen-image-edit-plus": ((384, 384, 1), (576, 64), 576),
    "qwen-image-2.1": ((512, 512, 1), (1024, 64), 1024),  # x16 VAE, 64 channels, not packed
    "flux2": ((512, 512, 1), (1024, 128), 1024), "flux2-klein": ((384, 384, 1), (576, 128), 576),
    "wan2_t2v": ((240, 416, 5), (16, 2, 30, 52), 2 * 15 * 26), "wan2_i2v": ((240, 416, 5), (16, 2, 30, 52), 780),
    ("wan2_t2v", "2.2-ti2v-5b"): ((256, 416, 5), (48, 2, 16, 26), 2 * 8 * 13),
    # TI2V-5B image-to-video: latent frame 0 is the condition image, not part of the stored latents (wan.py)
    ("wan2_i2v", "2.2-ti2v-5b"): ((256, 416, 5), (48, 1, 16, 26), 2 * 8 * 13),
}


def pipeline_latents(ad, h, w, frames):
    """(latent shape, token count) as the pipeline's own prepare_latents builds them (text-to-X pipelines; the edit
    and image-to-video pipelines draw the same noise)."""
    from diffusers import FluxPipeline, QwenImagePipeline, WanPipeline
    pipe, cfg, meta = ad.pipe, ad.config, torch.device("meta")
    if ad.name.startswith("flux1"):
        z, ids = FluxPipeline.prepare_latents(pipe, 1, cfg.in_channels // 4, h, w, torch.float32, meta, None)
        return z.shape[1:], ids.shape[0]
    if ad.name == "qwen-image-2.1":  # 64 channels at H/16 x W/16, flattened (no 2x2 packing)
        z = pipe.prepare_latents(None, 1, cfg.in_channels, h, w, torch.float32, meta, None)[0]
        return z.shape[1:], z.shape[1]
    if ad.name.startswith("qwen"):
        z = QwenImagePipeline.prepare_latents(pipe, 1, cfg.in_channels // 4, h, w, torch.float32, meta, None)
        return z.shape[1:], z.shape[1]
    if ad.name.startswith("flux2"):
        z, ids = pipe.prepare_latents(1, cfg.in_channels // 4, h, w, torch.float32, meta, None)
        return z.shape[1:], ids.shape[1]
    if ad.name.startswith("wan"):
        z = WanPipeline.prepare_latents(pipe, 1, pipe.vae.config.z_dim, h, w, frames, torch.float32, meta, None)
        p = cfg.patch_size
        return z.shape[1:], z.shape[2] * (z.shape[3] // p[1]) * (z.shape[4] // p[2])
    z = pipe.prepare_latents(1, cfg.in_channels, h, w, torch.float32, meta, None)  # SD3, Z-Image: unpacked
    return z.shape[1:], (z.shape[2] // 2) * (z.shape[3] // 2)


# LTX-2's joint video + audio latent: tests/test_model_ltx2.py::test_full_size_counts_targets_and_shapes
@pytest.mark.parametrize("model,variant", [v for v in VARIANTS if not v[0].startswith("ltx2")])
def test_latents_and_tokens_at_the_preset(model, variant):
    ad = meta_adapter(model, variant)
    size, latent, tokens = SHAPES.get((model, variant), SHAPES.get(model))
    h, w, frames = preset_size(model, variant)
    assert (h, w, frames) == size
    z = ad.prepare_noise(1, h, w, num_frames=frames)  # the adapter's own arithmetic at full size
    state = ad.make_state(h, w, frames)
    assert tuple(z.shape[1:]) == latent
    pipe_shape, pipe_tokens = pipeline_latents(ad, h, w, frames)
    assert pipe_tokens == tokens
    if ad.video:
        f, gh, gw = state["latent_grid"]
        assert f * state["tokens_per_frame"] == tokens
        drop = 1 if ad.expand_timesteps and model == "wan2_i2v" else 0  # TI2V-5B I2V: frame 0 is the condition
        assert tuple(pipe_shape) == (latent[0], latent[1] + drop, *latent[2:])
    else:
        assert state["seq_len"] == tokens and tuple(pipe_shape) == latent


# ---- the memory plan ------------------------------------------------------------------------------------------------
def grpo_args(model, *extra):
    return parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", model, *extra])


GRPO = plan.Algorithm("GRPO", latents_per_sample=2)  # what grpo.py's --plan passes at --sde-window-size 1
NFT = plan.Algorithm("NFT", weight_copies=("EMA", "old policy"))  # nft.py's
AWM = plan.Algorithm("AWM", weight_copies=("EMA", "anchor", "epoch start"))  # awm.py's


def rows_by_name(rows):
    return {r.name: r for r in rows}


def test_build_meta_has_no_storage():
    comps = plan.build_meta("flux1")
    assert set(comps) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert all(p.is_meta for m in comps.values() for p in m.parameters())


def test_memory_plan_qwen_image_lora_grpo(monkeypatch, tmp_path):
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    args = grpo_args("qwen-image")
    one = rows_by_name(plan.memory_plan(args, GRPO, 1))
    eight = rows_by_name(plan.memory_plan(args, GRPO, 8, sharded=True))
    tr = one["transformer (frozen base)"]
    assert tr.params == 20_430_401_088 and tr.bytes == 2 * tr.params  # bf16 under --mixed-precision bf16
    assert eight["transformer (frozen base)"].bytes == tr.bytes / 8  # FSDP shards the trained transformer
    enc = one["text_encoder Qwen2_5_VLForConditionalGeneration"]
    assert eight["text_encoder Qwen2_5_VLForConditionalGeneration"].bytes == enc.bytes  # encoders are replicated
    lora = next(r for r in one.values() if r.name.startswith("LoRA weights (720 modules, r=64)"))
    assert lora.bytes == 4 * lora.params and one["AdamW moments (2 per weight)"].bytes == 2 * lora.bytes
    assert eight["EMA copy"].bytes == one["EMA copy"].bytes / 8  # built from the sharded parameters (--fsdp)
    # GRPO keeps the window's sde_window_size + 1 latents of every sample of the epoch: 48 x 16 on one process
    lat = next(r for r in one.values() if r.name.startswith("stored latents"))
    assert lat.params == 48 * 16 * 2 * 1024 * 64 and lat.dtype == "fp16"
    lat8 = next(r for r in eight.values() if r.name.startswith("stored latents"))
    assert lat8.params == lat.params / 8
    total = one["total, all on the GPU (--no-encode-once)"].bytes
    assert one["  training, encoders off the GPU (--encode-once)"].bytes == total - enc.bytes
    text = plan.run_plan(args, GRPO, num_processes=1)
    assert "LoRA GRPO on one 80 GB GPU: fits" in text and "LoRA GRPO on 8 x 80 GB GPUs with FSDP: fits" in text
    assert "not included (not measured yet)" in text and "caveat: activations are not included" in text
    assert len(text.splitlines()) <= 30 and max(map(len, text.splitlines()[1:])) <= 120  # one screen


def test_memory_plan_flux2_dev_needs_sharding(monkeypatch, tmp_path):
    # 32B transformer + 24B Mistral in bf16 are 105 GB while prompts are encoded: not on one GPU, fine on 8
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    text = plan.run_plan(grpo_args("flux2"), GRPO, num_processes=1)
    assert "LoRA GRPO on one 80 GB GPU: does NOT fit" in text
    assert "LoRA GRPO on 8 x 80 GB GPUs with FSDP: fits" in text


def test_memory_plan_full_finetune_and_other_scripts(monkeypatch, tmp_path):
    import awm
    import nft
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    args = grpo_args("wan2_t2v", "--finetune", "full", "--kl-beta", "0.1", "--ref-device", "cpu")
    rows = rows_by_name(plan.memory_plan(args, GRPO, 1))
    tr = rows["transformer (trained)"]
    assert tr.dtype == "fp32" and tr.bytes == 4 * tr.params
    assert rows["gradients"].params == plan.tensor_count(meta_adapter("wan2_t2v", "2.1-1.3b").pipe.transformer,
                                                         buffers=False)
    assert rows["reference transformer (frozen copy)"].where == "cpu"  # --ref-device cpu: not in the GPU total
    n = parse_with_presets(nft.Args, nft.PRESETS, nft.TINY, ["--model", "flux1"])
    rows = rows_by_name(plan.memory_plan(n, NFT, 1))
    lat = next(r for r in rows.values() if r.name.startswith("stored latents"))
    assert lat.params == 48 * 16 * 1 * 1024 * 64 and "EMA + old policy copies" in rows  # NFT: x0 only
    a = parse_with_presets(awm.Args, awm.PRESETS, awm.TINY, ["--model", "flux1"])
    assert "EMA + anchor + epoch start copies" in rows_by_name(plan.memory_plan(a, AWM, 1))
    # an algorithm that always keeps the reference (DPO) counts the frozen copy under full fine-tuning, without a KL
    full = grpo_args("wan2_t2v", "--finetune", "full")
    assert "reference transformer (frozen copy)" not in rows_by_name(plan.memory_plan(full, GRPO, 1))
    dpo = plan.Algorithm("DPO", reference=True)
    ref = rows_by_name(plan.memory_plan(full, dpo, 1))["reference transformer (frozen copy)"]
    assert ref.where == "gpu" and ref.params == plan.tensor_count(meta_adapter("wan2_t2v", "2.1-1.3b").pipe.transformer)
    assert plan.run_plan(n, NFT, 1).startswith("NFT memory plan: flux1")


def test_memory_plan_of_an_args_like_object(monkeypatch, tmp_path):
    # any object with the fields the scripts share works; missing ones take the RunArgs defaults
    from types import SimpleNamespace
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    rows = rows_by_name(plan.memory_plan(SimpleNamespace(model="sd3_5", variant="large", finetune="lora", lora_rank=32,
                                                         mixed_precision="bf16", resolution=1024), GRPO, 1))
    assert rows["transformer (frozen base)"].params == plan.tensor_count(meta_adapter("sd3_5", "large").pipe.transformer)
    assert any(r.startswith("LoRA weights (303 modules, r=32)") for r in rows)
    lat = next(r for r in rows.values() if r.name.startswith("stored latents"))
    assert lat.params == 48 * 16 * 2 * 16 * 128 * 128 and lat.dtype == "fp16"  # (sde_window_size 1 + 1) fp16 latents


def test_memory_plan_reads_measured_activations(monkeypatch, tmp_path):
    path = tmp_path / "activation_memory.json"
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(path))
    args = grpo_args("z-image")
    settings = plan.activation_settings(args)
    path.write_text(json.dumps({"runs": {"z-image:turbo": {"activation_gb": 12.5, "settings": settings}}}))
    rows = rows_by_name(plan.memory_plan(args, GRPO, 1))
    train = rows["  training, encoders off the GPU (--encode-once)"].bytes
    enc = rows["  encoding phase (--encode-once)"].bytes
    assert rows["static peak + activations"].bytes == max(enc, train + 12.5 * plan.GB)
    assert "incl. measured activations" in plan.run_plan(args, GRPO, 1)
    path.write_text(json.dumps({"runs": {"z-image:turbo": {"activation_gb": 12.5,
                                                           "settings": dict(settings, batch_size=4)}}}))
    assert "measured at other settings (12.5 GB at 512x512 x1, batch 4)" in plan.run_plan(args, GRPO, 1)


@pytest.mark.parametrize("script,model", [("grpo", "qwen-image"), ("nft", "wan2_t2v"), ("awm", "flux2")])
def test_plan_flag_prints_the_plan_before_anything_loads(script, model, tmp_path):
    """`--plan` in every script: the table and the fits/does-not-fit answers, exit 0, nothing written."""
    r = subprocess.run([sys.executable, f"{script}.py", "--model", model, "--plan", "--output-dir", str(tmp_path / "x")],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"LoRA {script.upper()} on one 80 GB GPU: " in r.stdout and "with FSDP: " in r.stdout
    assert not (tmp_path / "x").exists()
