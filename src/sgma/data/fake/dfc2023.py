"""Fake DFC2023 track-2 release, laid out as the real archives unpack (see :mod:`sgma.data.dfc2023`)::

    track2/buildings_only_train.json                  # COCO: category 1 "building"; polygons and some RLE
    track2/train/{rgb,sar,dsm}/SV_Copenhagen_55.6770_12.5319.tif, GF2_Brasilia_-15.8652_-47.9337.tif, ...
    track2/val/{rgb,sar}/P_0000.tif ...               # unlabelled, no heights
    track2_test_data/{rgb,sar}/P_0420.tif ...         # unlabelled, no heights

Quirks written on purpose: ``file_name`` in the json is the bare basename; the train scenes come from
several cities with uneven image counts (:data:`FAKE_CITIES`) so the split by city has something to do;
some segmentations are compressed RLE instead of polygons (as in the release); the last image of each of
the first ``unannotated`` cities has no annotation at all (the release has 3 such images); rgb is 3-band
uint8, SAR float32 LINEAR power (the loader converts it to dB), heights float32 metres.
``height_folder="height"`` writes the heights where the baseline's README puts them (``train/height/``);
``height_outliers`` names train stems whose height map gets an
:data:`~sgma.data.fake.common.OUTLIER_VALUE` patch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sgma.data.fake.common import OUTLIER_PATCH, OUTLIER_VALUE, box_scene, write_geotiff

# (satellite, city, lat, lon, images): 10 train images from 6 cities
FAKE_CITIES = (
    ("SV", "Copenhagen", 55.6770, 12.5319, 3),
    ("GF2", "Brasilia", -15.8652, -47.9337, 2),
    ("SV", "NewYork", 40.7387, -73.9989, 2),
    ("SV", "Rio", -22.9076, -43.1690, 1),
    ("SV", "Portsmouth", 50.8198, -1.0880, 1),
    ("SV", "NewDelhi", 28.6139, 77.2090, 1),
)


def fake_train_names(cities: Sequence[tuple[str, str, float, float, int]] = FAKE_CITIES) -> list[str]:
    """The train file names ``<SAT>_<City>_<lat>_<lon>.tif`` that :func:`make_fake_dfc2023` writes."""
    return [f"{sat}_{city}_{lat + 0.01 * i:.4f}_{lon:.4f}.tif" for sat, city, lat, lon, n in cities for i in range(n)]


def _empty_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rgb, height, sar (dB) of a scene without buildings."""
    rgb = np.clip(np.array([90, 120, 60], np.float32)[:, None, None] + rng.normal(0, 12, (3, size, size)), 0, 255)
    height = rng.normal(0, 0.3, (size, size)).astype(np.float32)
    sar = (-14.0 + rng.normal(0, 2, (size, size))).astype(np.float32)
    return rgb.astype(np.uint8), height, sar


def _segmentation(box: tuple[int, int, int, int], size: int, rle: bool) -> list | dict:
    """The box as a polygon (pixel-corner coordinates: covers [x0, x1) x [y0, y1)) or as compressed RLE."""
    x0, y0, x1, y1 = box
    if not rle:
        return [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
    from pycocotools import mask as mask_utils

    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [size, size], "counts": encoded["counts"].decode("ascii")}


def make_fake_dfc2023(
    root: str | Path,
    *,
    size: int = 64,
    seed: int = 0,
    cities: Sequence[tuple[str, str, float, float, int]] = FAKE_CITIES,
    unannotated: int = 1,
    unlabelled: tuple[int, int] = (2, 2),
    height_folder: str = "dsm",
    height_outliers: Iterable[str] = (),
) -> Path:
    """Write the release tree under ``root`` (``root/track2/...``, ``root/track2_test_data/...``) and return
    ``root``: train scenes from ``cities`` (the last one of each of the first ``unannotated`` cities without
    annotations), and ``unlabelled`` (val, test) scenes with rgb and sar only."""
    if height_folder not in ("dsm", "height"):
        raise ValueError(f"height_folder={height_folder!r}; the releases use dsm (or height in the baseline README)")
    outliers = set(height_outliers)
    root = Path(root)
    track2 = root / "track2"
    rng = np.random.default_rng(seed)
    names = fake_train_names(cities)
    ends = np.cumsum([c[-1] for c in cities]) - 1  # the last image of each city
    empty = set(ends[:unannotated].tolist())
    images, anns = [], []
    for i, name in enumerate(names):
        if i in empty:
            rgb, height, sar, buildings = *_empty_scene(rng, size), []
        else:
            _, rgb, height, sar, buildings = box_scene(rng, size, water=False)
        if Path(name).stem in outliers:
            height[OUTLIER_PATCH] = OUTLIER_VALUE
        write_geotiff(track2 / "train" / "rgb" / name, rgb, gsd=0.5)
        write_geotiff(track2 / "train" / "sar" / name, (10 ** (sar / 10)).astype(np.float32), gsd=0.5)
        write_geotiff(track2 / "train" / height_folder / name, height, gsd=0.5)
        images.append({"id": i, "file_name": name, "height": size, "width": size})
        for x0, y0, x1, y1 in buildings:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": _segmentation((x0, y0, x1, y1), size, rle=len(anns) % 3 == 1),
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    categories = [{"supercategory": "building", "id": 1, "name": "building"}]
    coco = {"images": images, "annotations": anns, "categories": categories}
    (track2 / "buildings_only_train.json").write_text(json.dumps(coco))
    for folder, first, n in ((track2 / "val", 0, unlabelled[0]), (root / "track2_test_data", 420, unlabelled[1])):
        for k in range(n):
            _, rgb, _, sar, _ = box_scene(rng, size, water=False)
            write_geotiff(folder / "rgb" / f"P_{first + k:04d}.tif", rgb, gsd=0.5)
            write_geotiff(folder / "sar" / f"P_{first + k:04d}.tif", (10 ** (sar / 10)).astype(np.float32), gsd=0.5)
    return root
