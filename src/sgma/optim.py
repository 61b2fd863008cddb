"""Learning-rate schedule of the paper: linear warm-up from a fraction of the lr, then polynomial decay."""

from __future__ import annotations

import logging
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sgma.checks import is_number

log = logging.getLogger("sgma")


def warmup_poly_factor(step: int, *, total_steps: int, warmup_steps: int, start_factor: float, power: float) -> float:
    """lr multiplier at ``step``: start_factor -> 1 linearly over the warm-up, then (1 - progress)^power."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return (1.0 - progress) ** power


class WarmupPolyLR(LambdaLR):
    """:class:`LambdaLR` over :func:`warmup_poly_factor`, stepped per batch, that follows a resumed run's length.

    Paper defaults: 10 warm-up epochs of 200 (5 %) from 10 % of the lr, decay power 0.9.

    The schedule's length comes from the run (``trainer.max_epochs`` x batches per epoch). A checkpoint stores
    the step reached and the optimizer's current lr; resumed with a different ``trainer.max_epochs``, the
    schedule keeps the new length (the factor is recomputed at each step, never restored) and the lr of the
    first resumed step is set from it too. Otherwise that step would run at the old schedule's lr: 0 at the end
    of a finished schedule. The change is logged (old -> new total and warm-up steps, lr).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_steps: int,
        warmup_fraction: float = 0.05,
        start_factor: float = 0.1,
        power: float = 0.9,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.check_options(warmup_fraction=warmup_fraction, start_factor=start_factor, power=power)
        self.total_steps = int(total_steps)
        self.warmup_steps = round(warmup_fraction * total_steps)
        self.start_factor = float(start_factor)
        self.power = float(power)
        # a closure, not a callable object: LambdaLR would store an object's attributes and restore the old length
        super().__init__(optimizer, lambda step: self.factor(step))

    @staticmethod
    def check_options(*, warmup_fraction: Any = 0.05, start_factor: Any = 0.1, power: Any = 0.9) -> None:
        """The ``scheduler.*`` values, checked when the scheduler is built and by train.py before the run starts
        (the scheduler itself is only built once training begins)."""
        if not (is_number(warmup_fraction) and 0 <= warmup_fraction < 1):
            raise ValueError(f"scheduler.warmup_fraction={warmup_fraction!r} must be in [0, 1)")
        if not (is_number(start_factor) and 0 < start_factor <= 1):
            raise ValueError(f"scheduler.start_factor={start_factor!r} must be in (0, 1]")
        if not (is_number(power) and power > 0):
            raise ValueError(f"scheduler.power={power!r} must be a number > 0")

    def factor(self, step: int) -> float:
        return warmup_poly_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            start_factor=self.start_factor,
            power=self.power,
        )

    # the schedule's shape comes from the run, never from the checkpoint (LambdaLR would restore every attribute)
    _SHAPE = ("total_steps", "warmup_steps", "start_factor", "power")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["schedule"] = {key: state.pop(key) for key in self._SHAPE}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {key: value for key, value in state_dict.items() if key not in (*self._SHAPE, "schedule")}
        old = state_dict.get("schedule") or {}
        super().load_state_dict(state)
        # Lightning restores the optimizer (holding the old schedule's lr) before the scheduler: the step about to
        # run takes its lr from this schedule (bitwise the restored lr when the length did not change)
        restored = [group["lr"] for group in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if (old.get("total_steps"), old.get("warmup_steps")) != (self.total_steps, self.warmup_steps):
            log.warning(
                "resumed with a different schedule length (trainer.max_epochs or the number of devices changed?): "
                "total steps %s -> %d, warm-up steps %s -> %d; step %d runs at lr %.3g (the old schedule's: %.3g), "
                "then the new schedule",
                old.get("total_steps", "unknown"),
                self.total_steps,
                old.get("warmup_steps", "unknown"),
                self.warmup_steps,
                self.last_epoch,
                self._last_lr[0],
                restored[0],
            )
