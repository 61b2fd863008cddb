"""Epoch draws shared by every DDP rank, sharded into disjoint equal-length slices, resumable mid-epoch.

The training samplers (:class:`~sgma.data.datamodule.RandomPatternSampler`,
:class:`~sgma.data.mas.MASSampler`) draw an epoch's ``(sample index, pattern id)`` keys as a function of
(seed, epoch[, memory]), identical on every rank, and each rank takes its share, yielded as
``(sample index, pattern id, epoch)``: the dataset draws the sample's crop and augmentation from the epoch.
A run resumed from a checkpoint written mid-epoch must not see the keys it already trained on again:
:meth:`EpochSampler.resume` makes the next iteration of that epoch skip them, exactly as many as the
interrupted run consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) outside distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_over_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Tensors summed over the ranks of the process group with ONE all_reduce, on the device its backend
    communicates from (gloo: CPU; nccl: this rank's GPU), in int64 (or float64 when any is floating, exact for
    counts below 2**53); returned in their own dtypes on their own devices. Every rank must call it with the
    same shapes. Outside torch.distributed, the tensors as they are."""
    _, world = distributed_rank_and_size()
    if world == 1:
        return list(tensors)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    dtype = torch.float64 if any(t.is_floating_point() for t in tensors) else torch.int64
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out, begin = [], 0
    for t in tensors:
        out.append(flat[begin : begin + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
        begin += t.numel()
    return out


def equal_shard(keys: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of an epoch's keys: disjoint positions, equal lengths (the list is padded by
    wrapping around, so every rank runs the same number of steps, as DDP requires)."""
    if world_size == 1:
        return keys
    per_rank = -(-len(keys) // world_size)
    padded = keys + keys[: per_rank * world_size - len(keys)]
    return padded[rank::world_size]


class EpochSampler(Sampler[tuple[int, int, int]]):
    """Base of the training samplers: :meth:`epoch_keys` is the whole epoch's draw; this class shards it and
    skips what a resumed run already consumed.

    ``len()`` is always the full per-rank epoch, as Lightning counts batches from it and continues the batch
    index of a resumed epoch; only the iteration is shortened.
    """

    num_samples: int
    epoch: int = 0
    _resume: tuple[int, int] | None = None

    def epoch_keys(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        _, world = distributed_rank_and_size()
        return -(-self.num_samples // world)

    def shard(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s keys of the current epoch among ``world_size`` ranks (no process group needed)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        return equal_shard(self.epoch_keys(), rank, world_size)

    def resume(self, epoch: int, consumed: int) -> None:
        """Continue epoch ``epoch`` after its first ``consumed`` keys of this rank (one-shot: the next
        iteration of that epoch skips them, later epochs are whole)."""
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.set_epoch(epoch)
        self._resume = (int(epoch), int(consumed))

    @property
    def pending_skip(self) -> int:
        """Keys the next iteration skips (0 unless resuming within the current epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        # a generator: the draw happens at the first next(), after Lightning's set_epoch for this epoch
        keys = self.shard(*distributed_rank_and_size())
        skip = self.pending_skip
        self._resume = None
        epoch = self.epoch
        for index, pattern in keys[skip:]:
            yield index, pattern, epoch
