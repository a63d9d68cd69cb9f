"""Full-size models without weights: meta-device builds and a per-process GPU memory plan (issue 13; `--plan`).

Every adapter carries `full_configs` (variant -> component -> (class, kwargs)), the published architecture of each
component written from facts (docs/models.md 3). `build_meta` builds them on the meta device: shapes and parameter
counts, no memory, no download. `memory_plan` adds up, for one training process, what a run keeps on the GPU:

- weights in their precision (2 bytes under --mixed-precision bf16/fp16, else 4);
- the trainable parameters (LoRA of the default targets at --lora-rank, or the whole transformer for
  --finetune full) in fp32 with their gradients, AdamW's two moments and the algorithm's fp32 copies of them
  (`Algorithm.weight_copies`: the evaluation EMA; NFT's old policy, AWM's anchor and epoch-start weights), the EMA
  swap-in backup (evaluation), and a frozen reference transformer for full fine-tuning with --kl-beta > 0 or an
  algorithm that keeps one always (`Algorithm.reference`: DPO, DGPO);
- what the rollout stores per sample for the epoch in the storage dtype: `Algorithm.latents_per_sample` latents
  (GRPO: its SDE window's sde_window_size + 1; NFT/AWM: the final latent), and the conditioning kept with each
  sample (the adapter's `condition_elements` estimate from the embedding widths).

FSDP (`--fsdp`, common/sharding.py) shards the trained transformer's weights, gradients, optimizer state and the EMA
copies (built from the sharded parameters) over N processes; the encoders, the VAE, the frozen Wan2.2 expert, the
reference (copied before sharding) and the stored samples are per process.
Activation memory is measured, not modelled: bench/gpu.py writes measured figures to
bench/results/activation_memory.json, and the plan shows them when the settings match; until then it says "not
included (not measured yet)". Sizes are GB = 2^30 bytes (as the scripts' peak_memory_gb).
"""
import dataclasses
import json
import math
import os
import re
import types

import torch
from torch import nn
from transformers import PreTrainedModel

from common import models
from common.args import RunArgs
from common.errors import ModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIVATIONS_JSON = os.path.join(ROOT, "bench", "results", "activation_memory.json")
GB = 2**30
GPU_GB = 80            # the question the plan answers: does it fit on an 80 GB GPU, and on 8 with sharding
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ENCODERS = ("text_encoder", "image_encoder")  # name prefixes of the components --encode-once moves off the GPU


# ---- full-size components on the meta device -------------------------------------------------------------------------
def full_spec(model_name, variant=None) -> tuple[type, str | None, dict]:
    """(adapter class, resolved variant, {component: (class, kwargs)}) of a model's published architecture."""
    cls = models.adapter_class(model_name, variant)
    variant = cls.check_variant(variant)
    if variant not in cls.full_configs:
        raise ModelError(f"{model_name}: no full-size configuration (the plan covers the published models; "
                         "shapes is the embedded 2.3M-parameter CPU model)")
    return cls, variant, cls.full_configs[variant]


def build_component(spec, device="meta", dtype=None) -> nn.Module:
    """One component from (class, kwargs): diffusers classes take the kwargs, transformers models their config."""
    cls, kwargs = spec
    old = torch.get_default_dtype()
    try:
        if dtype is not None:  # build directly in the weight dtype: a full-size fp32 copy may not fit
            torch.set_default_dtype(dtype)
        with torch.device(device):
            module = cls(cls.config_class(**kwargs)) if issubclass(cls, PreTrainedModel) else cls(**kwargs)
    finally:
        torch.set_default_dtype(old)
    return module.eval().requires_grad_(False)


def build_meta(model_name, variant=None) -> dict[str, nn.Module]:
    """{component: module} of the full-size model on the meta device: shapes only, no weights, no download."""
    _, _, spec = full_spec(model_name, variant)
    return {name: build_component(s) for name, s in spec.items()}


def build_pipeline(model_name, variant=None, device="meta", dtype=None, modules=None):
    """The diffusers pipeline with full-size modules (built on `device`, or `modules` as given) and the tiny build's
    tokenizers, processors, scheduler and pipeline flags (real tokenizers cannot be downloaded here)."""
    cls, variant, spec = full_spec(model_name, variant)
    tiny = cls.build_tiny(variant) if cls.variants else cls.build_tiny()
    modules = modules or {name: build_component(s, device, dtype) for name, s in spec.items()}
    parts = dict(tiny.components)
    for name, comp in parts.items():
        if isinstance(comp, nn.Module) and name not in modules:
            raise ModelError(f"{model_name} {variant}: no full-size configuration of the component {name!r}")
    parts.update(modules)
    # registered pipeline flags (klein's is_distilled, Wan's boundary_ratio / expand_timesteps)
    flags = {k: v for k, v in tiny.config.items() if not k.startswith("_") and k not in tiny.components}
    return cls.pipeline_cls(**parts, **flags)


def full_adapter(model_name, variant=None, device="meta", dtype=torch.bfloat16, pipe=None, **options):
    """An adapter over the full-size pipeline: its own latent and token arithmetic at full size (meta: shapes only)."""
    cls, variant, _ = full_spec(model_name, variant)
    pipe = pipe or build_pipeline(model_name, variant, device, dtype)
    return cls(pipe, device, dtype, variant=variant, **options)


def tensor_count(module, buffers=True, persistent_only=False) -> int:
    """Parameters (+ buffers: what a checkpoint stores when persistent_only, what the GPU holds otherwise)."""
    n = sum(p.numel() for p in module.parameters())
    if buffers:
        keep = set(module.state_dict().keys()) if persistent_only else None
        n += sum(b.numel() for k, b in module.named_buffers() if keep is None or k in keep)
    return n


def lora_modules(net, targets) -> list[tuple[str, nn.Module]]:
    """The modules a LoRA on `targets` wraps, matched as Adapter.add_lora / PEFT match them: a module-name suffix
    (n == t or n ends with "." + t) or one regex string matched against full names."""
    if isinstance(targets, str):
        return [(n, m) for n, m in net.named_modules() if re.fullmatch(targets, n)]
    return [(n, m) for n, m in net.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


def lora_param_count(net, targets, rank) -> tuple[int, int]:
    """(LoRA parameters, wrapped modules): r * (in + out) per wrapped Linear."""
    mods = lora_modules(net, targets)
    bad = [n for n, m in mods if not isinstance(m, nn.Linear)]
    if bad:
        raise ModelError(f"LoRA target matches a module that is not a Linear: {bad[0]}")
    return sum(rank * (m.in_features + m.out_features) for _, m in mods), len(mods)


# ---- the plan -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    name: str
    bytes: float                 # per process, as this row is placed
    params: int | None = None    # parameter or element count behind the bytes (None: a total)
    dtype: str = ""
    kind: str = "item"           # "item", "total" or "note"
    encoder: bool = False        # a text / image encoder (--encode-once moves it off the GPU after encoding)
    early: bool = True           # already allocated while --encode-once encodes (not: gradients, AdamW, samples)
    where: str = "gpu"           # "gpu" or "cpu" (--offload-samples, --ref-device cpu)
    text: str = ""               # a note's text, shown instead of bytes


def _hw(resolution):
    """--resolution S or H W (a tuple, as the scripts' Args hold it; an int for S) -> (H, W)."""
    return (resolution, resolution) if isinstance(resolution, int) else (resolution[0], resolution[-1])


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What the plan needs to know of an algorithm script (its `--plan` passes it)."""
    name: str                                     # "GRPO", "NFT", ...
    weight_copies: tuple[str, ...] = ("EMA",)     # fp32 copies of the trained weights it keeps
    latents_per_sample: int = 1                   # latents stored per sample of the epoch
    reference: bool = False                       # keeps the reference model whatever --kl-beta (Run(reference=True))


def _settings(args) -> types.SimpleNamespace:
    """The fields the plan reads; an args-like object lacking some takes the RunArgs defaults."""
    return types.SimpleNamespace(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(RunArgs)})


def _activations(key, settings):
    """(measured record or None, whether its settings equal these) from bench/gpu.py's JSON file."""
    try:
        with open(ACTIVATIONS_JSON) as f:
            record = json.load(f).get("runs", {}).get(key)
    except (OSError, ValueError):
        return None, False
    if record is None:
        return None, False
    return record, all(record.get("settings", {}).get(k) == v for k, v in settings.items())


def activation_key(model_name, variant) -> str:
    return model_name if variant is None else f"{model_name}:{variant}"


def activation_settings(args) -> dict:
    """The settings a measured activation figure depends on (JSON-comparable)."""
    args = _settings(args)
    h, w = _hw(args.resolution)
    return dict(height=h, width=w, num_frames=args.num_frames, batch_size=args.batch_size,
                finetune=args.finetune, lora_rank=args.lora_rank if args.finetune == "lora" else None,
                mixed_precision=args.mixed_precision,
                gradient_checkpointing=bool(args.gradient_checkpointing))


def memory_plan(args, algorithm: Algorithm, num_processes=1, sharded=False, meta=None) -> list[Row]:
    """Rows of GPU bytes per process for the run `args` describes (a script's Args; an args-like object's missing
    fields take the RunArgs defaults) and `algorithm` keeps, on `num_processes` processes, with FSDP sharding of the
    trained transformer when `sharded`. `meta`: the full-size adapter (full_adapter) to reuse between calls."""
    args = _settings(args)
    ad = meta or full_adapter(args.model, args.variant, train_experts=args.train_experts)
    name, variant, pipe = args.model, ad.variant, ad.pipe
    wbytes = BYTES["fp32" if args.mixed_precision == "no" else args.mixed_precision]
    wdtype = "fp32" if wbytes == 4 else args.mixed_precision
    full = args.finetune == "full"
    n = num_processes if sharded else 1  # the divisor of sharded rows
    trained = ad.trained_components()
    rows = []

    # weights: trained transformer(s) (frozen base under LoRA, fp32 trainable under full), the rest in wdtype
    trainable = 0
    # trained first, then the other transformer, the encoders, the VAE
    modules = sorted(((c, m) for c, m in pipe.components.items() if isinstance(m, nn.Module)),
                     key=lambda cm: (cm[0] not in trained, not cm[0].startswith("transformer"),
                                     not cm[0].startswith(ENCODERS), cm[0]))
    for comp, mod in modules:
        count = tensor_count(mod)
        if comp in trained and full:
            trainable += sum(p.numel() for p in mod.parameters())
            rows.append(Row(f"{comp} (trained)", count * 4 / n, count, "fp32"))
        elif comp in trained:
            rows.append(Row(f"{comp} (frozen base)", count * wbytes / n, count, wdtype))
        else:  # the frozen Wan2.2 expert is no submodule of the trained module: FSDP does not shard it
            frozen = " (not trained)" if comp.startswith("transformer") else ""
            rows.append(Row(f"{comp}{frozen} {type(mod).__name__}", count * wbytes, count, wdtype,
                            encoder=comp.startswith(ENCODERS)))
    if not full:
        targets = args.lora_targets or ad.default_target_modules
        n_mod = 0
        for mod in trained.values():
            p, m = lora_param_count(mod, targets, args.lora_rank)
            trainable, n_mod = trainable + p, n_mod + m
        rows.append(Row(f"LoRA weights ({n_mod} modules, r={args.lora_rank})", trainable * 4 / n, trainable, "fp32"))
    # gradients and AdamW's moments appear with the first backward / optimizer step, after encoding
    rows.append(Row("gradients", trainable * 4 / n, trainable, "fp32", early=False))
    rows.append(Row("AdamW moments (2 per weight)", 2 * trainable * 4 / n, 2 * trainable, "fp32", early=False))
    # the EMA copies are built from the (sharded) parameters: shards too; the reference is copied before sharding
    copies, k = " + ".join(algorithm.weight_copies), len(algorithm.weight_copies)
    rows.append(Row(f"{copies} cop{'ies' if k > 1 else 'y'}", k * trainable * 4 / n, k * trainable, "fp32"))
    # ema.swapped_in clones the live weights while the EMA is loaded (evaluation; NFT's old-policy passes)
    rows.append(Row("EMA swap-in backup", trainable * 4 / n, trainable, "fp32", early=False))
    if full and (args.kl_beta > 0 or algorithm.reference):
        ref = sum(tensor_count(m) for m in trained.values())
        on_cpu = args.ref_device == "cpu"
        rows.append(Row("reference transformer (frozen copy)", ref * wbytes, ref, wdtype,
                        where="cpu" if on_cpu else "gpu"))

    # the epoch's stored samples on this process
    h, w = _hw(args.resolution)
    frames = args.num_frames
    type(ad).check_size(h, w, frames, variant)
    latent = ad.prepare_noise(1, h, w, num_frames=frames)
    samples = math.ceil(args.prompts_per_epoch * args.group_size / num_processes)
    per_sample = algorithm.latents_per_sample
    sdtype = args.latent_storage_dtype
    where = "cpu" if args.offload_samples else "gpu"
    elems = samples * per_sample * latent[0].numel()
    shape = "x".join(map(str, latent.shape[1:]))
    # one name for every column: the epoch's samples split over the N processes
    rows.append(Row(f"stored latents ({args.prompts_per_epoch * args.group_size}/N samples x {per_sample} x {shape})",
                    elems * BYTES[sdtype], elems, sdtype, early=False, where=where))
    grid = getattr(ad, "_latent_grid", lambda *a: None)(h, w, frames)
    per_cond, note = ad.condition_elements(args, grid)
    rows.append(Row(f"stored conditioning (estimate{': ' + note if note else ''})", samples * per_cond * wbytes,
                    samples * per_cond, wdtype, early=False, where=where))

    # totals: all on the GPU; --encode-once's two phases (encoding: weights and trainable copies, no optimizer state
    # or samples yet; training: everything but the encoders)
    gpu = [r for r in rows if r.where == "gpu"]
    total = sum(r.bytes for r in gpu)
    encoders = sum(r.bytes for r in gpu if r.encoder)
    encoding = sum(r.bytes for r in gpu if r.early)
    encode_once = args.encode_once
    peak = max(encoding, total - encoders) if encode_once else total
    rows += [Row("total, all on the GPU (--no-encode-once)", total, kind="total"),
             Row("  encoding phase (--encode-once)", encoding, kind="total"),
             Row("  training, encoders off the GPU (--encode-once)", total - encoders, kind="total"),
             Row(f"static peak ({'--encode-once' if encode_once else 'encoders kept on the GPU'})", peak, kind="total")]
    record, same = _activations(activation_key(name, variant), activation_settings(args))
    if record is None:
        rows.append(Row("activations", 0, kind="note", text="not included (not measured yet)"))
    elif same:  # per process: FSDP leaves a process's batch, hence its activations, as they are
        act = record["activation_gb"] * GB  # measured while training: on top of the training-phase bytes
        with_act = max(encoding, total - encoders + act) if encode_once else total + act
        rows.append(Row("activations (measured by bench/gpu.py)", act))
        rows.append(Row("static peak + activations", with_act, kind="total"))
    else:
        s = record.get("settings", {})
        rows.append(Row("activations", 0, kind="note", text=(
            f"not included: measured at other settings ({record['activation_gb']:.1f} GB at {s.get('height')}x"
            f"{s.get('width')} x{s.get('num_frames')}, batch {s.get('batch_size')})")))
    return rows


def static_peak(rows) -> float:
    return next(r.bytes for r in rows if r.name.startswith("static peak"))


# ---- batches that fill the GPU (issue 20) ----------------------------------------------------------------------------
EVAL_BATCH = 8  # the evaluation batch where nothing is measured (a CPU, a tiny build, an unmeasured model)


def widest_batch(free_bytes: float, per_sample_bytes: float, step: int, cap: int) -> int:
    """The widest multiple of `step`, at most `cap`, whose samples' activations (`per_sample_bytes` each) fit in
    `free_bytes`; never below `step` (the run's own batch: whether that fits is the plan's verdict)."""
    fit = int(free_bytes // per_sample_bytes) if per_sample_bytes > 0 else cap
    return max(step, min(cap, fit) // step * step)


@dataclasses.dataclass
class Batches:
    rollout: int
    eval: int
    why: str  # what --plan and a GPU run print


def choose_batches(args, algorithm: Algorithm, gpu_bytes: float, num_processes=1, meta=None) -> Batches:
    """Rollout and evaluation batches for a GPU of `gpu_bytes`: a flag the user set is kept; an unset one is the widest
    that fits in --gpu-memory-fraction of the GPU beside the plan's static peak, at the activation memory per sample
    bench/gpu.py measured for this model (training with gradient checkpointing holds every block's input, a no-grad
    forward one block's work: an upper bound), scaled by the latent tokens of the size; the rollout batch a
    multiple of --batch-size up to the group size, the evaluation batch up to this process's evaluation prompts."""
    s = _settings(args)
    sharded = s.fsdp and num_processes > 1
    free = s.gpu_memory_fraction * gpu_bytes - static_peak(memory_plan(args, algorithm, num_processes, sharded, meta))
    key = activation_key(s.model, models.adapter_class(s.model, s.variant).check_variant(s.variant))
    record, _ = _activations(key, {})
    rollout = s.batch_size if s.rollout_batch_size is None else s.rollout_batch_size  # 0 stays 0: the checks refuse it
    evals = EVAL_BATCH if s.eval_batch_size is None else s.eval_batch_size
    if record is None:
        return Batches(rollout, evals, f"GPU batches: rollout {rollout}, evaluation {evals}\n  (activation memory of "
                                       f"{key} not measured yet: bench/gpu.py)")
    m = record["settings"]
    per_token = record["activation_gb"] * GB / (m["batch_size"] * m["height"] * m["width"] * m["num_frames"])
    h, w = _hw(s.resolution)
    eh, ew = _hw(s.eval_resolution)
    samples = math.ceil(s.prompts_per_epoch * s.group_size / num_processes)
    if s.rollout_batch_size is None:
        rollout = widest_batch(free, per_token * h * w * s.num_frames, s.batch_size, min(s.group_size, samples))
    if s.eval_batch_size is None:
        evals = widest_batch(free, per_token * eh * ew * s.eval_num_frames, 1,
                             math.ceil(s.eval_num_prompts / num_processes))
    frames = f" x{m['num_frames']}" if m["num_frames"] > 1 else ""
    why = (f"GPU batches: rollout {rollout}, evaluation {evals}; {s.gpu_memory_fraction:.0%} of {gpu_bytes / GB:.0f} GB "
           f"less the static peak leaves {free / GB:.1f} GB,\n  {per_token * h * w * s.num_frames / GB:.2f} GB of "
           f"activations per rollout sample (bench/gpu.py: {record['activation_gb']:.2f} GB at batch "
           f"{m['batch_size']}, {m['height']}x{m['width']}{frames});\n  capped by the group size {s.group_size} and "
           f"{math.ceil(s.eval_num_prompts / num_processes)} evaluation prompts per process; a flag you set is kept")
    return Batches(rollout, evals, why)


def fit_batches(args, algorithm: Algorithm):
    """The run's Args with unset --rollout-batch-size / --eval-batch-size filled in: on a CUDA GPU (a full-size model)
    the widest that fit (`choose_batches`, printed once), elsewhere today's CPU defaults (--batch-size, 8)."""
    cpu = dataclasses.replace(args, eval_batch_size=EVAL_BATCH if args.eval_batch_size is None else args.eval_batch_size)
    if args.tiny or args.plan or not torch.cuda.is_available() or not models.adapter_class(
            args.model, args.variant).full_configs:
        return cpu
    n = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    chosen = choose_batches(args, algorithm, gpu, n)
    if int(os.environ.get("RANK", "0")) == 0:
        print(chosen.why, flush=True)
    return dataclasses.replace(args, rollout_batch_size=chosen.rollout, eval_batch_size=chosen.eval)


def _fmt_count(n):
    if n is None:
        return ""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def format_plan(rows, *more, headers=None) -> str:
    """A table of one or more plans (the same rows, e.g. 1 process and FSDP over 8): item, count, dtype, GB each."""
    columns = [rows, *more]
    headers = headers or [f"plan {i + 1}" for i in range(len(columns))]
    width = max(len(r.name) for r in rows) + 1
    lines = [f"{'':{width}} {'params':>8} {'dtype':>5} " + " ".join(f"{h:>13}" for h in headers)]
    for i, r in enumerate(rows):
        if r.kind == "total" and (i == 0 or rows[i - 1].kind != "total"):
            lines.append("-" * len(lines[0]))
        if r.kind == "note" and r.text:
            lines.append(f"{r.name:{width}} {'':>8} {'':>5} {r.text}")
            continue
        cells = []
        for col in columns:
            c = col[i]
            cells.append(f"{'cpu' if c.where == 'cpu' else f'{c.bytes / GB:.2f}':>13}")
        lines.append(f"{r.name:{width}} {_fmt_count(r.params):>8} {r.dtype:>5} " + " ".join(cells))
    return "\n".join(lines)


def _verdict(rows, label) -> str:
    peak = static_peak(rows) / GB
    measured = next((r for r in rows if r.name.startswith("static peak + activations")), None)
    if measured is not None:
        total = measured.bytes / GB
        return f"{label}: {'fits' if total < GPU_GB else 'does NOT fit'} ({total:.1f} GB incl. measured activations)"
    return f"{label}: {'fits' if peak < GPU_GB else 'does NOT fit'} ({peak:.1f} GB static, activations excluded)"


def run_plan(args, algorithm: Algorithm, num_processes=None) -> str:
    """The text `--plan` prints: the plan on 1 process and sharded over the launch's processes (WORLD_SIZE, or
    `num_processes`) and over 8, and whether it fits on one 80 GB GPU and on 8 with FSDP."""
    n = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    algo, raw, args = algorithm.name, args, _settings(args)
    meta = full_adapter(args.model, args.variant, train_experts=args.train_experts)
    counts = sorted({1, 8, n})
    plans = [memory_plan(raw, algorithm, c, sharded=c > 1, meta=meta) for c in counts]
    h, w = _hw(args.resolution)
    frames = args.num_frames
    ft = "LoRA" if args.finetune == "lora" else "full fine-tuning"
    title = (f"{algo} memory plan: {args.model}{' ' + meta.variant if meta.variant else ''}, {ft}"
             f"{f' rank {args.lora_rank}' if args.finetune == 'lora' else ''}, --mixed-precision {args.mixed_precision}"
             f"\n{h}x{w}{f' x {frames} frames' if frames > 1 else ''}, {args.prompts_per_epoch} prompts x "
             f"{args.group_size} per epoch, batch {args.batch_size}; GB per process (2^30 bytes)")
    headers = ["1 GPU" if c == 1 else f"FSDP x{c}" for c in counts]
    out = [title, format_plan(*plans, headers=headers), ""]
    what = f"{ft if args.finetune == 'full' else 'LoRA'} {algo}"
    out.append(_verdict(plans[0], f"{what} on one {GPU_GB} GB GPU"))
    out.append(_verdict(plans[counts.index(8)], f"{what} on 8 x {GPU_GB} GB GPUs with FSDP"))
    if n not in (1, 8):
        out.append(_verdict(plans[counts.index(n)], f"{what} on {n} x {GPU_GB} GB GPUs with FSDP"))
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else GPU_GB * GB
    out.append(choose_batches(raw, algorithm, gpu, n, meta).why + ("" if torch.cuda.is_available() else
                                                                   f"\n  (for a {GPU_GB} GB GPU; this machine has none)"))
    if not any(r.name.startswith("static peak + activations") for p in plans for r in p):
        out.append(f"caveat: activations are not included (not measured yet for these settings; bench/gpu.py "
                   f"measures them):\n'fits' means the static total is below {GPU_GB} GB")
    return "\n".join(out)
