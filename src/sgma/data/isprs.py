"""ISPRS 2D semantic labelling benchmark: Potsdam (rgb, nir, dsm) and Vaihingen (irrg, dsm).

Both find the release's files by name anywhere under the root (:mod:`sgma.data.discovery`: one walk per
dataset construction), so a plain unzip of each archive works whatever its nesting: ``5_Labels_all.zip`` and
the Vaihingen COMPLETE ground-truth zips unpack flat into the root, the other Potsdam zips often double
nested (``4_Ortho_RGBIR/4_Ortho_RGBIR/``). When files are missing, one message lists per kind of file what
was found where, what is missing, which archive holds it and where the search looked. Variants accepted:
Potsdam RGBIR or RGB + IRRG imagery (``imagery``), Vaihingen float DSM or Gerke's 8-bit nDSM
(``dsm_source``); Vaihingen images and full labels share the name ``top_mosaic_09cm_area<N>.tif`` and are
told apart by their folder (``top`` / ``gts_for_participants``) or else their pixels. Several copies of one
file (a second unzip) are fine when identical, an error naming both when not. Every tile is decoded once
into a memory-mapped :class:`~sgma.data.tiles.TileCache` and served as crops: ``num_samples`` random crops
per epoch for training, a deterministic sliding grid covering every tile for val/test (each pixel scored
once). Samples follow the dataset contract of :mod:`sgma.data.synthetic`: raw float32 (C, H, W) per
modality and an int64 ``mask`` with 255 = ignore; ``modalities`` carry the mean/std measured on the train
tiles (the cache manifest's statistics).

Known defects and what happens to them (all recorded in the cache manifest):

* colour labels are decoded with the exact palette in RGB order; black (0, 0, 0) = eroded boundary ->
  ignore; any other colour -> ignore, counted per tile and warned, never mapped to a class; a label with
  more than ``max_off_palette`` (50 %) foreign colours is an error (wrong file or BGR channel order);
* Potsdam ``top_potsdam_4_12_label.tif`` of ``5_Labels_all.zip`` is an overlay, not a mask: the copy in
  ``5_Labels_for_participants.zip`` (a folder whose name starts with ``5_Labels_for_participants``, not its
  ``_no_Boundary`` variant) is used; without it ``broken_labels`` = ``error`` (default) or ``skip`` (drop
  the tile with a warning);
* Potsdam ``top_potsdam_6_7_label.tif`` of ``5_Labels_all.zip`` codes its cars as (252, 255, 0): the
  participants' copy is used; without it that colour decodes as car for this tile only (logged, counted
  as ``aliased`` in the label statistics);
* nDSM tiles 1 px narrower (or shorter) than the RGBIR tile are padded by edge replication (warned once,
  when the cache is prepared); any other size disagreement is an error naming both files;
* an empty (constant) height tile: ``empty_dsm`` = ``error`` (default), ``keep`` (use it: the model sees a
  flat DSM) or ``drop`` (remove the tile from its split, warned);
* absolute heights (Vaihingen DSM, Potsdam raw ``1_DSM`` with ``dsm_source="dsm"``) become heights above
  a per-tile ground level (the 2nd percentile; negatives clipped to 0), NaN / no-data / values < -1000 -> 0,
  counted per tile. This is a flat-ground approximation, not a terrain model;
* heights more than 1000 m above that ground or 100 m below it (:data:`~sgma.data.tiles.HEIGHT_RANGE`:
  no building is taller than 828 m, so such values are undeclared no-data markers or sensor failures, e.g.
  a 1e30 patch) are clipped into [0, 1000] m, counted per tile with one warning, and left out of the
  mean/std with the no-data pixels, so a few bad tiles cannot flatten every tile's normalised DSM. The
  Potsdam 8-bit nDSM (grey levels 0-255) cannot hold such values.

Problems with the files say what the file is: missing, a directory, unreadable for its permissions (then
the fix is ``chmod``/``chown``, not a new download), or truncated/corrupt. Options in messages are the
command-line keys (``dataset.builder.empty_dsm``, ``dataset.size``, ...).
"""

from __future__ import annotations

import filecmp
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sgma.data.discovery import DuplicateFileError, FileIndex, Part, inventory, sample
from sgma.data.tiles import (
    HEIGHT_RANGE,
    NODATA_BELOW,
    CachedCropDataset,
    PreparedTile,
    TileCache,
    check_crop_size,
    clip_outliers,
    default_cache_dir,
    folder_state,
    outlier_message,
    read_error,
)
from sgma.modalities import Modality, parse_pattern

CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))  # RGB order
IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(len(CLASSES))
BOUNDARY = (0, 0, 0)  # eroded labels: boundary pixels -> ignore
IGNORE_INDEX = 255
# Modality.kind, value_max: the 8-bit orthophotos are optical (the 8-bit nDSM is stored as heights, not optical)
KINDS = {"rgb": ("optical", 255.0), "nir": ("optical", 255.0), "irrg": ("optical", 255.0), "dsm": ("elevation", None)}
SPLITS = ("train", "val", "test")
ISPRS_URL = "https://www.isprs.org/education/benchmarks/UrbanSemLab/default.aspx"
GROUND_PERCENTILE = 2.0
log = logging.getLogger("sgma")
BGR_SUSPECT = 0.3  # share of car + clutter pixels above which a label is probably in BGR order


# ---------------------------------------------------------------------------------------------- labels
# every file of a tile covers the same grid in the release: a mismatch is a file of another tile, dataset or
# processing (a resampled or cropped copy), or a damaged one
SIZE_FIX = (
    "; the files of one tile have one size in the release: replace the odd one with the release's (extract it again)"
)


def _pack(rgb: np.ndarray) -> np.ndarray:
    return (rgb[0].astype(np.int32) << 16) | (rgb[1].astype(np.int32) << 8) | rgb[2].astype(np.int32)


def decode_labels(
    rgb: np.ndarray,
    path: str | os.PathLike = "<array>",
    *,
    max_off_palette: float = 0.5,
    aliases: dict[tuple[int, int, int], int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(3, H, W) uint8 colour label in RGB order -> (H, W) uint8 class ids (255 = ignore) and statistics.

    Exact palette colours map to their class; black (boundary) and any other colour map to ignore. Foreign
    colours are counted (``off_palette``); above ``max_off_palette`` of the tile it is an error. ``aliases``
    maps extra colours to a class for one known-defective file (counted as ``aliased``).
    """
    if rgb.ndim != 3 or rgb.shape[0] < 3:
        raise ValueError(f"{path}: expected a 3-band colour label, got an array of shape {rgb.shape}")
    code = _pack(rgb[:3])
    mask = np.full(code.shape, IGNORE_INDEX, np.uint8)
    known = code == _pack(np.array(BOUNDARY).reshape(3, 1))
    boundary = int(known.sum())
    for i, colour in enumerate(PALETTE):
        hit = code == _pack(np.array(colour).reshape(3, 1))
        mask[hit] = i
        known |= hit
    aliased = 0
    for colour, i in (aliases or {}).items():
        hit = code == _pack(np.array(colour).reshape(3, 1))
        mask[hit] = i
        known |= hit
        aliased += int(hit.sum())
    off = int(code.size - known.sum())
    if off > max_off_palette * code.size:
        raise ValueError(
            f"{path}: {off / code.size:.0%} of the pixels have colours outside the ISPRS palette {PALETTE} (RGB "
            f"order), more than dataset.builder.max_off_palette={max_off_palette}; it is likely not a label file "
            f"(an image or an overlay) or has the wrong channel order (BGR?)"
        )
    counts = np.bincount(mask.ravel(), minlength=256)
    stats = {
        "off_palette": off,
        "boundary": boundary,
        "class_counts": [int(c) for c in counts[: len(CLASSES)]],
        "ignore": int(counts[IGNORE_INDEX]),
    }
    if aliases:
        stats["aliased"] = aliased
    if off:  # the most frequent foreign colours, for the warning: noise, or another file's palette?
        colours, n = np.unique(code[~known], return_counts=True)
        top = np.argsort(n)[::-1][:3]
        stats["off_colours"] = [
            [[int(c >> 16), int(c >> 8 & 255), int(c & 255)], int(k)] for c, k in zip(colours[top], n[top], strict=True)
        ]
    # The palette is closed under R<->B swaps (building<->clutter, low vegetation<->car), so a BGR label
    # decodes without foreign colours. Cars and clutter are rare in ISPRS tiles (a few %), buildings and low
    # vegetation common (~25 % each): cars + clutter above BGR_SUSPECT of a tile is the tell (a warning only).
    labelled = int(counts[: len(CLASSES)].sum())
    stats["suspect_bgr"] = bool(labelled > 0 and counts[CAR] + counts[CLUTTER] > BGR_SUSPECT * labelled)
    return mask, stats


# ------------------------------------------------------------------------------------------------- I/O
def _unreadable(path: Path, err: BaseException) -> OSError:
    return read_error(path, err, "extract it again from the archive it came from")


def raster_info(path: Path) -> tuple[int, int, int]:
    """(bands, height, width) from the header only."""
    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        from PIL import Image

        try:
            with Image.open(path) as img:
                return len(img.getbands()), img.height, img.width
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _unreadable(path, err) from err
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            return src.count, src.height, src.width
    except (RasterioError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def read_raster(path: Path, bands: Sequence[int] | None = None) -> tuple[np.ndarray, float | None]:
    """(C, H, W) pixels of the 1-based ``bands`` (all by default) and the file's nodata value."""
    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
                arr = np.asarray(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _unreadable(path, err) from err
        arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
        if bands is not None:
            arr = arr[[b - 1 for b in bands]]
        return np.ascontiguousarray(arr), None
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            if bands is not None and max(bands) > src.count:
                raise ValueError(f"{path} has {src.count} band(s), band {max(bands)} is needed")
            return src.read(list(bands) if bands is not None else None), src.nodata
    except ValueError:
        raise
    except (RasterioError, OSError) as err:
        raise _unreadable(path, err) from err


def heights_above_ground(dsm: np.ndarray, nodata: float | None = None) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Absolute heights (H, W) -> float16 (1, H, W) heights above the tile's 2nd-percentile ground, the
    bookkeeping and an (H, W) mask of the pixels that are not measurements (for the mean/std).

    No-data (NaN, the file's nodata value, values < -1000) is set to 0 and counted (``nodata_pixels``);
    heights outside :data:`~sgma.data.tiles.HEIGHT_RANGE` relative to the ground are clipped and counted
    (``outliers``: below / above, with the extremes); negative heights inside the range become 0 (the
    flat-ground approximation)."""
    dsm = dsm.astype(np.float32, copy=False)
    invalid = ~np.isfinite(dsm) | (dsm < NODATA_BELOW)
    if nodata is not None and np.isfinite(nodata):
        invalid |= dsm == np.float32(nodata)
    valid = dsm[~invalid]
    ground = float(np.percentile(valid, GROUND_PERCENTILE)) if valid.size else 0.0  # robust to high outliers
    with np.errstate(over="ignore", invalid="ignore"):  # 1e30 - ground stays finite; NaN is masked
        relative = np.where(invalid, 0, dsm - np.float32(ground))
    relative, outliers, counts = clip_outliers(relative, *HEIGHT_RANGE, valid=~invalid)
    out = np.maximum(relative, 0).astype(np.float16)
    info = {"nodata_pixels": int(invalid.sum()), "ground": round(ground, 3), "outliers": counts}
    return out[None], info, invalid | outliers


def _heights(raw: np.ndarray, nodata: float | None, path: Path) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """:func:`heights_above_ground` with one warning per tile for no-data and one for clipped outliers."""
    height, info, not_measured = heights_above_ground(raw, nodata)
    if info["nodata_pixels"]:
        warnings.warn(f"{path}: {info['nodata_pixels']} no-data/NaN pixel(s) set to 0 m", stacklevel=3)
    if info["outliers"]["below"] or info["outliers"]["above"]:
        what = "height (m above the tile's ground)"
        warnings.warn(outlier_message(path, what, *HEIGHT_RANGE, info["outliers"]), stacklevel=3)
    return height, info, not_measured


def _is_empty(height: np.ndarray) -> bool:
    return bool(height.size == 0 or np.nanmax(height) == np.nanmin(height))


def same_content(a: Path, b: Path) -> bool:
    """Whether two copies hold the same data: the same bytes, or the same pixels (a re-saved copy)."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    if raster_info(a) != raster_info(b):
        return False
    return bool(np.array_equal(read_raster(a)[0], read_raster(b)[0]))


def _ancestors(index: FileIndex, path: Path) -> list[str]:
    """Lower-case names of the folders between the root and ``path``."""
    return [p.name.lower() for p in path.relative_to(index.root).parents if p.name]


# ------------------------------------------------------------------------------------------- datasets
class _ISPRSDataset(CachedCropDataset):
    """Shared machinery of Potsdam and Vaihingen (subclasses declare files, modalities and splits)."""

    item_name = "tiles"

    classes: ClassVar[tuple[str, ...]] = CLASSES
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = PALETTE
    CLASSES: ClassVar[tuple[str, ...]] = CLASSES
    PALETTE: ClassVar[tuple[tuple[int, int, int], ...]] = PALETTE
    NAME: ClassVar[str]
    MODALITIES: ClassVar[dict[str, int]]  # name -> channels, canonical order
    SPLIT_TILES: ClassVar[dict[str, tuple[str, ...]]]
    ARCHIVES: ClassVar[tuple[str, ...]]
    TREE: ClassVar[str]
    EMPTY_DSM_POLICIES = ("error", "keep", "drop")

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike | None = None,
        num_samples: int | None = None,
        crop_size: int = 512,
        stride: int | None = None,
        seed: int = 0,
        modalities: Sequence[str] | str | None = None,
        eroded_test_labels: bool = True,
        cache_dir: str | os.PathLike | None = None,
        drop_tiles: Sequence[str] = (),
        skip_incomplete_tiles: bool = False,
        empty_dsm: str = "error",
        max_off_palette: float = 0.5,
        progress: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if empty_dsm not in self.EMPTY_DSM_POLICIES:
            raise ValueError(
                f"dataset.builder.empty_dsm={empty_dsm!r}: use one of {', '.join(self.EMPTY_DSM_POLICIES)}"
            )
        self.split = split
        self.crop_size = check_crop_size(crop_size)
        if root is None or str(root) in ("", "???"):
            self.root = Path("<root>")
            raise self._missing_data_error(
                f"no data folder given: set root (on the command line: dataset.builder.root=/path/to/{self.NAME})"
            )
        self.root = Path(root).expanduser()
        self.seed = int(seed)
        self.eroded_test_labels = bool(eroded_test_labels)
        self.drop_tiles = tuple(str(t) for t in drop_tiles)
        self.skip_incomplete_tiles = bool(skip_incomplete_tiles)
        self.empty_dsm = empty_dsm
        self.max_off_palette = float(max_off_palette)
        names = parse_pattern(modalities or tuple(self.MODALITIES), tuple(self.MODALITIES))
        unknown = [t for t in self.drop_tiles if not any(t in tiles for tiles in self.SPLIT_TILES.values())]
        if unknown:
            raise ValueError(
                f"dataset.builder.drop_tiles names unknown {self.NAME} tiles {unknown} (quote tile ids in YAML: "
                f"7_10 is the number 710 there, write '7_10'; on the command line: "
                f"'dataset.builder.drop_tiles=[\"7_10\"]')"
            )

        sources, splits = self._verify()
        self.cache = TileCache(
            cache_dir or default_cache_dir(self.root, self.NAME),
            dataset=self.NAME,
            sources=sources,
            splits=splits,
            options=self._cache_options(),
            root=self.root,
            stat_keys=tuple(self.MODALITIES),
        )
        self._prepare_cache(sources, self._load_tile, progress=progress)
        self.modalities: tuple[Modality, ...] = tuple(
            Modality(n, self.MODALITIES[n], *self.cache.stats(n), *KINDS[n]) for n in names
        )
        self.crops = self._serve_crops(names, num_samples=num_samples, stride=stride, seed=self.seed)

    # -- subclass hooks -------------------------------------------------------------------------------
    def _check_sizes(self, tile: str, files: dict[str, Path]) -> tuple[int, int]:
        raise NotImplementedError

    def _load_tile(self, tile: str) -> PreparedTile:
        raise NotImplementedError

    def _cache_options(self) -> dict[str, Any]:
        return {
            "eroded_test_labels": self.eroded_test_labels,
            "empty_dsm": self.empty_dsm,
            "max_off_palette": self.max_off_palette,
        }

    # -- verification ---------------------------------------------------------------------------------
    def _missing_data_error(self, problem: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.NAME}: {problem}. Unzip the release archives ({', '.join(self.ARCHIVES)}) anywhere under "
            f"dataset.builder.root={str(self.root)!r}: files are found by name at any depth (flat or nested "
            f"folders). Data: the ISPRS 2D semantic labelling benchmark ({ISPRS_URL}). Usual tree:\n{self.TREE}"
        )

    def _discover(self, index: FileIndex, needed: dict[str, list[str]]) -> tuple[dict[str, dict[str, Part]], set[str]]:
        """Find the files: per split, role -> :class:`Part` (found by tile id, needed ids); and the tiles
        dropped by a policy (already warned)."""
        raise NotImplementedError

    def _verify(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        """Find every tile's files under the root (one walk); return (sources per tile, tile ids per split),
        or raise one message saying what was found where and what is missing."""
        state = folder_state(self.root)
        if state is not None:
            raise self._missing_data_error(f"root {str(self.root)!r} {state}")
        index = FileIndex(self.root)
        if not index.files:
            raise self._missing_data_error(f"root {str(self.root)!r} is empty")
        needed = {s: [t for t in tiles if t not in self.drop_tiles] for s, tiles in self.SPLIT_TILES.items()}
        roles, skipped = self._discover(index, needed)
        sources: dict[str, dict[str, Path]] = {}
        splits: dict[str, list[str]] = {}
        incomplete: list[str] = []
        for split, tiles in needed.items():
            splits[split] = []
            for tile in tiles:
                if tile in skipped:
                    continue
                files = {role: part.found.get(tile) for role, part in roles[split].items()}
                if any(p is None for p in files.values()):
                    incomplete.append(tile)
                    continue
                sources[tile] = files  # type: ignore[assignment]
                splits[split].append(tile)
        if incomplete:
            parts = list({id(p): p for r in roles.values() for p in r.values()}.values())
            message = inventory(
                self.NAME, index, parts, source=f"the ISPRS 2D semantic labelling benchmark, {ISPRS_URL}"
            )
            if not self.skip_incomplete_tiles or not splits[self.split]:
                raise FileNotFoundError(
                    message + "\nOr set dataset.builder.skip_incomplete_tiles=true to drop incomplete tiles with a "
                    "warning."
                )
            warnings.warn(
                f"{self.NAME}: dropping {len(incomplete)} incomplete tile(s) (dataset.builder.skip_incomplete_tiles="
                f"true): {sample(incomplete)}; what is missing:\n{message}",
                stacklevel=3,
            )
        if not splits[self.split]:
            raise self._missing_data_error(f"no complete tile left in the {self.split} split")
        return sources, splits

    def _one(self, index: FileIndex, what: str, tile: str, paths: list[Path]) -> Path:
        """One of several copies of a file (a second unzip): identical copies are fine (the shallowest is
        used, logged); copies that differ are an error naming both (the loader cannot guess)."""
        paths = sorted(paths, key=lambda p: (len(p.parts), str(p)))
        for other in paths[1:]:
            if not same_content(paths[0], other):
                raise DuplicateFileError(
                    f"{self.NAME} tile {tile}: two different {what} files: {index.relative(paths[0])} and "
                    f"{index.relative(other)}. Keep the right one (delete or move the other out of the data root)"
                )
        if len(paths) > 1:
            log.info(
                "%s tile %s: %d identical copies of the %s file; using %s",
                self.NAME,
                tile,
                len(paths),
                what,
                index.relative(paths[0]),
            )
        return paths[0]

    def _ones(self, index: FileIndex, what: str, found: dict[str, list[Path]], ids: Sequence[str]) -> dict[str, Path]:
        return {t: self._one(index, what, t, found[t]) for t in ids if t in found}

    # -- shared decoding --------------------------------------------------------------------------------
    def _label(
        self, path: Path, tile: str, shape: tuple[int, int], ref: Path, aliases: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        rgb, _ = read_raster(path, (1, 2, 3))
        if rgb.shape[1:] != shape:
            raise ValueError(f"{path} is {_hw(rgb.shape[1:])} but {ref} is {_hw(shape)}{SIZE_FIX}")
        mask, stats = decode_labels(rgb, path, max_off_palette=self.max_off_palette, aliases=aliases)
        if stats["off_palette"]:
            warnings.warn(
                f"{path}: {stats['off_palette']} pixel(s) with colours outside the ISPRS palette set to ignore "
                f"(255), most often {', '.join(f'{tuple(c)} x {k}' for c, k in stats['off_colours'])}; counted in the "
                f"cache manifest. A few are compression noise; many mean another or a damaged copy: extract it again",
                stacklevel=2,
            )
        if stats["suspect_bgr"]:
            warnings.warn(
                f"{path}: over {BGR_SUSPECT:.0%} of the labelled pixels decode as car or clutter; the file is "
                f"probably in BGR order (building<->clutter and low vegetation<->car swapped); the palette is "
                f"read in RGB order",
                stacklevel=2,
            )
        stats["file"] = str(path)
        return mask, stats

    def _empty_height(self, tile: str, path: Path) -> str | None:
        """Apply the ``empty_dsm`` policy; return a skip reason for ``drop``."""
        msg = f"{self.NAME} tile {tile}: the height file {path} is empty (constant)"
        if self.empty_dsm == "error":
            raise ValueError(
                f"{msg}; set dataset.builder.empty_dsm=keep to use it anyway or dataset.builder.empty_dsm=drop to "
                f"drop the tile"
            )
        warnings.warn(f"{msg}; dataset.builder.empty_dsm={self.empty_dsm}", stacklevel=2)
        return msg if self.empty_dsm == "drop" else None

    # -- dataset protocol (shared parts in tiles.CachedCropDataset) ---------------------------------
    @property
    def tiles(self) -> list[str]:
        """The tiles of this split (after dropped and skipped tiles)."""
        return list(self.crops.shapes)


def _ids(text: str) -> tuple[str, ...]:
    """Tile ids from a space-separated list (as the benchmark documents them)."""
    return tuple(text.split())


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[-2]} x {shape[-1]} px (H x W)"


def _fit_to(height: np.ndarray, shape: tuple[int, int], path: Path, ref: Path, tile: str) -> tuple[np.ndarray, str]:
    """Pad a height raster that is at most 1 px short per side (the known 5999 px nDSMs) by edge replication."""
    h, w = height.shape[-2:]
    dh, dw = shape[0] - h, shape[1] - w
    if (dh, dw) == (0, 0):
        return height, ""
    if dh in (0, 1) and dw in (0, 1):
        note = f"{path.name} is {_hw((h, w))}, padded by edge replication to {_hw(shape)}"
        warnings.warn(f"tile {tile}: {note}", stacklevel=2)
        return np.pad(height, [(0, 0)] * (height.ndim - 2) + [(0, dh), (0, dw)], mode="edge"), note
    raise ValueError(f"size mismatch in tile {tile}: {path} is {_hw((h, w))} but {ref} is {_hw(shape)}{SIZE_FIX}")


def _check_pad_ok(tile: str, path: Path, size: tuple[int, int], ref: Path, ref_size: tuple[int, int], *, pad: bool):
    dh, dw = ref_size[0] - size[0], ref_size[1] - size[1]
    if (dh, dw) == (0, 0) or (pad and dh in (0, 1) and dw in (0, 1)):
        return
    raise ValueError(f"size mismatch in tile {tile}: {path} is {_hw(size)} but {ref} is {_hw(ref_size)}{SIZE_FIX}")


POTSDAM_TILES = _ids(
    "2_10 2_11 2_12 2_13 2_14 3_10 3_11 3_12 3_13 3_14 4_10 4_11 4_12 4_13 4_14 4_15 5_10 5_11 5_12 5_13 "
    "5_14 5_15 6_7 6_8 6_9 6_10 6_11 6_12 6_13 6_14 6_15 7_7 7_8 7_9 7_10 7_11 7_12 7_13"
)
POTSDAM_TEST = _ids("2_13 2_14 3_13 3_14 4_13 4_14 4_15 5_13 5_14 5_15 6_13 6_14 6_15 7_13")
POTSDAM_VAL = ("2_10",)


def _policy(name: str, value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"dataset.builder.{name}={value!r}: use one of {', '.join(allowed)} ({what})")
    return value


def _prefer(first: Mapping[str, Any], second: Mapping[str, Any], needed: Sequence[str]) -> bool:
    """``auto``: the first variant when every needed tile found in either variant has it (also when none is
    found: the missing-files message then names the first variant's archive)."""
    return all(t in first for t in needed if t in first or t in second)


def _warn_partial_variant(dataset: str, lacking: Sequence[str], *, present: bool, archive: str, chosen: str) -> None:
    """``auto`` fell back to the second variant for every tile because the first is there for only some: that
    is usually a half-extracted archive, so name its missing files rather than switch quietly."""
    if present and lacking:
        log.warning(
            "%s: %d needed file(s) of the preferred variant are missing (%s, from %s), so every tile uses the "
            "other one; extract them again to use the preferred variant, or set dataset.builder.%s to choose this",
            dataset,
            len(lacking),
            sample(lacking, 3),
            archive,
            chosen,
        )


TILE_ID = r"(?P<id>\d+_\d+)"
PADDED_ID = r"(?P<r>\d+)_(?P<c>\d+)"


def _unpadded(m: re.Match[str]) -> str:
    return f"{int(m['r'])}_{int(m['c'])}"


class Potsdam(_ISPRSDataset):
    """ISPRS Potsdam: 38 tiles of 6000 x 6000 px at 5 cm; modalities ``rgb`` (3), ``nir`` (1), ``dsm`` (1).

    Imagery is the RGBIR tile (R, G, B, IR) or the pair RGB + IRRG (``imagery``: ``auto`` takes RGBIR when
    every tile has it; IRRG band 1 is the NIR). ``dsm`` is the 8-bit nDSM (``dsm_source="ndsm"``, default)
    or the raw float32 DSM as heights above the tile's ground (``dsm_source="dsm"``). Splits: the official
    24 train / 14 test tiles, with 2_10 held out of train as validation; ``drop_tiles`` (default 7_10,
    annotation errors) are removed. Test uses the eroded labels unless ``eroded_test_labels=False``.
    """

    NAME = "potsdam"
    MODALITIES: ClassVar[dict[str, int]] = {"rgb": 3, "nir": 1, "dsm": 1}
    bytes_per_pixel = 3 + 1 + 2 + 1  # rgb, nir uint8; dsm float16; mask
    ALL_TILES = POTSDAM_TILES
    TEST_TILES = POTSDAM_TEST
    VAL_TILES = POTSDAM_VAL
    SPLIT_TILES: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(t for t in POTSDAM_TILES if t not in POTSDAM_TEST + POTSDAM_VAL),
        "val": POTSDAM_VAL,
        "test": POTSDAM_TEST,
    }
    DEFAULT_DROP = ("7_10",)
    # file names (a tile's files are found by these anywhere under the root), with the archive of each
    RGBIR = "top_potsdam_{id}_RGBIR.tif"
    RGB = "top_potsdam_{id}_RGB.tif"
    IRRG = "top_potsdam_{id}_IRRG.tif"
    NDSM = "dsm_potsdam_{padded}_normalized_lastools.jpg"
    DSM = "dsm_potsdam_{padded}.tif"
    LABEL = "top_potsdam_{id}_label.tif"
    LABEL_ERODED = "top_potsdam_{id}_label_noBoundary.tif"
    PARTICIPANTS = "5_labels_for_participants"  # folder-name prefix of the participants' label release
    # 5_Labels_all copies that are not masks (an overlay): only the participants' copy is read
    BROKEN_LABELS: ClassVar[tuple[str, ...]] = ("4_12",)
    # 5_Labels_all copies with extra colours: the participants' copy is read; without it the colour is mapped
    LABEL_ALIASES: ClassVar[dict[str, dict[tuple[int, int, int], int]]] = {"6_7": {(252, 255, 0): CAR}}
    ARCHIVES = (
        "4_Ortho_RGBIR.zip (or 2_Ortho_RGB.zip + 3_Ortho_IRRG.zip)",
        "1_DSM_normalisation.zip",
        "5_Labels_all.zip",
        "5_Labels_all_noBoundary.zip",
        "5_Labels_for_participants.zip",
    )
    IMAGERY = ("auto", "rgbir", "rgb_irrg")
    TREE = """<root>/                                        (a plain unzip of each archive; nesting does not matter)
  4_Ortho_RGBIR/top_potsdam_2_10_RGBIR.tif, ...          (4 bands uint8: R, G, B, IR)
  2_Ortho_RGB/top_potsdam_2_10_RGB.tif, ...              (instead of RGBIR, with the next one)
  3_Ortho_IRRG/top_potsdam_2_10_IRRG.tif, ...            (3 bands uint8: IR, R, G)
  1_DSM_normalisation/dsm_potsdam_02_10_normalized_lastools.jpg, ...  (8-bit nDSM; zero-padded ids)
  1_DSM/dsm_potsdam_02_10.tif, ...                       (only for dsm_source=dsm)
  top_potsdam_2_10_label.tif, ...                        (5_Labels_all.zip unpacks flat: RGB colour labels)
  top_potsdam_2_13_label_noBoundary.tif, ...             (5_Labels_all_noBoundary.zip, flat: eroded, for test)
  5_Labels_for_participants/top_potsdam_4_12_label.tif   (the correct copies of 4_12 and 6_7)"""

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike | None = None,
        num_samples: int | None = None,
        crop_size: int = 512,
        stride: int | None = None,
        seed: int = 0,
        modalities: Sequence[str] | str = ("rgb", "nir", "dsm"),
        eroded_test_labels: bool = True,
        cache_dir: str | os.PathLike | None = None,
        drop_tiles: Sequence[str] = DEFAULT_DROP,
        skip_incomplete_tiles: bool = False,
        empty_dsm: str = "error",
        broken_labels: str = "error",
        dsm_source: str = "ndsm",
        imagery: str = "auto",
        max_off_palette: float = 0.5,
        progress: bool = True,
    ) -> None:
        if broken_labels not in ("error", "skip"):
            raise ValueError(f"dataset.builder.broken_labels={broken_labels!r}: use 'error' or 'skip'")
        if dsm_source not in ("ndsm", "dsm"):
            raise ValueError(
                f"dataset.builder.dsm_source={dsm_source!r}: use 'ndsm' (8-bit normalised DSM) or 'dsm' (raw)"
            )
        self.broken_labels = broken_labels
        self.dsm_source = dsm_source
        self.imagery_option = _policy("imagery", imagery, self.IMAGERY, "RGBIR tiles or RGB + IRRG pairs")
        self.imagery = imagery  # auto is resolved by the discovery
        self.aliased: dict[str, dict[tuple[int, int, int], int]] = {}  # tile -> extra label colours used
        # predict.py applies the same transform to the raw DSM it is given
        self.input_transforms = {"dsm": {"name": "heights_above_ground"}} if dsm_source == "dsm" else {}
        super().__init__(
            split,
            root=root,
            num_samples=num_samples,
            crop_size=crop_size,
            stride=stride,
            seed=seed,
            modalities=modalities,
            eroded_test_labels=eroded_test_labels,
            cache_dir=cache_dir,
            drop_tiles=drop_tiles,
            skip_incomplete_tiles=skip_incomplete_tiles,
            empty_dsm=empty_dsm,
            max_off_palette=max_off_palette,
            progress=progress,
        )

    @staticmethod
    def padded(tile: str) -> str:
        """DSM file ids are zero-padded: ``2_10`` -> ``02_10``, ``6_7`` -> ``06_07``."""
        return "_".join(f"{int(p):02d}" for p in tile.split("_"))

    def _cache_options(self) -> dict[str, Any]:
        return {
            **super()._cache_options(),
            "broken_labels": self.broken_labels,
            "dsm_source": self.dsm_source,
            "imagery": self.imagery,
        }

    def _participants(self, index: FileIndex, path: Path) -> str | None:
        """``full`` in the participants' label release, ``eroded`` in its ``_no_Boundary`` variant, else None."""
        for a in _ancestors(index, path):
            if a.startswith(self.PARTICIPANTS):
                return "eroded" if "boundary" in a else "full"
        return None

    def _discover(self, index: FileIndex, needed: dict[str, list[str]]) -> tuple[dict[str, dict[str, Part]], set[str]]:
        every = [t for tiles in needed.values() for t in tiles]
        full_label_splits = [s for s in needed if not (s == "test" and self.eroded_test_labels)]
        label_ids = [t for s in full_label_splits for t in needed[s]]
        eroded_ids = [t for s in needed if s not in full_label_splits for t in needed[s]]

        # imagery: RGBIR, or RGB + IRRG
        raw = {
            "rgbir": index.match(rf"top_potsdam_{TILE_ID}_RGBIR\.tif"),
            "rgb": index.match(rf"top_potsdam_{TILE_ID}_RGB\.tif"),
            "irrg": index.match(rf"top_potsdam_{TILE_ID}_IRRG\.tif"),
        }
        if self.imagery_option == "auto":
            pairs = {t for t in raw["rgb"] if t in raw["irrg"]}
            self.imagery = "rgbir" if _prefer(raw["rgbir"], dict.fromkeys(pairs), every) else "rgb_irrg"
            log.info(
                "potsdam: imagery=%s (dataset.builder.imagery=auto: %d tile(s) with RGBIR, %d with RGB + IRRG)",
                self.imagery,
                sum(t in raw["rgbir"] for t in every),
                sum(t in pairs for t in every),
            )
            _warn_partial_variant(
                "potsdam",
                [f"top_potsdam_{t}_RGBIR.tif" for t in every if t in pairs and t not in raw["rgbir"]],
                present=any(t in raw["rgbir"] for t in every) and self.imagery != "rgbir",
                archive="4_Ortho_RGBIR.zip",
                chosen="imagery=rgb_irrg",
            )
        files = {k: self._ones(index, f"{k.upper()} image", v, every) for k, v in raw.items()}
        if self.imagery == "rgbir":
            image_parts = {
                "rgbir": Part(
                    "RGBIR images",
                    self.RGBIR.format(id="<id>"),
                    "4_Ortho_RGBIR.zip",
                    files["rgbir"],
                    every,
                    "2_Ortho_RGB.zip + 3_Ortho_IRRG.zip are accepted instead (dataset.builder.imagery=rgb_irrg)",
                )
            }
        else:
            image_parts = {
                "rgb": Part("RGB images", self.RGB.format(id="<id>"), "2_Ortho_RGB.zip", files["rgb"], every),
                "irrg": Part(
                    "IRRG images (band 1 = NIR)",
                    self.IRRG.format(id="<id>"),
                    "3_Ortho_IRRG.zip",
                    files["irrg"],
                    every,
                    "4_Ortho_RGBIR.zip is accepted instead (dataset.builder.imagery=rgbir)",
                ),
            }

        # heights: zero-padded ids in the names
        if self.dsm_source == "ndsm":
            found = index.match(rf"dsm_potsdam_{PADDED_ID}_normalized_lastools\.jpg", key=_unpadded)
            dsm = Part(
                "nDSM",
                self.NDSM.format(padded="<rr>_<cc>"),
                "1_DSM_normalisation.zip",
                self._ones(index, "nDSM", found, every),
                every,
            )
        else:
            found = index.match(rf"dsm_potsdam_{PADDED_ID}\.tif", key=_unpadded)
            dsm = Part(
                "DSM", self.DSM.format(padded="<rr>_<cc>"), "1_DSM.zip", self._ones(index, "DSM", found, every), every
            )

        # labels: 5_Labels_all copies unless the participants' copy must be used
        # a full-label name inside the eroded participants' release is not a full label
        found = index.match(
            rf"top_potsdam_{TILE_ID}_label\.tif", where=lambda p: self._participants(index, p) != "eroded"
        )
        release = {p: self._participants(index, p) for v in found.values() for p in v}
        participants = {t: [p for p in v if release[p] == "full"] for t, v in found.items()}
        everyone = {t: [p for p in v if release[p] is None] for t, v in found.items()}
        participants = self._ones(index, "participants' label", {t: v for t, v in participants.items() if v}, label_ids)
        everyone = self._ones(index, "label", {t: v for t, v in everyone.items() if v}, label_ids)
        labels: dict[str, Path] = {}
        skipped: set[str] = set()
        for tile in label_ids:
            if tile in self.BROKEN_LABELS or tile in self.LABEL_ALIASES:
                if tile in participants:
                    labels[tile] = participants[tile]
                elif tile in self.LABEL_ALIASES and tile in everyone:
                    labels[tile] = everyone[tile]
                    self.aliased[tile] = self.LABEL_ALIASES[tile]
                    log.info(
                        "potsdam tile %s: no 5_Labels_for_participants copy; reading %s with %s decoded as %s "
                        "(a known defect of that file; counted as 'aliased' in the cache manifest)",
                        tile,
                        index.relative(everyone[tile]),
                        ", ".join(map(str, self.LABEL_ALIASES[tile])),
                        ", ".join(CLASSES[c] for c in self.LABEL_ALIASES[tile].values()),
                    )
                elif tile in self.BROKEN_LABELS:
                    problem = (
                        f"{self.LABEL.format(id=tile)} of 5_Labels_all.zip is a known-broken overlay, not a mask, and "
                        f"its correct copy (from 5_Labels_for_participants.zip, in a folder named "
                        f"5_Labels_for_participants*) was not found ({index.searched()})"
                    )
                    if self.broken_labels == "skip":
                        warnings.warn(
                            f"{self.NAME}: dropping tile {tile}: {problem}; dataset.builder.broken_labels=skip",
                            stacklevel=4,
                        )
                        skipped.add(tile)
                    elif tile in everyone:
                        raise FileNotFoundError(
                            f"{problem}. Unzip 5_Labels_for_participants.zip anywhere under the root or set "
                            f"dataset.builder.broken_labels=skip to drop tile {tile}."
                        )
            elif tile in everyone or tile in participants:
                labels[tile] = everyone.get(tile) or participants[tile]
        label = Part(
            "labels",
            self.LABEL.format(id="<id>"),
            "5_Labels_all.zip",
            labels,
            [t for t in label_ids if t not in skipped],
            "4_12 and 6_7 are read from 5_Labels_for_participants.zip",
        )
        found = index.match(rf"top_potsdam_{TILE_ID}_label_noBoundary\.tif")
        found = {t: [p for p in v if self._participants(index, p) is None] or v for t, v in found.items()}
        eroded = Part(
            "eroded labels",
            self.LABEL_ERODED.format(id="<id>"),
            "5_Labels_all_noBoundary.zip",
            self._ones(index, "eroded label", found, eroded_ids),
            eroded_ids,
        )
        roles = {s: {**image_parts, "dsm": dsm, "label": label if s in full_label_splits else eroded} for s in needed}
        return roles, skipped

    def _image_ref(self, files: Mapping[str, Any]) -> Path:
        return Path(files["rgbir"] if "rgbir" in files else files["rgb"])

    def _check_sizes(self, tile: str, files: dict[str, Path]) -> tuple[int, int]:
        ref = self._image_ref(files)
        bands, h, w = raster_info(ref)
        if "rgbir" in files and bands < 4:
            raise ValueError(f"{ref} has {bands} band(s); RGBIR tiles have 4 (R, G, B, IR)")
        if "rgb" in files:
            if bands < 3:
                raise ValueError(f"{ref} has {bands} band(s); RGB tiles have 3")
            ibands, ih, iw = raster_info(files["irrg"])
            if ibands < 3:
                raise ValueError(f"{files['irrg']} has {ibands} band(s); IRRG tiles have 3 (IR, R, G)")
            _check_pad_ok(tile, files["irrg"], (ih, iw), ref, (h, w), pad=False)
        _, lh, lw = raster_info(files["label"])
        _check_pad_ok(tile, files["label"], (lh, lw), ref, (h, w), pad=False)
        _, dh, dw = raster_info(files["dsm"])
        _check_pad_ok(tile, files["dsm"], (dh, dw), ref, (h, w), pad=True)
        return h, w

    def _read_image(self, files: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray, Path]:
        """(rgb, nir, reference file) from the RGBIR tile or the RGB + IRRG pair (NIR = IRRG band 1)."""
        if "rgbir" in files:
            path = Path(files["rgbir"])
            rgbir, _ = read_raster(path, (1, 2, 3, 4))
            rgb, nir = rgbir[:3], rgbir[3:4]
            checks = [(path, rgbir)]
        else:
            path = Path(files["rgb"])
            rgb, _ = read_raster(path, (1, 2, 3))
            nir, _ = read_raster(Path(files["irrg"]), (1,))
            if nir.shape[1:] != rgb.shape[1:]:
                raise ValueError(
                    f"size mismatch: {files['irrg']} is {_hw(nir.shape)} but {path} is {_hw(rgb.shape)}{SIZE_FIX}"
                )
            checks = [(path, rgb), (Path(files["irrg"]), nir)]
        for p, arr in checks:
            if arr.dtype != np.uint8:
                raise ValueError(f"{p} is {arr.dtype}; Potsdam orthophotos are uint8")
        return rgb, nir, path

    def _load_tile(self, tile: str) -> PreparedTile:
        files = self.cache.sources[tile]
        dsm_path, label_path = Path(files["dsm"]), Path(files["label"])
        rgb, nir, ref = self._read_image(files)
        shape = rgb.shape[1:]
        info: dict[str, Any] = {"notes": []}
        exclude: dict[str, np.ndarray] = {}
        if self.dsm_source == "ndsm":  # 8-bit grey levels: no no-data, no outliers possible
            height, _ = read_raster(dsm_path, (1,))
            height, note = _fit_to(height, shape, dsm_path, ref, tile)
            height = height.astype(np.float16)
        else:
            raw, nodata = read_raster(dsm_path, (1,))
            raw, note = _fit_to(raw, shape, dsm_path, ref, tile)
            height, info["dsm"], exclude["dsm"] = _heights(raw[0], nodata, dsm_path)
        if note:
            info["notes"].append(note)
        if _is_empty(height):
            reason = self._empty_height(tile, dsm_path)
            if reason:
                return PreparedTile(skip=reason)
            info["notes"].append("empty dsm kept")
        aliases = self.aliased.get(tile)
        mask, info["label"] = self._label(label_path, tile, shape, ref, aliases)
        if aliases:
            info["notes"].append(f"label colours {list(aliases)} decoded as {[CLASSES[c] for c in aliases.values()]}")
        arrays = {"rgb": rgb, "nir": nir, "dsm": height, "mask": mask}
        return PreparedTile(arrays=arrays, info=info, exclude=exclude)


VAIHINGEN_AREA = r"top_mosaic_09cm_area(?P<id>\d+)\.tif"
LABEL_SHARE = 0.95  # share of palette (or black) pixels in a window above which a file is a label, not an image


def looks_like_label(path: Path, size: int = 64) -> bool:
    """Whether a ``top_mosaic_09cm_area<N>.tif`` is a colour label (palette colours and black only) rather
    than an image: the two releases use the same file name. Reads a small central window."""
    import rasterio
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    try:
        with rasterio.open(path) as src:
            if src.count < 3 or src.dtypes[0] != "uint8":
                return False
            h, w = min(size, src.height), min(size, src.width)
            window = Window((src.width - w) // 2, (src.height - h) // 2, w, h)
            rgb = src.read((1, 2, 3), window=window)
    except (RasterioError, OSError) as err:
        raise _unreadable(path, err) from err
    code = _pack(rgb)
    known = np.isin(code, [int(_pack(np.array(c).reshape(3, 1))[0]) for c in (*PALETTE, BOUNDARY)])
    return bool(known.mean() >= LABEL_SHARE)


class Vaihingen(_ISPRSDataset):
    """ISPRS Vaihingen: 33 labelled areas (about 2000 x 2500 px at 9 cm); modalities ``irrg`` (3) and ``dsm``.

    ``dsm`` is the float32 absolute-height DSM turned into heights above a per-tile ground level, or Gerke's
    8-bit nDSM used as is (``dsm_source``: ``auto`` takes the DSM when every area has it). Splits: the
    official 16 train / 17 test areas, with area 30 held out of train as validation. Images and full labels
    share the name ``top_mosaic_09cm_area<N>.tif``: a file in a ``top`` folder is an image, one in
    ``gts_for_participants`` a label, any other is told apart by its pixels.
    """

    NAME = "vaihingen"
    MODALITIES: ClassVar[dict[str, int]] = {"irrg": 3, "dsm": 1}
    bytes_per_pixel = 3 + 2 + 1  # irrg uint8, dsm float16, mask
    TEST_TILES = _ids("2 4 6 8 10 12 14 16 20 22 24 27 29 31 33 35 38")
    VAL_TILES = ("30",)
    TRAIN_TILES = _ids("1 3 5 7 11 13 15 17 21 23 26 28 32 34 37")
    SPLIT_TILES: ClassVar[dict[str, tuple[str, ...]]] = {"train": TRAIN_TILES, "val": VAL_TILES, "test": TEST_TILES}
    TOP = "top_mosaic_09cm_area{id}.tif"
    DSM = "dsm_09cm_matching_area{id}.tif"
    NDSM = "dsm_09cm_matching_area{id}_normalized.jpg"
    LABEL = "top_mosaic_09cm_area{id}.tif"
    LABEL_ERODED = "top_mosaic_09cm_area{id}_noBoundary.tif"
    MAIN_ZIP = "ISPRS_semantic_labeling_Vaihingen.zip"
    LABEL_ZIP = "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip"
    ERODED_ZIP = "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip"
    NDSM_SOURCE = "Gerke's nDSM release (dsm_09cm_matching_area<N>_normalized.jpg)"
    ARCHIVES = (MAIN_ZIP, LABEL_ZIP, ERODED_ZIP)
    DSM_SOURCES = ("auto", "dsm", "ndsm")
    TREE = """<root>/                                                  (a plain unzip of each archive)
  top/top_mosaic_09cm_area1.tif, ...                       (3 bands uint8: NIR, R, G)
  dsm/dsm_09cm_matching_area1.tif, ...                     (float32 absolute heights)
  gts_for_participants/top_mosaic_09cm_area1.tif, ...      (RGB colour labels of the train areas)
  top_mosaic_09cm_area1.tif, ...                           (ground_truth_COMPLETE.zip, flat: labels of all areas)
  top_mosaic_09cm_area1_noBoundary.tif, ...                (ground_truth_eroded_COMPLETE.zip, flat: for test)
  ndsm/dsm_09cm_matching_area1_normalized.jpg, ...         (optional: Gerke's 8-bit nDSM, any folder name)"""

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike | None = None,
        num_samples: int | None = None,
        crop_size: int = 512,
        stride: int | None = None,
        seed: int = 0,
        modalities: Sequence[str] | str = ("irrg", "dsm"),
        eroded_test_labels: bool = True,
        cache_dir: str | os.PathLike | None = None,
        drop_tiles: Sequence[str] = (),
        skip_incomplete_tiles: bool = False,
        empty_dsm: str = "error",
        dsm_source: str = "auto",
        max_off_palette: float = 0.5,
        progress: bool = True,
    ) -> None:
        self.dsm_source_option = _policy(
            "dsm_source", dsm_source, self.DSM_SOURCES, "dsm: float32 DSM, ndsm: Gerke's 8-bit nDSM"
        )
        self.dsm_source = dsm_source  # auto is resolved by the discovery
        super().__init__(
            split,
            root=root,
            num_samples=num_samples,
            crop_size=crop_size,
            stride=stride,
            seed=seed,
            modalities=modalities,
            eroded_test_labels=eroded_test_labels,
            cache_dir=cache_dir,
            drop_tiles=[str(t) for t in drop_tiles],
            skip_incomplete_tiles=skip_incomplete_tiles,
            empty_dsm=empty_dsm,
            max_off_palette=max_off_palette,
            progress=progress,
        )

    @property
    def input_transforms(self) -> dict[str, dict[str, Any]]:
        """predict.py applies the same transform to the raw DSM it is given (the nDSM is used as is)."""
        return {"dsm": {"name": "heights_above_ground"}} if self.dsm_source == "dsm" else {}

    def _cache_options(self) -> dict[str, Any]:
        return {**super()._cache_options(), "dsm_source": self.dsm_source}

    def _discover(self, index: FileIndex, needed: dict[str, list[str]]) -> tuple[dict[str, dict[str, Part]], set[str]]:
        every = [t for tiles in needed.values() for t in tiles]
        known = {t for tiles in self.SPLIT_TILES.values() for t in tiles}
        full_label_splits = [s for s in needed if not (s == "test" and self.eroded_test_labels)]
        label_ids = [t for s in full_label_splits for t in needed[s]]
        eroded_ids = [t for s in needed if s not in full_label_splits for t in needed[s]]

        images: dict[str, list[Path]] = {}
        labels: dict[str, list[Path]] = {}
        for tile, paths in index.match(VAIHINGEN_AREA).items():
            for path in paths:
                folders = _ancestors(index, path)
                if "top" in folders:
                    is_label = False
                elif "gts_for_participants" in folders:
                    is_label = True
                else:
                    is_label = tile in known and looks_like_label(path)
                (labels if is_label else images).setdefault(tile, []).append(path)
        eroded = index.match(r"top_mosaic_09cm_area(?P<id>\d+)_noBoundary\.tif")
        unknown = sorted((set(labels) | set(eroded)) - known, key=int)
        if unknown:
            log.info("vaihingen: labels of area(s) %s are in no split (area 9 of the eroded zip): not read", unknown)
        raw = {
            "dsm": index.match(r"dsm_09cm_matching_area(?P<id>\d+)\.tif"),
            "ndsm": index.match(r"dsm_09cm_matching_area(?P<id>\d+)_normalized\.jpg"),
        }
        if self.dsm_source_option == "auto":
            self.dsm_source = "dsm" if _prefer(raw["dsm"], raw["ndsm"], every) else "ndsm"
            log.info(
                "vaihingen: dsm_source=%s (dataset.builder.dsm_source=auto: %d area(s) with the DSM, %d with the nDSM)",
                self.dsm_source,
                sum(t in raw["dsm"] for t in every),
                sum(t in raw["ndsm"] for t in every),
            )
            _warn_partial_variant(
                "vaihingen",
                [f"dsm_09cm_matching_area{t}.tif" for t in every if t in raw["ndsm"] and t not in raw["dsm"]],
                present=any(t in raw["dsm"] for t in every) and self.dsm_source != "dsm",
                archive="ISPRS_semantic_labeling_Vaihingen.zip (dsm/)",
                chosen="dsm_source=ndsm",
            )
        if self.dsm_source == "dsm":
            dsm = Part(
                "DSMs",
                f"dsm/{self.DSM.format(id='<N>')}",
                self.MAIN_ZIP,
                self._ones(index, "DSM", raw["dsm"], every),
                every,
                "Gerke's nDSM is accepted instead (dataset.builder.dsm_source=ndsm)",
            )
        else:
            dsm = Part(
                "nDSMs",
                self.NDSM.format(id="<N>"),
                self.NDSM_SOURCE,
                self._ones(index, "nDSM", raw["ndsm"], every),
                every,
                "the float DSM (dsm/ in the main zip) is accepted instead (dataset.builder.dsm_source=dsm)",
            )
        top = Part(
            "images",
            f"top/{self.TOP.format(id='<N>')}",
            self.MAIN_ZIP,
            self._ones(index, "image", images, every),
            every,
        )
        label = Part(
            "labels",
            self.LABEL.format(id="<N>") + " (a label)",
            self.LABEL_ZIP,
            self._ones(index, "label", labels, label_ids),
            label_ids,
            "The train areas' labels are also in gts_for_participants/ of the main zip",
        )
        eroded_part = Part(
            "eroded labels",
            self.LABEL_ERODED.format(id="<N>"),
            self.ERODED_ZIP,
            self._ones(index, "eroded label", eroded, eroded_ids),
            eroded_ids,
        )
        roles = {
            s: {"irrg": top, "dsm": dsm, "label": label if s in full_label_splits else eroded_part} for s in needed
        }
        return roles, set()

    def _check_sizes(self, tile: str, files: dict[str, Path]) -> tuple[int, int]:
        bands, h, w = raster_info(files["irrg"])
        if bands < 3:
            raise ValueError(f"{files['irrg']} has {bands} band(s); Vaihingen tops have 3 (NIR, R, G)")
        for role in ("dsm", "label"):
            _, rh, rw = raster_info(files[role])
            _check_pad_ok(tile, files[role], (rh, rw), files["irrg"], (h, w), pad=False)
        return h, w

    def _load_tile(self, tile: str) -> PreparedTile:
        files = {k: Path(v) for k, v in self.cache.sources[tile].items()}
        irrg, _ = read_raster(files["irrg"], (1, 2, 3))
        if irrg.dtype != np.uint8:
            raise ValueError(f"{files['irrg']} is {irrg.dtype}; Vaihingen tops are uint8")
        shape = irrg.shape[1:]
        raw, nodata = read_raster(files["dsm"], (1,))
        if raw.shape[1:] != shape:
            raise ValueError(
                f"size mismatch in tile {tile}: {files['dsm']} is {_hw(raw.shape)} but {files['irrg']} is {_hw(shape)}"
                f"{SIZE_FIX}"
            )
        info: dict[str, Any] = {"notes": []}
        exclude: dict[str, np.ndarray] = {}
        if self.dsm_source == "ndsm":  # Gerke's 8-bit nDSM: grey levels used as is, like Potsdam's
            height = raw.astype(np.float16)
        else:
            height, info["dsm"], exclude["dsm"] = _heights(raw[0], nodata, files["dsm"])
        if _is_empty(height):
            reason = self._empty_height(tile, files["dsm"])
            if reason:
                return PreparedTile(skip=reason)
            info["notes"].append("empty dsm kept")
        mask, info["label"] = self._label(files["label"], tile, shape, files["irrg"])
        return PreparedTile(arrays={"irrg": irrg, "dsm": height, "mask": mask}, info=info, exclude=exclude)
