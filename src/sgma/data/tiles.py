"""Prepared tile cache and crop samplers for datasets made of a few very large tiles (ISPRS: 6000² px).

Why a cache: decoding a 6000 x 6000 GeoTIFF/JPEG per training sample is far too slow and reading whole
tiles per item is a known anti-pattern. Each tile is decoded ONCE (colour labels -> class ids, nDSM padded,
DSM no-data zeroed) into one ``.npy`` per tile and key, which training then memory-maps
(``np.load(mmap_mode="r")``) so a random crop reads only its own rows.

Cache layout (``<root>/.sgma_cache/<dataset>-v<CACHE_VERSION>/`` unless ``cache_dir`` is given)::

    manifest.json            # written last: a folder without it is never a cache
    <tile>/<key>.npy         # uint8 for images and labels (class ids, 255 = ignore), float16 for heights

``manifest.json`` holds the format version, the options that change the cache's content, every source
file's path (relative to the data root), size, mtime and ctime, the per-split tile lists (after defects have
dropped tiles), per-tile shapes and label statistics, tiles that were skipped (and why), and the per-modality
mean/std measured on the TRAIN tiles only (the "compute stats" step; the datasets turn them into
:class:`~sgma.modalities.Modality`).
A cache whose version, options or sources differ, or one whose arrays do not match the manifest (a
missing or truncated ``.npy``, another shape or dtype), is rebuilt from scratch and the reason is logged:
caches are never mixed or patched.

Preparation is atomic and happens once, whoever asks:

* everything is written into a temporary sibling folder (``.<name>.tmp-<pid>-<random>``) that replaces the
  cache with ``os.replace`` at the end; a failure removes it and re-raises naming the tile;
* it runs under a file lock next to the cache (``.<name>.lock``, :mod:`filelock`), so concurrent processes
  and DDP ranks prepare once: the others wait, then open the finished cache. The lock is an OS lock
  (``flock``): a killed process releases it, so a crash never leaves the cache locked;
* a preparation killed outright (SIGKILL, OOM, power loss) leaves its temporary folder behind; such
  orphans are removed, and the removal logged, by the next process that holds the lock (never while
  another process prepares: it would hold the lock);
* folders and files are created with the process's umask (``0o755`` / ``0o644`` under the usual ``022``),
  so a cache prepared in a shared data root is readable by the group as the user's umask intends.

Manifest only (``TileCache(..., store_arrays=False)``, a dataset's ``cache: false``): for datasets whose full
cache would not fit on disk (DELIVER: about 13 bytes per pixel, some 110 GB). Preparation is the same (once,
atomic, under the lock) and decodes every tile once for its shape, its info and the train statistics, but
writes only ``manifest.json`` (marked ``"arrays_stored": false``, so it never passes for a full cache or the
reverse); :meth:`TileCache.array` then decodes the tile from its source files with the dataset's load
function, keeping the last decoded tile per process so the keys of one sample decode it once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sgma")

CACHE_VERSION = 3  # 2: heights clipped to HEIGHT_RANGE, statistics leave no-data and outliers out; 3: ctime, root
MANIFEST = "manifest.json"
CROP_MULTIPLE = 32  # encoders downsample by 32: input sides must be multiples of it
STORAGE_DTYPES = (np.uint8, np.float16)
# Heights (nDSM, DSM relative to a ground level) outside this range (metres) are not measurements but
# sensor or processing failures (no-data markers such as 1e30 or -3.4e38 that the file does not declare):
# the tallest building is 828 m and the deepest urban excavations a few tens of metres below the ground.
HEIGHT_RANGE = (-100.0, 1000.0)
NODATA_BELOW = -1000.0  # heights below this are no-data markers (-9999, -32768, -3.4e38) whatever the file declares
FLOAT16_LIMIT = 65000.0  # the float16 storage saturates at 65504


class TilePreparationError(RuntimeError):
    """Preparing the tile cache failed; the partial cache was removed (the message names the tile)."""


@dataclass
class PreparedTile:
    """One decoded tile: ``arrays`` maps a key (modality name or ``"mask"``) to an array in its storage
    dtype, (C, H, W) for modalities and (H, W) for the mask; ``info`` is JSON-able per-tile bookkeeping
    (label statistics, no-data counts, notes). ``skip`` (a reason) drops the tile from every split.
    ``exclude`` maps a modality to an (H, W) bool mask of pixels that are not measurements (no-data that
    was filled, clipped outliers): they are left out of the mean/std."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None
    exclude: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ file errors
def file_state(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file ("is missing", "is a directory, not a file", ...);
    None for a regular file (which may still be unreadable: see :func:`read_error`)."""
    path = Path(path)
    try:
        if path.is_symlink() and not path.exists():
            return f"is a broken symbolic link (to {os.readlink(path)})"
        if not path.exists():
            return "is missing"
        if path.is_dir():
            return "is a directory, not a file"
        if not path.is_file():
            return "is not a regular file"
    except PermissionError as err:  # a parent folder the user may not enter
        return f"cannot be reached: permission denied ({err}); check the permissions of its folders"
    return None


def _permission_denied(path: Path, err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:  # libraries wrap the OS error (rasterio keeps only its text)
        # an errno means one only on an OSError: GDAL's own errors (rasterio's CPLE_*) carry GDAL error codes,
        # and CPLE_AppDefinedError's 1, a truncated file, equals EPERM
        if isinstance(seen, PermissionError) or (
            isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM)
        ):
            return True
        if "permission denied" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return not os.access(path, os.R_OK)  # always True for root, a real answer for everyone else


def read_error(path: str | os.PathLike, err: BaseException, fix: str = "extract it again") -> OSError:
    """The error to raise when reading ``path`` failed with ``err``: it says what the file actually is
    (missing, a directory, unreadable for its permissions) and only calls it truncated or corrupt (with
    ``fix``) when it is a readable regular file that the decoder rejected."""
    path = Path(path)
    state = file_state(path)
    if state == "is missing":
        return FileNotFoundError(f"cannot read {path}: it {state}")
    if state is not None:
        error = IsADirectoryError if path.is_dir() else OSError
        return error(f"cannot read {path}: it {state}")
    if _permission_denied(path, err):
        return PermissionError(
            f"cannot read {path}: permission denied ({type(err).__name__}: {err}); check its permissions and "
            f"owner (ls -l {path}); extracting it again will not help"
        )
    return OSError(f"cannot read {path} ({type(err).__name__}: {err}); the file is truncated or corrupt: {fix}")


def folder_state(path: str | os.PathLike) -> str | None:
    """What keeps ``path`` from being listed as a folder ("does not exist", "is a file, not a folder",
    "cannot be listed: permission denied ..."); None for a listable folder."""
    path = Path(path)
    try:
        if not path.exists():
            return "does not exist"
        if not path.is_dir():
            return "is a file, not a folder"
        with os.scandir(path) as entries:
            next(entries, None)
    except PermissionError as err:
        return f"cannot be listed: permission denied ({err}); check its permissions and owner (ls -ld {path})"
    return None


def not_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """``"<path> is missing"``, ``"<path> is a directory, not a file"``, ... for the paths that are not files."""
    return [f"{p} {state}" for p in paths if (state := file_state(p)) is not None]


# ------------------------------------------------------------------------------------------ outliers
def clip_outliers(
    x: np.ndarray, low: float, high: float, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``x`` clipped to [low, high], the (x.shape) mask of clipped values among ``valid`` ones and their counts
    (``below``, ``above``, and the most extreme values ``min``/``max`` when any was clipped)."""
    below, above = x < low, x > high
    if valid is not None:
        below &= valid
        above &= valid
    out = np.clip(x, low, high)
    counts: dict[str, Any] = {"below": int(below.sum()), "above": int(above.sum())}
    if counts["below"]:
        counts["min"] = float(f"{x[below].min():.4g}")  # 4 digits: bookkeeping, not data
    if counts["above"]:
        counts["max"] = float(f"{x[above].max():.4g}")
    return out, below | above, counts


def outlier_message(path: str | os.PathLike, what: str, low: float, high: float, counts: Mapping[str, Any]) -> str:
    """One line for the per-tile warning about clipped values (counts from :func:`clip_outliers`)."""
    parts = []
    if counts["below"]:
        parts.append(f"{counts['below']} below {low:g} (lowest {counts['min']:.4g})")
    if counts["above"]:
        parts.append(f"{counts['above']} above {high:g} (highest {counts['max']:.4g})")
    return (
        f"{path}: {counts['below'] + counts['above']} {what} value(s) outside [{low:g}, {high:g}] clipped to the "
        f"range ({', '.join(parts)}) and left out of the mean/std; counted in the cache manifest"
    )


# ------------------------------------------------------------------------------------------ crop sizes
def check_crop_size(crop_size: int, what: str = "dataset.size") -> int:
    """``crop_size`` as an int, or a ValueError suggesting the nearest multiple of 32 for the option
    ``what`` (the command-line key the user sets: the datasets' ``crop_size`` is ``dataset.size``)."""
    size = int(crop_size)
    if size < CROP_MULTIPLE or size % CROP_MULTIPLE:
        nearest = max(CROP_MULTIPLE, round(size / CROP_MULTIPLE) * CROP_MULTIPLE)
        raise ValueError(
            f"{what}={crop_size} must be a positive multiple of {CROP_MULTIPLE} (the encoders downsample by "
            f"{CROP_MULTIPLE}); use {what}={nearest}"
        )
    return size


def grid_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` px, the last window aligned to the border."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def _owned(starts: list[int], crop: int, length: int) -> list[tuple[int, int]]:
    """For each window, the [begin, end) range it is the FIRST to cover (so overlaps are scored once)."""
    out, covered = [], 0
    for s in starts:
        end = min(s + crop, length)
        out.append((max(s, covered), end))
        covered = max(covered, end)
    return out


@dataclass(frozen=True)
class Window:
    """A crop of one tile: top-left (y, x), side ``size``; ``own`` = (y0, y1, x0, x1) in crop coordinates of
    the pixels this window scores (all of them for random crops; grid overlaps are scored once)."""

    tile: str
    y: int
    x: int
    size: int
    own: tuple[int, int, int, int] | None = None


def grid_windows(shapes: Mapping[str, Sequence[int]], crop: int, stride: int | None = None) -> list[Window]:
    """Deterministic sliding grid over every tile (raster order); the windows cover each tile fully and
    their ``own`` regions partition it exactly."""
    stride = crop if stride is None else int(stride)
    if not 0 < stride <= crop:
        raise ValueError(
            f"dataset.builder.stride={stride} must be in [1, dataset.size={crop}] or the grid would leave gaps"
        )
    out = []
    for tile, (h, w) in shapes.items():
        ys, xs = grid_starts(h, crop, stride), grid_starts(w, crop, stride)
        for y, (oy0, oy1) in zip(ys, _owned(ys, crop, h), strict=True):
            for x, (ox0, ox1) in zip(xs, _owned(xs, crop, w), strict=True):
                out.append(Window(tile, y, x, crop, (oy0 - y, oy1 - y, ox0 - x, ox1 - x)))
    return out


def default_num_samples(shapes: Mapping[str, Sequence[int]], crop: int) -> int:
    """Random crops per epoch that add up to the split's area (at least one)."""
    return max(1, sum(int(h) * int(w) for h, w in shapes.values()) // (crop * crop))


def random_window(shapes: Mapping[str, Sequence[int]], crop: int, seed: int, index: int, epoch: int = 0) -> Window:
    """Crop ``index`` of epoch ``epoch`` in stream ``seed``: tile drawn proportionally to its area, position
    uniform (a window larger than its tile starts at the top-left corner and is padded).

    Deterministic in (seed, epoch, index), so any worker process draws the same crop for the same key and
    every epoch draws fresh crops.
    """
    tiles = list(shapes)
    areas = np.array([shapes[t][0] * shapes[t][1] for t in tiles], np.float64)
    rng = np.random.default_rng((int(seed), int(epoch), int(index)))
    tile = tiles[int(rng.choice(len(tiles), p=areas / areas.sum()))]
    h, w = shapes[tile]
    y = int(rng.integers(0, max(h - crop, 0) + 1))
    x = int(rng.integers(0, max(w - crop, 0) + 1))
    return Window(tile, y, x, crop)


def read_window(array: np.ndarray, y: int, x: int, size: int, fill: float | None = 0) -> np.ndarray:
    """``array[..., y:y+size, x:x+size]`` as a fresh array, padded with ``fill`` where the tile is smaller
    (``fill=None``: not padded, so smaller than ``size`` there)."""
    crop = np.array(array[..., y : y + size, x : x + size])  # copies just this window out of the memmap
    if fill is None:
        return crop
    h, w = crop.shape[-2:]
    if (h, w) != (size, size):
        pad = [(0, 0)] * (crop.ndim - 2) + [(0, size - h), (0, size - w)]
        crop = np.pad(crop, pad, constant_values=fill)
    return crop


# --------------------------------------------------------------------------------------------- sources
def fingerprint(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What identifies a source file's version: its path (relative to ``root`` when inside it, so a data root
    moved with its cache keeps the cache), size, modification and status-change times (ns). The status-change
    time catches a rewrite that keeps size and mtime (``cp -p``, ``rsync -t``, ``tar x``): no one can set it."""
    st = os.stat(path)
    resolved = Path(path).resolve()
    if root is not None and resolved.is_relative_to(Path(root).resolve()):
        resolved = resolved.relative_to(Path(root).resolve())
    return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def cache_lock_path(cache_dir: str | os.PathLike) -> Path:
    """The preparation lock of a cache: a sibling file (the cache folder itself is replaced as a whole)."""
    cache_dir = Path(cache_dir)
    return cache_dir.with_name(f".{cache_dir.name}.lock")


def default_cache_dir(root: str | os.PathLike, dataset: str) -> Path:
    return Path(root) / ".sgma_cache" / f"{dataset}-v{CACHE_VERSION}"


# ------------------------------------------------------------------------------------------ statistics
def _bin_values(dtype: np.dtype) -> np.ndarray:
    """The value of every histogram bin: 256 for uint8, one per float16 bit pattern (65536)."""
    if dtype == np.uint8:
        return np.arange(256, dtype=np.float64)
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)


class _ChannelStats:
    """Per-channel mean/std over many tiles from EXACT value histograms (the cache stores only uint8 and
    float16, so one bin per possible value), leaving out the pixels a loader flags as not measured.

    Why: the statistics normalise every tile, so a few extreme values must not move them. Pixels a loader
    filled (no-data, NaN) or clipped (heights outside :data:`HEIGHT_RANGE`, values beyond float16) are
    excluded, so one 1e30 patch no longer turns a 3.4 m height std into thousands of metres; values inside
    the range are real measurements and count exactly (no trimming, so clean data keep their exact moments).
    """

    def __init__(self) -> None:
        self.hist: np.ndarray | None = None  # (C, bins) int64
        self.dtype: np.dtype | None = None
        self.excluded = 0

    def update(self, array: np.ndarray, exclude: np.ndarray | None = None) -> None:
        if self.hist is None:
            self.dtype = array.dtype
            self.hist = np.zeros((array.shape[0], 256 if array.dtype == np.uint8 else 65536), np.int64)
        if array.dtype != self.dtype or array.shape[0] != self.hist.shape[0]:
            raise ValueError(
                f"a tile has {array.shape[0]} {array.dtype} channel(s), the first had {self.hist.shape[0]} {self.dtype}"
            )
        if exclude is not None and exclude.shape != array.shape[1:]:
            raise ValueError(f"exclude mask {exclude.shape} does not match the array {array.shape[1:]}")
        bins = self.hist.shape[1]
        for i in range(array.shape[0]):
            for rows in range(0, array.shape[1], 1024):  # bounded temporaries on 6000² tiles
                codes = array[i, rows : rows + 1024]
                codes = codes.view(np.uint16) if codes.dtype == np.float16 else codes
                if exclude is not None:
                    codes = codes[~exclude[rows : rows + 1024]]
                self.hist[i] += np.bincount(codes.ravel(), minlength=bins)
        if exclude is not None:
            self.excluded += int(exclude.sum())

    def result(self, name: str = "") -> dict[str, Any]:
        values = _bin_values(self.dtype)
        finite = np.isfinite(values)
        if self.hist[:, ~finite].any():
            raise ValueError(f"{name}: NaN/inf values reached the cache; the loader must fill them")
        hist = self.hist[:, finite].astype(np.float64)
        values = values[finite]
        count = hist.sum(axis=1)
        if not count.all():
            raise ValueError(f"{name}: every train pixel is no-data or out of range; no mean/std can be measured")
        mean = hist @ values / count
        var = (hist * np.square(values[None] - mean[:, None])).sum(axis=1) / count  # two-pass: no cancellation
        std = np.sqrt(var)
        std = np.where(std > 1e-6, std, 1.0)  # a constant channel: keep (x-mean)/std finite
        return {
            "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std],
            "pixels": int(count[0]),
            "excluded": self.excluded,
        }


# ------------------------------------------------------------------------------------------------ cache
def _progress(items: Sequence[str], desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with lightning; without it, plain iteration
        return items
    return tqdm(items, desc=desc, unit="tile", leave=False)


def npy_problem(path: Path, shape: Sequence[int], dtype: str) -> str | None:
    """Why the ``.npy`` at ``path`` is not the array the manifest describes (None: it is): missing,
    unreadable, another shape or dtype in its header, or a size that does not match the header (truncated)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            file_shape, _, file_dtype = read(f)
            needed = f.tell() + int(np.prod(file_shape, dtype=np.int64)) * file_dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as err:
        return f"is unreadable ({type(err).__name__}: {err})"
    if list(file_shape) != list(shape):
        return f"has shape {list(file_shape)} but the manifest says {list(shape)}"
    if str(file_dtype) != dtype:
        return f"has dtype {file_dtype} but the manifest says {dtype}"
    if size != needed:
        return f"is {size} bytes but its header needs {needed} ({'truncated' if size < needed else 'extra bytes'})"
    return None


# cache folder -> (inode, mtime) of the manifest whose arrays this process has verified: the train, val and
# test datasets of one run open the same cache, and reading every header again costs ~60 us per array
_VERIFIED: dict[str, tuple[int, int]] = {}


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def check_disk_space(cache_dir: Path, needed: int, dataset: str, items: int, hint: str = "") -> None:
    """Log what preparing a cache of ``needed`` bytes will take and refuse to start when the disk of
    ``cache_dir`` has less room than that (a full disk midway costs the whole preparation). ``hint`` is a
    dataset's own way out, added to the refusal (e.g. reading the frames without a cache)."""
    existing = next(p for p in (cache_dir, *cache_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    log.info(
        "the %s cache of %d images will take about %.2f GB in %s (%.1f GB free there)",
        dataset,
        items,
        needed / 1e9,
        cache_dir,
        free / 1e9,
    )
    if needed > free:
        raise TilePreparationError(
            f"the {dataset} tile cache needs about {needed / 1e9:.2f} GB ({items} images) but {existing} has "
            f"{free / 1e9:.2f} GB free; set dataset.builder.cache_dir=<a folder with room> (or free space)"
            f"{'; ' + hint if hint else ''}. Nothing was written"
        )


class TileCache:
    """A prepared, memory-mapped tile cache (see the module docstring for the format and the locking).

    ``sources`` maps tile -> {role: path} (every file the tile's content depends on), ``splits`` maps split
    -> tile ids, ``options`` are the settings that change the content (a different value rebuilds), and
    ``stat_keys`` are the keys whose per-channel mean/std are measured on ``stats_split``.
    ``store_arrays=False`` keeps only the manifest and decodes tiles on demand (module docstring). Sources under
    ``root`` (the dataset's folder) are recorded relative to it.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        dataset: str,
        sources: Mapping[str, Mapping[str, str | os.PathLike]],
        splits: Mapping[str, Sequence[str]],
        options: Mapping[str, Any] | None = None,
        stat_keys: Sequence[str] = (),
        stats_split: str = "train",
        store_arrays: bool = True,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.dir = Path(cache_dir)
        self.root = root
        self.store_arrays = bool(store_arrays)
        self._load: Callable[[str], PreparedTile] | None = None  # manifest only: decodes a tile on demand
        self._decoded: tuple[str, dict[str, np.ndarray]] | None = None  # manifest only: the last tile decoded
        self.dataset = dataset
        self.sources = {t: {k: str(p) for k, p in files.items()} for t, files in sources.items()}
        self.splits = {s: list(tiles) for s, tiles in splits.items()}
        self.options = json.loads(json.dumps(dict(options or {})))  # normalised to what JSON round-trips
        self.stat_keys = tuple(stat_keys)
        self.stats_split = stats_split
        self.manifest: dict[str, Any] | None = None
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    @property
    def lock_path(self) -> Path:
        return cache_lock_path(self.dir)

    # -- validity -------------------------------------------------------------------------------------
    def _expected_sources(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {t: {k: fingerprint(p, self.root) for k, p in files.items()} for t, files in self.sources.items()}

    def stale_reason(self) -> str | None:
        """Why the on-disk cache cannot be used (None: it is valid and loaded into ``self.manifest``).

        Every array file is checked against the manifest (header shape and dtype, file size), so a cache
        damaged by a crash or a full disk is rebuilt when opened instead of failing mid-training.
        """
        path = self.dir / MANIFEST
        if not path.is_file():
            return "no cache yet" if not self.dir.exists() else f"{path} is missing"
        try:
            st = path.stat()
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"unreadable manifest ({type(err).__name__}: {err})"
        if manifest.get("version") != CACHE_VERSION:
            return f"cache format version {manifest.get('version')} != {CACHE_VERSION}"
        if manifest.get("dataset") != self.dataset:
            return f"cache is for dataset {manifest.get('dataset')!r}"
        if manifest.get("arrays_stored", True) != self.store_arrays:
            held = "arrays" if manifest.get("arrays_stored", True) else "only a manifest"
            return f"the folder holds {held}, this run wants {'arrays' if self.store_arrays else 'only a manifest'}"
        if manifest.get("options") != self.options:
            return f"options changed: {manifest.get('options')} -> {self.options}"
        if manifest.get("requested_splits") != self.splits:
            return "split tile lists changed"
        try:
            expected = self._expected_sources()
        except OSError as err:
            return f"a source file cannot be read ({err})"
        if manifest.get("sources") != expected:
            changed = sorted(
                f"{t}/{k}"
                for t, files in expected.items()
                for k, fp in files.items()
                if manifest.get("sources", {}).get(t, {}).get(k) != fp
            )
            return f"source files changed: {', '.join(changed[:5]) or 'tile set'}"
        if self.store_arrays and _VERIFIED.get(str(self.dir)) != (st.st_ino, st.st_mtime_ns):
            try:
                for entry in manifest["tiles"].values():
                    for arr in entry["arrays"].values():
                        problem = npy_problem(self.dir / arr["file"], arr["shape"], arr["dtype"])
                        if problem:
                            return f"array file {arr['file']} {problem}"
            except (KeyError, TypeError, AttributeError) as err:
                return f"malformed manifest ({type(err).__name__}: {err})"
            _VERIFIED[str(self.dir)] = (st.st_ino, st.st_mtime_ns)
        self.manifest = manifest
        return None

    def open_or_prepare(
        self,
        load_tile: Callable[[str], PreparedTile],
        *,
        progress: bool = True,
        before_prepare: Callable[[], None] | None = None,
    ) -> dict:
        """Use the cache if valid, else (re)build it under the lock and return the manifest.

        ``before_prepare`` (e.g. checking every source's size) runs only when this process prepares. A
        process that finds another one preparing waits for the lock, then opens what that one built.
        """
        self._load = load_tile
        if self.stale_reason() is None:
            if self._orphans():
                self._remove_orphans_if_free()
            return self.manifest
        with self._locked():
            self._remove_orphans()
            reason = self.stale_reason()  # again: another process may have prepared it while we waited
            if reason is None:
                log.info("using the %s tile cache %s (prepared by another process)", self.dataset, self.dir)
                return self.manifest
            if reason == "no cache yet":
                log.info("preparing the %s tile cache in %s (first use)", self.dataset, self.dir)
                self._note_old_versions()
            else:
                log.warning("rebuilding the %s tile cache %s: %s", self.dataset, self.dir, reason)
            if before_prepare is not None:
                before_prepare()
            return self._prepare(load_tile, progress=progress)

    # -- locking and leftovers ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock, Timeout

        parent = self.dir.parent
        lock = FileLock(str(self.lock_path))
        try:
            parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info(
                    "another process is preparing the %s tile cache %s; waiting for it (lock %s)",
                    self.dataset,
                    self.dir,
                    self.lock_path,
                )
                lock.acquire()
        except OSError as err:
            raise TilePreparationError(
                f"cannot create the {self.dataset} tile cache under {parent} ({type(err).__name__}: {err}); set "
                f"dataset.builder.cache_dir=<a writable folder> (the data root may be read-only)"
            ) from err
        try:
            yield
        finally:
            lock.release()

    def _orphans(self) -> list[Path]:
        """Temporary and moved-aside folders of this cache (left by killed preparations if nobody prepares)."""
        parent = self.dir.parent
        prefixes = (f".{self.dir.name}.tmp-", f".{self.dir.name}.old-")
        if not parent.is_dir():
            return []
        return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes))

    def _remove_orphans(self) -> None:
        """Remove the leftovers of killed preparations; the caller holds the lock, so none is in use."""
        for path in self._orphans():
            size = _tree_size(path)
            try:
                shutil.rmtree(path)
            except OSError as err:  # a leftover we cannot delete must not stop training: say so and go on
                log.warning("cannot remove %s, left by an interrupted cache preparation: %s", path, err)
                continue
            log.warning(
                "removed %s (%.1f MB), left by an interrupted preparation of the %s tile cache",
                path,
                size / 1e6,
                self.dataset,
            )

    def _remove_orphans_if_free(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):  # busy (its holder cleans up) or a read-only cache: leave them
            return
        try:
            self._remove_orphans()
        finally:
            lock.release()

    def _note_old_versions(self) -> None:
        suffix = f"-v{CACHE_VERSION}"
        if not self.dir.name.endswith(suffix) or not self.dir.parent.is_dir():
            return
        stem = self.dir.name[: -len(suffix)]
        for old in sorted(self.dir.parent.glob(f"{stem}-v*")):
            if old != self.dir and old.name[len(stem) + 2 :].isdigit():
                log.info("%s is a cache of another format version, unused by this version: delete it to free disk", old)

    # -- preparation ----------------------------------------------------------------------------------
    def _prepare(self, load_tile: Callable[[str], PreparedTile], *, progress: bool) -> dict:
        """Build the cache in a temporary sibling and install it; the caller holds the lock."""
        parent = self.dir.parent
        tmp = parent / f".{self.dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()  # not tempfile.mkdtemp: its 0o700 would make the cache private whatever the umask
        except OSError as err:
            raise TilePreparationError(
                f"cannot create the {self.dataset} tile cache under {parent} ({type(err).__name__}: {err}); set "
                f"dataset.builder.cache_dir=<a writable folder> (the data root may be read-only)"
            ) from err
        tile, key = None, None
        try:
            stats = {k: _ChannelStats() for k in self.stat_keys}
            tiles_meta: dict[str, Any] = {}
            skipped: dict[str, str] = {}
            sources = self._expected_sources()  # fingerprint BEFORE reading: a change during prep rebuilds
            all_tiles = list(dict.fromkeys(t for tiles in self.splits.values() for t in tiles))
            if not self.store_arrays:
                log.info(
                    "the %s cache %s keeps only its manifest: decoding each of the %d tiles once now (shapes, "
                    "label counts, the %s mean/std); training then decodes every sample's tile from its files",
                    self.dataset,
                    self.dir,
                    len(all_tiles),
                    self.stats_split,
                )
            bar = _progress(all_tiles, f"preparing {self.dataset} tiles") if progress else all_tiles
            for tile in bar:
                key = None
                prepared = load_tile(tile)
                if prepared.skip:
                    skipped[tile] = prepared.skip
                    continue
                if self.store_arrays:
                    (tmp / tile).mkdir()
                entry: dict[str, Any] = {"arrays": {}, "info": prepared.info}
                shape = None
                for key, array in prepared.arrays.items():
                    if array.dtype not in STORAGE_DTYPES:
                        raise TypeError(f"{key} has dtype {array.dtype}; the cache stores uint8 or float16")
                    if array.dtype == np.float16 and not np.isfinite(array).all():
                        raise ValueError(f"{key} holds NaN/inf; the loader must fill no-data before caching")
                    if shape is None:
                        shape = array.shape[-2:]
                    elif array.shape[-2:] != shape:
                        raise ValueError(f"{key} is {array.shape[-2:]} but the tile's first array is {shape}")
                    entry["arrays"][key] = {"dtype": str(array.dtype), "shape": list(array.shape)}
                    if self.store_arrays:
                        file = f"{tile}/{key}.npy"
                        np.save(tmp / file, np.ascontiguousarray(array))
                        entry["arrays"][key]["file"] = file
                key = None
                entry["shape"] = [int(s) for s in shape]
                tiles_meta[tile] = entry
                if tile in self.splits.get(self.stats_split, ()):
                    for k in self.stat_keys:
                        stats[k].update(prepared.arrays[k], prepared.exclude.get(k))
                del prepared
            splits = {s: [t for t in tiles if t in tiles_meta] for s, tiles in self.splits.items()}
            if self.stat_keys and not splits.get(self.stats_split):
                raise ValueError(f"no {self.stats_split} tile left to measure mean/std on (skipped: {skipped})")
            tile = None
            manifest = {
                "format": "sgma-tile-cache",
                "version": CACHE_VERSION,
                "dataset": self.dataset,
                "arrays_stored": self.store_arrays,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "options": self.options,
                "requested_splits": self.splits,
                "splits": splits,
                "skipped": skipped,
                "sources": sources,
                "tiles": tiles_meta,
                "stats": {"split": self.stats_split, "modalities": {k: s.result(k) for k, s in stats.items()}},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            self._install(tmp)
        except BaseException as err:
            hint = ""
            if isinstance(err, OSError) and key:  # numpy reports a full disk as a short write, without ENOSPC
                with contextlib.suppress(OSError):
                    free = shutil.disk_usage(parent).free  # before the partial cache is removed
                    hint = (
                        f" The disk of {parent} had {free / 1e6:.1f} MB free: if it is full, free space or set "
                        f"dataset.builder.cache_dir=<a folder with room>."
                    )
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(err, Exception):  # KeyboardInterrupt / SystemExit: clean up, keep as is
                raise
            where = f"tile {tile!r}" if tile else "the manifest"
            if tile and key:
                where += f" (writing {key})"
            raise TilePreparationError(
                f"preparing the {self.dataset} tile cache failed at {where}: {type(err).__name__}: {err}. "
                f"The partial cache was removed; nothing was written to {self.dir}.{hint}"
            ) from err
        self.manifest = manifest
        self._arrays.clear()
        self._decoded = None
        log.info("prepared the %s tile cache %s (%d tiles)", self.dataset, self.dir, len(tiles_meta))
        return manifest

    def _install(self, tmp: Path) -> None:
        """Put ``tmp`` in place of the cache (a stale cache is moved aside first, then deleted); the caller
        holds the lock, so nobody else installs in between."""
        old = None
        if self.dir.exists():
            old = self.dir.with_name(f".{self.dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # a leftover is an orphan: removed by the next preparation

    # -- reading --------------------------------------------------------------------------------------
    def array(self, tile: str, key: str) -> np.ndarray:
        """The memory-mapped array of one tile and key (opened lazily, once per process); with only a
        manifest, the tile decoded from its source files (the last one is kept)."""
        if not self.store_arrays:
            return self._decode(tile)[key]
        if (tile, key) not in self._arrays:
            file = self.dir / self.manifest["tiles"][tile]["arrays"][key]["file"]
            try:
                self._arrays[tile, key] = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as err:  # damaged after it was opened and checked
                raise OSError(
                    f"cannot memory-map {file} of the {self.dataset} tile cache ({type(err).__name__}: {err}); the "
                    f"cache was damaged after it was checked: rerun, it is verified and rebuilt when opened"
                ) from err
        return self._arrays[tile, key]

    def _decode(self, tile: str) -> dict[str, np.ndarray]:
        if self._decoded is None or self._decoded[0] != tile:
            if self._load is None:
                raise RuntimeError(f"the {self.dataset} cache {self.dir} was not opened with open_or_prepare")
            self._decoded = None  # a failed decode must not leave the previous tile served under this name
            arrays = self._load(tile).arrays
            for key, spec in self.manifest["tiles"][tile]["arrays"].items():  # the files changed since opening
                found = arrays.get(key)
                if found is None or list(found.shape) != spec["shape"] or str(found.dtype) != spec["dtype"]:
                    got = "nothing" if found is None else f"{list(found.shape)} {found.dtype}"
                    raise OSError(
                        f"{self.dataset} tile {tile!r}: {key} decoded as {got} but the manifest in {self.dir} says "
                        f"{spec['shape']} {spec['dtype']}; its source files changed while running: rerun (the "
                        f"manifest is rebuilt when the files differ)"
                    )
            self._decoded = (tile, arrays)
        return self._decoded[1]

    def shapes(self, split: str) -> dict[str, tuple[int, int]]:
        return {t: tuple(self.manifest["tiles"][t]["shape"]) for t in self.manifest["splits"][split]}

    def stats(self, key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        entry = self.manifest["stats"]["modalities"][key]
        return tuple(entry["mean"]), tuple(entry["std"])

    def __getstate__(self) -> dict:  # DataLoader workers re-open their own memory maps
        state = self.__dict__.copy()
        state["_arrays"] = {}
        state["_decoded"] = None
        return state


class TileCropDataset:
    """Crops of a prepared :class:`TileCache` split: the body of every large-tile dataset's ``__getitem__``.

    Training (``random=True``): ``num_samples`` crops per epoch drawn by :func:`random_window` from
    (seed, epoch, index) (default: as many as tile the split's area once), of any window side (the
    augmentation's zoom reads larger or smaller windows, see :mod:`sgma.data.augment`). Evaluation: the
    :func:`grid_windows` of every tile; pixels an earlier window already scored are set to ``ignore_index``
    in the mask, so summing confusion matrices over windows equals scoring each full tile exactly once.
    """

    def __init__(
        self,
        cache: TileCache,
        split: str,
        keys: Sequence[str],
        *,
        crop_size: int,
        random: bool,
        num_samples: int | None = None,
        stride: int | None = None,
        seed: int = 0,
        label_key: str = "mask",
        ignore_index: int = 255,
    ) -> None:
        self.cache = cache
        self.split = split
        self.keys = tuple(keys)
        self.crop_size = check_crop_size(crop_size)
        self.random = random
        self.seed = int(seed)
        self.label_key = label_key
        self.ignore_index = ignore_index
        self.shapes = cache.shapes(split)
        if not self.shapes:
            raise ValueError(f"split {split!r} has no tiles (skipped: {cache.manifest.get('skipped')})")
        if random:
            self.num_samples = (
                int(num_samples) if num_samples is not None else default_num_samples(self.shapes, self.crop_size)
            )
            if self.num_samples < 1:
                raise ValueError(f"dataset.splits.{split}.num_samples must be >= 1 (or null), got {num_samples}")
            self.windows: list[Window] | None = None
        else:
            self.windows = grid_windows(self.shapes, self.crop_size, stride)
            if num_samples is not None:  # a prefix of the grid: quick looks at val/test
                self.windows = self.windows[: int(num_samples)]
            self.num_samples = len(self.windows)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, index: int, epoch: int = 0, size: int | None = None) -> Window:
        """Window ``index`` (of epoch ``epoch`` and side ``size``, default the crop size, for random crops)."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} crops")
        index %= self.num_samples
        if self.windows is None:
            return random_window(self.shapes, size or self.crop_size, self.seed, index, epoch)
        if size not in (None, self.crop_size):
            raise ValueError(f"the {self.split} grid's windows are {self.crop_size} px: they cannot be read at {size}")
        return self.windows[index]

    def read(
        self,
        index: int,
        epoch: int = 0,
        size: int | None = None,
        keys: Sequence[str] | None = None,
        *,
        pad: bool = True,
    ) -> dict[str, np.ndarray]:
        """Raw crop arrays (storage dtypes) of ``keys`` (default: every key) plus the label, for window
        ``index`` of epoch ``epoch`` and side ``size``; ``pad=False`` leaves the part beyond the tile out (the
        augmentation resizes the content first and pads after, so padding never blends into pixels)."""
        win = self.window(index, epoch, size)
        keys = self.keys if keys is None else keys
        fill, label_fill = (0, self.ignore_index) if pad else (None, None)
        out = {k: read_window(self.cache.array(win.tile, k), win.y, win.x, win.size, fill) for k in keys}
        label = read_window(self.cache.array(win.tile, self.label_key), win.y, win.x, win.size, label_fill)
        if win.own is not None:
            y0, y1, x0, x1 = win.own
            owned = np.full_like(label, self.ignore_index)
            owned[y0:y1, x0:x1] = label[y0:y1, x0:x1]
            label = owned
        out[self.label_key] = label
        return out


def _as_tensors(raw: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Stored crop arrays -> float32 modality tensors and the int64 mask."""
    sample = {name: torch.from_numpy(raw[name].astype(np.float32)) for name in names}
    sample["mask"] = torch.from_numpy(raw["mask"].astype(np.int64))
    return sample


class CachedCropDataset(torch.utils.data.Dataset):
    """The sample protocol shared by every dataset served from a :class:`TileCache`.

    Subclasses set ``split``, ``modalities``, ``classes``, ``crop_size``, ``cache`` (:class:`TileCache`) and
    ``crops`` (:class:`TileCropDataset`); ``item_name`` says what one cached image is called (tiles,
    images, stems) and names the property listing them.
    """

    item_name = "tiles"

    # bytes one pixel takes in the cache (every stored array plus the uint8 mask); datasets set it
    bytes_per_pixel: int = 0
    # what a dataset adds to the refusal when the disk is too small for its cache (e.g. a cache=false option)
    disk_hint: str = ""

    def _check_sizes(self, key: str, files: dict[str, Path]) -> tuple[int, int]:
        """Raise when the source files of one cached image disagree in size; return its (H, W) as cached
        (from the files' headers: dataset-specific)."""
        raise NotImplementedError

    def _prepare_cache(self, sources: Mapping[str, dict[str, Path]], load: Callable, *, progress: bool) -> None:
        """Open the cache, or (re)build it when it is stale after checking every image's source sizes and
        that the disk has room for it (once, under the cache's lock: concurrent processes and DDP ranks wait
        and then open it). A manifest-only cache needs no room for arrays."""

        def check_all() -> None:
            pixels = 0
            for key, files in sources.items():
                h, w = self._check_sizes(key, files)
                pixels += h * w
            if self.cache.store_arrays:
                needed = pixels * self.bytes_per_pixel
                check_disk_space(self.cache.dir, needed, self.cache.dataset, len(sources), self.disk_hint)

        self.cache.open_or_prepare(load, progress=progress, before_prepare=check_all)

    def _serve_crops(self, names: Sequence[str], *, num_samples, stride, seed: int, **options) -> TileCropDataset:
        """Random crops for training, a deterministic grid for val/test."""
        return TileCropDataset(
            self.cache,
            self.split,
            names,
            crop_size=self.crop_size,
            random=self.split == "train",
            num_samples=num_samples,
            stride=stride,
            seed=int(seed),
            **options,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def manifest(self) -> dict:
        return self.cache.manifest

    def window(self, index: int):
        """Which cached image and where sample ``index`` is (for stitching predictions back)."""
        return self.crops.window(index)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        names = [m.name for m in self.modalities]
        return _as_tensors(self.crops.read(index, keys=names), names)

    def sample(
        self, index: int, epoch: int = 0, window: int | None = None, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Training sample ``index`` of epoch ``epoch``: float32 (C, h, w) tensors of the modalities ``names``
        (default: all) and the int64 ``mask`` of a random window of side ``window`` (default: the crop size),
        clipped to its tile (h, w < window where the tile is smaller; :mod:`sgma.data.augment` pads)."""
        names = [m.name for m in self.modalities] if names is None else list(names)
        return _as_tensors(self.crops.read(index, epoch, window, names, pad=False), names)

    def __repr__(self) -> str:
        names = "+".join(m.name for m in self.modalities)
        return (
            f"{type(self).__name__}(split={self.split!r}, {self.item_name}={len(self.crops.shapes)}, "
            f"crops={len(self)}, crop_size={self.crop_size}, modalities={names!r}, cache={str(self.cache.dir)!r})"
        )
