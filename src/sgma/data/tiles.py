"""Prepared tile cache and crop samplers for datasets made of a few very large tiles (ISPRS: 6000² px).

Why a cache: decoding a 6000 x 6000 GeoTIFF/JPEG per training sample is far too slow and reading whole
tiles per item is a known anti-pattern. Each tile is decoded ONCE (colour labels -> class ids, nDSM padded,
DSM no-data zeroed) into one ``.npy`` per tile and key, which training then memory-maps
(``np.load(mmap_mode="r")``) so a random crop reads only its own rows.

Cache layout (``<root>/.sgma_cache/<dataset>-v<CACHE_VERSION>/`` unless ``cache_dir`` is given)::

    manifest.json            # written last: a folder without it is never a cache
    <tile>/<key>.npy         # uint8 for images and labels (class ids, 255 = ignore), float16 for heights

``manifest.json`` holds the format version, the options that change the cache's content, every source
file's path/size/mtime, the per-split tile lists (after defects have dropped tiles), per-tile shapes and
label statistics, tiles that were skipped (and why), and the per-modality mean/std measured on the TRAIN
tiles only (the "compute stats" step; the datasets turn them into :class:`~sgma.modalities.Modality`).
A cache whose version, options or sources differ is rebuilt from scratch: caches are never mixed.

Preparation is atomic: everything is written into a temporary sibling folder that replaces the cache with
``os.replace`` at the end; any failure removes the temporary folder and re-raises naming the tile.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sgma")

CACHE_VERSION = 1
MANIFEST = "manifest.json"
CROP_MULTIPLE = 32  # encoders downsample by 32: input sides must be multiples of it
STORAGE_DTYPES = (np.uint8, np.float16)


class TilePreparationError(RuntimeError):
    """Preparing the tile cache failed; the partial cache was removed (the message names the tile)."""


@dataclass
class PreparedTile:
    """One decoded tile: ``arrays`` maps a key (modality name or ``"mask"``) to an array in its storage
    dtype, (C, H, W) for modalities and (H, W) for the mask; ``info`` is JSON-able per-tile bookkeeping
    (label statistics, no-data counts, notes). ``skip`` (a reason) drops the tile from every split."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None


# ------------------------------------------------------------------------------------------ crop sizes
def check_crop_size(crop_size: int, what: str = "crop_size") -> int:
    """``crop_size`` as an int, or a ValueError suggesting the nearest multiple of 32."""
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
        raise ValueError(f"stride={stride} must be in [1, crop_size={crop}] or the grid would leave gaps")
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


def random_window(shapes: Mapping[str, Sequence[int]], crop: int, seed: int, index: int) -> Window:
    """Crop ``index`` of stream ``seed``: tile drawn proportionally to its area, position uniform.

    Deterministic in (seed, index) alone, so any worker process draws the same crop for the same index.
    """
    tiles = list(shapes)
    areas = np.array([shapes[t][0] * shapes[t][1] for t in tiles], np.float64)
    rng = np.random.default_rng((int(seed), int(index)))
    tile = tiles[int(rng.choice(len(tiles), p=areas / areas.sum()))]
    h, w = shapes[tile]
    y = int(rng.integers(0, max(h - crop, 0) + 1))
    x = int(rng.integers(0, max(w - crop, 0) + 1))
    return Window(tile, y, x, crop)


def read_window(array: np.ndarray, y: int, x: int, size: int, fill: float = 0) -> np.ndarray:
    """``array[..., y:y+size, x:x+size]`` as a fresh array, padded with ``fill`` where the tile is smaller."""
    crop = np.array(array[..., y : y + size, x : x + size])  # copies just this window out of the memmap
    h, w = crop.shape[-2:]
    if (h, w) != (size, size):
        pad = [(0, 0)] * (crop.ndim - 2) + [(0, size - h), (0, size - w)]
        crop = np.pad(crop, pad, constant_values=fill)
    return crop


# --------------------------------------------------------------------------------------------- sources
def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a source file's version: absolute path, size and modification time (ns)."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_cache_dir(root: str | os.PathLike, dataset: str) -> Path:
    return Path(root) / ".sgma_cache" / f"{dataset}-v{CACHE_VERSION}"


# ------------------------------------------------------------------------------------------ statistics
class _ChannelStats:
    """Streaming per-channel mean/std over many tiles (exact histograms for uint8, float64 sums else)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        c = array.shape[0]
        if self.sum is None:
            self.sum, self.sumsq = np.zeros(c), np.zeros(c)
        for i in range(c):
            x = array[i]
            if x.dtype == np.uint8:
                hist = np.bincount(x.ravel(), minlength=256).astype(np.float64)
                v = np.arange(256, dtype=np.float64)
                self.sum[i] += hist @ v
                self.sumsq[i] += hist @ (v * v)
            else:
                for rows in range(0, x.shape[0], 1024):  # bounded float64 temporaries on 6000² tiles
                    chunk = x[rows : rows + 1024].astype(np.float64)
                    self.sum[i] += chunk.sum()
                    self.sumsq[i] += np.square(chunk).sum()
        self.count += int(np.prod(array.shape[1:]))

    def result(self) -> dict[str, list[float]]:
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean * mean, 0))
        std = np.where(std > 1e-6, std, 1.0)  # a constant channel: keep (x-mean)/std finite
        return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


# ------------------------------------------------------------------------------------------------ cache
def _progress(items: Sequence[str], desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with lightning; without it, plain iteration
        return items
    return tqdm(items, desc=desc, unit="tile", leave=False)


class TileCache:
    """A prepared, memory-mapped tile cache (see the module docstring for the format).

    ``sources`` maps tile -> {role: path} (every file the tile's content depends on), ``splits`` maps split
    -> tile ids, ``options`` are the settings that change the content (a different value rebuilds), and
    ``stat_keys`` are the keys whose per-channel mean/std are measured on ``stats_split``.
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
    ) -> None:
        self.dir = Path(cache_dir)
        self.dataset = dataset
        self.sources = {t: {k: str(p) for k, p in files.items()} for t, files in sources.items()}
        self.splits = {s: list(tiles) for s, tiles in splits.items()}
        self.options = json.loads(json.dumps(dict(options or {})))  # normalised to what JSON round-trips
        self.stat_keys = tuple(stat_keys)
        self.stats_split = stats_split
        self.manifest: dict[str, Any] | None = None
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    # -- validity -------------------------------------------------------------------------------------
    def _expected_sources(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {t: {k: fingerprint(p) for k, p in files.items()} for t, files in self.sources.items()}

    def stale_reason(self) -> str | None:
        """Why the on-disk cache cannot be used (None: it is valid and loaded into ``self.manifest``)."""
        path = self.dir / MANIFEST
        if not path.is_file():
            return "no cache yet" if not self.dir.exists() else f"{path} is missing"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"unreadable manifest ({err})"
        if manifest.get("version") != CACHE_VERSION:
            return f"cache format version {manifest.get('version')} != {CACHE_VERSION}"
        if manifest.get("dataset") != self.dataset:
            return f"cache is for dataset {manifest.get('dataset')!r}"
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
        for tile, entry in manifest.get("tiles", {}).items():
            for key, arr in entry["arrays"].items():
                if not (self.dir / arr["file"]).is_file():
                    return f"array file {tile}/{key} is missing"
        self.manifest = manifest
        return None

    def open_or_prepare(self, load_tile: Callable[[str], PreparedTile], *, progress: bool = True) -> dict:
        """Use the cache if valid, else (re)build it atomically; return the manifest."""
        reason = self.stale_reason()
        if reason is None:
            return self.manifest
        if self.dir.exists():
            log.info("rebuilding the %s tile cache %s: %s", self.dataset, self.dir, reason)
        return self.prepare(load_tile, progress=progress)

    # -- preparation ----------------------------------------------------------------------------------
    def prepare(self, load_tile: Callable[[str], PreparedTile], *, progress: bool = True) -> dict:
        parent = self.dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.tmp-", dir=parent))
        except OSError as err:
            raise TilePreparationError(
                f"cannot create the {self.dataset} tile cache under {parent} ({err}); pass cache_dir=<a writable "
                f"folder> (the data root may be read-only)"
            ) from err
        tile, key = None, None
        try:
            stats = {k: _ChannelStats() for k in self.stat_keys}
            tiles_meta: dict[str, Any] = {}
            skipped: dict[str, str] = {}
            sources = self._expected_sources()  # fingerprint BEFORE reading: a change during prep rebuilds
            all_tiles = list(dict.fromkeys(t for tiles in self.splits.values() for t in tiles))
            bar = _progress(all_tiles, f"preparing {self.dataset} tiles") if progress else all_tiles
            for tile in bar:
                key = None
                prepared = load_tile(tile)
                if prepared.skip:
                    skipped[tile] = prepared.skip
                    continue
                (tmp / tile).mkdir()
                entry: dict[str, Any] = {"arrays": {}, "info": prepared.info}
                shape = None
                for key, array in prepared.arrays.items():
                    if array.dtype not in STORAGE_DTYPES:
                        raise TypeError(f"{key} has dtype {array.dtype}; the cache stores uint8 or float16")
                    if shape is None:
                        shape = array.shape[-2:]
                    elif array.shape[-2:] != shape:
                        raise ValueError(f"{key} is {array.shape[-2:]} but the tile's first array is {shape}")
                    file = f"{tile}/{key}.npy"
                    np.save(tmp / file, np.ascontiguousarray(array))
                    entry["arrays"][key] = {"file": file, "dtype": str(array.dtype), "shape": list(array.shape)}
                key = None
                entry["shape"] = [int(s) for s in shape]
                tiles_meta[tile] = entry
                if tile in self.splits.get(self.stats_split, ()):
                    for k in self.stat_keys:
                        stats[k].update(prepared.arrays[k])
                del prepared
            splits = {s: [t for t in tiles if t in tiles_meta] for s, tiles in self.splits.items()}
            if self.stat_keys and not splits.get(self.stats_split):
                raise ValueError(f"no {self.stats_split} tile left to measure mean/std on (skipped: {skipped})")
            tile = None
            manifest = {
                "format": "sgma-tile-cache",
                "version": CACHE_VERSION,
                "dataset": self.dataset,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "options": self.options,
                "requested_splits": self.splits,
                "splits": splits,
                "skipped": skipped,
                "sources": sources,
                "tiles": tiles_meta,
                "stats": {"split": self.stats_split, "modalities": {k: s.result() for k, s in stats.items()}},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            self._install(tmp)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(err, Exception):  # KeyboardInterrupt / SystemExit: clean up, keep as is
                raise
            where = f"tile {tile!r}" if tile else "the manifest"
            if tile and key:
                where += f" (writing {key})"
            raise TilePreparationError(
                f"preparing the {self.dataset} tile cache failed at {where}: {type(err).__name__}: {err}. "
                f"The partial cache was removed; nothing was written to {self.dir}."
            ) from err
        self.manifest = manifest
        self._arrays.clear()
        return manifest

    def _install(self, tmp: Path) -> None:
        """Atomically put ``tmp`` in place of the cache (an old, stale cache is moved aside first)."""
        old = None
        if self.dir.exists():
            old = self.dir.with_name(f".{self.dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(self.dir, old)
        try:
            os.replace(tmp, self.dir)
        except OSError:
            # another process (a DDP rank) installed a cache in between: keep theirs if it is valid
            if self.stale_reason() is None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    # -- reading --------------------------------------------------------------------------------------
    def array(self, tile: str, key: str) -> np.ndarray:
        """The memory-mapped array of one tile and key (opened lazily, once per process)."""
        if (tile, key) not in self._arrays:
            file = self.dir / self.manifest["tiles"][tile]["arrays"][key]["file"]
            self._arrays[tile, key] = np.load(file, mmap_mode="r")
        return self._arrays[tile, key]

    def shapes(self, split: str) -> dict[str, tuple[int, int]]:
        return {t: tuple(self.manifest["tiles"][t]["shape"]) for t in self.manifest["splits"][split]}

    def stats(self, key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        entry = self.manifest["stats"]["modalities"][key]
        return tuple(entry["mean"]), tuple(entry["std"])

    def __getstate__(self) -> dict:  # DataLoader workers re-open their own memory maps
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


class TileCropDataset:
    """Crops of a prepared :class:`TileCache` split: the body of every large-tile dataset's ``__getitem__``.

    Training (``random=True``): ``num_samples`` crops drawn by :func:`random_window` from (seed, index)
    (default: as many as tile the split's area once). Evaluation: the :func:`grid_windows` of every tile;
    pixels an earlier window already scored are set to ``ignore_index`` in the mask, so summing confusion
    matrices over windows equals scoring each full tile exactly once.
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
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")
            self.windows: list[Window] | None = None
        else:
            self.windows = grid_windows(self.shapes, self.crop_size, stride)
            if num_samples is not None:  # a prefix of the grid: quick looks at val/test
                self.windows = self.windows[: int(num_samples)]
            self.num_samples = len(self.windows)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, index: int) -> Window:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} crops")
        index %= self.num_samples
        if self.windows is None:
            return random_window(self.shapes, self.crop_size, self.seed, index)
        return self.windows[index]

    def read(self, index: int) -> dict[str, np.ndarray]:
        """Raw crop arrays (storage dtypes) of every key plus the label, for window ``index``."""
        win = self.window(index)
        out = {k: read_window(self.cache.array(win.tile, k), win.y, win.x, win.size) for k in self.keys}
        label = read_window(self.cache.array(win.tile, self.label_key), win.y, win.x, win.size, self.ignore_index)
        if win.own is not None:
            y0, y1, x0, x1 = win.own
            owned = np.full_like(label, self.ignore_index)
            owned[y0:y1, x0:x1] = label[y0:y1, x0:x1]
            label = owned
        out[self.label_key] = label
        return out


class CachedCropDataset(torch.utils.data.Dataset):
    """The sample protocol shared by every dataset served from a :class:`TileCache`.

    Subclasses set ``split``, ``modalities``, ``classes``, ``crop_size``, ``cache`` (:class:`TileCache`) and
    ``crops`` (:class:`TileCropDataset`); ``item_name`` says what one cached image is called (tiles,
    images, stems) and names the property listing them.
    """

    item_name = "tiles"

    def _check_sizes(self, key: str, files: dict[str, Path]) -> None:
        """Raise when the source files of one cached image disagree in size (dataset-specific)."""
        raise NotImplementedError

    def _prepare_cache(self, sources: Mapping[str, dict[str, Path]], load: Callable, *, progress: bool) -> None:
        """(Re)build the cache when it is stale, checking every image's source sizes first."""
        if self.cache.stale_reason() is not None:
            for key, files in sources.items():
                self._check_sizes(key, files)
            self.cache.prepare(load, progress=progress)

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
        raw = self.crops.read(index)
        sample = {m.name: torch.from_numpy(raw[m.name].astype(np.float32)) for m in self.modalities}
        sample["mask"] = torch.from_numpy(raw["mask"].astype(np.int64))
        return sample

    def __repr__(self) -> str:
        names = "+".join(m.name for m in self.modalities)
        return (
            f"{type(self).__name__}(split={self.split!r}, {self.item_name}={len(self.crops.shapes)}, "
            f"crops={len(self)}, crop_size={self.crop_size}, modalities={names!r}, cache={str(self.cache.dir)!r})"
        )
