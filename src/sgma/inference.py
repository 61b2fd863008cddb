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
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sgma.data.tiles import check_crop_size, grid_starts
from sgma.metrics import PatternConfusion, PatternReport, build_report
from sgma.modalities import Modality, pattern_mask

log = logging.getLogger("sgma")

BLENDS = ("mean", "gaussian")
GAUSSIAN_SIGMA = 1 / 6  # sigma of the blending window as a fraction of its side (border weight ~ 1 %)
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


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
        hint = " (a file: input must be a folder holding one raster per modality, named <modality>.tif)"
        raise FileNotFoundError(f"input={str(folder)!r} is not a folder{hint if folder.exists() else ''}")
    out = {}
    for name in names:
        found = [p for p in sorted(folder.iterdir()) if p.stem == name and p.suffix.lower() in RASTER_SUFFIXES]
        if not found:
            have = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
            raise FileNotFoundError(
                f"input folder {str(folder)!r} has no raster for modality {name!r} (expected {name}.tif, .png or "
                f".jpg); it holds {have}"
            )
        if len(found) > 1:
            raise ValueError(f"modality {name!r} has several rasters in {str(folder)!r}: {[p.name for p in found]}")
        out[name] = found[0]
    return out


def read_input_raster(path: Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(C, H, W) float32 array and the georeference ({crs, transform}) if the file has one, else None."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                array = src.read().astype(np.float32)
                geo = {"crs": src.crs, "transform": src.transform} if src.crs is not None else None
    except rasterio.errors.RasterioError as err:
        raise OSError(f"cannot read raster {str(path)!r}: {err}") from err
    return array, geo


def read_inputs(
    folder: str | Path, modalities: Sequence[Modality]
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Read one raster per modality; check band counts and that all sizes agree; keep the first georeference."""
    files = find_modality_files(folder, [m.name for m in modalities])
    arrays, geo, sizes = {}, None, {}
    for m in modalities:
        array, g = read_input_raster(files[m.name])
        if array.shape[0] != m.channels:
            raise ValueError(
                f"{str(files[m.name])!r} has {array.shape[0]} band(s) but modality {m.name!r} has {m.channels}"
            )
        arrays[m.name] = array
        sizes[files[m.name].name] = tuple(array.shape[1:])
        geo = geo or g
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n}: {h}x{w}" for n, (h, w) in sizes.items())
        raise ValueError(f"input rasters have different sizes ({listed}); every modality must cover the same grid")
    return arrays, geo


def colourise(classes: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class ids -> (3, H, W) uint8 colours (RGB)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return np.ascontiguousarray(lut[classes].transpose(2, 0, 1))


def write_raster(
    path: Path, array: np.ndarray, geo: dict[str, Any] | None, *, descriptions: Sequence[str] | None = None
) -> Path:
    """(C, H, W) -> GeoTIFF with ``geo``'s CRS/transform (``path`` gets .tif), or PNG(s) without ``geo``.

    PNG: 3 bands -> one RGB PNG; other band counts -> one 8-bit greyscale PNG per band (float arrays are
    taken as values in [0, 1]), named ``<stem>_<description>.png``. Returns the (first) written path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
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
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(array)
            for i, d in enumerate(descriptions or ()):
                dst.set_band_description(i + 1, d)
        return out
    from PIL import Image

    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array.astype(np.float32)), 0, 1) * 255 + 0.5).astype(np.uint8)
    if array.shape[0] == 3 and not descriptions:
        out = path.with_suffix(".png")
        Image.fromarray(array.transpose(1, 2, 0), "RGB").save(out)
        return out
    written = []
    for i in range(array.shape[0]):
        label = descriptions[i] if descriptions else str(i + 1)
        out = path.with_name(f"{path.stem}_{label}.png")
        Image.fromarray(array[i], "L").save(out)
        written.append(out)
    return written[0]


# --------------------------------------------------------------------------------------------- predict
def predict(cfg: Any) -> dict[str, Any]:
    """``predict.py``: label map (and optional robustness maps) of one input folder under one pattern.

    ``cfg.input`` is a folder with one raster per modality of ``cfg.pattern``, named ``<modality>.tif``
    (or .png / .jpg). Outputs go to ``cfg.output_dir`` (default: the run folder): ``prediction.tif`` (RGB
    palette colours, the input's CRS/transform) when an input is georeferenced, else ``prediction.png``;
    with ``robustness=true`` also ``robustness.tif`` (float32, one band per available modality) or
    ``robustness_<modality>.png`` (8-bit, 255 = 1.0).
    """
    from omegaconf import OmegaConf, open_dict

    from sgma.modalities import canonical_pattern, format_pattern
    from sgma.tasks import CHECKPOINT_KEY, _device, build_datamodule, build_module, load_checkpoint
    from sgma.utils import instantiate

    if not cfg.get("input"):
        raise ValueError("predict needs input=FOLDER holding one raster per modality (<modality>.tif, .png, .jpg)")
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
        net = instantiate(run_cfg.model, modalities=modalities, num_classes=len(facts["classes"]))
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
        num_classes, palette = len(facts["classes"]), [tuple(c) for c in facts["palette"]]
    else:  # checkpoints written before the facts were stored: read them from the training dataset
        log.info("checkpoint has no dataset facts; reading normalisation and palette from the training dataset")
        dm = build_datamodule(run_cfg)
        module = build_module(run_cfg, dm)
        module.load_state_dict(ckpt["state_dict"])
        net, num_classes, palette = module.net, dm.num_classes, dm.palette
    modalities = list(net.modalities)
    names = [m.name for m in modalities]
    spec = cfg.get("pattern") or format_pattern(names)
    try:
        pattern = canonical_pattern(spec, modalities)
    except ValueError as err:
        raise ValueError(f"pattern={spec!r} does not fit this model (modalities {', '.join(names)}): {err}") from err
    available = pattern_mask(pattern, modalities)
    present = [m for m, a in zip(modalities, available, strict=True) if a]
    raw, geo = read_inputs(cfg.input, present)
    inputs = normalise_inputs(raw, modalities, available)
    del raw
    net = net.to(_device(cfg.trainer.accelerator)).eval()
    want = bool(cfg.get("robustness", False))
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
    classes = logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
    del logits
    out_dir = Path(cfg.output_dir).expanduser()
    written = {"prediction": write_raster(out_dir / "prediction", colourise(classes, palette), geo)}
    if cfg.get("robustness"):
        if robust is None:
            log.warning("fusion=%s produces no robustness maps; none written", run_cfg.model.get("fusion"))
        else:
            rows = [i for i, a in enumerate(available) if a]
            maps = robust[rows].cpu().numpy().astype(np.float32)
            written["robustness"] = write_raster(
                out_dir / "robustness", maps, geo, descriptions=[m.name for m in present]
            )
    for what, path in written.items():
        log.info("%s written to %s", what, path)
    return {"pattern": pattern, "classes": classes, "files": written, "georeferenced": geo is not None}
