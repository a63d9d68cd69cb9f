"""Exponential moving average of the trainable parameters, with the decay schedules of docs/algorithms.md E.6.

GRPO uses it for evaluation and saving only; NFT/AWM use it as the old/anchor policy.
theta_ema <- d * theta_ema + (1 - d) * theta, applied when (step + 1) % interval == 0.
"""
import math
from contextlib import contextmanager
from typing import Literal

import torch

Schedule = Literal["constant", "power", "linear", "piecewise_linear", "cosine", "warmup_cosine"]


def ema_decay(schedule: str, step: int, decay: float, warmup_steps: int = 10, initial_decay: float = 0.0,
              flat_steps: int = 0, ramp_rate: float = 0.001, total_steps: int = 1000) -> float:
    if schedule == "constant":
        return decay
    if schedule == "power":
        return decay if warmup_steps == 0 else min(decay, (1 + step) / (warmup_steps + step))
    if schedule == "linear":
        return initial_decay + (decay - initial_decay) * min(step / max(warmup_steps, 1), 1.0)
    if schedule == "piecewise_linear":
        return initial_decay if step < flat_steps else min(initial_decay + (step - flat_steps) * ramp_rate, decay)
    if schedule == "cosine":
        return initial_decay + (decay - initial_decay) * (1 - math.cos(math.pi * min(step / total_steps, 1.0))) / 2
    if schedule == "warmup_cosine":
        if step < warmup_steps:
            return initial_decay * step / warmup_steps
        frac = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return initial_decay + (decay - initial_decay) * (1 - math.cos(math.pi * frac)) / 2
    raise ValueError(f"unknown EMA schedule {schedule!r}")


class EMA:
    def __init__(self, params, interval: int = 1, device=None, **schedule):
        """device: where the fp32 shadow weights live (default: with the parameters; "cpu" frees accelerator memory,
        at the cost of a transfer per update and per swap)."""
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().float().clone().to(device or p.device) for p in self.params]
        self.interval, self.schedule = interval, schedule

    @torch.no_grad()
    def step(self, step: int):
        """Update after epoch/optimizer step `step` (0-based); returns the decay used or None."""
        if (step + 1) % self.interval:
            return None
        d = ema_decay(step=step, **self.schedule)
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float().to(s.device), alpha=1 - d)
        return d

    @contextmanager
    def swapped_in(self):
        """Temporarily load the EMA weights into the model (evaluation, saving)."""
        backup = [p.detach().to(s.device, copy=True) for s, p in zip(self.shadow, self.params)]  # kept with the shadow
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self):
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, sd):
        for i, s in enumerate(self.shadow):
            s.copy_(sd[f"ema.{i}"])
