"""Fake DELIVER tree, laid out as the front-view release (jamycheung/DELIVER) is after a plain unzip.

Release quirks written on purpose (what the loader must survive):

* frames are ``size`` px square, by default 66: like the real 1042, NOT a multiple of 32, so the CMNeXt
  resize (66 -> 64) and the native sliding window both have work to do;
* sequences are ``MAP_<n>_point<k>``; one extra sequence ``MAP_9_point0_eventlowres`` (first condition, one
  frame in each split with frames) has event images of half the frame size, as the real ``*_eventlowres``
  sequences (512 x 512 next to 1042 x 1042 frames);
* semantic PNGs are RGBA: the label value (0 = unlabelled, 1..25 = class + 1) in channel 0, the other
  colour channels 0 and alpha 255;
* a ``depth/`` folder of raw depth next to ``hha/`` (the release has both; DELIVER's loader, and ours, read
  ``hha/`` as the depth modality), written with other content so reading it by mistake shows;
* frame names repeat across conditions and sequences (only the full path is unique); ``_front`` view only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sgma.data import deliver

LOWRES_SEQUENCE = f"MAP_9_point0_{deliver.LOWRES_EVENT}"


def make_fake_deliver(
    root: str | os.PathLike,
    *,
    counts: tuple[int, int, int] = (2, 1, 1),
    conditions: Sequence[str] = deliver.CONDITIONS,
    size: int = 66,
    seed: int = 0,
    view: str = "front",
    eventlowres: bool = True,
    nested: bool = False,
) -> Path:
    """A small DELIVER copy in the release layout: ``counts`` frames per (condition, split) in sequences
    ``MAP_<frame % 2 + 1>_point<split>``, ``size`` px; ``eventlowres`` adds one frame per split (with frames)
    of the first condition in :data:`LOWRES_SEQUENCE`; ``nested`` writes the tree into ``root/DELIVER/``.
    Returns ``root`` (what ``dataset.builder.root`` is set to)."""
    from PIL import Image

    root = Path(root)
    base = root / "DELIVER" if nested else root
    rng = np.random.default_rng(seed)
    frames = []  # (condition, split, sequence, frame)
    for c, condition in enumerate(conditions):
        for s, (split, n) in enumerate(zip(deliver.SPLITS, counts, strict=True)):
            frames += [(condition, split, f"MAP_{i % 2 + 1}_point{s}", f"{i * 50:06d}") for i in range(n)]
            if eventlowres and c == 0 and n:
                frames.append((condition, split, LOWRES_SEQUENCE, "000000"))
    block = max(1, size // 8)
    for condition, split, sequence, frame in frames:
        files = deliver.frame_files(base, condition, split, sequence, frame, view)
        grid = -(-size // block)
        raw = rng.integers(0, len(deliver.CLASSES) + 1, (grid, grid)).astype(np.uint8)
        raw[0] = np.maximum(raw[0], 1)  # the first windows of a resized frame always hold labels
        raw[-1, 0], raw[-1, -1] = 0, len(deliver.CLASSES)  # always an unlabelled and a last-class block
        raw = np.kron(raw, np.ones((block, block), np.uint8))[:size, :size]
        colour = np.array((*deliver.PALETTE, (0, 0, 0)), np.float32)[np.where(raw == 0, len(deliver.CLASSES), raw - 1)]
        rgb = np.clip(colour + rng.normal(0, 10, colour.shape), 0, 255).astype(np.uint8)
        hha = np.stack([raw * 9, 255 - raw * 9, np.full_like(raw, 128)], -1).astype(np.uint8)
        side = size // 2 if sequence == LOWRES_SEQUENCE else size
        event = np.repeat((rng.random((side, side)) < 0.1).astype(np.uint8)[..., None] * 255, 3, -1)
        lidar = np.repeat(((raw % 5) * 50).astype(np.uint8)[..., None], 3, -1)
        semantic = np.zeros((size, size, 4), np.uint8)
        semantic[..., 0], semantic[..., 3] = raw, 255
        raw_depth = base / "depth" / condition / split / sequence / f"{frame}_depth_{view}.png"
        depth = np.full((size, size), 7, np.uint8)  # not the hha content: reading depth/ would show
        for path, array in (
            (files["rgb"], rgb),
            (files["depth"], hha),
            (files["event"], event),
            (files["lidar"], lidar),
            (files[deliver.LABEL[0]], semantic),
            (raw_depth, depth),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    return root
