"""DELIVER (autonomous driving under adverse conditions; RGB, depth, event and LiDAR; ``dataset=deliver``).

The release (jamycheung/DELIVER, front-view archive) after a plain unzip; ``root`` may be this folder or one
above it (the folder holding ``img/`` and ``semantic/`` is searched up to :data:`SEARCH_DEPTH` levels down)::

    DELIVER/img/<condition>/<split>/<sequence>/<frame>_rgb_front.png        # 1042 x 1042
    DELIVER/hha/<condition>/<split>/<sequence>/<frame>_depth_front.png      # the ``depth`` modality (HHA)
    DELIVER/event/<condition>/<split>/<sequence>/<frame>_event_front.png    # 512 x 512 in *_eventlowres sequences
    DELIVER/lidar/<condition>/<split>/<sequence>/<frame>_lidar_front.png
    DELIVER/semantic/<condition>/<split>/<sequence>/<frame>_semantic_front.png   # RGBA, label in channel 0
    DELIVER/depth/...                                                         # raw depth: not read, as DELIVER

Conditions are ``cloud``, ``fog``, ``night``, ``rain`` and ``sun``; splits ``train``, ``val`` and ``test``;
sequences ``MAP_<n>_point<k>``, sensor-failure cases as a suffix (``..._eventlowres``). A frame is found from a
file of any modality or its label, so an rgb file (or a condition's ``img/`` folder) that was not extracted is
reported, not skipped; its files are the paths DELIVER's ``semseg/datasets/deliver.py`` derives from the rgb path
(``img`` -> ``hha``/``event``/``lidar``/``semantic``, ``_rgb`` -> ``_depth``/``_event``/``_lidar``/
``_semantic``) and must all exist (one message lists what is missing per modality). Every selected condition
needs frames in every split any of them has. Event images of another
size (only in ``*_eventlowres`` sequences) are resized to the frame size with nearest neighbour, as DELIVER
does; every other size mismatch is an error. Labels are channel 0 of the semantic png: 0 and 255 are
unlabelled (-> 255, ignored), ``v`` in 1..25 is class ``v - 1``; other values are ignored too, warned per
file and counted in the manifest; more than ``max_out_of_range`` of a split's label pixels is an error (e.g.
labels rendered in colour). Single-channel and RGBA modalities become 3 channels (DELIVER's ``_open_img``).

``resize`` (default 1024) resizes every frame of every split when it is decoded as CMNeXt's evaluation
``Resize`` does (shortest side to ``resize``, then each side up to a multiple of 32; bilinear, the label
nearest): 1042 -> 1024, so val/test with ``dataset.size=1024`` score the whole 1024 frame as the published
DELIVER/CMNeXt numbers do. ``resize=None`` keeps the native 1042 frames, scored with a sliding window:
numbers not comparable with the published ones.

Every frame is decoded once into the memory-mapped cache of :mod:`sgma.data.tiles`
(``<root>/.sgma_cache/deliver[-<c1+c2>][-native|-resize<N>]-v<version>/``, or ``cache_dir``), whose manifest
also stores the per-modality mean/std measured on the train frames of the selected conditions. A full cache
takes :attr:`Deliver.bytes_per_pixel` bytes per pixel (about 110 GB for the release); ``cache=False`` keeps
only the manifest (``...-manifest-v<version>/``) and decodes each sample's frame from its PNGs instead.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from sgma.checks import check_flag
from sgma.data.discovery import SKIPPED_DIRS, FileIndex, sample
from sgma.data.tiles import (
    CachedCropDataset,
    PreparedTile,
    TileCache,
    check_crop_size,
    default_cache_dir,
    file_state,
    folder_state,
    read_error,
)
from sgma.modalities import Modality, parse_pattern

log = logging.getLogger("sgma")

NAME = "deliver"
CLASSES = (
    "building",
    "fence",
    "other",
    "pedestrian",
    "pole",
    "roadline",
    "road",
    "sidewalk",
    "vegetation",
    "cars",
    "wall",
    "trafficsign",
    "sky",
    "ground",
    "bridge",
    "railtrack",
    "groundrail",
    "trafficlight",
    "static",
    "dynamic",
    "water",
    "terrain",
    "twowheeler",
    "bus",
    "truck",
)
# DELIVER's own palette (semseg/datasets/deliver.py), one colour per class in CLASSES' order
PALETTE = (
    (70, 70, 70),  # building
    (100, 40, 40),  # fence
    (55, 90, 80),  # other
    (220, 20, 60),  # pedestrian
    (153, 153, 153),  # pole
    (157, 234, 50),  # roadline
    (128, 64, 128),  # road
    (244, 35, 232),  # sidewalk
    (107, 142, 35),  # vegetation
    (0, 0, 142),  # cars
    (102, 102, 156),  # wall
    (220, 220, 0),  # trafficsign
    (70, 130, 180),  # sky
    (81, 0, 81),  # ground
    (150, 100, 100),  # bridge
    (230, 150, 140),  # railtrack
    (180, 165, 180),  # groundrail
    (250, 170, 30),  # trafficlight
    (110, 190, 160),  # static
    (170, 120, 50),  # dynamic
    (45, 60, 150),  # water
    (145, 170, 100),  # terrain
    (0, 0, 230),  # twowheeler
    (0, 60, 100),  # bus
    (0, 0, 70),  # truck
)
IGNORE = 255
SPLITS = ("train", "val", "test")
CONDITIONS = ("cloud", "fog", "night", "rain", "sun")
# modality -> (folder, file-name tag, channels); canonical order. The depth modality is DELIVER's HHA folder.
MODALITIES = {
    "rgb": ("img", "rgb", 3),
    "depth": ("hha", "depth", 3),
    "event": ("event", "event", 3),
    "lidar": ("lidar", "lidar", 3),
}
# Modality.kind, value_max: only the camera image is optical (HHA depth, event and LiDAR images are encodings)
KINDS = {"rgb": ("optical", 255.0), "depth": ("other", None), "event": ("other", None), "lidar": ("other", None)}
LABEL = ("semantic", "semantic")  # (folder, tag)
# folder -> file name of a frame's file in it; a frame is found from any of them, so a frame whose rgb file is
# absent (an img/ archive not extracted) is reported missing instead of vanishing
FRAME_FILE = {
    folder: re.compile(rf"^(?P<frame>.+)_{tag}_(?P<view>[^_]+)\.png$", re.IGNORECASE)
    for folder, tag in (*(v[:2] for v in MODALITIES.values()), LABEL)
}
LOWRES_EVENT = "eventlowres"  # the sequences (folder-name suffix) whose event images are smaller than the frame
DEFAULT_RESIZE = 1024  # CMNeXt's evaluation size: the published numbers score 1024 x 1024 frames
SEARCH_DEPTH = 3  # folders below the root searched for the one holding img/ and semantic/
# share of a split's label pixels allowed outside 0..25 and 255 (ignored): the release has none, labels rendered
# in colour (DELIVER's palette) have nearly all
DEFAULT_MAX_OUT_OF_RANGE = 0.01
SOURCE = "the DELIVER dataset released by the authors of DELIVER/CMNeXt (Zhang et al., CVPR 2023)"
TREE = """\
<root>/[DELIVER/]
  img/<condition>/<split>/<sequence>/<frame>_rgb_<view>.png        (1042 x 1042)
  hha/<condition>/<split>/<sequence>/<frame>_depth_<view>.png      (the depth modality; depth/ is not read)
  event/<condition>/<split>/<sequence>/<frame>_event_<view>.png
  lidar/<condition>/<split>/<sequence>/<frame>_lidar_<view>.png
  semantic/<condition>/<split>/<sequence>/<frame>_semantic_<view>.png
  (<condition>: cloud, fog, night, rain, sun; <split>: train, val, test)"""


def _missing_data(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{NAME}: {problem}. Get {SOURCE} (its archive unpacks into the tree below). Expected tree:\n{TREE}"
    )


def _unreadable(path: Path, err: BaseException) -> OSError:
    return read_error(path, err, "extract it again")


def frame_files(root: Path, condition: str, split: str, sequence: str, frame: str, view: str) -> dict[str, Path]:
    """Every file of one frame: modality name (and ``"semantic"``) -> path, as DELIVER derives them from the
    rgb path (``root`` is the folder holding ``img/``)."""
    out = {}
    for m, (folder, tag, _) in MODALITIES.items():
        out[m] = root / folder / condition / split / sequence / f"{frame}_{tag}_{view}.png"
    out[LABEL[0]] = root / LABEL[0] / condition / split / sequence / f"{frame}_{LABEL[1]}_{view}.png"
    return out


def _label_channel(semantic: np.ndarray) -> np.ndarray:
    """The label values (H, W) int64: channel 0 of RGBA/RGB, or grey."""
    return (semantic[..., 0] if semantic.ndim == 3 else semantic).astype(np.int64)


def _out_of_range(raw: np.ndarray) -> np.ndarray:
    return (raw > len(CLASSES)) & (raw != IGNORE)


def decode_label(semantic: np.ndarray) -> tuple[np.ndarray, int]:
    """Class ids (H, W) uint8 from a semantic png array (channel 0 of RGBA/RGB, or grey): 0 and 255 -> 255
    (ignored, as DELIVER's uint8 ``label - 1``), v in 1..25 -> v - 1; values 26..254 are ignored as well.
    Returns the ids and the number of such out-of-range pixels."""
    raw = _label_channel(semantic)
    out = raw - 1
    unknown = _out_of_range(raw)
    out[(raw == 0) | (raw == IGNORE) | unknown] = IGNORE
    return out.astype(np.uint8), int(unknown.sum())


def resized_shape(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """CMNeXt's ``Resize(size)``: the shortest side scaled to ``size``, then each side rounded up to a
    multiple of 32. Returns both steps' (H, W) (1042 x 1042 -> 1024 x 1024, already aligned)."""
    scale = size / min(height, width)
    h, w = round(height * scale), round(width * scale)
    return (h, w), (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """(C, H, W) or (H, W) uint8 resized to ``size`` (H, W), bilinear or nearest, per channel with PIL."""
    from PIL import Image

    if array.shape[-2:] == tuple(size):
        return array
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    h, w = size
    planes = array[None] if array.ndim == 2 else array
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((w, h), mode)) for c in planes])
    return out[0] if array.ndim == 2 else out


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise _unreadable(path, err) from err


def _png_size(path: Path) -> tuple[int, int]:
    """(height, width) from the png header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError, SyntaxError) as err:
        raise _unreadable(path, err) from err
    return h, w


def _as_three_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """(3, H, W) uint8 from a png array: grey images are repeated, alpha is dropped, 16-bit is scaled."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] < 3:
        array = np.repeat(array[..., :1], 3, axis=2)
    array = array[..., :3]
    if array.dtype != np.uint8:
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255:
            array = (array.astype(np.float64) / 257).round().astype(np.uint8)  # 16-bit png -> 8 bit
        else:
            array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[2] != 3:
        raise ValueError(f"{path} has {array.shape[2]} channel(s); expected 3")
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _dataset_folders(root: Path, depth: int = SEARCH_DEPTH):
    """Per level below ``root`` (``root`` itself first), the folders holding ``img/`` and ``semantic/``; those
    are not searched further (their sub-folders are the release's, not other copies)."""
    level = [root]
    for _ in range(depth + 1):
        found = [d for d in level if (d / MODALITIES["rgb"][0]).is_dir() and (d / LABEL[0]).is_dir()]
        yield found
        below = []
        for d in level:
            if d in found:
                continue
            try:
                below += sorted(
                    p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SKIPPED_DIRS
                )
            except OSError:  # an unreadable sub-folder cannot hold the release we can read
                continue
        level = below


def find_dataset_folder(root: Path, depth: int = SEARCH_DEPTH) -> Path:
    """The folder holding ``img/`` and ``semantic/``: ``root`` itself or the shallowest one below it (a
    release unzipped into ``<root>/DELIVER/``); several at the same depth are ambiguous."""
    for found in _dataset_folders(root, depth):
        if len(found) > 1:
            raise ValueError(
                f"{NAME}: several DELIVER folders under dataset.builder.root={str(root)!r}: "
                f"{', '.join(str(f) for f in found[:4])}; set dataset.builder.root to the one to use"
            )
        if found:
            return found[0]
    raise _missing_data(
        f"no folder holding both img/ and semantic/ in dataset.builder.root={str(root)!r} or its sub-folders to "
        f"{depth} levels (the root holds {sorted(p.name for p in root.iterdir())[:8]})"
    )


class Deliver(CachedCropDataset):
    """DELIVER semantic segmentation (25 classes; modalities rgb, depth, event, lidar)."""

    item_name = "images"
    bytes_per_pixel = 3 * len(MODALITIES) + 1  # uint8 frames and mask
    disk_hint = (
        "or set dataset.builder.cache=false to read the frames from their PNGs on demand (nothing but a manifest "
        "is written; each sample then decodes its frame, so training is slower)"
    )

    classes: ClassVar[tuple[str, ...]] = CLASSES
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = PALETTE
    NAME = NAME

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike | None = None,
        conditions: Sequence[str] | str | None = None,
        num_samples: int | None = None,
        crop_size: int = 1024,
        stride: int | None = None,
        seed: int = 0,
        modalities: Sequence[str] | str | None = None,
        skip_incomplete: bool = False,
        resize: int | None = DEFAULT_RESIZE,
        max_out_of_range: float = DEFAULT_MAX_OUT_OF_RANGE,
        cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.split = split
        self.crop_size = check_crop_size(crop_size)
        self.conditions = self._conditions(conditions)
        self.resize = self._resize_option(resize)
        self.max_out_of_range = self._share_option(max_out_of_range)
        check_flag("dataset.builder.cache", cache)
        if root is None or str(root) in ("", "???"):
            raise _missing_data("no data folder given: set dataset.builder.root=/path/to/DELIVER")
        self.root = Path(root).expanduser()
        self.skip_incomplete = bool(skip_incomplete)
        names = parse_pattern(modalities or tuple(MODALITIES), tuple(MODALITIES))
        sources, splits = self._verify()
        if cache_dir is None:
            tag = NAME if self.conditions == CONDITIONS else f"{NAME}-{'+'.join(self.conditions)}"
            if self.resize != DEFAULT_RESIZE:
                tag += "-native" if self.resize is None else f"-resize{self.resize}"
            cache_dir = default_cache_dir(self.root, tag if cache else f"{tag}-manifest")
        self.cache = TileCache(
            cache_dir,
            dataset=NAME,
            sources=sources,
            splits=splits,
            options={
                "conditions": list(self.conditions),
                "resize": self.resize,
                "max_out_of_range": self.max_out_of_range,
            },
            root=self.root,
            stat_keys=tuple(MODALITIES),
            store_arrays=cache,
        )
        # per split while the cache is prepared: label pixels (from the size check) and out-of-range ones seen
        # so far; None afterwards, so decoding a frame on demand (cache=false) neither warns nor counts again
        self._labels: dict[str, dict] | None = {
            s: {"total": 0, "pixels": 0, "files": [], "values": set()} for s in splits
        }
        self._prepare_cache(sources, self._load, progress=progress)
        self._labels = None
        self._note_event_resizes()
        self.modalities: tuple[Modality, ...] = tuple(
            Modality(n, MODALITIES[n][2], *self.cache.stats(n), *KINDS[n]) for n in names
        )
        self.crops = self._serve_crops(names, num_samples=num_samples, stride=stride, seed=seed, ignore_index=IGNORE)

    @staticmethod
    def _conditions(conditions: Sequence[str] | str | None) -> tuple[str, ...]:
        if conditions is None or (not isinstance(conditions, str) and len(conditions) == 0):
            return CONDITIONS
        listed = [conditions] if isinstance(conditions, str) else [str(c) for c in conditions]
        listed = [c.strip().lower() for item in listed for c in item.split("+") if c.strip()]
        unknown = [c for c in listed if c not in CONDITIONS]
        if unknown:
            raise ValueError(
                f"dataset.builder.conditions: unknown DELIVER condition(s) {unknown}; expected some of "
                f"{', '.join(CONDITIONS)}"
            )
        return tuple(c for c in CONDITIONS if c in listed)  # canonical order, duplicates dropped

    @staticmethod
    def _resize_option(resize: int | None) -> int | None:
        if resize is None:
            return None
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < 32:
            raise ValueError(
                f"dataset.builder.resize={resize!r} must be a whole number of pixels >= 32 (the shortest side after "
                f"resizing; {DEFAULT_RESIZE} as the published DELIVER/CMNeXt evaluation) or null (native frames)"
            )
        return resize

    @staticmethod
    def _share_option(share: float) -> float:
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(
                f"dataset.builder.max_out_of_range={share!r} must be a share between 0 and 1 (of a split's label "
                f"pixels allowed outside 0..{len(CLASSES)} and 255; default {DEFAULT_MAX_OUT_OF_RANGE})"
            )
        return float(share)

    # -- verification ---------------------------------------------------------------------------------
    def _verify(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        """Find the frames from the rgb files and every file derived from them; raise one message listing
        what is missing per modality (or drop those frames with a warning when ``skip_incomplete``)."""
        state = folder_state(self.root)
        if state is not None:
            raise _missing_data(f"root {str(self.root)!r} {state}")
        if not any(p.name != ".sgma_cache" for p in self.root.iterdir()):
            raise _missing_data(f"root {str(self.root)!r} is empty")
        self.folder = find_dataset_folder(self.root)
        index = FileIndex(self.folder)
        on_disk = set(index.files)
        rgb_folder = MODALITIES["rgb"][0]
        frames: dict[str, dict[str, Path]] = {}  # tile -> files, every frame found (in SPLITS order)
        for path in index.files:
            parts = path.relative_to(self.folder).parts  # <folder>/<condition>/<split>/<sequence>/<file>
            match = FRAME_FILE[parts[0]].match(parts[-1]) if len(parts) == 5 and parts[0] in FRAME_FILE else None
            if not match:
                continue
            _, condition, split, sequence, _ = parts
            if condition in self.conditions and split in SPLITS:
                tile = f"{split}__{condition}__{sequence}__{match['frame']}_{match['view']}"
                frames[tile] = frame_files(self.folder, condition, split, sequence, match["frame"], match["view"])
        frames = dict(sorted(frames.items(), key=lambda kv: (SPLITS.index(kv[0].split("__")[0]), kv[0])))
        self._check_coverage(index, frames)
        missing = {k: [t for t, files in frames.items() if files[k] not in on_disk] for k in (*MODALITIES, LABEL[0])}
        incomplete = {t for tiles in missing.values() for t in tiles}
        if incomplete and not self.skip_incomplete:
            raise FileNotFoundError(self._missing_message(index, frames, missing))
        if incomplete:
            warnings.warn(
                f"{NAME}: dropping {len(incomplete)} of {len(frames)} frame(s) that lack a file "
                f"(skip_incomplete=true): {sample(sorted(t.replace('__', '/') for t in incomplete))}",
                stacklevel=3,
            )
        sources = {t: files for t, files in frames.items() if t not in incomplete}
        splits = {s: [t for t in sources if t.startswith(f"{s}__")] for s in SPLITS}
        splits = {s: tiles for s, tiles in splits.items() if tiles}
        for needed in dict.fromkeys(("train", self.split)):
            if needed not in splits:
                counts = {s: len(t) for s, t in splits.items()}
                raise _missing_data(
                    f"no complete {needed} frame for condition(s) {', '.join(self.conditions)} under "
                    f"{self.folder / rgb_folder} (complete frames per split: {counts or 'none'}; {index.searched()})"
                    f"{self._other_copies()}"
                )
        return sources, splits

    def _check_coverage(self, index: FileIndex, frames: Mapping[str, dict[str, Path]]) -> None:
        """Every selected condition has frames in every split that any of them has: a condition or split whose
        folders were not extracted must not leave a smaller dataset without a word."""
        have = {c: {t.split("__")[0] for t in frames if t.split("__")[1] == c} for c in self.conditions}
        splits = [s for s in SPLITS if any(s in found for found in have.values())]
        gaps = {c: [s for s in splits if s not in found] for c, found in have.items()}
        gaps = {c: missing for c, missing in gaps.items() if missing}
        if not gaps:
            return
        counts = {f"{c}/{s}": sum(t.startswith(f"{s}__{c}__") for t in frames) for c in have for s in sorted(have[c])}
        holes = [f"{c}/{s}" for c, missing in gaps.items() for s in missing]
        complete = [c for c in self.conditions if c not in gaps]
        fix = f" or set dataset.builder.conditions=[{', '.join(complete)}] to use only those" if complete else ""
        raise _missing_data(
            f"no frame of {', '.join(holes)} in the DELIVER folder {str(self.folder)!r}: no file in img/, hha/, "
            f"event/, lidar/ or semantic/ under <condition>/<split>/ for them (frames found: {counts or 'none'}; "
            f"{index.searched()}){self._other_copies()}. Extract those folders from the release archive again{fix}"
        )

    def _other_copies(self) -> str:
        """For messages: other DELIVER folders under the root, not read (a complete copy below an incomplete one)."""
        others = [d for found in _dataset_folders(self.root) for d in found if d != self.folder]
        if not others:
            return ""
        return (
            f"; the root also holds the DELIVER folder(s) {', '.join(repr(str(d)) for d in others[:3])}, not read "
            f"(the shallowest one is): if one of them is the complete copy, set dataset.builder.root to it"
        )

    def _missing_message(
        self, index: FileIndex, frames: Mapping[str, dict[str, Path]], missing: Mapping[str, list[str]]
    ) -> str:
        """What was found and what is missing per modality, with a few examples, and where the search looked."""
        pattern = "<condition>/<split>/<sequence>/<frame>_{}_<view>.png"
        lines = [
            f"{NAME}: files missing in the DELIVER folder {str(self.folder)!r} (found under dataset.builder.root="
            f"{str(self.root)!r}). A frame is found from a file of any of the folders below and needs all of them, "
            f"at the paths DELIVER's loader derives from img/{pattern.format('rgb')} ({len(frames)} frames found "
            f"for condition(s) {', '.join(self.conditions)}):"
        ]
        for key in (*MODALITIES, LABEL[0]):
            folder, tag = (MODALITIES[key][0], MODALITIES[key][1]) if key in MODALITIES else LABEL
            what = "labels" if key == LABEL[0] else key
            line = f"  - {what} ({folder}/{pattern.format(tag)}): {len(frames) - len(missing[key])}/{len(frames)} found"
            if missing[key]:
                shown = [frames[t][key] for t in missing[key][:3]]
                examples = "; ".join(f"{index.relative(p)} {file_state(p) or 'is not indexed'}" for p in shown)
                line += f"; {len(missing[key])} missing, e.g. {examples}"
            if key == "depth":
                line += " (the depth modality is read from hha/, not depth/, as DELIVER does)"
            lines.append(line)
        lines.append(
            f"({index.searched()}{self._other_copies()}) Extract the missing files again from the DELIVER archive "
            f"({SOURCE}) or set dataset.builder.skip_incomplete=true to drop the incomplete frames with a warning."
        )
        return "\n".join(lines)

    def _check_sizes(self, key: str, files: dict[str, Path]) -> tuple[int, int]:
        """Every file of the frame has the rgb size, except event images of ``*_eventlowres`` sequences (same
        aspect, resized when decoded); returns the size as cached (after ``resize``)."""
        size = _png_size(files["rgb"])
        for name in (*MODALITIES, LABEL[0]):
            other = _png_size(files[name])
            if other == size:
                continue
            lowres = name == "event" and LOWRES_EVENT in files["rgb"].parent.name
            if lowres and other[0] * size[1] == other[1] * size[0]:
                continue
            allowed = "" if name == "event" else " (only event images of *_eventlowres sequences may be smaller)"
            raise ValueError(
                f"size mismatch: {files[name]} is {other[0]} x {other[1]} px but {files['rgb']} is "
                f"{size[0]} x {size[1]} px{allowed}; replace the file with the release's"
            )
        if self._labels is not None:  # the split's label pixels (every file has the rgb size), for _out_of_range
            self._labels[key.split("__")[0]]["total"] += size[0] * size[1]
        return size if self.resize is None else resized_shape(*size, self.resize)[1]

    # -- decoding -------------------------------------------------------------------------------------
    def _load(self, tile: str) -> PreparedTile:
        files = {k: Path(v) for k, v in self.cache.sources[tile].items()}
        arrays = {m: _as_three_channels(_read_png(files[m]), files[m]) for m in MODALITIES}
        semantic = _read_png(files[LABEL[0]])
        mask, unknown = decode_label(semantic)
        if unknown and self._labels is not None:  # while preparing: once per file, not once per sample
            self._note_out_of_range(tile, files[LABEL[0]], _label_channel(semantic), unknown)
        info: dict[str, object] = {}
        frame = arrays["rgb"].shape[1:]
        if arrays["event"].shape[1:] != frame:  # *_eventlowres: nearest to the frame size, as DELIVER
            info["event_resized_from"] = list(arrays["event"].shape[1:])
            arrays["event"] = _resize(arrays["event"], frame, nearest=True)
        if self.resize is not None:  # CMNeXt's Resize: two steps, bilinear images, nearest label
            for step in resized_shape(*frame, self.resize):
                arrays = {m: _resize(a, step, nearest=False) for m, a in arrays.items()}
                mask = _resize(mask, step, nearest=True)
        info.update({"ignored_pixels": int((mask == IGNORE).sum()), "out_of_range_label_pixels": unknown})
        return PreparedTile(arrays={**arrays, "mask": mask}, info=info)

    def _note_out_of_range(self, tile: str, path: Path, raw: np.ndarray, count: int) -> None:
        """Warn about a label file's values outside 0..25 and 255 (ignored); raise once the split's such pixels
        exceed ``max_out_of_range`` of all its label pixels (known before decoding, so this is exact)."""
        values = [str(v) for v in np.unique(raw[_out_of_range(raw)])]
        warnings.warn(
            f"{path}: {count} pixel(s) with label values outside 0..{len(CLASSES)} and {IGNORE} "
            f"({sample(values, 5)}) set to ignore ({IGNORE}); counted in the cache manifest",
            stacklevel=2,
        )
        split = tile.split("__")[0]
        seen = self._labels[split]
        seen["pixels"] += count
        seen["files"].append(path)
        seen["values"].update(map(int, values))
        if seen["pixels"] > self.max_out_of_range * seen["total"]:
            found = sorted(seen["values"])
            raise ValueError(
                f"{seen['pixels']} {split} label pixels in {len(seen['files'])} file(s) so far (e.g. "
                f"{', '.join(str(f) for f in seen['files'][:3])}) have values outside 0..{len(CLASSES)} and {IGNORE} "
                f"({sample([str(v) for v in found], 8)}): already "
                f"{seen['pixels'] / max(seen['total'], 1):.1%} of the split's {seen['total']} label pixels, more than "
                f"dataset.builder.max_out_of_range={self.max_out_of_range}. DELIVER's semantic PNGs hold class + 1 "
                f"in channel 0 (1..{len(CLASSES)}; 0 and {IGNORE} unlabelled), so these are likely other images "
                f"(labels rendered in colour?): extract semantic/ from the release archive again, or raise the "
                f"limit to train with those pixels ignored (++dataset.builder.max_out_of_range=0.05 on the command "
                f"line)"
            )

    def _note_event_resizes(self) -> None:
        tiles = self.manifest["splits"].get(self.split, [])
        resized = [t for t in tiles if "event_resized_from" in self.manifest["tiles"][t]["info"]]
        if resized:
            h, w = self.manifest["tiles"][resized[0]]["info"]["event_resized_from"]
            log.info(
                "%s %s: %d of %d frames have smaller event images (e.g. %d x %d in %s), resized to the frame with "
                "nearest neighbour as DELIVER does",
                NAME,
                self.split,
                len(resized),
                len(tiles),
                h,
                w,
                resized[0].replace("__", "/"),
            )

    # -- dataset protocol (shared parts in tiles.CachedCropDataset) ---------------------------------
    @property
    def images(self) -> list[str]:
        return list(self.crops.shapes)
