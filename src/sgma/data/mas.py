"""MAS-weighted sampling: a per-sample robustness memory and the sampler that reads it.

The MAS branch in the LightningModule trains one fragile modality alone per step (the paper). This module is
the project's second half of MAS (docs/METHOD.md, "MAS"): a :class:`RobustnessMemory`, fed from training
steps by a callback with SGF's robustness maps, and a :class:`MASSampler` that draws the next epoch's
``(sample index, pattern id)`` keys so that samples on which some modality is fragile come up more often,
with patterns that favour that modality. Uniform robustness gives back the `missing` policy's own dropout.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from sgma.data.missing import MissingPolicy
from sgma.data.sharding import EpochSampler
from sgma.modalities import pattern_mask

EPS = 1e-6  # lower clamp on relative robustness before inverting it (a modality the fusion ignores entirely)


class RobustnessMemory:
    """Per-sample, per-modality EMA of *relative* robustness ``rho`` (N, M), initialised to 1.0.

    A training step gives, for each sample b, the robustness ``r_bm`` of each available modality (mean over
    space and scales of SGF's robustness maps, which sum to 1 over the sample's k available modalities). It is
    stored relative to uniform, ``rho_obs = k * r_bm``, so 1.0 means "average" whatever the pattern, and values
    from different patterns can share one memory. Missing modalities carry no information and are ignored.

    Observations accumulate in per-epoch buffers (:meth:`observe`); :meth:`commit` folds them in once per epoch,
    after summing the buffers across DDP ranks, so every rank holds the same memory and the sampler's draw
    (seeded, identical on every rank) stays consistent::

        rho_im <- (1 - momentum) * rho_im + momentum * mean(rho_obs over the epoch's passes of (i, m))

    Entries not observed during the epoch keep their value.

    The epoch buffers (``sums``, ``counts``, the ``skipped`` count) live on the device of the observations, so
    :meth:`observe` never waits for a GPU; :meth:`commit` moves them to the CPU once per epoch. The memory
    itself (``values``, ``seen``) stays on the CPU, where the sampler reads it.
    """

    def __init__(self, num_samples: int, num_modalities: int, *, momentum: float = 0.1) -> None:
        if num_samples < 1:
            raise ValueError(f"robustness memory needs at least one sample, got num_samples={num_samples}")
        if num_modalities < 1:
            raise ValueError(f"robustness memory needs at least one modality, got num_modalities={num_modalities}")
        _check_momentum(momentum)
        self.num_samples = int(num_samples)
        self.num_modalities = int(num_modalities)
        self.momentum = float(momentum)
        shape = (self.num_samples, self.num_modalities)
        self._values = torch.ones(shape, dtype=torch.float32)
        self.seen = torch.zeros(shape, dtype=torch.int64)  # observations ever folded in, per (sample, modality)
        # float64 buffers: exact sums of many small contributions, and one dtype for a single collective
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.counts = torch.zeros(shape, dtype=torch.float64)
        self._skipped = torch.zeros((), dtype=torch.int64)  # non-finite observations dropped since the last commit

    @property
    def skipped(self) -> int:
        """Non-finite observations dropped since the last commit (reading it waits for the device)."""
        return int(self._skipped)

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped = torch.full((), int(value), dtype=torch.int64, device=self.sums.device)

    def _buffers_to(self, device: torch.device) -> None:
        """Move the epoch buffers to ``device`` (once, on the first observation from it)."""
        if self.sums.device != device:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            self.sums = self.sums.to(device, dtype)
            self.counts = self.counts.to(device, dtype)
            self._skipped = self._skipped.to(device)

    @property
    def values(self) -> Tensor:
        """The current rho (N, M), float32 on CPU (a view: do not modify)."""
        return self._values

    def is_uniform(self) -> bool:
        """True while every entry is exactly 1.0 (nothing committed yet, or only perfectly uniform updates)."""
        return bool(torch.all(self._values == 1.0))

    def observe(self, indices: Tensor, available: Tensor, robustness: Tensor) -> None:
        """Accumulate one batch: ``indices`` (B,) sample ids, ``available`` (B, M) bool, ``robustness`` (B, M)
        per-sample robustness of each modality (summing to 1 over the available ones). Any device; detached.

        Nothing here reads a value on the host when the observations live on a GPU: the buffers follow them
        there, and out-of-range indices are caught by a device-side assert (a ValueError on CPU)."""
        indices = torch.as_tensor(indices).detach().reshape(-1)
        device = indices.device
        available = torch.as_tensor(available, device=device).detach()
        robustness = torch.as_tensor(robustness, device=device).detach()
        batch, m = indices.numel(), self.num_modalities
        if available.shape != (batch, m) or robustness.shape != (batch, m):
            raise ValueError(
                f"observe expects indices (B,), available (B, M) and robustness (B, M) with M={m}; got "
                f"{tuple(indices.shape)}, {tuple(available.shape)} and {tuple(robustness.shape)}"
            )
        if batch == 0:
            return
        indices, available = indices.long(), available.bool()
        bad_index = "is the memory built for this split's dataset size?"
        if device.type == "cpu":
            if indices.min() < 0 or indices.max() >= self.num_samples:
                raise ValueError(
                    f"sample indices must lie in [0, {self.num_samples}), got [{int(indices.min())}, "
                    f"{int(indices.max())}]: {bad_index}"
                )
        else:
            in_range = ((indices >= 0) & (indices < self.num_samples)).all()
            torch._assert_async(in_range, f"sample indices must lie in [0, {self.num_samples}): {bad_index}")
        self._buffers_to(device)
        k = available.sum(dim=1, keepdim=True).to(self.sums.dtype)  # (B, 1) available modalities per sample
        rho = k * robustness.to(self.sums.dtype)  # relative to uniform: 1.0 = each available modality weighs 1/k
        use = available & torch.isfinite(rho)
        self._skipped += (available & ~use).sum()
        self.sums.index_add_(0, indices, rho.masked_fill(~use, 0))
        self.counts.index_add_(0, indices, use.to(self.counts.dtype))

    def commit(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor | int]:
        """Fold the epoch's observations into the EMA and clear the buffers; call once per epoch on every rank.

        ``all_reduce`` sums a tensor across ranks and returns the result (any device); it is called once, on
        the (2, N, M) float64 stack of sums and counts. Returns summary statistics:
        ``rho_mean`` (M,) mean rho over samples observed at least once (nan where none),
        ``seen_fraction`` (M,) fraction of samples observed at least once, ``updated`` number of (sample,
        modality) entries updated now, ``skipped`` non-finite observations dropped on this rank.
        """
        stacked = torch.stack([self.sums, self.counts])  # one collective for both buffers
        if all_reduce is not None:
            stacked = all_reduce(stacked)
            if stacked.shape != (2, self.num_samples, self.num_modalities):
                raise ValueError(f"all_reduce returned shape {tuple(stacked.shape)}, expected {(2, *self.sums.shape)}")
        stacked = stacked.detach().to("cpu", torch.float64)  # the epoch's one transfer from the device
        sums, counts = stacked[0], stacked[1]
        update = counts > 0
        mean = sums / counts.clamp_min(1.0)
        ema = (1.0 - self.momentum) * self._values.to(torch.float64) + self.momentum * mean
        self._values.copy_(torch.where(update, ema, self._values.to(torch.float64)).to(torch.float32))
        self.seen += counts.round().to(torch.int64)
        skipped = self.skipped
        self.sums.zero_()
        self.counts.zero_()
        self.skipped = 0
        return {**self.summary(), "updated": int(update.sum()), "skipped": skipped}

    def summary(self) -> dict[str, Tensor]:
        """``rho_mean`` and ``seen_fraction`` per modality (see :meth:`commit`)."""
        seen = self.seen > 0
        n_seen = seen.sum(dim=0)
        total = torch.where(seen, self._values, torch.zeros_like(self._values)).sum(dim=0)
        rho_mean = torch.where(n_seen > 0, total / n_seen.clamp_min(1), torch.full_like(total, math.nan))
        return {"rho_mean": rho_mean, "seen_fraction": n_seen.to(torch.float32) / self.num_samples}

    def state_dict(self) -> dict:
        return {
            "values": self._values.clone(),
            "seen": self.seen.clone(),
            "sums": self.sums.to("cpu", torch.float64, copy=True),
            "counts": self.counts.to("cpu", torch.float64, copy=True),
            "skipped": self.skipped,
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore in place (objects holding this memory, e.g. the sampler and the callback, see the change)."""
        missing = [key for key in ("values", "seen", "sums", "counts") if key not in state]
        if missing:
            raise ValueError(f"robustness memory state lacks {missing}; was it saved by RobustnessMemory?")
        shape = tuple(state["values"].shape)
        if len(shape) != 2:
            raise ValueError(f"robustness memory state has values of shape {shape}, expected (samples, modalities)")
        if shape[0] != self.num_samples:
            raise ValueError(
                f"robustness memory state is for {shape[0]} samples but this memory has {self.num_samples}: "
                "the checkpoint was trained on a different dataset or split"
            )
        if shape[1] != self.num_modalities:
            raise ValueError(
                f"robustness memory state is for {shape[1]} modalities but this memory has {self.num_modalities}"
            )
        for key in ("seen", "sums", "counts"):
            if tuple(state[key].shape) != shape:
                raise ValueError(f"robustness memory state: {key} has shape {tuple(state[key].shape)}, not {shape}")
        if "momentum" in state:
            _check_momentum(state["momentum"])
            if float(state["momentum"]) != self.momentum:
                warnings.warn(
                    f"resuming the robustness memory with the checkpoint's data.mas.momentum={state['momentum']} "
                    f"instead of {self.momentum}",
                    stacklevel=2,
                )
            self.momentum = float(state["momentum"])
        self._values.copy_(torch.as_tensor(state["values"]).to(torch.float32))
        self.seen.copy_(torch.as_tensor(state["seen"]).to(torch.int64))
        self.sums.copy_(torch.as_tensor(state["sums"]).to(torch.float64))
        self.counts.copy_(torch.as_tensor(state["counts"]).to(torch.float64))
        self.skipped = int(state.get("skipped", 0))


class MASSampler(EpochSampler):
    """Modality-Aware Sampling over the dataset: yields ``(sample index, pattern id)`` keys weighted by fragility.

    With ``rho`` (N, M) the :class:`RobustnessMemory` values, ``T`` = ``temperature`` and eps = 1e-6:

    - fragility ``f_im = 1 / max(rho_im, eps)``; MAS scores (the paper's formula, per sample)
      ``s_im = f_im^(1/T) / sum_m' f_im'^(1/T)`` (T = 1 is exactly ``(1/r_m) / sum_m' (1/r_m')``);
    - sample weight ``w_i = max_m s_im`` in [1/M, 1], equal for all samples when robustness is uniform;
      sample probability ``p_i = floor / N + (1 - floor) * w_i / sum_j w_j`` (every sample keeps >= floor/N);
    - pattern probability per sample ``q_i(P) ∝ pi(P) * mean_{m in P} s_im``, with ``pi`` the ``missing``
      policy's law (uniform over all patterns for ``missing=uniform``): it favours patterns that contain the
      fragile modality, most of all that modality alone, and is ``pi`` itself when s is uniform. Mixed with the
      policy's law: ``(1 - mix) * q_i(P) + mix * pi(P)`` (every pattern keeps >= mix * pi(P) on every
      sample). MAS reweights the policy (``missing.p`` keeps its effect) and never trains a pattern it excludes.

    Each epoch is one draw from ``np.random.default_rng((seed, epoch))``, identical on every rank: N sample
    slots by systematic resampling of p (sample i appears floor(N p_i) or ceil(N p_i) times, so uniform p is a
    permutation), shuffled, each slot's pattern drawn from q_i; then :func:`equal_shard` gives every rank a
    disjoint, equal-length share. During warm-up (epoch < ``warmup_epochs``) and while the memory is still
    exactly uniform, it is plain modality dropout: a permutation with patterns from ``policy`` (the same keys
    as :class:`~sgma.data.datamodule.RandomPatternSampler`). After warm-up the draw follows p and q.

    Knobs (config ``data.mas.*``): ``floor`` in [0, 1] (1 = uniform samples), ``mix`` in [0, 1] (1 = the
    policy's patterns), ``temperature`` > 0 (large = flatter scores), ``warmup_epochs`` >= 0.
    """

    def __init__(
        self,
        num_samples: int,
        policy: MissingPolicy,
        memory: RobustnessMemory,
        *,
        seed: int = 0,
        floor: float = 0.2,
        mix: float = 0.2,
        temperature: float = 1.0,
        warmup_epochs: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"MASSampler needs at least one sample, got num_samples={num_samples}")
        if not hasattr(policy, "patterns"):
            raise ValueError("MASSampler needs a bound missing policy: call policy.bind(modalities) first")
        if memory.num_samples != num_samples:
            raise ValueError(f"robustness memory holds {memory.num_samples} samples but the sampler has {num_samples}")
        if memory.num_modalities != len(policy.modalities):
            raise ValueError(
                f"robustness memory holds {memory.num_modalities} modalities but the policy is bound to "
                f"{len(policy.modalities)} ({', '.join(policy.modalities)})"
            )
        _check_knobs(floor=floor, mix=mix, temperature=temperature, warmup_epochs=warmup_epochs)
        self.num_samples = int(num_samples)
        self.policy = policy
        self.memory = memory
        self.seed = int(seed)
        self.floor = float(floor)
        self.mix = float(mix)
        self.temperature = float(temperature)
        self.warmup_epochs = int(warmup_epochs)
        self.epoch = 0
        self.patterns: list[str] = list(policy.patterns)
        self.masks = np.array([pattern_mask(p, policy.modalities) for p in self.patterns], dtype=np.float64)  # (P, M)
        self.policy_law = np.asarray(policy.law(), dtype=np.float64)  # (P,) the `missing` policy's law

    # the law ---------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the current epoch draws with MAS (past warm-up and the memory has moved off uniform)."""
        return self.epoch >= self.warmup_epochs and not self.memory.is_uniform()

    def scores(self) -> np.ndarray:
        """MAS scores s (N, M): softmax over modalities of ``-log(max(rho, eps)) / T`` (= normalised f^(1/T))."""
        rho = self.memory.values.numpy().astype(np.float64)
        logits = -np.log(np.maximum(rho, EPS)) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)  # stable for small T
        s = np.exp(logits)
        return s / s.sum(axis=1, keepdims=True)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """The MAS law of the current memory: p (N,) over samples and q (N, P) over patterns per sample.

        This is the law used once :attr:`active`; during warm-up the draw follows the policy instead.
        """
        s = self.scores()
        n = self.num_samples
        w = s.max(axis=1)
        p = self.floor / n + (1.0 - self.floor) * w / w.sum()
        pattern_score = (s @ self.masks.T) / self.masks.sum(axis=1)  # (N, P): mean of s over the pattern
        q = pattern_score * self.policy_law  # zero for the patterns the `missing` policy never draws
        q = q / q.sum(axis=1, keepdims=True)
        q = (1.0 - self.mix) * q + self.mix * self.policy_law
        return p, q

    def epoch_law(self) -> tuple[np.ndarray, np.ndarray]:
        """The law the current epoch draws from: :meth:`probabilities` when :attr:`active`, else the policy's
        (every sample once, patterns from the policy)."""
        if self.active:
            return self.probabilities()
        n = self.num_samples
        return np.full(n, 1.0 / n), np.broadcast_to(self.policy_law, (n, len(self.patterns)))

    def modality_probabilities(self) -> np.ndarray:
        """(M,) probability that each modality is present in a key of the current epoch's draw."""
        p, q = self.epoch_law()
        return p @ (q @ self.masks)

    def fragile_modality_share(self) -> np.ndarray:
        """(M,) share of the current epoch's keys whose most fragile available modality is m (ties split)."""
        p, q = self.epoch_law()
        s = self.scores()
        within = s[:, None, :] * self.masks[None]  # (N, P, M): scores of the pattern's modalities, 0 elsewhere
        top = within.max(axis=2, keepdims=True)
        tied = (self.masks[None] > 0) & np.isclose(within, top, rtol=1e-9, atol=0.0)
        share = tied / tied.sum(axis=2, keepdims=True)
        return np.einsum("n,np,npm->m", p, q, share)

    # the draw (sharding, set_epoch and mid-epoch resume: EpochSampler) ---------------------------------------
    def epoch_keys(self) -> list[tuple[int, int]]:
        """The whole epoch's (index, pattern id) draw, before sharding; a function of (seed, epoch, memory)."""
        rng = np.random.default_rng((self.seed, self.epoch))
        n = self.num_samples
        if not self.active:  # plain modality dropout, exactly RandomPatternSampler's draw
            order = rng.permutation(n)
            patterns = self.policy.draw(rng, n)
            return list(zip(order.tolist(), patterns.tolist(), strict=True))
        p, q = self.probabilities()
        slots = rng.permutation(systematic_resample(p, n, rng))
        cdf = np.cumsum(q[slots], axis=1)
        u = rng.random(n)[:, None] * cdf[:, -1:]
        patterns = np.minimum((cdf <= u).sum(axis=1), len(self.patterns) - 1)
        return list(zip(slots.tolist(), patterns.tolist(), strict=True))

    # resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "floor": self.floor,
            "mix": self.mix,
            "temperature": self.temperature,
            "warmup_epochs": self.warmup_epochs,
            "memory": self.memory.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore epoch, seed, knobs and memory, so the resumed run continues the same sequence of draws.

        The checkpoint's knobs win over the constructor's (a warning names each one that differs).
        """
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"MAS sampler state is for {state['num_samples']} samples but this sampler has {self.num_samples}: "
                "the checkpoint was trained on a different dataset or split"
            )
        knobs = {key: state[key] for key in ("floor", "mix", "temperature", "warmup_epochs")}
        _check_knobs(**knobs)
        self.memory.load_state_dict(state["memory"])
        changed = [
            f"{_config_key(key)}={value} (configured: {getattr(self, key)})"
            for key, value in {"seed": state["seed"], **knobs}.items()
            if value != getattr(self, key)
        ]
        if changed:  # one warning for all of them: the resumed run follows the checkpoint, not the config
            warnings.warn(f"resuming the MAS sampler with the checkpoint's {', '.join(changed)}", stacklevel=2)
        self.seed = int(state["seed"])
        self.floor = float(knobs["floor"])
        self.mix = float(knobs["mix"])
        self.temperature = float(knobs["temperature"])
        self.warmup_epochs = int(knobs["warmup_epochs"])
        self.epoch = int(state["epoch"])


def systematic_resample(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn by systematic resampling of ``p``: one uniform offset, then evenly spaced points on
    the CDF, so index i appears floor(n p_i) or ceil(n p_i) times (low variance; uniform p gives each index once).
    Sorted ascending: shuffle before use."""
    cdf = np.cumsum(p, dtype=np.float64)
    cdf /= cdf[-1]
    points = (rng.random() + np.arange(n)) / n
    return np.minimum(np.searchsorted(cdf, points, side="right"), len(p) - 1)


def _config_key(knob: str) -> str:
    return knob if knob == "seed" else f"data.mas.{knob}"


def _check_momentum(momentum: float) -> None:
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"data.mas.momentum must be in (0, 1], got {momentum}")


def _check_knobs(*, floor: float, mix: float, temperature: float, warmup_epochs: int) -> None:
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"data.mas.floor must be in [0, 1] (the share of sampling kept uniform), got {floor}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"data.mas.mix must be in [0, 1] (the share of patterns from the missing policy), got {mix}")
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise ValueError(f"data.mas.temperature must be a finite number > 0, got {temperature}")
    if isinstance(warmup_epochs, bool) or int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
        raise ValueError(f"data.mas.warmup_epochs must be an integer >= 0, got {warmup_epochs}")
