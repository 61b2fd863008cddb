"""Data-pipeline benchmark: is loading ever the bottleneck, and what does a whole 6000 x 6000 tile cost?

A. Crops per second (512 x 512, all modalities, augmented by each `augment=` option as configured in
   conf/augment/, normalised, through the same dataset/sampler/DataLoader path as training: fresh crops
   and augmentation per (seed, epoch, index)) read from a prepared fake-Potsdam cache with 0 and 2 workers,
   against the training throughput (samples per second, forward + backward + AdamW step) of the SGMA model
   (mit_b0) on the same machine in the same run. Target: data/model ratio >= 3 on CPU, augment=paper included.
B. Whole-tile sliding-window inference (window 512, overlap 0.25, gaussian blend, all modalities) of the
   SGMA model on one 6000 x 6000 tile: wall time and the process's peak resident memory (target < 4 GB),
   measured in a fresh subprocess so part A's allocations do not count.

    python scripts/bench_data.py [--tile-size 1024] [--crops 160] [--augment none paper] [--full-tile 6000]
                                 [--skip-full-tile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from sgma.config import CONFIG_DIR
from sgma.data.datamodule import IncompleteModalityDataset, RandomPatternSampler
from sgma.data.fake import make_fake_potsdam
from sgma.data.isprs import Potsdam
from sgma.data.missing import FullModalities
from sgma.models.segmentor import MultiModalSegmentor
from sgma.utils import instantiate

TRAIN_TILES = ["2_10", "2_11", "2_12", "3_10", "3_11", "3_12"]


def crops_per_second(data: IncompleteModalityDataset, *, workers: int, crops: int, batch_size: int) -> float:
    policy = FullModalities()
    policy.bind(data.modalities)
    loader = torch.utils.data.DataLoader(
        data, sampler=RandomPatternSampler(len(data), policy, seed=0), batch_size=batch_size, num_workers=workers
    )
    it = iter(loader)
    next(it)  # worker start-up and first reads are not throughput
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += batch["mask"].shape[0]
        if seen >= crops:
            break
    return seen / (time.perf_counter() - start)


def training_samples_per_second(modalities, *, size: int, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    net = MultiModalSegmentor(modalities=modalities, num_classes=6, backbone="mit_b0", fusion="sgf").train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    inputs = {m.name: torch.randn(batch_size, m.channels, size, size) for m in modalities}
    available = torch.ones(batch_size, len(modalities), dtype=torch.bool)
    target = torch.randint(0, 6, (batch_size, size, size))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(net(inputs, available).logits, target)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def full_tile_worker(size: int) -> None:
    """Runs in a fresh process: one whole-tile inference; prints a json line with time and peak RSS.

    Peaks are this process's ``VmHWM`` (/proc/self/status), in MiB: ``ru_maxrss`` is carried over fork and exec
    on Linux, so it would report the parent's peak (the loader benchmark of part A) instead of this process's."""
    from bench_fusion import _proc_status_kb

    from sgma.data.synthetic import MODALITIES
    from sgma.inference import sliding_window_logits

    modalities = [MODALITIES[n] for n in ("rgb", "nir", "dsm")]
    torch.manual_seed(0)
    net = MultiModalSegmentor(modalities=modalities, num_classes=6, backbone="mit_b0", fusion="sgf").eval()
    rng = np.random.default_rng(0)
    inputs = {
        m.name: torch.from_numpy(rng.standard_normal((m.channels, size, size), dtype=np.float32)) for m in modalities
    }
    rss_before = _proc_status_kb("VmHWM") / 1024
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_logits(
            net, inputs, [True] * 3, window=512, overlap=0.25, blend="gaussian", batch_size=4, num_classes=6
        )
    seconds = time.perf_counter() - start
    peak = _proc_status_kb("VmHWM") / 1024
    print(
        json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": rss_before, "shape": list(logits.shape)})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-size", type=int, default=1024, help="fake Potsdam tile side for part A")
    parser.add_argument("--crops", type=int, default=160, help="crops timed per loader setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--augment", nargs="+", default=["none", "paper"], help="conf/augment options to time")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--full-tile", type=int, default=6000, help="tile side for part B")
    parser.add_argument("--skip-full-tile", action="store_true")
    parser.add_argument("--full-tile-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full_tile_worker:
        full_tile_worker(args.full_tile_worker)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_fake_potsdam(Path(tmp) / "potsdam", tile_size=args.tile_size, tiles=TRAIN_TILES)
        start = time.perf_counter()
        base = Potsdam(
            "train",
            root=root,
            crop_size=512,
            num_samples=args.crops * 3,
            skip_incomplete_tiles=True,
            broken_labels="skip",
            progress=False,
        )
        print(
            f"A. fake Potsdam: {len(TRAIN_TILES)} tiles of {args.tile_size}^2, cache prepared in "
            f"{time.perf_counter() - start:.1f} s"
        )
        rates = {}
        for option in args.augment:
            augment = instantiate(OmegaConf.load(CONFIG_DIR / "augment" / f"{option}.yaml"))
            data = IncompleteModalityDataset(base, augment=augment, seed=0)
            for w in (0, 2):
                rates[option, w] = crops_per_second(data, workers=w, crops=args.crops, batch_size=args.batch_size)
        model = training_samples_per_second(base.modalities, size=512, batch_size=2, steps=args.train_steps)
    print("| augment | loader | crops/s (512 px, rgb+nir+dsm) | SGMA mit_b0 training samples/s | data/model ratio |")
    print("|---|---|---:|---:|---:|")
    for (option, w), rate in rates.items():
        print(f"| {option} | {w} workers | {rate:.1f} | {model:.2f} | {rate / model:.1f} |")
    worst = min(rates.values()) / model
    print(f"- {'PASS' if worst >= 3 else 'MISS'}  data/model ratio >= 3 for every augment option: worst {worst:.1f}")

    if not args.skip_full_tile:
        out = subprocess.run(
            [sys.executable, __file__, "--full-tile-worker", str(args.full_tile)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"B. whole tile {args.full_tile} x {args.full_tile}, SGMA mit_b0, window 512, overlap 0.25, gaussian, "
            f"3 modalities: {result['seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
            f"(before inference {result['rss_before_mb']:.0f} MB)"
        )
        print(f"- {'PASS' if result['peak_rss_mb'] < 4096 else 'MISS'}  peak RSS < 4 GB")


if __name__ == "__main__":
    main()
