"""Python values of small device tensors that per-step code decides on: the sigma schedule (which rollout steps draw
noise, Wan2.2-A14B's expert, Z-Image's CFG cut-off), condition-image layouts, text lengths. Reading a device tensor
on the host makes the CPU wait until the device has run everything queued before it, and the device then idles
while the CPU queues the next work (issue 20). So each tensor is read once: the steps of a rollout share one
schedule and one cond, so its first step reads and the later ones wait for nothing. A tensor changed in place is
read again."""
import torch
from torch.utils.weak import WeakIdKeyDictionary

_MEMO = WeakIdKeyDictionary()  # tensor -> {(make, args): (the tensor's version counter, make(tensor, *args))}


def once(t: torch.Tensor, make, *args):
    """make(t, *args), computed once per tensor object (and again after an in-place change of t)."""
    version = None if t.is_inference() else t._version  # an inference tensor keeps no version counter
    memo = _MEMO.setdefault(t, {})
    hit = memo.get((make, args))
    if hit is None or hit[0] != version:
        hit = memo[(make, args)] = (version, make(t, *args))
    return hit[1]


def values(t: torch.Tensor):
    """t.tolist(), read once per tensor."""
    return once(t, torch.Tensor.tolist)


def value(x):
    """A number as it is; a tensor's values (values()). An element of a 1-D tensor (sigmas[i], a view) is read from
    that tensor's values: every step of a rollout indexes one schedule, read once."""
    if not torch.is_tensor(x):
        return x
    base = x._base
    if x.dim() == 0 and base is not None and base.dim() == 1 and base.dtype == x.dtype and base.stride(0) > 0:
        k, r = divmod(x.storage_offset() - base.storage_offset(), base.stride(0))
        if r == 0 and 0 <= k < len(base):
            return values(base)[k]
    return values(x)
