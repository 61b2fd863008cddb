"""Fake DELIVER tree."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sgma.data import deliver


def make_fake_deliver(
    root: str | os.PathLike,
    *,
    counts: tuple[int, int, int] = (2, 1, 1),
    conditions: Sequence[str] = deliver.CONDITIONS,
    size: int = 64,
    seed: int = 0,
    sequence: str = "MAP_1_point0",
    view: str = "front",
) -> Path:
    """A small DELIVER copy in the real layout: ``counts`` frames per (condition, split), ``size`` px.

    Labels hold the raw png values (0 = unlabelled, 1..25 = class + 1) in all three channels; event and lidar
    are grey images saved as 3 channels like the originals. Returns ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for condition in conditions:
        for split, n in zip(deliver.SPLITS, counts, strict=True):
            for i in range(n):
                frame = f"{i:06d}"
                files = deliver.frame_files(root, condition, split, sequence, frame, view)
                raw = rng.integers(0, len(deliver.CLASSES) + 1, (size // 8, size // 8)).astype(np.uint8)
                raw[0, 0], raw[-1, -1] = 0, len(deliver.CLASSES)  # always an unlabelled and a last-class block
                raw = np.kron(raw, np.ones((8, 8), np.uint8))  # 8 x 8 px blocks
                colour = np.array((*deliver.PALETTE, (0, 0, 0)), np.float32)[
                    np.where(raw == 0, len(deliver.CLASSES), raw - 1)
                ]
                rgb = np.clip(colour + rng.normal(0, 10, colour.shape), 0, 255).astype(np.uint8)
                depth = np.stack([raw * 9, 255 - raw * 9, np.full_like(raw, 128)], -1).astype(np.uint8)
                event = np.repeat((rng.random(raw.shape) < 0.1).astype(np.uint8)[..., None] * 255, 3, -1)
                lidar = np.repeat(((raw % 5) * 50).astype(np.uint8)[..., None], 3, -1)
                semantic = np.repeat(raw[..., None], 3, -1)
                for key, array in (("rgb", rgb), ("depth", depth), ("event", event), ("lidar", lidar)):
                    files[key].parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(files[key])
                files[deliver.LABEL[0]].parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(semantic).save(files[deliver.LABEL[0]])
    return root
