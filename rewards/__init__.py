"""Reward registry and the multi-reward set.

A reward spec is NAME or NAME:WEIGHT (weight defaults to 1.0). NAME is a registry name (case-insensitive)
or a dotted path package.module.Attr to a custom reward, where Attr is one of:
  - a class or factory taking no arguments that returns an object with the Reward contract (rewards.base);
  - a plain function fn(images, prompts, metadata) -> (B,) scores, wrapped as a pointwise Reward.
An Attr whose signature requires positional arguments is taken as a scoring function, otherwise it is called.
A spec NAME=URL[:WEIGHT] is a remote reward scored by a server (rewards.remote, rewards.server); NAME names it.
"""
import contextlib
import importlib
import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from rewards.base import FunctionReward, Reward, RewardError

__all__ = ["REGISTRY", "Reward", "RewardError", "RewardSet", "Spec", "parse_spec", "check_specs", "load_rewards"]

REGISTRY = {
    "jpeg_compressibility": "rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "rewards.jpeg:JpegIncompressibility",
    "pickscore": "rewards.pickscore:PickScore",
    "pickscore_rank": "rewards.pickscore:PickScoreRank",
    "clip": "rewards.clip_score:ClipScore",
    "aesthetic": "rewards.aesthetic:Aesthetic",
    "hpsv2": "rewards.hpsv2:HPSv2",
    "imagereward": "rewards.imagereward:ImageReward",
    "shapes": "rewards.shapes:ShapesReward",
    "ocr": "rewards.ocr:OcrReward",
    "geneval": "rewards.geneval:GenevalReward",
    "vlm": "rewards.vlm:VlmJudge",
}


def parse_spec(spec: str) -> tuple[str, float]:
    """'NAME' or 'NAME:WEIGHT' -> (name, weight). Registry names come back lower-cased."""
    if _is_remote(spec):
        from rewards.remote import parse_remote
        remote = parse_remote(spec)
        return remote.name, remote.weight
    name, weight = spec.strip(), 1.0
    if ":" in name:
        head, tail = name.rsplit(":", 1)
        try:
            name, weight = head.strip(), float(tail)
        except ValueError:
            if "." not in head:  # a registry name: whatever follows the colon must be the weight
                raise RewardError(f"bad weight {tail!r} in reward spec {spec!r}; expected NAME:NUMBER") from None
        if not math.isfinite(weight):
            raise RewardError(f"bad weight {tail!r} in reward spec {spec!r}; the weight must be finite")
    if not name:
        raise RewardError(f"empty reward name in spec {spec!r}; expected NAME or NAME:WEIGHT")
    return (name.lower() if name.lower() in REGISTRY else name), weight


def _resolve(target: str, name: str):
    """'pkg.mod:Attr' or 'pkg.mod.Attr' -> the attribute; import errors become RewardError."""
    module, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or any error raised while importing the user's module
        raise RewardError(f"reward {name!r}: cannot import module {module!r} ({type(e).__name__}: {e})") from e
    if not hasattr(mod, attr):
        raise RewardError(f"reward {name!r}: module {module!r} has no attribute {attr!r}")
    obj = getattr(mod, attr)
    if not callable(obj):
        raise RewardError(f"reward {name!r}: {target} is not callable (expected a Reward class, factory or function)")
    return obj


def _is_remote(spec: str) -> bool:
    return "=" in spec  # NAME=URL; no registry name or dotted path holds an '='


@dataclass
class Spec:
    """One reward of a run, parsed once: its spec text, name and weight; a custom reward's resolved class, factory or
    function; a remote reward's client, built (and its server health-checked) once, by check_specs."""
    text: str
    name: str
    weight: float
    custom: Any = None
    remote: Any = None


def check_specs(specs: list[str]) -> list[Spec]:
    """Parse and validate reward specs without loading any weights; raises RewardError on the first problem. A remote
    reward's server is health-checked here, once, so that a run stops before any model loads; load_rewards takes
    the result and reuses its clients."""
    if not specs:
        raise RewardError("no reward given; pass at least one reward spec like pickscore or jpeg_compressibility:0.5")
    checked = []
    for spec in specs:
        name, weight = parse_spec(spec)
        if name in {c.name for c in checked}:
            raise RewardError(f"reward {name!r} is given twice")
        entry = Spec(spec, name, weight)
        if _is_remote(spec):
            from rewards.remote import RemoteReward
            entry.remote = RemoteReward(spec)
        elif name not in REGISTRY:
            if "." not in name.strip("."):
                raise RewardError(f"unknown reward {name!r}; known: {', '.join(sorted(REGISTRY))}, "
                                  "or a dotted path like mypkg.module.MyReward")
            entry.custom = _resolve(name, name)
        checked.append(entry)
    return checked


def _needs_args(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _build_custom(name: str, obj):
    if not isinstance(obj, type) and _needs_args(obj):
        return FunctionReward(obj, name)
    try:
        reward = obj()
    except Exception as e:
        raise RewardError(f"reward {name!r}: calling {name}() failed: {type(e).__name__}: {e}") from e
    if not callable(reward):
        raise RewardError(f"reward {name!r}: {name}() returned a non-callable {type(reward).__name__}")
    return reward if hasattr(reward, "group_transform") else FunctionReward(reward, name)


class RewardSet:
    """The rewards of a run: .names (spec order), .weights and .rewards keyed by name. Videos (B, F, 3, H, W) reach
    each reward with every `frame_strides[name]`-th frame (registry rewards: the run's stride; custom rewards: all
    frames); image rewards score a video as the mean over the frames they receive (rewards.base.over_frames)."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float], frame_strides: dict[str, int] | None = None):
        self.names, self.rewards, self.weights = list(rewards), rewards, weights
        self.frame_strides = {name: (frame_strides or {}).get(name, 1) for name in self.names}
        # score() may run in a worker thread while another thread scores too (async rewards, evaluation): calls
        # into one reward are serialised, as models and processors are not known to be thread-safe
        self._locks = {name: contextlib.nullcontext() if getattr(r, "thread_safe", False) else threading.Lock()
                       for name, r in rewards.items()}

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        """Raw scores of every reward: {name: (B,) float32 CPU}. Raises RewardError on bad shape or NaN/inf."""
        B = images.shape[0]
        if len(prompts) != B:
            raise RewardError(f"got {B} images but {len(prompts)} prompts")
        out = {}
        for name in self.names:
            x = images[:, ::self.frame_strides[name]] if images.dim() == 5 else images
            try:
                with self._locks[name], torch.no_grad():
                    s = self.rewards[name](x, prompts, metadata)
                if s is None:
                    raise RewardError(f"reward {name!r} returned None; a reward returns one score per image ({B},)")
                s = torch.as_tensor(s).detach().float().cpu()
            except RewardError:
                raise
            except Exception as e:  # a custom reward's own failure (or None returned): one line naming it
                raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {' '.join(str(e).split())}") from e
            if s.shape != (B,):
                raise RewardError(f"reward {name!r} returned shape {tuple(s.shape)}, expected ({B},)")
            bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
            if bad:
                more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
                raise RewardError(f"reward {name!r} returned non-finite values for prompts: "
                                  f"{[prompts[i] for i in bad[:3]]}{more}")
            out[name] = s
        return out

    def group_transform(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """(G, K) raw scores of reward `name` -> transformed scores (identity unless groupwise)."""
        return self.rewards[name].group_transform(scores)

    def is_groupwise(self, name: str) -> bool:
        return bool(getattr(self.rewards[name], "groupwise", False))


def load_rewards(specs: list, paths: dict[str, str] | None = None, device="cpu",
                 dtype=torch.float32, frame_stride: int = 1) -> RewardSet:
    """Build the rewards of `specs` (spec strings, or check_specs' result: then nothing is parsed or health-checked
    again). paths maps a registry name to a local folder overriding its hub id; the registry rewards score every
    `frame_stride`-th frame of a video (custom and remote rewards receive every frame)."""
    checked = specs if specs and all(isinstance(s, Spec) for s in specs) else check_specs(specs)
    paths = {k.lower() if k.lower() in REGISTRY else k: v for k, v in (paths or {}).items()}
    for key in paths:
        if key not in REGISTRY and key not in {c.name for c in checked}:
            raise RewardError(f"path override for unknown reward {key!r}; known: {', '.join(sorted(REGISTRY))}")
    rewards, weights = {}, {}
    for c in checked:
        if c.remote is not None:
            rewards[c.name] = c.remote
        elif c.name in REGISTRY:
            rewards[c.name] = _resolve(REGISTRY[c.name], c.name)(path=paths.get(c.name), device=device, dtype=dtype)
        else:
            rewards[c.name] = _build_custom(c.name, c.custom)
        weights[c.name] = c.weight
    strides = {c.name: frame_stride for c in checked if c.name in REGISTRY and c.remote is None}
    return RewardSet(rewards, weights, strides)
