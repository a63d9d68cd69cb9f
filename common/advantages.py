"""Group-relative advantages (docs/algorithms.md C.3, decision 3), shared by every algorithm.

rewards: {name: (S,)} raw scores of all S samples of the epoch (gathered across ranks, global order);
groups: (S,) group id per sample. Returns (S,) advantages clipped to +-clip.
"""
import torch


def _group_stats(x, groups):
    """Per-sample mean and population std of the sample's group."""
    ids, inv = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids), dtype=x.dtype).index_add_(0, inv, torch.ones_like(x))
    mean = torch.zeros(len(ids), dtype=x.dtype).index_add_(0, inv, x) / count
    var = torch.zeros(len(ids), dtype=x.dtype).index_add_(0, inv, (x - mean[inv]) ** 2) / count
    return mean[inv], var.sqrt()[inv]


def _centred(x, mean, std):
    # a constant group (std <= 1e-6) carries no signal: exactly 0, not rounding noise over eps
    return torch.where(std > 1e-6, x - mean, torch.zeros_like(x))


def compute_advantages(rewards: dict, weights: dict, groups, aggregation="sum", global_std=False,
                       eps=1e-4, clip=5.0):
    groups = torch.as_tensor(groups)
    if aggregation == "sum":
        total = sum(weights[k] * rewards[k].double() for k in rewards)
        mean, std = _group_stats(total, groups)
        scale = total.std(unbiased=False) if global_std else std
        adv = _centred(total, mean, std) / (scale + eps)
    elif aggregation == "gdpo":  # normalise each reward within its group, then re-standardise globally
        combined = 0
        for k in rewards:
            r = rewards[k].double()
            mean, std = _group_stats(r, groups)
            combined = combined + weights[k] * _centred(r, mean, std) / (std + eps)
        adv = (combined - combined.mean()) / (combined.std(unbiased=False) + eps)
    else:
        raise ValueError(f"unknown advantage aggregation {aggregation!r}; use 'sum' or 'gdpo'")
    return adv.clamp(-clip, clip).float()


def epoch_advantages(raw: dict, reward_set, groups, args) -> tuple[dict, torch.Tensor]:
    """The epoch's advantages from its gathered raw scores (every rank holds the whole epoch): group-wise rewards
    are first ranked within each group of K (a group may span ranks), then compute_advantages with the run's
    aggregation, std, eps and clip. Returns (raw with the group-wise transforms applied, advantages)."""
    all_groups = torch.tensor(groups)
    raw = dict(raw)
    for k in reward_set.names:
        if reward_set.is_groupwise(k):
            order = torch.argsort(all_groups, stable=True)
            gk = reward_set.group_transform(k, raw[k][order].view(-1, args.group_size))
            raw[k] = torch.empty_like(raw[k]).index_copy_(0, order, gk.flatten().to(raw[k].dtype))
    return raw, compute_advantages(raw, reward_set.weights, all_groups, args.advantage_aggregation, args.global_std,
                                   args.adv_eps, args.adv_clip)
