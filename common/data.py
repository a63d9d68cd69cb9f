"""Prompt datasets (txt/jsonl folders) and the GRPO group sampler (M prompts x K copies, split across ranks)."""

import json
import math
import os
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from common.errors import DataError
from rewards.images import to_rgb8


@dataclass
class Item:
    prompt: str
    negative_prompt: str | None = None
    images: list[str] = field(default_factory=list)  # resolved absolute paths; `image` -> [image]
    videos: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # all other jsonl keys, passed to the rewards
    source: str = ""  # "file:line", for error messages


def _split_file(dataset: str, split: str) -> str | None:
    if os.path.isfile(dataset):
        raise DataError(f"--dataset {dataset} is a file; give the folder that holds train.txt or train.jsonl")
    if not os.path.isdir(dataset):
        raise DataError(f"dataset folder not found: {dataset}")
    found = [p for p in (os.path.join(dataset, f"{split}.{ext}") for ext in ("txt", "jsonl")) if os.path.isfile(p)]
    if len(found) == 2:
        raise DataError(f"both {split}.txt and {split}.jsonl in {dataset}: ambiguous, keep only one")
    return found[0] if found else None


def split_exists(dataset: str, split: str) -> bool:
    return _split_file(dataset, split) is not None


def _is_str(v) -> bool:
    return isinstance(v, str) and v != ""


def _media(row: dict, one: str, many: str, where: str) -> list[str]:
    """`image: str` or `images: [str]` (not both) -> list of raw paths."""
    if one in row and many in row:
        raise DataError(f"{where}: give '{one}' or '{many}', not both")
    if one in row:
        if not _is_str(row[one]):
            raise DataError(f"{where}: '{one}' must be a non-empty string")
        return [row[one]]
    paths = row.get(many, [])
    if not isinstance(paths, list) or not all(_is_str(p) for p in paths):
        raise DataError(f"{where}: '{many}' must be a list of strings")
    return paths


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice in one object (at any depth) is an error, not "the last one wins"."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen.add(k)
    return dict(pairs)


def _lone_surrogate(v):
    """The first lone UTF-16 surrogate in the strings of a parsed JSON value (keys included), or None: json.loads
    turns an unpaired escape such as \\ud800 into one, which is not text (no encoder or tokenizer takes it)."""
    if isinstance(v, str):
        m = re.search(r"[\ud800-\udfff]", v)
        return m and m.group()
    if isinstance(v, dict):
        v = [*v, *v.values()]
    return next(filter(None, map(_lone_surrogate, v)), None) if isinstance(v, list) else None


def _parse_jsonl_line(line: str, where: str) -> tuple[dict, list[str], list[str]]:
    try:
        row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e})") from None
    except _DuplicateKey as e:
        raise DataError(f"{where}: key {e.args[0]!r} appears twice in the row (JSON would keep only the last); "
                        "give each key once") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not _is_str(row.get("prompt")):
        raise DataError(f"{where}: 'prompt' must be a non-empty string")
    if not row["prompt"].strip():
        raise DataError(f"{where}: 'prompt' holds only whitespace")
    for k, v in row.items():  # every string reaches a tokenizer, a reward or a file name
        bad = _lone_surrogate(k) or _lone_surrogate(v)
        if bad:
            raise DataError(f"{where}: {k!r} holds a lone surrogate \\u{ord(bad):04x} (a \\u escape without its pair), "
                            "which is not text; write the character itself or its full surrogate pair")
    if row.get("negative_prompt") is not None and not isinstance(row["negative_prompt"], str):
        raise DataError(f"{where}: 'negative_prompt' must be a string")
    return row, _media(row, "image", "images", where), _media(row, "video", "videos", where)


def inside(path: str, folder: str) -> bool:
    """Whether `path` lies inside `folder` once both are resolved (symlinks and `..` included)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base


def load_split(dataset: str, split: str = "train", image_dir: str | None = None, video_dir: str | None = None,
               check_files: bool = True, allow_outside: bool = False) -> list[Item]:
    """The rows of `split`, read as UTF-8 lines that only "\\n" ends (a CRLF line's "\\r" dropped; U+2028, \\x0c
    and the other breaks of str.splitlines stay inside the line), numbered from 1 for file:line. train.txt: a line of
    only whitespace (str.isspace) is blank and skipped, any other is one prompt, leading and trailing whitespace
    removed. train.jsonl: a line of only JSON whitespace is skipped, any other must be one JSON object whose prompt
    holds more than whitespace and whose strings hold no lone surrogate.
    Relative `image`/`video` paths are read from image_dir / video_dir (default <dataset>/images, <dataset>/videos);
    every path, absolute or relative, must resolve (symlinks followed) inside that folder, and a default folder must
    itself resolve inside the dataset folder (a dataset reached through a symlink is fine; an images/ linking to /
    is not), else the row is refused before the file is opened (a row could otherwise send any readable file to a
    reward server), unless `allow_outside` (--allow-outside-data-paths)."""
    path = _split_file(dataset, split)
    if path is None:
        raise DataError(f"no {split}.txt or {split}.jsonl in {dataset}")
    dirs = {"image": os.path.abspath(image_dir or os.path.join(dataset, "images")),
            "video": os.path.abspath(video_dir or os.path.join(dataset, "videos"))}
    chosen = {"image": bool(image_dir), "video": bool(video_dir)}  # a folder given by flag is the user's own choice
    root = os.path.realpath(dataset)

    def resolve(raw: str, kind: str, where: str) -> str:
        if "\0" in raw:
            raise DataError(f"{where}: {kind} path {raw!r} contains a NUL character")
        flag = "--image-dir" if kind == "image" else "--video-dir"
        if not allow_outside and not chosen[kind] and not inside(dirs[kind], root):
            raise DataError(f"{where}: the {kind} folder {dirs[kind]} resolves to {os.path.realpath(dirs[kind])}, "
                            f"outside the dataset folder {root}; move the files into the dataset, name their folder "
                            f"with {flag}, or pass --allow-outside-data-paths")
        p = raw if os.path.isabs(raw) else os.path.normpath(os.path.join(dirs[kind], raw))
        if not allow_outside and not inside(p, dirs[kind]):
            real = os.path.realpath(p)
            raise DataError(f"{where}: {kind} path {raw!r}" + (f" (resolves to {real})" if real != raw else "")
                            + f" is outside the {kind} folder {dirs[kind]} ({flag}); move the file there, or pass "
                            "--allow-outside-data-paths")
        if check_files and not os.path.isfile(p):
            raise DataError(f"{where}: {kind} not found: {p}")
        return p

    try:
        # -sig: a byte-order mark is not part of the first prompt; newline="": no \r translation, split below
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    items = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): it also breaks at U+2028, \x0c, ...
        line, where = line.removesuffix("\r"), f"{path}:{n}"
        if path.endswith(".txt"):
            if line.strip():
                items.append(Item(prompt=line.strip(), source=where))
            continue
        if not line.strip(" \t\r"):  # JSON's own whitespace; anything else must parse
            continue
        row, images, videos = _parse_jsonl_line(line, where)
        known = ("prompt", "negative_prompt", "image", "images", "video", "videos")
        items.append(Item(prompt=row["prompt"], negative_prompt=row.get("negative_prompt"),
                          images=[resolve(p, "image", where) for p in images],
                          videos=[resolve(p, "video", where) for p in videos],
                          metadata={k: v for k, v in row.items() if k not in known}, source=where))
    if not items:
        raise DataError(f"{path} is empty")
    return items


def load_image(path: str) -> Image.Image:
    """The image at `path` decoded in full, as 8-bit RGB (to_rgb8: every mode and bit depth); DataError if not."""
    try:
        with Image.open(path) as im:
            return to_rgb8(im)  # converting forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split())  # keep the message on one line
        raise DataError(f"cannot read image {path}: {reason}") from None


# Condition-image sizes each model's pipeline refuses (measured on the adapters: encode_prompt raises below them).
# Model facts: the adapters' `condition_min_side` / `condition_max_aspect` class attributes take precedence.
def condition_size_problem(adapter_cls, width: int, height: int, condition_max_pixels: int | None = None):
    """Why a condition image of width x height cannot condition `adapter_cls` (None if it can), before any model
    loads. Qwen-Image-Edit-Plus resizes each image to fixed areas (--condition-max-pixels and the VL copy's
    `vl_image_pixels`) at its aspect ratio, sides rounded to multiples of 32: the short side must not round to 0."""
    name = adapter_cls.name
    min_side, max_aspect = adapter_cls.condition_min_side, adapter_cls.condition_max_aspect
    if width < min_side or height < min_side:
        return f"{width}x{height} is smaller than {min_side}x{min_side}, the smallest {name} takes"
    aspect = max(width / height, height / width)
    if max_aspect is not None and aspect > max_aspect:
        return f"{width}x{height} has aspect ratio {aspect:.1f}:1; {name} takes at most {max_aspect:g}:1"
    if adapter_cls.condition_resized_to_area:
        areas = [a for a in (condition_max_pixels or adapter_cls.default_condition_max_pixels,
                             getattr(adapter_cls, "vl_image_pixels", None)) if a]
        for area in areas:
            if round(math.sqrt(area / aspect) / 32) == 0:  # the resized short side would be 0 px
                return (f"{width}x{height} has aspect ratio {aspect:.1f}:1; resized to {area} pixels its short side "
                        f"rounds to 0 (at most {area / 256:g}:1 at that area; raise --condition-max-pixels)")
    return None


def _image_sizes(paths: list[str]) -> list:
    """Each file decoded in full (a few threads: PIL decodes outside the GIL): its (width, height), or the
    DataError it raised."""
    def size(p):
        try:
            return load_image(p).size
        except DataError as e:
            return e
    if len(paths) <= 1:
        return [size(p) for p in paths]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(size, paths))


def check_condition_images(items: list[Item], mode: str, model: str, adapter_cls=None,
                           condition_max_pixels: int | None = None) -> None:
    """Before any model loads: each row has the condition images the model takes, and each file is an image that
    decodes in full (each distinct file once), and, for models that take condition images, one of a size the model
    accepts (condition_size_problem). mode: "none" (images, if any, are only for the rewards: checked all the same,
    so that nothing but decodable images reaches them), "one", "many" (>= 1) or "optional". `adapter_cls`: the
    model's adapter class (looked up by `model` when not given)."""
    if mode != "none":
        for it in items:
            n = len(it.images)
            if (mode == "one" and n != 1) or (mode == "many" and n < 1):
                want = "exactly one condition image ('image')" if mode == "one" else "at least one condition image"
                raise DataError(f"{it.source}: {model} needs {want}, the row has {n}")
    first = {}  # distinct path -> the first row that names it
    for it in items:
        for p in it.images:
            first.setdefault(p, it)
    if not first:
        return
    if mode != "none" and adapter_cls is None:
        from common import models
        adapter_cls = models.adapter_class(model)
    for p, got in zip(first, _image_sizes(list(first))):
        if isinstance(got, DataError):
            msg = str(got)
            reason = msg.split(": ", 1)[1] if msg.startswith(f"cannot read image {p}: ") else msg
            raise DataError(f"{first[p].source}: unreadable image {p}: {reason}")
        problem = None if mode == "none" else condition_size_problem(adapter_cls, *got, condition_max_pixels)
        if problem:
            raise DataError(f"{first[p].source}: condition image {p}: {problem}")


def check_videos(items: list[Item]) -> None:
    """Before any model loads: every video of every row decodes in full (every frame, as the rewards receive it),
    has at least one frame and a frame rate (each distinct file once). Missing files are caught earlier, by
    load_split, with file:line."""
    from common.video import probe_video
    checked = set()
    for it in items:
        for p in it.videos:
            if p in checked:
                continue
            try:
                probe_video(p)
            except DataError as e:
                raise DataError(f"{it.source}: unreadable video {p}: {_video_reason(e, p)}") from None
            checked.add(p)


def _video_reason(e: DataError, path: str) -> str:
    msg = str(e)
    return msg.split(": ", 1)[1] if msg.startswith(f"cannot read video {path}: ") else msg


_VIDEO_CACHE: "OrderedDict[str, tuple[torch.Tensor, float]]" = OrderedDict()
_VIDEO_CACHE_ITEMS, _VIDEO_CACHE_BYTES = 32, 4 * 2**30


def load_video(path: str) -> tuple[torch.Tensor, float]:
    """(frames float32 (F, 3, H, W) in [0, 1] RGB, fps) of a video file; DataError if unreadable.
    Cached (the K copies of a prompt share one file): the 32 most recently used videos, at most 4 GiB of
    frames in all (a larger video is not cached). The same tensor comes back for the same path, so do not
    modify it in place (.clone() first); load_video.cache_clear() empties the cache."""
    path = os.path.abspath(path)
    hit = _VIDEO_CACHE.get(path)
    if hit is not None:
        _VIDEO_CACHE.move_to_end(path)
        return hit
    from common.video import read_video
    frames, fps = read_video(path)
    if frames.nbytes <= _VIDEO_CACHE_BYTES:
        _VIDEO_CACHE[path] = (frames, fps)
        while (len(_VIDEO_CACHE) > _VIDEO_CACHE_ITEMS
               or sum(v[0].nbytes for v in _VIDEO_CACHE.values()) > _VIDEO_CACHE_BYTES):
            _VIDEO_CACHE.popitem(last=False)
    return frames, fps


load_video.cache_clear = _VIDEO_CACHE.clear


def score(reward_set, items: list[Item], images, audio=None) -> dict:
    """Raw scores of every reward of `reward_set` for `images` generated from dataset rows `items`: {name: (B,)}.
    `audio`: (waveforms (B, C, N), sample rate) of a model that generates sound too (LTX-2), else None."""
    return reward_set.score(images, [it.prompt for it in items], reward_metadata(items, audio))


def reward_metadata(items: list[Item], audio=None) -> list[dict]:
    """What the rewards receive per sample: the row's other jsonl keys, its prompt, the condition image paths
    ("images"), the video paths ("videos") and those videos decoded ("video_frames": (frames, fps) pairs); for a
    model with sound, its generated track ("audio": (waveform float (C, N) on the CPU, sample rate))."""
    meta = [{**it.metadata, "prompt": it.prompt, "images": it.images, "videos": it.videos,
             "video_frames": [_row_video(it, p) for p in it.videos]} for it in items]
    if audio is not None:
        waves, rate = audio
        waves = waves.detach().float().cpu()  # one copy for the batch (under --async-rewards in the scoring thread)
        for m, w in zip(meta, waves):
            m["audio"] = (w, int(rate))
    return meta


def _row_video(it: Item, path: str):
    """load_video, its error naming the row (a video that changed since the start checks)."""
    try:
        return load_video(path)
    except DataError as e:
        raise DataError(f"{it.source}: unreadable video {path}: {_video_reason(e, path)}") from None


def strata(items: list[Item], key: str) -> list[str] | None:
    """Each row's value of the jsonl key `key` (--balance-prompts-by), or None when no key is given."""
    if not key:
        return None
    for it in items:
        if key not in it.metadata:
            raise DataError(f"{it.source}: --balance-prompts-by {key}: the row has no {key!r} key")
    return [json.dumps(it.metadata[key], sort_keys=True) for it in items]


@dataclass
class EpochPlan:
    items: list[int]  # dataset indices of all M*K samples of the epoch, in global order (identical on every rank)
    groups: list[int]  # group id (0..M-1) of each of those samples

    def local(self, rank: int, world: int) -> tuple[list[int], list[int]]:
        """This rank's contiguous slice, so that gathering in rank order gives back the global order."""
        if not 0 <= rank < world or len(self.items) % world:
            raise ValueError(f"cannot split {len(self.items)} samples over world={world} at rank={rank}")
        n = len(self.items) // world
        return self.items[rank * n:(rank + 1) * n], self.groups[rank * n:(rank + 1) * n]

    def members(self) -> list[int]:
        """Each sample's index within its group (0..K-1), counted in the plan's global order: a sample's identity
        (group, member) is the same whatever the process count and batch sizes."""
        seen = {}
        out = []
        for g in self.groups:
            out.append(seen.get(g, 0))
            seen[g] = out[-1] + 1
        return out


class GroupSampler:
    """M prompts x K copies per epoch, the same on every rank (shared seed), shuffled so groups span ranks; or, for
    an algorithm that compares the members of a group (whole_groups), each group's K copies kept together, in
    shuffled group order, so that every rank holds whole groups."""

    def __init__(self, num_items: int, prompts_per_epoch: int, group_size: int, world_size: int,
                 batch_size: int, seed: int, strata: list | None = None, whole_groups: bool = False):
        """strata: a label per item (e.g. its "tag"): each epoch then draws the labels as evenly as possible and
        distinct prompts within each label, so that a label with few prompts is trained as often as a large one.
        whole_groups: a rank's samples are whole groups (prompts_per_epoch must split evenly over the ranks)."""
        sizes = dict(num_items=num_items, prompts_per_epoch=prompts_per_epoch, group_size=group_size,
                     num_processes=world_size, batch_size=batch_size)
        for name, v in sizes.items():
            if v < 1:
                raise DataError(f"{name} must be >= 1, got {v}")
        M, K, W, B = prompts_per_epoch, group_size, world_size, batch_size
        if (M * K) % (W * B):
            unit = W * B // math.gcd(W * B, K)  # valid prompts_per_epoch are the multiples of unit
            options = [m for m in ((M // unit) * unit, (M // unit + 1) * unit) if m > 0]
            raise DataError(f"prompts_per_epoch*group_size = {M}*{K} = {M * K} samples must be divisible by "
                            f"num_processes*batch_size = {W}*{B} = {W * B}; nearest valid prompts_per_epoch: "
                            + " or ".join(map(str, options)))
        if whole_groups and M % W:
            raise DataError(f"this algorithm keeps each group on one process: prompts_per_epoch {M} must be a multiple "
                            f"of num_processes {W}")
        self.num_items, self.M, self.K, self.W, self.B, self.seed = num_items, M, K, W, B, seed
        self.whole_groups = whole_groups
        self.num_batches = M * K // (W * B)  # micro-batches per rank per epoch
        if strata is not None and len(strata) != num_items:
            raise ValueError(f"{len(strata)} strata labels for {num_items} items")
        self.strata = None if strata is None else {
            label: torch.tensor([i for i, x in enumerate(strata) if x == label]) for label in sorted(set(strata))}

    def plan(self, epoch: int) -> EpochPlan:
        # own generator, never the global RNG: every rank (and a resumed run) draws the same plan
        g = torch.Generator().manual_seed(self.seed + epoch)
        # concatenated permutations: distinct prompts if M <= N, else every prompt at least once, as even as possible
        if self.strata is None:
            perms = [torch.randperm(self.num_items, generator=g) for _ in range(math.ceil(self.M / self.num_items))]
            prompts = torch.cat(perms)[:self.M]
        else:
            prompts = self._balanced(g)
        if self.whole_groups:  # the groups in shuffled order, each one's K copies together
            groups = torch.randperm(self.M, generator=g).repeat_interleave(self.K)
        else:  # shuffle the M*K samples so a group's members land on different ranks/batches
            groups = torch.arange(self.M).repeat_interleave(self.K)[torch.randperm(self.M * self.K, generator=g)]
        return EpochPlan(items=prompts[groups].tolist(), groups=groups.tolist())

    def _balanced(self, g):
        """M prompts: labels from concatenated permutations of the labels (each label ceil or floor M / labels
        times), within a label its prompts from concatenated permutations (distinct while they last)."""
        labels = list(self.strata)
        n = math.ceil(self.M / len(labels))
        order = torch.cat([torch.randperm(len(labels), generator=g) for _ in range(n)])[:self.M].tolist()
        pools = {}
        for label in labels:
            idx = self.strata[label]
            pools[label] = torch.cat([idx[torch.randperm(len(idx), generator=g)]
                                      for _ in range(math.ceil(n / len(idx)))]).tolist()
        return torch.tensor([pools[labels[k]].pop(0) for k in order])

    def local_batches(self, epoch: int, rank: int) -> list[tuple[list[int], list[int]]]:
        items, groups = self.plan(epoch).local(rank, self.W)
        return [(items[i:i + self.B], groups[i:i + self.B]) for i in range(0, len(items), self.B)]


def local_slice(values, rank: int, world: int):
    """This rank's rows of epoch-wide values in the plan's global order (gathered in rank order): the contiguous
    1/world of them, the rows EpochPlan.local gave it."""
    if len(values) % world:
        raise ValueError(f"cannot split {len(values)} values over {world} ranks: ranks must hold equal counts")
    n = len(values) // world
    return values[rank * n:(rank + 1) * n]


def rank_rows(n, rank, world):
    """The evaluation rows of a rank: contiguous, padded (wrapping around) so that every rank gathers as many."""
    per_rank = -(-n // world)
    return [i % n for i in range(rank * per_rank, (rank + 1) * per_rank)]
