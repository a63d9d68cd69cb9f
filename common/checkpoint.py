"""Training checkpoints for an exact resume: trainable weights, optimizer state, EMA and counters.

Tensors go to safetensors and everything else to JSON, so resuming never unpickles anything. A checkpoint
is written into a temporary folder and renamed when complete, so a crash never leaves a corrupt latest.
"""
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """One clear line about a resume path."""


def _optimizer_to_flat(opt_state):
    tensors, state = {}, {}
    for idx, s in opt_state["state"].items():
        state[str(idx)] = {}
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                state[str(idx)][k] = v
    return tensors, {"state": state, "param_groups": opt_state["param_groups"]}


def _optimizer_from_flat(tensors, meta):
    state = {int(i): dict(extra) for i, extra in meta["state"].items()}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(ckpt_root, step: int, params: dict, optimizer, ema=None, meta: dict | None = None, total_limit=None,
         extra: dict | None = None):
    """Write checkpoints/checkpoint-{step} atomically, then drop the oldest beyond total_limit.
    extra: {name: state dict} of an algorithm's own state (NFT's old policy, AWM's anchor) -> <name>.safetensors."""
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, f"checkpoint-{step}")
    tmp = os.path.join(ckpt_root, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, os.path.join(tmp, "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    if ema is not None:
        save_file({k: v.cpu().contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    for name, state in (extra or {}).items():
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, f"{name}.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "optimizer": opt_meta, **(meta or {})}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if total_limit:
        for old in list_checkpoints(ckpt_root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root):
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_root, d)) for d in os.listdir(ckpt_root)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d)) and os.path.isfile(os.path.join(ckpt_root, d, "state.json"))]
    return [p for _, p in sorted(found)]


def resolve(resume_from, ckpt_root):
    """'latest' -> newest complete checkpoint under ckpt_root; a path -> checked to be a checkpoint."""
    if resume_from == "latest":
        found = list_checkpoints(ckpt_root)
        if not found:
            raise CheckpointError(f"--resume-from latest: no checkpoint in {ckpt_root}")
        return found[-1]
    if not os.path.isfile(os.path.join(resume_from, "state.json")):
        raise CheckpointError(f"--resume-from {resume_from}: not a checkpoint folder (no state.json)")
    return resume_from


def load(path, params: dict, optimizer, ema=None) -> dict:
    """Restore in place; returns the JSON state (step, epoch, ...)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    saved = load_file(os.path.join(path, "trainable.safetensors"))
    missing = set(params) ^ set(saved)
    if missing:
        raise CheckpointError(f"{path}: trainable parameters do not match this run ({len(missing)} differ, "
                              f"e.g. {sorted(missing)[0]}); same --model / LoRA settings needed")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    optimizer.load_state_dict(_optimizer_from_flat(load_file(os.path.join(path, "optimizer.safetensors")),
                                                   state["optimizer"]))
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    return state


def load_extra(path, name: str, script: str) -> dict:
    """The `extra` state dict `name` of a checkpoint written by `script`."""
    f = os.path.join(path, f"{name}.safetensors")
    if not os.path.isfile(f):
        raise CheckpointError(f"{path}: no {name}.safetensors (not a checkpoint of {script})")
    return load_file(f)
