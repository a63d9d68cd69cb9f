"""The adapter interface every model implements (docs/models.md section 2).

An adapter wraps one diffusers pipeline's components and exposes the few operations RL needs, batch
first: encode prompts once per batch, draw the initial noise, build the pipeline's own sigma schedule,
predict a velocity (CFG included), decode to images in [0, 1]. `predict` is a pure function of its
inputs so training can re-run it at stored latents. Sampler math lives in common/sampler.py.
"""
import copy
import functools
import hashlib
import os
import re
from contextlib import contextmanager

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from common import host
from common.errors import ModelError


def is_local_path(path) -> bool:
    """A folder path rather than a hub id (exactly `owner/name`): absolute, ./ ../ ~, or not one `/`."""
    path = str(path)
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1 or os.path.exists(path)


def pad_to(x, length):
    """Zero-pad dim 1 of a batch-first tensor (tokens of an embedding, a mask, condition tokens) to `length`."""
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])


def pad_cat(tensors):
    """Batch-first tensors whose dim 1 differs (per-row token counts): zero-padded to the longest, concatenated."""
    n = max(t.shape[1] for t in tensors)
    return torch.cat([pad_to(t, n) for t in tensors])


def combine_cfg(v, scale):
    """Classifier-free guidance on a batched [negative; positive] prediction: neg + scale (pos - neg)."""
    neg, pos = v.chunk(2)
    return neg + scale * (pos - neg)


def _merged_lora_forward(layer, x, *args, **kwargs):
    """A peft LoRA Linear's forward with its active adapters merged into the weight for this call (lora_merged)."""
    base = layer.base_layer
    weight = base.weight
    if not layer.disable_adapters:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                delta = layer.lora_B[name].weight @ layer.lora_A[name].weight
                weight = weight + (delta * layer.scaling[name]).to(weight.dtype)
    return torch.nn.functional.linear(x, weight, base.bias)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the embedded model, demo data
RAGGED_TEXT_TOKENS = 128  # Z-Image / Qwen-Image keep only the prompt's own tokens: the plan assumes this length


class Adapter:
    name = "base"
    pipeline_cls = None            # diffusers pipeline class (save_lora_weights, from_pretrained)
    hub_id = None                  # default checkpoint
    variants: dict[str, str] = {}  # --variant NAME -> hub id (the first is the default); also picks the tiny build
    default_target_modules: list[str] | str = []  # suffixes, or one full-name regex
    trainable_components = ("transformer",)
    # condition images per sample (jsonl `image`/`images`): "none", "one" (exactly one), "many" (one or
    # more), "optional" (zero or more)
    condition_images = "none"
    default_condition_max_pixels = None  # the pipeline's own area for condition images
    condition_min_side = 1        # the smallest condition image side the pipeline encodes (common/data.py checks it)
    condition_max_aspect = None   # the widest aspect ratio it takes (None: any)
    condition_resized_to_area = False  # each condition image resized to a fixed area, sides multiples of 32
    # the model's recommended sampling settings (docs/algorithms.md H.2), shared by every algorithm script; a script's
    # PRESETS[name] adds its algorithm's settings on top (common/cli.py); the Args defaults are FLUX.1-dev's
    preset: dict = {}
    tiny_preset: dict = {}  # what --tiny needs beyond common.args.TINY (edit datasets, video frames)
    full_configs: dict = {}  # variant -> {component: (class, kwargs)}: the published architecture (common/plan.py)
    unguided = (1.0, 1.0)  # (guidance_scale, true_cfg_scale) of a guidance-free forward (NFT/AWM training)
    size_multiple = 16     # height and width must be multiples of this (VAE x8, then 2x2 patches or packing)
    video = False          # video models: latents carry a frame axis and num_frames may be 4k+1
    # models that also generate sound (LTX-2) set audio = True and define decode_audio(z, state, cond) -> (B, C, N)
    # waveforms and audio_sample_rate() (Hz): the rewards get each sample's track, the sample mp4s carry it
    audio = False
    frame_rate = 16.0      # fps of the written sample videos (Wan's; LTX-2's 24 keeps its sound in step)

    def __init__(self, pipe, device="cpu", dtype=torch.float32, variant=None, condition_max_pixels=None,
                 train_experts="both", guidance_scale_2=None):
        self.pipe, self.device, self.dtype = pipe, torch.device(device), dtype
        self.variant = variant or (next(iter(self.variants)) if self.variants else None)
        self.condition_max_pixels = condition_max_pixels or self.default_condition_max_pixels
        # Wan2.2-A14B options: which of the two experts train, and the low-noise expert's CFG scale
        self.train_experts, self.guidance_scale_2 = train_experts, guidance_scale_2
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.requires_grad_(False).eval()
                comp.to(self.device)
                if comp.dtype != dtype:  # real weights arrive in `dtype` via from_pretrained
                    comp.to(dtype)
        self.transformer = pipe.transformer     # replaced by the accelerate-wrapped module for training
        self.config = pipe.transformer.config   # always the unwrapped config

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path=None, tiny=False, device="cpu", dtype=torch.float32, variant=None, condition_max_pixels=None,
             **options):
        """tiny: random tiny components built in code; else `path` (hub id or local folder). `options`: the
        constructor's model options (train_experts, guidance_scale_2)."""
        variant = cls.check_variant(variant)
        kw = dict(variant=variant, condition_max_pixels=condition_max_pixels, **options)
        if tiny:
            return cls(cls.build_tiny(variant) if cls.variants else cls.build_tiny(), device, dtype, **kw)
        path = path or cls.variants.get(variant, cls.hub_id)
        if is_local_path(path) and not os.path.isdir(path):
            raise ModelError(f"--model-path {path} is not a folder")
        try:
            pipe = cls.pipeline_cls.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise ModelError(f"cannot load {cls.name} from {path!r}: {str(e).splitlines()[0]} "
                             "(pass --model-path to a local copy, or --tiny)") from None
        return cls(pipe, device, dtype, **kw)

    @classmethod
    def check_variant(cls, variant):
        """The variant to load (the default when None), or one clear line."""
        if variant is not None and variant not in cls.variants:
            known = ", ".join(cls.variants) or "none"
            raise ModelError(f"{cls.name} has no variant {variant!r}; known: {known}")
        return variant or (next(iter(cls.variants)) if cls.variants else None)

    @classmethod
    def check_size(cls, height, width, num_frames, variant=None):
        """Before any model loads: the sizes this model can generate, or one clear line."""
        m = cls.size_multiple
        if height < m or width < m or height % m or width % m:
            raise ModelError(f"{cls.name}: height and width must be positive multiples of {m}, got {height}x{width}")
        if num_frames != 1 and not cls.video:
            raise ModelError(f"{cls.name} generates images: --num-frames must be 1, got {num_frames}")

    @classmethod
    def expert_steps(cls, variant, num_steps, model_path=None) -> dict[str, list[int]]:
        """Which rollout steps each transformer owns (Wan2.2-A14B has two experts); no weights are loaded."""
        return {"transformer": list(range(num_steps))}

    @classmethod
    def find_unused_parameters(cls, variant, train_experts) -> bool:
        """DDP's option: when both Wan2.2-A14B experts train, each step runs only one of them, so DDP must look for
        trained parameters that got no gradient."""
        return len(cls.expert_steps(variant, 1)) > 1 and train_experts == "both"

    @classmethod
    def build_tiny(cls, variant=None):
        raise NotImplementedError(f"{cls.name} has no tiny build")

    def condition_elements(self, settings, latent_grid=None) -> tuple[int, str]:
        """The memory plan's estimate (common/plan.py) of the elements per sample of the conditioning a rollout keeps
        with each sample (prompt embeddings, doubled by a negative prompt; pooled vectors; condition-image latents),
        and what it assumed. `settings`: max_sequence_length, negative_prompt and condition_max_pixels; `latent_grid`:
        (frames, height, width) of a video's latents."""
        raise ModelError(f"no conditioning estimate for {self.name}")

    # ---- the RL interface (model-specific) ------------------------------------------------------
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None) -> dict:
        """Batch-first conditioning tensors. `images`: None, or one list of PIL RGB condition images per
        prompt (models with condition_images != "none"); their latents go into the returned dict. `state`: the
        rollout's make_state (image-to-video conditions are built at the video's size and length)."""
        raise NotImplementedError

    def prepare_noise(self, n, height, width, generator=None, num_frames=1) -> torch.Tensor:
        raise NotImplementedError

    def make_state(self, height, width, num_frames=1) -> dict:
        """Static per-resolution inputs (position ids, shapes), shared by every sample of a rollout."""
        raise NotImplementedError

    def sigmas(self, num_steps, state) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z, state, cond=None) -> torch.Tensor:
        """Images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]; `cond` for models whose condition is part of the
        output (Wan2.2-TI2V-5B image-to-video: its first frame)."""
        raise NotImplementedError

    # ---- shared helpers -------------------------------------------------------------------------
    def scheduler_sigmas(self, num_steps, custom_sigmas=None, mu=None) -> torch.Tensor:
        """The N+1 sigmas the pipeline's own scheduler builds (docs/algorithms.md decision 1)."""
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)  # fresh, stateless copy
        kwargs = {"sigmas": custom_sigmas} if custom_sigmas is not None else {}
        if mu is not None:
            kwargs["mu"] = mu
        sched.set_timesteps(num_steps, device="cpu", **kwargs)
        return sched.sigmas.to(torch.float32)

    def per_row(self, keys, encode_unique):
        """Encode each distinct key once (a batch holds K copies of a few prompts), then one row per key.
        encode_unique(unique keys) -> a tensor or a tuple of tensors, one row per unique key."""
        uniq = list(dict.fromkeys(keys))
        out = encode_unique(uniq)
        idx = torch.tensor([uniq.index(k) for k in keys], device=self.device)
        return tuple(o[idx] for o in out) if isinstance(out, tuple) else out[idx]

    def _latent_hw(self, height, width):
        """(h, w) of the VAE latent grid: a x8 VAE, then 2x2 patches or packing, so sizes are multiples of 16."""
        f = self.pipe.vae_scale_factor * 2
        if height % f or width % f:
            raise ValueError(f"{self.name}: height and width must be multiples of {f}, got {height}x{width}")
        return 2 * (height // f), 2 * (width // f)

    @staticmethod
    def image_key(img):
        """Content key of a PIL image: K copies of a prompt load its condition images K times; encode them once."""
        return img.size, hashlib.sha1(img.tobytes()).digest()

    def shifted_sigmas(self, num_steps, seq_len, custom_sigmas=None):
        """The FLUX.1 / Qwen-Image / Z-Image pipelines' schedule: linspace(1, 1/N, N) (or `custom_sigmas`) through
        the scheduler, with mu from the image token count (used when the config shifts dynamically)."""
        cfg = self.pipe.scheduler.config
        mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if custom_sigmas is None:
            custom_sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        return self.scheduler_sigmas(num_steps, custom_sigmas, mu)

    def per_condition_layout(self, z, sigma, cond, forward):
        """Condition images of mixed sizes in one batch: `cond["image_latents"]` (B, L, C) holds each row's
        condition tokens zero-padded to the batch's longest and `cond["image_grids"]` (B, M, 2) the (rows, cols)
        token grid of each of its images (zero rows pad samples with fewer images). The transformer takes one
        position layout per call, so `forward(z, sigma, cond, layout, rows)` runs once per group of rows that share
        a layout (a tuple of grids; `rows` lists them, for what the adapter keeps per row of the whole batch), with
        the condition tokens cut to that layout's count (and per-row sigmas to its rows); rows come back in their
        order. A batch of one layout (one aspect ratio) is one forward, as before. The grouping is read on the host
        once per cond (common/host.py), so the steps after a rollout's first wait for nothing."""
        if "image_grids" not in cond:
            return forward(z, sigma, cond, (), range(len(z)))
        groups, order = host.once(cond["image_grids"], self._layout_groups, z.device)
        if len(groups) == 1:
            layout, rows, _ = groups[0]
            n = sum(h * w for h, w in layout)
            return forward(z, sigma, {**cond, "image_latents": cond["image_latents"][:, :n]}, layout, rows)
        outs = []
        for layout, rows, index in groups:
            sub = self.select(cond, index)
            sub["image_latents"] = sub["image_latents"][:, :sum(h * w for h, w in layout)]
            s = sigma[index] if torch.is_tensor(sigma) and sigma.dim() and len(sigma) == len(z) else sigma
            outs.append(forward(z[index], s, sub, layout, rows))
        return torch.cat(outs)[order]

    @staticmethod
    def _layout_groups(grids, device):
        """The layouts of `grids` in order of first appearance, each as (layout, its rows, them as an index on
        `device`), and the index on `device` that puts the groups' rows back in batch order."""
        row_layouts = [tuple((h, w) for h, w in row if h) for row in grids.tolist()]
        groups = []
        for layout in dict.fromkeys(row_layouts):
            rows = [i for i, lay in enumerate(row_layouts) if lay == layout]
            groups.append((layout, rows, torch.tensor(rows, device=device)))
        return groups, torch.argsort(torch.cat([index for _, _, index in groups]))

    def with_transformer(self, module) -> "Adapter":
        """A view of this adapter that predicts with `module` (the frozen reference copy of a full fine-tuning run)
        in place of its transformer; everything else is shared, and this adapter is left as it is."""
        view = copy.copy(self)
        view.transformer = module
        return view

    @staticmethod
    def select(cond: dict, index) -> dict:
        """Rows `index` of every batch-first tensor in a cond dict."""
        return {k: v[index] if torch.is_tensor(v) else v for k, v in cond.items()}

    def offload_encoders(self, device="cpu"):
        """Move the text and image encoders off the accelerator (once every prompt is encoded)."""
        for name, comp in self.pipe.components.items():
            if name.startswith(("text_encoder", "image_encoder")) and isinstance(comp, torch.nn.Module):
                comp.to(device)

    def trained_components(self) -> dict:
        """{pipeline component name: module} of the networks that train (Wan2.2-A14B: one or both experts)."""
        return {"transformer": self.pipe.transformer}

    def trained_module(self) -> torch.nn.Module:
        """The one module the script trains, wraps (DDP) and checkpoints: the transformer, or both experts."""
        return self.pipe.transformer

    def add_lora(self, rank, alpha, target_modules=None, init="gaussian"):
        """Attach a LoRA adapter to every trained component; every target must match at least one module (no
        silent skips). Targets are module-name suffixes, or one regex string matched against full names (as PEFT
        does). Returns the number of LoRA-wrapped modules."""
        from peft import LoraConfig
        targets = target_modules or self.default_target_modules
        targets = targets if isinstance(targets, str) else list(targets)
        total = 0
        for comp, net in self.trained_components().items():
            names = [n for n, _ in net.named_modules()]
            if isinstance(targets, str):
                if not any(re.fullmatch(targets, n) for n in names):
                    raise ModelError(f"LoRA target regex {targets!r} matches no module of the {self.name} {comp}")
            else:
                for t in targets:
                    if not any(n == t or n.endswith("." + t) for n in names):
                        raise ModelError(f"LoRA target {t!r} matches no module of the {self.name} {comp}")
            net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init))
            total += sum(1 for _, m in net.named_modules() if hasattr(m, "lora_A"))
        return total

    @contextmanager
    def lora_disabled(self):
        """The reference policy for LoRA runs: the same networks with adapters off."""
        nets = list(self.trained_components().values())
        for net in nets:
            net.disable_adapters()
        try:
            yield
        finally:
            for net in nets:
                net.enable_adapters()

    @contextmanager
    def lora_merged(self):
        """Forwards with each LoRA folded into its layer: y = x (W + s B A)^T + b, the merged weight built per call in
        a new tensor. One small r x in x out matmul per layer and call replaces LoRA's two token-sized matmuls and
        the add; W itself is never written, so nothing drifts (a merge then unmerge in place would round W). For
        sampling without log-probabilities (evaluation; NFT's and AWM's rollouts): equal to the unmerged forward up
        to float rounding."""
        from peft.tuners.lora import Linear as LoraLinear
        layers = [m for net in self.trained_components().values() for m in net.modules() if isinstance(m, LoraLinear)]
        for m in layers:
            m.forward = functools.partial(_merged_lora_forward, m)  # an instance attribute shadows the class forward
        try:
            yield
        finally:
            for m in layers:
                del m.forward

    def save_lora(self, out_dir):
        """diffusers LoRA files: `transformer` into out_dir, another component C (Wan2.2's transformer_2) into
        out_dir/C, which the stock pipeline loads with load_lora_weights(out_dir/C, load_into_transformer_2=True)."""
        from peft.utils import get_peft_model_state_dict
        for comp, net in self.trained_components().items():
            self.pipeline_cls.save_lora_weights(
                out_dir if comp == "transformer" else os.path.join(out_dir, comp),
                transformer_lora_layers=get_peft_model_state_dict(net),
                transformer_lora_adapter_metadata=net.peft_config["default"].to_dict(), safe_serialization=True)

    def save_full(self, out_dir):
        """Fully fine-tuned weights: each trained component into out_dir/<component> (diffusers format)."""
        for comp, net in self.trained_components().items():
            net.save_pretrained(os.path.join(out_dir, comp))
