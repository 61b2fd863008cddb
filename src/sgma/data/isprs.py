"""ISPRS 2D semantic labelling benchmark: Potsdam (rgb, nir, dsm) and Vaihingen (irrg, dsm).

Both read the official on-disk layout (see ``Potsdam.TREE`` / ``Vaihingen.TREE``), decode every tile once
into a memory-mapped :class:`~sgma.data.tiles.TileCache` and serve crops: ``num_samples`` random crops
per epoch for training, a deterministic sliding grid covering every tile for val/test (each pixel scored
once). Samples follow the dataset contract of :mod:`sgma.data.synthetic`: raw float32 (C, H, W) per
modality and an int64 ``mask`` with 255 = ignore; ``modalities`` carry the mean/std measured on the train
tiles (the cache manifest's statistics).

Known defects and what happens to them (all recorded in the cache manifest):

* colour labels are decoded with the exact palette in RGB order; black (0, 0, 0) = eroded boundary ->
  ignore; any other colour -> ignore, counted per tile and warned, never mapped to a class; a label with
  more than ``max_off_palette`` (50 %) foreign colours is an error (wrong file or BGR channel order);
* Potsdam ``5_Labels_all/top_potsdam_4_12_label.tif`` is an overlay, not a mask: the copy in
  ``5_Labels_for_participants`` is used; without it ``broken_labels`` = ``error`` (default) or ``skip``
  (drop the tile with a warning);
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

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sgma.data.tiles import (
    HEIGHT_RANGE,
    CachedCropDataset,
    PreparedTile,
    TileCache,
    check_crop_size,
    clip_outliers,
    default_cache_dir,
    file_state,
    folder_state,
    not_files,
    outlier_message,
    read_error,
)
from sgma.modalities import Modality, parse_pattern

CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))  # RGB order
IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(len(CLASSES))
BOUNDARY = (0, 0, 0)  # eroded labels: boundary pixels -> ignore
IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
ISPRS_URL = "https://www.isprs.org/education/benchmarks/UrbanSemLab/default.aspx"
NODATA_BELOW = -1000.0  # DSM values below this are no-data whatever the file's nodata tag says
GROUND_PERCENTILE = 2.0
BGR_SUSPECT = 0.3  # share of car + clutter pixels above which a label is probably in BGR order


# ---------------------------------------------------------------------------------------------- labels
def _pack(rgb: np.ndarray) -> np.ndarray:
    return (rgb[0].astype(np.int32) << 16) | (rgb[1].astype(np.int32) << 8) | rgb[2].astype(np.int32)


def decode_labels(
    rgb: np.ndarray, path: str | os.PathLike = "<array>", *, max_off_palette: float = 0.5
) -> tuple[np.ndarray, dict[str, Any]]:
    """(3, H, W) uint8 colour label in RGB order -> (H, W) uint8 class ids (255 = ignore) and statistics.

    Exact palette colours map to their class; black (boundary) and any other colour map to ignore. Foreign
    colours are counted (``off_palette``); above ``max_off_palette`` of the tile it is an error.
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
    FOLDERS: ClassVar[tuple[str, ...]]
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
            stat_keys=tuple(self.MODALITIES),
        )
        self._prepare_cache(sources, self._load_tile, progress=progress)
        self.modalities: tuple[Modality, ...] = tuple(
            Modality(n, self.MODALITIES[n], *self.cache.stats(n)) for n in names
        )
        self.crops = self._serve_crops(names, num_samples=num_samples, stride=stride, seed=self.seed)

    # -- subclass hooks -------------------------------------------------------------------------------
    def _tile_files(self, tile: str, split: str) -> dict[str, Path]:
        """Every source file tile ``tile`` of ``split`` is built from, by role (raise _SkipTile to drop)."""
        raise NotImplementedError

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
            f"{self.NAME}: {problem}. Expected these folders under dataset.builder.root={str(self.root)!r}: "
            f"{', '.join(self.FOLDERS)}. Get the data from the ISPRS 2D semantic labelling benchmark "
            f"({ISPRS_URL}; the archives unpack into the folders above). Expected tree:\n{self.TREE}"
        )

    def _verify(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        """Check the root and every tile's files; return (sources per tile, tile ids per split)."""
        state = folder_state(self.root)
        if state is not None:
            raise self._missing_data_error(f"root {str(self.root)!r} {state}")
        entries = [p.name for p in self.root.iterdir() if p.name != ".sgma_cache"]
        if not entries:
            raise self._missing_data_error(f"root {str(self.root)!r} is empty")
        if not any((self.root / f).is_dir() for f in self.FOLDERS):
            raise self._missing_data_error(
                f"none of the expected folders is in {str(self.root)!r} (it holds {sorted(entries)[:8]})"
            )
        sources: dict[str, dict[str, Path]] = {}
        splits: dict[str, list[str]] = {}
        for split, tiles in self.SPLIT_TILES.items():
            splits[split] = []
            for tile in tiles:
                if tile in self.drop_tiles:
                    continue
                try:
                    files = self._tile_files(tile, split)
                except _SkipTile as skip:
                    warnings.warn(f"{self.NAME}: dropping tile {tile}: {skip}", stacklevel=3)
                    continue
                problems = not_files(list(files.values()))
                if problems:
                    if not self.skip_incomplete_tiles:
                        raise self._missing_file_error(tile, problems)
                    warnings.warn(
                        f"{self.NAME}: dropping tile {tile} ({split}): {'; '.join(problems)} "
                        f"(dataset.builder.skip_incomplete_tiles=true)",
                        stacklevel=3,
                    )
                    continue
                sources[tile] = files
                splits[split].append(tile)
        if not splits[self.split]:
            raise self._missing_data_error(f"no complete tile left in the {self.split} split")
        return sources, splits

    def _missing_file_error(self, tile: str, problems: list[str]) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.NAME} tile {tile}: {'; '.join(problems)}. Put the file there (from the ISPRS archive, "
            f"{ISPRS_URL}), or set dataset.builder.skip_incomplete_tiles=true to drop incomplete tiles with a "
            f"warning."
        )

    # -- shared decoding --------------------------------------------------------------------------------
    def _label(self, path: Path, tile: str, shape: tuple[int, int], ref: Path) -> tuple[np.ndarray, dict]:
        rgb, _ = read_raster(path, (1, 2, 3))
        if rgb.shape[1:] != shape:
            raise ValueError(f"{path} is {_hw(rgb.shape[1:])} but {ref} is {_hw(shape)}")
        mask, stats = decode_labels(rgb, path, max_off_palette=self.max_off_palette)
        if stats["off_palette"]:
            warnings.warn(
                f"{path}: {stats['off_palette']} pixel(s) with colours outside the ISPRS palette set to ignore "
                f"(255); counted in the cache manifest",
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


class _SkipTile(Exception):
    """Raised by ``_tile_files`` to drop a tile by policy (the message says why)."""


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
    raise ValueError(f"size mismatch in tile {tile}: {path} is {_hw((h, w))} but {ref} is {_hw(shape)}")


def _check_pad_ok(tile: str, path: Path, size: tuple[int, int], ref: Path, ref_size: tuple[int, int], *, pad: bool):
    dh, dw = ref_size[0] - size[0], ref_size[1] - size[1]
    if (dh, dw) == (0, 0) or (pad and dh in (0, 1) and dw in (0, 1)):
        return
    raise ValueError(f"size mismatch in tile {tile}: {path} is {_hw(size)} but {ref} is {_hw(ref_size)}")


POTSDAM_TILES = _ids(
    "2_10 2_11 2_12 2_13 2_14 3_10 3_11 3_12 3_13 3_14 4_10 4_11 4_12 4_13 4_14 4_15 5_10 5_11 5_12 5_13 "
    "5_14 5_15 6_7 6_8 6_9 6_10 6_11 6_12 6_13 6_14 6_15 7_7 7_8 7_9 7_10 7_11 7_12 7_13"
)
POTSDAM_TEST = _ids("2_13 2_14 3_13 3_14 4_13 4_14 4_15 5_13 5_14 5_15 6_13 6_14 6_15 7_13")
POTSDAM_VAL = ("2_10",)


class Potsdam(_ISPRSDataset):
    """ISPRS Potsdam: 38 tiles of 6000 x 6000 px at 5 cm; modalities ``rgb`` (3), ``nir`` (1), ``dsm`` (1).

    ``dsm`` is the 8-bit nDSM (``dsm_source="ndsm"``, default) or the raw float32 DSM normalised per tile
    (``dsm_source="dsm"``). Splits: the official 24 train / 14 test tiles, with 2_10 held out of train as
    validation; ``drop_tiles`` (default 7_10, annotation errors) are removed. Test uses the eroded labels
    unless ``eroded_test_labels=False``.
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
    RGBIR = "4_Ortho_RGBIR/top_potsdam_{id}_RGBIR.tif"
    NDSM = "1_DSM_normalisation/dsm_potsdam_{padded}_normalized_lastools.jpg"
    DSM = "1_DSM/dsm_potsdam_{padded}.tif"
    LABEL = "5_Labels_all/top_potsdam_{id}_label.tif"
    LABEL_ERODED = "5_Labels_all_noBoundary/top_potsdam_{id}_label_noBoundary.tif"
    # tiles whose 5_Labels_all label is broken (an overlay, not a mask) -> the correct copy
    BROKEN_LABELS: ClassVar[dict[str, str]] = {"4_12": "5_Labels_for_participants/top_potsdam_4_12_label.tif"}
    FOLDERS = ("4_Ortho_RGBIR", "1_DSM_normalisation", "5_Labels_all", "5_Labels_all_noBoundary")
    TREE = """<root>/
  4_Ortho_RGBIR/top_potsdam_2_10_RGBIR.tif, ...                        (4 bands uint8: R, G, B, IR)
  1_DSM_normalisation/dsm_potsdam_02_10_normalized_lastools.jpg, ...   (8-bit nDSM; zero-padded ids)
  1_DSM/dsm_potsdam_02_10.tif, ...                                     (only for dsm_source=dsm)
  5_Labels_all/top_potsdam_2_10_label.tif, ...                         (RGB colour labels)
  5_Labels_all_noBoundary/top_potsdam_2_10_label_noBoundary.tif, ...   (eroded labels, for test)
  5_Labels_for_participants/top_potsdam_4_12_label.tif                 (correct copy of the broken 4_12)"""

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
        return {**super()._cache_options(), "broken_labels": self.broken_labels, "dsm_source": self.dsm_source}

    def _tile_files(self, tile: str, split: str) -> dict[str, Path]:
        ids = {"id": tile, "padded": self.padded(tile)}
        eroded = split == "test" and self.eroded_test_labels
        label = self.root / (self.LABEL_ERODED if eroded else self.LABEL).format(**ids)
        if not eroded and tile in self.BROKEN_LABELS:
            fixed = self.root / self.BROKEN_LABELS[tile]
            if fixed.is_file():
                label = fixed
            else:
                problem = (
                    f"{self.LABEL.format(**ids)} is a known-broken overlay, not a mask, and its correct copy "
                    f"{fixed} {file_state(fixed)} (from 5_Labels_for_participants.zip)"
                )
                if self.broken_labels == "skip":
                    raise _SkipTile(f"{problem}; dataset.builder.broken_labels=skip")
                raise FileNotFoundError(
                    f"{problem}. Add that file or set dataset.builder.broken_labels=skip to drop tile {tile}."
                )
        height = self.NDSM if self.dsm_source == "ndsm" else self.DSM
        return {
            "rgbir": self.root / self.RGBIR.format(**ids),
            "dsm": self.root / height.format(**ids),
            "label": label,
        }

    def _check_sizes(self, tile: str, files: dict[str, Path]) -> tuple[int, int]:
        bands, h, w = raster_info(files["rgbir"])
        if bands < 4:
            raise ValueError(f"{files['rgbir']} has {bands} band(s); RGBIR tiles have 4 (R, G, B, IR)")
        _, lh, lw = raster_info(files["label"])
        _check_pad_ok(tile, files["label"], (lh, lw), files["rgbir"], (h, w), pad=False)
        _, dh, dw = raster_info(files["dsm"])
        _check_pad_ok(tile, files["dsm"], (dh, dw), files["rgbir"], (h, w), pad=True)
        return h, w

    def _load_tile(self, tile: str) -> PreparedTile:
        files = self.cache.sources[tile]
        rgbir_path, dsm_path, label_path = Path(files["rgbir"]), Path(files["dsm"]), Path(files["label"])
        rgbir, _ = read_raster(rgbir_path, (1, 2, 3, 4))
        if rgbir.dtype != np.uint8:
            raise ValueError(f"{rgbir_path} is {rgbir.dtype}; RGBIR tiles are uint8")
        shape = rgbir.shape[1:]
        info: dict[str, Any] = {"notes": []}
        exclude: dict[str, np.ndarray] = {}
        if self.dsm_source == "ndsm":  # 8-bit grey levels: no no-data, no outliers possible
            height, _ = read_raster(dsm_path, (1,))
            height, note = _fit_to(height, shape, dsm_path, rgbir_path, tile)
            height = height.astype(np.float16)
        else:
            raw, nodata = read_raster(dsm_path, (1,))
            raw, note = _fit_to(raw, shape, dsm_path, rgbir_path, tile)
            height, info["dsm"], exclude["dsm"] = _heights(raw[0], nodata, dsm_path)
        if note:
            info["notes"].append(note)
        if _is_empty(height):
            reason = self._empty_height(tile, dsm_path)
            if reason:
                return PreparedTile(skip=reason)
            info["notes"].append("empty dsm kept")
        mask, info["label"] = self._label(label_path, tile, shape, rgbir_path)
        arrays = {"rgb": rgbir[:3], "nir": rgbir[3:4], "dsm": height, "mask": mask}
        return PreparedTile(arrays=arrays, info=info, exclude=exclude)


class Vaihingen(_ISPRSDataset):
    """ISPRS Vaihingen: 33 labelled areas (about 2000 x 2500 px at 9 cm); modalities ``irrg`` (3) and ``dsm``.

    ``dsm`` is the float32 absolute-height DSM turned into heights above a per-tile ground level. Splits:
    the official 16 train / 17 test areas, with area 30 held out of train as validation.
    Note: in the original release ``gts_for_participants`` holds only the train areas; put the test areas'
    labels (the "complete" ground-truth release) in the same folders.
    """

    NAME = "vaihingen"
    MODALITIES: ClassVar[dict[str, int]] = {"irrg": 3, "dsm": 1}
    bytes_per_pixel = 3 + 2 + 1  # irrg uint8, dsm float16, mask
    TEST_TILES = _ids("2 4 6 8 10 12 14 16 20 22 24 27 29 31 33 35 38")
    VAL_TILES = ("30",)
    TRAIN_TILES = _ids("1 3 5 7 11 13 15 17 21 23 26 28 32 34 37")
    SPLIT_TILES: ClassVar[dict[str, tuple[str, ...]]] = {"train": TRAIN_TILES, "val": VAL_TILES, "test": TEST_TILES}
    TOP = "top/top_mosaic_09cm_area{id}.tif"
    DSM = "dsm/dsm_09cm_matching_area{id}.tif"
    LABEL = "gts_for_participants/top_mosaic_09cm_area{id}.tif"
    LABEL_ERODED = "gts_eroded_for_participants/top_mosaic_09cm_area{id}_noBoundary.tif"
    FOLDERS = ("top", "dsm", "gts_for_participants", "gts_eroded_for_participants")
    TREE = """<root>/
  top/top_mosaic_09cm_area1.tif, ...                                    (3 bands uint8: NIR, R, G)
  dsm/dsm_09cm_matching_area1.tif, ...                                  (float32 absolute heights)
  gts_for_participants/top_mosaic_09cm_area1.tif, ...                   (RGB colour labels)
  gts_eroded_for_participants/top_mosaic_09cm_area1_noBoundary.tif, ... (eroded labels, for test)"""

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
        max_off_palette: float = 0.5,
        progress: bool = True,
    ) -> None:
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

    def _tile_files(self, tile: str, split: str) -> dict[str, Path]:
        eroded = split == "test" and self.eroded_test_labels
        return {
            "irrg": self.root / self.TOP.format(id=tile),
            "dsm": self.root / self.DSM.format(id=tile),
            "label": self.root / (self.LABEL_ERODED if eroded else self.LABEL).format(id=tile),
        }

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
            )
        height, dsm_info, not_measured = _heights(raw[0], nodata, files["dsm"])
        info: dict[str, Any] = {"dsm": dsm_info, "notes": []}
        if _is_empty(height):
            reason = self._empty_height(tile, files["dsm"])
            if reason:
                return PreparedTile(skip=reason)
            info["notes"].append("empty dsm kept")
        mask, info["label"] = self._label(files["label"], tile, shape, files["irrg"])
        return PreparedTile(
            arrays={"irrg": irrg, "dsm": height, "mask": mask}, info=info, exclude={"dsm": not_measured}
        )
