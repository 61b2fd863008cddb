"""DELIVER on fake data: layout parsing, label decoding, condition filter, errors, training."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bind_to, compose_config
from sgma.data.deliver import CLASSES, CONDITIONS, Deliver, decode_label, frame_files
from sgma.data.fake import make_fake_deliver
from sgma.data.tiles import CACHE_VERSION
from sgma.modalities import all_patterns


def _ds(root, split="train", **kw):
    return Deliver(split, root=root, crop_size=64, progress=False, **kw)


@pytest.fixture(scope="module")
def deliver_root(tmp_path_factory):
    return make_fake_deliver(tmp_path_factory.mktemp("data") / "DELIVER")


@pytest.fixture
def fresh(tmp_path):
    return make_fake_deliver(tmp_path / "DELIVER", counts=(1, 1, 0), conditions=("cloud", "sun"))


def test_layout_samples_and_stats(deliver_root):
    ds = _ds(deliver_root)
    assert [m.name for m in ds.modalities] == ["rgb", "depth", "event", "lidar"]
    assert all(m.channels == 3 for m in ds.modalities) and ds.num_classes == 25 and len(ds.palette) == 25
    assert ds.classes[0] == "building" and ds.classes[-1] == "truck" and ds.classes == CLASSES
    assert len(ds.images) == 2 * len(CONDITIONS) and len(ds) == 10  # area / crop^2
    assert sorted(ds.images)[0] == "train__cloud__MAP_1_point0__000000_front"
    assert len(_ds(deliver_root, "val")) == 5 and len(_ds(deliver_root, "test", num_samples=2)) == 2
    sample = ds[0]
    assert set(sample) == {"rgb", "depth", "event", "lidar", "mask"}
    assert all(sample[m].shape == (3, 64, 64) and sample[m].dtype == torch.float32 for m in ("rgb", "lidar"))
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (64, 64)
    stats = ds.manifest["stats"]
    assert stats["split"] == "train" and set(stats["modalities"]) == {"rgb", "depth", "event", "lidar"}
    assert (ds.cache.dir / "manifest.json").is_file() and ds.cache.dir.name == f"deliver-v{CACHE_VERSION}"
    assert [m.name for m in _ds(deliver_root, modalities="lidar+rgb").modalities] == ["rgb", "lidar"]


def test_label_decoding(deliver_root):
    ids, unknown = decode_label(np.array([[[0, 9, 9], [1, 0, 0]], [[25, 0, 0], [26, 3, 3]]], np.uint8))
    assert ids.tolist() == [[255, 0], [24, 255]] and unknown == 1
    assert decode_label(np.array([[0, 7]], np.uint8))[0].tolist() == [[255, 6]]  # single-channel png
    ds = _ds(deliver_root, "val")  # grid: whole frame, nothing masked by the window
    for i in range(len(ds)):
        tile = ds.window(i).tile
        _, condition, sequence, rest = tile.split("__")
        frame, view = rest.rsplit("_", 1)
        png = frame_files(deliver_root, condition, "val", sequence, frame, view)["semantic"]
        raw = np.asarray(Image.open(png))[..., 0].astype(np.int64)
        expected = np.where(raw == 0, 255, raw - 1)
        assert np.array_equal(ds[i]["mask"].numpy(), expected)
        assert (ds[i]["mask"][:8, :8] == 255).all() and (ds[i]["mask"][-8:, -8:] == 24).all()


def test_condition_filter(deliver_root):
    ds = _ds(deliver_root, conditions=["fog", "sun"])
    assert ds.conditions == ("fog", "sun") and len(ds.images) == 4
    assert {t.split("__")[1] for t in ds.images} == {"fog", "sun"}
    assert ds.cache.dir.name == f"deliver-fog+sun-v{CACHE_VERSION}"
    assert _ds(deliver_root, "val", conditions="night").images == ["val__night__MAP_1_point0__000000_front"]
    with pytest.raises(ValueError, match=r"dataset\.builder\.conditions: unknown DELIVER condition"):
        _ds(deliver_root, conditions=["snow"])


@pytest.mark.filterwarnings("ignore:deliver. dropping")
def test_errors(tmp_path, fresh):
    for root in (tmp_path / "absent", None):
        with pytest.raises(FileNotFoundError, match=r"(?s)DELIVER/CMNeXt.*Expected tree"):
            Deliver("train", root=root, crop_size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        _ds(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no complete test frame"):
        _ds(fresh, "test")
    with pytest.raises(ValueError, match="multiple of 32"):
        Deliver("train", root=fresh, crop_size=100)
    lidar = frame_files(fresh, "sun", "val", "MAP_1_point0", "000000", "front")["lidar"]
    lidar.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"000000_lidar_front\.png is missing .*dataset\.builder\.skip_incomplete=true"
    ):
        _ds(fresh)
    lidar.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lidar/sun/val/MAP_1_point0/000000_lidar_front\.png is a directory"):
        _ds(fresh)
    lidar.rmdir()
    with pytest.warns(UserWarning, match="dropping sun/val/MAP_1_point0/000000_front"):
        assert len(_ds(fresh, "val", skip_incomplete=True).images) == 1
    event = frame_files(fresh, "cloud", "train", "MAP_1_point0", "000000", "front")["event"]
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(event)
    with pytest.raises(ValueError, match=r"size mismatch: .*000000_event_front\.png is 32 x 64 px"):
        _ds(fresh, skip_incomplete=True)
    event.write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"cannot read .*000000_event_front\.png .*truncated or corrupt"):
        _ds(fresh, skip_incomplete=True)


def test_train_on_fake_deliver(deliver_root, tmp_path):
    overrides = ["debug=tiny", "dataset=deliver", f"dataset.builder.root={deliver_root}", "model=baseline"]
    overrides += ["logger=csv", "missing=uniform", "dataset.builder.progress=false"]
    cfg = compose_config("train", overrides)
    assert cfg.dataset.builder.crop_size == 64
    cfg = bind_to(cfg, tmp_path)
    from sgma.tasks import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics, objects = train(cfg)
    patterns = all_patterns(["rgb", "depth", "event", "lidar"])
    assert len(patterns) == 15
    rows = (tmp_path / "patterns.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:] if r.split(",")[0] in patterns] == patterns  # 15 pattern rows
    assert objects["datamodule"].classes == CLASSES
    assert 0 <= metrics["test/avg/miou"] <= 1
