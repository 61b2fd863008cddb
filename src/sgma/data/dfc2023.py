"""IEEE GRSS Data Fusion Contest 2023, track 2 (building extraction from RGB, SAR and height; ``dataset=dfc2023``).

The release after a plain unzip (names from the contest's CodaLab pages and public listings of the files)::

    track2/buildings_only_train.json          # COCO, one category (building), polygons and RLE; 1773 images
    track2/train/rgb/SV_Copenhagen_55.6770_12.5319.tif   # 512 x 512, 3 bands uint8 (also GF2_<City>_...)
    track2/train/sar/...                      # 1 band, linear backscatter (power)
    track2/train/dsm/...                      # 1 band, building heights in metres; the modality ``dsm``
    track2/val/{rgb,sar}/P_0000.tif ...       # 579 scenes, no labels, no heights
    track2_test_data/{rgb,sar}/P_0420.tif ... # 605 scenes, no labels, no heights

Files are found by name anywhere under ``root`` (:mod:`sgma.data.discovery`): the json may also sit in an
``annotations/`` folder, and the heights in ``train/height/`` (the baseline README's name) instead of
``train/dsm/``. Images are matched to the json by ``file_name`` (its basename). Only the train scenes have
labels, so val and test are carved out of them by a seeded split grouped by city (the second ``_`` token of
the name, so no city's buildings are both trained and scored on): ``val_fraction`` / ``test_fraction`` of
the images, reached by assigning shuffled cities greedily (:func:`split_by_city`); the fractions, seed and
city -> split assignment are logged and stored in the cache manifest. The unlabelled official val/test
scenes are in no split: ``predict.py input=<their folder> pattern=rgb+sar`` reads them (in the contest the
heights are a prediction target, absent from val/test, so a model for them is trained with rgb+sar).

SAR is stored as dB (``sar_scale=db``, as IMLT does: 10 log10(power) clipped to [-25, 0] dB,
:func:`sgma.data.preprocess.sar_to_db`) or left linear (``sar_scale=linear``); ``input_transforms`` tells
predict.py to convert its raw inputs the same way.

Every image is decoded once (polygons and RLE rasterised with pycocotools) into the memory-mapped cache of
:mod:`sgma.data.tiles` (``<root>/.sgma_cache/dfc2023-v<version>/`` or ``cache_dir``), whose manifest also
stores the per-modality mean/std measured on the train split (written atomically with the cache).
No-data/NaN pixels (and heights below -1000 m, :data:`~sgma.data.tiles.NODATA_BELOW`, as for ISPRS) are found
on the raw values, before the dB conversion, counted in the manifest, warned once per file and set to 0 m
(heights) and to "no return" (SAR: 0 power, i.e. -25 dB). Other heights outside
:data:`~sgma.data.tiles.HEIGHT_RANGE` ([-100, 1000] m; nothing built is taller than 828 m, so such values
are undeclared no-data or sensor failures) are clipped into it, and linear SAR values beyond the float16
storage (+-65000) are clipped to it; both are counted per image with one warning (which says how to declare
a marker as no-data) and, like no-data, left out of the train mean/std so a few bad images cannot move the
normalisation. RGB that is not uint8 is refused: clipping 16-bit values to 0..255 would saturate the image.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sgma.data.discovery import FileIndex, Part, inventory, sample, single
from sgma.data.isprs import raster_info, read_raster
from sgma.data.preprocess import SAR_DB_RANGE, sar_to_db
from sgma.data.tiles import (
    FLOAT16_LIMIT,
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

log = logging.getLogger("sgma")

NAME = "dfc2023"
CLASSES = ("background", "building")
PALETTE = ((0, 0, 0), (255, 255, 255))
SPLITS = ("train", "val", "test")
MODALITIES = {"rgb": 3, "dsm": 1, "sar": 1}  # name -> channels, in the canonical order
KINDS = {"rgb": ("optical", 255.0), "dsm": ("elevation", None), "sar": ("sar", None)}  # Modality.kind, value_max
# name -> the folders under train/ that may hold it (the release says dsm/, the baseline's README height/)
FOLDERS = {"rgb": ("rgb",), "sar": ("sar",), "dsm": ("dsm", "height")}
ANNOTATIONS = "buildings_only_train.json"
SAR_SCALES = ("db", "linear")
# <satellite>_<City>_<lat>_<lon>: SV_NewYork_40.7387_-73.9989, GF2_Brasilia_-15.8652_-47.9337
TRAIN_NAME = re.compile(r"(?P<sat>[A-Za-z0-9]+)_(?P<city>[^_]+)_(?P<lat>-?\d+(?:\.\d+)?)_(?P<lon>-?\d+(?:\.\d+)?)")
URL = "https://www.grss-ieee.org/community/technical-committees/2023-ieee-grss-data-fusion-contest/"
SOURCE = f"IEEE GRSS Data Fusion Contest 2023, track 2 (multi-task building extraction, {URL})"
ARCHIVE = "the track 2 training archive (track2/)"
TREE = """\
<root>/
  track2/buildings_only_train.json                     (COCO; or in an annotations/ folder)
  track2/train/{rgb,sar,dsm}/SV_<City>_<lat>_<lon>.tif   (512 x 512; dsm/ may be called height/)
  track2/val/{rgb,sar}/P_0000.tif, track2_test_data/{rgb,sar}/P_0420.tif   (unlabelled: for predict.py)"""

_ONCE: set[str] = set()  # info lines already logged by this process (train, val and test build the same facts)
_SUMMARIES: dict[tuple, dict[str, dict[str, int]]] = {}  # parsed annotation files by (path, size, mtime)


def _log_once(message: str) -> None:
    if message not in _ONCE:
        _ONCE.add(message)
        log.info(message)


def _missing_data(problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"{NAME}: {problem}. Get the data of the {SOURCE}. Expected tree:\n{TREE}")


def _unreadable(path: Path, err: BaseException) -> OSError:
    return read_error(path, err, "extract it again")


# what each float modality may hold: (low, high, what the values are); beyond it values are clipped (SAR in dB is
# already clipped to SAR_DB_RANGE; linear SAR only to what float16 can store)
VALID_RANGE = {"dsm": (*HEIGHT_RANGE, "height (m above ground)"), "sar": (-FLOAT16_LIMIT, FLOAT16_LIMIT, "SAR")}


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


def annotation_summary(path: Path) -> dict[str, dict[str, int]]:
    """``file_name`` basename -> {id, height, width, annotations} of a COCO file (parsed once per process
    and file version); errors name the file. A file without any annotation is refused: every mask would be
    background (the baseline's ``image_id_val.json`` lists the unlabelled val images that way)."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in _SUMMARIES:
            return _SUMMARIES[key]
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as err:
        raise _unreadable(path, err) from err
    except ValueError as err:
        raise ValueError(
            f"cannot read {path} as COCO annotations ({type(err).__name__}: {err}); the file is truncated or not a "
            f"json: extract it again"
        ) from err
    images, anns = (data.get(k) if isinstance(data, dict) else None for k in ("images", "annotations"))
    if not isinstance(images, list) or not isinstance(anns, list):
        raise ValueError(f"{path} is not a COCO annotation file (it needs lists 'images' and 'annotations')")
    if not anns:
        raise ValueError(
            f"{path} holds no annotations ({len(images)} image entries, 0 annotations): every mask would be "
            f"background. It is not a label file (the baseline's image_id_val.json / image_id_test.json only list "
            f"the unlabelled val/test images); use {ANNOTATIONS} from the track 2 release"
        )
    out: dict[str, dict[str, int]] = {}
    by_id: dict[Any, dict[str, int]] = {}
    try:
        for img in images:
            name = Path(str(img["file_name"])).name
            if name in out:
                raise ValueError(f"{path} lists the image file_name {name!r} twice")
            out[name] = by_id[img["id"]] = {
                "id": img["id"],
                "height": img.get("height"),
                "width": img.get("width"),
                "annotations": 0,
            }
        for ann in anns:
            if ann["image_id"] in by_id:
                by_id[ann["image_id"]]["annotations"] += 1
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a COCO annotation file: an image or annotation entry lacks {err} (images need id and "
            f"file_name, annotations image_id)"
        ) from err
    _SUMMARIES[key] = out
    return out


def city_of(stem: str) -> str | None:
    """The city of a train scene name (``SV_NewYork_40.7387_-73.9989`` -> ``NewYork``), None for other names."""
    m = TRAIN_NAME.fullmatch(stem)
    return m["city"] if m else None


def split_by_city(
    stems: Sequence[str], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """City -> split, so that no city is in two splits and val/test hold about their fraction of the images.

    Cities are shuffled with ``seed``; each in turn joins val or test when that brings the split closer to its
    target (``fraction * images``), else train. A split with a positive fraction (and train) that ended
    empty then takes the smallest city of the split with the most cities. Names not of the
    ``<SAT>_<City>_<lat>_<lon>`` form are their own group (keyed by the stem).
    """
    for what, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{NAME}: dataset.builder.{what}={value!r}; use a number in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"{NAME}: dataset.builder.val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no "
            f"image for training; keep their sum below 1 (defaults 0.1 + 0.1)"
        )
    groups: dict[str, int] = {}
    for stem in stems:
        city = city_of(stem) or stem
        groups[city] = groups.get(city, 0) + 1
    targets = {"val": val_fraction * len(stems), "test": test_fraction * len(stems)}
    needed = ["train", *(s for s in ("val", "test") if targets[s] > 0)]
    if len(groups) < len(needed):
        raise ValueError(
            f"{NAME}: val and test are carved out of the labelled train scenes by city, but the images come from "
            f"only {len(groups)} cit{'y' if len(groups) == 1 else 'ies'} ({', '.join(sorted(groups)) or 'none'}) "
            f"for the {len(needed)} splits {', '.join(needed)}. Use the full training release (17 cities), or set "
            f"dataset.builder.test_fraction=0 (and train with test=false) to split into train and val only"
        )
    order = sorted(groups)
    order = [order[i] for i in np.random.default_rng(int(seed)).permutation(len(order))]
    counts = dict.fromkeys(SPLITS, 0)
    out: dict[str, str] = {}
    for city in order:
        n = groups[city]
        gains = {s: abs(counts[s] - t) - abs(counts[s] + n - t) for s, t in targets.items()}
        best = max(gains, key=gains.__getitem__)
        out[city] = best if gains[best] > 0 else "train"
        counts[out[city]] += n
    for split in needed:
        if not any(s == split for s in out.values()):
            donor = max(needed, key=lambda s: sum(v == s for v in out.values()))
            city = min((c for c in order if out[c] == donor), key=groups.__getitem__)
            out[city] = split
    return dict(sorted(out.items()))


class DFC2023(CachedCropDataset):
    """DFC2023 track 2 building segmentation (classes background/building; modalities rgb, dsm, sar), with
    val and test carved out of the labelled train scenes by city."""

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
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        sar_scale: str = "db",
        skip_incomplete: bool = False,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if sar_scale not in SAR_SCALES:
            raise ValueError(f"{NAME}: dataset.builder.sar_scale={sar_scale!r}; use one of {', '.join(SAR_SCALES)}")
        self.split = split
        self.crop_size = check_crop_size(crop_size)
        if root is None or str(root) in ("", "???"):
            raise _missing_data("no data folder given: set dataset.builder.root=/path/to/dfc2023")
        self.root = Path(root).expanduser()
        self.skip_incomplete = bool(skip_incomplete)
        self.sar_scale = sar_scale
        low, high = SAR_DB_RANGE
        # predict.py applies the same conversion to the raw (linear) SAR it is given
        self.input_transforms = {"sar": {"name": "sar_to_db", "low": low, "high": high}} if sar_scale == "db" else {}
        names = parse_pattern(modalities or tuple(MODALITIES), tuple(MODALITIES))
        sources, stems = self._verify()
        cities = split_by_city(stems, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed)
        splits = self._split(stems, cities, val_fraction, test_fraction, split_seed)
        self._warn_unannotated(sources, splits)
        self.cache = TileCache(
            cache_dir or default_cache_dir(self.root, NAME),
            dataset=NAME,
            sources=sources,
            splits=splits,
            options={
                "sar_scale": sar_scale,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_seed": split_seed,
                "cities": cities,
            },
            root=self.root,
            stat_keys=tuple(MODALITIES),
        )
        self._coco: dict[str, Any] = {}
        self._prepare_cache(sources, self._load, progress=progress)
        self._coco.clear()
        self.modalities: tuple[Modality, ...] = tuple(
            Modality(n, MODALITIES[n], *self.cache.stats(n), *KINDS[n]) for n in names
        )
        self.crops = self._serve_crops(names, num_samples=num_samples, stride=stride, seed=seed)

    # -- discovery ------------------------------------------------------------------------------------
    def _verify(self) -> tuple[dict[str, dict[str, Path]], list[str]]:
        """Find the annotation file and the labelled train images; return their sources (stem -> role ->
        path) and the stems, or raise one message saying what was found where and what is missing."""
        state = folder_state(self.root)
        if state is not None:
            raise _missing_data(f"root {str(self.root)!r} {state}")
        index = FileIndex(self.root)
        if not index.files:
            raise _missing_data(f"root {str(self.root)!r} is empty")
        ann = single(
            index.match(r"(?P<id>buildings_only_train)\.json", key=lambda m: m["id"].lower()),
            f"{NAME} annotations",
            index,
        )
        ann_path = ann.get("buildings_only_train")
        labels = annotation_summary(ann_path) if ann_path else None
        train = self._train_folder(index, ann_path)
        files = {m: self._files(index, train, m) for m in MODALITIES} if train else {m: {} for m in MODALITIES}
        on_disk = sorted({s for found in files.values() for s in found})
        needed = sorted(Path(n).stem for n in labels) if labels is not None else on_disk
        if labels is not None:
            unknown = sorted(set(on_disk) - set(needed))
            if unknown:
                raise ValueError(
                    f"{NAME}: {len(unknown)} train image(s) have no image entry (file_name) in {ann_path}: "
                    f"{sample(unknown)} (e.g. {files['rgb'].get(unknown[0]) or unknown[0]}). The json and the "
                    f"images come from different releases: use the buildings_only_train.json of the same download, "
                    f"or move the extra images out of the data root"
                )
        base = "train/" if train is None else f"{index.relative(train)}/"
        name = "<SAT>_<City>_<lat>_<lon>.tif"
        parts = [
            Part(
                "train annotations",
                ANNOTATIONS,
                ARCHIVE,
                ann,
                ["buildings_only_train"],
                "It may also sit in an annotations/ folder",
            ),
            Part("train rgb images", f"{base}rgb/{name}", ARCHIVE, files["rgb"], needed),
            Part("train sar images", f"{base}sar/{name}", ARCHIVE, files["sar"], needed),
            Part("train heights", f"{base}dsm/{name}", ARCHIVE, files["dsm"], needed, "height/ is accepted for dsm/"),
        ]
        complete = [s for s in needed if all(s in files[m] for m in MODALITIES)]
        incomplete = any(p.missing for p in parts[1:])
        if ann_path is None or not complete or (incomplete and not self.skip_incomplete):
            fix = (
                ""
                if ann_path is None or not complete
                else ("\nOr set dataset.builder.skip_incomplete=true to drop the incomplete images with a warning.")
            )
            raise FileNotFoundError(inventory(NAME, index, parts, source=SOURCE) + fix)
        if incomplete:
            dropped = [s for s in needed if s not in complete]
            warnings.warn(
                f"{NAME}: dropping {len(dropped)} of {len(needed)} train image(s) that lack a modality file "
                f"(skip_incomplete=true): {sample(dropped)}",
                stacklevel=3,
            )
        self._note_unlabelled(index)
        sources = {s: {**{m: files[m][s] for m in MODALITIES}, "annotations": ann_path} for s in complete}
        return sources, complete

    def _train_folder(self, index: FileIndex, ann: Path | None) -> Path | None:
        """The ``train`` folder holding ``rgb/``: the one next to the annotation file when there are several
        (a root holding both tracks' releases)."""
        found = sorted({p.parent.parent for p in index.files if self._in_train(p) and p.parent.name.lower() == "rgb"})
        if len(found) > 1 and ann is not None:
            near = [t for t in found if t.parent in (ann.parent, ann.parent.parent)]
            found = near or found
        if len(found) > 1:
            raise ValueError(
                f"{NAME}: several train folders with rgb/ images under {str(self.root)!r}: "
                f"{', '.join(index.relative(t) for t in found)}; keep one (or set dataset.builder.root to the "
                f"track 2 folder)"
            )
        return found[0] if found else None

    @staticmethod
    def _in_train(path: Path) -> bool:
        return path.parent.parent.name.lower() == "train" and path.suffix.lower() in (".tif", ".tiff")

    def _files(self, index: FileIndex, train: Path, modality: str) -> dict[str, Path]:
        """Stem -> file of ``modality`` in ``train``; heights from ``dsm/`` or ``height/`` (both only when they
        hold the same scenes: then ``dsm/``, the release's name)."""
        per_folder = {}
        for folder in FOLDERS[modality]:
            found = index.match(
                r"(?P<id>.+)\.tiff?", where=lambda p, f=folder: p.parent.parent == train and p.parent.name.lower() == f
            )
            per_folder[folder] = single(found, f"{NAME} {index.relative(train)}/{folder}", index)
        present = {f: v for f, v in per_folder.items() if v}
        if len(present) > 1:
            (a, fa), (b, fb) = present.items()
            if set(fa) != set(fb):
                only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
                raise ValueError(
                    f"{NAME}: {index.relative(train)} has both {a}/ and {b}/ height folders with different files "
                    f"(only in {a}/: {sample(only_a) or 'none'}; only in {b}/: {sample(only_b) or 'none'}); keep "
                    f"one of them ({a}/ is the release's name)"
                )
        return next(iter(present.values()), {})

    def _note_unlabelled(self, index: FileIndex) -> None:
        """Log the official val/test scenes (no labels, no heights): they are for predict.py, not for a split."""
        scenes = index.match(r"(?P<id>P_\d+)\.tiff?", where=lambda p: p.parent.name.lower() == "rgb")
        folders: dict[Path, int] = {}
        for paths in scenes.values():
            for p in paths:
                folders[p.parent.parent] = folders.get(p.parent.parent, 0) + 1
        if folders:
            listed = ", ".join(f"{index.relative(f)}/ ({n} scenes)" for f, n in sorted(folders.items()))
            first = min(folders)
            _log_once(
                f"{NAME}: the unlabelled official scenes in {listed} are in no split (the release has no val/test "
                f"labels or heights); predict them with `python predict.py ckpt_path=... input={first} "
                f"pattern=rgb+sar` (a model trained with the rgb+sar pattern)"
            )
        others = index.match(r"(?P<id>buildings_only_(?:val|test))\.json")
        if others:
            _log_once(
                f"{NAME}: not read: {', '.join(index.relative(p) for v in others.values() for p in v)} (val and test "
                f"are carved out of {ANNOTATIONS} by city)"
            )

    def _split(
        self, stems: list[str], cities: Mapping[str, str], val_fraction: float, test_fraction: float, seed: int
    ) -> dict[str, list[str]]:
        splits: dict[str, list[str]] = {s: [] for s in SPLITS}
        for stem in stems:
            splits[cities[city_of(stem) or stem]].append(stem)
        loose = [s for s in stems if city_of(s) is None]
        if loose:
            warnings.warn(
                f"{NAME}: {len(loose)} train image name(s) are not <SAT>_<City>_<lat>_<lon>.tif ({sample(loose)}): "
                f"each is its own group in the split by city",
                stacklevel=3,
            )
        per_split = []
        for s in SPLITS:
            own = sorted(c for c, v in cities.items() if v == s)
            per_split.append(f"{s} {len(splits[s])} images from {len(own)} cities ({sample(own, 8)})")
        _log_once(
            f"{NAME}: val/test carved out of the labelled train scenes by city (val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}, split_seed={seed}): {'; '.join(per_split)}"
        )
        if not splits[self.split]:
            raise ValueError(
                f"{NAME}: the {self.split} split is empty (dataset.builder.{self.split}_fraction="
                f"{val_fraction if self.split == 'val' else test_fraction}); set it above 0"
                + (" or train with test=false" if self.split == "test" else "")
            )
        return splits

    def _warn_unannotated(self, sources: Mapping[str, Mapping[str, Path]], splits: Mapping[str, list[str]]) -> None:
        """One warning with the counts of images without any annotation (all background), per split."""
        labels = annotation_summary(next(iter(sources.values()))["annotations"])
        empty = {
            s: sum(labels[sources[t]["rgb"].name]["annotations"] == 0 for t in tiles) for s, tiles in splits.items()
        }
        total = sum(empty.values())
        if total:
            warnings.warn(
                f"{NAME}: {total} of {len(sources)} labelled image(s) have no annotation, so their masks are all "
                f"background ({', '.join(f'{s} {n}' for s, n in empty.items())}); the release has a few such images",
                stacklevel=3,
            )

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

    def _read_float(self, path: Path, modality: str, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """One float band, no-data filled, SAR in the configured scale, outliers clipped; and the pixels to
        leave out of the statistics. No-data is found on the raw values: after the dB conversion a declared
        no-data value would be an ordinary -25 dB."""
        raw, nodata = read_raster(path, (1,))
        x = raw.astype(np.float32)
        invalid = ~np.isfinite(x)
        if nodata is not None and np.isfinite(nodata):
            invalid |= x == np.float32(nodata)
        if modality == "dsm":  # -9999, -32768, -3.4e38: an undeclared marker, not a 1 km deep pit
            invalid |= x < NODATA_BELOW
        n = info["nodata_pixels"][modality] = int(invalid.sum())
        fill, filled = 0.0, "0 m" if modality == "dsm" else "0 power (no return)"  # 0 m above ground
        if modality == "sar" and self.sar_scale == "db":
            x = sar_to_db(np.where(invalid, np.float32(0), x))
            fill, filled = SAR_DB_RANGE[0], f"{SAR_DB_RANGE[0]:g} dB (no return)"
        x[invalid] = fill
        if n:
            warnings.warn(f"{path}: {n} no-data/NaN pixel(s) set to {filled}", stacklevel=3)
        low, high, what = VALID_RANGE[modality]
        clipped, outliers, counts = clip_outliers(x, low, high)
        info["outliers"][modality] = counts
        if counts["below"] or counts["above"]:
            # an undeclared no-data marker is one repeated value: name the commonest (unrounded) for the fix
            values, repeats = np.unique(x[outliers], return_counts=True)
            marker = str(values[repeats.argmax()]).removesuffix(".0")  # float32's shortest round-trip text
            warnings.warn(
                f"{outlier_message(path, what, low, high, counts)}. If {marker} marks no-data, declare it as the "
                f"raster's nodata tag (`gdal_edit.py -a_nodata {marker} {path}`) so it is filled with {filled} "
                f"instead of clipped",
                stacklevel=3,
            )
        return clipped.astype(np.float16), (invalid | outliers)[0]

    def _load(self, tile: str) -> PreparedTile:
        files = {k: Path(v) for k, v in self.cache.sources[tile].items()}
        rgb, _ = read_raster(files["rgb"], (1, 2, 3))
        if rgb.dtype != np.uint8:  # clipping 16-bit or float values to 0..255 would saturate the image
            finite = rgb[np.isfinite(rgb)].astype(np.float64)
            values = f"values {finite.min():g}..{finite.max():g}" if finite.size else "no finite value"
            raise ValueError(
                f"{files['rgb']} is {rgb.dtype} ({values}); the release's rgb images are 8-bit: rescale it to "
                f"0..255 as uint8, with one input range for all images (e.g. `gdal_translate -ot Byte -scale <low> "
                f"<high> 0 255 IN OUT`), or extract the release's file again"
            )
        arrays: dict[str, np.ndarray] = {"rgb": rgb}
        exclude: dict[str, np.ndarray] = {}
        info: dict[str, Any] = {"nodata_pixels": {}, "outliers": {}}
        for m in ("dsm", "sar"):
            arrays[m], exclude[m] = self._read_float(files[m], m, info)
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
