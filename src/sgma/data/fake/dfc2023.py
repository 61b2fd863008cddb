"""Fake DFC2023 track-2 tree."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sgma.data.fake.common import OUTLIER_PATCH, OUTLIER_VALUE, box_scene, write_geotiff


def make_fake_dfc2023(
    root: str | Path,
    *,
    counts: tuple[int, int, int] = (4, 2, 2),
    size: int = 64,
    seed: int = 0,
    test_annotations: bool = True,
    height_outliers: Iterable[str] = (),
) -> Path:
    """The DFC2023 track-2 layout: ``{train,val,test}/{rgb,sar,height}/P0001.tif`` plus COCO polygons in
    ``annotations/buildings_only_{split}.json`` (one rectangle per building, possibly overlapping; their union
    is the building mask). ``test_annotations=False`` leaves out the test json; the height maps named in
    ``height_outliers`` (``"train/P0001"``) get an :data:`OUTLIER_VALUE` patch. Returns ``root``."""
    outliers = set(height_outliers)
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        images, anns = [], []
        for i in range(n):
            name = f"P{i + 1:04d}.tif"
            _, rgb, height, sar, buildings = box_scene(rng, size, water=False)
            if f"{split}/{Path(name).stem}" in outliers:
                height[OUTLIER_PATCH] = OUTLIER_VALUE
            write_geotiff(root / split / "rgb" / name, rgb, gsd=0.5)
            write_geotiff(root / split / "sar" / name, sar, gsd=0.5)
            write_geotiff(root / split / "height" / name, height, gsd=0.5)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
            for x0, y0, x1, y1 in buildings:
                poly = [x0, y0, x1, y0, x1, y1, x0, y1]  # pixel-corner coordinates: covers [x0, x1) x [y0, y1)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "segmentation": [[float(v) for v in poly]],
                        "area": float((x1 - x0) * (y1 - y0)),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "iscrowd": 0,
                    }
                )
        if split == "test" and not test_annotations:
            continue
        coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "building"}]}
        (root / "annotations" / f"buildings_only_{split}.json").write_text(json.dumps(coco))
    return root
