"""Tiny fake datasets in the REAL on-disk layout, known defects included (for tests and dry runs).

Same folder tree, file names (zero-padded Potsdam DSM ids), formats (georeferenced GeoTIFF, 8-bit JPEG
nDSM), dtypes and band counts as the official archives, at 96-200 px instead of 6000 px. Scenes are
coherent (buildings are high in the DSM and dark in NIR, vegetation bright in NIR) so a model can learn.

Defects written on purpose (what the loaders must survive):

* Potsdam ``5_Labels_all/top_potsdam_4_12_label.tif`` is an overlay of the image and the label (mostly
  off-palette colours); the correct copy is in ``5_Labels_for_participants``;
* the nDSM of :data:`POTSDAM_NARROW_NDSM` is 1 px narrower than its RGBIR tile (the 5999 px case);
* the ``_ownapproach`` nDSM of one tile is empty; ``empty_ndsm_tiles`` also empties ``_lastools`` ones;
* a few off-palette pixels in :data:`OFF_PALETTE_TILES` labels; black boundaries in eroded labels;
* raw DSMs (Potsdam ``1_DSM``, Vaihingen ``dsm``) hold absolute heights with NaN and -32767 no-data;
* on request (``outlier_tiles`` / ``height_outliers``), a :data:`OUTLIER_PATCH` patch of :data:`OUTLIER_VALUE`
  (an undeclared no-data marker, the kind that once moved a DSM std from 3.4 m to 2877 m) in height maps.

DFC2023 and generic-folder copies (``make_fake_dfc2023``, ``make_fake_folder``) write their real layouts
(GeoTIFF/PNG files, COCO json, dataset.yaml) with rectangular "buildings" that are bright in rgb, high in
the height map and strong in SAR, so a model can learn something.

CLI: ``python -m sgma.data.fake potsdam|vaihingen|dfc2023|folder|deliver DIR [--tile-size 96]``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sgma.data import deliver
from sgma.data.isprs import BOUNDARY, PALETTE, Potsdam, Vaihingen

POTSDAM_NARROW_NDSM = "3_11"
POTSDAM_EMPTY_OWNAPPROACH = "5_11"
POTSDAM_NODATA_DSM = "6_8"
OFF_PALETTE_TILES = {"potsdam": ("2_11", "2_13"), "vaihingen": ("1", "2")}
OFF_PALETTE_COLOUR = (128, 64, 0)
VAIHINGEN_NAN_DSM = "1"
VAIHINGEN_NODATA_DSM = "3"
NODATA = -32767.0
OUTLIER_VALUE = 1e30
OUTLIER_PATCH = (slice(8, 16), slice(8, 16))  # 64 px


def _scene(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    """Class ids, RGB, NIR and height above ground (m) of one small coherent scene."""
    cls = np.where(rng.random() < 0.5, 0, 2) * np.ones((h, w), np.uint8)  # impervious or lawn background
    height = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    road = rng.integers(0, h)
    cls[np.abs(yy - road) < max(3, h // 16)] = 0
    for _ in range(rng.integers(2, 5)):  # buildings
        y0, x0 = rng.integers(0, h - 12), rng.integers(0, w - 12)
        bh, bw = rng.integers(10, max(11, h // 3)), rng.integers(10, max(11, w // 3))
        cls[y0 : y0 + bh, x0 : x0 + bw] = 1
        height[y0 : y0 + bh, x0 : x0 + bw] = rng.uniform(4, 15)
    for _ in range(rng.integers(2, 6)):  # trees
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        cls[disc & (cls != 1)] = 3
        height[disc & (cls == 3)] = rng.uniform(3, 10)
    for _ in range(rng.integers(1, 4)):  # cars and clutter
        y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
        cls[y0 : y0 + 3, x0 : x0 + 6] = 4
        height[y0 : y0 + 3, x0 : x0 + 6] = 1.5
    y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
    cls[y0 : y0 + 4, x0 : x0 + 4] = 5
    colours = np.array([[150, 150, 150], [170, 90, 70], [90, 130, 60], [50, 90, 40], [200, 30, 30], [120, 80, 120]])
    nir_of = np.array([60, 70, 200, 220, 50, 90])
    rgb = colours[cls].transpose(2, 0, 1) + rng.normal(0, 8, (3, h, w))
    nir = nir_of[cls] + rng.normal(0, 8, (h, w))
    return {
        "cls": cls,
        "rgb": np.clip(rgb, 0, 255).astype(np.uint8),
        "nir": np.clip(nir, 0, 255).astype(np.uint8),
        "height": height + np.abs(rng.normal(0, 0.2, (h, w))).astype(np.float32),
    }


def colour_label(cls: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (3, H, W) uint8 colours in RGB order."""
    return np.array(PALETTE, np.uint8)[cls].transpose(2, 0, 1).copy()


def eroded_label(cls: np.ndarray) -> np.ndarray:
    """Colour label with class boundaries painted black, like the official ``noBoundary`` files."""
    edge = np.zeros(cls.shape, bool)
    edge[1:] |= cls[1:] != cls[:-1]
    edge[:-1] |= cls[1:] != cls[:-1]
    edge[:, 1:] |= cls[:, 1:] != cls[:, :-1]
    edge[:, :-1] |= cls[:, 1:] != cls[:, :-1]
    out = colour_label(cls)
    out[:, edge] = np.array(BOUNDARY, np.uint8)[:, None]
    return out


def _with_off_palette(label: np.ndarray, rng: np.random.Generator, n: int = 5) -> np.ndarray:
    label = label.copy()
    ys, xs = rng.integers(0, label.shape[1], n), rng.integers(0, label.shape[2], n)
    label[:, ys, xs] = np.array(OFF_PALETTE_COLOUR, np.uint8)[:, None]
    return label


def write_geotiff(path: Path, array: np.ndarray, *, origin=(0.0, 0.0), gsd=0.05, epsg=32633, nodata=None) -> None:
    """(C, H, W) or (H, W) array -> a georeferenced GeoTIFF (north-up, ``gsd`` m/px)."""
    import rasterio
    from rasterio.transform import Affine

    array = array[None] if array.ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "crs": f"EPSG:{epsg}",
        "transform": Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1]),  # north-up, top-left origin
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def write_jpeg(path: Path, gray: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray.astype(np.uint8), "L").save(path, quality=100)


def make_fake_potsdam(
    root: str | Path,
    tile_size: int = 96,
    tiles: Iterable[str] | None = None,
    *,
    empty_ndsm_tiles: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a fake Potsdam (all 38 tiles unless ``tiles``) under ``root``; return ``root``."""
    root = Path(root)
    tiles = list(tiles) if tiles is not None else list(Potsdam.ALL_TILES)
    empty = set(empty_ndsm_tiles)
    for k, tile in enumerate(tiles):
        rng = np.random.default_rng((seed, k))
        s = tile_size
        scene = _scene(rng, s, s)
        ids = {"id": tile, "padded": Potsdam.padded(tile)}
        row, col = (int(p) for p in tile.split("_"))
        origin = (366000.0 + col * s * 0.05, 5808000.0 - row * s * 0.05)
        write_geotiff(
            root / Potsdam.RGBIR.format(**ids), np.concatenate([scene["rgb"], scene["nir"][None]]), origin=origin
        )
        write_geotiff(root / f"2_Ortho_RGB/top_potsdam_{tile}_RGB.tif", scene["rgb"], origin=origin)
        # nDSM: 8-bit, ~ 0.1 m per grey level; the 5999 px defect is 1 px narrower
        ndsm = np.clip(scene["height"] * 10, 0, 255)
        if tile == POTSDAM_NARROW_NDSM:
            ndsm = ndsm[:, :-1]
        write_jpeg(root / Potsdam.NDSM.format(**ids), np.zeros_like(ndsm) if tile in empty else ndsm)
        if tile == POTSDAM_EMPTY_OWNAPPROACH:
            write_jpeg(
                root / f"1_DSM_normalisation/dsm_potsdam_{ids['padded']}_normalized_ownapproach.jpg",
                np.zeros_like(ndsm),
            )
        dsm = (scene["height"] + 35.0 + rng.uniform(0, 5)).astype(np.float32)  # absolute heights
        if tile == POTSDAM_NODATA_DSM:
            dsm[:4, :4] = np.nan
            dsm[-3:, -3:] = NODATA
        write_geotiff(root / Potsdam.DSM.format(**ids), dsm, origin=origin, nodata=NODATA)
        label, eroded = colour_label(scene["cls"]), eroded_label(scene["cls"])
        if tile in OFF_PALETTE_TILES["potsdam"]:
            label, eroded = _with_off_palette(label, rng), _with_off_palette(eroded, rng)
        if tile in Potsdam.BROKEN_LABELS:  # the broken overlay in 5_Labels_all, the good copy elsewhere
            write_geotiff(root / Potsdam.BROKEN_LABELS[tile], label, origin=origin)
            overlay = (label.astype(np.uint16) + scene["rgb"]) // 2
            write_geotiff(root / Potsdam.LABEL.format(**ids), overlay.astype(np.uint8), origin=origin)
        else:
            write_geotiff(root / Potsdam.LABEL.format(**ids), label, origin=origin)
        write_geotiff(root / Potsdam.LABEL_ERODED.format(**ids), eroded, origin=origin)
    return root


def vaihingen_size(tile: str, tile_size: int) -> tuple[int, int]:
    """Fake areas differ in size and are not square, like the real ones."""
    n = int(tile)
    return tile_size + (n * 7) % 41, tile_size + (n * 13) % 37


def make_fake_vaihingen(
    root: str | Path,
    tile_size: int = 96,
    tiles: Iterable[str] | None = None,
    *,
    seed: int = 0,
    outlier_tiles: Iterable[str] = (),
) -> Path:
    """Write a fake Vaihingen (all 33 labelled areas unless ``tiles``) under ``root``; return ``root``.
    The DSMs of ``outlier_tiles`` get an :data:`OUTLIER_VALUE` patch."""
    outliers = {str(t) for t in outlier_tiles}
    root = Path(root)
    all_tiles = [t for s in Vaihingen.SPLIT_TILES.values() for t in s]
    tiles = [str(t) for t in tiles] if tiles is not None else sorted(all_tiles, key=int)
    for k, tile in enumerate(tiles):
        rng = np.random.default_rng((seed, 1000 + k))
        h, w = vaihingen_size(tile, tile_size)
        scene = _scene(rng, h, w)
        origin = (496000.0 + int(tile) * 300.0, 5420000.0)
        irrg = np.stack([scene["nir"], scene["rgb"][0], scene["rgb"][1]])  # NIR, R, G
        write_geotiff(root / Vaihingen.TOP.format(id=tile), irrg, origin=origin, gsd=0.09, epsg=32632)
        dsm = (scene["height"] + 262.0 + rng.uniform(0, 20)).astype(np.float32)  # absolute heights > 255 m
        if tile == VAIHINGEN_NAN_DSM:
            dsm[:5, :5] = np.nan
        if tile in outliers:
            dsm[OUTLIER_PATCH] = OUTLIER_VALUE
        nodata = None
        if tile == VAIHINGEN_NODATA_DSM:
            dsm[-4:, :6] = NODATA
            nodata = NODATA
        write_geotiff(root / Vaihingen.DSM.format(id=tile), dsm, origin=origin, gsd=0.09, epsg=32632, nodata=nodata)
        label, eroded = colour_label(scene["cls"]), eroded_label(scene["cls"])
        if tile in OFF_PALETTE_TILES["vaihingen"]:
            label, eroded = _with_off_palette(label, rng), _with_off_palette(eroded, rng)
        write_geotiff(root / Vaihingen.LABEL.format(id=tile), label, origin=origin, gsd=0.09, epsg=32632)
        write_geotiff(root / Vaihingen.LABEL_ERODED.format(id=tile), eroded, origin=origin, gsd=0.09, epsg=32632)
    return root


FOLDER_CLASSES = ("background", "building", "water")
FOLDER_PALETTE = ((0, 0, 0), (255, 0, 0), (0, 0, 255))


def _boxes(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` random boxes (x0, y0, x1, y1), exclusive ends, inside a ``size`` square."""
    out = []
    for _ in range(count):
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        out.append((x0, y0, x0 + w, y0 + h))
    return out


def _box_scene(rng: np.random.Generator, size: int, water: bool) -> tuple[np.ndarray, ...]:
    """Label (H, W) uint8, rgb (3, H, W) uint8, height (H, W) float32, sar (H, W) float32, building boxes."""
    label = np.zeros((size, size), np.uint8)
    if water:
        x0, y0, x1, y1 = _boxes(rng, size, 1)[0]
        label[y0:y1, x0:x1] = 2
    buildings = _boxes(rng, size, 3)
    for x0, y0, x1, y1 in buildings:
        label[y0:y1, x0:x1] = 1
    base = np.array([[90, 120, 60], [200, 80, 70], [30, 60, 140]], np.float32)[label]  # (H, W, 3)
    rgb = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    height = np.where(label == 1, rng.uniform(5, 15), 0).astype(np.float32) + rng.normal(0, 0.3, label.shape)
    sar = np.where(label == 1, -5.0, np.where(label == 2, -22.0, -14.0)) + rng.normal(0, 2, label.shape)
    return label, rgb, height.astype(np.float32), sar.astype(np.float32), buildings


# ---------------------------------------------------------------------------------------------- folder
def make_fake_folder(
    root: str | Path,
    *,
    num_images: int = 8,
    size: int = 80,
    seed: int = 0,
    colour_labels: bool = False,
    splits: str = "fraction",
) -> Path:
    """A generic-folder dataset: ``rgb`` (png, 3 bands), ``dsm`` (GeoTIFF float32, one no-data pixel per
    image, declared by ``nodata: -9999``), ``labels`` (png ids, or palette colours with ``colour_labels``),
    ``dataset.yaml`` with classes, palette and dsm mean/std (rgb's are measured on train).

    ``splits``: ``fraction`` (val/test fractions in the yaml), ``files`` (``splits/*.txt``) or ``yaml``
    (lists in the yaml). Returns ``root``.
    """
    import yaml
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    stems = [f"img_{i:03d}" for i in range(num_images)]
    for folder in ("rgb", "dsm", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        label, rgb, height, _, _ = _box_scene(rng, size, water=True)
        Image.fromarray(rgb.transpose(1, 2, 0)).save(root / "rgb" / f"{stem}.png")
        height[0, 0] = -9999.0
        write_geotiff(root / "dsm" / f"{stem}.tif", height, gsd=0.5, nodata=-9999.0)
        if colour_labels:
            Image.fromarray(np.array(FOLDER_PALETTE, np.uint8)[label]).save(root / "labels" / f"{stem}.png")
        else:
            Image.fromarray(label).save(root / "labels" / f"{stem}.png")
    desc = {
        "modalities": [
            {"name": "rgb", "channels": 3},
            {"name": "dsm", "channels": 1, "mean": [3.0], "std": [5.0], "nodata": -9999, "valid_range": [-100, 1000]},
        ],
        "classes": list(FOLDER_CLASSES),
        "palette": [list(c) for c in FOLDER_PALETTE],
        "ignore_index": 255,
    }
    n_val = max(1, num_images // 4)
    lists = {"train": stems[: -2 * n_val], "val": stems[-2 * n_val : -n_val], "test": stems[-n_val:]}
    if splits == "fraction":
        desc.update(val_fraction=0.25, test_fraction=0.25, split_seed=0)
    elif splits == "yaml":
        desc["splits"] = lists
    elif splits == "files":
        (root / "splits").mkdir(exist_ok=True)
        for s, listed in lists.items():
            (root / "splits" / f"{s}.txt").write_text("\n".join(listed) + "\n")
    else:
        raise ValueError(f"splits={splits!r}: use fraction, files or yaml")
    (root / "dataset.yaml").write_text(yaml.safe_dump(desc, sort_keys=False))
    return root


# --------------------------------------------------------------------------------------------- DFC2023
def make_fake_dfc2023(
    root: str | Path,
    *,
    counts: tuple[int, int, int] = (4, 2, 2),
    size: int = 64,
    seed: int = 0,
    test_annotations: bool = True,
    height_outliers: Iterable[str] = (),
) -> Path:
    """The DFC2023 track-2 layout: ``{train,val,test}/{rgb,sar,height}/P0001.tif`` plus COCO polygons in
    ``annotations/buildings_only_{split}.json`` (one rectangle per building, possibly overlapping; their union
    is the building mask). ``test_annotations=False`` leaves out the test json; the height maps named in
    ``height_outliers`` (``"train/P0001"``) get an :data:`OUTLIER_VALUE` patch. Returns ``root``."""
    outliers = set(height_outliers)
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        images, anns = [], []
        for i in range(n):
            name = f"P{i + 1:04d}.tif"
            _, rgb, height, sar, buildings = _box_scene(rng, size, water=False)
            if f"{split}/{Path(name).stem}" in outliers:
                height[OUTLIER_PATCH] = OUTLIER_VALUE
            write_geotiff(root / split / "rgb" / name, rgb, gsd=0.5)
            write_geotiff(root / split / "sar" / name, sar, gsd=0.5)
            write_geotiff(root / split / "height" / name, height, gsd=0.5)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
            for x0, y0, x1, y1 in buildings:
                poly = [x0, y0, x1, y0, x1, y1, x0, y1]  # pixel-corner coordinates: covers [x0, x1) x [y0, y1)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "segmentation": [[float(v) for v in poly]],
                        "area": float((x1 - x0) * (y1 - y0)),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "iscrowd": 0,
                    }
                )
        if split == "test" and not test_annotations:
            continue
        coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "building"}]}
        (root / "annotations" / f"buildings_only_{split}.json").write_text(json.dumps(coco))
    return root


def make_fake_deliver(
    root: str | os.PathLike,
    *,
    counts: tuple[int, int, int] = (2, 1, 1),
    conditions: Sequence[str] = deliver.CONDITIONS,
    size: int = 64,
    seed: int = 0,
    sequence: str = "MAP_1_point0",
    view: str = "front",
) -> Path:
    """A small DELIVER copy in the real layout: ``counts`` frames per (condition, split), ``size`` px.

    Labels hold the raw png values (0 = unlabelled, 1..25 = class + 1) in all three channels; event and lidar
    are grey images saved as 3 channels like the originals. Returns ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for condition in conditions:
        for split, n in zip(deliver.SPLITS, counts, strict=True):
            for i in range(n):
                frame = f"{i:06d}"
                files = deliver.frame_files(root, condition, split, sequence, frame, view)
                raw = rng.integers(0, len(deliver.CLASSES) + 1, (size // 8, size // 8)).astype(np.uint8)
                raw[0, 0], raw[-1, -1] = 0, len(deliver.CLASSES)  # always an unlabelled and a last-class block
                raw = np.kron(raw, np.ones((8, 8), np.uint8))  # 8 x 8 px blocks
                colour = np.array((*deliver.PALETTE, (0, 0, 0)), np.float32)[
                    np.where(raw == 0, len(deliver.CLASSES), raw - 1)
                ]
                rgb = np.clip(colour + rng.normal(0, 10, colour.shape), 0, 255).astype(np.uint8)
                depth = np.stack([raw * 9, 255 - raw * 9, np.full_like(raw, 128)], -1).astype(np.uint8)
                event = np.repeat((rng.random(raw.shape) < 0.1).astype(np.uint8)[..., None] * 255, 3, -1)
                lidar = np.repeat(((raw % 5) * 50).astype(np.uint8)[..., None], 3, -1)
                semantic = np.repeat(raw[..., None], 3, -1)
                for key, array in (("rgb", rgb), ("depth", depth), ("event", event), ("lidar", lidar)):
                    files[key].parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(files[key])
                files[deliver.LABEL[0]].parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(semantic).save(files[deliver.LABEL[0]])
    return root


FAKERS = {
    "potsdam": make_fake_potsdam,
    "vaihingen": make_fake_vaihingen,
    "dfc2023": make_fake_dfc2023,
    "folder": make_fake_folder,
    "deliver": make_fake_deliver,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny fake dataset in its real on-disk layout.")
    parser.add_argument("dataset", choices=sorted(FAKERS))
    parser.add_argument("root", type=Path)
    parser.add_argument("--tile-size", type=int, default=None, help="ISPRS tile side (default 96)")
    parser.add_argument("--tiles", nargs="*", default=None, help="ISPRS tile ids (default: all)")
    args = parser.parse_args(argv)
    if args.dataset in ("potsdam", "vaihingen"):
        root = FAKERS[args.dataset](args.root, tile_size=args.tile_size or 96, tiles=args.tiles)
    else:
        root = FAKERS[args.dataset](args.root)
    print(f"fake {args.dataset} written to {root}; train with dataset={args.dataset} dataset.builder.root={root}")


if __name__ == "__main__":
    main()
