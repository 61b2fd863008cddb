"""Modalities and modality patterns.

A dataset declares its modalities in a canonical order. A *pattern* is the set of modalities available
for a sample, written as their names joined with ``+`` in that canonical order (``rgb+dsm``). The same
string is the config option name (``missing=rgb+dsm``), the W&B group and the metric key segment
(``test/rgb+dsm/miou``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

SEPARATOR = "+"


# What a modality measures, for the transforms that must treat it differently (sgma.data.augment): photometric
# jitter touches only optical images, and categorical rasters (class maps) are resampled nearest, never blended.
KINDS = ("optical", "elevation", "sar", "categorical", "other")


@dataclass(frozen=True)
class Modality:
    """One input modality: its name, channel count and per-channel normalisation (applied as (x-mean)/std).

    ``kind`` is one of :data:`KINDS`; an optical modality also gives ``value_max``, its raw value of full
    brightness (255 for 8-bit imagery, 1.0 for reflectance), which photometric jitter scales by.
    """

    name: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = "other"
    value_max: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.islower() or SEPARATOR in self.name:
            raise ValueError(f"modality name {self.name!r} must be lowercase and must not contain {SEPARATOR!r}")
        if self.channels < 1:
            raise ValueError(f"modality {self.name!r}: channels must be >= 1, got {self.channels}")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(
                    f"modality {self.name!r}: {what} has {len(values)} values for {self.channels} channels"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"modality {self.name!r}: std must be positive, got {self.std}")
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "optical" and not (self.value_max is not None and self.value_max > 0):
            raise ValueError(
                f"optical modality {self.name!r} needs value_max > 0 (its raw value of full brightness: 255 for "
                f"8-bit images, 65535 for 16-bit, 1.0 for reflectance), got {self.value_max!r}"
            )


def names_of(modalities: Sequence[Modality | str]) -> tuple[str, ...]:
    return tuple(m if isinstance(m, str) else m.name for m in modalities)


def parse_pattern(pattern: str | Sequence[str], modalities: Sequence[Modality | str]) -> tuple[str, ...]:
    """Validate a pattern against a dataset's modalities; return its names in canonical order.

    Accepts ``"dsm+rgb"`` or ``["dsm", "rgb"]``; the result is always canonical (``("rgb", "dsm")``).
    """
    valid = names_of(modalities)
    if isinstance(pattern, str):
        parts = [p.strip() for p in pattern.split(SEPARATOR)] if pattern.strip() else []
    else:
        parts = [str(p).strip() for p in pattern]
    if not parts or any(not p for p in parts):
        raise ValueError(
            f"empty modality pattern {pattern!r}: name at least one modality, e.g. {valid[0]!r} "
            f"or {format_pattern(valid)!r} (valid modalities: {', '.join(valid)})"
        )
    unknown = [p for p in parts if p not in valid]
    if unknown:
        raise ValueError(
            f"unknown modality {unknown[0]!r} in pattern {pattern!r}; this dataset's modalities are "
            f"{', '.join(valid)} (write a pattern like {format_pattern(valid[:2])!r})"
        )
    if len(set(parts)) != len(parts):
        raise ValueError(f"modality pattern {pattern!r} names a modality twice")
    return tuple(name for name in valid if name in parts)


def format_pattern(names: Sequence[str]) -> str:
    return SEPARATOR.join(names)


def canonical_pattern(pattern: str | Sequence[str], modalities: Sequence[Modality | str]) -> str:
    return format_pattern(parse_pattern(pattern, modalities))


def all_patterns(modalities: Sequence[Modality | str]) -> list[str]:
    """Every non-empty pattern (2^M - 1): singles first, then pairs, ..., each group in canonical order.

    This is the column order of the paper's tables (R, D, N, R+D, R+N, D+N, R+D+N).
    """
    names = names_of(modalities)
    return [format_pattern(combo) for k in range(1, len(names) + 1) for combo in itertools.combinations(names, k)]


def pattern_mask(pattern: str | Sequence[str], modalities: Sequence[Modality | str]) -> tuple[bool, ...]:
    """Availability flags of a pattern, one per modality in canonical order."""
    present = set(parse_pattern(pattern, modalities))
    return tuple(name in present for name in names_of(modalities))


def mask_to_pattern(mask: Sequence[bool], modalities: Sequence[Modality | str]) -> str:
    names = names_of(modalities)
    if len(mask) != len(names):
        raise ValueError(f"availability mask has {len(mask)} entries for {len(names)} modalities")
    chosen = [n for n, m in zip(names, mask, strict=True) if m]
    if not chosen:
        raise ValueError("availability mask has no available modality")
    return format_pattern(chosen)


def resolve_patterns(spec: str | Sequence[str] | None, modalities: Sequence[Modality | str]) -> list[str]:
    """Turn a pattern-list config value into canonical patterns.

    ``None``/``"all"`` means every non-empty pattern; otherwise a list (or comma-separated string) of patterns.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return all_patterns(modalities)
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("pattern list is empty: use 'all' or name at least one pattern")
    patterns = [canonical_pattern(p, modalities) for p in items]
    duplicates = sorted({p for p in patterns if patterns.count(p) > 1})
    if duplicates:
        raise ValueError(f"pattern list {list(items)} names {duplicates} more than once")
    return patterns
