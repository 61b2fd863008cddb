"""Writers shared by the fake datasets: GeoTIFF / JPEG files and box scenes with learnable structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NODATA = -32767.0
OUTLIER_VALUE = 1e30
OUTLIER_PATCH = (slice(8, 16), slice(8, 16))  # 64 px


def write_geotiff(path: Path, array: np.ndarray, *, origin=(0.0, 0.0), gsd=0.05, epsg=32633, nodata=None) -> None:
    """(C, H, W) or (H, W) array -> a georeferenced GeoTIFF (north-up, ``gsd`` m/px)."""
    import rasterio
    from rasterio.transform import Affine

    array = array[None] if array.ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "crs": f"EPSG:{epsg}",
        "transform": Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1]),  # north-up, top-left origin
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def write_jpeg(path: Path, gray: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray.astype(np.uint8), "L").save(path, quality=100)


def _boxes(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` random boxes (x0, y0, x1, y1), exclusive ends, inside a ``size`` square."""
    out = []
    for _ in range(count):
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        out.append((x0, y0, x0 + w, y0 + h))
    return out


def box_scene(rng: np.random.Generator, size: int, water: bool) -> tuple[np.ndarray, ...]:
    """Label (H, W) uint8, rgb (3, H, W) uint8, height (H, W) float32, sar (H, W) float32, building boxes."""
    label = np.zeros((size, size), np.uint8)
    if water:
        x0, y0, x1, y1 = _boxes(rng, size, 1)[0]
        label[y0:y1, x0:x1] = 2
    buildings = _boxes(rng, size, 3)
    for x0, y0, x1, y1 in buildings:
        label[y0:y1, x0:x1] = 1
    base = np.array([[90, 120, 60], [200, 80, 70], [30, 60, 140]], np.float32)[label]  # (H, W, 3)
    rgb = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    height = np.where(label == 1, rng.uniform(5, 15), 0).astype(np.float32) + rng.normal(0, 0.3, label.shape)
    sar = np.where(label == 1, -5.0, np.where(label == 2, -22.0, -14.0)) + rng.normal(0, 2, label.shape)
    return label, rgb, height.astype(np.float32), sar.astype(np.float32), buildings
