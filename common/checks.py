"""Every check a run makes before a model loads, and the reward probe right after the rewards load: flags and their
ranges, sizes, the SDE window, the Wan2.2 experts' reach, rewards, the data (rows, condition images, videos), the
group sampler's split, the resume point and the output folder. Each problem is one line (common.errors)."""
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass

import rewards
from common import checkpoint, data, models
from common.args import height_width
from common.errors import CheckpointError, ConfigError
from common.models.base import is_local_path

# the shared numeric flags and their ranges: (lower bound, inclusive?) or a closed interval; a script checks its own
RANGES = {
    "learning_rate": (0, False), "weight_decay": (0, True), "max_grad_norm": (0, False), "batch_size": (1, True),
    "gradient_steps_per_epoch": (1, True), "num_inner_epochs": (1, True), "num_epochs": (0, True),
    "eval_every": (0, True), "save_every": (1, True), "checkpoints_total_limit": (1, True), "lora_rank": (1, True),
    "lora_alpha": (0, False), "max_sequence_length": (1, True), "num_steps": (1, True), "eval_num_steps": (1, True),
    "eval_num_prompts": (1, True), "eval_batch_size": (1, True), "prompts_per_epoch": (1, True),
    "adv_clip": (0, False), "adv_eps": (0, True), "kl_beta": (0, True), "ema_interval": (1, True),
    "noise_level": (0, True), "guidance_scale": (0, True), "true_cfg_scale": (0, True),
    "condition_max_pixels": (1, True), "ema_decay": (0, 1), "gpu_memory_fraction": (0, 1), "cpu_threads": (0, True),
}


def check_finite(args):
    """Every float flag (and each float of a tuple flag) a finite number: NaN passes every range comparison and inf
    most, and either would train a model of NaN."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            shown = " ".join(map(str, values))
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {shown}")


def check_ranges(args, ranges=RANGES):
    """Every float flag finite, and every numeric flag of `ranges` in its range, in one line naming the flag, before
    any model loads."""
    check_finite(args)
    for name, rule in ranges.items():
        value = getattr(args, name)
        if value is None or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(rule[1], bool):
            bound, inclusive = rule
            if value < bound or (value == bound and not inclusive):
                raise ConfigError(f"{flag} must be {'>=' if inclusive else '>'} {bound}, got {value}")
        elif not rule[0] <= value <= rule[1]:
            raise ConfigError(f"{flag} must lie in [{rule[0]}, {rule[1]}], got {value}")


def check_sampling(args):
    """The SDE window fits the schedule (when the dynamics is stochastic) and CPS's noise level is at most 1."""
    lo, hi = args.sde_window_range
    if args.dynamics != "ODE" and not (1 <= args.sde_window_size and 0 <= lo
                                       and lo + args.sde_window_size <= min(hi, args.num_steps)):
        raise ConfigError(f"--sde-window-size {args.sde_window_size} does not fit --sde-window-range {lo} {hi} "
                          f"within {args.num_steps} steps")
    if args.same_noise_in_group and (args.dynamics == "ODE" or args.noise_level == 0):
        raise ConfigError("--same-noise-in-group needs stochastic steps (--dynamics other than ODE, --noise-level > 0):"
                          " with the ODE every image of a group would be the same")
    if args.dynamics == "CPS" and args.noise_level > 1:
        raise ConfigError(f"--noise-level must be <= 1 with --dynamics CPS (its std is sigma sin(eta pi / 2)), "
                          f"got {args.noise_level}")


def check_sizes(args, adapter_cls, world_size=1):
    """Training and evaluation sizes and frame counts the model can generate; the sharding, rollout-width, video and
    expert options."""
    for res, frames, what in ((args.resolution, args.num_frames, "training"),
                              (args.eval_resolution, args.eval_num_frames, "evaluation")):
        try:
            adapter_cls.check_size(*height_width(res), frames, args.variant)
        except ValueError as e:
            raise ConfigError(f"{what} size: {e}") from None
    if args.fsdp and world_size < 2:
        raise ConfigError("--fsdp shards over processes: launch with accelerate launch --num_processes N (N >= 2)")
    if args.fsdp and args.ema_on_cpu:
        raise ConfigError("--ema-on-cpu with --fsdp: the EMA is sharded with the weights already")
    if args.lora_merged_sampling and (args.finetune != "lora" or args.fsdp):
        raise ConfigError("--lora-merged-sampling needs --finetune lora without --fsdp (sharded layers are not merged)")
    wide = args.rollout_batch_size
    if wide is not None and (wide < args.batch_size or wide % args.batch_size):
        raise ConfigError(f"--rollout-batch-size {wide} must be a multiple of --batch-size {args.batch_size}")
    if args.reward_frame_stride < 1:
        raise ConfigError(f"--reward-frame-stride must be >= 1, got {args.reward_frame_stride}")
    if args.guidance_scale_2 is not None and len(adapter_cls.expert_steps(args.variant, 1)) < 2:
        raise ConfigError(f"--guidance-scale-2 is the low-noise expert's scale; {args.model} has one transformer")


def check_expert_reach(args, adapter_cls, steps=None, sigma_range=None, time_sampler=None):
    """Wan2.2-A14B: refuse a run whose trained steps (`steps`, rollout step indices) or training sigmas
    (`sigma_range`, a closed interval; with a discrete `time_sampler` the rollout steps it draws from) never reach
    a trained expert or reach an expert that does not train (its steps would carry no gradient), in one line
    saying which steps each expert owns."""
    owners = adapter_cls.expert_steps(args.variant, args.num_steps, args.model_path)
    if len(owners) < 2:
        return
    if time_sampler and time_sampler.startswith("discrete"):  # NFT/AWM: indices into the rollout schedule
        from common.timesteps import discrete_range
        a, b = discrete_range(adapter_cls.grid_sigmas(args.variant, args.num_steps, args.model_path),
                              (1 - sigma_range[1], 1 - sigma_range[0]))
        steps = range(a + (time_sampler == "discrete_wo_init"), b)  # b is never drawn
    trained = {"high": ["transformer"], "low": ["transformer_2"], "both": ["transformer", "transformer_2"]}[
        args.train_experts]
    if steps is not None:
        reached = {e for e, own in owners.items() for i in steps if i in own}
    else:
        reached = {adapter_cls.expert_of_sigma(args.variant, s, args.model_path) for s in sigma_range}

    def span(own):
        return f"{own[0]}-{own[-1]}" if own else "none"
    where = (f"with {args.num_steps} steps, steps {span(owners['transformer'])} are the high-noise expert's "
             f"(transformer) and steps {span(owners['transformer_2'])} the low-noise expert's (transformer_2)")
    what = f"steps {sorted(steps)}" if steps is not None else f"training sigmas {tuple(round(s, 4) for s in sigma_range)}"
    missing, untrained = [e for e in trained if e not in reached], [e for e in reached if e not in trained]
    if missing:
        raise ConfigError(f"--train-experts {args.train_experts}: the {what} never reach {', '.join(missing)}; {where}")
    if untrained:
        raise ConfigError(f"--train-experts {args.train_experts}: the {what} reach {', '.join(untrained)}, which does "
                          f"not train; {where}")


# flags that define the trained weights: a resume with another value would load weights of another shape or meaning
DEFINE_WEIGHTS = ("model", "model_path", "variant", "tiny", "train_experts", "finetune", "lora_rank", "lora_alpha",
                  "lora_targets")
NOT_COMPARED = ("resume_from", "overwrite", "plan", "output_dir", "log_with", "exp_name", "config")


def resume_changes(args, resume) -> dict:
    """{flag: (old, new)} of the flags this command changes against the run it resumes (the checkpoint's record of
    its flags, else the folder's config.json). A flag that defines the trained weights is refused in one line; every
    other one (learning rate, weight decay, epochs, clip range, ...) is honoured from here on."""
    state_path = os.path.join(resume, "state.json")
    with open(state_path) as f:
        old = json.load(f).get("config")
    if old is None:  # a checkpoint written before its state held the flags: the run's config.json
        try:
            with open(os.path.join(os.path.dirname(os.path.dirname(resume)), "config.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            return {}
    new = dataclasses.asdict(args)
    changed = {k: (old[k], _jsonable(v)) for k, v in new.items()
               if k in old and k not in NOT_COMPARED and _jsonable(v) != old[k]}
    for k in DEFINE_WEIGHTS:
        if k in changed:
            raise CheckpointError(f"--resume-from {resume}: --{k.replace('_', '-')} {changed[k][0]} -> "
                                  f"{changed[k][1]}: the flag defines the trained weights, which the checkpoint holds; "
                                  "resume with the run's value, or start a new run in another --output-dir")
    return changed


def _jsonable(v):
    return json.loads(json.dumps(v))  # tuples as lists, as config.json holds them


def check_output_dir(output_dir, resume, overwrite, script):
    """Before anything is written: runs never share a folder by accident. A fresh run refuses a folder that holds
    another run's checkpoints unless `overwrite` (then its outputs are removed by checkpoint.clear_run, after every
    check), and a folder that is not a run's but holds names a run writes (config.json, transformer/, samples/ ...:
    a model folder), with or without `overwrite`; a resume refuses a checkpoint written by another algorithm script
    (its own state would be ignored)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f"--output-dir {output_dir} is a file, not a folder")
    _check_writable(output_dir)
    if resume:
        with open(os.path.join(resume, "state.json")) as f:
            other = json.load(f).get("script", script)
        if other != script:
            raise CheckpointError(f"--resume-from {resume}: a checkpoint of {other}, not of {script}")
    if resume:
        return
    found = checkpoint.list_checkpoints(os.path.join(output_dir, "checkpoints"))
    if found and not overwrite:
        raise CheckpointError(f"--output-dir {output_dir} holds another run's checkpoints (newest "
                              f"{os.path.basename(found[-1])}): resume it with --resume-from latest, pass --overwrite "
                              "to replace it, or choose another --output-dir")
    present = checkpoint.run_outputs(output_dir) if os.path.isdir(output_dir) else []
    if present and not checkpoint.is_run_folder(output_dir):  # a model folder, say: nothing of it is removed
        raise CheckpointError(f"--output-dir {output_dir} is not a run's folder (no config.json of a run, no "
                              f"checkpoint) but holds {', '.join(present)}, which a run would "
                              f"{'remove' if overwrite else 'replace'}: nothing was touched; choose another "
                              "--output-dir")


def _check_writable(output_dir):
    """One line now rather than a traceback at the first save: a probe file is created and removed in the folder
    (in its nearest existing parent when it does not exist yet, so a fresh run leaves nothing)."""
    where = os.path.abspath(output_dir)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--output-dir {output_dir}: cannot write in {where} ({e.strerror})") from None


@dataclass
class Checked:
    """What the checks loaded: the rows, the group sampler, the parsed rewards and the checkpoint to resume."""
    train: list
    test: list
    groups: data.GroupSampler
    reward_specs: list
    reward_paths: dict
    resume: str | None
    changes: dict  # a resume's changed flags: {flag: (old, new)}


def check_run(args, world_size, script, whole_groups=False, **reach) -> Checked:
    """The run's checks, before any model loads. `whole_groups`: each process holds whole groups (data.GroupSampler).
    `reach`: the trained steps (`steps`) or training sigmas (`sigma_range`, `time_sampler`) for the Wan2.2-A14B
    expert check."""
    if args.group_size < 2:
        raise ConfigError("--group-size must be >= 2 (advantages are relative within a group)")
    check_sampling(args)
    specs = rewards.check_specs(list(args.reward))  # parsed once; a remote reward's server health-checked once
    paths = dict(p.split("=", 1) for p in args.reward_paths if "=" in p)
    if len(paths) != len(args.reward_paths):
        raise ConfigError("--reward-paths entries must be NAME=PATH")
    if args.model_path and is_local_path(args.model_path) and not os.path.isdir(args.model_path):
        raise ConfigError(f"--model-path {args.model_path} is not a folder")  # a hub id (owner/name) loads later
    adapter_cls = models.adapter_class(args.model, args.variant)
    check_ranges(args)
    check_sizes(args, adapter_cls, world_size)
    check_expert_reach(args, adapter_cls, **reach)
    outside = args.allow_outside_data_paths
    train = data.load_split(args.dataset, "train", args.image_dir, args.video_dir, allow_outside=outside)
    test_split = "test" if data.split_exists(args.dataset, "test") else "train"
    test = data.load_split(args.dataset, test_split, args.image_dir, args.video_dir, allow_outside=outside)
    data.check_condition_images(train + test, adapter_cls.condition_images, args.model, adapter_cls,
                                args.condition_max_pixels)
    data.check_videos(train + test)
    test = test[:: max(1, len(test) // args.eval_num_prompts)][: args.eval_num_prompts]  # spread over the split
    groups = data.GroupSampler(len(train), args.prompts_per_epoch, args.group_size, world_size, args.batch_size,
                               args.seed, strata=data.strata(train, args.balance_prompts_by), whole_groups=whole_groups)
    if groups.num_batches % args.gradient_steps_per_epoch:
        raise ConfigError(f"{groups.num_batches} micro-batches per process per epoch do not split into "
                          f"--gradient-steps-per-epoch {args.gradient_steps_per_epoch} equal steps")
    resume = checkpoint.resolve(args.resume_from, os.path.join(args.output_dir, "checkpoints")) \
        if args.resume_from else None
    check_output_dir(args.output_dir, resume, args.overwrite, script)  # runs never mix
    changes = resume_changes(args, resume) if resume else {}
    return Checked(train, test, groups, specs, paths, resume, changes)


def check_rewards(reward_set, adapter, args, items):
    """Score two mid-gray samples of the training size (videos: of its frame count) with the first rows' prompts
    and metadata, once, before anything is written: a reward that raises, returns None or the wrong shape stops the
    run now, in one line naming it, not after the first rollout."""
    import torch
    rows = (items * 2)[:2]
    h, w = height_width(args.resolution)
    shape = (len(rows), args.num_frames, 3, h, w) if adapter.video else (len(rows), 3, h, w)
    audio = None
    if adapter.audio:  # silence of the generated track's shape (one decode of a zero latent), so metadata is complete
        state = adapter.make_state(h, w, args.num_frames)
        z = torch.zeros_like(adapter.prepare_noise(len(rows), h, w, torch.Generator().manual_seed(0), args.num_frames))
        audio = (torch.zeros_like(adapter.decode_audio(z, state)), adapter.audio_sample_rate())
    data.score(reward_set, rows, torch.full(shape, 0.5), audio)
