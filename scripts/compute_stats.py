"""Per-modality mean/std of an ISPRS dataset's TRAIN split (printed and stored in the tile-cache manifest).

    python scripts/compute_stats.py --dataset potsdam --root /data/potsdam [--cache-dir DIR] [--rebuild]

The statistics are measured while the tile cache is prepared (sgma.data.tiles) and the datasets read
them from the manifest into ``Modality(mean, std)``; this script is a thin wrapper that prepares the
cache if needed and prints them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from sgma.data.isprs import Potsdam, Vaihingen
from sgma.data.tiles import MANIFEST, default_cache_dir

DATASETS = {"potsdam": Potsdam, "vaihingen": Vaihingen}


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
        cache = args.cache_dir or default_cache_dir(args.root, cls.NAME)
        shutil.rmtree(cache, ignore_errors=True)
    data = cls("train", root=args.root, cache_dir=args.cache_dir)
    stats = data.manifest["stats"]
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"{args.dataset}: mean/std per channel over the {len(data.manifest['splits']['train'])} train tiles")
    for name, entry in stats["modalities"].items():
        print(f"  {name:6s} mean={entry['mean']}  std={entry['std']}")
    print(f"stored in {data.cache.dir / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
