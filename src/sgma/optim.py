"""Learning-rate schedule of the paper: linear warm-up from a fraction of the lr, then polynomial decay."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_poly_factor(step: int, *, total_steps: int, warmup_steps: int, start_factor: float, power: float) -> float:
    """lr multiplier at ``step``: start_factor -> 1 linearly over the warm-up, then (1 - progress)^power."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return (1.0 - progress) ** power


def warmup_poly(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_fraction: float = 0.05,
    start_factor: float = 0.1,
    power: float = 0.9,
) -> LambdaLR:
    """Paper defaults: 10 warm-up epochs of 200 (5 %) from 10 % of the lr, decay power 0.9; stepped per batch."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup_steps = round(warmup_fraction * total_steps)
    return LambdaLR(
        optimizer,
        lambda step: warmup_poly_factor(
            step, total_steps=total_steps, warmup_steps=warmup_steps, start_factor=start_factor, power=power
        ),
    )
