"""Whole-tile inference: sliding-window prediction with blended overlaps, and reading/writing rasters.

:func:`sliding_window_logits` predicts a tile of any size with a model trained on fixed-size crops: windows
of side ``window`` cover the whole tile (the last one aligned to the border, tiles smaller than a window
are zero-padded and cropped back), run in batches, and their logits are blended into float32 accumulators
of size K x H x W with per-pixel weights (``mean``: uniform; ``gaussian``: a separable Gaussian that
down-weights window borders, where the receptive field is cut). Only one batch of window logits is ever held
at once, so a 6000 x 6000 tile with K = 6 needs ~860 MB of accumulators plus one batch.

Inputs follow :class:`~sgma.data.datamodule.IncompleteModalityDataset`: ``(x - mean) / std`` per channel
and zeros for a missing modality (:func:`normalise_inputs`).

Also here: :func:`evaluate_full_tiles` (``eval.py eval.full_tile=true``; under torch.distributed the tiles are shared
out across the ranks) and the raster I/O of ``predict.py``.

``predict.py`` reads one scene (``<input>/<modality>.tif``) or a folder of scenes (``<input>/<modality>/<stem>.tif``,
e.g. DFC2023's released val/test), applies the training dataset's raw-value transforms stored in the checkpoint
(:mod:`sgma.data.preprocess`, e.g. linear SAR -> dB) to each raster as read, and writes each scene's outputs
(into ``<output_dir>/<stem>/`` for a folder of scenes).

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
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sgma.builders import build_datamodule, build_module, device_for
from sgma.checkpoint import CHECKPOINT_KEY, load_checkpoint, rebuilding_from
from sgma.data.preprocess import TRANSFORMS, apply_input_transform
from sgma.data.sharding import distributed_rank_and_size, sum_over_ranks
from sgma.data.tiles import check_crop_size, grid_starts
from sgma.metrics import PatternConfusion, PatternReport, build_report
from sgma.modalities import Modality, pattern_mask
from sgma.recovery import fsync_dir
from sgma.utils import add_note, instantiate

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
    progress: Callable[[int], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Blended (K, H, W) float32 logits of a whole tile (on the inputs' device, CPU for numpy-born inputs).

    ``inputs`` maps modality name -> normalised (C, H, W) tensor; missing modalities may be absent (zeros
    are fed). ``available`` is the (M,) availability mask in the net's modality order. With
    ``return_robustness`` also returns the (M, H, W) robustness map (per-scale maps upsampled bilinearly to
    the window, averaged over scales, blended like the logits), or None when the fusion has no maps.
    ``progress(n)`` is called after each batch with the number of windows it held.
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
        if progress is not None:
            progress(len(chunk))
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


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class TileProgress:
    """Progress of one rank's share of a whole-tile evaluation, as log lines of the ``sgma`` logger (cluster jobs
    write to files, where a progress bar is noise): one line per finished tile, and within a tile one line at most
    every ``every_s`` seconds with the windows done; each with the time so far and an ETA for this rank. Prefixed
    with ``[rank r/W]`` under DDP."""

    def __init__(
        self,
        windows: Mapping[str, int],
        num_patterns: int,
        *,
        split: str,
        every_s: float,
        rank: int = 0,
        world_size: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.windows = dict(windows)  # this rank's tiles -> windows per pattern
        self.num_patterns = num_patterns
        self.total = sum(self.windows.values()) * num_patterns
        self.split = split
        self.every_s = float(every_s)
        self.prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0  # windows scored by this rank, every pattern counted
        self.tile: str | None = None
        self.tiles_done = 0
        self.in_tile = 0

    def _timing(self) -> str:
        elapsed = self.clock() - self.start
        eta = _duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        share = 100 * self.done / self.total if self.total else 100.0
        return f"{share:.0f} % of this rank's windows, {_duration(elapsed)} elapsed, ETA {eta}"

    def begin(self, tile: str) -> None:
        self.tile, self.in_tile = tile, 0

    def advance(self, n: int) -> None:
        """``n`` more windows of the current tile scored (a :func:`sliding_window_logits` progress callback)."""
        self.done += n
        self.in_tile += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            per_tile = self.windows[self.tile] * self.num_patterns
            log.info(
                "%sfull-tile %s: tile %s (%d/%d): %d/%d windows (%d patterns); %s",
                self.prefix,
                self.split,
                self.tile,
                self.tiles_done + 1,
                len(self.windows),
                self.in_tile,
                per_tile,
                self.num_patterns,
                self._timing(),
            )

    def end(self) -> None:
        self.tiles_done += 1
        self.last = self.clock()
        log.info(
            "%sfull-tile %s: tile %s done (%d/%d tiles of this rank); %s",
            self.prefix,
            self.split,
            self.tile,
            self.tiles_done,
            len(self.windows),
            self._timing(),
        )


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
    progress_every_s: float = 60.0,
) -> PatternReport:
    """Score every pattern on every whole tile of ``base``'s split (each tile read and normalised once).

    Under torch.distributed (``eval.py`` with ``trainer.devices`` > 1, or under ``srun``) rank r scores tiles r,
    r + W, r + 2W, ... of the W ranks (round-robin by tile index), and the per-pattern confusion matrices and
    sample counts are summed with one all_reduce at the end: every rank returns the report of all tiles, equal to
    the one-process report (integer counts). Ranks may hold different numbers of tiles, or none; that all_reduce is
    the only collective, and every rank reaches it, also when its own tiles failed (it then raises after it, with
    its error, and the others say which ranks failed), so an error never leaves the others waiting.
    """
    window = _check_options(window, overlap, blend, batch_size)
    modalities = list(net.modalities)
    rank, world = distributed_rank_and_size()
    confusion = PatternConfusion(
        num_patterns=len(all_patterns), num_classes=len(class_names), ignore_index=ignore_index
    )
    tiles = list(base.tiles)
    mine = tiles[rank::world]
    failure: Exception | None = None
    try:
        sizes = {tile: base.cache.array(tile, modalities[0].name).shape[-2:] for tile in mine}
        windows = {
            t: len(window_starts(h, window, overlap)) * len(window_starts(w, window, overlap))
            for t, (h, w) in sizes.items()
        }
        progress = TileProgress(
            windows, len(patterns), split=split, every_s=progress_every_s, rank=rank, world_size=world
        )
        if not mine:
            log.info(
                "%sfull-tile %s: no tile for this rank (%d tiles, %d ranks)", progress.prefix, split, len(tiles), world
            )
        for tile in mine:
            progress.begin(tile)
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
                    progress=progress.advance,
                )
                pid = torch.tensor([list(all_patterns).index(pattern)])
                confusion.update(logits.argmax(dim=0)[None], target, pid)
                del logits
            progress.end()
            del inputs, target
    except Exception as err:  # re-raised below, once every rank has reached the reduction
        if world == 1:
            raise
        failure = err
    # the local sums, not confusion.compute(): torchmetrics would sync them itself, with one gather per state
    failed = torch.tensor([int(failure is not None)])
    confmat, samples, failed = sum_over_ranks(confusion.confmat, confusion.samples, failed)
    if failure is not None:
        add_note(failure, f"(raised on rank {rank} of {world} during the whole-tile evaluation)")
        raise failure
    if int(failed):
        raise RuntimeError(
            f"{int(failed)} of {world} ranks failed during the whole-tile evaluation of the {split} split: their logs "
            "hold the error"
        )
    return build_report(
        confmat,
        samples,
        all_patterns=list(all_patterns),
        class_names=list(class_names),
        exclude_classes=list(exclude_classes),
        missing_probs=list(missing_probs),
    )


# ------------------------------------------------------------------------------------------ raster I/O
LAYOUTS = (
    "one scene: <input>/<modality>.tif (or .tiff / .png / .jpg), e.g. in/rgb.tif + in/dsm.tif; many scenes: "
    "<input>/<modality>/<stem>.tif with the same stems in every modality folder, e.g. val/rgb/P_0000.tif + "
    "val/sar/P_0000.tif"
)


def _shortlist(items: Sequence[str], k: int = 5) -> str:
    """``a, b, c and 12 more``: messages about a folder of 600 scenes stay readable."""
    items = list(items)
    shown = ", ".join(items[:k])
    return shown if len(items) <= k else f"{shown} and {len(items) - k} more"


def _list_folder(folder: Path) -> list[Path]:
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"input={str(folder)!r} is a file: input must be a folder ({LAYOUTS})")
        raise FileNotFoundError(f"input={str(folder)!r} does not exist: point input= at a folder of rasters")
    try:
        return sorted(folder.iterdir())
    except PermissionError:
        raise PermissionError(f"input={str(folder)!r} is not readable (permission denied)") from None


def find_modality_files(folder: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """``<folder>/<name>.{tif,tiff,png,jpg,jpeg}`` for each name; errors name what is missing or ambiguous."""
    folder = Path(folder).expanduser()
    entries = _list_folder(folder)
    out = {}
    for name in names:
        found = [p for p in entries if p.stem == name and p.suffix.lower() in RASTER_SUFFIXES]
        if not found:
            have = sorted(p.name for p in entries if p.suffix.lower() in RASTER_SUFFIXES)
            other_formats = sorted(p.name for p in entries if p.stem == name and not p.is_dir())
            hint = (
                f"; {other_formats} is in a format predict does not read: convert it (e.g. gdal_translate -of GTiff "
                f"{other_formats[0]} {name}.tif)"
                if other_formats
                else ""
            )
            raise FileNotFoundError(
                f"input folder {str(folder)!r} has no raster for modality {name!r} (expected {name}.tif, .png or "
                f".jpg); it holds {have}{hint}"
            )
        if len(found) > 1:
            raise ValueError(f"modality {name!r} has several rasters in {str(folder)!r}: {[p.name for p in found]}")
        out[name] = found[0]
    return out


def _rasters_by_stem(folder: Path) -> dict[str, Path]:
    """The rasters of one modality folder by stem. Hidden files, folders and a raster's companions (``a.tif.aux.xml``,
    ``a.tfw``) are skipped quietly; anything else that is not a raster is named in a warning, since a scene
    saved in another format (``a.webp``) would otherwise just be missing from the outputs."""
    by_stem: dict[str, Path] = {}
    others = []
    for p in _list_folder(folder):
        if p.name.startswith("."):
            continue
        if p.suffix.lower() not in RASTER_SUFFIXES:
            if not p.is_dir():
                others.append(p.name)
            continue
        if p.stem in by_stem:
            raise ValueError(
                f"{str(folder)!r} has several rasters for scene {p.stem!r} ({by_stem[p.stem].name}, {p.name}): keep one"
            )
        by_stem[p.stem] = p
    # a companion's name is a raster's stem + "." + more (stems may hold dots: SV_Copenhagen_55.6770_12.5319)
    ignored = [name for name in others if not any(name[:i] in by_stem for i, c in enumerate(name) if c == ".")]
    if ignored:
        log.warning(
            "%s/ has %d file(s) that are not in a raster format predict reads, ignored: %s. Supported: %s; convert "
            "the others to predict them (e.g. gdal_translate -of GTiff %s %s.tif)",
            folder.name,
            len(ignored),
            _shortlist(ignored),
            ", ".join(RASTER_SUFFIXES),
            ignored[0],
            Path(ignored[0]).stem,
        )
    return by_stem


def find_scenes(folder: str | Path, names: Sequence[str]) -> dict[str | None, dict[str, Path]]:
    """The scenes under ``input=``, each as modality name -> raster path, in one of two layouts.

    ``<folder>/<modality>.tif``: one scene, returned as ``{None: files}``. ``<folder>/<modality>/<stem>.tif``
    (DFC2023's ``val/rgb/P_0000.tif``, the folder dataset's tree): ``{stem: files}`` for every stem of the
    first modality's folder, in sorted order. Every other modality needs a raster with the same stem (any
    raster suffix); all missing ones are reported together, before anything is read. Other entries
    (``labels/``, ``dataset.yaml``, folders of modalities outside the pattern) are ignored.
    """
    folder = Path(folder).expanduser()
    entries = _list_folder(folder)
    rasters = [p.name for p in entries if p.stem in names and p.suffix.lower() in RASTER_SUFFIXES]
    dirs = {p.name for p in entries if p.name in names and p.is_dir()}
    if rasters and dirs:
        raise ValueError(
            f"input={str(folder)!r} holds both modality rasters ({', '.join(rasters)}) and modality folders "
            f"({', '.join(f'{n}/' for n in names if n in dirs)}): keep one of the two layouts ({LAYOUTS})"
        )
    if rasters:
        return {None: find_modality_files(folder, names)}
    if not dirs:
        held = _shortlist([p.name + ("/" if p.is_dir() else "") for p in entries], 10) or "nothing"
        raise FileNotFoundError(
            f"input={str(folder)!r} has neither rasters nor folders named after the modalities {'+'.join(names)}; "
            f"it holds {held}. Accepted layouts: {LAYOUTS}"
        )
    lacking = [n for n in names if n not in dirs]
    if lacking:
        have = [n for n in names if n in dirs]
        raise FileNotFoundError(
            f"input={str(folder)!r} has the modality folder(s) {', '.join(f'{n}/' for n in have)} but none for "
            f"{', '.join(lacking)}: add {lacking[0]}/<stem>.tif for every scene, or predict with "
            f"pattern={'+'.join(have)}"
        )
    by_modality = {n: _rasters_by_stem(folder / n) for n in names}
    first, stems = names[0], list(by_modality[names[0]])
    if not stems:
        raise FileNotFoundError(
            f"{str(folder / first)!r} holds no raster ({', '.join(RASTER_SUFFIXES)}): no scene to predict"
        )
    absent = [f"{n}/{s}.*" for n in names[1:] for s in stems if s not in by_modality[n]]
    if absent:
        raise FileNotFoundError(
            f"input={str(folder)!r}: {len(absent)} raster(s) missing for the scenes of {first}/: "
            f"{_shortlist(absent)}. Every modality folder needs a raster with each stem of {first}/ (any of "
            f"{', '.join(RASTER_SUFFIXES)}): add them, move those scenes out of {first}/, or choose a pattern "
            f"without that modality"
        )
    for n in names[1:]:
        extra = sorted(set(by_modality[n]) - set(stems))
        if extra:
            log.warning(
                "%s/ has %d raster(s) without a counterpart in %s/, not predicted: %s",
                n,
                len(extra),
                first,
                _shortlist(extra),
            )
    return {s: {n: by_modality[n][s] for n in names} for s in stems}


def _check_raster_file(path: Path, *, decode: bool = True) -> None:
    """Say what an input raster is when it is not a readable file (a folder, unreadable, empty, truncated).

    ``decode=False`` skips the full PNG/JPEG decode (the header scan of many scenes; the read does it)."""
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
    if decode and path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        # GDAL reads a truncated PNG/JPEG as zeros with no error: decode it once with Pillow, which notices
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise OSError(
                f"input raster {str(path)!r} is truncated or corrupt ({err}): was it copied or downloaded completely?"
            ) from None


def _unreadable(path: Path, err: Exception) -> OSError:
    return OSError(f"cannot read raster {str(path)!r}: it is truncated, corrupt or not a raster GDAL reads ({err})")


def raster_header(path: Path) -> tuple[int, int, int, dict[str, Any] | None]:
    """(bands, height, width, georeference ({crs, transform}) or None) from the header alone, so every scene is
    checked before any runs."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    _check_raster_file(path, decode=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                geo = {"crs": src.crs, "transform": src.transform} if src.crs is not None else None
                return src.count, src.height, src.width, geo
    except rasterio.errors.RasterioError as err:
        raise _unreadable(path, err) from err


GRID_TOLERANCE_PX = 0.01  # rasters of one grid written by different tools differ by float rounding, far less


def _describe_grid(geo: Mapping[str, Any]) -> str:
    t = geo["transform"]
    rotation = f", rotation ({t.b}, {t.d})" if t.b or t.d else ""
    return f"{geo['crs'].to_string()}, origin ({t.c}, {t.f}), pixel size ({t.a}, {t.e}){rotation}"


def _same_grid(a: Mapping[str, Any], b: Mapping[str, Any], h: int, w: int) -> bool:
    """Same CRS, and the corners of b's H x W raster land within :data:`GRID_TOLERANCE_PX` of a's (a pixel size
    error grows across a raster, so the corners are compared, not the transforms' coefficients)."""
    if a["crs"] != b["crs"]:
        return False
    to_a = ~a["transform"] * b["transform"]  # b's pixel coordinates -> a's
    return all(
        abs(x - cx) < GRID_TOLERANCE_PX and abs(y - cy) < GRID_TOLERANCE_PX
        for cx, cy in ((0, 0), (w, 0), (0, h), (w, h))
        for x, y in [to_a * (cx, cy)]
    )


def _check_grid(
    shapes: Mapping[str, tuple[Path, int, int, int, dict[str, Any] | None]], modalities: Sequence[Modality]
) -> None:
    """Band counts match the modalities, every raster covers the same H x W and the georeferenced ones share the
    first one's CRS and pixel grid (``shapes``: name -> path, C, H, W, georeference or None). Rasters without a
    georeference can only be checked by size (:func:`check_input_headers` reports them)."""
    for m in modalities:
        path, bands, *_ = shapes[m.name]
        if bands != m.channels:
            others = [n.name for n in modalities if n.name != m.name]
            drop = f", or predict without it: pattern={'+'.join(others)}" if others else ""
            raise ValueError(
                f"{str(path)!r} has {bands} band(s) but modality {m.name!r} has {m.channels}: give {m.name} as a "
                f"{m.channels}-band raster, its bands in the order of the model's training data (the checkpoint "
                f"records the count, not the band names){drop}"
            )
    if len({(h, w) for _, _, h, w, _ in shapes.values()}) > 1:
        listed = ", ".join(f"{str(p)!r}: {h}x{w}" for p, _, h, w, _ in shapes.values())
        raise ValueError(f"input rasters have different sizes ({listed}); every modality must cover the same grid")
    geos = [(p, g) for p, _, _, _, g in shapes.values() if g is not None]
    if not geos:
        return
    (ref_path, ref), (h, w) = geos[0], next(iter(shapes.values()))[2:4]
    off = [(p, g) for p, g in geos[1:] if not _same_grid(ref, g, h, w)]
    if off:
        listed = "; ".join(f"{str(p)!r}: {_describe_grid(g)}" for p, g in off)
        t = ref["transform"]
        example = ""
        if not (t.b or t.d):  # north-up: the target grid fits gdalwarp's extent + size
            from rasterio.transform import array_bounds

            west, south, east, north = array_bounds(h, w, t)
            example = (
                f", e.g. gdalwarp -t_srs {ref['crs'].to_string()} -te {west} {south} {east} {north} -ts {w} {h} "
                f"-r bilinear {off[0][0].name} aligned.tif, then put aligned.tif in place of {off[0][0].name}"
            )
        raise ValueError(
            f"input rasters are not on one grid, so their pixels would be fused at different places: "
            f"{str(ref_path)!r} (the first georeferenced one, whose georeference the outputs take) has "
            f"{_describe_grid(ref)}, but {listed}. Reproject/resample them onto {ref_path.name}'s grid{example}"
        )


def check_input_headers(files: Mapping[str, Path], modalities: Sequence[Modality]) -> tuple[bool, list[Path]]:
    """Check one scene's band counts, sizes and grids from the headers. Returns whether any of its rasters is
    georeferenced and, if so, those that are not: nothing but their size says they are on the same grid."""
    shapes = {}
    for m in modalities:
        bands, h, w, geo = raster_header(files[m.name])
        shapes[m.name] = (files[m.name], bands, h, w, geo)
    _check_grid(shapes, modalities)
    plain = [p for p, *_, geo in shapes.values() if geo is None]
    georeferenced = len(plain) < len(shapes)
    return georeferenced, plain if georeferenced else []


def read_input_raster(path: Path) -> tuple[np.ndarray, dict[str, Any] | None, np.ndarray | None, float | None]:
    """(C, H, W) float32 array, the georeference ({crs, transform}) or None, the nodata mask or None, and the
    declared nodata value (the first band's that is a number) or None.

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
        raise _unreadable(path, err) from err
    declared = [v for v in nodata if v is not None and not np.isnan(v)]
    mask = None
    if declared:
        mask = np.zeros(array.shape, dtype=bool)
        for band, value in enumerate(nodata):
            if value is not None and not np.isnan(value):
                mask[band] = array[band] == np.asarray(value).astype(array.dtype)
    with np.errstate(over="ignore"):  # a float64 value beyond float32's range becomes inf: counted as such
        return array.astype(np.float32), geo, mask, (float(declared[0]) if declared else None)


def transform_input(array: np.ndarray, spec: Mapping[str, Any] | None, *, nodata: float | None = None) -> np.ndarray:
    """The training dataset's raw-value transform (:mod:`sgma.data.preprocess`; None: identity).

    NaN and inf keep their raw value, so :func:`fill_invalid` still counts them and marks them nodata (the
    transforms would turn inf into a clipped value, and heights_above_ground NaN into 0 m)."""
    if not spec:
        return array
    out = apply_input_transform(array, spec, nodata=nodata)
    return np.where(np.isfinite(array), out, array).astype(np.float32, copy=False)


def read_inputs(
    files: Mapping[str, Path],
    modalities: Sequence[Modality],
    transforms: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, dict[str, np.ndarray | None]]:
    """Read one scene (modality name -> raster), check band counts and sizes, apply ``transforms``.

    Returns the float32 arrays (transformed as the training dataset did: ``transforms`` maps a modality to a
    :func:`~sgma.data.preprocess.apply_input_transform` spec), the first georeference and each modality's
    nodata mask (see :func:`read_input_raster`; computed on the raw values, so it stays valid).
    """
    arrays, geo, masks, nodata, shapes = {}, None, {}, {}, {}
    for m in modalities:
        array, g, masks[m.name], nodata[m.name] = read_input_raster(files[m.name])
        arrays[m.name] = array
        shapes[m.name] = (files[m.name], *array.shape, g)
        geo = geo or g
    _check_grid(shapes, modalities)
    for m in modalities:
        arrays[m.name] = transform_input(arrays[m.name], (transforms or {}).get(m.name), nodata=nodata[m.name])
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
    """Refuse to replace earlier outputs unless ``overwrite``; a folder in an output's place is always an error.

    ``names`` are relative to ``out`` (``P_0000/prediction.tif`` in batch mode: a file in a scene folder's
    place is an error too)."""
    scene_dirs = sorted({str(Path(n).parent) for n in names} - {"."})
    blocked = [d for d in scene_dirs if (out / d).exists() and not (out / d).is_dir()]
    if blocked:
        raise NotADirectoryError(
            f"output_dir={str(out)!r} has file(s) where scene folders go: {_shortlist(blocked)}: move them or "
            f"choose another output_dir=DIR"
        )
    folders = [n for n in names if (out / n).is_dir()]
    if folders:
        raise IsADirectoryError(f"output_dir={str(out)!r} has folder(s) named like outputs: {_shortlist(folders)}")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output_dir={str(out)!r} already holds {_shortlist(existing)} (an earlier prediction?): pass "
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
    """``predict.py``: label maps (and optional robustness maps) of one scene or a folder of scenes.

    ``cfg.input`` is a folder in one of two layouts (:func:`find_scenes`):

    - one scene: one raster per modality of ``cfg.pattern``, named ``<modality>.tif`` (or .png / .jpg);
      outputs go to ``cfg.output_dir`` (default: the run folder);
    - many scenes: one folder per modality, ``<modality>/<stem>.tif`` (DFC2023's released ``val/`` and
      ``test/``, the folder dataset's tree): every stem of the first modality's folder is predicted into
      ``<output_dir>/<stem>/``. All scenes are found, their headers checked (bands, sizes, grids) and every output
      name checked for collisions before the model is loaded (once); a failing scene stops the run with an
      error naming the scenes already written.

    Per scene: ``prediction.tif`` (RGB palette colours, the input's CRS/transform) when an input is
    georeferenced, else ``prediction.png``; with ``robustness=true`` also ``robustness.tif`` (float32, one
    band per available modality) or ``robustness_<modality>.png`` (8-bit, 255 = 1.0). The training dataset's
    raw-value transforms stored in the checkpoint (``input_transforms``, e.g. DFC2023's linear SAR -> dB) are
    applied to each raster right after reading it. Input pixels with NaN, inf or the raster's nodata value
    are then filled, counted in a warning and marked nodata in every output (255 in ``classes``). Existing
    outputs are replaced only with ``overwrite=true``; each scene's files appear whole (staged, then renamed).

    Returns, for one scene, ``{"pattern", "classes", "files", "georeferenced", "nodata_pixels",
    "invalid_counts"}``; for many, ``{"pattern", "scenes": {stem: the same dict without "classes"}}`` (a
    class map per scene would keep every scene in memory: read ``prediction.*`` instead).
    """
    from omegaconf import OmegaConf, open_dict

    from sgma.modalities import canonical_pattern, format_pattern
    from sgma.wandb_media import log_predictions, wandb_logger_node

    if not cfg.get("input"):
        raise ValueError(f"predict needs input=FOLDER in one of two layouts: {LAYOUTS}")
    wandb_node = wandb_logger_node(cfg, "predict.py")  # logger=wandb: checked before anything slow
    out_dir = check_output_dir(cfg.output_dir)  # before anything slow
    overwrite = bool(cfg.get("overwrite", False))
    ckpt = load_checkpoint(cfg.get("ckpt_path"))
    run_cfg = OmegaConf.create(ckpt[CHECKPOINT_KEY]["config"])
    with open_dict(run_cfg):
        if cfg.get("data_root"):
            run_cfg.dataset.builder.root = str(cfg.data_root)
    facts = ckpt[CHECKPOINT_KEY].get("dataset")
    if facts:  # the checkpoint carries the normalisation, classes, palette and transforms: no training data needed
        modalities = [
            # kind/value_max: absent in checkpoints written before they were stored (inference does not use them)
            Modality(
                m["name"], m["channels"], tuple(m["mean"]), tuple(m["std"]), m.get("kind", "other"), m.get("value_max")
            )
            for m in facts["modalities"]
        ]
        num_classes, palette = len(facts["classes"]), [tuple(c) for c in facts["palette"]]
        transforms = facts.get("input_transforms") or {}  # absent in checkpoints written before it was stored
    else:  # checkpoints written before the facts were stored: read them from the training dataset
        log.info("checkpoint has no dataset facts; reading normalisation and palette from the training dataset")
        dm = build_datamodule(run_cfg)
        modalities, num_classes, palette = list(dm.modalities), dm.num_classes, dm.palette
        transforms = getattr(dm.dataset("train").base, "input_transforms", None) or {}
    names = [m.name for m in modalities]
    spec = cfg.get("pattern") or format_pattern(names)
    try:
        pattern = canonical_pattern(spec, modalities)
    except ValueError as err:
        raise ValueError(f"pattern={spec!r} does not fit this model (modalities {', '.join(names)}): {err}") from err
    available = pattern_mask(pattern, modalities)
    present = [m for m, a in zip(modalities, available, strict=True) if a]
    transforms = _transforms_for(transforms, present)
    want = bool(cfg.get("robustness", False))

    # every check on the inputs and outputs comes before the model is built and run
    scenes = find_scenes(cfg.input, [m.name for m in present])
    batch = None not in scenes
    if batch:
        log.info("input=%s: %d scene(s) in %s/ (%s)", cfg.input, len(scenes), present[0].name, _shortlist(list(scenes)))
    robust_names = [m.name for m in present] if want else None
    headers = {s: check_input_headers(files, present) for s, files in scenes.items()}
    planned = {s: output_names(georeferenced, robust_names) for s, (georeferenced, _) in headers.items()}
    unchecked = [str(p) for _, plain in headers.values() for p in plain]
    if unchecked:  # legitimate (ISPRS Potsdam's nDSMs are JPEGs beside GeoTIFFs), but only their size is checked
        log.warning(
            "%d input raster(s) have no georeference while others of their scene have one: %s. Only their size is "
            "checked, so they are fused as if on the georeferenced rasters' grid, which the outputs take; if they "
            "are not, reproject them onto it (e.g. gdalwarp) or give them their georeference (save them as GeoTIFFs)",
            len(unchecked),
            _shortlist(unchecked),
        )
    check_no_outputs(
        out_dir, [f"{s}/{n}" if batch else n for s, ns in planned.items() for n in ns], overwrite=overwrite
    )
    stems = list(scenes)
    first = _read_scene(scenes[stems[0]], present, transforms)  # the first scene's values fail before the model

    with rebuilding_from(ckpt, str(cfg.ckpt_path)):
        if facts:
            net = instantiate(run_cfg.model, modalities=modalities, num_classes=num_classes)
            state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
            net.load_state_dict(state)
        else:
            module = build_module(run_cfg, dm)
            module.load_state_dict(ckpt["state_dict"])
            net = module.net
    del ckpt
    net = net.to(device_for(cfg.trainer.accelerator)).eval()
    run = {
        "net": net,
        "modalities": modalities,
        "available": available,
        "present": present,
        "num_classes": num_classes,
        "palette": palette,
        "want": want,
        "fusion": run_cfg.model.get("fusion"),
        "window": {
            "window": int(cfg.window),
            "overlap": float(cfg.overlap),
            "blend": str(cfg.blend),
            "batch_size": int(cfg.batch_size),
        },
    }
    if not batch:
        result = {"pattern": pattern, **_predict_scene(first, out_dir, planned[None], **run)}
        log_predictions(wandb_node, cfg, run_cfg=run_cfg, result=result)
        return result

    results: dict[str, dict[str, Any]] = {}
    for i, stem in enumerate(stems):
        log.info("scene %d/%d: %s", i + 1, len(stems), stem)
        scene_dir, created = out_dir / stem, not (out_dir / stem).exists()
        try:
            scene = first if i == 0 else _read_scene(scenes[stem], present, transforms)
            first = None  # a scene's arrays are freed once it is written
            scene_dir.mkdir(exist_ok=True)
            result = _predict_scene(scene, scene_dir, planned[stem], label=f"{stem}: ", **run)
        except BaseException as err:
            if created and scene_dir.is_dir() and not any(scene_dir.iterdir()):
                scene_dir.rmdir()  # no empty folder that looks like a scene
            message = _batch_failure(err, out_dir, stems, i)
            if not isinstance(err, Exception):  # interrupted (Ctrl-C): say what is on disk, then stop
                log.error("%s", message)
                raise
            raise RuntimeError(message) from err
        result.pop("classes")
        results[stem] = result
    log.info("%d scene(s) predicted into %s", len(stems), out_dir / "<stem>")
    log_predictions(wandb_node, cfg, run_cfg=run_cfg, result={"pattern": pattern, "scenes": results})
    return {"pattern": pattern, "scenes": results}


def _transforms_for(transforms: Mapping[str, Any], present: Sequence[Modality]) -> dict[str, dict[str, Any]]:
    """The present modalities' input transforms, names checked before any file is read; logged once."""
    out = {m.name: dict(transforms[m.name]) for m in present if transforms.get(m.name)}
    for name, spec in out.items():
        if spec.get("name") not in TRANSFORMS:
            raise ValueError(
                f"unknown input transform {spec.get('name')!r} for modality {name!r} in the checkpoint's dataset "
                f"facts; this sgma knows {', '.join(TRANSFORMS)} (was the checkpoint written by a newer version?)"
            )
    if out:
        described = "; ".join(
            f"{name}: {spec['name']}({', '.join(f'{k}={v}' for k, v in spec.items() if k != 'name')})"
            for name, spec in out.items()
        )
        log.info("raw input values are transformed as in training: %s", described)
    return out


# a scene whose mean lies this many training standard deviations from the training mean is on another scale (bit
# depth, digital numbers vs reflectance, absolute DSM vs nDSM), not just an unusual scene
SCALE_WARNING_STDS = 8.0


def warn_on_value_scale(raw: Mapping[str, np.ndarray], present: Sequence[Modality], files: Mapping[str, Path]) -> None:
    """Warn about each modality whose values (after the stored transforms; invalid pixels already filled with
    the training mean) are far off the training data's per-channel mean and std."""
    for m in present:
        x = raw[m.name]
        means = x.reshape(x.shape[0], -1).mean(axis=1, dtype=np.float64)
        stds = [abs(mu - m.mean[c]) / m.std[c] for c, mu in enumerate(means)]
        if max(stds) > SCALE_WARNING_STDS:
            log.warning(
                "input %s (%s): mean value per band %s, where the training data's is %s with std %s (%.0f standard "
                "deviations off). Is it on the training data's scale (bit depth, reflectance vs digital numbers, "
                "absolute DSM vs nDSM)? Rescale it to that scale, or the prediction is unreliable",
                m.name,
                files[m.name],
                [round(float(v), 3) for v in means],
                [round(v, 3) for v in m.mean],
                [round(v, 3) for v in m.std],
                max(stds),
            )


def _read_scene(
    files: Mapping[str, Path], present: Sequence[Modality], transforms: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """One scene's inputs, transformed, with NaN / inf / nodata filled; a modality with no valid pixel is refused,
    one on another value scale than the training data's warned about."""
    raw, geo, nodata_masks = read_inputs(files, present, transforms)
    raw, invalid, counts = fill_invalid(raw, present, nodata_masks)
    warn_on_value_scale(raw, present, files)
    h, w = next(iter(raw.values())).shape[-2:]
    for name, c in counts.items():
        if c["pixels"] == h * w:
            others = [m.name for m in present if m.name != name]
            fix = f"pattern={'+'.join(others)}" if others else "another input"
            raise ValueError(
                f"input modality {name!r} has no valid pixel (all NaN, inf or no-data) in {str(files[name])!r}: "
                f"predict with {fix}"
            )
    return {"raw": raw, "geo": geo, "invalid": invalid, "counts": counts, "size": (h, w)}


def _predict_scene(
    scene: dict[str, Any],
    out_dir: Path,
    planned: Sequence[str],
    *,
    net: torch.nn.Module,
    modalities: Sequence[Modality],
    available: Sequence[bool],
    present: Sequence[Modality],
    num_classes: int,
    palette: Sequence[Sequence[int]],
    want: bool,
    fusion: Any,
    window: Mapping[str, Any],
    label: str = "",
) -> dict[str, Any]:
    """Predict one read scene and write its outputs into ``out_dir`` (staged, then renamed into place)."""
    h, w = scene["size"]
    geo, invalid, counts = scene["geo"], scene["invalid"], scene["counts"]
    inputs = normalise_inputs(scene.pop("raw"), modalities, available)
    result = sliding_window_logits(
        net,
        inputs,
        available,
        **window,
        num_classes=num_classes,
        return_robustness=want,
        modalities=modalities,
    )
    del inputs
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
            "%sinput values without data: %s; %d pixel(s) are marked nodata in the outputs (class %d in the class "
            "map, masked in the rasters)",
            label,
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
            log.warning("fusion=%s produces no robustness maps; none written", fusion)
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
            f"writing the outputs to {str(out_dir)!r} failed ({type(err).__name__}: {err}); "
            f"{free / 2**20:.1f} MiB free there (a full disk?). No output file was written or replaced"
        ) from err
    except BaseException:  # interrupted (Ctrl-C): same clean-up, then stop
        staging.discard()
        raise
    written = {"prediction": out_dir / planned[0]}
    if len(files) > 1:
        written["robustness"] = out_dir / planned[1]
    for what, path in written.items():
        log.info("%s%s written to %s", label, what, path)
    return {
        "classes": classes,
        "files": written,
        "georeferenced": geo is not None,
        "nodata_pixels": 0 if invalid is None else int(invalid.sum()),
        "invalid_counts": counts,
    }


def _batch_failure(err: BaseException, out_dir: Path, stems: Sequence[str], k: int) -> str:
    """What is on disk after scene ``k`` failed: the scenes written whole, the failed one, the rest."""
    done, rest = stems[:k], stems[k + 1 :]
    written = (
        f"{len(done)} scene(s) were written completely, each in {str(out_dir)!r}/<stem>/: {_shortlist(done)}"
        if done
        else "no scene was written"
    )
    reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return (
        f"scene {k + 1}/{len(stems)} {stems[k]!r} failed ({reason}). {written}; {stems[k]!r} has no new or partial "
        f"output (earlier files there are unchanged); not predicted: {len(rest)} scene(s)"
        + (f" ({_shortlist(rest)})" if rest else "")
        + ". Fix the cause and rerun (overwrite=true replaces the scenes already written)"
    )
