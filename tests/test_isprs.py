"""ISPRS Potsdam / Vaihingen loaders and the prepared tile cache, on tiny fake data in the real layout."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bind_to, compose_config
from sgma.data import tiles
from sgma.data.discovery import DuplicateFileError
from sgma.data.fake import (
    OFF_PALETTE_TILES,
    POTSDAM_NARROW_NDSM,
    POTSDAM_NODATA_DSM,
    VAIHINGEN_NAN_DSM,
    VAIHINGEN_NODATA_DSM,
    colour_label,
    make_fake_potsdam,
    make_fake_vaihingen,
    vaihingen_size,
    write_geotiff,
)
from sgma.data.isprs import CLASSES, PALETTE, Potsdam, Vaihingen, decode_labels, raster_info, read_raster
from sgma.data.tiles import MANIFEST, TilePreparationError, check_crop_size, grid_windows
from sgma.modalities import all_patterns

CROP = 64


def quiet(cls, *args, **kwargs):
    """Build a dataset with the (expected) defect warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake data's defects warn on purpose; tested separately
        return cls(*args, crop_size=kwargs.pop("crop_size", CROP), progress=False, **kwargs)


@pytest.fixture(scope="module")
def potsdam_root(tmp_path_factory) -> Path:
    """One fake Potsdam with its cache prepared; tests that change files use :func:`copy_of` instead."""
    root = make_fake_potsdam(tmp_path_factory.mktemp("potsdam"))
    quiet(Potsdam, "train", root=root)
    return root


@pytest.fixture(scope="module")
def vaihingen_root(tmp_path_factory) -> Path:
    root = make_fake_vaihingen(tmp_path_factory.mktemp("vaihingen"))
    quiet(Vaihingen, "train", root=root)
    return root


def copy_of(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".sgma_cache"))
    return dest


def relative(root: Path, path: Path) -> str:
    """A source as the cache manifest records it: relative to the data root."""
    return str(path.relative_to(root))


def cache_files(cache_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in sorted(cache_dir.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- samples
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_potsdam_samples(potsdam_root, split):
    data = quiet(Potsdam, split, root=potsdam_root)
    assert [m.name for m in data.modalities] == ["rgb", "nir", "dsm"]
    assert [m.channels for m in data.modalities] == [3, 1, 1]
    assert data.classes == CLASSES and data.palette == PALETTE and data.num_classes == 6
    assert len(data) > 0
    sample = data[len(data) - 1]
    assert set(sample) == {"rgb", "nir", "dsm", "mask"}
    for m in data.modalities:
        assert sample[m.name].dtype == torch.float32 and sample[m.name].shape == (m.channels, CROP, CROP)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (CROP, CROP)
    assert set(sample["mask"].unique().tolist()) <= {*range(6), 255}
    assert float(sample["rgb"].min()) >= 0 and float(sample["rgb"].max()) <= 255  # raw, un-normalised
    # normalisation constants come from the manifest's train statistics
    stats = data.manifest["stats"]
    assert stats["split"] == "train"
    assert data.modalities[0].mean == tuple(stats["modalities"]["rgb"]["mean"])


def test_potsdam_split_tiles(potsdam_root):
    train, val, test = (quiet(Potsdam, s, root=potsdam_root) for s in ("train", "val", "test"))
    assert val.tiles == ["2_10"]
    assert "2_10" not in train.tiles + test.tiles
    assert "7_10" not in train.tiles + val.tiles + test.tiles  # dropped: annotation errors
    assert len(train.tiles) == 22 and len(test.tiles) == 14 and not set(train.tiles) & set(test.tiles)
    assert set(test.tiles) == set(Potsdam.TEST_TILES)
    sources = train.manifest["sources"]
    for tile in test.tiles:  # eroded labels for test, full ones for train/val (flat in the root: no folder in the zip)
        assert sources[tile]["label"]["path"] == f"top_potsdam_{tile}_label_noBoundary.tif"  # relative to the root
    assert sources["2_10"]["label"]["path"] == "top_potsdam_2_10_label.tif"
    assert sources["2_10"]["dsm"]["path"].endswith("1_DSM_normalisation/dsm_potsdam_02_10_normalized_lastools.jpg")
    assert sources["6_7"]["dsm"]["path"].endswith("dsm_potsdam_06_07_normalized_lastools.jpg")
    # the test split's eroded labels have ignored boundaries, train labels none
    tiles_meta = train.manifest["tiles"]
    assert all(tiles_meta[t]["info"]["label"]["boundary"] > 0 for t in test.tiles)
    assert all(tiles_meta[t]["info"]["label"]["boundary"] == 0 for t in train.tiles)
    # with full test labels instead (a different cache option: separate cache dir to keep the shared one)
    full = quiet(Potsdam, "test", root=potsdam_root, eroded_test_labels=False, cache_dir=potsdam_root / "c2")
    assert full.manifest["sources"]["2_13"]["label"]["path"] == "top_potsdam_2_13_label.tif"
    assert "7_10" in quiet(Potsdam, "train", root=potsdam_root, drop_tiles=[], cache_dir=potsdam_root / "c3").tiles


# --------------------------------------------------------------------------------------------- labels
def test_palette_decoding():
    cls = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    rgb = colour_label(cls)
    mask, stats = decode_labels(rgb)
    assert (mask == cls).all() and stats["off_palette"] == 0 and stats["boundary"] == 0
    assert stats["class_counts"] == [1] * 6
    for i, colour in enumerate(PALETTE):  # each colour in RGB order -> its id
        assert decode_labels(np.array(colour, np.uint8).reshape(3, 1, 1))[0].item() == i
    rgb[:, 0, 0] = 0  # black boundary -> ignore
    rgb[:, 1, 2] = (10, 20, 30)  # off-palette -> ignore, counted
    mask, stats = decode_labels(rgb)
    assert mask[0, 0] == 255 and mask[1, 2] == 255 and stats["boundary"] == 1 and stats["off_palette"] == 1
    assert stats["ignore"] == 2
    cls = np.random.default_rng(0).choice(6, (20, 20), p=[0.3, 0.3, 0.2, 0.15, 0.02, 0.03]).astype(np.uint8)
    assert not decode_labels(colour_label(cls))[1]["suspect_bgr"]
    mask, stats = decode_labels(colour_label(cls)[::-1].copy())  # BGR: swaps building/clutter, low veg./car
    assert stats["off_palette"] == 0 and stats["suspect_bgr"] and (mask[cls == 1] == 5).all()
    with pytest.raises(ValueError, match=r"lbl\.tif.*not a label file.*BGR"):
        decode_labels(np.full((3, 8, 8), 77, np.uint8), "lbl.tif")


def test_off_palette_counted_and_warned(potsdam_root, tmp_path):
    train = quiet(Potsdam, "train", root=potsdam_root)
    tile = OFF_PALETTE_TILES["potsdam"][0]
    assert train.manifest["tiles"][tile]["info"]["label"]["off_palette"] == 5
    assert train.manifest["tiles"]["2_12"]["info"]["label"]["off_palette"] == 0
    colours = train.manifest["tiles"][tile]["info"]["label"]["off_colours"]
    assert sum(k for _, k in colours) == 5 and all(tuple(c) not in PALETTE for c, _ in colours)
    shown = re.escape(f"most often {tuple(colours[0][0])} x {colours[0][1]}")
    with pytest.warns(UserWarning, match=rf"top_potsdam_{tile}_label\.tif: 5 pixel\(s\) with colours outside.*{shown}"):
        Potsdam("val", root=potsdam_root, crop_size=CROP, cache_dir=tmp_path / "cache", progress=False)


def test_broken_4_12_label(potsdam_root, tmp_path):
    train = quiet(Potsdam, "train", root=potsdam_root)
    fixed = potsdam_root / "5_Labels_for_participants/top_potsdam_4_12_label.tif"
    assert train.manifest["sources"]["4_12"]["label"]["path"] == relative(potsdam_root, fixed)
    expected, _ = decode_labels(read_raster(fixed)[0])
    assert (np.asarray(train.cache.array("4_12", "mask")) == expected).all()
    # the broken overlay itself is rejected by the decoder (mostly off-palette)
    with pytest.raises(ValueError, match="outside the ISPRS palette"):
        decode_labels(read_raster(potsdam_root / "top_potsdam_4_12_label.tif")[0])
    # without the correct copy: a clear error, or the tile is skipped
    root = copy_of(potsdam_root, tmp_path / "p")
    (root / "5_Labels_for_participants/top_potsdam_4_12_label.tif").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"4_12.*known-broken.*5_Labels_for_participants.*broken_labels=skip"
    ) as err:
        quiet(Potsdam, "train", root=root)
    assert "searched" in str(err.value) and "extract it again" not in str(err.value)
    with pytest.warns(UserWarning, match="dropping tile 4_12"):
        data = Potsdam("train", root=root, crop_size=CROP, broken_labels="skip", progress=False)
    assert "4_12" not in data.tiles and len(data.tiles) == 21


def test_height_outliers_clipped_warned_and_left_out_of_stats(vaihingen_root, tmp_path):
    """One 1e30 patch in one train DSM: clipped to 1000 m with a warning that counts it; the train DSM
    mean/std stay those of the clean data (before: the std went from a few metres to thousands)."""
    root = make_fake_vaihingen(tmp_path / "v", outlier_tiles=["5"])  # same seed and size as vaihingen_root
    with pytest.warns(UserWarning) as caught:
        data = Vaihingen("train", root=root, crop_size=CROP, progress=False)
    outlier_warnings = [str(w.message) for w in caught if "outside [-100, 1000]" in str(w.message)]
    assert len(outlier_warnings) == 1  # one per tile, with the counts
    assert re.search(
        r"dsm_09cm_matching_area5\.tif: 64 height \(m above the tile's ground\) value\(s\) outside \[-100, 1000\] "
        r"clipped .*64 above 1000 \(highest 1e\+30\).*left out of the mean/std",
        outlier_warnings[0],
    )
    info = data.manifest["tiles"]["5"]["info"]["dsm"]
    assert info["outliers"] == {"below": 0, "above": 64, "max": 1e30}
    dsm = np.asarray(data.cache.array("5", "dsm"), np.float32)
    assert dsm[0, 8:16, 8:16].min() == 1000 and np.isfinite(dsm).all()
    clean = quiet(Vaihingen, "train", root=vaihingen_root).manifest["stats"]["modalities"]["dsm"]
    dirty = data.manifest["stats"]["modalities"]["dsm"]
    assert dirty["std"][0] == pytest.approx(clean["std"][0], rel=0.01)
    assert dirty["mean"][0] == pytest.approx(clean["mean"][0], rel=0.01)
    assert dirty["excluded"] == clean["excluded"] + 64 == 25 + 24 + 64  # NaN block, file nodata, the patch
    assert data.modalities[1].std == tuple(dirty["std"])


def test_narrow_ndsm_is_padded(potsdam_root, tmp_path):
    train = quiet(Potsdam, "train", root=potsdam_root)
    tile = POTSDAM_NARROW_NDSM
    dsm = np.asarray(train.cache.array(tile, "dsm"))
    assert dsm.shape[-2:] == train.cache.array(tile, "rgb").shape[-2:] and dsm.shape[0] == 1
    assert (dsm[..., -1] == dsm[..., -2]).all()  # edge replication
    raw = read_raster(potsdam_root / f"1_DSM_normalisation/dsm_potsdam_{Potsdam.padded(tile)}_normalized_lastools.jpg")
    assert raw[0].shape[-1] == dsm.shape[-1] - 1
    assert any("padded by edge replication" in n for n in train.manifest["tiles"][tile]["info"]["notes"])
    with pytest.warns(UserWarning, match=rf"tile {tile}: .* padded by edge replication"):
        Potsdam("val", root=potsdam_root, crop_size=CROP, cache_dir=tmp_path / "cache", progress=False)


def test_empty_ndsm_policy(tmp_path):
    root = make_fake_potsdam(tmp_path / "p", tile_size=64, empty_ndsm_tiles=["6_7"])
    with pytest.raises(
        TilePreparationError, match=r"6_7.*dsm_potsdam_06_07_normalized_lastools\.jpg.*empty.*empty_dsm"
    ):
        quiet(Potsdam, "train", root=root)
    assert not (root / f".sgma_cache/potsdam-v{tiles.CACHE_VERSION}").exists()
    kept = quiet(Potsdam, "train", root=root, empty_dsm="keep")
    assert "6_7" in kept.tiles and not np.asarray(kept.cache.array("6_7", "dsm")).any()
    with pytest.warns(UserWarning, match="06_07.*empty"):
        dropped = Potsdam("train", root=root, crop_size=CROP, empty_dsm="drop", progress=False)
    assert "6_7" not in dropped.tiles and "6_7" in dropped.manifest["skipped"]
    with pytest.raises(ValueError, match=r"dataset\.builder\.empty_dsm='ignore'"):
        Potsdam("train", root=root, empty_dsm="ignore")
    with pytest.raises(TilePreparationError, match=r"builder\.empty_dsm=keep .*dataset\.builder\.empty_dsm=drop"):
        quiet(Potsdam, "train", root=root)


def test_potsdam_raw_dsm(potsdam_root):
    data = quiet(Potsdam, "train", root=potsdam_root, dsm_source="dsm", cache_dir=potsdam_root / "raw")
    info = data.manifest["tiles"][POTSDAM_NODATA_DSM]["info"]["dsm"]
    assert info["nodata_pixels"] == 16 + 9 and info["ground"] > 30
    dsm = np.asarray(data.cache.array(POTSDAM_NODATA_DSM, "dsm"), np.float32)
    assert np.isfinite(dsm).all() and dsm.min() >= 0 and dsm.max() < 30 and (dsm[0, :4, :4] == 0).all()


# ------------------------------------------------------------------------------------------ vaihingen
def test_vaihingen(vaihingen_root):
    train, val, test = (quiet(Vaihingen, s, root=vaihingen_root) for s in ("train", "val", "test"))
    assert val.tiles == ["30"] and len(train.tiles) == 15 and len(test.tiles) == 17
    assert "30" not in train.tiles + test.tiles and not set(train.tiles) & set(test.tiles)
    assert [m.name for m in train.modalities] == ["irrg", "dsm"]
    sample = test[0]
    assert set(sample) == {"irrg", "dsm", "mask"} and sample["irrg"].shape == (3, CROP, CROP)
    assert sample["dsm"].shape == (1, CROP, CROP) and sample["mask"].dtype == torch.int64
    meta = train.manifest["tiles"]
    assert meta[VAIHINGEN_NAN_DSM]["info"]["dsm"]["nodata_pixels"] == 25  # NaN block
    assert meta[VAIHINGEN_NODATA_DSM]["info"]["dsm"]["nodata_pixels"] == 24  # -32767 (file nodata)
    assert meta["5"]["info"]["dsm"]["nodata_pixels"] == 0
    for tile in (VAIHINGEN_NAN_DSM, VAIHINGEN_NODATA_DSM):
        dsm = np.asarray(train.cache.array(tile, "dsm"), np.float32)
        assert np.isfinite(dsm).all() and dsm.min() >= 0 and dsm.max() < 30  # heights above ground, not 260 m
        assert meta[tile]["info"]["dsm"]["ground"] > 255
    assert (np.asarray(train.cache.array(VAIHINGEN_NAN_DSM, "dsm"))[0, :5, :5] == 0).all()
    sources = test.manifest["sources"]
    # the COMPLETE zips unpack flat; the full labels carry the image names (told apart by their pixels)
    assert sources["2"]["label"]["path"] == "top_mosaic_09cm_area2_noBoundary.tif"
    assert sources["2"]["irrg"]["path"] == "top/top_mosaic_09cm_area2.tif"
    assert train.manifest["sources"]["1"]["label"]["path"] == "top_mosaic_09cm_area1.tif"
    assert train.input_transforms == {"dsm": {"name": "heights_above_ground"}} and train.dsm_source == "dsm"
    full = quiet(Vaihingen, "test", root=vaihingen_root, eroded_test_labels=False, cache_dir=vaihingen_root / "c2")
    assert full.manifest["sources"]["2"]["label"]["path"] == "top_mosaic_09cm_area2.tif"
    assert meta["2"]["info"]["label"]["off_palette"] == 5 and meta["2"]["info"]["label"]["boundary"] > 0


# ---------------------------------------------------------------------------------------------- cache
def test_cache_reused_and_rebuilt(tmp_path):
    root = make_fake_potsdam(tmp_path / "p", tile_size=64)
    cache_dir = tmp_path / "cache"
    data = quiet(Potsdam, "train", root=root, cache_dir=cache_dir)
    before = cache_files(cache_dir)
    assert MANIFEST in before and "2_11/rgb.npy" in before
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["version"] == tiles.CACHE_VERSION and manifest["tiles"]["2_11"]["shape"] == [64, 64]
    assert manifest["tiles"]["2_11"]["arrays"]["dsm"]["dtype"] == "float16"
    assert manifest["tiles"]["2_11"]["arrays"]["rgb"]["dtype"] == "uint8"
    # reused: a second construction (any split) rewrites nothing
    quiet(Potsdam, "test", root=root, cache_dir=cache_dir)
    quiet(Potsdam, "train", root=root, cache_dir=cache_dir, modalities=["rgb"])
    assert cache_files(cache_dir) == before
    # a source file changes -> rebuilt
    label = root / "top_potsdam_2_11_label.tif"
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = quiet(Potsdam, "train", root=root, cache_dir=cache_dir)
    after = cache_files(cache_dir)
    assert after[MANIFEST] != before[MANIFEST] and after["2_12/rgb.npy"] != before["2_12/rgb.npy"]
    assert rebuilt.manifest["sources"]["2_11"]["label"]["mtime_ns"] == stat.st_mtime_ns + 10**9
    # another cache format version -> rebuilt, never mixed
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    manifest["version"] = tiles.CACHE_VERSION + 1
    (cache_dir / MANIFEST).write_text(json.dumps(manifest))
    quiet(Potsdam, "train", root=root, cache_dir=cache_dir)
    assert json.loads((cache_dir / MANIFEST).read_text())["version"] == tiles.CACHE_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache", "p"]  # no temp or old folders
    assert data.cache.dir == cache_dir
    # the default location
    default = quiet(Potsdam, "val", root=root)
    assert default.cache.dir == root / ".sgma_cache" / f"potsdam-v{tiles.CACHE_VERSION}"


def test_failed_preparation_leaves_no_cache(tmp_path, monkeypatch):
    root = make_fake_potsdam(tmp_path / "p", tile_size=64)
    cache_dir = tmp_path / "caches" / "potsdam"
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(TilePreparationError, match=r"tile '2_11' \(writing dsm\).*No space left on device") as err:
        quiet(Potsdam, "train", root=root, cache_dir=cache_dir)
    assert isinstance(err.value.__cause__, OSError)
    assert not cache_dir.exists() and [p.name for p in cache_dir.parent.iterdir()] == [".potsdam.lock"]  # no temp
    monkeypatch.setattr(np, "save", real_save)
    assert len(quiet(Potsdam, "train", root=root, cache_dir=cache_dir).tiles) == 22


def test_unreadable_file_mid_preparation(tmp_path):
    root = make_fake_potsdam(tmp_path / "p", tile_size=64)
    jpg = root / "1_DSM_normalisation/dsm_potsdam_05_12_normalized_lastools.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])  # the header survives (sizes check out), the pixels are cut
    with pytest.raises((OSError, TilePreparationError), match=r"dsm_potsdam_05_12_normalized_lastools\.jpg.*truncated"):
        quiet(Potsdam, "train", root=root)
    assert [p.name for p in (root / ".sgma_cache").iterdir()] == [f".potsdam-v{tiles.CACHE_VERSION}.lock"]


# --------------------------------------------------------------------------------------------- errors
def test_root_missing_or_empty(tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(FileNotFoundError, match=r"(does not exist|is empty).*4_Ortho_RGBIR.*5_Labels_all.*isprs"):
            Potsdam("train", root=root)
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)ISPRS_semantic_labeling_Vaihingen\.zip.*Usual tree.*top/top_mosaic_09cm_area1\.tif",
    ):
        Vaihingen("train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no data folder given.*dataset\.builder\.root=/path/to/potsdam"):
        Potsdam("train")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated/notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"(?s)RGBIR images .*: 0/37 found; missing .*4_Ortho_RGBIR\.zip"):
        Potsdam("train", root=tmp_path)


def test_missing_modality_file(potsdam_root, tmp_path):
    root = copy_of(potsdam_root, tmp_path / "p")
    missing = root / "1_DSM_normalisation/dsm_potsdam_03_12_normalized_lastools.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        quiet(Potsdam, "train", root=root)
    message = str(err.value)  # one message: what was found where, what is missing, which archive, where it looked
    assert message.startswith("potsdam: files missing under dataset.builder.root=")
    assert re.search(
        r"nDSM \(dsm_potsdam_<rr>_<cc>_normalized_lastools\.jpg\): 36/37 found in 1_DSM_normalisation/; missing "
        r"3_12; they come in 1_DSM_normalisation\.zip",
        message,
    )
    assert re.search(
        r"labels \(top_potsdam_<id>_label\.tif\): 23/23 found in the root, 5_Labels_for_participants/", message
    )
    assert "searched" in message and "skip_incomplete_tiles=true" in message and "extract it again" not in message
    with pytest.warns(UserWarning, match=r"dropping 1 incomplete tile.*3_12"):
        data = Potsdam("train", root=root, crop_size=CROP, skip_incomplete_tiles=True, progress=False)
    assert "3_12" not in data.tiles and len(data.tiles) == 21


_READ_AS_NOBODY = """
import os, sys
import PIL.Image, rasterio, rasterio.errors  # imported before dropping privileges: root's files stay closed
from sgma.data.isprs import raster_info, read_raster
os.setgid(65534)
os.setuid(65534)
for fn, path in ((raster_info, sys.argv[1]), (read_raster, sys.argv[2])):
    try:
        fn(__import__("pathlib").Path(path))
        print("READ", path)
    except OSError as err:
        print(type(err).__name__, err)
"""


def test_permission_denied_is_not_called_corrupt(potsdam_root, tmp_path):
    """A file the user may not read is reported as such, by the real libraries' errors (rasterio, PIL).

    The sandbox runs as root, which reads any file: there the readers run in a child process that drops to
    user ``nobody`` after its imports, so the OS really refuses the read."""
    import subprocess
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sgma-perm-"))  # outside pytest's root-only tmp tree
    try:
        folder.chmod(0o755)
        tif, jpg = folder / "top_potsdam_2_11_RGBIR.tif", folder / "dsm_potsdam_02_11_normalized_lastools.jpg"
        shutil.copy(potsdam_root / "4_Ortho_RGBIR/top_potsdam_2_11_RGBIR.tif", tif)
        shutil.copy(potsdam_root / "1_DSM_normalisation/dsm_potsdam_02_11_normalized_lastools.jpg", jpg)
        tif.chmod(0)
        jpg.chmod(0)
        if os.geteuid() == 0:
            run = subprocess.run([sys.executable, "-c", _READ_AS_NOBODY, str(tif), str(jpg)], capture_output=True)
            if run.returncode and b"setuid" in run.stderr + run.stdout:
                pytest.skip(f"cannot drop privileges here: {run.stderr.decode()[-300:]}")
            lines = run.stdout.decode().splitlines()
            assert run.returncode == 0, run.stderr.decode()
        else:
            lines = []
            for fn, path in ((raster_info, tif), (read_raster, jpg)):
                with pytest.raises(OSError) as err:
                    fn(path)
                lines.append(f"{type(err.value).__name__} {err.value}")
        assert len(lines) == 2
        for line, path in zip(lines, (tif, jpg), strict=True):
            assert line.startswith(f"PermissionError cannot read {path}: permission denied"), line
            assert "check its permissions" in line and "truncated or corrupt" not in line
    finally:
        for f in folder.iterdir():
            f.chmod(0o644)
        shutil.rmtree(folder)


def test_read_errors_say_what_the_file_is(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot read .*nothing\.tif: it is missing"):
        raster_info(tmp_path / "nothing.tif")
    (tmp_path / "folder.tif").mkdir()
    with pytest.raises(IsADirectoryError, match=r"folder\.tif: it is a directory, not a file"):
        raster_info(tmp_path / "folder.tif")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(OSError, match=r"broken\.jpg .*truncated or corrupt: extract it again"):
        read_raster(tmp_path / "broken.jpg")
    write_geotiff(tmp_path / "whole.tif", np.zeros((3, 256, 256), np.uint8))
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])  # GDAL's read error carries code 1 = EPERM
    with pytest.raises(OSError, match=r"half\.tif .*truncated or corrupt: extract it again") as err:
        read_raster(tmp_path / "half.tif")
    assert not isinstance(err.value, PermissionError)
    denied = PermissionError(13, "Permission denied")  # what open() raises for a user without read access
    (tmp_path / "ok.tif").write_bytes(b"x")
    assert "permission denied" in str(tiles.read_error(tmp_path / "ok.tif", denied))


def test_size_mismatch(potsdam_root, tmp_path):
    root = copy_of(potsdam_root, tmp_path / "p")
    label = root / "top_potsdam_5_10_label.tif"
    write_geotiff(label, colour_label(np.zeros((80, 96), np.uint8)))
    with pytest.raises(
        ValueError,
        match=r"5_10.*top_potsdam_5_10_label\.tif is 80 x 96.*top_potsdam_5_10_RGBIR\.tif is 96 x 96.*extract it again",
    ):
        quiet(Potsdam, "train", root=root)
    write_geotiff(label, colour_label(np.zeros((96, 96), np.uint8)))
    ndsm = root / "1_DSM_normalisation/dsm_potsdam_05_10_normalized_lastools.jpg"
    from PIL import Image

    Image.fromarray(np.zeros((96, 90), np.uint8)).save(ndsm)  # 6 px short: not the known 1 px defect
    with pytest.raises(ValueError, match=r"dsm_potsdam_05_10_normalized_lastools\.jpg is 96 x 90"):
        quiet(Potsdam, "train", root=root)


def test_truncated_tif(potsdam_root, tmp_path):
    root = copy_of(potsdam_root, tmp_path / "p")
    tif = root / "4_Ortho_RGBIR/top_potsdam_6_9_RGBIR.tif"
    tif.write_bytes(tif.read_bytes()[:200])
    with pytest.raises((OSError, TilePreparationError), match=r"top_potsdam_6_9_RGBIR\.tif"):
        quiet(Potsdam, "train", root=root)


def test_bad_arguments(potsdam_root):
    with pytest.raises(ValueError, match=r"dataset\.size=100 must be a positive multiple of 32.*dataset\.size=96"):
        Potsdam("train", root=potsdam_root, crop_size=100)
    assert check_crop_size(512) == 512
    with pytest.raises(ValueError, match="unknown split"):
        Potsdam("training", root=potsdam_root)
    with pytest.raises(ValueError, match=r"dataset\.builder\.drop_tiles names unknown potsdam tiles \['710'\].*quote"):
        Potsdam("train", root=potsdam_root, drop_tiles=[710])
    with pytest.raises(ValueError, match=r"dataset\.builder\.stride=100 must be in \[1, dataset\.size=64\]"):
        quiet(Potsdam, "val", root=potsdam_root, stride=100)
    with pytest.raises(ValueError, match=r"dataset\.builder\.dsm_source='lidar'"):
        Potsdam("train", root=potsdam_root, dsm_source="lidar")
    with pytest.raises(ValueError, match="unknown modality 'sar'"):
        Potsdam("train", root=potsdam_root, modalities=["rgb", "sar"])


# ---------------------------------------------------------------------------------------------- crops
def test_train_crops_deterministic_and_memory_mapped(potsdam_root):
    a = quiet(Potsdam, "train", root=potsdam_root, seed=3, num_samples=10)
    b = quiet(Potsdam, "train", root=potsdam_root, seed=3, num_samples=10)
    c = quiet(Potsdam, "train", root=potsdam_root, seed=4, num_samples=10)
    assert len(a) == 10
    assert [a.window(i) for i in range(10)] == [b.window(i) for i in range(10)]
    assert [a.window(i) for i in range(10)] != [c.window(i) for i in range(10)]
    for key in ("rgb", "mask"):
        assert torch.equal(a[7][key], b[7][key])
    win = a.window(7)
    assert win.tile in a.tiles
    array = a.cache.array(win.tile, "rgb")
    assert isinstance(array, np.memmap)  # read through mmap, never the whole tile
    expected = np.asarray(array[:, win.y : win.y + CROP, win.x : win.x + CROP], np.float32)
    assert torch.equal(a[7]["rgb"], torch.from_numpy(expected))
    # the default epoch length tiles the train area once; workers re-open their own memory maps
    default = quiet(Potsdam, "train", root=potsdam_root)
    assert len(default) == 22 * 96 * 96 // CROP**2
    clone = pickle.loads(pickle.dumps(a))
    assert torch.equal(clone[7]["dsm"], a[7]["dsm"])


@pytest.mark.parametrize("stride", [None, 16])
def test_grid_covers_every_tile_exactly(potsdam_root, stride):
    test = quiet(Potsdam, "test", root=potsdam_root, stride=stride)
    shapes = test.crops.shapes
    per_tile = {t: 4 if stride is None else 9 for t in shapes}  # 96 px tiles: starts 0, 32 (and 16 at stride 16)
    assert len(test) == sum(per_tile.values())
    coverage = {t: np.zeros(s, np.int64) for t, s in shapes.items()}
    scored = {t: np.zeros(s, np.int64) for t, s in shapes.items()}
    labelled = 0
    for i in range(len(test)):
        win = test.window(i)
        coverage[win.tile][win.y : win.y + CROP, win.x : win.x + CROP] += 1
        y0, y1, x0, x1 = win.own
        scored[win.tile][win.y + y0 : win.y + y1, win.x + x0 : win.x + x1] += 1
        labelled += int((test[i]["mask"] != 255).sum())
    assert all((c >= 1).all() for c in coverage.values())  # every pixel seen
    assert all((s == 1).all() for s in scored.values())  # and scored exactly once
    meta = test.manifest["tiles"]
    assert labelled == sum(sum(meta[t]["info"]["label"]["class_counts"]) for t in shapes)


def test_grid_windows_border_aligned():
    windows = grid_windows({"a": (100, 64)}, 64)
    assert [(w.y, w.x) for w in windows] == [(0, 0), (36, 0)]
    assert [w.own for w in windows] == [(0, 64, 0, 64), (28, 64, 0, 64)]
    with pytest.raises(ValueError, match="stride"):
        grid_windows({"a": (100, 64)}, 64, stride=65)


# ---------------------------------------------------------------------------------------- integration
def test_train_on_fake_potsdam(potsdam_root, tmp_path):
    overrides = ["debug=tiny", "dataset=potsdam", f"dataset.builder.root={potsdam_root}", "logger=csv"]
    overrides += ["dataset.builder.crop_size=64", "dataset.builder.progress=false", "model=baseline"]
    overrides += ["dataset.splits.train.num_samples=4", "dataset.splits.val.num_samples=1", "data.batch_size=2"]
    cfg = compose_config("train", overrides)
    assert cfg.dataset.builder.crop_size == 64 and cfg.dataset.size == 64  # debug=tiny's size reaches the crops
    cfg = bind_to(cfg, tmp_path)
    from sgma.tasks import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fake-data defect warnings (tested above) and tiny-loader hints
        metrics, objects = train(cfg)
    patterns = all_patterns(["rgb", "nir", "dsm"])
    rows = (tmp_path / "patterns.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:] if r.split(",")[0] in patterns] == patterns  # 7 pattern rows
    table = json.loads((tmp_path / "patterns.json").read_text())
    assert table["excluded_classes"] == ["clutter"]
    assert objects["datamodule"].classes == CLASSES
    assert 0 <= metrics["test/avg/miou"] <= 1


# ------------------------------------------------------------------------------------ release variants
FEW = ["2_10", "2_11", "2_13"]  # one tile per split


def few_potsdam(root: Path, **kwargs) -> dict[str, Potsdam]:
    return {
        s: quiet(Potsdam, s, root=root, crop_size=32, skip_incomplete_tiles=True, **kwargs)
        for s in ("train", "val", "test")
    }


@pytest.mark.parametrize("variant", [{}, {"nested": True}, {"imagery": "rgb_irrg"}])
def test_potsdam_release_variants(tmp_path, variant):
    """Flat label zips, double nesting and RGB + IRRG instead of RGBIR all build every split."""
    root = make_fake_potsdam(tmp_path / "p", tile_size=32, tiles=FEW, **variant)
    if variant.get("nested"):
        assert (root / "4_Ortho_RGBIR/4_Ortho_RGBIR/top_potsdam_2_10_RGBIR.tif").is_file()
        assert (root / "5_Labels_all/top_potsdam_2_10_label.tif").is_file()
    else:
        assert (root / "top_potsdam_2_10_label.tif").is_file() and (
            root / "top_potsdam_2_13_label_noBoundary.tif"
        ).is_file()
    assert (
        root / ("2_Ortho_RGB/2_Ortho_RGB" if variant.get("nested") else "2_Ortho_RGB") / "top_potsdam_2_10_RGB.tfw"
    ).is_file()
    data = few_potsdam(root)
    assert [d.tiles for d in data.values()] == [["2_11"], ["2_10"], ["2_13"]]
    expected = variant.get("imagery", "rgbir")
    assert all(d.imagery == expected and d.manifest["options"]["imagery"] == expected for d in data.values())
    sources = data["train"].manifest["sources"]["2_11"]
    assert set(sources) == ({"rgbir"} if expected == "rgbir" else {"rgb", "irrg"}) | {"dsm", "label"}
    sample = data["test"][0]
    assert sample["rgb"].shape == (3, 32, 32) and sample["nir"].shape == (1, 32, 32)
    assert data["train"].input_transforms == {}
    if expected == "rgb_irrg":  # nir is IRRG band 1, rgb the RGB file
        irrg = next(root.rglob("top_potsdam_2_11_IRRG.tif"))
        assert (np.asarray(data["train"].cache.array("2_11", "nir")) == read_raster(irrg, (1,))[0]).all()
        rgb = read_raster(next(root.rglob("top_potsdam_2_11_RGB.tif")))[0]
        assert (np.asarray(data["train"].cache.array("2_11", "rgb")) == rgb).all()
        with pytest.raises(FileNotFoundError, match=r"RGBIR images .*0/37 found.*4_Ortho_RGBIR\.zip"):
            quiet(Potsdam, "train", root=root, crop_size=32, skip_incomplete_tiles=True, imagery="rgbir")
    raw = quiet(Potsdam, "val", root=root, crop_size=32, skip_incomplete_tiles=True, dsm_source="dsm")
    assert raw.input_transforms == {"dsm": {"name": "heights_above_ground"}}


def test_auto_variant_fallback_names_the_missing_files(tmp_path, caplog):
    """imagery=auto with RGBIR for only some tiles (4_Ortho_RGBIR.zip half extracted) uses RGB + IRRG everywhere:
    a warning names the missing RGBIR file and how to choose either variant; a complete release is quiet."""
    root = make_fake_potsdam(tmp_path / "p", tile_size=32, tiles=FEW)
    with caplog.at_level("WARNING", logger="sgma"):
        assert few_potsdam(root)["train"].imagery == "rgbir"
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "preferred variant" in r.getMessage()]
    next(root.rglob("top_potsdam_2_11_RGBIR.tif")).unlink()
    with caplog.at_level("WARNING", logger="sgma"):
        assert few_potsdam(root)["train"].imagery == "rgb_irrg"
    warned = [r.getMessage() for r in caplog.records if "preferred variant" in r.getMessage()]
    assert (
        warned
        and "1 needed file(s) of the preferred variant are missing (top_potsdam_2_11_RGBIR.tif, from " in (warned[0])
    )
    assert "4_Ortho_RGBIR.zip" in warned[0] and "dataset.builder.imagery=rgb_irrg" in warned[0]


def test_potsdam_6_7_cars(tmp_path):
    """6_7's 5_Labels_all copy codes cars as (252, 255, 0): the participants' copy is read; without it
    that colour decodes as car for this tile only, counted, with no error."""
    root = make_fake_potsdam(tmp_path / "p", tile_size=32, tiles=["6_7", "2_10", "2_13"])
    data = few_potsdam(root)["train"]
    good = root / "5_Labels_for_participants/top_potsdam_6_7_label.tif"
    assert data.manifest["sources"]["6_7"]["label"]["path"] == relative(root, good)
    expected, stats = decode_labels(read_raster(good)[0])
    cars = stats["class_counts"][CLASSES.index("car")]
    assert cars > 0 and (np.asarray(data.cache.array("6_7", "mask")) == expected).all()
    everyone = read_raster(root / "top_potsdam_6_7_label.tif")[0]
    assert decode_labels(everyone)[1]["off_palette"] == cars  # an exact decoder loses the cars
    good.unlink()
    data = few_potsdam(root)["train"]
    info = data.manifest["tiles"]["6_7"]["info"]
    assert info["label"]["aliased"] == cars and info["label"]["off_palette"] == 0
    assert any("252, 255, 0" in n for n in info["notes"])
    assert (np.asarray(data.cache.array("6_7", "mask")) == expected).all()
    # the alias is for 6_7 only: the same colour elsewhere stays off-palette
    assert decode_labels(everyone, aliases=None)[1]["off_palette"] == cars


def test_potsdam_participants_eroded_not_taken_for_labels(tmp_path):
    """5_Labels_for_participants_no_Boundary is the eroded participants' release, not the good 4_12 copy."""
    root = make_fake_potsdam(tmp_path / "p", tile_size=32, tiles=["4_12", "2_10", "2_13"])
    good = root / "5_Labels_for_participants/top_potsdam_4_12_label.tif"
    eroded_dir = root / "5_Labels_for_participants_no_Boundary/5_Labels_for_participants_no_Boundary"
    eroded_dir.mkdir(parents=True)
    good.rename(eroded_dir / good.name)
    with pytest.raises(FileNotFoundError, match=r"4_12.*known-broken.*broken_labels=skip"):
        few_potsdam(root)
    # double nested participants' release: found
    nested = root / "5_Labels_for_participants/5_Labels_for_participants"
    nested.mkdir(parents=True)
    (eroded_dir / good.name).rename(nested / good.name)
    assert few_potsdam(root)["train"].manifest["sources"]["4_12"]["label"]["path"] == relative(root, nested / good.name)


def test_duplicate_copies(tmp_path):
    """A second unzip: identical copies are fine, different ones an error naming both."""
    root = make_fake_potsdam(tmp_path / "p", tile_size=32, tiles=FEW)
    second = root / "again/4_Ortho_RGBIR"
    shutil.copytree(root / "4_Ortho_RGBIR", second)
    assert (
        few_potsdam(root)["train"].manifest["sources"]["2_11"]["rgbir"]["path"]
        == "4_Ortho_RGBIR/top_potsdam_2_11_RGBIR.tif"
    )
    copy = second / "top_potsdam_2_11_RGBIR.tif"
    write_geotiff(copy, np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(
        DuplicateFileError, match=r"2_11: two different RGBIR image files: 4_Ortho_RGBIR/.*again/4_Ortho"
    ):
        few_potsdam(root)


def test_vaihingen_release_variants(tmp_path):
    """Flat COMPLETE labels named like the images (no gts_for_participants), and Gerke's nDSM only."""
    root = make_fake_vaihingen(tmp_path / "v", tile_size=32, tiles=["1", "30", "2"], ndsm=True, dsm=False)
    shutil.rmtree(root / "gts_for_participants")
    assert (root / "top_mosaic_09cm_area9_noBoundary.tif").is_file()  # the unused area 9: ignored
    data = {
        s: quiet(Vaihingen, s, root=root, crop_size=32, skip_incomplete_tiles=True) for s in ("train", "val", "test")
    }
    assert [d.tiles for d in data.values()] == [["1"], ["30"], ["2"]]
    train = data["train"]
    assert train.dsm_source == "ndsm" and train.input_transforms == {}
    assert train.manifest["options"]["dsm_source"] == "ndsm"
    sources = train.manifest["sources"]
    assert sources["1"]["label"]["path"] == "top_mosaic_09cm_area1.tif"
    assert sources["1"]["irrg"]["path"] == "top/top_mosaic_09cm_area1.tif"
    ndsm = read_raster(root / "ndsm/dsm_09cm_matching_area1_normalized.jpg")[0]
    cached = train.cache.array("1", "dsm")
    assert cached.dtype == np.float16 and (np.asarray(cached) == ndsm).all()
    with pytest.raises(FileNotFoundError) as err:
        quiet(Vaihingen, "train", root=root, crop_size=32, skip_incomplete_tiles=True, dsm_source="dsm")
    assert re.search(
        r"DSMs \(dsm/dsm_09cm_matching_area<N>\.tif\): 0/\d+ found.*ISPRS_semantic_labeling_Vaihingen\.zip",
        str(err.value),
    )
    assert "extract it again" not in str(err.value)


def test_vaihingen_differing_label_copies(tmp_path):
    root = make_fake_vaihingen(tmp_path / "v", tile_size=32, tiles=["1", "30", "2"])
    data = quiet(Vaihingen, "train", root=root, crop_size=32, skip_incomplete_tiles=True)
    assert data.tiles == ["1"]  # gts_for_participants and the COMPLETE copy agree
    write_geotiff(
        root / "gts_for_participants/top_mosaic_09cm_area1.tif",
        colour_label(np.zeros(vaihingen_size("1", 32), np.uint8)),
    )
    with pytest.raises(
        DuplicateFileError, match=r"tile 1: two different label files: top_mosaic_09cm_area1\.tif and gts_for"
    ):
        quiet(Vaihingen, "train", root=root, crop_size=32, skip_incomplete_tiles=True)
