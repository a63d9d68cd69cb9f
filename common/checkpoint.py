"""Training checkpoints for an exact resume (trainable weights, optimizer state, EMAs and counters), and the final
export of the trained weights in diffusers format.

Tensors go to safetensors and everything else to JSON, so resuming never unpickles anything. A checkpoint
is written into a temporary folder and renamed when complete, so a crash never leaves a corrupt latest.

save / load: unsharded runs, called on the main process. save_sharded / load_sharded: the same files, called by
every rank of a run sharded with common/sharding.py (full tensors gathered for rank 0 to write; each rank reads
its own shards back); checkpoints of sharded and unsharded runs are interchangeable.
"""
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import sharding
from common.errors import CheckpointError, OutputError, write_cause, writing


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
    return _write(ckpt_root, step, params, optimizer.state_dict(), ema.state_dict() if ema is not None else None,
                  meta, total_limit, extra)


def _write(ckpt_root, step, params, opt_state, ema_state, meta, total_limit, extra):
    final = os.path.join(ckpt_root, f"checkpoint-{step}")
    tmp = os.path.join(ckpt_root, f".tmp-checkpoint-{step}")
    try:
        return _write_into(ckpt_root, final, tmp, step, params, opt_state, ema_state, meta, total_limit, extra)
    except (OSError, SafetensorError) as e:  # a full disk: the temporary folder goes, earlier checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write the checkpoint {final}: {write_cause(e)}") from None


def _write_into(ckpt_root, final, tmp, step, params, opt_state, ema_state, meta, total_limit, extra):
    os.makedirs(ckpt_root, exist_ok=True)
    for stale in os.listdir(ckpt_root):  # a write killed half-way leaves its temporary folder: remove it
        if stale.startswith(".tmp-checkpoint-"):
            shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, os.path.join(tmp, "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(opt_state)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    if ema_state is not None:
        save_file({k: v.cpu().contiguous() for k, v in ema_state.items()}, os.path.join(tmp, "ema.safetensors"))
    for name, state in (extra or {}).items():
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, f"{name}.safetensors"))
    files = sorted(n for n in os.listdir(tmp) if n.endswith(".safetensors"))  # a resume checks each is there
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "optimizer": opt_meta, "files": files, **(meta or {})}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if total_limit:
        for old in list_checkpoints(ckpt_root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded(ckpt_root, step: int, params: dict, optimizer, ema=None, meta: dict | None = None, total_limit=None,
                 extra: dict | None = None):
    """save() for sharded (FSDP2, common/sharding.py) runs; COLLECTIVE: every rank calls it with the same arguments
    (params: this rank's DTensor parameters by name). Parameters, optimizer state, EMA and `extra` are gathered to
    full tensors one at a time, rank 0 writes exactly the files save() writes (the layout of an unsharded run), and
    all ranks meet at a barrier before returning the checkpoint path. Plain tensors pass through unchanged, so it is
    also correct for unsharded runs on any number of processes (rank 0 writes)."""
    full_params = sharding.gather_full(params)
    full_opt = sharding.full_optimizer_state_dict(optimizer)
    full_ema = sharding.gather_full(ema.state_dict()) if ema is not None else None
    full_extra = {name: sharding.gather_full(state) for name, state in (extra or {}).items()}
    final = os.path.join(ckpt_root, f"checkpoint-{step}")
    try:
        if sharding.rank() == 0:
            final = _write(ckpt_root, step, full_params, full_opt, full_ema, meta, total_limit, full_extra)
    finally:
        sharding.barrier()  # nobody reads (or resumes from) a checkpoint before it is complete
    return final


RUN_OUTPUTS = ("checkpoints", "lora", "transformer", "transformer_2", "samples", "metrics.jsonl", "config.json",
               ".tmp-export")
CONFIG_KEYS = {"model", "output_dir", "reward", "seed", "num_epochs"}  # a run's config.json holds these flags


def is_run_config(path) -> bool:
    """Whether `path` is a run's config.json (a JSON object of this project's flags), not another program's file."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and CONFIG_KEYS <= config.keys()


def is_run_folder(output_dir) -> bool:
    """Whether output_dir holds a run of this project: its config.json, or a checkpoint's state.json (a torn
    config.json still leaves the checkpoints that say what the folder is)."""
    return is_run_config(os.path.join(output_dir, "config.json")) or any(
        _readable_state(c) for c in checkpoint_folders(os.path.join(output_dir, "checkpoints")))


def _readable_state(path):
    try:
        with open(os.path.join(path, "state.json")) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def run_outputs(output_dir) -> list[str]:
    """The names of RUN_OUTPUTS present in output_dir."""
    return [n for n in RUN_OUTPUTS if os.path.lexists(os.path.join(output_dir, n))]


def clear_run(output_dir):
    """--overwrite: remove a previous run's outputs from output_dir (checkpoints, exports, samples, logs), only those
    (checks.check_output_dir has refused a folder that is not a run). In checkpoints/, only the checkpoint folders
    (checkpoint-N, .tmp-checkpoint-N) go; anything else a user put there stays."""
    for name in RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if name == "checkpoints" and os.path.isdir(path) and not os.path.islink(path):
            for d in os.listdir(path):
                if re.fullmatch(r"(\.tmp-)?checkpoint-\d+", d):
                    shutil.rmtree(os.path.join(path, d))
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)  # a file, or a link (never followed: its target is not the run's)


def checkpoint_folders(ckpt_root):
    """Every checkpoint-N folder under ckpt_root, complete or not, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_root, d)) for d in os.listdir(ckpt_root)
             if (m := re.fullmatch(r"checkpoint-(\d+)", d)) and os.path.isdir(os.path.join(ckpt_root, d))]
    return [p for _, p in sorted(found)]


def list_checkpoints(ckpt_root):
    """Complete checkpoints (with their state.json, written last), oldest first (temporary folders are ignored)."""
    return [p for p in checkpoint_folders(ckpt_root) if os.path.isfile(os.path.join(p, "state.json"))]


REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "ema.safetensors")  # in every checkpoint


def problem(path):
    """Why the checkpoint folder `path` cannot be resumed (one line), or None: state.json must parse; every file it
    lists (older checkpoints: the three every run writes) must be there; every safetensors header must read (a
    truncated or corrupt file names itself) and the weights (trainable, EMAs; not the optimizer's moments) must be
    finite: weights gone NaN are skipped like a corrupt file. The weights are read once here, before the load."""
    from safetensors import safe_open
    if not os.path.isfile(os.path.join(path, "state.json")):
        return "no state.json (a checkpoint is complete only once it is written)"
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        if not isinstance(state, dict) or "step" not in state or "epoch" not in state:
            return "state.json lacks step/epoch"
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({' '.join(str(e).split())})"
    for name in state.get("files") or REQUIRED:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), "pt") as f:  # the header checks the file's length
                    for key in f.keys() if name != "optimizer.safetensors" else ():  # the weights: read, each finite
                        if not _finite(f.get_tensor(key)):
                            return f"{name} holds non-finite values (NaN or inf) in {key}"
            except Exception as e:  # safetensors raises its own error types for bad headers and short files
                return f"{name} is corrupt ({' '.join(str(e).split())[:120]})"
    return None


def _finite(t) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def resolve(resume_from, ckpt_root, log=print):
    """'latest' -> the newest checkpoint under ckpt_root that can be resumed (newer broken ones are skipped, each
    named in one line), or None when there is none yet (the run starts fresh: a scheduler re-runs the same
    command); CheckpointError when there are checkpoints and none can be resumed. A path -> checked,
    CheckpointError naming what is wrong."""
    if resume_from == "latest":
        folders = checkpoint_folders(ckpt_root)
        for path in reversed(folders):
            why = problem(path)
            if why is None:
                return path
            log(f"skipping checkpoint {path}: {why}")
        if folders:
            some = f"none of the {len(folders)} checkpoints" if len(folders) > 1 else "the one checkpoint"
            raise CheckpointError(f"--resume-from latest: {some} in {ckpt_root} can be resumed (each named above); "
                                  "to start the run afresh, pass --overwrite instead of --resume-from, or choose "
                                  "another --output-dir")
        return None
    if not os.path.isfile(os.path.join(resume_from, "state.json")):
        raise CheckpointError(f"--resume-from {resume_from}: not a checkpoint folder (no state.json)")
    why = problem(resume_from)
    if why:
        raise CheckpointError(f"--resume-from {resume_from}: {why}")
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
    _check_shapes(path, {k: tuple(v.shape) for k, v in saved.items()}, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    optimizer.load_state_dict(_optimizer_from_flat(load_file(os.path.join(path, "optimizer.safetensors")),
                                                   state["optimizer"]))
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    return state


def _check_shapes(path, saved_shapes: dict, params: dict):
    """One line when the checkpoint's tensors do not fit this run's parameters (e.g. another --lora-rank)."""
    for k, p in params.items():
        if saved_shapes[k] != tuple(p.shape):
            raise CheckpointError(f"{path}: trainable parameters do not match this run ({k}: saved "
                                  f"{list(saved_shapes[k])}, this run {list(p.shape)}); same --model / LoRA settings "
                                  "needed")


def load_sharded(path, params: dict, optimizer, ema=None) -> dict:
    """load() for sharded runs (every rank calls it; also correct unsharded): each rank reads the full tensors from
    the safetensors files one at a time and keeps its own shard of each (no communication, one full tensor in memory
    at a time). Reads checkpoints of sharded and unsharded runs alike; returns the JSON state."""
    from safetensors import safe_open
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    with safe_open(os.path.join(path, "trainable.safetensors"), "pt") as f:
        missing = set(params) ^ set(f.keys())
        if missing:
            raise CheckpointError(f"{path}: trainable parameters do not match this run ({len(missing)} differ, "
                                  f"e.g. {sorted(missing)[0]}); same --model / LoRA settings needed")
        _check_shapes(path, {k: tuple(f.get_slice(k).get_shape()) for k in params}, params)
        for k, p in params.items():
            sharding.copy_full_(p, f.get_tensor(k))
    opt_params = sharding.optimizer_params(optimizer)
    with safe_open(os.path.join(path, "optimizer.safetensors"), "pt") as f:  # each moment into its shard on read
        tensors = {}
        for key in f.keys():
            tensors[key] = sharding.shard_like(f.get_tensor(key), opt_params[int(key.split(".", 1)[0])])
    optimizer.load_state_dict(_optimizer_from_flat(tensors, state["optimizer"]))
    if ema is not None:
        with safe_open(os.path.join(path, "ema.safetensors"), "pt") as f:
            sharding.load_full_into(ema.state_dict(), _Lazy(f))
    return state


class _Lazy:
    """A safetensors file as a read-on-demand mapping (one tensor in memory at a time)."""

    def __init__(self, f):
        self.f = f

    def __getitem__(self, k):
        return self.f.get_tensor(k)

    def keys(self):
        return self.f.keys()


def load_extra(path, name: str, script: str) -> dict:
    """The `extra` state dict `name` of a checkpoint written by `script`."""
    f = os.path.join(path, f"{name}.safetensors")
    if not os.path.isfile(f):
        raise CheckpointError(f"{path}: no {name}.safetensors (not a checkpoint of {script})")
    return load_file(f)


# ---- the final export: the trained weights in diffusers format ---------------------------------------------------
def component_state_dicts(adapter, sd: dict) -> dict:
    """{component: its part of sd} for adapter.trained_components(): the trained module is the component itself,
    or a container (ExpertPair) whose submodule names are the component names."""
    comps = adapter.trained_components()
    module = adapter.trained_module()
    if len(comps) == 1 and next(iter(comps.values())) is module:
        return {next(iter(comps)): sd}
    return {c: {k[len(c) + 1:]: v for k, v in sd.items() if k.startswith(c + ".")} for c in comps}


def export(adapter, finetune: str, output_dir: str) -> None:
    """The run's final weights in diffusers format: LoRA into output_dir/lora, full fine-tuning into
    output_dir/<component>. COLLECTIVE when the trained module is sharded (every rank gathers, rank 0 writes);
    unsharded, rank 0 writes from its own replica. Written into output_dir/.tmp-export, then each folder renamed into
    place, so a killed export leaves no half-written LoRA (and export_done tells a resumed run to redo it)."""
    module = adapter.trained_module()
    sd = sharding.full_state_dict(module, trainable_only=finetune == "lora") if sharding.is_sharded(module) else None
    if sharding.rank() != 0:
        return
    tmp = os.path.join(output_dir, ".tmp-export")
    try:
        with writing("the export", os.path.join(output_dir, "lora" if finetune == "lora" else "transformer")):
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            if finetune == "lora":
                (save_lora(adapter, os.path.join(tmp, "lora"), sd) if sd is not None
                 else adapter.save_lora(os.path.join(tmp, "lora")))
            else:
                save_full(adapter, tmp, sd) if sd is not None else adapter.save_full(tmp)
            for name in os.listdir(tmp):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:  # a full disk leaves nothing half-written (the checkpoints still hold the run)
        shutil.rmtree(tmp, ignore_errors=True)


def export_done(adapter, finetune: str, output_dir: str) -> bool:
    """Whether every trained component's final export is in place (a resumed run whose epochs are all done redoes
    an export that was interrupted)."""
    for comp in adapter.trained_components():
        if finetune == "lora":
            folder = os.path.join(output_dir, "lora", *(() if comp == "transformer" else (comp,)))
            if not os.path.isfile(os.path.join(folder, "pytorch_lora_weights.safetensors")):
                return False
        elif not os.path.isfile(os.path.join(output_dir, comp, "config.json")):
            return False
    return True


def save_lora(adapter, out_dir: str, sd: dict) -> None:
    """Rank 0: Adapter.save_lora's diffusers LoRA files from gathered weights (full_state_dict(..., True))."""
    from peft.utils import get_peft_model_state_dict
    for comp, part in component_state_dicts(adapter, sd).items():
        net = adapter.trained_components()[comp]
        adapter.pipeline_cls.save_lora_weights(
            out_dir if comp == "transformer" else os.path.join(out_dir, comp),
            transformer_lora_layers=get_peft_model_state_dict(net, state_dict=part),
            transformer_lora_adapter_metadata=net.peft_config["default"].to_dict(), safe_serialization=True)


def save_full(adapter, out_dir: str, sd: dict) -> None:
    """Rank 0: Adapter.save_full's diffusers folders (out_dir/<component>) from gathered weights
    (full_state_dict(..., trainable_only=False)): diffusers' own save_pretrained, fed the gathered state dict."""
    for comp, part in component_state_dicts(adapter, sd).items():
        net = adapter.trained_components()[comp]
        expected = set(net.state_dict().keys())
        if set(part) != expected:
            raise ValueError(f"save_full: the gathered state of {comp} is not its whole state dict "
                             f"({len(set(part) ^ expected)} names differ); gather with trainable_only=False")
        net.state_dict = lambda *a, _part=part, **k: _part  # save_pretrained reads self.state_dict()
        try:
            net.save_pretrained(os.path.join(out_dir, comp))
        finally:
            del net.state_dict
