"""DELIVER (autonomous driving under adverse conditions; RGB, depth, event and LiDAR; ``dataset=deliver``).

Layout under ``root`` (one folder per modality, then condition, split and sequence)::

    img/<condition>/<split>/<sequence>/<frame>_rgb_<view>.png            # 1024 x 1024, 3 channels
    hha/<condition>/<split>/<sequence>/<frame>_depth_<view>.png          # HHA-like, 3 channels
    event/<condition>/<split>/<sequence>/<frame>_event_<view>.png        # stored as 3 channels
    lidar/<condition>/<split>/<sequence>/<frame>_lidar_<view>.png        # stored as 3 channels
    semantic/<condition>/<split>/<sequence>/<frame>_semantic_<view>.png  # label = first channel

Conditions are ``cloud``, ``fog``, ``night``, ``rain`` and ``sun``; splits ``train``, ``val`` and ``test``.
Frames are found from the rgb files; every other modality and the label must exist for each of them.
Labels are the first channel of the semantic png: 0 is unlabelled (-> 255, ignored), ``v`` in 1..25 is class
``v - 1``; larger values are ignored too and counted in the manifest. Single-channel modalities are stored
as 3-channel images and kept as 3 channels.

Every frame is decoded once into the memory-mapped cache of :mod:`sgma.data.tiles`
(``<root>/.sgma_cache/deliver-v<version>/`` for all conditions, ``deliver-<c1+c2>-v<version>/`` for a subset,
or ``cache_dir``), whose manifest also stores the per-modality mean/std measured on the train frames of the
selected conditions (written atomically with the cache).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from sgma.data.tiles import (
    CachedCropDataset,
    PreparedTile,
    TileCache,
    check_crop_size,
    default_cache_dir,
    folder_state,
    not_files,
    read_error,
)
from sgma.modalities import Modality, parse_pattern

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
PALETTE = (
    (70, 70, 70),  # building
    (190, 153, 153),  # fence
    (110, 110, 160),  # other
    (220, 20, 60),  # pedestrian
    (153, 153, 153),  # pole
    (255, 255, 255),  # roadline
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
# modality -> (folder, file-name tag, channels); canonical order
MODALITIES = {
    "rgb": ("img", "rgb", 3),
    "depth": ("hha", "depth", 3),
    "event": ("event", "event", 3),
    "lidar": ("lidar", "lidar", 3),
}
LABEL = ("semantic", "semantic")  # (folder, tag)
RGB_FILE = re.compile(r"^(?P<frame>.+)_rgb_(?P<view>[^_]+)\.png$", re.IGNORECASE)
SOURCE = "the DELIVER dataset released by the authors of DELIVER/CMNeXt (Zhang et al., CVPR 2023)"
TREE = """\
<root>/
  img/<condition>/<split>/<sequence>/<frame>_rgb_<view>.png        (1024 x 1024)
  hha/<condition>/<split>/<sequence>/<frame>_depth_<view>.png
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
    """Every file of one frame: modality name (and ``"semantic"``) -> path."""
    out = {}
    for m, (folder, tag, _) in MODALITIES.items():
        out[m] = root / folder / condition / split / sequence / f"{frame}_{tag}_{view}.png"
    out[LABEL[0]] = root / LABEL[0] / condition / split / sequence / f"{frame}_{LABEL[1]}_{view}.png"
    return out


def decode_label(semantic: np.ndarray) -> tuple[np.ndarray, int]:
    """Class ids (H, W) uint8 from a semantic png array (first channel): 0 -> 255, v -> v - 1; values above
    the 25 classes are ignored as well. Returns the ids and the number of such out-of-range pixels."""
    raw = semantic[..., 0] if semantic.ndim == 3 else semantic
    raw = raw.astype(np.int64)
    out = raw - 1
    unknown = raw > len(CLASSES)
    out[(raw == 0) | unknown] = IGNORE
    return out.astype(np.uint8), int(unknown.sum())


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


class Deliver(CachedCropDataset):
    """DELIVER semantic segmentation (25 classes; modalities rgb, depth, event, lidar)."""

    item_name = "images"
    bytes_per_pixel = 3 * len(MODALITIES) + 1  # uint8 frames and mask

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
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.split = split
        self.crop_size = check_crop_size(crop_size)
        self.conditions = self._conditions(conditions)
        if root is None or str(root) in ("", "???"):
            raise _missing_data("no data folder given: set dataset.builder.root=/path/to/DELIVER")
        self.root = Path(root).expanduser()
        self.skip_incomplete = bool(skip_incomplete)
        names = parse_pattern(modalities or tuple(MODALITIES), tuple(MODALITIES))
        sources, splits = self._verify()
        if cache_dir is None:
            tag = NAME if self.conditions == CONDITIONS else f"{NAME}-{'+'.join(self.conditions)}"
            cache_dir = default_cache_dir(self.root, tag)
        self.cache = TileCache(
            cache_dir,
            dataset=NAME,
            sources=sources,
            splits=splits,
            options={"conditions": list(self.conditions)},
            stat_keys=tuple(MODALITIES),
        )
        self._prepare_cache(sources, self._load, progress=progress)
        self.modalities: tuple[Modality, ...] = tuple(
            Modality(n, MODALITIES[n][2], *self.cache.stats(n)) for n in names
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

    # -- verification ---------------------------------------------------------------------------------
    def _verify(self) -> tuple[dict[str, dict[str, Path]], dict[str, list[str]]]:
        state = folder_state(self.root)
        if state is not None:
            raise _missing_data(f"root {str(self.root)!r} {state}")
        entries = [p.name for p in self.root.iterdir() if p.name != ".sgma_cache"]
        if not entries:
            raise _missing_data(f"root {str(self.root)!r} is empty")
        rgb_dir = self.root / MODALITIES["rgb"][0]
        if not rgb_dir.is_dir():
            raise _missing_data(f"no {rgb_dir.name}/ folder in {str(self.root)!r} (it holds {sorted(entries)[:8]})")
        needed = ["train", *([self.split] if self.split != "train" else [])]
        sources: dict[str, dict[str, Path]] = {}
        splits: dict[str, list[str]] = {}
        for split in SPLITS:
            tiles: list[str] = []
            for condition in self.conditions:
                folder = rgb_dir / condition / split
                if not folder.is_dir():
                    continue
                for seq_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                    for png in sorted(seq_dir.iterdir()):
                        match = RGB_FILE.match(png.name)
                        if not match:
                            continue
                        frame, view = match["frame"], match["view"]
                        files = frame_files(self.root, condition, split, seq_dir.name, frame, view)
                        problems = not_files(list(files.values()))
                        tile = f"{split}__{condition}__{seq_dir.name}__{frame}_{view}"
                        if problems:
                            if not self.skip_incomplete:
                                raise FileNotFoundError(
                                    f"{NAME}: {'; '.join(problems)} (its rgb image {png} exists); put the file "
                                    f"there (extract it again) or set dataset.builder.skip_incomplete=true to drop "
                                    f"incomplete frames with a warning"
                                )
                            warnings.warn(
                                f"{NAME}: dropping {condition}/{split}/{seq_dir.name}/{frame}_{view}: "
                                f"{'; '.join(problems)}",
                                stacklevel=3,
                            )
                            continue
                        sources[tile] = files
                        tiles.append(tile)
            if tiles:
                splits[split] = tiles
            elif split in needed:
                raise _missing_data(
                    f"no complete {split} frame for condition(s) {', '.join(self.conditions)} under {rgb_dir}"
                )
        return sources, splits

    def _check_sizes(self, key: str, files: dict[str, Path]) -> tuple[int, int]:
        size = _png_size(files["rgb"])
        for key in (*MODALITIES, LABEL[0]):
            other = _png_size(files[key])
            if other != size:
                raise ValueError(
                    f"size mismatch: {files[key]} is {other[0]} x {other[1]} px but {files['rgb']} is "
                    f"{size[0]} x {size[1]} px"
                )
        return size

    # -- decoding -------------------------------------------------------------------------------------
    def _load(self, tile: str) -> PreparedTile:
        files = {k: Path(v) for k, v in self.cache.sources[tile].items()}
        arrays = {m: _as_three_channels(_read_png(files[m]), files[m]) for m in MODALITIES}
        mask, unknown = decode_label(_read_png(files[LABEL[0]]))
        return PreparedTile(
            arrays={**arrays, "mask": mask},
            info={"ignored_pixels": int((mask == IGNORE).sum()), "out_of_range_label_pixels": unknown},
        )

    # -- dataset protocol (shared parts in tiles.CachedCropDataset) ---------------------------------
    @property
    def images(self) -> list[str]:
        return list(self.crops.shapes)


# ------------------------------------------------------------------------------------------- fake data
