"""Score image and video files with a reward, outside any run:

    python -m rewards score --reward ocr --prompt 'a sign that says "OPEN"' sign1.png sign2.png
    python -m rewards score --reward shapes --dataset datasets/shapes --split test samples/*.png
    python -m rewards score --reward pickscore --dataset my_prompts --per-row 4 out/*.png

prints each file's raw score (a video: the mean over its frames, every --reward-frame-stride-th frame, as in a run),
then their mean. The prompt (and the metadata a run gives the reward) is --prompt's for every file, or comes from
the dataset's rows in order: with --per-row K, files 1..K belong to the first row, K+1..2K to the second, and so on;
the number of files must be K times the number of rows. Bad input is one line on stderr and exit code 1.
"""
import argparse
import os
import sys

import numpy as np
import torch

from rewards import RewardError, check_specs, load_rewards

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")


def read_file(path: str) -> torch.Tensor:
    """An image file -> (3, H, W), a video file (by its suffix) -> (F, 3, H, W); floats in [0, 1], read as the run
    reads a dataset's condition images (8-bit RGB, any mode and bit depth) and videos."""
    from common.data import load_image
    from common.video import read_video

    if path.lower().endswith(VIDEO_SUFFIXES):
        return read_video(path)[0]
    return torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1).float() / 255


def prompts_and_metadata(args, n_files: int) -> tuple[list[str], list[dict]]:
    """One prompt and one metadata dict per file, as a run gives them to the rewards."""
    if args.dataset is None:
        prompt = args.prompt or ""
        return [prompt] * n_files, [{"prompt": prompt, "images": [], "videos": [], "video_frames": []}
                                    for _ in range(n_files)]
    from common.data import load_split, reward_metadata

    items = load_split(args.dataset, args.split)
    if n_files != len(items) * args.per_row:
        per = f"{args.per_row} per row" if args.per_row > 1 else "one per row"
        raise RewardError(f"{n_files} file(s) for the {len(items)} row(s) of {args.dataset} ({args.split}); "
                          f"expected {len(items) * args.per_row} ({per}, in row order)")
    metadata = reward_metadata(items)
    return ([it.prompt for it in items for _ in range(args.per_row)],
            [m for m in metadata for _ in range(args.per_row)])


def score(args) -> int:
    from common.errors import USER_ERRORS

    try:
        missing = [f for f in args.files if not os.path.isfile(f)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RewardError(f"file not found: {missing[0]}{more}")
        if args.per_row < 1 or args.reward_frame_stride < 1:
            raise RewardError("--per-row and --reward-frame-stride must be >= 1")
        checked = check_specs([args.reward])  # an unknown reward or a dead server: before any file is read
        prompts, metadata = prompts_and_metadata(args, len(args.files))
        rs = load_rewards(checked, {checked[0].name: args.reward_path} if args.reward_path else None,
                          device=args.device, frame_stride=args.reward_frame_stride)
        scores = []
        for path, prompt, meta in zip(args.files, prompts, metadata):
            s = rs.score(read_file(path)[None], [prompt], [meta])[rs.names[0]]
            scores.append(s.item())
            print(f"{scores[-1]:.6f}\t{path}", flush=True)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    print(f"{sum(scores) / len(scores):.6f}\tmean of {len(scores)} file(s)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score image or video files with one reward", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--reward", required=True,
                   help="a registry name (ocr, pickscore, ...), a dotted path pkg.mod.Reward or NAME=URL (a server)")
    s.add_argument("--reward-path", help="a local folder overriding a registry reward's hub id")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt of every file (default: empty)")
    src.add_argument("--dataset", help="a dataset folder: the prompts and metadata of its rows, in order")
    s.add_argument("--split", default="train", help="the dataset's split (train.txt / train.jsonl, test...)")
    s.add_argument("--per-row", type=int, default=1, help="files per dataset row (consecutive files share a row)")
    s.add_argument("--reward-frame-stride", type=int, default=1, help="a registry reward sees every N-th video frame")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("files", nargs="+", metavar="FILE", help="images, or videos (" + ", ".join(VIDEO_SUFFIXES) + ")")
    args = p.parse_args(argv)
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
