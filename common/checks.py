"""What every algorithm script checks before a model loads, after its own flags: rewards, sizes and ranges, the
Wan2.2 experts' reach, the data (rows, condition images, videos), the group sampler's split, the resume point and
the output folder. Each problem is one line (a USER_ERRORS exception)."""
import os

import rewards
from common import checkpoint, data, models
from common.cli import ConfigError, check_expert_reach, check_sizes
from common.models.base import is_local_path


def check_run(args, world_size, script, **reach):
    """-> (train rows, evaluation rows, group sampler, reward paths, resume checkpoint or None). `reach`: the trained
    steps (`steps`) or training sigmas (`sigma_range`, `time_sampler`) for the Wan2.2-A14B expert check."""
    if args.group_size < 2:
        raise ConfigError("--group-size must be >= 2 (advantages are relative within a group)")
    rewards.check_specs(list(args.reward))
    paths = dict(p.split("=", 1) for p in args.reward_paths if "=" in p)
    if len(paths) != len(args.reward_paths):
        raise ConfigError("--reward-paths entries must be NAME=PATH")
    if args.model_path and is_local_path(args.model_path) and not os.path.isdir(args.model_path):
        raise ConfigError(f"--model-path {args.model_path} is not a folder")  # a hub id (owner/name) loads later
    adapter_cls = models.adapter_class(args.model, args.variant)
    check_sizes(args, adapter_cls, world_size)
    check_expert_reach(args, adapter_cls, **reach)
    train = data.load_split(args.dataset, "train", args.image_dir, args.video_dir)
    test_split = "test" if data.split_exists(args.dataset, "test") else "train"
    test = data.load_split(args.dataset, test_split, args.image_dir, args.video_dir)
    data.check_condition_images(train + test, adapter_cls.condition_images, args.model)
    data.check_videos(train + test)
    test = test[:: max(1, len(test) // args.eval_num_prompts)][: args.eval_num_prompts]  # spread over the split
    groups = data.GroupSampler(len(train), args.prompts_per_epoch, args.group_size, world_size, args.batch_size,
                               args.seed)
    if groups.num_batches % args.gradient_steps_per_epoch:
        raise ConfigError(f"{groups.num_batches} micro-batches per process per epoch do not split into "
                          f"--gradient-steps-per-epoch {args.gradient_steps_per_epoch} equal steps")
    resume = checkpoint.resolve(args.resume_from, os.path.join(args.output_dir, "checkpoints")) \
        if args.resume_from else None
    checkpoint.check_output_dir(args.output_dir, resume, args.overwrite, script)  # runs never mix
    return train, test, groups, paths, resume


def check_rewards(reward_set, adapter, args, items):
    """Score two mid-gray samples of the training size (videos: of its frame count) with the first rows' prompts
    and metadata, once, before anything is written: a reward that raises, returns None or the wrong shape stops the
    run now, in one line naming it, not after the first rollout."""
    import torch
    from common.cli import height_width
    rows = (items * 2)[:2]
    h, w = height_width(args.resolution)
    shape = (len(rows), args.num_frames, 3, h, w) if adapter.video else (len(rows), 3, h, w)
    reward_set.score(torch.full(shape, 0.5), [it.prompt for it in rows], data.reward_metadata(rows))
