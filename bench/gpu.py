"""Full-size random-weight GRPO on one CUDA GPU: seconds per phase, peak memory and measured activation memory per
model (issue 13). Needs a CUDA GPU; without one it stops with one line.

    python bench/gpu.py                                     # every architecture, smallest first, 900 s each at most
    python bench/gpu.py --models flux1 wan2_t2v:2.1-1.3b --budget-s 600

No real weights are downloaded and the scripts cannot load random full-size weights, so each model runs grpo.py's own
`main(args)` in-process with `common.models.load` monkeypatched to return the model's adapter over a full-size
pipeline built here: the adapters' `full_configs` (common/plan.py), random weights created in bf16 directly on the
GPU. The tokenizers and processors are the tiny ones of common/models/tiny_parts.py (real tokenizers cannot be
downloaded): byte-level, so chat-templated prompts (Qwen-Image, Z-Image, FLUX.2-klein) run longer than with the real
tokenizers, padded encoders (T5, UMT5, Mistral at max_sequence_length) are unaffected, and Qwen-Image-Edit's VL
encoder sees fewer image tokens; Wan2.1 image-to-video gets CLIP's real 224 px image processor.

Settings: grpo.py's preset of each model (resolution, frames, steps, CFG, SDE window, batch size), LoRA at the preset
rank, --mixed-precision bf16, gradient checkpointing, the demo prompts (datasets/demo; edit and image-to-video models
datasets/demo-edit) and the weight-free jpeg_compressibility reward; two epochs of --prompts x --group-size samples
(2 x 4 by default, instead of 48 x 16) with one optimizer step each, no evaluation, nothing saved (saving is not
benchmarked: a full-size LoRA checkpoint with its AdamW state and EMA is gigabytes).
Phase seconds are the second epoch's (the first includes CUDA warm-up and the one-off prompt encoding).

Each model runs in its own subprocess, under a wall-clock budget (--budget-s): an out-of-memory error or a timeout
leaves the GPU clean for the next. Whatever finished is written after every model:
  bench/results/gpu.md                   the table
  bench/results/activation_memory.json   activation memory = the second epoch's peak (encoders off the GPU, optimizer
                                         state allocated) minus memory_plan's static training bytes; `--plan` reads it
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
# one variant per architecture (z-image base, qwen-image original, klein base, Wan I2V 720P and Qwen-Image-Edit-2509
# share one); sorted smallest first at run time
DEFAULT_MODELS = ("flux1", "flux1-kontext", "sd3_5:medium", "sd3_5:large", "z-image:turbo", "qwen-image:2512",
                  "qwen-image-edit-plus:2511", "flux2", "flux2-klein:4b", "flux2-klein:9b", "wan2_t2v:2.1-1.3b",
                  "wan2_t2v:2.1-14b", "wan2_t2v:2.2-ti2v-5b", "wan2_t2v:2.2-a14b", "wan2_i2v:2.1-14b-480p",
                  "wan2_i2v:2.2-a14b")
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


def bench_args(model, variant, output_dir, prompts=2, group_size=4, tiny=False):
    """grpo.py's Args of the model's preset with the bench's overrides (module doc)."""
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
    return dataclasses.replace(args, **over)


def run_one(model, variant=None, build=None, tiny=False, output_dir=None, prompts=2, group_size=4):
    """Two GRPO epochs of `model` over the pipeline `build()` returns (default: build_full on the GPU); a record of
    seconds per phase, peak memory and activation memory (None off a GPU)."""
    import torch
    from accelerate.state import AcceleratorState

    import grpo
    from common import checkpoint, models, plan
    cls = models.adapter_class(model, variant)
    variant = cls.check_variant(variant)
    own_dir = output_dir is None
    output_dir = output_dir or tempfile.mkdtemp(prefix="bench-gpu-")
    args = bench_args(model, variant, output_dir, prompts, group_size, tiny)
    t0 = time.perf_counter()
    pipe = build() if build else build_full(model, variant)
    build_s = time.perf_counter() - t0

    def load(name, path=None, tiny=False, device="cpu", dtype=None, variant=None, condition_max_pixels=None,
             **options):  # common.models.load's signature, over the pipeline built above
        return cls(pipe, device, dtype or torch.float32, variant=cls.check_variant(variant),
                   condition_max_pixels=condition_max_pixels, **options)

    def no_save(*a, **k):  # saving is not benchmarked: a full-size LoRA checkpoint (weights, AdamW, EMA) is GBs
        return None

    patched = [(models, "load", load), (checkpoint, "save", no_save), (cls, "save_lora", no_save)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patched]
    for obj, name, new in patched:
        setattr(obj, name, new)
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        grpo.main(args)
        run_s = time.perf_counter() - t0
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if r["epoch"] >= 0]  # epoch -1: the evaluation before training
    if own_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    last = epochs[-1]
    phases = {p: last.get(f"time/{p}_s", 0.0) for p in ("rollout", "reward", "train")}
    rec = dict(model=model, variant=variant, status="ok", epochs=len(epochs),
               size=f"{args.resolution[0]}x{args.resolution[-1]}" + (f" x{args.num_frames}" if args.num_frames > 1
                                                                      else ""),
               batch_size=args.batch_size, samples=args.prompts_per_epoch * args.group_size,
               params=plan.tensor_count(pipe.transformer, buffers=False), build_s=round(build_s, 1),
               encode_s=epochs[0].get("time/encode_s"), **{f"{p}_s": v for p, v in phases.items()},
               epoch_s=round(sum(phases.values()), 3), run_s=round(run_s, 1), settings=plan.activation_settings(args),
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
           ("batch_size", "batch"), ("samples", "samples/epoch"), ("build_s", "build s"), ("encode_s", "encode s"),
           ("rollout_s", "rollout s"), ("reward_s", "reward s"), ("train_s", "train s"), ("epoch_s", "epoch s"),
           ("peak_gb", "peak GB"), ("training_static_gb", "static GB (plan)"), ("activation_gb", "activations GB"),
           ("status", "status")]


def _cell(key, value):
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e9:.2f}B"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_results(records, out_dir=RESULTS):
    """gpu.md (every record, failures included) and activation_memory.json (measured records merged into the file's
    earlier ones, by model:variant)."""
    from common import plan
    os.makedirs(out_dir, exist_ok=True)
    gpus = sorted({r["gpu"] for r in records if r.get("gpu")})
    lines = ["# Full-size random-weight GRPO (bench/gpu.py)", "",
             f"GPU: {', '.join(gpus) or 'none measured'}. Two GRPO epochs of grpo.py's preset per model (LoRA, bf16, "
             "gradient checkpointing, jpeg_compressibility), random weights, tiny tokenizers. Seconds: the second "
             "epoch; peak GB: torch.cuda.max_memory_allocated; activations = the second epoch's peak minus the plan's "
             "static training bytes.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |")
    with open(os.path.join(out_dir, "gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="MODEL or MODEL:VARIANT")
    p.add_argument("--budget-s", type=float, default=900, help="wall-clock seconds per model (build + 2 epochs)")
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
        rec = run_one(*split_spec(a.worker), prompts=a.prompts, group_size=a.group_size)
        with open(a.record, "w") as f:
            json.dump(rec, f)
        return

    from common import plan
    total_gb = _gpu_memory_gb()
    sized = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.models:  # smallest first, by the plan's static peak at the bench's settings
            model, variant = split_spec(spec)
            args = bench_args(model, variant, tmp, a.prompts, a.group_size)
            rows = plan.memory_plan(args, grpo_algorithm(args), 1)
            sized.append((plan.static_peak(rows) / plan.GB, spec))
    records, logs = [], os.path.join(a.out, "gpu_logs")
    os.makedirs(logs, exist_ok=True)
    for need, spec in sorted(sized):
        model, variant = split_spec(spec)
        rec = dict(model=model, variant=variant)
        if need > total_gb:
            records.append(dict(rec, status=f"skipped: the plan needs {need:.0f} GB, the GPU has {total_gb:.0f}"))
            write_results(records, a.out)
            continue
        log_path = os.path.join(logs, spec.replace(":", "_") + ".log")
        with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
            record_path = os.path.join(tmp, "record.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--record", record_path,
                   "--prompts", str(a.prompts), "--group-size", str(a.group_size)]
            print(f"{spec}: static plan {need:.1f} GB; running (budget {a.budget_s:.0f} s, log {log_path})", flush=True)
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=a.budget_s, cwd=ROOT,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode == 0:
                    with open(record_path) as f:
                        rec = json.load(f)
                else:
                    rec["status"] = _failure(proc.returncode, log_path)
            except subprocess.TimeoutExpired:
                rec["status"] = f"over the budget ({a.budget_s:.0f} s)"
        records.append(rec)
        write_results(records, a.out)  # whatever finished is on disk
        print(f"{spec}: {rec['status']}", flush=True)
    print(f"wrote {os.path.join(a.out, 'gpu.md')} and {os.path.join(a.out, 'activation_memory.json')}")


if __name__ == "__main__":
    main()
