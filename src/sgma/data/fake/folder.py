"""Fake generic-folder dataset (``dataset=folder``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sgma.data.fake.common import box_scene, write_geotiff

FOLDER_CLASSES = ("background", "building", "water")
FOLDER_PALETTE = ((0, 0, 0), (255, 0, 0), (0, 0, 255))


def make_fake_folder(
    root: str | Path,
    *,
    num_images: int = 8,
    size: int = 80,
    seed: int = 0,
    colour_labels: bool = False,
    splits: str = "fraction",
) -> Path:
    """A generic-folder dataset: ``rgb`` (png, 3 bands), ``dsm`` (GeoTIFF float32, one no-data pixel per
    image, declared by ``nodata: -9999``), ``labels`` (png ids, or palette colours with ``colour_labels``),
    ``dataset.yaml`` with classes, palette and dsm mean/std (rgb's are measured on train).

    ``splits``: ``fraction`` (val/test fractions in the yaml), ``files`` (``splits/*.txt``) or ``yaml``
    (lists in the yaml). Returns ``root``.
    """
    import yaml
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    stems = [f"img_{i:03d}" for i in range(num_images)]
    for folder in ("rgb", "dsm", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        label, rgb, height, _, _ = box_scene(rng, size, water=True)
        Image.fromarray(rgb.transpose(1, 2, 0)).save(root / "rgb" / f"{stem}.png")
        height[0, 0] = -9999.0
        write_geotiff(root / "dsm" / f"{stem}.tif", height, gsd=0.5, nodata=-9999.0)
        if colour_labels:
            Image.fromarray(np.array(FOLDER_PALETTE, np.uint8)[label]).save(root / "labels" / f"{stem}.png")
        else:
            Image.fromarray(label).save(root / "labels" / f"{stem}.png")
    desc = {
        "modalities": [
            {"name": "rgb", "channels": 3, "kind": "optical", "value_max": 255},
            {
                "name": "dsm",
                "channels": 1,
                "kind": "elevation",
                "mean": [3.0],
                "std": [5.0],
                "nodata": -9999,
                "valid_range": [-100, 1000],
            },
        ],
        "classes": list(FOLDER_CLASSES),
        "palette": [list(c) for c in FOLDER_PALETTE],
        "ignore_index": 255,
    }
    n_val = max(1, num_images // 4)
    lists = {"train": stems[: -2 * n_val], "val": stems[-2 * n_val : -n_val], "test": stems[-n_val:]}
    if splits == "fraction":
        desc.update(val_fraction=0.25, test_fraction=0.25, split_seed=0)
    elif splits == "yaml":
        desc["splits"] = lists
    elif splits == "files":
        (root / "splits").mkdir(exist_ok=True)
        for s, listed in lists.items():
            (root / "splits" / f"{s}.txt").write_text("\n".join(listed) + "\n")
    else:
        raise ValueError(f"splits={splits!r}: use fraction, files or yaml")
    (root / "dataset.yaml").write_text(yaml.safe_dump(desc, sort_keys=False))
    return root
