"""`--model NAME [--tiny]` selects a preset of defaults; explicit flags override it (STYLE.md 3.4, option B).

A pre-parser reads only --model and --tiny, then tyro parses everything against the preset-filled
defaults, so `--help` shows the defaults that will really be used.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import time

import tyro


class ConfigError(ValueError):
    """One clear line about flags that do not fit together."""


def _user_errors():
    # every error class whose message is meant for the user: printed as one line, exit code 1
    from common.checkpoint import CheckpointError
    from common.data import DataError
    from common.models.base import ModelError
    from rewards import RewardError
    return (ConfigError, DataError, ModelError, CheckpointError, RewardError)


def parse_with_presets(args_cls, presets: dict, tiny_presets: dict | None = None, argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=args_cls.model)
    pre.add_argument("--tiny", action="store_true")
    known, _ = pre.parse_known_args([a.replace("_", "-") if a.startswith("--") else a for a in argv])
    from common import models  # the model's own sampling preset, then the script's for that model
    overrides = dict(models.adapter_class(known.model).preset) if known.model in models.MODELS else {}
    overrides.update(presets.get(known.model, {}))
    if known.tiny:  # "*": every model's tiny settings, then the model's own
        overrides.update((tiny_presets or {}).get("*", {}))
        overrides.update((tiny_presets or {}).get(known.model, {}))
    base = args_cls()
    for k, v in overrides.items():  # a preset may give a size as one int: (v,) for a tuple field like resolution
        if isinstance(getattr(base, k, None), tuple) and isinstance(v, int):
            overrides[k] = (v,)
    default = dataclasses.replace(base, model=known.model, tiny=known.tiny, **overrides)
    is_main = int(os.environ.get("RANK", "0")) == 0  # every rank parses; only one prints
    return tyro.cli(args_cls, default=default, args=argv, console_outputs=is_main)


def set_cpu_threads(world_size):
    """On a CPU without OMP_NUM_THREADS: torch threads = the cores this process may use / the processes of this
    machine (torch's own default gives every process every core, which oversubscribes under accelerate launch).
    OMP_NUM_THREADS=N overrides it; on a busy machine OMP_NUM_THREADS=1 is much faster (README)."""
    import torch
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))


def height_width(resolution) -> tuple[int, int]:
    """--resolution S (square) or --resolution H W -> (H, W)."""
    if len(resolution) not in (1, 2):
        raise ConfigError(f"a resolution is SIZE or HEIGHT WIDTH, got {' '.join(map(str, resolution))}")
    return (resolution[0], resolution[-1])


# numeric flags and their ranges (checked for the fields a script has): (lower bound, inclusive?) or a closed interval
RANGES = {
    "learning_rate": (0, False), "weight_decay": (0, True), "max_grad_norm": (0, False), "batch_size": (1, True),
    "gradient_steps_per_epoch": (1, True), "num_inner_epochs": (1, True), "num_epochs": (0, True),
    "eval_every": (0, True), "save_every": (1, True), "checkpoints_total_limit": (1, True), "lora_rank": (1, True),
    "lora_alpha": (0, False), "max_sequence_length": (1, True), "num_steps": (1, True), "eval_num_steps": (1, True),
    "eval_num_prompts": (1, True), "eval_batch_size": (1, True), "prompts_per_epoch": (1, True),
    "clip_range": (0, False), "adv_clip": (0, False), "adv_eps": (0, True), "kl_beta": (0, True),
    "ema_interval": (1, True), "noise_level": (0, True), "guidance_scale": (0, True), "true_cfg_scale": (0, True),
    "condition_max_pixels": (1, True), "ema_decay": (0, 1), "old_decay": (0, 1), "anchor_decay": (0, 1),
    "nft_beta": (0, False), "time_shift": (0, False), "num_train_timesteps": (0, True),
}


def check_ranges(args):
    """Every numeric flag in its range, in one line naming the flag, before any model loads."""
    for name, rule in RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(rule[1], bool):
            bound, inclusive = rule
            if value < bound or (value == bound and not inclusive):
                raise ConfigError(f"{flag} must be {'>=' if inclusive else '>'} {bound}, got {value}")
        elif not rule[0] <= value <= rule[1]:
            raise ConfigError(f"{flag} must lie in [{rule[0]}, {rule[1]}], got {value}")
    if getattr(args, "dynamics", None) == "CPS" and args.noise_level > 1:
        raise ConfigError(f"--noise-level must be <= 1 with --dynamics CPS (its std is sigma sin(eta pi / 2)), "
                          f"got {args.noise_level}")


def check_sizes(args, adapter_cls, world_size=1):
    """Before any model loads: numeric ranges, training and evaluation sizes and frame counts the model can generate,
    the video, rollout-width and expert options (every algorithm script calls this from its check_args)."""
    check_ranges(args)
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


USER_ERRORS = _user_errors()


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _peer_lost(e) -> bool:
    """A collective failed because another process stopped (gloo: the peer closed its connection)."""
    import torch.distributed as dist
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and "closed by peer" in str(e)


def _clear_bars():
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


@contextlib.contextmanager
def errors_as_one_line(grace_seconds=5.0):
    """Around a script's main(): a user error (USER_ERRORS) becomes `error: ...` on stderr, exit code 1, no
    traceback. Under `accelerate launch` (WORLD_SIZE > 1) every process meets the same error (the checks are the
    same on every rank), so local rank 0 prints it and the others wait `grace_seconds` first: the launcher stops
    them as soon as rank 0 has exited, so the line is printed once per machine; an error of one rank alone (a reward
    raising on its own rows) is printed by that rank after the wait, and the processes whose collectives then fail
    for want of it exit quietly (their traceback would only say a peer left). Launched processes end without
    Python's teardown (os._exit; sharding.end_run says why)."""
    try:
        yield
    except USER_ERRORS as e:
        if not _launched():
            _clear_bars()
            sys.exit(f"error: {e}")
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            time.sleep(grace_seconds)
        _clear_bars()
        sys.stdout.flush()
        print(f"\nerror: {e}", file=sys.stderr, flush=True)  # on its own line, after another rank's progress bar
        os._exit(1)
    except Exception as e:
        if _launched() and _peer_lost(e):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise
