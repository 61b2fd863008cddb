"""Your own data: one folder per modality plus one for labels, files matched by stem (``dataset=folder``).

Layout (``root`` is the folder you pass as ``dataset.builder.root``)::

    <root>/dataset.yaml            # or dataset.json: modalities, classes, palette, splits (see EXAMPLE_YAML)
    <root>/<modality>/<stem>.tif   # one folder per modality; .tif/.tiff (rasterio) or .png/.jpg (PIL)
    <root>/labels/<stem>.png       # single-band class ids, or RGB colours when the yaml has a palette
    <root>/splits/train.txt        # optional: one stem per line (also val.txt, test.txt)

Splits, first match wins: (1) ``<root>/splits/{train,val,test}.txt``; (2) ``splits:`` lists in the yaml;
(3) a seeded random split of all stems with ``val_fraction``/``test_fraction``/``split_seed`` from the yaml
(defaults 0.1 / 0.1 / 0); stems on disk that lists (1) or (2) leave out are not used, with a warning. Each
raster has exactly its modality's ``channels`` bands, and unknown keys in the yaml are refused. Every image
is decoded once into the memory-mapped cache of :mod:`sgma.data.tiles` (``<root>/.sgma_cache/folder-v<version>/``
or ``cache_dir``): uint8 pixels stay uint8, any other dtype is stored as float16 (about 3 significant digits;
rescale 16-bit data beforehand if that matters). No-data values (per modality ``nodata``) and NaNs are set to 0
and counted in the manifest.
A modality may declare the physical range of its values (``valid_range: [low, high]``, e.g. ``[-100, 1000]``
for heights in metres above ground): values outside it are clipped into it, and float values beyond the
float16 storage (+-65000) are clipped to it; both are counted per image with one warning. Missing
``mean``/``std`` are measured on the train split, leaving no-data and clipped pixels out, and stored in the
cache manifest. ``kind`` (optical, elevation, sar, categorical, other: the default) and, for optical images,
``value_max`` tell the training augmentation how to treat a modality (:mod:`sgma.data.augment`); they are not
part of the cache's identity.

Training reads random ``crop_size`` crops, fresh each epoch (images smaller than the crop are padded with
ignore labels);
val/test read a sliding grid that scores every pixel once. Modality names are free (lowercase, no ``+``),
so use ``missing=uniform`` or ``missing=pattern missing.pattern=a+b`` rather than a named pattern option.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sgma.data.isprs import raster_info, read_raster
from sgma.data.tiles import (
    FLOAT16_LIMIT,
    CachedCropDataset,
    PreparedTile,
    TileCache,
    check_crop_size,
    clip_outliers,
    default_cache_dir,
    file_state,
    folder_state,
    outlier_message,
    read_error,
)
from sgma.modalities import KINDS, SEPARATOR, Modality, parse_pattern

log = logging.getLogger("sgma")

NAME = "folder"
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABELS = "labels"
CONFIG_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")
IGNORE_INDEX = 255  # what the framework reads as "ignore" in every mask
DESCRIPTION_KEYS = (
    "modalities",
    "classes",
    "palette",
    "ignore_index",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "splits",
)
MODALITY_KEYS = ("name", "channels", "kind", "value_max", "mean", "std", "nodata", "valid_range")

TREE = """\
<root>/
  dataset.yaml              # description (example below)
  rgb/tile_001.tif          # one folder per modality, files matched by stem
  rgb/tile_002.tif
  dsm/tile_001.tif
  dsm/tile_002.tif
  labels/tile_001.png       # class ids (single band) or palette colours (RGB)
  labels/tile_002.png
  splits/train.txt          # optional: stems, one per line (also val.txt, test.txt)"""

EXAMPLE_YAML = """\
modalities:                 # canonical order; names lowercase, no '+'
  - {name: rgb, channels: 3, kind: optical, value_max: 255}  # mean/std measured on train if absent
  - {name: dsm, channels: 1, kind: elevation, mean: [4.2], std: [5.1], nodata: -9999, valid_range: [-100, 1000]}
classes: [background, building, road]
palette: [[0, 0, 0], [255, 0, 0], [128, 128, 128]]          # optional; labels may then be RGB colours
ignore_index: 255           # label value ignored in the loss and metrics (default 255)
val_fraction: 0.1           # used only without splits/*.txt and without a 'splits:' mapping
test_fraction: 0.1
split_seed: 0"""


def _expected(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"folder dataset: {problem}. Expected tree:\n{TREE}\nExample dataset.yaml:\n{EXAMPLE_YAML}\n"
        f"Splits: splits/*.txt win over a 'splits:' mapping in the yaml, which wins over val_fraction/test_fraction."
    )


# --------------------------------------------------------------------------------------------- config
def _without_augmentation_keys(desc: Mapping[str, Any]) -> dict[str, Any]:
    """The description as the cache sees it: modality entries without kind/value_max."""
    mods = [{k: v for k, v in m.items() if k not in ("kind", "value_max")} for m in desc["modalities"]]
    return {**desc, "modalities": mods}


def load_description(root: Path) -> tuple[dict[str, Any], Path]:
    """The parsed ``dataset.yaml``/``.json`` of ``root`` and its path."""
    for name in CONFIG_NAMES:
        path = root / name
        if path.exists():
            break
    else:
        raise _expected(f"no dataset.yaml (or dataset.json) in {str(root)!r}")
    if not path.is_file():
        raise _expected(f"{path} {file_state(path)}")
    try:
        text = path.read_text()
    except OSError as err:
        raise read_error(path, err, "write it again") from err
    try:
        if path.suffix == ".json":
            desc = json.loads(text)
        else:
            import yaml

            desc = yaml.safe_load(text)
    except Exception as err:  # json's ValueError, yaml.YAMLError
        raise ValueError(f"cannot parse {path}: {err}") from err
    if not isinstance(desc, dict):
        raise ValueError(f"{path} must hold a mapping (modalities, classes, ...); example:\n{EXAMPLE_YAML}")
    return desc, path


def _check_description(desc: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Validated, normalised description (raises ValueError naming the file and the key)."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{path}: {msg}. Example:\n{EXAMPLE_YAML}")

    def check_keys(given: Mapping[str, Any], valid: Sequence[str], where: str = "") -> None:
        """A typo'd key would silently leave its default in force: refuse it, suggesting the nearest key."""
        unknown = [str(k) for k in given if k not in valid]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, valid, n=1)
                hints.append(repr(where + key) + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise bad(f"unknown key(s) {', '.join(hints)}; valid keys{' there' * bool(where)}: {', '.join(valid)}")

    def number(key: str, value: Any, kind: type = float, finite: bool = True) -> Any:
        """``value`` as ``kind`` (int or float), or an error naming the key and the value."""
        try:
            out = kind(value)
            # no True -> 1, no 2.5 -> 2, no nan/inf (YAML's .nan, .inf) as a statistic or a limit
            if isinstance(value, bool) or (kind is int and out != float(value)) or (finite and not math.isfinite(out)):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            what = "a whole number" if kind is int else "a finite number" if finite else "a number"
            raise bad(f"{key} must be {what}, got {value!r}") from None
        return out

    check_keys(desc, DESCRIPTION_KEYS)
    mods = desc.get("modalities")
    if not isinstance(mods, list) or not mods:
        raise bad("'modalities' must be a non-empty list of {name, channels, kind?, value_max?, mean?, std?, nodata?}")
    modalities = []
    for m in mods:
        if not isinstance(m, dict) or "name" not in m or "channels" not in m:
            raise bad(f"modality entry {m!r} needs 'name' and 'channels'")
        name = str(m["name"])
        if not name or name != name.lower() or SEPARATOR in name or name == LABELS or "/" in name:
            raise bad(f"modality name {name!r} must be lowercase, without {SEPARATOR!r} or '/', and not {LABELS!r}")
        check_keys(m, MODALITY_KEYS, f"modalities.{name}.")
        at = f"modalities.{name}"
        channels = number(f"{at}.channels", m["channels"], int)
        if channels < 1:
            raise bad(f"modality {name!r}: channels must be >= 1")
        # NaN is a common nodata tag of float rasters (NaNs count as no data anyway)
        nodata = None if m.get("nodata") is None else number(f"{at}.nodata", m["nodata"], finite=False)
        entry = {"name": name, "channels": channels, "nodata": nodata, "valid_range": None}
        # kind (default other) and value_max steer training augmentation only (sgma.data.augment)
        entry["kind"] = str(m.get("kind", "other"))
        if entry["kind"] not in KINDS:
            raise bad(f"modality {name!r}: kind must be one of {', '.join(KINDS)}, got {entry['kind']!r}")
        entry["value_max"] = None if m.get("value_max") is None else number(f"{at}.value_max", m["value_max"])
        if entry["kind"] == "optical" and not (entry["value_max"] or 0) > 0:
            raise bad(
                f"modality {name!r} is optical: give value_max, its raw value of full brightness (255 for 8-bit "
                f"images, 65535 for 16-bit, 1.0 for reflectance), which photometric jitter scales by"
            )
        if m.get("valid_range") is not None:
            bounds = m["valid_range"]
            try:
                low, high = (float(v) for v in bounds)
            except (TypeError, ValueError):
                raise bad(f"modality {name!r}: valid_range must be [low, high], got {bounds!r}") from None
            if not low < high:
                raise bad(f"modality {name!r}: valid_range [{low}, {high}] needs low < high")
            entry["valid_range"] = [low, high]
        for key in ("mean", "std"):
            v = m.get(key)
            if v is not None:
                v = [number(f"{at}.{key}", x) for x in (v if isinstance(v, list | tuple) else [v])]
                if len(v) != channels:
                    raise bad(f"modality {name!r}: {key} has {len(v)} values for {channels} channels")
            entry[key] = v
        if (entry["mean"] is None) != (entry["std"] is None):
            raise bad(f"modality {name!r}: give both mean and std, or neither (then they are measured on train)")
        if entry["std"] is not None and any(s <= 0 for s in entry["std"]):
            raise bad(f"modality {name!r}: std must be positive")
        modalities.append(entry)
    names = [m["name"] for m in modalities]
    if len(set(names)) != len(names):
        raise bad(f"modality names repeat: {names}")
    classes = desc.get("classes")
    if not isinstance(classes, list) or not classes:
        raise bad("'classes' must be a non-empty list of class names")
    classes = [str(c) for c in classes]
    ignore = number("ignore_index", desc.get("ignore_index", IGNORE_INDEX), int)
    if not 0 <= ignore <= 255 or len(classes) > 255 or ignore < len(classes):
        raise bad(f"ignore_index={ignore} must be in [{len(classes)}, 255] (up to 255 classes are supported)")
    palette = desc.get("palette")
    if palette is not None:
        if not isinstance(palette, list) or not all(isinstance(c, list) for c in palette):
            raise bad(f"'palette' must be a list of [r, g, b] triples, got {palette!r}")
        palette = [tuple(number(f"palette[{i}]", v, int) for v in c) for i, c in enumerate(palette)]
        if len(palette) != len(classes) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
            raise bad(f"'palette' needs one [r, g, b] triple (0-255) per class ({len(classes)} classes)")
        if len(set(palette)) != len(palette):
            raise bad("'palette' colours must be distinct")
    fractions = {k: number(k, desc.get(k, 0.1)) for k in ("val_fraction", "test_fraction")}
    if any(not 0 <= f < 1 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise bad(f"val_fraction/test_fraction {fractions} must be in [0, 1) and sum to less than 1")
    splits = desc.get("splits")
    if splits is not None and (
        not isinstance(splits, dict) or any(s not in SPLITS or not isinstance(v, list) for s, v in splits.items())
    ):
        raise bad("'splits' must map train/val/test to lists of stems")
    return {
        "modalities": modalities,
        "classes": classes,
        "palette": palette,
        "ignore_index": ignore,
        "splits": {s: [str(x) for x in v] for s, v in splits.items()} if splits else None,
        "split_seed": number("split_seed", desc.get("split_seed", 0), int),
        **fractions,
    }


# ---------------------------------------------------------------------------------------------- files
def _index_folder(folder: Path) -> dict[str, Path]:
    """stem -> image file of one folder (an error when two files share a stem)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in out:
                raise ValueError(f"two files with stem {p.stem!r}: {out[p.stem]} and {p}; keep one")
            out[p.stem] = p
    return out


def seeded_split(stems: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list]:
    """Deterministic split of sorted ``stems``; val/test get at least one stem each when their fraction > 0
    and enough stems exist (train keeps at least one)."""
    stems = sorted(stems)
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    n = len(stems)

    def count(f: float) -> int:
        return 0 if f <= 0 else max(1, round(f * n))

    n_val, n_test = count(val_fraction), count(test_fraction)
    while n_val + n_test >= n and (n_val or n_test):  # leave train at least one stem
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[-2]} x {shape[-1]} px"


# -------------------------------------------------------------------------------------------- dataset
class FolderDataset(CachedCropDataset):
    """Segmentation dataset from per-modality folders (see the module docstring for the layout).

    ``modalities`` selects a subset (canonical order kept); ``skip_incomplete`` drops stems that lack a
    modality or label file (warned) instead of failing; ``num_samples``: random crops per epoch for train
    (default: the split's area / crop_size²), a cap on the grid for val/test.
    """

    item_name = "stems"

    @property
    def bytes_per_pixel(self) -> int:  # an upper bound: uint8 sources take 1 byte per channel, not 2
        return sum(2 * m["channels"] for m in self._mods.values()) + 1

    NAME = NAME

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike | None = None,
        num_samples: int | None = None,
        crop_size: int = 256,
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
            raise _expected("no data folder given: set dataset.builder.root=/path/to/data")
        self.root = Path(root).expanduser()
        state = folder_state(self.root)
        if state is not None:
            raise _expected(f"root {str(self.root)!r} {state}")
        if not any(p.name != ".sgma_cache" for p in self.root.iterdir()):
            raise _expected(f"root {str(self.root)!r} is empty")
        desc, self.description_file = load_description(self.root)
        self.desc = _check_description(desc, self.description_file)
        self.skip_incomplete = bool(skip_incomplete)
        self.classes: tuple[str, ...] = tuple(self.desc["classes"])
        self.palette = tuple(self.desc["palette"]) if self.desc["palette"] else _default_palette(len(self.classes))
        self._mods = {m["name"]: m for m in self.desc["modalities"]}
        names = parse_pattern(modalities or tuple(self._mods), tuple(self._mods))

        sources, splits, self.split_source = self._verify()
        self.cache = TileCache(
            cache_dir or default_cache_dir(self.root, NAME),
            dataset=NAME,
            sources=sources,
            splits=splits,
            # kind/value_max change augmentation, not the decoded pixels: editing them keeps the cache
            options={"description": _without_augmentation_keys(self.desc)},
            root=self.root,
            stat_keys=tuple(self._mods),
        )
        self._prepare_cache(sources, self._load, progress=progress)
        mods = []
        for n in names:
            m = self._mods[n]
            mean, std = (m["mean"], m["std"]) if m["mean"] is not None else self.cache.stats(n)
            mods.append(Modality(n, m["channels"], tuple(mean), tuple(std), m["kind"], m["value_max"]))
        self.modalities: tuple[Modality, ...] = tuple(mods)
        self.crops = self._serve_crops(names, num_samples=num_samples, stride=stride, seed=seed)

    # -- verification ---------------------------------------------------------------------------------
    def _verify(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]], str]:
        folders = [*self._mods, LABELS]
        absent = [f"{self.root / f} {folder_state(self.root / f)}" for f in folders if not (self.root / f).is_dir()]
        if absent:
            raise _expected(
                f"folder(s) {'; '.join(absent)} (the modalities in "
                f"{self.description_file.name} are {', '.join(self._mods)}; labels go in {LABELS}/)"
            )
        index = {f: _index_folder(self.root / f) for f in folders}
        all_stems = sorted(set().union(*index.values()))
        if not all_stems:
            raise _expected(f"no image files ({', '.join(IMAGE_EXTS)}) in the folders under {str(self.root)!r}")
        splits, how = self._splits(all_stems)
        sources: dict[str, dict[str, Path]] = {}
        kept: dict[str, list[str]] = {s: [] for s in SPLITS}
        for split, stems in splits.items():
            for stem in stems:
                missing = [f for f in folders if stem not in index[f]]
                if missing:
                    where = "; ".join(self._not_found(f, stem) for f in missing)
                    if not self.skip_incomplete:
                        raise FileNotFoundError(
                            f"folder dataset: stem {stem!r} ({split}): {where} (accepted extensions: "
                            f"{', '.join(IMAGE_EXTS)}); add the file or set dataset.builder.skip_incomplete=true to "
                            f"drop incomplete stems with a warning"
                        )
                    warnings.warn(f"folder dataset: dropping {stem!r} ({split}): {where}", stacklevel=3)
                    continue
                sources[stem] = {f: index[f][stem] for f in folders}
                kept[split].append(stem)
        if not kept["train"]:
            raise _expected("the train split has no complete stem (mean/std and training need at least one)")
        if not kept[self.split]:
            raise ValueError(
                f"folder dataset: the {self.split} split is empty (splits from {how}); list stems in "
                f"{self.root / 'splits' / (self.split + '.txt')} or set {self.split}_fraction > 0 in "
                f"{self.description_file.name}"
            )
        return sources, kept, how

    def _not_found(self, folder: str, stem: str) -> str:
        """Why ``stem`` has no image in ``folder``: no such file, or a non-file (a directory) by that name."""
        odd = [
            p
            for p in sorted((self.root / folder).iterdir())
            if p.stem == stem and p.suffix.lower() in IMAGE_EXTS and not p.is_file()
        ]
        if odd:
            return "; ".join(f"{p} {file_state(p)}" for p in odd)
        return f"no file {self.root / folder / stem}.*"

    def _splits(self, stems: list[str]) -> tuple[dict[str, list[str]], str]:
        folder = self.root / "splits"
        files = {s: folder / f"{s}.txt" for s in SPLITS}
        if any(p.is_file() for p in files.values()):
            out = {}
            for s, p in files.items():
                if p.exists() and not p.is_file():
                    raise FileNotFoundError(f"folder dataset: the split list {p} {file_state(p)}")
                try:
                    lines = p.read_text().splitlines() if p.is_file() else []
                except OSError as err:
                    raise read_error(p, err, "write it again") from err
                out[s] = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            how = f"{folder}/*.txt"
        elif self.desc["splits"] is not None:
            out = {s: list(self.desc["splits"].get(s, [])) for s in SPLITS}
            how = f"the 'splits' mapping of {self.description_file}"
        else:
            d = self.desc
            return seeded_split(stems, d["val_fraction"], d["test_fraction"], d["split_seed"]), (
                f"val_fraction={d['val_fraction']}, test_fraction={d['test_fraction']}, split_seed={d['split_seed']}"
            )
        known = set(stems)
        for s, listed in out.items():
            unknown = [x for x in listed if x not in known]
            if unknown:
                raise FileNotFoundError(
                    f"folder dataset: {how} lists {s} stem(s) {unknown[:5]} with no file in any of the folders "
                    f"under {self.root}"
                )
        seen: dict[str, str] = {}
        for s, listed in out.items():
            for x in listed:
                if x in seen and seen[x] != s:
                    raise ValueError(f"folder dataset: stem {x!r} is in both the {seen[x]} and {s} splits ({how})")
                seen[x] = s
        unlisted = [x for x in stems if x not in seen]
        if unlisted:
            log.warning(
                "folder dataset: %s leaves out %d stem(s) found under %s, e.g. %s; they are not used. List them in "
                "a split, or remove their files",
                how,
                len(unlisted),
                self.root,
                unlisted[:5],
            )
        return out, how

    def _check_sizes(self, stem: str, files: dict[str, Path]) -> tuple[int, int]:
        ref_key = next(iter(self._mods))
        _, h, w = raster_info(files[ref_key])
        for key, path in files.items():
            bands, rh, rw = raster_info(path)
            if (rh, rw) != (h, w):
                raise ValueError(
                    f"folder dataset: size mismatch for stem {stem!r}: {path} is {rh} x {rw} px but "
                    f"{files[ref_key]} is {h} x {w} px"
                )
            if key == LABELS:  # their bands are checked when decoded: class ids or palette colours
                continue
            channels = self._mods[key]["channels"]
            if bands != channels:  # more bands than declared would silently train on the first ones only
                raise ValueError(
                    f"folder dataset: {path} has {bands} band(s) but modality {key!r} declares {channels} "
                    f"channel(s) in {self.description_file}: set 'channels: {bands}' for {key!r} there, or write "
                    f"its rasters with {channels} band(s)"
                )
        return h, w

    # -- decoding -------------------------------------------------------------------------------------
    def _load(self, stem: str) -> PreparedTile:
        files = {k: Path(v) for k, v in self.cache.sources[stem].items()}
        arrays: dict[str, np.ndarray] = {}
        exclude: dict[str, np.ndarray] = {}
        info: dict[str, Any] = {"nodata_pixels": {}, "outliers": {}}
        for name, m in self._mods.items():
            raw, file_nodata = read_raster(files[name], range(1, m["channels"] + 1))
            if raw.dtype == np.uint8 and m["nodata"] is None and m["valid_range"] is None:
                arrays[name] = raw
                continue
            x = raw.astype(np.float32)
            invalid = ~np.isfinite(x)
            nodata = m["nodata"] if m["nodata"] is not None else file_nodata
            if nodata is not None and np.isfinite(float(nodata)):
                invalid |= x == np.float32(nodata)
            info["nodata_pixels"][name] = int(invalid.sum())  # counted in the manifest, no warning per image
            x[invalid] = 0
            low, high = m["valid_range"] or (-FLOAT16_LIMIT, FLOAT16_LIMIT)
            low, high = max(low, -FLOAT16_LIMIT), min(high, FLOAT16_LIMIT)
            x, outliers, counts = clip_outliers(x, low, high, valid=~invalid)
            info["outliers"][name] = counts
            if counts["below"] or counts["above"]:
                what = f"{name} (valid_range in {self.description_file.name})" if m["valid_range"] else name
                warnings.warn(outlier_message(files[name], what, low, high, counts), stacklevel=2)
            arrays[name] = x.astype(np.float16)
            exclude[name] = (invalid | outliers).any(axis=0)  # a pixel is left out if any channel is
        arrays["mask"], info["label"] = self.decode_label(files[LABELS])
        return PreparedTile(arrays=arrays, info=info, exclude=exclude)

    def decode_label(self, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Label file -> (H, W) uint8 class ids with ``IGNORE_INDEX`` for ignored pixels, plus class counts."""
        raw, _ = read_raster(path)
        n, ignore, palette = len(self.classes), self.desc["ignore_index"], self.desc["palette"]
        if raw.shape[0] >= 3 and palette is not None:
            rgb = raw[:3].astype(np.int64)
            code = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
            mask = np.full(code.shape, IGNORE_INDEX, np.uint8)
            known = np.zeros(code.shape, bool)
            for i, (r, g, b) in enumerate(palette):
                hit = code == ((r << 16) | (g << 8) | b)
                mask[hit] = i
                known |= hit
            if not known.all():
                codes = np.unique(code[~known])[:5]
                colours = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in codes]
                raise ValueError(
                    f"folder dataset: {path} has {int((~known).sum())} pixel(s) with colours outside the palette, "
                    f"e.g. {colours}; palette: {list(palette)} (RGB order; add the colour or fix the label)"
                )
        elif raw.shape[0] == 1 or (
            raw.shape[0] >= 3 and np.array_equal(raw[0], raw[1]) and np.array_equal(raw[0], raw[2])
        ):
            ids = raw[0]
            if ids.dtype.kind == "f" and (not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids))):
                raise ValueError(f"folder dataset: {path} holds non-integer values; labels must be class ids")
            ids = ids.astype(np.int64)
            bad = (ids != ignore) & ((ids < 0) | (ids >= n))
            if bad.any():
                values = sorted(int(v) for v in np.unique(ids[bad]))
                raise ValueError(
                    f"folder dataset: {path} has label value(s) {values[:10]} outside the {n} classes "
                    f"(ids 0..{n - 1}) and not the ignore_index {ignore}"
                )
            mask = np.where(ids == ignore, IGNORE_INDEX, ids).astype(np.uint8)
        else:
            raise ValueError(
                f"folder dataset: {path} has {raw.shape[0]} bands: labels are single-band class ids, or RGB "
                f"colours when {self.description_file.name} has a 'palette'"
            )
        counts = np.bincount(mask.ravel(), minlength=256)
        return mask, {"class_counts": [int(c) for c in counts[:n]], "ignore": int(counts[IGNORE_INDEX])}

    # -- dataset protocol (shared parts in tiles.CachedCropDataset) ---------------------------------
    @property
    def stems(self) -> list[str]:
        return list(self.crops.shapes)


def _default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct display colours when the description gives none."""
    rng = np.random.default_rng(0)
    return tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n))
