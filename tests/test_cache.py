"""The tile cache under interruption and concurrency: one preparation for many processes, leftovers of
killed preparations removed, damaged arrays detected when the cache is opened, readable permissions."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from sgma.data import tiles
from sgma.data.tiles import MANIFEST, PreparedTile, TileCache

TILES = ("a", "b", "c")


def _sources(root: Path) -> dict[str, dict[str, Path]]:
    """One small source file per tile (the cache fingerprints them)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for tile in TILES:
        path = root / f"{tile}.txt"
        if not path.exists():
            path.write_text(tile)
        out[tile] = {"src": path}
    return out


def _cache(root: Path) -> TileCache:
    return TileCache(
        root / "cache" / "toy-v1",
        dataset="toy",
        sources=_sources(root / "src"),
        splits={"train": ["a", "b"], "val": ["c"]},
        stat_keys=("img", "height"),
        root=root,
    )


class _Loader:
    """A load function that records every call in ``marker_dir`` (one file per process and tile) and can be
    slowed down so that concurrent preparations overlap."""

    def __init__(self, marker_dir: Path, delay: float = 0.0) -> None:
        self.marker_dir = Path(marker_dir)
        self.delay = delay

    def __call__(self, tile: str) -> PreparedTile:
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / f"{os.getpid()}-{tile}").touch()
        time.sleep(self.delay)
        rng = np.random.default_rng(TILES.index(tile))
        return PreparedTile(
            arrays={
                "img": rng.integers(0, 256, (3, 40, 48), dtype=np.uint8),
                "height": rng.normal(5, 2, (1, 40, 48)).astype(np.float16),
                "mask": rng.integers(0, 6, (40, 48), dtype=np.uint8),
            },
            info={"tile": tile},
        )


def _digest(cache: TileCache) -> str:
    """A hash of every cached array, read back through the memory maps."""
    h = hashlib.sha256()
    for tile in sorted(cache.manifest["tiles"]):
        for key in ("img", "height", "mask"):
            h.update(np.ascontiguousarray(cache.array(tile, key)).tobytes())
    return h.hexdigest()


def _preparations(marker_dir: Path) -> set[str]:
    """The processes that ran the load function."""
    return {p.name.split("-")[0] for p in marker_dir.iterdir()} if marker_dir.exists() else set()


def _open_in_child(root: str, delay: float, barrier, queue) -> None:
    """Child process: wait for the others, open or prepare the cache, report what it did and read."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("sgma").addHandler(handler)
    logging.getLogger("sgma").setLevel(logging.INFO)
    cache = _cache(Path(root))
    barrier.wait(timeout=60)
    cache.open_or_prepare(_Loader(Path(root) / "markers", delay), progress=False)
    queue.put((os.getpid(), _digest(cache), cache.manifest["created"], records))


def _prepare_forever(root: str) -> None:
    """Child process: prepare with a very slow loader (the test kills it mid-way)."""
    _cache(Path(root)).open_or_prepare(_Loader(Path(root) / "markers", delay=60), progress=False)


# ------------------------------------------------------------------------------------------ concurrency
def test_concurrent_processes_prepare_once(tmp_path):
    ctx = mp.get_context("spawn")  # like DDP ranks and fresh jobs: nothing inherited from this process
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(str(tmp_path), 0.4, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    preparers = _preparations(tmp_path / "markers")
    assert len(preparers) == 1  # one process loaded the tiles ...
    assert len(list((tmp_path / "markers").iterdir())) == len(TILES)  # ... each once
    (pid_a, digest_a, created_a, log_a), (_, digest_b, created_b, log_b) = results
    assert digest_a == digest_b and created_a == created_b  # both read the one cache
    waiter_log = log_b if str(pid_a) in preparers else log_a
    assert any("another process is preparing" in m for m in waiter_log)
    assert any("prepared by another process" in m for m in waiter_log)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".toy-v1.lock", "toy-v1"]


def test_killed_preparation_is_cleaned_and_rebuilt(tmp_path, caplog):
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_prepare_forever, args=(str(tmp_path),))
    child.start()
    parent = tmp_path / "cache"
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".toy-v1.tmp-") for p in parent.glob(".*")) or not (tmp_path / "markers").exists():
        assert time.monotonic() < deadline and child.is_alive(), "the child never started preparing"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)  # no cleanup handler runs: the temporary folder stays
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    orphans = [p for p in parent.iterdir() if p.name.startswith(".toy-v1.tmp-")]
    assert len(orphans) == 1 and not (parent / "toy-v1").exists()

    cache = _cache(tmp_path)
    with caplog.at_level(logging.INFO, logger="sgma"):
        cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)  # the kernel released the lock
    assert not orphans[0].exists() and sorted(p.name for p in parent.iterdir()) == [".toy-v1.lock", "toy-v1"]
    assert any(f"removed {orphans[0]}" in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)
    assert cache.stale_reason() is None and len(cache.manifest["tiles"]) == 3


def test_orphans_removed_only_under_the_lock(tmp_path, caplog):
    cache = _cache(tmp_path)
    cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    orphan = cache.dir.with_name(".toy-v1.tmp-12345-deadbeef")
    (orphan / "a").mkdir(parents=True)
    np.save(orphan / "a" / "img.npy", np.zeros((3, 100, 100), np.uint8))
    held = FileLock(str(cache.lock_path))
    held.acquire()  # another process preparing (a second open file description: a real flock conflict)
    try:
        _cache(tmp_path).open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
        assert orphan.exists()  # in use, as far as anyone can tell: left alone
    finally:
        held.release()
    with caplog.at_level(logging.INFO, logger="sgma"):
        _cache(tmp_path).open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    assert not orphan.exists()
    assert any(f"removed {orphan} (0.0 MB)" in r.getMessage() for r in caplog.records)
    assert len(_preparations(tmp_path / "markers")) == 1  # the valid cache was never rebuilt


# ------------------------------------------------------------------------------------------ validity
def test_truncated_array_is_rebuilt_with_a_logged_reason(tmp_path, caplog):
    cache = _cache(tmp_path)
    cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    expected = _digest(cache)
    npy = cache.dir / "b" / "height.npy"
    npy.write_bytes(npy.read_bytes()[:-100])  # a full disk or a killed copy
    reopened = _cache(tmp_path)
    assert "b/height.npy is 3868 bytes but its header needs 3968 (truncated)" in reopened.stale_reason()
    with caplog.at_level(logging.INFO, logger="sgma"):
        reopened.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("rebuilding the toy tile cache" in m and "truncated" in m for m in warned)
    assert _digest(reopened) == expected  # rebuilt, readable to the last row


def test_rewritten_source_keeping_size_and_mtime_is_noticed(tmp_path):
    """``cp -p``, ``rsync -t`` or ``tar x`` give a changed file its old size and mtime: its status-change time
    still differs, so the cache built from the old content is not used."""
    cache = _cache(tmp_path)
    cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    source = tmp_path / "src" / "b.txt"
    before = source.stat()
    time.sleep(0.01)
    source.write_text("B")  # same size, new content
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert source.stat().st_size == before.st_size and source.stat().st_mtime_ns == before.st_mtime_ns
    assert _cache(tmp_path).stale_reason() == "source files changed: b/src"


def test_moved_data_root_keeps_its_cache(tmp_path):
    """Sources are recorded relative to the data root: a root moved (renamed) with its cache is not rebuilt."""
    cache = _cache(tmp_path / "one")
    cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    assert cache.manifest["sources"]["a"]["src"]["path"] == "src/a.txt"
    (tmp_path / "one").rename(tmp_path / "two")
    moved = _cache(tmp_path / "two")
    assert moved.stale_reason() is None and moved.manifest["created"] == cache.manifest["created"]


def test_changed_dtype_or_shape_is_rebuilt(tmp_path, caplog):
    cache = _cache(tmp_path)
    cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    np.save(cache.dir / "a" / "height.npy", np.zeros((1, 40, 48), np.float32))
    assert "a/height.npy has dtype float32 but the manifest says float16" in _cache(tmp_path).stale_reason()
    with caplog.at_level(logging.INFO, logger="sgma"):
        rebuilt = _cache(tmp_path)
        rebuilt.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    assert any("rebuilding" in r.getMessage() and "dtype float32" in r.getMessage() for r in caplog.records)
    assert rebuilt.array("a", "height").dtype == np.float16
    np.save(cache.dir / "c" / "mask.npy", np.zeros((40, 47), np.uint8))
    assert "c/mask.npy has shape [40, 47] but the manifest says [40, 48]" in _cache(tmp_path).stale_reason()
    (cache.dir / "c" / "mask.npy").unlink()
    assert "c/mask.npy is missing" in _cache(tmp_path).stale_reason()


def test_cache_is_readable_by_group_and_others(tmp_path):
    old = os.umask(0o022)  # the usual umask; tempfile.mkdtemp would still make the cache drwx------
    try:
        cache = _cache(tmp_path)
        cache.open_or_prepare(_Loader(tmp_path / "markers"), progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((cache.dir / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((cache.dir / MANIFEST).stat().st_mode) == 0o644
    assert stat.S_IMODE((cache.dir / "a" / "img.npy").stat().st_mode) == 0o644


def test_statistics_leave_out_flagged_pixels():
    from sgma.data.tiles import _ChannelStats

    rng = np.random.default_rng(0)
    clean = rng.normal(3, 3.4, (1, 200, 300)).astype(np.float16)
    dirty = clean.copy()
    dirty[0, :10, :10] = 1000  # clipped outliers, flagged by the loader
    flags = np.zeros((200, 300), bool)
    flags[:10, :10] = True
    a, b = _ChannelStats(), _ChannelStats()
    a.update(clean)
    b.update(dirty, flags)
    ref = clean.astype(np.float64)
    assert a.result()["mean"][0] == pytest.approx(ref.mean(), abs=1e-5)
    assert a.result()["std"][0] == pytest.approx(ref.std(), abs=1e-5)  # exact moments on clean data
    kept = ref[0][~flags]
    assert b.result()["std"][0] == pytest.approx(kept.std(), abs=1e-5) and b.result()["excluded"] == 100
    c = _ChannelStats()
    c.update(dirty)  # the same tile without the flags: what one bad patch did before
    assert c.result()["std"][0] > 5 * b.result()["std"][0]


def test_cache_larger_than_the_free_disk_is_refused_before_anything_is_written(tmp_path):
    """The size estimate from the files' headers is checked against the free space before preparing."""
    from sgma.data.fake import make_fake_vaihingen
    from sgma.data.isprs import Vaihingen

    class Enormous(Vaihingen):
        bytes_per_pixel = 10**12  # a cache no disk can hold: the check must refuse it

    root = make_fake_vaihingen(tmp_path / "v", tile_size=32, tiles=["1", "30"])
    with pytest.raises(tiles.TilePreparationError, match=r"needs about .* GB .* free; set dataset.builder.cache_dir"):
        Enormous("train", root=root, crop_size=32, drop_tiles=(), skip_incomplete_tiles=True, progress=False)
    assert not (root / ".sgma_cache").exists() or not any((root / ".sgma_cache").glob("vaihingen-v*/manifest.json"))
