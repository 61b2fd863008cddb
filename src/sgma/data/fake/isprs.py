"""Fake ISPRS Potsdam and Vaihingen trees."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sgma.data.fake.common import NODATA, OUTLIER_PATCH, OUTLIER_VALUE, write_geotiff, write_jpeg
from sgma.data.isprs import BOUNDARY, PALETTE, Potsdam, Vaihingen

POTSDAM_NARROW_NDSM = "3_11"
POTSDAM_EMPTY_OWNAPPROACH = "5_11"
POTSDAM_NODATA_DSM = "6_8"
OFF_PALETTE_TILES = {"potsdam": ("2_11", "2_13"), "vaihingen": ("1", "2")}
OFF_PALETTE_COLOUR = (128, 64, 0)
VAIHINGEN_NAN_DSM = "1"
VAIHINGEN_NODATA_DSM = "3"


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
