"""Fake ISPRS Potsdam and Vaihingen trees, laid out as a plain unzip of each release archive leaves them.

Potsdam (default): ``4_Ortho_RGBIR/``, ``2_Ortho_RGB/``, ``3_Ortho_IRRG/`` (IR, R, G), ``1_DSM/``,
``1_DSM_normalisation/`` and ``5_Labels_for_participants/`` (the 24 official train tiles) as folders, with
``.tfw`` sidecars next to the orthophotos; ``5_Labels_all.zip`` and ``5_Labels_all_noBoundary.zip`` have no
folder inside, so their label tifs lie flat in the root. ``nested=True`` extracts each archive into a folder
named after it (``4_Ortho_RGBIR/4_Ortho_RGBIR/...``, ``5_Labels_all/...``); ``imagery="rgb_irrg"`` writes no
``4_Ortho_RGBIR`` at all, ``imagery="rgbir"`` no RGB / IRRG.

Vaihingen (default): ``top/``, ``dsm/`` and ``gts_for_participants/`` (train areas only) as in the main zip;
the full labels of every area flat in the root under the image names (the ground-truth COMPLETE zip); the
eroded labels flat, including the unused area 9. ``ndsm=True`` adds Gerke's 8-bit nDSM jpgs in ``ndsm/``;
``dsm=False`` leaves out the float DSMs.

Defects written on purpose (what the loaders must survive): a Potsdam nDSM 1 px narrower
(:data:`POTSDAM_NARROW_NDSM`); an empty ``_normalized_ownapproach.jpg`` next to a good lastools nDSM
(:data:`POTSDAM_EMPTY_OWNAPPROACH`); NaN and nodata pixels in raw DSMs (:data:`POTSDAM_NODATA_DSM`,
:data:`VAIHINGEN_NAN_DSM`, :data:`VAIHINGEN_NODATA_DSM`); off-palette label pixels
(:data:`OFF_PALETTE_TILES`); the ``5_Labels_all`` label of 4_12 is an overlay of label and image and the one
of 6_7 codes its cars as (252, 255, 0) (:data:`POTSDAM_ALIASED_CAR`), the participants' copies are clean;
height outliers on request (``outlier_tiles``); empty nDSMs on request (``empty_ndsm_tiles``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sgma.data.fake.common import NODATA, OUTLIER_PATCH, OUTLIER_VALUE, write_geotiff, write_jpeg
from sgma.data.isprs import BOUNDARY, CAR, PALETTE, Potsdam, Vaihingen

POTSDAM_NARROW_NDSM = "3_11"
POTSDAM_EMPTY_OWNAPPROACH = "5_11"
POTSDAM_NODATA_DSM = "6_8"
POTSDAM_ALIASED_CAR = (252, 255, 0)  # the car colour of 5_Labels_all's 6_7 label
# the 24 official train tiles: the ones in 5_Labels_for_participants.zip
POTSDAM_PARTICIPANTS = tuple(t for t in Potsdam.ALL_TILES if t not in Potsdam.TEST_TILES)
OFF_PALETTE_TILES = {"potsdam": ("2_11", "2_13"), "vaihingen": ("1", "2")}
OFF_PALETTE_COLOUR = (128, 64, 0)
VAIHINGEN_NAN_DSM = "1"
VAIHINGEN_NODATA_DSM = "3"
VAIHINGEN_UNUSED_AREA = "9"  # in the eroded COMPLETE zip, in no split


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


def _tfw(path: Path, origin: tuple[float, float], gsd: float) -> None:
    """The world-file sidecar the release ships next to each orthophoto."""
    path.with_suffix(".tfw").write_text(f"{gsd}\n0.0\n0.0\n{-gsd}\n{origin[0] + gsd / 2}\n{origin[1] - gsd / 2}\n")


def make_fake_potsdam(
    root: str | Path,
    tile_size: int = 96,
    tiles: Iterable[str] | None = None,
    *,
    empty_ndsm_tiles: Iterable[str] = (),
    nested: bool = False,
    imagery: str = "all",
    seed: int = 0,
) -> Path:
    """Write a fake Potsdam (all 38 tiles unless ``tiles``) under ``root`` as after a plain unzip (module
    docstring); ``imagery``: ``all`` (RGBIR, RGB and IRRG), ``rgbir`` or ``rgb_irrg``. Return ``root``."""
    if imagery not in ("all", "rgbir", "rgb_irrg"):
        raise ValueError(f"imagery={imagery!r}: use all, rgbir or rgb_irrg")
    root = Path(root)
    tiles = list(tiles) if tiles is not None else list(Potsdam.ALL_TILES)
    empty = set(empty_ndsm_tiles)

    def folder(archive: str, inner: bool = True) -> Path:
        """Where ``archive`` unpacks: its inner folder (if it has one), inside a folder named after it."""
        return root / (archive if nested else "") / (archive if inner else "")

    for k, tile in enumerate(tiles):
        rng = np.random.default_rng((seed, k))
        s = tile_size
        scene = _scene(rng, s, s)
        padded = Potsdam.padded(tile)
        row, col = (int(p) for p in tile.split("_"))
        origin = (366000.0 + col * s * 0.05, 5808000.0 - row * s * 0.05)
        images = {}
        if imagery in ("all", "rgbir"):
            images[folder("4_Ortho_RGBIR") / Potsdam.RGBIR.format(id=tile)] = np.concatenate(
                [scene["rgb"], scene["nir"][None]]
            )
        if imagery in ("all", "rgb_irrg"):
            images[folder("2_Ortho_RGB") / Potsdam.RGB.format(id=tile)] = scene["rgb"]
            images[folder("3_Ortho_IRRG") / Potsdam.IRRG.format(id=tile)] = np.stack(
                [scene["nir"], scene["rgb"][0], scene["rgb"][1]]
            )
        for path, array in images.items():
            write_geotiff(path, array, origin=origin)
            _tfw(path, origin, 0.05)
        # nDSM: 8-bit, ~ 0.1 m per grey level; the 5999 px defect is 1 px narrower
        ndsm = np.clip(scene["height"] * 10, 0, 255)
        if tile == POTSDAM_NARROW_NDSM:
            ndsm = ndsm[:, :-1]
        ndsm_dir = folder("1_DSM_normalisation")
        write_jpeg(ndsm_dir / Potsdam.NDSM.format(padded=padded), np.zeros_like(ndsm) if tile in empty else ndsm)
        if tile == POTSDAM_EMPTY_OWNAPPROACH:
            write_jpeg(ndsm_dir / f"dsm_potsdam_{padded}_normalized_ownapproach.jpg", np.zeros_like(ndsm))
        dsm = (scene["height"] + 35.0 + rng.uniform(0, 5)).astype(np.float32)  # absolute heights
        if tile == POTSDAM_NODATA_DSM:
            dsm[:4, :4] = np.nan
            dsm[-3:, -3:] = NODATA
        write_geotiff(folder("1_DSM") / Potsdam.DSM.format(padded=padded), dsm, origin=origin, nodata=NODATA)
        label, eroded = colour_label(scene["cls"]), eroded_label(scene["cls"])
        if tile in OFF_PALETTE_TILES["potsdam"]:
            label, eroded = _with_off_palette(label, rng), _with_off_palette(eroded, rng)
        if tile in POTSDAM_PARTICIPANTS:  # the clean copies
            path = folder("5_Labels_for_participants") / Potsdam.LABEL.format(id=tile)
            write_geotiff(path, label, origin=origin)
            _tfw(path, origin, 0.05)
        everyone = label
        if tile in Potsdam.BROKEN_LABELS:  # an overlay of label and image, not a mask
            everyone = ((label.astype(np.uint16) + scene["rgb"]) // 2).astype(np.uint8)
        elif tile in Potsdam.LABEL_ALIASES:  # its cars in another yellow
            everyone = label.copy()
            everyone[:, scene["cls"] == CAR] = np.array(POTSDAM_ALIASED_CAR, np.uint8)[:, None]
        write_geotiff(folder("5_Labels_all", inner=False) / Potsdam.LABEL.format(id=tile), everyone, origin=origin)
        write_geotiff(
            folder("5_Labels_all_noBoundary", inner=False) / Potsdam.LABEL_ERODED.format(id=tile), eroded, origin=origin
        )
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
    dsm: bool = True,
    ndsm: bool = False,
) -> Path:
    """Write a fake Vaihingen (all 33 labelled areas unless ``tiles``, plus the eroded label of the unused
    area 9) under ``root`` as after a plain unzip (module docstring); return ``root``. The DSMs of
    ``outlier_tiles`` get an :data:`OUTLIER_VALUE` patch."""
    outliers = {str(t) for t in outlier_tiles}
    root = Path(root)
    all_tiles = [t for s in Vaihingen.SPLIT_TILES.values() for t in s]
    participants = set(Vaihingen.SPLIT_TILES["train"] + Vaihingen.SPLIT_TILES["val"])
    tiles = [str(t) for t in tiles] if tiles is not None else sorted(all_tiles, key=int)
    geo = {"gsd": 0.09, "epsg": 32632}
    for k, tile in enumerate(tiles):
        rng = np.random.default_rng((seed, 1000 + k))
        h, w = vaihingen_size(tile, tile_size)
        scene = _scene(rng, h, w)
        origin = (496000.0 + int(tile) * 300.0, 5420000.0)
        irrg = np.stack([scene["nir"], scene["rgb"][0], scene["rgb"][1]])  # NIR, R, G
        write_geotiff(root / "top" / Vaihingen.TOP.format(id=tile), irrg, origin=origin, **geo)
        heights = (scene["height"] + 262.0 + rng.uniform(0, 20)).astype(np.float32)  # absolute heights > 255 m
        if tile == VAIHINGEN_NAN_DSM:
            heights[:5, :5] = np.nan
        if tile in outliers:
            heights[OUTLIER_PATCH] = OUTLIER_VALUE
        nodata = None
        if tile == VAIHINGEN_NODATA_DSM:
            heights[-4:, :6] = NODATA
            nodata = NODATA
        if dsm:
            write_geotiff(root / "dsm" / Vaihingen.DSM.format(id=tile), heights, origin=origin, nodata=nodata, **geo)
        if ndsm:  # Gerke's nDSM: 8-bit heights above the terrain
            write_jpeg(root / "ndsm" / Vaihingen.NDSM.format(id=tile), np.clip(scene["height"] * 10, 0, 255))
        label, eroded = colour_label(scene["cls"]), eroded_label(scene["cls"])
        if tile in OFF_PALETTE_TILES["vaihingen"]:
            label, eroded = _with_off_palette(label, rng), _with_off_palette(eroded, rng)
        if tile in participants:
            write_geotiff(root / "gts_for_participants" / Vaihingen.LABEL.format(id=tile), label, origin=origin, **geo)
        write_geotiff(root / Vaihingen.LABEL.format(id=tile), label, origin=origin, **geo)  # same name as the image
        write_geotiff(root / Vaihingen.LABEL_ERODED.format(id=tile), eroded, origin=origin, **geo)
    h, w = vaihingen_size(VAIHINGEN_UNUSED_AREA, tile_size)
    cls = _scene(np.random.default_rng((seed, 9)), h, w)["cls"]
    write_geotiff(root / Vaihingen.LABEL_ERODED.format(id=VAIHINGEN_UNUSED_AREA), eroded_label(cls), **geo)
    return root
