"""Wan text-to-video (docs/models.md 3.9) and image-to-video (3.10) adapters over diffusers' WanPipeline and
WanImageToVideoPipeline components, for Wan2.1 (1.3B / 14B), Wan2.2-TI2V-5B and Wan2.2-A14B.

Facts: 5-D latents (B, C, 1 + (F-1)//4, H/s, W/s) of a causal video VAE (2.1 VAE: 16 channels, s = 8; 2.2 VAE of
TI2V-5B: 48 channels, s = 16), normalised per channel with latents_mean / latents_std; the transformer patchifies
(1, 2, 2), so H, W are multiples of 16 (5B: 32) and F = 4k + 1. Text: UMT5 last hidden state, prompts cleaned,
padded to max_sequence_length and zeroed past the true length. The transformer takes t = 1000 sigma and no
guidance embedding; true CFG v = v_neg + s (v_pos - v_neg) is on iff guidance_scale > 1, with "" as the negative
by default. The schedule is the pipeline's UniPC flow schedule, shift(linspace(1, 1/1000, N+1)[:-1]) + [0]; its
multistep update is replaced by our one-step Euler/SDE updates on the same sigmas (as every peer's rollouts do:
docs/video.md#recipes).
We pass the float sigmas, not UniPC's int64 timesteps (which read 0.875 for sigma 0.87516).

Wan2.2-A14B has two experts of one architecture: `transformer` (high noise) for t >= boundary_ratio * 1000 with
guidance_scale, `transformer_2` (low noise) below with guidance_scale_2 (default guidance_scale). Training sees
per-sample sigmas (NFT/AWM), so one batch may hold rows of both experts; `ExpertPair` routes rows inside ONE
forward (DDP wants one forward per backward) and registers only the trained experts as submodules, so that
parameters(), requires_grad_, checkpoints and EMA see only trained weights; the frozen expert rides along
unregistered (moved with .to(), shared by deepcopy). `--train-experts` picks the trained expert(s)
(trained_components); the low expert's LoRA is saved to lora/transformer_2 and loads with
`load_lora_weights(dir, load_into_transformer_2=True)`.
TI2V-5B (`expand_timesteps`) takes a per-token timestep (B, L), L = f (h/2) (w/2).

Image-to-video. 2.1 and 2.2-A14B: the first frame followed by F-1 black frames is VAE-encoded (posterior mode)
and normalised, a 4-channel first-frame mask is prepended, and the 20 condition channels are concatenated to the
16 noisy channels (36 in); 2.1 also cross-attends to CLIP hidden_states[-2] of the image. TI2V-5B in I2V mode:
latent frame 0 *is* the encoded first frame (per-token timestep 0 there) and the pipeline overwrites it with the
condition before decoding, so its noisy frame 0 is dead weight. Our latents z therefore exclude latent frame 0
(RL log-probs see only generated frames): prepare_noise draws the pipeline's full noise and drops frame 0,
predict prepends the condition frame and drops it from the output, decode prepends it again (so decode needs
`cond` for that one model). The pipeline takes one image per call; we encode each distinct image once.
"""
import copy
import json
import os

import numpy as np
import torch
from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from torch import nn
from transformers import CLIPVisionModelWithProjection, UMT5EncoderModel

from common import host
from common.errors import ModelError
from common.models import tiny_parts
from common.models.base import ROOT, Adapter

EXPERTS = ("transformer", "transformer_2")  # high-noise, low-noise (Wan2.2-A14B)
TRAIN_EXPERTS = {"high": ("transformer",), "low": ("transformer_2",), "both": EXPERTS}

# ---- full-size architectures (common/plan.py; issue 13) -------------------------------------------------------------
# docs/models.md 3.9/3.10 (diffusers' conversion script): head_dim 128, patch (1, 2, 2), UMT5 text (4096), 3-D rope
_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_1_3B = dict(_WAN, num_attention_heads=12, num_layers=30, ffn_dim=8960, in_channels=16, out_channels=16)
_WAN_14B = dict(_WAN, num_attention_heads=40, num_layers=40, ffn_dim=13824, in_channels=16, out_channels=16)
_WAN_5B = dict(_WAN, num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48)
# image-to-video: 16 noisy + 20 condition channels in; Wan2.1 also cross-attends to CLIP image tokens (1280 wide)
_WAN_14B_I2V = dict(_WAN_14B, in_channels=36)
_WAN_21_I2V = dict(_WAN_14B_I2V, image_dim=1280, added_kv_proj_dim=5120)
# google/umt5-xxl's encoder (UMT5Config of that checkpoint [recalled]; the count matches the published ~5.7B)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
# the 2.1 VAE = AutoencoderKLWan's defaults; the 2.2 VAE of TI2V-5B (conversion script: base_dim 160, decoder 256,
# residual, a 2x2 pixel patchify: 12 in/out channels, x16 spatial). Its 48 latents_mean/std are not known here: zeros
# and ones stand in (they are config values, not parameters, and change no size)
_WAN_VAE_21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True])
_WAN_VAE_22 = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                   latents_std=[1.0] * 48)
# laion/CLIP-ViT-H-14's vision tower (Wan2.1 I2V's image encoder): 32 x 1280, patch 14 at 224 px, projection 1024
CLIP_VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                     num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


def _wan_full(transformer, vae=_WAN_VAE_21, experts=1, image_encoder=False):
    """The full-size components of one Wan checkpoint: 1 or 2 experts of `transformer`, UMT5-XXL, the VAE."""
    out = {"transformer": (WanTransformer3DModel, transformer)}
    if experts == 2:
        out["transformer_2"] = (WanTransformer3DModel, transformer)
    out.update({"text_encoder": (UMT5EncoderModel, UMT5_XXL), "vae": (AutoencoderKLWan, vae)})
    if image_encoder:
        out["image_encoder"] = (CLIPVisionModelWithProjection, CLIP_VIT_H_14)
    return out


def _scheduler_config(flow_shift):
    # the hub scheduler_config.json of every Wan Diffusers repo (diffusers' conversion script)
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                flow_shift=flow_shift)


def _exact_one(sigmas):
    """UniPC lowers sigma 1 to 1 - 1e-6, a guard for the log(alpha) of its own multistep update, which we do not run;
    our steps need the exact 1 (Flow-SDE's sigma == 1 edge, else its std at step 0 is ~1000 eta)."""
    if abs(float(sigmas[0]) - 1) < 1e-5:
        sigmas[0] = 1.0
    return sigmas


def _high_noise(t, boundary_ratio, num_train_timesteps=1000):
    """The pipeline's expert rule on t = 1000 sigma (a float32 tensor, or an array when boundary_ratio is set): the
    high-noise expert iff t >= boundary."""
    if boundary_ratio is None:
        return torch.ones_like(t, dtype=torch.bool)
    return t >= boundary_ratio * num_train_timesteps


class ExpertPair(nn.Module):
    """Wan2.2-A14B's two experts as one module: `forward(route, **transformer_kwargs)` runs each row on its
    expert (route: B bools, True = high-noise `transformer`; or B ints, 0 = transformer, 1 = transformer_2; a list,
    or a tensor, which is read on the host: a wait for the device) in one call and returns the output rows in input
    order. Only the trained experts are submodules."""

    def __init__(self, experts: dict, trained):
        super().__init__()
        self._frozen = {}  # a plain dict: not registered, invisible to parameters() / state_dict()
        for name in EXPERTS:
            if name in trained:
                self.add_module(name, experts[name])
            else:
                self._frozen[name] = experts[name]

    @property
    def experts(self) -> dict:
        """Every expert, trained or frozen, by component name."""
        return {n: self._modules[n] if n in self._modules else self._frozen[n] for n in EXPERTS}

    @property
    def trained(self) -> tuple:
        return tuple(n for n in EXPERTS if n in self._modules)

    @property
    def dtype(self):
        return self.experts["transformer"].dtype

    @property
    def device(self):
        return self.experts["transformer"].device

    def forward(self, route, **kwargs):
        kwargs["return_dict"] = False
        route = route.tolist() if hasattr(route, "tolist") else route  # a tensor (or an array): read on the host
        idx = [int(not r) if isinstance(r, bool) else int(r) for r in route]  # 0 = transformer, 1 = transformer_2
        n = len(idx)
        used = sorted(set(idx))
        experts = self.experts
        idle = self._idle_sharded_experts(used)
        if len(used) == 1 and not idle:  # the usual rollout step: one expert, no split
            return experts[EXPERTS[used[0]]](**kwargs)[0]
        outs, rows = [], []
        for e in used:  # rows of both experts: per-sample sigmas, in training
            r = torch.tensor([i for i, x in enumerate(idx) if x == e], device=kwargs["hidden_states"].device)
            sub = {k: v[r] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for k, v in kwargs.items()}
            outs.append(experts[EXPERTS[e]](**sub)[0])
            rows.append(r)
        out = torch.cat(outs)[torch.cat(rows).argsort()]
        for e in idle:  # FSDP2: run a sharded expert that another rank's rows need, on row 0, adding 0 x its output
            row0 = {k: v[:1] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for k, v in kwargs.items()}
            out = out + 0 * experts[EXPERTS[e]](**row0)[0].sum()
        return out

    def _idle_sharded_experts(self, used):
        """Sharded experts that some rank's rows route to but no row here: every rank must run the same forwards
        of a sharded module (its all-gathers are collectives), and per-sample sigmas (NFT/AWM) differ across ranks."""
        from common import sharding
        trained = [i for i, name in enumerate(EXPERTS) if name in self._modules]
        if not any(sharding.is_sharded(self._modules[EXPERTS[i]]) for i in trained):
            return []
        here = torch.tensor([i in used for i in range(len(EXPERTS))], device=self.device)
        needed = sharding.any_rank(here).tolist()
        return [i for i in trained if needed[i] and i not in used]

    def set_attention_backend(self, name):
        for m in self.experts.values():
            m.set_attention_backend(name)

    def reset_attention_backend(self):
        for m in self.experts.values():
            m.reset_attention_backend()

    def compile(self, *args, **kwargs):
        # each expert's own forward: the routing between them is data-dependent Python
        for m in self.experts.values():
            m.compile(*args, **kwargs)

    def enable_gradient_checkpointing(self):
        for m in self.experts.values():
            m.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self):
        for m in self.experts.values():
            m.disable_gradient_checkpointing()

    def _apply(self, fn, recurse=True):
        # .to(device / dtype) moves the frozen expert too: it runs on the same inputs
        for m in self._frozen.values():
            m._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        # a copy (e.g. a reference model) copies the trained experts and shares the frozen one
        for m in self._frozen.values():
            memo[id(m)] = m
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def _tiny_text_encoder(tok, d_model=32):
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                     num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.pad_token_id)
    return UMT5EncoderModel(cfg).eval()


def _tiny_vae(v22=False):
    torch.manual_seed(0)
    # three temporal-downsample entries: x8 spatial, x4 temporal as in the real VAEs
    if v22:  # the 2.2 VAE: z48, a 2x2 pixel patchify inside (12 in/out channels), x16 spatial
        return AutoencoderKLWan(base_dim=8, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                                patch_size=2, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True], scale_factor_spatial=16,
                                scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).eval()
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _tiny_transformer(in_channels=16, out_channels=16, image_dim=None, seed=0):
    torch.manual_seed(seed)
    # patch (1, 2, 2) as in every real Wan: expand_timesteps' [:, ::2, ::2] assumes it (docs/models.md section 5)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, image_dim=image_dim, added_kv_proj_dim=32 if image_dim else None,
                                 rope_max_seq_len=1024)


class _WanAdapter(Adapter):
    """What the T2V and I2V adapters share. `specs`: variant -> (tiny architecture, flow_shift, boundary_ratio,
    size multiple), the class-level facts that check_size / expert_steps use without loading weights."""
    specs: dict = {}
    # docs/models.md 4 (20 per expert); not I2V 2.1's attn2.add_k_proj / add_v_proj (image cross-attention)
    default_target_modules = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                              "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    unguided = (1.0, 1.0)
    video = True
    size_multiple = 16  # the default variants' (VAE x8, patch 2); check_size knows TI2V-5B's 32

    def __init__(self, pipe, device="cpu", dtype=torch.float32, variant=None, condition_max_pixels=None,
                 train_experts="both", guidance_scale_2=None):
        super().__init__(pipe, device, dtype, variant=variant, condition_max_pixels=condition_max_pixels)
        self.train_experts, self.guidance_scale_2 = train_experts, guidance_scale_2
        if train_experts not in TRAIN_EXPERTS:
            raise ModelError(f"--train-experts is one of high, low, both; got {train_experts!r}")
        self.boundary = pipe.config.get("boundary_ratio")
        self.num_train_timesteps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        has_2 = getattr(pipe, "transformer_2", None) is not None
        if self.boundary is not None and not has_2:
            raise ModelError(f"{self.name}: the pipeline has boundary_ratio {self.boundary} but no transformer_2")
        self.two_experts = self.boundary is not None and has_2  # boundary None: the pipeline uses transformer only
        self.pipe_experts = None
        if self.two_experts:
            self.pipe_experts = ExpertPair({n: getattr(pipe, n) for n in EXPERTS}, TRAIN_EXPERTS[train_experts])
            self.transformer = self.pipe_experts  # replaced by the accelerate-wrapped module for training
        else:
            if train_experts != "both":
                raise ModelError(f"{self.name} {self.variant} has one transformer; --train-experts applies to "
                                 "Wan2.2-A14B")
            if guidance_scale_2 is not None:
                raise ModelError(f"{self.name} {self.variant} has one transformer; guidance_scale_2 applies to "
                                 "Wan2.2-A14B")
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        self.patch = tuple(self.config.patch_size)

    # ---- construction: schedule facts without weights ------------------------------------------
    @classmethod
    def _schedule(cls, variant, model_path=None):
        """(scheduler, boundary_ratio) from the class-level config, or from a local model folder's
        scheduler/scheduler_config.json and model_index.json; builds no weights."""
        variant = cls.check_variant(variant)
        _, shift, boundary, _ = cls.specs[variant]
        sched = UniPCMultistepScheduler(**_scheduler_config(shift))
        if model_path and os.path.isfile(os.path.join(model_path, "model_index.json")) and os.path.isfile(
                os.path.join(model_path, "scheduler", "scheduler_config.json")):
            with open(os.path.join(model_path, "model_index.json")) as f:
                index = json.load(f)
            with open(os.path.join(model_path, "scheduler", "scheduler_config.json")) as f:
                cfg = json.load(f)
            import diffusers
            sched = getattr(diffusers, cfg.get("_class_name", ""), UniPCMultistepScheduler).from_config(cfg)
            boundary = index.get("boundary_ratio")
            if not (index.get("transformer_2") or [None])[-1]:  # "transformer_2": [null, null] or absent
                boundary = None
        return sched, boundary

    @classmethod
    def expert_steps(cls, variant, num_steps, model_path=None) -> dict:
        """Which steps of the num_steps rollout grid each expert owns: {"transformer": [...]} for one transformer,
        {"transformer": high, "transformer_2": low} for Wan2.2-A14B (either list may be empty)."""
        sched, boundary = cls._schedule(variant, model_path)
        if boundary is None:
            return {"transformer": list(range(num_steps))}
        sched.set_timesteps(num_steps, device="cpu")
        # the same arithmetic as predict: fp32 sigma * 1000
        high = _high_noise(sched.sigmas[:num_steps].to(torch.float32) * 1000, boundary,
                           sched.config.num_train_timesteps).tolist()
        return {"transformer": [i for i, h in enumerate(high) if h],
                "transformer_2": [i for i, h in enumerate(high) if not h]}

    @classmethod
    def grid_sigmas(cls, variant, num_steps, model_path=None) -> torch.Tensor:
        """The rollout's N+1 sigmas (as `sigmas` gives them) from the class-level or local scheduler config."""
        sched, _ = cls._schedule(variant, model_path)
        sched.set_timesteps(num_steps, device="cpu")
        return _exact_one(sched.sigmas.to(torch.float32))

    @classmethod
    def expert_of_sigma(cls, variant, sigma, model_path=None) -> str:
        """The expert that predicts at `sigma` ("transformer" or "transformer_2")."""
        sched, boundary = cls._schedule(variant, model_path)
        t = torch.as_tensor(sigma, dtype=torch.float32) * 1000
        return "transformer" if bool(_high_noise(t, boundary, sched.config.num_train_timesteps)) else "transformer_2"

    @classmethod
    def _tiny_shared(cls, variant):
        """(tiny architecture, boundary_ratio, the tokenizer, text encoder and scheduler every tiny build shares)."""
        arch, shift, boundary, _ = cls.specs[cls.check_variant(variant)]
        tok = tiny_parts.t5_tokenizer()
        return arch, boundary, dict(tokenizer=tok, text_encoder=_tiny_text_encoder(tok),
                                    scheduler=UniPCMultistepScheduler(**_scheduler_config(shift)))

    @classmethod
    def _frames_min(cls, variant):
        return 1

    def _min_frames(self):
        return 1

    @classmethod
    def check_size(cls, height, width, num_frames, variant=None):
        """One ModelError line if the size cannot be generated by `variant`; loads nothing."""
        variant = cls.check_variant(variant)
        cls._check_size(height, width, num_frames, cls.specs[variant][3], cls._frames_min(variant),
                        f"{cls.name} {variant}")

    @staticmethod
    def _check_size(height, width, num_frames, multiple, min_frames, what):
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ModelError(f"{what}: height and width must be multiples of {multiple} (VAE x patch 2), "
                             f"got {height}x{width}")
        if num_frames < min_frames or (num_frames - 1) % 4:
            raise ModelError(f"{what}: num_frames must be 4k+1 and at least {min_frames} (1, 5, 9, ...), "
                             f"got {num_frames}")

    # ---- experts (add_lora, lora_disabled, save_lora of the base loop over trained_components) ---------
    def trained_components(self) -> dict:
        if not self.two_experts:
            return {"transformer": self.pipe.transformer}
        return {n: getattr(self.pipe, n) for n in TRAIN_EXPERTS[self.train_experts]}

    def trained_module(self) -> nn.Module:
        return self.pipe_experts if self.two_experts else self.pipe.transformer

    # ---- the RL interface ------------------------------------------------------------------------
    def _encode_text(self, prompts, negative_prompts, max_sequence_length):
        def encode(texts):
            return self.per_row(texts, lambda uniq: self.pipe.encode_prompt(
                uniq, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
                device=self.device)[0].to(self.dtype))
        negs = [n or "" for n in negative_prompts] if negative_prompts is not None else [""] * len(prompts)
        # negatives always: CFG is decided per forward (guidance_scale > 1), as in the pipeline
        return {"prompt_embeds": encode(list(prompts)), "neg_prompt_embeds": encode(negs)}

    def condition_elements(self, settings, latent_grid=None):
        # Wan always encodes the negative prompt ("" by default)
        return 2 * settings.max_sequence_length * self.config.text_dim, ""

    def _latent_grid(self, height, width, num_frames):
        s = self.pipe.vae_scale_factor_spatial
        # from the loaded pipeline (a --model-path folder may not be the named variant)
        self._check_size(height, width, num_frames, s * self.patch[1], self._min_frames(),
                         f"{self.name} {self.variant}")
        return 1 + (num_frames - 1) // self.pipe.vae_scale_factor_temporal, height // s, width // s

    def make_state(self, height, width, num_frames=1):
        f, h, w = self._latent_grid(height, width, num_frames)
        return {"height": height, "width": width, "num_frames": num_frames, "latent_grid": (f, h, w),
                "tokens_per_frame": (h // self.patch[1]) * (w // self.patch[2])}

    def _noise(self, n, height, width, generator, num_frames):
        # the pipeline's prepare_latents: one float32 randn of the full latent shape (float32 whatever the model
        # dtype), on the CPU generator, then to the device
        f, h, w = self._latent_grid(height, width, num_frames)
        shape = (n, self.pipe.vae.config.z_dim, f, h, w)
        return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(self.device)

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        return self._noise(n, height, width, generator, num_frames)

    def sigmas(self, num_steps, state):
        return _exact_one(self.scheduler_sigmas(num_steps))

    def _model_input(self, z, cond):
        """(hidden_states, extra kwargs, number of leading condition frames to drop from the output)."""
        return z, {}, 0

    def _timestep(self, t, x, state, cond_frames):
        if not self.expand_timesteps:
            return t
        # per-token timesteps (B, L): 0 on condition-frame tokens, t elsewhere (the pipeline's mask * t)
        per_frame = state["tokens_per_frame"]
        total = x.shape[2] * per_frame
        ts = t[:, None].expand(-1, total)
        if cond_frames:
            ts = torch.cat([torch.zeros_like(ts[:, :cond_frames * per_frame]), ts[:, cond_frames * per_frame:]], 1)
        return ts

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        """Velocity incl. CFG (guidance_scale > 1; A14B's low-noise rows use guidance_scale_2). sigma: a float or
        (B,) per-sample sigmas. true_cfg_scale is unused: Wan's one CFG scale is guidance_scale."""
        n = z.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        x, extra, drop = self._model_input(z, cond)
        x = x.to(self.dtype)
        emb = cond["prompt_embeds"]
        high = None
        if self.two_experts:  # each row's expert, decided on the host from the schedule's values (common/host.py)
            # with t's float32 arithmetic: choosing an expert waits for nothing
            t_host = np.broadcast_to(np.asarray(host.value(sigma), dtype=np.float32), n) * 1000
            high = _high_noise(t_host, self.boundary, self.num_train_timesteps).tolist()
        cfg = guidance_scale > 1
        if cfg:  # one batched forward for [negative, positive]
            x, t_in = torch.cat([x, x]), torch.cat([t, t])
            emb = torch.cat([cond["neg_prompt_embeds"], emb])
            extra = {k: torch.cat([v, v]) for k, v in extra.items()}
        else:
            t_in = t
        kwargs = dict(hidden_states=x, timestep=self._timestep(t_in, x, state, drop), encoder_hidden_states=emb,
                      **extra)
        if self.two_experts:
            v = self.transformer(high * 2 if cfg else high, **kwargs)
        else:
            v = self.transformer(**kwargs, return_dict=False)[0]
        v = v[:, :, drop:].float()
        if cfg:
            neg, pos = v.chunk(2)
            g2 = guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
            if not self.two_experts or all(high) or g2 == guidance_scale:
                scale = guidance_scale
            elif not any(high):
                scale = g2
            else:  # rows of both experts: each with its expert's scale
                scale = torch.where(_high_noise(t, self.boundary, self.num_train_timesteps),
                                    torch.tensor(float(guidance_scale)), torch.tensor(float(g2)))
                scale = scale.to(v).view(-1, 1, 1, 1, 1)
            v = neg + scale * (pos - neg)
        return v

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        """Videos (B, F, 3, H, W) in [0, 1]. `cond` (rows matching z) is needed by TI2V-5B image-to-video only."""
        vae = self.pipe.vae
        x = z.to(vae.dtype)
        # the pipeline's own arithmetic: divide by 1/std, then add the mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        video = vae.decode(x / inv_std + mean, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="pt").float()


# Args defaults shared by every algorithm (docs/video.md#recipes): train at flow_grpo's Wan2.1-T2V-1.3B size 240x416
# (16:9-ish, multiples of 16) with the reference recipes' 5 frames and 10 steps; evaluate at Wan2.1's native
# 480x832 with the reference recipes' 13 frames and 28 steps; CFG 4.5 (flow_grpo's Wan recipe); Wan's 512 text
# tokens. The preset is for the default variant: TI2V-5B needs multiples of 32 (e.g. --resolution 256 416).
T2V_PRESET = dict(resolution=(240, 416), eval_resolution=(480, 832), num_frames=5, eval_num_frames=13, num_steps=10,
                  eval_num_steps=28, guidance_scale=4.5, batch_size=1, max_sequence_length=512)


class WanT2VAdapter(_WanAdapter):
    name = "wan2_t2v"
    pipeline_cls = WanPipeline
    variants = {"2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "2.1-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                "2.2-ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "2.2-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"}
    hub_id = variants["2.1-1.3b"]
    # variant -> (tiny architecture, flow_shift, boundary_ratio, size multiple); diffusers' conversion script
    # writes flow_shift 3.0 for 2.1 and 2.2-A14B, 5.0 for TI2V-5B (the official A14B sampler uses 12.0: the hub
    # scheduler_config.json of a real checkpoint wins, see expert_steps' model_path)
    specs = {"2.1-1.3b": ("2.1", 3.0, None, 16), "2.1-14b": ("2.1", 3.0, None, 16),
             "2.2-ti2v-5b": ("5b", 5.0, None, 32), "2.2-a14b": ("a14b", 3.0, 0.875, 16)}
    condition_images = "none"
    preset = T2V_PRESET
    tiny_preset = dict(num_frames=5, eval_num_frames=5)
    full_configs = {"2.1-1.3b": _wan_full(_WAN_1_3B), "2.1-14b": _wan_full(_WAN_14B),
                    "2.2-ti2v-5b": _wan_full(_WAN_5B, _WAN_VAE_22), "2.2-a14b": _wan_full(_WAN_14B, experts=2)}

    @classmethod
    def build_tiny(cls, variant=None):
        arch, boundary, common = cls._tiny_shared(variant)
        if arch == "5b":
            return WanPipeline(vae=_tiny_vae(True), transformer=_tiny_transformer(48, 48), transformer_2=None,
                               expand_timesteps=True, **common)
        two = arch == "a14b"
        return WanPipeline(vae=_tiny_vae(), transformer=_tiny_transformer(seed=0),
                           transformer_2=_tiny_transformer(seed=1) if two else None,
                           boundary_ratio=boundary if two else None, **common)

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        return self._encode_text(prompts, negative_prompts, max_sequence_length)


class WanI2VAdapter(_WanAdapter):
    name = "wan2_i2v"
    pipeline_cls = WanImageToVideoPipeline
    variants = {"2.1-14b-480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                "2.1-14b-720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
                "2.2-a14b": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                # TI2V-5B's one checkpoint in image-to-video mode (WanImageToVideoPipeline over its components)
                "2.2-ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
    hub_id = variants["2.1-14b-480p"]
    specs = {"2.1-14b-480p": ("2.1", 3.0, None, 16), "2.1-14b-720p": ("2.1", 3.0, None, 16),
             "2.2-a14b": ("a14b", 3.0, 0.9, 16), "2.2-ti2v-5b": ("5b", 5.0, None, 32)}
    condition_images = "one"
    # as T2V (docs/video.md#recipes: the 2.1-I2V-14B-480P recipe trains at 240 px, 5 frames) with the reference
    # recipe's CFG 5.0
    preset = dict(T2V_PRESET, guidance_scale=5.0)
    # --tiny: the demo edit dataset's images as first frames
    tiny_preset = dict(num_frames=5, eval_num_frames=5, dataset=os.path.join(ROOT, "datasets", "demo-edit"))
    # 480P and 720P share the architecture; TI2V-5B is the same checkpoint as in text-to-video
    full_configs = {"2.1-14b-480p": _wan_full(_WAN_21_I2V, image_encoder=True),
                    "2.1-14b-720p": _wan_full(_WAN_21_I2V, image_encoder=True),
                    "2.2-a14b": _wan_full(_WAN_14B_I2V, experts=2), "2.2-ti2v-5b": _wan_full(_WAN_5B, _WAN_VAE_22)}

    @classmethod
    def _frames_min(cls, variant):
        # TI2V-5B: latent frame 0 is the condition, so a video needs at least one generated latent frame
        return 5 if cls.specs[variant][0] == "5b" else 1

    @classmethod
    def build_tiny(cls, variant=None):
        arch, boundary, common = cls._tiny_shared(variant)
        if arch == "2.1":
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
            torch.manual_seed(0)
            ie = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                intermediate_size=32, patch_size=8)).eval()
            ip = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
            return WanImageToVideoPipeline(vae=_tiny_vae(), image_processor=ip, image_encoder=ie,
                                           transformer=_tiny_transformer(36, 16, image_dim=16), transformer_2=None,
                                           **common)
        if arch == "a14b":
            return WanImageToVideoPipeline(vae=_tiny_vae(), image_processor=None, image_encoder=None,
                                           transformer=_tiny_transformer(36, 16, seed=0),
                                           transformer_2=_tiny_transformer(36, 16, seed=1), boundary_ratio=boundary,
                                           **common)
        return WanImageToVideoPipeline(vae=_tiny_vae(True), image_processor=None, image_encoder=None,
                                       transformer=_tiny_transformer(48, 48), transformer_2=None,
                                       expand_timesteps=True, **common)

    def _min_frames(self):
        return 5 if self.expand_timesteps else 1

    def condition_elements(self, settings, latent_grid=None):
        text, _ = super().condition_elements(settings)
        f, h, w = latent_grid
        if self.config.in_channels == 48:  # TI2V-5B: the condition is latent frame 0
            return text + 48 * h * w, ""
        # 4 mask + 16 latent channels over the video's latent grid, and the CLIP image tokens
        return text + 20 * f * h * w + (257 * self.config.image_dim if self.config.image_dim else 0), ""

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        z = self._noise(n, height, width, generator, num_frames)
        # TI2V-5B: the pipeline's full noise minus latent frame 0, which the condition replaces
        return z[:, :, 1:] if self.expand_timesteps else z

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        if images is None or len(images) != len(prompts) or any(len(im) != 1 for im in images):
            raise ModelError(f"{self.name} needs exactly one condition image (the first frame) per prompt")
        if state is None:
            raise ModelError(f"{self.name}: encode_prompt needs `state` (make_state): the condition latents depend "
                             "on height, width and num_frames")
        cond = self._encode_text(prompts, negative_prompts, max_sequence_length)
        keys = [self.image_key(im[0]) for im in images]
        first = {k: im[0] for k, im in zip(keys, images)}
        uniq = list(dict.fromkeys(keys))  # K copies of a sample: encode its image once
        enc = self._encode_images([first[k] for k in uniq], state)
        idx = torch.tensor([uniq.index(k) for k in keys], device=self.device)
        cond.update({k: v[idx] for k, v in enc.items()})
        return cond

    def _encode_images(self, imgs, state):
        """One row per image: the condition latents (and CLIP tokens for 2.1), as the pipeline builds them."""
        vae, (height, width, frames) = self.pipe.vae, (state["height"], state["width"], state["num_frames"])
        _, h, w = state["latent_grid"]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(self.device, torch.float32)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(self.device, torch.float32)
        lats, clip = [], []
        for img in imgs:  # one image per VAE call, as the pipeline encodes one per call
            x = self.pipe.video_processor.preprocess(img, height=height, width=width).to(self.device, torch.float32)
            x = x.unsqueeze(2)
            if not self.expand_timesteps:  # the first frame, then frames-1 black (zero) frames
                x = torch.cat([x, x.new_zeros(1, 3, frames - 1, height, width)], dim=2)
            lat = retrieve_latents(vae.encode(x.to(vae.dtype)), sample_mode="argmax").to(self.device, torch.float32)
            lats.append((lat - mean) * inv_std)
            if self.config.image_dim is not None:  # Wan2.1 I2V: CLIP hidden_states[-2] of the raw image
                clip.append(self.pipe.encode_image(img, self.device).to(self.dtype))
        lat = torch.cat(lats)
        if self.expand_timesteps:
            return {"first_frame": lat}
        # the 4-channel first-frame mask: frame 0 repeated 4x (the VAE's temporal factor), folded into channels
        tf = self.pipe.vae_scale_factor_temporal
        mask = torch.ones(lat.shape[0], 1, frames, h, w)
        mask[:, :, 1:] = 0
        mask = torch.cat([mask[:, :, :1].repeat_interleave(tf, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(lat.shape[0], -1, tf, h, w).transpose(1, 2).to(lat.device)
        out = {"condition": torch.cat([mask, lat], dim=1)}
        if clip:
            out["image_embeds"] = torch.cat(clip)
        return out

    def _model_input(self, z, cond):
        if self.expand_timesteps:  # TI2V-5B: the condition is latent frame 0 (timestep 0 there)
            return torch.cat([cond["first_frame"].to(z), z], dim=2), {}, 1
        extra = {"encoder_hidden_states_image": cond["image_embeds"]} if "image_embeds" in cond else {}
        return torch.cat([z, cond["condition"].to(z)], dim=1), extra, 0

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        if self.expand_timesteps:
            if cond is None or "first_frame" not in cond:
                raise ModelError(f"{self.name} {self.variant}: decode needs `cond` (latent frame 0 is the condition "
                                 "image, not part of z)")
            z = torch.cat([cond["first_frame"].to(z), z], dim=2)
        return super().decode(z, state)
