"""The generic-folder dataset (dataset=folder) on fake data: decoding, splits, stats, errors, training."""

from __future__ import annotations

import logging
import re
import shutil
import warnings

import numpy as np
import pytest
import rasterio
import torch
import yaml
from PIL import Image

from conftest import bind_to, compose_config
from sgma.data.fake import FOLDER_PALETTE, make_fake_folder, write_geotiff
from sgma.data.folder import FolderDataset, seeded_split
from sgma.modalities import all_patterns


def _ds(root, split="train", **kw):
    return FolderDataset(split, root=root, crop_size=64, progress=False, **kw)


def _edit_yaml(root, **changes):
    desc = yaml.safe_load((root / "dataset.yaml").read_text())
    desc.update(changes)
    (root / "dataset.yaml").write_text(yaml.safe_dump(desc))


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return make_fake_folder(tmp_path_factory.mktemp("data") / "folder")


@pytest.fixture
def fresh(tmp_path):
    return make_fake_folder(tmp_path / "folder", num_images=4)


def test_samples_keys_dtypes_shapes(folder_root):
    ds = _ds(folder_root)
    assert [m.name for m in ds.modalities] == ["rgb", "dsm"] and ds.classes == ("background", "building", "water")
    assert ds.palette == FOLDER_PALETTE
    sample = ds[0]
    assert set(sample) == {"rgb", "dsm", "mask"}
    assert sample["rgb"].dtype == torch.float32 and sample["rgb"].shape == (3, 64, 64)
    assert sample["dsm"].shape == (1, 64, 64) and sample["mask"].dtype == torch.int64
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2}
    assert sample["rgb"].max() > 1  # raw, un-normalised uint8 values
    assert ds.modalities[1].mean == (3.0,) and ds.modalities[1].std == (5.0,)  # given in dataset.yaml
    assert np.allclose(ds.modalities[0].mean, ds.manifest["stats"]["modalities"]["rgb"]["mean"])  # measured
    assert ds.manifest["stats"]["split"] == "train"
    # no-data pixel (declared nodata -9999 at (0, 0)) is 0 and counted
    assert all(t["info"]["nodata_pixels"]["dsm"] == 1 for t in ds.manifest["tiles"].values())
    assert len(_ds(folder_root, modalities=["dsm"])[0]) == 2


def test_labels_match_files_and_grid_covers_every_pixel(folder_root):
    ds = _ds(folder_root, "val")
    assert len(ds) == 4 * len(ds.stems)  # 80 px images, 64 px crops: 2 x 2 windows each
    counted = sum(int((ds[i]["mask"] != 255).sum()) for i in range(len(ds)))
    assert counted == 80 * 80 * len(ds.stems)
    win = ds.window(0)
    label = np.asarray(Image.open(folder_root / "labels" / f"{win.tile}.png"))
    assert np.array_equal(ds[0]["mask"].numpy(), label[:64, :64])
    assert len(_ds(folder_root, "val", num_samples=3)) == 3  # num_samples caps the grid


def test_palette_colour_labels(tmp_path):
    ids_root = make_fake_folder(tmp_path / "ids", num_images=4)
    col_root = make_fake_folder(tmp_path / "col", num_images=4, colour_labels=True)
    a, b = _ds(ids_root, "val"), _ds(col_root, "val")
    assert np.asarray(Image.open(col_root / "labels" / "img_000.png")).ndim == 3
    for i in range(len(a)):
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    # a colour outside the palette is an error naming the file and the colour
    img = np.asarray(Image.open(col_root / "labels" / "img_000.png")).copy()
    img[0, 0] = (1, 2, 3)
    Image.fromarray(img).save(col_root / "labels" / "img_000.png")
    with pytest.raises(Exception, match=r"img_000\.png.*\(1, 2, 3\)"):
        _ds(col_root)


def test_ignore_index_and_unknown_ids(fresh):
    label = np.asarray(Image.open(fresh / "labels" / "img_000.png")).copy()
    label[0, :5] = 7  # custom ignore value
    Image.fromarray(label).save(fresh / "labels" / "img_000.png")
    with pytest.raises(Exception, match=r"img_000\.png.*\[7\]"):
        _ds(fresh)
    _edit_yaml(fresh, ignore_index=7, splits={"train": ["img_000"], "val": ["img_001"], "test": ["img_002"]})
    ds = _ds(fresh, "train")
    ds_grid = ds.cache.array("img_000", "mask")
    assert (np.asarray(ds_grid)[0, :5] == 255).all()  # remapped to the framework's 255


def test_padding_small_images(tmp_path):
    root = make_fake_folder(tmp_path / "small", num_images=4, size=40)
    ds = _ds(root)
    sample = ds[0]
    assert sample["rgb"].shape == (3, 64, 64)
    assert (sample["mask"][40:] == 255).all() and (sample["mask"][:, 40:] == 255).all()
    assert (sample["mask"][:40, :40] != 255).all()
    assert (sample["rgb"][:, 40:] == 0).all()


def test_split_sources(tmp_path):
    frac = make_fake_folder(tmp_path / "frac", num_images=8)
    expected = seeded_split([f"img_{i:03d}" for i in range(8)], 0.25, 0.25, 0)
    assert {s: sorted(_ds(frac, s).stems) for s in ("train", "val", "test")} == expected
    assert sorted(x for v in expected.values() for x in v) == [f"img_{i:03d}" for i in range(8)]
    lists = {"train": [f"img_{i:03d}" for i in range(4)], "val": ["img_004", "img_005"], "test": ["img_006", "img_007"]}
    for how in ("yaml", "files"):
        root = make_fake_folder(tmp_path / how, num_images=8, splits=how)
        assert {s: sorted(_ds(root, s).stems) for s in ("train", "val", "test")} == lists
    # splits/*.txt win over the yaml's lists
    root = tmp_path / "files"
    _edit_yaml(root, splits={"train": ["img_000"], "val": ["img_001"], "test": ["img_002"]})
    shutil.rmtree(root / ".sgma_cache")
    assert sorted(_ds(root, "val").stems) == ["img_004", "img_005"]
    (root / "splits" / "val.txt").write_text("img_004\nnope\n")
    with pytest.raises(FileNotFoundError, match="nope"):
        _ds(root)


def test_missing_root_yaml_and_files(tmp_path, fresh):
    for root in (tmp_path / "absent", tmp_path / "empty", None):
        if root is not None and root.name == "empty":
            root.mkdir()
        with pytest.raises(FileNotFoundError, match=r"(?s)Expected tree.*dataset\.yaml.*classes"):
            FolderDataset("train", root=root, crop_size=64)
    (tmp_path / "noyaml" / "rgb").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no dataset\.yaml"):
        _ds(tmp_path / "noyaml")
    (fresh / "dsm" / "img_001.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"no file .*dsm/img_001\.\*.*dataset\.builder\.skip_incomplete"):
        _ds(fresh)
    (fresh / "dsm" / "img_001.tif").mkdir()
    with pytest.raises(FileNotFoundError, match=r"dsm/img_001\.tif is a directory, not a file"):
        _ds(fresh)
    with pytest.warns(UserWarning, match="dropping 'img_001'"):
        ds = _ds(fresh, skip_incomplete=True)
    assert "img_001" not in ds.manifest["tiles"]


def test_size_mismatch_and_bad_description(fresh):
    Image.fromarray(np.zeros((70, 80), np.uint8)).save(fresh / "labels" / "img_002.png")
    with pytest.raises(ValueError, match=r"(?s)img_002\.png is 70 x 80.*rgb/img_002\.png is 80 x 80"):
        _ds(fresh)
    for bad, match in [
        ({"modalities": [{"name": "RGB", "channels": 3}]}, "lowercase"),
        ({"modalities": [{"name": "a+b", "channels": 3}]}, "lowercase"),
        ({"classes": []}, "classes"),
        ({"palette": [[0, 0, 0]]}, "palette"),
    ]:
        desc = yaml.safe_load((fresh / "dataset.yaml").read_text())
        _edit_yaml(fresh, **bad)
        with pytest.raises(ValueError, match=match):
            _ds(fresh)
        (fresh / "dataset.yaml").write_text(yaml.safe_dump(desc))
    with pytest.raises(ValueError, match="multiple of 32"):
        FolderDataset("train", root=fresh, crop_size=50)


def test_valid_range_clips_outliers(fresh):
    path = fresh / "dsm" / "img_002.tif"
    with rasterio.open(path) as src:
        height = src.read(1)
    height[:3, :4] = 1e30
    height[5, 5] = -500
    write_geotiff(path, height, gsd=0.5, nodata=-9999.0)
    with pytest.warns(
        UserWarning,
        match=r"img_002\.tif: 13 dsm \(valid_range in dataset\.yaml\) value\(s\) outside "
        r"\[-100, 1000\] clipped to the range \(1 below -100 \(lowest -500\), 12 above 1000",
    ):
        ds = _ds(fresh)
    stored = np.asarray(ds.cache.array("img_002", "dsm"), np.float32)[0]
    assert (stored[:3, :4] == 1000).all() and stored[5, 5] == -100
    assert ds.manifest["tiles"]["img_002"]["info"]["outliers"]["dsm"]["above"] == 12
    _edit_yaml(fresh, modalities=[{"name": "rgb", "channels": 3}, {"name": "dsm", "channels": 1, "valid_range": [5]}])
    with pytest.raises(ValueError, match=r"modality 'dsm': valid_range must be \[low, high\]"):
        _ds(fresh)


def test_train_on_fake_folder(folder_root, tmp_path):
    overrides = ["debug=tiny", "dataset=folder", f"dataset.builder.root={folder_root}", "model=baseline"]
    overrides += ["logger=csv", "missing=uniform", "dataset.builder.progress=false"]
    cfg = compose_config("train", overrides)
    assert cfg.dataset.builder.crop_size == 64
    cfg = bind_to(cfg, tmp_path)
    from sgma.tasks import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, objects = train(cfg)
    patterns = all_patterns(["rgb", "dsm"])
    rows = (tmp_path / "patterns.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:] if r.split(",")[0] in patterns] == patterns  # 3 pattern rows
    assert objects["datamodule"].classes == ("background", "building", "water")
    assert 0 <= metrics["test/avg/miou"] <= 1


def test_modality_kind_steers_augmentation_without_rebuilding_the_cache(fresh):
    first = _ds(fresh)
    assert {m.name: m.kind for m in first.modalities} == {"rgb": "optical", "dsm": "elevation"}
    manifest = (first.cache.dir / "manifest.json").stat().st_mtime_ns
    desc = yaml.safe_load((fresh / "dataset.yaml").read_text())
    rgb = next(m for m in desc["modalities"] if m["name"] == "rgb")
    del rgb["value_max"]
    (fresh / "dataset.yaml").write_text(yaml.safe_dump(desc))
    with pytest.raises(ValueError, match=r"(?s)dataset\.yaml.*'rgb' is optical: give value_max"):
        _ds(fresh)
    rgb["value_max"] = 255
    (fresh / "dataset.yaml").write_text(yaml.safe_dump(desc))
    again = _ds(fresh)
    assert again.modalities[0].kind == "optical" and again.modalities[0].value_max == 255.0
    assert (again.cache.dir / "manifest.json").stat().st_mtime_ns == manifest  # the same cache, not rebuilt
    rgb["kind"] = "colour"
    (fresh / "dataset.yaml").write_text(yaml.safe_dump(desc))
    with pytest.raises(ValueError, match="kind must be one of optical, elevation, sar, categorical, other"):
        _ds(fresh)


def _edit_modality(root, name, **changes):
    desc = yaml.safe_load((root / "dataset.yaml").read_text())
    next(m for m in desc["modalities"] if m["name"] == name).update(changes)
    (root / "dataset.yaml").write_text(yaml.safe_dump(desc))


def test_more_bands_than_declared_channels_is_an_error(fresh):
    for path in (fresh / "dsm").glob("*.tif"):
        with rasterio.open(path) as src:
            height = src.read(1)
        write_geotiff(path, np.stack([height, height, height]), gsd=0.5, nodata=-9999.0)
    with pytest.raises(
        ValueError,
        match=r"dsm/img_\d+\.tif has 3 band\(s\) but modality 'dsm' declares 1 channel\(s\) in .*"
        r"dataset\.yaml: set 'channels: 3' for 'dsm' there, or write its rasters with 1 band\(s\)",
    ):
        _ds(fresh)


@pytest.mark.parametrize(
    "where, change, match",
    [  # a typo'd key would leave its default in force: refused, naming the nearest valid key
        (None, {"val_frac": 0.3}, r"unknown key\(s\) 'val_frac' \(did you mean 'val_fraction'\?\); valid keys: mod"),
        ("dsm", {"no_data": 0}, r"unknown key\(s\) 'modalities\.dsm\.no_data' \(did you mean 'nodata'\?\); valid keys"),
        # values that do not convert: the key and the value, not a bare int()/float() error
        ("dsm", {"channels": "three"}, r"modalities\.dsm\.channels must be a whole number, got 'three'"),
        ("dsm", {"nodata": "none"}, r"modalities\.dsm\.nodata must be a number, got 'none'"),
        ("rgb", {"mean": ["x", "y", "z"], "std": [1, 1, 1]}, r"modalities\.rgb\.mean must be a finite number, got 'x'"),
        ("rgb", {"std": [1, float("nan"), 1]}, r"modalities\.rgb\.std must be a finite number, got nan"),
        (None, {"ignore_index": "none"}, r"ignore_index must be a whole number, got 'none'"),
        (None, {"palette": [["a", 0, 0]] * 3}, r"palette\[0\] must be a whole number, got 'a'"),
    ],
)
def test_description_errors_name_the_file_key_and_value(fresh, where, change, match):
    if where is None:
        _edit_yaml(fresh, **change)
    else:
        _edit_modality(fresh, where, **change)
    with pytest.raises(ValueError, match=r"dataset\.yaml: " + match):
        _ds(fresh)


def test_yaml_splits_that_leave_stems_out_warn(tmp_path, caplog):
    for how in ("fraction", "files", "yaml"):  # every stem in a split: nothing to say
        root = make_fake_folder(tmp_path / how, num_images=4, splits=how)
        with caplog.at_level(logging.WARNING, logger="sgma"):
            _ds(root)
        assert "leaves out" not in caplog.text, how
    root = tmp_path / "yaml"
    _edit_yaml(root, splits={"train": ["img_000"], "val": ["img_001"]})
    with caplog.at_level(logging.WARNING, logger="sgma"):
        assert _ds(root).stems == ["img_000"]
    assert re.search(
        r"the 'splits' mapping of .*dataset\.yaml leaves out 2 stem\(s\) found under .*, e\.g\. "
        r"\['img_002', 'img_003'\]; .*List them in a split, or remove their files",
        caplog.text,
    )
