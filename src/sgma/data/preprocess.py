"""Transforms from a release's raw pixel values to what a dataset feeds the model, shared with predict.py.

A dataset that changes a modality's values before caching them (SAR from linear power to dB, absolute
heights to heights above the ground) names the transform in its ``input_transforms`` (modality ->
``{"name": ..., **parameters}``). Training stores that mapping in the checkpoint's dataset facts and
``predict.py`` applies the same function to its raw input rasters, so a model never sees linear SAR at
prediction time after training on dB.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SAR_DB_RANGE = (-25.0, 0.0)  # as IMLT's DFC2023 pre-processing: 10 log10(power), clipped to [-25, 0] dB


def sar_to_db(linear: np.ndarray, low: float = SAR_DB_RANGE[0], high: float = SAR_DB_RANGE[1]) -> np.ndarray:
    """Linear SAR backscatter (power, >= 0) -> dB, clipped to [low, high]; zero and negative power (no
    return, resampling artefacts) become ``low``. NaN stays NaN (no-data is the caller's business)."""
    x = np.asarray(linear, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(np.where(x > 0, x, np.float32(1e-30)))
    return np.where(np.isnan(x), np.float32(np.nan), np.clip(db, low, high)).astype(np.float32)


def heights_above_ground(dsm: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """Absolute heights -> heights above the raster's 2nd-percentile ground (as the ISPRS loaders do)."""
    from sgma.data.isprs import heights_above_ground as relative

    out = np.stack([relative(band, nodata)[0][0] for band in np.asarray(dsm, np.float32)])
    return out.astype(np.float32)


TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    "sar_to_db": sar_to_db,
    "heights_above_ground": heights_above_ground,
}


def apply_input_transform(
    array: np.ndarray, spec: Mapping[str, Any] | None, *, nodata: float | None = None
) -> np.ndarray:
    """Apply a transform spec (``{"name": ..., **parameters}``; None: identity) to a (C, H, W) raster."""
    if not spec:
        return array
    params = {k: v for k, v in spec.items() if k != "name"}
    name = spec.get("name")
    if name not in TRANSFORMS:
        raise ValueError(
            f"unknown input transform {name!r} in the checkpoint's dataset facts; this sgma knows "
            f"{', '.join(TRANSFORMS)} (was the checkpoint written by a newer version?)"
        )
    if name == "heights_above_ground":
        params["nodata"] = nodata
    return TRANSFORMS[name](array, **params)
