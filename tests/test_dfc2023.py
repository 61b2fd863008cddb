"""DFC2023 track 2 on a fake release tree: discovery, the split by city, COCO rasterisation, SAR scale,
stats, errors, training."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from conftest import bind_to, compose_config
from sgma.data import dfc2023
from sgma.data.dfc2023 import DFC2023, city_of, load_coco, rasterise, split_by_city
from sgma.data.fake import make_fake_dfc2023, write_geotiff
from sgma.data.fake.dfc2023 import fake_train_names
from sgma.modalities import all_patterns

SMALL = (("SV", "Rio", -22.9, -43.1, 1), ("SV", "Oslo", 59.9, 10.7, 1), ("GF2", "Xian", 34.3, 108.9, 1))


def _ds(root, split="train", **kw):
    kw.setdefault("progress", False)
    return DFC2023(split, root=root, crop_size=64, **kw)


def _quiet(root, split="train", **kw):
    """A dataset built while ignoring the zero-annotation warning the default fake release triggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no annotation")
        return _ds(root, split, **kw)


@pytest.fixture(scope="module")
def dfc_root(tmp_path_factory):
    return make_fake_dfc2023(tmp_path_factory.mktemp("data") / "dfc2023")


@pytest.fixture
def small(tmp_path):
    return make_fake_dfc2023(tmp_path / "dfc2023", cities=SMALL, unannotated=0, unlabelled=(0, 0))


def test_release_tree_builds_train_val_test(dfc_root, caplog):
    dfc2023._ONCE.clear()  # the info lines are logged once per process
    with caplog.at_level(logging.INFO, logger="sgma"):
        ds = _quiet(dfc_root)
    val, test = _quiet(dfc_root, "val"), _quiet(dfc_root, "test")
    assert [m.name for m in ds.modalities] == ["rgb", "dsm", "sar"] and ds.classes == ("background", "building")
    assert len(ds.images) + len(val.images) + len(test.images) == 10 and val.images and test.images
    sample = ds[0]
    assert set(sample) == {"rgb", "dsm", "sar", "mask"}
    assert sample["rgb"].shape == (3, 64, 64) and sample["rgb"].dtype == torch.float32
    assert sample["dsm"].shape == sample["sar"].shape == (1, 64, 64)
    assert sample["mask"].dtype == torch.int64 and set(sample["mask"].unique().tolist()) <= {0, 1}
    stats = ds.manifest["stats"]
    assert stats["split"] == "train" and set(stats["modalities"]) == {"rgb", "dsm", "sar"}
    assert ds.modalities[2].mean[0] < 0  # SAR in dB
    assert ds.input_transforms == {"sar": {"name": "sar_to_db", "low": -25.0, "high": 0.0}}
    assert [m.name for m in _quiet(dfc_root, modalities=["sar", "rgb"]).modalities] == ["rgb", "sar"]
    text = caplog.text
    assert re.search(r"unlabelled official scenes in track2/val/ \(2 scenes\), track2_test_data/ \(2 scenes\)", text)
    assert f"python predict.py ckpt_path=... input={dfc_root / 'track2' / 'val'} pattern=rgb+sar" in text
    assert re.search(r"by city \(val_fraction=0\.1, test_fraction=0\.1, split_seed=0\): train \d+ images", text)


def test_mask_is_union_of_polygons_and_rle(dfc_root):
    coco = json.loads((dfc_root / "track2" / "buildings_only_train.json").read_text())
    assert any(isinstance(a["segmentation"], dict) for a in coco["annotations"])  # RLE present
    assert any(isinstance(a["segmentation"], list) for a in coco["annotations"])
    checked = 0
    for split in ("train", "val", "test"):
        ds = _quiet(dfc_root, split)
        for i in range(len(ds)):
            win = ds.window(i)
            image_id = next(img["id"] for img in coco["images"] if img["file_name"] == f"{win.tile}.tif")
            expected = np.zeros((64, 64), bool)
            for ann in coco["annotations"]:
                if ann["image_id"] == image_id:
                    x, y, w, h = ann["bbox"]
                    expected[y : y + h, x : x + w] = True
            assert np.array_equal(ds[i]["mask"].numpy() == 1, expected)
            if expected.any():  # heights follow the buildings
                assert ds[i]["dsm"][0][expected].mean() > ds[i]["dsm"][0][~expected].mean() + 3
            checked += 1
    assert checked >= 10


def test_rasterise_hand_made_polygon(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "P0001.tif", "height": 10, "width": 12}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "area": 6.0,
                "bbox": [2, 2, 3, 2],
                "segmentation": [[2.0, 2.0, 5.0, 2.0, 5.0, 4.0, 2.0, 4.0]],
            },  # 3 x 2 px rectangle
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "area": 8.0,
                "bbox": [4, 3, 2, 4],
                "segmentation": [[4.0, 3.0, 6.0, 3.0, 6.0, 7.0, 4.0, 7.0]],
            },  # 2 x 4 px, overlapping by 1 px
        ],
        "categories": [{"id": 1, "name": "building"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    mask = rasterise(load_coco(path), 7, 10, 12)
    assert mask.shape == (10, 12) and mask.dtype == np.uint8
    assert mask.sum() == 6 + 8 - 1
    assert mask[2:4, 2:5].all() and mask[3:7, 4:6].all()


def _stems(sizes: dict[str, int]) -> list[str]:
    return [f"SV_{city}_{i:.4f}_1.0000" for city, n in sizes.items() for i in range(n)]


def test_split_by_city():
    rng = np.random.default_rng(1)
    sizes = {f"City{k}": int(rng.integers(5, 16)) for k in range(24)}
    stems = _stems(sizes)
    a = split_by_city(stems, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert set(a) == set(sizes) and set(a.values()) == {"train", "val", "test"}  # one split per city
    assert a == split_by_city(stems, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert a != split_by_city(stems, val_fraction=0.1, test_fraction=0.2, seed=1)
    images = {s: sum(n for c, n in sizes.items() if a[c] == s) for s in ("val", "test")}
    assert abs(images["val"] - 0.1 * len(stems)) <= 15 and abs(images["test"] - 0.2 * len(stems)) <= 15
    assert city_of("GF2_Brasilia_-15.8652_-47.9337") == "Brasilia" and city_of("P0001") is None
    # every split gets a city even when the fractions are below one city's share; test_fraction=0: none
    three = split_by_city(_stems({"A": 5, "B": 5, "C": 5}), seed=3)
    assert sorted(three.values()) == ["test", "train", "val"]
    assert set(split_by_city(_stems({"A": 5, "B": 5}), test_fraction=0).values()) == {"train", "val"}
    with pytest.raises(ValueError, match=r"only 2 cities \(A, B\).*test_fraction=0"):
        split_by_city(_stems({"A": 5, "B": 5}))
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction = 1"):
        split_by_city(stems, val_fraction=0.5, test_fraction=0.5)
    assert split_by_city(["x1", "x2", "SV_A_1.0_2.0"], seed=0).keys() == {"x1", "x2", "A"}  # own groups


def test_split_recorded_in_manifest_and_grouped(dfc_root, tmp_path):
    ds = _quiet(dfc_root)
    options = ds.manifest["options"]
    stems = [Path(n).stem for n in fake_train_names()]
    assert options["cities"] == split_by_city(stems, seed=0)
    assert (options["val_fraction"], options["test_fraction"], options["split_seed"]) == (0.1, 0.1, 0)
    assert options["sar_scale"] == "db"
    splits = ds.manifest["splits"]
    for split, tiles in splits.items():
        assert tiles and {options["cities"][city_of(t)] for t in tiles} == {split}
    other = _quiet(dfc_root, split_seed=5, cache_dir=tmp_path / "c")
    assert other.manifest["options"]["cities"] == split_by_city(stems, seed=5) != options["cities"]


def test_height_folder_and_annotations_folder_variants(tmp_path):
    root = make_fake_dfc2023(tmp_path / "d", cities=SMALL, unannotated=0, height_folder="height")
    (root / "annotations").mkdir()
    (root / "track2" / "buildings_only_train.json").rename(root / "annotations" / "buildings_only_train.json")
    ds = _ds(root)
    assert Path(ds.cache.sources[ds.images[0]]["dsm"]).parent.name == "height"
    shutil.copytree(root / "track2" / "train" / "height", root / "track2" / "train" / "dsm")
    assert Path(_ds(root).cache.sources[ds.images[0]]["dsm"]).parent.name == "dsm"  # same files: dsm/ is read
    next((root / "track2" / "train" / "dsm").iterdir()).unlink()
    with pytest.raises(ValueError, match=r"both dsm/ and height/ height folders with different files.*only in height/"):
        _ds(root)


def test_zero_annotation_warning_and_empty_json(dfc_root, small):
    with pytest.warns(
        UserWarning, match=r"1 of 10 labelled image\(s\) have no annotation.*\(train \d, val \d, test \d\)"
    ):
        _ds(dfc_root)
    path = small / "track2" / "buildings_only_train.json"
    coco = json.loads(path.read_text())
    path.write_text(json.dumps({**coco, "annotations": []}))  # the baseline's image_id_val.json, renamed
    with pytest.raises(ValueError, match=r"holds no annotations \(3 image entries.*every mask would be background"):
        _ds(small)


def test_sar_db_and_linear(small, tmp_path):
    sar_file = next((small / "track2" / "train" / "sar").iterdir())
    with rasterio.open(sar_file) as src:
        linear = src.read(1)
    linear[:4, :4] = np.nan  # no-data: filled after the conversion, counted
    linear[4, :5] = 0  # no return: -25 dB
    write_geotiff(sar_file, linear, gsd=0.5)
    with pytest.warns(UserWarning, match=r"16 no-data/NaN pixel\(s\) set to -25 dB"):
        db = _ds(small)
    with pytest.warns(UserWarning, match=r"16 no-data/NaN pixel\(s\) set to 0 power"):
        lin = _ds(small, sar_scale="linear", cache_dir=tmp_path / "lin")
    tile = sar_file.stem
    got_db = np.asarray(db.cache.array(tile, "sar"), np.float32)[0]
    got_lin = np.asarray(lin.cache.array(tile, "sar"), np.float32)[0]
    valid = np.isfinite(linear)
    expected = np.clip(10 * np.log10(np.where(linear > 0, linear, 1e-30)), -25, 0)
    np.testing.assert_allclose(got_db[valid], expected[valid], atol=0.02)
    assert (got_db[:4, :4] == -25).all() and (got_db[4, :5] == -25).all() and (got_db >= -25).all()
    np.testing.assert_allclose(got_lin[valid], linear[valid], rtol=1e-3)
    assert (got_lin[:4, :4] == 0).all()
    for ds in (db, lin):
        assert ds.manifest["tiles"][tile]["info"]["nodata_pixels"]["sar"] == 16
    assert lin.input_transforms == {} and lin.manifest["options"]["sar_scale"] == "linear"
    assert db.modalities[2].mean[0] < 0 < lin.modalities[2].mean[0]
    with pytest.raises(ValueError, match=r"sar_scale='dB'; use one of db, linear"):
        _ds(small, sar_scale="dB")


def test_missing_json_gives_one_inventory(small):
    (small / "track2" / "buildings_only_train.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        _ds(small)
    text = str(err.value)
    assert text.startswith("dfc2023: files missing under dataset.builder.root=")
    assert "train annotations (buildings_only_train.json): 0/1 found; missing buildings_only_train" in text
    assert re.search(r"train rgb images \(track2/train/rgb/<SAT>_<City>_<lat>_<lon>\.tif\): 3/3 found in", text)
    assert "train heights" in text and "searched" in text and "Data Fusion Contest 2023" in text


def test_errors(tmp_path, small):
    for root in (tmp_path / "absent", None):
        with pytest.raises(FileNotFoundError, match=r"(?s)Data Fusion Contest 2023.*Expected tree"):
            DFC2023("train", root=root, crop_size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        _ds(tmp_path / "empty")
    missing = small / "track2" / "train" / "sar" / "SV_Rio_-22.9000_-43.1000.tif"
    missing.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"(?s)train sar images .*2/3 found.*missing SV_Rio.*skip_incomplete=true"
    ):
        _ds(small)
    with pytest.warns(UserWarning, match=r"dropping 1 of 3 train image\(s\).*SV_Rio"):
        _ds(small, skip_incomplete=True, test_fraction=0)  # two cities left: train and val
    bad = small / "track2" / "train" / "dsm" / "SV_Oslo_59.9000_10.7000.tif"
    bad.write_bytes(b"not a tiff")
    unreadable = r"cannot read .*SV_Oslo_59\.9000_10\.7000\.tif .*truncated or corrupt"
    with pytest.raises(OSError, match=unreadable), pytest.warns(UserWarning, match="dropping 1 of 3"):
        _ds(small, skip_incomplete=True, test_fraction=0)
    with pytest.raises(ValueError, match=r"the test split is empty.*test=false"):
        _ds(small, "test", skip_incomplete=True, test_fraction=0)


def test_size_mismatch_and_unknown_image(small):
    name = "SV_Oslo_59.9000_10.7000.tif"
    write_geotiff(small / "track2" / "train" / "sar" / name, np.ones((32, 32), np.float32), gsd=0.5)
    with pytest.raises(Exception, match=r"size mismatch: .*sar/SV_Oslo.* is 32 x 32 px"):
        _ds(small)
    for m in ("rgb", "sar", "dsm"):
        shutil.copy(
            small / "track2" / "train" / m / "SV_Rio_-22.9000_-43.1000.tif",
            small / "track2" / "train" / m / "P0001.tif",
        )
    with pytest.raises(ValueError, match=r"1 train image\(s\) have no image entry \(file_name\) in .*: P0001"):
        _ds(small)


def test_height_outliers_clipped_and_left_out_of_stats(dfc_root, tmp_path):
    stem = "SV_Copenhagen_55.6870_12.5319"  # a train image for split_seed=0
    root = make_fake_dfc2023(tmp_path / "d", height_outliers=[stem])  # dfc_root plus one 1e30 patch
    with pytest.warns(UserWarning) as caught:
        ds = _ds(root)
    messages = [str(w.message) for w in caught if "outside" in str(w.message)]
    assert len(messages) == 1 and re.search(
        rf"train/dsm/{stem}\.tif: 64 height \(m above ground\) value\(s\) outside \[-100, 1000\] clipped .*"
        r"64 above 1000 \(highest 1e\+30\)",
        messages[0],
    )
    info = ds.manifest["tiles"][stem]["info"]["outliers"]
    assert info["dsm"] == {"below": 0, "above": 64, "max": 1e30} and info["sar"] == {"below": 0, "above": 0}
    assert float(np.asarray(ds.cache.array(stem, "dsm")).max()) == 1000
    clean = _quiet(dfc_root).manifest["stats"]["modalities"]["dsm"]
    dirty = ds.manifest["stats"]["modalities"]["dsm"]
    assert dirty["std"][0] == pytest.approx(clean["std"][0], rel=0.02) and dirty["excluded"] == 64


def test_non_uint8_rgb_refused_with_its_range(small):
    rgb_file = small / "track2" / "train" / "rgb" / "SV_Oslo_59.9000_10.7000.tif"
    with rasterio.open(rgb_file) as src:
        rgb = src.read().astype(np.uint16) * 8  # 11-bit values: clipping to 255 would saturate 99 % of pixels
    rgb[0, 0, 0], rgb[0, 0, 1] = 0, 2040
    write_geotiff(rgb_file, rgb, gsd=0.5)
    with pytest.raises(Exception) as err:  # wrapped by the cache, which says it removed the partial cache
        _ds(small)
    assert re.search(
        r"rgb/SV_Oslo_59\.9000_10\.7000\.tif is uint16 \(values 0\.\.2040\); the release's rgb images are 8-bit: "
        r"rescale it to 0\.\.255 as uint8",
        str(err.value),
    )
    assert not (small / ".sgma_cache" / "dfc2023-v2").exists()  # nothing half-written is left to open


def test_nodata_warned_once_per_file_with_its_fill(small, tmp_path):
    stem = "SV_Oslo_59.9000_10.7000"
    dsm_file, sar_file = (small / "track2" / "train" / m / f"{stem}.tif" for m in ("dsm", "sar"))
    with rasterio.open(dsm_file) as src:
        dsm = src.read(1)
    dsm[:5, :5] = np.nan
    dsm[10, :3] = -32768  # the declared no-data value
    write_geotiff(dsm_file, dsm, gsd=0.5, nodata=-32768)
    with rasterio.open(sar_file) as src:
        sar = src.read(1)
    sar[:4, :4] = np.nan
    write_geotiff(sar_file, sar, gsd=0.5)
    for scale, sar_fill in (("db", "-25 dB"), ("linear", "0 power")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = _ds(small, sar_scale=scale, cache_dir=tmp_path / scale)
        messages = [str(w.message) for w in caught if "no-data" in str(w.message)]
        assert len(messages) == 2, messages
        assert re.search(rf"dsm/{stem}\.tif: 28 no-data/NaN pixel\(s\) set to 0 m$", messages[0])
        assert re.search(rf"sar/{stem}\.tif: 16 no-data/NaN pixel\(s\) set to {sar_fill} \(no return\)$", messages[1])
        assert ds.manifest["tiles"][stem]["info"]["nodata_pixels"] == {"dsm": 28, "sar": 16}


def test_heights_below_minus_1000_m_are_nodata(small, tmp_path):
    """An undeclared -9999 marker is no-data (0 m, as for ISPRS), not clipped to a 100 m deep pit."""
    stem = "SV_Oslo_59.9000_10.7000"
    dsm_file = small / "track2" / "train" / "dsm" / f"{stem}.tif"
    with rasterio.open(dsm_file) as src:
        dsm = src.read(1)
    dsm[:5, :5] = -9999
    write_geotiff(dsm_file, dsm, gsd=0.5)
    with pytest.warns(UserWarning) as caught:
        ds = _ds(small, cache_dir=tmp_path / "a")
    assert any(re.search(rf"dsm/{stem}\.tif: 25 no-data/NaN pixel\(s\) set to 0 m$", str(w.message)) for w in caught)
    assert not any("outside" in str(w.message) for w in caught)
    assert ds.manifest["tiles"][stem]["info"]["outliers"]["dsm"]["below"] == 0
    assert float(ds.cache.array(stem, "dsm")[0, :5, :5].max()) == 0.0


@pytest.mark.parametrize("marker", [-500.0, float(np.finfo(np.float32).max)], ids=["-500", "float32-max"])
def test_undeclared_nodata_warning_names_the_fix(small, tmp_path, marker):
    stem = "SV_Oslo_59.9000_10.7000"
    dsm_file = small / "track2" / "train" / "dsm" / f"{stem}.tif"
    with rasterio.open(dsm_file) as src:
        dsm = src.read(1)
    dsm[:5, :5] = marker
    dsm[6, 6] = 1500  # a second, rarer outlier: the marker is the commonest clipped value
    write_geotiff(dsm_file, dsm, gsd=0.5)
    shown = str(np.float32(marker)).removesuffix(".0")
    with pytest.warns(UserWarning) as caught:
        _ds(small, cache_dir=tmp_path / "a")
    messages = [str(w.message) for w in caught if "outside" in str(w.message)]
    assert len(messages) == 1 and re.search(
        rf"dsm/{stem}\.tif: 26 height .* clipped to the range .*\. If {re.escape(shown)} marks no-data, declare it "
        rf"as the raster's nodata tag \(`gdal_edit\.py -a_nodata {re.escape(shown)} .*dsm/{stem}\.tif`\) so it is "
        r"filled with 0 m instead of clipped$",
        messages[0],
    )
    with rasterio.open(dsm_file, "r+") as dst:  # the fix, as gdal_edit.py applies it
        dst.nodata = float(shown)
    with pytest.warns(UserWarning) as caught:
        ds = _ds(small, cache_dir=tmp_path / "b")
    assert any(re.search(rf"dsm/{stem}\.tif: 25 no-data/NaN pixel\(s\) set to 0 m$", str(w.message)) for w in caught)
    assert ds.manifest["tiles"][stem]["info"]["outliers"]["dsm"]["above"] == 1


def test_train_on_fake_dfc2023(dfc_root, tmp_path):
    overrides = ["debug=tiny", "dataset=dfc2023", f"dataset.builder.root={dfc_root}", "model=baseline"]
    overrides += ["logger=csv", "missing=uniform", "dataset.builder.progress=false"]
    cfg = compose_config("train", overrides)
    assert cfg.dataset.builder.crop_size == 64
    cfg = bind_to(cfg, tmp_path)
    from sgma.tasks import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, objects = train(cfg)
    patterns = all_patterns(["rgb", "dsm", "sar"])
    rows = (tmp_path / "patterns.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:] if r.split(",")[0] in patterns] == patterns  # 7 pattern rows
    assert objects["datamodule"].classes == ("background", "building")
    assert 0 <= metrics["test/avg/miou"] <= 1
