"""Sample panels: what a model sees and predicts for a few fixed samples under a few modality patterns.

A :class:`SamplePanel` holds plain numpy arrays ready to draw (:func:`sgma.figures.panel_figure`) or to log
(W&B images): every modality's input for display, the label, the prediction, and the robustness map of each
available modality (SGF's, averaged over the scales after upsampling to the sample's size, so the maps of one
pixel still sum to 1 over the available modalities).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate

from sgma.modalities import SEPARATOR, Modality

if TYPE_CHECKING:
    from sgma.data.datamodule import IncompleteModalityDataset
    from sgma.module import SegmentationModule


@dataclass(frozen=True)
class SamplePanel:
    index: int  # sample index in its split
    pattern: str  # the modality pattern it was predicted under, e.g. "rgb+dsm"
    # EVERY modality of the dataset -> (H, W, 3) float32 in [0, 1] for display, also the missing ones (a figure
    # shows what was withheld); see display_image
    inputs: dict[str, np.ndarray]
    available: tuple[str, ...]  # the modalities of `pattern`
    label: np.ndarray  # (H, W) int64 class ids, 255 = ignore
    prediction: np.ndarray  # (H, W) int64 class ids
    # available modality -> (H, W) float32 in [0, 1]; {} for fusions without robustness maps
    robustness: dict[str, np.ndarray]


def panel_indices(num_samples: int, count: int = 4) -> list[int]:
    """``count`` fixed sample indices spread evenly over ``0 .. num_samples - 1`` (all of them if fewer), so every
    validation of a run and every eval of a split shows the same samples."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 to pick panel samples, got {num_samples} (is the split empty?)")
    if count < 1:
        raise ValueError(f"count must be >= 1 panel sample, got {count}")
    if count >= num_samples:
        return list(range(num_samples))
    if count == 1:
        return [0]
    return [round(i * (num_samples - 1) / (count - 1)) for i in range(count)]  # steps >= 1 apart: distinct


def panel_patterns(patterns: Sequence[str], count: int = 3) -> list[str]:
    """A fixed choice of at most ``count`` patterns to show, in this order: the fullest pattern (most modalities;
    all of them when every pattern is evaluated), the first single-modality pattern, the first two-modality
    pattern, then the remaining patterns in their given order. ``patterns`` is in canonical order (singles first),
    so the choice is the same for every run of a dataset."""
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no patterns to choose panel patterns from: give at least one pattern, e.g. ['rgb']")
    if count < 1:
        raise ValueError(f"count must be >= 1 panel pattern, got {count}")
    size = {p: len(p.split(SEPARATOR)) for p in patterns}
    fullest = max(patterns, key=lambda p: size[p])  # max keeps the first of equal sizes
    first = [next((p for p in patterns if size[p] == k), None) for k in (1, 2)]
    chosen: list[str] = []
    for p in [fullest, *first, *patterns]:
        if p is not None and p not in chosen:
            chosen.append(p)
    return chosen[:count]


def display_image(raw: Tensor, modality: Modality) -> np.ndarray:
    """(C, H, W) raw values -> (H, W, 3) float32 in [0, 1]: 1 or 2 channels as grey (the first), >= 3 as the first
    three. Optical modalities are scaled by their ``value_max`` (true brightness, comparable between samples);
    others (heights, SAR, encodings) are stretched per image between their 2nd and 98th percentiles."""
    x = raw[:3] if raw.shape[0] >= 3 else raw[:1].expand(3, -1, -1)
    x = x.double().numpy()
    if modality.kind == "optical" and modality.value_max:
        x = x / float(modality.value_max)
    else:
        lo, hi = np.percentile(x, [2, 98])
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.clip(x, 0, 1).transpose(1, 2, 0).astype(np.float32)


def _denormalise(sample: dict[str, Tensor], data: IncompleteModalityDataset) -> dict[str, np.ndarray]:
    images = {}
    for m in data.modalities:
        mean, std = data.norm[m.name]
        images[m.name] = display_image(sample[m.name] * std + mean, m)
    return images


def mean_robustness(maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Per-scale robustness maps (B, M, h_i, w_i) -> (B, M, H, W): each upsampled bilinearly to ``size``, then
    averaged over scales. Both steps are convex combinations, so each pixel still sums to 1 over the available
    modalities and stays 0 on missing ones."""
    up = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.stack(up).mean(dim=0)


@torch.no_grad()
def collect_panels(
    module: SegmentationModule,
    data: IncompleteModalityDataset,
    indices: Sequence[int],
    patterns: Sequence[str],
) -> list[SamplePanel]:
    """Predict samples ``indices`` of ``data`` under each of ``patterns``: one batch of ``len(indices)`` per
    pattern, in eval mode, without gradients, on the module's device; the module's train/eval mode is restored.

    Returns the panels sample-major (every pattern of the first index, then of the next), in the given orders.
    Inputs are taken from the sample with every modality present, so the missing ones can be shown too.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no sample indices: give at least one (see panel_indices)")
    bad = [i for i in indices if not 0 <= i < len(data)]
    if bad:
        raise ValueError(f"sample indices {bad} are outside this split's 0..{len(data) - 1}")
    unknown = [p for p in patterns if p not in data.patterns]
    if unknown or not patterns:
        raise ValueError(
            f"panel patterns {list(patterns)} must be a non-empty list of this dataset's patterns "
            f"({', '.join(data.patterns)})"
        )
    names = [m.name for m in data.modalities]
    full = len(data.patterns) - 1  # all_patterns ends with the pattern of every modality
    shown = {i: _denormalise(data[(i, full)], data) for i in indices}

    by_key: dict[tuple[int, str], SamplePanel] = {}
    was_training = module.training
    module.eval()
    try:
        for pattern in patterns:
            batch = default_collate([data[(i, data.patterns.index(pattern))] for i in indices])
            # the encoder's packing planned on the host, as in the Trainer's loops (module.on_before_batch_transfer):
            # planned inside a compiled encoder it would break the graph
            batch = module.on_before_batch_transfer(batch, 0)
            batch = {k: v.to(module.device) for k, v in batch.items()}
            out = module(batch, return_robustness=True)
            prediction = out.logits.argmax(dim=1).cpu().numpy().astype(np.int64)
            size = tuple(batch["mask"].shape[-2:])
            maps = None if out.robustness is None else mean_robustness(out.robustness, size).cpu().numpy()
            available = tuple(pattern.split(SEPARATOR))
            for b, i in enumerate(indices):
                robustness = {}
                if maps is not None:
                    # clip only float rounding of the interpolation: the maps are convex combinations of [0, 1]
                    robustness = {n: np.clip(maps[b, names.index(n)], 0, 1).astype(np.float32) for n in available}
                by_key[(i, pattern)] = SamplePanel(
                    index=i,
                    pattern=pattern,
                    inputs=shown[i],
                    available=available,
                    label=batch["mask"][b].cpu().numpy().astype(np.int64),
                    prediction=prediction[b],
                    robustness=robustness,
                )
    finally:
        module.train(was_training)
    return [by_key[(i, p)] for i in indices for p in patterns]
