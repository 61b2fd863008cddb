"""DFC2023 track 2 on fake data: decoding, COCO rasterisation, stats, errors, training."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from conftest import bind_to, compose_config
from sgma.data.dfc2023 import DFC2023, load_coco, rasterise
from sgma.data.fake import make_fake_dfc2023
from sgma.modalities import all_patterns


def _ds(root, split="train", **kw):
    return DFC2023(split, root=root, crop_size=64, progress=False, **kw)


@pytest.fixture(scope="module")
def dfc_root(tmp_path_factory):
    return make_fake_dfc2023(tmp_path_factory.mktemp("data") / "dfc2023")


@pytest.fixture
def fresh(tmp_path):
    return make_fake_dfc2023(tmp_path / "dfc2023", counts=(2, 1, 1))


def test_samples_keys_dtypes_shapes_and_stats(dfc_root):
    ds = _ds(dfc_root)
    assert [m.name for m in ds.modalities] == ["rgb", "dsm", "sar"] and ds.classes == ("background", "building")
    assert len(ds) == 4 and len(_ds(dfc_root, "val")) == 2 and len(_ds(dfc_root, "test", num_samples=1)) == 1
    sample = ds[0]
    assert set(sample) == {"rgb", "dsm", "sar", "mask"}
    assert sample["rgb"].shape == (3, 64, 64) and sample["rgb"].dtype == torch.float32
    assert sample["dsm"].shape == sample["sar"].shape == (1, 64, 64)
    assert sample["mask"].dtype == torch.int64 and set(sample["mask"].unique().tolist()) == {0, 1}
    stats = ds.manifest["stats"]
    assert stats["split"] == "train" and set(stats["modalities"]) == {"rgb", "dsm", "sar"}
    assert ds.modalities[2].mean[0] < 0  # SAR in dB
    assert (ds.cache.dir / "manifest.json").is_file()
    assert [m.name for m in _ds(dfc_root, modalities=["sar", "rgb"]).modalities] == ["rgb", "sar"]


def test_mask_is_union_of_building_polygons(dfc_root):
    ds = _ds(dfc_root, "val")
    coco = json.loads((dfc_root / "annotations" / "buildings_only_val.json").read_text())
    for i in range(len(ds)):
        win = ds.window(i)
        image_id = next(img["id"] for img in coco["images"] if img["file_name"] == f"{win.tile.split('-')[1]}.tif")
        expected = np.zeros((64, 64), bool)
        for ann in coco["annotations"]:
            if ann["image_id"] == image_id:
                x, y, w, h = ann["bbox"]
                expected[y : y + h, x : x + w] = True
        assert np.array_equal(ds[i]["mask"].numpy() == 1, expected)
        # heights follow the buildings
        assert ds[i]["dsm"][0][expected].mean() > ds[i]["dsm"][0][~expected].mean() + 3


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


def test_errors(tmp_path, fresh):
    for root in (tmp_path / "absent", None):
        with pytest.raises(FileNotFoundError, match=r"(?s)Data Fusion Contest 2023.*Expected tree"):
            DFC2023("train", root=root, crop_size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        _ds(tmp_path / "empty")
    (fresh / "val" / "sar" / "P0001.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"P0001\.tif is missing.*dataset\.builder\.skip_incomplete=true"):
        _ds(fresh)
    (fresh / "val" / "sar" / "P0001.tif").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val/sar/P0001\.tif is a directory, not a file"):
        _ds(fresh)
    with pytest.warns(UserWarning, match="dropping val/P0001"):
        _ds(fresh, skip_incomplete=True)
    bad = fresh / "train" / "height" / "P0002.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(OSError, match=r"cannot read .*P0002\.tif .*truncated or corrupt"):
        _ds(fresh, skip_incomplete=True)
    ann = fresh / "annotations" / "buildings_only_val.json"
    ann.unlink()
    ann.mkdir()
    with pytest.raises(FileNotFoundError, match=r"buildings_only_val\.json is a directory, not a file"):
        _ds(fresh, skip_incomplete=True)


def test_missing_test_annotations(tmp_path):
    root = make_fake_dfc2023(tmp_path / "d", counts=(2, 1, 1), test_annotations=False)
    assert len(_ds(root)) == 2 and len(_ds(root, "val")) == 1  # train/val work without the test json
    with pytest.raises(FileNotFoundError, match=r"(?s)split=test.*buildings_only_test\.json.*no test annotation"):
        _ds(root, "test")
    (root / "annotations" / "buildings_only_train.json").write_text("{broken")
    with pytest.raises(Exception, match=r"buildings_only_train\.json"):
        _ds(root)


def test_height_outliers_clipped_and_left_out_of_stats(dfc_root, tmp_path):
    root = make_fake_dfc2023(tmp_path / "d", height_outliers=["train/P0002"])  # dfc_root plus one 1e30 patch
    with pytest.warns(UserWarning) as caught:
        ds = _ds(root)
    messages = [str(w.message) for w in caught if "outside" in str(w.message)]
    assert len(messages) == 1 and re.search(
        r"train/height/P0002\.tif: 64 height \(m above ground\) value\(s\) outside \[-100, 1000\] clipped .*"
        r"64 above 1000 \(highest 1e\+30\)",
        messages[0],
    )
    info = ds.manifest["tiles"]["train-P0002"]["info"]["outliers"]
    assert info["dsm"] == {"below": 0, "above": 64, "max": 1e30} and info["sar"] == {"below": 0, "above": 0}
    assert float(np.asarray(ds.cache.array("train-P0002", "dsm")).max()) == 1000
    clean = _ds(dfc_root).manifest["stats"]["modalities"]["dsm"]
    dirty = ds.manifest["stats"]["modalities"]["dsm"]
    assert dirty["std"][0] == pytest.approx(clean["std"][0], rel=0.02) and dirty["excluded"] == 64


def test_image_not_in_annotations(fresh):
    path = fresh / "annotations" / "buildings_only_val.json"
    coco = json.loads(path.read_text())
    coco["images"][0]["file_name"] = "P9999.tif"
    path.write_text(json.dumps(coco))
    with pytest.raises(Exception, match=r"no image entry with file_name 'P0001\.tif'"):
        _ds(fresh)


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
