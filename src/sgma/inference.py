"""Whole-tile inference: sliding-window prediction with blended overlaps, and reading/writing rasters.

:func:`sliding_window_logits` predicts a tile of any size with a model trained on fixed-size crops: windows
of side ``window`` cover the whole tile (the last one aligned to the border, tiles smaller than a window
are zero-padded and cropped back), run in batches, and their logits are blended into float32 accumulators
of size K x H x W with per-pixel weights (``mean``: uniform; ``gaussian``: a separable Gaussian that
down-weights window borders, where the receptive field is cut). Only one batch of window logits is ever held
at once, so a 6000 x 6000 tile with K = 6 needs ~860 MB of accumulators plus one batch.

Inputs follow :class:`~sgma.data.datamodule.IncompleteModalityDataset`: ``(x - mean) / std`` per channel
and zeros for a missing modality (:func:`normalise_inputs`).

Also here: :func:`evaluate_full_tiles` (``eval.py eval.full_tile=true``) and the raster I/O of ``predict.py``.

``predict.py`` and bad input: NaN, inf and a raster's declared nodata value are filled with the modality's mean
(0 after normalisation, the value the model sees most often), counted per modality in one warning, and the
pixels they touch are marked nodata in every output (class 255 / a GDAL mask in ``prediction.tif``,
transparent in PNGs, -1 in ``robustness.tif``). Outputs are written into a hidden staging folder inside the
output folder and renamed into place at the end, so a crash never leaves a truncated file under a final name;
the output folder is checked (creatable, writable, no earlier outputs unless ``overwrite=true``) before the
inference runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sgma.builders import build_datamodule, build_module, device_for
from sgma.checkpoint import CHECKPOINT_KEY, load_checkpoint
from sgma.data.tiles import check_crop_size, grid_starts
from sgma.metrics import PatternConfusion, PatternReport, build_report
from sgma.modalities import Modality, pattern_mask
from sgma.recovery import fsync_dir

log = logging.getLogger("sgma")

BLENDS = ("mean", "gaussian")
GAUSSIAN_SIGMA = 1 / 6  # sigma of the blending window as a fraction of its side (border weight ~ 1 %)
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
NODATA_CLASS = 255  # class id of a pixel without a prediction (also the ignore index of the labels)
ROBUSTNESS_NODATA = -1.0  # robustness maps are in [0, 1]: -1 is never a real value


# --------------------------------------------------------------------------------------------- weights
def blend_weights(window: int, blend: str = "gaussian") -> Tensor:
    """(window, window) float32 blending weights, max 1 and strictly positive.

    ``mean``: all ones (plain average of overlapping windows). ``gaussian``: ``exp(-d^2 / (2 sigma^2))``
    per axis (separable), sigma = window / 6, so a window's centre counts ~90x more than its border.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r}: use one of {', '.join(BLENDS)}")
    if blend == "mean":
        return torch.ones(window, window)
    centre = (window - 1) / 2
    d = torch.arange(window, dtype=torch.float64) - centre
    g = torch.exp(-(d**2) / (2 * (GAUSSIAN_SIGMA * window) ** 2))
    w = torch.outer(g, g)
    w = w / w.max()
    return w.clamp(min=1e-6).float()


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis: every ``window * (1 - overlap)`` px, the last aligned to the border."""
    stride = max(1, round(window * (1 - overlap)))
    return grid_starts(length, window, stride)


def _check_options(window: int, overlap: float, blend: str, batch_size: int) -> int:
    window = check_crop_size(window, "window")
    if not 0 <= float(overlap) < 1:
        raise ValueError(f"overlap={overlap} must be in [0, 1)")
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r}: use one of {', '.join(BLENDS)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return window


# --------------------------------------------------------------------------------------------- inputs
def normalise_inputs(
    raw: Mapping[str, np.ndarray | Tensor],
    modalities: Sequence[Modality],
    available: Sequence[bool] | Tensor | None = None,
) -> dict[str, Tensor]:
    """Raw (C, H, W) arrays -> float32 tensors normalised with each Modality's mean/std.

    The same transform as :class:`~sgma.data.datamodule.IncompleteModalityDataset`; a missing modality
    (``available`` False, or absent from ``raw``) is left out: :func:`sliding_window_logits` feeds zeros
    for it without allocating a full-size zero tile.
    """
    flags = [True] * len(modalities) if available is None else [bool(a) for a in available]
    out: dict[str, Tensor] = {}
    for m, present in zip(modalities, flags, strict=True):
        if not present or m.name not in raw:
            continue
        x = raw[m.name]
        x = torch.from_numpy(np.asarray(x, dtype=np.float32)) if not isinstance(x, Tensor) else x.float()
        if x.ndim == 2:
            x = x[None]
        if x.shape[0] != m.channels:
            raise ValueError(f"modality {m.name!r} has {x.shape[0]} channel(s); the model expects {m.channels}")
        mean = torch.tensor(m.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(m.std, dtype=torch.float32).view(-1, 1, 1)
        out[m.name] = (x - mean) / std
    return out


# ---------------------------------------------------------------------------------------- sliding window
def _net_device(net: torch.nn.Module) -> torch.device:
    try:
        return next(net.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def sliding_window_logits(
    net: torch.nn.Module,
    inputs: Mapping[str, Tensor],
    available: Sequence[bool] | Tensor,
    *,
    window: int,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    num_classes: int,
    return_robustness: bool = False,
    modalities: Sequence[Modality] | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Blended (K, H, W) float32 logits of a whole tile (on the inputs' device, CPU for numpy-born inputs).

    ``inputs`` maps modality name -> normalised (C, H, W) tensor; missing modalities may be absent (zeros
    are fed). ``available`` is the (M,) availability mask in the net's modality order. With
    ``return_robustness`` also returns the (M, H, W) robustness map (per-scale maps upsampled bilinearly to
    the window, averaged over scales, blended like the logits), or None when the fusion has no maps.
    """
    window = _check_options(window, overlap, blend, batch_size)
    mods = list(modalities if modalities is not None else net.modalities)
    names = [m.name for m in mods]
    available = torch.as_tensor(available, dtype=torch.bool).flatten()
    if available.numel() != len(mods):
        raise ValueError(f"available has {available.numel()} entries for modalities {names}")
    if not bool(available.any()):
        raise ValueError("available has no available modality")
    present = [m for m, a in zip(mods, available.tolist(), strict=True) if a]
    missing_inputs = [m.name for m in present if m.name not in inputs]
    if missing_inputs:
        raise ValueError(f"no input for available modality {missing_inputs[0]!r}")
    shapes = {m.name: tuple(inputs[m.name].shape[-2:]) for m in present}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"modality sizes disagree: {shapes}")
    h, w = next(iter(shapes.values()))
    ref = inputs[present[0].name]
    acc_device, dtype = ref.device, torch.float32
    device = _net_device(net)

    weights = blend_weights(window, blend).to(acc_device)
    logits_acc = torch.zeros(num_classes, h, w, dtype=dtype, device=acc_device)
    weight_acc = torch.zeros(h, w, dtype=dtype, device=acc_device)
    robust_acc: Tensor | None = None
    robust_supported = return_robustness

    positions = [(y, x) for y in window_starts(h, window, overlap) for x in window_starts(w, window, overlap)]
    avail_dev = available.to(device)
    for begin in range(0, len(positions), batch_size):
        chunk = positions[begin : begin + batch_size]
        batch: dict[str, Tensor] = {}
        for m in mods:
            crops = torch.zeros(len(chunk), m.channels, window, window, dtype=dtype, device=device)
            if m.name in inputs and bool(available[names.index(m.name)]):
                src = inputs[m.name]
                for i, (y, x) in enumerate(chunk):
                    part = src[:, y : y + window, x : x + window]
                    crops[i, :, : part.shape[-2], : part.shape[-1]] = part.to(device, dtype)
            batch[m.name] = crops
        out = net(batch, avail_dev.expand(len(chunk), -1), return_robustness=robust_supported)
        logits = out.logits.float()
        robust = None
        if robust_supported:
            if out.robustness is None:
                robust_supported = False  # this fusion has no robustness maps
            else:
                robust = torch.stack(
                    [F.interpolate(r.float(), size=(window, window), mode="bilinear") for r in out.robustness]
                ).mean(dim=0)
                if robust_acc is None:
                    robust_acc = torch.zeros(robust.shape[1], h, w, dtype=dtype, device=acc_device)
        for i, (y, x) in enumerate(chunk):
            hh, ww = min(window, h - y), min(window, w - x)  # tiles smaller than the window: crop back
            wt = weights[:hh, :ww]
            logits_acc[:, y : y + hh, x : x + ww] += logits[i, :, :hh, :ww].to(acc_device) * wt
            weight_acc[y : y + hh, x : x + ww] += wt
            if robust is not None:
                robust_acc[:, y : y + hh, x : x + ww] += robust[i, :, :hh, :ww].to(acc_device) * wt
        del batch, out, logits, robust
    logits_acc /= weight_acc
    if not return_robustness:
        return logits_acc
    if robust_acc is not None:
        robust_acc /= weight_acc
    return logits_acc, robust_acc


# ----------------------------------------------------------------------------------- full-tile evaluation
def tiled_base(dataset: Any) -> Any:
    """The raw dataset behind a datamodule split if it is made of whole tiles (a TileCache), else None."""
    base = getattr(dataset, "base", dataset)
    cache = getattr(base, "cache", None)
    if cache is None or not hasattr(cache, "array") or not hasattr(base, "tiles"):
        return None
    return base


def evaluate_full_tiles(
    net: torch.nn.Module,
    base: Any,
    *,
    split: str,
    patterns: Sequence[str],
    all_patterns: Sequence[str],
    class_names: Sequence[str],
    exclude_classes: Sequence[str] = (),
    missing_probs: Sequence[float] = (),
    window: int,
    overlap: float,
    blend: str,
    batch_size: int,
    ignore_index: int = 255,
    label_key: str = "mask",
) -> PatternReport:
    """Score every pattern on every whole tile of ``base``'s split (each tile read and normalised once)."""
    modalities = list(net.modalities)
    confusion = PatternConfusion(
        num_patterns=len(all_patterns), num_classes=len(class_names), ignore_index=ignore_index
    )
    tiles = list(base.tiles)
    for t, tile in enumerate(tiles):
        raw = {m.name: base.cache.array(tile, m.name) for m in modalities}
        inputs = normalise_inputs(raw, modalities)
        target = torch.from_numpy(np.asarray(base.cache.array(tile, label_key)).astype(np.int64))[None]
        for pattern in patterns:
            available = pattern_mask(pattern, modalities)
            logits = sliding_window_logits(
                net,
                inputs,
                available,
                window=window,
                overlap=overlap,
                blend=blend,
                batch_size=batch_size,
                num_classes=len(class_names),
                modalities=modalities,
            )
            pid = torch.tensor([list(all_patterns).index(pattern)])
            confusion.update(logits.argmax(dim=0)[None], target, pid)
            del logits
        log.info("full-tile %s: tile %s done (%d/%d)", split, tile, t + 1, len(tiles))
        del inputs, target
    confmat, samples = confusion.compute()
    return build_report(
        confmat,
        samples,
        all_patterns=list(all_patterns),
        class_names=list(class_names),
        exclude_classes=list(exclude_classes),
        missing_probs=list(missing_probs),
    )


# ------------------------------------------------------------------------------------------ raster I/O
def find_modality_files(folder: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """``<folder>/<name>.{tif,tiff,png,jpg,jpeg}`` for each name; errors name what is missing or ambiguous."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(
                f"input={str(folder)!r} is a file: input must be a folder holding one raster per modality, named "
                f"<modality>.tif (or .png / .jpg)"
            )
        raise FileNotFoundError(f"input={str(folder)!r} does not exist: point input= at a folder of rasters")
    try:
        entries = sorted(folder.iterdir())
    except PermissionError:
        raise PermissionError(f"input={str(folder)!r} is not readable (permission denied)") from None
    out = {}
    for name in names:
        found = [p for p in entries if p.stem == name and p.suffix.lower() in RASTER_SUFFIXES]
        if not found:
            have = sorted(p.name for p in entries if p.suffix.lower() in RASTER_SUFFIXES)
            raise FileNotFoundError(
                f"input folder {str(folder)!r} has no raster for modality {name!r} (expected {name}.tif, .png or "
                f".jpg); it holds {have}"
            )
        if len(found) > 1:
            raise ValueError(f"modality {name!r} has several rasters in {str(folder)!r}: {[p.name for p in found]}")
        out[name] = found[0]
    return out


def _check_raster_file(path: Path) -> None:
    """Say what an input raster is when it is not a readable file (a folder, unreadable, empty, truncated)."""
    if path.is_dir():
        raise IsADirectoryError(f"input raster {str(path)!r} is a folder, not an image: move or rename it")
    try:
        with path.open("rb") as f:
            empty = not f.read(1)
    except PermissionError:
        raise PermissionError(
            f"input raster {str(path)!r} is not readable (permission denied): fix its permissions (chmod u+r)"
        ) from None
    if empty:
        raise OSError(f"input raster {str(path)!r} is empty (0 bytes): was it copied or downloaded completely?")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        # GDAL reads a truncated PNG/JPEG as zeros with no error: decode it once with Pillow, which notices
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise OSError(
                f"input raster {str(path)!r} is truncated or corrupt ({err}): was it copied or downloaded completely?"
            ) from None


def read_input_raster(path: Path) -> tuple[np.ndarray, dict[str, Any] | None, np.ndarray | None]:
    """(C, H, W) float32 array, the georeference ({crs, transform}) or None, and the nodata mask or None.

    The mask is (C, H, W) bool, True where a band equals the nodata value the file declares (compared in the
    file's own dtype, before the cast to float32); None when the file declares none.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    _check_raster_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                array = src.read()
                geo = {"crs": src.crs, "transform": src.transform} if src.crs is not None else None
                nodata = list(src.nodatavals)
    except rasterio.errors.RasterioError as err:
        raise OSError(
            f"cannot read raster {str(path)!r}: it is truncated, corrupt or not a raster GDAL reads ({err})"
        ) from err
    mask = None
    if any(v is not None and not np.isnan(v) for v in nodata):
        mask = np.zeros(array.shape, dtype=bool)
        for band, value in enumerate(nodata):
            if value is not None and not np.isnan(value):
                mask[band] = array[band] == np.asarray(value).astype(array.dtype)
    with np.errstate(over="ignore"):  # a float64 value beyond float32's range becomes inf: counted as such
        return array.astype(np.float32), geo, mask


def read_inputs(
    folder: str | Path, modalities: Sequence[Modality]
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, dict[str, np.ndarray | None]]:
    """Read one raster per modality; check band counts and that all sizes agree; keep the first georeference.

    Returns the float32 arrays, the georeference and each modality's nodata mask (see :func:`read_input_raster`).
    """
    files = find_modality_files(folder, [m.name for m in modalities])
    arrays, geo, sizes, masks = {}, None, {}, {}
    for m in modalities:
        array, g, mask = read_input_raster(files[m.name])
        if array.shape[0] != m.channels:
            raise ValueError(
                f"{str(files[m.name])!r} has {array.shape[0]} band(s) but modality {m.name!r} has {m.channels}"
            )
        arrays[m.name], masks[m.name] = array, mask
        sizes[files[m.name].name] = tuple(array.shape[1:])
        geo = geo or g
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n}: {h}x{w}" for n, (h, w) in sizes.items())
        raise ValueError(f"input rasters have different sizes ({listed}); every modality must cover the same grid")
    return arrays, geo, masks


def fill_invalid(
    raw: Mapping[str, np.ndarray],
    modalities: Sequence[Modality],
    nodata_masks: Mapping[str, np.ndarray | None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, dict[str, int]]]:
    """Fill NaN, inf and nodata values with the modality's per-channel mean (0 after normalisation).

    Returns the filled (C, H, W) float32 arrays (copies only where something was filled), the (H, W) mask of
    pixels where any band of any modality was invalid (None if none was), and per-modality pixel counts
    ``{"nan", "inf", "nodata", "pixels"}`` (a pixel counts once per kind if any band has it; ``pixels``: any
    kind) for the modalities that had some.
    """
    out: dict[str, np.ndarray] = {}
    invalid: np.ndarray | None = None
    counts: dict[str, dict[str, int]] = {}
    for m in modalities:
        if m.name not in raw:
            continue
        x = np.asarray(raw[m.name], dtype=np.float32)
        x = x[None] if x.ndim == 2 else x
        nan, inf = np.isnan(x), np.isinf(x)
        nodata = (nodata_masks or {}).get(m.name)
        bad = nan | inf if nodata is None else nan | inf | nodata.reshape(x.shape)
        if not bad.any():
            out[m.name] = x
            continue
        x = x.copy()
        for c in range(x.shape[0]):
            x[c][bad[c]] = m.mean[c]
        out[m.name] = x
        pixels = bad.any(axis=0)
        counts[m.name] = {
            "nan": int(nan.any(axis=0).sum()),
            "inf": int(inf.any(axis=0).sum()),
            "nodata": int(nodata.any(axis=0).sum()) if nodata is not None else 0,
            "pixels": int(pixels.sum()),
        }
        invalid = pixels if invalid is None else invalid | pixels
    return out, invalid, counts


def describe_invalid(counts: Mapping[str, Mapping[str, int]], total: int) -> str:
    """``dsm: 120 NaN, 4 no-data pixels (1.3 %)`` for each modality with invalid values."""
    parts = []
    for name, c in counts.items():
        kinds = ", ".join(
            f"{c[k]} {label}" for k, label in (("nan", "NaN"), ("inf", "inf"), ("nodata", "no-data")) if c[k]
        )
        parts.append(f"{name}: {kinds} pixel(s) ({100 * c['pixels'] / max(total, 1):.2g} % of the tile)")
    return "; ".join(parts)


def colourise(classes: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class ids -> (3, H, W) uint8 colours (RGB); ids beyond the palette (nodata, 255) are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return np.ascontiguousarray(lut[classes].transpose(2, 0, 1))


def output_names(georeferenced: bool, robustness: Sequence[str] | None) -> list[str]:
    """File names :func:`predict` writes: the prediction, then the robustness maps (``robustness`` = modalities)."""
    names = ["prediction.tif" if georeferenced else "prediction.png"]
    if robustness:
        names += ["robustness.tif"] if georeferenced else [f"robustness_{m}.png" for m in robustness]
    return names


def write_raster(
    path: Path,
    array: np.ndarray,
    geo: dict[str, Any] | None,
    *,
    descriptions: Sequence[str] | None = None,
    valid: np.ndarray | None = None,
    nodata: float | None = None,
) -> Path:
    """(C, H, W) -> GeoTIFF with ``geo``'s CRS/transform (``path`` gets .tif), or PNG(s) without ``geo``.

    PNG: 3 bands -> one RGB PNG; other band counts -> one 8-bit greyscale PNG per band (float arrays are
    taken as values in [0, 1]), named ``<stem>_<description>.png``. Returns the (first) written path.
    ``valid`` ((H, W) bool, False = no data) marks pixels without a value: PNGs get an alpha channel (0 there);
    a GeoTIFF gets ``nodata`` in its profile when given (single-value bands), else an internal GDAL mask (RGB,
    where no band value is free to mean "nodata"). Writes in place: :func:`predict` stages files and renames.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    masked = valid is not None and not bool(valid.all())
    if geo is not None:
        import rasterio

        out = path.with_suffix(".tif")
        profile = {
            "driver": "GTiff",
            "height": array.shape[1],
            "width": array.shape[2],
            "count": array.shape[0],
            "dtype": array.dtype.name,
            "crs": geo["crs"],
            "transform": geo["transform"],
            "compress": "deflate",
        }
        if nodata is not None:
            profile["nodata"] = nodata
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(out, "w", **profile) as dst:
            dst.write(array)
            for i, d in enumerate(descriptions or ()):
                dst.set_band_description(i + 1, d)
            if masked and nodata is None:
                dst.write_mask(valid.astype(np.uint8) * 255)
        return out
    from PIL import Image

    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array.astype(np.float32)), 0, 1) * 255 + 0.5).astype(np.uint8)
    alpha = valid.astype(np.uint8) * 255 if masked else None
    if array.shape[0] == 3 and not descriptions:
        out = path.with_suffix(".png")
        if alpha is None:
            Image.fromarray(array.transpose(1, 2, 0), "RGB").save(out)
        else:
            Image.fromarray(np.concatenate([array, alpha[None]]).transpose(1, 2, 0), "RGBA").save(out)
        return out
    written = []
    for i in range(array.shape[0]):
        label = descriptions[i] if descriptions else str(i + 1)
        out = path.with_name(f"{path.stem}_{label}.png")
        if alpha is None:
            Image.fromarray(array[i], "L").save(out)
        else:
            Image.fromarray(np.stack([array[i], alpha], axis=-1), "LA").save(out)
        written.append(out)
    return written[0]


# ------------------------------------------------------------------------------------------- outputs
def check_output_dir(path: str | Path, *, key: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove it writable with a probe file, so a bad folder fails in a second."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{key}={str(out)!r} is a file, not a folder: choose another {key}=DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(
            f"{key}={str(out)!r} cannot be created ({err.strerror or err}): choose another {key}=DIR"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".predict-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise type(err)(
            f"{key}={str(out)!r} is not writable ({err.strerror or err}): fix its permissions or choose another "
            f"{key}=DIR"
        ) from None
    return out


def check_no_outputs(out: Path, names: Sequence[str], *, overwrite: bool) -> None:
    """Refuse to replace earlier outputs unless ``overwrite``; a folder in an output's place is always an error."""
    folders = [n for n in names if (out / n).is_dir()]
    if folders:
        raise IsADirectoryError(f"output_dir={str(out)!r} has folder(s) named like outputs: {', '.join(folders)}")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output_dir={str(out)!r} already holds {', '.join(existing)} (an earlier prediction?): pass "
            f"overwrite=true to replace them, or choose another output_dir=DIR"
        )


class _Staging:
    """Outputs written into a hidden folder inside the output folder, then renamed into place together.

    Same filesystem, so each rename is atomic: a crash or a full disk leaves a ``.predict-staging-*`` folder,
    never a truncated file under an output's name.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = Path(tempfile.mkdtemp(prefix=".predict-staging-", dir=out))

    def commit(self) -> list[Path]:
        files = sorted(p for p in self.dir.iterdir() if p.is_file())
        for p in files:  # data on disk before a name points at it
            with p.open("rb") as f:
                os.fsync(f.fileno())
        final = []
        for p in files:
            os.replace(p, self.out / p.name)
            final.append(self.out / p.name)
        fsync_dir(self.out)
        self.dir.rmdir()
        return final

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # best effort: the outputs' names were never touched


# --------------------------------------------------------------------------------------------- predict
def predict(cfg: Any) -> dict[str, Any]:
    """``predict.py``: label map (and optional robustness maps) of one input folder under one pattern.

    ``cfg.input`` is a folder with one raster per modality of ``cfg.pattern``, named ``<modality>.tif``
    (or .png / .jpg). Outputs go to ``cfg.output_dir`` (default: the run folder): ``prediction.tif`` (RGB
    palette colours, the input's CRS/transform) when an input is georeferenced, else ``prediction.png``;
    with ``robustness=true`` also ``robustness.tif`` (float32, one band per available modality) or
    ``robustness_<modality>.png`` (8-bit, 255 = 1.0). Input pixels with NaN, inf or the raster's nodata value
    are filled, counted in a warning and marked nodata in every output; ``classes`` has 255 there.
    Existing outputs are replaced only with ``overwrite=true``.
    """
    from omegaconf import OmegaConf, open_dict

    from sgma.modalities import canonical_pattern, format_pattern
    from sgma.utils import instantiate

    if not cfg.get("input"):
        raise ValueError("predict needs input=FOLDER holding one raster per modality (<modality>.tif, .png, .jpg)")
    out_dir = check_output_dir(cfg.output_dir)  # before anything slow
    overwrite = bool(cfg.get("overwrite", False))
    ckpt = load_checkpoint(cfg.get("ckpt_path"))
    run_cfg = OmegaConf.create(ckpt[CHECKPOINT_KEY]["config"])
    with open_dict(run_cfg):
        if cfg.get("data_root"):
            run_cfg.dataset.builder.root = str(cfg.data_root)
    facts = ckpt[CHECKPOINT_KEY].get("dataset")
    if facts:  # the checkpoint carries the normalisation, classes and palette: no training data needed
        modalities = [
            Modality(m["name"], m["channels"], tuple(m["mean"]), tuple(m["std"])) for m in facts["modalities"]
        ]
        num_classes, palette = len(facts["classes"]), [tuple(c) for c in facts["palette"]]
    else:  # checkpoints written before the facts were stored: read them from the training dataset
        log.info("checkpoint has no dataset facts; reading normalisation and palette from the training dataset")
        dm = build_datamodule(run_cfg)
        modalities, num_classes, palette = list(dm.modalities), dm.num_classes, dm.palette
    names = [m.name for m in modalities]
    spec = cfg.get("pattern") or format_pattern(names)
    try:
        pattern = canonical_pattern(spec, modalities)
    except ValueError as err:
        raise ValueError(f"pattern={spec!r} does not fit this model (modalities {', '.join(names)}): {err}") from err
    available = pattern_mask(pattern, modalities)
    present = [m for m, a in zip(modalities, available, strict=True) if a]
    want = bool(cfg.get("robustness", False))
    # every check on the inputs and outputs comes before the model is built and run
    raw, geo, nodata_masks = read_inputs(cfg.input, present)
    planned = output_names(geo is not None, [m.name for m in present] if want else None)
    check_no_outputs(out_dir, planned, overwrite=overwrite)
    raw, invalid, counts = fill_invalid(raw, present, nodata_masks)
    h, w = next(iter(raw.values())).shape[-2:]
    for name, c in counts.items():
        if c["pixels"] == h * w:
            others = [m.name for m in present if m.name != name]
            fix = f"pattern={'+'.join(others)}" if others else "another input"
            raise ValueError(
                f"input modality {name!r} has no valid pixel (all NaN, inf or no-data): predict with {fix}"
            )

    if facts:
        net = instantiate(run_cfg.model, modalities=modalities, num_classes=num_classes)
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
    else:
        module = build_module(run_cfg, dm)
        module.load_state_dict(ckpt["state_dict"])
        net = module.net
    del ckpt
    inputs = normalise_inputs(raw, modalities, available)
    del raw, nodata_masks
    net = net.to(device_for(cfg.trainer.accelerator)).eval()
    result = sliding_window_logits(
        net,
        inputs,
        available,
        window=int(cfg.window),
        overlap=float(cfg.overlap),
        blend=str(cfg.blend),
        batch_size=int(cfg.batch_size),
        num_classes=num_classes,
        return_robustness=want,
        modalities=modalities,
    )
    logits, robust = result if want else (result, None)
    diverged = ~torch.isfinite(logits).all(dim=0).cpu().numpy()  # extreme inputs can overflow inside the net
    classes = logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
    del logits
    if diverged.any():
        invalid = diverged if invalid is None else invalid | diverged
    if counts or diverged.any():
        what = [describe_invalid(counts, h * w) + ": filled with the modality's mean"] if counts else []
        if diverged.any():
            what.append(f"{int(diverged.sum())} pixel(s) gave non-finite logits (extreme input values?)")
        log.warning(
            "input values without data: %s; %d pixel(s) are marked nodata in the outputs (class %d in the class "
            "map, masked in the rasters)",
            "; ".join(what),
            int(invalid.sum()),
            NODATA_CLASS,
        )
    valid = None
    if invalid is not None:
        classes[invalid] = NODATA_CLASS
        valid = ~invalid

    staging = _Staging(out_dir)
    try:
        write_raster(staging.dir / "prediction", colourise(classes, palette), geo, valid=valid)
        if want and robust is None:
            log.warning("fusion=%s produces no robustness maps; none written", run_cfg.model.get("fusion"))
        elif want:
            rows = [i for i, a in enumerate(available) if a]
            maps = np.nan_to_num(robust[rows].cpu().numpy().astype(np.float32), nan=ROBUSTNESS_NODATA)
            if invalid is not None:
                maps[:, invalid] = ROBUSTNESS_NODATA
            write_raster(
                staging.dir / "robustness",
                maps,
                geo,
                descriptions=[m.name for m in present],
                valid=valid,
                nodata=ROBUSTNESS_NODATA if geo is not None else None,
            )
        files = staging.commit()
    except Exception as err:  # failed: the staged files go, earlier outputs stay as they were
        staging.discard()
        free = shutil.disk_usage(out_dir).free
        raise OSError(
            f"writing the outputs to output_dir={str(out_dir)!r} failed ({type(err).__name__}: {err}); "
            f"{free / 2**20:.1f} MiB free there (a full disk?). No output file was written or replaced"
        ) from err
    except BaseException:  # interrupted (Ctrl-C): same clean-up, then stop
        staging.discard()
        raise
    written = {"prediction": out_dir / planned[0]}
    if len(files) > 1:
        written["robustness"] = out_dir / planned[1]
    for what, path in written.items():
        log.info("%s written to %s", what, path)
    return {
        "pattern": pattern,
        "classes": classes,
        "files": written,
        "georeferenced": geo is not None,
        "nodata_pixels": 0 if invalid is None else int(invalid.sum()),
        "invalid_counts": counts,
    }
