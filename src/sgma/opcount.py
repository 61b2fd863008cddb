"""Counting the aten ops a piece of code dispatches, and those among them that would make the host wait for a GPU.

Works on any device (CPU included), so the no-sync guarantee of the training step is tested without a GPU
(``tests/test_speed.py``) and measured by ``scripts/bench_step.py``.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that make the host wait for a GPU (on CPU they are counted instead of observed)
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t), t.tolist() element-wise
    "aten.item",  # seen instead of the above where composite ops are dispatched whole (inference mode)
    "aten.is_nonzero",  # bool(t)
    "aten.equal",
    "aten.nonzero",
    "aten.nonzero_numpy",  # nonzero(as_tuple=True)
    "aten.argwhere",
    "aten.masked_select",
    "aten.bincount",
    "aten.multinomial",  # its one-sample path validates the probabilities on the host
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}
BOOL_INDEXING_OPS = {"aten.index", "aten.index_put", "aten.index_put_"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active, and among them those that synchronise on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in SYNC_OPS or (name in BOOL_INDEXING_OPS and _has_bool_index(args)):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
