"""Incomplete-modality samples and the LightningDataModule that feeds them.

Samplers yield ``(sample index, pattern id[, epoch])`` keys and :class:`IncompleteModalityDataset` turns a key
into a sample: normalised modality tensors (zeros for missing ones), ``mask`` (int64, 255 = ignore),
``available`` (bool per modality), ``pattern`` (the pattern id, for per-pattern metrics) and ``index``.
Training keys carry the epoch: the sample's crop and augmentation are drawn from (seed, epoch, index), so every
epoch differs while every run, worker and resumed run draws the same sample for the same key.
Samplers shard themselves under DDP (the trainer runs with ``use_distributed_sampler=False``). Training
draws patterns with a :class:`~sgma.data.missing.MissingPolicy`; validation and test visit every
(pattern, sample) pair of a pattern list deterministically.
"""

from __future__ import annotations

import dataclasses
import signal
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sgma.data.augment import Augment
from sgma.data.mas import MASSampler, RobustnessMemory
from sgma.data.missing import MissingPolicy, UniformPatterns
from sgma.data.sharding import EpochSampler, distributed_rank_and_size
from sgma.modalities import Modality, all_patterns, pattern_mask, resolve_patterns

SPLITS = ("train", "val", "test")

# Lightning warns on every mid-epoch resume unless the DataLoader itself has state_dict/load_state_dict; ours is
# resumable through the datamodule's state (the sampler's position, see MultiModalDataModule.state_dict)
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


class IncompleteModalityDataset(Dataset):
    """Wraps a raw multimodal dataset; ``dataset[(index, pattern_id)]`` is one incomplete-modality sample, and
    ``dataset[(index, pattern_id, epoch)]`` one training sample of that epoch, augmented by ``augment``.

    The raw dataset returns un-normalised float tensors per modality and ``mask`` (``base[index]``); it declares
    ``modalities`` (canonical order, with normalisation), ``classes`` and ``palette``. A training split also has
    ``crop_size`` and ``sample(index, epoch, window, names)``: sample ``index`` of ``epoch`` read as a random
    window of side ``window`` (which the augmentation's zoom resizes to ``crop_size``), only for the modalities
    ``names`` (missing ones are never read).

    Evaluation keys of one sample arrive together (:class:`PatternGridSampler` is sample-major), so the last raw
    evaluation sample is kept and read once for all its patterns, not once per pattern (a tile read and decoded,
    or a synthetic scene rendered, 2^M - 1 times).
    """

    # the augmentation's stream is (seed, epoch, index, AUGMENT_STREAM): apart from the dataset's crop positions,
    # which are drawn from (dataset seed, epoch, index), even when both seeds are equal
    AUGMENT_STREAM = 1

    def __init__(
        self,
        base: Dataset,
        *,
        augment: Augment | None = None,
        seed: int = 0,
        modalities: Sequence[Modality] | None = None,
    ) -> None:
        self.base = base
        self.augment = augment
        self.seed = int(seed)
        if augment is not None and not (hasattr(base, "sample") and hasattr(base, "crop_size")):
            raise TypeError(
                f"{type(base).__name__} cannot serve training samples: a train dataset needs crop_size and "
                f"sample(index, epoch, window, names) (see sgma.data.tiles.CachedCropDataset)"
            )
        # ``modalities``: the base's own, with other normalisation statistics (eval.py: the checkpoint's)
        self.modalities: tuple[Modality, ...] = tuple(base.modalities if modalities is None else modalities)
        if [(m.name, m.channels) for m in self.modalities] != [(m.name, m.channels) for m in base.modalities]:
            raise ValueError(f"modalities {self.modalities} do not match the dataset's {tuple(base.modalities)}")
        self.patterns = all_patterns(self.modalities)
        self.masks = torch.tensor([pattern_mask(p, self.modalities) for p in self.patterns])
        self.norm = {
            m.name: (torch.tensor(m.mean).view(-1, 1, 1), torch.tensor(m.std).view(-1, 1, 1)) for m in self.modalities
        }
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # (index, raw) of the last evaluation read

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, int]) -> dict[str, torch.Tensor]:
        index, pattern_id, *epoch = key
        available = self.masks[pattern_id]
        if epoch:
            present = [m for m, a in zip(self.modalities, available.tolist(), strict=True) if a]
            raw = self._training_sample(index, int(epoch[0]), present)
        else:
            raw = self._evaluation_sample(index)
        sample: dict[str, torch.Tensor] = {}
        for m, present in zip(self.modalities, available.tolist(), strict=True):
            if present:
                mean, std = self.norm[m.name]
                sample[m.name] = ((raw[m.name] - mean) / std).float()
            else:
                sample[m.name] = torch.zeros(m.channels, *raw["mask"].shape, dtype=torch.float32)
        sample["mask"] = raw["mask"].to(torch.long, copy=True)  # raw may be kept for the sample's next pattern
        sample["available"] = available.clone()
        sample["pattern"] = torch.tensor(pattern_id, dtype=torch.long)
        sample["index"] = torch.tensor(index, dtype=torch.long)  # robustness memory is kept per sample
        return sample

    def _evaluation_sample(self, index: int) -> dict[str, torch.Tensor]:
        """``base[index]``, read once for consecutive keys of one sample (never modified: outputs are copies)."""
        if self._last is None or self._last[0] != index:
            self._last = (index, self.base[index])
        return self._last[1]

    def _training_sample(self, index: int, epoch: int, present: list[Modality]) -> dict[str, torch.Tensor]:
        """The raw, augmented modalities ``present`` and mask of training sample ``index`` in ``epoch``."""
        augment = self.augment
        if augment is None:
            raise ValueError(
                f"training key (index {index}, epoch {epoch}) for a dataset built without augment: wrap the train "
                f"split as IncompleteModalityDataset(base, augment=Augment(...)) (Augment() = none)"
            )
        crop = int(self.base.crop_size)
        draw = augment.draw(np.random.default_rng((self.seed, epoch, index, self.AUGMENT_STREAM)), crop)
        raw = self.base.sample(index, epoch, draw.window, [m.name for m in present])
        return augment(raw, draw, present, crop)  # also pads a window clipped by a small image


class RandomPatternSampler(EpochSampler):
    """A random permutation of the samples, each with a pattern drawn by the policy.

    One draw per epoch from (seed, epoch), identical on every rank, then sharded: each DDP rank takes a
    disjoint, equal-length slice. Lightning calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, num_samples: int, policy: MissingPolicy, *, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.policy = policy
        self.seed = seed
        self.epoch = 0

    def epoch_keys(self) -> list[tuple[int, int]]:
        """The whole epoch's (index, pattern id) draw, before sharding."""
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.num_samples)
        patterns = self.policy.draw(rng, self.num_samples)
        return list(zip(order.tolist(), patterns.tolist(), strict=True))

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"train sampler state is for {state['num_samples']} samples but this sampler has {self.num_samples}: "
                "the checkpoint was trained on a different dataset or split"
            )
        self.epoch = int(state["epoch"])


class PatternGridSampler(Sampler[tuple[int, int]]):
    """Every sample under every listed pattern, sample-major (all patterns of sample 0, then of sample 1, ...),
    in a fixed order: a sample's keys come together, so :class:`IncompleteModalityDataset` reads it once.

    Under DDP each rank takes every world-size-th key with no padding, so every (pattern, sample) pair is
    scored exactly once and the summed confusion matrices are exact. Fewer pairs than ranks are refused: a rank
    without any would leave the others waiting in the epoch-end reductions.
    """

    def __init__(self, num_samples: int, pattern_ids: Sequence[int]) -> None:
        self.num_samples = num_samples
        self.pattern_ids = list(pattern_ids)

    def _keys(self) -> list[tuple[int, int]]:
        rank, world = distributed_rank_and_size()
        keys = [(index, pid) for index in range(self.num_samples) for pid in self.pattern_ids]
        if len(keys) < world:
            raise ValueError(
                f"{len(keys)} (sample, pattern) pair(s) to score ({self.num_samples} sample(s) x "
                f"{len(self.pattern_ids)} pattern(s)) on {world} processes, which each need one: score them with "
                f"trainer.devices={max(1, len(keys))} (x trainer.num_nodes) or fewer, or more samples or patterns"
            )
        return keys[rank::world]

    def __len__(self) -> int:
        return len(self._keys())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from self._keys()


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT, SIGTERM and SLURM's time-limit warnings (SIGUSR1/SIGUSR2, whose default
    action kills): Ctrl-C and SLURM signal the whole process group, and a worker that died with it would crash the
    main process before it saves its checkpoint (sgma.recovery); the main process shuts its workers down itself,
    and they exit on their own if it dies."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


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
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        # modality -> (mean, std) used instead of the dataset's own statistics (see normalise_with)
        self.normalisation: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
        if sampler not in ("random", "mas"):
            raise ValueError(f"data.sampler must be 'random' or 'mas', got {sampler!r}")
        self.sampler = sampler
        self.mas_options = dict(mas_options or {})
        self.factory = dataset
        self.splits = {s: dict((splits or {}).get(s) or {}) for s in SPLITS}
        self.missing = missing or UniformPatterns()
        self.batch_size = batch_size
        for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
            if value is not None and not (type(value) is int and value >= 1):  # 0 would silently mean "the other"
                raise ValueError(f"{key}={value!r} must be a whole number >= 1")
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.pattern_lists = {"val": val_patterns, "test": test_patterns}
        self.seed = seed
        self.augment = augment or Augment()  # training only; Augment() = none
        self._datasets: dict[str, IncompleteModalityDataset] = {}
        self.train_sampler: EpochSampler | None = None
        self._pending_state: dict | None = None  # a checkpoint's state, applied when the train sampler is built
        self.missing.bind(self.modalities)  # fail before training if the policy names unknown modalities
        if sampler == "mas":  # its data.mas.* knobs are checked now, not when training first asks for data
            self._build_train_sampler(len(self.dataset("train")))
        for split in ("val", "test"):
            self.eval_patterns(split)

    def dataset(self, split: str) -> IncompleteModalityDataset:
        if split not in self._datasets:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
            base = self.factory(split=split, **self.splits[split])
            self._datasets[split] = self._wrap(base, split)
        return self._datasets[split]

    def _wrap(self, base: Dataset, split: str) -> IncompleteModalityDataset:
        stats = self.normalisation
        modalities = [
            dataclasses.replace(m, mean=stats[m.name][0], std=stats[m.name][1]) if m.name in stats else m
            for m in base.modalities
        ]
        augment = self.augment if split == "train" else None
        return IncompleteModalityDataset(base, augment=augment, seed=self.seed, modalities=modalities)

    def normalise_with(self, statistics: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
        """Normalise every split with ``statistics`` (modality -> (mean, std)) instead of the dataset's own, e.g. a
        checkpoint's training statistics (eval.py), so a model scores other data scaled as in its training."""
        self.normalisation = {k: (tuple(map(float, m)), tuple(map(float, s))) for k, (m, s) in statistics.items()}
        self._datasets = {split: self._wrap(ds.base, split) for split, ds in self._datasets.items()}

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
        """The patterns scored on ``split``: ``override`` (eval.py's ``patterns=``) or ``data.<split>_patterns``."""
        spec = override if override is not None else self.pattern_lists.get(split, "all")
        try:
            return resolve_patterns(spec, self.modalities)
        except ValueError as err:  # name the option the user set
            key = "patterns" if override is not None else f"data.{split}_patterns"
            raise ValueError(f"{key}={spec!r}: {err}") from None

    # loaders -------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        data = self.dataset("train")
        if self.train_sampler is None:
            self.train_sampler = self._build_train_sampler(len(data))
        # per rank: a rank's share smaller than one batch trains as one short batch (DDP shards are equal-length)
        drop_last = len(self.train_sampler) >= self.batch_size
        return self._loader(data, self.train_sampler, self.batch_size, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def _build_train_sampler(self, num_samples: int) -> EpochSampler:
        if self.sampler == "random":
            sampler: EpochSampler = RandomPatternSampler(num_samples, self.missing, seed=self.seed)
        else:
            options = dict(self.mas_options)
            memory = RobustnessMemory(num_samples, len(self.modalities), momentum=options.pop("momentum", 0.1))
            sampler = MASSampler(num_samples, self.missing, memory, seed=self.seed, **options)
        if self._pending_state is not None:  # resuming
            self._restore_train_sampler(sampler, self._pending_state)
            self._pending_state = None
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
            # every iterator draws its workers' base seed from this generator; without one it would draw from the
            # global torch RNG, whose stream (MAS branch draws, dropout) must not depend on when loaders are
            # (re)created, or a resumed run could not continue it exactly
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=ignore_interrupts if self.num_workers > 0 else None,
        )

    # checkpoints -----------------------------------------------------------------------------------------
    # The train sampler's state (epoch; MAS: robustness memory and knobs) and its position within the epoch travel
    # with the datamodule's state, which Lightning restores before it asks for the train loader: the sampler is
    # then built at the right epoch and skips the keys the interrupted run already trained on.
    def _position(self) -> dict:
        """Where training stands in the sampler's epoch: batches consumed (Lightning's count) and whether the
        epoch is over. Outside fitting (or before the first batch): the start of the sampler's epoch."""
        assert self.train_sampler is not None
        batches, epoch_done = 0, False
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            epoch_done = batches >= trainer.num_training_batches
        _, world = distributed_rank_and_size()
        return {
            "epoch": int(self.train_sampler.epoch),
            "batches": batches,
            "batch_size": int(self.batch_size),
            "world_size": world,
            "epoch_done": bool(epoch_done),
        }

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "missing": self.missing.name, "sampler": self.sampler}
        if self.train_sampler is not None:
            state["sampler_state"] = self.train_sampler.state_dict()
            state["position"] = self._position()
            _, world = distributed_rank_and_size()
            if world > 1 and isinstance(self.train_sampler, MASSampler):
                # mid-epoch, each rank holds its own not yet all-reduced observations: keep every rank's
                # (called on every rank while Lightning dumps a checkpoint, so the collective is matched)
                memory = self.train_sampler.memory
                mine = {"sums": memory.sums.cpu().clone(), "counts": memory.counts.cpu().clone()}
                mine["skipped"] = int(memory.skipped)  # on the CPU: every rank unpickles every rank's share
                gathered: list = [None] * world
                torch.distributed.all_gather_object(gathered, mine)
                state["rank_buffers"] = gathered
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"resuming with datamodule seed {self.seed}, but the checkpoint was trained with {state.get('seed')}; "
                f"set seed={state.get('seed')} to continue the same sample order"
            )
        if self.train_sampler is not None:
            self._restore_train_sampler(self.train_sampler, state)
        else:
            self._pending_state = state

    def _restore_train_sampler(self, sampler: EpochSampler, state: Mapping) -> None:
        if "sampler_state" in state and state.get("sampler") == self.sampler:
            sampler.load_state_dict(state["sampler_state"])
        rank, world = distributed_rank_and_size()
        buffers = state.get("rank_buffers")
        if isinstance(sampler, MASSampler) and buffers and len(buffers) == world:
            mine = buffers[rank]
            sampler.memory.sums.copy_(mine["sums"])
            sampler.memory.counts.copy_(mine["counts"])
            sampler.memory.skipped = int(mine["skipped"])
        position = state.get("position")
        if position is None:  # a checkpoint written before positions were stored: the start of its epoch
            return
        if position["epoch_done"]:
            sampler.set_epoch(position["epoch"] + 1)
        elif position["batches"] > 0:
            if position["world_size"] != world:
                raise ValueError(
                    f"the checkpoint was written mid-epoch by {position['world_size']} process(es) and this run has "
                    f"{world}: the epoch's keys are sharded differently, so it cannot continue where it stopped; "
                    f"resume with the same trainer.devices (and nodes), or from an end-of-epoch checkpoint "
                    f"(checkpoints/epoch_*.ckpt)"
                )
            sampler.resume(position["epoch"], position["batches"] * position["batch_size"])
        else:
            sampler.set_epoch(position["epoch"])
