"""Tiny fake datasets laid out as the real releases are after a plain unzip, quirks included (tests, dry runs).

One module per dataset (:mod:`~sgma.data.fake.isprs`, :mod:`~sgma.data.fake.dfc2023`,
:mod:`~sgma.data.fake.deliver`, :mod:`~sgma.data.fake.folder`); each module's docstring lists the release
quirks and known defects it writes on purpose (what the loaders must survive). Scenes are coherent (buildings
are high in the height map and distinct in colour, NIR and SAR) so a model can learn something.

CLI: ``python -m sgma.data.fake potsdam|vaihingen|dfc2023|folder|deliver DIR [--tile-size 96]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sgma.data.fake.common import NODATA, OUTLIER_PATCH, OUTLIER_VALUE, write_geotiff, write_jpeg
from sgma.data.fake.deliver import make_fake_deliver
from sgma.data.fake.dfc2023 import make_fake_dfc2023
from sgma.data.fake.folder import FOLDER_CLASSES, FOLDER_PALETTE, make_fake_folder
from sgma.data.fake.isprs import (
    OFF_PALETTE_COLOUR,
    OFF_PALETTE_TILES,
    POTSDAM_EMPTY_OWNAPPROACH,
    POTSDAM_NARROW_NDSM,
    POTSDAM_NODATA_DSM,
    VAIHINGEN_NAN_DSM,
    VAIHINGEN_NODATA_DSM,
    colour_label,
    eroded_label,
    make_fake_potsdam,
    make_fake_vaihingen,
    vaihingen_size,
)

__all__ = [
    "FAKERS",
    "FOLDER_CLASSES",
    "FOLDER_PALETTE",
    "NODATA",
    "OFF_PALETTE_COLOUR",
    "OFF_PALETTE_TILES",
    "OUTLIER_PATCH",
    "OUTLIER_VALUE",
    "POTSDAM_EMPTY_OWNAPPROACH",
    "POTSDAM_NARROW_NDSM",
    "POTSDAM_NODATA_DSM",
    "VAIHINGEN_NAN_DSM",
    "VAIHINGEN_NODATA_DSM",
    "colour_label",
    "eroded_label",
    "main",
    "make_fake_deliver",
    "make_fake_dfc2023",
    "make_fake_folder",
    "make_fake_potsdam",
    "make_fake_vaihingen",
    "vaihingen_size",
    "write_geotiff",
    "write_jpeg",
]

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
