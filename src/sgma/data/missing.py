"""Training-time modality dropout policies (the ``missing`` config group).

A policy draws, for each training sample, the pattern of modalities it will see. Policies return ids
into :func:`sgma.modalities.all_patterns` of the dataset's modalities, so the draw is a cheap vector op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sgma.modalities import (
    Modality,
    all_patterns,
    canonical_pattern,
    names_of,
    pattern_mask,
    resolve_patterns,
)


class MissingPolicy:
    """Base class. ``bind`` validates the policy against the dataset's modalities before training."""

    name = "policy"

    def bind(self, modalities: Sequence[Modality | str]) -> None:
        self.modalities = names_of(modalities)
        self.patterns = all_patterns(self.modalities)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` pattern ids (int64) into ``self.patterns``."""
        raise NotImplementedError

    def law(self) -> np.ndarray:
        """(P,) probability of each pattern in one draw; the MAS sampler reweights this law (never its zeros)."""
        raise NotImplementedError


class UniformPatterns(MissingPolicy):
    """Uniform over the given patterns (default: all 2^M - 1 non-empty ones) per sample: the paper's recipe."""

    def __init__(self, patterns: str | Sequence[str] = "all") -> None:
        self.spec = patterns
        self.name = "uniform" if patterns == "all" else "uniform(" + ",".join(patterns) + ")"

    def bind(self, modalities: Sequence[Modality | str]) -> None:
        super().bind(modalities)
        self.choices = np.array([self.patterns.index(p) for p in resolve_patterns(self.spec, self.modalities)])

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.choices[rng.integers(len(self.choices), size=n)]

    def law(self) -> np.ndarray:
        return np.bincount(self.choices, minlength=len(self.patterns)) / len(self.choices)


class FixedPattern(MissingPolicy):
    """Always the same pattern (``missing=full`` is the pattern of all modalities; ``missing=rgb+dsm``)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.name = pattern

    def bind(self, modalities: Sequence[Modality | str]) -> None:
        super().bind(modalities)
        self.id = self.patterns.index(canonical_pattern(self.pattern, self.modalities))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.id, dtype=np.int64)

    def law(self) -> np.ndarray:
        return np.eye(len(self.patterns))[self.id]


class FullModalities(FixedPattern):
    """Every modality, always (no dropout)."""

    def __init__(self) -> None:
        super().__init__(pattern="")
        self.name = "full"

    def bind(self, modalities: Sequence[Modality | str]) -> None:
        MissingPolicy.bind(self, modalities)
        self.id = len(self.patterns) - 1  # the last pattern holds every modality


class BernoulliDropout(MissingPolicy):
    """Each modality is dropped independently with probability ``p`` (one value or one per modality);
    draws that drop everything are redrawn, i.e. patterns follow the Bernoulli law conditioned on >= 1."""

    def __init__(self, p: float | Mapping[str, float] = 0.5) -> None:
        self.p = p
        self.name = f"bernoulli({p})" if not isinstance(p, Mapping) else "bernoulli"

    def bind(self, modalities: Sequence[Modality | str]) -> None:
        super().bind(modalities)
        if isinstance(self.p, Mapping):
            unknown = sorted(set(self.p) - set(self.modalities))
            if unknown:
                raise ValueError(f"missing.p names {unknown}, not modalities of this dataset {self.modalities}")
            probs = [float(self.p.get(m, 0.0)) for m in self.modalities]
        else:
            probs = [float(self.p)] * len(self.modalities)
        if not all(0 <= q < 1 for q in probs):
            raise ValueError(f"missing.p must be in [0, 1) for every modality, got {probs}")
        self.drop = np.array(probs)
        masks = np.array([pattern_mask(p, self.modalities) for p in self.patterns])  # (P, M)
        weights = np.prod(np.where(masks, 1 - self.drop, self.drop), axis=1)
        self.weights = weights / weights.sum()

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(len(self.patterns), size=n, p=self.weights)

    def law(self) -> np.ndarray:
        return self.weights
