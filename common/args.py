"""The flags every algorithm script shares: `RunArgs`, the base class of each script's `Args`.

A script's `Args(RunArgs)` holds its algorithm's own fields and re-declares the shared ones whose default (or help)
it changes; `--help` lists them all. The defaults here are a real model's (FLUX.1-dev on a GPU: bf16 forwards,
gradient checkpointing, fp16 stored latents); where they come from for a run, in order (common/cli.py): these
defaults, the model's `preset` (its adapter), the script's `PRESETS[model]`, then with `--tiny` the `TINY`
settings below, the script's `TINY` and the model's `tiny_preset`; explicit flags win over all of them.
"""
from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError


@dataclass
class RunArgs:
    # Experiment
    exp_name: str = "run"
    """name of this run (used in the tracker run name)"""
    seed: int = 42
    """seed of prompts, noise and the algorithm's own draws (same seed + same flags = same run)"""
    output_dir: str = "runs/run"
    """where metrics.jsonl, samples/, checkpoints/ and lora/ are written"""
    log_with: Literal["tensorboard", "wandb", "swanlab", "none"] = "tensorboard"
    """experiment tracker"""
    resume_from: str | None = None
    """'latest' (the newest good checkpoint; none yet: start fresh) or a checkpoint folder to resume from exactly"""
    overwrite: bool = False
    """start fresh in an --output-dir that holds another run's checkpoints, removing that run's outputs"""
    config: str | None = None
    """a YAML or JSON file of flags (a run's own config.json included): its values replace the defaults and
    presets, and flags given on the command line override them (common/cli.py)"""
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
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """frozen weights and forwards in this precision; trainable weights stay fp32"""
    gradient_checkpointing: bool = True
    """recompute activations in backward to save memory"""
    cpu_threads: int = 0
    """torch threads per process on a CPU (0: the cores / the processes of the machine; OMP_NUM_THREADS wins)"""
    attention_backend: str | None = None
    """diffusers attention backend, e.g. flash, _native_cudnn, sage (if unset: torch SDPA; on CUDA without cuDNN's
    kernel, whose backward crashes FLUX.1 training)"""
    fsdp: bool = False
    """shard the trained transformer(s) over the processes of `accelerate launch` with torch FSDP2 (docs/scale.md)"""
    plan: bool = False
    """print the run's memory plan per process (1 GPU and FSDP over 8; no weights load) and exit"""
    compile: Literal["none", "blocks", "full"] = "none"
    """torch.compile the transformer: 'blocks' compiles each repeated transformer block once (regional: a short
    compile), 'full' the whole transformer; the first steps compile, later ones run faster"""
    lora_merged_sampling: bool | None = None
    """sample with each LoRA folded into its layer's weight (one small matmul per layer and call instead of two per
    token; the stored weights are never written): evaluations, and the rollouts of NFT and AWM, which keep no
    log-probabilities (GRPO's rollouts never). If unset: on a CUDA GPU with LoRA, without --fsdp or --compile"""
    # Data and reward
    dataset: str = "datasets/demo"
    """dataset folder with train.txt|jsonl (+ test.txt|jsonl, images/, videos/)"""
    image_dir: str | None = None
    """folder for relative image paths (if unset: <dataset>/images, which must resolve inside the dataset folder)"""
    video_dir: str | None = None
    """folder for relative video paths (if unset: <dataset>/videos, which must resolve inside the dataset folder)"""
    allow_outside_data_paths: bool = False
    """accept `image`/`video` paths of dataset rows outside --image-dir / --video-dir, and a dataset's images/ or
    videos/ folder that resolves outside the dataset folder (a dataset could otherwise point at any readable file,
    and a remote reward would receive it)"""
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
    """the pipeline's guidance_scale of rollouts and evaluations: distilled guidance (FLUX.1, Kontext, FLUX.2) or CFG
    (SD3.5, Z-Image, klein base)"""
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
    dynamics: Literal["ODE", "Flow-SDE", "Dance-SDE", "CPS"] = "ODE"
    """rollout solver: the ODE, or stochastic steps inside the SDE window"""
    noise_level: float = 0.7
    """eta, the SDE noise level (SDE dynamics only)"""
    sde_window_size: int = 1
    """number of consecutive SDE steps per rollout (SDE dynamics only)"""
    sde_window_range: tuple[int, int] = (1, 4)
    """the window lies in steps [lo, hi); its start is drawn per epoch"""
    same_noise_in_group: bool = False
    """a group's images start from one initial noise: they differ only by the SDE window's noise, the steps that
    train (DanceGRPO's recipe); SDE dynamics only"""
    latent_storage_dtype: Literal["fp32", "bf16", "fp16"] = "fp16"
    """dtype of the latents a rollout stores (log-probs are taken after the round trip)"""
    offload_samples: bool = False
    """keep each rollout micro-batch's stored latents and conditioning on CPU until it trains (video memory)"""
    group_size: int = 16
    """K, images per prompt"""
    prompts_per_epoch: int = 48
    """M, distinct prompts per epoch (M*K must divide by num_processes*batch_size)"""
    balance_prompts_by: str = ""
    """a train.jsonl key (e.g. tag): each epoch's prompts spread evenly over its values, not over the rows"""
    batch_size: int = 2
    """micro-batch per process, for rollout and training alike"""
    rollout_batch_size: int | None = None
    """samples per rollout forward, a multiple of batch_size; rollouts keep no activations (if unset: batch_size; on
    a CUDA GPU the widest that fits, up to group_size: common/plan.py)"""
    gpu_memory_fraction: float = 0.9
    """the share of the GPU's memory that unset rollout and evaluation batches may fill (CUDA only)"""
    # Training
    learning_rate: float = 3e-4
    """AdamW learning rate"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """the learning rate over the run's epochs: constant, or decaying from --learning-rate toward 0 at the last"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    gradient_steps_per_epoch: int = 1
    """G, optimizer steps per inner epoch"""
    num_inner_epochs: int = 1
    """passes over an epoch's samples"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip"""
    adv_eps: float = 1e-4
    """added to the std when normalising advantages"""
    kl_beta: float = 0.0
    """weight of the KL penalty to the reference model (0: off, no reference)"""
    ref_device: str | None = None
    """device of the frozen reference copy for full fine-tuning (if unset: the training device)"""
    ema_decay: float = 0.9
    """EMA decay of the trained weights used for evaluation and saving"""
    ema_interval: int = 4
    """update the EMA every this many epochs"""
    ema_on_cpu: bool = False
    """keep the evaluation EMA's fp32 copy of the trained weights on the CPU (frees accelerator memory)"""
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
    eval_batch_size: int | None = None
    """images per evaluation forward (if unset: 8; on a CUDA GPU the widest that fits: common/plan.py)"""
    eval_seed: int = 10_000
    """test prompt i is sampled from noise seed eval_seed + i (change it to measure evaluation noise)"""
    save_every: int = 10
    """checkpoint every this many epochs (and after the last)"""
    checkpoints_total_limit: int = 3
    """keep this many checkpoints"""


# --tiny, every model and script: a few seconds per epoch on a CPU: 64 px, 4 steps, 4 prompts x 4 images, a
# weight-free reward, evaluation and a checkpoint every epoch (a script's TINY adds its algorithm's settings)
TINY = dict(resolution=64, eval_resolution=64, num_steps=4, eval_num_steps=4, group_size=4, prompts_per_epoch=4,
            batch_size=2, lora_rank=4, lora_alpha=8, max_sequence_length=32, reward=("jpeg_compressibility",),
            num_epochs=2, eval_every=1, save_every=1, eval_num_prompts=4, learning_rate=1e-3, ema_interval=1,
            mixed_precision="no", gradient_checkpointing=False, eval_batch_size=8)


def height_width(resolution) -> tuple[int, int]:
    """--resolution S (square) or --resolution H W -> (H, W)."""
    if len(resolution) not in (1, 2):
        raise ConfigError(f"a resolution is SIZE or HEIGHT WIDTH, got {' '.join(map(str, resolution))}")
    return (resolution[0], resolution[-1])
