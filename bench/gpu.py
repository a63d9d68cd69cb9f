"""Full-size random-weight GRPO on one CUDA GPU: seconds per phase, what the forwards alone cost (the floors), samples
per second, peak memory and measured activation memory per model (issues 13 and 20). Needs a CUDA GPU; without one
it stops with one line.

    python bench/gpu.py               # the GPU check: FLUX.1, SD3.5-M, Wan2.1-1.3B, Qwen-Image; 8 min on an H200
    python bench/gpu.py --peers       # Qwen-Image and SD3.5-M at published peers' settings: the peers table
    python bench/gpu.py --models all --total-budget-s 7200   # every architecture, smallest first
    python bench/gpu.py --models flux1 wan2_t2v:2.1-1.3b --budget-s 600

No real weights are downloaded and the scripts cannot load random full-size weights, so each model runs grpo.py's own
`main(args)` in-process with `common.models.load` monkeypatched to return the model's adapter over a full-size
pipeline built here: the adapters' `full_configs` (common/plan.py), random weights created in bf16 directly on the
GPU. The tokenizers and processors are the tiny ones of common/models/tiny_parts.py (real tokenizers cannot be
downloaded): byte-level, so chat-templated prompts (Qwen-Image, Z-Image, FLUX.2-klein) run longer than with the real
tokenizers, padded encoders (T5, UMT5, Mistral at max_sequence_length) are unaffected, and Qwen-Image-Edit's VL
encoder sees fewer image tokens; Wan2.1 image-to-video gets CLIP's real 224 px image processor.

Settings: grpo.py's preset of each model (resolution, frames, steps, CFG, SDE window, batch size; the rollout batch
fitted to the GPU as grpo.py fits it), LoRA at the preset rank, --mixed-precision bf16, gradient checkpointing, the
demo prompts (datasets/demo; edit and image-to-video models datasets/demo-edit) and the weight-free
jpeg_compressibility reward; two epochs of --prompts x --group-size samples (2 x 4 by default, instead of 48 x 16)
with one optimizer step each, no evaluation, nothing saved (saving is not benchmarked: a full-size LoRA checkpoint
with its AdamW state and EMA is gigabytes).
Phase seconds are the second epoch's (the first includes CUDA warm-up and the one-off prompt encoding).

The floors, measured in the same process after the two epochs, on the run's own model and conditioning, say how far
each phase is from the forwards it cannot do without: the rollout floor is one `predict` (CFG included, LoRA off, no
sampler, no grad) at the rollout batch, the training floor one forward + backward of the velocity (LoRA on) at the
micro-batch; each phase's ratio divides its seconds by the floor times the calls the phase makes (rollout: steps x
rollout forwards; training: trained steps x micro-batches). A ratio of 1 means nothing but the network runs.

Each model runs in its own subprocess, under a wall-clock budget (--budget-s; by default its entry of BUDGETS_S): an
out-of-memory error or a timeout leaves the GPU clean for the next. A model starts only when its whole budget fits in
what is left of --total-budget-s, so the command ends inside a GPU lease. Whatever finished is written after every
model:
  bench/results/gpu.md                   the table, every column
  bench/results/hardware.md              the short table of the README (bench/results/hardware.md's format)
  bench/results/activation_memory.json   activation memory = the second epoch's peak (encoders off the GPU, optimizer
                                         state allocated) minus memory_plan's static training bytes; `--plan` reads it
  PEERS_TABLE in bench/results          --peers: samples per second per GPU beside the peers' published figures (not
                                         in the repository until a GPU run writes it)
  bench/results/gpu_logs/<model>.log     each run's output
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")
PEERS_TABLE = "peers.md"  # the table --peers writes beside the hardware table (no GPU run has written it yet)
# `--models all`: one variant per architecture (z-image base, qwen-image original, klein base, Wan I2V 720P and
# Qwen-Image-Edit-2509 share one); sorted smallest first at run time
ALL_MODELS = ("flux1", "flux1-kontext", "sd3_5:medium", "sd3_5:large", "z-image:turbo", "qwen-image:2512",
              "qwen-image-edit-plus:2511", "flux2", "flux2-klein:4b", "flux2-klein:9b", "wan2_t2v:2.1-1.3b",
              "wan2_t2v:2.1-14b", "wan2_t2v:2.2-ti2v-5b", "wan2_t2v:2.2-a14b", "wan2_i2v:2.1-14b-480p",
              "wan2_i2v:2.2-a14b")
# the default models (the GPU check) and their budgets in seconds (worker start, build, two epochs, floors):
# they sum to the default --total-budget-s: with the machine's start (1-2 min), inside a 15-minute lease of one
# H200 with minutes to spare. Measured there on 2026-12-04 (the rows of bench/results/hardware.md): FLUX.1 about
# 60 s, Qwen-Image about 150 s (110 s was too short), SD3.5-M and Wan2.1-1.3B epochs of 3 s and 12 s
BUDGETS_S = {"flux1": 90, "sd3_5:medium": 70, "wan2_t2v:2.1-1.3b": 100, "qwen-image:2512": 220}
OTHER_BUDGET_S = 300  # a model without an entry (--models all wants a larger --total-budget-s)
TOTAL_BUDGET_S = 480
FLOOR_CALLS = 5  # timed calls per floor, after two warm-up calls


@dataclasses.dataclass(frozen=True)
class Peer:
    """A published throughput and the grpo.py settings that reproduce its work per image (README.md, "Hardware
    table")."""
    name: str
    images_per_gpu_s: float
    source: str
    settings: dict
    summary: str
    budget_s: float


PEERS = {
    "qwen-image:2512": Peer("verl-omni", 0.305, "512 images in 420 s on 4 x H800",
                            dict(resolution=(512,), num_steps=10, sde_window_size=2, true_cfg_scale=4.0,
                                 negative_prompt=" "),
                            "LoRA, 512x512, 10 steps, SDE window 2, true CFG 4 with a negative prompt", 270),
    "sd3_5:medium": Peer("miles_diffusion", 0.58, "128 images per 110 s on 2 x H200",
                         dict(lora_rank=32, resolution=(512,), num_steps=10, sde_window_size=10,
                              sde_window_range=(0, 10), guidance_scale=4.5),
                         "LoRA r32, 512x512, 10 steps all trained, CFG 4.5", 90),
}
# the Wan preset is the default variant's: TI2V-5B needs multiples of 32 (common/models/wan.py)
SIZE_OVERRIDES = {"2.2-ti2v-5b": dict(resolution=(256, 416))}
# token ids the full-size text encoders take from the tiny tokenizers' configs (their vocabularies are tiny)
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "image_token_id",
             "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index")


def split_spec(spec):
    model, _, variant = spec.partition(":")
    return model, variant or None


# ---- the full-size random-weight pipeline ---------------------------------------------------------------------------
def _aligned_ids(kwargs, tiny_module):
    """The config kwargs with the special-token ids of the tiny build's module (top level and text_config)."""
    cfg = getattr(tiny_module, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):  # a diffusers module: no token ids
        return kwargs
    out = dict(kwargs)
    for k in TOKEN_IDS:
        if getattr(cfg, k, None) is not None:
            out[k] = getattr(cfg, k)
    text = getattr(cfg, "text_config", None)
    if text is not None and "text_config" in out:
        out["text_config"] = dict(out["text_config"], **{k: getattr(text, k) for k in TOKEN_IDS
                                                          if getattr(text, k, None) is not None})
    return out


def build_full(model, variant, device="cuda", dtype=None):
    """The model's pipeline at full size with random weights in `dtype` on `device` (meta: shapes only)."""
    import torch
    from common import plan
    dtype = dtype or torch.bfloat16
    cls, variant, spec = plan.full_spec(model, variant)
    tiny = cls.build_tiny(variant) if cls.variants else cls.build_tiny()
    modules = {}
    for name, (mcls, kwargs) in spec.items():
        mod = plan.build_component((mcls, _aligned_ids(kwargs, getattr(tiny, name, None))), device, dtype)
        if device != "meta":
            with torch.no_grad():  # parameters made with torch.empty (e.g. Z-Image's pad tokens) hold garbage
                for p in mod.parameters():
                    if not torch.isfinite(p).all():
                        p.normal_(0.0, 0.02)
        modules[name] = mod
    pipe = plan.build_pipeline(model, variant, modules=modules)
    if "image_encoder" in spec:  # CLIP's own 224 px processor: the tiny one crops to 32 px
        from transformers import CLIPImageProcessor
        pipe.register_modules(image_processor=CLIPImageProcessor())
    return pipe


# ---- one model: grpo.main in-process --------------------------------------------------------------------------------
def grpo_algorithm(args):
    """What grpo.py's --plan counts for these Args (common/plan.py)."""
    from common import plan
    return plan.Algorithm("GRPO", latents_per_sample=args.sde_window_size + 1)


def bench_args(model, variant, output_dir, prompts=2, group_size=4, tiny=False, overrides=None):
    """grpo.py's Args of the model's preset with the bench's overrides (module doc), then `overrides` (--peers)."""
    import grpo
    from common import models
    from common.cli import parse_with_presets
    argv = ["--model", model] + (["--variant", variant] if variant else []) + (["--tiny"] if tiny else [])
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, argv)
    edit = models.adapter_class(model).condition_images != "none"
    batch = args.batch_size
    k = max(2, -(-prompts * group_size // batch) * batch // prompts)  # prompts x K must fill whole batches
    if prompts * k % batch:
        raise ValueError(f"{model}: {prompts} prompts do not fill batches of {batch}; pass another --prompts")
    over = dict(finetune="lora", reward=("jpeg_compressibility",), num_epochs=2, eval_every=0, eval_before=False,
                save_every=10**6, log_with="none", output_dir=output_dir, prompts_per_epoch=prompts, group_size=k,
                gradient_steps_per_epoch=1,
                dataset=os.path.join(ROOT, "datasets", "demo-edit" if edit else "demo"))
    if not tiny:
        over.update(mixed_precision="bf16", gradient_checkpointing=True, **SIZE_OVERRIDES.get(variant, {}))
    return dataclasses.replace(args, **over, **(overrides or {}))


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ms_per_call(fn, calls):
    """Milliseconds per call of `fn` after two warm-up calls (kernel choice, allocator); the GPU's queue is drained
    before and after the timed calls, so the time is the work's, not its launch's."""
    for _ in range(2):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - t0) / calls * 1000


def _floor_inputs(run, n):
    """What a rollout of `n` samples feeds the model: noise at the training size and the conditioning of the last
    epoch's first rows (from the run's prompts encoded once, so no encoder has to come back to the GPU)."""
    import torch

    from common.args import height_width
    args = run.args
    items = [run.train_items[i] for idx, _ in run.groups.local_batches(args.num_epochs - 1, run.rank) for i in idx][:n]
    z = run.adapter.prepare_noise(len(items), *height_width(args.resolution), torch.Generator().manual_seed(0),
                                  args.num_frames)
    with run.autocast():
        return z, run.conditioning.encode(items, run.state)


def measure_floors(run, calls=FLOOR_CALLS):
    """(rollout floor, training floor) in ms per call on the finished `run`'s model: the adapter's `predict` alone at
    the rollout batch (no grad, LoRA off: the pipeline's own forward), and one forward + backward of the velocity at
    the training micro-batch (LoRA on, gradient checkpointing as the run has it); the gradients are dropped."""
    import torch
    args, adapter = run.args, run.adapter
    scales = (args.guidance_scale, args.true_cfg_scale)
    z, cond = _floor_inputs(run, args.rollout_batch_size or args.batch_size)
    adapter.transformer.eval()
    with torch.no_grad(), run.autocast(), adapter.lora_disabled():
        rollout_ms = _ms_per_call(lambda: adapter.predict(z, run.sigmas[0], cond, run.state, *scales), calls)
    z, cond = _floor_inputs(run, args.batch_size)
    sigma = run.sigmas[args.sde_window_range[0]]  # a trained step's (Wan2.2-A14B: a trained expert's)

    def forward_backward():
        with run.autocast():
            v = adapter.predict(z, sigma, cond, run.state, *scales)
        run.accelerator.backward(v.float().square().mean())

    adapter.transformer.train()
    train_ms = _ms_per_call(forward_backward, calls)
    run.optimizer.zero_grad(set_to_none=True)
    return rollout_ms, train_ms


def floor_figures(args, n_batches, phases, samples, rollout_ms, train_ms):
    """The record's floor columns: each phase's seconds over its floor times the calls the phase makes (rollout:
    steps x rollout forwards; training: trained steps x micro-batches), and samples per second of the epoch."""
    forwards = -(-n_batches // ((args.rollout_batch_size or args.batch_size) // args.batch_size))
    epoch_s = sum(phases.values())
    return dict(rollout_floor_ms=round(rollout_ms, 3), train_floor_ms=round(train_ms, 3),
                rollout_ratio=round(phases["rollout"] / (args.num_steps * forwards * rollout_ms / 1000), 3),
                train_ratio=round(phases["train"] / (args.sde_window_size * n_batches * args.num_inner_epochs
                                                     * train_ms / 1000), 3),
                images_per_s=round(samples / epoch_s, 4))


def run_one(model, variant=None, build=None, tiny=False, output_dir=None, prompts=2, group_size=4, overrides=None,
            floor_calls=FLOOR_CALLS):
    """Two GRPO epochs of `model` over the pipeline `build()` returns (default: build_full on the GPU), then its
    floors; a record of seconds per phase, floors and ratios, peak memory and activation memory (None off a GPU)."""
    import torch
    from accelerate.state import AcceleratorState

    import grpo
    from common import checkpoint, models, plan
    from common.run import Run
    cls = models.adapter_class(model, variant)
    variant = cls.check_variant(variant)
    own_dir = output_dir is None
    output_dir = output_dir or tempfile.mkdtemp(prefix="bench-gpu-")
    args = bench_args(model, variant, output_dir, prompts, group_size, tiny, overrides)
    t0 = time.perf_counter()
    pipe = build() if build else build_full(model, variant)
    build_s = time.perf_counter() - t0

    def load(name, path=None, tiny=False, device="cpu", dtype=None, variant=None, condition_max_pixels=None,
             **options):  # common.models.load's signature, over the pipeline built above
        return cls(pipe, device, dtype or torch.float32, variant=cls.check_variant(variant),
                   condition_max_pixels=condition_max_pixels, **options)

    def no_save(*a, **k):  # saving is not benchmarked: a full-size LoRA checkpoint (weights, AdamW, EMA) is GBs
        return None

    runs, finish = [], Run.finish

    def finish_kept(run):  # the floors are measured on the finished run's own model and conditioning
        runs.append(run)
        return finish(run)

    patched = [(models, "load", load), (checkpoint, "save", no_save), (cls, "save_lora", no_save),
               (Run, "finish", finish_kept)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patched]
    for obj, name, new in patched:
        setattr(obj, name, new)
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        grpo.main(plan.fit_batches(args, grpo_algorithm(args)))  # as grpo.py runs it: on a GPU, rollouts that fit
        run_s = time.perf_counter() - t0
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
    run = runs[0]
    rollout_ms, train_ms = measure_floors(run, floor_calls)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if r["epoch"] >= 0]  # epoch -1: the evaluation before training
    if own_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    last, args = epochs[-1], run.args  # the run's Args: its fitted rollout batch included
    # time/decode_s (the rollouts' VAE decoding, timed apart from the rollout) is absent from older runs
    phases = {p: last.get(f"time/{p}_s", 0.0) for p in ("rollout", "decode", "reward", "train")}
    samples = args.prompts_per_epoch * args.group_size
    rec = dict(model=model, variant=variant, status="ok", epochs=len(epochs),
               size=f"{args.resolution[0]}x{args.resolution[-1]}" + (f" x{args.num_frames}" if args.num_frames > 1
                                                                      else ""),
               batch_size=args.batch_size, rollout_batch=args.rollout_batch_size or args.batch_size, samples=samples,
               params=plan.tensor_count(pipe.transformer, buffers=False), build_s=round(build_s, 1),
               encode_s=epochs[0].get("time/encode_s"), **{f"{p}_s": v for p, v in phases.items()},
               epoch_s=round(sum(phases.values()), 3), run_s=round(run_s, 1),
               **floor_figures(args, run.n_batches, phases, samples, rollout_ms, train_ms),
               settings=plan.activation_settings(args), date=time.strftime("%Y-%m-%d"),
               peak_gb=None, training_peak_gb=None, training_static_gb=None, activation_gb=None)
    if gpu:
        rows = {r.name: r for r in plan.memory_plan(args, grpo_algorithm(args), 1)}
        # static bytes while training: encoders off (--encode-once), minus the EMA swap-in backup (no evaluation here)
        static = rows["  training, encoders off the GPU (--encode-once)" if args.encode_once else
                      "total, all on the GPU (--no-encode-once)"].bytes - rows["EMA swap-in backup"].bytes
        training_peak = last["memory/peak_gpu_gb"]  # the second epoch's: reset after the first (tracking.py)
        rec.update(peak_gb=max(e["memory/peak_gpu_gb"] for e in epochs), training_peak_gb=training_peak,
                   training_static_gb=round(static / plan.GB, 3),
                   activation_gb=round(training_peak - static / plan.GB, 3),
                   gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    return rec


# ---- results --------------------------------------------------------------------------------------------------------
COLUMNS = [("model", "model"), ("variant", "variant"), ("params", "transformer"), ("size", "size"),
           ("batch_size", "batch"), ("rollout_batch", "rollout batch"), ("samples", "samples/epoch"),
           ("build_s", "build s"), ("encode_s", "encode s"), ("rollout_s", "rollout s"), ("decode_s", "decode s"),
           ("reward_s", "reward s"), ("train_s", "train s"), ("epoch_s", "epoch s"), ("images_per_s", "samples/s"),
           ("rollout_floor_ms", "rollout floor ms"), ("rollout_ratio", "rollout / floor"),
           ("train_floor_ms", "train floor ms"), ("train_ratio", "train / floor"), ("peak_gb", "peak GB"),
           ("training_static_gb", "static GB (plan)"), ("activation_gb", "activations GB"), ("status", "status")]
# bench/results/hardware.md's table (the README's): one line per model, where each figure came from said above it
HARDWARE = [("label", "model"), ("gpu", "GPU"), ("params", "transformer"), ("size", "size"),
            ("batches", "batch rollout/train"), ("rollout_s", "rollout s"), ("train_s", "train s"),
            ("epoch_s", "epoch s"), ("images_per_s", "samples/s"), ("rollout_ratio", "rollout / floor"),
            ("train_ratio", "train / floor"), ("peak_gb", "peak GB"), ("torch", "torch"), ("date", "date"),
            ("status", "status")]


def _cell(key, rec):
    value = rec.get(key)
    if key == "label":
        return " ".join(str(v) for v in (rec["model"], rec.get("variant")) if v)
    if key == "batches" and rec.get("batch_size"):
        return f"{rec['rollout_batch']}/{rec['batch_size']}"
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e9:.2f}B"
    if key.endswith("_ratio"):
        return f"{value:.2f}x"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(records, columns):
    """A markdown table of `records`, one row each, "-" where a record has no value."""
    return ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(_cell(k, r) for k, _ in columns) + " |" for r in records]


def _commit():
    """The checkout's short commit (a copy without .git, as on a lent GPU machine: said so)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git checkout)"


def write_results(records, out_dir=RESULTS):
    """gpu.md and hardware.md (every record, failures included) and activation_memory.json (measured records merged
    into the file's earlier ones, by model:variant)."""
    from common import plan
    os.makedirs(out_dir, exist_ok=True)
    gpus = sorted({r["gpu"] for r in records if r.get("gpu")})
    lines = ["# Full-size random-weight GRPO (bench/gpu.py)", "",
             f"GPU: {', '.join(gpus) or 'none measured'}. Two GRPO epochs of grpo.py's preset per model (LoRA, bf16, "
             "gradient checkpointing, jpeg_compressibility), random weights, tiny tokenizers. Seconds: the second "
             "epoch; samples/s: samples per epoch / epoch s; floors: ms per rollout forward (predict, LoRA off) and "
             "per training forward + backward; x floor: the phase's seconds over its floor times its calls; peak GB: "
             "torch.cuda.max_memory_allocated; activations = the second epoch's peak minus the plan's static training "
             "bytes.", ""] + table(records, COLUMNS)
    with open(os.path.join(out_dir, "gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    hardware = ["# Hardware: full-size GRPO per GPU", "",
                f"Measured by `python bench/gpu.py` at commit {_commit()} (bench/gpu.py's module doc): random "
                "full-size weights, tiny tokenizers, grpo.py's preset per model (LoRA, bf16, gradient checkpointing), "
                "2 prompts x K samples, the second of two epochs. samples/s = samples per epoch / epoch s (videos "
                "for Wan); x floor = the phase's seconds over what its forwards alone take. Every column: gpu.md.",
                ""] + table(records, HARDWARE)
    with open(os.path.join(out_dir, "hardware.md"), "w") as f:
        f.write("\n".join(hardware) + "\n")
    path = os.path.join(out_dir, "activation_memory.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    runs = data.get("runs", {})
    for r in records:
        if r.get("status") == "ok" and r.get("activation_gb") is not None:
            runs[plan.activation_key(r["model"], r["variant"])] = {
                k: r.get(k) for k in ("activation_gb", "peak_gb", "training_peak_gb", "training_static_gb",
                                      "settings", "gpu", "torch")}
    data = {"note": "bench/gpu.py: activation memory per process in GB (2^30 bytes) at `settings`; common/plan.py "
                    "adds it to the static plan when a run's settings are the same", "runs": runs}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_peers(records, out_dir=RESULTS):
    """The peers table (PEERS_TABLE): each --peers record's samples per second beside the peer's published images
    per GPU per second."""
    lines = ["# Per GPU, at a peer's settings (bench/gpu.py --peers)", "",
             "Ours: one GPU, random full-size weights, 2 prompts x K samples, the second of two GRPO epochs; the "
             "peers' figures are published ones (the peer column names each source).", "",
             "| model | settings | ours: GPU | ours images/s | peer | peer images/GPU/s | ours / peer | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        peer = PEERS[f"{r['model']}:{r['variant']}"]
        ours = r.get("images_per_s")
        lines.append(f"| {_cell('label', r)} | {peer.summary} | {r.get('gpu') or '-'} | "
                     f"{'-' if ours is None else f'{ours:.3f}'} | {peer.name} ({peer.source}) | "
                     f"{peer.images_per_gpu_s:.3f} | {'-' if ours is None else f'{ours / peer.images_per_gpu_s:.2f}x'}"
                     f" | {r['status']} |")
    with open(os.path.join(out_dir, PEERS_TABLE), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


# ---- the command ----------------------------------------------------------------------------------------------------
def _failure(returncode, log_path):
    """One short status for a failed child run, from the end of its log."""
    try:
        with open(log_path) as f:
            tail = [line.strip() for line in f if line.strip()]
    except OSError:
        tail = []
    text = " ".join(tail[-5:])
    if "OutOfMemoryError" in text or "out of memory" in text:
        return "out of memory"
    return f"failed (exit {returncode}): {(tail or ['no output'])[-1][:100]}"


def _gpu_memory_gb():
    """The GPU's memory from nvidia-smi, so that this parent process holds no CUDA context of its own."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0]) / 1024  # MiB
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        import torch
        return torch.cuda.get_device_properties(0).total_memory / 2**30


def skip_reason(budget_s, left_s):
    """Why a model whose budget is `budget_s` does not start when `left_s` seconds of the total budget are left, or
    None: it starts only when its whole budget fits, so that the command cannot outlast a GPU lease."""
    if left_s <= 0:
        return "skipped: the total budget (--total-budget-s) is spent"
    if budget_s > left_s:
        return f"skipped: {int(left_s)} s of the total budget left, fewer than its budget of {budget_s:.0f} s"
    return None


def _by_size(specs, a):
    """[(static plan GB, spec)], smallest first, at the bench's settings (--peers: the peers')."""
    from common import plan
    sized = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            args = bench_args(*split_spec(spec), tmp, a.prompts, a.group_size,
                              overrides=PEERS[spec].settings if a.peers else None)
            sized.append((plan.static_peak(plan.memory_plan(args, grpo_algorithm(args), 1)) / plan.GB, spec))
    return sorted(sized)


def _run_worker(spec, budget_s, a, log_path):
    """One model in its own process under `budget_s`: its record, or its model and a status saying what stopped it."""
    model, variant = split_spec(spec)
    rec = dict(model=model, variant=variant)
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
        record_path = os.path.join(tmp, "record.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--record", record_path,
               "--prompts", str(a.prompts), "--group-size", str(a.group_size)] + (["--peers"] if a.peers else [])
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=budget_s, cwd=ROOT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                return dict(rec, status=_failure(proc.returncode, log_path))
            with open(record_path) as f:
                return json.load(f)
        except subprocess.TimeoutExpired:
            return dict(rec, status=f"over the budget ({budget_s:.0f} s)")


def main(argv=None):
    started = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="MODEL or MODEL:VARIANT, or `all` (every architecture); default: "
                   f"{' '.join(BUDGETS_S)}")
    p.add_argument("--peers", action="store_true", help="Qwen-Image and SD3.5-Medium at published peers' settings "
                   "(the peers table); ignores --models")
    p.add_argument("--budget-s", type=float, help="wall-clock seconds per model: worker start, build, 2 epochs, "
                   f"floors (default: the model's in BUDGETS_S, with --peers in PEERS, else {OTHER_BUDGET_S})")
    p.add_argument("--total-budget-s", type=float, default=TOTAL_BUDGET_S, help="wall-clock seconds of the whole "
                   "command: a model starts only when its budget fits in what is left")
    p.add_argument("--prompts", type=int, default=2, help="prompts per epoch")
    p.add_argument("--group-size", type=int, default=4, help="images per prompt (raised to fill whole batches)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)   # internal: run one MODEL[:VARIANT], write --record
    p.add_argument("--record", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch  # nothing heavier before the check: the refusal is one line
    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu.py needs a CUDA GPU; none found")
    if a.worker:
        rec = run_one(*split_spec(a.worker), prompts=a.prompts, group_size=a.group_size,
                      overrides=PEERS[a.worker].settings if a.peers else None)
        with open(a.record, "w") as f:
            json.dump(rec, f)
        return

    specs = list(PEERS) if a.peers else list(ALL_MODELS) if a.models == ["all"] else a.models or list(BUDGETS_S)
    total_gb, records, logs = _gpu_memory_gb(), [], os.path.join(a.out, "gpu_logs")
    os.makedirs(logs, exist_ok=True)
    for need, spec in _by_size(specs, a):
        model, variant = split_spec(spec)
        budget = a.budget_s or (PEERS[spec].budget_s if a.peers else BUDGETS_S.get(spec, OTHER_BUDGET_S))
        why = (f"skipped: the plan needs {need:.0f} GB, the GPU has {total_gb:.0f}" if need > total_gb else
               skip_reason(budget, a.total_budget_s - (time.monotonic() - started)))
        if why:
            rec = dict(model=model, variant=variant, status=why)
        else:
            log_path = os.path.join(logs, ("peers_" if a.peers else "") + spec.replace(":", "_") + ".log")
            print(f"{spec}: static plan {need:.1f} GB; running (budget {budget:.0f} s, log {log_path})", flush=True)
            rec = _run_worker(spec, budget, a, log_path)
        records.append(rec)
        if a.peers:
            lines = write_peers(records, a.out)
        else:
            write_results(records, a.out)  # whatever finished is on disk
        print(f"{spec}: {rec['status']}", flush=True)
    if a.peers:
        print("\n".join(lines))
    names = (PEERS_TABLE,) if a.peers else ("gpu.md", "hardware.md", "activation_memory.json")
    print(f"wrote {', '.join(os.path.join(a.out, n) for n in names)}")


if __name__ == "__main__":
    main()
