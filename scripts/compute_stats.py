"""Per-modality mean/std of a cached dataset's TRAIN split (printed and stored in the tile-cache manifest).

    python scripts/compute_stats.py --dataset potsdam --root /data/potsdam [--cache-dir DIR] [--rebuild]

The statistics are measured while the tile cache is prepared (sgma.data.tiles) and the datasets read
them from the manifest into ``Modality(mean, std)``; this script is a thin wrapper that prepares the
cache if needed and prints them. They leave out the pixels that are not measurements (filled no-data,
heights clipped to the physical range); ``excluded`` says how many.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from filelock import FileLock

from sgma.data.deliver import Deliver
from sgma.data.dfc2023 import DFC2023
from sgma.data.folder import FolderDataset
from sgma.data.isprs import Potsdam, Vaihingen
from sgma.data.tiles import MANIFEST, cache_lock_path, default_cache_dir

DATASETS = {"potsdam": Potsdam, "vaihingen": Vaihingen, "dfc2023": DFC2023, "deliver": Deliver, "folder": FolderDataset}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--root", required=True, help="the dataset's root folder (official layout)")
    parser.add_argument("--cache-dir", default=None, help="tile cache folder (default: <root>/.sgma_cache/...)")
    parser.add_argument("--rebuild", action="store_true", help="delete the tile cache and prepare it again")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args(argv)

    cls = DATASETS[args.dataset]
    if args.rebuild:
        cache = Path(args.cache_dir or default_cache_dir(args.root, cls.NAME))
        if cache.exists():
            with FileLock(str(cache_lock_path(cache))):  # not while another process prepares or reads it in
                shutil.rmtree(cache)
    data = cls("train", root=args.root, cache_dir=args.cache_dir)
    stats = data.manifest["stats"]
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"{args.dataset}: mean/std per channel over the {len(data.manifest['splits']['train'])} train tiles")
    for name, entry in stats["modalities"].items():
        left_out = f"  ({entry['excluded']} no-data/outlier pixels left out)" if entry.get("excluded") else ""
        print(f"  {name:6s} mean={entry['mean']}  std={entry['std']}{left_out}")
    print(f"stored in {data.cache.dir / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
