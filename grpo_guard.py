"""GRPO-Guard: grpo.py with regulated clipping (RatioNorm) and per-step 1/Delta loss reweighting.

The Flow-SDE log-ratio is biased (mean -m/(2s^2)) and its spread scales like 1/s, so a symmetric clip acts
unevenly across steps. RatioNorm replaces it by log rho~ = s (l_theta - l_old) + m/(2s) = mean_d(xi delta):
zero-mean under the sampling noise with a step-independent scale; each step's policy loss is divided by
Delta = sigma - sigma_next. Paper: GRPO-Guard (arXiv 2510.22319). Math: docs/grpo_guard.md, ALGORITHMS.md D.

    python grpo_guard.py                                              # embedded shapes world + model on a CPU
    python grpo_guard.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch grpo_guard.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 grpo_guard.py --model flux1 --dataset data/my_prompts
"""
import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import rewards
from common import checkpoint, checks, conditioning, data, evaluation, models, plan, sampler, sharding, tracking
from common.advantages import epoch_advantages
from common.cli import ConfigError, errors_as_one_line, height_width, parse_with_presets, set_cpu_threads
from common.ema import EMA


@dataclass
class Args:
    # Experiment
    exp_name: str = "grpo_guard"
    """name of this run (used in the tracker run name)"""
    seed: int = 42
    """seed of prompts, noise and SDE windows (same seed + same flags = same run)"""
    output_dir: str = "runs/grpo_guard"
    """where metrics.jsonl, samples/, checkpoints/ and lora/ are written"""
    log_with: Literal["tensorboard", "wandb", "swanlab", "none"] = "tensorboard"
    """experiment tracker"""
    resume_from: str | None = None
    """'latest' (the newest good checkpoint; none yet: start fresh) or a checkpoint folder to resume from exactly"""
    overwrite: bool = False
    """start fresh in an --output-dir that holds another run's checkpoints, removing that run's outputs"""
    # Model
    model: str = "shapes"
    """shapes (the embedded FLUX.1-architecture model, CPU), flux1, flux1-kontext, sd3_5, z-image, qwen-image,
    qwen-image-edit-plus, flux2, flux2-klein, wan2_t2v (video) or wan2_i2v (image-to-video)"""
    model_path: str | None = None
    """hub id or local folder of the diffusers pipeline (if unset: the model's hub id)"""
    tiny: bool = False
    """use tiny random-weight components built in code (no download; CPU tests and demos)"""
    variant: str | None = None
    """model variant, e.g. sd3_5: medium|large, wan2_t2v: 2.1-1.3b|2.1-14b|2.2-ti2v-5b|2.2-a14b (hub id, tiny build)"""
    train_experts: Literal["high", "low", "both"] = "both"
    """Wan2.2-A14B: which experts train: the high-noise `transformer`, the low-noise `transformer_2`, or both"""
    finetune: Literal["lora", "full"] = "lora"
    """train LoRA adapters or all transformer weights"""
    lora_rank: int = 64
    """LoRA rank"""
    lora_alpha: int = 128
    """LoRA alpha (scale = alpha / rank)"""
    lora_targets: tuple[str, ...] = ()
    """LoRA target module suffixes (if unset: the model's list)"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """frozen weights and forwards in this precision; trainable weights stay fp32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    attention_backend: str | None = None
    """diffusers attention backend, e.g. flash, _native_cudnn, sage (if unset: native SDPA)"""
    fsdp: bool = False
    """shard the trained transformer(s) over the processes of `accelerate launch` with torch FSDP2 (README)"""
    plan: bool = False
    """print the run's memory plan per process (1 GPU and FSDP over 8; no weights load) and exit"""
    compile: bool = False
    """torch.compile the transformer: the first steps compile (a minute on a CPU), later ones run faster"""
    # Data and reward
    dataset: str = "datasets/demo"
    """dataset folder with train.txt|jsonl (+ test.txt|jsonl, images/, videos/)"""
    image_dir: str | None = None
    """folder for relative image paths (if unset: <dataset>/images)"""
    video_dir: str | None = None
    """folder for relative video paths (if unset: <dataset>/videos)"""
    condition_max_pixels: int | None = None
    """cap on the area of condition images (edit models), in pixels (if unset: the pipeline's own)"""
    reward: tuple[str, ...] = ("pickscore",)
    """rewards as NAME[:WEIGHT] or a dotted path package.module.Reward[:WEIGHT]"""
    reward_paths: tuple[str, ...] = ()
    """local folders overriding reward hub ids, as NAME=PATH"""
    reward_frame_stride: int = 1
    """videos: the image rewards score every this many frames (a video's score is the mean over them)"""
    async_rewards: bool = False
    """score each micro-batch in a background thread while the next one rolls out (joined before the advantages)"""
    advantage_aggregation: Literal["sum", "gdpo"] = "sum"
    """'sum': z-score the weighted reward sum per group; 'gdpo': z-score each reward, sum, re-standardise"""
    global_std: bool = False
    """divide by the std of all rewards of the epoch instead of the group's ('sum' only)"""
    # Sampling
    resolution: tuple[int, ...] = (512,)
    """training size: SIZE (square) or HEIGHT WIDTH"""
    num_frames: int = 1
    """frames per training video (4k+1; 1 for image models)"""
    num_steps: int = 10
    """denoising steps of a rollout"""
    guidance_scale: float = 3.5
    """the pipeline's guidance_scale: distilled guidance (FLUX.1, Kontext, FLUX.2) or CFG (SD3.5, Z-Image, klein base)"""
    true_cfg_scale: float = 1.0
    """the pipeline's true_cfg_scale (FLUX.1, Qwen-Image): CFG when > 1 and a negative prompt is given"""
    guidance_scale_2: float | None = None
    """Wan2.2-A14B: CFG scale of the low-noise expert (if unset: guidance_scale)"""
    negative_prompt: str | None = None
    """negative prompt for rows that give none (enables true CFG)"""
    max_sequence_length: int = 512
    """text tokens for the T5 encoder"""
    encode_once: bool = True
    """encode every prompt once before training, keep it on the CPU, move the text encoders off the accelerator"""
    dynamics: Literal["Flow-SDE", "Dance-SDE", "CPS"] = "Flow-SDE"
    """stochastic step inside the SDE window"""
    noise_level: float = 0.7
    """eta, the SDE noise level"""
    sde_window_size: int = 1
    """number of consecutive SDE (trained) steps per rollout"""
    sde_window_range: tuple[int, int] = (1, 4)
    """the window lies in steps [lo, hi); its start is drawn per epoch"""
    latent_storage_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of stored trajectory latents (log-probs are taken after the round trip)"""
    offload_samples: bool = False
    """keep each rollout micro-batch's stored latents and conditioning on CPU until it trains (video memory)"""
    group_size: int = 16
    """K, images per prompt"""
    prompts_per_epoch: int = 48
    """M, distinct prompts per epoch (M*K must divide by num_processes*batch_size)"""
    batch_size: int = 2
    """micro-batch per process, for rollout and training alike"""
    rollout_batch_size: int | None = None
    """samples per rollout forward, a multiple of batch_size (if unset: batch_size); rollouts keep no activations"""
    # Training
    learning_rate: float = 3e-4
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    gradient_steps_per_epoch: int = 2
    """G, optimizer steps per inner epoch (2: half on-policy, half off-policy)"""
    num_inner_epochs: int = 1
    """passes over an epoch's samples"""
    clip_range: float = 1e-4
    """PPO clip epsilon on the per-element ratio"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip"""
    adv_eps: float = 1e-4
    """added to the std when normalising advantages"""
    kl_beta: float = 0.0
    """weight of the KL penalty to the reference model (0: off, no reference)"""
    kl_type: Literal["x-based", "v-based"] = "x-based"
    """x-based: exact Gaussian transition KL; v-based: mean squared velocity difference"""
    ref_device: str | None = None
    """device of the frozen reference copy for full fine-tuning (if unset: the training device)"""
    ema_decay: float = 0.9
    """EMA decay of the trained weights used for evaluation and saving"""
    ema_interval: int = 4
    """update the EMA every this many epochs"""
    ema_on_cpu: bool = False
    """keep the evaluation EMA's fp32 copy of the trained weights on the CPU (frees accelerator memory)"""
    # GRPO-Guard
    delta_reweight: bool = True
    """divide each step's policy loss by Delta = sigma - sigma_next (--no-delta-reweight: RatioNorm only)"""
    # Schedule and outputs
    num_epochs: int = 100
    """training epochs"""
    eval_every: int = 10
    """evaluate every this many epochs (and after the last; 0: never)"""
    eval_before: bool = True
    """evaluate the base model before training"""
    eval_resolution: tuple[int, ...] = (512,)
    """evaluation size: SIZE or HEIGHT WIDTH"""
    eval_num_frames: int = 1
    """frames per evaluation video"""
    eval_num_steps: int = 20
    """evaluation ODE steps"""
    eval_num_prompts: int = 32
    """test prompts per evaluation (the test split, else the train split)"""
    eval_batch_size: int = 8
    """images per evaluation forward"""
    eval_seed: int = 10_000
    """test prompt i is sampled from noise seed eval_seed + i (change it to measure evaluation noise)"""
    save_every: int = 10
    """checkpoint every this many epochs (and after the last)"""
    checkpoints_total_limit: int = 3
    """keep this many checkpoints"""


HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: a resume by another algorithm is refused
GPU = dict(mixed_precision="bf16", gradient_checkpointing=True, latent_storage_dtype="fp16")
PRESETS = {
    # the embedded default: GRPO-Guard on the shapes world with the rule-checked reward, on a CPU (README)
    "shapes": dict(model_path=os.path.join(HERE, "models/shapes-flux"), dataset=os.path.join(HERE, "datasets/shapes"),
                   reward=("shapes",), resolution=64,
                   eval_resolution=64, num_steps=10, eval_num_steps=10, guidance_scale=1.0, true_cfg_scale=3.0,
                   negative_prompt="", max_sequence_length=16, group_size=8, prompts_per_epoch=8, batch_size=16,
                   finetune="full", learning_rate=3e-5, sde_window_size=2, sde_window_range=(0, 6),
                   noise_level=0.8, clip_range=1e-3, num_epochs=30, eval_every=30, eval_num_prompts=480,
                   eval_batch_size=64, save_every=30, ema_decay=0.5, ema_interval=1, log_with="none",
                   output_dir="runs/grpo_guard-shapes"),
    # every real model: bf16 forwards, gradient checkpointing, fp16 stored latents
    # FLUX.1-dev LoRA: 1 SDE step of steps 1-3, eta 0.7, K=16 x 48 prompts, 10 train / 20 eval steps at 512
    # (the Args defaults); each model's sampling settings are its adapter's `preset`, these add GRPO's
    "flux1": GPU, "z-image": GPU,
    "flux1-kontext": dict(**GPU, resolution=384, noise_level=0.9),
    "sd3_5": dict(**GPU, group_size=24, noise_level=0.8, sde_window_size=2, sde_window_range=(1, 6), ema_decay=0.99),
    **{m: dict(**GPU, noise_level=1.0) for m in ("qwen-image", "qwen-image-edit-plus", "flux2")},
    "flux2-klein": dict(**GPU, noise_level=0.5, sde_window_range=(1, 3)),
    # Wan (VIDEO.md recipes: eta 0.9, 10 steps): the window range 1-5 reaches both Wan2.2-A14B experts at shift 3
    # (high-noise steps 0-3, low-noise 4-9), so --train-experts both works; the 2.1 recipe keeps steps 1-3
    **{m: dict(**GPU, noise_level=0.9, sde_window_range=(1, 6)) for m in ("wan2_t2v", "wan2_i2v")},
}
TINY_PRESETS = {
    # every model (--tiny): a few seconds per epoch on a CPU: 64 px, 4 steps, 4 prompts x 4 images, weight-free reward
    "*": dict(resolution=64, eval_resolution=64, num_steps=4, eval_num_steps=4, group_size=4,
              prompts_per_epoch=4, batch_size=2, lora_rank=4, lora_alpha=8, max_sequence_length=32,
              reward=("jpeg_compressibility",), num_epochs=2, eval_every=1, save_every=1, eval_num_prompts=4,
              sde_window_size=2, sde_window_range=(0, 4), learning_rate=1e-3, clip_range=1e-3,
              ema_interval=1, mixed_precision="no", gradient_checkpointing=False, output_dir="runs/grpo_guard-tiny"),
    # image-conditioned models read the demo edit dataset, condition images at 64 px
    **{m: dict(dataset=os.path.join(HERE, "datasets/demo-edit"), condition_max_pixels=64 * 64)
       for m in ("flux1-kontext", "qwen-image-edit-plus")},
    # video models: 5 frames; image-to-video takes the demo edit dataset's images as first frames
    "wan2_t2v": dict(num_frames=5, eval_num_frames=5),
    "wan2_i2v": dict(num_frames=5, eval_num_frames=5, dataset=os.path.join(HERE, "datasets/demo-edit")),
}


# ALGO LOGIC: the GRPO loss
def ppo_clip_loss(log_prob, old_log_prob, adv, clip_range):
    """PPO-clipped policy loss (ALGORITHMS.md C.4); returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(-adv * ratio, -adv * clipped).mean(), ratio


def guard_log_ratio(log_prob, old_log_prob, mean, old_mean, std):
    """RatioNorm (ALGORITHMS.md D.2): log rho~ = s (l_theta - l_old) + m / (2 s), (B,), with s the step's
    transition std per sample and m = mean_d (mu_theta - mu_old)^2 (gradient through mu_theta)."""
    s = std.reshape(-1).expand_as(log_prob)
    m = ((mean - old_mean) ** 2).mean(tuple(range(1, mean.dim())))
    return s * (log_prob - old_log_prob) + m / (2 * s)


def kl_penalty(kl_type, v, v_ref, mean, mean_ref, std):
    """x-based: exact per-element KL of the two Gaussian transitions; v-based: mean (v - v_ref)^2."""
    dims = tuple(range(1, v.dim()))
    if kl_type == "v-based":
        return ((v - v_ref) ** 2).mean(dims).mean()
    return ((mean - mean_ref) ** 2 / (2 * std**2)).mean(dims).mean()


def check_args(args, world_size):
    """Everything that can be checked before a model loads: this algorithm's flags, then the run's."""
    lo, hi = args.sde_window_range
    if not (1 <= args.sde_window_size and 0 <= lo and lo + args.sde_window_size <= min(hi, args.num_steps)):
        raise ConfigError(f"--sde-window-size {args.sde_window_size} does not fit --sde-window-range {lo} {hi} "
                          f"within {args.num_steps} steps")
    if args.noise_level <= 0:
        raise ConfigError("--noise-level must be > 0: GRPO needs stochastic steps")
    if args.dynamics != "Flow-SDE":
        raise ConfigError(f"GRPO-Guard supports --dynamics Flow-SDE only, got {args.dynamics}")
    return checks.check_run(args, world_size, SCRIPT, steps=range(lo, min(hi, args.num_steps)))  # Wan2.2-A14B: the trained steps' experts


def main(args: Args):
    # SHARED: setup
    # cpu=True without CUDA: `accelerate launch --multi_gpu --num_processes N` then runs N CPU processes over gloo
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(),
                              log_with=None if args.log_with == "none" else args.log_with,
                              project_dir=args.output_dir, kwargs_handlers=[models.ddp_kwargs(args)])
    train_items, test_items, group_sampler, reward_paths, resume = check_args(args, accelerator.num_processes)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if device.type == "cpu":
        set_cpu_threads(world)
    set_seed(args.seed, device_specific=True)
    storage_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.latent_storage_dtype]
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]

    # SHARED: model
    adapter = models.load(args.model, args.model_path, tiny=args.tiny, device=device, dtype=weight_dtype,
                          variant=args.variant, condition_max_pixels=args.condition_max_pixels,
                          train_experts=args.train_experts, guidance_scale_2=args.guidance_scale_2)
    transformer = adapter.trained_module()  # the transformer (Wan2.2-A14B: its trained experts as one module)
    if args.attention_backend:
        transformer.set_attention_backend(args.attention_backend)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.compile:  # compiled in place: parameter names, LoRA export and checkpoints are unchanged
        transformer.compile()
    if args.finetune == "lora":
        n_lora = adapter.add_lora(args.lora_rank, args.lora_alpha, args.lora_targets or None)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32 under mixed precision
        accelerator.print(f"LoRA rank {args.lora_rank} on {n_lora} modules")
    else:
        transformer.requires_grad_(True)
    ref_model = None
    if args.kl_beta > 0 and args.finetune == "full":
        ref_model = copy.deepcopy(transformer).requires_grad_(False).to(args.ref_device or device)
    if args.fsdp:  # torch's fully_shard on the blocks and roots, over accelerate's process group (after LoRA)
        sharding.shard_module(transformer, args.mixed_precision)
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    reward_set = rewards.load_rewards(list(args.reward), reward_paths, device=device,
                                      frame_stride=args.reward_frame_stride)
    checks.check_rewards(reward_set, adapter, args, train_items)  # a broken reward stops here, before any write

    # SHARED: optimizer, EMA, resume
    optimizer = torch.optim.AdamW(params.values(), lr=args.learning_rate, weight_decay=args.weight_decay)
    ema = EMA(params.values(), interval=args.ema_interval, schedule="power", decay=args.ema_decay,
              device="cpu" if args.ema_on_cpu else None)
    if args.fsdp:  # a sharded module stays out of accelerator.prepare, which would wrap it in DDP
        optimizer = accelerator.prepare(optimizer)
    else:
        adapter.transformer, optimizer = accelerator.prepare(transformer, optimizer)
    start_epoch, global_step = 0, 0
    if resume:
        state = (checkpoint.load_sharded if args.fsdp else checkpoint.load)(resume, params, optimizer, ema)
        start_epoch, global_step = state["epoch"] + 1, state["step"]
        accelerator.print(f"resumed from {resume} at epoch {start_epoch}")
    elif args.resume_from:  # `latest` with no checkpoint yet: the same command starts the run
        accelerator.print(f"--resume-from {args.resume_from}: no checkpoint in {args.output_dir}; starting fresh")
    if accelerator.is_main_process:  # the folder is touched only once the model and a resume have loaded
        if args.overwrite and not resume:  # every check passed and the model loaded: only now the old outputs go
            checkpoint.clear_run(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=1)
    if args.log_with != "none":
        accelerator.init_trackers(args.exp_name, config={k: str(v) for k, v in dataclasses.asdict(args).items()})
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process and not resume and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log; a resumed run appends
    elif accelerator.is_main_process and resume:  # after the lines of epochs the checkpoint does not hold
        tracking.keep_epochs_before(metrics_path, start_epoch)
    timer = tracking.Timer()
    n_batches = group_sampler.num_batches
    # ALGO LOGIC: trained steps and banner
    n_train = args.sde_window_size
    algo_state = {}  # nothing beyond weights, optimizer and EMA to checkpoint
    grad_accum = n_batches // args.gradient_steps_per_epoch * n_train  # micro-steps per optimizer step
    accelerator.print(f"***** GRPO: {args.prompts_per_epoch} prompts x {args.group_size} images per epoch, "
                      f"{world} processes x {n_batches} batches of {args.batch_size}, {n_train} trained steps each, "
                      f"{args.gradient_steps_per_epoch} optimizer steps per inner epoch *****")

    # SHARED: conditioning and reward
    negatives = args.negative_prompt is not None or any(it.negative_prompt for it in train_items + test_items)

    def encode_now(items, state):  # negative prompts for every row when any row has one (CFG on for all)
        images = None if adapter.condition_images == "none" else [[data.load_image(p) for p in it.images]
                                                                  for it in items]
        return adapter.encode_prompt([it.prompt for it in items], [it.negative_prompt or args.negative_prompt or ""
                                                                   for it in items] if negatives else None,
                                     args.max_sequence_length, images, state)

    def encode(items, state):  # a batch's conditioning: from the rows encoded once (--encode-once), or now
        return cache.get(items, state, device) if cache is not None else encode_now(items, state)

    def shown(items, images):  # sample grids put an edit model's condition images beside its output
        return tracking.with_conditions(images, [it.images if adapter.condition_images != "none" else []
                                                 for it in items])

    def predictor(cond, state, sigmas):
        return lambda z, i: adapter.predict(z, sigmas[i], cond, state, args.guidance_scale, args.true_cfg_scale)

    def score(items, images):
        return reward_set.score(images, [it.prompt for it in items], data.reward_metadata(items))

    reward_pool = concurrent.futures.ThreadPoolExecutor(1) if args.async_rewards else None  # one scorer at a time
    cache = None
    if args.encode_once:  # every prompt this process will see, once, kept on the CPU; then the encoders move off
        with timer("encode"):
            cache = conditioning.encode_once(encode_now, adapter, args, group_sampler, train_items, test_items,
                                             rank, world, range(start_epoch, args.num_epochs))
        accelerator.print(cache.summary(timer.seconds["encode"]))

    # SHARED: evaluation
    def evaluate(epoch):  # held-out ODE samples with the EMA weights: metrics and the grid's images
        with ema.swapped_in(), accelerator.autocast():
            return evaluation.evaluate(accelerator, adapter, test_items, encode, predictor, score, shown,
                                       reward_set, args, epoch)

    base_eval = None
    if args.eval_before and start_epoch == 0 and args.eval_every > 0:
        with timer("eval"):
            base_eval, base_images = evaluate(-1)
        if accelerator.is_main_process:
            tracking.append_jsonl(metrics_path, {"epoch": -1, **base_eval, **timer.pop(),
                                                 **tracking.peak_memory_gb(device)})

    for epoch in tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs,
                      disable=not accelerator.is_local_main_process):  # the whole run's bar, with its estimate
        # ---- SAMPLING ----
        plan = group_sampler.plan(epoch)
        window = sampler.draw_sde_window(args.num_steps, args.sde_window_size, *args.sde_window_range,
                                         seed=args.seed * 100_003 + epoch)
        state = adapter.make_state(*height_width(args.resolution), args.num_frames)
        sigmas = adapter.sigmas(args.num_steps, state).to(device)
        samples = []
        adapter.transformer.eval()
        batches = group_sampler.local_batches(epoch, rank)
        per = (args.rollout_batch_size or args.batch_size) // args.batch_size  # micro-batches per rollout forward
        for c in tqdm(range(0, len(batches), per), desc=f"epoch {epoch} rollout",
                      disable=not accelerator.is_local_main_process, leave=False):
            chunk = batches[c:c + per]
            items = [train_items[i] for idx, _ in chunk for i in idx]
            gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * 10_007 + rank * n_batches + b)
                    for b in range(c, c + len(chunk))]  # per global micro-batch: the same noise at any width
            with timer("rollout"), accelerator.autocast():
                cond = encode(items, state)
                z = torch.cat([adapter.prepare_noise(len(idx), *height_width(args.resolution), g, args.num_frames)
                               for (idx, _), g in zip(chunk, gens)])
                traj = sampler.rollout(predictor(cond, state, sigmas), z, sigmas, window, args.noise_level, args.dynamics,
                                       generator=[torch.Generator(device).manual_seed(g.initial_seed() + 1) for g in gens],
                                       storage_dtype=storage_dtype, keep_means=True)
                images = adapter.decode(traj.final, state, cond)
            for b, rows in enumerate(sampler.micro_batches(len(items), args.batch_size), start=c):  # training's batches
                t, part = traj.rows(rows), items[rows]
                with timer("reward"):  # --async-rewards: a future, scored while the next micro-batch rolls out
                    scores = reward_pool.submit(score, part, images[rows]) if reward_pool else score(part, images[rows])
                samples.append(dict(cond=adapter.select(cond, rows), latents=t.latents, log_probs=t.log_probs,
                                    means=t.means, scores=scores))
                if args.offload_samples:  # back to the device one micro-batch at a time in training
                    samples[-1] = sampler.to_device(samples[-1], "cpu")
                if b == 0 and accelerator.is_main_process and args.eval_every and (epoch + 1) % args.eval_every == 0:
                    tracking.save_samples(accelerator, os.path.join(args.output_dir, "samples"), f"train_epoch{epoch:04d}",
                                          shown(part, images[rows].cpu()), [it.prompt for it in part], epoch)

        # ---- ADVANTAGES ----
        with timer("reward"):
            for s in samples if reward_pool else ():  # join the background scoring, in rollout order
                s["scores"] = s["scores"].result()
            raw = {k: accelerator.gather(torch.cat([s["scores"][k] for s in samples]).to(device)).cpu()
                   for k in reward_set.names}
            raw, adv_all = epoch_advantages(raw, reward_set, plan.groups, args)  # group-wise ranks, then advantages
            n_local = len(adv_all) // world
            adv_local = adv_all[rank * n_local:(rank + 1) * n_local].to(device)
            for s, a in zip(samples, adv_local.split(args.batch_size)):
                s["adv"] = a

        # ---- TRAINING ----
        stats = {"loss": [], "policy_loss": [], "kl": [], "ratio": [], "clipfrac": [], "approx_kl": []}
        onpolicy_dev = None  # |ratio - 1| of the first micro-batch: 0 unless rollout and training disagree
        adapter.transformer.train()
        micro = 0
        with timer("train"):
            for inner in range(args.num_inner_epochs):
                # the first pass keeps the rollout batches, so the first micro-batch is exactly on-policy
                order = list(range(len(samples))) if inner == 0 else torch.randperm(
                    len(samples), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch * 10 + inner)).tolist()
                for b in tqdm(order, desc=f"epoch {epoch} train", disable=not accelerator.is_local_main_process,
                              leave=False):
                    s = sampler.to_device(samples[b], device)  # a no-op unless --offload-samples
                    for j in window:
                        sync = (micro + 1) % grad_accum == 0
                        with (contextlib.nullcontext() if sync else sharding.no_sync(adapter.transformer)):
                            with accelerator.autocast():
                                z, z_next = s["latents"][j].float(), s["latents"][j + 1].float()
                                v = adapter.predict(z, sigmas[j], s["cond"], state, args.guidance_scale,
                                                    args.true_cfg_scale)
                                out = sampler.sde_step(z, v, sigmas[j], sigmas[j + 1], args.noise_level, args.dynamics,
                                                       sigmas[1], z_next=z_next)
                            log_ratio = guard_log_ratio(out.log_prob, s["log_probs"][j], out.mean, s["means"][j], out.std)
                            policy_loss, ratio = ppo_clip_loss(log_ratio, 0.0, s["adv"], args.clip_range)  # rho~
                            if args.delta_reweight:  # per-step gradient scale independent of the step size
                                policy_loss = policy_loss / (sigmas[j] - sigmas[j + 1])
                            loss, kl = policy_loss, torch.zeros(())
                            if args.kl_beta > 0:
                                with torch.no_grad(), accelerator.autocast():
                                    if ref_model is None:
                                        with adapter.lora_disabled():
                                            v_ref = adapter.predict(z, sigmas[j], s["cond"], state,
                                                                    args.guidance_scale, args.true_cfg_scale)
                                    else:
                                        adapter.transformer, live = ref_model.to(device), adapter.transformer
                                        v_ref = adapter.predict(z, sigmas[j], s["cond"], state,
                                                                args.guidance_scale, args.true_cfg_scale)
                                        adapter.transformer = live
                                        ref_model.to(args.ref_device or device)  # back to where it is kept
                                    mean_ref, _ = sampler.step_mean_std(z, v_ref, sigmas[j], sigmas[j + 1],
                                                                        args.noise_level, args.dynamics, sigmas[1])
                                kl = kl_penalty(args.kl_type, v, v_ref, out.mean, mean_ref, out.std)
                                loss = loss + args.kl_beta * kl
                            accelerator.backward(loss / grad_accum)
                        if sync:
                            grad_norm = (sharding.clip_grad_norm_ if args.fsdp else accelerator.clip_grad_norm_)(
                                params.values(), args.max_grad_norm)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                            global_step += 1
                        micro += 1
                        log_ratio = log_ratio.detach()
                        if onpolicy_dev is None:
                            onpolicy_dev = (ratio.detach() - 1).abs().max()
                        stats["loss"].append(loss.detach())
                        stats["policy_loss"].append(policy_loss.detach())
                        stats["kl"].append(kl.detach())
                        stats["ratio"].append(ratio.detach())
                        stats["clipfrac"].append(((ratio.detach() - 1).abs() > args.clip_range).float().mean())
                        stats["approx_kl"].append(0.5 * (log_ratio**2).mean())
        ema.step(epoch)

        # SHARED: logging
        record = {"epoch": epoch, "step": global_step, "samples": len(adv_all), "sde_window": window,
                  "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm) if global_step else None,
                  **tracking.epoch_stats(accelerator, raw, adv_all, stats, onpolicy_dev)}
        last = epoch == args.num_epochs - 1
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            with timer("eval"):
                final_eval, final_images = evaluate(epoch)
                record.update(final_eval)
        record.update(timer.pop())
        record.update(tracking.peak_memory_gb(device))
        if accelerator.is_main_process:
            tracking.log_epoch(accelerator, metrics_path, record)

        # SHARED: checkpoint
        if (epoch + 1) % args.save_every == 0 or last:
            accelerator.wait_for_everyone()
            if args.fsdp or accelerator.is_main_process:  # sharded: every rank gathers, rank 0 writes
                (checkpoint.save_sharded if args.fsdp else checkpoint.save)(os.path.join(args.output_dir, "checkpoints"), global_step, params, optimizer, ema,
                                meta={"epoch": epoch, "script": SCRIPT}, total_limit=args.checkpoints_total_limit,
                                extra={name: s.state_dict() for name, s in algo_state.items()})

    # SHARED: save
    accelerator.wait_for_everyone()
    if start_epoch < args.num_epochs or (resume and not sharding.export_done(adapter, args.finetune, args.output_dir)):
        with ema.swapped_in():  # lora/ or transformer/ (and transformer_2/); sharded: gathered by every rank
            sharding.export(adapter, args.finetune, args.output_dir)  # (--num-epochs 0: evaluate only, no export)
    if accelerator.is_main_process and start_epoch < args.num_epochs:
        accelerator.print(f"saved to {args.output_dir}")
        if base_eval is not None and args.eval_every:  # the before/after grid
            tracking.save_samples(accelerator, os.path.join(args.output_dir, "samples"), "before_after",
                                  base_images + final_images, ["base"] * len(base_images)
                                  + ["trained"] * len(final_images), args.num_epochs)
        accelerator.print(tracking.run_summary(metrics_path))  # the result, as the last lines: trained vs base
    sharding.end_run(accelerator)  # end_training(); several processes: all exit here, none hangs in teardown


if __name__ == "__main__":
    cli_args = parse_with_presets(Args, PRESETS, TINY_PRESETS)
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if cli_args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(cli_args))
        else:
            main(cli_args)
