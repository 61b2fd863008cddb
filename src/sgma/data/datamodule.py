"""Incomplete-modality samples and the LightningDataModule that feeds them.

Samplers yield ``(sample index, pattern id)`` keys and :class:`IncompleteModalityDataset` turns a key into a
sample: normalised modality tensors (zeros for missing ones), ``mask`` (int64, 255 = ignore),
``available`` (bool per modality), ``pattern`` (the pattern id, for per-pattern metrics) and ``index``.
Samplers shard themselves under DDP (the trainer runs with ``use_distributed_sampler=False``). Training
draws patterns with a :class:`~sgma.data.missing.MissingPolicy`; validation and test visit every
(pattern, sample) pair of a pattern list deterministically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sgma.data.missing import MissingPolicy, UniformPatterns
from sgma.modalities import Modality, all_patterns, pattern_mask, resolve_patterns

SPLITS = ("train", "val", "test")


class IncompleteModalityDataset(Dataset):
    """Wraps a raw multimodal dataset; ``dataset[(index, pattern_id)]`` is one incomplete-modality sample.

    The raw dataset returns un-normalised float tensors per modality and ``mask``; it declares
    ``modalities`` (canonical order, with normalisation), ``classes`` and ``palette``.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.modalities: tuple[Modality, ...] = tuple(base.modalities)
        self.patterns = all_patterns(self.modalities)
        self.masks = torch.tensor([pattern_mask(p, self.modalities) for p in self.patterns])
        self.norm = {
            m.name: (torch.tensor(m.mean).view(-1, 1, 1), torch.tensor(m.std).view(-1, 1, 1)) for m in self.modalities
        }

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, pattern_id = key
        raw = self.base[index]
        available = self.masks[pattern_id]
        sample: dict[str, torch.Tensor] = {}
        for m, present in zip(self.modalities, available.tolist(), strict=True):
            x = raw[m.name]
            if present:
                mean, std = self.norm[m.name]
                sample[m.name] = ((x - mean) / std).float()
            else:
                sample[m.name] = torch.zeros_like(x, dtype=torch.float32)
        sample["mask"] = raw["mask"].long()
        sample["available"] = available.clone()
        sample["pattern"] = torch.tensor(pattern_id, dtype=torch.long)
        sample["index"] = torch.tensor(index, dtype=torch.long)  # robustness memory is kept per sample
        return sample


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) outside distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def equal_shard(keys: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of an epoch's keys: disjoint positions, equal lengths (the list is padded by
    wrapping around, so every rank runs the same number of steps, as DDP requires)."""
    if world_size == 1:
        return keys
    per_rank = -(-len(keys) // world_size)
    padded = keys + keys[: per_rank * world_size - len(keys)]
    return padded[rank::world_size]


class RandomPatternSampler(Sampler[tuple[int, int]]):
    """A random permutation of the samples, each with a pattern drawn by the policy.

    One draw per epoch from (seed, epoch), identical on every rank, then sharded: each DDP rank takes a
    disjoint, equal-length slice. Lightning calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, num_samples: int, policy: MissingPolicy, *, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.policy = policy
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        _, world = distributed_rank_and_size()
        return -(-self.num_samples // world)

    def epoch_keys(self) -> list[tuple[int, int]]:
        """The whole epoch's (index, pattern id) draw, before sharding."""
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.num_samples)
        patterns = self.policy.draw(rng, self.num_samples)
        return list(zip(order.tolist(), patterns.tolist(), strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from equal_shard(self.epoch_keys(), *distributed_rank_and_size())


class PatternGridSampler(Sampler[tuple[int, int]]):
    """Every sample under every listed pattern, pattern-major, in a fixed order.

    Under DDP each rank takes every world-size-th key with no padding, so every (pattern, sample) pair is
    scored exactly once and the summed confusion matrices are exact.
    """

    def __init__(self, num_samples: int, pattern_ids: Sequence[int]) -> None:
        self.num_samples = num_samples
        self.pattern_ids = list(pattern_ids)

    def _keys(self) -> list[tuple[int, int]]:
        rank, world = distributed_rank_and_size()
        keys = [(index, pid) for pid in self.pattern_ids for index in range(self.num_samples)]
        return keys[rank::world]

    def __len__(self) -> int:
        return len(self._keys())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from self._keys()


class MultiModalDataModule(L.LightningDataModule):
    """Builds each split from ``dataset(split=..., **splits[split])`` and serves incomplete-modality batches.

    Dataset facts (modalities, classes, palette) are read off the train split and flow to the model.
    """

    def __init__(
        self,
        *,
        dataset: Callable[..., Dataset],
        splits: Mapping[str, Mapping] | None = None,
        missing: MissingPolicy | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_patterns: str | Sequence[str] = "all",
        test_patterns: str | Sequence[str] = "all",
        seed: int = 0,
        sampler: str = "random",
        mas_options: Mapping | None = None,
    ) -> None:
        super().__init__()
        if sampler not in ("random", "mas"):
            raise ValueError(f"data.sampler must be 'random' or 'mas', got {sampler!r}")
        self.sampler = sampler
        self.mas_options = dict(mas_options or {})
        self.factory = dataset
        self.splits = {s: dict((splits or {}).get(s) or {}) for s in SPLITS}
        self.missing = missing or UniformPatterns()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.pattern_lists = {"val": val_patterns, "test": test_patterns}
        self.seed = seed
        self._datasets: dict[str, IncompleteModalityDataset] = {}
        self.train_sampler: Sampler | None = None
        self._pending_sampler_state: dict | None = None
        self.missing.bind(self.modalities)  # fail before training if the policy names unknown modalities
        for split in ("val", "test"):
            self.eval_patterns(split)

    def dataset(self, split: str) -> IncompleteModalityDataset:
        if split not in self._datasets:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
            self._datasets[split] = IncompleteModalityDataset(self.factory(split=split, **self.splits[split]))
        return self._datasets[split]

    # dataset facts -------------------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[Modality, ...]:
        return self.dataset("train").modalities

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.dataset("train").base.classes)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(self.dataset("train").base.palette)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def patterns(self) -> list[str]:
        """All non-empty patterns; pattern ids in batches index this list."""
        return all_patterns(self.modalities)

    def eval_patterns(self, split: str, override: str | Sequence[str] | None = None) -> list[str]:
        spec = override if override is not None else self.pattern_lists.get(split, "all")
        return resolve_patterns(spec, self.modalities)

    # loaders -------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        data = self.dataset("train")
        if self.train_sampler is None:
            self.train_sampler = self._build_train_sampler(len(data))
        return self._loader(data, self.train_sampler, self.batch_size, drop_last=len(data) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def _build_train_sampler(self, num_samples: int) -> Sampler:
        if self.sampler == "random":
            return RandomPatternSampler(num_samples, self.missing, seed=self.seed)
        from sgma.data.mas import MASSampler, RobustnessMemory

        options = dict(self.mas_options)
        memory = RobustnessMemory(num_samples, len(self.modalities), momentum=options.pop("momentum", 0.1))
        sampler = MASSampler(num_samples, self.missing, memory, seed=self.seed, **options)
        if self._pending_sampler_state is not None:  # resuming: restore memory and sampler state
            sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return sampler

    def eval_dataloader(self, split: str, patterns: str | Sequence[str] | None = None) -> DataLoader:
        data = self.dataset(split)
        ids = [self.patterns.index(p) for p in self.eval_patterns(split, patterns)]
        return self._loader(data, PatternGridSampler(len(data), ids), self.eval_batch_size, drop_last=False)

    def _loader(self, data: Dataset, sampler: Sampler, batch_size: int, *, drop_last: bool) -> DataLoader:
        return DataLoader(
            data,
            sampler=sampler,
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    # checkpoints: the MAS sampler's robustness memory and state travel with the datamodule's state
    def state_dict(self) -> dict:
        state = {"seed": self.seed, "missing": self.missing.name, "sampler": self.sampler}
        if self.train_sampler is not None and hasattr(self.train_sampler, "state_dict"):
            state["sampler_state"] = self.train_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"resuming with datamodule seed {self.seed}, but the checkpoint was trained with {state.get('seed')}; "
                f"set seed={state.get('seed')} to continue the same sample order"
            )
        if "sampler_state" in state and state.get("sampler") == self.sampler:
            if self.train_sampler is not None and hasattr(self.train_sampler, "load_state_dict"):
                self.train_sampler.load_state_dict(state["sampler_state"])
            else:
                self._pending_sampler_state = state["sampler_state"]
