"""Sharded training with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), on the process group that
`accelerate launch` / `Accelerator()` created (gloo on CPU, NCCL on GPU), for LoRA and full fine-tuning.

Why our own `fully_shard` call and not accelerate's FSDP plugin: accelerate switches to FSDP only on GPU-class
devices (on a CPU it silently runs DDP), and its FSDP2 path takes one model per `prepare()`. torch's FSDP2 runs on
both, so the same code is tested over gloo and trained over NCCL. The sharded module is NOT passed to
`accelerator.prepare` (that would wrap it in DDP); the optimizer may be.

API (every function marked COLLECTIVE must be called by every rank, in the same order):

    shard_module(module, mixed_precision="no", reshard_after_forward=True) -> module   (in place)
    is_sharded(module) -> bool
    rank() -> int; barrier(); any_rank(flags) -> flags OR-ed over ranks (COLLECTIVE)
    no_sync(module)                         context manager: no gradient reduction in non-final micro-steps
    clip_grad_norm_(params, max_norm)       -> plain float tensor (COLLECTIVE when sharded)
    gather_full(tensors: dict)              -> {name: full cpu tensor} on rank 0, {} elsewhere (COLLECTIVE)
    load_full_into(targets: dict, full)     copies full tensors into (sharded) targets in place; no communication
    full_state_dict(module, trainable_only=True) -> {name: full cpu tensor} on rank 0, {} elsewhere (COLLECTIVE)
    load_full_state_dict(module, sd)        every rank passes the full dict; no communication
    full_optimizer_state_dict(optimizer)    -> optimizer.state_dict() with full cpu tensors on rank 0, {} elsewhere
                                               (COLLECTIVE)
    load_full_optimizer_state_dict(optimizer, osd)   every rank passes the full dict; no communication
and in common/checkpoint.py: save_sharded(...) / load_sharded(...) (same arguments as save / load, all ranks) and
export(adapter, finetune, out_dir) (the final diffusers files; COLLECTIVE when sharded).

What gets wrapped. Each diffusers model inside `module` (the module itself, or each registered expert of Wan2.2's
`ExpertPair`) is found by its `_no_split_modules` (FluxTransformerBlock + FluxSingleTransformerBlock,
WanTransformerBlock, ...): `fully_shard` on each such block, then on the model root, then on `module` itself when it
is a container (ExpertPair: one root over both experts). Parameters become DTensors sharded on dim 0 over all ranks;
names are unchanged (named_parameters() / state_dict keys are those of the unsharded module, so checkpoints of
sharded and unsharded runs are interchangeable, and PEFT's names still apply). Mixed precision: "bf16" / "fp16" ->
MixedPrecisionPolicy(param_dtype=bf16 / fp16, reduce_dtype=float32): the sharded parameters keep their dtype (fp32
LoRA / fp32 trainable masters, bf16 frozen base), are cast to param_dtype for the all-gather and the forward, and
gradients are reduced in fp32 into fp32 sharded grads; "no" -> no casting. Frozen and trainable parameters in one
unit (LoRA on a frozen block) are fine in FSDP2 (no flat parameters; only parameters with a gradient are
reduce-scattered), and so are mixed original dtypes (bf16 base + fp32 LoRA) under a param_dtype policy. Trainable
parameters of one unit must share one dtype: cast them (LoRA already is fp32; full fine-tuning: cast the
transformer to fp32 before sharding if you want fp32 masters). The frozen expert of an ExpertPair is not registered,
so it is not sharded: each rank keeps its own full frozen copy (as unsharded runs do).

Order of the set-up (common/run.py): load the adapter -> gradient checkpointing / attention backend -> add_lora (and the fp32
cast of trainable weights) -> a deepcopy reference model if any (before sharding) -> shard_module(transformer,
args.mixed_precision) -> THEN build `params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}`,
the optimizer and every EMA (fully_shard replaces the Parameter objects, so anything built before holds stale
tensors) -> `optimizer = accelerator.prepare(optimizer)` (not the transformer) -> resume with
checkpoint.load_sharded. `adapter.transformer` stays the same object (fully_shard changes its class in place).

Training (common/run.py, Run.accumulate): `no_sync(transformer)` around non-final micro-steps (FSDP2's
set_requires_gradient_sync; it keeps unsharded gradients until the final micro-step, so for full fine-tuning of a
big model it may be better to reduce every micro-step, i.e. not use it); `accelerator.backward(loss)` is a plain
backward for an unprepared module; `clip_grad_norm_(params.values(), max_norm)` (torch's works on DTensor grads and
returns a DTensor; ours returns the plain total norm). FSDP2 reduce-scatters the MEAN over ranks, as DDP does, so a
per-rank mean loss gives the full-batch gradient. EMA (common/ema.py) works unchanged on DTensor parameters: its
shadows are DTensor shards and step / swapped_in are local elementwise ops; gather with gather_full(ema.state_dict())
and restore with load_full_into(ema.state_dict(), full) (state_dict returns the shadows themselves).

Checkpoint: every rank calls checkpoint.save_sharded(...) (no `is_main_process` guard); rank 0 writes the same
files as checkpoint.save, atomically, then all ranks meet at a barrier. Resume: every rank calls
checkpoint.load_sharded(path, params, optimizer, ema) and, for an algorithm's EMA (Run.checkpointed_ema),
load_full_into(old.state_dict(), checkpoint.load_extra(...)). A 1-process unsharded run can load the checkpoint of
a sharded run and vice versa.

Export (checkpoint.export, LoRA / full): every rank, with the EMA swapped in: `sd = full_state_dict(transformer,
trainable_only=finetune == "lora")`; then on rank 0 only: checkpoint.save_lora / save_full from `sd`, the same
diffusers files as Adapter.save_lora / save_full of an unsharded run.

Not covered by the tests: fp16 (accelerate's GradScaler over DTensor gradients; bf16 is the GPU preset); NCCL
(the same calls, only the mesh's device type differs). A frozen reference model (full fine-tuning with KL) is a
deepcopy taken before sharding and may be sharded itself with shard_module; its forwards obey the same symmetry.
FSDP2 warns that a wrapped model "returned a view tensor": harmless while nothing modifies a model output in place
(no adapter or script does); an in-place op there would silently skip the pre-backward all-gather.

Rank symmetry (else a rank waits forever in a collective): every FSDP unit all-gathers in its forward and
reduce-scatters in its backward, so every rank must run the same sequence of forwards and backwards of every wrapped
unit: the same number of rollout / training micro-batches and evaluation batches (the scripts pad these), one
transformer call per predict (every adapter batches CFG's negative and positive rows into one forward, so a rank
with negatives and a rank without still make the same calls; batch sizes may differ across ranks), no rank-0-only
forward (evaluation, sample grids, export forwards), and with both Wan2.2-A14B experts trained, the same set of
experts in every forward. ExpertPair.forward runs only the experts its rows route to, so per-sample sigmas that
differ across ranks (NFT/AWM draw them with the rank in the seed) can send one rank's batch to one expert and
another rank's to both -> hang (verified: 2 ranks over gloo, rows (high, low) on one and (high, high) on the other:
no progress within 60 s). The fix, verified exact against a 1-process run (1.2e-9), belongs in ExpertPair.forward
when it is sharded: `needed = any_rank(used_here)` (a 2-element all-reduce per forward), and each trained expert
needed elsewhere but routed no row here runs on row 0 with `out = out + 0 * expert(**row0)[0].sum()` (a zero-row
forward fails in Wan's unpatchify reshape). Rollouts are symmetric already (every rank walks the same sigma grid).
The gathers (gather_full, full_state_dict, full_optimizer_state_dict, save_sharded) are collectives too; never call
them under `if accelerator.is_main_process`.
"""
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """COLLECTIVE when distributed: the elementwise OR over ranks of a bool tensor (unchanged in one process). E.g.
    the experts that any rank's rows route to, so that every rank runs each of them (see Rank symmetry)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags.bool()
    out = flags.to(torch.int32).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(module) -> bool:
    return isinstance(module, FSDPModule)


def model_roots(module: nn.Module) -> list[nn.Module]:
    """The diffusers models inside `module` (itself, or ExpertPair's registered experts): those with
    `_no_split_modules`, outermost first."""
    roots = []
    for _, m in module.named_modules():
        if getattr(m, "_no_split_modules", None) and not any(m is r or _contains(r, m) for r in roots):
            roots.append(m)
    return roots


def _contains(parent, child):
    return any(m is child for m in parent.modules())


def shard_module(module: nn.Module, mixed_precision: str = "no", reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every `_no_split_modules` block of every model in `module`, then each model root, then `module`
    (if it is a container such as ExpertPair). In place; returns `module`. Needs an initialised default process group
    (Accelerator() / accelerate launch / torchrun); its device type comes from the parameters' device."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_module needs torch.distributed initialised (create the Accelerator first)")
    if mixed_precision not in ("no", *_DTYPES):
        raise ValueError(f"mixed_precision is one of no, bf16, fp16; got {mixed_precision!r}")
    # diffusers blocks return views (e.g. split text/image streams); nothing modifies them in place, and the sharded
    # gradients equal the unsharded ones (tests/test_sharding.py, tests/test_fsdp_runs.py): silence the per-forward warning
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    roots = model_roots(module)
    if not roots:
        raise ValueError(f"{type(module).__name__} holds no model with _no_split_modules: no FSDP wrap units known")
    from torch.distributed.device_mesh import init_device_mesh
    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision], reduce_dtype=torch.float32)
              if mixed_precision in _DTYPES else MixedPrecisionPolicy())
    kw = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for root in roots:
        units = set(root._no_split_modules)
        blocks = [m for _, m in root.named_modules() if type(m).__name__ in units and m is not root]
        if not blocks:
            raise ValueError(f"no {sorted(units)} block found in {type(root).__name__}")
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(root, **kw)
    if module not in roots:
        fully_shard(module, **kw)
    return module


def no_sync(module):
    """Skip gradient reduction in a non-final micro-step: FSDP2's set_requires_gradient_sync(False) for a sharded
    module, DDP's no_sync() for a DDP-wrapped one, nothing otherwise."""
    if is_sharded(module):
        return _fsdp_no_sync(module)
    return module.no_sync() if hasattr(module, "no_sync") else nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_grad_norm_(params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (which handles DTensor gradients: the norm is reduced over ranks), returning a
    plain tensor. Collective when the gradients are DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---- gathering to full tensors and loading them back into shards ---------------------------------------------

def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def gather_full(tensors: dict) -> dict:
    """COLLECTIVE. {name: tensor or DTensor} -> {name: full detached cpu tensor} on rank 0, {} on other ranks. Every
    rank must pass the same names in the same order (one all-gather per DTensor; plain tensors are copied)."""
    rank0 = rank() == 0
    out = {}
    for k, v in tensors.items():
        full = _full(v.detach())
        if rank0:
            out[k] = full.cpu().contiguous()
        del full
    return out


@torch.no_grad()
def copy_full_(dst: torch.Tensor, full: torch.Tensor):
    """Copy a full tensor into `dst`, or into this rank's shard of `dst` when it is a DTensor. No communication."""
    if isinstance(dst, DTensor):
        if tuple(full.shape) != tuple(dst.shape):
            raise ValueError(f"shape {tuple(full.shape)} does not match {tuple(dst.shape)}")
        local = distribute_tensor(full.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements,
                                  src_data_rank=None)  # each rank slices its own shard of its own copy
        dst.to_local().copy_(local.to_local())
    else:
        dst.copy_(full)


def load_full_into(targets: dict, full) -> None:
    """Copy full tensors `full[name]` (a dict or any mapping, e.g. read lazily) into `targets[name]` (tensors or
    DTensor shards) in place, for every name of `targets`. No communication: every rank passes the full tensors."""
    for k, dst in targets.items():
        copy_full_(dst, full[k])


def full_state_dict(module: nn.Module, trainable_only: bool = True) -> dict:
    """COLLECTIVE. The module's state dict as full cpu tensors on rank 0 ({} on other ranks of a sharded module),
    names as in the unsharded module. trainable_only: only parameters with requires_grad (LoRA: exactly the LoRA
    weights; the form of the trainable.safetensors of a checkpoint); else every parameter and buffer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=trainable_only))
    if trainable_only:  # ignore_frozen_params keeps buffers
        names = {n for n, p in module.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in names}
    if not is_sharded(module) and rank() != 0:
        return {}
    return sd


def load_full_state_dict(module: nn.Module, sd) -> None:
    """Load full tensors (names as in full_state_dict; a subset, e.g. the trainable weights) into a sharded or
    unsharded module in place. Every rank passes the full tensors; no communication. Unknown names are an error."""
    targets = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    unknown = [k for k in sd.keys() if k not in targets]
    if unknown:
        raise KeyError(f"{len(unknown)} names are not in {type(module).__name__}, e.g. {unknown[0]}")
    load_full_into({k: targets[k] for k in sd.keys()}, sd)


# ---- optimizer state ---------------------------------------------------------------------------------------
# Ours rather than torch.distributed.checkpoint.state_dict.get/set_optimizer_state_dict: those key the state by
# parameter name (a different checkpoint layout from an unsharded run's optimizer.state_dict(), which is keyed by
# index), and get_optimizer_state_dict initialises an empty state by an lr=0 step (AdamW then records step 1).

def full_optimizer_state_dict(optimizer) -> dict:
    """COLLECTIVE. optimizer.state_dict() with every DTensor state gathered to a full cpu tensor, on rank 0 (the
    layout of an unsharded run's optimizer.state_dict()); {} on other ranks."""
    osd = optimizer.state_dict()
    rank0 = rank() == 0
    state = {}
    for idx in sorted(osd["state"]):
        s = osd["state"][idx]
        gathered = gather_full({k: v for k, v in s.items() if torch.is_tensor(v)})
        if rank0:
            state[idx] = {k: gathered.get(k, v) for k, v in s.items()}
    return {"state": state, "param_groups": osd["param_groups"]} if rank0 else {}


def load_full_optimizer_state_dict(optimizer, osd: dict) -> None:
    """Load a full (unsharded-layout) optimizer state dict into an optimizer over sharded parameters: each state
    tensor of a parameter's shape becomes this rank's shard (a DTensor like the parameter). Every rank passes the full
    dict; no communication."""
    params = optimizer_params(optimizer)
    state = {}
    for idx, s in osd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: shard_like(v, p) for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": osd["param_groups"]})


def optimizer_params(optimizer) -> list:
    """The optimizer's parameters in state_dict index order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def shard_like(v, p):
    """A full optimizer-state tensor of parameter p's shape -> this rank's shard (a DTensor like p); anything else
    (AdamW's step, or any state of an unsharded parameter) unchanged. No communication."""
    if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim() > 0:
        return distribute_tensor(v.to(device=p.device), p.device_mesh, p.placements, src_data_rank=None)
    return v
