"""IEEE GRSS Data Fusion Contest 2023, track 2 (building extraction from RGB, SAR and height; ``dataset=dfc2023``).

Layout under ``root``::

    train/rgb/P0001.tif      # 512 x 512, 3 bands uint8
    train/sar/P0001.tif      # 1 band
    train/height/P0001.tif   # 1 band float (metres); exposed as the modality ``dsm``
    val/...  test/...        # same folders
    annotations/buildings_only_train.json   # COCO polygons, images matched by file_name
    annotations/buildings_only_val.json
    annotations/buildings_only_test.json    # often not distributed: split=test then fails with a clear error

Every image is decoded once (polygons rasterised with pycocotools) into the memory-mapped cache of
:mod:`sgma.data.tiles` (``<root>/.sgma_cache/dfc2023-v<version>/`` or ``cache_dir``), whose manifest also
stores the per-modality mean/std measured on the train split (written atomically with the cache).
No-data/NaN heights and SAR values are set to 0 and counted in the manifest. The height maps are metres
above the ground: values outside :data:`~sgma.data.tiles.HEIGHT_RANGE` ([-100, 1000] m; nothing built is
taller than 828 m, so such values are undeclared no-data or sensor failures) are clipped into it, and SAR
values beyond the float16 storage (+-65000) are clipped to it; both are counted per image with one warning
and, like no-data, left out of the train mean/std so a few bad images cannot move the normalisation.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sgma.data.isprs import raster_info, read_raster
from sgma.data.tiles import (
    FLOAT16_LIMIT,
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

NAME = "dfc2023"
CLASSES = ("background", "building")
PALETTE = ((0, 0, 0), (255, 255, 255))
SPLITS = ("train", "val", "test")
MODALITIES = {"rgb": ("rgb", 3), "dsm": ("height", 1), "sar": ("sar", 1)}  # name -> (folder, channels)
URL = "https://www.grss-ieee.org/community/technical-committees/2023-ieee-grss-data-fusion-contest/"
ANNOTATIONS = "annotations/buildings_only_{split}.json"
TREE = """\
<root>/
  train/rgb/P0001.tif  train/sar/P0001.tif  train/height/P0001.tif   (512 x 512)
  val/rgb/...          val/sar/...          val/height/...
  test/rgb/...         test/sar/...         test/height/...
  annotations/buildings_only_train.json  buildings_only_val.json  buildings_only_test.json   (COCO)"""


def _missing_data(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{NAME}: {problem}. Get the data of the IEEE GRSS Data Fusion Contest 2023, track 2 (multi-task building "
        f"extraction, {URL}; the archives unpack into the tree below). Expected tree:\n{TREE}"
    )


# what each float modality may hold: (low, high, what the values are); beyond it values are clipped
VALID_RANGE = {"dsm": (*HEIGHT_RANGE, "height (m above ground)"), "sar": (-FLOAT16_LIMIT, FLOAT16_LIMIT, "SAR")}


def _unreadable(path: Path, err: BaseException) -> OSError:
    return read_error(path, err, "extract it again")


def load_coco(path: Path):
    """A pycocotools ``COCO`` index of ``path`` (its load messages silenced); OSError naming a bad file."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except OSError as err:
        raise _unreadable(path, err) from err
    except (ValueError, KeyError, TypeError) as err:  # JSON or COCO structure
        raise ValueError(
            f"cannot read {path} as COCO annotations ({type(err).__name__}: {err}); the file is truncated or not "
            f"a COCO json: extract it again"
        ) from err


def rasterise(coco, image_id: int, height: int, width: int) -> np.ndarray:
    """Union of the image's annotations (polygons or RLE) as a (H, W) uint8 0/1 building mask.

    Polygon vertices are pixel-corner coordinates: the square (x0, y0)-(x1, y1) covers columns x0..x1-1
    and rows y0..y1-1.
    """
    from pycocotools import mask as mask_utils

    out = np.zeros((height, width), np.uint8)
    for ann in coco.imgToAnns.get(image_id, []):
        seg = ann.get("segmentation")
        if not seg:
            continue
        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        with warnings.catch_warnings():  # pycocotools vs numpy 2 copy-keyword deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            out |= mask_utils.decode(rle).astype(np.uint8)
    return out


class DFC2023(CachedCropDataset):
    """DFC2023 track 2 building segmentation (classes background/building; modalities rgb, dsm, sar)."""

    item_name = "images"
    bytes_per_pixel = 3 + 2 + 2 + 1  # rgb uint8, height and sar float16, mask

    classes: ClassVar[tuple[str, ...]] = CLASSES
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = PALETTE
    NAME = NAME

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
        skip_incomplete: bool = False,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.split = split
        self.crop_size = check_crop_size(crop_size)
        if root is None or str(root) in ("", "???"):
            raise _missing_data("no data folder given: set dataset.builder.root=/path/to/dfc2023")
        self.root = Path(root).expanduser()
        self.skip_incomplete = bool(skip_incomplete)
        names = parse_pattern(modalities or tuple(MODALITIES), tuple(MODALITIES))
        sources, splits = self._verify()
        self.cache = TileCache(
            cache_dir or default_cache_dir(self.root, NAME),
            dataset=NAME,
            sources=sources,
            splits=splits,
            options={},
            stat_keys=tuple(MODALITIES),
        )
        self._coco: dict[str, Any] = {}
        self._prepare_cache(sources, self._load, progress=progress)
        self._coco.clear()
        self.modalities: tuple[Modality, ...] = tuple(
            Modality(n, MODALITIES[n][1], *self.cache.stats(n)) for n in names
        )
        self.crops = self._serve_crops(names, num_samples=num_samples, stride=stride, seed=seed)

    # -- verification ---------------------------------------------------------------------------------
    def _verify(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        state = folder_state(self.root)
        if state is not None:
            raise _missing_data(f"root {str(self.root)!r} {state}")
        entries = [p.name for p in self.root.iterdir() if p.name != ".sgma_cache"]
        if not entries:
            raise _missing_data(f"root {str(self.root)!r} is empty")
        if not (self.root / "train").is_dir():
            raise _missing_data(f"no train/ folder in {str(self.root)!r} (it holds {sorted(entries)[:8]})")
        needed = ["train", *([self.split] if self.split != "train" else [])]
        sources: dict[str, dict[str, Path]] = {}
        splits: dict[str, list[str]] = {}
        for split in SPLITS:
            ann = self.root / ANNOTATIONS.format(split=split)
            if ann.exists() and not ann.is_file():
                raise _missing_data(f"the {split} annotation file {ann} {file_state(ann)}")
            if not ann.is_file():
                if split == "test" and split in needed:
                    raise FileNotFoundError(
                        f"{NAME}: split=test needs {ann}, but there is no test annotation file (the contest did not "
                        f"release test labels with the images). Put buildings_only_test.json there, or train with "
                        f"test=false and score the val split with eval.py ckpt_path=... split=val"
                    )
                if split in needed:
                    raise _missing_data(f"missing the {split} annotation file {ann}")
                continue  # an optional split nobody asked for
            folder = self.root / split / MODALITIES["rgb"][0]
            if not folder.is_dir():
                raise _missing_data(f"missing folder {folder}")
            names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
            if not names:
                raise _missing_data(f"no .tif image in {folder}")
            splits[split] = []
            for name in names:
                files = {m: self.root / split / folder_ for m, (folder_, _) in MODALITIES.items()}
                files = {m: f / name for m, f in files.items()}
                problems = not_files(list(files.values()))
                if problems:
                    if not self.skip_incomplete:
                        raise FileNotFoundError(
                            f"{NAME}: {'; '.join(problems)} (its rgb image exists); put the file there (extract it "
                            f"again) or set dataset.builder.skip_incomplete=true to drop incomplete images with a "
                            f"warning"
                        )
                    warnings.warn(f"{NAME}: dropping {split}/{name}: {'; '.join(problems)}", stacklevel=3)
                    continue
                files["annotations"] = ann
                tile = f"{split}-{Path(name).stem}"
                sources[tile] = files
                splits[split].append(tile)
        if not splits.get(self.split):
            raise _missing_data(f"no complete image in the {self.split} split")
        return sources, splits

    def _check_sizes(self, tile: str, files: dict[str, Path]) -> tuple[int, int]:
        bands, h, w = raster_info(files["rgb"])
        if bands < 3:
            raise ValueError(f"{files['rgb']} has {bands} band(s); DFC2023 rgb images have 3")
        for m in ("dsm", "sar"):
            _, rh, rw = raster_info(files[m])
            if (rh, rw) != (h, w):
                raise ValueError(f"size mismatch: {files[m]} is {rh} x {rw} px but {files['rgb']} is {h} x {w} px")
        return h, w

    # -- decoding -------------------------------------------------------------------------------------
    def _coco_of(self, path: Path) -> tuple[Any, dict[str, int]]:
        key = str(path)
        if key not in self._coco:
            coco = load_coco(path)
            by_name = {Path(img["file_name"]).name: img_id for img_id, img in coco.imgs.items()}
            self._coco[key] = (coco, by_name)
        return self._coco[key]

    def _load(self, tile: str) -> PreparedTile:
        files = {k: Path(v) for k, v in self.cache.sources[tile].items()}
        rgb, _ = read_raster(files["rgb"], (1, 2, 3))
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        arrays: dict[str, np.ndarray] = {"rgb": rgb}
        exclude: dict[str, np.ndarray] = {}
        info: dict[str, Any] = {"nodata_pixels": {}, "outliers": {}}
        for m in ("dsm", "sar"):
            raw, nodata = read_raster(files[m], (1,))
            x = raw.astype(np.float32)
            invalid = ~np.isfinite(x)
            if nodata is not None and np.isfinite(nodata):
                invalid |= x == np.float32(nodata)
            info["nodata_pixels"][m] = int(invalid.sum())
            x[invalid] = 0
            low, high, what = VALID_RANGE[m]
            x, outliers, counts = clip_outliers(x, low, high)
            info["outliers"][m] = counts
            if counts["below"] or counts["above"]:
                warnings.warn(outlier_message(files[m], what, low, high, counts), stacklevel=2)
            arrays[m] = x.astype(np.float16)
            exclude[m] = (invalid | outliers)[0]
        coco, by_name = self._coco_of(files["annotations"])
        name = files["rgb"].name
        if name not in by_name:
            raise ValueError(f"{files['annotations']} has no image entry with file_name {name!r} (for {files['rgb']})")
        img = coco.imgs[by_name[name]]
        h, w = rgb.shape[1:]
        if (img.get("height", h), img.get("width", w)) != (h, w):
            raise ValueError(
                f"{files['annotations']}: image {name!r} is {img.get('height')} x {img.get('width')} px there but "
                f"{files['rgb']} is {h} x {w} px"
            )
        mask = rasterise(coco, by_name[name], h, w)
        info["building_pixels"] = int(mask.sum())
        return PreparedTile(arrays={**arrays, "mask": mask}, info=info, exclude=exclude)

    # -- dataset protocol (shared parts in tiles.CachedCropDataset) ---------------------------------
    @property
    def images(self) -> list[str]:
        return list(self.crops.shapes)
